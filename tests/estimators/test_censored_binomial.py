"""Censored and truncated binomial successes: one expert equals a direct maximisation
of the exact log-likelihood written with scipy.stats.binom (right-censored,
interval-censored, zero-truncated), with its standard errors; far tails stay
finite; EM never decreases with two experts; model files keep a censored fit,
which scores as an exact one; bad bounds are one-line errors naming the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from censored_checks import numerical_se
from scipy import optimize, special, stats
from sklearn.metrics import r2_score

from moekit import MoERegressor, load
from moekit.experts.binomial import BinomialExperts
from moekit.experts.censored_glm import _derivatives

FIT = dict(expert="binomial", tol=1e-12, max_iter=2000, random_state=0)


def _successes(n=500, seed=0, slopes=(0.8,), intercepts=(-0.3,)):
    """Successes out of 1-8 trials per row, the log odds linear in x (one expert per
    slope, drawn at random)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    trials = rng.integers(1, 9, n).astype(float)
    k = rng.integers(0, len(slopes), n)
    eta = np.asarray(intercepts)[k] + np.asarray(slopes)[k] * x
    s = rng.binomial(trials.astype(int), 1.0 / (1.0 + np.exp(-eta))).astype(float)
    return x, s, trials


def _case(kind):
    """(x, lower, upper, trials, truncation) of a censoring scheme; upper NaN: exact."""
    x, s, trials = _successes()
    upper = np.full_like(s, np.nan)
    if kind == "right":  # at most 4 counted: S >= 4
        upper = np.where(s >= 4, np.inf, np.nan)
        s = np.minimum(s, 4.0)
    elif kind == "interval":  # every third row known to within one success either way
        boxed = np.arange(len(s)) % 3 == 0
        upper = np.where(boxed, np.minimum(s + 1.0, trials), np.nan)
        s = np.where(boxed, np.maximum(s - 1.0, 0.0), s)
    elif kind == "zero_truncated":  # observed only with a success
        keep = s >= 1
        return x[keep], s[keep], upper[keep], trials[keep], (1.0, np.inf)
    return x, s, upper, trials, None


def _nll(b, x, lower, upper, trials, truncation):
    """Minus the exact log-likelihood of (intercept, slope), by scipy.stats.binom."""
    dist = stats.binom(trials, 1.0 / (1.0 + np.exp(-(b[0] + b[1] * x))))
    hi = np.where(np.isnan(upper), lower, np.minimum(upper, trials))
    with np.errstate(divide="ignore"):
        box = np.log(dist.cdf(hi) - dist.cdf(lower - 1.0))
    rows = np.where(lower == hi, dist.logpmf(lower), box)
    if truncation is not None:
        rows = rows - dist.logsf(truncation[0] - 1.0)  # renormalised on S >= lower
    return -rows.sum()


@pytest.mark.parametrize("kind", ["right", "interval", "zero_truncated"])
def test_one_censored_binomial_expert_equals_the_direct_maximum(kind):
    x, lower, upper, trials, window = _case(kind)
    y = np.c_[lower, trials - lower]
    bounds = dict(y_upper=None if kind == "zero_truncated" else upper, truncation=window)
    m = MoERegressor(1, **FIT).fit(x[:, None], y, **bounds)
    ours = m.log_likelihood(x[:, None], y, **bounds) * len(x)
    ref = optimize.minimize(_nll, [0.0, 0.0], args=(x, lower, upper, trials, window),
                            method="BFGS", options={"gtol": 1e-9})  # fmt: skip
    assert ours == pytest.approx(-ref.fun, abs=1e-5)
    assert m.coef_[0, 0] == pytest.approx(ref.x[1], abs=1e-3)
    # standard errors from the observed information of the same likelihood
    se = numerical_se(lambda t: _nll(t, x, lower, upper, trials, window), ref.x)
    ses = m.summary().table.set_index("parameter")["std_error"]
    assert ses["x0"] == pytest.approx(se[1], rel=1e-3)
    assert ses["intercept"] == pytest.approx(se[0], rel=1e-3)
    # the censoring counts: as if every row were exact, the log-likelihood differs
    naive = -_nll(ref.x, x, lower, np.full_like(lower, np.nan), trials, None)
    assert abs(naive + ref.fun) > 1.0


