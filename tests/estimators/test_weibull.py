"""Weibull experts (survreg's accelerated failure time form): survreg's fit on
ovarian, one expert equals scipy's direct maximum (exact, interval-censored and
truncated rows), two censored experts recover their slopes where ignoring the
censoring does not, the monotone EM, standard errors, the predictive distribution,
model files and one-line errors."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from censored_checks import (
    assert_censoring_recovers_slopes,
    m_steps_never_lower_q,
    numerical_se,
    warm_steps_never_lower_loglik,
)
from r_packages import r_has
from scipy import optimize, stats
from test_censored import OVARIAN

from moekit import MoERegressor, load
from moekit._core.weibull import weibull_shape
from moekit.experts.weibull import log1mexp_exp

FIT = dict(tol=1e-12, max_iter=2000, n_init=1, random_state=0)

# From R 4.2.2, survival 3.5.3:
#   f <- survreg(Surv(futime, fustat) ~ age + ecog.ps, ovarian, dist = "weibull")
#   c(f$loglik[2], coef(f), f$scale); sqrt(diag(vcov(f)))
SURVREG = (-89.9651772845, [12.2849672281, -0.0970266926, 0.0997734233], 0.6032744244)
SURVREG_SE = [1.50152229, 0.02351009, 0.36573337]  # and Log(scale): 0.23514325


def _ovarian():
    time, died = OVARIAN[:, 0], OVARIAN[:, 1] == 1
    return OVARIAN[:, 2:], time, np.where(died, time, np.inf)


def _fit_ovarian():
    X, y, upper = _ovarian()
    return MoERegressor(1, expert="weibull", **FIT).fit(X, y, y_upper=upper)


def test_one_expert_equals_survreg_on_ovarian():
    m = _fit_ovarian()
    X, y, upper = _ovarian()
    loglik, coef, scale = SURVREG
    assert m.log_likelihood_ * len(y) == pytest.approx(loglik, abs=1e-4)
    assert m.log_likelihood(X, y, y_upper=upper) * len(y) == pytest.approx(loglik, abs=1e-4)
    est = m.summary().table.set_index("parameter")
    np.testing.assert_allclose(est.loc[["intercept", "x0", "x1"], "estimate"], coef, rtol=1e-3)
    assert est.loc["scale", "estimate"] == pytest.approx(scale, rel=1e-3)
    np.testing.assert_allclose(est.loc[["intercept", "x0", "x1"], "std_error"], SURVREG_SE,
                               rtol=1e-3)  # fmt: skip
    # survreg's SE of log(scale), by the delta method: SE(sigma) / sigma
    assert est.loc["scale", "std_error"] / scale == pytest.approx(0.23514325, rel=1e-3)


@pytest.mark.r
@pytest.mark.skipif(not r_has("survival"), reason="R with the survival package is not installed")
def test_one_expert_equals_survreg_run_live():
    code = ("library(survival); f <- survreg(Surv(futime, fustat) ~ age + ecog.ps, ovarian, "
            "dist = 'weibull'); "
            "cat(sprintf('%.10f', c(f$loglik[2], coef(f), f$scale)))")  # fmt: skip
    out = subprocess.run(["Rscript", "-e", code], capture_output=True, text=True, check=True)
    loglik, *coef, scale = (float(v) for v in out.stdout.split())
    X, y, upper = _ovarian()
    m = _fit_ovarian()
    assert m.log_likelihood(X, y, y_upper=upper) * len(y) == pytest.approx(loglik, abs=1e-4)
    np.testing.assert_allclose([m.intercept_[0], *m.coef_[0]], coef, rtol=1e-3)
    assert m.summary().table.set_index("parameter").loc["scale", "estimate"] == pytest.approx(
        scale, rel=1e-3)  # fmt: skip


def _weibull_rows(theta, x, lower, upper, window=0.0):
    """Each row's log-likelihood by scipy, theta = (intercept, slope, log a): the
    density of exact rows, the mass of censored ones, renormalised above ``window``."""
    dist = stats.weibull_min(np.exp(theta[2]), scale=np.exp(theta[0] + theta[1] * x))
    with np.errstate(divide="ignore"):
        mass = np.log(dist.sf(lower) - dist.sf(upper))
    rows = np.where(lower == upper, dist.logpdf(lower), mass)
    return rows - (dist.logsf(window) if window > 0 else 0.0)


def _nll(theta, x, lower, upper, window=0.0):
    return -_weibull_rows(theta, x, lower, upper, window).sum()


def _times(n=500, seed=0, window=0.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    y = np.exp(1.0 + 0.5 * x) * rng.weibull(1.7, n)
    keep = y > window
    return x[keep], y[keep]


def _direct(x, lower, upper, window=0.0):
    return optimize.minimize(_nll, [1.0, 0.0, 0.0], args=(x, lower, upper, window),
                             method="BFGS", options={"gtol": 1e-9})  # fmt: skip


def _check_direct(m, x, lower, upper, window):
    best = _direct(x, lower, upper, window)
    assert m.log_likelihood_ * len(x) == pytest.approx(-best.fun, abs=1e-5)
    est = m.summary().table.set_index("parameter")
    np.testing.assert_allclose(est.loc[["intercept", "x0"], "estimate"], best.x[:2], atol=1e-5)
    assert est.loc["scale", "estimate"] == pytest.approx(np.exp(-best.x[2]), rel=1e-5)
    # standard errors, in (intercept, slope, sigma): a central-difference Hessian of scipy's
    theta = np.array([*best.x[:2], np.exp(-best.x[2])])

    def nll(t):
        return _nll([t[0], t[1], -np.log(t[2])], x, lower, upper, window)

    np.testing.assert_allclose(est["std_error"], numerical_se(nll, theta), rtol=1e-3)


def test_one_expert_equals_the_direct_maximum_of_exact_times():
    x, y = _times()
    m = MoERegressor(1, expert="weibull", **FIT).fit(x[:, None], y)
    assert m.n_iter_ < 30  # Newton's convergence, from the least-squares start
    _check_direct(m, x, y, y, 0.0)


def test_one_interval_censored_truncated_expert_equals_the_direct_maximum():
    # observed only above 0.5, right-censored above 6, and some known only in [2, 3]
    x, y = _times(seed=1, window=0.5)
    lower, upper = np.minimum(y, 6.0), np.where(y > 6.0, np.inf, y)
    binned = (y > 2.0) & (y < 3.0)
    lower[binned], upper[binned] = 2.0, 3.0
    m = MoERegressor(1, expert="weibull", **FIT)
    m.fit(x[:, None], lower, y_upper=upper, truncation=(0.5, np.inf))
    _check_direct(m, x, lower, upper, 0.5)
    rows = m.log_likelihood_samples(x[:, None], lower, y_upper=upper, truncation=(0.5, np.inf))
    theta = [m.intercept_[0], m.coef_[0, 0], -np.log(_scale(m)[0])]
    np.testing.assert_allclose(rows, _weibull_rows(theta, x, lower, upper, 0.5), atol=1e-10)


def _scale(m):
    return 1.0 / m._params.expert.shape.numpy()


def _two_regimes(n=1500, seed=0, cap=8.0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, n)
    first = rng.random(n) < 0.5
    y = np.exp(np.where(first, 0.2 - 0.8 * x, 1.8 + 0.7 * x)) * rng.weibull(2.5, n)
    return x[:, None], np.minimum(y, cap), np.where(y > cap, np.inf, y), (-0.8, 0.7)


def test_two_censored_experts_recover_both_slopes_where_ignoring_censoring_does_not():
    X, y, upper, truth = _two_regimes()
    assert 0.1 < np.isinf(upper).mean() < 0.4
    assert_censoring_recovers_slopes("weibull", X, y, upper, truth)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_em_never_decreases_and_the_m_step_never_lowers_an_experts_objective():
    X, y, upper, _ = _two_regimes(n=400, seed=2)
    window = (0.3, np.inf)
    keep = y >= window[0]
    X, y, upper = X[keep], y[keep], upper[keep]
    kw = dict(y_upper=upper, truncation=window)
    for given in (kw, {}):  # censored and truncated, then read as exact
        warm_steps_never_lower_loglik("weibull", X, y, **given)
    m = MoERegressor(2, expert="weibull", random_state=0, n_init=1).fit(X, y, **kw)
    assert (np.diff(m.log_likelihood_history_) >= -1e-12).all()
    m_steps_never_lower_q(m, X, y, upper, window)


def test_two_expert_standard_errors_equal_a_numerical_hessian():
    # exact times, analytic derivatives, against the mixture's own likelihood in the
    # reported coordinates: both experts' (intercept, slope), their scales, log(pi_1 / pi_0)
    X, y, _, _ = _two_regimes(n=600, seed=3, cap=np.inf)
    m = MoERegressor(2, expert="weibull", gate="constant", **FIT).fit(X, y)
    table = m.summary().table
    assert list(table["parameter"]) == ["intercept", "x0"] * 2 + ["scale"] * 2 + [
        "log(pi_1 / pi_0)"]  # fmt: skip
    theta = table["estimate"].to_numpy()

    def nll(t):
        log_pi = -np.logaddexp(0.0, [t[6], -t[6]])  # log pi_0, log pi_1
        lam = [np.exp(t[2 * k] + t[2 * k + 1] * X[:, 0]) for k in range(2)]
        parts = [log_pi[k] + stats.weibull_min.logpdf(y, 1.0 / t[4 + k], scale=lam[k])
                 for k in range(2)]  # fmt: skip
        return -np.logaddexp(*parts).sum()

    assert m.log_likelihood_ * len(y) == pytest.approx(-nll(theta), rel=1e-12)
    np.testing.assert_allclose(table["std_error"], numerical_se(nll, theta), rtol=1e-3)


@pytest.fixture(scope="module")
def two_experts():
    X, y, _, _ = _two_regimes(n=600, seed=3, cap=np.inf)
    return MoERegressor(2, expert="weibull", random_state=0).fit(X, y), X, y


def test_predictive_distribution_matches_scipys_weibull_mixture(two_experts):
    m, X, _ = two_experts
    rows = X[:5]
    d = m.predict_distribution(rows)
    assert d.family == "weibull"
    w = m.gate_weights(rows)  # (5, K)
    a = m._params.expert.shape.numpy()
    lam = np.exp(m.intercept_[None, :] + rows @ m.coef_.T)  # (5, K)
    comps = stats.weibull_min(a[None, :], scale=lam)
    np.testing.assert_allclose(d.means, comps.mean(), rtol=1e-10)
    np.testing.assert_allclose(d.stds, comps.std(), rtol=1e-10)
    mean = (w * comps.mean()).sum(1)
    np.testing.assert_allclose(d.mean(), mean, rtol=1e-10)
    np.testing.assert_allclose(m.predict(rows), mean, rtol=1e-10)
    np.testing.assert_allclose(d.var(), (w * (comps.var() + comps.mean() ** 2)).sum(1) - mean**2,
                               rtol=1e-9)  # fmt: skip
    at = np.array([0.5, 1.0, 2.5, 4.0, 9.0])
    np.testing.assert_allclose(d.cdf(at), (w * comps.cdf(at[:, None])).sum(1), rtol=1e-9)
    np.testing.assert_allclose(d.logpdf(at), np.log((w * comps.pdf(at[:, None])).sum(1)),
                               rtol=1e-9)  # fmt: skip
    draws = d.sample(4000, random_state=0)
    assert draws.shape == (5, 4000) and (draws > 0).all()
    for i in range(5):
        assert stats.kstest(draws[i], lambda t, i=i: (w[i] * stats.weibull_min.cdf(
            np.asarray(t)[:, None], a, scale=lam[i])).sum(-1)).pvalue > 1e-3  # fmt: skip
    lo, hi = d.interval(0.9)
    np.testing.assert_allclose(d.cdf(hi) - d.cdf(lo), 0.9, atol=1e-9)


def test_weibull_shape_inverts_the_coefficient_of_variation():
    a = torch.tensor(np.exp(np.linspace(-3.5, 6.0, 200)))
    dist = stats.weibull_min(a.numpy())
    cv = torch.tensor(dist.std() / dist.mean())
    np.testing.assert_allclose(weibull_shape(cv).numpy(), a.numpy(), rtol=1e-9)


def test_interval_masses_stay_finite_far_into_either_tail():
    # log(1 - exp(-D)) for D = e^t against its series and scipy, where D under- or overflows
    t = torch.tensor([-800.0, -40.0, -21.0, -19.0, -3.0, -0.4, 0.0, 2.0, 6.0, 800.0],
                     dtype=torch.float64)  # fmt: skip
    got = log1mexp_exp(t).numpy()
    with np.errstate(divide="ignore", over="ignore"):
        D = np.exp(t.numpy())
        direct = np.log(-np.expm1(-D))
    ok = np.isfinite(direct) & (direct < -1e-300)
    np.testing.assert_allclose(got[ok], direct[ok], rtol=1e-13)
    assert got[0] == -800.0 and got[-1] == 0.0
    # a time censored 40 scales out, and an interval of a billionth near 0
    m = MoERegressor(1, expert="weibull").fit(
        np.zeros((50, 1)), np.random.default_rng(0).weibull(2.0, 50)
    )
    a = float(m._params.expert.shape[0])
    lam = np.exp(m.intercept_[0])
    rows = m.log_likelihood_samples(np.zeros((2, 1)), [40.0 * lam, 1e-9],
                                    y_upper=[np.inf, 2e-9])  # fmt: skip
    assert rows[0] == pytest.approx(-(40.0**a), rel=1e-12)
    expect = np.log(
        stats.weibull_min.cdf(2e-9, a, scale=lam) - stats.weibull_min.cdf(1e-9, a, scale=lam)
    )
    assert rows[1] == pytest.approx(expect, rel=1e-6)


def test_censored_weibull_round_trips_a_model_file(tmp_path, two_experts):
    m, X, y = two_experts
    m.save(tmp_path / "w.moe")
    back = load(tmp_path / "w.moe")
    assert back.log_likelihood(X, y) == m.log_likelihood(X, y)
    np.testing.assert_array_equal(back.predict(X), m.predict(X))
    X, y, upper, _ = _two_regimes(n=300, seed=4)
    c = MoERegressor(2, expert="weibull", random_state=0).fit(X, y, y_upper=upper)
    c.save(tmp_path / "c.moe")
    back = load(tmp_path / "c.moe")
    assert back.log_likelihood(X, y, y_upper=upper) == pytest.approx(
        c.log_likelihood(X, y, y_upper=upper), abs=1e-12)  # fmt: skip
    np.testing.assert_allclose(back.summary(X, y, y_upper=upper).table["std_error"],
                               c.summary().table["std_error"], rtol=1e-9)  # fmt: skip


@pytest.mark.parametrize(
    ("y", "upper", "match"),
    [
        ([0.0, 2.0, 3.0], None, r"expert='weibull' needs y > 0; got 1 value\(s\) <= 0"),
        ([-1.0, 2.0, 3.0], None, r"expert='weibull' needs y > 0"),
        ([1.0, 2.0, 3.0], [1.0, 0.0, np.inf], r"y_upper must be"),
        ([1.0, 2.0, np.nan], None, r"\by\b"),
    ],
)
def test_bad_targets_are_one_line_errors_naming_the_argument(y, upper, match):
    m = MoERegressor(1, expert="weibull")
    with pytest.raises(ValueError, match=match) as err:
        m.fit(np.arange(3.0)[:, None], y, **({} if upper is None else {"y_upper": upper}))
    assert "\n" not in str(err.value)
    assert not hasattr(m, "n_iter_")
