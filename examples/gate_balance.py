"""The gate's balance penalty: how it keeps every expert in play
=============================================================

On the motorcycle data, a mixture of four linear experts with a softmax gate lets
some experts shrink to a sliver of the data. ``gate_balance=lambda`` adds
(lambda / K) sum_i sum_k log g_k(x_i) to the objective, the gate's cross-entropy to
equal weights, so that each expert keeps a share of the gate (on average at least
lambda / (K (1 + lambda))). The script fits lambda = 0, 0.01, 0.1 and 1 and draws, for
each, the data coloured by the most responsible expert with the experts' lines, and
the gate weights g_k(x) below; it prints each fit's log-likelihood and the experts'
shares.

Run: ``python examples/gate_balance.py [--out examples/output/]``
"""

import argparse
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from moekit import MoERegressor
from moekit.datasets import load_mcycle

LAMBDAS = (0.0, 0.01, 0.1, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "moekit example").splitlines()[0])
    ap.add_argument("--out", default="examples/output/")
    args = ap.parse_args()
    X, y = load_mcycle()
    grid = np.linspace(X.min(), X.max(), 400)[:, None]
    fig, axes = plt.subplots(2, len(LAMBDAS), figsize=(4 * len(LAMBDAS), 6),
                             sharex=True, sharey="row", height_ratios=[2, 1])  # fmt: skip
    for j, lam in enumerate(LAMBDAS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = MoERegressor(4, gate_balance=lam, random_state=0).fit(X, y)
        shares = m.gate_weights(X).mean(0)
        print(f"lambda = {lam:<4}: log-likelihood {m.log_likelihood(X, y):.4f} per row, "
              f"gate shares {np.round(np.sort(shares), 3)}")  # fmt: skip
        owner = m.responsibilities(X, y).argmax(1)
        top, bottom = axes[0, j], axes[1, j]
        top.scatter(X[:, 0], y, c=[f"C{k}" for k in owner], s=10)
        means = m.predict_distribution(grid).means  # (n, K)
        for k in range(m.n_experts):
            top.plot(grid[:, 0], means[:, k], color=f"C{k}", lw=1)
        top.set_ylim(y.min() - 20, y.max() + 20)
        top.set_title(f"gate_balance = {lam}\nlog-lik {m.log_likelihood(X, y):.3f} / row")
        bottom.stackplot(grid[:, 0], m.gate_weights(grid).T,
                         colors=[f"C{k}" for k in range(m.n_experts)])  # fmt: skip
        bottom.set_xlabel("time after impact (ms)")
    axes[0, 0].set_ylabel("acceleration (g)")
    axes[1, 0].set_ylabel("gate weight g_k(x)")
    fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "gate_balance.png", dpi=110)
    print(f"wrote {out / 'gate_balance.png'}")


if __name__ == "__main__":
    main()
