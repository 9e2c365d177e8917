"""Peak memory of an EM fit on wide data, and the speed of a narrow iteration.

    python bench/wide_data.py                    # writes bench/results/wide_data.md
    python bench/wide_data.py --against REV      # the same cases on git revision REV too

Memory: for each width d, a fresh process draws n rows from a K = 3 mixture of
experts (``make_moe_regression``) and fits ``MoERegressor(n_experts=3, max_iter=20,
random_state=0)``. The table gives the size of X, the process's peak resident memory
(VmHWM) before the fit (interpreter, torch and the data) and after it, and what
the fit added as a multiple of X. A watchdog stops any case whose resident memory
passes ``--mem-cap-gb`` (the machine may be shared); such a row shows the cap as a
lower bound.

Speed: one EM iteration (E-step pass + M-step, softmax gate, d = 5, n = 1e6) at a
fitted model's parameters against one weighted Gram matrix X^T diag(w) X, as in
``bench/classic_vs_r.py``: medians of 7 runs, wall-clock and CPU time. With
``--against``, each round runs the revision's code and this tree's code in turn, in
fresh processes, so that a change of load on the machine hits both; the table gives
each round and the medians. On a busy machine the wall-clock ratio with several
threads says little (a thread descheduled at a barrier stalls the others, and an
iteration has many more barriers than one Gram); the one-thread CPU-time ratio is
then the steadier measure of the work done.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import em_iteration_vs_gram, load_line, vm_hwm_mb

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


# ---------------------------------------------------------------------------- children
def child_memory(d: int, n: int) -> dict:
    import warnings

    from moekit import MoERegressor
    from moekit.datasets import make_moe_regression

    X, y, _ = make_moe_regression(n, n_features=d, n_experts=3, random_state=0)
    before = vm_hwm_mb()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 20 iterations need not converge
        m = MoERegressor(n_experts=3, max_iter=20, random_state=0).fit(X, y)
    seconds = time.perf_counter() - t0
    return {
        "data_mb": X.nbytes / 2**20,
        "before_mb": before,
        "peak_mb": vm_hwm_mb(),
        "seconds": seconds,
        "n_iter": m.n_iter_,
        "loglik": m.log_likelihood_,
    }


def child_speed(threads: int) -> dict:
    """One EM iteration against one weighted Gram, on bench/classic_vs_r.py's data."""
    import torch

    torch.set_num_threads(threads)
    from moekit.datasets import make_moe_truth

    X, y = make_moe_truth(5, 3, gate="softmax", random_state=0).sample(1_000_000, random_state=7)
    return em_iteration_vs_gram(X, y, 3)


# ---------------------------------------------------------------------------- parent
def run_child(src: Path, args: list[str], cap_mb: float) -> dict:
    """Run this file's child mode on the moekit in ``src``; stop it above ``cap_mb``."""
    env = dict(os.environ, PYTHONPATH=str(src))
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", *args],
            env=env,
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
        )
        high = 0.0
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    rss = next(int(s.split()[1]) for s in f if s.startswith("VmRSS:")) / 1024
            except (FileNotFoundError, StopIteration, ProcessLookupError):
                rss = 0.0
            high = max(high, rss)
            if rss > cap_mb:
                proc.kill()
                proc.wait()
                return {"capped": True, "seen_mb": high}
            time.sleep(0.02)
        if proc.returncode != 0:
            raise RuntimeError(f"child {args} failed:\n{proc.stderr.read()[-2000:]}")
        out.seek(0)
        return json.loads(out.read().strip().splitlines()[-1])


