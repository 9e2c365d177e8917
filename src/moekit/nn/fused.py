"""Dropless dispatch fused into one autograd Function with a hand-written backward.

For tokens ``x`` (T, d) and kept assignments ``a = 1..A`` sorted by expert, with
token ``t_a``, expert ``e_a`` and combine weight ``s_a``, it computes

.. math::

    h_a = \\phi(x_{t_a} W^{in}_{e_a}), \\qquad
    \\mathrm{out}_t = \\sum_{a : t_a = t} s_a \\, h_a W^{out}_{e_a},

where :math:`\\phi` is SwiGLU (``h = silu(g) * u`` for ``[g, u] = x W^{in}``) or GELU,
and its gradients

.. math::

    \\bar s_a = \\langle \\bar{\\mathrm{out}}_{t_a} W^{out\\top}_{e_a}, h_a \\rangle, \\quad
    \\bar h_a = s_a \\, \\bar{\\mathrm{out}}_{t_a} W^{out\\top}_{e_a}, \\quad
    \\bar W^{out}_e = \\sum_{e_a = e} h_a^\\top \\, s_a \\bar{\\mathrm{out}}_{t_a},

then back through :math:`\\phi` and the first matmul, and
:math:`\\bar x_t = \\sum_{a: t_a = t} \\bar x_a`.

Why by hand: on the CPU, what costs beyond the matmuls is mostly *fresh memory*.
Every new tensor larger than glibc's mmap threshold (32 MB at most) is mapped anew,
and the kernel faults in and zero-fills each of its pages on first touch; at the
benchmark sizes the (A, .) tensors of a sorted dispatch are 30-130 MB each, and
autograd over ``index_select -> matmul -> swiglu -> * s -> matmul -> index_add``
allocates one for every step in both directions. Here

- each expert is one *block*: its rows are gathered, computed and added back on their
  own, so every temporary is one expert's size and malloc recycles it (the sorted
  order is still what makes each expert's tokens one contiguous ``token`` slice);
  the page-fault column of ``bench/results/layer_speed.md`` shows the difference
  (none at E=64 for this path, hundreds of thousands for autograd over grouped_mm);
- the combine weight is applied in place, the SwiGLU backward writes straight into
  the two halves of one buffer, and the gradient of the combine weights (which
  reaches the router) is a batched row dot product, so the elementwise steps
  allocate nothing beyond what the backward pass keeps.

With ``grouped=True`` all experts form one block computed with
:func:`torch.nn.functional.grouped_mm` (one kernel per projection where a grouped
kernel exists, as on recent GPUs). Tensors saved for backward are never modified,
so ``retain_graph=True`` stays correct.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fused_moe"]


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(-1)`` for (R, H) inputs without an (R, H) temporary; as (R,)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _block_forward(x, token, scale, w_in, w_out, mm, activation, out):
    """One block of rows: experts on ``x[token]``, weighted, added into ``out``."""
    xs = x.index_select(0, token)  # (R, d)
    hin = mm(xs, w_in)  # (R, n*H)
    if activation == "swiglu":
        gate, up = hin.chunk(2, dim=-1)  # (R, H) views
        silu_gate = F.silu(gate)  # (R, H)
        h = silu_gate * up  # (R, H)
    else:
        silu_gate = None
        h = F.gelu(hin)  # (R, H)
    y = mm(h, w_out)  # (R, d)
    y.mul_(scale[:, None].to(y.dtype))  # combine weights, in place
    out.index_add_(0, token, y)
    return xs, hin, silu_gate, h


def _block_backward(grad_out, token, scale, hin, silu_gate, h, w_in, w_out, mm, activation):
    """One block's gradients: combine weights, weighted output rows, hidden input, x rows."""
    s = scale[:, None].to(h.dtype)  # (R, 1)
    gy = grad_out.index_select(0, token)  # (R, d), contiguous even for a stride-0 grad
    gh = mm(gy, w_out.transpose(-1, -2))  # (R, H) = gy W_out^T
    grad_scale = _row_dot(gh, h).to(scale.dtype)  # (R,)
    gh.mul_(s)  # dL/dh
    gy.mul_(s)  # dL/d(h W_out), for the W_out gradient
    if activation == "swiglu":
        gate, up = hin.chunk(2, dim=-1)
        n_hidden = gate.shape[-1]
        ghin = torch.empty_like(hin)  # (R, 2H): [dL/dgate, dL/dup]
        torch.mul(gh, silu_gate, out=ghin[:, n_hidden:])  # dL/dup = gh * silu(gate)
        gh.mul_(up)  # dL/dsilu(gate)
        torch.ops.aten.silu_backward.grad_input(gh, gate, grad_input=ghin[:, :n_hidden])
    else:
        ghin = torch.ops.aten.gelu_backward(gh, hin)  # (R, H)
    gxs = mm(ghin, w_in.transpose(-1, -2))  # (R, d)
    return grad_scale, gy, ghin, gxs


