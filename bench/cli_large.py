"""`moekit fit` on a large CSV: end-to-end time and peak memory against its parts.

    python bench/cli_large.py                 # 1e6 rows x 20 features; bench/results/cli_large.md
    python bench/cli_large.py --rows 200000   # a quicker run

A K = 3 mixture of linear experts with a softmax gate (``make_moe_regression``,
20 features) is written once as a CSV (and as .npy arrays). Each step then runs in
a fresh process, which reports its own wall time and peak resident memory (VmHWM):

- **read**: ``pandas.read_csv`` of the file alone, the floor of any command that
  starts from a CSV;
- **Python fit**: ``MoERegressor(n_experts=3, random_state=0).fit(X, y)`` on the
  arrays loaded from .npy, timed around ``fit`` alone (the reference the target is
  set against), and the process's peak;
- **moekit fit**: the whole command, ``moekit fit data.csv --target y --experts 3``,
  with its progress bar, its held-out split (20% of rows), standard errors and
  report.html.

Targets: the command within 3x the Python fit's time and its peak within 4x the
size of the data in memory (n x 21 float64 values).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import load_line

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

_PEAK = (
    "def _peak():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            return int(line.split()[1]) / 1024\n"
)

BASE = (
    _PEAK
    + """
import json
import pandas, sklearn, torch, matplotlib
import moekit.cli, moekit.estimators, moekit.report
print(json.dumps({"peak_mb": _peak()}))
"""
)

READ = (
    _PEAK
    + """
import json, sys, time
t = time.perf_counter()
import pandas as pd
frame = pd.read_csv(sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - t, "peak_mb": _peak(),
                  "shape": list(frame.shape)}))
"""
)

FIT = (
    _PEAK
    + """
import json, sys, time
import numpy as np
from moekit import MoERegressor
X, y = np.load(sys.argv[1]), np.load(sys.argv[2])
before = _peak()
t = time.perf_counter()
m = MoERegressor(n_experts=3, random_state=0).fit(X, y)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_mb": _peak(),
                  "before_mb": before, "n_iter": m.n_iter_,
                  "loglik": m.log_likelihood_}))
"""
)

CLI = (
    _PEAK
    + """
import json, sys, time
t = time.perf_counter()
from moekit.cli import main
rc = main(["fit", sys.argv[1], "--target", "y", "--experts", "3", "--out", sys.argv[2],
           "--verbose", "1"])
print(json.dumps({"seconds": time.perf_counter() - t, "peak_mb": _peak(), "rc": rc}))
"""
)


def _run(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=ROOT, env=env)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["stdout"], result["stderr"] = proc.stdout, proc.stderr
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cli_large.md")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import numpy as np
    import pandas as pd

    from moekit.datasets import make_moe_regression

    start_load = load_line()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        X, y, _ = make_moe_regression(args.rows, n_features=args.features, n_experts=3,
                                      random_state=0)  # fmt: skip
        frame = pd.DataFrame(X, columns=[f"x{j}" for j in range(args.features)]).assign(y=y)
        t = time.perf_counter()
        frame.to_csv(tmp / "data.csv", index=False)
        write_s = time.perf_counter() - t
        np.save(tmp / "X.npy", X)
        np.save(tmp / "y.npy", y)
        data_mb = (X.nbytes + y.nbytes) / 2**20
        csv_mb = (tmp / "data.csv").stat().st_size / 2**20
        del frame, X, y
        print(f"data: {args.rows} x {args.features + 1} ({data_mb:.0f} MB in memory, "
              f"{csv_mb:.0f} MB of CSV, written in {write_s:.1f} s)", flush=True)  # fmt: skip
        base = _run(BASE)["peak_mb"]
        print(f"interpreter with its libraries: {base:.0f} MB", flush=True)
        read = _run(READ, str(tmp / "data.csv"))
        print(f"read: {read['seconds']:.1f} s, peak {read['peak_mb']:.0f} MB", flush=True)
        fit = _run(FIT, str(tmp / "X.npy"), str(tmp / "y.npy"))
        print(f"Python fit: {fit['seconds']:.1f} s, peak {fit['peak_mb']:.0f} MB", flush=True)
        cli = _run(CLI, str(tmp / "data.csv"), str(tmp / "out"))
        print(f"moekit fit: {cli['seconds']:.1f} s, peak {cli['peak_mb']:.0f} MB", flush=True)
        report_kb = (tmp / "out" / "report.html").stat().st_size / 1024
        bar = [ln for ln in cli["stderr"].replace("\r", "\n").splitlines() if "it/s" in ln
               or "s/it" in ln]  # fmt: skip
    end_load = load_line()

    t_ratio = cli["seconds"] / fit["seconds"]
    m_ratio = cli["peak_mb"] / data_mb
    lines = [
        "# `moekit fit` on a large CSV",
        "",
        f"Generated by `python bench/cli_large.py --rows {args.rows}`; {start_load} at the "
        f"start, {end_load} at the end.",
        "",
        f"Data: {args.rows:,} rows x {args.features} features and a target from a 3-expert "
        f"mixture: {data_mb:.0f} MB as float64, {csv_mb:.0f} MB of CSV. Each step runs in a "
        "fresh process; peak is its resident high-water mark (VmHWM).",
        "",
        "| step | wall s | peak MB | peak / data | (peak - interpreter) / data | peak / CSV |",
        "|---|---:|---:|---:|---:|---:|",
        f"| the interpreter with pandas, torch, scikit-learn, matplotlib and moekit imported | "
        f"| {base:.0f} | | | |",
        *[
            f"| {name} | {r['seconds']:.1f} | {r['peak_mb']:.0f} | {r['peak_mb'] / data_mb:.1f}x "
            f"| {(r['peak_mb'] - base) / data_mb:.1f}x | {r['peak_mb'] / csv_mb:.1f}x |"
            for name, r in (
                ("read the CSV alone (pandas, one call)", read),
                (f"Python fit on the arrays (`fit` alone; {fit['n_iter']} EM iterations)", fit),
                ("`moekit fit data.csv --target y --experts 3` (all of it)", cli),
            )
        ],
        "",
        f"- time: the command took {t_ratio:.2f}x the Python fit (target < 3x: "
        f"{'met' if t_ratio < 3 else 'not met'}).",
        f"- memory: its peak was {m_ratio:.2f}x the data as float64 (target < 4x: "
        f"{'met' if m_ratio < 4 else 'not met'}); {cli['peak_mb'] / csv_mb:.2f}x the CSV file; "
        f"{(cli['peak_mb'] - base) / data_mb:.2f}x the data above the interpreter's own "
        f"{base:.0f} MB.",
        f"- the report it wrote: {report_kb:.0f} kB; its progress bar's last line: "
        f"`{bar[-1].strip() if bar else '(none captured)'}`",
        "",
        "The command's output:",
        "",
        "```",
        *cli["stdout"].strip().splitlines()[:-1][:12],
        "```",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
