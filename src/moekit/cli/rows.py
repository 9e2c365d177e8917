"""What ``moekit fit`` knows of each row besides x and y: its weight, its offset and
the upper bound of a censored response.

``--weights COL`` are frequency weights (a row of weight 3 counts as three rows);
``--offset EXPR`` (a column or an expression such as ``log(hours)``, or
``offset(...)`` in ``--formula``) is a known term of the experts' linear predictor;
``--censored-above COL`` holds each response's upper bound (equal to y for an exact
response, empty or ``inf`` for one right-censored at y), and ``--event COL`` is R's
``Surv(time, event)`` form of the same (1: observed, 0: right-censored at y). These
columns are never features.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from moekit.cli.errors import DataError, UsageError


@dataclass(frozen=True)
class RowTerms:
    """Per-row arrays of a fit besides X and y (each None, or of shape (n_samples,)),
    named as ``fit`` and ``log_likelihood`` take them."""

    sample_weight: np.ndarray | None = None
    offset: np.ndarray | None = None
    y_upper: np.ndarray | None = None

    def take(self, index) -> RowTerms:
        """The same terms of the rows ``index`` (an integer array or a slice)."""
        return replace(self, **{k: v[index] for k, v in self.kwargs().items()})

    def kwargs(self) -> dict[str, np.ndarray]:
        """The terms that are set, as keyword arguments of ``fit``/``log_likelihood``."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}  # fmt: skip

    def n_rows(self, n: int) -> float:
        """Rows as the fit counts them: the sum of the weights, else ``n``."""
        return n if self.sample_weight is None else float(self.sample_weight.sum())


def read_row_terms(args, frame, formula=None) -> tuple[RowTerms, set[str], str | None]:
    """(terms, the columns they read, the offset's expression) of ``frame``'s rows.

    Every bad value is a one-line error naming its flag: a weight that is negative,
    missing or infinite, an offset that is not finite, an upper bound below y.
    """
    used: set[str] = set()
    weight = offset = upper = None
    if args.weights is not None:
        weight = _numeric(frame, args.weights, "--weights")
        used.add(args.weights)
        bad = ~np.isfinite(weight) | (weight < 0)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(f"moekit: --weights {args.weights!r}: row {row + 1} holds "
                            f"{weight[row]}; weights are finite numbers >= 0.")  # fmt: skip
        if not (weight > 0).any():
            raise DataError(f"moekit: --weights {args.weights!r}: every weight is 0.")
    term = getattr(args, "offset", None)
    formula_terms = getattr(formula, "offset_terms", None) or []
    if term is not None and formula_terms:
        raise UsageError("moekit fit: give the offset once, either --offset or offset(...) in "
                         "--formula.")  # fmt: skip
    if term is not None:
        offset, read = offset_values(frame, term)
        used |= read
    elif formula_terms:
        offset, term = formula.offset_values(frame), " + ".join(formula_terms)
    if offset is not None:
        _check_offset(offset, term)
    upper = _upper_bounds(args, frame, used)
    return RowTerms(weight, offset, upper), used, term


def offset_values(frame, term: str) -> tuple[np.ndarray, set[str]]:
    """``--offset``'s values on ``frame`` (a column, or an expression of columns) and
    the columns it reads; a one-line usage error naming ``--offset`` otherwise."""
    import ast

    from moekit.formula import FormulaError, column_expression
    from moekit.formula_checks import _columns_read

    try:
        values = column_expression(frame, term, "--offset").to_numpy(dtype=np.float64)
        read = {term} if term in frame.columns else _columns_read(ast.parse(term, mode="eval"))
    except FormulaError as exc:
        raise UsageError(f"moekit: {exc}") from None
    except (ValueError, SyntaxError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"moekit: --offset {term!r}: cannot evaluate it: {first}") from None
    _check_offset(values, term)
    return values, read


def _check_offset(values: np.ndarray, term: str) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"moekit: --offset {term!r} is {values[row]} in row {row + 1}; an "
                        "offset (log exposure) must be finite: exposure > 0.")  # fmt: skip


def _numeric(frame, column: str, flag: str) -> np.ndarray:
    import pandas as pd

    if column not in frame.columns:
        raise UsageError(f"moekit: {flag} {column!r} is not a column of the data (columns: "
                         f"{', '.join(map(str, frame.columns))})")  # fmt: skip
    values = pd.to_numeric(frame[column], errors="coerce")
    text = values.isna() & frame[column].notna()
    if text.any():
        row = int(np.flatnonzero(text.to_numpy())[0])
        raise DataError(f"moekit: {flag} {column!r}: row {row + 1} holds "
                        f"{frame[column].iloc[row]!r}, not a number.")  # fmt: skip
    return values.to_numpy(dtype=np.float64, na_value=np.nan)


def _upper_bounds(args, frame, used: set[str]) -> np.ndarray | None:
    """y_upper from ``--censored-above`` (empty cells: inf) or ``--event`` (0: inf)."""
    above, event = args.censored_above, args.event
    if above is not None and event is not None:
        raise UsageError("moekit fit: --censored-above and --event say the same thing; give "
                         "one.")  # fmt: skip
    if above is None and event is None:
        return None
    if args.formula is not None:
        raise UsageError(f"moekit fit: {'--censored-above' if above else '--event'} goes with "
                         "--target (the response as it is, not a formula of it).")  # fmt: skip
    y = frame[args.target[0]].to_numpy(dtype=np.float64, na_value=np.nan)
    if above is not None:
        upper = _numeric(frame, above, "--censored-above")
        used.add(above)
        upper = np.where(np.isnan(upper), np.inf, upper)
        below = upper < y
        if below.any():
            row = int(np.flatnonzero(below)[0])
            raise DataError(f"moekit: --censored-above {above!r}: row {row + 1} has an upper "
                            f"bound {upper[row]} below y = {y[row]}.")  # fmt: skip
        return upper
    flags = _numeric(frame, event, "--event")
    used.add(event)
    bad = ~np.isin(flags, (0.0, 1.0))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"moekit: --event {event!r}: row {row + 1} holds {flags[row]}; events "
                        "are 1 (observed) or 0 (right-censored).")  # fmt: skip
    return np.where(flags == 0, np.inf, y)
