"""The parts of a report proper to a regression mixture: the model as a formula,
the data with each expert's fit, the gate's map and the predictive intervals'
coverage."""

from __future__ import annotations

from typing import Any

import numpy as np

from moekit.plotting import _named as named
from moekit.plotting import _pyplot, expert_colors, plot_regression_fit
from moekit.report.describe import feature_names, model_formula
from moekit.report.headline import expected_inside, inside_interval, wilson_interval

__all__ = ["COVERAGE_HEADER", "LEVELS", "WIDTH_ROWS", "coverage", "feature_names",
           "fit_figure", "gate_figure", "model_formula", "named"]  # fmt: skip

LEVELS = (0.5, 0.8, 0.9, 0.95)
"""Nominal levels of the central predictive intervals whose coverage is reported."""


def fit_figure(model, X, y, names, target, y_model=None, offset=None, column=None,
               y_upper=None):  # fmt: skip
    """The data with each expert's fit for one feature; observed against predicted else.

    ``y`` is drawn; ``y_model`` is y as the model reads it, where the two differ
    (successes and failures, drawn as proportions). With an ``offset`` the rows'
    predictions take it, and observed is drawn against predicted; with several
    responses, ``column`` says which one ``y`` is (drawn against its prediction).
    ``y_upper`` (the censored fit's upper bounds of these rows) marks the rows whose
    y is only a lower bound, and the colours are the responsibilities of their
    intervals.
    """
    plt = _pyplot()
    bound = None
    if y_upper is not None:  # a row is censored where its upper bound is not its y
        lower = np.asarray(y if y_model is None else y_model, dtype=float)
        bound = np.asarray(y_upper, dtype=float) != (lower[:, 0] if lower.ndim == 2 else lower)
    if X.shape[1] == 1 and offset is None and column is None:
        return plot_regression_fit(model, X, y, xlabel=names[0], ylabel=target, censored=bound)
    y_model = y if y_model is None else y_model
    extra = {} if y_upper is None else {"y_upper": y_upper}
    resp = model.responsibilities(named(model, X), y_model, offset, **extra).argmax(1)
    fig, ax = plt.subplots(figsize=(6, 5))
    K = len(np.atleast_1d(model.expert_sizes_))  # less any that EM removed
    colors = expert_colors(K)
    pred = model.predict(named(model, X), **({} if offset is None else {"offset": offset}))
    pred = pred if column is None else pred[:, column]
    bound = np.zeros(len(y), bool) if bound is None else bound
    for k in range(K):
        sel = (resp == k) & ~bound
        ax.scatter(pred[sel], y[sel], s=8, color=colors[k], label=f"expert {k}", alpha=0.7)
        sel = (resp == k) & bound
        if sel.any():
            ax.scatter(pred[sel], y[sel], s=18, marker="^", facecolors="none",
                       edgecolors=colors[k], alpha=0.7,
                       label=f"expert {k}, censored: y is a lower bound")  # fmt: skip
    lo, hi = np.nanmin([pred.min(), y.min()]), np.nanmax([pred.max(), y.max()])
    ax.plot([lo, hi], [lo, hi], color="k", lw=1)
    ax.set_xlabel(f"predicted {target} (E[y|x])")
    ax.set_ylabel(f"observed {target}")
    ax.set_title("observed against predicted, coloured by the most responsible expert")
    ax.legend(fontsize=8)
    return fig


GATE_GRID = 25
"""Points along each gate feature at which its sway on the gate is measured."""


def gate_sway(model, X, cols) -> np.ndarray:
    """How much each feature in ``cols`` moves the gate: the range of g(x) summed over
    experts, as the feature runs over its data's range with the others at their means.

    Measured on the fitted gate itself, so softmax, tree and network gates are ranked
    alike (a constant gate sways nothing).
    """
    grid = np.tile(X.mean(0), (GATE_GRID * len(cols), 1))
    for i, c in enumerate(cols):
        grid[i * GATE_GRID : (i + 1) * GATE_GRID, c] = np.linspace(X[:, c].min(), X[:, c].max(),
                                                                 GATE_GRID)  # fmt: skip
    g = model.gate_weights(named(model, grid)).reshape(len(cols), GATE_GRID, -1)
    return np.ptp(g, axis=1).sum(-1)


