"""The report of one fitted ``MoERegressor`` or ``MoEClassifier``: its sections and
its page."""

from __future__ import annotations

import html
from typing import Any

import numpy as np

from moekit.plotting import _pyplot, expert_colors, plot_criterion
from moekit.report.classification import class_expert_figure, confusion_figure
from moekit.report.describe import (
    coefficient_summary,
    expert_shares,
    feature_names,
    fit_facts,
    model_formula,
    summary_text,
)
from moekit.report.families import family_check
from moekit.report.headline import (
    HEADLINE_LEVEL,
    fit_baseline,
    held_out_check,
    two_column_target,
)
from moekit.report.page import embed_png, heading, html_page, html_table
from moekit.report.regression import (
    COVERAGE_HEADER,
    WIDTH_ROWS,
    coverage,
    fit_figure,
    gate_figure,
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
    baseline=None,
    check=None,
    figures: dict | None = None,
    rows: dict | None = None,
    test_rows: dict | None = None,
) -> str:
    """The report of a fitted ``MoERegressor`` (or ``MoEClassifier``) as HTML.

    Parameters
    ----------
    model : fitted estimator
    X, y : array-like
        The rows it was fitted on.
    X_test, y_test : array-like, optional
        Held-out rows: the coverage of the predictive intervals (with its binomial
        interval) and the held-out log-likelihood are computed on them, and compared
        with one expert's (on the training rows, said so, if absent).
    table : pandas.DataFrame, optional
        ``select_n_experts``'s table when K was chosen: the criterion against K.
    criterion, target, source : str
        The criterion's name, the target's name, where the data came from.
    summary : Summary, optional
        ``model.summary(X, y)`` when already computed (it is the costly part).
    baseline : fitted estimator, optional
        The model with one expert, fitted on the same rows, for the held-out
        comparison; fitted here (:func:`~moekit.report.headline.fit_baseline`) when
        absent and rows are held out.
    check : HeldOutCheck, optional
        ``held_out_check(model, X_test, y_test, baseline)`` when already computed
        (:func:`~moekit.report.headline.held_out_check`); computed here when absent.
    figures : dict, optional
        Filled with each figure's PNG bytes under its section's key ("fit", "gate",
        "convergence", ...), for a caller that also writes them to files.
    rows, test_rows : dict, optional
        The ``sample_weight``, ``offset`` and ``y_upper`` of the fitted and of the
        held-out rows (as ``fit`` takes them): the log-likelihoods are weighted, the
        predictions take the offset, censored rows enter the P-P panel by Kaplan-Meier.

    Returns
    -------
    str
        A whole HTML document; every figure is inline.
    """
    kind = type(model).__name__
    parts = [f"<h1>{html.escape(kind)}: {html.escape(target)}</h1>"]
    parts += report_sections(model, X, y, X_test=X_test, y_test=y_test, table=table,
                             criterion=criterion, target=target, source=source,
                             summary=summary, baseline=baseline, check=check,
                             figures=figures, rows=rows, test_rows=test_rows)  # fmt: skip
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
    baseline=None,
    check=None,
    figures: dict | None = None,
    rows: dict | None = None,
    test_rows: dict | None = None,
) -> list[str]:
    """The sections of :func:`html_report`, as HTML fragments.

    ``prefix`` starts every section's id and ``level`` sets its heading level, so
    that several models' sections share one page (``moekit demo``'s tour). Every
    number comes from :mod:`moekit.report.describe` and
    :mod:`moekit.report.headline`, as ``moekit fit`` and ``moekit inspect`` print them.
    """
    X = np.asarray(getattr(X, "values", X), dtype=float)
    y = np.asarray(getattr(y, "values", y))
    rows = rows or {}
    names = feature_names(model, X.shape[1])
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
    held_rows = (test_rows or {}) if held else rows
    offset_h, offset_s = held_rows.get("offset"), rows.get("offset")
    offset_s = None if offset_s is None else np.asarray(offset_s)[show]
    y_upper = held_rows.get("y_upper")

    def h(key: str, title: str) -> str:
        return heading(level, prefix, key, title)

    if held and baseline is None:
        baseline = fit_baseline(model, named(model, X), y, rows)
    if check is None:
        check = held_out_check(model, Xh, yh, baseline, held_rows)
    stats = fit_facts(model, named(model, X), y, rows)  # the experts, then the fit's numbers
    facts = [
        ["data", source or "arrays"],
        ["rows fitted", len(y)],
        *([["formula", str(model.formula_)]] if getattr(model, "formula_", None) else []),
        ["features", _short_list(names)],
        *([label, value] for label, value in stats[:1]),
        ["expert / gate", f"{getattr(model, 'expert', '?')} / {getattr(model, 'gate', '?')}"],
        *([label, value] for label, value in stats[1:]),
        [f"log-likelihood per row ({where})", check.log_likelihood],
    ]  # fmt: skip
    if baseline is not None:
        facts.append([f"log-likelihood per row, one expert ({where})",
                      check.baseline_log_likelihood])  # fmt: skip
    if check.covered >= 0:
        facts.append([f"{HEADLINE_LEVEL:.0%} intervals cover ({where})", check.coverage_text()])
    parts = [h("summary", "Summary")]
    if check.verdict():
        parts.append(f'<p class="warning">{html.escape(check.verdict())}</p>')
    parts.append(html_table(facts))
    trials = two_column_target(model)  # y: successes and failures; drawn as proportions
    if regression:
        parts += [h("formula", "The model"),
                  f"<pre>{html.escape(model_formula(model, names, target))}</pre>"]  # fmt: skip
        drawn, label = (ys[:, 0] / ys.sum(1), f"{target} (proportion of successes)") if trials \
            else (ys, target)  # fmt: skip
        column = None
        if drawn.ndim == 2:  # several responses: the first one's fit is drawn
            label = f"{target.split(', ')[0]} (the first of {drawn.shape[1]} responses)"
            drawn, column = drawn[:, 0], 0
        upper_s = rows.get("y_upper")
        upper_s = None if upper_s is None else np.asarray(upper_s, dtype=float)[show]
        fig = fit_figure(model, Xs, drawn, names, label, y_model=ys, offset=offset_s,
                         column=column, y_upper=upper_s)  # fmt: skip
        parts += [h("fit", "The data and each expert's fit"), embed_png(fig, "fit", figures)]
        if column is not None:
            parts.append(f'<p class="note">{html.escape(label)}: the figure draws it; the '
                         "coefficients below give every response.</p>")  # fmt: skip
    parts.append(h("gate", "Where the gate sends each input"))
    parts.append(_gate_part(model, Xs, names, regression, figures))
    if regression and not trials and yh.ndim == 1 and y_upper is None:
        cover = html_table(coverage(model, Xh, yh, offset_h), COVERAGE_HEADER)
        parts += [h("coverage", f"Predictive intervals on {where}"), cover]
        if len(yh) > WIDTH_ROWS:
            parts.append(f'<p class="note">Coverage over all {len(yh):,} rows; mean width '
                         f"over {WIDTH_ROWS:,} of them at random.</p>")  # fmt: skip
    if regression:
        check_part = family_check(model, Xh, yh, y_upper=y_upper, offset=offset_h, where=where,
                                  figures=figures)  # fmt: skip
        if check_part is not None:
            parts += [h("family", check_part[0]), *check_part[1]]
    else:
        pred = model.predict(named(model, Xh))
        acc = float(np.mean(pred == yh))
        parts += [h("coverage", f"Accuracy on {where}"), html_table([["accuracy", acc]]),
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
    parts += [h("coefficients", "Coefficients"), _coefficients_part(model, X, y, summary, rows)]
    sizes = np.asarray(model.expert_sizes_, dtype=float)
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.bar(np.arange(len(sizes)), sizes, color=expert_colors(len(sizes)))
    ax.set_xticks(np.arange(len(sizes)))
    ax.set_xlabel("expert")
    ax.set_ylabel("rows (sum of responsibilities)")
    shares = [[k, float(s), float(f)] for k, (s, f) in enumerate(zip(sizes, expert_shares(model),
                                                                      strict=True))]  # fmt: skip
    parts += [h("sizes", "How much data each expert handles"), embed_png(fig, "sizes", figures),
              html_table(shares, ["expert", "rows", "share"])]  # fmt: skip
    return parts


def _gate_part(model, X, names, regression: bool, figures) -> str:
    """The gate's figure, or the sentence that says where the gate is shown instead."""
    K = len(np.atleast_1d(model.expert_sizes_))
    if K == 1:
        return '<p class="note">One expert: there is no gate; g(x) = 1.</p>'
    if regression and X.shape[1] == 1 and getattr(model, "gate", None) != "constant":
        return (f'<p class="note">The gate sees one feature, {html.escape(names[0])}: its '
                "weights g_k(x) are the lower panel of the figure above.</p>")  # fmt: skip
    fig = gate_figure(model, X, names)
    if fig is not None:
        return embed_png(fig, "gate", figures)
    weights = ", ".join(f"{w:.3f}" for w in model.gate_weights(named(model, X[:1]))[0])
    return (f'<p class="note">The gate does not depend on x: every input goes to the experts '
            f"with the same weights g = ({weights}).</p>")  # fmt: skip


def _coefficients_part(model, X, y, summary, rows=None) -> str:
    """The coefficient table as ``moekit fit`` prints it, or a note saying why there is none."""
    n_params = int(model.n_parameters()) if hasattr(model, "n_parameters") else 0
    if n_params > MAX_TABLE_PARAMETERS:
        return (f'<p class="note">{n_params} parameters: too many to list here; '
                "<code>model.summary(X, y)</code> gives them with their standard "
                "errors.</p>")  # fmt: skip
    reason = ""
    if summary is None:
        summary, reason = coefficient_summary(model, named(model, X), y, rows=rows)
    if summary is None:
        return f'<p class="note">No coefficient table: {html.escape(reason)}</p>'
    return f"<pre>{html.escape(summary_text(summary))}</pre>"


def _short_list(names: list[str], most: int = 12) -> str:
    if len(names) <= most:
        return ", ".join(names)
    return f"{', '.join(names[:most])}, ... ({len(names)} in all)"
