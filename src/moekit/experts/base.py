"""What an expert family provides to the one EM loop.

An expert family holds K experts p_k(y | x; theta_k) of one kind, vectorised over
k. The EM loop (:mod:`moekit.fitting.em`) streams the data in chunks and calls, per
chunk, :meth:`ExpertFamily.log_prob` for the E-step and, where the family can use
them, :meth:`ExpertFamily.chunk_stats` to sum the M-step's sufficient statistics in
the same pass; after the pass it calls :meth:`ExpertFamily.m_step`.

All per-chunk arrays are expert-major, shape (K, n_chunk); see
:mod:`moekit._core.data` for why.

The M-step must not decrease the expected complete-data log-likelihood

.. math::  Q(\\theta) = \\sum_i \\sum_k r_{ik} \\log p_k(y_i \\mid x_i; \\theta_k)
                       + \\log \\text{prior}(\\theta),

so that the log-likelihood never decreases (generalised EM). Families whose
M-step is guaranteed not to decrease Q (an exact maximiser, or a minorise-maximise
step) set ``monotone = True``; for the others (a Newton step, say) the loop checks
the likelihood after the step and shortens the step along the line from the old
parameters (:func:`moekit._core.data.lerp_params`) until it does not decrease.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from moekit._core.data import Chunk, EMData


class ExpertFamily(Protocol):
    """Protocol of expert families (see the module docstring)."""

    n_experts: int
    monotone: bool
    needs_resp: bool
    """True when :meth:`m_step` needs the full (K, n) responsibilities."""

    def prepare(self, data: EMData) -> None:
        """Per-fit precomputation (cached arrays, constants)."""

    def log_prob(self, params: Any, chunk: Chunk) -> torch.Tensor:
        """log p_k(y_i | x_i) of shape (K, c) for the chunk's rows."""

    def chunk_stats(self, params: Any, chunk: Chunk, resp: torch.Tensor) -> Any:
        """Sufficient statistics of the chunk, summed over its rows, or None."""

    def m_step(self, params: Any, stats: Any, data: EMData, resp: torch.Tensor | None) -> Any:
        """New parameters from the summed statistics (or the full responsibilities)."""

    def log_prior(self, params: Any) -> float:
        """Log-prior (penalty) term of the objective, on the scale of a sum over rows."""

    def n_parameters(self, params: Any) -> int:
        """Number of free parameters, for BIC and AIC."""

    def min_samples(self, params: Any) -> float:
        """Total responsibility below which an expert counts as collapsed."""
