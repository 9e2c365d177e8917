"""Censored and truncated counts and amounts (Poisson and Gamma experts): one expert
equals a direct maximisation of the censored log-likelihood, two experts recover
their slopes where ignoring the censoring does not, the M-step never lowers an
expert's objective, far tails stay finite, standard errors, model files and one-line
errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from censored_checks import (
    assert_censoring_recovers_slopes,
    m_steps_never_lower_q,
    numerical_se,
    warm_steps_never_lower_loglik,
)
from scipy import optimize, special, stats

from moekit import MoERegressor, load
from moekit._core.incgamma import log_gamma_pq

FIT = dict(tol=1e-12, max_iter=2000, random_state=0)


def _counts(n=600, seed=0, cap=4):
    """Poisson counts with an exposure, right-censored at ``cap`` and observed only
    when positive (zero-truncated: the window [1, inf])."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    log_exposure = rng.uniform(-0.5, 0.5, n)
    y = rng.poisson(np.exp(0.4 + 0.6 * x + log_exposure)).astype(float)
    keep = y > 0
    x, y, log_exposure = x[keep], y[keep], log_exposure[keep]
    return x, np.minimum(y, cap), np.where(y >= cap, np.inf, y), log_exposure


def _poisson_nll(theta, x, y, upper, offset):
    mu = np.exp(theta[0] + theta[1] * x + offset)
    mass = np.where(np.isinf(upper), stats.poisson.logsf(y - 1, mu), stats.poisson.logpmf(y, mu))
    return -(mass - stats.poisson.logsf(0, mu)).sum()  # renormalised on y >= 1


