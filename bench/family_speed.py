"""One EM iteration of each expert family against one weighted Gram of its design.

    python bench/family_speed.py               # writes bench/results/family_speed.md
    python bench/family_speed.py --rows 200000 # a smaller n

For every family (linear, Poisson, binomial, Gamma, lognormal, negative binomial, and
the zero-inflated Poisson ``["zero", "poisson", "poisson"]``), n rows of d = 5
standard-normal features and a target drawn from K = 3 experts of that family behind
a softmax gate; a short fit (5 iterations) gives the parameters, then one EM
iteration (E-step pass + M-step) at them is timed against one weighted Gram matrix
X^T diag(w) X (``_common.em_iteration_vs_gram``: medians of 7 runs; the Gram timed
before and after, the faster kept), after one untimed round. The Gram is the least
work an iteration can do: every expert's weighted least squares or Newton step needs
one. Target: at most 4x,
like the Gaussian experts (``bench/classic_vs_r.py``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from _common import em_iteration_vs_gram, load_line

HERE = Path(__file__).resolve().parent
FAMILIES = ["linear", "poisson", "binomial", "gamma", "lognormal", "negative_binomial",
            "zero,poisson,poisson"]  # fmt: skip


def draw(family: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """X (n, 5) and a target of ``family`` from three experts split by a softmax gate."""
    X = rng.normal(size=(n, 5))
    region = np.argmax(X[:, :3] @ np.array([[2.0, 0, -2], [0, 2, -2], [-1, 1, 0]]), axis=1)
    coef = np.array([[0.3, 0.4, -0.2, 0.1, 0.0], [-0.4, 0.1, 0.3, 0.0, 0.2],
                     [0.6, -0.3, 0.0, 0.2, -0.1]])  # fmt: skip
    eta = np.einsum("ij,ij->i", X, coef[region]) + np.array([0.2, 0.8, -0.3])[region]
    if family == "linear":
        return X, eta + 0.5 * rng.normal(size=n)
    if family == "poisson":
        return X, rng.poisson(np.exp(eta)).astype(float)
    if family == "binomial":
        s = rng.binomial(10, 1 / (1 + np.exp(-eta)))
        return X, np.c_[s, 10 - s].astype(float)
    if family == "gamma":
        return X, np.exp(eta) * rng.gamma(3.0, 1 / 3.0, size=n)
    if family == "lognormal":
        return X, np.exp(eta + 0.4 * rng.normal(size=n))
    if family == "negative_binomial":
        mu = np.exp(eta)
        return X, rng.negative_binomial(2.0, 2.0 / (2.0 + mu)).astype(float)
    # zero-inflated Poisson: the first region's rows are zeros
    return X, np.where(region == 0, 0.0, rng.poisson(np.exp(eta))).astype(float)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "family_speed.md")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    before = load_line()
    rows = []
    # a first, untimed round: the first timings of a process (allocator, thread pool)
    # ran 1.6x slow in two of three runs
    em_iteration_vs_gram(*draw("linear", args.rows, np.random.default_rng(1)), 3)
    for family in FAMILIES:
        X, y = draw(family, args.rows, rng)
        expert = family.split(",") if "," in family else family
        r = em_iteration_vs_gram(X, y, 3, expert=expert)
        ratio = r["iteration"] / r["gram"]
        rows.append((family, r, ratio))
        print(f"{family}: iteration {r['iteration'] * 1e3:.1f} ms, Gram {r['gram'] * 1e3:.1f} ms, "
              f"{ratio:.2f}x", flush=True)  # fmt: skip
    lines = [
        "# One EM iteration of each expert family vs one weighted Gram",
        "",
        f"n = {args.rows:,}, d = 5, K = 3, softmax gate; torch {torch.__version__}, "
        f"{rows[0][1]['threads']} thread(s). Load average (1/5/15 min) before: {before}; "
        f"after: {load_line()}.",
        "",
        "| experts | EM iteration ms | weighted Gram ms | ratio | CPU ratio | target <= 4x |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for family, r, ratio in rows:
        cpu = r["iteration_cpu"] / r["gram_cpu"]
        verdict = "met" if ratio <= 4 else "not met"
        lines.append(f"| {family} | {r['iteration'] * 1e3:.1f} | {r['gram'] * 1e3:.1f} | "
                     f"{ratio:.2f}x | {cpu:.2f}x | {verdict} |")  # fmt: skip
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