def test_em_never_decreases_with_two_censored_binomial_experts():
    x, s, trials = _successes(n=600, seed=1, slopes=(1.5, -1.0), intercepts=(-1.0, 1.0))
    x, s, trials = x[s >= 1], s[s >= 1], trials[s >= 1]  # zero-truncated
    upper = np.where(s >= 3, np.inf, np.nan)
    lower = np.minimum(s, 3.0)
    m = MoERegressor(2, expert="binomial", max_iter=60, tol=1e-10, random_state=0)
    m.fit(x[:, None], np.c_[lower, trials - lower], y_upper=upper, truncation=(0.5, np.inf))
    history = np.asarray(m.log_likelihood_history_)
    assert len(history) > 3
    assert (np.diff(history) >= -1e-10 * np.abs(history[1:])).all()


def test_a_censored_binomial_fit_saves_and_loads(tmp_path):
    x, lower, upper, trials, _ = _case("right")
    y = np.c_[lower, trials - lower]
    m = MoERegressor(1, **FIT).fit(x[:, None], y, y_upper=upper)
    m.save(tmp_path / "binomial.moe")
    back = load(tmp_path / "binomial.moe")
    assert back.log_likelihood(x[:, None], y, y_upper=upper) == pytest.approx(
        m.log_likelihood(x[:, None], y, y_upper=upper), abs=1e-12)  # fmt: skip
    assert np.allclose(back.predict(x[:, None]), m.predict(x[:, None]))
    # score: the R^2 of the proportions, weighted by the trials, as for exact fits
    r2 = r2_score(lower / trials, m.predict(x[:, None]), sample_weight=trials)
    assert back.score(x[:, None], y) == pytest.approx(r2, abs=1e-12)


@pytest.mark.parametrize("upper, window, match", [
    (np.array([0.0, 3.0, np.nan]), None, "y_upper must be >= y"),
    (np.array([2.0, 6.0, np.nan]), None, "y_upper must be <= the trials"),
    (None, (1.0, np.inf), "truncation excludes the observed y"),
    (np.array([1.5, np.nan, np.nan]), None, "y_upper must hold whole counts"),
])  # fmt: skip
def test_bad_censored_binomial_input_is_a_one_line_error(upper, window, match):
    X = np.array([[0.0], [1.0], [2.0]])
    y = np.array([[1.0, 2.0], [0.0, 5.0], [2.0, 2.0]])  # trials 3, 5, 4
    with pytest.raises(ValueError, match=match) as err:
        MoERegressor(1, expert="binomial").fit(X, y, y_upper=upper, truncation=window)
    assert "\n" not in str(err.value)


def test_binomial_interval_terms_stay_finite_in_the_tails_and_give_the_derivative():
    # 1000 trials: intervals up to 30 log odds away, beyond scipy's cdf (log 0 there)
    fam = BinomialExperts(1)
    eta = torch.tensor([[-30.0, -5.0, 0.0, 5.0, 30.0]], dtype=torch.float64, requires_grad=True)
    lo = torch.tensor([900.0, 500.0, 500.0, 10.0, 0.0], dtype=torch.float64)
    hi = torch.tensor([1000.0, 1000.0, 510.0, 20.0, 5.0], dtype=torch.float64)
    point = torch.stack([lo, 1000.0 - lo])
    terms = fam.interval_terms(None, eta, lo, hi, True, point=point)
    # the pmf summed, with log p and log q to all their digits (1 - p rounds at eta = 30)
    ref = []
    for a, b, e in zip(lo.numpy(), hi.numpy(), eta.detach().numpy()[0], strict=True):
        k = np.arange(a, b + 1)
        log_choose = special.gammaln(1001.0) - special.gammaln(k + 1) - special.gammaln(1001 - k)
        logpmf = log_choose - k * np.logaddexp(0, -e) - (1000 - k) * np.logaddexp(0, e)
        ref.append(np.logaddexp.reduce(logpmf))
    assert np.allclose(terms[0].detach().numpy()[0], ref, rtol=1e-9, atol=1e-9)
    (grad,) = torch.autograd.grad(terms[0].sum(), eta)
    d, _ = _derivatives(tuple(t.detach() for t in terms))
    assert torch.allclose(grad, d, rtol=1e-8, atol=1e-8)
