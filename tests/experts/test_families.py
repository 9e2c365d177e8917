"""Expert families recover the parameters of the models they generate."""

import numpy as np
import pytest
from scipy import stats

from moekit import MixturePrediction, MoERegressor


def _two_regimes(n, rng):
    X = rng.normal(size=(n, 2))
    first = rng.random(n) < 1.0 / (1.0 + np.exp(-2.5 * X[:, 1]))
    return X, first


def test_poisson_experts_recover_log_linear_rates():
    rng = np.random.default_rng(0)
    X, first = _two_regimes(20_000, rng)
    log_rate = np.where(first, 0.5 + 0.8 * X[:, 0], 1.5 - 0.5 * X[:, 0])
    y = rng.poisson(np.exp(log_rate))
    m = MoERegressor(2, expert="poisson", random_state=0, n_init=2).fit(X, y)
    # ordered by mean rate: exp(0.5 + ...) first
    np.testing.assert_allclose(m.intercept_, [0.5, 1.5], atol=0.05)
    np.testing.assert_allclose(m.coef_[:, 0], [0.8, -0.5], atol=0.05)
    np.testing.assert_allclose(m.coef_[:, 1], 0.0, atol=0.05)
    d = m.predict_distribution(X[:5])
    assert d.family == "poisson"
    samples = d.sample(50, random_state=0)
    assert (samples == np.round(samples)).all() and (samples >= 0).all()
    assert all(float(mode) == round(float(mode)) for row in d.modes() for mode in row)
    with pytest.raises(ValueError, match="non-negative integer counts"):
        MoERegressor(2, expert="poisson").fit(X, y - 0.5)


def test_student_t_experts_resist_outliers_that_pull_gaussian_experts():
    rng = np.random.default_rng(1)
    X = rng.uniform(-2, 2, (4000, 1))
    y = np.where(X[:, 0] > 0, 1.0 + 2.0 * X[:, 0], -1.0 - 1.0 * X[:, 0]) + 0.2 * rng.normal(
        size=4000
    )
    outliers = rng.random(4000) < 0.05
    y[outliers] += rng.normal(scale=15.0, size=outliers.sum())
    truth_coef, truth_int = np.array([-1.0, 2.0]), np.array([-1.0, 1.0])
    gauss = MoERegressor(2, random_state=0, n_init=3).fit(X, y)
    robust = MoERegressor(2, expert="student_t", random_state=0, n_init=3).fit(X, y)
    np.testing.assert_allclose(robust.coef_[:, 0], truth_coef, atol=0.05)
    np.testing.assert_allclose(robust.intercept_, truth_int, atol=0.05)

    # the Gaussian experts spend an expert on the outliers and lose a regime's line
    def error(m):
        return np.abs(m.coef_[:, 0] - truth_coef).max() + np.abs(m.intercept_ - truth_int).max()

    assert error(gauss) > 0.15 and error(gauss) > 8 * error(robust), (error(gauss), error(robust))
    assert robust.log_likelihood(X, y) > gauss.log_likelihood(X, y)


def test_student_t_degrees_of_freedom_are_estimated():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(30_000, 1))
    y = 1.0 + 0.5 * X[:, 0] + 0.3 * rng.standard_t(4, size=30_000)
    m = MoERegressor(1, expert="student_t", random_state=0).fit(X, y)
    assert m.df_[0] == pytest.approx(4.0, rel=0.15)
    assert m.noise_std_[0] == pytest.approx(0.3, rel=0.05)
    fixed = MoERegressor(1, expert="student_t", df=4.0, random_state=0).fit(X, y)
    assert fixed.df_[0] == 4.0 and fixed.n_parameters() == m.n_parameters() - 1
    d = fixed.predict_distribution(X[:3])
    ref = stats.t.logpdf(y[:3], 4.0, loc=fixed.predict(X[:3]), scale=fixed.noise_std_[0])
    np.testing.assert_allclose(d.logpdf(y[:3]), ref, rtol=1e-10)


def test_t_and_poisson_mixtures_against_scipy():
    w = np.array([[0.3, 0.7]])
    d = MixturePrediction(w, [[0.0, 4.0]], [[1.0, 0.5]], family="student_t", df=[3.0, 8.0])
    y = np.array([1.3])
    ref = np.log(0.3 * stats.t.pdf(1.3, 3, 0, 1) + 0.7 * stats.t.pdf(1.3, 8, 4, 0.5))
    np.testing.assert_allclose(d.logpdf(y), [ref])
    lo, hi = d.interval(0.95)
    cdf = lambda v: 0.3 * stats.t.cdf(v, 3, 0, 1) + 0.7 * stats.t.cdf(v, 8, 4, 0.5)  # noqa: E731
    assert cdf(hi[0]) - cdf(lo[0]) == pytest.approx(0.95, abs=1e-8)
    np.testing.assert_allclose(d.var(), 0.3 * 3 + 0.7 * 0.25 * 8 / 6 + 0.3 * 0.7 * 16, rtol=1e-12)
    assert len(d.modes()[0]) == 2
    p = MixturePrediction(w, [[1.0, 9.0]], np.sqrt([[1.0, 9.0]]), family="poisson")
    ref = np.log(0.3 * stats.poisson.pmf(5, 1.0) + 0.7 * stats.poisson.pmf(5, 9.0))
    np.testing.assert_allclose(p.logpdf([5.0]), [ref])
    assert p.logpdf([2.5])[0] == -np.inf
    lo, hi = p.interval(0.9)
    pmf_cdf = lambda k: 0.3 * stats.poisson.cdf(k, 1.0) + 0.7 * stats.poisson.cdf(k, 9.0)  # noqa: E731
    assert pmf_cdf(lo[0]) >= 0.05 > pmf_cdf(lo[0] - 1)
    # Poisson(1) ties at 0 and 1, Poisson(9) at 8 and 9; the other component breaks each tie
    np.testing.assert_array_equal(p.modes()[0], [1.0, 8.0])
    assert p.mean()[0] == pytest.approx(0.3 + 6.3)
