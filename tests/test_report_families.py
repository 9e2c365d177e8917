"""The report's family panels: which panel each family gets, and its numbers checked
against sums computed here from the fitted coefficients and gate, or from scipy."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from scipy import stats
from scipy.special import expit

from moekit import MoERegressor
from moekit.report.describe import (
    binomial_proportions,
    count_frequencies,
    family_kind,
    pit_values,
    pp_distance,
    pp_points,
)
from moekit.report.families import discrete_pit
from moekit.report.sections import html_report


def _data(family: str, n: int = 160, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 2, (n, 1))
    z = rng.normal(size=n)
    mu = np.exp(np.where(z > 0, 0.5 + X[:, 0], 2.0 - 0.5 * X[:, 0]))
    if family == "poisson":
        y = rng.poisson(mu).astype(float)
    elif family == "negative_binomial":
        y = rng.negative_binomial(3, 3 / (3 + mu)).astype(float)
    elif family == "gamma":
        y = rng.gamma(3.0, mu / 3.0)
    elif family == "lognormal":
        y = np.exp(rng.normal(np.log(mu), 0.3))
    elif family == "weibull":
        y = mu * rng.weibull(2.5, n)
    elif family == "binomial":
        s = rng.binomial(12, expit(np.where(z > 0, X[:, 0] - 1.0, 1.0 - 2.0 * X[:, 0])))
        y = np.c_[s, 12 - s].astype(float)
    else:
        y = mu + rng.normal(size=n)
    return X, y


def _fit(family: str, X, y, k: int = 2):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MoERegressor(k, expert=family, n_init=1, max_iter=30, random_state=0).fit(X, y)


PANELS = [("poisson", "count"), ("negative_binomial", "count"), ("gamma", "positive"),
          ("lognormal", "positive"), ("weibull", "positive"), ("binomial", "binomial"),
          ("linear", "")]  # fmt: skip


@pytest.mark.parametrize(("family", "kind"), PANELS)
def test_each_family_gets_its_panel_in_the_report(family, kind):
    X, y = _data(family)
    m = _fit(family, X, y)
    assert family_kind(m.predict_distribution(X)) == kind
    figures: dict = {}
    page = html_report(m, X[:120], y[:120], X_test=X[120:], y_test=y[120:], figures=figures)
    sections = re.findall(r'<h2 id="(\w+)"', page)
    assert ("family" in sections) == bool(kind) and ("family" in figures) == bool(kind)
    titles = {"count": "Observed against expected counts on 40 held-out rows",
              "binomial": "Observed against expected proportions on 40 held-out rows",
              "positive": "Predictive CDF at the observed y (P-P) on 40 held-out rows"}  # fmt: skip
    if kind:
        assert titles[kind] in page
    # intervals of one trial say nothing of proportions: binomial fits have no coverage table
    assert ("coverage" in sections) == (family != "binomial")


def test_expected_zeros_of_a_poisson_mixture_are_the_sum_of_each_rows_probability():
    X, y = _data("poisson")
    m = _fit("poisson", X, y)
    rows = count_frequencies(m.predict_distribution(X), y)
    g = m.gate_weights(X)  # (n, K)
    mu = np.exp(m.intercept_[None, :] + X @ m.coef_.T)  # (n, K), in the data's units
    assert rows[0][0] == "0" and rows[0][1] == int((y == 0).sum())
    np.testing.assert_allclose(rows[0][2], (g * np.exp(-mu)).sum(), rtol=1e-8)
    np.testing.assert_allclose(rows[3][2], (g * stats.poisson.pmf(3, mu)).sum(), rtol=1e-8)
    # every row is somewhere: observed and expected both add up to n with the tail bin
    capped = count_frequencies(m.predict_distribution(X), y, most=4)
    assert capped[-1][0] == ">= 4" and sum(r[1] for r in capped) == len(y)
    np.testing.assert_allclose(sum(r[2] for r in capped), len(y), rtol=1e-10)


def test_expected_counts_of_a_negative_binomial_mixture_match_scipy():
    X, y = _data("negative_binomial")
    d = _fit("negative_binomial", X, y).predict_distribution(X)
    mean, var = d.means, d.stds**2
    size = mean**2 / (var - mean)  # NB2: var = mean + mean^2 / size
    for j in (0, 1, 5):
        expected = (d.weights * stats.nbinom.pmf(j, size, size / (size + mean))).sum()
        np.testing.assert_allclose(count_frequencies(d, y)[j][2], expected, rtol=1e-8)


def test_binomial_proportions_add_up_to_the_expected_successes():
    X, y = _data("binomial")
    m = _fit("binomial", X, y)
    rows = binomial_proportions(m.predict_distribution(X), y, groups=5)
    assert [r[1] for r in rows] == [32] * 5 and sum(r[2] for r in rows) == y.sum()
    pi = (m.gate_weights(X) * expit(m.intercept_[None, :] + X @ m.coef_.T)).sum(1)
    np.testing.assert_allclose(sum(r[2] * r[3] for r in rows), (y.sum(1) * pi).sum(), rtol=1e-8)
    np.testing.assert_allclose(sum(r[2] * r[4] for r in rows), y[:, 0].sum(), rtol=1e-12)
    expected = [r[3] for r in rows]
    assert expected == sorted(expected)  # groups of rows by expected proportion


def test_pit_of_a_gamma_mixture_is_its_cdf_at_y_and_near_uniform():
    X, y = _data("gamma", n=400)
    d = _fit("gamma", X, y).predict_distribution(X)
    u, event = pit_values(d, y)
    shape = (d.means / d.stds) ** 2
    cdf = (d.weights * stats.gamma.cdf(y[:, None], shape, scale=d.means / shape)).sum(1)
    np.testing.assert_allclose(u, cdf, rtol=1e-8)
    assert event.all() and pp_distance(u) < 0.1  # the model that made the data
    # a censored row's u is a lower bound; a finite interval's, its middle
    upper = y.copy()
    upper[:3] = np.inf
    upper[3] = y[3] * 2
    u2, event2 = pit_values(d, y, upper)
    assert event2[:3].tolist() == [0, 0, 0] and event2[3:].all()
    np.testing.assert_allclose(u2[:3], u[:3])
    np.testing.assert_allclose(u2[3], 0.5 * (u[3] + d[3:4].cdf(np.array([y[3] * 2]))[0]))


def test_pp_points_are_the_empirical_cdf_and_kaplan_meier_under_censoring():
    x, f = pp_points(np.array([0.4, 0.1, 0.3, 0.2]))
    np.testing.assert_allclose(x, [0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(f, [0.25, 0.5, 0.75, 1.0])
    # 0.2 censored: at 0.3 two are at risk, S = 3/4 * 1/2; at 0.4 one, S = 0
    x, f = pp_points(np.array([0.1, 0.2, 0.3, 0.4]), np.array([1, 0, 1, 1]))
    np.testing.assert_allclose(x, [0.1, 0.3, 0.4])
    np.testing.assert_allclose(f, [0.25, 0.625, 1.0])
    # Kolmogorov's D: 1 / n for evenly spread u; 1 - 0.4 where every u is below 0.4
    assert pp_distance(np.array([0.25, 0.5, 0.75, 1.0])) == pytest.approx(0.25)
    assert pp_distance(np.array([0.1, 0.2, 0.3, 0.4])) == pytest.approx(0.6)


def _censored_counts(n: int, seed: int = 0):
    """A two-expert Poisson mixture, right-censored at an independent Poisson(9) bound."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (n, 1))
    z = rng.random(n) < 0.5
    y = rng.poisson(np.exp(np.where(z, 1.0 + 0.8 * X[:, 0], 2.4 - 0.5 * X[:, 0]))).astype(float)
    c = rng.poisson(9.0, n).astype(float)
    censored = y > c
    return X, np.where(censored, c, y), np.where(censored, np.inf, y)


