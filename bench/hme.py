"""Hierarchical MoE: moekit against mixtools' hmeEM, and trees against flat MoE.

    python bench/hme.py                 # writes bench/results/hme.md

1. tonedata (mixtools; `tuned ~ stretchratio`, 150 rows), exported by Rscript at run
   time. mixtools' ``hmeEM`` fits two linear-Gaussian experts under a logistic gate
   (it handles two experts and one covariate only), started as mixtools' example does;
   moekit fits the same model as ``HierarchicalMoERegressor(depth=1, branching=2)``
   with its defaults, and a tree of depth 2 started from that fit. Every
   log-likelihood is also recomputed here from the fitted parameters with one
   formula, so both tools are scored alike.
2. Four linear regimes in nested regions of [-1, 1]^2 (the left and right halves
   split at different heights, which no flat softmax gate draws exactly): held-out
   log-likelihood of flat MoE with 2 and 4 experts and of trees of depth 2 and 3.

Times are wall-clock seconds on this shared machine (the load average is printed);
R runs on one core, torch on the threads shown.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.special import expit, logsumexp

from _common import load_line
from moekit import HierarchicalMoERegressor, MoERegressor
from moekit.plotting import plot_hme_tree

HERE = Path(__file__).resolve().parent
R_SCRIPT = HERE / "r" / "fit_hmeem.R"
HMEEM_REFERENCE = 142.848  # hmeEM's tonedata log-likelihood, mixtools 2.0.0


def timed(fit, repeats: int = 3):
    """The fitted model of the last run and the median seconds of ``repeats`` runs."""
    times, model = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = fit()
        times.append(time.perf_counter() - t0)
    return model, float(np.median(times))


def two_expert_loglik(x, y, res: dict) -> float:
    """Total log-likelihood of hmeEM's model: lambda(x) N(b1 . x, s1^2) + (1 - lambda) N(...)."""
    lam = expit(res["w_0"] + res["w_1"] * x)
    logs = []
    for j, weight in ((1, lam), (2, 1 - lam)):
        mu = res[f"beta_0_{j}"] + res[f"beta_1_{j}"] * x
        s = res[f"sigma_{j}"]
        logs.append(np.log(weight) - 0.5 * np.log(2 * np.pi * s**2) - 0.5 * ((y - mu) / s) ** 2)
    return float(logsumexp(np.stack(logs), axis=0).sum())


def moekit_loglik(m, X, y) -> float:
    """Total log-likelihood from the fitted model's predictive mixture (one formula)."""
    d = m.predict_distribution(X)
    return float(np.sum(d.logpdf(y)))


# ---------------------------------------------------------------------------- tonedata
def tonedata_rows(workdir: Path, skip_r: bool) -> tuple[list[dict], str]:
    have_r = not skip_r and shutil.which("Rscript") is not None
    if not have_r:
        return [], "Rscript or mixtools not found: tonedata needs R to export it; skipped."
    run = subprocess.run(["Rscript", str(R_SCRIPT), str(workdir)], capture_output=True, text=True)
    if run.returncode != 0:
        return [], f"Rscript failed ({run.stderr.strip()[-300:]}); tonedata skipped."
    data = pd.read_csv(workdir / "tonedata.csv")
    res = dict(pd.read_csv(workdir / "hmeem.csv").itertuples(index=False, name=None))
    X, y = data[["stretchratio"]].to_numpy(), data["tuned"].to_numpy().copy()
    rows = [
        {
            "tool": "mixtools hmeEM (regmixEM start, seed 100)",
            "model": "2 experts, logistic gate",
            "log-lik (own)": res["loglik"],
            "log-lik (recomputed)": two_expert_loglik(X[:, 0], y, res),
            "df": 8,
            "iterations": int(res["iterations"]),
            "seconds": res["seconds"],
        }
    ]
    # hmeEM stops when the total log-likelihood changes by less than 1e-8; moekit's tol is
    # on the mean, so the same rule is tol = 1e-8 / n
    kw = {"random_state": 0, "tol": 1e-8 / len(y), "max_iter": 5000}
    d1, s1 = timed(lambda: HierarchicalMoERegressor(1, branching=2, **kw).fit(X, y))
    flat, sf = timed(lambda: MoERegressor(2, **kw).fit(X, y))
    d2, s2 = timed(lambda: HierarchicalMoERegressor(2, branching=2, **kw).fit(X, y, start_from=d1))
    for name, m, secs in (
        ("moekit HierarchicalMoERegressor(depth=1, branching=2)", d1, s1),
        ("moekit MoERegressor(n_experts=2)", flat, sf),
        ("moekit HierarchicalMoERegressor(depth=2), start_from depth 1", d2, s2),
    ):
        rows.append(
            {
                "tool": name,
                "model": f"{m.n_experts} experts, {'tree' if hasattr(m, 'depth') else 'softmax'}"
                " gate",
                "log-lik (own)": m.log_likelihood_ * len(y),
                "log-lik (recomputed)": moekit_loglik(m, X, y),
                "df": m.n_parameters(),
                "iterations": m.n_iter_,
                "seconds": secs,
            }
        )
    return rows, ""


# ---------------------------------------------------------------------------- nested regimes
COEF = np.array([[1.0, 2.0, 1.0], [-1.0, 0.0, -2.0], [0.0, -2.0, 2.0], [2.0, 1.0, -1.0]])
NOISE = 0.25


