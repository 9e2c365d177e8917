"""The Dirichlet gate: constant mixing weights pi with a Dirichlet prior, by variational EM.

pi ~ Dir(mu, ..., mu) and z_i | pi ~ Cat(pi). Mean-field variational EM keeps
q(pi) = Dir(lambda); the gate's three terms in the one EM loop are

* E-step ("log_prob"): E_q log pi_k = psi(lambda_k) - psi(sum_l lambda_l), the
  digamma function psi;
* M-step: q(pi) = Dir(mu + gamma) with gamma_k = sum_i r_ik, the exact maximiser
  of the ELBO over q(pi) (Bishop 2006, eq. 10.58);
* log_prior: -KL(q(pi) || p(pi)),

so that with experts that play by the same rules the loop's objective is the ELBO.

With mu < 1 the prior favours few experts: an expert with little weight gets E
log pi_k far below log E pi_k (psi(x) ~ -1/x for small x), loses what weight it
had, and empties out; the surplus experts of a fit with too many are switched off
(Corduneanu and Bishop 2001). Predictions use the posterior mean weights E_q pi_k =
lambda_k / sum_l lambda_l, the predictive probability of a new row's expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit._core.data import Chunk, EMData


@dataclass
class DirichletGateParams:
    """concentration of shape (K,): lambda, the parameters of q(pi) = Dir(lambda)."""

    concentration: torch.Tensor


def expected_log_weights(concentration: torch.Tensor) -> torch.Tensor:
    """E log pi_k = psi(lambda_k) - psi(sum_l lambda_l) under Dir(lambda), shape (..., K).

    Leading axes (S stacked starts) are kept; the sum is over the last.
    """
    total = concentration.sum(-1, keepdim=True)
    return torch.special.digamma(concentration) - torch.special.digamma(total)


def dirichlet_kl(concentration: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """KL(Dir(lambda) || Dir(mu)) over the last axis, shape (...) (a scalar for one lambda).

    .. math::  \\log\\Gamma(\\lambda_0) - \\sum_k \\log\\Gamma(\\lambda_k)
               - \\log\\Gamma(\\mu_0) + \\sum_k \\log\\Gamma(\\mu_k)
               + \\sum_k (\\lambda_k - \\mu_k) (\\psi(\\lambda_k) - \\psi(\\lambda_0))
    """
    lam, mu = concentration, prior
    return (
        torch.lgamma(lam.sum(-1))
        - torch.lgamma(lam).sum(-1)
        - torch.lgamma(mu.sum(-1))
        + torch.lgamma(mu).sum(-1)
        + ((lam - mu) * expected_log_weights(lam)).sum(-1)
    )


class DirichletGate:
    """Constant weights pi ~ Dir(concentration) fitted by variational EM (module docstring).

    Parameters
    ----------
    n_experts : int
    concentration : float
        mu, the symmetric Dirichlet prior's parameter: below 1 favours few experts.
    """

    report_name = "Dirichlet"
    monotone = True
    needs_resp = False
    params_type = DirichletGateParams

    def __init__(self, n_experts: int, concentration: float = 1.0) -> None:
        self.n_experts = n_experts
        self.concentration = concentration

    def _prior(self, like: torch.Tensor) -> torch.Tensor:
        return like.new_full((self.n_experts,), float(self.concentration))

    def prepare(self, data: EMData) -> None:
        pass

    def init_params(self, data: EMData) -> DirichletGateParams:
        """Equal weights, as if every expert held n / K rows."""
        return DirichletGateParams(self._prior(data.XeT) + data.n / self.n_experts)

    def log_prob(self, params: DirichletGateParams, chunk: Chunk) -> torch.Tensor:
        c = chunk.stop - chunk.start
        return expected_log_weights(params.concentration).unsqueeze(1).expand(-1, c)

    def chunk_stats(self, params, chunk: Chunk, resp: torch.Tensor) -> torch.Tensor:
        return resp.sum(1)

    def m_step(self, params, stats: torch.Tensor, data: EMData, resp=None) -> DirichletGateParams:
        return DirichletGateParams(self._prior(stats) + stats)

    # ------------------------------------------------------------ many starts at once
    # S starts stacked on a leading axis (moekit._core.batch): concentration (S, K);
    # every operation is elementwise or a reduction over one start's K entries
    batchable = True

    def log_prob_many(self, params: DirichletGateParams, chunk: Chunk) -> torch.Tensor:
        """:meth:`log_prob` of S stacked starts, shape (S, K, c)."""
        c = chunk.stop - chunk.start
        return expected_log_weights(params.concentration).unsqueeze(2).expand(-1, -1, c)

    def chunk_stats_many(self, params, chunk: Chunk, resp: torch.Tensor) -> torch.Tensor:
        return resp.sum(2)

    def m_step_many(self, params, stats: torch.Tensor, data: EMData) -> DirichletGateParams:
        return DirichletGateParams(self._prior(stats) + stats)

    def log_prior_many(self, params: DirichletGateParams) -> torch.Tensor:
        """:meth:`log_prior` of S stacked starts, shape (S,)."""
        lam = params.concentration
        return -dirichlet_kl(lam, self._prior(lam))

    def log_prior(self, params: DirichletGateParams) -> float:
        """-KL(q(pi) || p(pi)), on the scale of a sum over rows."""
        lam = params.concentration
        return -float(dirichlet_kl(lam, self._prior(lam)))

    def n_parameters(self, params) -> int:
        return self.n_experts - 1

    def log_weights(self, params: DirichletGateParams, XgT: torch.Tensor) -> torch.Tensor:
        """log E_q pi_k for every column of XgT, shape (K, n): the predictive weights."""
        lam = params.concentration
        return torch.log(lam / lam.sum()).unsqueeze(1).expand(-1, XgT.shape[1])

    def expected_weights(self, params: DirichletGateParams) -> torch.Tensor:
        """E_q pi, shape (K,)."""
        return params.concentration / params.concentration.sum()

    def weight_stds(self, params: DirichletGateParams) -> torch.Tensor:
        """Posterior standard deviations of pi_k under Dir(lambda), shape (K,)."""
        lam = params.concentration
        total = lam.sum()
        return torch.sqrt(lam * (total - lam) / (total**2 * (total + 1.0)))

    def select(self, params: DirichletGateParams, perm: torch.Tensor) -> DirichletGateParams:
        """The gate over the experts ``perm`` (indices may repeat; see :meth:`shift`)."""
        return DirichletGateParams(params.concentration[perm].contiguous())

    def shift(self, params: DirichletGateParams, delta: torch.Tensor) -> DirichletGateParams:
        """The gate whose expected weights are E pi_k e^{delta_k} (counts scaled by e^delta)."""
        return DirichletGateParams(params.concentration * torch.exp(delta.to(params.concentration)))

    # ------------------------------------------------------------ model files
    def param_shapes(self, p: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the :class:`DirichletGateParams` fields (p, the design width, unused)."""
        return {"concentration": (self.n_experts,)}

    def check_params(self, params: DirichletGateParams, prefix: str = "") -> None:
        """Refuse concentrations that are not positive and finite (ValueError naming them)."""
        lam = params.concentration
        if not bool((torch.isfinite(lam) & (lam > 0)).all()):
            raise ValueError(f"{prefix + 'concentration'!r} holds values that are not positive")
