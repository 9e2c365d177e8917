"""The ``moekit`` command.

::

    moekit demo [--out DIR]                       fit the bundled mcycle data, write a report
    moekit fit DATA.csv --target COL [--experts K] [--out DIR]
    moekit predict MODEL DATA.csv [--out FILE] [--interval 0.9] [--samples N]
    moekit inspect MODEL
    moekit lm train [--corpus FILE] [--config tiny|small] [--steps N] [--out DIR] [--resume]
    moekit lm generate CHECKPOINT --prompt TEXT [--tokens N] [--temperature T] [--top-k K]
"""

from __future__ import annotations

import argparse
import builtins
import math
import sys
from pathlib import Path

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


_TOUR_INTRO = (
    "<p>Three problems, three members of the mixture-of-experts family. In each, a "
    "<em>gate</em> g(x) weighs <em>experts</em> p<sub>k</sub>(y | x), and the model is the "
    "mixture p(y | x) = &sum;<sub>k</sub> g<sub>k</sub>(x) p<sub>k</sub>(y | x). Every "
    "figure is drawn from the fitted models; the page needs no network.</p>"
)
_TOUR_TEXT = {
    "mcycle": (
        "<p>Head acceleration of a crash-test dummy against time after impact: flat, then "
        "a violent swing, then a decay, with noise that changes by regime. One straight line "
        "cannot follow it; a few linear experts under a softmax gate of time can, and each "
        "keeps its own noise level. K is chosen by BIC. <b>Look at</b> the gate weights "
        "under the fit (where each expert takes over), and at the intervals' coverage on "
        "held-out rows.</p>"
    ),
    "digits": (
        "<p>8&times;8 images of handwritten digits, 64 pixel features, 10 classes. Each "
        "expert is a multinomial logistic regression and the gate divides the image space "
        "among them. <b>Look at</b> which expert takes which digits: the gate learns a "
        "division of labour that no one told it.</p>"
    ),
    "bishop": (
        "<p>Bishop's inverse problem: x = t + 0.3 sin(2&pi;t) + noise, and we must recover "
        "t from x. For x between about 0.35 and 0.65 three values of t fit, so the "
        "conditional mean (dashed) is no answer at all. A mixture density network, a neural "
        "network whose outputs are a mixture's weights, means and widths, learns the whole "
        "p(t | x). <b>Look at</b> the density's three branches and its modes (white).</p>"
    ),
}


