"""The constraint table and the one error template, which names owner and argument."""

import math
import numbers

import numpy as np
import pytest

from moekit._core.validation import (
    HasMethods,
    Interval,
    InvalidParameterError,
    Options,
    check_options,
    validate_params,
)

POSITIVE = Interval(numbers.Integral, 1, None, closed="left")
UNIT = Interval(numbers.Real, 0, 1, closed="right")


def test_intervals_check_type_bounds_and_nan():
    assert POSITIVE.is_satisfied_by(1) and not POSITIVE.is_satisfied_by(0)
    assert not POSITIVE.is_satisfied_by(2.0) and not POSITIVE.is_satisfied_by(True)
    assert UNIT.is_satisfied_by(1) and UNIT.is_satisfied_by(0.5)
    assert not UNIT.is_satisfied_by(0.0) and not UNIT.is_satisfied_by(math.nan)
    assert str(POSITIVE) == "an int in the range [1, inf)"
    assert str(UNIT) == "a float in the range (0, 1]"


def test_options_and_methods():
    opts = Options(["b", "a"])
    assert opts.is_satisfied_by("a") and not opts.is_satisfied_by(["a"])  # unhashable
    assert str(opts) == "one of 'a', 'b'"
    has = HasMethods(("fit", "predict"))
    assert not has.is_satisfied_by(object())
    assert "'fit', 'predict'" in str(has)


@pytest.mark.parametrize(
    ("value", "must"),
    [(0, "an int in the range [1, inf) or None"),
     ("x", "an int in the range [1, inf) or None"),
     (2.5, "an int in the range [1, inf) or None")],
)  # fmt: skip
def test_the_message_names_owner_argument_constraint_and_value(value, must):
    msg = f"The 'n_experts' parameter of Model must be {must}. Got {value!r} instead."
    with pytest.raises(InvalidParameterError) as info:
        validate_params("Model", {"n_experts": value}, {"n_experts": [POSITIVE, None]})
    assert str(info.value) == msg
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


def test_named_constraints():
    table = {"flag": ["boolean"], "seed": ["random_state"], "f": ["callable"],
             "X": ["array-like"], "free": "no_validation"}  # fmt: skip
    good = {"flag": np.bool_(True), "seed": np.random.RandomState(0), "f": len,
            "X": [1, 2], "free": object(), "unchecked": 1}  # fmt: skip
    validate_params("M", good, table)
    with pytest.raises(InvalidParameterError, match=r"'seed' parameter of M must be an int, a"):
        validate_params("M", {"seed": True}, table)
    with pytest.raises(InvalidParameterError, match=r"'flag' parameter of M must be an instance"):
        validate_params("M", {"flag": 1}, table)


def test_check_options_merges_and_names_unknown_ones():
    assert check_options({"a": 2}, {"a": 1, "b": 0}, "opts") == {"a": 2, "b": 0}
    assert check_options(None, {"a": 1}, "opts") == {"a": 1}
    with pytest.raises(ValueError, match=r"opts: unknown option\(s\) \['c'\]; known .*\['a'\]"):
        check_options({"c": 1}, {"a": 1}, "opts")
    with pytest.raises(InvalidParameterError, match="opts must be a dict or None"):
        check_options([("a", 1)], {"a": 1}, "opts")
