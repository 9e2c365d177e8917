"""MoEClassifier against LogisticRegression and HistGradientBoosting on four data sets.

    python bench/classifier.py            # writes bench/results/classifier.md

iris, wine, breast cancer and digits from ``sklearn.datasets``; 5-fold stratified
cross-validation, every model in a ``StandardScaler`` pipeline. Reported per data
set and model: mean held-out log-loss and accuracy over the folds, the fit time per
fold, moekit's time over LogisticRegression's, and whether every moekit fold
converged (and its EM iterations). moekit runs twice: with its defaults, and with one
start (``n_init=1``), whose time over LogisticRegression's is the per-start figure.

Timings are noisy on a shared machine. Each fold is fitted ``--repeats`` times,
the three models interleaved within a repeat so that they see the same load; a
model's time per fold is the median over repeats, and the moekit/LR ratio is the
median over repeats of the two models' summed fold times within the same repeat.
The load average at the start and the end is written with the results.

Every library runs on one thread by default (``--threads``): the data sets have at
most 1,797 rows, too few for threads to pay, and on a loaded 2-core machine
two-thread BLAS made LogisticRegression 10 to 70 times slower (its threads wait on
each other), which would flatter moekit's ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.datasets import load_breast_cancer, load_digits, load_iris, load_wine
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from moekit import MoEClassifier

HERE = Path(__file__).resolve().parent
DATASETS = {
    "iris": load_iris,
    "wine": load_wine,
    "breast_cancer": load_breast_cancer,
    "digits": load_digits,
}
MODELS = {
    "moekit": lambda: MoEClassifier(n_experts=3, random_state=0),
    "moekit, one start": lambda: MoEClassifier(n_experts=3, random_state=0, n_init=1),
    "LogisticRegression": lambda: LogisticRegression(max_iter=10_000),
    "HistGradientBoosting": lambda: HistGradientBoostingClassifier(random_state=0),
}
TARGET_START = 20.0
"""One start (``n_init=1``) at most this many times LogisticRegression's fit."""
TARGET_HGB = 1.0
"""The default fit no slower than HistGradientBoosting's."""


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "n/a"


def fit_timed(make, X, y):
    model = make_pipeline(StandardScaler(), make())
    with warnings.catch_warnings():
        # convergence is reported in the table; collapsed-expert warnings are moekit's
        # advice to users, not part of the comparison
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        model.fit(X, y)
        elapsed = time.perf_counter() - t0
    return model, elapsed


def run_dataset(name: str, repeats: int) -> dict:
    X, y = DATASETS[name](return_X_y=True)
    folds = list(StratifiedKFold(5, shuffle=True, random_state=0).split(X, y))
    times = {m: np.zeros((repeats, len(folds))) for m in MODELS}
    scores = {m: {"log_loss": [], "accuracy": []} for m in MODELS}
    converged = {m: [] for m in MODELS if m.startswith("moekit")}
    n_iter = {m: [] for m in converged}
    for r in range(repeats):
        for f, (tr, te) in enumerate(folds):
            for m, make in MODELS.items():
                model, elapsed = fit_timed(make, X[tr], y[tr])
                times[m][r, f] = elapsed
                if r > 0:
                    continue  # the fits are deterministic: score the first repeat
                proba = model.predict_proba(X[te])
                scores[m]["log_loss"].append(log_loss(y[te], proba, labels=model.classes_))
                scores[m]["accuracy"].append(accuracy_score(y[te], model.predict(X[te])))
                if m in converged:
                    converged[m].append(bool(model[-1].converged_))
                    n_iter[m].append(int(model[-1].n_iter_))

    def ratio(a: str, b: str) -> float:
        # summed fold times of two models within the same repeat, median over repeats
        return float(np.median(times[a].sum(1) / times[b].sum(1)))

    return {
        "n": X.shape[0],
        "d": X.shape[1],
        "C": len(np.unique(y)),
        "times": {m: float(np.median(t, axis=0).mean()) for m, t in times.items()},
        "scores": {m: {k: float(np.mean(v)) for k, v in s.items()} for m, s in scores.items()},
        "ratio_lr": ratio("moekit", "LogisticRegression"),
        "ratio_hgb": ratio("moekit", "HistGradientBoosting"),
        "ratio_start": ratio("moekit, one start", "LogisticRegression"),
        "converged": converged,
        "n_iter": n_iter,
    }


