"""``responsibilities`` on the rows a fit reads: with the rows' offset, and with the
censoring bounds of a censored fit, r_ik = g_k(x_i) P_k(y_i | x_i) / sum_j (...),
checked against scipy's densities and survival functions."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats

from moekit import MoERegressor


def _fit(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MoERegressor(2, n_init=2, random_state=0, **kwargs).fit(*args[:2], **args[2])


def test_responsibilities_of_a_censored_fit_use_each_rows_interval():
    rng = np.random.default_rng(0)
    n = 300
    X = rng.uniform(0, 2, (n, 1))
    z = rng.random(n) < 0.5
    t = np.exp(np.where(z, 0.5 + 0.8 * X[:, 0], 2.0 - 0.4 * X[:, 0]) + 0.3 * rng.normal(size=n))
    c = np.exp(1.5 + 0.5 * rng.normal(size=n))
    y, upper = np.minimum(t, c), np.where(t <= c, t, np.inf)
    m = _fit(X, y, {"y_upper": upper}, expert="lognormal", gate="constant")
    d = m.predict_distribution(X)
    s2 = np.log1p((d.stds / d.means) ** 2)  # the lognormal's log-scale variance and mean
    mu = np.log(d.means) - s2 / 2
    dist = stats.lognorm(np.sqrt(s2), scale=np.exp(mu))
    right = np.isinf(upper)
    each = np.where(right[:, None], dist.sf(y[:, None]), dist.pdf(y[:, None])) * d.weights
    r = m.responsibilities(X, y, y_upper=upper)
    np.testing.assert_allclose(r, each / each.sum(1, keepdims=True), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(r.sum(1), 1.0, rtol=1e-12)
    # without the bounds every y reads as exact: the censored rows' posteriors move
    r_exact = m.responsibilities(X, y)
    np.testing.assert_allclose(r_exact[~right], r[~right], rtol=1e-10, atol=1e-14)
    assert np.abs(r_exact[right] - r[right]).max() > 0.1
    # a model fitted without bounds is read with them too
    plain = _fit(X, y, {}, expert="lognormal", gate="constant")
    d = plain.predict_distribution(X)
    s2 = np.log1p((d.stds / d.means) ** 2)
    dist = stats.lognorm(np.sqrt(s2), scale=np.exp(np.log(d.means) - s2 / 2))
    each = np.where(right[:, None], dist.sf(y[:, None]), dist.pdf(y[:, None])) * d.weights
    r_plain = plain.responsibilities(X, y, y_upper=upper)
    np.testing.assert_allclose(r_plain, each / each.sum(1, keepdims=True), rtol=1e-8, atol=1e-12)


def test_responsibilities_take_the_rows_offset():
    rng = np.random.default_rng(1)
    n = 300
    X = rng.uniform(0, 2, (n, 1))
    exposure = rng.uniform(1, 30, n)
    z = rng.random(n) < 0.5
    y = rng.poisson(exposure * np.exp(np.where(z, -1.0 + 0.8 * X[:, 0], 0.5 - 0.3 * X[:, 0])))
    off = np.log(exposure)
    m = _fit(X, y.astype(float), {"offset": off}, expert="poisson")
    d = m.predict_distribution(X, offset=off)
    each = d.weights * stats.poisson.pmf(y[:, None], d.means)
    r = m.responsibilities(X, y, offset=off)
    np.testing.assert_allclose(r, each / each.sum(1, keepdims=True), rtol=1e-8, atol=1e-12)
    # without it, every row reads as of exposure 1: a different posterior
    assert np.abs(m.responsibilities(X, y) - r).max() > 0.1
    with pytest.raises(ValueError, match="offset"):
        MoERegressor(2, n_init=1, random_state=0).fit(X, y.astype(float)).responsibilities(
            X, y, offset=off
        )
