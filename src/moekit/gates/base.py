"""What a gate provides to the one EM loop.

A gate gives every row a distribution over the K experts, g_k(x) with
sum_k g_k(x) = 1. In the M-step it is fitted to the responsibilities r_ik as soft
targets, i.e. it maximises

.. math::  Q_g(V) = \\sum_i \\sum_k r_{ik} \\log g_k(x_i; V) + \\log \\text{prior}(V).

The protocol mirrors :class:`moekit.experts.base.ExpertFamily`: per-chunk
``log_prob`` (log g, shape (K, c)) and ``chunk_stats``, then ``m_step``; and
``log_weights`` for prediction.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from moekit._core.data import Chunk, EMData


class Gate(Protocol):
    """Protocol of gates (see the module docstring)."""

    n_experts: int
    monotone: bool
    needs_resp: bool

    def prepare(self, data: EMData) -> None: ...

    def init_params(self, data: EMData) -> Any:
        """Parameters before the first M-step (usually the uniform gate)."""

    def log_prob(self, params: Any, chunk: Chunk) -> torch.Tensor:
        """log g_k(x_i) of shape (K, c)."""

    def chunk_stats(self, params: Any, chunk: Chunk, resp: torch.Tensor) -> Any: ...

    def m_step(self, params: Any, stats: Any, data: EMData, resp: torch.Tensor | None) -> Any: ...

    def log_prior(self, params: Any) -> float: ...

    def n_parameters(self, params: Any) -> int: ...

    def log_weights(self, params: Any, XgT: torch.Tensor) -> torch.Tensor:
        """log g_k(x) of shape (K, n) for a gate design (p_g, n)."""
