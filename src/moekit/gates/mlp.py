"""The two-layer gate g(x) = softmax(V1^T tanh(V2^T x)) (Grabovoy's lecture, MIPT 2019).

A linear (softmax) gate splits the input space with hyperplanes; a hidden layer
lets the gate carve curved regions, such as a ring around a disc. Its M-step takes
a few L-BFGS steps on the gate's part of the EM objective,

.. math::  Q_g(V) = \\sum_i \\sum_k r_{ik} \\log g_k(x_i; V) - \\frac{\\lambda}{2}
                    \\lVert V \\rVert^2,

starting from the current weights, and keeps the step only if Q_g did not decrease
(generalised EM: the likelihood never decreases).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moekit._core.data import Chunk, EMData
from moekit._core.optim import lbfgs_minimise
from moekit._core.validation import check_options

DEFAULTS = {"hidden": 16, "steps": 20, "weight_decay": 1e-3}


@dataclass
class MLPGateParams:
    """v2 (h, p): hidden layer on the gate design (its last column the bias);
    v1 (K, h + 1): output layer, its last column the bias."""

    v2: torch.Tensor
    v1: torch.Tensor


def gate_logits(v2: torch.Tensor, v1: torch.Tensor, XgT: torch.Tensor) -> torch.Tensor:
    """Unnormalised gate scores (K, c) for a gate design XgT (p, c)."""
    hidden = torch.tanh(v2 @ XgT)  # (h, c)
    return v1[:, :-1] @ hidden + v1[:, -1:]


class MLPGate:
    """Two-layer neural gate (see the module docstring).

    Parameters
    ----------
    n_experts : int
    seed : int
        Seeds the initial weights.
    options : dict, optional
        ``hidden`` (units, default 16), ``steps`` (L-BFGS iterations per M-step,
        default 20), ``weight_decay`` (L2 penalty, default 1e-3).
    """

    monotone = True
    needs_resp = True
    params_type = MLPGateParams

    def __init__(self, n_experts: int, seed: int = 0, options: dict | None = None) -> None:
        self.n_experts = n_experts
        self.seed = seed
        self.options = check_options(options, DEFAULTS, "gate_options for gate='mlp'")

    def prepare(self, data: EMData) -> None:
        pass

    def init_params(self, data: EMData) -> MLPGateParams:
        p, h, K = data.XgT.shape[0], self.options["hidden"], self.n_experts
        gen = torch.Generator().manual_seed(self.seed + 1)
        v2 = torch.randn((h, p), generator=gen, dtype=data.XgT.dtype) * (2.0 / math.sqrt(p))
        v1 = data.XgT.new_zeros((K, h + 1))  # uniform gate to start
        return MLPGateParams(v2.to(data.XgT.device), v1)

    def log_prob(self, params: MLPGateParams, chunk: Chunk) -> torch.Tensor:
        return torch.log_softmax(gate_logits(params.v2, params.v1, chunk.XgT), dim=0)

    def log_weights(self, params: MLPGateParams, XgT: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(gate_logits(params.v2, params.v1, XgT), dim=0)

    def chunk_stats(self, params, chunk, resp):
        return None

    def _objective(self, v2, v1, data: EMData, resp) -> torch.Tensor:
        logg = torch.log_softmax(gate_logits(v2, v1, data.XgT), dim=0)
        decay = (v2**2).sum() + (v1**2).sum()
        return (resp * logg).sum() - 0.5 * self.options["weight_decay"] * decay

    def m_step(self, params, stats, data: EMData, resp: torch.Tensor) -> MLPGateParams:
        first = params is None
        old = self.init_params(data) if first else params
        resp = resp.detach()
        steps = self.options["steps"] * (5 if first else 1)
        v2, v1 = lbfgs_minimise(
            (old.v2, old.v1), lambda a, b: -self._objective(a, b, data, resp) / data.n, steps
        )
        with torch.no_grad():
            new = MLPGateParams(v2, v1)
            if first:
                return new
            if self._objective(new.v2, new.v1, data, resp) >= self._objective(
                old.v2, old.v1, data, resp
            ):
                return new
            return old

    def log_prior(self, params: MLPGateParams) -> float:
        return (
            -0.5 * self.options["weight_decay"] * float((params.v2**2).sum() + (params.v1**2).sum())
        )

    def n_parameters(self, params: MLPGateParams) -> int:
        h, p = params.v2.shape
        return h * p + (self.n_experts - 1) * (h + 1)

    def permute(self, params: MLPGateParams, perm: torch.Tensor) -> MLPGateParams:
        return MLPGateParams(params.v2, params.v1[perm].contiguous())

    # ------------------------------------------------------------ model files
    def param_shapes(self, p: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the :class:`MLPGateParams` fields for a gate design of p columns."""
        h = self.options["hidden"]
        return {"v2": (h, p), "v1": (self.n_experts, h + 1)}

    def check_params(self, params: MLPGateParams, prefix: str = "") -> None:
        """Refuse non-finite weights (ValueError naming the field)."""
        for name in ("v2", "v1"):
            if not bool(torch.isfinite(getattr(params, name)).all()):
                raise ValueError(f"{prefix + name!r} holds NaN or infinite values")
