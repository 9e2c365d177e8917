"""Frequency weights and offsets of a fit: their checks, and weighted column moments.

``fit(X, y, sample_weight=w)`` makes row i count w_i times: its log-likelihood
enters the objective times w_i, the standardisations are weighted means and standard
deviations, and rows of weight zero are dropped before anything else, so that a fit
with integer weights is the fit of the rows repeated. ``offset=o`` is a known term
o_i added to every expert's linear predictor (a log exposure): it is data, not a
parameter, and the families with a log or logit link read it.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch


def _vector(values, n: int, name: str) -> np.ndarray:
    """``values`` as a float vector of length n, or a one-line ValueError naming ``name``."""
    if hasattr(values, "to_numpy"):
        values = values.to_numpy()
    try:
        v = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numbers, one per row of X.") from None
    if v.ndim == 2 and v.shape[1] == 1 and name == "offset":
        v = v[:, 0]
    if v.ndim != 1 or v.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), one value per row of X; got shape "
                         f"{v.shape}.")  # fmt: skip
    if not np.isfinite(v).all():
        raise ValueError(f"{name} holds NaN or infinite values.")
    return v


def check_sample_weight(sample_weight, n: int) -> np.ndarray | None:
    """Frequency weights of n rows: None, or a float copy (never the caller's array).

    Raises
    ------
    ValueError
        Naming ``sample_weight``: wrong length, NaN or infinite, negative, or all zero.
    """
    if sample_weight is None:
        return None
    if hasattr(sample_weight, "to_numpy"):
        sample_weight = sample_weight.to_numpy()
    if isinstance(sample_weight, numbers.Real):  # one weight for every row
        sample_weight = np.full(n, float(sample_weight))
    w = _vector(sample_weight, n, "sample_weight").copy()
    if (w < 0).any():
        raise ValueError(f"sample_weight must be >= 0; got {w.min():g} at row {int(w.argmin())}.")
    if not (w > 0).any():
        raise ValueError("sample_weight: every weight is zero; rows of zero weight are "
                         "dropped, and no row is left to fit.")  # fmt: skip
    return w


def check_offset(offset, n: int) -> np.ndarray | None:
    """An offset of n rows: None, or a float vector (ValueError naming ``offset``)."""
    return None if offset is None else _vector(offset, n, "offset").copy()


def check_offset_family(family: type | None, expert, offset) -> None:
    """Refuse an offset where no expert has a linear predictor it applies to."""
    if offset is not None and not getattr(family, "takes_offset", False):
        raise ValueError(
            "offset is a known term of the experts' linear predictor (log exposure), for "
            "expert='poisson', 'negative_binomial', 'gamma', 'weibull' or 'binomial'; got "
            f"expert={expert!r}."
        )


def weighted_moments(Xt: torch.Tensor, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Column means and standard deviations with weights w (W = sum w in the denominator).

    mean_j = sum_i w_i x_ij / W, sd_j^2 = sum_i w_i (x_ij - mean_j)^2 / W: the moments
    of the rows repeated w_i times. Without weights, the plain ones.
    """
    if Xt.shape[1] == 0:  # no features: nothing to centre (torch warns on an empty std)
        return Xt.new_zeros(0), Xt.new_ones(0)
    if w is None:
        return Xt.mean(0), Xt.std(0, correction=0)
    W = w.sum()
    mean = (w @ Xt) / W
    return mean, torch.sqrt((w @ (Xt - mean) ** 2) / W)


def as_row_tensor(v: np.ndarray | None, device) -> torch.Tensor | None:
    """A per-row vector as a float64 tensor on ``device`` (None stays None)."""
    return None if v is None else torch.as_tensor(v, dtype=torch.float64, device=device)
