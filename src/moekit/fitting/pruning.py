"""Experts that hold too small a share of the data, removed as flexmix's ``minprior``.

An expert that holds a handful of rows can fit them almost exactly: its variance,
and with it the likelihood, grows without bound, so the best start by likelihood
can be a spurious maximum (four rows of one value, an expert of standard deviation
0.05 among experts of 20). flexmix removes a component whose prior falls below
``minprior`` (default 0.05) and carries on with the others; so does
:func:`prune_small_experts`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moekit._core.data import EMData
from moekit.fitting.model import EMModel, FitResult, Params, without_experts


def centre_gate_row(data: EMData) -> torch.Tensor:
    """A gate design of one row at the centre of the data (standardised x = 0)."""
    row = torch.zeros((data.XgT.shape[0], 1), dtype=data.XgT.dtype, device=data.XgT.device)
    row[-1] = 1.0
    return row


def prune_small_experts(
    model: EMModel,
    data: EMData,
    result: FitResult,
    min_share: float,
    rerun: Callable[[EMModel, Params], FitResult],
) -> tuple[EMModel, FitResult, int]:
    """Drop the experts whose share of the rows, n_k / n, is below ``min_share``.

    The experts below it are dropped together (the largest always stays), the gate
    is renormalised over the others, and ``rerun(model, start)`` continues EM from
    there; this repeats until every expert holds at least ``min_share``. A gate whose
    size is set by its shape (``resizable`` false: a tree) keeps every expert.

    Returns
    -------
    model : EMModel
        The model with the experts that stayed.
    result : FitResult
        Its fit.
    removed : int
        How many experts were dropped.
    """
    removed = 0
    if min_share <= 0 or not getattr(model.gate, "resizable", True):
        return model, result, removed
    row = centre_gate_row(data)
    while True:
        share = result.nk / data.w_total
        small = share < min_share
        small[torch.argmax(share)] = False
        if not bool(small.any()):
            return model, result, removed
        keep = torch.nonzero(~small).flatten()
        model, start = without_experts(model, result.params, keep, row)
        removed += int(small.sum())
        result = rerun(model, start)
