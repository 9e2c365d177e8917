"""Successes out of known trials under a binomial mixture: the mixture of binomials'
CDF, moments, quantiles and draws, checked against scipy and direct sums."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from moekit import MoERegressor
from moekit.successes import SuccessesPrediction


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    n = 200
    X = rng.uniform(0, 2, (n, 1))
    t = rng.integers(1, 40, n)
    z = rng.random(n) < 0.5
    s = rng.binomial(t, 1 / (1 + np.exp(-np.where(z, X[:, 0] - 2.0, 1.0 - X[:, 0]))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = MoERegressor(2, expert="binomial", n_init=1, random_state=0)
        m.fit(X, np.c_[s, t - s].astype(float))
    return m.predict_distribution(X), t


def test_cdf_and_moments_are_those_of_the_mixture_of_binomials(fitted):
    d, t = fitted
    S = SuccessesPrediction(d, t)
    w, pi = d.weights, d.means
    for j in (0, 3, 10):
        direct = (w * stats.binom.cdf(j, t[:, None], pi)).sum(1)
        np.testing.assert_allclose(S.cdf(np.full(len(t), j)), direct, rtol=1e-10, atol=1e-300)
    assert (S.cdf(np.full(len(t), -1.0)) == 0).all() and (S.cdf(t) == 1).all()
    # moments by summing over every count 0..t_i
    top = int(t.max())
    j = np.arange(top + 1)
    pmf = (w[:, None, :] * stats.binom.pmf(j[None, :, None], t[:, None, None], pi[:, None])).sum(2)
    np.testing.assert_allclose(pmf.sum(1), 1.0, rtol=1e-12)
    mean = (pmf * j).sum(1)
    np.testing.assert_allclose(S.mean(), mean, rtol=1e-10)
    np.testing.assert_allclose(S.var(), (pmf * j**2).sum(1) - mean**2, rtol=1e-8, atol=1e-10)
    # the mixture is overdispersed against one binomial of the same mean
    p = S.mean() / t
    assert (S.var() >= t * p * (1 - p) - 1e-9).all() and (S.var() > t * p * (1 - p) + 0.5).any()


def test_quantiles_are_the_smallest_counts_reaching_q_and_draws_follow_the_mixture(fitted):
    d, t = fitted
    S = SuccessesPrediction(d, t)
    top = int(t.max())
    cdfs = np.stack([S.cdf(np.full(len(t), j)) for j in range(top + 1)], 1)  # (n, top + 1)
    for q in (0.05, 0.5, 0.95):
        np.testing.assert_array_equal(S.quantile(q), (cdfs < q).sum(1))
    lo, hi = S.interval(0.9)
    assert (0 <= lo).all() and (lo <= hi).all() and (hi <= t).all()
    # one expert (a weight of 1): scipy's binomial quantiles
    alone = SimpleNamespace(weights=np.ones((len(t), 1)), means=d.means[:, :1])
    one = SuccessesPrediction(alone, t)
    np.testing.assert_array_equal(one.quantile(0.9), stats.binom.ppf(0.9, t, d.means[:, 0]))
    draws = S.sample(4000, random_state=0)
    assert draws.shape == (len(t), 4000) and (draws <= t[:, None]).all()
    np.testing.assert_allclose(draws.mean(1), S.mean(), atol=5 * S.std().max() / np.sqrt(4000))
    np.testing.assert_array_equal(draws, S.sample(4000, random_state=0))


@pytest.mark.parametrize("bad", [np.nan, -1.0, 2.5])
def test_trials_must_be_whole_numbers(fitted, bad):
    d, t = fitted
    trials = t.astype(float)
    trials[7] = bad
    with pytest.raises(ValueError, match="trials must be whole numbers >= 0; row 7"):
        SuccessesPrediction(d, trials)
    with pytest.raises(ValueError, match="trials has 3 values for 200 rows"):
        SuccessesPrediction(d, t[:3])
