"""One E-pass of the negative binomial experts (:mod:`moekit.experts.negative_binomial`)
in as few passes over the rows as the maths allows.

At n = 1e6 an EM iteration is a few dozen elementwise passes over (K, c) chunks,
each costing about a tenth of a weighted Gram: the log density reuses exp(eta) and
log(1 + phi mu) for the statistics, writes into buffers kept from chunk to chunk
(a new (K, c) tensor costs its page faults), and the dispersion's Newton step
takes its derivatives from sums over rows, the digamma and trigamma parts from a
histogram of the responsibilities over the counts. Every function serves one start,
(K, c) with phi (K, 1), and S starts at once, (S, K, c) with phi (S, K, 1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moekit._core.data import Chunk, EMData

T = torch.Tensor

LANES = 16
"""Table rows and the batched log(1 + phi mu) are padded to a multiple of this many.

``torch.log1p`` computes a tensor of fewer than 16 doubles with scalar code, whose
last bit differs from the vector code's on about a third of values (measured on
AVX-512): padded, no tensor is that short, so an entry's value does not depend on
how many other experts or starts share its tensor.
"""


def padded(n: int) -> int:
    """n rounded up to a multiple of ``LANES``."""
    return -(-n // LANES) * LANES


def count_tables(phi: torch.Tensor, top: int) -> torch.Tensor:
    """Per expert and count y = 0..top (and beyond, to a row of ``LANES``), the sums
    over j < y of log(1 + j phi) - log(j + 1), 1 / (theta + j) and 1 / (theta + j)^2
    (theta = 1 / phi), shape (3, R, T) for phi of shape (R,).

    The first is lgamma(y + theta) - lgamma(theta) + y log phi - log y!, the others
    psi(y + theta) - psi(theta) and psi'(theta) - psi'(y + theta): cumulative sums
    over j = 0..max(y) - 1 instead of lgamma, digamma and trigamma functions of every
    row and expert (and exact as phi -> 0).
    """
    width = padded(top)
    jp = torch.arange(width, dtype=phi.dtype, device=phi.device) * phi.unsqueeze(1)  # (R, T-1)
    inv = phi.unsqueeze(1) / (1.0 + jp)  # 1 / (theta + j)
    terms = torch.stack([jp.log1p_(), inv, inv * inv])  # (3, R, T-1)
    table = torch.cat([terms.new_zeros((3, phi.shape[0], 1)), terms.cumsum(2)], 2)
    j1 = torch.arange(1, width + 2, dtype=phi.dtype, device=phi.device)
    table[0].sub_(torch.lgamma(j1))  # - log y!
    return table


def tables_at(data: EMData, phi: torch.Tensor) -> torch.Tensor | None:
    """:func:`count_tables` at the dispersions ``phi`` (R,), built once per pass (kept
    until other dispersions ask); None where the counts pass the tables (the experts'
    ``prepare`` then left no ``nb_counts``)."""
    if data.cache.get("nb_counts") is None:
        return None
    key = (phi.dtype, phi.device, tuple(phi.tolist()))
    kept = data.cache.get("nb_table")
    if kept is None or kept[0] != key:
        kept = data.cache["nb_table"] = (key, count_tables(phi, data.cache["nb_top"]))
    return kept[1]


def lgamma_y1(chunk: Chunk) -> torch.Tensor:
    """log y! of the chunk's rows (c,), as the experts' ``prepare`` kept it."""
    cached = chunk.data.cache.get("lgamma_y1")
    return cached[chunk.start : chunk.stop] if cached is not None else torch.lgamma(chunk.y[0] + 1)


def base_terms(chunk: Chunk, phi_flat: torch.Tensor, phi: torch.Tensor,
                out: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """lgamma(y + theta) - lgamma(theta) + y log phi - log y! = sum_{j<y} log((1 + j phi)
    / (j + 1)) (..., K, c), read from the tables (:func:`count_tables`) into ``out``
    or, past them, from lgamma. ``phi_flat`` holds the dispersions of every row."""
    tables = tables_at(chunk.data, phi_flat)
    y = chunk.y[0]
    if tables is None:
        theta = 1.0 / phi
        return (torch.lgamma(y + theta) - torch.lgamma(theta) + y * torch.log(phi)
                - lgamma_y1(chunk))  # fmt: skip
    idx = chunk.data.cache["nb_counts"][chunk.start : chunk.stop].expand(phi_flat.shape[0], -1)
    torch.gather(tables[0], 1, idx, out=out.view(idx.shape))
    return out


def log_density(eta: T, l1p: T, y: T, phi: T, base: T) -> T:
    """log p = y (eta - l1p) - theta l1p + base, l1p = log(1 + phi mu), in place on eta."""
    return eta.sub_(l1p).mul_(y).addcmul_(l1p, phi.reciprocal(), value=-1.0).add_(base)


def log1p_in_lanes(mu: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """log(1 + phi mu) (..., c), every row padded to ``LANES``: the same last bit for
    an entry whatever the other rows (starts) of the tensor."""
    c = mu.shape[-1]
    buf = mu.new_zeros((*mu.shape[:-1], padded(c)))
    torch.mul(mu, phi, out=buf[..., :c])
    return buf.log1p_()[..., :c]


def coef_weights(mu: T, phi: T, resp: T, y: T, buffer: Callable[[str], T]) -> tuple[T, T, T]:
    """inv = 1 / (1 + phi mu), u = r (y - mu) inv and h = r mu inv, each (..., K, c):
    the gradient of the coefficients' part of Q is u X^T, its Fisher information the
    Grams of h. ``buffer(name)`` gives a tensor of mu's shape to write into."""
    inv = torch.mul(mu, phi, out=buffer("nb:inv")).add_(1.0).reciprocal_()
    h = torch.mul(resp, inv, out=buffer("nb:h"))
    u = torch.sub(y, mu, out=buffer("nb:u")).mul_(h)
    return inv, u, h.mul_(mu)