def _amounts(n=600, seed=1, deductible=0.5, limit=6.0):
    """Gamma amounts observed only above a deductible (left-truncated) and known only to
    exceed a policy limit (right-censored), some only to lie in an interval."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    y = rng.gamma(2.5, np.exp(1.0 + 0.5 * x) / 2.5)
    keep = y > deductible
    x, y = x[keep], y[keep]
    lower, upper = np.minimum(y, limit), np.where(y > limit, np.inf, y)
    binned = (y > 2.0) & (y < 3.0)  # known only to lie in [2, 3]
    lower[binned], upper[binned] = 2.0, 3.0
    return x, lower, upper


def _gamma_nll(theta, x, lower, upper, deductible):
    mu, a = np.exp(theta[0] + theta[1] * x), np.exp(theta[2])
    dist = stats.gamma(a, scale=mu / a)
    exact = lower == upper
    with np.errstate(divide="ignore"):
        mass = np.log(dist.cdf(upper) - dist.cdf(lower))
    rows = np.where(exact, dist.logpdf(lower), mass)
    return -(rows - dist.logsf(deductible)).sum()


def test_one_censored_truncated_poisson_expert_equals_the_direct_maximum():
    x, y, upper, off = _counts()
    assert 0.05 < np.isinf(upper).mean() < 0.4
    m = MoERegressor(1, expert="poisson", **FIT)
    m.fit(x[:, None], y, y_upper=upper, truncation=(1, np.inf), offset=off)
    best = optimize.minimize(_poisson_nll, [0.0, 0.0], args=(x, y, upper, off), method="BFGS",
                             options={"gtol": 1e-9})  # fmt: skip
    assert m.log_likelihood_ * len(y) == pytest.approx(-best.fun, abs=1e-5)
    ll = m.log_likelihood(x[:, None], y, offset=off, y_upper=upper, truncation=(1, np.inf))
    assert ll * len(y) == pytest.approx(-best.fun, abs=1e-5)
    np.testing.assert_allclose([m.intercept_[0], m.coef_[0, 0]], best.x, atol=1e-4)
    # ignoring the truncation and the censoring gives another, lower maximum
    plain = MoERegressor(1, expert="poisson", **FIT).fit(x[:, None], y, offset=off)
    assert _poisson_nll([plain.intercept_[0], plain.coef_[0, 0]], x, y, upper, off) > best.fun + 1


def test_one_censored_truncated_gamma_expert_equals_the_direct_maximum():
    x, lower, upper = _amounts()
    m = MoERegressor(1, expert="gamma", **FIT)
    m.fit(x[:, None], lower, y_upper=upper, truncation=(0.5, np.inf))
    best = optimize.minimize(_gamma_nll, [1.0, 0.3, 0.5], args=(x, lower, upper, 0.5),
                             method="BFGS", options={"gtol": 1e-9})  # fmt: skip
    assert m.log_likelihood_ * len(x) == pytest.approx(-best.fun, abs=1e-5)
    est = m.summary().table.set_index("parameter")
    np.testing.assert_allclose(est.loc[["intercept", "x0"], "estimate"], best.x[:2], atol=1e-4)
    assert est.loc["shape", "estimate"] == pytest.approx(np.exp(best.x[2]), rel=1e-4)
    # standard errors by autograd through the incomplete gamma functions: the
    # information of a central-difference Hessian of scipy's log-likelihood
    theta = np.array([*best.x[:2], np.exp(best.x[2])])

    def nll(t):
        return _gamma_nll([t[0], t[1], np.log(t[2])], x, lower, upper, 0.5)

    np.testing.assert_allclose(est["std_error"], numerical_se(nll, theta), rtol=2e-3)


def _two_regimes(family, n=1500, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, n)
    first = rng.random(n) < 0.5
    if family == "poisson":
        y = rng.poisson(np.exp(np.where(first, 0.3 - 0.8 * x, 1.8 + 0.6 * x))).astype(float)
        cap = 6.0
        return x[:, None], np.minimum(y, cap), np.where(y >= cap, np.inf, y), (-0.8, 0.6)
    mu = np.exp(np.where(first, 0.2 - 0.8 * x, 1.8 + 0.7 * x))
    y = rng.gamma(4.0, mu / 4.0)
    cap = 8.0
    return x[:, None], np.minimum(y, cap), np.where(y > cap, np.inf, y), (-0.8, 0.7)


@pytest.mark.parametrize("family", ["poisson", "gamma"])
def test_two_censored_experts_recover_both_slopes_where_ignoring_censoring_does_not(family):
    X, y, upper, truth = _two_regimes(family)
    assert 0.1 < np.isinf(upper).mean() < 0.4
    assert_censoring_recovers_slopes(family, X, y, upper, truth)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("family", ["poisson", "gamma"])
def test_em_never_decreases_and_the_m_step_never_lowers_an_experts_objective(family):
    X, y, upper, _ = _two_regimes(family, n=400, seed=2)
    window = (1.0, np.inf) if family == "poisson" else (0.3, np.inf)
    keep = y >= window[0]
    X, y, upper = X[keep], y[keep], upper[keep]
    kw = dict(y_upper=upper, truncation=window)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small passes: no waiting on a loaded machine's threads
    try:
        _check_monotone(X, y, upper, window, kw, family)
    finally:
        torch.set_num_threads(threads)


def _check_monotone(X, y, upper, window, kw, family):
    m = warm_steps_never_lower_loglik(family, X, y, **kw)
    # the family's M-step alone, from fixed responsibilities: Q_k never falls
    from moekit.estimators._censoring import encode_rows, pack_bounds

    data, _ = m_steps_never_lower_q(m, X, y, upper, window)
    assert torch.equal(data.y, encode_rows(pack_bounds(y, upper, window), vars(m), "cpu"))


def test_incomplete_gamma_in_log_space_matches_scipy_and_stays_finite_far_out():
    rng = np.random.default_rng(0)
    a = np.exp(rng.uniform(-3, 6, 3000))
    x = a * np.exp(rng.normal(0, 0.7, 3000))
    for differentiable in (False, True):
        log_p, log_q = (t.numpy() for t in log_gamma_pq(torch.tensor(a), torch.tensor(x),
                                                         differentiable))  # fmt: skip
        p, q = special.gammainc(a, x), special.gammaincc(a, x)
        assert np.isfinite(log_p).all() and np.isfinite(log_q).all()  # where scipy's underflow
        np.testing.assert_allclose(log_p[p > 0], np.log(p[p > 0]), rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(log_q[q > 0], np.log(q[q > 0]), rtol=1e-8, atol=1e-10)
    # far tails, where P or Q underflow: log Q(1, x) = -x, log P(a, x) ~ a log x - x - lgamma(a + 1)
    a = torch.tensor([1.0, 1.0, 400.0], dtype=torch.float64)
    x = torch.tensor([900.0, 2000.0, 2.0], dtype=torch.float64)
    log_p, log_q = log_gamma_pq(a, x)
    assert float(log_q[0]) == pytest.approx(-900.0, rel=1e-12)
    assert float(log_q[1]) == pytest.approx(-2000.0, rel=1e-12)
    series = 400 * np.log(2.0) - 2.0 - special.gammaln(401) + np.log1p(2.0 / 401 + 4 / 401 / 402)
    assert float(log_p[2]) == pytest.approx(series, rel=1e-9)
    # a count censored 200 above its mean, and an amount 300 means out
    x1 = np.zeros((2, 1))
    rng = np.random.default_rng(1)
    counts = MoERegressor(1, expert="poisson").fit(rng.normal(size=(50, 1)), rng.poisson(1.0, 50))
    rows = counts.log_likelihood_samples(x1, [200.0, 0.0], y_upper=[np.inf, 0.0])
    assert np.isfinite(rows).all() and rows[0] < -600
    amounts = MoERegressor(1, expert="gamma").fit(rng.normal(size=(60, 1)), rng.gamma(2.0, 1.0, 60))
    rows = amounts.log_likelihood_samples(x1, [600.0, 1e-9], y_upper=[np.inf, 2e-9])
    assert np.isfinite(rows).all() and rows[0] < -300


def test_censored_counts_round_trip_a_model_file_and_predict_the_latent_counts(tmp_path):
    x, y, upper, off = _counts(seed=3)
    m = MoERegressor(2, expert="poisson", random_state=0, min_share=0)
    m.fit(x[:, None], y, y_upper=upper, offset=off)
    m.save(tmp_path / "c.moe")
    back = load(tmp_path / "c.moe")
    kw = dict(offset=off, y_upper=upper)
    assert back.log_likelihood(x[:, None], y, **kw) == pytest.approx(
        m.log_likelihood(x[:, None], y, **kw), abs=1e-12)  # fmt: skip
    # the latent counts' mean passes the censoring point where the rates are high
    assert m.predict(x[:, None], offset=off).max() > 4


@pytest.mark.parametrize(
    ("expert", "y", "upper", "match"),
    [
        ("poisson", [1.0, 2.0, 3.0], [1.0, 2.5, np.inf], "y_upper must hold whole counts"),
        ("poisson", [1.5, 2.0, 3.0], [np.inf, 2.0, np.inf], "y must hold whole counts"),
        ("poisson", [-np.inf, 2.0, 3.0], [-1.0, 2.0, 3.0], "y_upper must be >= 0"),
        ("gamma", [-np.inf, 2.0, 3.0], [0.0, 2.0, 3.0], "y_upper must be > 0"),
        ("gamma", [0.0, 2.0, 3.0], [0.0, 2.0, 3.0], "expert='gamma' needs y > 0"),
        ("negative_binomial", [1.0, 2.0, 3.0], [1.0, 2.5, np.inf], "y_upper must hold whole"),
        ("student_t", [1.0, 2.0, 3.0], [np.inf, 2.0, 3.0], "y_upper and truncation"),
    ],
)
def test_bad_censored_counts_and_amounts_are_one_line_errors(expert, y, upper, match):
    m = MoERegressor(1, expert=expert)
    with pytest.raises(ValueError, match=match) as err:
        m.fit(np.arange(3.0)[:, None], np.asarray(y), y_upper=np.asarray(upper))
    assert "\n" not in str(err.value)
    assert not hasattr(m, "coef_") and "_pending_bounds" not in vars(m)