class _FusedMoE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_in, w_out, scale, token, counts, grouped, activation):  # type: ignore[override]
        out = x.new_zeros(x.shape)  # (T, d)
        saved = []
        for span, wi, wo, mm in _blocks(counts, grouped, w_in, w_out, x.device):
            rows = span.rows
            block = _block_forward(x, token[rows], scale[rows], wi, wo, mm, activation, out)
            saved.extend(t if t is not None else torch.empty(0) for t in block)
        ctx.counts, ctx.grouped, ctx.activation = counts, grouped, activation
        ctx.save_for_backward(w_in, w_out, scale, token, *saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        w_in, w_out, scale, token, *saved = ctx.saved_tensors
        grad_x = grad_out.new_zeros(grad_out.shape)  # (T, d)
        grad_scale = torch.empty_like(scale)  # (A,)
        grad_w_in = torch.empty_like(w_in)  # (E, d, n*H), each expert written once below
        grad_w_out = torch.empty_like(w_out)  # (E, H, d)
        for e, count in enumerate(ctx.counts):
            if count == 0 and not ctx.grouped:  # no block writes these experts
                grad_w_in[e].zero_()
                grad_w_out[e].zero_()
        blocks = _blocks(ctx.counts, ctx.grouped, w_in, w_out, grad_out.device)
        for i, (span, wi, wo, mm) in enumerate(blocks):
            rows = span.rows
            xs, hin, silu_gate, h = saved[4 * i : 4 * i + 4]
            silu_gate = silu_gate if ctx.activation == "swiglu" else None
            g_scale, gy, ghin, gxs = _block_backward(
                grad_out, token[rows], scale[rows], hin, silu_gate, h, wi, wo, mm, ctx.activation
            )
            grad_scale[rows] = g_scale
            grad_x.index_add_(0, token[rows], gxs)
            if ctx.grouped:  # one block: every expert's weight gradient at once
                offs = mm.keywords["offs"]
                grad_w_out = F.grouped_mm(h.t(), gy, offs=offs)  # (E, H, d)
                grad_w_in = F.grouped_mm(xs.t(), ghin, offs=offs)  # (E, d, n*H)
            else:
                e = span.expert
                torch.mm(h.t(), gy, out=grad_w_out[e])  # (H, d)
                torch.mm(xs.t(), ghin, out=grad_w_in[e])  # (d, n*H)
        return grad_x, grad_w_in, grad_w_out, grad_scale, None, None, None, None


class _Span(NamedTuple):
    """Rows ``start:stop`` of the sorted assignments, all of ``expert`` (None: all experts)."""

    start: int
    stop: int
    expert: int | None

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)


def _blocks(counts, grouped, w_in, w_out, device):
    """(rows, W_in, W_out, matmul) per block: one per expert with tokens, or one in all."""
    if grouped:
        offs = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)  # (E,)
        return [(_Span(0, sum(counts), None), w_in, w_out, partial(F.grouped_mm, offs=offs))]
    blocks, start = [], 0
    for e, count in enumerate(counts):
        if count:
            blocks.append((_Span(start, start + count, e), w_in[e], w_out[e], torch.mm))
        start += count
    return blocks


def fused_moe(
    x: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    scale: Tensor,
    token: Tensor,
    counts: list[int],
    activation: str,
    grouped: bool = False,
) -> Tensor:
    """Gather, run the experts, weight and combine, in one autograd Function.

    Parameters
    ----------
    x : Tensor of shape (T, d)
        Tokens.
    w_in : Tensor of shape (E, d, n*H)
    w_out : Tensor of shape (E, H, d)
        Stacked expert weights.
    scale : Tensor of shape (A,)
        Combine weight of each kept assignment.
    token : Tensor of shape (A,)
        Token of each kept assignment, grouped by expert.
    counts : list of int
        Assignments per expert, summing to ``A``.
    activation : {'swiglu', 'gelu'}
    grouped : bool, default=False
        One block computed with ``grouped_mm`` instead of one block per expert.

    Returns
    -------
    Tensor of shape (T, d)
        In the autocast dtype under autocast (the matmuls are on autocast's
        lower-precision list), else in the dtype of ``x``.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device):
        # run the whole Function in the autocast dtype, as autocast would run each matmul
        dtype = torch.get_autocast_dtype(device)
        x, w_in, w_out = x.to(dtype), w_in.to(dtype), w_out.to(dtype)
        with torch.autocast(device, enabled=False):
            return _FusedMoE.apply(x, w_in, w_out, scale, token, counts, grouped, activation)
    return _FusedMoE.apply(x, w_in, w_out, scale, token, counts, grouped, activation)
