"""Expert parallelism: each process holds ``E / W`` experts, tokens travel by all-to-all.

With ``W`` processes in the expert-parallel group, process ``r`` holds experts
``r E/W .. (r+1) E/W - 1`` (its *shard*) and a full copy of everything else (router,
shared experts). A forward pass of :class:`~moekit.nn.MoE` then

1. routes its own tokens locally and sorts the kept assignments by expert (the
   dispatch plan of :mod:`moekit.nn.dispatch`); since the experts of one process are
   contiguous, this also groups them by destination process;
2. exchanges the per-expert counts (an all-to-all of ``E`` integers), so that every
   process knows how many rows it will receive from each other one, per local expert;
3. sends each assignment's token row to the process holding its expert
   (:func:`all_to_all`, uneven splits, a process may send or receive nothing);
4. regroups the received rows by local expert and runs the local experts on them
   with the layer's own dropless expert compute
   (:func:`~moekit.nn.dispatch.run_experts` along the layer's execution path),
   unweighted;
5. sends the outputs back along the reverse route, multiplies them by their combine
   weights and adds them into their tokens.

The exchange is an autograd Function whose backward is the reverse exchange, so the
gradients of tokens, router and experts are those of one process holding every
expert. The gradient a process gets for its experts is the sum over the tokens of
*all* processes: under data parallelism (each process its own batch, losses
averaged) divide it by ``W``, as :mod:`moekit.nn.train` does.

Semantics: the forward equals the single-process layer applied to each process's
tokens with the same weights. For dropless token-choice routing this is the layer on
the concatenated batch. With a capacity factor, capacity is counted per process
(:math:`\\lceil f\\, T_r k / E \\rceil` of the ``T_r`` local tokens, before sending),
as GShard counts it per group; expert choice picks among each process's own tokens.

Every process must run the same sequence of expert-parallel forwards and backwards
(collectives pair up in order). A process that dies or stops answering makes the
others fail within the process group's timeout with :class:`CollectiveError`
(``init_process_group(timeout=...)``, see :func:`init_distributed`); both, and the
other process-group helpers, live in :mod:`moekit._core.distributed`.

This module holds one layer's exchange and its per-process shard of a bank; whole
models are sharded and gathered again by :mod:`moekit.nn.sharding`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit._core.distributed import (
    DEFAULT_TIMEOUT_S,
    CollectiveError,
    collective,
    distributed_from_env,
    init_distributed,
    is_initialized,
    nbytes,
)
from moekit._core.validation import InvalidParameterError
from moekit.nn.dispatch import DispatchPlan, combine, run_experts
from moekit.nn.experts import ExpertBank

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "CollectiveError",
    "ExpertShard",
    "all_to_all",
    "distributed_from_env",
    "expert_parallel_experts",
    "init_distributed",
    "make_shard",
    "shard_bank",
]


@dataclass(frozen=True)
class ExpertShard:
    """Where one process's experts sit in the expert-parallel group.

    Attributes
    ----------
    group : ProcessGroup
    rank, world_size : int
        This process's rank in ``group`` and the group's size ``W``.
    n_experts : int
        ``E``, all experts of the layer.
    """

    group: Any
    rank: int
    world_size: int
    n_experts: int

    @property
    def n_local(self) -> int:
        """Experts held here, ``E / W``."""
        return self.n_experts // self.world_size

    @property
    def first(self) -> int:
        """Global index of the first local expert."""
        return self.rank * self.n_local

    @property
    def local(self) -> slice:
        """The local experts as a slice of the full expert axis."""
        return slice(self.first, self.first + self.n_local)


def make_shard(group: Any, n_experts: int, owner: str = "MoE") -> ExpertShard:
    """Check ``group`` against ``n_experts`` and describe this process's shard.

    Raises
    ------
    InvalidParameterError
        If torch.distributed is not initialised, ``group`` is not a process group this
        process belongs to, or its size does not divide ``n_experts``.
    """
    if not is_initialized():
        raise InvalidParameterError(
            f"The 'expert_parallel_group' parameter of {owner} needs an initialised "
            "torch.distributed process group (torch.distributed.init_process_group, e.g. "
            f"under torchrun). Got {group!r} without one."
        )
    if not isinstance(group, dist.ProcessGroup):
        raise InvalidParameterError(
            f"The 'expert_parallel_group' parameter of {owner} must be a "
            f"torch.distributed.ProcessGroup or None. Got {group!r} instead."
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise InvalidParameterError(
            f"The 'expert_parallel_group' parameter of {owner} must be a group this process "
            f"(global rank {dist.get_rank()}) belongs to. Got {group!r} instead."
        )
    world = dist.get_world_size(group)
    if n_experts % world:
        raise InvalidParameterError(
            f"The 'expert_parallel_group' parameter of {owner} must be a group whose size "
            f"divides n_experts={n_experts}. Got a group of {world} processes instead."
        )
    return ExpertShard(group, rank, world, n_experts)


# ------------------------------------------------------------------ the exchange
class _AllToAll(torch.autograd.Function):
    """Rows of ``x`` in ``input_splits`` blocks go to processes 0..W-1; the result
    holds ``output_splits[s]`` rows from process ``s``, in order of ``s``."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):  # type: ignore[override]
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        x = x.contiguous()
        collective("expert-parallel all-to-all", dist.all_to_all_single, out, x, output_splits,
                   input_splits, group=group, n_bytes=nbytes(x))  # fmt: skip
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        output_splits, input_splits = ctx.splits
        # the reverse route; through apply, so that a double backward works too
        return (
            _AllToAll.apply(grad.contiguous(), input_splits, output_splits, ctx.group),
            None,
            None,
            None,
        )


