"""Dropless dispatch fused into one autograd Function with a hand-written backward.

For tokens ``x`` (T, d) and kept assignments ``a = 1..A`` sorted by expert, with
token ``t_a``, expert ``e_a`` and combine weight ``s_a``, it computes

.. math::

    h_a = \\phi(x_{t_a} W^{in}_{e_a}), \\qquad
    \\mathrm{out}_t = \\sum_{a : t_a = t} s_a \\, h_a W^{out}_{e_a},

where :math:`\\phi` is SwiGLU (``h = silu(g) * u`` for ``[g, u] = x W^{in}``) or GELU,
and its gradients

.. math::

    \\bar y_a = \\bar{\\mathrm{out}}_{t_a}, \\quad
    \\bar s_a = \\langle \\bar y_a W^{out\\top}_{e_a}, h_a \\rangle, \\quad
    \\bar h_a = s_a \\bar y_a W^{out\\top}_{e_a}, \\quad
    \\bar W^{out}_e = \\sum_{e_a = e} h_a^\\top (s_a \\bar y_a),

then back through :math:`\\phi` and the first matmul, and
:math:`\\bar x_t = \\sum_{a: t_a = t} \\bar x_{a}`.

Why a hand-written backward: on the CPU the time outside the matmuls goes mostly to
allocating large fresh tensors (the kernel zero-fills every new page) and to
elementwise passes over them. Autograd over ``index_select -> grouped_mm -> swiglu ->
* s -> grouped_mm -> index_add`` allocates a temporary for every elementwise op in
both directions (the weight scaling alone costs three (A, H) tensors). Here the
scaling is applied in place, the SwiGLU backward writes straight into the two halves
of one buffer, the row dot products run as one batched matmul, and nothing is
allocated that the plain expert computation (the compute floor) would not allocate
too, apart from the two gathers that dispatch needs anyway. Tensors saved for
backward are never modified, so ``retain_graph=True`` stays correct.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fused_moe"]


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(-1)`` for (A, H) inputs without an (A, H) temporary; as (A,)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class _FusedMoE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_in, w_out, scale, token, offs, activation):  # type: ignore[override]
        n_tokens = x.shape[0]
        xs = x.index_select(0, token)  # (A, d) rows grouped by expert
        hin = F.grouped_mm(xs, w_in, offs=offs)  # (A, n*H)
        if activation == "swiglu":
            gate, up = hin.chunk(2, dim=-1)  # (A, H) each, views
            silu_gate = F.silu(gate)  # (A, H)
            h = silu_gate * up  # (A, H)
        else:
            silu_gate = None
            h = F.gelu(hin)  # (A, H)
        y = F.grouped_mm(h, w_out, offs=offs)  # (A, d)
        y.mul_(scale[:, None].to(y.dtype))  # combine weights, in place
        out = y.new_zeros(n_tokens, y.shape[-1]).index_add_(0, token, y)  # (T, d)
        ctx.activation = activation
        ctx.save_for_backward(xs, hin, silu_gate, h, w_in, w_out, scale, token, offs)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        xs, hin, silu_gate, h, w_in, w_out, scale, token, offs = ctx.saved_tensors
        s = scale[:, None].to(h.dtype)  # (A, 1)
        gy = grad_out.index_select(0, token)  # (A, d), contiguous even for a stride-0 grad
        gh = F.grouped_mm(gy, w_out.transpose(1, 2), offs=offs)  # (A, H) = gy W_out^T
        grad_scale = _row_dot(gh, h).to(scale.dtype)  # (A,)
        gh.mul_(s)  # dL/dh
        gy.mul_(s)  # dL/d(h W_out)
        grad_w_out = F.grouped_mm(h.t(), gy, offs=offs)  # (E, H, d)
        del gy
        if ctx.activation == "swiglu":
            gate, up = hin.chunk(2, dim=-1)
            n_hidden = gate.shape[-1]
            ghin = torch.empty_like(hin)  # (A, 2H): [dL/dgate, dL/dup]
            torch.mul(gh, silu_gate, out=ghin[:, n_hidden:])  # dL/dup = gh * silu(gate)
            gh.mul_(up)  # dL/dsilu(gate)
            torch.ops.aten.silu_backward.grad_input(gh, gate, grad_input=ghin[:, :n_hidden])
        else:
            ghin = torch.ops.aten.gelu_backward(gh, hin)  # (A, H)
        del gh
        grad_w_in = F.grouped_mm(xs.t(), ghin, offs=offs)  # (E, d, n*H)
        gxs = F.grouped_mm(ghin, w_in.transpose(1, 2), offs=offs)  # (A, d)
        del ghin
        grad_x = gxs.new_zeros(grad_out.shape).index_add_(0, token, gxs)  # (T, d)
        return grad_x, grad_w_in, grad_w_out, grad_scale, None, None, None


def fused_moe(
    x: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    scale: Tensor,
    token: Tensor,
    counts: list[int],
    activation: str,
) -> Tensor:
    """Gather, run the experts with ``grouped_mm``, weight and combine, in one Function.

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

    Returns
    -------
    Tensor of shape (T, d)
    """
    offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)  # (E,)
    return _FusedMoE.apply(x, w_in, w_out, scale, token, offs, activation)
