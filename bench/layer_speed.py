"""Speed of the sparse MoE layer on the CPU: forward + backward, float32, 2 threads.

Run ``python bench/layer_speed.py``; it prints and writes ``bench/results/layer_speed.md``.

For each shape it times, side by side in one run (each repetition runs every method
once, in rotating order, so that a load change on the machine hits all of them):

- ``moekit MoE``: the layer as users get it (``expert_impl='auto'``, the fused
  dispatch of :mod:`moekit.nn.fused`, its blocks on helper threads or on the
  intra-op team as :func:`moekit.nn.threads.use_helpers` chooses), the same with
  the blocks always one after another on the intra-op team (:data:`moekit.nn.threads.
  helper_threads` off, as before the helpers) and always on helper threads, the
  fused dispatch over grouped_mm, and
  the layer's sorted dispatch through plain autograd over grouped_mm, padded bmm and
  a per-expert mm loop;
- ``loop + index_add``: the dispatch of common LLM code (Mixtral's sparse block):
  for each expert, ``torch.where`` over the one-hot routing mask, gather its tokens,
  run it, ``index_add_`` the weighted output; weights unbound once per forward;
- ``floor``: the expert FFNs alone (matmuls and activation) on tokens already sorted
  by expert (for bmm: already padded), no routing, gather or combine; the fastest
  floor row is the floor the ratios use;
- ``dense FFN``: one FFN of width ``top_k * d_hidden`` over all tokens, the same
  active FLOPs with no routing at all.

All MoE variants share one router and one expert bank, so they do the same maths.
Times are medians over the repetitions; ratios are of medians from the same run.

``--compete N`` runs N other processes doing matmuls (each with ``--threads``
threads) while timing, to see how each method bears CPU contention; the CPU-seconds
column then shows the time threads spent spinning at barriers.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moekit.nn import MoE
from moekit.nn import threads as nn_threads
from moekit.nn.dispatch import combine, plan_dispatch
from moekit.nn.experts import FeedForward, activate

SHAPES = [  # (d_model, d_hidden, n_experts, top_k, n_tokens)
    (512, 1024, 8, 2, 8192),
    (512, 256, 64, 8, 8192),
]
RESULTS = Path(__file__).resolve().parent / "results" / "layer_speed.md"


def loop_moe(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Mixtral-style dispatch: a loop over experts with where / gather / index_add."""
    routing = layer.router(x)  # weights, indices (T, k)
    weights = routing.weights.to(x.dtype)
    w_in, w_out = layer.experts.w_in.unbind(0), layer.experts.w_out.unbind(0)
    out = torch.zeros_like(x)  # (T, d)
    mask = F.one_hot(routing.indices, layer.n_experts).permute(2, 1, 0)  # (E, k, T)
    for e in range(layer.n_experts):
        slot, token = torch.where(mask[e])
        h = activate(x[token] @ w_in[e], layer.experts.activation)
        y = (h @ w_out[e]) * weights[token, slot, None]
        out.index_add_(0, token, y)
    return out


def _minor_faults() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except ImportError:  # not on this platform
        return 0


