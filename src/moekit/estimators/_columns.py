"""Column selections for the experts and the gate (flexmix's concomitant variables)."""

from __future__ import annotations

import numpy as np


def resolve_columns(spec, name: str, d: int, feature_names=None) -> np.ndarray | None:
    """Column indices from None, indices, a boolean mask or column names.

    Parameters
    ----------
    spec : None, array-like of int, of bool (length d) or of str
        The selection; names need ``feature_names`` (a DataFrame's columns).
    name : str
        The argument's name, for error messages.
    d : int
        Number of features of X.
    feature_names : array-like of str, optional

    Returns
    -------
    ndarray of int or None
        None selects every column.
    """
    if spec is None:
        return None
    cols = np.asarray(spec)
    if cols.dtype == bool:
        if cols.shape != (d,):
            raise ValueError(
                f"{name}: a boolean mask needs {d} entries, one per feature; got {cols.shape}."
            )
        cols = np.flatnonzero(cols)
    elif cols.dtype.kind in "OU":
        names = feature_names
        if names is None:
            raise ValueError(f"{name}: column names need X to be a DataFrame with names.")
        lookup = {str(c): i for i, c in enumerate(names)}
        unknown = [c for c in cols.tolist() if str(c) not in lookup]
        if unknown:
            raise ValueError(f"{name}: unknown columns {unknown}; X has {list(names)}.")
        cols = np.array([lookup[str(c)] for c in cols.tolist()], dtype=int)
    elif cols.dtype.kind in "iu":
        if cols.ndim != 1 or len(cols) == 0 or cols.min() < -d or cols.max() >= d:
            raise ValueError(f"{name}: expected column indices in [0, {d}); got {cols.tolist()}.")
        cols = cols % d
    else:
        raise ValueError(f"{name}: expected column indices, names or a mask; got {spec!r}.")
    if len(cols) == 0:
        raise ValueError(f"{name}: selects no column.")
    if len(np.unique(cols)) != len(cols):
        raise ValueError(f"{name}: columns are repeated in {cols.tolist()}.")
    return cols
