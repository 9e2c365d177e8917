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

With several intra-op threads the blocks run as tasks on helper threads, one
intra-op thread each, rather than one after another with every small operation split
over the threads: under CPU contention the per-operation barriers made this path
several times slower (:mod:`moekit.nn.threads` gives the cause and the measurements).

With ``grouped=True`` all experts form one block computed with
:func:`torch.nn.functional.grouped_mm` (one kernel per projection where a grouped
kernel exists, as on recent GPUs). Tensors saved for backward are never modified,
so ``retain_graph=True`` stays correct.

The hand-written backward writes into buffers, which autograd cannot differentiate
again: a backward with ``create_graph=True`` (a double backward) recomputes the
layer in plain differentiable ops instead. Under ``torch.compile`` the same
computation runs as one registered operator; the layer chooses between them and the
plain paths in :meth:`moekit.nn.MoE.execution_path`.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.nn.experts import sorted_experts_mm
from moekit.nn.threads import run_blocks

__all__ = ["fused_moe"]


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(-1)`` for (R, H) inputs without an (R, H) temporary; as (R,)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _block_hidden(x, token, w_in, mm, activation):
    """One block's rows ``x[token]``, input projection and hidden activation."""
    xs = x.index_select(0, token)  # (R, d)
    hin = mm(xs, w_in)  # (R, n*H)
    if activation == "swiglu":
        gate, up = hin.chunk(2, dim=-1)  # (R, H) views
        silu_gate = F.silu(gate)  # (R, H)
        h = silu_gate * up  # (R, H)
    else:
        silu_gate = None
        h = F.gelu(hin)  # (R, H)
    return xs, hin, silu_gate, h


def _block_forward(x, token, scale, w_in, w_out, mm, activation):
    """One block of rows: experts on ``x[token]``, weighted; the saved tensors and ``y``."""
    xs, hin, silu_gate, h = _block_hidden(x, token, w_in, mm, activation)
    y = mm(h, w_out)  # (R, d)
    y.mul_(scale[:, None].to(y.dtype))  # combine weights, in place
    return (xs, hin, silu_gate, h), y


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


def _forward(x, w_in, w_out, scale, token, counts, grouped, activation, keep):
    """The fused forward; ``keep`` collects each block's tensors for the backward
    (None: keep nothing, the backward recomputes them)."""
    out = x.new_zeros(x.shape)  # (T, d)
    blocks = _blocks(counts, grouped, w_in, w_out, x.device)
    saved: list = [None] * len(blocks)

    def work(i):
        span, wi, wo, mm = blocks[i]
        rows = span.rows
        saved[i], y = _block_forward(x, token[rows], scale[rows], wi, wo, mm, activation)
        return y

    def add(i, y):  # in block order, so that the sums do not depend on timing
        out.index_add_(0, token[blocks[i][0].rows], y)

    run_blocks(len(blocks), work, add, _block_size(token, w_in, len(blocks)))
    if keep is not None:
        for block in saved:
            keep.extend(t if t is not None else torch.empty(0) for t in block)
    return out


def _backward(grad_out, x, w_in, w_out, scale, token, counts, grouped, activation, saved):
    """The fused backward: gradients of ``x``, ``w_in``, ``w_out`` and ``scale``.

    ``saved`` holds the forward's block tensors, or is None to recompute each block's
    hidden activation from ``x`` just before its gradient (one more input matmul per
    block, and nothing kept between forward and backward).
    """
    grad_x = grad_out.new_zeros(grad_out.shape)  # (T, d)
    grad_scale = torch.empty_like(scale)  # (A,)
    grad_w_in = torch.empty_like(w_in)  # (E, d, n*H), each expert written once below
    grad_w_out = torch.empty_like(w_out)  # (E, H, d)
    for e, count in enumerate(counts):
        if count == 0 and not grouped:  # no block writes these experts
            grad_w_in[e].zero_()
            grad_w_out[e].zero_()
    blocks = _blocks(counts, grouped, w_in, w_out, grad_out.device)
    grouped_grads = []

    def work(i):
        span, wi, wo, mm = blocks[i]
        rows = span.rows
        if saved is None:
            xs, hin, silu_gate, h = _block_hidden(x, token[rows], wi, mm, activation)
        else:
            xs, hin, silu_gate, h = saved[4 * i : 4 * i + 4]
            silu_gate = silu_gate if activation == "swiglu" else None
        g_scale, gy, ghin, gxs = _block_backward(
            grad_out, token[rows], scale[rows], hin, silu_gate, h, wi, wo, mm, activation
        )
        grad_scale[rows] = g_scale  # blocks write disjoint rows and experts
        if grouped:  # one block: every expert's weight gradient at once
            offs = mm.keywords["offs"]
            grouped_grads.append(F.grouped_mm(h.t(), gy, offs=offs))  # (E, H, d)
            grouped_grads.append(F.grouped_mm(xs.t(), ghin, offs=offs))  # (E, d, n*H)
        else:
            e = span.expert
            torch.mm(h.t(), gy, out=grad_w_out[e])  # (H, d)
            torch.mm(xs.t(), ghin, out=grad_w_in[e])  # (d, n*H)
        return gxs

    def add(i, gxs):  # in block order, so that the sums do not depend on timing
        grad_x.index_add_(0, token[blocks[i][0].rows], gxs)

    run_blocks(len(blocks), work, add, _block_size(token, w_in, len(blocks)))
    if grouped_grads:
        grad_w_out, grad_w_in = grouped_grads
    return grad_x, grad_w_in, grad_w_out, grad_scale


