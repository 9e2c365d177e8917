"""``moekit fit``: a mixture of experts fitted to a table, its model file and report.

The command writes ``model.moe``, ``report.txt`` (fit statistics and coefficients),
``report.html`` (:func:`moekit.report.html_report`), and, where they stand on their
own, the report's fit and criterion figures as PNG files. With ``--no-report`` it
writes the model and ``report.txt`` alone, and matplotlib is never imported.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from moekit.cli.errors import DataError, UsageError
from moekit.cli.tables import (
    columns_design,
    formula_design,
    read_table,
    split_rows,
    task_of,
)

if TYPE_CHECKING:  # the rows' terms need numpy, which `moekit --help` does not load
    from moekit.cli.rows import RowTerms

SERIAL_ROWS = 10_000
"""Tables of at most this many rows are fitted on one PyTorch thread. Their tensors are
too small for a second thread to share the work, yet PyTorch splits some operations
(a log-sum-exp over 240 x 4 values, an exp) across its threads; on a busy machine each
split waits for a core to come free, milliseconds each time: a 300-row fit took
11.2 s on two threads against 4.6 s on one at a load of 2.5 on two cores, with the
same model."""

INFORMATION_ROWS = 50_000
"""Rows on which `moekit fit` estimates the observed information of larger data (the
standard errors; see ``summary(information_rows=)``)."""

DEFAULT_EXPERTS = (1, 2, 3, 4)
"""The numbers of experts among which BIC chooses when ``--experts`` is not given."""


def regression_report(model, X, y, summary=None, reason: str = "", target: str = "y",
                      rows: dict | None = None) -> str:  # fmt: skip
    """A plain-text summary of a fitted model: fit statistics, the model written out and
    its coefficients (:func:`moekit.report.describe.text_report`, as the report shows them)."""
    from moekit.report.describe import text_report

    return text_report(model, X, y, summary, reason, target, rows)


def experts_to_try(requested: tuple[int, ...] | None, n_rows: int) -> tuple[int, ...]:
    """``--experts`` as given, else :data:`DEFAULT_EXPERTS` less those the rows cannot
    carry (two rows per expert at least)."""
    if requested is not None:
        return requested
    return tuple(k for k in DEFAULT_EXPERTS if 2 * k <= n_rows) or (1,)


def pd_numeric(y) -> bool:
    import pandas as pd

    return bool(pd.api.types.is_numeric_dtype(y) and not pd.api.types.is_bool_dtype(y))


def cmd_fit(args) -> int:
    import numpy as np

    from moekit.cli.rows import read_row_terms

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
    args.target = check_targets(args)
    frame = read_table(args.data, args.target)
    if args.formula is None:  # their columns are not features
        rows, args.row_columns, offset_term = read_row_terms(args, frame)
        X, y, target, experts, gates, gate, unused, formula = columns_design(args, frame)
    else:
        args.row_columns = row_columns(args)
        X, y, target, experts, gates, gate, unused, formula = formula_design(args, frame)
        rows, _, offset_term = read_row_terms(args, frame, formula)
    args.offset_term = offset_term
    del frame  # X, y and the rows' terms hold what the fit needs
    if y.isna().to_numpy().any():
        row = int(np.flatnonzero(y.isna().to_numpy())[0]) // (1 if y.ndim == 1 else y.shape[1])
        raise DataError(f"moekit: the target {target!r} is missing in row {row + 1}.")
    if y.ndim == 2:  # successes and failures, or several responses: a regression
        return fit_and_report(args, X, y, target, experts, gates, gate, unused, formula,
                              "regression", rows)  # fmt: skip
    task = task_of(y, args.task)
    numeric = pd_numeric(y)
    if task == "classification" and args.task == "auto" and numeric:
        a, b = sorted(y.unique())
        print(f"moekit fit: note: the target {target!r} takes two values ({a:g}, {b:g}): "
              "fitted as a classification (--task regression fits it as numbers)")  # fmt: skip
    if y.nunique() < 2:
        raise DataError(
            f"moekit: the target {target!r} is constant ({y.iloc[0]!r} in every row): "
            "there is nothing to fit."
        )
    if task == "classification" and (args.expert != "linear" or gate != "softmax"):
        raise UsageError("moekit: --expert and --gate are for regressions; a classification "
                         "uses logistic experts under a softmax gate"
                         + (" (--task regression fits a numeric target as numbers)."
                            if numeric else "."))  # fmt: skip
    if task == "classification" and (rows.offset is not None or rows.y_upper is not None):
        raise UsageError("moekit: --offset, --censored-above and --event are for regressions "
                         "(--task regression fits a numeric target as numbers).")  # fmt: skip
    return fit_and_report(args, X, y, target, experts, gates, gate, unused, formula, task, rows)


def row_columns(args) -> set[str]:
    """The columns ``--weights``, ``--censored-above`` and ``--event`` name."""
    return {c for c in (args.weights, args.censored_above, args.event) if c is not None}


def check_targets(args) -> list[str] | None:
    """``--target`` as a list of columns (given comma-separated or repeated): one, two
    (successes and failures) for ``--expert binomial``, which takes no other, or
    several responses of linear experts."""
    targets = [c for group in args.target or () for c in group] or None
    binomial = args.expert == "binomial"
    several = targets is not None and len(targets) > 1 and not binomial
    if binomial and targets is not None and len(targets) != 2:
        raise UsageError("moekit fit: --expert binomial takes two --target columns, successes "
                         f"and failures (--target s,f); got {len(targets)}.")  # fmt: skip
    if several and args.expert != "linear":
        raise UsageError(
            f"moekit fit: several --target columns ({', '.join(targets)}) are the responses of "
            "linear experts (or the successes and failures of --expert binomial); "
            f"--expert {_expert_text(args.expert)} takes one."
        )
    if several and (args.censored_above or args.event):
        raise UsageError("moekit fit: --censored-above and --event go with one --target.")
    if args.censored_above or args.event:
        from moekit.estimators._censoring import censorable_names

        if args.expert not in censorable_names():
            raise UsageError(
                f"moekit fit: --censored-above and --event are for --expert "
                f"{', '.join(censorable_names())}; --expert {_expert_text(args.expert)} has no "
                "censored form" + (" (a list of families has none yet)."
                                   if isinstance(args.expert, list) else ".")
            )  # fmt: skip
    if args.covariance_type is not None and not several:
        raise UsageError("moekit fit: --covariance-type is the noise covariance of several "
                         "--target columns; give them (--target y1,y2).")  # fmt: skip
    if binomial and args.formula is not None:
        raise UsageError("moekit fit: --expert binomial takes its successes and failures from "
                         "--target s,f (not from --formula).")  # fmt: skip
    if isinstance(args.expert, list):  # a family per expert: K is the list's length
        K = len(args.expert)
        if args.experts is not None and args.experts != (K,):
            raise UsageError(f"moekit fit: --expert {_expert_text(args.expert)} names {K} "
                             f"experts; --experts must be {K} (or left out).")  # fmt: skip
        args.experts_from_list = True
        args.experts = (K,)
    return targets


def _expert_text(expert) -> str:
    return ",".join(expert) if isinstance(expert, list) else str(expert)


def fit_and_report(args, X, y, target, experts, gates, gate, unused, formula, task,
                   rows: RowTerms | None = None) -> int:  # fmt: skip
    """Fit (K by BIC when a range was given), save the model, write and print the
    reports; the command's exit status. ``rows`` holds the rows' weights, offsets and
    upper bounds."""
    from moekit.cli.rows import RowTerms

    rows = RowTerms() if rows is None else rows
    ks = experts_to_try(args.experts, len(y))
    if len(y) < 2 * max(ks):
        raise DataError(
            f"moekit: {len(y)} rows are too few for {max(ks)} experts; use fewer experts."
        )
    print(f"moekit fit: {task} of {target!r} on {', '.join(map(str, X.columns))} "
          f"({len(y)} rows)" + (f"; the gate sees {', '.join(gates)}" if gates else "")
          + ("; constant gate" if gate == "constant" else ""))  # fmt: skip
    if formula is not None:
        print(f"  formula: {formula}")
    for said in row_notes(args, rows):
        print(f"  {said}")
    if unused:
        print(f"  not used: {', '.join(unused)}")
    if not 0.0 <= args.holdout < 1.0:
        raise UsageError(f"moekit: --holdout must be in [0, 1); got {args.holdout}.")
    n_test = round(args.holdout * len(y))
    if n_test < 10 or len(y) - n_test < 2 * max(ks):
        n_test = 0
    X, y, X_test, y_test, rows, rows_test = split_rows(X, y, n_test, args.random_state, rows)
    if n_test:
        print(f"  fitted on {len(y)} rows; {n_test} random rows held out for the report")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    verbose = args.verbose if args.verbose is not None else int(sys.stderr.isatty())
    settings = {"n_init": args.n_init, "random_state": args.random_state, "verbose": verbose,
                "gate_features": gates, "expert_features": experts,
                **({"max_iter": args.max_iter} if args.max_iter is not None else {})}  # fmt: skip
    if task == "regression":  # each estimator imported when it is the one fitted
        from moekit.estimators.regressor import MoERegressor

        if args.covariance_type is not None:
            settings["covariance_type"] = args.covariance_type
        template = MoERegressor(expert=args.expert, gate=gate, **settings)
        check_offset_family(template, rows)
    else:
        from moekit.estimators.classifier import MoEClassifier

        template = MoEClassifier(**settings)
    fitted = rows.kwargs()
    with one_thread_on_small_tables(len(y) + n_test):
        model, table = fit_models(template, X, y, ks, args.experts is None, verbose, out, fitted)
        if formula is not None:  # predict applies it to new data
            model.formula_ = formula
        if args.offset_term is not None and formula is None:  # predict asks for it
            model.offset_term_ = args.offset_term
        if y.ndim == 2:  # predict names its columns (a binomial's: where its trials are)
            model.target_names_ = [str(c) for c in y.columns]
        model.save(out / "model.moe")
        report, summary, baseline, check = report_text(model, X, y, X_test, y_test, task, target,
                                                       rows, rows_test)  # fmt: skip
        (out / "report.txt").write_text(report + "\n")
        if not args.no_report:
            write_html_report(out, model, X, y, X_test, y_test, table, target, str(args.data),
                              summary, baseline, check, rows, rows_test)  # fmt: skip
    print(report)
    print(f"\nWrote {out / 'model.moe'} and "
          f"{out / ('report.txt' if args.no_report else 'report.html')}")  # fmt: skip
    return 0


def row_notes(args, rows: RowTerms) -> list[str]:
    """What the command says of the rows' weights, offset, censoring and of K fixed by
    a list of families."""
    import numpy as np

    said = []
    if rows.sample_weight is not None:
        said.append(f"weights: {args.weights!r} (frequency weights; {rows.n_rows(0):g} "
                    "weighted rows)")  # fmt: skip
    if rows.offset is not None:
        said.append(f"offset: {args.offset_term} (a known term of the experts' linear "
                    "predictor)")  # fmt: skip
    if rows.y_upper is not None:
        censored = int(np.isinf(rows.y_upper).sum())
        flag = (f"--censored-above {args.censored_above!r}" if args.censored_above
                else f"--event {args.event!r}")  # fmt: skip
        said.append(f"censoring: {censored} of {len(rows.y_upper)} responses right-censored "
                    f"({flag})")  # fmt: skip
    if getattr(args, "experts_from_list", False):
        said.append(f"K = {len(args.expert)}: one expert per family of --expert "
                    f"{','.join(args.expert)} (no search over K)")  # fmt: skip
    return said


def check_offset_family(template, rows: RowTerms) -> None:
    """An offset needs experts with a log (or logit) link: a usage error naming
    ``--offset`` otherwise, before anything is fitted."""
    from moekit.estimators._families import expert_class

    if isinstance(template.expert, list):  # a family per expert: K is the list's length
        template = template.set_params(n_experts=len(template.expert))
    if rows.offset is not None and not getattr(expert_class(template), "takes_offset", False):
        raise UsageError(f"moekit: --offset is a known term of a log-link linear predictor "
                         f"(--expert poisson, negative_binomial, gamma, weibull or binomial); "
                         f"--expert {_expert_text(template.expert)} has none.")  # fmt: skip


@contextmanager
def one_thread_on_small_tables(n_rows: int):
    """PyTorch on one thread while a table of at most :data:`SERIAL_ROWS` rows is fitted
    and reported, its own setting restored after."""
    import torch

    before = torch.get_num_threads()
    if n_rows <= SERIAL_ROWS:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_models(template, X, y, ks: tuple[int, ...], default: bool, verbose: int, out: Path,
               fitted: dict | None = None):  # fmt: skip
    """The model fitted with the one K asked, or the best by BIC among ``ks`` with the
    criterion's table (also written to ``criterion.csv``); (model, table or None).
    ``fitted``: the rows' ``sample_weight``, ``offset`` and ``y_upper`` for ``fit``."""
    fitted = fitted or {}
    if len(ks) == 1:
        return template.set_params(n_experts=ks[0]).fit(X, y, **fitted), None
    from moekit.estimators.model_selection import select_n_experts

    print(f"  choosing K in {ks[0]}-{ks[-1]} by BIC"
          + (" (the default; --experts K fixes it)" if default else ""))  # fmt: skip
    model, table = select_n_experts(template, X, y, ks, "bic", verbose=max(1, verbose),
                                    fit_params=fitted)  # fmt: skip
    print(f"  BIC picks K = {len(model.expert_sizes_)}")
    table.to_csv(out / "criterion.csv", index=False)
    return model, table


