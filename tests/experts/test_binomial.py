"""Binomial experts (successes and failures, logit link) recover known experts, equal
a direct maximisation of the binomial likelihood for one expert, and take M-steps
that never lower their objective."""

import glm_checks as checks
import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import expit, gammaln

from moekit import MoERegressor
from moekit._core.data import EMData
from moekit.experts.binomial import BinomialExperts

COEF = np.array([[-1.5, -1.0], [1.0, 1.5]])  # log odds: [intercept, slope] per expert


def _draw(n, seed):
    X, _, eta, rng = checks.two_experts(n, COEF, seed)
    trials = rng.integers(5, 30, n)
    s = rng.binomial(trials, expit(eta))
    return X, np.c_[s, trials - s].astype(float)


def _binomial_loglik(beta, A, y):
    s, t = y[:, 0], y.sum(1)
    eta = A @ beta
    return np.sum(gammaln(t + 1) - gammaln(s + 1) - gammaln(t - s + 1)
                  + s * eta - t * np.logaddexp(0.0, eta))  # fmt: skip


def test_binomial_experts_recover_known_experts():
    X, y = _draw(2000, 0)
    fitted = MoERegressor(2, expert="binomial", n_init=3, random_state=0).fit(X, y)
    z = checks.z_scores(fitted, COEF, {})
    assert max(abs(v) for v in z.values()) < 3.0, z
    # predictions are of one trial: the probability of success, and 0/1 outcomes
    d = fitted.predict_distribution(X[:4])
    np.testing.assert_allclose(fitted.predict(X[:4]), d.mean(), rtol=1e-12)
    np.testing.assert_allclose(d.var(), d.mean() * (1 - d.mean()), rtol=1e-12)
    assert set(np.unique(d.sample(50, random_state=0))) <= {0.0, 1.0}
    assert [list(m) for m in d.modes()] == [[float(p > 0.5)] for p in d.mean()]
    # score: R^2 of the proportions, weighted by trials
    share, trials = y[:, 0] / y.sum(1), y.sum(1)
    resid = share - fitted.predict(X)
    mean = np.average(share, weights=trials)
    r2 = 1 - (trials * resid**2).sum() / (trials * (share - mean) ** 2).sum()
    assert fitted.score(X, y) == pytest.approx(r2, rel=1e-12)


def test_one_binomial_expert_equals_a_direct_maximisation():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(300, 2))
    A = np.c_[np.ones(300), X]
    t = rng.integers(1, 20, 300)
    s = rng.binomial(t, expit(A @ [0.2, 0.8, -0.5]))
    y = np.c_[s, t - s].astype(float)
    ours = MoERegressor(1, expert="binomial", tol=1e-13, max_iter=500, n_init=1).fit(X, y)
    ref = minimize(lambda b: -_binomial_loglik(b, A, y), np.zeros(3), method="BFGS",
                   options={"gtol": 1e-9})  # fmt: skip
    np.testing.assert_allclose(np.r_[ours.intercept_, ours.coef_[0]], ref.x, atol=1e-4)
    assert len(y) * ours.log_likelihood(X, y) == pytest.approx(-ref.fun, abs=1e-4)


def test_binomial_m_step_never_lowers_its_objective():
    X, y = _draw(500, 3)
    data = EMData(checks.design(X), checks.design(X), torch.as_tensor(y.T.copy()))
    for seed in range(3):
        q = checks.m_step_objectives(BinomialExperts(3), data, steps=8, seed=seed)
        assert checks.never_falls(q), q
        assert q[-1] - q[-2] < 1e-6 * abs(q[-1])


@pytest.mark.parametrize(
    ("y", "match"),
    [(np.r_[1.0, 2.0, 0.0, 3.0], r"expert='binomial' models two columns, successes and "
                                  r"failures \(R's cbind\(s, f\)\); y has 1 columns"),
     (np.ones((4, 3)), r"expert='binomial' models two columns.*y has 3 columns"),
     (np.c_[[1, 2, 0, 3], [1, 0.5, 2, 1]], r"non-negative integer counts"),
     (np.c_[[1, -2, 0, 3], [1, 5, 2, 1]], r"non-negative integer counts"),
     (np.c_[[1, 2, 0, 3], [1, 0, 0, 1]], r"at least one trial per row; 1 row\(s\) have "
                                         r"successes \+ failures = 0")],
)  # fmt: skip
def test_binomial_refuses_targets_it_cannot_model(y, match):
    X = np.arange(4.0).reshape(-1, 1)
    with pytest.raises(ValueError, match=match):
        MoERegressor(1, expert="binomial").fit(X, y)
