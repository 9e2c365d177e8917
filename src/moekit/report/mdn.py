"""The report of a fitted mixture density network (:class:`~moekit.MDNRegressor`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from moekit.plotting import _pyplot, plot_conditional_density
from moekit.report.page import embed_png, heading, html_table
from moekit.report.regression import COVERAGE_HEADER, coverage


def mdn_sections(
    model: Any,
    X,
    y,
    *,
    X_test,
    y_test,
    target: str = "y",
    source: str = "",
    prefix: str = "",
    level: int = 2,
    truth=None,
) -> list[str]:
    """Sections for a fitted one-input :class:`~moekit.MDNRegressor`: the facts, the
    conditional density p(y | x) with its modes and mean, interval coverage on held-out
    rows, and the training curve. ``truth``: optional (x, y) points of the true
    branches, drawn over the density."""
    X = np.asarray(X, dtype=float).reshape(len(X), -1)
    Xh = np.asarray(X_test, dtype=float).reshape(len(X_test), -1)
    y, yh = np.ravel(np.asarray(y, float)), np.ravel(np.asarray(y_test, float))

    def h(key: str, title: str) -> str:
        return heading(level, prefix, key, title)

    facts = [
        ["data", source or "arrays"],
        ["rows fitted / held out", f"{len(y)} / {len(yh)}"],
        ["mixture components", model.n_components],
        ["hidden layers", str(tuple(model.hidden_layer_sizes))],
        ["epochs", f"{model.n_iter_} ({'stopped early' if model.converged_ else 'max_iter'})"],
        ["log-likelihood per row (fitted rows)", float(model.log_likelihood(X, y))],
        ["log-likelihood per row (held-out rows)", float(model.log_likelihood(Xh, yh))],
    ]
    parts = [h("summary", "Summary"), html_table(facts)]
    if X.shape[1] == 1:
        parts += [h("density", f"p({target} | x): every branch, not their average"),
                  embed_png(plot_conditional_density(model, X[:, 0], y, truth=truth,
                                                ylabel=target))]  # fmt: skip
    cover = html_table(coverage(model, Xh, yh), COVERAGE_HEADER)
    parts += [h("coverage", f"Predictive intervals on {len(yh)} held-out rows"), cover]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    hist = np.asarray(model.log_likelihood_history_)
    ax.plot(np.arange(1, len(hist) + 1), hist)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training log-likelihood per row")
    parts += [h("convergence", "How training climbed"), embed_png(fig)]
    return parts