def test_randomised_pit_of_censored_counts_is_uniform_under_the_fitted_truth():
    X, y, upper = _censored_counts(3000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m2 = MoERegressor(2, expert="poisson", n_init=2, random_state=0).fit(X, y, y_upper=upper)
        m1 = MoERegressor(1, expert="poisson", random_state=0).fit(X, y, y_upper=upper)
    d = m2.predict_distribution(X)
    u, event = discrete_pit(d, y, upper)
    right = np.isinf(upper)
    assert (event == ~right).all()
    # a censored row's u is F(y - 1): the most its count's CDF can be below y
    np.testing.assert_allclose(u[right], d[right].cdf(y[right] - 1.0), rtol=1e-12)
    exact = ~right
    lo = np.where(y[exact] > 0, d[exact].cdf(np.maximum(y[exact] - 1.0, 0.0)), 0.0)
    assert (u[exact] >= lo - 1e-12).all() and (u[exact] <= d[exact].cdf(y[exact]) + 1e-12).all()
    # the model that made the data follows the diagonal; one expert does not
    assert pp_distance(u, event) < 0.04
    assert pp_distance(*discrete_pit(m1.predict_distribution(X), y, upper)) > 0.08
    # the seed makes the draws, and the report, repeatable
    np.testing.assert_array_equal(u, discrete_pit(d, y, upper)[0])


def test_randomised_pit_of_censored_successes_is_the_binomial_mixtures_cdf():
    X, y = _data("binomial", n=200)
    m = _fit("binomial", X, y)
    d = m.predict_distribution(X)
    upper = y[:, 0].copy()
    upper[:50] = np.inf  # at least these successes
    upper[50:60] = np.minimum(y[50:60, 0] + 2, 12)  # an interval
    u, event = discrete_pit(d, y, upper)
    t, pi = y.sum(1)[:, None], d.means

    def cdf(j, rows):
        return (d.weights[rows] * stats.binom.cdf(j[:, None], t[rows], pi[rows])).sum(1)

    head, rest = slice(0, 50), slice(50, None)
    np.testing.assert_allclose(u[head], cdf(y[head, 0] - 1.0, head), rtol=1e-10, atol=1e-300)
    assert event[head].sum() == 0 and event[rest].all()
    lo, hi = cdf(y[rest, 0] - 1.0, rest), cdf(upper[rest], rest)
    assert (u[rest] >= lo - 1e-12).all() and (u[rest] <= hi + 1e-12).all()
    assert (hi[:10] > cdf(y[50:60, 0], slice(50, 60))).all()  # the intervals reach above y


@pytest.mark.parametrize("family", ["poisson", "binomial"])
def test_censored_counts_and_successes_get_a_pp_panel_not_a_table_of_bounds(family):
    if family == "poisson":
        X, y, upper = _censored_counts(160)
    else:
        X, y = _data("binomial")
        upper = np.where(np.arange(len(y)) % 4 == 0, np.inf, y[:, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = MoERegressor(2, expert=family, n_init=1, random_state=0).fit(X, y, y_upper=upper)
    page = html_report(m, X, y, rows={"y_upper": upper})
    assert "Predictive CDF at the observed y, randomised (P-P)" in page
    assert "right-censored (Kaplan-Meier)" in page
    assert "Observed against expected" not in page  # a table would count lower bounds as seen
