"""Settings and log of :func:`~moekit.nn.train.train_lm`.

:class:`TrainConfig` holds the recipe (steps, batch, AdamW, schedule, evaluation and
checkpoint cadence), checked with the one error template; :class:`TrainLog` what a
run recorded, as a checkpoint stores it; :data:`PRESETS` the two recipes of
``moekit lm train --config``.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field

from moekit._core.validation import Interval, validate_params
from moekit.nn._checks import NON_NEGATIVE_INT, POSITIVE_INT, check_finite_params

__all__ = ["PRESETS", "TrainConfig", "TrainLog"]

PRESETS: dict[str, tuple[dict, dict]] = {
    # (TransformerConfig fields, TrainConfig fields). 'tiny' trains in minutes on two
    # CPU cores; 'small' is the same recipe four times wider in tokens and width.
    "tiny": (
        dict(block_size=64, n_layer=2, n_head=4, d_model=64, d_hidden=128, n_experts=8, top_k=2),
        dict(steps=1000, batch_size=16, learning_rate=3e-3, warmup=50, eval_every=100),
    ),
    "small": (
        dict(block_size=128, n_layer=4, n_head=4, d_model=128, d_hidden=256, n_experts=8, top_k=2),
        dict(steps=5000, batch_size=32, learning_rate=2e-3, warmup=200, eval_every=250),
    ),
}

_CONSTRAINTS = {
    "steps": [POSITIVE_INT],
    "batch_size": [POSITIVE_INT],
    "grad_accum": [POSITIVE_INT],
    "learning_rate": [Interval(numbers.Real, 0, None, closed="neither")],
    "weight_decay": [Interval(numbers.Real, 0, None, closed="left")],
    "warmup": [NON_NEGATIVE_INT],
    "grad_clip": [Interval(numbers.Real, 0, None, closed="neither")],
    "eval_every": [POSITIVE_INT],
    "eval_batches": [POSITIVE_INT],
    "val_fraction": [Interval(numbers.Real, 0, 0.5, closed="neither")],
    "checkpoint_every": [POSITIVE_INT],
    "seed": [NON_NEGATIVE_INT],
}


@dataclass
class TrainConfig:
    """Settings of :func:`train_lm`, checked with the one error template."""

    steps: int = 1000  # optimiser steps
    batch_size: int = 16  # windows per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    learning_rate: float = 3e-3  # peak; the cosine decays it to a tenth
    weight_decay: float = 0.1
    warmup: int = 50  # steps of linear warm-up
    grad_clip: float = 1.0  # on the global gradient norm
    eval_every: int = 100
    eval_batches: int = 8  # held-out batches per evaluation, at fixed places
    val_fraction: float = 0.1  # the corpus's last bytes, never trained on
    checkpoint_every: int = 100
    seed: int = 0  # batch order (and dropout); the caller seeds the initial weights

    def __post_init__(self) -> None:
        params = dataclasses.asdict(self)
        validate_params(type(self).__name__, params, _CONSTRAINTS)
        check_finite_params(
            type(self).__name__, params, ("learning_rate", "weight_decay", "grad_clip")
        )


@dataclass
class TrainLog:
    """What happened during training.

    ``train_loss`` and ``val_loss`` are the language-model cross-entropy in nats per
    byte, without the auxiliary losses, which ``aux_loss`` holds apart (training).
    ``tokens_per_expert[i][l][e]`` counts the assignments of MoE layer ``l`` to
    expert ``e`` during the training steps up to evaluation ``i``, since the one before.
    """

    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    aux_loss: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    tokens_per_expert: list[list[list[float]]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