def export_revision(rev: str, into: Path) -> tuple[Path, str]:
    """The ``src/`` tree of git revision ``rev``, written under ``into``."""
    root = HERE.parent
    commit = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", rev],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", "--format=tar", commit, "src"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src", commit


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", default="5,50,150,200")
    ap.add_argument("--n", type=int, default=70_000)
    ap.add_argument("--against", default=None, help="git revision to compare with")
    ap.add_argument("--against-dims", default="5,50,100", help="widths for that revision")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the speed comparison")
    ap.add_argument("--threads", default="2,1", help="torch threads of the speed runs")
    ap.add_argument("--mem-cap-gb", type=float, default=6.0)
    ap.add_argument("--out", default=str(HERE / "results" / "wide_data.md"))
    args = ap.parse_args()
    cap_mb = args.mem_cap_gb * 1024
    tmp = Path(tempfile.mkdtemp(prefix="moekit_wide_"))
    trees = [("this tree", SRC, "")]
    try:
        if args.against:
            src, commit = export_revision(args.against, tmp)
            trees.insert(0, (f"{args.against} ({commit})", src, commit))
        load_start = load_line()
        memory = []
        for label, src, _ in trees:
            dims = args.against_dims if src is not SRC else args.dims
            for d in [int(v) for v in dims.split(",") if v]:
                res = run_child(src, ["memory", str(d), str(args.n)], cap_mb)
                memory.append({"code": label, "d": d, **res})
                print(label, d, res, flush=True)
        speed = []
        for r in range(args.rounds):
            for threads in [int(v) for v in args.threads.split(",") if v]:
                for label, src, _ in trees:
                    res = run_child(src, ["speed", str(threads)], cap_mb)
                    speed.append({"code": label, "round": r + 1, **res})
                    print(label, r + 1, res, flush=True)
        load_end = load_line()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = render(memory, speed, args, trees, load_start, load_end)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print(report)
    return 0


def render(memory, speed, args, trees, load_start, load_end) -> str:
    import torch

    lines = [
        "# EM on wide data: peak memory, and the narrow iteration's speed",
        "",
        f"Generated by `python bench/wide_data.py"
        f"{' --against ' + args.against if args.against else ''}`; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cores. Load average "
        f"(1/5/15 min) at the start {load_start}, at the end {load_end}.",
        "",
        f"## Peak memory, n = {args.n:,}, K = 3, 20 EM iterations",
        "",
        "Peak: the process's peak resident memory (VmHWM); before fit: the same just "
        "before `fit` (interpreter, torch, X). Added / X: (peak - before fit) / size of X.",
        "",
        "| code | d | X MB | before fit MB | peak MB | peak / X | added / X | fit s | log-lik |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in memory:
        if r.get("capped"):
            lines.append(
                f"| {r['code']} | {r['d']} | {args.n * r['d'] * 8 / 2**20:.0f} | | "
                f"> {args.mem_cap_gb * 1024:.0f} (stopped at the cap) | | | | |"
            )
            continue
        lines.append(
            f"| {r['code']} | {r['d']} | {r['data_mb']:.1f} | {r['before_mb']:.0f} | "
            f"{r['peak_mb']:.0f} | {r['peak_mb'] / r['data_mb']:.1f} | "
            f"{(r['peak_mb'] - r['before_mb']) / r['data_mb']:.1f} | {r['seconds']:.1f} | "
            f"{r['loglik']:.6f} |"
        )
    lines += [
        "",
        "## One EM iteration vs one weighted Gram, n = 1,000,000, d = 5, K = 3 (target <= 4x)",
        "",
        "Medians of 7 runs in each process; ratio = iteration / Gram, by wall-clock and "
        "by CPU time.",
        "",
        "| code | threads | round | Gram ms | iteration ms | ratio | Gram CPU ms "
        "| iteration CPU ms | CPU ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(speed, key=lambda r: (-r["threads"], r["code"], r["round"])):
        lines.append(
            f"| {r['code']} | {r['threads']} | {r['round']} | {r['gram'] * 1e3:.1f} | "
            f"{r['iteration'] * 1e3:.1f} | {r['iteration'] / r['gram']:.2f} | "
            f"{r['gram_cpu'] * 1e3:.1f} | {r['iteration_cpu'] * 1e3:.1f} | "
            f"{r['iteration_cpu'] / r['gram_cpu']:.2f} |"
        )
    for threads in sorted({r["threads"] for r in speed}, reverse=True):
        for label, _, _ in trees:
            rows = [r for r in speed if r["code"] == label and r["threads"] == threads]
            if rows:
                wall = statistics.median(r["iteration"] / r["gram"] for r in rows)
                cpu = statistics.median(r["iteration_cpu"] / r["gram_cpu"] for r in rows)
                lines.append(f"| {label} | {threads} | median | | | {wall:.2f} | | | {cpu:.2f} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        if sys.argv[2] == "memory":
            print(json.dumps(child_memory(int(sys.argv[3]), int(sys.argv[4]))))
        else:
            print(json.dumps(child_speed(int(sys.argv[3]))))
        sys.exit(0)
    sys.exit(main())
