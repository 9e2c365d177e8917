"""Training loop for :class:`MoETransformer`, behind ``moekit lm train``.

Byte-level tokens (vocabulary 256, so any text trains without a tokenizer), random
windows of the corpus as batches, AdamW with weight decay on matrices only (as in
nanoGPT), a linear warm-up then cosine decay of the learning rate, gradient
clipping, and the held-out loss every ``eval_every`` steps on the corpus's last
``val_fraction``. The loss minimised is cross-entropy plus the MoE layers'
auxiliary losses; the log keeps the two apart, so that the language-model loss of
training and of held-out text is the plain cross-entropy (nats per byte).

Checkpoints (:mod:`moekit.nn.checkpoint`: safetensors and JSON, no pickle) hold the
weights, AdamW's moments, the global RNG state and the log, and are renamed into
place, so that a run killed at any moment leaves the previous checkpoint whole. The
batch of step ``s`` is drawn from a generator seeded with ``(seed, s)``, so a
resumed run reads the same batches as an uninterrupted one without any data state.

Under ``torchrun`` (an initialised process group of ``W`` processes) training is
data plus expert parallel (:mod:`moekit.nn.parallel_train`): each process takes its
``batch_size`` rows of the step's ``W * batch_size`` windows and holds ``E / W``
experts of each MoE layer; process 0 writes the checkpoints (whole, the experts
gathered, so that any number of processes can resume them) and the progress bar.

The settings and the log are :mod:`moekit.nn.train_config`'s, the figure of a run
:mod:`moekit.nn.train_plot`'s; both are importable from here too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit._core.files import remove_partial_writes
from moekit.nn import layer as moe_layer
from moekit.nn.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from moekit.nn.parallel_train import DataParallel
from moekit.nn.sharding import slice_expert_state
from moekit.nn.train_config import PRESETS, TrainConfig, TrainLog
from moekit.nn.train_plot import plot_training
from moekit.nn.transformer import MoETransformer

__all__ = [
    "PRESETS",
    "TrainConfig",
    "TrainLog",
    "byte_tokens",
    "decode_bytes",
    "evaluate_lm",
    "plot_training",
    "resume_lm",
    "train_lm",
]


def byte_tokens(text: str) -> Tensor:
    """UTF-8 bytes of ``text`` as a long tensor of token ids in [0, 256)."""
    data = bytearray(text.encode("utf-8"))
    return torch.frombuffer(data, dtype=torch.uint8).long() if data else torch.zeros(0).long()


def decode_bytes(ids) -> str:
    """Text of byte token ids (invalid UTF-8 sequences are replaced)."""
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def _split(text: str, cfg: TrainConfig, block: int) -> tuple[Tensor, Tensor, str]:
    data = byte_tokens(text)
    split = int(len(data) * (1.0 - cfg.val_fraction))
    train, val = data[:split], data[split:]
    if min(len(train), len(val)) <= block + 1:
        raise ValueError(
            f"the corpus is too short: {len(data)} bytes leave fewer than block_size + 2 = "
            f"{block + 2} bytes for training or validation; use a longer corpus or a smaller "
            "block_size."
        )
    return train, val, hashlib.sha256(text.encode("utf-8")).hexdigest()


def _batch(
    data: Tensor, block: int, cfg: TrainConfig, step: int, dp: DataParallel | None = None
) -> tuple[Tensor, Tensor]:
    # the batch depends on (seed, step) only: a resumed run reads the same batches;
    # W processes draw the same W*B windows per micro-batch and take B each
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    world = 1 if dp is None else dp.world_size
    n = cfg.grad_accum * world * cfg.batch_size
    start = torch.randint(0, len(data) - block - 1, (n,), generator=gen)
    rows = torch.stack([data[s : s + block + 1] for s in start.tolist()])  # (A*W*B, T + 1)
    rows = rows.view(cfg.grad_accum, world * cfg.batch_size, block + 1)  # (A, W*B, T + 1)
    if dp is not None:
        rows = dp.rows(rows)  # (A, B, T + 1)
    return rows[..., :-1], rows[..., 1:]


def _optimizer(model: MoETransformer, cfg: TrainConfig) -> torch.optim.AdamW:
    # decay matrices (weights, embeddings), not biases or norms
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.95))


def _lr(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.learning_rate * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.learning_rate * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def _cross_entropy(model: MoETransformer, x: Tensor, y: Tensor) -> Tensor:
    logits, _ = model(x)  # (B, T, vocab); sets model.aux_loss
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def _lm_loss(model: MoETransformer, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return _cross_entropy(model, x, y), model.aux_loss


@torch.no_grad()
def evaluate_lm(
    model: MoETransformer,
    tokens: Tensor,
    batch_size: int = 16,
    n_windows: int | None = None,
    *,
    dp: DataParallel | None = None,
) -> float:
    """Mean next-byte cross-entropy (nats) of ``model`` on ``tokens``, without aux losses.

    Parameters
    ----------
    model : MoETransformer
    tokens : Tensor of shape (n,)
        Token ids, e.g. ``byte_tokens(text)``.
    batch_size : int, default=16
    n_windows : int, optional
        Windows of ``block_size`` at evenly spaced places; None reads all of
        ``tokens`` in windows that do not overlap. Divide by ``ln 2`` for bits per byte.
    dp : DataParallel, optional
        Under data + expert parallelism (``W`` processes): each forward takes
        ``W * batch_size`` windows, every process its part (maybe none: the last one
        can be short); all run the same number of forwards, since the
        expert-parallel layers exchange tokens in each. The sums are all-reduced, so
        every process gets the mean over all windows. A collective then.

    Returns
    -------
    float
    """
    block = model.config.block_size
    last = len(tokens) - block - 1
    if last < 0:
        raise ValueError(
            f"evaluate_lm needs more than block_size + 1 = {block + 1} tokens; got {len(tokens)}."
        )
    if n_windows is None:
        starts = torch.arange(0, last + 1, block)
    else:
        starts = torch.linspace(0, last, n_windows).long()
    world, rank = (1, 0) if dp is None else (dp.world_size, dp.rank)
    was_training = model.training
    model.eval()
    total = 0.0
    for chunk in starts.split(batch_size * world):
        part = chunk.tensor_split(world)[rank]  # the whole chunk on one process
        rows = torch.stack([tokens[s : s + block + 1] for s in part.tolist()]) if len(part) \
            else tokens.new_zeros(0, block + 1)  # fmt: skip
        ce = _cross_entropy(model, rows[:, :-1], rows[:, 1:])  # (B, T + 1) rows
        if len(part):  # the mean over no rows is NaN
            total += float(ce) * len(part)
    model.train(was_training)
    if dp is not None:
        total = float(dp.all_reduce(torch.tensor(total, dtype=torch.float64)))
    return total / len(starts)


def train_lm(
    model: MoETransformer,
    text: str,
    config: TrainConfig | None = None,
    verbose: int = 1,
    *,
    checkpoint: str | os.PathLike | None = None,
) -> TrainLog:
    """Train ``model`` on the bytes of ``text``; returns the log.

    Parameters
    ----------
    model : MoETransformer
        With ``vocab_size`` 256 (bytes). Seed torch before building it for
        reproducible initial weights.
    text : str
        The corpus; it needs more than ``block_size + 1`` bytes in each of its train
        and held-out parts.
    config : TrainConfig, optional
    verbose : int, default=1
        1: a progress bar (language-model loss, auxiliary loss, tokens/s and the
        worst layer's expert balance, max/mean load) and a line per evaluation;
        0: silent.
    checkpoint : path-like, optional
        Write a checkpoint there every ``checkpoint_every`` steps and at the end;
        :func:`resume_lm` continues from it.

    Returns
    -------
    TrainLog
        Also stored on the model as ``model.training_log`` (a dict).

    Notes
    -----
    Inside an initialised process group of ``W > 1`` processes (``torchrun``), every
    process calls it with the same model settings and corpus: process 0's weights are
    broadcast, the experts are sharded over the processes and gathered again at the
    end, so that every process returns the whole trained model. Only process 0 shows
    progress and writes the checkpoint. ``batch_size`` is per process.
    """
    cfg = config or TrainConfig()
    if model.config.vocab_size != 256:
        raise ValueError(
            f"train_lm trains on bytes: the model needs vocab_size=256, not "
            f"{model.config.vocab_size}."
        )
    train, val, digest = _split(text, cfg, model.config.block_size)
    if checkpoint is not None:
        if not Path(checkpoint).parent.is_dir():
            raise FileNotFoundError(f"checkpoint: folder {str(Path(checkpoint).parent)!r} does "
                                    "not exist.")  # fmt: skip
        remove_partial_writes(checkpoint)  # left by an earlier run that was killed
    dp = DataParallel.setup(model)  # None outside a process group
    rank = 0 if dp is None else dp.rank
    # dropout and noisy routers draw from the global generator, differently per process
    torch.manual_seed(cfg.seed + rank)
    opt = _optimizer(model, cfg)
    load = torch.zeros(len(model.moe_layers()), model.config.n_experts, dtype=torch.float64)
    run = _Run(model, opt, cfg, train, val, digest, TrainLog(), load, checkpoint, dp)
    return run.loop(0, verbose)


def resume_lm(
    checkpoint: str | os.PathLike, text: str, steps: int | None = None, verbose: int = 1
) -> tuple[MoETransformer, TrainLog]:
    """Continue the run saved in ``checkpoint`` to its last step (or to ``steps``).

    The weights, AdamW's state, the global RNG state and the log come from the
    file; the batches from the seed and the step. Resumed with the same corpus and
    step count, a run reaches the same losses as one never interrupted.

    Parameters
    ----------
    checkpoint : path-like
        Written by :func:`train_lm`; new checkpoints replace it.
    text : str
        The corpus of the run (checked against its SHA-256 in the file).
    steps : int, optional
        A new total step count (the learning-rate schedule follows it).
    verbose : int, default=1

    Returns
    -------
    model : MoETransformer
    log : TrainLog
        The whole run's log, the steps before the checkpoint included.
    """
    ck = load_checkpoint(checkpoint)
    try:
        cfg, log = TrainConfig(**ck.train), TrainLog(**ck.log)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{str(checkpoint)!r} has damaged training settings: {exc}") from exc
    n_evals = {len(log.eval_step), len(log.val_loss), len(log.tokens_per_expert)}
    if not (ck.step < cfg.steps and log.step == list(range(ck.step + 1)) and len(n_evals) == 1
            and len(log.train_loss) == len(log.aux_loss) == ck.step + 1):  # fmt: skip
        raise ValueError(f"{str(checkpoint)!r} has a log that does not end at its step {ck.step}.")
    if steps is not None:
        if steps <= ck.step:
            raise ValueError(
                f"The 'steps' parameter of resume_lm must be more than the {ck.step + 1} steps "
                f"the checkpoint has done. Got {steps!r} instead."
            )
        cfg = dataclasses.replace(cfg, steps=steps)
    model = ck.model
    train, val, digest = _split(text, cfg, model.config.block_size)
    if digest != ck.corpus_sha256:
        raise ValueError(
            f"{str(checkpoint)!r} was trained on another corpus (SHA-256 "
            f"{ck.corpus_sha256[:12]}..., this one {digest[:12]}...); resume with the same text."
        )
    remove_partial_writes(checkpoint)  # a write cut short by the kill
    dp = DataParallel.setup(model)  # the file holds whole experts: any W resumes it
    opt = _optimizer(model, cfg)
    for name, p in model.named_parameters():
        if name in ck.optimizer:  # AdamW's step and moments; the rates come from cfg
            state = {f"{name}.{k}": v for k, v in ck.optimizer[name].items()}
            state = slice_expert_state(model, state) if dp is not None else state
            opt.state[p] = {k: state[f"{name}.{k}"] for k in ck.optimizer[name]}
    torch.set_rng_state(ck.rng)
    if dp is not None and dp.rank > 0:  # the file holds process 0's generator only
        torch.manual_seed(cfg.seed * 1_000_003 + ck.step + dp.rank)
    run = _Run(model, opt, cfg, train, val, digest, log, ck.expert_load, checkpoint, dp)
    return model, run.loop(ck.step + 1, verbose)


@dataclass
class _Run:
    """The state of one training run: what a checkpoint holds, and the loop over it."""

    model: MoETransformer
    opt: torch.optim.AdamW
    cfg: TrainConfig
    train: Tensor
    val: Tensor
    digest: str
    log: TrainLog
    load: Tensor  # (layers, experts) assignments since the last evaluation
    checkpoint: str | os.PathLike | None
    dp: DataParallel | None = None  # data + expert parallel, under torchrun

    def loop(self, start: int, verbose: int) -> TrainLog:
        model, opt, cfg, log, dp = self.model, self.opt, self.cfg, self.log, self.dp
        if dp is not None and dp.rank != 0:
            verbose = 0  # process 0 reports
        block = model.config.block_size
        layers = model.moe_layers()
        # one call per optimiser step, whatever the gradient accumulation
        update_biases = moe_layer.update_router_biases
        model.train()
        bar = _progress(start, cfg.steps, verbose)
        tokens = cfg.grad_accum * cfg.batch_size * block * (1 if dp is None else dp.world_size)
        tick = time.perf_counter()
        for step in range(start, cfg.steps):
            for group in opt.param_groups:
                group["lr"] = _lr(step, cfg)
            x, y = _batch(self.train, block, cfg, step, dp)  # (A, B, T), (A, B, T)
            # this step's losses and loads, summed over micro-batches (and processes)
            stats = torch.zeros(2 + self.load.numel(), dtype=torch.float64)
            for micro in range(cfg.grad_accum):
                ce, aux = _lm_loss(model, x[micro], y[micro])
                ((ce + aux) / cfg.grad_accum).backward()
                stats[0] += ce.item() / cfg.grad_accum
                stats[1] += aux.item() / cfg.grad_accum
                for i, layer in enumerate(layers):
                    stats[2 + i * self.load.shape[1] : 2 + (i + 1) * self.load.shape[1]] += (
                        layer.stats.tokens_per_expert.to(stats.dtype)
                    )
            if dp is None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            else:
                dp.sync_gradients(model)
                dp.clip_grad_norm(model, cfg.grad_clip)
                dp.all_reduce(stats)  # once per step: losses and loads together
                stats[:2] /= dp.world_size  # the losses' mean over processes
            lm_loss, aux_loss = float(stats[0]), float(stats[1])
            self.load += stats[2:].view_as(self.load)
            opt.step()
            opt.zero_grad(set_to_none=True)
            update_biases(model)
            log.step.append(step)
            log.train_loss.append(lm_loss)
            log.aux_loss.append(aux_loss)
            now = time.perf_counter()
            rate, tick = tokens / max(now - tick, 1e-9), now
            balance = max((layer.stats.balance for layer in layers), default=1.0)
            bar.set_postfix_str(f"loss {lm_loss:.3f}, aux {aux_loss:.4f}, {rate:,.0f} tok/s, "
                                f"balance {balance:.2f}", refresh=False)  # fmt: skip
            bar.update(1)
            last = step == cfg.steps - 1
            if step % cfg.eval_every == 0 or last:
                self._evaluate(step, bar if verbose >= 1 else None)
                tick = time.perf_counter()  # evaluation time is not training throughput
            if self.checkpoint is not None and ((step + 1) % cfg.checkpoint_every == 0 or last):
                self._save(step)
                tick = time.perf_counter()
        bar.close()
        if dp is not None:
            dp.finish(model)
        model.eval()
        model.training_log = log.as_dict()
        return log

    def _save(self, step: int) -> None:
        names = {p: name for name, p in self.model.named_parameters()}  # the tied head once
        optimizer = {names[p]: state for p, state in self.opt.state.items()}
        ck = Checkpoint(self.model, optimizer, torch.get_rng_state(), self.load, step,
                        dataclasses.asdict(self.cfg), self.log.as_dict(), self.digest)  # fmt: skip
        save_checkpoint(self.checkpoint, ck)  # under torchrun: gathered, process 0 writes

    def _evaluate(self, step: int, bar) -> None:
        cfg, log, dp = self.cfg, self.log, self.dp
        # W processes: the same windows as one process with the global batch W * batch_size
        world = 1 if dp is None else dp.world_size
        val_loss = evaluate_lm(self.model, self.val, cfg.batch_size,
                               cfg.eval_batches * world * cfg.batch_size, dp=dp)  # fmt: skip
        log.eval_step.append(step)
        log.val_loss.append(val_loss)
        log.tokens_per_expert.append(self.load.tolist())
        self.load.zero_()
        if bar is not None:
            bar.write(f"step {step:5d}: train loss {log.train_loss[-1]:.4f}, held-out loss "
                      f"{val_loss:.4f} ({val_loss / math.log(2):.3f} bits per byte), aux loss "
                      f"{log.aux_loss[-1]:.4f}", file=sys.stderr)  # fmt: skip


def _progress(start: int, total: int, verbose: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="training", unit="step",
                disable=verbose < 1, file=sys.stderr, dynamic_ncols=True)  # fmt: skip
