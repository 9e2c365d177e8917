"""Gamma experts (log link, a shape per expert by maximum likelihood) recover known
experts, agree with scikit-learn's GammaRegressor for one expert, and take M-steps
that never lower their objective."""

import glm_checks as checks
import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.stats import gamma as gamma_dist
from sklearn.linear_model import GammaRegressor

from moekit import MoERegressor
from moekit._core.data import EMData
from moekit.experts.gamma import GammaExperts, gamma_shape_mle, start_log_mean

COEF = np.array([[-0.5, -1.0], [1.0, 0.5]])  # log mean: [intercept, slope] per expert
SHAPE = np.array([3.0, 6.0])


def _draw(n, seed):
    X, z, eta, rng = checks.two_experts(n, COEF, seed)
    return X, rng.gamma(SHAPE[z], np.exp(eta) / SHAPE[z])


@pytest.fixture(scope="module")
def fitted():
    X, y = _draw(3000, 0)
    return MoERegressor(2, expert="gamma", n_init=3, random_state=0).fit(X, y)


def test_gamma_experts_recover_known_experts(fitted):
    z = checks.z_scores(fitted, COEF, {"shape": SHAPE})
    assert max(abs(v) for v in z.values()) < 3.0, z


def test_gamma_interval_covers_ninety_percent_of_new_draws(fitted):
    X, y = _draw(4000, 1)
    assert 0.87 <= checks.coverage(fitted, X, y) <= 0.93


def test_one_gamma_expert_equals_scikit_learns_gamma_regression():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(400, 2))
    mean = np.exp(0.5 + X @ [0.4, -0.3])
    y = rng.gamma(2.5, mean / 2.5)
    ours = MoERegressor(1, expert="gamma", tol=1e-12, max_iter=500, n_init=1).fit(X, y)
    ref = GammaRegressor(alpha=0.0, tol=1e-12, max_iter=10_000).fit(X, y)
    np.testing.assert_allclose(ours.coef_[0], ref.coef_, atol=1e-4)
    assert ours.intercept_[0] == pytest.approx(ref.intercept_, abs=1e-4)
    # the reference's log-likelihood at its coefficients and the shape's maximum
    mu = ref.predict(X)

    def loglik(shape):
        return gamma_dist.logpdf(y, shape, scale=mu / shape).sum()

    best = minimize_scalar(lambda s: -loglik(s), bounds=(0.01, 100.0), method="bounded",
                           options={"xatol": 1e-10})  # fmt: skip
    assert len(y) * ours.log_likelihood(X, y) == pytest.approx(-best.fun, abs=1e-4)
    assert ours._params.expert.shape.item() == pytest.approx(best.x, rel=1e-4)


def test_gamma_shape_solves_its_likelihood_equation():
    c = torch.tensor([1e-4, 0.01, 0.3, 2.0, 10.0], dtype=torch.float64)
    a = gamma_shape_mle(c)
    torch.testing.assert_close(torch.log(a) - torch.digamma(a), c, rtol=1e-10, atol=0.0)


def _shape_every_step(c, iterations=30):
    """gamma_shape_mle's Newton iteration with every step taken (the reference)."""
    import math

    from moekit.experts.gamma import SHAPE_MAX, SHAPE_MIN

    c = c.clamp(min=1e-300)
    a = (3.0 - c + torch.sqrt((c - 3.0) ** 2 + 24.0 * c)) / (12.0 * c)
    x = torch.log(a.clamp(SHAPE_MIN, SHAPE_MAX))
    for _ in range(iterations):
        a = torch.exp(x)
        df = 1.0 - a * torch.polygamma(1, a)
        x = (x - (x - torch.digamma(a) - c) / df.clamp(max=-1e-300)).clamp(
            math.log(SHAPE_MIN), math.log(SHAPE_MAX))  # fmt: skip
    return torch.exp(x)


