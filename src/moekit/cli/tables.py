"""From a file to the rows a model is fitted on.

The table is read (CSV in chunks, or Parquet) with every numeric-looking column
checked, the target and the features are taken from columns (``--target``,
``--features``, ``--gate-features``) or built by a formula (``--formula``,
``--gate-formula``), and random rows are held out for the report's checks.
pandas is imported inside each function, so that ``moekit --help`` does not wait
for it.
"""

from __future__ import annotations

from pathlib import Path

from moekit.cli.errors import DataError, UsageError

MAX_CLASSES = 20
"""Most distinct values a text, category or boolean target may take as classes."""

READ_CHUNK_ROWS = 100_000
"""Rows per chunk when a CSV is read."""


def read_table(path: str, target: str | list[str] | None):
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
    for name in [target] if isinstance(target, str) else target or ():
        if name in frame.columns:
            continue
        import difflib

        close = difflib.get_close_matches(str(name), [str(c) for c in frame.columns], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UsageError(
            f"moekit: --target {name!r} is not a column of {path}{hint} (columns: "
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


def task_of(y, requested: str, expert: str | None = None) -> str:
    """Regression for a numeric target, classification for a few text/bool classes and
    for a numeric target of exactly two values (a 0/1 outcome: a Gaussian fitted to it
    puts its density on two points and reports a meaningless likelihood)."""
    import pandas as pd

    if requested != "auto":
        return requested
    if pd.api.types.is_bool_dtype(y):
        return "classification"
    if pd.api.types.is_numeric_dtype(y):
        return "classification" if y.nunique() == 2 else "regression"
    n_classes = y.nunique()
    if n_classes > MAX_CLASSES:
        raise DataError(
            f"moekit: the target {y.name!r} is text with {n_classes} distinct values, too "
            f"many for classes (at most {MAX_CLASSES}); pass --task classification to fit "
            "them anyway."
        )
    return "classification"


def columns_design(args, frame):
    """``--target`` with ``--features`` / ``--gate-features``: the columns as they are.

    ``args.target`` is a list of column names: one, two (successes and failures,
    whose y is a frame of both and whose name is R's ``cbind(s, f)``), or several
    responses of linear experts. ``args.row_columns`` (the columns of ``--weights``,
    ``--offset``, ``--censored-above``, ``--event``) are not features.
    """
    import pandas as pd

    targets = list(args.target)
    y = frame[targets[0]] if len(targets) == 1 else frame[targets]
    label = targets[0] if len(targets) == 1 else ", ".join(map(str, targets))
    if len(targets) == 2 and args.expert == "binomial":
        label = f"cbind({label})"
    taken = {*targets, *getattr(args, "row_columns", ())}  # weights, bounds: not features
    rest = frame[[c for c in frame.columns if c not in taken]]  # a view of the columns
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
    return X, y, str(label), experts, args.gate_features, args.gate, unused, None


def formula_design(args, frame):
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
    taken = formula.variables | set(getattr(args, "row_columns", ()))
    unused = [str(c) for c in frame.columns if str(c) not in taken]
    return X, y, formula.response, experts, gates, gate, unused, formula


def finite_feature(X, col):
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


def split_rows(X, y, n_test: int, seed: int | None, rows=None):
    """(X, y, X_test, y_test, rows, rows_test): ``n_test`` random rows held out, None
    where none are; ``rows`` (a :class:`~moekit.cli.rows.RowTerms`: weights, offsets,
    upper bounds) split with them.

    The features are copied once, column by column, into one float64 block whose
    first ``n_test`` rows are the held-out ones; both frames are views of it, so the
    split, the fit (which reads X without copying a read-only view) and the report
    share one copy of the data.
    """
    import numpy as np
    import pandas as pd

    from moekit.cli.rows import RowTerms

    rows = RowTerms() if rows is None else rows
    n = len(y)
    order = np.random.default_rng(seed).permutation(n) if n_test else None
    block = np.empty((n, X.shape[1]))
    for j, col in enumerate(X.columns):
        values = finite_feature(X, col)
        block[:, j] = values if order is None else values[order]
    frame = pd.DataFrame(block, columns=X.columns, copy=False)
    if order is not None:
        y = y.iloc[order].reset_index(drop=True)
        rows = rows.take(order)
    if not n_test:
        return frame, y, None, None, rows, None
    return (frame.iloc[n_test:], y.iloc[n_test:], frame.iloc[:n_test], y.iloc[:n_test],
            rows.take(slice(n_test, None)), rows.take(slice(None, n_test)))  # fmt: skip
