"""Whole models expert parallel: shard every MoE layer, gather the shards again.

:func:`shard_experts` makes every :class:`~moekit.nn.MoE` inside a model expert
parallel (:mod:`moekit.nn.parallel`), keeping each process's ``E / W`` experts of the
full weights. Weights are made in full from the seed and then sliced (as megablocks
does), so one seed gives the same model at any parallel degree; :func:`gather_experts`
and :func:`gathered_state` undo the slicing for files written by one process, and
:func:`slice_expert_state` cuts full tensors (weights, AdamW's moments) to a shard.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit._core.distributed import collective, nbytes
from moekit.nn.layer import MoE
from moekit.nn.parallel import ExpertShard, make_shard, shard_bank

__all__ = [
    "gather_experts",
    "gathered_state",
    "shard_experts",
    "sharded_parameters",
    "slice_expert_state",
]


def _moe_layers(module: nn.Module) -> Iterator[tuple[str, MoE]]:
    for name, m in module.named_modules():
        if isinstance(m, MoE):
            yield name, m


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
    collective("gathering of expert shards", dist.all_gather, parts, t.contiguous(),
               group=shard.group, n_bytes=nbytes(t))  # fmt: skip
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
