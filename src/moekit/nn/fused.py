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

__all__ = ["GroupedRows", "PaddedRows", "fused_moe"]


class GroupedRows:
    """Layout: expert ``e`` owns rows ``offs[e-1]:offs[e]`` of an (A, .) matrix.

    The matmuls are :func:`torch.nn.functional.grouped_mm` calls (one ``mm`` per
    expert inside on the CPU).
    """

    def __init__(self, counts: list[int], device: torch.device) -> None:
        self.offs = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)  # (E,)

    def rows(self, token: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        return token, scale, None

    def unrows(self, grad_scale: Tensor) -> Tensor:
        return grad_scale

    def mm(self, a: Tensor, w: Tensor) -> Tensor:
        """(A, k) rows times (E, k, n) expert weights -> (A, n)."""
        return F.grouped_mm(a, w, offs=self.offs)

    def mm_t(self, a: Tensor, b: Tensor) -> Tensor:
        """Per expert, its rows of ``a`` (A, m) transposed times its rows of ``b`` (A, n)."""
        return F.grouped_mm(a.t(), b, offs=self.offs)  # (E, m, n)


class PaddedRows:
    """Layout: expert ``e`` owns rows ``e*R:(e+1)*R`` of an (E*R, .) matrix.

    ``R`` is the largest expert load; an expert's unused rows hold zero tokens with
    zero weight, so they add nothing and get zero gradients. The matmuls are
    :func:`torch.bmm` over the (E, R, .) view: one parallel kernel for all experts
    instead of one per expert, paid for with ``E*R/A - 1`` of wasted work.
    """

    def __init__(self, counts: list[int], device: torch.device) -> None:
        self.n_experts, self.n_rows = len(counts), max(counts)
        counts_t = torch.tensor(counts, device=device)  # (E,)
        expert = torch.repeat_interleave(torch.arange(len(counts), device=device), counts_t)
        start = torch.cumsum(counts_t, 0) - counts_t  # (E,)
        position = torch.arange(int(counts_t.sum()), device=device) - start[expert]  # (A,)
        self.slot = expert * self.n_rows + position  # (A,) padded row of each assignment
        used = torch.zeros(self.n_experts * self.n_rows, dtype=torch.bool, device=device)
        used[self.slot] = True
        self.unused = (~used).nonzero().flatten()  # (E*R - A,)

    def rows(self, token: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        size = self.n_experts * self.n_rows
        token_rows = token.new_zeros(size).index_copy_(0, self.slot, token)  # (E*R,)
        scale_rows = scale.new_zeros(size).index_copy_(0, self.slot, scale)  # (E*R,)
        return token_rows, scale_rows, self.unused

    def unrows(self, grad_scale: Tensor) -> Tensor:
        return grad_scale.index_select(0, self.slot)  # (A,)

    def mm(self, a: Tensor, w: Tensor) -> Tensor:
        e, r = self.n_experts, self.n_rows
        return torch.bmm(a.view(e, r, -1), w).view(e * r, -1)

    def mm_t(self, a: Tensor, b: Tensor) -> Tensor:
        e, r = self.n_experts, self.n_rows
        return torch.bmm(a.view(e, r, -1).transpose(1, 2), b.view(e, r, -1))  # (E, m, n)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(-1)`` for (A, H) inputs without an (A, H) temporary; as (A,)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class _FusedMoE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_in, w_out, scale, token, layout, activation):  # type: ignore[override]
        n_tokens = x.shape[0]
        token, scale, unused = layout.rows(token, scale)  # (A,) each (padded: (E*R,))
        xs = x.index_select(0, token)  # (A, d) rows grouped by expert
        if unused is not None:
            xs.index_fill_(0, unused, 0.0)  # padding rows: a zero token gives a zero output
        hin = layout.mm(xs, w_in)  # (A, n*H)
        if activation == "swiglu":
            gate, up = hin.chunk(2, dim=-1)  # (A, H) each, views
            silu_gate = F.silu(gate)  # (A, H)
            h = silu_gate * up  # (A, H)
        else:
            silu_gate = None
            h = F.gelu(hin)  # (A, H)
        y = layout.mm(h, w_out)  # (A, d)
        y.mul_(scale[:, None].to(y.dtype))  # combine weights, in place
        out = y.new_zeros(n_tokens, y.shape[-1]).index_add_(0, token, y)  # (T, d)
        ctx.activation, ctx.layout = activation, layout
        ctx.save_for_backward(xs, hin, silu_gate, h, w_in, w_out, scale, token)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        xs, hin, silu_gate, h, w_in, w_out, scale, token = ctx.saved_tensors
        layout = ctx.layout
        s = scale[:, None].to(h.dtype)  # (A, 1)
        gy = grad_out.index_select(0, token)  # (A, d), contiguous even for a stride-0 grad
        gh = layout.mm(gy, w_out.transpose(1, 2))  # (A, H) = gy W_out^T
        grad_scale = layout.unrows(_row_dot(gh, h).to(scale.dtype))  # (A,)
        gh.mul_(s)  # dL/dh
        gy.mul_(s)  # dL/d(h W_out)
        grad_w_out = layout.mm_t(h, gy)  # (E, H, d)
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
        grad_w_in = layout.mm_t(xs, ghin)  # (E, d, n*H)
        gxs = layout.mm(ghin, w_in.transpose(1, 2))  # (A, d)
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
    layout: str = "grouped",
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
    layout : {'grouped', 'padded'}, default='grouped'
        :class:`GroupedRows` (grouped_mm) or :class:`PaddedRows` (bmm).

    Returns
    -------
    Tensor of shape (T, d)
    """
    rows = {"grouped": GroupedRows, "padded": PaddedRows}[layout](counts, x.device)
    return _FusedMoE.apply(x, w_in, w_out, scale, token, rows, activation)