def cmd_demo(args) -> int:
    """The guided tour: a regression MoE, an MoE classifier and an MDN, one report."""
    import warnings

    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split

    from moekit import MDNRegressor, MoEClassifier, MoERegressor, select_n_experts
    from moekit.datasets import load_mcycle, make_bishop_inverse
    from moekit.plotting import plot_criterion, plot_regression_fit
    from moekit.report import mdn_sections, report_sections, tour_report

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chapters = []

    print("moekit demo: a guided tour of three mixtures of experts, into one report\n")
    print("1. Motorcycle crash data (mcycle): head acceleration against time")
    frame = load_mcycle(as_frame=True)
    X, y = frame[["times"]], frame["accel"]
    print(f"   MoERegressor with K = 2..6 experts, {args.n_init} starts each ...")
    template = MoERegressor(max_iter=1000, random_state=0)
    model, table = select_n_experts(template, X, y, range(2, 7), "bic", n_init=args.n_init)
    best_k = model.n_experts
    shown = table.drop(columns=["best", "converged"])
    print("   " + shown.to_string(index=False, float_format=lambda v: f"{v:.1f}")
          .replace("\n", "\n   "))  # fmt: skip
    print(f"   BIC picks K = {best_k}.\n")
    print(regression_report(model, X, y))
    fig = plot_regression_fit(
        model, X, y, xlabel="time after impact (ms)", ylabel="head acceleration (g)",
        title=f"Mixture of {best_k} linear experts (softmax gate), mcycle data",
    )  # fmt: skip
    fig.savefig(out / "mcycle_fit.png", dpi=120)
    plot_criterion(table, "bic").savefig(out / "mcycle_bic.png", dpi=120)
    model.save(out / "mcycle.moe")
    table.to_csv(out / "mcycle_bic.csv", index=False)
    chapters.append(("mcycle", "1. A regression: the motorcycle crash data", _TOUR_TEXT["mcycle"],
                     report_sections(model, X, y, table=table, target="accel",
                                     source="mcycle (R's MASS)", prefix="mcycle_",
                                     level=3)))  # fmt: skip

    print("\n2. Handwritten digits: an MoE classifier")
    Xd, yd = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(Xd, yd, test_size=0.25, random_state=0, stratify=yd)
    n_init = min(args.n_init, DIGITS_STARTS)
    clf = MoEClassifier(n_experts=3, n_init=n_init, random_state=0).fit(Xtr, ytr)
    print(f"   MoEClassifier, 3 experts, {n_init} starts: held-out accuracy "
          f"{clf.score(Xte, yte):.4f} on {len(yte)} images; {clf.n_iter_} EM iterations, "
          f"{'converged' if clf.converged_ else 'not converged'}")  # fmt: skip
    clf.save(out / "digits.moe")
    chapters.append(("digits", "2. A classifier: handwritten digits", _TOUR_TEXT["digits"],
                     report_sections(clf, Xtr, ytr, X_test=Xte, y_test=yte, target="digit",
                                     source="scikit-learn's digits (UCI)", prefix="digits_",
                                     level=3)))  # fmt: skip

    print("\n3. Bishop's inverse problem: a mixture density network")
    train = make_bishop_inverse(1000, random_state=0)
    test = make_bishop_inverse(1000, random_state=1)
    mdn = MDNRegressor(3, hidden_layer_sizes=(32, 32), learning_rate=1e-2, batch_size=250,
                       max_iter=MDN_EPOCHS, random_state=0)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the epoch budget is a choice
        mdn.fit(train.X, train.y)
    held_out = mdn.log_likelihood(test.X, test.y)
    print(f"   MDNRegressor, 3 components: held-out log-likelihood {held_out:.3f} per row "
          f"after {mdn.n_iter_} epochs")  # fmt: skip
    mdn.save(out / "bishop_mdn.moe")
    t = np.linspace(0.0, 1.0, 400)
    chapters.append(("bishop", "3. An inverse problem: a mixture density network",
                     _TOUR_TEXT["bishop"],
                     mdn_sections(mdn, train.X, train.y, X_test=test.X, y_test=test.y,
                                  target="t", source="make_bishop_inverse(1000)",
                                  prefix="bishop_", level=3,
                                  truth=(train.forward(t)[:, 0], t))))  # fmt: skip

    page = tour_report("moekit: a guided tour", _TOUR_INTRO, chapters)
    (out / "report.html").write_text(page, encoding="utf-8")
    print(f"\nWrote {out / 'report.html'} (open it in a browser), the figures and the three "
          "model files (mcycle.moe, digits.moe, bishop_mdn.moe).")  # fmt: skip
    return 0


DIGITS_STARTS = 2
"""Starts of the demo's digits classifier (the tour should take seconds, not minutes)."""

MDN_EPOCHS = 300
"""Most epochs of the demo's mixture density network."""


MAX_CLASSES = 20
"""Most distinct values a text, category or boolean target may take as classes."""

READ_CHUNK_ROWS = 100_000
"""Rows per chunk when a CSV is read."""


class DataError(SystemExit):
    """A problem with the data: one line, exit status 1."""

    def __init__(self, message: str) -> None:
        super().__init__(1)
        self.message = message


