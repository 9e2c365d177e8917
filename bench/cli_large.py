"""The `moekit` command: its start-up, and `moekit fit` on large CSVs against its parts.

    python bench/cli_large.py                      # 1e6 and 1e7 rows x 20 features
    python bench/cli_large.py --rows 200000        # a quicker run
    python bench/cli_large.py --startup-only       # start-up alone (its section of the results)

**Start-up**: `moekit --help`, the bare import of the libraries `moekit fit` needs
(the floor of any fit: torch, scikit-learn, pandas, matplotlib), and `moekit fit`
on a 300-row CSV with its report, each in a fresh process; the commands take turns,
round after round, so that a change of the machine's load falls on all of them.

**Large CSVs**: a K = 3 mixture of linear experts with a softmax gate
(``make_moe_regression``, 20 features) is written as a CSV (and as .npy arrays) for
each size. Each step then runs in a fresh process, which reports its own wall time
and peak resident memory (VmHWM):

- **read**: ``pandas.read_csv`` of the file alone, the floor of any command that
  starts from a CSV;
- **Python fit**: ``MoERegressor(n_experts=3, random_state=0).fit(X, y)`` on the
  arrays loaded from .npy, timed around ``fit`` alone (the reference the target is
  set against), and the process's peak;
- **moekit fit**: the whole command, ``moekit fit data.csv --target y --experts 3``,
  with its progress bar, its held-out split (20% of rows), standard errors and
  report.html.

Targets: ``moekit --help`` under 0.5 s, ``moekit fit`` on a small CSV within 1.0 s
of the import floor measured in the same run; on
large ones the command within 3x the Python fit's time and its peak within 4x the
size of the data in memory (n x 21 float64 values). The interpreter with its
libraries is a fixed few hundred MB, so the peak is also given above it.
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

PHASES = """
import json, sys, time
t = time.perf_counter()
import torch, sklearn.base, pandas, matplotlib.pyplot
spent = {"floor": time.perf_counter() - t}
t = time.perf_counter()
import moekit.cli.fit as command
import moekit.estimators, moekit.io, moekit.report.sections, sklearn.cluster
spent["imports"] = time.perf_counter() - t


def timed(name):
    step = getattr(command, name)

    def run(*args, **kwargs):
        t = time.perf_counter()
        try:
            return step(*args, **kwargs)
        finally:
            spent[name] = time.perf_counter() - t

    setattr(command, name, run)  # cmd_fit looks its steps up when it runs


for name in ("fit_models", "report_text", "write_html_report"):
    timed(name)
from moekit.cli import main
t = time.perf_counter()
assert main(["fit", sys.argv[1], "--target", "y", "--out", sys.argv[2]]) == 0
spent["command"] = time.perf_counter() - t
print(json.dumps(spent))
"""
"""The small fit in one process, timed step by step: the floor's imports, the rest of
the imports a fit makes, then the command's steps (``moekit.cli.fit``)."""

PHASE_NAMES = {
    "imports": "imports beyond the floor (moekit; scikit-learn's k-means, which starts EM)",
    "fit_models": "the EM fits (K = 1-4 by BIC, 5 starts each)",
    "report_text": "the text report (standard errors, the held-out check against K = 1)",
    "write_html_report": "report.html and its figures (matplotlib drawing and PNG encoding)",
    "rest": "the rest (reading the CSV, the split, the model file)",
}


def _phases(tmp: Path, rounds: int) -> dict[str, float]:
    """Where the small fit's time goes beyond the floor: the round whose command was
    quickest, step by step."""
    runs = [_run(PHASES, str(tmp / "small.csv"), str(tmp / "phases")) for _ in range(rounds)]
    best = min(runs, key=lambda r: r["floor"] + r["imports"] + r["command"])
    steps = ("fit_models", "report_text", "write_html_report")
    best["rest"] = best["command"] - sum(best[k] for k in steps)
    return {k: best[k] for k in ("floor", "imports", *steps, "rest")}


def _run(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=ROOT, env=env)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["stdout"], result["stderr"] = proc.stdout, proc.stderr
    return result


STARTUP = {
    "`moekit --help`": ["-m", "moekit.cli", "--help"],
    "`import torch, sklearn.base, pandas, matplotlib.pyplot` (the libraries `fit` needs)": [
        "-c", "import torch, sklearn.base, pandas, matplotlib.pyplot"],
    "`moekit fit small.csv --target y` (300 rows, one feature, its report)": [
        "-m", "moekit.cli", "fit", "{small}", "--target", "y", "--out", "{out}"],
    "`moekit fit small.csv --target y --no-report` (the same fit, no report.html)": [
        "-m", "moekit.cli", "fit", "{small}", "--target", "y", "--out", "{out}", "--no-report"],
}  # fmt: skip
"""Start-up: the command's fixed costs, each run in a fresh process (best of --rounds)."""


