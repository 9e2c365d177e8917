"""The sigmoid router with a load-balancing bias of DeepSeek-V3 (auxiliary-loss-free)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from moekit._core.distributed import collective, is_initialized, nbytes
from moekit.nn import functional as MF
from moekit.nn._checks import _under_vmap
from moekit.nn.routers import Router, Routing, resolve_normalize

__all__ = ["SigmoidBiasRouter"]


class SigmoidBiasRouter(Router):
    """Auxiliary-loss-free routing of DeepSeek-V3 (2024, section 2.1.2).

    Scores :math:`s_{te} = \\sigma(x_t W_r^T)`; the top ``k`` experts are chosen on
    :math:`s_{te} + b_e`, but weighted by the bias-free scores, normalised:
    :math:`w_{te} = s_{te} / \\sum_{top-k} s_{te'}` (for ``k = 1`` the raw score, unless
    ``normalize=True``). The bias ``b`` is not learnt by gradient. Training forwards
    count the tokens each expert gets; :meth:`update_bias`, called once per optimiser
    step (after ``optimizer.step()``; :func:`~moekit.nn.update_router_biases` calls it
    for every layer of a model), applies

    .. math::

        b_e \\leftarrow b_e + \\gamma\\, \\mathrm{sign}(\\bar c - c_e),

    where :math:`c_e` is the count of expert ``e`` since the last update (summed over the
    processes of the default group when :mod:`torch.distributed` is initialised) and
    :math:`\\bar c` the mean, so overloaded experts become less attractive. There is
    no balancing loss.

    Why not in ``forward``: a forward that moved the bias would route differently when
    activation checkpointing recomputes it (torch refuses the mismatch with a
    ``CheckpointError``), and it would move the bias once per micro-batch under
    gradient accumulation. The counts gathered in forward stay harmless: a recomputed
    forward counts its tokens again, but when every forward of the step is recomputed
    alike all counts double, and the update depends only on the sign of
    :math:`\\bar c - c_e`, which doubling does not change.

    The step must stay small next to the gaps between the scores of one token: with
    ``gamma = 1e-2`` on a small task the scores shrank below the step during
    training and the choice flipped between expert groups every step, while the
    paper's ``1e-3`` balanced the load (see ``tests/nn/test_moe_training.py``).

    Parameters
    ----------
    d_model, n_experts, top_k : int
        See :class:`Router`.
    bias_update_rate : float, default=1e-3
        ``gamma``.
    center_bias : bool, default=False
        Subtract the mean of the step from every expert, so that the biases keep mean
        zero. Adding one number to every bias changes no top-k choice, so this changes
        no routing decision; it only stops the biases drifting together (when more
        experts are under- than overloaded every step moves them all up), which keeps
        them where a low-precision buffer still resolves a step of ``gamma``.
        torchtitan centres; the DeepSeek-V3 paper does not, hence the default.
    normalize : bool or None, default=None
        Renormalise the kept scores to sum to one; None: for ``k > 1`` only.
    n_group, topk_group : int or None, default=None
        Group-limited choice on :math:`s + b` (DeepSeek-V3 keeps ``topk_group=4`` of
        ``n_group=8`` groups), see :class:`~moekit.nn.Router`.

    Attributes
    ----------
    bias : Tensor of shape (E,)
        :math:`b`, saved with the model.
    pending_load : Tensor of shape (E,)
        int64 counts since the last update (not saved with the model).
    """

    scores = "sigmoid"

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        top_k: int,
        *,
        bias_update_rate: float = 1e-3,
        center_bias: bool = False,
        normalize: bool | None = None,
        n_group: int | None = None,
        topk_group: int | None = None,
    ) -> None:
        super().__init__(d_model, n_experts, top_k, n_group=n_group, topk_group=topk_group)
        self.bias_update_rate, self.center_bias = bias_update_rate, center_bias
        self.normalize = resolve_normalize(normalize, top_k, type(self).__name__)
        self.register_buffer("bias", torch.zeros(n_experts))
        # an integer buffer: Module.to(dtype) leaves it exact whatever the model's dtype
        self.register_buffer(
            "pending_load", torch.zeros(n_experts, dtype=torch.long), persistent=False
        )

    def forward(self, x: Tensor) -> Routing:
        logits = self.logits(x)  # (T, E)
        scores = logits.sigmoid()  # (T, E)
        choice = self.limit_to_groups(scores.detach() + self.bias.to(scores.dtype))  # (T, E)
        indices = choice.topk(self.top_k, dim=-1).indices  # (T, k)
        weights = scores.gather(1, indices)  # (T, k)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        if self.training and self.bias_update_rate > 0:
            self.record_load(indices)
        return Routing(weights, indices, logits, logits.new_zeros(()))

    @torch.no_grad()
    def record_load(self, indices: Tensor) -> None:
        """Add the loads of ``indices`` of shape (T, k) to :attr:`pending_load`.

        Skipped under ``vmap``, where ``indices`` holds one routing per vmapped sample
        and no single count exists to add.
        """
        if not _under_vmap():
            self.pending_load += MF.expert_counts(indices, self.n_experts)

    @torch.no_grad()
    def update_bias(self) -> None:
        """One step of the bias rule from the loads recorded since the last call.

        All-reduces the counts over the default process group when
        :mod:`torch.distributed` is initialised, so every process takes the same step
        (every process must call it, as with any collective); then clears them. A
        step with no recorded tokens leaves the bias as it is.
        """
        load = self.pending_load
        if is_initialized():  # sum over processes, in place
            collective("all-reduce of the router loads", dist.all_reduce, load,
                       n_bytes=nbytes(load))  # fmt: skip
        # sign(mean - c_e) = sign(sum - E c_e), exact in integers
        step = self.bias_update_rate * torch.sign(load.sum() - self.n_experts * load)  # (E,)
        if self.center_bias:
            step = step - step.mean()
        self.bias += step.to(self.bias.dtype)
        load.zero_()

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, bias_update_rate={self.bias_update_rate}, "
            f"center_bias={self.center_bias}, normalize={self.normalize}"
        )
