"""Rows continued with zeros to a common alignment, and the designs padded once.

MKL rounds a product by where in memory its operands start, and a batched product
of S starts must round each start as it would alone: so every product with the rows
of a chunk takes its operands continued with zeros to a multiple of :data:`ALIGN`
values (:mod:`moekit._core.batch`). A chunk's design never changes while its fit
runs (EM reads it, nothing writes it), so its padded copy is made on first use and
kept with the design's tensor, not made again in every product of every pass: at
digits' size (65 columns, 1,437 rows) that copy is 0.7 MB per product.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

ALIGN = 8
"""Float64 values in 64 bytes: each start's rows are continued with zeros to a
multiple of this many values, so that every start's operand sits at the same
alignment in a batch as alone."""

_DESIGNS: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""Designs that stay as they are while they live (the root tensor of ``EMData.XeT`` and
``XgT``) -> the padded copies of their views, by (offset, shape, strides). An entry
goes with its tensor."""


def _root(t: torch.Tensor) -> torch.Tensor:
    return t if t._base is None else t._base


def register_design(*designs: torch.Tensor) -> None:
    """Declare ``designs`` read-only for their lifetime, so that the padded copies of
    their views (:func:`aligned_rows`) are made once and kept with them."""
    for t in designs:
        root = _root(t)
        if root not in _DESIGNS:
            _DESIGNS[root] = {}


def aligned_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its last axis (the rows of a chunk) continued with zeros to a
    multiple of :data:`ALIGN` values.

    A view of a registered design (:func:`register_design`) is padded on its first
    call and the same copy returned after; any other tensor is padded afresh.
    """
    extra = -t.shape[-1] % ALIGN
    if extra == 0:
        return t
    kept = _DESIGNS.get(_root(t))
    if kept is None:
        return torch.nn.functional.pad(t, (0, extra))
    key = (t.storage_offset(), tuple(t.shape), t.stride())
    padded = kept.get(key)
    if padded is None:
        padded = kept[key] = torch.nn.functional.pad(t, (0, extra))
    return padded
