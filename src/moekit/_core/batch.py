"""Helpers for families that compute many EM starts at once.

S starts of one model are stacked on a leading axis: every parameter field of
shape (K, ...) becomes (S, K, ...), every per-chunk array (S, K, c). Every product
is then a batched one (``torch.bmm``) of the shape one start alone has: a matrix
product over all S K rows at once would let the BLAS pick its blocking (and so its
rounding) from S. MKL's results also depend on where in memory an operand starts,
and, for products with one column, on the batch itself; so the products with the
rows of a chunk (:func:`times_design`, :func:`design_sums`, :func:`batched_grams`)
continue each start's rows with zeros to a multiple of
:data:`~moekit._core.alignment.ALIGN` values (the designs' copies made once per
fit), and a product with one column is a sum of
elementwise products. A start's numbers then do not depend on which starts share
its batch, for every shape (a sweep of K, p and odd and even row counts is in the
tests).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch

from moekit._core.alignment import ALIGN, aligned_rows
from moekit._core.data import Chunk, packed


def stack_params(items: list) -> Any:
    """Parameters of S starts (dataclasses of tensors) as one with a leading S axis."""
    first = items[0]
    return type(first)(
        **{f.name: torch.stack([getattr(p, f.name) for p in items]) for f in fields(first)}
    )


def lerp_params(old: Any, new: Any, t: float) -> Any:
    """``old + t (new - old)`` field by field for a dataclass of tensors."""
    if t == 1.0:
        return new
    values = {}
    for f in fields(new):
        a, b = getattr(old, f.name), getattr(new, f.name)
        values[f.name] = a + t * (b - a) if isinstance(b, torch.Tensor) else b
    return type(new)(**values)


def unstack_params(stacked: Any) -> list:
    """The S parameters of a stacked dataclass, each in memory of its own.

    Copies, not views: a reduction over a view starting inside a larger tensor (the
    norm of a SQUAREM step) rounds by that address, as MKL's products do.
    """
    names = [f.name for f in fields(stacked)]
    S = getattr(stacked, names[0]).shape[0]
    return [type(stacked)(**{n: getattr(stacked, n)[s].clone() for n in names}) for s in range(S)]


def times_design(coef: torch.Tensor, xt: torch.Tensor, base: torch.Tensor | None = None,
                 alpha: float = 1.0) -> torch.Tensor:  # fmt: skip
    """base + alpha coef x_i of every start, row and design row: (S, T, c).

    Parameters
    ----------
    coef : Tensor of shape (S, T, p)
    xt : Tensor of shape (p, c)
        A chunk's design.
    base : Tensor broadcastable to (S, T, c), optional
    alpha : float, default=1.0
        With ``base``: ``torch.baddbmm``'s alpha (-1 gives residuals base - coef x).

    Returns
    -------
    Tensor of shape (S, T, c)
        A view of rows padded to the alignment (each start's rows sit alike).
    """
    c = xt.shape[-1]
    xt = aligned_rows(xt).expand(coef.shape[0], -1, -1)
    if base is None:
        return torch.bmm(coef, xt)[..., :c]
    return torch.baddbmm(aligned_rows(base), coef, xt, alpha=alpha)[..., :c]


def design_sums(weights: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """sum_i w_sti x_i of weights (S, T, c) on a chunk's design xt (p, c): (S, T, p).

    With one design row (an intercept alone) the product is a sum of elementwise
    products: MKL's batched matrix-vector products round by the batch.
    """
    weights, xt = aligned_rows(weights), aligned_rows(xt)
    if xt.shape[0] == 1:
        return (weights * xt).sum(-1, keepdim=True)
    return torch.bmm(weights, xt.T.expand(weights.shape[0], -1, -1))


def batched_grams(
    chunk: Chunk, weights: torch.Tensor, which: str = "e", with_target: bool = False,
    curvature: bool = False,
) -> torch.Tensor:  # fmt: skip
    """:meth:`Chunk.weighted_grams` of S weight sets (S, T, c), stacked (S, ...).

    Narrow designs: one batched product of the packed products with every start's
    weights, (S, f, T). Wide ones: the single-start call per start (its layout,
    (T, q, q), stacked), ``curvature`` taking :meth:`Chunk.curvature_grams`.
    """
    xt = chunk.XgT if which == "g" else chunk.XeT
    if packed(xt.shape[0]):
        prods = chunk.products(which, with_target, pad=-xt.shape[1] % ALIGN)  # as aligned_rows
        weights = aligned_rows(weights)
        return torch.bmm(prods.expand(weights.shape[0], -1, -1), weights.transpose(1, 2))
    if curvature:
        return torch.stack([chunk.curvature_grams(w, which) for w in weights])
    return torch.stack([chunk.weighted_grams(w, which, with_target) for w in weights])


def flat_grams(stats: torch.Tensor) -> torch.Tensor:
    """Stacked :func:`batched_grams` as one start's layout over all S T weights."""
    if stats.ndim == 3:  # packed, (S, f, T) -> (f, S T)
        return stats.transpose(0, 1).reshape(stats.shape[1], -1)
    return stats.reshape(-1, *stats.shape[2:])  # (S, T, q, q) -> (S T, q, q)


def empty_experts(nk: torch.Tensor, per_fit: int) -> torch.Tensor:
    """Experts with no weight at all: n_k <= 1e-12 max(sum of their fit's n_k, 1).

    Such an expert is not determined by the data and keeps its parameters.
    ``nk`` holds the experts of one or more fits, ``per_fit`` each, fit after fit.
    """
    by_fit = nk.reshape(-1, per_fit)
    total = by_fit.sum(1, keepdim=True).clamp(min=1.0)
    return (by_fit <= 1e-12 * total).reshape(nk.shape)
