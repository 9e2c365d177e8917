"""Expert feed-forward networks: one dense FFN, and a bank of E stacked experts.

An expert is the transformer feed-forward block without biases,

.. math::

    \\mathrm{SwiGLU}(x) = \\big(\\mathrm{silu}(x W_g) \\odot x W_u\\big) W_o, \\qquad
    \\mathrm{GELU}(x) = \\mathrm{gelu}(x W_i) W_o .

The bank stores the weights of all experts stacked, ``w_in`` of shape
(E, d_model, n_in * d_hidden) (for SwiGLU the gate and up projections side by side,
so that one matmul computes both) and ``w_out`` of shape (E, d_hidden, d_model). It
runs on tokens already sorted by expert, each expert on its contiguous slice.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "ExpertBank", "FeedForward", "masked_experts", "sorted_experts_mm"]

ACTIVATIONS = {"swiglu": 2, "gelu": 1}
"""Activation name -> number of input projections it needs."""


def activate(h: Tensor, activation: str) -> Tensor:
    """Apply the expert nonlinearity to the input projection ``h`` of shape (..., n_in*H)."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)  # (..., H), (..., H)
        return F.silu(gate) * up
    return F.gelu(h)


def _init_uniform(w: Tensor, fan_in: int) -> None:
    # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    nn.init.uniform_(w, -bound, bound)


