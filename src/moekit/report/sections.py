"""The report of one fitted ``MoERegressor`` or ``MoEClassifier``: its sections and
its page."""

from __future__ import annotations

import html
from typing import Any

import numpy as np

from moekit.plotting import _pyplot, expert_colors, plot_criterion
from moekit.report.classification import class_expert_figure, confusion_figure
from moekit.report.page import embed_png, heading, html_page, html_table
from moekit.report.regression import (
    WIDTH_ROWS,
    coverage,
    feature_names,
    fit_figure,
    gate_figure,
    model_formula,
    named,
)

PLOT_ROWS = 5000
"""Most rows drawn in a scatter plot (a random subset of larger data)."""


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
    return html_page(kind, parts)


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
    names = feature_names(model, X)
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
        return heading(level, prefix, key, title)

    ll_fit = float(model.log_likelihood(named(model, X), y))
    facts = [
        ["data", source or "arrays"],
        ["rows fitted", len(y)],
        *([["formula", str(model.formula_)]] if getattr(model, "formula_", None) else []),
        ["features", _short_list(names)],
        ["experts", model.n_experts],
        ["expert / gate", f"{getattr(model, 'expert', '?')} / {getattr(model, 'gate', '?')}"],
        ["log-likelihood per row (fitted rows)", ll_fit],
        [f"log-likelihood per row ({where})", float(model.log_likelihood(named(model, Xh), yh))],
        ["BIC", -2.0 * len(y) * ll_fit + model.n_parameters() * np.log(len(y))],
        ["EM", f"{model.n_iter_} iterations, "
               f"{'converged' if model.converged_ else 'NOT converged'}"],
    ]  # fmt: skip
    parts = [h("summary", "Summary"), html_table(facts, ["", ""])]
    if regression:
        parts += [h("formula", "The model"),
                  f"<pre>{html.escape(model_formula(model, names, target))}</pre>"]  # fmt: skip
        parts += [h("fit", "The data and each expert's fit"),
                  embed_png(fit_figure(model, Xs, ys, names, target), "fit", figures)]  # fmt: skip
    gate_fig = gate_figure(model, Xs, names)
    parts.append(h("gate", "Where the gate sends each input"))
    parts.append(embed_png(gate_fig, "gate", figures) if gate_fig is not None else
                 '<p class="note">The gate sees fewer than two features (or is constant): '
                 "its weights are in the figure and the formula above.</p>")  # fmt: skip
    if regression:
        cover = html_table(coverage(model, Xh, yh), ["nominal", "covered", "mean width"])
        parts += [h("coverage", f"Predictive intervals on {where}"), cover]
        if len(yh) > WIDTH_ROWS:
            parts.append(f'<p class="note">Coverage over all {len(yh):,} rows; mean width '
                         f"over {WIDTH_ROWS:,} of them at random.</p>")  # fmt: skip
    else:
        pred = model.predict(named(model, Xh))
        acc = float(np.mean(pred == yh))
        parts += [h("coverage", f"Accuracy on {where}"), html_table([["accuracy", acc]], ["", ""]),
                  embed_png(confusion_figure(model.classes_, yh, pred), "confusion", figures),
                  h("division", "Which expert takes which class"),
                  embed_png(class_expert_figure(model, Xh, yh), "division", figures)]  # fmt: skip
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    hist = np.asarray(model.log_likelihood_history_)
    ax.plot(np.arange(len(hist)), hist, marker=".")
    ax.set_xlabel("EM iteration (final run)")
    ax.set_ylabel("objective per row")
    parts += [h("convergence", "How EM climbed"), embed_png(fig, "convergence", figures)]
    if table is not None:
        parts += [h("criterion", f"{criterion.upper()} against K"),
                  embed_png(plot_criterion(table, criterion), "criterion", figures)]  # fmt: skip
    parts.append(h("coefficients", "Coefficients"))
    n_params = int(model.n_parameters()) if hasattr(model, "n_parameters") else 0
    if n_params > MAX_TABLE_PARAMETERS:
        parts.append(f'<p class="note">{n_params} parameters: too many to list here; '
                     "<code>model.summary(X, y)</code> gives them with their standard "
                     "errors.</p>")  # fmt: skip
    else:
        try:
            summary = model.summary(named(model, X), y) if summary is None else summary
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
    parts += [h("sizes", "How much data each expert handles"), embed_png(fig, "sizes", figures),
              html_table(shares, ["expert", "rows", "share"])]  # fmt: skip
    return parts


def _short_list(names: list[str], most: int = 12) -> str:
    if len(names) <= most:
        return ", ".join(names)
    return f"{', '.join(names[:most])}, ... ({len(names)} in all)"