def all_to_all(x: Tensor, output_splits: list[int], input_splits: list[int], group: Any) -> Tensor:
    """Differentiable ``all_to_all_single`` with uneven splits.

    Parameters
    ----------
    x : Tensor of shape (sum(input_splits), ...)
        Rows ``input_splits[0]`` go to process 0, the next ``input_splits[1]`` to
        process 1, and so on.
    output_splits : list of int
        Rows arriving from each process (known beforehand, e.g. from an exchange of
        counts).
    input_splits : list of int
    group : ProcessGroup

    Returns
    -------
    Tensor of shape (sum(output_splits), ...)
        The rows from process 0 first. Its backward sends the gradient back along the
        reverse route.
    """
    return _AllToAll.apply(x, output_splits, input_splits, group)


def _exchange_counts(kept: Tensor, shard: ExpertShard) -> Tensor:
    """``recv[s, j]``: rows process ``s`` sends to local expert ``j`` here; (W, E/W)."""
    sent = kept.to(torch.int64).contiguous()  # (E,) = (W, E/W) by destination
    received = torch.empty_like(sent)
    collective("exchange of token counts", dist.all_to_all_single, received, sent,
               group=shard.group, n_bytes=nbytes(sent))  # fmt: skip
    return received.view(shard.world_size, shard.n_local)


def _local_experts(x: Tensor, order: Tensor, kept: Tensor, bank: ExpertBank, path: str) -> Tensor:
    """Local expert ``j`` on received rows ``x[order]`` of its slice, unweighted, by the
    layer's own expert compute; rows in received order."""
    if x.shape[0] == 0:
        # still part of the graph, so that the backward exchange runs here too; the
        # weights get zero gradients, as the experts of one full bank would
        return x * 0.0 + 0.0 * (bank.w_in.sum() + bank.w_out.sum())
    ones = x.new_ones(x.shape[0])  # weights are applied after the return trip
    plan = DispatchPlan(order, ones, kept, kept)
    return run_experts(x, plan, bank, path)  # (R, d) back in received order


def expert_parallel_experts(
    x: Tensor, plan: DispatchPlan, bank: ExpertBank, shard: ExpertShard, path: str = "fused"
) -> Tensor:
    """The routed experts' contribution :math:`\\sum_e w_{te} f_e(x_t)`, experts sharded.

    Parameters
    ----------
    x : Tensor of shape (T, d)
        This process's tokens (``T`` may be 0).
    plan : DispatchPlan
        Its kept assignments sorted by (global) expert.
    bank : ExpertBank
        The local experts, ``E / W`` of them.
    shard : ExpertShard
    path : {'fused', 'sorted'}, default='fused'
        How the local experts run, as :meth:`MoE.execution_path
        <moekit.nn.MoE.execution_path>` chose for this forward; 'fused' takes the
        fused dispatch where the bank's implementation allows it.

    Returns
    -------
    Tensor of shape (T, d)
    """
    W, n_tokens = shard.world_size, x.shape[0]
    received = _exchange_counts(plan.kept, shard)  # (W, E/W)
    input_splits = plan.kept.view(W, shard.n_local).sum(1).tolist()  # rows to each process
    output_splits = received.sum(1).tolist()  # rows from each process
    x_send = x.index_select(0, plan.token)  # (A, d) grouped by expert, so by process
    if torch.is_grad_enabled() and not x_send.requires_grad:
        # every process must run both backward exchanges, whatever its own data needs
        x_send = x_send.detach().requires_grad_()
    x_recv = all_to_all(x_send, output_splits, input_splits, shard.group)  # (R, d)
    # rows arrive by source process, then local expert; regroup them by local expert
    local = torch.arange(shard.n_local, device=x.device).repeat(W)  # (W*E/W,)
    expert = torch.repeat_interleave(local, received.reshape(-1).to(x.device))  # (R,)
    order = torch.argsort(expert, stable=True)  # (R,)
    y_recv = _local_experts(x_recv, order, received.sum(0).to(x.device), bank, path)  # (R, d)
    y_back = all_to_all(y_recv, input_splits, output_splits, shard.group)  # (A, d) plan order
    y_back = y_back * plan.weight[:, None].to(y_back.dtype)  # (A, d) weighted
    return combine(y_back, plan.token, n_tokens)  # (T, d)


# ------------------------------------------------------------------ one bank
def shard_bank(bank: ExpertBank, shard: ExpertShard) -> None:
    """Keep the local experts of a full bank, in place (new parameters, sliced)."""
    if bank.n_experts != shard.n_experts:
        raise ValueError(f"the bank holds {bank.n_experts} experts, not all {shard.n_experts}.")
    with torch.no_grad():
        bank.w_in = nn.Parameter(bank.w_in[shard.local].clone())  # (E/W, d, n*H)
        bank.w_out = nn.Parameter(bank.w_out[shard.local].clone())  # (E/W, H, d)
    bank.n_experts = shard.n_local
