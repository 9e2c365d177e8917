"""Poisson experts recover known experts, equal scikit-learn's PoissonRegressor for one
expert, take M-steps that never lower their objective and refuse what they cannot
model; and the 90% Wald intervals of every GLM family cover its truth about 90% of
the time over repeated fits."""

import glm_checks as checks
import numpy as np
import pytest
import torch
from scipy.special import expit, gammaln
from sklearn.linear_model import PoissonRegressor

from moekit import MoERegressor
from moekit._core.data import EMData
from moekit.experts.poisson import PoissonExperts, start_log_rate

POISSON = np.array([[0.0, -1.0], [1.5, 0.5]])  # log rate: [intercept, slope] per expert


def _poisson(n, seed):
    X, _, eta, rng = checks.two_experts(n, POISSON, seed)
    return X, rng.poisson(np.exp(eta)).astype(float)


def test_poisson_experts_recover_known_experts():
    X, y = _poisson(3000, 0)
    fitted = MoERegressor(2, expert="poisson", n_init=3, random_state=0).fit(X, y)
    z = checks.z_scores(fitted, POISSON, {})
    assert max(abs(v) for v in z.values()) < 3.0, z


def test_the_first_step_starts_at_the_rate_of_the_model_without_features():
    """With an offset o the start is log(sum y / sum e^o), where the intercept-only
    model's score sum_i (y_i - e^(b + o_i)) is zero; without one, log(mean y) as before."""
    rng = np.random.default_rng(3)
    off = torch.as_tensor(rng.normal(4.0, 1.5, size=200))
    y = torch.as_tensor(rng.poisson(np.exp(off.numpy() - 3.0)), dtype=torch.float64)
    XT = torch.ones((1, 200), dtype=torch.float64)
    b = start_log_rate(EMData(XT, XT, y.reshape(1, -1), offset=off))
    assert float((y - torch.exp(b + off)).sum()) == pytest.approx(0.0, abs=1e-9 * float(y.sum()))
    assert b == pytest.approx(float(torch.log(y.sum() / torch.exp(off).sum())), rel=1e-13)
    assert start_log_rate(EMData(XT, XT, y.reshape(1, -1))) == float(torch.log(y.mean()))


def test_an_offset_start_needs_fewer_iterations():
    """The offset's start saves the steps from log(mean y): a K = 1 fit with a large log
    exposure converges in a few iterations to the same fit as from far away."""
    rng = np.random.default_rng(4)
    X = rng.normal(size=(300, 2))
    off = rng.normal(6.0, 1.0, size=300)
    y = rng.poisson(np.exp(off - 4.0 + X @ [0.3, -0.2])).astype(float)
    fit = MoERegressor(1, expert="poisson", n_init=1, tol=1e-10).fit(X, y, offset=off)
    assert fit.n_iter_ <= 5, fit.n_iter_
    ref = PoissonRegressor(alpha=0.0, tol=1e-12, max_iter=10_000)
    ref.fit(X, y / np.exp(off), sample_weight=np.exp(off))  # a rate model per exposure
    mu = ref.predict(X) * np.exp(off)
    assert len(y) * fit.log_likelihood(X, y, offset=off) == pytest.approx(
        np.sum(y * np.log(mu) - mu - gammaln(y + 1)), abs=1e-6
    )


def test_one_poisson_expert_equals_scikit_learns_poisson_regression():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(400, 2))
    y = rng.poisson(np.exp(0.5 + X @ [0.4, -0.3])).astype(float)
    ours = MoERegressor(1, expert="poisson", tol=1e-13, max_iter=500, n_init=1).fit(X, y)
    ref = PoissonRegressor(alpha=0.0, tol=1e-12, max_iter=10_000).fit(X, y)
    mu = ref.predict(X)
    ref_loglik = np.sum(y * np.log(mu) - mu - gammaln(y + 1))
    assert len(y) * ours.log_likelihood(X, y) == pytest.approx(ref_loglik, abs=1e-5)
    np.testing.assert_allclose(ours.coef_[0], ref.coef_, atol=1e-5)


