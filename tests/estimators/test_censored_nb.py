"""Censored and truncated negative binomial counts: one expert equals a direct
maximisation of the censored (and zero-truncated) log-likelihood written with
scipy.stats.nbinom, with its standard errors; two experts recover their slopes where
ignoring the censoring does not; EM never decreases and the M-step never lowers an
expert's objective; far tails stay finite; model files and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from censored_checks import assert_censoring_recovers_slopes, m_steps_never_lower_q, numerical_se
from scipy import optimize, stats

from moekit import MoERegressor, load

FIT = dict(tol=1e-12, max_iter=2000, random_state=0)


def _nb(rng, mu, phi):
    """NB2 counts of mean mu and variance mu + phi mu^2."""
    return rng.negative_binomial(1.0 / phi, 1.0 / (1.0 + phi * mu)).astype(float)


def _counts(n=700, seed=0, cap=6, truncate=True):
    """NB counts with an exposure, right-censored at ``cap``, some known only to lie
    in [2, 3] and, with ``truncate``, observed only when positive."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    off = rng.uniform(-0.5, 0.5, n)
    y = _nb(rng, np.exp(0.6 + 0.5 * x + off), 0.6)
    keep = y > 0 if truncate else np.ones(n, bool)
    x, y, off = x[keep], y[keep], off[keep]
    lower, upper = np.minimum(y, cap), np.where(y >= cap, np.inf, y)
    binned = (y == 2) | (y == 3)
    lower[binned], upper[binned] = 2.0, 3.0
    return x, lower, upper, off


def _nb_nll(theta, x, lower, upper, offset, truncated):
    """Minus the censored log-likelihood, (intercept, slope, log phi), by scipy."""
    mu, phi = np.exp(theta[0] + theta[1] * x + offset), np.exp(theta[2])
    dist = stats.nbinom(1.0 / phi, 1.0 / (1.0 + phi * mu))
    exact = lower == upper
    finite = np.isfinite(upper)
    with np.errstate(divide="ignore"):
        box = np.log(dist.cdf(np.where(finite, upper, 0)) - dist.cdf(lower - 1))
    rows = np.where(exact, dist.logpmf(lower), np.where(finite, box, dist.logsf(lower - 1)))
    if truncated:
        rows = rows - dist.logsf(0)  # renormalised on y >= 1
    return -rows.sum()


def _direct(x, lower, upper, off, truncated):
    return optimize.minimize(_nb_nll, [0.0, 0.0, 0.0], args=(x, lower, upper, off, truncated),
                             method="BFGS", options={"gtol": 1e-9})  # fmt: skip


@pytest.mark.parametrize("truncated", [True, False])
def test_one_censored_nb_expert_equals_the_direct_maximum(truncated):
    x, lower, upper, off = _counts(truncate=truncated)
    assert 0.05 < np.isinf(upper).mean() < 0.4
    kw = dict(y_upper=upper, offset=off, truncation=(1, np.inf) if truncated else None)
    m = MoERegressor(1, expert="negative_binomial", **FIT).fit(x[:, None], lower, **kw)
    best = _direct(x, lower, upper, off, truncated)
    assert m.log_likelihood_ * len(x) == pytest.approx(-best.fun, abs=1e-5)
    assert m.log_likelihood(x[:, None], lower, **kw) * len(x) == pytest.approx(-best.fun, abs=1e-5)
    est = m.summary().table.set_index("parameter")
    np.testing.assert_allclose(est.loc[["intercept", "x0"], "estimate"], best.x[:2], atol=1e-4)
    assert est.loc["dispersion", "estimate"] == pytest.approx(np.exp(best.x[2]), rel=1e-4)
    if not truncated:
        return
    # standard errors by autograd through the incomplete beta functions: the
    # information of a central-difference Hessian of scipy's log-likelihood
    theta = np.array([*best.x[:2], np.exp(best.x[2])])

    def nll(t):
        return _nb_nll([t[0], t[1], np.log(t[2])], x, lower, upper, off, True)

    np.testing.assert_allclose(est["std_error"], numerical_se(nll, theta), rtol=2e-3)


