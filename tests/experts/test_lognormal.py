"""Lognormal experts (linear-Gaussian on log y) recover known experts, equal least
squares on log y for one expert, and take exact M-steps."""

import glm_checks as checks
import numpy as np
import pytest
import torch

from moekit import MoERegressor
from moekit._core.data import EMData
from moekit.experts.lognormal import LogNormalExperts

COEF = np.array([[-0.5, -1.0], [1.0, 0.5]])  # mean of log y: [intercept, slope] per expert
SIGMA = np.array([0.4, 0.25])


def _draw(n, seed):
    X, z, eta, rng = checks.two_experts(n, COEF, seed)
    return X, np.exp(eta + SIGMA[z] * rng.normal(size=n))


@pytest.fixture(scope="module")
def fitted():
    X, y = _draw(3000, 0)
    return MoERegressor(2, expert="lognormal", n_init=3, random_state=0).fit(X, y)


def test_lognormal_experts_recover_known_experts(fitted):
    z = checks.z_scores(fitted, COEF, {"sigma": SIGMA})
    assert max(abs(v) for v in z.values()) < 3.0, z


def test_lognormal_interval_covers_ninety_percent_of_new_draws(fitted):
    X, y = _draw(4000, 1)
    assert 0.87 <= checks.coverage(fitted, X, y) <= 0.93


def test_lognormal_predictive_mean_is_exp_mu_plus_half_s2(fitted):
    X = np.array([[-0.5], [0.0], [0.7]])
    d = fitted.predict_distribution(X)
    p = fitted._params.expert
    log_mean = fitted.intercept_[:, None] + fitted.coef_ @ X.T + 0.5 * p.var.numpy()[:, None]
    np.testing.assert_allclose(d.means, np.exp(log_mean).T, rtol=1e-12)
    np.testing.assert_allclose(fitted.predict(X), (d.weights * d.means).sum(1), rtol=1e-12)
    # the sample mean of many draws agrees with the predictive mean
    draws = d.sample(40000, random_state=0)
    np.testing.assert_allclose(draws.mean(1), d.mean(), rtol=0.03)


def test_one_lognormal_expert_equals_least_squares_on_log_y():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(300, 2))
    y = np.exp(0.3 + X @ [0.5, -0.2] + 0.6 * rng.normal(size=300))
    ours = MoERegressor(1, expert="lognormal", tol=1e-12, n_init=1).fit(X, y)
    A = np.c_[np.ones(len(y)), X]
    beta = np.linalg.lstsq(A, np.log(y), rcond=None)[0]
    s2 = np.mean((np.log(y) - A @ beta) ** 2)
    ref = (-0.5 * np.log(2 * np.pi * s2) - 0.5 - np.log(y)).sum()
    np.testing.assert_allclose(np.r_[ours.intercept_, ours.coef_[0]], beta, atol=1e-8)
    assert len(y) * ours.log_likelihood(X, y) == pytest.approx(ref, abs=1e-6)


def test_lognormal_m_step_never_lowers_its_objective():
    X, y = _draw(500, 3)
    data = EMData(checks.design(X), checks.design(X), torch.as_tensor(y).reshape(1, -1))
    for seed in range(3):
        q = checks.m_step_objectives(LogNormalExperts(3), data, steps=3, seed=seed)
        assert checks.never_falls(q), q
        assert q[-1] == pytest.approx(q[0], abs=1e-9)  # exact: one step reaches the maximum


@pytest.mark.parametrize(
    ("y", "match"),
    [(np.r_[1.0, 2.0, 0.0, 3.0], r"expert='lognormal' needs y > 0"),
     (np.ones((4, 3)), r"expert='lognormal' models one positive target; y has 3 columns")],
)  # fmt: skip
def test_lognormal_refuses_targets_it_cannot_model(y, match):
    X = np.arange(4.0).reshape(-1, 1)
    with pytest.raises(ValueError, match=match):
        MoERegressor(1, expert="lognormal").fit(X, y)
