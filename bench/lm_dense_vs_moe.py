"""A dense language model against its MoE twin of the same active size, on the same tokens.

Run ``python bench/lm_dense_vs_moe.py``; it prints and writes
``bench/results/lm_dense_vs_moe.md`` and ``bench/results/lm_dense_vs_moe.png``.

The Switch Transformer's claim (Fedus et al., 2021, section 3) is that at the same
compute per token a sparse model learns faster: more parameters, each token still
going through only ``top_k`` experts. Here, at a scale two CPU cores can train:

- ``MoE``: the ``tiny`` preset of ``moekit lm train`` (byte-level, 2 blocks,
  d_model 64, 8 experts of width 128, top-2, in every block);
- ``dense``: the same transformer with a dense feed-forward of width
  ``top_k * d_hidden`` = 256 in every block: the same active parameters per token,
  less the router's ``d_model * n_experts`` weights per block.

Both are trained by ``train_lm`` with the same settings and seed, so they read the
same batches in the same order, on the bundled Jane Austen corpus; the held-out
slice is the last 10% (the end of *Persuasion*), read whole at the end. Each run is
a child process of its own, so its peak resident memory is its own. Several seeds
give the spread: a difference smaller than it is no difference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from moekit.datasets import load_austen
from moekit.nn import MoETransformer, TrainConfig, TransformerConfig, train_lm
from moekit.nn.train import PRESETS, byte_tokens, evaluate_lm

RESULTS = Path(__file__).resolve().parent / "results"


def model_config(kind: str, preset: str) -> TransformerConfig:
    config = TransformerConfig(**PRESETS[preset][0])
    if kind == "dense":
        # no block index i < n_layer has i % m == m - 1 when m = n_layer + 1: every
        # block gets the dense feed-forward of width top_k * d_hidden (transformer.Block)
        config = dataclasses.replace(config, moe_every=config.n_layer + 1)
    return config


def parameter_counts(model: MoETransformer) -> tuple[int, int]:
    """Total parameters and those one token goes through (embeddings included)."""
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for layer in model.moe_layers() for p in layer.experts.parameters())
    cfg = model.config
    return total, total - experts + experts * cfg.top_k // cfg.n_experts


def child(kind: str, preset: str, steps: int, seed: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    text = load_austen()
    cfg = TrainConfig(**{**PRESETS[preset][1], "steps": steps, "seed": seed,
                         "eval_every": max(1, steps // 12)})  # fmt: skip
    torch.manual_seed(seed)
    model = MoETransformer(model_config(kind, preset))
    total, active = parameter_counts(model)
    start = time.perf_counter()
    log = train_lm(model, text, cfg, verbose=0)
    seconds = time.perf_counter() - start
    data = byte_tokens(text)
    val = data[int(len(data) * (1.0 - cfg.val_fraction)) :]
    val_loss = evaluate_lm(model, val, batch_size=64)  # the whole held-out slice
    tokens = steps * cfg.batch_size * cfg.grad_accum * model.config.block_size
    # max/mean load of each MoE layer over the training steps since the last evaluation
    balance = [max(layer) / statistics.fmean(layer) for layer in log.tokens_per_expert[-1]]
    return {
        "kind": kind,
        "seed": seed,
        "params": total,
        "active": active,
        "val_bpb": val_loss / math.log(2),
        "train_loss_last100": statistics.fmean(log.train_loss[-100:]),
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "seconds": seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "state_mib": total * 16 / 2**20,  # weights, gradients, AdamW's two moments (fp32)
        "eval_step": log.eval_step,
        "val_loss": log.val_loss,
        "balance": balance,
    }


def _run_child(kind: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--preset", args.preset,
           "--steps", str(args.steps), "--seed", str(args.seed_now),
           "--threads", str(args.threads)]  # fmt: skip
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _row(name: str, runs: list[dict]) -> str:
    bpb = [r["val_bpb"] for r in runs]
    spread = f" ± {statistics.stdev(bpb):.4f}" if len(bpb) > 1 else ""
    r0 = runs[0]
    return (
        f"| {name} | {r0['params']:,} | {r0['active']:,} | {statistics.fmean(bpb):.4f}{spread} "
        f"| {' / '.join(f'{b:.4f}' for b in bpb)} "
        f"| {statistics.fmean(r['train_loss_last100'] for r in runs) / math.log(2):.4f} "
        f"| {statistics.median(r['tokens_per_s'] for r in runs):,.0f} "
        f"| {max(r['peak_rss_mib'] for r in runs):.0f} | {r0['state_mib']:.1f} |"
    )


def _figure(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib.pyplot as plt

    from moekit.plotting import expert_colors

    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    colors = {"dense": "0.3", "MoE": expert_colors(2)[1]}
    for name, runs in results.items():
        for i, r in enumerate(runs):
            tokens_per_step = r["tokens"] / r["eval_step"][-1] if r["eval_step"][-1] else 0
            x = [s * tokens_per_step / 1e6 for s in r["eval_step"]]
            y = [v / math.log(2) for v in r["val_loss"]]
            ax.plot(x, y, "o-", ms=2, lw=1, color=colors[name], label=name if i == 0 else None)
    ax.set_xlabel("training tokens (millions), the same for both")
    ax.set_ylabel("held-out loss (bits per byte)")
    ax.set_ylim(top=min(5.0, ax.get_ylim()[1]))
    ax.set_title("dense vs MoE of the same active size (one line per seed)")
    ax.legend()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=["dense", "moe"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.child:
        result = child(args.child, args.preset, args.steps, args.seed, args.threads)
        print(json.dumps(result))
        return
    results: dict[str, list[dict]] = {"dense": [], "MoE": []}
    load_before = os.getloadavg()
    for seed in range(args.seeds):  # dense and MoE alternate, so load changes hit both
        args.seed_now = seed
        for name, kind in (("dense", "dense"), ("MoE", "moe")):
            r = _run_child(kind, args)
            results[name].append(r)
            line = f"seed {seed} {name:5s}: {r['val_bpb']:.4f} bits per byte held out, "
            print(line + f"{r['tokens_per_s']:,.0f} tokens/s, {r['seconds']:.0f} s", flush=True)
    load_after = os.getloadavg()
    cfg = model_config("moe", args.preset)
    train = TrainConfig(**PRESETS[args.preset][1])
    tokens = results["MoE"][0]["tokens"]
    lines = [
        "# Dense vs MoE language model of the same active size (CPU)",
        "",
        f"torch {torch.__version__}, {args.threads} thread(s), float32, {platform.machine()}; "
        f"{args.seeds} seeds, dense and MoE runs alternating. No GPU was available.",
        f"Load average (1/5/15 min) before: {' / '.join(f'{x:.2f}' for x in load_before)}; "
        f"after: {' / '.join(f'{x:.2f}' for x in load_after)} (other work shared the machine; "
        "each run adds about 1 itself).",
        "",
        f"Preset `{args.preset}`: byte-level, {cfg.n_layer} blocks, d_model {cfg.d_model}, "
        f"block {cfg.block_size}; MoE: {cfg.n_experts} experts of width {cfg.d_hidden}, "
        f"top-{cfg.top_k}, router `{cfg.router}`, aux_loss_coef {cfg.aux_loss_coef}, "
        f"z_loss_coef {cfg.z_loss_coef}; dense: one FFN of width {cfg.top_k * cfg.d_hidden}. "
        f"{args.steps} steps of {train.batch_size} x {cfg.block_size} bytes = {tokens:,} "
        f"training bytes (about {tokens / 1.036e6:.1f} passes over the training text), AdamW, "
        f"peak lr {train.learning_rate}, cosine to a tenth, the same seed and batches for both.",
        "",
        "Held out: the last 10% of the corpus (115,163 bytes, the end of *Persuasion*), read "
        "whole in windows of the block size. bits/byte = nats / ln 2. Train bits/byte: mean "
        "language-model loss (no auxiliary loss) over the last 100 steps. tokens/s: training "
        "bytes over the wall time of `train_lm` (its periodic held-out checks included, about "
        "1%). Peak RSS: the child process's maximum resident memory (Python and torch "
        "included); state: weights, gradients and AdamW moments at 16 bytes per parameter.",
        "",
        "| model | parameters | active per token | held-out bits/byte (mean ± sd) | per seed "
        "| train bits/byte | tokens/s (median) | peak RSS MiB | state MiB |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
        _row("dense", results["dense"]),
        _row("MoE", results["MoE"]),
        "",
    ]
    d = [r["val_bpb"] for r in results["dense"]]
    m = [r["val_bpb"] for r in results["MoE"]]
    diffs = [a - b for a, b in zip(d, m, strict=True)]
    lines.append(
        f"Held-out difference dense - MoE, seed by seed: "
        f"{', '.join(f'{x:+.4f}' for x in diffs)} bits per byte "
        f"(mean {statistics.fmean(diffs):+.4f})."
    )
    wins = sum(x > 0 for x in diffs)
    lines.append(f"The MoE model reached the lower held-out loss in {wins} of {len(diffs)} seeds.")
    bal = [round(b, 2) for b in results["MoE"][0]["balance"]]
    lines.append(
        f"MoE expert balance (max/mean load) per layer over the last twelfth of training, "
        f"seed 0: {bal} (1.0 is even; {cfg.n_experts // cfg.top_k} would be every token on "
        "the same experts)."
    )
    lines.append("")
    args.out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines)
    (args.out / "lm_dense_vs_moe.md").write_text(text)
    _figure(results, args.out / "lm_dense_vs_moe.png")
    print(text)


if __name__ == "__main__":
    main()
