"""The data an EM fit works on, and the row chunks it is streamed in.

It lives on the shared floor because the expert and gate families read it and the
EM loop builds it: every arrow of the statistical room then points down.

EM touches every row once per iteration. Streaming the rows in chunks lets the
M-step's sufficient statistics be summed in the same pass as the E-step, so that
an iteration costs about one read of the data, and bounds the temporaries. The
chunk size, 65,536 rows, was chosen by measurement on a 2-core CPU at n = 1e6:
16,384-row chunks (cache-sized) gave iterations of 2.7 to 4.3 times a weighted Gram
matrix, 65,536-row chunks 2.5 to 2.75 times; with fewer, larger chunks the Python
overhead per operation shrinks and the elementwise work splits better over threads.

Wide designs. The packed products below have p(p+1)/2 rows: past a dozen or two
columns they cost more than a matrix product per Gram, and they outgrow the data
itself (at p = 200, 20,000 rows of products, 10 GB for a 65,536-row chunk). Above
``PACKED_MAX_P`` columns the weighted Grams are instead formed one weight at a
time, X^T diag(w_t) X as one matrix product each, with scratch the size of the
chunk; and every chunk is sized so that its scratch stays under
``CHUNK_SCRATCH_BYTES``. Both paths sum the same terms, so EM is unchanged.

Small data. The products depend on the data alone, so where the whole data is one
chunk they are built once per fit and kept (while they take at most
``KEPT_PRODUCTS_BYTES``): a later pass then forms its weighted Grams in one matrix
product, with half the flops of one product per weight, where the products stay in
cache or the weights are many (``KEPT_MIN_WEIGHTS``); reading products from memory
costs more than a few products per weight. Measured on one thread at breast
cancer's size (455 rows, 31 columns, 12 weights) 4 times faster; at digits' (1,437
rows, 65 columns, 30 weights) twice.

Layout: designs are stored feature-major, ``XeT`` of shape (p, n), and every
per-chunk quantity is expert-major, (K, n_chunk). With K a handful, reductions over
experts then become elementwise operations between K contiguous rows, and the
matrix products have a long inner dimension; measured on a 2-core CPU this is 3 to
10 times faster per operation than the (n, K) layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from moekit._core.alignment import register_design
from moekit._core.distributed import DataGroup
from moekit._core.linalg import unpack_triu

DEFAULT_CHUNK = 65536
"""Most rows per chunk."""

MIN_CHUNK = 4096
"""Fewest rows per chunk (but the last), whatever the width."""

CHUNK_SCRATCH_BYTES = 64 * 2**20
"""Bound on a chunk's scratch for the weighted Grams; wide designs get shorter chunks."""

PACKED_MAX_P = 24
"""Widest design (features and intercept) whose weighted Grams use the packed products.

Measured on a 2-core CPU, one EM iteration at n = 200,000, K = 3, softmax gate with
Newton steps. Two threads: packed products are faster up to 24 columns (by 40% at
16, 10% at 24), per weight faster from 28 (by 20% at 28, 35% at 32 to 36). One
thread: the two are even from 16 to 22 columns, per weight is 30% faster at 24 and
3 to 4 times faster at 100 to 200 columns.
"""


KEPT_PRODUCTS_BYTES = 64 * 2**20
"""Largest packed products kept from pass to pass where the data is one chunk."""

CACHED_PRODUCTS_BYTES = 8 * 2**20
KEPT_MIN_WEIGHTS = 16
"""Kept products larger than ``CACHED_PRODUCTS_BYTES`` serve only calls with at least
``KEPT_MIN_WEIGHTS`` weights. Measured on one thread: reading the products from
memory costs about as much as 15 separate products per weight (at 65 columns and
1,437 rows, 8.5 ms for 6 weights against 2.7 ms per weight; 12.7 ms for 36 against
27 ms); products that stay in cache win at any count (31 columns, 455 rows and 12
weights: 0.22 ms against 0.87 ms).
"""


def packed(p: int) -> bool:
    """Whether the weighted Grams of a p-column design come from the packed products."""
    return p <= PACKED_MAX_P


