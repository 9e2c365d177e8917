"""``summary()`` against the fit it summarises: time and peak memory on large data.

    python bench/summary_speed.py                    # 1e5 and 1e6 rows x 20 features
    python bench/summary_speed.py --rows 100000      # one size

A K = 3 mixture of linear experts with a softmax gate (``make_moe_regression``, 20
features) is fitted with ``MoERegressor(n_experts=3, random_state=0)``; then
``summary()`` computes the standard errors from the observed information on the same
rows. Each size runs in a fresh process, which reports:

- **fit**: the wall time of ``fit`` and the process's peak resident memory (VmHWM)
  at its end;
- **summary**: the wall time of ``summary()`` and the peak during it alone (VmHWM is
  reset before it through ``/proc/self/clear_refs``), from the analytic information
  (one pass of weighted Grams, :mod:`moekit.estimators._information`);
- **autograd**: the Hessian by autograd that ``summary()`` took before, for
  comparison (``--autograd-max`` rows at most: it takes tens of seconds past that).

Target: ``summary()`` no slower than the fit and its peak within 2x the fit's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from _common import load_line

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CHILD = """
import json, sys, time
from _common import vm_hwm_mb
from moekit import MoERegressor
from moekit.datasets import make_moe_regression
from moekit.estimators.inference import ReportedLikelihood

rows, autograd = int(sys.argv[1]), sys.argv[2] == "1"
X, y, _ = make_moe_regression(rows, n_features=20, n_experts=3, random_state=0)
t = time.perf_counter()
m = MoERegressor(n_experts=3, random_state=0).fit(X, y)
out = {"fit_s": time.perf_counter() - t, "fit_mb": vm_hwm_mb(), "n_iter": m.n_iter_}
with open("/proc/self/clear_refs", "w") as f:  # VmHWM from here on: the summary's
    f.write("5")
base = vm_hwm_mb()
t = time.perf_counter()
s = m.summary()
out.update(summary_s=time.perf_counter() - t, summary_mb=vm_hwm_mb(), base_mb=base,
           finite=int(s.table.std_error.notna().sum()), params=len(s.table))
if autograd:
    lik = ReportedLikelihood(m, X, y)
    t = time.perf_counter()
    lik.observed_hessian("autograd")
    out["autograd_s"] = time.perf_counter() - t
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="*", default=[100_000, 1_000_000])
    ap.add_argument("--autograd-max", type=int, default=100_000)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "summary_speed.md")
    args = ap.parse_args()
    load_before = load_line()
    lines = [
        "# summary() against the fit (bench/summary_speed.py)",
        "",
        "K = 3 linear experts, softmax gate, 20 features (`make_moe_regression`); "
        "MoERegressor(n_experts=3, random_state=0). Peak: VmHWM of the process (fit: at "
        "its end, with the interpreter and data; summary: during summary() alone).",
        "",
        "| rows | fit s | summary s | summary / fit | autograd Hessian s | fit peak MB "
        "| summary peak MB | finite SEs |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    env = {"PYTHONPATH": f"{ROOT / 'src'}:{HERE}"}
    for rows in args.rows:
        res = subprocess.run(
            [sys.executable, "-c", CHILD, str(rows), "1" if rows <= args.autograd_max else "0"],
            capture_output=True, text=True, check=True, cwd=HERE,
            env={**os.environ, **env},
        )  # fmt: skip
        r = json.loads(res.stdout.strip().splitlines()[-1])
        auto = f"{r['autograd_s']:.2f}" if "autograd_s" in r else "-"
        lines.append(
            f"| {rows:,} | {r['fit_s']:.2f} | {r['summary_s']:.2f} | "
            f"{r['summary_s'] / r['fit_s']:.2f} | {auto} | {r['fit_mb']:.0f} | "
            f"{r['summary_mb']:.0f} | {r['finite']} of {r['params']} |"
        )
        print(lines[-1], flush=True)
    lines += ["", f"Load (1 / 5 / 15 min) before: {load_before}; after: {load_line()}."]
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