def report_text(model, X, y, X_test, y_test, task: str, target: str, rows=None,
                rows_test=None):  # fmt: skip
    """What the command prints and writes to ``report.txt``: the held-out check against
    one expert (when rows were held out), the fit's statistics and coefficients; with
    the coefficient summary, the one-expert baseline and the check, which the HTML
    report shows too: (text, summary, baseline, check). ``rows`` and ``rows_test``
    (:class:`~moekit.cli.rows.RowTerms`) are the weights, offsets and bounds of both."""
    from moekit.report.describe import coefficient_summary
    from moekit.report.headline import fit_baseline, held_out_check

    fitted = rows.kwargs() if rows is not None else {}
    held = rows_test.kwargs() if rows_test is not None else {}
    summary, reason = coefficient_summary(model, X, y, INFORMATION_ROWS, fitted)
    report = regression_report(model, X, y, summary, reason, target, fitted)
    if task == "classification":
        report = (f"MoEClassifier: K = {len(model.expert_sizes_)}, classes {list(model.classes_)}, "
                  f"training accuracy {model.score(X, y):.4f}\n" + report)  # fmt: skip
    baseline = check = None
    if X_test is not None:
        baseline = fit_baseline(model, X, y, fitted)
        check = held_out_check(model, X_test, y_test, baseline, held)
        said = [f"  held-out log-likelihood per row: {check.log_likelihood:.4g}"
                + (f" (one expert: {check.baseline_log_likelihood:.4g})"
                   if baseline is not None else "")]  # fmt: skip
        if check.covered >= 0:
            said.append(f"  held-out 90% intervals cover {check.coverage_text()}")
        if check.verdict():
            said.append(f"  warning: {check.verdict()}")
        report = "\n".join(said) + "\n" + report
    return report, summary, baseline, check


def write_html_report(out: Path, model, X, y, X_test, y_test, table, target: str, source: str,
                      summary, baseline, check, rows=None, rows_test=None) -> None:  # fmt: skip
    """``report.html`` in ``out``, and the report's figures that stand on their own as
    PNG files (the data with each expert's fit for one feature, the criterion against
    K when K was chosen), drawn once for both."""
    from moekit.report.sections import html_report  # matplotlib comes with the figures

    figures: dict[str, bytes] = {}
    page = html_report(model, X, y, X_test=X_test, y_test=y_test, table=table,
                       target=target, source=source, summary=summary, baseline=baseline,
                       check=check, figures=figures,
                       rows=rows.kwargs() if rows is not None else None,
                       test_rows=rows_test.kwargs() if rows_test is not None else None)  # fmt: skip
    (out / "report.html").write_text(page, encoding="utf-8")
    if "fit" in figures and X.shape[1] == 1:
        (out / "fit.png").write_bytes(figures["fit"])
    if table is not None:
        (out / "bic.png").write_bytes(figures["criterion"])