def time_methods(methods: dict, repeats: int, warmup: int = 1) -> dict[str, tuple]:
    """Median seconds, page faults and CPU seconds of each zero-argument callable.

    The methods are interleaved: repetition ``r`` runs all of them once, starting at a
    rotating position.
    """
    names = list(methods)
    for _ in range(warmup):
        for name in names:
            methods[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    faults: dict[str, list[int]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            faults_before, cpu_before = _minor_faults(), time.process_time()
            start = time.perf_counter()
            methods[name]()
            times[name].append(time.perf_counter() - start)
            faults[name].append(_minor_faults() - faults_before)
            cpu[name].append(time.process_time() - cpu_before)
    median = statistics.median
    return {name: (median(times[name]), median(faults[name]), median(cpu[name])) for name in names}


def unfused_moe(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """The layer's sorted dispatch with plain autograd over grouped_mm (not fused)."""
    routing = layer.router(x)
    plan = plan_dispatch(routing, x.shape[0], layer.n_experts)
    x_sorted = x.index_select(0, plan.token)  # (A, d)
    y_sorted = layer.experts._grouped_mm(x_sorted, plan.counts, plan.weight)  # (A, d)
    return combine(y_sorted, plan.token, x.shape[0])  # (T, d)


def bench_shape(d_model, d_hidden, n_experts, top_k, n_tokens, repeats):
    torch.manual_seed(0)
    layer = MoE(d_model, d_hidden, n_experts, top_k, aux_loss_coef=0.0)
    bank = layer.experts
    x = torch.randn(n_tokens, d_model, requires_grad=True)
    grad = torch.randn(n_tokens, d_model)

    def timed(forward, leaves, grad):
        def go():
            for p in (*layer.parameters(), *leaves):
                p.grad = None
            forward().backward(grad)

        return go

    def layer_with(impl, helpers=True):
        # helpers: True as users get it (nn_threads.use_helpers decides), False never,
        # "always" wherever there are blocks enough for them at all
        per_thread = nn_threads.BLOCKS_PER_THREAD

        def forward():
            bank.impl = impl
            nn_threads.helper_threads = helpers is not False
            nn_threads.BLOCKS_PER_THREAD = 0 if helpers == "always" else per_thread
            try:
                return layer(x)
            finally:
                nn_threads.helper_threads = True
                nn_threads.BLOCKS_PER_THREAD = per_thread

        return timed(forward, [x], grad)

    # the floor: the expert FFNs alone on tokens already sorted (or padded) by expert
    with torch.no_grad():
        indices = layer.router(x).indices.flatten()
    counts = torch.bincount(indices, minlength=n_experts).tolist()
    x_sorted = torch.randn(len(indices), d_model, requires_grad=True)
    grad_sorted = torch.randn(len(indices), d_model)
    x_padded = torch.randn(n_experts, max(counts), d_model, requires_grad=True)
    grad_padded = torch.randn(n_experts, max(counts), d_model)

    def padded_experts():
        h = activate(torch.bmm(x_padded, bank.w_in), bank.activation)  # (E, R, H)
        return torch.bmm(h, bank.w_out)  # (E, R, d)

    dense = FeedForward(d_model, top_k * d_hidden)

    def dense_go():
        for p in (*dense.parameters(), x):
            p.grad = None
        dense(x).backward(grad)

    methods = {
        "moekit MoE (auto)": layer_with("auto"),
        "moekit MoE, fused, blocks on the intra-op team": layer_with("auto", helpers=False),
        "moekit MoE, fused, blocks on helper threads": layer_with("auto", helpers="always"),
        "moekit MoE, fused grouped_mm": layer_with("grouped_mm"),
        "moekit MoE, autograd padded bmm": layer_with("bmm"),
        "moekit MoE, autograd per-expert mm": layer_with("mm"),
        "moekit MoE, autograd grouped_mm": timed(lambda: unfused_moe(layer, x), [x], grad),
        "loop + index_add": timed(lambda: loop_moe(layer, x), [x], grad),
        "floor, grouped_mm": timed(
            lambda: bank._grouped_mm(x_sorted, counts, None), [x_sorted], grad_sorted
        ),
        "floor, padded bmm": timed(padded_experts, [x_padded], grad_padded),
        "floor, per-expert mm": timed(
            lambda: bank._mm(x_sorted, counts, None), [x_sorted], grad_sorted
        ),
        "dense FFN": dense_go,
    }
    medians = time_methods(methods, repeats)
    bank.impl = "auto"
    padding = n_experts * max(counts) / len(indices) - 1
    return medians, bank.resolve_impl(x), padding


def load_average() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--compete", type=int, default=0, help="competing matmul processes")
    parser.add_argument(
        "--shapes", type=int, nargs="*", default=None, help="indices into SHAPES (default: all)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = SHAPES if args.shapes is None else [SHAPES[i] for i in args.shapes]
    competitors = [_compete(args.threads) for _ in range(args.compete)]
    try:
        _run(args, shapes)
    finally:
        for process in competitors:
            process.terminate()
            process.wait()


_COMPETITOR = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(1024, 1024)
while True:
    a = (a @ a).tanh_()
"""


def _compete(threads: int) -> subprocess.Popen:
    """A process doing matmuls on ``threads`` threads until it is terminated."""
    return subprocess.Popen([sys.executable, "-c", _COMPETITOR, str(threads)])


def _run(args, shapes) -> None:

    load_before = load_average()
    lines = [
        "# MoE layer speed (CPU, float32, forward + backward)",
        "",
        f"torch {torch.__version__}, {args.threads} threads, {platform.machine()}, "
        f"median of {args.repeats} runs after 1 warm-up, methods interleaved"
        + (f", {args.compete} competing matmul processes running." if args.compete else "."),
        f"Load average (1/5/15 min) before: {load_before}; after: LOAD_AFTER "
        "(the benchmark's own threads add about 2 to it).",
        "",
        "Ratios are this row's median over the named reference's median from the same run;",
        "floor = the fastest of the expert-only rows (no routing, gather or combine).",
        "page faults: minor page faults of the process during one run (median); each is a",
        "fresh 4 KiB page the kernel maps and zero-fills. CPU s: CPU time of the process",
        "during one run (median), all its threads.",
        "",
    ]
    for shape in shapes:
        d_model, d_hidden, n_experts, top_k, n_tokens = shape
        print(
            f"shape d_model={d_model} d_hidden={d_hidden} E={n_experts} top-{top_k} "
            f"T={n_tokens} ...",
            file=sys.stderr,
            flush=True,
        )
        med, auto_impl, padding = bench_shape(*shape, args.repeats)
        seconds = {name: t for name, (t, _, _) in med.items()}
        loop = seconds["loop + index_add"]
        floor = min(t for name, t in seconds.items() if name.startswith("floor"))
        dense = seconds["dense FFN"]
        lines += [
            f"## d_model {d_model}, d_hidden {d_hidden}, E {n_experts}, top-{top_k}, "
            f"{n_tokens} tokens ('auto' is {auto_impl}; padding to the largest "
            f"expert load adds {100 * padding:.0f}% rows)",
            "",
            "| method | median s | / loop | / floor | / dense FFN | page faults | CPU s |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, (t, n_faults, cpu) in med.items():
            lines.append(
                f"| {name} | {t:.3f} | {t / loop:.2f} | {t / floor:.2f} | {t / dense:.2f} "
                f"| {n_faults / 1000:.0f}k | {cpu:.2f} |"
            )
        lines.append("")
    text = "\n".join(lines).replace("LOAD_AFTER", load_average()) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
