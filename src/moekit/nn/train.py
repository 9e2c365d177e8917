"""A minimal training loop for :class:`MoETransformer`, behind ``moekit lm train``.

Byte-level tokens (vocabulary 256, so any text trains without a tokenizer), random
windows of the corpus as batches, AdamW with weight decay on matrices only (as in
nanoGPT), a linear warm-up then cosine decay of the learning rate, gradient
clipping, and the held-out loss every ``eval_every`` steps on the corpus's last
``val_fraction``. The loss minimised is the model's: cross-entropy plus the MoE
layers' auxiliary losses.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from moekit.nn.transformer import MoETransformer

__all__ = ["TrainConfig", "TrainLog", "byte_tokens", "decode_bytes", "train_lm"]


@dataclass
class TrainConfig:
    """Settings of :func:`train_lm`."""

    steps: int = 500
    batch_size: int = 16
    learning_rate: float = 3e-3
    weight_decay: float = 0.1
    warmup: int = 50  # steps of linear warm-up
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_batches"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive int; got {getattr(self, name)!r}.")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5); got {self.val_fraction!r}.")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive; got {self.learning_rate!r}.")


@dataclass
class TrainLog:
    """Losses during training: the train loss every step, held-out loss at evaluations."""

    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    tokens_per_expert: list[list[float]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def byte_tokens(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a long tensor of token ids in [0, 256)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode_bytes(ids) -> str:
    """Text of byte token ids (invalid UTF-8 sequences are replaced)."""
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def _batch(data: torch.Tensor, block: int, size: int, gen: torch.Generator):
    start = torch.randint(0, len(data) - block - 1, (size,), generator=gen)
    rows = torch.stack([data[s : s + block + 1] for s in start.tolist()])  # (B, T + 1)
    return rows[:, :-1], rows[:, 1:]


def _optimizer(model: MoETransformer, cfg: TrainConfig) -> torch.optim.AdamW:
    # decay matrices (weights, embeddings), not biases, norms or router biases
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    decay = [p for p in params.values() if p.dim() >= 2]
    rest = [p for p in params.values() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": rest, "weight_decay": 0.0}]  # fmt: skip
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.95))


def _lr(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.learning_rate * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.learning_rate * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


@torch.no_grad()
def _evaluate(model, data, cfg, gen) -> float:
    model.eval()
    block = model.config.block_size
    losses = [float(model(*_batch(data, block, cfg.batch_size, gen))[1])
              for _ in range(cfg.eval_batches)]  # fmt: skip
    model.train()
    return sum(losses) / len(losses)


def train_lm(
    model: MoETransformer, text: str, config: TrainConfig | None = None, verbose: int = 1
) -> TrainLog:
    """Train ``model`` on the bytes of ``text``; returns the loss log.

    Parameters
    ----------
    model : MoETransformer
        With ``vocab_size`` 256 (bytes).
    text : str
        The corpus; it needs more than ``block_size + 1`` bytes in each of its train
        and held-out parts.
    config : TrainConfig, optional
    verbose : int, default=1
        1: a progress bar and a line per evaluation; 0: silent.

    Returns
    -------
    TrainLog
    """
    cfg = config or TrainConfig()
    if model.config.vocab_size != 256:
        raise ValueError(
            f"train_lm trains on bytes: the model needs vocab_size=256, not "
            f"{model.config.vocab_size}."
        )
    data = byte_tokens(text)
    split = int(len(data) * (1.0 - cfg.val_fraction))
    train, val = data[:split], data[split:]
    block = model.config.block_size
    if min(len(train), len(val)) <= block + 1:
        raise ValueError(
            f"the corpus is too short: {len(data)} bytes leave fewer than block_size + 2 = "
            f"{block + 2} bytes for training or validation; use a longer corpus or a smaller "
            "block_size."
        )
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # initial weights were drawn by the caller; dropout here
    opt = _optimizer(model, cfg)
    log = TrainLog()
    model.train()
    bar = tqdm(range(cfg.steps), desc="training", disable=verbose < 1, file=sys.stderr,
               dynamic_ncols=True)  # fmt: skip
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg)
        x, y = _batch(train, block, cfg.batch_size, gen)  # (B, T), (B, T)
        _, loss = model(x, targets=y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        log.step.append(step)
        log.train_loss.append(loss.item())
        if step % cfg.eval_every == 0 or step == cfg.steps - 1:
            val_loss = _evaluate(model, val, cfg, gen)
            log.eval_step.append(step)
            log.val_loss.append(val_loss)
            layers = model.moe_layers()
            if layers:
                log.tokens_per_expert.append(layers[0].stats.tokens_per_expert.tolist())
            bar.set_postfix(train=f"{loss.item():.3f}", val=f"{val_loss:.3f}")
            if verbose >= 1:
                bar.write(f"step {step:5d}: train loss {loss.item():.4f}, held-out loss "
                          f"{val_loss:.4f}", file=sys.stderr)  # fmt: skip
    model.eval()
    model.training_log = log.as_dict()
    return log
