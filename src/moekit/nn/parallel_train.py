"""Data plus expert parallel training of :class:`MoETransformer` under ``torchrun``.

Every process of the default group holds a full copy of the dense parameters
(embeddings, attention, norms, routers, shared experts) and ``E / W`` experts of each
MoE layer (:mod:`moekit.nn.parallel`, sharded by :mod:`moekit.nn.sharding`), and
trains on its own rows of each step's batch. Per optimiser step:

- the dense gradients are all-reduced (one flat all-reduce) and divided by ``W``:
  each process's loss is the mean over its own rows, so the mean of the processes'
  gradients is the gradient of the mean loss over the whole batch;
- the expert gradients need no all-reduce (the exchange's backward already summed
  the contributions of every process's tokens into the process holding the expert)
  but the same division by ``W``;
- the global gradient norm for clipping adds the dense part once and the expert
  shards' parts all-reduced, so that every process clips by the same factor, the one
  a single process holding everything would use;
- the logged losses and the expert loads are all-reduced once, in one tensor; the
  routers' bias statistics are all-reduced by :meth:`MoE.update_bias
  <moekit.nn.MoE.update_bias>` (over the default group, as here).

With dropless token-choice routing and no auxiliary loss, a step on ``W`` processes
thus equals a step of one process on the concatenated batch (up to rounding). The
balancing losses are computed per process on its own tokens, as the Switch
Transformer computes them per device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit._core.distributed import collective, get_world_size, nbytes
from moekit.nn.parallel import ExpertShard
from moekit.nn.sharding import gather_experts, shard_experts, sharded_parameters

__all__ = ["DataParallel"]


@dataclass
class DataParallel:
    """This process's place in a data + expert parallel run.

    Attributes
    ----------
    rank, world_size : int
        In the default group.
    sharded : dict of str to ExpertShard
        Names of the expert parameters held in part.
    owns_shards : bool
        Whether :meth:`setup` sharded the model (and :meth:`finish` makes it whole).
    """

    rank: int
    world_size: int
    sharded: dict[str, ExpertShard]
    owns_shards: bool

    @classmethod
    def setup(cls, model: nn.Module) -> DataParallel | None:
        """Broadcast rank 0's model and shard its experts; None outside a group of 2+.

        A collective: every process calls it with a model of the same configuration.
        """
        if get_world_size() == 1:  # no group, or one process
            return None
        world = dist.get_world_size()
        owns = not sharded_parameters(model)
        if not owns:
            groups = {s.world_size for s in sharded_parameters(model).values()}
            if groups != {world}:
                raise ValueError(
                    "train_lm shards the experts over the whole default group; got a model "
                    f"sharded over {sorted(groups)} processes in a world of {world}."
                )
        skip = set(sharded_parameters(model))  # distinct on every process
        with torch.no_grad():  # rank 0's weights are the model, as DDP does
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                if name not in skip:
                    collective("broadcast of the model", dist.broadcast, t.data, 0,
                               n_bytes=nbytes(t))  # fmt: skip
        if owns:
            shard_experts(model)
        return cls(dist.get_rank(), world, sharded_parameters(model), owns)

    def finish(self, model: nn.Module) -> None:
        """Make the experts whole again on every process if :meth:`setup` split them."""
        if self.owns_shards:
            gather_experts(model)

    def rows(self, batch: Tensor) -> Tensor:
        """This process's rows of a global batch of shape (A, W*B, ...): (A, B, ...)."""
        return batch.unflatten(1, (self.world_size, -1))[:, self.rank]

    def sync_gradients(self, model: nn.Module) -> None:
        """Average the dense gradients over the processes and scale the expert ones.

        A missing gradient counts as zero, so that every process reduces the same
        tensors and AdamW steps every parameter as one process holding the whole
        batch would (where one expert tensor gets gradients from any token).
        """
        dense = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if name in self.sharded:
                p.grad.div_(self.world_size)
            else:
                dense.append(p.grad)
        if dense:
            flat = torch.cat([g.reshape(-1) for g in dense])
            collective("all-reduce of the gradients", dist.all_reduce, flat, n_bytes=nbytes(flat))
            flat.div_(self.world_size)
            for g, part in zip(dense, flat.split([g.numel() for g in dense]), strict=True):
                g.copy_(part.view_as(g))

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Clip by the norm of the whole model's gradient, expert shards included."""
        dense, expert = [], []
        for name, p in model.named_parameters():
            if p.grad is not None:
                (expert if name in self.sharded else dense).append(p.grad)
        expert_sq = _squared_norm(expert)
        collective("all-reduce of the gradient norm", dist.all_reduce, expert_sq,
                   n_bytes=nbytes(expert_sq))  # fmt: skip
        norm = math.sqrt(float(_squared_norm(dense) + expert_sq))
        scale = max_norm / (norm + 1e-6)  # as torch.nn.utils.clip_grad_norm_
        if scale < 1.0:
            for g in dense + expert:
                g.mul_(scale)
        return norm

    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum ``t`` over the processes, in place; returns it."""
        collective("all-reduce of the training statistics", dist.all_reduce, t, n_bytes=nbytes(t))
        return t


def _squared_norm(grads: list[Tensor]) -> Tensor:
    """:math:`\\sum \\|g\\|^2` over ``grads``, in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for g in grads:
        total += g.double().pow(2).sum()
    return total