FIT_MARGIN = 1.0
"""Seconds by which the small-CSV fit may exceed the import floor."""


def _startup(tmp: Path, rounds: int) -> list[tuple[str, float]]:
    import compileall

    import numpy as np
    import pandas as pd

    # moekit's bytecode, as an installed package has it (PYTHONDONTWRITEBYTECODE would
    # otherwise have every run compile its 80 modules again: 0.08 s)
    compileall.compile_dir(str(ROOT / "src" / "moekit"), quiet=1)

    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, 300)
    y = np.where(rng.random(300) < 0.5, 1 + 2 * x, -1 - x) + 0.3 * rng.normal(size=300)
    pd.DataFrame({"x": x, "y": y}).to_csv(tmp / "small.csv", index=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    times: dict[str, list[float]] = {name: [] for name in STARTUP}
    for _ in range(rounds):  # in turns: a burst of load falls on every command alike
        for name, argv in STARTUP.items():
            argv = [a.format(small=tmp / "small.csv", out=tmp / "small") for a in argv]
            t = time.perf_counter()
            subprocess.run([sys.executable, *argv], check=True, capture_output=True, cwd=ROOT,
                           env=env)  # fmt: skip
            times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        print(f"{name}: best {min(ts):.2f} s of {', '.join(f'{t:.2f}' for t in ts)}", flush=True)
    return [(name, min(ts)) for name, ts in times.items()]


def _startup_section(startup: list[tuple[str, float]], phases: dict[str, float], rounds: int,
                     load: str, command: str = "") -> list[str]:  # fmt: skip
    """The results' start-up section: the table and the targets."""
    excess = startup[2][1] - startup[1][1]
    return [
        "## Start-up",
        "",
        (f"Measured by `{command}`. " if command else "")
        + f"Each command in a fresh process, all of them in turns for {rounds} rounds, the "
        f"best wall time of each, moekit's bytecode compiled beforehand; load {load}.",
        "",
        "| command | wall s |",
        "|---|---:|",
        *[f"| {name} | {t:.2f} |" for name, t in startup],
        "",
        "Targets: `moekit --help` under 0.5 s "
        f"({'met' if startup[0][1] < 0.5 else 'not met'}); `moekit fit` on a small CSV "
        f"within {FIT_MARGIN:.1f} s of the import floor: {excess:+.2f} s "
        f"({'met' if excess <= FIT_MARGIN else 'not met'}).",
        "",
        f"The floor's {startup[1][1]:.2f} s are {phases['floor']:.2f} s of imports and "
        f"{startup[1][1] - phases['floor']:.2f} s of starting Python and tearing it down "
        "with the libraries; `moekit fit` skips the teardown (it ends with `os._exit` once "
        "its files are closed and its output flushed).",
        "",
        "Where the small fit's time goes beyond the floor's imports: the same fit in one "
        f"process, step by step (the quickest of {rounds} runs).",
        "",
        "| step | wall s |",
        "|---|---:|",
        *[f"| {PHASE_NAMES[k]} | {phases[k]:.2f} |" for k in PHASE_NAMES],
        f"| all of them | {sum(phases[k] for k in PHASE_NAMES):.2f} |",
        "",
    ]


def _replace_startup(out: Path, section: list[str]) -> None:
    """Write ``section`` over the start-up section of the results in ``out``, keeping
    the large-CSV part as it was measured."""
    text = out.read_text().splitlines()
    start = text.index("## Start-up")
    end = text.index("## Large CSVs")
    out.write_text("\n".join([*text[:start], *section, *text[end:]]) + "\n")


def _large(tmp: Path, n_rows: int, n_features: int) -> dict:
    import numpy as np
    import pandas as pd

    from moekit.datasets import make_moe_regression

    X, y, _ = make_moe_regression(n_rows, n_features=n_features, n_experts=3, random_state=0)
    frame = pd.DataFrame(X, columns=[f"x{j}" for j in range(n_features)]).assign(y=y)
    frame.to_csv(tmp / "data.csv", index=False)
    np.save(tmp / "X.npy", X)
    np.save(tmp / "y.npy", y)
    data_mb = (X.nbytes + y.nbytes) / 2**20
    csv_mb = (tmp / "data.csv").stat().st_size / 2**20
    del frame, X, y
    print(f"data: {n_rows} x {n_features + 1} ({data_mb:.0f} MB in memory, {csv_mb:.0f} MB "
          "of CSV)", flush=True)  # fmt: skip
    read = _run(READ, str(tmp / "data.csv"))
    print(f"read: {read['seconds']:.1f} s, peak {read['peak_mb']:.0f} MB", flush=True)
    fit = _run(FIT, str(tmp / "X.npy"), str(tmp / "y.npy"))
    print(f"Python fit: {fit['seconds']:.1f} s, peak {fit['peak_mb']:.0f} MB", flush=True)
    cli = _run(CLI, str(tmp / "data.csv"), str(tmp / "out"))
    print(f"moekit fit: {cli['seconds']:.1f} s, peak {cli['peak_mb']:.0f} MB", flush=True)
    report_kb = (tmp / "out" / "report.html").stat().st_size / 1024
    bar = [ln for ln in cli["stderr"].replace("\r", "\n").splitlines() if "it/s" in ln
           or "s/it" in ln]  # fmt: skip
    for f in ("data.csv", "X.npy", "y.npy"):
        (tmp / f).unlink()
    return {"rows": n_rows, "data_mb": data_mb, "csv_mb": csv_mb, "read": read, "fit": fit,
            "cli": cli, "report_kb": report_kb, "bar": bar[-1].strip() if bar else ""}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cli_large.md")
    parser.add_argument("--rounds", type=int, default=5, help="start-up rounds (default: 5)")
    parser.add_argument(
        "--startup-only",
        action="store_true",
        help="measure start-up alone and rewrite only its section of --out",
    )
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))

    start_load = load_line()
    if args.startup_only:
        with tempfile.TemporaryDirectory() as tmp:
            startup = _startup(Path(tmp), args.rounds)
            phases = _phases(Path(tmp), args.rounds)
        section = _startup_section(startup, phases, args.rounds, f"{start_load} at the start, "
                                   f"{load_line()} at the end",
                                   f"python bench/cli_large.py --startup-only --rounds "
                                   f"{args.rounds}")  # fmt: skip
        _replace_startup(args.out, section)
        print("\n".join(section))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        startup = _startup(tmp, args.rounds)
        phases = _phases(tmp, args.rounds)
        base = _run(BASE)["peak_mb"]
        print(f"interpreter with its libraries: {base:.0f} MB", flush=True)
        runs = [_large(tmp, n, args.features) for n in args.rows]
    end_load = load_line()

    lines = [
        "# The `moekit` command: start-up, and `fit` on large CSVs",
        "",
        f"Generated by `python bench/cli_large.py --rows {' '.join(map(str, args.rows))}`; "
        f"load {start_load} at the start, {end_load} at the end.",
        "",
        *_startup_section(startup, phases, args.rounds, f"{start_load} at the start"),
        "## Large CSVs",
        "",
        f"A K = 3 mixture of linear experts with a softmax gate, {args.features} features. "
        "Each step runs in a fresh process; peak is its resident high-water mark (VmHWM). "
        f"The interpreter with pandas, torch, scikit-learn, matplotlib and moekit imported "
        f"holds {base:.0f} MB before any data.",
        "",
        "| rows | step | wall s | peak MB | peak / data | (peak - interpreter) / data "
        "| peak / CSV |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        for name, step in (
            ("read the CSV alone (pandas, one call)", r["read"]),
            (f"Python fit on the arrays (`fit` alone; {r['fit']['n_iter']} EM iterations)",
             r["fit"]),
            ("`moekit fit data.csv --target y --experts 3` (all of it)", r["cli"]),
        ):  # fmt: skip
            above = ("(pandas alone)" if step is r["read"]
                     else f"{(step['peak_mb'] - base) / r['data_mb']:.2f}x")  # fmt: skip
            lines.append(
                f"| {r['rows']:,} | {name} | {step['seconds']:.1f} | {step['peak_mb']:.0f} "
                f"| {step['peak_mb'] / r['data_mb']:.2f}x | {above} "
                f"| {step['peak_mb'] / r['csv_mb']:.2f}x |"
            )
    lines.append("")
    for r in runs:
        t_ratio = r["cli"]["seconds"] / r["fit"]["seconds"]
        m_ratio = r["cli"]["peak_mb"] / r["data_mb"]
        lines += [
            f"- {r['rows']:,} rows ({r['data_mb']:.0f} MB as float64, {r['csv_mb']:.0f} MB "
            f"of CSV): the command took {t_ratio:.2f}x the Python fit (target < 3x: "
            f"{'met' if t_ratio < 3 else 'not met'}); its peak was {m_ratio:.2f}x the data "
            f"(target < 4x: {'met' if m_ratio < 4 else 'not met'}), "
            f"{(r['cli']['peak_mb'] - base) / r['data_mb']:.2f}x above the interpreter's "
            f"own {base:.0f} MB; report {r['report_kb']:.0f} kB; last progress line "
            f"`{r['bar'] or '(none captured)'}`",
        ]
    lines += ["", f"The command's output at {runs[-1]['rows']:,} rows:", "", "```",
              *runs[-1]["cli"]["stdout"].strip().splitlines()[:-1][:12], "```"]  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
