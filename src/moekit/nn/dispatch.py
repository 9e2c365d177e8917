"""Dispatch: sort token assignments by expert, drop overflow, combine with index_add.

A routing decision is a list of *assignments*, triples (token, expert, weight):
``T * k`` of them for token choice, ``E * C`` for expert choice. The dispatch plan
sorts them by expert once (a stable sort, so that within an expert tokens keep their
batch order), drops those past an expert's capacity (first choices before second
choices, see :func:`~moekit.nn.functional.capacity_keep`), and remembers the token of
each kept assignment. The layer then gathers ``x[token]`` (rows grouped by expert),
runs each expert on its contiguous slice, and adds the weighted outputs back into
their tokens with ``index_add_``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.nn import functional as MF
from moekit.nn.routers import Routing

__all__ = ["DispatchPlan", "combine", "plan_dispatch"]


@dataclass
class DispatchPlan:
    """Kept assignments sorted by expert.

    Attributes
    ----------
    token : Tensor of shape (A,)
        Token of each kept assignment, grouped by expert (in token order within one
        expert).
    weight : Tensor of shape (A,)
        Its combine weight (differentiable).
    counts : list of int
        Kept assignments per expert, ``E`` entries summing to ``A``.
    routed : Tensor of shape (E,)
        Assignments the router sent to each expert, before dropping.
    dropped_fraction : float
        Token choice: the fraction of the ``T * k`` assignments dropped for lack of
        capacity. Expert choice: the fraction of tokens no expert picked.
    """

    token: Tensor
    weight: Tensor
    counts: list[int]
    routed: Tensor
    dropped_fraction: float


def plan_dispatch(
    routing: Routing,
    n_tokens: int,
    n_experts: int,
    capacity: int | None = None,
    priority: str = "choice",
) -> DispatchPlan:
    """Build the dispatch plan of one batch.

    Parameters
    ----------
    routing : Routing
        The router's decision.
    n_tokens, n_experts : int
        ``T`` and ``E``.
    capacity : int or None
        Token choice only: at most this many assignments per expert, taken in the
        order ``priority`` gives (:func:`~moekit.nn.functional.capacity_keep`); None
        keeps all (dropless).
    priority : {'choice', 'weight'}, default='choice'
        Which assignments an overflowing expert keeps.

    Returns
    -------
    DispatchPlan
    """
    if routing.expert_choice:
        return _plan_expert_choice(routing, n_tokens, n_experts)
    top_k = routing.indices.shape[-1]
    expert = routing.indices.reshape(-1)  # (T*k,) expert of assignment t*k + j
    order = torch.argsort(expert, stable=True)  # (T*k,) assignments grouped by expert
    routed = MF.expert_counts(expert, n_experts)  # (E,)
    token = order // top_k  # (T*k,)
    weight = routing.weights.reshape(-1)[order]  # (T*k,)
    n_assign = expert.numel()
    if capacity is not None and bool((routed > capacity).any()):
        keep = MF.capacity_keep(routing.indices, routing.weights, n_experts, capacity, priority)
        kept_sorted = keep.reshape(-1)[order]  # (T*k,) still grouped by expert
        token, weight = token[kept_sorted], weight[kept_sorted]
        kept = routed.clamp(max=capacity)
        dropped = (n_assign - int(kept.sum())) / n_assign
        return DispatchPlan(token, weight, kept.tolist(), routed, dropped)
    return DispatchPlan(token, weight, routed.tolist(), routed, 0.0)


def _plan_expert_choice(routing: Routing, n_tokens: int, n_experts: int) -> DispatchPlan:
    capacity = routing.indices.shape[1]  # indices (E, C) are already grouped by expert
    token = routing.indices.reshape(-1)  # (E*C,)
    weight = routing.weights.reshape(-1)  # (E*C,)
    routed = torch.full((n_experts,), capacity, device=token.device, dtype=torch.long)
    picked = torch.zeros(n_tokens, dtype=torch.bool, device=token.device)
    picked[token] = True
    dropped = 1.0 - int(picked.sum()) / n_tokens if n_tokens > 0 else 0.0
    return DispatchPlan(token, weight, [capacity] * n_experts, routed, dropped)


def combine(y: Tensor, token: Tensor, n_tokens: int) -> Tensor:
    """Add each row of ``y`` into its token: ``out[token[a]] += y[a]``.

    Parameters
    ----------
    y : Tensor of shape (A, d)
        Expert outputs, already multiplied by their combine weights.
    token : Tensor of shape (A,)
        Destination rows.
    n_tokens : int
        ``T``; tokens that receive nothing stay zero (dropped tokens: the caller's
        residual connection carries them).

    Returns
    -------
    Tensor of shape (T, d)
    """
    out = y.new_zeros(n_tokens, y.shape[-1])  # (T, d)
    return out.index_add_(0, token, y)
