"""Bayesian linear-Gaussian experts: E-step term, KL and M-step against references.

The expert's part of the ELBO at fixed responsibilities r is

    F(q, beta, A) = sum_ik r_ik E_q log N(y_i | w_k^T x_i, 1 / beta_k) - sum_k KL(q(w_k) || p(w_k)),

the only part the M-step changes. Each of its sub-steps must maximise F over its
own coordinates; the tests perturb the result and check that F drops.
"""

import math

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from moekit._core.data import PACKED_MAX_P, Chunk, EMData
from moekit.experts.bayesian_gaussian import (
    BayesianGaussianExperts,
    BayesianGaussianParams,
    gaussian_kl,
    inverse_pd,
    posterior_update,
    quad_forms,
)


def _data(n=200, d=3, m=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, n, generator=g, dtype=torch.float64)
    XeT = torch.cat([X, torch.ones(1, n, dtype=torch.float64)])
    w = torch.randn(m, d + 1, generator=g, dtype=torch.float64)
    y = w @ XeT + 0.3 * torch.randn(m, n, generator=g, dtype=torch.float64)
    return EMData(XeT, XeT, y)


def _resp(K, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    e = -torch.log(torch.rand(K, n, generator=g, dtype=torch.float64))  # Dirichlet(1, ..., 1)
    return e / e.sum(0)


def _objective(family, params, data, resp):
    logp = family.log_prob(params, Chunk(0, data.n, data))
    return float((resp * logp).sum()) + family.log_prior(params)


def _stats(family, params, data, resp):
    chunk = Chunk(0, data.n, data)
    family.log_prob(params, chunk)
    return family.chunk_stats(params, chunk, resp)


def _random_params(family, data, seed=2):
    """A valid, deliberately poor point: random posterior, prior and noise."""
    g = torch.Generator().manual_seed(seed)
    p = data.XeT.shape[0]
    K, m = family.n_experts, family.n_outputs
    base = family.init_params(data)
    a = torch.randn(K, m, p, p, generator=g, dtype=torch.float64)
    cov = a @ a.transpose(-1, -2) / p + 0.1 * torch.eye(p, dtype=torch.float64)
    coef = torch.randn(K, m, p, generator=g, dtype=torch.float64)
    beta = torch.rand(K, m, generator=g, dtype=torch.float64) + 0.5
    return BayesianGaussianParams(coef, cov, beta, base.prior_mean, base.prior_prec)


def test_log_prob_is_the_expected_log_density_under_q():
    data = _data(n=5)
    fam = BayesianGaussianExperts(2, 1)
    params = _random_params(fam, data)
    got = fam.log_prob(params, Chunk(0, data.n, data))
    # Monte Carlo over w ~ q(w): E_q log N(y | w^T x, 1/beta)
    g = torch.Generator().manual_seed(0)
    for k in range(2):
        L = torch.linalg.cholesky(params.cov[k, 0])
        w = params.coef[k, 0] + (L @ torch.randn(4, 200_000, generator=g, dtype=torch.float64)).T
        b = params.beta[k, 0]
        mean = w @ data.XeT  # (S, n)
        logn = 0.5 * torch.log(b / (2 * math.pi)) - 0.5 * b * (data.y[0] - mean) ** 2
        np.testing.assert_allclose(got[k].numpy(), logn.mean(0).numpy(), rtol=0, atol=0.02)


@pytest.mark.parametrize("p", [3, PACKED_MAX_P + 3])
def test_quad_forms_packed_and_per_matrix_agree(p):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, p, p, generator=g, dtype=torch.float64)
    cov = a @ a.transpose(1, 2)
    XT = torch.randn(p, 50, generator=g, dtype=torch.float64)
    naive = torch.einsum("an,tab,bn->tn", XT, cov, XT)
    np.testing.assert_allclose(quad_forms(cov, XT).numpy(), naive.numpy(), rtol=1e-10)
    data = EMData(XT, XT, torch.zeros(1, 50, dtype=torch.float64))
    if p <= PACKED_MAX_P:
        prods = Chunk(0, 50, data).products("e")
        np.testing.assert_allclose(quad_forms(cov, XT, prods).numpy(), naive.numpy(), rtol=1e-10)


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    B = a @ a.transpose(1, 2) + 0.1 * torch.eye(4, dtype=torch.float64)
    A = b @ b.transpose(1, 2) + 0.1 * torch.eye(4, dtype=torch.float64)
    m, m0 = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2))
    ref = kl_divergence(MultivariateNormal(m, B), MultivariateNormal(m0, A))
    got = gaussian_kl(m, B, m0, inverse_pd(A))
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-9)


