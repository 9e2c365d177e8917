"""The shared floor of moekit: dtype/device policy, validation and log-space maths.

Nothing here imports the statistical room (experts, gates, fitting, estimators) or
the neural room (``moekit.nn``); both stand on it.
"""

from moekit._core.engine import EM_DTYPE, as_tensor, resolve_device, to_numpy
from moekit._core.validation import (
    Interval,
    InvalidParameterError,
    Options,
    validate_params,
)

__all__ = [
    "EM_DTYPE",
    "Interval",
    "InvalidParameterError",
    "Options",
    "as_tensor",
    "resolve_device",
    "to_numpy",
    "validate_params",
]
