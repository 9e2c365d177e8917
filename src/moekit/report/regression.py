"""The parts of a report proper to a regression mixture: the model as a formula,
the data with each expert's fit, the gate's map and the predictive intervals'
coverage."""

from __future__ import annotations

from typing import Any

import numpy as np

from moekit.plotting import _named as named
from moekit.plotting import _pyplot, expert_colors, plot_regression_fit

LEVELS = (0.5, 0.8, 0.9, 0.95)
"""Nominal levels of the central predictive intervals whose coverage is reported."""


def feature_names(model, X) -> list[str]:
    """The names the model was fitted with, else ``x0, x1, ...``."""
    names = getattr(model, "feature_names_in_", None)
    return [str(n) for n in names] if names is not None else [f"x{j}" for j in range(X.shape[1])]


def model_formula(model, names: list[str], target: str) -> str:
    """The fitted regression mixture written out, in the data's units."""
    K = model.n_experts
    lines = [f"p({target} | x) = sum over k = 1..{K} of g_k(x) p_k({target} | x), where"]
    coef, icpt = np.atleast_2d(model.coef_), np.atleast_1d(model.intercept_)
    cols = getattr(model, "_expert_cols", None)
    enames = names if cols is None else [names[c] for c in cols]
    sd = getattr(model, "noise_std_", None)
    for k in range(K):
        c = np.ravel(coef[k])
        mean = f"{float(np.ravel(icpt[k])[0]):.4g}" + "".join(
            f" {'-' if b < 0 else '+'} {abs(b):.4g}·{n}" for b, n in zip(c, enames, strict=False)
        )
        if model.expert == "poisson":
            lines.append(f"  expert {k}: Poisson with log mean = {mean}")
        elif sd is not None:
            lines.append(f"  expert {k}: N(mean = {mean}, sd = {float(np.ravel(sd[k])[0]):.4g})")
        else:
            lines.append(f"  expert {k}: mean = {mean}")
    if model.gate == "constant" or K == 1:
        w = model.gate_weights(named(model, np.zeros((1, len(names)))))[0]
        lines.append("  g(x) = (" + ", ".join(f"{v:.3f}" for v in w) + "), whatever x")
    elif model.gate == "softmax":
        gc, gi = np.atleast_2d(model.gate_coef_), np.ravel(model.gate_intercept_)
        gcols = getattr(model, "_gate_cols", None)
        gnames = names if gcols is None else [names[c] for c in gcols]
        lines.append("  g(x) = softmax over k of s_k(x), with")
        for k in range(K):
            s = f"{gi[k]:.4g}" + "".join(
                f" {'-' if b < 0 else '+'} {abs(b):.4g}·{n}"
                for b, n in zip(gc[k], gnames, strict=False)
            )
            lines.append(f"    s_{k}(x) = {s}")
    else:
        lines.append(f"  g(x): a {model.gate} gate (a network; no closed form to print)")
    return "\n".join(lines)


def fit_figure(model, X, y, names, target):
    """The data with each expert's fit for one feature; observed against predicted else."""
    plt = _pyplot()
    if X.shape[1] == 1:
        return plot_regression_fit(model, X, y, xlabel=names[0], ylabel=target)
    resp = model.responsibilities(named(model, X), y).argmax(1)
    fig, ax = plt.subplots(figsize=(6, 5))
    colors = expert_colors(model.n_experts)
    pred = model.predict(named(model, X))
    for k in range(model.n_experts):
        sel = resp == k
        ax.scatter(pred[sel], y[sel], s=8, color=colors[k], label=f"expert {k}", alpha=0.7)
    lo, hi = np.nanmin([pred.min(), y.min()]), np.nanmax([pred.max(), y.max()])
    ax.plot([lo, hi], [lo, hi], color="k", lw=1)
    ax.set_xlabel(f"predicted {target} (E[y|x])")
    ax.set_ylabel(f"observed {target}")
    ax.set_title("observed against predicted, coloured by the most responsible expert")
    ax.legend(fontsize=8)
    return fig


def gate_figure(model, X, names):
    """argmax_k g_k(x) over the two gate features whose slopes spread the most."""
    gcols = getattr(model, "_gate_cols", None)
    cols = list(range(X.shape[1])) if gcols is None else list(gcols)
    if model.gate != "softmax" or len(cols) < 2 or model.n_experts < 2:
        return None
    spread = np.ptp(np.atleast_2d(model.gate_coef_), axis=0) * X[:, cols].std(0)
    a, b = (cols[i] for i in np.argsort(-spread)[:2])
    plt = _pyplot()
    ga = np.linspace(X[:, a].min(), X[:, a].max(), 150)
    gb = np.linspace(X[:, b].min(), X[:, b].max(), 150)
    A, B = np.meshgrid(ga, gb)
    grid = np.tile(X.mean(0), (A.size, 1))
    grid[:, a], grid[:, b] = A.ravel(), B.ravel()
    owner = model.gate_weights(named(model, grid)).argmax(1).reshape(A.shape)
    from matplotlib.colors import ListedColormap

    colors = expert_colors(model.n_experts)
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.pcolormesh(A, B, owner, cmap=ListedColormap(colors), vmin=-0.5,
                  vmax=model.n_experts - 0.5, alpha=0.35, shading="auto")  # fmt: skip
    ax.scatter(X[:, a], X[:, b], s=5, color="k", alpha=0.4)
    ax.set_xlabel(names[a])
    ax.set_ylabel(names[b])
    ax.set_title("the gate's choice, argmax_k g_k(x) (other features at their means)")
    return fig


WIDTH_ROWS = 2000
"""Rows (at random) over which the mean interval width is taken on larger data."""


def coverage(model, X, y) -> list[list[Any]]:
    """Share of rows inside each central interval, and the intervals' mean width.

    Inside the central alpha interval [F^{-1}(a), F^{-1}(b)], a = (1 - alpha) / 2 and
    b = (1 + alpha) / 2, exactly when a <= F(y) <= b (for counts, where F jumps:
    F(y) >= a and F(y - 1) < b), so coverage needs the CDF at y alone, not the
    quantiles' root finding; the widths are averaged over at most ``WIDTH_ROWS`` rows.
    """
    d = model.predict_distribution(named(model, X))
    F = d.cdf(y)
    F_below = d.cdf(y - 1) if d.family == "poisson" else F
    rows_w = np.arange(len(y))
    if len(y) > WIDTH_ROWS:
        rows_w = np.sort(np.random.default_rng(0).choice(len(y), WIDTH_ROWS, replace=False))
    dw = d[rows_w]
    rows = []
    for level in LEVELS:
        a, b = (1 - level) / 2, (1 + level) / 2
        inside = (F >= a) & ((F_below < b) if d.family == "poisson" else (F <= b))
        lo, hi = dw.interval(level)
        rows.append([f"{level:.0%}", float(inside.mean()), float(np.mean(hi - lo))])
    return rows
