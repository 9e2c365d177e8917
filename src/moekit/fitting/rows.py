"""The rows the starts of a fit run on: all of them, or a random subset, in a fixed order.

The starts draw random numbers row by row (a random expert per row, k-means seeds,
the subset itself), so the rows they see must not depend on how the data were
handed over. Two conventions make them so:

* **A fixed order.** The rows are sorted by a fixed random projection of their
  values (design and target), so that the same rows given in another order give the
  same starts. Rows with equal values are interchangeable, wherever they fall.
* **Frequency weights as repeated rows.** With integer weights w_i the starts run on
  the rows repeated w_i times (or on a random subset of those repetitions), which is
  what the data with each row written out w_i times would give. A fit with integer
  weights then starts, and so ends, exactly where the fit of the repeated rows does.
  Other weights stay with their rows: the starts run on the weighted rows (or a
  random subset of the rows, each keeping its weight).

A data-parallel fit gathers the rows' keys, then its rows (or the subset of them)
onto every process in that order, offsets with them (:meth:`EMData.gathered`).
"""

from __future__ import annotations

import torch

from moekit._core.data import EMData

EXPAND_FACTOR = 4
"""Integer weights are written out as repeated rows while the repeated rows number at
most this many times the rows (or the subset size, if larger)."""

EXACT_DRAW_MAX = 2**24
"""Most repeated rows a subset is drawn from by a permutation of all of them (as for
the repeated data); above it, positions are drawn independently."""


def sort_key(data: EMData) -> torch.Tensor:
    """A key (n,) per row that depends only on its values: the rows' fixed order sorts it.

    The projection of [design of the experts, of the gate, target, offset] on a
    direction drawn from a fixed seed (not the fit's generator), which distinct rows
    share with probability zero.
    """
    parts = [data.XeT, data.XgT] if not data.shared_design else [data.XeT]
    parts.append(data.y.reshape(-1, data.n).to(data.XeT.dtype))
    if data.offset is not None:
        parts.append(data.offset.reshape(1, -1))
    Z = torch.cat(parts, 0)  # (f, n)
    direction = torch.rand(Z.shape[0], generator=torch.Generator().manual_seed(0),
                           dtype=Z.dtype).to(Z.device) + 0.5  # fmt: skip
    return direction @ Z


def canonical_order(data: EMData) -> torch.Tensor:
    """A permutation (n,) of the rows that depends only on their values."""
    return torch.argsort(sort_key(data), stable=True)


def integer_weights(weight: torch.Tensor | None) -> bool:
    """Whether every weight is a whole number (None: every row weighs 1)."""
    return weight is None or bool((weight == torch.round(weight)).all())


def start_rows(data: EMData, size: int | None, generator: torch.Generator) -> tuple[EMData, bool]:
    """The rows the starts run on, and whether they stand for all the data.

    Parameters
    ----------
    data : EMData
        This process's rows (without ``comm``; see :func:`start_rows_distributed`).
    size : int or None
        Most (repeated) rows the starts run on; None: all of them.
    generator : torch.Generator
        Draws the subset: ``randperm`` of the rows, or of the repeated rows, in the
        fixed order, as one row per repetition would draw it.

    Returns
    -------
    rows : EMData
    whole : bool
        True when ``rows`` are all the data (reordered, or integer weights written
        out as repeated rows): a fit on them is a fit on the data.
    """
    order = canonical_order(data).cpu()
    w = None if data.weight is None else data.weight.cpu()[order]
    rows, written_out, whole = _pick(order, w, data.n, size, generator)
    if whole and not written_out and bool((order == torch.arange(data.n)).all()):
        # the rows are in their fixed order already (those of an enclosing fit's
        # starts): the same object, so that the fits of simpler models made on
        # them are recognised and shared (see run_em's nested fits)
        return data, True
    out = data.subset(rows.to(data.XeT.device))
    return (_unweighted(out) if written_out else out), whole


def start_rows_distributed(
    data: EMData, size: int | None, generator: torch.Generator
) -> tuple[EMData, bool]:
    """:func:`start_rows` for a data-parallel fit: rows gathered onto every process.

    The rows' keys (one float per row) and weights are gathered once, so that every
    process knows the fixed order of all the rows; every process then draws the same
    positions in it with the same generator, and the rows are gathered in that
    order: the starts are those of one process holding the shards end to end. All
    rows when there are at most ``size``: the gathered data then stand for all the
    data.
    """
    order = torch.argsort(data.comm.gather_rows(sort_key(data)).cpu(), stable=True)
    w = None if data.weight is None else data.comm.gather_rows(data.weight).cpu()[order]
    rows, written_out, whole = _pick(order, w, data.n_total, size, generator)
    out = data.gathered(rows)
    return (_unweighted(out) if written_out else out), whole


def _pick(order: torch.Tensor, w: torch.Tensor | None, n: int, size: int | None,
          generator: torch.Generator) -> tuple[torch.Tensor, bool, bool]:  # fmt: skip
    """The rows (indices, in the fixed order ``order``) the starts run on, whether their
    integer weights are written out as repeated rows, and whether they are all the data.
    ``w`` are the weights in that order (None: every row weighs 1)."""
    total = n if w is None else float(w.sum())
    if integer_weights(w):
        expand = w is not None and not bool((w == 1).all())
        total = round(total)
        if size is not None and total > size:
            pick = _draw(total, size, generator)
            if w is not None:  # position among the repetitions -> the row repeated
                pick = torch.searchsorted(torch.cumsum(w.to(torch.int64), 0), pick, right=True)
            return order[pick], True, False
        if expand and total <= EXPAND_FACTOR * max(n, size or 0):
            return torch.repeat_interleave(order, w.to(torch.int64)), True, True
        return order, False, True
    if size is not None and n > size:
        pick = torch.randperm(n, generator=generator, device="cpu")[:size]
        return order[pick], False, False
    return order, False, True


def _draw(total: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` distinct positions among ``total`` (independent ones when ``total`` is huge)."""
    if total <= EXACT_DRAW_MAX:
        return torch.randperm(total, generator=generator, device="cpu")[:size]
    return torch.randint(0, total, (size,), generator=generator, device="cpu")


def _unweighted(data: EMData) -> EMData:
    """The rows as repeated rows of weight 1 (the weight written out already)."""
    data.weight = None
    return data
