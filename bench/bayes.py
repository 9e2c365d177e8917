"""The Bayesian mixture of experts: interval coverage on small data, ELBO against K, fit time.

    python bench/bayes.py            # writes bench/results/bayes.md and bayes_elbo_robot_arm.png
    python bench/bayes.py --quick    # fewer draws, n up to 1e5 (a smoke run)

1. Coverage. A fixed 2-expert model with a softmax gate on 2 features
   (``make_moe_truth(2, 2, noise=0.3, random_state=0)``) draws ``--draws`` training
   sets of n = 60 and one test set of 20,000 rows. On every draw
   ``BayesianMoERegressor(2)`` (shared noise, and per-expert noise) and the
   maximum-likelihood ``MoERegressor(2)`` are fitted with their defaults; the table
   gives the share of test rows inside each fit's central 90% predictive interval
   (``predict_distribution(X).interval(0.9)``), over the draws: mean, median, sd,
   mean distance to 0.9, and the mean interval width and held-out log-likelihood.
   One torch thread (the intervals are bisections on many small tensors).
2. ELBO against K on the two-link robot arm (``make_robot_arm``, 500 training and
   5,000 test rows; angles from hand positions): ``BayesianMoERegressor(K,
   gate='softmax')`` for K = 1 to 24, each K also started from the K - 1 fit (where
   K - 1 is on the list) as ``select_n_experts`` does; the K of the highest ELBO is what
   ``select_n_experts(criterion='elbo')`` picks. Held-out predictive
   log-likelihoods beside it; the curve is drawn to bayes_elbo_robot_arm.png.
3. Fit time at n = 1e4, 1e5, 1e6 (5 features, 3 experts, softmax gate,
   ``make_moe_regression``), Bayesian and maximum likelihood side by side, each
   fit in a fresh process with the estimators' defaults and one torch thread
   (``--threads``); the peak resident memory (VmHWM) before and after the fit gives
   what the fit added.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from _common import load_line, vm_hwm_mb

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(SRC))


# ---------------------------------------------------------------------------- 1. coverage
def coverage(draws: int, n_train: int = 60, n_test: int = 20_000) -> list[dict]:
    import torch

    from moekit import BayesianMoERegressor, MoERegressor
    from moekit.datasets import make_moe_truth

    torch.set_num_threads(1)
    truth = make_moe_truth(n_features=2, n_experts=2, gate="softmax", noise=0.3, random_state=0)
    Xt, yt = truth.sample(n_test, random_state=123)
    models = {
        "Bayesian, defaults (shared noise, gate_alpha=1)": lambda s: BayesianMoERegressor(
            2, random_state=s
        ),
        "Bayesian, per-expert noise": lambda s: BayesianMoERegressor(
            2, noise="per_expert", random_state=s
        ),
        "Bayesian, gate_alpha=1e-5 (a flat gate prior)": lambda s: BayesianMoERegressor(
            2, gate_alpha=1e-5, random_state=s
        ),
        "maximum likelihood, MoERegressor defaults (gate_alpha=1e-5)": lambda s: MoERegressor(
            2, random_state=s
        ),
        "maximum likelihood, MoERegressor, gate_alpha=1": lambda s: MoERegressor(
            2, gate_alpha=1.0, random_state=s
        ),
    }
    rows = {name: {"cover": [], "width": [], "ll": [], "seconds": 0.0} for name in models}
    rng = np.random.RandomState(1)
    for d in range(draws):
        X, y = truth.sample(n_train, random_state=rng)
        for name, make in models.items():
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # collapsed experts are part of the story
                m = make(d).fit(X, y)
            rows[name]["seconds"] += time.perf_counter() - t0
            lo, hi = m.predict_distribution(Xt).interval(0.9)
            rows[name]["cover"].append(float(((yt >= lo) & (yt <= hi)).mean()))
            rows[name]["width"].append(float((hi - lo).mean()))
            rows[name]["ll"].append(m.log_likelihood(Xt, yt))
        if (d + 1) % 10 == 0:
            print(f"coverage: {d + 1} draws", flush=True)
    out = []
    for name, r in rows.items():
        c = np.asarray(r["cover"])
        out.append({
            "model": name, "mean": c.mean(), "median": np.median(c), "sd": c.std(ddof=1),
            "distance": np.abs(c - 0.9).mean(), "below_85": float((c < 0.85).mean()),
            "width": np.mean(r["width"]), "ll": np.mean(r["ll"]),
            "seconds": r["seconds"] / draws,
        })  # fmt: skip
    out.append({"model": "true p(y | x)", "ll": truth.log_likelihood(Xt, yt)})
    return out


# ---------------------------------------------------------------------------- 2. ELBO vs K
def elbo_curve(ks: list[int], n_train: int = 500, n_test: int = 5000) -> list[dict]:
    from sklearn.base import clone

    from moekit import BayesianMoERegressor
    from moekit.datasets import make_robot_arm

    train = make_robot_arm(n_train, random_state=0)
    test = make_robot_arm(n_test, random_state=1)
    template = BayesianMoERegressor(gate="softmax", random_state=0)
    rows, previous = [], None
    for k in ks:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parent = previous if previous is not None and previous.n_experts == k - 1 else None
            m = clone(template).set_params(n_experts=k).fit(train.X, train.y, start_from=parent)
        rows.append({
            "K": k, "elbo": m.elbo_ * n_train, "elbo_per_row": m.elbo_,
            "train_ll": m.log_likelihood_, "test_ll": m.log_likelihood(test.X, test.y),
            "effective": m.n_effective_experts_, "n_iter": m.n_iter_,
            "seconds": time.perf_counter() - t0,
        })  # fmt: skip
        previous = m
        print(f"ELBO: K = {k}: {rows[-1]}", flush=True)
    return rows


def plot_curve(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["K"] for r in rows]
    best = max(rows, key=lambda r: r["elbo"])
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].plot(ks, [r["elbo_per_row"] for r in rows], "o-", label="ELBO / n (training)")
    ax[0].axvline(best["K"], color="grey", ls="--", lw=1)
    ax[0].set_xlabel("experts K")
    ax[0].set_ylabel("nats per row")
    ax[0].set_title(f"ELBO picks K = {best['K']}")
    ax[0].legend(loc="lower right")
    ax[1].plot(ks, [r["train_ll"] for r in rows], "s-", label="training")
    ax[1].plot(ks, [r["test_ll"] for r in rows], "o-", label="held out")
    ax[1].axvline(best["K"], color="grey", ls="--", lw=1)
    ax[1].set_xlabel("experts K")
    ax[1].set_title("predictive log-likelihood")
    ax[1].legend(loc="lower right")
    fig.suptitle("BayesianMoERegressor on the two-link robot arm (angles from hand position)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- 3. fit time
def child_fit(kind: str, n: int, threads: int) -> dict:
    import torch

    from moekit import BayesianMoERegressor, MoERegressor
    from moekit.datasets import make_moe_regression

    torch.set_num_threads(threads)
    X, y, _ = make_moe_regression(n, n_features=5, n_experts=3, noise=0.3, random_state=0)
    before = vm_hwm_mb()
    make = {"bayes": BayesianMoERegressor, "ml": MoERegressor}[kind]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = make(3, random_state=0).fit(X, y)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "n_iter": m.n_iter_, "converged": m.converged_,
            "before_mb": before, "peak_mb": vm_hwm_mb(), "data_mb": X.nbytes / 2**20,
            "loglik": m.log_likelihood_}  # fmt: skip


def fit_times(sizes: list[int], threads: int) -> list[dict]:
    rows = []
    for n in sizes:
        for kind in ("bayes", "ml"):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", kind, str(n), str(threads)],
                capture_output=True,
                text=True,
                check=True,
            )
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({"n": n, "kind": kind, **res})
            print(f"fit time: {rows[-1]}", flush=True)
    return rows


# ---------------------------------------------------------------------------- report
def render(cov, curve, times, args, load_start, load_end, seconds) -> str:
    import torch

    best = max(curve, key=lambda r: r["elbo"])
    lines = [
        "# Bayesian mixture of experts: coverage, ELBO against K, fit time",
        "",
        f"Generated by `python bench/bayes.py{' --quick' if args.quick else ''}` in "
        f"{seconds / 60:.1f} min; torch {torch.__version__} on the CPU, {os.cpu_count()} "
        f"cores. Load average (1/5/15 min) at the start {load_start}, at the end "
        f"{load_end} (the machine is shared: other work slows every row alike).",
        "",
        f"## 1. 90% predictive intervals on n = 60 ({args.draws} draws)",
        "",
        "A 2-expert softmax-gated model on 2 features (noise sd 0.3 in both experts)",
        "draws each training set; the test set is 20,000 rows of the same model. Coverage",
        "is the share of test rows inside the fit's central 90% interval. One torch thread.",
        "",
        "| model | mean coverage | median | sd over draws | mean abs(cov - 0.9) | draws below 0.85 "
        "| mean width | held-out log-lik | fit s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in cov:
        if "mean" not in r:
            lines.append(f"| {r['model']} |  |  |  |  |  |  | {r['ll']:.3f} |  |")
            continue
        lines.append(
            f"| {r['model']} | {r['mean']:.3f} | {r['median']:.3f} | {r['sd']:.3f} | "
            f"{r['distance']:.3f} | {r['below_85']:.2f} | {r['width']:.3f} | {r['ll']:.3f} | "
            f"{r['seconds']:.2f} |"
        )
    lines += [
        "",
        "The Bayesian predictive adds the weights' posterior variance x^T B_k x to the",
        "noise variance 1 / beta, and its beta is fitted on the expected residuals (which",
        "count the parameters' spread, like dividing by n - p), where maximum likelihood",
        "divides the residual sum of squares by n_k and takes the weights as known.",
        "",
        "## 2. ELBO against K on the two-link robot arm",
        "",
        "500 training rows, 5,000 held-out rows; y = the two joint angles (2 outputs),",
        "X = the hand position; softmax gate; K = 2, 3, 4 also start from the K - 1 fit.",
        f"The highest ELBO is at **K = {best['K']}** (what `select_n_experts(...,",
        "criterion='elbo')` picks). Figure: `bayes_elbo_robot_arm.png`.",
        "",
        "| K | ELBO (total) | ELBO / n | train log-lik | held-out log-lik | effective experts "
        "| iterations | fit s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in curve:
        mark = " **" if r is best else ""
        lines.append(
            f"| {r['K']}{mark} | {r['elbo']:.1f} | {r['elbo_per_row']:.4f} | {r['train_ll']:.4f} | "
            f"{r['test_ll']:.4f} | {r['effective']} | {r['n_iter']} | {r['seconds']:.1f} |"
        )
    lines += [
        "",
        "![ELBO against K](bayes_elbo_robot_arm.png)",
        "",
        "## 3. Fit time (5 features, 3 experts, softmax gate, defaults: 10 starts on at most",
        "20,000 rows, then the best on all rows)",
        "",
        f"Each fit in a fresh process with {args.threads} torch thread(s); memory is the",
        "process's peak resident size (VmHWM) before the fit (interpreter, torch, the",
        "data) and after it.",
        "",
        "| n | model | fit s | iterations on all rows | X MiB | peak MiB before "
        "| peak MiB after | added by the fit | training log-lik |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"bayes": "BayesianMoERegressor", "ml": "MoERegressor (ML)"}
    for r in times:
        added = r["peak_mb"] - r["before_mb"]
        lines.append(
            f"| {r['n']:,} | {names[r['kind']]} | {r['seconds']:.2f} | {r['n_iter']} | "
            f"{r['data_mb']:.1f} | {r['before_mb']:.0f} | {r['peak_mb']:.0f} | {added:.0f} MiB "
            f"({added / r['data_mb']:.1f} x X) | {r['loglik']:.4f} |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--draws", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the timed fits")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(HERE / "results" / "bayes.md"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child_fit(args.child[0], int(args.child[1]), int(args.child[2]))))
        return 0
    if args.draws is None:
        args.draws = 10 if args.quick else 50
    t0 = time.perf_counter()
    load_start = load_line()
    print(f"load average {load_start}", flush=True)
    sizes = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
    times = fit_times(sizes, args.threads)
    cov = coverage(args.draws)
    ks = [1, 2, 3, 4, 6] if args.quick else [1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24]
    curve = elbo_curve(ks)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_curve(curve, out.parent / "bayes_elbo_robot_arm.png")
    report = render(cov, curve, times, args, load_start, load_line(), time.perf_counter() - t0)
    out.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