def test_one_zero_truncated_nb_expert_equals_the_direct_maximum():
    # every count exact, observed only when positive (the zero-truncated NB)
    rng = np.random.default_rng(4)
    x = rng.normal(size=900)
    y = _nb(rng, np.exp(0.2 + 0.7 * x), 1.3)
    x, y = x[y > 0], y[y > 0]
    m = MoERegressor(1, expert="negative_binomial", **FIT)
    m.fit(x[:, None], y, truncation=(1, np.inf))
    best = _direct(x, y, y, np.zeros_like(x), True)
    assert m.log_likelihood_ * len(x) == pytest.approx(-best.fun, abs=1e-5)
    np.testing.assert_allclose([m.intercept_[0], m.coef_[0, 0]], best.x[:2], atol=1e-4)
    # ignoring the truncation gives another, lower maximum
    plain = MoERegressor(1, expert="negative_binomial", **FIT).fit(x[:, None], y)
    theta = [
        plain.intercept_[0],
        plain.coef_[0, 0],
        np.log(plain.summary().table.set_index("parameter").loc["dispersion", "estimate"]),
    ]
    assert _nb_nll(theta, x, y, y, 0 * x, True) > best.fun + 1


def _two_regimes(n=2000, seed=0, cap=5.0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, n)
    first = rng.random(n) < 0.5
    y = _nb(rng, np.exp(np.where(first, 0.3 - 0.8 * x, 2.0 + 0.6 * x)), 0.25)
    return x[:, None], np.minimum(y, cap), np.where(y >= cap, np.inf, y), (-0.8, 0.6)


def test_two_censored_nb_experts_recover_both_slopes_where_ignoring_censoring_does_not():
    X, y, upper, truth = _two_regimes()
    assert 0.1 < np.isinf(upper).mean() < 0.4
    assert_censoring_recovers_slopes("negative_binomial", X, y, upper, truth)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_em_never_decreases_and_the_m_step_never_lowers_an_experts_objective():
    X, y, upper, _ = _two_regimes(n=400, seed=2)
    keep = y >= 1
    X, y, upper = X[keep], y[keep], upper[keep]
    kw = dict(y_upper=upper, truncation=(1.0, np.inf))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small passes: no waiting on a loaded machine's threads
    try:
        m = MoERegressor(2, expert="negative_binomial", random_state=0, n_init=1, max_iter=30,
                         tol=0)  # fmt: skip
        m.fit(X, y, **kw)
        history = np.asarray(m.log_likelihood_history_)
        assert len(history) > 20 and (np.diff(history) >= -1e-12).all()
        # the family's M-step alone, from fixed responsibilities: Q_k never falls
        _, path = m_steps_never_lower_q(m, X, y, upper, (1.0, np.inf))
        moved = float((path[-1].dispersion - path[0].dispersion).abs().sum())
        assert moved > 0  # the dispersion step is taken, not only refused
    finally:
        torch.set_num_threads(threads)


def test_the_default_fit_runs_all_its_starts_and_ends_at_least_at_one_starts_fit():
    # n_init=10 with SQUAREM acceleration, which once jumped to dispersions of 1e-46
    # and means of 1e22 (1e5 continued-fraction terms per interval)
    X, y, upper, _ = _two_regimes(n=300, seed=1)
    assert 0.1 < np.isinf(upper).mean() < 0.5
    full = MoERegressor(2, expert="negative_binomial", random_state=0).fit(X, y, y_upper=upper)
    one = MoERegressor(2, expert="negative_binomial", random_state=0, n_init=1)
    one.fit(X, y, y_upper=upper)
    assert full.n_init == 10 and np.isfinite(full.log_likelihood_)
    assert full.log_likelihood_ >= one.log_likelihood_ - 1e-9
    # the fit's objective holds the slopes' small ridge penalty besides
    assert full.log_likelihood(X, y, y_upper=upper) == pytest.approx(full.log_likelihood_,
                                                                     abs=1e-6)  # fmt: skip


