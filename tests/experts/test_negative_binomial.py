"""Negative binomial (NB2) experts recover known experts, equal a direct maximisation
of the NB2 likelihood for one expert, reduce to the Poisson on Poisson data, and
take M-steps that never lower their objective."""

import math
import warnings

import glm_checks as checks
import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import gammaln

from moekit import MoERegressor
from moekit._core.data import EMData
from moekit.experts import negative_binomial
from moekit.experts.negative_binomial import NegativeBinomialExperts

COEF = np.array([[0.0, -1.0], [2.0, 0.5]])  # log mean: [intercept, slope] per expert
DISPERSION = np.array([0.5, 0.2])


def _draw(n, seed):
    X, z, eta, rng = checks.two_experts(n, COEF, seed)
    theta = 1.0 / DISPERSION[z]
    return X, rng.poisson(rng.gamma(theta, np.exp(eta) / theta)).astype(float)


def _nb2_loglik(beta, log_phi, A, y):
    mu, phi = np.exp(A @ beta), np.exp(log_phi)
    theta = 1.0 / phi
    return np.sum(gammaln(y + theta) - gammaln(theta) - gammaln(y + 1)
                  - (theta + y) * np.log1p(phi * mu) + y * np.log(phi * mu))  # fmt: skip


def test_negative_binomial_experts_recover_known_experts():
    # the seed is one of many: over seeds 4 to 15 the largest |z| of the eight
    # parameters was 0.9 to 1.9 (the z of each parameter: mean within 0.35 of 0, sd
    # 0.4 to 0.9); seeds 0 and 2 reach 3.2 and 3.0, on correlated parameters
    X, y = _draw(3000, 5)
    fitted = MoERegressor(2, expert="negative_binomial", n_init=3, random_state=0).fit(X, y)
    z = checks.z_scores(fitted, COEF, {"dispersion": DISPERSION})
    assert max(abs(v) for v in z.values()) < 3.0, z


def test_one_negative_binomial_expert_equals_a_direct_maximisation():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(400, 2))
    A = np.c_[np.ones(400), X]
    mu = np.exp(A @ [1.0, 0.4, -0.3])
    y = rng.poisson(rng.gamma(2.0, mu / 2.0)).astype(float)
    ours = MoERegressor(1, expert="negative_binomial", tol=1e-13, max_iter=1000, n_init=1)
    ours.fit(X, y)
    ref = minimize(lambda t: -_nb2_loglik(t[:3], t[3], A, y), np.zeros(4), method="BFGS",
                   options={"gtol": 1e-9})  # fmt: skip
    np.testing.assert_allclose(np.r_[ours.intercept_, ours.coef_[0]], ref.x[:3], atol=1e-4)
    assert ours._params.expert.dispersion.item() == pytest.approx(np.exp(ref.x[3]), abs=1e-4)
    assert len(y) * ours.log_likelihood(X, y) == pytest.approx(-ref.fun, abs=1e-4)


@pytest.mark.parametrize("under_dispersed", [False, True])
def test_negative_binomial_reduces_to_poisson_on_poisson_data(under_dispersed):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(2000, 1))
    mean = np.exp(1.0 + 0.5 * X[:, 0])
    if under_dispersed:  # binomial counts: variance below the mean, the MLE of phi at 0
        y = rng.binomial(40, mean / 40).astype(float)
    else:
        y = rng.poisson(mean).astype(float)
    kw = {"tol": 1e-12, "max_iter": 1000, "n_init": 1}
    nb = MoERegressor(1, expert="negative_binomial", **kw).fit(X, y)
    pois = MoERegressor(1, expert="poisson", **kw).fit(X, y)
    gain = nb.log_likelihood(X, y) - pois.log_likelihood(X, y)  # per row
    assert -1e-9 <= gain < 1e-3  # NB2 contains the Poisson
    if under_dispersed:
        assert nb._params.expert.dispersion.item() <= 1e-6
        assert abs(gain) < 1e-6
        np.testing.assert_allclose(nb.coef_, pois.coef_, atol=1e-5)
    else:
        np.testing.assert_allclose(nb.coef_, pois.coef_, atol=0.02)


def test_negative_binomial_m_step_never_lowers_its_objective():
    X, y = _draw(500, 3)
    data = EMData(checks.design(X), checks.design(X), torch.as_tensor(y).reshape(1, -1))
    for seed in range(3):
        q = checks.m_step_objectives(NegativeBinomialExperts(3), data, steps=12, seed=seed)
        assert checks.never_falls(q), q
        assert q[-1] - q[-2] < 1e-6 * abs(q[-1])


