"""The fit's checks of X and y: scikit-learn's ``validate_data``, with a direct path.

``validate_data(est, X, y, dtype=float64, ...)`` checks and converts any array-like
(frames, lists, sparse, object arrays), records the feature names and count, and
words every error. For the input most fits get, float64 numpy arrays of the right
shapes holding finite numbers, all of that amounts to a few shape tests and one sum,
while the generic path costs a tenth of a millisecond, a measurable share of a small
fit. :func:`check_fit_data` takes the direct path only where it returns exactly what
``validate_data`` returns (the arrays themselves, no copy) and sets the same
attributes; any other input, and any input that fails a check, goes through
``validate_data``, so every conversion, warning and error message is its own.
"""

from __future__ import annotations

import numpy as np
from sklearn.utils.validation import validate_data

_REAL = {"multi_output": True, "y_numeric": True}  # RealTarget's y checks


def _finite_sum(a: np.ndarray) -> bool:
    # a finite sum means finite entries (NaN and inf propagate); an overflowing sum
    # of finite entries only sends the array down the full check
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(a.sum()))


def _plain(X, y, min_features: int, validation: dict) -> bool:
    """Whether X and y are arrays that ``validate_data`` would return unchanged."""
    return (
        validation == _REAL
        and type(X) is np.ndarray
        and type(y) is np.ndarray
        and X.dtype == np.float64
        and y.dtype.kind in "fiu"
        and X.ndim == 2
        and y.ndim in (1, 2)
        and X.shape[0] >= 2
        and X.shape[1] >= min_features
        and y.shape[0] == X.shape[0]
        and (y.ndim == 1 or y.shape[1] >= 1)
        and _finite_sum(X)
        and _finite_sum(y)
    )


def check_fit_data(estimator, X, y, *, min_features: int, validation: dict):
    """``validate_data(estimator, X, y, dtype=np.float64, ensure_min_samples=2,
    ensure_min_features=min_features, **validation)``, directly for plain arrays.

    Parameters
    ----------
    estimator : BaseEstimator
        Gets ``n_features_in_`` (and loses ``feature_names_in_``: plain arrays have
        no column names), as ``validate_data`` with ``reset=True`` sets them.
    X, y : array-like
    min_features : int
        Fewest columns X may have.
    validation : dict
        The target's further checks (:attr:`TargetCoding.validation`).

    Returns
    -------
    X : ndarray of shape (n_samples, n_features), float64
    y : ndarray
    """
    if _plain(X, y, min_features, validation):
        estimator.__dict__.pop("feature_names_in_", None)
        estimator.n_features_in_ = X.shape[1]
        return X, y
    return validate_data(estimator, X, y, dtype=np.float64, ensure_min_samples=2,
                         ensure_min_features=min_features, **validation)  # fmt: skip
