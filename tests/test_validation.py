import numbers

import numpy as np
import pytest

from moekit._core.validation import (
    HasMethods,
    Interval,
    InvalidParameterError,
    Options,
    validate_params,
)

CONSTRAINTS = {
    "n": [Interval(numbers.Integral, 1, None, closed="left")],
    "tol": [Interval(numbers.Real, 0, None, closed="left")],
    "kind": [Options({"a", "b"}), HasMethods(("fit",))],
    "flag": ["boolean"],
    "seed": ["random_state"],
    "maybe": [None, Interval(numbers.Real, 0, 1, closed="neither")],
}


def test_valid_values_pass():
    validate_params(
        "Thing",
        {
            "n": 3,
            "tol": 0.0,
            "kind": "a",
            "flag": True,
            "seed": np.random.RandomState(0),
            "maybe": None,
        },
        CONSTRAINTS,
    )


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("n", 0, "an int in the range [1, inf)"),
        ("n", 2.0, "an int in the range [1, inf)"),
        ("n", True, "an int in the range [1, inf)"),
        ("tol", -1e-3, "a float in the range [0, inf)"),
        ("tol", float("nan"), "a float in the range [0, inf)"),
        ("kind", "c", "one of 'a', 'b' or an object with methods 'fit'"),
        ("flag", 1, "an instance of 'bool'"),
        ("seed", "zero", "an int, a numpy RandomState or None"),
        ("maybe", 1.0, "None or a float in the range (0, 1)"),
    ],
)
def test_one_template_names_the_parameter(name, value, expected):
    msg = f"The {name!r} parameter of Thing must be {expected}. Got {value!r} instead."
    with pytest.raises(InvalidParameterError) as info:
        validate_params("Thing", {name: value}, CONSTRAINTS)
    assert str(info.value) == msg
    assert isinstance(info.value, ValueError)
