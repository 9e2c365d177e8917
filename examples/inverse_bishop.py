"""Bishop's inverse problem: learn t from x = t + 0.3 sin(2 pi t) + noise
======================================================================

For x between about 0.35 and 0.65, three values of t give the same x. A regressor
of the mean answers with an average of the three, which is itself no answer; a
mixture density network (MDN) and a mixture of experts with a softmax gate learn
the whole conditional density p(t | x) and keep every branch.

The script fits both, prints their held-out log-likelihoods next to the best any
single Gaussian can do, and draws p(t | x) as a heat map with its modes, the
conditional mean and the true branches.

Run: ``python examples/inverse_bishop.py [--out examples/output/]``
"""

import argparse
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from sklearn.exceptions import ConvergenceWarning

from moekit import MDNRegressor, MoERegressor
from moekit.datasets import make_bishop_inverse
from moekit.plotting import plot_conditional_density


def best_single_gaussian_ll(prob, X, t_true):
    """Held-out log-likelihood of the moment-matched Gaussian of the true p(t | x)."""
    t = np.linspace(0.0, 1.0, 20001)
    w = (np.abs(X - prob.forward(t)[:, 0][None]) <= prob.noise).astype(float)
    w /= w.sum(1, keepdims=True)
    mean = w @ t
    var = w @ t**2 - mean**2
    return np.mean(-0.5 * (np.log(2 * np.pi * var) + (t_true - mean) ** 2 / var))


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    train = make_bishop_inverse(2000, random_state=0)
    test = make_bishop_inverse(2000, random_state=1)
    models = {
        "MDN, 3 components": MDNRegressor(
            3, hidden_layer_sizes=(32, 32), learning_rate=3e-3, random_state=0
        ),
        "MoE, 5 linear experts, softmax gate": MoERegressor(5, n_init=5, random_state=0),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for model in models.values():
            model.fit(train.X, train.y)

    print("held-out mean log-likelihood (nats per sample)")
    oracle = best_single_gaussian_ll(train, test.X, test.y)
    print(f"  {'best single Gaussian (oracle)':38s}{oracle:.3f}")
    for name, model in models.items():
        print(f"  {name:38s}{model.log_likelihood(test.X, test.y):.3f}")

    branch_t = np.linspace(0, 1, 400)
    truth = (train.forward(branch_t)[:, 0], branch_t)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True, constrained_layout=True)
    for ax, (name, model) in zip(axes, models.items(), strict=True):
        plot_conditional_density(model, train.X[:, 0], train.y, grid=221, truth=truth,
                                 xlabel="x (observed)", title=name, ax=ax)  # fmt: skip
    axes[0].set_ylabel("t (to recover)")
    axes[1].set_ylabel("")
    fig.suptitle("Bishop's inverse problem: the predictive density keeps all three branches")
    path = out / "inverse_bishop.png"
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "moekit example").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples/output"),
                        help="folder for the figure (default: examples/output/)")  # fmt: skip
    main(parser.parse_args().out)
