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
   with the layer's own dropless expert compute (the fused dispatch, or the bank's
   implementation), unweighted;
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
(``init_process_group(timeout=...)``, see :func:`init_distributed`).

Weights are made in full from the seed and then sliced (as megablocks does), so one
seed gives the same model at any parallel degree; :func:`gather_experts` and
:func:`gathered_state` undo the slicing for files written by one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit._core.validation import InvalidParameterError
from moekit.nn.dispatch import DispatchPlan, combine
from moekit.nn.experts import ExpertBank
from moekit.nn.fused import fused_moe

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "CollectiveError",
    "ExpertShard",
    "all_to_all",
    "checked_collective",
    "distributed_from_env",
    "expert_parallel_experts",
    "gather_experts",
    "gathered_state",
    "init_distributed",
    "make_shard",
    "shard_experts",
    "sharded_parameters",
    "slice_expert_state",
]

DEFAULT_TIMEOUT_S = 300.0
"""Seconds a collective waits for the other processes before failing (see
:func:`init_distributed`)."""


class CollectiveError(RuntimeError):
    """A collective failed: another process of the group died or did not answer in time."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def checked_collective(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run the collective ``fn(*args, **kwargs)``; a backend failure becomes one clear
    :class:`CollectiveError` naming ``what`` and this process.

    gloo raises ``Connection closed by peer`` at once when a peer process dies, and a
    timeout error when one stops answering; NCCL raises (or aborts the process, with
    ``TORCH_NCCL_ASYNC_ERROR_HANDLING``) after the group's timeout.
    """
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:  # DistBackendError and gloo's errors subclass it
        raise CollectiveError(
            f"process {_rank()}: the {what} failed, most likely because another process "
            "of the group died or stopped responding within the process group's timeout; "
            f"see the other processes' logs. Backend error: {exc}"
        ) from exc


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
    if not (dist.is_available() and dist.is_initialized()):
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
        checked_collective(
            "expert-parallel all-to-all",
            dist.all_to_all_single,
            out,
            x.contiguous(),
            output_splits,
            input_splits,
            group=group,
        )
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
    checked_collective("exchange of token counts", dist.all_to_all_single, received, sent,
                group=shard.group)  # fmt: skip
    return received.view(shard.world_size, shard.n_local)


def _local_experts(x: Tensor, order: Tensor, counts: list[int], bank: ExpertBank) -> Tensor:
    """Local expert ``j`` on received rows ``x[order]`` of its slice; rows in received order."""
    if x.shape[0] == 0:
        # still part of the graph, so that the backward exchange runs here too; the
        # weights get zero gradients, as the experts of one full bank would
        return x * 0.0 + 0.0 * (bank.w_in.sum() + bank.w_out.sum())
    impl = bank.resolve_impl(x)
    if impl in ("fused", "grouped_mm"):
        ones = x.new_ones(x.shape[0])  # weights are applied after the return trip
        return fused_moe(x, bank.w_in, bank.w_out, ones, order, counts, bank.activation,
                         grouped=impl == "grouped_mm")  # fmt: skip
    y_sorted = bank(x.index_select(0, order), counts)  # (R, d) grouped by local expert
    return combine(y_sorted, order, x.shape[0])  # (R, d) back in received order