class UsageError(SystemExit):
    """A problem with the command line: one line, exit status 2."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


def _read_table(path: str, target: str | None):
    """Read a CSV or Parquet table; every column numeric-looking must be numeric.

    A column whose cells mostly read as numbers but a few do not (``6,5`` with a
    decimal comma, ``n/a`` typed by hand) is an error naming the column, the first
    bad row and its value: dropping it, or reading it as text, would change the
    model without a word.
    """
    import pandas as pd  # here, not at the top: `moekit --help` should not wait for it

    file = Path(path)
    if not file.is_file():
        raise DataError(f"moekit: no such file: {path}")
    try:
        if file.suffix.lower() in (".parquet", ".pq"):
            frame = pd.read_parquet(file)
        else:
            # in chunks: the parser's buffers then stay small, and the peak memory of
            # reading is about twice the table instead of four or five times
            with pd.read_csv(file, chunksize=READ_CHUNK_ROWS) as reader:
                parts = list(reader)
            frame = pd.concat(parts, ignore_index=True) if parts else pd.read_csv(file)
            del parts
    except pd.errors.EmptyDataError:
        raise DataError(f"moekit: {path} is empty.") from None
    except (ValueError, ImportError, pd.errors.ParserError) as exc:
        raise DataError(f"moekit: cannot read {path}: {exc}") from None
    if frame.shape[0] == 0:
        raise DataError(f"moekit: {path} has a header but no rows.")
    if target is not None and target not in frame.columns:
        import difflib

        close = difflib.get_close_matches(str(target), [str(c) for c in frame.columns], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UsageError(
            f"moekit: --target {target!r} is not a column of {path}{hint} (columns: "
            f"{', '.join(map(str, frame.columns))})"
        )
    for col in frame.columns:
        kind = frame[col].dtype
        if not (pd.api.types.is_object_dtype(kind) or pd.api.types.is_string_dtype(kind)):
            continue
        cells = frame[col].dropna()
        numbers = pd.to_numeric(cells, errors="coerce")
        bad = numbers.isna()
        if 0 < bad.sum() and bad.mean() < 0.5:  # mostly numbers: a few bad cells
            row = cells.index[bad.to_numpy()][0]
            raise DataError(
                f"moekit: column {col!r} is numeric but row {row + 1} (line {row + 2} of "
                f"{path}) holds {cells[row]!r}; fix the cell (a decimal comma?) or remove it."
            )
    return frame


def _task(y, requested: str, expert: str | None = None) -> str:
    """Regression for a numeric target, classification for a few text/bool classes."""
    import pandas as pd

    if requested != "auto":
        return requested
    if pd.api.types.is_bool_dtype(y):
        return "classification"
    if pd.api.types.is_numeric_dtype(y):
        return "regression"
    n_classes = y.nunique()
    if n_classes > MAX_CLASSES:
        raise DataError(
            f"moekit: the target {y.name!r} is text with {n_classes} distinct values, too "
            f"many for classes (at most {MAX_CLASSES}); pass --task classification to fit "
            "them anyway."
        )
    return "classification"


def _columns_design(args, frame):
    """``--target`` with ``--features`` / ``--gate-features``: the columns as they are."""
    import pandas as pd

    y = frame[args.target]
    rest = frame[[c for c in frame.columns if c != args.target]]  # a view of the columns
    for flag, names in (("--features", args.features), ("--gate-features", args.gate_features)):
        for name in names or ():
            if name not in rest.columns:
                raise UsageError(f"moekit: {flag}: {name!r} is not a feature column of "
                                 f"{args.data}")  # fmt: skip
    if args.features:
        chosen = list(dict.fromkeys([*args.features, *(args.gate_features or ())]))
        X = rest[chosen]
        text = [c for c in chosen if not pd.api.types.is_numeric_dtype(X[c])]
        if text:
            raise DataError(f"moekit: feature columns must be numeric; {text} are not (use "
                            "--formula with C(column) for a categorical one).")  # fmt: skip
    else:
        X = rest.select_dtypes("number")
    if X.shape[1] == 0:
        raise DataError("moekit: no numeric feature columns besides the target.")
    experts = (args.features or list(X.columns)) if args.gate_features else None
    unused = [str(c) for c in rest.columns if c not in X.columns]
    return X, y, str(args.target), experts, args.gate_features, args.gate, unused, None


def _formula_design(args, frame):
    """``--formula`` (and ``--gate-formula``): the design matrices formulaic builds."""
    from moekit.formula import FormulaError, ModelFormula

    try:
        formula = ModelFormula(args.formula, args.gate_formula)
        X, y = formula.fit_transform(frame)
    except FormulaError as exc:
        raise UsageError(
            "moekit: --" + str(exc).replace("gate_formula:", "gate-formula:", 1)
        ) from None
    except ValueError as exc:
        raise DataError(f"moekit: {exc}") from None
    settings = formula.estimator_settings()
    gate = settings.pop("gate", args.gate)
    if formula.constant_gate and args.gate not in ("softmax", "constant"):
        raise UsageError(f"moekit: --gate-formula '~ 1' is a constant gate; it contradicts "
                         f"--gate {args.gate}.")  # fmt: skip
    experts, gates = settings["expert_features"], settings["gate_features"]
    unused = [str(c) for c in frame.columns if str(c) not in formula.variables]
    return X, y, formula.response, experts, gates, gate, unused, formula


def _finite_feature(X, col):
    """Column ``col`` of the frame X as float64; a missing or infinite cell is a data
    error naming the column and its row (the estimator's own message is a paragraph)."""
    import numpy as np

    values = X[col].to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        what = "is missing" if np.isnan(values[row]) else f"holds {values[row]}"
        raise DataError(f"moekit: the feature {str(col)!r} {what} in row {row + 1}; fill "
                        "the cell or drop the row.")  # fmt: skip
    return values


def _split_rows(X, y, n_test: int, seed: int | None):
    """(X, y, X_test, y_test): ``n_test`` random rows held out, None where none are.

    The features are copied once, column by column, into one float64 block whose
    first ``n_test`` rows are the held-out ones; both frames are views of it, so the
    split, the fit (which reads X without copying a read-only view) and the report
    share one copy of the data.
    """
    import numpy as np
    import pandas as pd

    n = len(y)
    order = np.random.default_rng(seed).permutation(n) if n_test else None
    block = np.empty((n, X.shape[1]))
    for j, col in enumerate(X.columns):
        values = _finite_feature(X, col)
        block[:, j] = values if order is None else values[order]
    frame = pd.DataFrame(block, columns=X.columns, copy=False)
    if order is not None:
        y = y.iloc[order].reset_index(drop=True)
    if not n_test:
        return frame, y, None, None
    return frame.iloc[n_test:], y.iloc[n_test:], frame.iloc[:n_test], y.iloc[:n_test]


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
    frame = _read_table(args.data, args.target)
    design = _columns_design if args.formula is None else _formula_design
    X, y, target, experts, gates, gate, unused, formula = design(args, frame)
    del frame  # X and y hold what the fit needs
    if y.isna().any():
        row = int(np.flatnonzero(y.isna().to_numpy())[0])
        raise DataError(f"moekit: the target {target!r} is missing in row {row + 1}.")
    task = _task(y, args.task)
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
    X, y, X_test, y_test = _split_rows(X, y, n_test, args.random_state)
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


def cmd_predict(args) -> int:
    import numpy as np
    import pandas as pd

    from moekit import load

    try:
        model = load(args.model)
    except (ValueError, FileNotFoundError) as exc:  # a file, not the command line
        raise DataError(f"moekit: error: {exc}") from None
    frame = _read_table(args.data, None)
    names = getattr(model, "feature_names_in_", None)
    formula = getattr(model, "formula_", None)
    if formula is not None:  # the model's own columns, levels and centres
        try:
            X = formula.transform(frame)
        except ValueError as exc:
            raise DataError(f"moekit: {args.data}: {exc}") from None
    elif names is not None:
        missing = [c for c in names if c not in frame.columns]
        if missing:
            raise DataError(f"moekit: {args.data} lacks the model's columns {missing}")
        X = frame[list(names)]
    else:
        X = frame.select_dtypes("number")
    for col in X.columns:
        _finite_feature(X, col)
    if names is None and formula is None:
        X = X.to_numpy()
    result = pd.DataFrame(index=frame.index)
    if hasattr(model, "predict_proba"):
        result["prediction"] = model.predict(X)
        for c, col in zip(model.classes_, model.predict_proba(X).T, strict=True):
            result[f"p[{c}]"] = col
    else:
        if not 0.0 < args.interval < 1.0:
            raise UsageError(f"moekit: --interval must be in (0, 1); got {args.interval}.")
        if args.samples < 0:
            raise UsageError(f"moekit: --samples must be >= 0; got {args.samples}.")
        d = model.predict_distribution(X)
        result["mean"] = d.mean()
        result["std"] = d.std()
        lo, hi = d.interval(args.interval)
        tail = 100 * (1 - args.interval) / 2
        result[f"q{tail:02g}"], result[f"q{100 - tail:02g}"] = lo, hi
        if args.samples:
            draws = np.asarray(d.sample(args.samples, args.random_state))
            for j in range(args.samples):
                result[f"sample_{j}"] = draws[:, j]
    # the most likely expert given x alone (the gate's choice; y is what is predicted)
    result["expert"] = model.gate_weights(X).argmax(1)
    if args.out:
        result.to_csv(args.out, index=False)
        print(f"Wrote {len(result)} predictions to {args.out}")
    else:
        result.to_csv(sys.stdout, index=False)
    return 0


def cmd_inspect(args) -> int:
    from moekit import load

    try:
        model = load(args.model)
    except (ValueError, FileNotFoundError) as exc:
        raise DataError(f"moekit: error: {exc}") from None
    names = getattr(model, "feature_names_in_", None)
    print(f"{args.model}: a fitted {type(model).__name__}")
    settings = {k: v for k, v in model.get_params().items() if v is not None}
    for key in ("n_experts", "expert", "gate", "expert_features", "gate_features"):
        if key in settings:
            print(f"  {key}: {settings[key]}")
    if getattr(model, "formula_", None) is not None:
        print(f"  formula: {model.formula_}")
    n = model.n_features_in_
    print(f"  features ({n}): {', '.join(map(str, names)) if names is not None else 'unnamed'}")
    if hasattr(model, "classes_"):
        print(f"  classes: {', '.join(map(str, model.classes_))}")
    print(f"  fit: {model.n_iter_} EM iterations, "
          f"{'converged' if model.converged_ else 'not converged'}, mean log-likelihood "
          f"{model.log_likelihood_:.4f} per row")  # fmt: skip
    print(f"  experts' shares of the data: "
          f"{', '.join(f'{v:.1f}' for v in model.expert_sizes_)}")  # fmt: skip
    return 0


_LM_OVERRIDES = {  # flag -> (preset part, field); None leaves the preset's value
    "batch_size": ("train", "batch_size"),
    "grad_accum": ("train", "grad_accum"),
    "lr": ("train", "learning_rate"),
    "eval_every": ("train", "eval_every"),
    "checkpoint_every": ("train", "checkpoint_every"),
    "seed": ("train", "seed"),
    "n_experts": ("model", "n_experts"),
    "top_k": ("model", "top_k"),
    "router": ("model", "router"),
}


def _lm_corpus(path: str | None) -> tuple[str, str]:
    if path is None:
        from moekit.datasets import load_austen

        return load_austen(), "Jane Austen's Pride and Prejudice and Persuasion (bundled)"
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace"), path
    except IsADirectoryError as exc:
        raise ValueError(f"--corpus {path!r} is a folder, not a text file.") from exc


def cmd_lm_train(args) -> int:
    # under torchrun: data + expert parallel over the processes, process 0 reports
    from moekit.nn.parallel import distributed_from_env

    with distributed_from_env() as (rank, _):
        return _lm_train(args, rank)


def _lm_train(args, rank: int) -> int:
    import torch

    from moekit.nn import MoETransformer, TransformerConfig
    from moekit.nn.train import (
        PRESETS,
        TrainConfig,
        decode_bytes,
        plot_training,
        resume_lm,
        train_lm,
    )

    print = builtins.print if rank == 0 else _quiet  # process 0 reports
    text, source = _lm_corpus(args.corpus)
    out = Path(args.out)
    checkpoint = out / "checkpoint.safetensors"
    given = {flag: getattr(args, flag) for flag in _LM_OVERRIDES if getattr(args, flag) is not None}
    if args.resume:
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise ValueError(f"--resume continues with the checkpoint's settings; drop {flags}.")
        if not checkpoint.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint to resume at {str(checkpoint)!r}.")
        print(f"Resuming {checkpoint} on {source}: {len(text):,} bytes")
        model, log = resume_lm(checkpoint, text, steps=args.steps, verbose=1)
    else:
        model_kw, train_kw = (dict(part) for part in PRESETS[args.config])
        parts = {"model": model_kw, "train": train_kw}
        for flag, value in given.items():
            part, name = _LM_OVERRIDES[flag]
            parts[part][name] = value
        if args.steps is not None:
            train_kw["steps"] = args.steps
        config = TrainConfig(**train_kw)
        torch.manual_seed(config.seed)
        model = MoETransformer(TransformerConfig(**model_kw))  # checked before anything is written
        model_config = model.config
        out.mkdir(parents=True, exist_ok=True)
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"Training the {args.config!r} byte-level MoE transformer ({n_params / 1e6:.2f} M "
            f"parameters, {model_config.n_experts} experts, top-{model_config.top_k}) for "
            f"{config.steps} steps on {source}: {len(text):,} bytes"
        )
        log = train_lm(model, text, config, verbose=1, checkpoint=checkpoint)
    if rank != 0:  # the others hold the same model: process 0 writes it
        return 0
    model.save(out / "lm.moe")
    plot_training(log, title="MoE language model").savefig(out / "lm_training.png", dpi=120)
    val = log.val_loss[-1]
    print(
        f"\nHeld-out loss {val:.4f} nats per byte ({val / math.log(2):.3f} bits per byte) "
        f"after step {log.eval_step[-1]}; auxiliary loss {log.aux_loss[-1]:.4f} (apart)."
    )
    prompt = text[: min(32, len(text))]
    gen = torch.Generator().manual_seed(0)
    sample = model.generate(_prompt_ids(prompt), 160, temperature=0.8, generator=gen)
    print("A sample (temperature 0.8):\n" + decode_bytes(sample[0].tolist()))
    print(f"\nWrote {checkpoint}, {out / 'lm.moe'} and {out / 'lm_training.png'}")
    return 0