def _block_size(token, w_in, n_blocks):
    """Elements of a block's input projection, (R, n*H), on average."""
    return token.numel() * w_in.shape[-1] // max(1, n_blocks)


def _differentiable_backward(ctx, grad_out, x, w_in, w_out, scale, token):
    """The backward in plain autograd ops, so that it can itself be differentiated.

    Used when the caller asked for ``create_graph=True`` (a Hessian-vector product, a
    gradient penalty): the hand-written backward above writes into buffers with
    ``out=`` and in place, which autograd cannot differentiate. It recomputes the
    layer as :func:`~moekit.nn.experts.sorted_experts_mm` from the saved inputs and
    lets autograd take its gradient with ``create_graph=True``.
    """
    # fresh aliases: a gradient taken with respect to ``x`` itself would be the total
    # derivative, and also run through ``scale``, which the router computed from ``x``;
    # the aliases feed this recomputation only, and stay differentiable in the inputs
    x, w_in, w_out, scale = (t.view_as(t) for t in (x, w_in, w_out, scale))
    inputs = (x, w_in, w_out, scale)
    wanted = [i for i, need in enumerate(ctx.needs_input_grad[:4]) if need]
    xs = x.index_select(0, token)  # (A, d)
    y = sorted_experts_mm(xs, w_in, w_out, ctx.counts, scale.to(x.dtype), ctx.activation)
    out = x.new_zeros(x.shape).index_add(0, token, y)  # (T, d)
    grads = torch.autograd.grad(out, [inputs[i] for i in wanted], grad_out, create_graph=True)
    result: list[Tensor | None] = [None] * 4
    for i, g in zip(wanted, grads, strict=True):
        result[i] = g
    return result


class _FusedMoE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_in, w_out, scale, token, counts, grouped, activation):  # type: ignore[override]
        saved: list[Tensor] = []
        out = _forward(x, w_in, w_out, scale, token, counts, grouped, activation, saved)
        ctx.counts, ctx.grouped, ctx.activation = counts, grouped, activation
        # x is saved for the differentiable backward only; it is alive anyway, since
        # the router keeps it for its own gradient
        ctx.save_for_backward(x, w_in, w_out, scale, token, *saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, w_in, w_out, scale, token, *saved = ctx.saved_tensors
        if torch.is_grad_enabled():  # backward(create_graph=True): a double backward follows
            grads = _differentiable_backward(ctx, grad_out, x, w_in, w_out, scale, token)
        else:
            grads = _backward(
                grad_out, x, w_in, w_out, scale, token, ctx.counts, ctx.grouped,
                ctx.activation, saved,
            )  # fmt: skip
        return (*grads, None, None, None, None)


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


# Under torch.compile the Function above cannot be traced: its loop over experts needs
# the counts as Python ints, which are data. The same computation registered as an
# operator is opaque to the compiler, which only needs the shape of its output. An
# operator cannot hand per-block tensors to its backward (their number is data too),
# so the compiled backward recomputes each block's hidden activation instead.


@torch.library.custom_op("moekit::fused_moe", mutates_args=())
def _fused_moe_op(
    x: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    scale: Tensor,
    token: Tensor,
    counts: Tensor,
    grouped: bool,
    activation: str,
) -> Tensor:
    return _forward(x, w_in, w_out, scale, token, counts.tolist(), grouped, activation, None)


@_fused_moe_op.register_fake
def _(x, w_in, w_out, scale, token, counts, grouped, activation):
    return x.new_empty(x.shape)


@torch.library.custom_op("moekit::fused_moe_backward", mutates_args=())
def _fused_moe_backward_op(
    grad_out: Tensor,
    x: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    scale: Tensor,
    token: Tensor,
    counts: Tensor,
    grouped: bool,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _backward(
        grad_out.contiguous(), x, w_in, w_out, scale, token, counts.tolist(), grouped,
        activation, None,
    )  # fmt: skip


@_fused_moe_backward_op.register_fake
def _(grad_out, x, w_in, w_out, scale, token, counts, grouped, activation):
    return (x.new_empty(x.shape), torch.empty_like(w_in), torch.empty_like(w_out),
            torch.empty_like(scale))  # fmt: skip


def _op_setup_context(ctx, inputs, output):
    x, w_in, w_out, scale, token, counts, grouped, activation = inputs
    ctx.save_for_backward(x, w_in, w_out, scale, token, counts)
    ctx.grouped, ctx.activation = grouped, activation


def _op_backward(ctx, grad_out):
    x, w_in, w_out, scale, token, counts = ctx.saved_tensors
    grads = _fused_moe_backward_op(
        grad_out, x, w_in, w_out, scale, token, counts, ctx.grouped, ctx.activation
    )
    return (*grads, None, None, None, None)


_fused_moe_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def fused_moe(
    x: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    scale: Tensor,
    token: Tensor,
    counts: list[int] | Tensor,
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
    counts : list of int, or Tensor of shape (E,)
        Assignments per expert, summing to ``A``. A tensor selects the operator form
        for ``torch.compile`` (the counts stay on the device until the operator runs).
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
    fn = _fused_moe_op if isinstance(counts, Tensor) else _FusedMoE.apply
    if torch.is_autocast_enabled(device):
        # run the whole Function in the autocast dtype, as autocast would run each matmul
        dtype = torch.get_autocast_dtype(device)
        x, w_in, w_out = x.to(dtype), w_in.to(dtype), w_out.to(dtype)
        with torch.autocast(device, enabled=False):
            return fn(x, w_in, w_out, scale, token, counts, grouped, activation)
    return fn(x, w_in, w_out, scale, token, counts, grouped, activation)
