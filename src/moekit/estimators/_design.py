"""The designs EM works on: standardised feature columns plus an intercept.

A fit learns each feature's mean and scale (``_x_mean``, ``_x_scale``) and which
columns the experts and the gate see (``_expert_cols``, ``_gate_cols``): together
the attributes in :data:`DESIGN_ATTRS`. Every later query builds its designs from
them, feature-major, (p + 1, n), so that a row is a column of the design.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moekit._core.data import EMData
from moekit._core.engine import EM_DTYPE


@dataclass
class Prepared:
    """What a fit derives from X and y before EM: the data and the state to set."""

    X: np.ndarray
    y: np.ndarray
    state: dict[str, Any]  # fitted attributes that describe the data (scalings, coding)
    data: EMData
    warm: bool
    weight: np.ndarray | None = None  # frequency weights of the rows kept (none zero)
    offset: np.ndarray | None = None  # the experts' known term of the rows kept


DESIGN_ATTRS = ("_x_mean", "_x_scale", "_expert_cols", "_gate_cols")
"""The fitted attributes that say how a design is built from X."""


def rows_of(A, rows: slice):
    """Rows of a DataFrame, Series, array or list, keeping a frame's column names."""
    if hasattr(A, "iloc"):
        return A.iloc[rows]
    return np.asarray(A)[rows]


def shared_tensor(X: np.ndarray, device=None) -> torch.Tensor:
    """X as an EM_DTYPE tensor that shares X's memory where it can, read-only or not.

    A pandas frame's values are a read-only view (copy-on-write), and the designs only
    read X: copying it to make it writable would add the whole data to a fit's peak.
    """
    if any(step < 0 for step in X.strides):
        # a frame's columns picked out of order can come as a view with a negative
        # stride, which torch cannot share: copy that one
        X = np.array(X, dtype=np.float64)
    if X.flags.writeable:  # nothing for torch to warn about
        return torch.as_tensor(X, dtype=EM_DTYPE, device=device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        return torch.as_tensor(X, dtype=EM_DTYPE, device=device)


def build_designs(Xt: torch.Tensor, state: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert and gate designs (p + 1, n): standardised selected columns, then ones.

    Each design is written in place into its one (p + 1, n) tensor, so that building
    it takes no more memory than the design itself (no standardised copy of X, no
    concatenation, no transposed copy): at a million rows that is hundreds of MB.
    """
    n, d = Xt.shape
    mean, scale = state["_x_mean"], state["_x_scale"]

    def design(cols):
        idx = torch.arange(d, device=Xt.device) if cols is None else torch.as_tensor(
            cols, device=Xt.device)  # fmt: skip
        out = torch.empty((len(idx) + 1, n), dtype=Xt.dtype, device=Xt.device)
        for row, j in enumerate(idx.tolist()):  # column by column: X may be C-ordered
            torch.sub(Xt[:, j], mean[j], out=out[row]).div_(scale[j])
        out[-1] = 1.0
        return out

    e, g = state["_expert_cols"], state["_gate_cols"]
    XeT = design(e)
    same = (e is None and g is None) or (e is not None and g is not None and np.array_equal(e, g))
    return XeT, XeT if same else design(g)


def same_setting(a, b) -> bool:
    """Whether two fitted settings (tensors, arrays, scalars or None) are equal."""
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, torch.Tensor):
        return bool(torch.equal(a.cpu(), torch.as_tensor(b).cpu()))
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def same_data(model, state: Mapping[str, Any], keys) -> bool:
    """Whether fitted ``model`` was fitted on data coded as ``state`` says (``keys``)."""
    return model.n_features_in_ == state["n_features_in_"] and all(
        same_setting(getattr(model, k, None), state.get(k)) for k in keys
    )
