"""``moekit fit``: a mixture of experts fitted to a table, its model file and report.

The command writes ``model.moe``, ``report.txt`` (fit statistics and coefficients),
``report.html`` (:func:`moekit.report.html_report`), and, where they stand on their
own, the report's fit and criterion figures as PNG files.
"""

from __future__ import annotations

import sys
from pathlib import Path

from moekit.cli.errors import DataError, UsageError
from moekit.cli.tables import (
    columns_design,
    formula_design,
    read_table,
    split_rows,
    task_of,
)

INFORMATION_ROWS = 50_000
"""Rows on which `moekit fit` estimates the observed information of larger data (the
standard errors; see ``summary(information_rows=)``)."""


def regression_report(model, X, y, summary=None) -> str:
    """A plain-text summary of a fitted MoERegressor: fit statistics and coefficients."""
    head = [
        f"  mean log-likelihood {model.log_likelihood(X, y):.4f} per sample, "
        f"BIC {model.bic(X, y):.1f}, AIC {model.aic(X, y):.1f}",
        f"  EM: {model.n_iter_} iterations, {'converged' if model.converged_ else 'NOT converged'}",
        "",
    ]
    summary = model.summary(X, y) if summary is None else summary
    return "\n".join([*head, str(summary)])


def cmd_fit(args) -> int:
    import numpy as np

    from moekit import MoEClassifier, MoERegressor

    if (args.target is None) == (args.formula is None):
        raise UsageError("moekit fit: give either --target COL or --formula 'y ~ x1 + x2'"
                         + (", not both." if args.target else "."))  # fmt: skip
    if args.formula is not None and (args.features or args.gate_features):
        raise UsageError(
            "moekit fit: --features and --gate-features go with --target; with --formula, "
            "name the terms there and the gate's in --gate-formula."
        )
    if args.gate_formula is not None and args.formula is None:
        raise UsageError("moekit fit: --gate-formula goes with --formula.")
    frame = read_table(args.data, args.target)
    design = columns_design if args.formula is None else formula_design
    X, y, target, experts, gates, gate, unused, formula = design(args, frame)
    del frame  # X and y hold what the fit needs
    if y.isna().any():
        row = int(np.flatnonzero(y.isna().to_numpy())[0])
        raise DataError(f"moekit: the target {target!r} is missing in row {row + 1}.")
    task = task_of(y, args.task)
    if y.nunique() < 2:
        raise DataError(
            f"moekit: the target {target!r} is constant ({y.iloc[0]!r} in every row): "
            "there is nothing to fit."
        )
    if len(y) < 2 * max(args.experts):
        raise DataError(
            f"moekit: {len(y)} rows are too few for {max(args.experts)} experts; use fewer experts."
        )
    if task == "classification" and (args.expert != "linear" or gate != "softmax"):
        raise UsageError("moekit: --expert and --gate are for regressions; a classification "
                         "uses logistic experts under a softmax gate.")  # fmt: skip
    print(f"moekit fit: {task} of {target!r} on {', '.join(map(str, X.columns))} "
          f"({len(y)} rows)" + (f"; the gate sees {', '.join(gates)}" if gates else "")
          + ("; constant gate" if gate == "constant" else ""))  # fmt: skip
    if formula is not None:
        print(f"  formula: {formula}")
    if unused:
        print(f"  not used: {', '.join(unused)}")
    if not 0.0 <= args.holdout < 1.0:
        raise UsageError(f"moekit: --holdout must be in [0, 1); got {args.holdout}.")
    n_test = round(args.holdout * len(y))
    if n_test < 10 or len(y) - n_test < 2 * max(args.experts):
        n_test = 0
    X, y, X_test, y_test = split_rows(X, y, n_test, args.random_state)
    if n_test:
        print(f"  fitted on {len(y)} rows; {n_test} random rows held out for the report")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    verbose = args.verbose if args.verbose is not None else int(sys.stderr.isatty())
    settings = {"n_init": args.n_init, "random_state": args.random_state,
                "verbose": verbose, "gate_features": gates, "expert_features": experts}  # fmt: skip
    if task == "regression":
        template = MoERegressor(expert=args.expert, gate=gate, **settings)
    else:
        template = MoEClassifier(**settings)
    table = None
    if len(args.experts) == 1:
        model = template.set_params(n_experts=args.experts[0]).fit(X, y)
    else:
        from moekit import select_n_experts

        print(f"  choosing K in {args.experts[0]}-{args.experts[-1]} by BIC")
        model, table = select_n_experts(template, X, y, args.experts, "bic",
                                        verbose=max(1, verbose))  # fmt: skip
        print(f"  BIC picks K = {model.n_experts}")
        table.to_csv(out / "criterion.csv", index=False)
    if formula is not None:  # predict applies it to new data
        model.formula_ = formula
    model.save(out / "model.moe")
    summary = None
    if task == "regression":
        summary = model.summary(X, y, information_rows=INFORMATION_ROWS)
        report = regression_report(model, X, y, summary)
    else:
        report = (
            f"MoEClassifier: K = {model.n_experts}, classes {list(model.classes_)}, "
            f"training accuracy {model.score(X, y):.4f}, mean log-likelihood "
            f"{model.log_likelihood(X, y):.4f}, {model.n_iter_} EM iterations"
        )
    (out / "report.txt").write_text(report + "\n")
    from moekit.report import html_report

    figures: dict[str, bytes] = {}
    page = html_report(model, X, y, X_test=X_test, y_test=y_test, table=table,
                       target=target, source=str(args.data), summary=summary,
                       figures=figures)  # fmt: skip
    (out / "report.html").write_text(page, encoding="utf-8")
    # the report's figures that stand on their own as files, drawn once
    if task == "regression" and X.shape[1] == 1:
        (out / "fit.png").write_bytes(figures["fit"])
    if table is not None:
        (out / "bic.png").write_bytes(figures["criterion"])
    print(report)
    print(f"\nWrote {out / 'model.moe'} and {out / 'report.html'}")
    return 0
