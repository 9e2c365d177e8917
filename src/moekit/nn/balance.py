"""Balancing losses over other scopes than the batch, and the routing entropy.

The Switch loss of :func:`~moekit.nn.functional.load_balancing_loss`,
:math:`L = E \\sum_e f_e P_e`, counts the load ``f`` over one forward pass. Two
variants of today's models count it elsewhere:

- *sequence-wise* (DeepSeek-V3, 2024, eqs. 17-20): ``f`` and ``P`` per sequence, the
  loss averaged over sequences, so that no single sequence piles onto a few experts
  (a weak complement to the bias rule of the 'sigmoid_bias' router);
- *global-batch* (Qwen: Qiu et al. 2025, "Demystifying the load balancing loss"):
  ``f`` summed over every process of the data-parallel group, ``P`` local, so that
  balance is asked of the global batch, where experts may specialise by domain,
  rather than of each small micro-batch.

The scores ``P`` averages are a distribution over experts per token: the softmax of
the logits, or for sigmoid routers the sigmoid scores divided by their sum.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from moekit._core.distributed import collective, is_initialized, nbytes
from moekit.nn import functional as MF

__all__ = [
    "BALANCE_SCOPES",
    "global_balance_loss",
    "routing_entropy",
    "score_distribution",
    "sequence_balance_loss",
]

BALANCE_SCOPES = ("batch", "sequence", "global")
"""Where the layer counts the load of its balancing loss."""


def score_distribution(logits: Tensor, kind: str = "softmax") -> Tensor:
    """Each token's scores as a distribution over experts, of shape (T, E).

    ``kind='softmax'``: :math:`\\mathrm{softmax}(z_t)`; ``'sigmoid'``:
    :math:`\\sigma(z_{te}) / \\sum_{e'} \\sigma(z_{te'})` (DeepSeek-V3's :math:`s'`).
    """
    if kind == "sigmoid":
        scores = logits.sigmoid()
        return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return logits.softmax(dim=-1)


def sequence_balance_loss(probs: Tensor, indices: Tensor, n_experts: int, seq_len: int) -> Tensor:
    """The Switch loss per sequence, averaged over sequences (DeepSeek-V3).

    .. math::

        L = \\frac{1}{B} \\sum_{b=1}^{B} E \\sum_e f_{be} P_{be}, \\qquad
        f_{be} = \\frac{1}{S k} \\sum_{t \\in b, j} [e_{tj} = e], \\qquad
        P_{be} = \\frac{1}{S} \\sum_{t \\in b} p_{te}.

    Parameters
    ----------
    probs : Tensor of shape (B * S, E)
        :func:`score_distribution` of the logits, tokens sequence by sequence.
    indices : Tensor of shape (B * S, k)
    n_experts : int
    seq_len : int
        ``S``; must divide the number of tokens.

    Returns
    -------
    Tensor
        Scalar; 1 when every sequence is balanced and its scores uniform.
    """
    n_tokens, top_k = indices.shape
    if n_tokens == 0:
        return probs.sum() * 0.0
    n_seq = n_tokens // seq_len
    flat = indices.reshape(n_seq, seq_len * top_k)  # (B, S*k)
    counts = torch.zeros(n_seq, n_experts, dtype=probs.dtype, device=probs.device)
    counts = counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=probs.dtype))  # (B, E)
    f = counts / (seq_len * top_k)  # (B, E), no gradient
    p = probs.reshape(n_seq, seq_len, n_experts).mean(dim=1)  # (B, E)
    return n_experts * (f * p).sum(dim=-1).mean()


def global_balance_loss(probs: Tensor, indices: Tensor, n_experts: int) -> Tensor:
    """The Switch loss with the load ``f`` counted over all processes (Qwen).

    :math:`L = E \\sum_e f^{\\mathrm{global}}_e P_e`: the counts are all-reduced over
    the default process group when :mod:`torch.distributed` is initialised (every
    process must then call it), ``P`` stays local so that each process's gradient is
    its own. In one process it equals
    :func:`~moekit.nn.functional.load_balancing_loss`.

    Parameters
    ----------
    probs : Tensor of shape (T, E)
    indices : Tensor of shape (T, k)
    n_experts : int

    Returns
    -------
    Tensor
        Scalar.
    """
    counts = MF.expert_counts(indices, n_experts)  # (E,) int64
    if is_initialized():
        collective("all-reduce of the expert loads", dist.all_reduce, counts,
                   n_bytes=nbytes(counts))  # fmt: skip
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    f = counts.to(probs.dtype) / counts.sum().clamp_min(1)  # (E,), no host sync
    return n_experts * (f * probs.mean(dim=0)).sum()


def routing_entropy(probs: Tensor) -> Tensor:
    """Mean entropy of the tokens' score distributions, in nats, of shape ().

    :math:`\\frac{1}{T} \\sum_t -\\sum_e p_{te} \\log p_{te}`: ``log E`` for a router
    that cannot tell experts apart, 0 for one certain of a single expert.
    """
    if probs.shape[0] == 0:
        return probs.new_tensor(float("nan"))
    return -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1).mean()
