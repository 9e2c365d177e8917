"""The neural gate g(x) = softmax(V0 x + V1 tanh(V2 x)) (after Grabovoy's lecture, MIPT 2019).

A linear (softmax) gate splits the input space with hyperplanes; a hidden layer
lets the gate carve curved regions, such as a ring around a disc. The linear term
V0 x is the softmax gate itself, so this gate contains it exactly (V1 = 0): a fit
started from a softmax gate's fit (:meth:`MLPGate.embed`) starts at its likelihood,
and EM can only climb from there. Its M-step takes a few L-BFGS steps on the gate's
part of the EM objective,

.. math::  Q_g(V) = \\sum_i \\sum_k r_{ik} \\log g_k(x_i; V)
                    - \\frac{\\alpha}{2} \\lVert V_{0,\\text{slopes}} \\rVert^2
                    - \\frac{\\lambda}{2} (\\lVert V_1 \\rVert^2 + \\lVert V_2 \\rVert^2),

starting from the current weights, and keeps the step only if Q_g did not decrease
(generalised EM: the likelihood never decreases). The penalty on V0 is the softmax
gate's (``alpha``, intercepts free); ``weight_decay`` (lambda) keeps the hidden layer
small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moekit._core.data import Chunk, EMData
from moekit._core.optim import lbfgs_minimise
from moekit._core.validation import check_finite, check_options
from moekit.gates.softmax import SoftmaxGate, SoftmaxGateParams

DEFAULTS = {"hidden": 16, "steps": 20, "weight_decay": 1e-3}


@dataclass
class MLPGateParams:
    """v0 (K, p): the linear term on the gate design (its last column the intercept);
    v1 (K, h): output weights of the hidden units; v2 (h, p): hidden layer (last column
    its bias)."""

    v0: torch.Tensor
    v1: torch.Tensor
    v2: torch.Tensor


def gate_logits(v0: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor, XgT: torch.Tensor):
    """Unnormalised gate scores (K, c) for a gate design XgT (p, c)."""
    hidden = torch.tanh(v2 @ XgT)  # (h, c)
    return torch.addmm(v0 @ XgT, v1, hidden)


class MLPGate:
    """Softmax gate plus a hidden layer (see the module docstring).

    Parameters
    ----------
    n_experts : int
    alpha : float, default=1e-5
        L2 penalty on the linear term's slopes, as the softmax gate's.
    seed : int
        Seeds the hidden layer's initial weights.
    options : dict, optional
        ``hidden`` (units, default 16), ``steps`` (L-BFGS iterations per M-step,
        default 20), ``weight_decay`` (L2 penalty on the hidden layer, default 1e-3).
    """

    monotone = True
    needs_resp = True
    params_type = MLPGateParams

    def __init__(
        self, n_experts: int, alpha: float = 1e-5, seed: int = 0, options: dict | None = None
    ) -> None:
        self.n_experts = n_experts
        self.alpha = alpha
        self.seed = seed
        self.options = check_options(options, DEFAULTS, "gate_options for gate='mlp'")

    def prepare(self, data: EMData) -> None:
        pass

    def _hidden_init(self, p: int, like: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + 1)
        v2 = torch.randn((self.options["hidden"], p), generator=gen, dtype=like.dtype)
        return (v2 * (2.0 / math.sqrt(p))).to(like.device)

    def init_params(self, data: EMData) -> MLPGateParams:
        p, h, K = data.XgT.shape[0], self.options["hidden"], self.n_experts
        z = data.XgT.new_zeros
        return MLPGateParams(z((K, p)), z((K, h)), self._hidden_init(p, data.XgT))  # uniform

    def log_prob(self, params: MLPGateParams, chunk: Chunk) -> torch.Tensor:
        return self.log_weights(params, chunk.XgT)

    def log_weights(self, params: MLPGateParams, XgT: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(gate_logits(params.v0, params.v1, params.v2, XgT), dim=0)

    def chunk_stats(self, params, chunk, resp):
        return None

    def _penalty(self, v0, v1, v2) -> torch.Tensor:
        decay = (v1**2).sum() + (v2**2).sum()
        return 0.5 * (self.alpha * (v0[:, :-1] ** 2).sum() + self.options["weight_decay"] * decay)

    def _objective(self, v0, v1, v2, data: EMData, resp) -> torch.Tensor:
        logg = torch.log_softmax(gate_logits(v0, v1, v2, data.XgT), dim=0)
        return (resp * logg).sum() - self._penalty(v0, v1, v2)

    def m_step(self, params, stats, data: EMData, resp: torch.Tensor) -> MLPGateParams:
        first = params is None
        old = self.init_params(data) if first else params
        resp = resp.detach()
        steps = self.options["steps"] * (5 if first else 1)
        v0, v1, v2 = lbfgs_minimise(
            (old.v0, old.v1, old.v2),
            lambda a, b, c: -self._objective(a, b, c, data, resp) / data.n,
            steps,
        )
        with torch.no_grad():
            new = MLPGateParams(v0, v1, v2)
            if first:
                return new
            q_new = self._objective(new.v0, new.v1, new.v2, data, resp)
            q_old = self._objective(old.v0, old.v1, old.v2, data, resp)
            return new if q_new >= q_old else old

    def log_prior(self, params: MLPGateParams) -> float:
        return -float(self._penalty(params.v0, params.v1, params.v2))

    def n_parameters(self, params: MLPGateParams) -> int:
        h, p = params.v2.shape
        return h * p + (self.n_experts - 1) * (p + h)

    def select(self, params: MLPGateParams, perm: torch.Tensor) -> MLPGateParams:
        """The gate's outputs ``perm`` (indices may repeat; add :meth:`shift` to renormalise)."""
        return MLPGateParams(params.v0[perm].contiguous(), params.v1[perm].contiguous(), params.v2)

    def shift(self, params: MLPGateParams, delta: torch.Tensor) -> MLPGateParams:
        """The gate with log g_k(x) + delta_k, when the shifted weights still sum to one."""
        v0 = params.v0.clone()
        v0[:, -1] += delta.to(v0)
        return MLPGateParams(v0, params.v1, params.v2)

    # ------------------------------------------------------------ nesting
    def simpler(self) -> SoftmaxGate:
        """The softmax gate this gate contains (hidden output weights zero)."""
        return SoftmaxGate(self.n_experts, alpha=self.alpha)

    def embed(self, params: SoftmaxGateParams, data: EMData) -> MLPGateParams:
        """A softmax gate's fit as this gate: the same weights g(x), hidden layer switched off.

        The hidden layer starts at its usual random weights with zero output weights, so
        the gradient of Q_g reaches it through V1 from the first M-step.
        """
        K, p = params.coef.shape
        v1 = params.coef.new_zeros((K, self.options["hidden"]))
        return MLPGateParams(params.coef, v1, self._hidden_init(p, params.coef))

    # ------------------------------------------------------------ differentiable view
    def to_free(self, params: MLPGateParams) -> dict[str, torch.Tensor]:
        return {"v0": params.v0, "v1": params.v1, "v2": params.v2}

    def from_free(self, free: dict[str, torch.Tensor]) -> MLPGateParams:
        return MLPGateParams(free["v0"], free["v1"], free["v2"])

    def log_weights_free(self, free: dict[str, torch.Tensor], XgT: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(gate_logits(free["v0"], free["v1"], free["v2"], XgT), dim=0)

    def log_prior_free(self, free: dict[str, torch.Tensor]) -> torch.Tensor:
        return -self._penalty(free["v0"], free["v1"], free["v2"])

    # ------------------------------------------------------------ model files
    def param_shapes(self, p: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the :class:`MLPGateParams` fields for a gate design of p columns."""
        K, h = self.n_experts, self.options["hidden"]
        return {"v0": (K, p), "v1": (K, h), "v2": (h, p)}

    def check_params(self, params: MLPGateParams, prefix: str = "") -> None:
        """Refuse non-finite weights (ValueError naming the field)."""
        for name in ("v0", "v1", "v2"):
            check_finite(prefix + name, getattr(params, name))
