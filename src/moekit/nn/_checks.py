"""Checks the sparse-layer modules share, each written once, in the one error template.

Parameter errors read ``The {name!r} parameter of {Owner} must be {constraint}. Got
{value!r} instead.`` (:mod:`moekit._core.validation`); input errors name the module,
the shape it expects and the shape it got.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn

import torch
from torch import Tensor

from moekit._core.validation import Interval, InvalidParameterError

POSITIVE_INT = Interval(numbers.Integral, 1, None, closed="left")
NON_NEGATIVE_INT = Interval(numbers.Integral, 0, None, closed="left")
NON_NEGATIVE = Interval(numbers.Real, 0, None, closed="left")


def reject(owner: str, name: str, must: str, value: Any) -> NoReturn:
    """Raise the one parameter error: ``name`` of ``owner`` must be ``must``."""
    raise InvalidParameterError(
        f"The {name!r} parameter of {owner} must be {must}. Got {value!r} instead."
    )


def check_finite_params(owner: str, params: Mapping[str, Any], names: Iterable[str]) -> None:
    """Reject the first of ``names`` whose value in ``params`` is NaN or infinite.

    A value of None (an optional setting left out) passes.
    """
    for name in names:
        value = params.get(name)
        if value is not None and not math.isfinite(value):
            reject(owner, name, "finite", value)


def check_features(
    owner: str, x: Any, width: int, name: str, dtype: torch.dtype | None = None
) -> None:
    """Check that ``x`` is a tensor of shape (..., ``width``) that ``owner`` can take.

    Parameters
    ----------
    owner : str
        The module's class name, for the message.
    x : object
    width : int
        The last axis's size, called ``name`` in the message ('d_model', 'd_in').
    dtype : torch.dtype, optional
        The dtype ``x`` must have (that of the module's parameters); None takes any
        floating-point dtype.

    Raises
    ------
    TypeError
        Not a tensor, or of the wrong dtype.
    ValueError
        Of the wrong shape.
    """
    if not isinstance(x, Tensor):
        raise TypeError(
            f"{owner} expects a torch.Tensor of shape (..., {name}); got {type(x).__name__}."
        )
    if x.dim() < 1 or x.shape[-1] != width:
        raise ValueError(
            f"{owner} expects input of shape (..., {name}) with {name}={width}; "
            f"got shape {tuple(x.shape)}."
        )
    if dtype is None and not x.is_floating_point():
        raise TypeError(f"{owner} expects a floating-point input; got {x.dtype}.")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(
            f"{owner} expects input of dtype {dtype} like its parameters; got {x.dtype} "
            "(convert the input, or the model with .to(dtype))."
        )


def _under_vmap() -> bool:
    """Whether a ``torch.func.vmap`` is running (its tensors hold one value per sample)."""
    if torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active():
        return False
    # private API, the only way to name the active transforms; unknown means assume vmap
    try:
        stack = torch._C._functorch.get_interpreter_stack() or []
        return any(i.key() == torch._C._functorch.TransformType.Vmap for i in stack)
    except AttributeError:  # pragma: no cover - depends on the torch version
        return True
