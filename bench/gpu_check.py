"""The sparse layer and the patched Hugging Face models on a CUDA device, in a few minutes.

Run ``python bench/gpu_check.py`` on a machine with an NVIDIA GPU; it prints a report
and writes ``bench/results/gpu_check.md``. Where no CUDA device exists it says so
and exits with status 0, writing nothing.

1. **The layer in bfloat16.** One router and one expert bank; the layer with each
   expert implementation (``grouped_mm``, the CUDA default; ``fused``; padded ``bmm``;
   the per-expert ``mm`` loop) against the float32 per-expert loop: forward and
   gradient errors, and forward + backward time (CUDA events, median of 20).
2. **torch's grouped matmul itself.** ``F.grouped_mm`` on tokens sorted by expert
   against a loop of per-expert matmuls, same data, bfloat16.
3. **Patched Hugging Face models on CUDA** (tiny random models of the five families,
   if transformers is installed): logits of the patched model against the model's
   own in float32 and bfloat16, and one training step through the patched model.

Each check prints as it ends, so a run stopped by a time limit still reports.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
IMPLS = ("grouped_mm", "fused", "bmm", "mm")
TABLE = ["| expert_impl | forward rel err | grad rel err | ms |", "|---|---|---|---|"]
DEVICE = "cuda"  # --smoke: "cpu", to try the script itself where no GPU is


def cuda_time(fn, reps: int = 20) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs after 3 warm-ups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if DEVICE != "cuda":
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def layer_check(d: int, h: int, e: int, k: int, tokens: int) -> list[str]:
    from moekit.nn import MoE

    torch.manual_seed(0)
    # the reference holds the bfloat16 weights and inputs in float32: both route alike
    # (the router computes in float32), so the errors are the experts' rounding alone
    ref = MoE(d, h, e, k, expert_impl="mm", aux_loss_coef=0.0).to(DEVICE)
    ref = ref.to(torch.bfloat16).float()
    x32 = torch.randn(tokens, d, device=DEVICE).to(torch.bfloat16).float()
    y_ref = ref(x32)
    y_ref.square().mean().backward()
    y_ref = y_ref.detach()
    g_ref = ref.experts.w_in.grad.clone()
    rows = [f"| {impl} | {{:.2e}} | {{:.2e}} | {{:.2f}} |" for impl in IMPLS]
    out = []
    for impl, row in zip(IMPLS, rows, strict=True):
        layer = MoE(d, h, e, k, expert_impl=impl, aux_loss_coef=0.0).to(DEVICE)
        layer.load_state_dict(ref.state_dict())
        layer = layer.to(torch.bfloat16)
        x = x32.to(torch.bfloat16).requires_grad_()
        y = layer(x)
        y.float().square().mean().backward()
        fwd_err = float((y.detach().float() - y_ref).abs().max() / y_ref.abs().max())
        grad_err = float((layer.experts.w_in.grad.float() - g_ref).abs().max() / g_ref.abs().max())

        def step(layer=layer, x=x):
            layer.zero_grad(set_to_none=True)
            layer(x).float().square().mean().backward()

        out.append(row.format(fwd_err, grad_err, cuda_time(step)))
        print(out[-1], flush=True)
    return out


def grouped_mm_check(d: int, h: int, e: int, tokens: int) -> str:
    torch.manual_seed(1)
    counts = torch.full((e,), tokens // e)
    x = torch.randn(int(counts.sum()), d, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(e, d, h, device=DEVICE, dtype=torch.bfloat16) / d**0.5
    offs = counts.cumsum(0).to(device=DEVICE, dtype=torch.int32)
    grouped = F.grouped_mm(x, w, offs=offs)
    looped = torch.cat([xe @ w[i] for i, xe in enumerate(x.split(counts.tolist()))])
    err = float((grouped.float() - looped.float()).abs().max() / looped.float().abs().max())
    t_grouped = cuda_time(lambda: F.grouped_mm(x, w, offs=offs))
    t_loop = cuda_time(lambda: [xe @ w[i] for i, xe in enumerate(x.split(counts.tolist()))])
    line = (f"grouped_mm vs per-expert loop ({e} experts, {tokens} tokens, {d}x{h}): "
            f"max rel diff {err:.1e}, {t_grouped:.3f} ms vs {t_loop:.3f} ms")  # fmt: skip
    print(line, flush=True)
    return line


def hf_check() -> list[str]:
    try:
        from moekit.nn import hf
    except ImportError as exc:
        return [f"Hugging Face models: skipped ({exc})."]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "nn"))
    from hf_models import FAMILIES, build

    lines = ["| family | float32: max abs logit diff | bfloat16: max abs logit diff "
             "| training step (bfloat16) |", "|---|---|---|---|"]  # fmt: skip
    for family in FAMILIES:
        cells = []
        for dtype in (torch.float32, torch.bfloat16):
            model = build(family).to(DEVICE, dtype)
            ids = torch.randint(0, 128, (4, 64), device=DEVICE)
            with torch.no_grad():
                expected = model(ids).logits.float()
                hf.patch_model(model)
                got = model(ids).logits.float()
            cells.append(f"{float((got - expected).abs().max()):.1e}")
        model.train()
        out = model(ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        lines.append(f"| {family} | {cells[0]} | {cells[1]} | loss {out.loss.item():.3f}, "
                     f"grads finite: {finite} |")  # fmt: skip
        print(lines[-1], flush=True)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on the CPU to try the script; writes nothing")  # fmt: skip
    args = parser.parse_args()
    global DEVICE
    if args.smoke:
        DEVICE = "cpu"
        layer_check(64, 128, 8, 2, 512)
        grouped_mm_check(64, 128, 8, 512)
        hf_check()
        return 0
    if not torch.cuda.is_available():
        print("No CUDA device on this machine: nothing was checked (run it where a GPU is).")
        return 0
    start = time.perf_counter()
    name = torch.cuda.get_device_name()
    print(f"{name}, torch {torch.__version__}", flush=True)
    text = [f"# The sparse layer on {name}", "", f"torch {torch.__version__}.", "",
            "## The layer in bfloat16 (d 1024, h 2048, E 8, top-2, 16,384 tokens)", "",
            "Errors relative to the float32 per-expert loop; time of forward + backward.", "",
            *TABLE]  # fmt: skip
    text += layer_check(1024, 2048, 8, 2, 16384)
    text += ["", "## E 64, top-8 (d 1024, h 512, 16,384 tokens)", "", *TABLE]
    text += layer_check(1024, 512, 64, 8, 16384)
    text += ["", "## torch's grouped matmul", "", grouped_mm_check(1024, 2048, 8, 16384)]
    text += ["", "## Patched Hugging Face models on CUDA", "", *hf_check()]
    text += ["", f"Whole check: {time.perf_counter() - start:.0f} s."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.md").write_text("\n".join(text) + "\n")
    print(f"Wrote {args.out / 'gpu_check.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
