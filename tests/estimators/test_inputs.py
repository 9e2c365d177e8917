"""The fit's X and y checks: the direct path for plain arrays is validate_data's."""

import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.utils.validation import validate_data

from moekit import MoERegressor
from moekit.estimators._inputs import _plain, check_fit_data

RNG = np.random.default_rng(0)
X = RNG.normal(size=(30, 3))
Y = RNG.normal(size=30)
REAL = {"multi_output": True, "y_numeric": True}


def _bad(a, i, v):
    a = a.copy()
    a.flat[i] = v
    return a


CASES = {
    "plain": (X, Y),
    "y 2-d": (X, np.c_[Y, Y]),
    "y one column": (X, Y[:, None]),
    "y integers": (X, np.arange(30)),
    "y float32": (X, Y.astype(np.float32)),
    "no features": (np.zeros((30, 0)), Y),
    "X NaN": (_bad(X, 4, np.nan), Y),
    "X inf": (_bad(X, 7, -np.inf), Y),
    "y NaN": (X, _bad(Y, 2, np.nan)),
    "y inf in a column": (X, _bad(np.c_[Y, Y], 5, np.inf)),
    "huge finite": (np.full((30, 2), 1e308), Y),
    "one row": (X[:1], Y[:1]),
    "lengths differ": (X, Y[:-1]),
    "X 1-d": (X[:, 0], Y),
    "X 3-d": (X[:, :, None], Y),
    "y 3-d": (X, Y[:, None, None]),
    "y no column": (X, np.zeros((30, 0))),
    "y scalar": (X, np.float64(1.0)),
    "y None": (X, None),
    "X integers": (np.arange(60).reshape(30, 2), Y),
    "X list": (X.tolist(), Y),
    "X frame": (pd.DataFrame(X, columns=["a", "b", "c"]), Y),
    "y series": (X, pd.Series(Y)),
    "y strings": (X, np.array(["a"] * 30)),
    "y object": (X, Y.astype(object)),
    "y bool": (X, Y > 0),
}


def _outcome(check, X, y, min_features, validation, before: dict):
    est = MoERegressor()
    est.__dict__.update(before)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = check(est, X, y, min_features, validation)
        except Exception as err:  # the error itself is compared
            out = (type(err), str(err))
    return out, vars(est), [(w.category, str(w.message)) for w in caught]


def _sklearn(est, X, y, min_features, validation):
    return validate_data(est, X, y, dtype=np.float64, ensure_min_samples=2,
                         ensure_min_features=min_features, **validation)  # fmt: skip


def _ours(est, X, y, min_features, validation):
    return check_fit_data(est, X, y, min_features=min_features, validation=validation)


def _same(a, b):
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b, strict=True))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape
                and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))  # fmt: skip
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


FITTED = {"feature_names_in_": np.array(["u"]), "n_features_in_": 1}  # an earlier fit's


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("min_features", [0, 1])
@pytest.mark.parametrize("before", [{}, FITTED])
def test_direct_path_is_validate_data(case, min_features, before):
    """Same arrays, same attributes set (and removed), same warnings, same error."""
    X_, y_ = CASES[case]
    ours = _outcome(_ours, X_, y_, min_features, REAL, before)
    theirs = _outcome(_sklearn, X_, y_, min_features, REAL, before)
    assert _same(ours[0], theirs[0])
    assert _same(ours[1], theirs[1])
    assert ours[2] == theirs[2]


def test_direct_path_is_taken_for_plain_arrays_only():
    """Plain float arrays skip validate_data (and return the very arrays, no copy);
    the class target's checks, and anything to convert, go through it."""
    assert _plain(X, Y, 1, REAL) and _plain(X, np.c_[Y, Y], 1, REAL)
    out = check_fit_data(MoERegressor(), X, Y, min_features=1, validation=REAL)
    assert out[0] is X and out[1] is Y
    assert not _plain(X, Y, 1, {})  # a classifier's labels
    for case in ("X NaN", "y inf in a column", "huge finite", "one row", "lengths differ",
                 "X integers", "X frame", "y series", "y object", "y bool"):  # fmt: skip
        assert not _plain(*CASES[case], 1, REAL), case
