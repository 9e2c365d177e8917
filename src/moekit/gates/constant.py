"""The constant gate: g_k(x) = pi_k, a mixture of regressions.

Its M-step is the closed form pi_k = sum_i r_ik / n (exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit._core.data import Chunk, EMData
from moekit._core.derivatives import LocalDerivatives
from moekit._core.reporting import Report, Scaling


def multinomial_derivatives(
    g: torch.Tensor, reference: int, linear: bool = True
) -> LocalDerivatives:
    """Derivatives of log g_k = eta_k - log sum_l e^{eta_l} in eta_l, l != reference.

    Parameters
    ----------
    g : Tensor of shape (K, c) or (K, 1)
        The weights g_k.
    reference : int
        The expert whose eta is held at 0.
    linear : bool
        Whether the eta are linear predictors (a softmax gate's) or scalars (log odds).

    Returns
    -------
    LocalDerivatives
        d1 of shape (K, K-1, c): [k = l] - g_l; d2 of shape (1, K-1, K-1, c):
        -(diag g_o - g_o g_o^T), the same for every k.
    """
    K = g.shape[0]
    others = [k for k in range(K) if k != reference]
    go = g[others]  # (K-1, c)
    eye = torch.eye(K, dtype=g.dtype, device=g.device)[:, others].unsqueeze(-1)  # (K, K-1, 1)
    d2 = go.unsqueeze(1) * go.unsqueeze(0)  # (K-1, K-1, c)
    j = torch.arange(K - 1)
    d2[j, j] -= go
    return LocalDerivatives(eye - go.unsqueeze(0), d2.unsqueeze(0), K - 1 if linear else 0)


@dataclass
class ConstantGateParams:
    """log_pi of shape (K,)."""

    log_pi: torch.Tensor


class ConstantGate:
    """Input-independent mixing weights pi_k (flexmix's default, mixtools' regmixEM)."""

    supports_balance = True  # its statistics are linear in the soft targets (EMModel)

    report_name = "constant"
    monotone = True
    # with one expert the weight is 1 and the log-prior 0: a one-expert fit is the
    # expert's fit alone (fitting.starts shares it between gates saying so)
    constant_with_one_expert = True
    needs_resp = False
    params_type = ConstantGateParams

    def __init__(self, n_experts: int) -> None:
        self.n_experts = n_experts

    def prepare(self, data: EMData) -> None:
        pass

    def init_params(self, data: EMData) -> ConstantGateParams:
        K = self.n_experts
        return ConstantGateParams(
            torch.full(
                (K,),
                -float(torch.log(torch.tensor(K * 1.0))),
                dtype=data.XeT.dtype,
                device=data.XeT.device,
            )
        )

    def log_prob(self, params: ConstantGateParams, chunk: Chunk) -> torch.Tensor:
        return params.log_pi.unsqueeze(1).expand(-1, chunk.stop - chunk.start)

    def chunk_stats(self, params, chunk: Chunk, resp: torch.Tensor) -> torch.Tensor:
        return resp.sum(1)

    def m_step(self, params, stats: torch.Tensor, data: EMData, resp=None) -> ConstantGateParams:
        return ConstantGateParams(torch.log(stats / stats.sum()))

    def log_prior(self, params) -> float:
        return 0.0

    # ------------------------------------------------------------ many starts at once
    # S starts stacked on a leading axis (moekit._core.batch): log_pi (S, K)
    batchable = True

    def log_prob_many(self, params: ConstantGateParams, chunk: Chunk) -> torch.Tensor:
        return params.log_pi.unsqueeze(2).expand(-1, -1, chunk.stop - chunk.start)

    def chunk_stats_many(self, params, chunk: Chunk, resp: torch.Tensor) -> torch.Tensor:
        return resp.sum(2)

    def m_step_many(self, params, stats: torch.Tensor, data: EMData) -> ConstantGateParams:
        return ConstantGateParams(torch.log(stats / stats.sum(1, keepdim=True)))

    def n_parameters(self, params) -> int:
        return self.n_experts - 1

    def select(self, params: ConstantGateParams, perm: torch.Tensor) -> ConstantGateParams:
        """The gate over the experts ``perm`` (indices may repeat; :meth:`shift` renormalises)."""
        return ConstantGateParams(params.log_pi[perm].contiguous())

    def shift(self, params: ConstantGateParams, delta: torch.Tensor) -> ConstantGateParams:
        """The gate with log g_k(x) + delta_k for every x."""
        return ConstantGateParams(params.log_pi + delta.to(params.log_pi))

    def log_weights(self, params: ConstantGateParams, XgT: torch.Tensor) -> torch.Tensor:
        return params.log_pi.unsqueeze(1).expand(-1, XgT.shape[1])

    # ------------------------------------------------------------ differentiable view
    def to_free(self, params: ConstantGateParams) -> dict[str, torch.Tensor]:
        return {"log_pi": params.log_pi}

    def from_free(self, free: dict[str, torch.Tensor]) -> ConstantGateParams:
        return ConstantGateParams(
            torch.log_softmax(free["log_pi"], 0)
        )  # normalised, as EM keeps it

    def log_weights_free(self, free: dict[str, torch.Tensor], XgT: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(free["log_pi"], 0).unsqueeze(1).expand(-1, XgT.shape[1])

    def log_prior_free(self, free: dict[str, torch.Tensor]) -> torch.Tensor:
        return free["log_pi"].new_zeros(())

    # ------------------------------------------------------------ reporting
    def report(self, params: ConstantGateParams, scaling: Scaling, reference: int = 0) -> Report:
        """log(pi_k / pi_ref) for the experts k other than the reference."""
        others = [k for k in range(self.n_experts) if k != reference]
        out = Report(fixed={"gate_reference": torch.tensor(reference)})
        labels = [f"log(pi_{k} / pi_{reference})" for k in others]
        out.add("log_odds", params.log_pi[others] - params.log_pi[reference],
                ["gate"] * len(others), labels)  # fmt: skip
        return out

    def from_report(self, values: dict, scaling: Scaling, fixed: dict) -> dict:
        ref = int(fixed["gate_reference"])
        rows = list(torch.unbind(values["log_odds"]))
        rows.insert(ref, torch.zeros_like(values["log_odds"][0]))
        return {"log_pi": torch.stack(rows)}

    # ------------------------------------------------------------ analytic information
    def local_derivatives(self, params: ConstantGateParams, chunk: Chunk, reference: int = 0):
        """Derivatives of log pi_k in the log odds against the reference (scalars), as
        the softmax gate's (:func:`multinomial_derivatives`), every row alike."""
        return multinomial_derivatives(torch.exp(params.log_pi).unsqueeze(1), reference,
                                       linear=False)  # fmt: skip

    def local_parameters(self, values: dict, scaling: Scaling, fixed: dict):
        """No linear predictors; the log odds log(pi_k / pi_ref), k != reference."""
        lo = values["log_odds"]
        return lo.new_zeros((1, 0, 0)), lo.unsqueeze(0)

    # ------------------------------------------------------------ model files
    def param_shapes(self, p: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the :class:`ConstantGateParams` fields (p, the design width, unused)."""
        return {"log_pi": (self.n_experts,)}

    def check_params(self, params: ConstantGateParams, prefix: str = "") -> None:
        """Refuse log-weights that are NaN or +inf or do not sum to one.

        An expert left without any responsibility has log pi_k = -inf, which is allowed.

        Raises
        ------
        ValueError
            Naming the field (after ``prefix``) and what is wrong with it.
        """
        log_pi, name = params.log_pi, prefix + "log_pi"
        if bool((torch.isnan(log_pi) | torch.isposinf(log_pi)).any()):
            raise ValueError(f"{name!r} holds NaN or +inf")
        total = float(torch.logsumexp(log_pi, 0).exp())
        if not abs(total - 1.0) <= 1e-6:
            raise ValueError(f"{name!r} is not normalised: the weights sum to {total:.6g}")