def test_posterior_update_matches_the_textbook_formula():
    data = _data(n=300, d=2, m=2)
    fam = BayesianGaussianExperts(3, 2)
    params = _random_params(fam, data)
    resp = _resp(3, data.n)
    from moekit._core.data import unpack_grams

    gram, xty, _ = unpack_grams(_stats(fam, params, data, resp), 3, 2)
    coef, cov = posterior_update(gram, xty, params.beta, params.prior_mean, params.prior_prec)
    X, Y = data.XeT.T.numpy(), data.y.T.numpy()
    for k in range(3):
        for j in range(2):
            L0 = params.prior_prec[k, j].numpy()
            b = float(params.beta[k, j])
            R = resp[k].numpy()
            Bk = np.linalg.inv(L0 + b * (X.T * R) @ X)
            mk = Bk @ (L0 @ params.prior_mean[k, j].numpy() + b * X.T @ (R * Y[:, j]))
            np.testing.assert_allclose(cov[k, j].numpy(), Bk, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(coef[k, j].numpy(), mk, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("prior", ["ard", "isotropic", "full"])
@pytest.mark.parametrize("noise", ["shared", "per_expert"])
@pytest.mark.parametrize("prior_mean", ["zero", "shared"])
def test_each_m_step_part_maximises_the_elbo_over_its_coordinates(prior, noise, prior_mean):
    data = _data(n=250, d=3, m=1, seed=3)
    fam = BayesianGaussianExperts(3, 1, prior=prior, noise=noise, prior_mean=prior_mean)
    old = _random_params(fam, data)
    resp = _resp(3, data.n)
    new = fam.m_step(old, _stats(fam, old, data, resp), data)
    f_old, f_new = _objective(fam, old, data, resp), _objective(fam, new, data, resp)
    assert f_new >= f_old

    def f(**change):
        return _objective(fam, BayesianGaussianParams(**{**vars(new), **change}), data, resp)

    # beta: F is separable, so the returned beta must beat its neighbours
    for factor in (0.97, 1.03):
        if noise == "shared":
            assert f(beta=new.beta * factor) < f_new
        else:
            for k in range(3):
                b = new.beta.clone()
                b[k] *= factor
                assert f(beta=b) < f_new
    # the prior's precisions of the slopes (the intercept's is fixed)
    for factor in (0.97, 1.03):
        prec = new.prior_prec.clone()
        prec[..., :-1, :-1] *= factor
        assert f(prior_prec=prec) < f_new
    if prior == "ard":
        prec = new.prior_prec.clone()
        prec[0, 0, 1, 1] *= 1.05
        assert f(prior_prec=prec) < f_new
    if prior == "full":
        prec = new.prior_prec.clone()
        prec[0, 0, 0, 1] += 0.02 * prec[0, 0, 0, 0]
        prec[0, 0, 1, 0] = prec[0, 0, 0, 1]
        assert f(prior_prec=prec) < f_new
    if prior_mean == "shared":
        assert f(prior_mean=new.prior_mean + 0.01) < f_new
    # q(w) maximises F at the beta and prior it was computed with
    at_old = {"beta": old.beta, "prior_mean": old.prior_mean, "prior_prec": old.prior_prec}
    best = _objective(fam, BayesianGaussianParams(new.coef, new.cov, **at_old), data, resp)
    eye = torch.eye(4, dtype=torch.float64)
    for coef, cov in [
        (new.coef + 0.01, new.cov),
        (new.coef, new.cov * 1.05),
        (new.coef, new.cov * 0.95),
        (new.coef, new.cov + 1e-3 * eye),
    ]:
        assert _objective(fam, BayesianGaussianParams(coef, cov, **at_old), data, resp) < best


def test_an_expert_without_rows_keeps_the_prior_and_its_noise():
    data = _data(n=100)
    fam = BayesianGaussianExperts(2, 1, noise="per_expert")
    params = _random_params(fam, data)
    resp = torch.zeros(2, data.n, dtype=torch.float64)
    resp[0] = 1.0
    new = fam.m_step(params, _stats(fam, params, data, resp), data)
    np.testing.assert_allclose(new.coef[1].numpy(), params.prior_mean[1].numpy(), atol=1e-12)
    np.testing.assert_allclose(
        new.cov[1].numpy(), inverse_pd(params.prior_prec[1]).numpy(), rtol=1e-10
    )
    assert float(new.beta[1, 0]) == float(params.beta[1, 0])
    assert torch.isfinite(new.beta).all() and fam.log_prior(new) <= 0.0


def test_check_params_refuses_impossible_values():
    data = _data(n=50)
    fam = BayesianGaussianExperts(2, 1)
    good = fam.init_params(data)
    fam.check_params(good)
    bad_cov = good.cov.clone()
    bad_cov[0, 0, 0, 0] = -1.0
    with pytest.raises(ValueError, match="'cov' holds matrices that are not symmetric"):
        fam.check_params(BayesianGaussianParams(**{**vars(good), "cov": bad_cov}))
    with pytest.raises(ValueError, match="'beta' holds noise precisions that are not positive"):
        fam.check_params(BayesianGaussianParams(**{**vars(good), "beta": -good.beta}))
    nan = good.coef.clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="'coef' holds NaN"):
        fam.check_params(BayesianGaussianParams(**{**vars(good), "coef": nan}))