def gate_figure(model, X, names):
    """Where the gate sends each input: g_k(x) along the one feature that moves it, or
    argmax_k g_k(x) over the two that move it most, with a legend of the experts'
    colours; None for a gate that does not depend on x (constant, or one expert)."""
    gcols = getattr(model, "_gate_cols", None)
    cols = list(range(X.shape[1])) if gcols is None else [int(c) for c in gcols]
    K = len(np.atleast_1d(model.expert_sizes_))
    if K < 2 or getattr(model, "gate", None) == "constant":
        return None
    sway = gate_sway(model, X, cols)
    if sway.max() < 1e-9:
        return None
    order = [cols[i] for i in np.argsort(-sway)]
    plt = _pyplot()
    colors = expert_colors(K)
    rest = "" if X.shape[1] == 1 else " (other features at their means)"
    if len(cols) == 1:
        a = order[0]
        grid = np.tile(X.mean(0), (200, 1))
        grid[:, a] = np.linspace(X[:, a].min(), X[:, a].max(), 200)
        g = model.gate_weights(named(model, grid))
        fig, ax = plt.subplots(figsize=(6, 3))
        for k in range(K):
            ax.plot(grid[:, a], g[:, k], color=colors[k], lw=2, label=f"expert {k}")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel(names[a])
        ax.set_ylabel("gate g_k(x)")
        ax.set_title("the gate's weights" + rest)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        return fig
    a, b = order[:2]
    ga = np.linspace(X[:, a].min(), X[:, a].max(), 150)
    gb = np.linspace(X[:, b].min(), X[:, b].max(), 150)
    A, B = np.meshgrid(ga, gb)
    grid = np.tile(X.mean(0), (A.size, 1))
    grid[:, a], grid[:, b] = A.ravel(), B.ravel()
    owner = model.gate_weights(named(model, grid)).argmax(1).reshape(A.shape)
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(6, 5))
    ax.pcolormesh(A, B, owner, cmap=ListedColormap(colors), vmin=-0.5, vmax=K - 0.5,
                  alpha=0.35, shading="auto")  # fmt: skip
    ax.scatter(X[:, a], X[:, b], s=5, color="k", alpha=0.4)
    ax.set_xlabel(names[a])
    ax.set_ylabel(names[b])
    ax.set_title("the gate's choice, argmax_k g_k(x)" + rest, fontsize=10)
    handles = [Patch(facecolor=colors[k], alpha=0.35, edgecolor="0.4", label=f"expert {k}")
               for k in range(K)]  # fmt: skip
    ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5),
              frameon=False, title="region of")  # fmt: skip
    return fig


WIDTH_ROWS = 2000
"""Rows (at random) over which the mean interval width is taken on larger data."""


COVERAGE_HEADER = ["nominal", "expected", "covered", "95% interval of covered", "mean width"]
"""The columns of :func:`coverage`'s rows."""


def coverage(model, X, y, offset=None) -> list[list[Any]]:
    """Share of rows inside each central interval, the share the model expects there,
    its binomial interval, and the intervals' mean width.

    Whether a row is inside needs the CDF at y alone (see
    :func:`~moekit.report.headline.inside_interval`); the share's interval is Wilson's;
    the expected share (the level, or more for counts:
    :func:`~moekit.report.headline.expected_inside`) and the widths are averaged over
    at most ``WIDTH_ROWS`` rows.
    """
    d = model.predict_distribution(named(model, X),
                                   **({} if offset is None else {"offset": offset}))  # fmt: skip
    rows_w = np.arange(len(y))
    if len(y) > WIDTH_ROWS:
        rows_w = np.sort(np.random.default_rng(0).choice(len(y), WIDTH_ROWS, replace=False))
    dw = d[rows_w]
    rows = []
    for level in LEVELS:
        inside = inside_interval(d, y, level)
        lo, hi = dw.interval(level)
        k_lo, k_hi = wilson_interval(int(inside.sum()), len(y))
        expected = float(expected_inside(dw, level).mean())
        rows.append([f"{level:.0%}", expected, float(inside.mean()), f"{k_lo:.3f}-{k_hi:.3f}",
                     float(np.mean(hi - lo))])  # fmt: skip
    return rows
