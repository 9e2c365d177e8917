"""Sparse upcycling: a MoE layer that starts as a trained dense MLP.

Komatsuzaki et al. (2022) turn each dense feed-forward block into a MoE layer whose
experts are copies of it, then continue training: the model keeps what it learnt and
gains parameters at the same compute per token. Fine-grained upcycling (Qwen1.5-MoE,
He et al. 2024) cuts the hidden layer into ``g`` slices instead, each expert one
slice, so that ``g`` experts together cost what the dense block cost.

**Why the output equals the dense MLP at init.** A SwiGLU or GELU MLP is a sum over
its hidden units, so cut into ``g`` slices of width ``H / g`` it is the sum of the
slices, :math:`f(x) = \\sum_{s=1}^{g} f_s(x)`. Expert ``e`` is slice ``e mod g`` of
copy ``c = e // g`` (``E = m g`` experts, ``m`` copies), and the experts of one copy
form a *virtual group* whose router rows are equal (random across groups). Within a
group the router scores are then equal, so a top-k with ``k`` a multiple of ``g``
keeps whole groups: each kept group ``c`` brings every slice once. With the kept
weights renormalised, every expert of group ``c`` weighs
:math:`p_c / (g \\sum_{c'} p_{c'})`, and a routed scale of ``g`` gives

.. math::

    y = g \\sum_{c\\ \\mathrm{kept}} \\frac{p_c}{g \\sum_{c'} p_{c'}} \\sum_{s=1}^{g} f_s(x)
      = f(x),

whatever the router chose (He et al. 2024 call this virtual group initialisation).
With ``g = 1`` every expert is a copy and any choice gives :math:`f(x)`.

**Symmetry.** Copies of one MLP receive the same gradient for the same tokens, and the
task loss sends the router no gradient while the chosen experts agree (the weights
are renormalised, so moving them changes nothing). ``noise`` multiplies every expert
weight by :math:`1 + \\epsilon`, :math:`\\epsilon \\sim N(0, \\mathrm{noise}^2)`, so
that the copies differ from the first step (and the output differs from the dense
MLP by about ``noise`` relative).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.nn._checks import POSITIVE_INT, reject
from moekit.nn.experts import FeedForward
from moekit.nn.layer import MoE
from moekit.nn.transformer import MoETransformer

__all__ = ["acts_as_silu", "dense_mlp_weights", "upcycle", "upcycle_lm"]

_OWNER = "upcycle"


def acts_as_silu(act: Any) -> bool:
    """Whether the callable ``act`` computes :math:`x \\sigma(x)` (asked of the activation
    itself: class names and config strings differ between libraries and versions)."""
    probe = torch.linspace(-4, 4, 9)
    try:
        return bool(torch.allclose(act(probe), F.silu(probe)))
    except Exception:  # not an activation at all
        return False


def dense_mlp_weights(mlp: nn.Module) -> tuple[Tensor, Tensor, str]:
    """The weights of a dense MLP in moekit's layout.

    Parameters
    ----------
    mlp : torch.nn.Module
        moekit's :class:`~moekit.nn.FeedForward` (SwiGLU or GELU), or a SwiGLU MLP
        with bias-free ``gate_proj``, ``up_proj`` and ``down_proj`` linear layers and a
        silu ``act_fn`` (Hugging Face's Llama, Mistral, Qwen2 MLPs).

    Returns
    -------
    w_in : Tensor of shape (d, n * H)
        Input projections side by side (gate then up for SwiGLU).
    w_out : Tensor of shape (H, d)
    activation : {'swiglu', 'gelu'}
    """
    if isinstance(mlp, FeedForward):
        return mlp.w_in.detach(), mlp.w_out.detach(), mlp.activation
    projections = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if all(isinstance(p, nn.Linear) for p in projections):
        if any(p.bias is not None for p in projections):
            raise ValueError(f"{_OWNER} needs an MLP without biases (moekit's experts have none).")
        if not acts_as_silu(getattr(mlp, "act_fn", None)):
            raise ValueError(f"{_OWNER} needs a SwiGLU MLP: act_fn must be silu.")
        gate, up, down = (p.weight.detach() for p in projections)  # (H, d), (H, d), (d, H)
        return torch.cat([gate.t(), up.t()], dim=1), down.t(), "swiglu"
    raise TypeError(
        f"{_OWNER} takes moekit's FeedForward or an MLP with gate_proj, up_proj and "
        f"down_proj (Llama, Mistral, Qwen2); got {type(mlp).__name__}."
    )


def _slice(w_in: Tensor, w_out: Tensor, activation: str, s: int, width: int):
    # slice s of the hidden layer: the same hidden units in every input projection
    n_in = 2 if activation == "swiglu" else 1
    hidden = w_out.shape[0]
    cols = torch.cat(
        [torch.arange(s * width, (s + 1) * width) + j * hidden for j in range(n_in)]
    )  # (n_in * width,)
    return w_in[:, cols], w_out[s * width : (s + 1) * width]  # (d, n*w), (w, d)


def _check(n_experts: int, top_k: int, granularity: int, noise: float, hidden: int) -> None:
    for name, value in (("n_experts", n_experts), ("top_k", top_k), ("granularity", granularity)):
        if not POSITIVE_INT.is_satisfied_by(value):
            reject(_OWNER, name, "an int >= 1", value)
    if not isinstance(noise, numbers.Real) or not (noise >= 0 and math.isfinite(noise)):
        reject(_OWNER, "noise", "a finite float >= 0", noise)
    if hidden % granularity:
        reject(_OWNER, "granularity", f"a divisor of the MLP's hidden width {hidden}", granularity)
    if n_experts % granularity:
        reject(_OWNER, "n_experts", f"a multiple of granularity={granularity}", n_experts)
    if top_k % granularity or top_k > n_experts:
        reject(
            _OWNER,
            "top_k",
            f"a multiple of granularity={granularity} and at most n_experts={n_experts} "
            "(each token must take whole copies of the MLP)",
            top_k,
        )


def upcycle(
    mlp: nn.Module,
    n_experts: int,
    top_k: int,
    granularity: int = 1,
    noise: float = 0.0,
    *,
    generator: torch.Generator | None = None,
    **options: Any,
) -> MoE:
    """A :class:`~moekit.nn.MoE` layer equal to the dense ``mlp`` at init.

    Every expert is a copy of the MLP (``granularity=1``) or one of ``granularity``
    slices of its hidden layer; the router starts with equal rows within each copy's
    experts (see the module notes for why the output is then exactly the MLP's) and
    the routed experts are scaled by ``granularity``.

    Parameters
    ----------
    mlp : torch.nn.Module
        See :func:`dense_mlp_weights`.
    n_experts : int
        ``E``, a multiple of ``granularity``.
    top_k : int
        Experts per token, a multiple of ``granularity``. ``top_k = granularity`` keeps
        the compute per token of the dense MLP.
    granularity : int, default=1
        ``g``: slices per copy; must divide the hidden width. Each expert has width
        ``H / g``.
    noise : float, default=0.0
        Relative multiplicative noise on the experts' weights, to break the symmetry
        between copies; 0 keeps the layer exactly equal to ``mlp``.
    generator : torch.Generator, optional
        For the router rows and the noise.
    **options
        Further :class:`~moekit.nn.MoE` arguments (``aux_loss_coef``, ``z_loss_coef``,
        ``router='sigmoid_bias'``, ``expert_impl``, ...). The layer renormalises its
        top-k weights (with ``top_k = 1`` it warns that the router then learns from the
        balancing loss only).

    Returns
    -------
    MoE
        On the device and in the dtype of ``mlp``'s weights.

    Examples
    --------
    >>> import torch
    >>> from moekit.nn import FeedForward, upcycle
    >>> dense = FeedForward(16, 64)
    >>> layer = upcycle(dense, n_experts=8, top_k=2, granularity=2)
    >>> x = torch.randn(10, 16)
    >>> torch.allclose(layer(x), dense(x), atol=1e-6)
    True
    """
    w_in, w_out, activation = dense_mlp_weights(mlp)
    hidden, d_model = w_out.shape
    _check(n_experts, top_k, granularity, noise, hidden)
    fixed = {"normalize_weights", "routed_scaling_factor", "activation", "n_shared_experts"}
    if fixed & set(options) or options.get("router", "topk") not in ("topk", "sigmoid_bias"):
        raise ValueError(
            f"{_OWNER} sets the router ('topk' or 'sigmoid_bias'), normalize_weights, "
            "routed_scaling_factor, activation and n_shared_experts itself, so that the "
            f"layer equals the MLP; got {sorted(options)}."
        )
    width = hidden // granularity
    layer = MoE(
        d_model, width, n_experts, top_k, activation=activation, normalize_weights=True,
        routed_scaling_factor=float(granularity), **options,
    )  # fmt: skip
    layer.to(device=w_in.device, dtype=w_in.dtype)
    n_copies = n_experts // granularity
    with torch.no_grad():
        slices = [_slice(w_in, w_out, activation, s, width) for s in range(granularity)]
        for e in range(n_experts):
            s_in, s_out = slices[e % granularity]
            layer.experts.w_in[e].copy_(s_in)
            layer.experts.w_out[e].copy_(s_out)
        if noise > 0:
            for w in (layer.experts.w_in, layer.experts.w_out):
                eps = torch.randn(w.shape, generator=generator, dtype=w.dtype).to(w.device)
                w.mul_(1 + noise * eps)
        # one random row per copy, shared by its experts (the virtual group)
        router = layer.router.weight  # (E, d)
        std = math.sqrt(0.1 / d_model)  # the router's own initial scale
        rows = torch.randn(n_copies, d_model, generator=generator, dtype=router.dtype) * std
        router.copy_(rows.to(router.device).repeat_interleave(granularity, dim=0))
    return layer


def upcycle_lm(
    model: MoETransformer,
    n_experts: int,
    top_k: int,
    granularity: int = 1,
    noise: float = 0.0,
    *,
    generator: torch.Generator | None = None,
) -> MoETransformer:
    """A :class:`~moekit.nn.MoETransformer` whose every block is an upcycled copy of the
    dense feed-forward of ``model`` (the same predictions at init with ``noise=0``).

    Parameters
    ----------
    model : MoETransformer
        A dense model: no MoE block (``moe_every`` larger than ``n_layer``, as the
        dense twin of ``bench/lm_dense_vs_moe.py``).
    n_experts, top_k, granularity, noise, generator
        See :func:`upcycle`; ``top_k >= 2``, since a model read back from its file
        renormalises its top-k weights only then.

    Returns
    -------
    MoETransformer
        A new model with experts of width ``H / granularity`` (``H`` the dense width)
        and ``routed_scaling_factor = granularity``; ``model`` is left as it was.
    """
    if model.moe_layers():
        raise ValueError("upcycle_lm takes a dense model; this one has MoE blocks already.")
    if top_k < 2:
        reject(_OWNER, "top_k", "an int >= 2 for a language model (see upcycle_lm)", top_k)
    cfg = model.config
    if cfg.router not in ("topk", "sigmoid_bias"):
        raise ValueError(f"upcycle_lm needs router 'topk' or 'sigmoid_bias'; got {cfg.router!r}.")
    hidden = model.blocks[0].ffn.w_out.shape[0]
    _check(n_experts, top_k, granularity, noise, hidden)
    config = dataclasses.replace(
        cfg, n_experts=n_experts, top_k=top_k, d_hidden=hidden // granularity, moe_every=1,
        n_shared_experts=0, routed_scaling_factor=float(granularity),
    )  # fmt: skip
    upcycled = MoETransformer(config)
    moe_options = {
        k: v
        for k, v in config.moe_kwargs().items()
        if k in ("router", "capacity_factor", "aux_loss_coef", "z_loss_coef")
    }
    for block, dense_block in zip(upcycled.blocks, model.blocks, strict=True):
        block.ffn = upcycle(
            dense_block.ffn, n_experts, top_k, granularity, noise, generator=generator,
            **moe_options,
        )  # fmt: skip
    # everything but the feed-forward blocks is the dense model's
    state = {k: v for k, v in model.state_dict().items() if ".ffn." not in k}
    upcycled.load_state_dict(state, strict=False)
    upcycled.to(model.wte.weight.device)
    return upcycled.train(model.training)
