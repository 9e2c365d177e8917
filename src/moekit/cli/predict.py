"""``moekit predict``: a saved model's predictions for the rows of a table.

For a regression: the predictive mean, standard deviation and a central interval
of p(y | x), optionally draws of y (for several responses, each column's, named
``mean[y1]``, ``std[y1]``, ...); for binomial experts: the expected proportion of
successes ``p``, and, where the rows' trials are known (``--trials COLUMN``, or the
model's successes and failures columns), the successes' mean, sd, interval and draws
(:class:`moekit.successes.SuccessesPrediction`); for a classifier: the class and each
class's probability. Every row also gets the expert its gate favours, argmax_k g_k(x). A
model fitted with an offset (``--offset`` or ``offset(...)`` in its formula) takes
the rows' offset: its formula's on its own, else ``--offset EXPR`` again.
"""

from __future__ import annotations

import sys

from moekit.cli.errors import DataError, UsageError
from moekit.cli.tables import finite_feature, read_table


def cmd_predict(args) -> int:
    import numpy as np
    import pandas as pd

    from moekit import load

    try:
        model = load(args.model)
    except (ValueError, FileNotFoundError) as exc:  # a file, not the command line
        raise DataError(f"moekit: error: {exc}") from None
    frame = read_table(args.data, None)
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
        finite_feature(X, col)
    if names is None and formula is None:
        X = X.to_numpy()
    offset = _offset(model, frame, args.offset)
    result = pd.DataFrame(index=frame.index)
    d = None
    if args.trials is not None and not _binomial(model):
        raise UsageError("moekit predict: --trials is for a model of binomial experts.")
    if hasattr(model, "predict_proba"):
        result["prediction"] = model.predict(X)
        for c, col in zip(model.classes_, model.predict_proba(X).T, strict=True):
            result[f"p[{c}]"] = col
    else:
        if not 0.0 < args.interval < 1.0:
            raise UsageError(f"moekit: --interval must be in (0, 1); got {args.interval}.")
        if args.samples < 0:
            raise UsageError(f"moekit: --samples must be >= 0; got {args.samples}.")
        d = model.predict_distribution(X, **offset)
        if _binomial(model):  # one trial's 0/1 quantiles say nothing of a row's successes
            d = _successes(model, frame, d, args.trials)
            result["p"] = model.predict(X, **offset)
            if d is None:
                print("moekit predict: p is the expected proportion of successes; give "
                      "--trials COLUMN for the successes' mean, sd and interval.",
                      file=sys.stderr)  # fmt: skip
    if d is not None:
        lo, hi = d.interval(args.interval)
        tail = 100 * (1 - args.interval) / 2
        mean, std = np.asarray(d.mean()), np.asarray(d.std())
        draws = np.asarray(d.sample(args.samples, args.random_state)) if args.samples else None
        outputs = _output_names(model, mean)
        for j, name in enumerate(outputs):  # (n,) arrays, or (n, q): a column each
            pick = (lambda a: a) if mean.ndim == 1 else (lambda a, j=j: np.asarray(a)[..., j])
            tag = "" if mean.ndim == 1 else f"[{name}]"
            result[f"mean{tag}"], result[f"std{tag}"] = pick(mean), pick(std)
            result[f"q{tail:02g}{tag}"], result[f"q{100 - tail:02g}{tag}"] = pick(lo), pick(hi)
            for s in range(args.samples):
                result[f"sample_{s}{tag}"] = pick(draws[:, s])
    # the most likely expert given x alone (the gate's choice; y is what is predicted)
    result["expert"] = model.gate_weights(X).argmax(1)
    if args.out:
        result.to_csv(args.out, index=False)
        print(f"Wrote {len(result)} predictions to {args.out}")
    else:
        result.to_csv(sys.stdout, index=False)
    return 0


def _binomial(model) -> bool:
    expert = getattr(model, "expert", None)
    return expert == "binomial" or (isinstance(expert, (list, tuple)) and "binomial" in expert)


def _successes(model, frame, d, column: str | None):
    """The successes' distribution of rows whose trials are known: ``--trials COLUMN``,
    else the sum of the model's successes and failures columns where the table has
    both; None where neither is given."""
    from moekit.cli.rows import _numeric
    from moekit.successes import SuccessesPrediction

    if column is not None:
        trials = _numeric(frame, column, "--trials")
        flag = f"--trials {column!r}"
    else:
        names = getattr(model, "target_names_", None) or []
        if len(names) != 2 or not set(names) <= set(frame.columns):
            return None
        trials = sum(_numeric(frame, c, "the target column") for c in names)
        flag = f"the columns {names[0]!r} + {names[1]!r}"
    try:
        return SuccessesPrediction(d, trials)
    except ValueError as exc:
        raise DataError(f"moekit: {flag}: {exc}") from None


def _output_names(model, mean) -> list[str]:
    """The responses' names (``y1, y2`` of a model fitted on several --target columns),
    else ``y0, y1, ...``; one name for one response."""
    import numpy as np

    if np.ndim(mean) == 1:
        return ["y"]
    names = getattr(model, "target_names_", None)
    return list(names) if names is not None else [f"y{j}" for j in range(mean.shape[1])]


def _offset(model, frame, term: str | None) -> dict:
    """``{"offset": values}`` of the rows for a model fitted with one, else ``{}``.

    The formula's ``offset(...)`` is applied on its own; a model fitted with
    ``--offset`` needs it again (the exposure of new rows is data, not the model's).
    """
    from moekit.cli.rows import offset_values

    formula = getattr(model, "formula_", None)
    fitted = getattr(model, "offset_term_", None)
    if formula is not None and formula.offset_terms:
        if term is not None:
            own = " + ".join(formula.offset_terms)
            raise UsageError(f"moekit predict: the model's formula has its offset ({own}); "
                             "--offset is not needed.")  # fmt: skip
        try:
            return {"offset": formula.offset_values(frame)}
        except ValueError as exc:
            raise DataError(f"moekit: offset: {exc}") from None
    if fitted is not None and term is None:
        raise UsageError(f"moekit predict: the model was fitted with --offset {fitted!r}; "
                         "give --offset with these rows' offset (such as the same "
                         "expression).")  # fmt: skip
    if term is None:
        return {}
    if fitted is None:
        raise UsageError("moekit predict: --offset is for a model fitted with one; this model "
                         "was fitted without.")  # fmt: skip
    return {"offset": offset_values(frame, term)[0]}
