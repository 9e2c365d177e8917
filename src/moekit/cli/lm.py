"""``moekit lm train``, ``generate`` and ``upcycle``: a small byte-level MoE language model.

Training takes a preset (``--config tiny|small``) whose fields single flags
override, writes a checkpoint it can ``--resume`` from, and runs data and expert
parallel under ``torchrun`` (process 0 reports and writes). Generation continues a
prompt from a checkpoint or ``lm.moe``. Upcycling turns a dense model (the dense twin
of ``bench/lm_dense_vs_moe.py``) into a MoE model with the same predictions.
"""

from __future__ import annotations

import builtins
import math
from pathlib import Path

_LM_OVERRIDES = {  # flag -> (preset part, field); None leaves the preset's value
    "batch_size": ("train", "batch_size"),
    "grad_accum": ("train", "grad_accum"),
    "lr": ("train", "learning_rate"),
    "eval_every": ("train", "eval_every"),
    "checkpoint_every": ("train", "checkpoint_every"),
    "seed": ("train", "seed"),
    "n_experts": ("model", "n_experts"),
    "top_k": ("model", "top_k"),
    "router": ("model", "router"),
}


def _lm_corpus(path: str | None) -> tuple[str, str]:
    if path is None:
        from moekit.datasets import load_austen

        return load_austen(), "Jane Austen's Pride and Prejudice and Persuasion (bundled)"
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace"), path
    except IsADirectoryError as exc:
        raise ValueError(f"--corpus {path!r} is a folder, not a text file.") from exc


def cmd_lm_train(args) -> int:
    # under torchrun: data + expert parallel over the processes, process 0 reports
    from moekit.nn.parallel import distributed_from_env

    with distributed_from_env() as (rank, _):
        return _lm_train(args, rank)


def _lm_train(args, rank: int) -> int:
    import torch

    from moekit.nn import MoETransformer, TransformerConfig
    from moekit.nn.train import (
        PRESETS,
        TrainConfig,
        decode_bytes,
        plot_training,
        resume_lm,
        train_lm,
    )

    print = builtins.print if rank == 0 else _quiet  # process 0 reports
    text, source = _lm_corpus(args.corpus)
    out = Path(args.out)
    checkpoint = out / "checkpoint.safetensors"
    given = {flag: getattr(args, flag) for flag in _LM_OVERRIDES if getattr(args, flag) is not None}
    if args.resume:
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise ValueError(f"--resume continues with the checkpoint's settings; drop {flags}.")
        if not checkpoint.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint to resume at {str(checkpoint)!r}.")
        print(f"Resuming {checkpoint} on {source}: {len(text):,} bytes")
        model, log = resume_lm(checkpoint, text, steps=args.steps, verbose=1)
    else:
        model_kw, train_kw = (dict(part) for part in PRESETS[args.config])
        parts = {"model": model_kw, "train": train_kw}
        for flag, value in given.items():
            part, name = _LM_OVERRIDES[flag]
            parts[part][name] = value
        if args.steps is not None:
            train_kw["steps"] = args.steps
        config = TrainConfig(**train_kw)
        torch.manual_seed(config.seed)
        model = MoETransformer(TransformerConfig(**model_kw))  # checked before anything is written
        model_config = model.config
        out.mkdir(parents=True, exist_ok=True)
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"Training the {args.config!r} byte-level MoE transformer ({n_params / 1e6:.2f} M "
            f"parameters, {model_config.n_experts} experts, top-{model_config.top_k}) for "
            f"{config.steps} steps on {source}: {len(text):,} bytes"
        )
        log = train_lm(model, text, config, verbose=1, checkpoint=checkpoint)
    if rank != 0:  # the others hold the same model: process 0 writes it
        return 0
    model.save(out / "lm.moe")
    plot_training(log, title="MoE language model").savefig(out / "lm_training.png", dpi=120)
    val = log.val_loss[-1]
    print(
        f"\nHeld-out loss {val:.4f} nats per byte ({val / math.log(2):.3f} bits per byte) "
        f"after step {log.eval_step[-1]}; auxiliary loss {log.aux_loss[-1]:.4f} (apart)."
    )
    prompt = text[: min(32, len(text))]
    gen = torch.Generator().manual_seed(0)
    sample = model.generate(_prompt_ids(prompt), 160, temperature=0.8, generator=gen)
    print("A sample (temperature 0.8):\n" + decode_bytes(sample[0].tolist()))
    print(f"\nWrote {checkpoint}, {out / 'lm.moe'} and {out / 'lm_training.png'}")
    return 0


def _quiet(*args, **kwargs) -> None:
    pass


def _prompt_ids(prompt: str):
    from moekit.nn.train import byte_tokens

    ids = byte_tokens(prompt)
    if len(ids) == 0:
        raise ValueError("--prompt must not be empty.")
    return ids.unsqueeze(0)


def cmd_lm_generate(args) -> int:
    import torch

    from moekit.nn.checkpoint import load_lm
    from moekit.nn.train import decode_bytes

    if args.tokens < 0:
        raise ValueError(f"--tokens must be a non-negative int; got {args.tokens}.")
    if not args.temperature >= 0 or math.isinf(args.temperature):
        raise ValueError(f"--temperature must be a finite number >= 0; got {args.temperature}.")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be a positive int; got {args.top_k}.")
    ids = _prompt_ids(args.prompt)
    model = load_lm(args.checkpoint)
    gen = torch.Generator().manual_seed(args.seed)
    out = model.generate(ids, max_new_tokens=args.tokens, temperature=args.temperature,
                         top_k=args.top_k, generator=gen)  # fmt: skip
    print(decode_bytes(out[0].tolist()))
    return 0


def cmd_lm_upcycle(args) -> int:
    import torch

    from moekit.nn.checkpoint import load_lm
    from moekit.nn.upcycle import upcycle_lm

    dense = load_lm(args.checkpoint)
    gen = torch.Generator().manual_seed(args.seed)
    model = upcycle_lm(dense, args.n_experts, args.top_k, args.granularity, args.noise,
                       generator=gen)  # fmt: skip
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=gen)
    with torch.no_grad():
        gap = float((model(ids)[0] - dense(ids)[0]).abs().max())
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name("lm_upcycled.moe")
    model.save(out)
    n_dense = sum(p.numel() for p in dense.parameters())
    n_moe = sum(p.numel() for p in model.parameters())
    print(f"Upcycled {cfg.n_layer} blocks into {cfg.n_experts} experts of width "
          f"{cfg.d_hidden}, top-{cfg.top_k} (granularity {args.granularity}); parameters "
          f"{n_dense:,} -> {n_moe:,}. Largest logit change at init: {gap:.2e}.")  # fmt: skip
    print(f"Wrote {out}")
    return 0
