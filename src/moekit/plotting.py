"""Figures users look at instead of reading numbers.

Every function draws on a given matplotlib Axes (or makes a figure) and returns
the figure; nothing is shown or written unless asked. matplotlib is imported
lazily, with a non-interactive backend when no display is set.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    if not os.environ.get("DISPLAY") and matplotlib.get_backend().lower() not in ("agg", "pdf"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _named(model, A: np.ndarray):
    """Rows as the model was fitted on them: a frame with its column names, if it had any
    (a model fitted on a frame warns when it is given bare arrays)."""
    names = getattr(model, "feature_names_in_", None)
    if names is None:
        return A
    import pandas as pd

    return pd.DataFrame(A, columns=names, copy=False)


def expert_colors(n: int) -> list:
    """One distinct color per expert (tab10, then tab20)."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def plot_regression_fit(
    model: Any,
    X,
    y,
    *,
    feature: int = 0,
    alpha: float = 0.9,
    xlabel: str | None = None,
    ylabel: str | None = None,
    title: str | None = None,
    censored=None,
):
    """Data, each expert's line, the predictive mean and band, and the gate weights.

    For a model of one input feature (or a slice along ``feature`` with the others
    at their means). Top panel: the data, every expert's mean line (drawn solid
    where its gate weight exceeds 1/2, dashed elsewhere), the predictive mean
    E[y|x] and the central ``alpha`` interval of p(y|x). Bottom panel: the gate
    weights g_k(x). ``censored`` (a boolean mask of the rows) marks responses known
    only to lie above the y drawn (a censored row's lower bound): they are drawn as
    open triangles, not as observations.

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _pyplot()
    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=float)
    bound = np.zeros(len(y), bool) if censored is None else np.asarray(censored, bool)
    x = X[:, feature]
    grid_x = np.linspace(x.min(), x.max(), 400)
    grid = np.tile(X.mean(0), (len(grid_x), 1))
    grid[:, feature] = grid_x
    d = model.predict_distribution(_named(model, grid))
    w, means = d.weights, d.means
    lo, hi = d.interval(alpha)
    K = w.shape[1]
    colors = expert_colors(K)
    fig, (ax, axg) = plt.subplots(
        2, 1, figsize=(8, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    ax.fill_between(grid_x, lo, hi, color="0.85", label=f"{alpha:.0%} predictive interval")
    ax.scatter(x[~bound], y[~bound], s=12, color="0.25", zorder=3, label="data")
    if bound.any():
        ax.scatter(x[bound], y[bound], s=22, marker="^", facecolors="none", zorder=3,
                   edgecolors="0.25", label="censored: y is a lower bound")  # fmt: skip
    span = np.ptp(y)
    for k in range(K):
        mk = np.where(
            (means[:, k] > y.min() - 0.2 * span) & (means[:, k] < y.max() + 0.2 * span),
            means[:, k],
            np.nan,
        )
        ax.plot(grid_x, mk, "--", color=colors[k], lw=1.0, alpha=0.7)
        ax.plot(
            grid_x,
            np.where(w[:, k] > 0.5, mk, np.nan),
            "-",
            color=colors[k],
            lw=2.2,
            label=f"expert {k}",
        )
    ax.plot(grid_x, d.mean(), color="black", lw=1.6, label="E[y | x]")
    ax.set_ylabel(ylabel or "y")
    ax.set_ylim(y.min() - 0.15 * span, y.max() + 0.15 * span)
    ax.legend(loc="upper left", fontsize=8, ncol=2)
    if title:
        ax.set_title(title)
    for k in range(K):
        axg.plot(grid_x, w[:, k], color=colors[k], lw=2)
    axg.set_ylim(-0.03, 1.03)
    axg.set_ylabel("gate g_k(x)")
    axg.set_xlabel(xlabel or f"x[{feature}]")
    fig.tight_layout()
    return fig


def plot_conditional_density(
    model: Any,
    x,
    y,
    *,
    grid: int = 200,
    truth=None,
    xlabel: str = "x",
    ylabel: str = "y",
    title: str | None = None,
    ax=None,
):
    """The predictive density p(y | x) of a one-input model as a heat map.

    Drawn over the data's range, with the modes of p(y | x) at a few dozen inputs
    (white dots; modes whose density is under 2% of the highest at that input are
    left out, as a far component still makes a negligible local maximum), the
    conditional mean E[y | x] (dashed) and, where given, ``truth``: (x, y) points of
    the true branches (dotted). Where several y fit one x (an inverse problem), the
    density keeps every branch while the mean falls between them.

    Parameters
    ----------
    model : fitted one-input moekit estimator with ``predict_distribution``
    x, y : array-like of shape (n,)
        The data, which set the ranges.
    grid : int, default=200
        Grid points along each axis.
    truth : tuple of arrays (x, y), optional
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _pyplot()
    x, y = np.ravel(np.asarray(x, float)), np.ravel(np.asarray(y, float))
    pad_x, pad_y = 0.05 * np.ptp(x), 0.05 * np.ptp(y)
    xs = np.linspace(x.min() - pad_x, x.max() + pad_x, grid)
    ys = np.linspace(y.min() - pad_y, y.max() + pad_y, grid)
    d = model.predict_distribution(_named(model, xs[:, None]))
    dens = np.stack([np.exp(d.logpdf(np.full(len(xs), t))) for t in ys])
    fig = ax.figure if ax is not None else plt.subplots(figsize=(7, 5))[0]
    ax = ax if ax is not None else fig.axes[0]
    mesh = ax.pcolormesh(xs, ys, dens, shading="auto", cmap="magma",
                         vmax=float(np.quantile(dens, 0.99)))  # fmt: skip
    if truth is not None:
        ax.plot(*truth, color="cyan", lw=1, ls=":", label="truth")
    xm = xs[:: max(1, grid // 36)]
    found = model.predict_distribution(_named(model, xm[:, None])).modes(return_density=True)
    for i, (modes, at) in enumerate(found):
        modes = modes[at >= 0.02 * at.max()]
        ax.scatter(np.full(len(modes), xm[i]), modes, s=10, color="white",
                   label="modes of p(y | x)" if i == 0 else None)  # fmt: skip
    ax.plot(xs, d.mean(), color="lime", lw=1.5, ls="--", label="E[y | x]")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(ys[0], ys[-1])
    ax.legend(loc="upper left", fontsize=8, framealpha=0.8)
    if title:
        ax.set_title(title)
    fig.colorbar(mesh, ax=ax, label="p(y | x)")
    return fig


def plot_criterion(table, criterion: str = "bic", ax=None):
    """A model-choice criterion against the number of experts, best marked.

    Parameters
    ----------
    table : pandas.DataFrame
        With columns ``n_experts`` and ``criterion``.
    """
    plt = _pyplot()
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
    ks, vals = np.asarray(table["n_experts"]), np.asarray(table[criterion])
    ax.plot(ks, vals, "o-", color="tab:blue")
    # select_n_experts marks its choice; lower is better but for the ELBO
    best = int(np.flatnonzero(table["best"])[0]) if "best" in table else int(np.argmin(vals))
    ax.plot(
        ks[best],
        vals[best],
        "o",
        ms=12,
        mfc="none",
        mec="tab:red",
        mew=2,
        label=f"best: K = {ks[best]}",
    )
    ax.set_xlabel("number of experts K")
    ax.set_ylabel(criterion.upper())
    ax.set_xticks(ks)
    ax.legend()
    if fig is not None:
        fig.tight_layout()
    return fig if fig is not None else ax.figure


def plot_lm_training(log: dict, title: str | None = None):
    """Training and held-out loss of a language model, and the first MoE layer's load.

    Parameters
    ----------
    log : dict
        ``TrainLog.as_dict()``: ``step``, ``train_loss``, ``eval_step``, ``val_loss``,
        ``tokens_per_expert`` (per evaluation, per MoE layer, per expert; a flat list
        per evaluation is one layer's).
    """
    plt = _pyplot()
    fig, (ax, axl) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    ax.plot(log["step"], log["train_loss"], color="0.7", lw=0.8, label="train (per step)")
    ax.plot(log["eval_step"], log["val_loss"], "o-", color="tab:red", label="held out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte, + aux)")
    ax.legend()
    if title:
        ax.set_title(title)
    loads = log.get("tokens_per_expert") or []
    if loads:
        last = np.asarray(loads[-1], dtype=float)
        if last.ndim == 2:  # TrainLog: one row per MoE layer; the first is drawn
            last = last[0]
        axl.bar(np.arange(len(last)), last / max(last.sum(), 1.0), color=expert_colors(len(last)))
        axl.axhline(1.0 / len(last), color="black", ls="--", lw=1, label="uniform")
        axl.set_xlabel("expert")
        axl.set_ylabel("share of routed tokens")
        axl.set_title("first MoE layer, last evaluation")
        axl.legend()
    fig.tight_layout()
    return fig


def _subtree_colors(b: int, depth: int) -> list:
    """Colors of the b^depth nodes of one level: the hue of their ancestor below the
    root, lightened along the rest of their path, so a subtree reads as one hue."""
    from matplotlib.colors import to_rgb

    base = expert_colors(b)
    per = b ** (depth - 1)  # nodes of this level below each child of the root
    out = []
    for j in range(b**depth):
        mix = 0.55 * (j % per) / per if per > 1 else 0.0
        out.append(tuple((1 - mix) * c + mix for c in to_rgb(base[j // per])))
    return out


def plot_hme_tree(
    model: Any,
    X,
    *,
    feature: int = 0,
    xlabel: str | None = None,
    title: str | None = None,
):
    """Which region of x every node of a hierarchical MoE handles, level by level.

    One panel per level of the tree (root's children at the top, the leaves at the
    bottom), each stacking the probabilities P(node | x) of reaching that level's
    nodes along one feature (the others at their means): the products of the gate
    probabilities along the nodes' paths, which partition 1 on every level. A node
    of level l splits its band into its children's bands on level l + 1.

    Parameters
    ----------
    model : fitted HierarchicalMoERegressor or HierarchicalMoEClassifier
    X : array-like of shape (n_samples, n_features)
        Data giving the range of the feature and the other features' means.
    feature : int, default=0
    xlabel, title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _pyplot()
    X = np.asarray(X, dtype=float)
    if not 0 <= feature < X.shape[1]:
        raise ValueError(f"feature must be a column of X in [0, {X.shape[1]}); got {feature}.")
    x = X[:, feature]
    grid_x = np.linspace(x.min(), x.max(), 400)
    grid = np.tile(X.mean(0), (len(grid_x), 1))
    grid[:, feature] = grid_x
    levels = model.node_weights(_named(model, grid))
    b = model.branching
    fig, axes = plt.subplots(
        len(levels), 1, figsize=(8, 1.9 * len(levels) + 0.8), sharex=True, squeeze=False
    )
    for depth, (ax, w) in enumerate(zip(axes[:, 0], levels, strict=True), start=1):
        n_nodes = w.shape[1]
        colors = _subtree_colors(b, depth)
        paths = [
            ".".join(str((j // b**i) % b) for i in reversed(range(depth))) for j in range(n_nodes)
        ]
        kind = "leaf" if depth == len(levels) else "node"
        labels = [
            f"{kind} {j} ({p})" if kind == "leaf" else f"node {p}" for j, p in enumerate(paths)
        ]
        ax.stackplot(grid_x, w.T, colors=colors, labels=labels, alpha=0.85)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"level {depth}\nP(node | x)")
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
    axes[-1, 0].set_xlabel(xlabel or f"x[{feature}]")
    if title:
        axes[0, 0].set_title(title)
    fig.tight_layout()
    return fig