def render(results: dict, repeats: int, threads: str, load_start: str, load_end: str) -> str:
    lines = [
        "# MoEClassifier vs LogisticRegression and HistGradientBoosting",
        "",
        f"Generated by `python bench/classifier.py`; scikit-learn {sklearn.__version__}, "
        f"torch {torch.__version__}, {threads}, "
        f"{os.cpu_count()} cores ({platform.machine()}); 1-minute load average "
        f"{load_start} at the start, {load_end} at the end.",
        "",
        "5-fold stratified CV (shuffled, seed 0), every model after a `StandardScaler`. "
        "MoEClassifier(n_experts=3, random_state=0) with its defaults (10 starts), and with "
        "one start (`n_init=1`: one k-means start run to convergence); "
        "LogisticRegression() with max_iter=10,000; HistGradientBoostingClassifier"
        "(random_state=0). Log-loss and accuracy are means over the held-out folds; "
        f"fit seconds per fold are the mean over folds of the median of {repeats} "
        "repeats, the four models interleaved; a time ratio is the two models' summed fold "
        "times within a repeat, median over repeats.",
        "",
        "| data (n, d, C) | model | log-loss | accuracy | fit s per fold | time ratio |"
        " folds converged (EM iterations) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name, res in results.items():
        label = f"{name} ({res['n']}, {res['d']}, {res['C']})"
        for m in MODELS:
            s = res["scores"][m]
            extra = ratio = ""
            if m == "moekit":
                ratio = f"{res['ratio_hgb']:.2f}x HGB, {res['ratio_lr']:.0f}x LR"
            elif m == "moekit, one start":
                ratio = f"{res['ratio_start']:.1f}x LR"
            if m in res["converged"]:
                conv = res["converged"][m]
                extra = f"{sum(conv)}/{len(conv)} ({', '.join(map(str, res['n_iter'][m]))})"
            lines.append(
                f"| {label} | {m} | {s['log_loss']:.4f} | {s['accuracy']:.4f} | "
                f"{res['times'][m]:.4f} | {ratio} | {extra} |"
            )
            label = ""
    lines += ["", "## Targets", ""]
    for name, res in results.items():
        ll = res["scores"]
        best_other = min(ll[m]["log_loss"] for m in ("LogisticRegression", "HistGradientBoosting"))
        ok_ll = ll["moekit"]["log_loss"] <= best_other + 1e-4
        ok_hgb = res["ratio_hgb"] <= TARGET_HGB
        ok_start = res["ratio_start"] <= TARGET_START
        ok_c = all(res["converged"]["moekit"])

        def met(ok: bool) -> str:
            return "met" if ok else "not met"

        lines.append(
            f"- {name}: log-loss {ll['moekit']['log_loss']:.4f} vs the better of LR and HGB "
            f"{best_other:.4f} ({met(ok_ll)}); time {res['ratio_hgb']:.2f}x "
            f"HistGradientBoosting's (target <= {TARGET_HGB:g}x: {met(ok_hgb)}); one start "
            f"{res['ratio_start']:.1f}x LogisticRegression's (target <= {TARGET_START:g}x: "
            f"{met(ok_start)}); the default fit converged in every fold: {'yes' if ok_c else 'no'}."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument(
        "--threads", type=int, default=1, help="threads for every library; 0: their defaults"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "classifier.md")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
        threads = f"{args.threads} thread(s) for torch, BLAS and OpenMP"
    else:
        threads = f"library default threads ({torch.get_num_threads()} for torch)"
    load_start = loadavg()
    results = {}
    for name in args.datasets:
        t0 = time.perf_counter()
        results[name] = run_dataset(name, args.repeats)
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
    text = render(results, args.repeats, threads, load_start, loadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