def weighted_count_sums(resp: T, chunk: Chunk, phi_flat: T, phi: T) -> tuple[T, T]:
    """sum_i r_ik S_1(y_i) and sum_i r_ik S_2(y_i) (..., K), S_1 = psi(y + theta) -
    psi(theta) and S_2 = psi'(theta) - psi'(y + theta).

    From the tables, as sums over the counts of the rows' weight at each count (a
    histogram over the table's columns) where the counts are fewer than the rows; else read
    per row; past the tables from digamma and trigamma functions.
    """
    y = chunk.y[0]
    tables = tables_at(chunk.data, phi_flat)
    if tables is None:
        theta = 1.0 / phi
        s1 = torch.digamma(y + theta) - torch.digamma(theta)
        s2 = torch.polygamma(1, theta) - torch.polygamma(1, y + theta)
        return (resp * s1).sum(-1), (resp * s2).sum(-1)
    lead, c = resp.shape[:-1], resp.shape[-1]
    r = resp.reshape(-1, c)
    idx = chunk.data.cache["nb_counts"][chunk.start : chunk.stop].expand(r.shape[0], -1)
    if tables.shape[2] <= c:
        hist = r.new_zeros((r.shape[0], tables.shape[2])).scatter_add_(1, idx, r)
        s1, s2 = (hist * tables[1]).sum(1), (hist * tables[2]).sum(1)
    else:
        s1 = (r * tables[1].gather(1, idx)).sum(1)
        s2 = (r * tables[2].gather(1, idx)).sum(1)
    return s1.view(lead), s2.view(lead)


def dispersion_derivatives(
    inv: T, u: T, h: T, l1p: T, resp: T, phi: T, rs1: T, rs2: T
) -> tuple[T, T]:
    """First and second derivatives of Q's part in a_k = log phi_k, (..., K), from
    sums over rows (u and l1p are overwritten).

    With theta = 1 / phi, l = log(1 + phi mu) and inv = 1 / (1 + phi mu),
    d log p / d theta = S_1 - l - phi (y - mu) inv and d^2 log p / d theta^2 =
    -S_2 + phi^2 (mu inv + (y - mu) inv^2) (the terms in 1 / (theta + mu)
    collected, which also keeps them from cancelling as phi -> 0); with
    d theta / d a = -theta and u, h of :func:`coef_weights`,

    .. math::  Q_a = \\theta \\sum_i r_i (l_i - S_{1i}) + \\sum_i u_i, \\qquad
               Q_{aa} = \\sum_i h_i + \\sum_i u_i\\,\\mathrm{inv}_i
                        - \\theta^2 \\sum_i r_i S_{2i} - Q_a.
    """
    theta = phi.reciprocal().squeeze(-1)
    su, sh = u.sum(-1), h.sum(-1)
    su_inv = u.mul_(inv).sum(-1)
    rl = l1p.mul_(resp).sum(-1)
    d1 = theta * (rl - rs1) + su
    return d1, sh + su_inv - theta * theta * rs2 - d1
