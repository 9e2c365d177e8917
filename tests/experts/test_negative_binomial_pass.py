"""The negative binomial E-pass statistics against autograd of the expected log-likelihood."""

import math

import pytest
import torch

from moekit._core.data import Chunk, EMData
from moekit.experts import negative_binomial
from moekit.experts.negative_binomial import (
    NegativeBinomialExperts,
    NegativeBinomialParams,
    nb_logpmf,
)


def _problem(seed=0, n=700):
    g = torch.Generator().manual_seed(seed)
    XT = torch.cat([torch.randn(3, n, generator=g, dtype=torch.float64),
                    torch.ones(1, n, dtype=torch.float64)])  # fmt: skip
    y = torch.poisson(torch.exp(1.0 + 0.5 * XT[0]) * torch.rand(n, generator=g, dtype=XT.dtype))
    resp = torch.rand(3, n, generator=g, dtype=XT.dtype)
    coef = 0.3 * torch.randn(3, 4, generator=g, dtype=XT.dtype)
    return EMData(XT, XT, y.reshape(1, -1)), resp, coef


def _lgamma_logpmf(eta, y, phi):
    """log NB2(y; e^eta, phi) in its lgamma form: exact to rounding where 1 / phi is small."""
    theta = 1.0 / phi
    l1p = torch.log1p(phi * torch.exp(eta))
    return (torch.lgamma(y + theta) - torch.lgamma(theta) - torch.lgamma(y + 1)
            - (theta + y) * l1p + y * (torch.log(phi) + eta))  # fmt: skip


@pytest.mark.parametrize("table_max", [None, 0])  # the tables, or lgamma and digamma forms
def test_the_pass_statistics_are_the_derivatives_of_q(monkeypatch, table_max):
    if table_max is not None:
        monkeypatch.setattr(negative_binomial, "COUNT_TABLE_MAX", table_max)
    data, resp, coef = _problem()
    family = NegativeBinomialExperts(3)
    family.prepare(data)
    assert (data.cache["nb_counts"] is None) == (table_max is not None)
    phi = torch.tensor([0.05, 0.5, 3.0], dtype=torch.float64)
    params = NegativeBinomialParams(coef, phi)
    grads = []
    for fresh in (True, False):  # without and with the E-step's buffers
        chunks = list(data.chunks(256))
        stats = None
        for chunk in chunks:
            if not fresh:
                family.log_prob(params, chunk)
            s = family.chunk_stats(params, chunk, resp[:, chunk.start : chunk.stop])
            stats = s if stats is None else tuple(a + b for a, b in zip(stats, s, strict=True))
        grads.append(stats)

    c = coef.clone().requires_grad_(True)
    a = torch.log(phi).requires_grad_(True)

    def q(c, a):
        eta = c @ data.XeT
        y = data.y[0]
        return (resp * _lgamma_logpmf(eta, y, torch.exp(a).unsqueeze(1))).sum()

    g_coef, g_a = torch.autograd.grad(q(c, a), (c, a), create_graph=True)
    d2 = torch.stack([torch.autograd.grad(g_a[k], a, retain_graph=True)[0][k] for k in range(3)])
    for grad, _, d1_, d2_, nk in grads:
        torch.testing.assert_close(grad, g_coef.detach(), rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(d1_, g_a.detach(), rtol=1e-9, atol=1e-8)
        torch.testing.assert_close(d2_, d2, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(nk, resp.sum(1))


def test_the_log_density_matches_the_closed_form():
    data, _, coef = _problem(1)
    family = NegativeBinomialExperts(3)
    family.prepare(data)
    phi = torch.tensor([1e-3, 0.2, 40.0], dtype=torch.float64)
    chunk = Chunk(0, data.n, data)
    ours = family.log_prob(NegativeBinomialParams(coef, phi), chunk)
    y = data.y[0]
    ref = nb_logpmf(coef @ data.XeT, y, phi.unsqueeze(1))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-11)


def test_the_closed_form_keeps_its_digits_near_the_poisson_limit():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    y = torch.tensor([0.0, 1.0, 3.0, 10.0, 40.0], dtype=torch.float64)
    mu = 7.0
    for phi in (1e-12, 1e-8, 1e-3, 0.3, 5.0):
        theta = mpmath.mpf(1) / mpmath.mpf(phi)
        exact = [float(mpmath.loggamma(v + theta) - mpmath.loggamma(theta)
                       - mpmath.loggamma(v + 1) + theta * mpmath.log(theta / (theta + mu))
                       + v * mpmath.log(mu / (theta + mu))) for v in y.tolist()]  # fmt: skip
        ours = nb_logpmf(torch.full_like(y, math.log(mu)), y, torch.tensor(phi, dtype=y.dtype))
        # the lgamma form is 2.6e-3 off at phi = 1e-12 (lgamma(1e12) is 2.6e13)
        torch.testing.assert_close(ours, torch.tensor(exact, dtype=y.dtype), rtol=0, atol=1e-12)
