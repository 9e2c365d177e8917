"""``moekit predict``: a saved model's predictions for the rows of a table.

For a regression: the predictive mean, standard deviation and a central interval
of p(y | x), optionally draws of y; for a classifier: the class and each class's
probability. Every row also gets the expert its gate favours, argmax_k g_k(x).
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
