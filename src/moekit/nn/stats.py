"""Routing statistics of a MoE layer's last forward pass."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from moekit.nn.balance import routing_entropy, score_distribution

__all__ = ["MoEStats"]


@dataclass
class MoEStats:
    """Routing statistics of the last forward pass.

    The numbers stay tensors until they are read, so that a forward pass neither
    waits for the device nor breaks a ``torch.compile`` graph to compute them.

    Attributes
    ----------
    tokens_per_expert : Tensor of shape (E,)
        Assignments the router sent to each expert (before any capacity drop).
    dropped : Tensor or float
        See :attr:`dropped_fraction`.
    logits : Tensor of shape (T, E) or None
        The router logits, detached (for :attr:`router_entropy`).
    scores : {'softmax', 'sigmoid'}
        How the router turns logits into scores (see
        :func:`~moekit.nn.balance.score_distribution`).
    dropped_fraction : float
        Token choice: fraction of the ``T * k`` assignments dropped for capacity;
        expert choice: fraction of tokens no expert picked. 0.0 when dropless.
    balance : float
        ``max(tokens_per_expert) / mean(tokens_per_expert)``: 1.0 is perfect balance,
        ``E / k`` means every token went to the same experts (1.0 for an empty batch).
    dead_fraction : float
        Fraction of the experts that received no token: 0.0 when every expert works.
    router_entropy : float
        Mean entropy of the tokens' score distributions in nats, between 0 (every
        token certain of one expert) and ``log E`` (no preference); NaN without
        tokens.
    """

    tokens_per_expert: Tensor
    dropped: Tensor | float = 0.0
    logits: Tensor | None = None
    scores: str = "softmax"

    @property
    def dropped_fraction(self) -> float:
        return float(self.dropped)

    @property
    def balance(self) -> float:
        counts = self.tokens_per_expert.float()
        mean = float(counts.mean()) if counts.numel() else 0.0
        return float(counts.max()) / mean if mean > 0 else 1.0

    @property
    def dead_fraction(self) -> float:
        counts = self.tokens_per_expert
        return float((counts == 0).float().mean()) if counts.numel() else 0.0

    @property
    def router_entropy(self) -> float:
        if self.logits is None:
            return float("nan")
        return float(routing_entropy(score_distribution(self.logits.float(), self.scores)))