def test_negative_binomial_predictive_distribution_has_its_moments():
    X, y = _draw(1500, 4)
    fitted = MoERegressor(2, expert="negative_binomial", n_init=2, random_state=0).fit(X, y)
    d = fitted.predict_distribution(X[:5])
    draws = d.sample(40000, random_state=0)
    np.testing.assert_allclose(draws.mean(1), d.mean(), rtol=0.03)
    np.testing.assert_allclose(draws.var(1), d.var(), rtol=0.08)
    # the CDF sums the pmf
    k = np.arange(0, 400)
    pmf = np.exp([d[i : i + 1].logpdf(np.array([j])) for i in range(1) for j in k]).ravel()
    assert d[:1].cdf(np.array([20.0]))[0] == pytest.approx(pmf[:21].sum(), rel=1e-9)
    assert all(float(m) == int(m) for row in d.modes() for m in row)


@pytest.mark.parametrize(
    ("y", "match"),
    [(np.r_[1.0, 2.5, 0.0, 3.0], r"expert='negative_binomial' needs y of non-negative integer"),
     (np.r_[1.0, -2.0, 0.0, 3.0], r"expert='negative_binomial' needs y of non-negative integer"),
     (np.ones((4, 2)), r"expert='negative_binomial' models one count target; y has 2 columns")],
)  # fmt: skip
def test_negative_binomial_refuses_targets_it_cannot_model(y, match):
    X = np.arange(4.0).reshape(-1, 1)
    with pytest.raises(ValueError, match=match):
        MoERegressor(1, expert="negative_binomial").fit(X, y)


@pytest.mark.parametrize("phi", [1e-9, 1e-5, 0.04, 0.3, 5.0])
def test_dispersion_derivatives_hold_their_digits_as_phi_goes_to_zero(phi):
    """d log p / d phi and d^2 / d phi^2 against 50-digit arithmetic (mpmath)."""
    import mpmath

    from moekit._core.data import Chunk
    from moekit.experts.negative_binomial import NegativeBinomialParams

    mpmath.mp.dps = 50
    y = torch.tensor([[0.0, 1.0, 5.0, 40.0, 3.0, 12.0]], dtype=torch.float64)
    eta = torch.tensor([0.1, -0.7, 1.5, 3.6, 1.1, 2.0], dtype=torch.float64)
    XeT = torch.ones(1, 6, dtype=torch.float64)
    params = NegativeBinomialParams(torch.ones(1, 1, dtype=torch.float64),
                                    torch.tensor([phi], dtype=torch.float64))  # fmt: skip
    family = NegativeBinomialExperts(1)
    data = EMData(XeT * eta, XeT * eta, y)  # the design's one column carries eta
    d = family.local_derivatives(params, Chunk(0, 6, data), None)
    for i in range(6):
        yi, mu = int(y[0, i]), mpmath.exp(mpmath.mpf(float(eta[i])))

        def logp(f, yi=yi, mu=mu):
            t = 1 / f
            return (mpmath.loggamma(yi + t) - mpmath.loggamma(t) - (t + yi) * mpmath.log1p(f * mu)
                    + yi * mpmath.log(f * mu))  # fmt: skip

        f0 = mpmath.mpf(phi)
        assert float(d.d1[0, 1, i]) == pytest.approx(float(mpmath.diff(logp, f0)), rel=1e-9)
        assert float(d.d2[0, 1, 1, i]) == pytest.approx(float(mpmath.diff(logp, f0, 2)),
                                                        rel=1e-9)  # fmt: skip


def test_an_offset_start_saves_iterations_and_ends_at_the_same_fit(monkeypatch):
    """The first step starts at the Poisson limit's intercept-only maximum with the
    offset in it, log(sum y / sum e^o), instead of log(mean y): a K = 1 fit with a
    log exposure of about 6 needs half the iterations and ends at the same fit."""
    rng = np.random.default_rng(4)
    X, off = rng.normal(size=(300, 2)), rng.normal(6.0, 1.0, size=300)
    mu = np.exp(off - 4.0 + X @ [0.3, -0.2])
    y = rng.negative_binomial(2.0, 1 / (1 + 0.5 * mu)).astype(float)

    def fit():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return MoERegressor(1, expert="negative_binomial", n_init=1, tol=1e-10).fit(
                X, y, offset=off
            )

    new = fit()
    with monkeypatch.context() as m:  # as if the offset were 0
        m.setattr(negative_binomial, "start_log_rate",
                  lambda data: math.log(max(float(data.y.mean()), 1e-3)))  # fmt: skip
        old = fit()
    assert new.n_iter_ <= old.n_iter_ // 2, (new.n_iter_, old.n_iter_)
    assert new.log_likelihood(X, y, offset=off) == pytest.approx(
        old.log_likelihood(X, y, offset=off), abs=1e-9
    )
    np.testing.assert_allclose(new.coef_, old.coef_, atol=1e-5)
