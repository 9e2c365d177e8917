"""Conditional densities on inverse problems: MDN vs an MLP's Gaussian vs k-NN.

    python bench/mdn.py              # writes bench/results/mdn.md

Every model sees the same training rows and is scored on the same held-out rows
of Bishop's toy inverse problem and of the two-link robot arm
(:mod:`moekit.datasets.inverse`). The score is the mean held-out log-likelihood
log p(y | x) in the data's units (nats per sample; higher is better); time is
the wall-clock seconds of everything a model needs to be ready, including the
choice of its settings on a validation split where it has any.

- **MDN**: :class:`moekit.MDNRegressor` with its defaults (5 components, two
  hidden layers of 64, tanh, Adam at 1e-3), with a smaller, faster network, and
  on the arm with ReLU; early stopping on 10% of the rows.
- **MLP + Gaussian**: scikit-learn's MLPRegressor (standardised data, early
  stopping) for the mean, and N(y; mean, s^2) with s^2 the variance of the
  training residuals of each output: the density a plain regressor implies.
- **k-NN density**: p(y | x) = (1/k) sum_{j in N_k(x)} N(y; y_j, h^2 I) on
  standardised data, k and h chosen on a validation split (20% of the rows).
- **MoE (EM)**: :class:`moekit.MoERegressor`, 5 linear experts, softmax gate.
- For Bishop's problem, the true conditional density, known from the generator,
  gives the ceiling.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.special import logsumexp
from sklearn.exceptions import ConvergenceWarning
from sklearn.neighbors import NearestNeighbors
from sklearn.neural_network import MLPRegressor
from threadpoolctl import threadpool_limits

from moekit import MDNRegressor, MoERegressor
from moekit.datasets import make_bishop_inverse, make_robot_arm

RESULTS = Path(__file__).resolve().parent / "results" / "mdn.md"
LOG_2PI = np.log(2 * np.pi)
SMALL = {"n_components": 3, "hidden_layer_sizes": (32, 32), "learning_rate": 3e-3}


def as_2d(y):
    return y.reshape(len(y), -1)


class Standardiser:
    def __init__(self, A):
        self.mean, sd = A.mean(0), A.std(0)
        self.scale = np.where(sd > 0, sd, 1.0)

    def __call__(self, A):
        return (A - self.mean) / self.scale


# ------------------------------------------------------------------ peers
def mlp_gaussian(X, y, X_test, y_test, seed):
    """MLPRegressor for the mean, the training residuals' variance for the spread."""
    sx, sy = Standardiser(X), Standardiser(as_2d(y))
    mlp = MLPRegressor(
        hidden_layer_sizes=(64, 64), early_stopping=True, max_iter=1000, random_state=seed
    )
    mlp.fit(sx(X), sy(as_2d(y)).squeeze())
    var = as_2d(sy(as_2d(y)) - as_2d(mlp.predict(sx(X)))).var(0)  # standardised units
    resid = sy(as_2d(y_test)) - as_2d(mlp.predict(sx(X_test)))
    ll = -0.5 * (LOG_2PI + np.log(var) + resid**2 / var)
    return float(np.mean(ll.sum(1)) - np.log(sy.scale).sum())


def knn_density(X, y, X_test, y_test, seed):
    """A k-nearest-neighbour kernel density of y, k and bandwidth picked on validation."""
    rng = np.random.default_rng(seed)
    sx, sy = Standardiser(X), Standardiser(as_2d(y))
    Z, T = sx(X), sy(as_2d(y))
    perm = rng.permutation(len(Z))
    n_val = len(Z) // 5
    val, fit = perm[:n_val], perm[n_val:]

    def mean_ll(Zref, Tref, Zq, Tq, k, h):
        idx = NearestNeighbors(n_neighbors=k).fit(Zref).kneighbors(Zq, return_distance=False)
        d2 = ((Tq[:, None, :] - Tref[idx]) ** 2).sum(-1)  # (n, k)
        m = T.shape[1]
        log_k = -0.5 * d2 / h**2 - m * (np.log(h) + 0.5 * LOG_2PI)
        return float(np.mean(logsumexp(log_k, axis=1) - np.log(k)))

    grid = [(k, h) for k in (5, 10, 20, 50, 100) for h in (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)]
    best = max(grid, key=lambda kh: mean_ll(Z[fit], T[fit], Z[val], T[val], *kh))
    ll = mean_ll(Z, T, sx(X_test), sy(as_2d(y_test)), *best)
    return ll - float(np.log(sy.scale).sum()), f"k = {best[0]}, h = {best[1]} sd"


# ------------------------------------------------------------------ benchmark
def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bishop_oracle(prob, X, t_true):
    """The true p(t | x) of Bishop's generator: uniform on {t : |x - f(t)| <= noise}."""
    f = prob.forward(np.linspace(0.0, 1.0, 20001))[:, 0]
    # the measure of the set (t ~ U(0, 1)), 500 rows at a time to bound the memory
    length = np.concatenate(
        [(np.abs(X[i : i + 500] - f[None]) <= prob.noise).mean(1) for i in range(0, len(X), 500)]
    )
    ok = np.abs(X[:, 0] - prob.forward(t_true)[:, 0]) <= prob.noise
    return float(np.mean(np.where(ok, -np.log(length), -np.inf)))


