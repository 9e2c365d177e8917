"""Declarative parameter validation with one error template, for both rooms.

Each class declares a table of constraints; :func:`validate_params` checks the
values against it and raises :class:`InvalidParameterError` with the message

    The {name!r} parameter of {Owner} must be {constraint}. Got {value!r} instead.

A constraint is an :class:`Interval`, an :class:`Options`, a type, ``None`` (the value
may be None), one of the strings ``"boolean"``, ``"random_state"``, ``"array-like"``,
``"callable"``, or a :class:`HasMethods`. A parameter satisfies its list of
constraints when it satisfies any one of them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


class InvalidParameterError(ValueError, TypeError):
    """A parameter has a wrong type or value.

    It subclasses both ValueError and TypeError, as scikit-learn's error does, so
    that code catching either keeps working.
    """


@dataclass(frozen=True)
class Interval:
    """Numbers of a type between two bounds.

    Parameters
    ----------
    type : {numbers.Integral, numbers.Real}
        ``Real`` admits integers too; ``Integral`` rejects floats and bools.
    left, right : float or None
        Bounds; None is unbounded.
    closed : {'left', 'right', 'both', 'neither'}
        Which bounds belong to the interval.
    """

    type: type
    left: float | None
    right: float | None
    closed: str = "both"

    def is_satisfied_by(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, self.type):
            return False
        if isinstance(value, float) and math.isnan(value):
            return False
        lo_ok = (
            self.left is None
            or value > self.left
            or (value == self.left and self.closed in ("left", "both"))
        )
        hi_ok = (
            self.right is None
            or value < self.right
            or (value == self.right and self.closed in ("right", "both"))
        )
        return lo_ok and hi_ok

    def __str__(self) -> str:
        kind = "an int" if self.type is numbers.Integral else "a float"
        lb = "[" if self.closed in ("left", "both") and self.left is not None else "("
        rb = "]" if self.closed in ("right", "both") and self.right is not None else ")"
        lo = "-inf" if self.left is None else f"{self.left}"
        hi = "inf" if self.right is None else f"{self.right}"
        return f"{kind} in the range {lb}{lo}, {hi}{rb}"


@dataclass(frozen=True)
class Options:
    """One of a fixed set of values (usually strings)."""

    options: frozenset

    def __init__(self, options: Iterable) -> None:
        object.__setattr__(self, "options", frozenset(options))

    def is_satisfied_by(self, value: Any) -> bool:
        try:
            return value in self.options
        except TypeError:
            return False

    def __str__(self) -> str:
        return "one of " + ", ".join(repr(o) for o in sorted(self.options, key=str))


@dataclass(frozen=True)
class HasMethods:
    """An object exposing the named methods (duck-typed estimators)."""

    methods: tuple[str, ...]

    def is_satisfied_by(self, value: Any) -> bool:
        return all(callable(getattr(value, m, None)) for m in self.methods)

    def __str__(self) -> str:
        return "an object with methods " + ", ".join(repr(m) for m in self.methods)


def _satisfies(value: Any, constraint: Any) -> bool:
    if constraint is None:
        return value is None
    if isinstance(constraint, str):
        if constraint == "boolean":
            return isinstance(value, (bool, np.bool_))
        if constraint == "random_state":
            return (
                value is None
                or isinstance(value, np.random.RandomState)
                or (isinstance(value, numbers.Integral) and not isinstance(value, bool))
            )
        if constraint == "array-like":
            return hasattr(value, "__len__") or hasattr(value, "__array__")
        if constraint == "callable":
            return callable(value)
        raise ValueError(f"unknown constraint string {constraint!r}")
    if isinstance(constraint, type):
        return isinstance(value, constraint) and not (
            constraint is not bool and isinstance(value, bool)
        )
    return constraint.is_satisfied_by(value)


def _describe(constraint: Any) -> str:
    if constraint is None:
        return "None"
    if isinstance(constraint, str):
        return {
            "boolean": "an instance of 'bool'",
            "random_state": "an int, a numpy RandomState or None",
            "array-like": "an array-like",
            "callable": "a callable",
        }[constraint]
    if isinstance(constraint, type):
        return f"an instance of {constraint.__name__!r}"
    return str(constraint)


def validate_params(owner: str, params: Mapping[str, Any], constraints: Mapping[str, list]) -> None:
    """Check ``params`` against ``constraints``.

    Parameters
    ----------
    owner : str
        Name used in the message, usually the class name.
    params : mapping
        Parameter name to value. Names absent from ``constraints`` are not checked.
    constraints : mapping
        Parameter name to a list of constraints; ``"no_validation"`` skips one.

    Raises
    ------
    InvalidParameterError
        With the message ``The {name!r} parameter of {owner} must be {constraint}.
        Got {value!r} instead.``
    """
    for name, value in params.items():
        allowed = constraints.get(name)
        if allowed is None or allowed == "no_validation":
            continue
        if any(_satisfies(value, c) for c in allowed):
            continue
        described = [_describe(c) for c in allowed]
        text = (
            described[0]
            if len(described) == 1
            else (", ".join(described[:-1]) + " or " + described[-1])
        )
        raise InvalidParameterError(
            f"The {name!r} parameter of {owner} must be {text}. Got {value!r} instead."
        )


def check_options(
    options: Mapping[str, Any] | None, defaults: Mapping[str, Any], owner: str
) -> dict:
    """Merge a user's options dict over ``defaults``, refusing unknown names.

    Raises
    ------
    ValueError
        Naming ``owner`` (the argument) and the unknown and known option names.
    """
    if options is not None and not isinstance(options, Mapping):
        raise InvalidParameterError(f"{owner} must be a dict or None; got {options!r}.")
    options = dict(options or {})
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(
            f"{owner}: unknown option(s) {unknown}; known options are {sorted(defaults)}."
        )
    return {**defaults, **options}


def check_finite(name: str, values: torch.Tensor | np.ndarray) -> None:
    """Refuse values that hold NaN or infinities.

    The one wording of this check wherever a family checks its parameters (model
    files call it on every field they read).

    Parameters
    ----------
    name : str
        The field, as the message names it (quoted: ``'expert.coef'``).
    values : Tensor or ndarray

    Raises
    ------
    ValueError
        ``{name!r} holds NaN or infinite values``.
    """
    if isinstance(values, torch.Tensor):
        finite = bool(torch.isfinite(values).all())
    else:
        finite = bool(np.isfinite(np.asarray(values)).all())
    if not finite:
        raise ValueError(f"{name!r} holds NaN or infinite values")


@dataclass(frozen=True)
class ListOf:
    """A non-empty list or tuple whose every entry is one of a fixed set of strings."""

    options: frozenset

    def is_satisfied_by(self, value: Any) -> bool:
        return (
            isinstance(value, (list, tuple))
            and len(value) > 0
            and all(isinstance(v, str) and v in self.options for v in value)
        )

    def __str__(self) -> str:
        return "a list of " + ", ".join(repr(o) for o in sorted(self.options, key=str))