def _shape_spots(k: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(k)
    spots = torch.tensor([0.0, 1e-12, 1e-8, 1e-3, 0.1, 0.5, 1.0, 3.0, 10.0, 1e4, 1e8],
                         dtype=torch.float64)  # fmt: skip
    cs = [spots[i : i + k] for i in range(0, len(spots) - k + 1)]
    cs += [2 * torch.rand(k, generator=gen, dtype=torch.float64) for _ in range(60)]
    cs += [10 ** (-8 * torch.rand(k, generator=gen, dtype=torch.float64)) for _ in range(60)]
    return cs + [c.float() for c in cs[:50]]  # single precision too


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_gamma_shape_stops_at_the_every_step_root(k):
    """The solve stops once a step no longer moves log a (each element on its own) and
    returns the root the iteration with every step taken reaches, to rounding: the
    same floats at the start and after the first step, within the step's rounding floor
    after (relatively 1e-13, more for large shapes, whose steps are noise of ~1e-14 a)."""
    for c in _shape_spots(k):
        for n in (0, 1, 2, 7, 30):
            ours, ref = gamma_shape_mle(c, n), _shape_every_step(c, n)
            eps = torch.finfo(c.dtype).eps
            rtol = 500 * eps + 600 * eps * ref
            assert ((ours - ref).abs() <= rtol * ref).all() or torch.isnan(ref).any(), (c, n)
            if n <= 1:  # the start, and the first step, always taken
                torch.testing.assert_close(ours, ref, rtol=0, atol=0, equal_nan=True,
                                           msg=f"{c}, {n}")  # fmt: skip


def test_gamma_shape_of_each_expert_is_independent_of_the_others():
    """Each element's root is the same floats alone as beside others (a batch of
    fits solves all its experts' shapes at once)."""
    gen = torch.Generator().manual_seed(0)
    spread = 10 ** (4 - 10 * torch.rand(40, generator=gen, dtype=torch.float64))
    c = torch.cat([torch.tensor([0.0, 1e-12, 1e-8, 1e8], dtype=torch.float64), spread])
    together = gamma_shape_mle(c)
    alone = torch.cat([gamma_shape_mle(c[i : i + 1]) for i in range(len(c))])
    torch.testing.assert_close(together, alone, rtol=0, atol=0)


def test_the_first_step_starts_at_the_mean_of_the_model_without_features():
    """With an offset o the start is log(mean(y e^-o)), where the intercept-only score
    sum_i (y_i e^(-b - o_i) - 1) is zero; without one, log(mean y) as before."""
    gen = torch.Generator().manual_seed(5)
    off = 3.0 + torch.randn(200, generator=gen, dtype=torch.float64)
    y = torch.exp(off - 1.0) * (0.2 + torch.rand(200, generator=gen, dtype=torch.float64))
    XT = torch.ones((1, 200), dtype=torch.float64)
    b = start_log_mean(EMData(XT, XT, y.reshape(1, -1), offset=off))
    assert float((y * torch.exp(-b - off) - 1.0).sum()) == pytest.approx(0.0, abs=1e-10)
    assert start_log_mean(EMData(XT, XT, y.reshape(1, -1))) == float(torch.log(y.mean()))


def test_gamma_m_step_never_lowers_its_objective():
    X, y = _draw(500, 3)
    data = EMData(checks.design(X), checks.design(X), torch.as_tensor(y).reshape(1, -1))
    for seed in range(3):
        q = checks.m_step_objectives(GammaExperts(3), data, seed=seed)
        assert checks.never_falls(q), q
        assert q[-1] - q[-2] < 1e-6 * abs(q[-1])  # converged to the maximiser


@pytest.mark.parametrize(
    ("y", "match"),
    [(np.r_[1.0, 2.0, 0.0, 3.0], r"expert='gamma' needs y > 0; got 1 value"),
     (np.r_[1.0, -2.0, 3.0, 3.0], r"expert='gamma' needs y > 0"),
     (np.ones((4, 2)), r"expert='gamma' models one positive target; y has 2 columns")],
)  # fmt: skip
def test_gamma_refuses_targets_it_cannot_model(y, match):
    X = np.arange(4.0).reshape(-1, 1)
    with pytest.raises(ValueError, match=match):
        MoERegressor(1, expert="gamma").fit(X, y)