def run_problem(name, train, test, mdn_configs, seed, oracle=None):
    rows = []
    X, y, Xt, yt = train.X, train.y, test.X, test.y
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for label, kwargs in mdn_configs:
            mdn, secs = timed(lambda kw=kwargs: MDNRegressor(random_state=seed, **kw).fit(X, y))
            note = (
                f"{mdn.n_components} components, {mdn.hidden_layer_sizes}, {mdn.activation}, "
                f"lr {mdn.learning_rate:g}; {mdn.n_iter_} epochs"
            )
            rows.append((name, f"MDN, {label} (moekit)", mdn.log_likelihood(Xt, yt), secs, note))
        ll, secs = timed(lambda: mlp_gaussian(X, y, Xt, yt, seed))
        rows.append((name, "MLPRegressor + Gaussian (sklearn)", ll, secs, "(64, 64), early stop"))
        (ll, note), secs = timed(lambda: knn_density(X, y, Xt, yt, seed))
        rows.append((name, "k-NN conditional density", ll, secs, note))
        moe, secs = timed(lambda: MoERegressor(5, n_init=3, random_state=seed).fit(X, y))
        rows.append((name, "MoE, EM (moekit)", moe.log_likelihood(Xt, yt), secs,
                     "5 linear experts, softmax gate, 3 starts"))  # fmt: skip
    if oracle is not None:
        rows.append(
            (name, "true p(y | x) (the ceiling)", oracle, float("nan"), "from the generator")
        )
    for r in rows:
        print(f"  {r[1]:38s} held-out log-lik {r[2]:8.3f}   {r[3]:7.2f} s   {r[4]}", flush=True)
    return rows


def render(rows, n_train, n_test, load_before, load_after) -> str:
    lines = [
        "# Conditional densities on inverse problems: MDN vs MLP + Gaussian vs k-NN",
        "",
        f"Generated by `python bench/mdn.py`; torch {torch.__version__} on the CPU; "
        f"{torch.get_num_threads()} thread(s) for torch and for numpy's BLAS alike, "
        f"{os.cpu_count()} cores; 1-minute load average "
        f"{load_before:.2f} at the start and {load_after:.2f} at the end (other work on "
        "the machine slows every row alike). Training rows: "
        + ", ".join(f"{k} {v:,}" for k, v in n_train.items())
        + f"; {n_test:,} held-out rows each. Log-likelihoods are mean nats per sample in "
        "the data's units (higher is better); seconds include choosing settings on a "
        "validation split.",
        "",
        "| problem | model | held-out log-lik | fit s | settings |",
        "|---|---|---:|---:|---|",
    ]
    for p, m, ll, s, note in rows:
        secs = "" if np.isnan(s) else f"{s:.2f}"
        lines.append(f"| {p} | {m} | {ll:.3f} | {secs} | {note} |")
    lines += ["", "Best fitted model per problem (held-out log-likelihood):", ""]
    for problem in dict.fromkeys(r[0] for r in rows):
        fitted = [r for r in rows if r[0] == problem and not np.isnan(r[3])]
        best = max(fitted, key=lambda r: r[2])
        gauss = next(r for r in fitted if r[1].startswith("MLPRegressor"))
        lines.append(
            f"- {problem}: {best[1]}, {best[2]:.3f} nats, {best[2] - gauss[2]:.2f} nats per "
            "sample above the MLP's Gaussian"
        )
    lines += [
        "",
        "The MLP's Gaussian is centred on the conditional mean, between the branches of",
        "the inverse, so it must be wide; the mixtures put their mass on the branches.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-test", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for torch and for numpy's BLAS alike (default 1)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    # one policy for every model: these networks are small, and on a shared machine
    # extra BLAS or OpenMP threads mostly wait for each other (measured: the MLP ran
    # 7 to 20 times slower with 2 BLAS threads than with 1 on a busy 2-core machine)
    torch.set_num_threads(args.threads)
    with threadpool_limits(args.threads):
        run(args)


def run(args) -> None:
    load_before = os.getloadavg()[0]
    n_train = {"Bishop": 2000, "robot arm": 5000}
    rows = []
    print("Bishop's inverse problem", flush=True)
    train_b = make_bishop_inverse(n_train["Bishop"], random_state=args.seed)
    test_b = make_bishop_inverse(args.n_test, random_state=args.seed + 1)
    rows += run_problem(
        "Bishop",
        train_b,
        test_b,
        [("defaults", {}), ("small", SMALL)],
        args.seed,
        oracle=bishop_oracle(train_b, test_b.X, test_b.y),
    )
    print("two-link robot arm", flush=True)
    rows += run_problem(
        "robot arm",
        make_robot_arm(n_train["robot arm"], random_state=args.seed),
        make_robot_arm(args.n_test, random_state=args.seed + 1),
        [("defaults", {}), ("small", SMALL), ("relu", {"activation": "relu"})],
        args.seed,
    )
    report = render(rows, n_train, args.n_test, load_before, os.getloadavg()[0])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".md.tmp")
    tmp.write_text(report)
    tmp.replace(args.out)  # whole or not at all
    print(report)


if __name__ == "__main__":
    main()