def _quiet(*args, **kwargs) -> None:
    pass


def _prompt_ids(prompt: str):
    from moekit.nn.train import byte_tokens

    ids = byte_tokens(prompt)
    if len(ids) == 0:
        raise ValueError("--prompt must not be empty.")
    return ids.unsqueeze(0)


def cmd_lm_generate(args) -> int:
    import torch

    from moekit.nn.checkpoint import load_lm
    from moekit.nn.train import decode_bytes

    if args.tokens < 0:
        raise ValueError(f"--tokens must be a non-negative int; got {args.tokens}.")
    if not args.temperature >= 0 or math.isinf(args.temperature):
        raise ValueError(f"--temperature must be a finite number >= 0; got {args.temperature}.")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be a positive int; got {args.top_k}.")
    ids = _prompt_ids(args.prompt)
    model = load_lm(args.checkpoint)
    gen = torch.Generator().manual_seed(args.seed)
    out = model.generate(ids, max_new_tokens=args.tokens, temperature=args.temperature,
                         top_k=args.top_k, generator=gen)  # fmt: skip
    print(decode_bytes(out[0].tolist()))
    return 0


def _names(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated column names")
    return names


def _experts(text: str) -> tuple[int, ...]:
    """'3' -> (3,); '1-8' -> (1, ..., 8)."""
    try:
        lo, _, hi = text.partition("-")
        ks = tuple(range(int(lo), int(hi) + 1)) if hi else (int(lo),)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K or a range A-B, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive numbers of experts, got {text!r}")
    return ks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts models.")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the whole traceback, not one line")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="fit the bundled motorcycle data and write a report")
    p.add_argument("--out", default="moekit_demo", help="output folder (default: moekit_demo)")
    p.add_argument("--n-init", type=int, default=10, help="EM starts per K (default: 10)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("fit", help="fit a mixture of experts to a CSV file")
    p.add_argument("data", help="CSV or Parquet file with a header row")
    p.add_argument("--target", help="name of the target column (or give --formula)")
    p.add_argument("--formula",
                   help="Wilkinson formula of the target and the experts' terms, such as "
                        "\"y ~ x + I(x**2) + C(group)\"")  # fmt: skip
    p.add_argument("--gate-formula",
                   help="the gate's terms, such as \"~ z1 + z2\" (default: the experts'); "
                        "\"~ 1\" is a constant gate")  # fmt: skip
    p.add_argument(
        "--features",
        type=_names,
        help="comma-separated feature columns (default: every numeric column)",
    )
    p.add_argument(
        "--gate-features",
        type=_names,
        help="comma-separated columns the gate sees (default: the features)",
    )
    p.add_argument(
        "--experts",
        type=_experts,
        default=(3,),
        help="number of experts K, or a range such as 1-8 chosen by BIC (default: 3)",
    )
    p.add_argument(
        "--expert",
        choices=["linear", "poisson", "student_t", "mlp"],
        default="linear",
        help="regression experts (default: linear)",
    )
    p.add_argument(
        "--gate",
        choices=["softmax", "constant", "mlp"],
        default="softmax",
        help="softmax (default), constant (a mixture of regressions) or mlp",
    )
    p.add_argument("--task", choices=["auto", "regression", "classification"], default="auto")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="share of rows held out for the report's checks; the model is fitted "
                        "on the rest (0: fit on every row; default: 0.2)")  # fmt: skip
    p.add_argument("--n-init", type=int, default=5, help="EM starts (default: 5)")
    p.add_argument("--random-state", type=int, default=0)
    p.add_argument("--verbose", type=int, default=None,
                   help="0: quiet; 1: a progress bar per fit (default where stderr is a "
                        "terminal); 2: a line every few EM iterations too")  # fmt: skip
    p.add_argument("--out", default="moekit_fit", help="output folder (default: moekit_fit)")
    p.set_defaults(func=cmd_fit)

    lm = sub.add_parser("lm", help="a small MoE transformer language model").add_subparsers(
        dest="lm_command", required=True)  # fmt: skip
    p = lm.add_parser("train", help="train a byte-level MoE language model")
    p.add_argument("--corpus", help="UTF-8 text file (default: two bundled Jane Austen novels)")
    p.add_argument("--config", choices=["tiny", "small"], default="tiny",
                   help="model and training preset (default: tiny)")  # fmt: skip
    p.add_argument("--steps", type=int, help="optimiser steps (default: the preset's)")
    p.add_argument("--out", default="moekit_lm", help="output folder (default: moekit_lm)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.safetensors, with its settings")  # fmt: skip
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimiser step")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--n-experts", type=int)
    p.add_argument("--top-k", type=int)
    p.add_argument("--router")
    p.add_argument("--seed", type=int)
    p.set_defaults(func=cmd_lm_train)
    p = lm.add_parser("generate", help="continue a prompt with a trained model")
    p.add_argument("checkpoint", help="checkpoint.safetensors or lm.moe from `moekit lm train`")
    p.add_argument("--prompt", required=True)
    p.add_argument("--tokens", "--max-new-tokens", type=int, default=200,
                   help="bytes to generate (default: 200)")  # fmt: skip
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_lm_generate)

    p = sub.add_parser("predict", help="predict with a saved model")
    p.add_argument("model", help="model file written by `moekit fit` or model.save()")
    p.add_argument("data", help="CSV file with the model's feature columns")
    p.add_argument("--out", help="output CSV (default: standard output)")
    p.add_argument("--interval", type=float, default=0.9,
                   help="central probability of the interval (default: 0.9)")  # fmt: skip
    p.add_argument("--samples", type=int, default=0,
                   help="also draw this many values of y per row from p(y|x)")  # fmt: skip
    p.add_argument("--random-state", type=int, default=0, help="seed of --samples")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("inspect", help="say what a model file holds")
    p.add_argument("model", help="model file written by `moekit fit` or model.save()")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``moekit`` command."""
    import warnings

    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        if not args.debug:  # a warning is one line too, without moekit's source line
            warnings.showwarning = _show_warning
        return _run(args)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"moekit: warning: {message}", file=sys.stderr)


def _run(args) -> int:
    try:
        return int(args.func(args) or 0)
    except (DataError, UsageError, ValueError, FileNotFoundError):
        if args.debug:
            import traceback

            traceback.print_exc()
        return _one_line(sys.exc_info()[1])
    except BrokenPipeError:  # the reader left (`moekit predict ... | head`): end quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # a failure moekit did not foresee: still one line
        if args.debug:
            raise
        print(f"moekit: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the "
              "traceback)", file=sys.stderr)  # fmt: skip
        return 1


def _one_line(exc: BaseException) -> int:
    """Print an error as one line on stderr; its exit status (1: data, 2: usage)."""
    if isinstance(exc, (DataError, UsageError)):
        print(exc.message, file=sys.stderr)
        return exc.code
    print(f"moekit: error: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
