"""A fitted mixture of experts as one HTML page that opens offline.

:func:`html_report` draws what a reader should see rather than read: the data with
each expert's fit, where the gate hands the input space to each expert, how well
the predictive intervals cover held-out rows, how EM climbed, the criterion against
K when K was chosen, the coefficients with their standard errors, how much data
each expert handles, and the model written as a formula. Figures are PNGs embedded
as data URIs, so the file needs nothing else.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np

from moekit.plotting import (
    _pyplot,
    expert_colors,
    plot_conditional_density,
    plot_criterion,
    plot_regression_fit,
)

PLOT_ROWS = 5000
"""Most rows drawn in a scatter plot (a random subset of larger data)."""

LEVELS = (0.5, 0.8, 0.9, 0.95)
"""Nominal levels of the central predictive intervals whose coverage is reported."""

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 960px; margin: 2em auto; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: right; }
th { background: #f4f4f4; } img { max-width: 100%; } .note { color: #666; }
pre { background: #f8f8f8; padding: 0.8em; overflow-x: auto; }
"""


def _png(fig, key: str | None = None, figures: dict | None = None) -> str:
    """The figure as an <img> with its PNG inline (a data URI); the figure is closed.

    With ``figures``, the PNG's bytes are also kept there under ``key``.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    if figures is not None and key is not None:
        figures[key] = buf.getvalue()
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="figure" src="data:image/png;base64,{data}">'


def _table(rows: list[list[Any]], header: list[str]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _named(model, A: np.ndarray):
    """Rows as the model was fitted on them: a frame with its column names, if it had any."""
    names = getattr(model, "feature_names_in_", None)
    if names is None:
        return A
    import pandas as pd

    return pd.DataFrame(A, columns=names, copy=False)  # a view: the report reads it


def _feature_names(model, X) -> list[str]:
    names = getattr(model, "feature_names_in_", None)
    return [str(n) for n in names] if names is not None else [f"x{j}" for j in range(X.shape[1])]


def _formula(model, names: list[str], target: str) -> str:
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
        w = model.gate_weights(_named(model, np.zeros((1, len(names)))))[0]
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


def _fit_figure(model, X, y, names, target):
    plt = _pyplot()
    if X.shape[1] == 1:
        return plot_regression_fit(model, X, y, xlabel=names[0], ylabel=target)
    resp = model.responsibilities(_named(model, X), y).argmax(1)
    fig, ax = plt.subplots(figsize=(6, 5))
    colors = expert_colors(model.n_experts)
    pred = model.predict(_named(model, X))
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


def _gate_figure(model, X, names):
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
    owner = model.gate_weights(_named(model, grid)).argmax(1).reshape(A.shape)
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


def _coverage(model, X, y) -> list[list[Any]]:
    """Share of rows inside each central interval, and the intervals' mean width.

    Inside the central alpha interval [F^{-1}(a), F^{-1}(b)], a = (1 - alpha) / 2 and
    b = (1 + alpha) / 2, exactly when a <= F(y) <= b (for counts, where F jumps:
    F(y) >= a and F(y - 1) < b), so coverage needs the CDF at y alone, not the
    quantiles' root finding; the widths are averaged over at most ``WIDTH_ROWS`` rows.
    """
    d = model.predict_distribution(_named(model, X))
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


def _heading(level: int, prefix: str, key: str, title: str) -> str:
    return f'<h{level} id="{prefix}{key}">{html.escape(title)}</h{level}>'


def _page(title: str, parts: list[str]) -> str:
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")  # fmt: skip


def html_report(
    model: Any,
    X,
    y,
    *,
    X_test=None,
    y_test=None,
    table=None,
    criterion: str = "bic",
    target: str = "y",
    source: str = "",
    summary=None,
    figures: dict | None = None,
) -> str:
    """The report of a fitted ``MoERegressor`` (or ``MoEClassifier``) as HTML.

    Parameters
    ----------
    model : fitted estimator
    X, y : array-like
        The rows it was fitted on.
    X_test, y_test : array-like, optional
        Held-out rows: the coverage of the predictive intervals and the held-out
        log-likelihood are computed on them (on the training rows, said so, if absent).
    table : pandas.DataFrame, optional
        ``select_n_experts``'s table when K was chosen: the criterion against K.
    criterion, target, source : str
        The criterion's name, the target's name, where the data came from.
    summary : Summary, optional
        ``model.summary(X, y)`` when already computed (it is the costly part).
    figures : dict, optional
        Filled with each figure's PNG bytes under its section's key ("fit", "gate",
        "convergence", ...), for a caller that also writes them to files.

    Returns
    -------
    str
        A whole HTML document; every figure is inline.
    """
    kind = type(model).__name__
    parts = [f"<h1>{html.escape(kind)}: {html.escape(target)}</h1>"]
    parts += report_sections(model, X, y, X_test=X_test, y_test=y_test, table=table,
                             criterion=criterion, target=target, source=source,
                             summary=summary, figures=figures)  # fmt: skip
    return _page(kind, parts)


MAX_TABLE_PARAMETERS = 400
"""Most parameters whose standard errors a report lists; larger models get a note."""


def report_sections(
    model: Any,
    X,
    y,
    *,
    X_test=None,
    y_test=None,
    table=None,
    criterion: str = "bic",
    target: str = "y",
    source: str = "",
    prefix: str = "",
    level: int = 2,
    summary=None,
    figures: dict | None = None,
) -> list[str]:
    """The sections of :func:`html_report`, as HTML fragments.

    ``prefix`` starts every section's id and ``level`` sets its heading level, so
    that several models' sections share one page (``moekit demo``'s tour).
    """
    X = np.asarray(getattr(X, "values", X), dtype=float)
    y = np.asarray(getattr(y, "values", y))
    names = _feature_names(model, X)
    regression = not hasattr(model, "predict_proba")
    if regression:
        y = y.astype(float)
    held = X_test is not None
    Xh = np.asarray(getattr(X_test, "values", X_test), dtype=float) if held else X
    yh = np.asarray(getattr(y_test, "values", y_test)) if held else y
    if regression:
        yh = yh.astype(float)
    where = f"{len(yh)} held-out rows" if held else "the training rows (nothing was held out)"
    show = np.arange(len(y))
    if len(y) > PLOT_ROWS:  # the figures draw a random subset; the numbers use every row
        show = np.sort(np.random.default_rng(0).choice(len(y), PLOT_ROWS, replace=False))
    Xs, ys = X[show], y[show]

    def h(key: str, title: str) -> str:
        return _heading(level, prefix, key, title)

    ll_fit = float(model.log_likelihood(_named(model, X), y))
    facts = [
        ["data", source or "arrays"],
        ["rows fitted", len(y)],
        *([["formula", str(model.formula_)]] if getattr(model, "formula_", None) else []),
        ["features", _short_list(names)],
        ["experts", model.n_experts],
        ["expert / gate", f"{getattr(model, 'expert', '?')} / {getattr(model, 'gate', '?')}"],
        ["log-likelihood per row (fitted rows)", ll_fit],
        [f"log-likelihood per row ({where})", float(model.log_likelihood(_named(model, Xh), yh))],
        ["BIC", -2.0 * len(y) * ll_fit + model.n_parameters() * np.log(len(y))],
        ["EM", f"{model.n_iter_} iterations, "
               f"{'converged' if model.converged_ else 'NOT converged'}"],
    ]  # fmt: skip
    parts = [h("summary", "Summary"), _table(facts, ["", ""])]
    if regression:
        parts += [h("formula", "The model"),
                  f"<pre>{html.escape(_formula(model, names, target))}</pre>"]  # fmt: skip
        parts += [h("fit", "The data and each expert's fit"),
                  _png(_fit_figure(model, Xs, ys, names, target), "fit", figures)]  # fmt: skip
    gate_fig = _gate_figure(model, Xs, names)
    parts.append(h("gate", "Where the gate sends each input"))
    parts.append(_png(gate_fig, "gate", figures) if gate_fig is not None else
                 '<p class="note">The gate sees fewer than two features (or is constant): '
                 "its weights are in the figure and the formula above.</p>")  # fmt: skip
    if regression:
        cover = _table(_coverage(model, Xh, yh), ["nominal", "covered", "mean width"])
        parts += [h("coverage", f"Predictive intervals on {where}"), cover]
        if len(yh) > WIDTH_ROWS:
            parts.append(f'<p class="note">Coverage over all {len(yh):,} rows; mean width '
                         f"over {WIDTH_ROWS:,} of them at random.</p>")  # fmt: skip
    else:
        pred = model.predict(_named(model, Xh))
        acc = float(np.mean(pred == yh))
        parts += [h("coverage", f"Accuracy on {where}"), _table([["accuracy", acc]], ["", ""]),
                  _png(_confusion_figure(model.classes_, yh, pred), "confusion", figures),
                  h("division", "Which expert takes which class"),
                  _png(_class_expert_figure(model, Xh, yh), "division", figures)]  # fmt: skip
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    hist = np.asarray(model.log_likelihood_history_)
    ax.plot(np.arange(len(hist)), hist, marker=".")
    ax.set_xlabel("EM iteration (final run)")
    ax.set_ylabel("objective per row")
    parts += [h("convergence", "How EM climbed"), _png(fig, "convergence", figures)]
    if table is not None:
        parts += [h("criterion", f"{criterion.upper()} against K"),
                  _png(plot_criterion(table, criterion), "criterion", figures)]  # fmt: skip
    parts.append(h("coefficients", "Coefficients"))
    n_params = int(model.n_parameters()) if hasattr(model, "n_parameters") else 0
    if n_params > MAX_TABLE_PARAMETERS:
        parts.append(f'<p class="note">{n_params} parameters: too many to list here; '
                     "<code>model.summary(X, y)</code> gives them with their standard "
                     "errors.</p>")  # fmt: skip
    else:
        try:
            summary = model.summary(_named(model, X), y) if summary is None else summary
            parts.append(f"<pre>{html.escape(str(summary))}</pre>")
        except ValueError as exc:  # no coefficients to report (MLP parts)
            parts.append(f'<p class="note">{html.escape(str(exc))}</p>')
    sizes = np.asarray(model.expert_sizes_, dtype=float)
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.bar(np.arange(len(sizes)), sizes, color=expert_colors(len(sizes)))
    ax.set_xticks(np.arange(len(sizes)))
    ax.set_xlabel("expert")
    ax.set_ylabel("rows (sum of responsibilities)")
    shares = [[k, float(s), float(s / sizes.sum())] for k, s in enumerate(sizes)]
    parts += [h("sizes", "How much data each expert handles"), _png(fig, "sizes", figures),
              _table(shares, ["expert", "rows", "share"])]  # fmt: skip
    return parts


def _short_list(names: list[str], most: int = 12) -> str:
    if len(names) <= most:
        return ", ".join(names)
    return f"{', '.join(names[:most])}, ... ({len(names)} in all)"


def _confusion_figure(classes, y, pred):
    plt = _pyplot()
    C = len(classes)
    index = {c: i for i, c in enumerate(classes)}
    counts = np.zeros((C, C))
    for a, b in zip(y, pred, strict=True):
        counts[index[a], index[b]] += 1
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * C, 1.2 + 0.45 * C))
    ax.imshow(counts, cmap="Blues")
    for i in range(C):
        for j in range(C):
            if counts[i, j]:
                ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if counts[i, j] > counts.max() / 2 else "black")  # fmt: skip
    ax.set_xticks(range(C), [str(c) for c in classes])
    ax.set_yticks(range(C), [str(c) for c in classes])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("confusion matrix")
    return fig


def _class_expert_figure(model, X, y):
    """Mean gate weight g_k(x) of each expert over the rows of each true class."""
    plt = _pyplot()
    g = model.gate_weights(_named(model, X))
    classes = list(model.classes_)
    share = np.stack([g[y == c].mean(0) if np.any(y == c) else np.zeros(g.shape[1])
                      for c in classes])  # fmt: skip
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * len(classes), 1.2 + 0.5 * g.shape[1]))
    im = ax.imshow(share.T, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(classes)), [str(c) for c in classes])
    ax.set_yticks(range(g.shape[1]), [f"expert {k}" for k in range(g.shape[1])])
    ax.set_xlabel("true class")
    ax.set_title("mean gate weight per class")
    fig.colorbar(im, ax=ax)
    return fig


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
        return _heading(level, prefix, key, title)

    facts = [
        ["data", source or "arrays"],
        ["rows fitted / held out", f"{len(y)} / {len(yh)}"],
        ["mixture components", model.n_components],
        ["hidden layers", str(tuple(model.hidden_layer_sizes))],
        ["epochs", f"{model.n_iter_} ({'stopped early' if model.converged_ else 'max_iter'})"],
        ["log-likelihood per row (fitted rows)", float(model.log_likelihood(X, y))],
        ["log-likelihood per row (held-out rows)", float(model.log_likelihood(Xh, yh))],
    ]
    parts = [h("summary", "Summary"), _table(facts, ["", ""])]
    if X.shape[1] == 1:
        parts += [h("density", f"p({target} | x): every branch, not their average"),
                  _png(plot_conditional_density(model, X[:, 0], y, truth=truth,
                                                ylabel=target))]  # fmt: skip
    cover = _table(_coverage(model, Xh, yh), ["nominal", "covered", "mean width"])
    parts += [h("coverage", f"Predictive intervals on {len(yh)} held-out rows"), cover]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    hist = np.asarray(model.log_likelihood_history_)
    ax.plot(np.arange(1, len(hist) + 1), hist)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training log-likelihood per row")
    parts += [h("convergence", "How training climbed"), _png(fig)]
    return parts


def tour_report(title: str, intro: str, chapters: list[tuple[str, str, str, list[str]]]) -> str:
    """One page of several chapters: (id, title, introduction HTML, sections)."""
    toc = "".join(f'<li><a href="#{key}">{html.escape(name)}</a></li>'
                  for key, name, _, _ in chapters)  # fmt: skip
    parts = [f"<h1>{html.escape(title)}</h1>", intro, f"<ol>{toc}</ol>"]
    for key, name, text, sections in chapters:
        parts += [f'<h2 id="{key}" class="chapter">{html.escape(name)}</h2>', text, *sections]
    return _page(title, parts)