def test_poisson_m_step_never_lowers_its_objective():
    X, y = _poisson(500, 3)
    data = EMData(checks.design(X), checks.design(X), torch.as_tensor(y).reshape(1, -1))
    for seed in range(3):
        q = checks.m_step_objectives(PoissonExperts(3), data, steps=10, seed=seed)
        assert checks.never_falls(q), q
        assert q[-1] - q[-2] < 1e-6 * abs(q[-1])


@pytest.mark.parametrize(
    ("y", "match"),
    [(np.r_[1.0, 2.5, 0.0, 3.0], r"expert='poisson' needs y of non-negative integer counts"),
     (np.r_[1.0, -2.0, 0.0, 3.0], r"expert='poisson' needs y of non-negative integer counts"),
     (np.ones((4, 2)), r"expert='poisson' models one count target; y has 2 columns")],
)  # fmt: skip
def test_poisson_refuses_targets_it_cannot_model(y, match):
    X = np.arange(4.0).reshape(-1, 1)
    with pytest.raises(ValueError, match=match):
        MoERegressor(1, expert="poisson").fit(X, y)


# ---------------------------------------------------------------------- coverage
def _draw(family: str, n: int, seed: int):
    """Data from two known experts of ``family``: X, y and the truth of the extras."""
    coef = {"binomial": np.array([[-1.0, -1.0], [1.0, 0.5]]),
            "gamma": np.array([[-0.5, -1.0], [1.0, 0.5]]),
            "lognormal": np.array([[-0.5, -1.0], [1.0, 0.5]]),
            "negative_binomial": np.array([[0.0, -1.0], [2.0, 0.5]]),
            "weibull": np.array([[-0.5, -1.0], [1.0, 0.5]]),
            "poisson": POISSON}[family]  # fmt: skip
    X, z, eta, rng = checks.two_experts(n, coef, seed)
    if family == "binomial":
        trials = rng.integers(5, 15, n)
        s = rng.binomial(trials, expit(eta))
        return X, np.c_[s, trials - s].astype(float), coef, {}
    if family == "gamma":
        shape = np.array([3.0, 6.0])
        return X, rng.gamma(shape[z], np.exp(eta) / shape[z]), coef, {"shape": shape}
    if family == "lognormal":
        sigma = np.array([0.5, 0.3])
        return X, np.exp(eta + sigma[z] * rng.normal(size=n)), coef, {"sigma": sigma}
    if family == "weibull":  # log y = eta + sigma W, W = log E (E exponential)
        sigma = np.array([0.5, 0.3])
        return X, np.exp(eta) * rng.exponential(size=n) ** sigma[z], coef, {"scale": sigma}
    if family == "negative_binomial":
        phi = np.array([0.5, 0.2])
        y = rng.poisson(rng.gamma(1 / phi[z], np.exp(eta) * phi[z]))
        return X, y.astype(float), coef, {"dispersion": phi}
    return X, rng.poisson(np.exp(eta)).astype(float), coef, {}


def _coverage(family: str, reps: int, n: int) -> float:
    """Share of the 90% Wald intervals of every expert and gate parameter that hold
    the truth, over ``reps`` fits of fresh data."""
    hits = []
    for seed in range(reps):
        X, y, coef, extra = _draw(family, n, 100 + seed)
        fitted = MoERegressor(2, expert=family, n_init=2, random_state=seed).fit(X, y)
        z = checks.z_scores(fitted, coef, extra)
        hits += [abs(v) <= 1.6449 for v in z.values()]
    return float(np.mean(hits))


FAMILIES = ["binomial", "gamma", "lognormal", "negative_binomial", "poisson", "weibull"]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_ninety_percent_intervals_cover_ninety_percent(family):
    # 100 fits of 8 to 10 parameters: the share's standard error is about 1.1%
    assert 0.87 <= _coverage(family, reps=100, n=2000) <= 0.93