def expert_parallel_experts(
    x: Tensor, plan: DispatchPlan, bank: ExpertBank, shard: ExpertShard
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
    y_recv = _local_experts(x_recv, order, received.sum(0).tolist(), bank)  # (R, d)
    y_back = all_to_all(y_recv, input_splits, output_splits, shard.group)  # (A, d) plan order
    y_back = y_back * plan.weight[:, None].to(y_back.dtype)  # (A, d) weighted
    return combine(y_back, plan.token, n_tokens)  # (T, d)


# ------------------------------------------------------------------ sharding
def _moe_layers(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from moekit.nn.layer import MoE  # the layer imports this module

    for name, m in module.named_modules():
        if isinstance(m, MoE):
            yield name, m


def shard_bank(bank: ExpertBank, shard: ExpertShard) -> None:
    """Keep the local experts of a full bank, in place (new parameters, sliced)."""
    if bank.n_experts != shard.n_experts:
        raise ValueError(f"the bank holds {bank.n_experts} experts, not all {shard.n_experts}.")
    with torch.no_grad():
        bank.w_in = nn.Parameter(bank.w_in[shard.local].clone())  # (E/W, d, n*H)
        bank.w_out = nn.Parameter(bank.w_out[shard.local].clone())  # (E/W, H, d)
    bank.n_experts = shard.n_local


def shard_experts(module: nn.Module, group: Any = None) -> nn.Module:
    """Make every :class:`~moekit.nn.MoE` in ``module`` expert parallel over ``group``.

    Each layer keeps its local ``E / W`` experts, sliced from the full weights it holds,
    which must be the same on every process (build the model from one seed, or
    broadcast it first). Build the optimiser afterwards: the expert parameters are new.

    Parameters
    ----------
    module : torch.nn.Module
        A layer or a model holding layers; changed in place.
    group : ProcessGroup, optional
        Default: the whole world.

    Returns
    -------
    module
    """
    group = dist.group.WORLD if group is None else group
    for _, layer in _moe_layers(module):
        if layer.expert_parallel is not None:
            raise ValueError("shard_experts: a MoE layer is already expert parallel.")
        shard = make_shard(group, layer.n_experts, "shard_experts")
        shard_bank(layer.experts, shard)
        layer.expert_parallel = shard
    return module


def sharded_parameters(module: nn.Module) -> dict[str, ExpertShard]:
    """Names (as in ``module.named_parameters()``) of the sharded expert weights."""
    out = {}
    for name, layer in _moe_layers(module):
        if layer.expert_parallel is not None:
            prefix = f"{name}." if name else ""
            for w in ("w_in", "w_out"):
                out[f"{prefix}experts.{w}"] = layer.expert_parallel
    return out


def _gather(t: Tensor, shard: ExpertShard) -> Tensor:
    parts = [torch.empty_like(t) for _ in range(shard.world_size)]
    checked_collective("gathering of expert shards", dist.all_gather, parts, t.contiguous(),
                group=shard.group)  # fmt: skip
    return torch.cat(parts, 0)


def gathered_state(
    module: nn.Module, tensors: dict[str, Tensor], prefix: str = ""
) -> dict[str, Tensor]:
    """``tensors`` with every sharded expert tensor replaced by the full one.

    A collective: every process of the groups must call it. Works for the weights
    (``module.state_dict()``) and for anything shaped like them, such as AdamW's
    moments keyed by parameter name.

    Parameters
    ----------
    module : torch.nn.Module
    tensors : dict of str to Tensor
        Keyed by parameter name, optionally behind ``prefix`` (e.g. ``'optim.'``) and
        with a suffix after it (``'.exp_avg'``); other entries pass unchanged.
    prefix : str, default=''
    """
    shards = sharded_parameters(module)
    out = dict(tensors)
    for key in sorted(tensors):  # the same order on every process
        name = _param_of(key, prefix, shards)
        if name is not None and tensors[key].dim() > 0:
            out[key] = _gather(tensors[key], shards[name])
    return out


def slice_expert_state(
    module: nn.Module, tensors: dict[str, Tensor], prefix: str = ""
) -> dict[str, Tensor]:
    """The inverse of :func:`gathered_state`: full expert tensors cut to this process's shard."""
    shards = sharded_parameters(module)
    out = dict(tensors)
    for key, t in tensors.items():
        name = _param_of(key, prefix, shards)
        if name is not None and t.dim() > 0:
            out[key] = t[shards[name].local].clone()
    return out


def _param_of(key: str, prefix: str, shards: dict[str, ExpertShard]) -> str | None:
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix) :]
    for name in shards:
        if rest == name or rest.startswith(name + "."):
            return name
    return None


def gather_experts(module: nn.Module) -> nn.Module:
    """Make every expert-parallel layer in ``module`` whole again, in place (a collective).

    Returns
    -------
    module
        Each process then holds the full model, as one process would.
    """
    for _, layer in _moe_layers(module):
        shard = layer.expert_parallel
        if shard is None:
            continue
        bank = layer.experts
        with torch.no_grad():
            bank.w_in = nn.Parameter(_gather(bank.w_in.detach(), shard))
            bank.w_out = nn.Parameter(_gather(bank.w_out.detach(), shard))
        bank.n_experts = shard.n_experts
        layer.expert_parallel = None
    return module


# ------------------------------------------------------------------ process groups
def init_distributed(
    timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None
) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment.

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (set by
    ``torchrun``); with ``WORLD_SIZE`` unset or 1 it does nothing. The backend is NCCL
    when CUDA is available, else gloo.

    Parameters
    ----------
    timeout_s : float, default=DEFAULT_TIMEOUT_S
        How long a collective waits for the others before it fails: a process that
        dies or hangs makes the rest fail with an error within this time, never hang.
    backend : str, optional

    Returns
    -------
    rank, world_size : int
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return _rank(), dist.get_world_size() if dist.is_initialized() else 1
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


@contextlib.contextmanager
def distributed_from_env(timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[tuple[int, int]]:
    """:func:`init_distributed` for a ``with`` block; leaves the group it made at the end."""
    made = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    rank, world = init_distributed(timeout_s)
    try:
        yield rank, world
    finally:
        if made and dist.is_initialized():
            dist.destroy_process_group()
