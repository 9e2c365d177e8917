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

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.nn import functional as MF
from moekit.nn.experts import ExpertBank, sorted_experts_mm
from moekit.nn.fused import fused_moe
from moekit.nn.routers import Routing

__all__ = ["DispatchPlan", "combine", "dense_gates", "plan_dispatch", "run_experts"]


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
    kept : Tensor of shape (E,)
        Kept assignments per expert, summing to ``A``.
    routed : Tensor of shape (E,)
        Assignments the router sent to each expert, before dropping.
    dropped : Tensor or float
        Token choice: the fraction of the ``T * k`` assignments dropped for lack of
        capacity. Expert choice: the fraction of tokens no expert picked. A tensor
        where computing it would otherwise wait for the device (see
        :attr:`dropped_fraction`).
    """

    token: Tensor
    weight: Tensor
    kept: Tensor
    routed: Tensor
    dropped: Tensor | float = 0.0

    @functools.cached_property
    def counts(self) -> list[int]:
        """``kept`` as a list of ``E`` ints: the split sizes of the per-expert paths.

        Reading it copies ``kept`` to the host, which ``torch.compile`` cannot trace
        and ``vmap`` cannot batch; only the eager per-expert paths ask for it.
        """
        return self.kept.tolist()

    @property
    def dropped_fraction(self) -> float:
        return float(self.dropped)


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
    weights = routing.weights.reshape(-1)  # (T*k,)
    # the test waits for the device, but only when a capacity is set: dropless plans
    # have fixed shapes (what torch.compile needs)
    if capacity is not None and bool((routed > capacity).any()):
        keep = MF.capacity_keep(routing.indices, routing.weights, n_experts, capacity, priority)
        order = order[keep.reshape(-1)[order]]  # (A,) kept, still grouped by expert
        kept = routed.clamp(max=capacity)  # (E,)
        dropped = 1.0 - kept.sum() / expert.numel()
        return DispatchPlan(order // top_k, weights[order], kept, routed, dropped)
    return DispatchPlan(order // top_k, weights[order], routed, routed)


def _plan_expert_choice(routing: Routing, n_tokens: int, n_experts: int) -> DispatchPlan:
    capacity = routing.indices.shape[1]  # indices (E, C) are already grouped by expert
    token = routing.indices.reshape(-1)  # (E*C,)
    weight = routing.weights.reshape(-1)  # (E*C,)
    routed = torch.full((n_experts,), capacity, device=token.device, dtype=torch.long)
    return DispatchPlan(token, weight, routed, routed, _unpicked_fraction(token, n_tokens))


def _unpicked_fraction(tokens: Tensor, n_tokens: int) -> Tensor | float:
    """Fraction of the ``T`` tokens that appear nowhere in ``tokens``."""
    if n_tokens == 0:
        return 0.0
    flat = tokens.reshape(-1)
    picked = flat.new_zeros(n_tokens).scatter(0, flat, 1)  # (T,) 1 where picked
    return 1.0 - picked.sum() / n_tokens


def dense_gates(
    routing: Routing,
    n_tokens: int,
    n_experts: int,
    capacity: int | None = None,
    priority: str = "choice",
) -> tuple[Tensor, Tensor, Tensor | float]:
    """The routing as a dense (T, E) gate matrix, for the masked path.

    Every step has a fixed shape, so that the masked path of
    :class:`~moekit.nn.MoE` runs under ``vmap``; it multiplies every expert's output by
    its gate, zero for the experts a token does not use and for dropped assignments.

    Parameters
    ----------
    routing : Routing
    n_tokens, n_experts : int
    capacity : int or None
        As in :func:`plan_dispatch`.
    priority : {'choice', 'weight'}, default='choice'

    Returns
    -------
    gates : Tensor of shape (T, E)
        :math:`G_{te}`, the combine weight of token ``t`` in expert ``e`` (differentiable).
    routed : Tensor of shape (E,)
        Assignments the router sent to each expert.
    dropped : Tensor or float
        As :attr:`DispatchPlan.dropped`.
    """
    weights, indices = routing.weights, routing.indices
    if routing.expert_choice:  # (E, C): expert e took token indices[e, c]
        gates = weights.new_zeros(n_tokens, n_experts).scatter(0, indices.t(), weights.t())
        routed = torch.full((n_experts,), indices.shape[1], dtype=torch.long, device=indices.device)
        return gates, routed, _unpicked_fraction(indices, n_tokens)
    routed = MF.expert_counts(indices, n_experts)  # (E,)
    dropped: Tensor | float = 0.0
    if capacity is not None:
        keep = MF.capacity_keep(indices, weights, n_experts, capacity, priority)  # (T, k)
        weights = weights * keep  # dropped assignments get gate 0
        dropped = 1.0 - keep.float().mean() if keep.numel() else 0.0
    return MF.gates_from_top_k(weights, indices, n_experts), routed, dropped


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


def run_experts(x: Tensor, plan: DispatchPlan, bank: ExpertBank, path: str = "fused") -> Tensor:
    """The kept assignments through their experts, weighted and added into their tokens.

    .. math:: \\mathrm{out}_t = \\sum_{a : t_a = t} s_a \\, f_{e_a}(x_t)

    for the assignments ``a`` of ``plan`` (token :math:`t_a`, expert :math:`e_a`,
    weight :math:`s_a`). One computation for the layer and for the local experts of
    an expert-parallel layer, so that both run the bank the same way.

    Parameters
    ----------
    x : Tensor of shape (T, d)
    plan : DispatchPlan
    bank : ExpertBank
    path : {'fused', 'compiled', 'sorted'}, default='fused'
        As :meth:`MoE.execution_path <moekit.nn.MoE.execution_path>` chose it.
        'fused' and 'compiled' run :func:`~moekit.nn.fused.fused_moe` where the bank's
        implementation is 'fused' or 'grouped_mm' (a plan without assignments takes
        the sorted path); 'sorted' runs plain autograd ops, the bank's own 'mm' or
        'bmm', or :func:`~moekit.nn.experts.sorted_experts_mm` in place of the fused
        implementations.

    Returns
    -------
    Tensor of shape (T, d)
    """
    impl = bank.resolve_impl(x)
    fused, grouped = impl in ("fused", "grouped_mm"), impl == "grouped_mm"
    if fused and path == "fused" and plan.token.numel() > 0:
        return fused_moe(x, bank.w_in, bank.w_out, plan.weight, plan.token, plan.counts,
                         bank.activation, grouped=grouped)  # fmt: skip
    if fused and path == "compiled":  # counts stay a tensor: no graph break
        return fused_moe(x, bank.w_in, bank.w_out, plan.weight, plan.token, plan.kept,
                         bank.activation, grouped=grouped)  # fmt: skip
    x_sorted = x.index_select(0, plan.token)  # (A, d) grouped by expert
    scale = plan.weight.to(x_sorted.dtype)  # (A,)
    if fused:  # falling back: plain ops
        y_sorted = sorted_experts_mm(x_sorted, bank.w_in, bank.w_out, plan.counts, scale,
                                     bank.activation)  # fmt: skip
    else:
        y_sorted = bank(x_sorted, plan.counts, scale)  # (A, d), already weighted
    return combine(y_sorted, plan.token, x.shape[0])  # (T, d)