def nested_regimes(n: int, seed: int, cut: float = 0.5):
    """Four lines in the regions {x0 < 0, x1 < -cut}, {x0 < 0, x1 >= -cut},
    {x0 >= 0, x1 < cut}, {x0 >= 0, x1 >= cut} of [-1, 1]^2, Gaussian noise 0.25."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (n, 2))
    right = X[:, 0] >= 0
    k = 2 * right + (X[:, 1] >= np.where(right, cut, -cut))
    y = COEF[k, 0] + (COEF[k, 1:] * X).sum(1) + NOISE * rng.normal(size=n)
    return X, y


def nested_rows(n: int, n_test: int) -> list[dict]:
    X, y = nested_regimes(n, 0)
    Xt, yt = nested_regimes(n_test, 1)
    rows = [
        {
            "model": "true model",
            "experts": 4,
            "train log-lik / n": float("nan"),
            "held-out log-lik / n": -0.5 * np.log(2 * np.pi * np.e * NOISE**2),
            "df": float("nan"),
            "seconds": float("nan"),
        }
    ]
    fits = {}
    specs = [
        ("MoERegressor(n_experts=2)", lambda: MoERegressor(2, random_state=0).fit(X, y)),
        ("MoERegressor(n_experts=4)", lambda: MoERegressor(4, random_state=0).fit(X, y)),
        ("HierarchicalMoERegressor(depth=2)",
         lambda: HierarchicalMoERegressor(2, random_state=0).fit(X, y)),
        ("HierarchicalMoERegressor(depth=3), start_from depth 2",
         lambda: HierarchicalMoERegressor(3, random_state=0).fit(
             X, y, start_from=fits["HierarchicalMoERegressor(depth=2)"])),
    ]  # fmt: skip
    for name, fit in specs:
        m, secs = timed(fit)
        fits[name] = m
        if name == "HierarchicalMoERegressor(depth=2)":
            for j in (0, 1):  # the root splits on x0, the nodes below on x1
                fig = plot_hme_tree(m, X, feature=j, xlabel=f"x{j} (the other at its mean)")
                fig.savefig(HERE / "results" / f"hme_tree_x{j}.png", dpi=110)
        rows.append(
            {
                "model": name,
                "experts": m.n_experts,
                "train log-lik / n": m.log_likelihood(X, y),
                "held-out log-lik / n": m.log_likelihood(Xt, yt),
                "df": m.n_parameters(),
                "seconds": secs,
            }
        )
    return rows


def table(rows: list[dict], floats: dict[str, str]) -> str:
    frame = pd.DataFrame(rows)
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in frame.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, float):
                cells.append("" if np.isnan(v) else format(v, floats.get(c, ".3f")))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="training rows of the nested problem")
    ap.add_argument("--n-test", type=int, default=50_000)
    ap.add_argument("--skip-r", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "hme.md"))
    args = ap.parse_args()
    start_load = load_line()
    print(f"load average at start: {start_load}", flush=True)
    with tempfile.TemporaryDirectory(prefix="moekit_hme_") as tmp:
        tone, note = tonedata_rows(Path(tmp), args.skip_r)
    print("tonedata done", flush=True)
    nested = nested_rows(args.n, args.n_test)
    end_load = load_line()
    lines = [
        "# Hierarchical MoE: moekit vs mixtools' hmeEM, and trees vs flat MoE",
        "",
        f"Generated by `python bench/hme.py`; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cores. Load average "
        f"(1/5/15 min) at start {start_load}, at end {end_load}. moekit seconds are "
        "medians of 3 fits (n_init=10, init='auto'); R's one run, one core.",
        "",
        "## tonedata: `tuned ~ stretchratio` (150 rows)",
        "",
        "Total log-likelihoods (higher is better): each tool's own, and recomputed here "
        "from the fitted parameters with one formula. hmeEM fits two experts under a "
        "logistic gate, which is a tree of depth 1 with two leaves; its documented "
        f"result is {HMEEM_REFERENCE}. The depth-2 tree has no peer in mixtools.",
        "",
    ]
    if tone:
        lines.append(
            table(tone, {"seconds": ".2f", "log-lik (own)": ".4f", "log-lik (recomputed)": ".4f"})
        )
        ours = next(r for r in tone if "depth=1" in r["tool"])["log-lik (recomputed)"]
        theirs = tone[0]["log-lik (recomputed)"]
        lines += [
            "",
            f"Depth 1 minus hmeEM (recomputed): {ours - theirs:+.2e} (target: >= 0, i.e. at "
            f"least hmeEM's {HMEEM_REFERENCE}). With moekit's default tol=1e-6 (on the mean) "
            "the fit stops about 1e-6 below (total); the tolerance above is hmeEM's own.",
            "",
            "The depth-2 tree's gain (seen in a run of this benchmark) comes from two "
            "sharp leaves: one on the responses that equal the stretch ratio (tuned = "
            "0.003 + 0.999 stretchratio, noise 0.005, 56 rows) and one on those near 2 "
            "(tuned = 2.001 + 0.005 stretchratio, noise 0.023, 17 rows), where hmeEM's two "
            "experts have noise 0.137 and 0.047.",
        ]
    else:
        lines.append(note)
    lines += [
        "",
        f"## Four regimes in nested regions ({args.n:,} training rows, {args.n_test:,} held out)",
        "",
        "Mean log-likelihood per row; df = parameter count.",
        "",
        table(
            nested,
            {
                "seconds": ".2f",
                "df": ".0f",
                "train log-lik / n": ".4f",
                "held-out log-lik / n": ".4f",
            },
        ),
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