def gram_scratch_rows(p: int, m: int) -> int:
    """Rows of (chunk-wide) scratch the weighted Grams of a design use, per chunk.

    Packed: the products, p(p+1)/2 + p m + m rows. Per weight: [x, y] and its
    weighted copy, 2 (p + m) rows.
    """
    return p * (p + 1) // 2 + p * m + m if packed(p) else 2 * (p + m)


@dataclass
class EMData:
    """Design matrices and target of one fit.

    Attributes
    ----------
    XeT : Tensor of shape (p_e, n)
        Expert design, feature-major: standardised features, then a row of ones
        (the intercept) as the last row.
    XgT : Tensor of shape (p_g, n)
        Gate design, built the same way; often the very same tensor as ``XeT``.
    y : Tensor of shape (m, n) or (n,)
        Target as the expert family wants it: standardised floats (output-major),
        counts, or int64 class codes.
    cache : dict
        Per-fit precomputations, keyed by their owner.
    comm : DataGroup or None
        For a data-parallel fit, the processes whose rows together make the data;
        these rows are this process's shard. Sums over rows that a family forms
        outside the E-step's statistics go through :meth:`reduce`.
    n_global : int or None
        Rows over all processes (a data-parallel fit); None: ``n``.
    weight : Tensor of shape (n,) or None
        Frequency weight w_i of every row (positive); None: every row weighs 1. Row
        i's log-likelihood enters the objective times w_i, so an integer weight is
        the row repeated.
    offset : Tensor of shape (n,) or None
        A known term added to every expert's linear predictor (log exposure), for
        the families with one; None: no offset.
    """

    XeT: torch.Tensor
    XgT: torch.Tensor
    y: torch.Tensor
    cache: dict[str, Any] = field(default_factory=dict)
    comm: DataGroup | None = None
    n_global: int | None = None
    weight: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    _work: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    #: per buffer of products: the rows (start, stop) it holds, and how many are filled
    _filled: dict[str, tuple[int, int, int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        register_design(self.XeT, self.XgT)  # read-only: padded once (see alignment)

    def workspace(self, name: str, rows: int, cols: int) -> torch.Tensor:
        """A scratch buffer (rows, cols) reused by every chunk of every pass."""
        buf = self._work.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] < cols:
            buf = self.XeT.new_empty((rows, cols))
            self._work[name] = buf
            self._filled.pop(name, None)  # a new buffer holds nothing yet
        return buf

    @property
    def n(self) -> int:
        return int(self.XeT.shape[1])

    @property
    def n_total(self) -> int:
        """Rows of the whole data: over every process of a data-parallel fit."""
        return self.n if self.n_global is None else self.n_global

    @property
    def w_total(self) -> float:
        """Total weight of the whole data, sum_i w_i (``n_total`` without weights)."""
        if self.weight is None:
            return float(self.n_total)
        if "w_total" not in self.cache:  # one all-reduce per fit, not per pass
            self.cache["w_total"] = float(self.reduce(self.weight.sum()))
        return self.cache["w_total"]

    def reduce(self, nest: Any) -> Any:
        """Sums over this process's rows -> sums over all rows (the identity alone)."""
        return nest if self.comm is None else self.comm.sum(nest)

    @property
    def shared_design(self) -> bool:
        """Whether gate and experts see the same features."""
        return self.XgT is self.XeT

    @property
    def n_targets(self) -> int:
        """Rows of ``y`` that enter the weighted Grams (0 for a 1-d target)."""
        return 0 if self.y.ndim == 1 else int(self.y.shape[0])

    def chunk_rows(self, size: int = DEFAULT_CHUNK) -> int:
        """Rows per chunk: at most ``size``, fewer when the designs are wide.

        A chunk's largest scratch is that of its weighted Grams (see
        :func:`gram_scratch_rows`), one float per row of the chunk and row of the
        scratch; it is kept under ``CHUNK_SCRATCH_BYTES``, but chunks never go below
        ``MIN_CHUNK`` rows (the Python overhead per chunk would then dominate).
        """
        width = gram_scratch_rows(int(self.XeT.shape[0]), self.n_targets)
        if not self.shared_design:
            width += gram_scratch_rows(int(self.XgT.shape[0]), 0)
        fit = CHUNK_SCRATCH_BYTES // (width * self.XeT.element_size())
        return max(1, min(size, max(MIN_CHUNK, fit)))

    def chunks(self, size: int = DEFAULT_CHUNK) -> Iterator[Chunk]:
        size = self.chunk_rows(size)
        for start in range(0, self.n, size):
            yield Chunk(start, min(start + size, self.n), self)

    def subset(self, rows: torch.Tensor) -> EMData:
        """This process's rows ``rows`` (for short restarts), as data of their own."""
        XeT = self.XeT[:, rows].contiguous()
        XgT = XeT if self.shared_design else self.XgT[:, rows].contiguous()
        return EMData(XeT, XgT, self.y[..., rows].contiguous(),
                      weight=_rows(self.weight, rows), offset=_rows(self.offset, rows))  # fmt: skip

    def gathered(self, rows: torch.Tensor | None = None) -> EMData:
        """Rows ``rows`` of the whole data, in that order, on every process.

        ``rows`` are global indices (the shards of processes 0, 1, ... laid end to
        end), the same tensor on every process; None takes every row, in rank order.
        Each process sends the rows it holds, so the exchange is the size of the
        result. Without ``comm``, :meth:`subset` (or the data itself).
        """
        if self.comm is None:
            return self if rows is None else self.subset(rows)
        counts = self.comm.row_counts(self.n)
        rank = self.comm.rank
        offset = sum(counts[:rank])
        if rows is None:
            local, order = self, None
        else:
            rows = rows.cpu()
            starts = torch.tensor([0, *counts]).cumsum(0)
            owner = torch.bucketize(rows, starts[1:], right=True)  # the rank holding each row
            mine = rows[owner == rank] - offset
            local = self.subset(mine.to(self.XeT.device))
            # rows arrive grouped by rank; where each one goes in the order of ``rows``
            order = torch.cat([torch.nonzero(owner == r).flatten() for r in range(len(counts))])
        XeT = self.comm.gather_rows(local.XeT)
        XgT = XeT if self.shared_design else self.comm.gather_rows(local.XgT)
        y = self.comm.gather_rows(local.y)
        extra = {k: None if getattr(local, k) is None else self.comm.gather_rows(getattr(local, k))
                 for k in ("weight", "offset")}  # fmt: skip
        if order is not None:
            inv = torch.argsort(order).to(XeT.device)
            XeT = XeT[:, inv].contiguous()
            XgT = XeT if self.shared_design else XgT[:, inv].contiguous()
            y = y[..., inv].contiguous()
            extra = {k: _rows(v, inv) for k, v in extra.items()}
        return EMData(XeT, XgT, y, **extra)


def _rows(t: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t[rows].contiguous()  # a per-row vector's entries


class Chunk:
    """Rows ``start:stop`` of an :class:`EMData`, with a scratch dict for one pass.

    Experts and gates may leave intermediates in ``scratch`` during ``log_prob`` (the
    gate's probabilities, say) and pick them up in ``chunk_stats``.
    """

    __slots__ = ("XeT", "XgT", "data", "offset", "scratch", "start", "stop", "weight", "y")

    def __init__(self, start: int, stop: int, data: EMData) -> None:
        self.start, self.stop, self.data = start, stop, data
        self.XeT = data.XeT[:, start:stop]
        self.XgT = self.XeT if data.shared_design else data.XgT[:, start:stop]
        self.y = data.y[..., start:stop]
        self.weight = None if data.weight is None else data.weight[start:stop]
        self.offset = None if data.offset is None else data.offset[start:stop]
        self.scratch: dict[str, Any] = {}

    def products(self, which: str = "e", with_target: bool = False, pad: int = 0) -> torch.Tensor:
        """Products of pairs of the chunk's variables, one row per pair, shape (f, c).

        Rows: x_a x_b for a <= b (packed upper triangle, p(p+1)/2 rows); with
        ``with_target`` also x_a y_j (p m rows, j-major) and y_j^2 (m rows).
        ``products @ resp.T`` then gives every responsibility-weighted Gram matrix
        sum_i r_ik x_i x_i^T, every X^T R_k y and y^T R_k y in one matrix product.
        Built once per chunk and pass (once per fit where the data is one chunk),
        with slice products into a reused buffer (a gather is several times slower),
        and shared by the gate and the experts when they see the same design.
        ``pad``: the rows continued with that many zeros, (f, c + pad) (batched products).
        """
        gate_only = which == "g" and not self.data.shared_design
        xt = self.XgT if gate_only else self.XeT
        key = "prod:g" if gate_only else "prod:e"
        p, c = xt.shape
        n_pairs = p * (p + 1) // 2
        m = 0 if self.y.ndim == 1 else self.y.shape[0]
        total = n_pairs + (p * m + m if not gate_only else 0)
        full = self.data.workspace(key, total, c + pad)
        buf = full[:, :c]
        # rows of products already in the buffer for these rows: they outlive the
        # pass, as the data never change, until other rows' products overwrite them
        tag = self.data._filled.get(key)
        done = tag[2] if tag is not None and tag[:2] == (self.start, self.stop) else 0
        if done == 0:
            r = 0
            for a in range(p):
                torch.mul(xt[a : a + 1], xt[a:], out=buf[r : r + p - a])
                r += p - a
            done = n_pairs
        if with_target and done == n_pairs:
            y = self.y
            for j in range(m):
                torch.mul(xt, y[j : j + 1], out=buf[n_pairs + j * p : n_pairs + (j + 1) * p])
            torch.mul(y, y, out=buf[n_pairs + p * m : total])
            done = total
        self.data._filled[key] = (self.start, self.stop, done)
        if pad:  # zeros past the rows: another chunk's products may have been there
            buf = full[:, : c + pad]
            buf[:, c:].zero_()
        return buf[:done] if with_target else buf[:n_pairs]

    def _keeps_products(self, p: int, with_target: bool, n_weights: int) -> bool:
        """Whether to form this chunk's Grams from products kept for the whole fit.

        Only where the chunk is all the data and its products fit
        ``KEPT_PRODUCTS_BYTES``; and as their one matrix product reads all of them,
        only while they stay in cache (``CACHED_PRODUCTS_BYTES``) or there are many
        weights (``KEPT_MIN_WEIGHTS``).
        """
        if self.start != 0 or self.stop != self.data.n:
            return False
        m = self.data.n_targets if with_target else 0
        rows = p * (p + 1) // 2 + p * m + m
        size = rows * (self.stop - self.start) * self.XeT.element_size()
        return size <= KEPT_PRODUCTS_BYTES and (
            size <= CACHED_PRODUCTS_BYTES or n_weights >= KEPT_MIN_WEIGHTS
        )

    def weighted_grams(
        self, weights: torch.Tensor, which: str = "e", with_target: bool = False
    ) -> torch.Tensor:
        """Weighted Gram matrices sum_i w_ti z_i z_i^T of the chunk, one per weight row.

        z_i is the design row x_i (``which`` picks the expert's or the gate's), or
        with ``with_target`` the row [x_i, y_i]. Sum the results over chunks and read
        them with :func:`unpack_grams`. Narrow designs (p <= ``PACKED_MAX_P``), and
        data of one chunk whose products are kept (``KEPT_PRODUCTS_BYTES``), give
        ``products @ weights.T``, of shape (f, T) in the packed layout of
        :meth:`products`: one matrix product for every weight, the products shared
        with the gate. Wide ones give shape (T, q, q), q = p + m, one matrix product
        per weight, (z * w_t) @ z^T, so the scratch is two copies of the chunk.

        Parameters
        ----------
        weights : Tensor of shape (T, c)
        which : {'e', 'g'}
        with_target : bool
        """
        gate_only = which == "g" and not self.data.shared_design
        xt = self.XgT if gate_only else self.XeT
        p, c = xt.shape
        if packed(p):
            return self.products(which, with_target) @ weights.T  # (f, c) @ (c, T)
        if self._keeps_products(p, with_target and not gate_only, weights.shape[0]):
            # this orientation measured 25% faster for many weights
            return (weights @ self.products(which, with_target).T).T  # ((T, c) @ (c, f)).T
        z = xt  # (q, c)
        if with_target and self.data.n_targets:
            m = self.data.n_targets
            z = self.data.workspace("gram:z", p + m, c)[: p + m, :c]
            z[:p].copy_(xt)
            z[p:].copy_(self.y)
        q = z.shape[0]
        zw = self.data.workspace("gram:zw", q, c)[:q, :c]
        out = xt.new_empty((weights.shape[0], q, q))
        for t in range(weights.shape[0]):
            torch.mul(z, weights[t : t + 1], out=zw)
            torch.mm(zw, z.T, out=out[t])
        return out

    def curvature_grams(self, weights: torch.Tensor, which: str = "e") -> torch.Tensor:
        """:meth:`weighted_grams` (without target) formed in float32 where the design is wide.

        For a curvature that only shapes a Newton-type step: the gradient and the
        objective stay in the data's precision, so the step's fixed point (gradient
        zero) and the loop's monotone check are as exact as before, and a relative
        rounding of 1e-7 in the curvature changes the step by as little. At
        digits' size (1,437 rows, 65 columns, 30 weights, kept products) the one
        matrix product took 9 ms against 26 ms in float64 on one thread. Narrow
        designs (p <= ``PACKED_MAX_P``) and data already in float32 take
        :meth:`weighted_grams` as it is: their products are cheap.

        Parameters
        ----------
        weights : Tensor of shape (T, c)
        which : {'e', 'g'}

        Returns
        -------
        Tensor
            As :meth:`weighted_grams` returns it (layout and the data's dtype).
        """
        gate_only = which == "g" and not self.data.shared_design
        xt = self.XgT if gate_only else self.XeT
        p = xt.shape[0]
        low = torch.float32
        if packed(p) or xt.dtype == low:
            return self.weighted_grams(weights, which)
        if self._keeps_products(p, False, weights.shape[0]):
            prods = self.products(which)  # (f, c), built once per fit
            key = ("prod:g" if gate_only else "prod:e") + ":float32"
            tag = (self.start, self.stop, prods.shape[0])
            low_prods = self.data._work.get(key)
            if low_prods is None or self.data._filled.get(key) != tag:
                low_prods = prods.to(low)  # kept beside the float64 products, half their size
                self.data._work[key], self.data._filled[key] = low_prods, tag
            return (weights.to(low) @ low_prods.T).T.to(xt.dtype)  # (f, T)
        z = xt.to(low)  # (p, c)
        w = weights.to(low)
        zw = torch.empty_like(z)
        out = z.new_empty((w.shape[0], p, p))
        for t in range(w.shape[0]):
            torch.mul(z, w[t : t + 1], out=zw)
            torch.mm(zw, z.T, out=out[t])
        return out.to(xt.dtype)


def unpack_grams(
    stats: torch.Tensor, p: int, m: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read summed :meth:`Chunk.weighted_grams` as X^T W X, X^T W y and y^T W y.

    Parameters
    ----------
    stats : Tensor of shape (f, T) (packed) or (T, p + m, p + m)
    p : int
        Columns of the design.
    m : int
        Target rows included (``with_target``), else 0.

    Returns
    -------
    gram : Tensor of shape (T, p, p)
    xty : Tensor of shape (T, m, p)
    yty : Tensor of shape (T, m)
    """
    if stats.ndim == 2:
        S = stats.T  # (T, f)
        n_pairs = p * (p + 1) // 2
        gram = unpack_triu(S[:, :n_pairs], p)
        xty = S[:, n_pairs : n_pairs + p * m].reshape(S.shape[0], m, p)
        yty = S[:, n_pairs + p * m : n_pairs + p * m + m]
        return gram, xty, yty
    g = stats[:, :p, :p]
    # each entry and its mirror are the same sum, rounded apart: average them
    gram = 0.5 * (g + g.transpose(1, 2))
    return gram, stats[:, p:, :p], stats[:, p:, p:].diagonal(dim1=1, dim2=2)
