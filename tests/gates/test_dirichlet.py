"""The Dirichlet gate: E log pi, KL and the q(pi) update against references."""

import numpy as np
import torch
from torch.distributions import Dirichlet, kl_divergence

from moekit._core.data import Chunk, EMData
from moekit.gates.dirichlet import (
    DirichletGate,
    DirichletGateParams,
    dirichlet_kl,
    expected_log_weights,
)


def test_expected_log_weights_match_monte_carlo():
    lam = torch.tensor([0.3, 2.0, 15.0], dtype=torch.float64)
    torch.manual_seed(0)
    draws = Dirichlet(lam).sample((400_000,))
    mc = torch.log(draws.clamp(min=1e-300)).mean(0)
    np.testing.assert_allclose(expected_log_weights(lam).numpy(), mc.numpy(), atol=0.02)


def test_kl_matches_torch_distributions():
    lam = torch.tensor([0.5, 3.0, 40.0, 1e-3], dtype=torch.float64)
    mu = torch.full((4,), 0.01, dtype=torch.float64)
    ref = kl_divergence(Dirichlet(lam), Dirichlet(mu))
    np.testing.assert_allclose(float(dirichlet_kl(lam, mu)), float(ref), rtol=1e-10)


def test_m_step_maximises_the_gates_part_of_the_elbo():
    """sum_ik r_ik E log pi_k - KL(q || p) is maximised by lambda = mu + sum_i r_i."""
    n, K = 120, 4
    ones = torch.ones(1, n, dtype=torch.float64)
    data = EMData(ones, ones, torch.zeros(1, n, dtype=torch.float64))
    gate = DirichletGate(K, concentration=0.05)
    g = torch.Generator().manual_seed(0)
    resp = torch.rand(K, n, generator=g, dtype=torch.float64) ** 3
    resp /= resp.sum(0)

    def objective(lam):
        params = DirichletGateParams(lam)
        logp = gate.log_prob(params, Chunk(0, n, data))
        return float((resp * logp).sum()) + gate.log_prior(params)

    best = gate.m_step(None, gate.chunk_stats(None, Chunk(0, n, data), resp), data)
    np.testing.assert_allclose(best.concentration.numpy(), 0.05 + resp.sum(1).numpy())
    top = objective(best.concentration)
    for k in range(K):
        for factor in (0.9, 1.1):
            lam = best.concentration.clone()
            lam[k] *= factor
            assert objective(lam) < top


def test_predictive_weights_are_the_posterior_mean():
    gate = DirichletGate(3, concentration=1.0)
    params = DirichletGateParams(torch.tensor([1.0, 3.0, 6.0], dtype=torch.float64))
    w = torch.exp(gate.log_weights(params, torch.ones(1, 2, dtype=torch.float64)))
    np.testing.assert_allclose(w[:, 0].numpy(), [0.1, 0.3, 0.6])
    sd = gate.weight_stds(params).numpy()
    np.testing.assert_allclose(sd, np.sqrt([0.1 * 0.9, 0.3 * 0.7, 0.6 * 0.4]) / np.sqrt(11))