def test_extrapolated_parameters_keep_the_dispersion_inside_its_bounds():
    from moekit.experts.negative_binomial import DISPERSION_MAX, DISPERSION_MIN

    X, y, upper, _ = _two_regimes(n=200, seed=3)
    m = MoERegressor(2, expert="negative_binomial", random_state=0, n_init=1, max_iter=5)
    with pytest.warns(Warning):  # not converged in 5 iterations
        m.fit(X, y, y_upper=upper)
    family = m._expert_family
    free = family.to_free(m._params.expert)
    free["log_dispersion"] = torch.tensor([-105.0, 267.0], dtype=torch.float64)  # 1e-46, 1e116
    params = family.from_free(free)
    np.testing.assert_array_equal(params.dispersion.numpy(), [DISPERSION_MIN, DISPERSION_MAX])
    assert torch.equal(params.coef, free["coef"])
    inside = torch.tensor([-3.0, 2.0], dtype=torch.float64)
    free["log_dispersion"] = inside
    assert torch.equal(family.from_free(free).dispersion, torch.exp(inside))


def test_far_tails_stay_finite_and_model_files_round_trip(tmp_path):
    x, lower, upper, off = _counts(seed=3)
    m = MoERegressor(2, expert="negative_binomial", random_state=0, min_share=0, n_init=1)
    m.fit(x[:, None], lower, y_upper=upper, offset=off)
    m.save(tmp_path / "nb.moe")
    back = load(tmp_path / "nb.moe")
    kw = dict(offset=off, y_upper=upper)
    assert back.log_likelihood(x[:, None], lower, **kw) == pytest.approx(
        m.log_likelihood(x[:, None], lower, **kw), abs=1e-12)  # fmt: skip
    # a count censored 3000 above its mean, and a left-censored one (at most 0)
    x2 = np.array([[0.0], [8.0]])
    rows = m.log_likelihood_samples(x2, [3000.0, 0.0], y_upper=[np.inf, 0.0])
    assert np.isfinite(rows).all() and rows[0] < -1000 and rows[1] < 0
    # an uncensored fit evaluated on intervals
    plain = MoERegressor(1, expert="negative_binomial").fit(x[:, None], lower)
    rows = plain.log_likelihood_samples(x[:, None], lower, y_upper=upper)
    assert np.isfinite(rows).all()
    assert (rows[np.isinf(upper)] > plain.log_likelihood_samples(x[:, None], lower)[
        np.isinf(upper)]).all()  # fmt: skip


@pytest.mark.parametrize(
    ("y", "upper", "truncation", "match"),
    [
        ([1.0, 2.0, 3.0], [1.0, 2.5, np.inf], None, "y_upper must hold whole counts"),
        ([1.5, 2.0, 3.0], [np.inf, 2.0, np.inf], None, "y must hold whole counts"),
        ([-np.inf, 2.0, 3.0], [-1.0, 2.0, 3.0], None, "y_upper must be >= 0"),
        ([1.0, 2.0, 3.0], [0.0, 2.0, 3.0], None, "y_upper must be >= y"),
        ([0.0, 2.0, 3.0], [0.0, 2.0, 3.0], (1, np.inf), "truncation excludes the observed y"),
        ([1.0, 2.0, 3.0], None, (2, 1), "truncation=.lower, upper. needs lower < upper"),
    ],
)
def test_bad_censored_nb_counts_are_one_line_errors(y, upper, truncation, match):
    m = MoERegressor(1, expert="negative_binomial")
    with pytest.raises(ValueError, match=match) as err:
        m.fit(np.arange(3.0)[:, None], np.asarray(y), truncation=truncation,
              y_upper=None if upper is None else np.asarray(upper))  # fmt: skip
    assert "\n" not in str(err.value)
    assert not hasattr(m, "coef_") and "_pending_bounds" not in vars(m)