class FeedForward(nn.Module):
    """A dense expert: the feed-forward block every token goes through.

    Used for the shared experts of DeepSeek-MoE and as the dense reference.

    Parameters
    ----------
    d_model, d_hidden : int
        Widths.
    activation : {'swiglu', 'gelu'}, default='swiglu'
    """

    def __init__(self, d_model: int, d_hidden: int, activation: str = "swiglu") -> None:
        super().__init__()
        self.activation = activation
        self.w_in = nn.Parameter(torch.empty(d_model, ACTIVATIONS[activation] * d_hidden))
        self.w_out = nn.Parameter(torch.empty(d_hidden, d_model))
        _init_uniform(self.w_in, d_model)
        _init_uniform(self.w_out, d_hidden)

    def forward(self, x: Tensor) -> Tensor:
        h = activate(x @ self.w_in, self.activation)  # (..., H)
        return h @ self.w_out  # (..., d_model)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    ``grouped_mm``'s backward rejects a gradient with stride 0 (as ``y.sum()`` gives).
    """

    @staticmethod
    def forward(x: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # separate, as torch.func requires
        pass

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad.contiguous()

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:
        return tangent.view_as(tangent)


def _aligned(t: Tensor) -> bool:
    # grouped_mm wants 16-byte aligned row strides and data pointers
    if (t.stride(-2) * t.element_size()) % 16:
        return False
    if torch.compiler.is_compiling():
        return True  # a traced tensor has no data yet; the compiler's buffers are aligned
    try:
        return t.data_ptr() % 16 == 0
    except RuntimeError:  # a torch.func wrapper has no storage of its own
        return True


def sorted_experts_mm(
    x: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    counts: list[int],
    scale: Tensor | None,
    activation: str,
) -> Tensor:
    """Expert ``e`` on its slice of the sorted rows ``x``, in plain differentiable ops.

    Parameters
    ----------
    x : Tensor of shape (A, d)
        Rows sorted by expert.
    w_in : Tensor of shape (E, d, n*H)
    w_out : Tensor of shape (E, H, d)
    counts : list of int
        Rows of each expert, summing to ``A``.
    scale : Tensor of shape (A,) or None
        Combine weight of each row, applied to the narrower of the hidden activation
        and the output (the same result with less memory traffic).
    activation : {'swiglu', 'gelu'}

    Returns
    -------
    Tensor of shape (A, d)
    """
    n_hidden, d_model = w_out.shape[-2:]
    scale_hidden = n_hidden <= d_model
    # unbind once: indexing w[e] in the loop would make the backward pass build one
    # full-size zero gradient per expert
    w_ins, w_outs = w_in.unbind(0), w_out.unbind(0)
    scales = scale.split(counts) if scale is not None else [None] * len(counts)
    outs = []
    for e, (xe, se) in enumerate(zip(x.split(counts), scales, strict=True)):
        h = activate(xe @ w_ins[e], activation)  # (A_e, H)
        if se is not None and scale_hidden:
            h = h * se[:, None]
        y = h @ w_outs[e]  # (A_e, d)
        if se is not None and not scale_hidden:
            y = y * se[:, None]
        outs.append(y)
    return torch.cat(outs) if outs else x.new_zeros(0, d_model)


def masked_experts(
    x: Tensor, w_in: Tensor, w_out: Tensor, gates: Tensor, activation: str
) -> Tensor:
    """Every expert on every token, combined with dense gates: :math:`\\sum_e G_{te} f_e(x_t)`.

    ``E / k`` times the work of the sorted dispatch, but no step depends on the data
    for its shape: the path for ``vmap``, which cannot batch a data-dependent split.

    Parameters
    ----------
    x : Tensor of shape (T, d)
    w_in : Tensor of shape (E, d, n*H)
    w_out : Tensor of shape (E, H, d)
    gates : Tensor of shape (T, E)
        Zero where a token does not use an expert.
    activation : {'swiglu', 'gelu'}

    Returns
    -------
    Tensor of shape (T, d)
    """
    h = activate(torch.einsum("td,edn->etn", x, w_in), activation)  # (E, T, H)
    y = torch.einsum("eth,ehd->etd", h, w_out)  # (E, T, d)
    return torch.einsum("te,etd->td", gates.to(y.dtype), y)  # (T, d)


class ExpertBank(nn.Module):
    """E experts with stacked weights, run on tokens sorted by expert.

    Parameters
    ----------
    n_experts, d_model, d_hidden : int
        ``E`` and the widths of each expert.
    activation : {'swiglu', 'gelu'}, default='swiglu'
    impl : {'auto', 'fused', 'grouped_mm', 'bmm', 'mm'}, default='auto'
        How :class:`~moekit.nn.MoE` runs the experts. ``'fused'``: the fused dispatch of
        :mod:`moekit.nn.fused`, one block per expert (any dtype). ``'grouped_mm'``: the
        same with one :func:`torch.nn.functional.grouped_mm` per projection (float32,
        bf16 or fp16 with 16-byte aligned rows). ``'bmm'``: autograd over every expert
        padded to the largest load, one :func:`torch.bmm` per projection. ``'mm'``:
        autograd over a loop of experts with the weights unbound once (the plain
        reference path). ``'auto'``: see :meth:`resolve_impl`. Run on rows already
        sorted (:meth:`forward`), the fused choices compute as ``'mm'`` and
        ``'grouped_mm'`` through autograd.
    """

    def __init__(
        self,
        n_experts: int,
        d_model: int,
        d_hidden: int,
        activation: str = "swiglu",
        impl: str = "auto",
    ) -> None:
        super().__init__()
        self.n_experts, self.d_model, self.d_hidden = n_experts, d_model, d_hidden
        self.activation, self.impl = activation, impl
        n_in = ACTIVATIONS[activation]
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model, n_in * d_hidden))
        self.w_out = nn.Parameter(torch.empty(n_experts, d_hidden, d_model))
        _init_uniform(self.w_in, d_model)
        _init_uniform(self.w_out, d_hidden)

    def extra_repr(self) -> str:
        return (
            f"n_experts={self.n_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
            f"activation={self.activation!r}, impl={self.impl!r}"
        )

    def forward(self, x: Tensor, counts: list[int], scale: Tensor | None = None) -> Tensor:
        """Run expert ``e`` on its slice of ``x``, ``sum(counts[:e])`` onwards.

        Parameters
        ----------
        x : Tensor of shape (A, d_model)
            Tokens sorted by expert.
        counts : list of int
            Tokens of each expert, summing to ``A``.
        scale : Tensor of shape (A,), optional
            Combine weight of each row, multiplied into the output. It is applied to
            the narrower of the hidden activation and the output, which gives the same
            result with less memory traffic.

        Returns
        -------
        Tensor of shape (A, d_model)
        """
        impl = self.resolve_impl(x)
        if impl == "grouped_mm":
            return self._grouped_mm(x, counts, scale)
        if impl == "bmm":
            return self._bmm(x, counts, scale)
        return self._mm(x, counts, scale)

    def resolve_impl(self, x: Tensor) -> str:
        """The implementation the layer uses for tokens ``x``.

        ``'auto'`` takes ``'fused'``, except on CUDA where grouped_mm applies, where it
        takes ``'grouped_mm'`` (one kernel per projection instead of one per expert; not
        measured here, the benchmark machine has no GPU). On the CPU the choice is by
        measurement (``bench/layer_speed.py``, 2 threads): grouped_mm runs one ``mm``
        per expert anyway and its large outputs cost page faults, padding wastes work
        and memory; the fused per-expert blocks were the fastest at E=64 (at the
        floor, 1.3x faster than the loop over experts) and, at E=8, within
        run-to-run noise of autograd over the per-expert loop and of the floor.
        """
        if self.impl == "grouped_mm" and not self._grouped_mm_ok(x):
            raise ValueError(
                "expert_impl='grouped_mm' needs float32, bfloat16 or float16 tokens and "
                "weights of one dtype, with d_model and d_hidden rows a multiple of 16 "
                f"bytes; got {x.dtype} tokens, {self.w_in.dtype} weights, "
                f"d_model={self.d_model}, d_hidden={self.d_hidden}. Use expert_impl='auto'."
            )
        if self.impl != "auto":
            return self.impl
        if x.is_cuda and self._grouped_mm_ok(x):
            return "grouped_mm"
        return "fused"

    def _grouped_mm_ok(self, x: Tensor) -> bool:
        ok_dtype = x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        hidden_bytes = self.d_hidden * x.element_size()
        return (
            ok_dtype
            and x.dtype == self.w_in.dtype == self.w_out.dtype
            and hidden_bytes % 16 == 0
            and _aligned(x)
            and _aligned(self.w_in)
            and _aligned(self.w_out)
        )

    def _scale_hidden(self) -> bool:
        return self.d_hidden <= self.d_model

    def _grouped_mm(self, x: Tensor, counts: list[int], scale: Tensor | None) -> Tensor:
        offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)  # (E,)
        h = activate(F.grouped_mm(x, self.w_in, offs=offs), self.activation)  # (A, H)
        if scale is not None and self._scale_hidden():
            h = h * scale[:, None]
        y = _ContiguousGrad.apply(F.grouped_mm(h.contiguous(), self.w_out, offs=offs))
        if scale is not None and not self._scale_hidden():
            y = y * scale[:, None]
        return y  # (A, d_model)

    def _mm(self, x: Tensor, counts: list[int], scale: Tensor | None) -> Tensor:
        return sorted_experts_mm(x, self.w_in, self.w_out, counts, scale, self.activation)

    def masked(self, x: Tensor, gates: Tensor) -> Tensor:
        """Every expert on every token ``x`` of shape (T, d), weighted by ``gates`` (T, E).

        See :func:`masked_experts`.
        """
        return masked_experts(x, self.w_in, self.w_out, gates, self.activation)

    def _bmm(self, x: Tensor, counts: list[int], scale: Tensor | None) -> Tensor:
        n_rows, width = max(counts, default=0), x.shape[-1]
        if n_rows == 0:
            return x.new_zeros(0, self.d_model) + 0.0 * x.sum()
        counts_t = torch.tensor(counts, device=x.device)  # (E,)
        expert = torch.repeat_interleave(torch.arange(self.n_experts, device=x.device), counts_t)
        start = torch.cumsum(counts_t, 0) - counts_t  # (E,)
        row = torch.arange(x.shape[0], device=x.device) - start[expert]  # (A,) row in slot
        padded = x.new_zeros(self.n_experts, n_rows, width).index_put((expert, row), x)
        h = activate(torch.bmm(padded, self.w_in), self.activation)  # (E, R, H)
        y = torch.bmm(h, self.w_out)[expert, row]  # (A, d_model)
        return y if scale is None else y * scale[:, None]
