"""Swap the MoE blocks of a Hugging Face model for moekit layers, and back.

:func:`patch_model` replaces each known block (:data:`~moekit.nn.hf.families.FAMILIES`)
by a :class:`HFMoEBlock`: a moekit :class:`~moekit.nn.MoE` equal to the block, behind
the block's interface (the same forward signature and return). The model still records
its router logits (``output_router_logits=True``), so its own balancing loss keeps
working: the adapter holds a parameter-free stand-in of the block's router class which
the model's output recorder hooks, and which returns the logits moekit computed.
:func:`unpatch_model` writes the moekit weights back into the original blocks, so that
``save_pretrained`` writes a standard checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moekit.nn.hf.families import family_of, moe_settings, resolve, stored_names, weight_pairs
from moekit.nn.layer import MoE
from moekit.nn.routers import Routing

__all__ = ["HFMoEBlock", "convert_block", "patch_model", "unpatch_model"]


def convert_block(block: nn.Module, **options: Any) -> MoE:
    """A moekit :class:`~moekit.nn.MoE` equal to a Hugging Face MoE block.

    The layer routes as the block does (softmax top-k with or without renormalisation,
    or DeepSeek-V3's sigmoid scores with the correction bias, group-limited choice and
    routed scale), holds copies of its weights in their dtypes and on their device,
    and adds the shared expert (Qwen2-MoE's with its sigmoid gate) where the block has
    one. Given the same input it returns the block's output.

    Parameters
    ----------
    block : torch.nn.Module
        A ``MixtralSparseMoeBlock``, ``Qwen2MoeSparseMoeBlock``,
        ``Qwen3MoeSparseMoeBlock``, ``OlmoeSparseMoeBlock`` or ``DeepseekV3MoE``
        (experts as 3-D tensors, transformers 5, or as a ``ModuleList``, 4.x).
    **options
        Further :class:`~moekit.nn.MoE` arguments that do not change the forward:
        ``aux_loss_coef``, ``z_loss_coef``, ``bias_update_rate``, ``expert_impl``, ...

    Returns
    -------
    MoE

    Raises
    ------
    ValueError
        For a block moekit does not know, or with weights it cannot place.
    """
    settings = moe_settings(block)
    clash = sorted(set(options) & set(settings))
    if clash:
        raise ValueError(
            f"convert_block reads {', '.join(clash)} from the block; pass only settings that "
            "do not change its output (aux_loss_coef, z_loss_coef, expert_impl, ...)."
        )
    moe = MoE(**settings, **options)
    pairs = weight_pairs(block, moe)
    missing = stored_names(block) - {name for name, _ in pairs}
    if missing:
        raise ValueError(
            f"convert_block cannot place the weights {sorted(missing)} of {type(block).__name__}."
        )
    # each parameter takes the dtype and device of the weights it receives (DeepSeek-V3
    # keeps its router in float32 under a bfloat16 model)
    # (owners first: moving a parameter leaves the views taken before pointing elsewhere)
    owners = [(_owner_param(moe, view), resolve(block, name)) for name, view in pairs]
    for param, source in owners:
        param.data = param.data.to(device=source.device, dtype=source.dtype)
    with torch.no_grad():
        for name, view in weight_pairs(block, moe):  # views of the moved parameters
            view.copy_(resolve(block, name))
    return moe.train(block.training)


def _owner_param(moe: MoE, view: Tensor) -> Tensor:
    # the parameter or buffer of moe whose storage the view shares
    for tensor in (*moe.parameters(), *moe.buffers()):
        if tensor.untyped_storage().data_ptr() == view.untyped_storage().data_ptr():
            return tensor
    raise AssertionError("a weight view that no moekit tensor owns")  # pragma: no cover


class HFMoEBlock(nn.Module):
    """A moekit MoE layer with the interface of the Hugging Face block it replaced.

    ``forward(hidden_states)`` of shape (batch, seq, d) returns the same shape, as the
    block does. Mixtral's router jitter (``router_jitter_noise``) is applied in training
    as the block applies it.

    Parameters
    ----------
    moe : MoE
        The layer, from :func:`convert_block`.
    block : torch.nn.Module
        The block it replaces. It is kept, out of the module tree and with its weights
        on the ``meta`` device (no memory), for :func:`unpatch_model`.

    Attributes
    ----------
    moe : MoE
    gate : torch.nn.Module
        A parameter-free module of the block's router class whose output, the router
        logits of the last forward, is what the model's output recorder collects.
    """

    _is_hf_initialized = True  # transformers must not re-initialise moekit's weights

    def __init__(self, moe: MoE, block: nn.Module) -> None:
        super().__init__()
        self.moe = moe
        self.gate = _logits_emitter(block.gate)
        self.jitter_noise = float(getattr(block, "jitter_noise", 0.0) or 0.0)
        self._logits: Tensor | None = None
        moe.router.register_forward_hook(self._keep_logits)
        # a list keeps the block out of the module tree (its weights are moekit's now)
        self._hf_block = [block.to("meta")]
        for module in self.modules():
            module._is_hf_initialized = True

    def _keep_logits(self, router: nn.Module, args: tuple, routing: Routing) -> None:
        self._logits = routing.logits

    def forward(self, hidden_states: Tensor) -> Tensor:
        x = hidden_states
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        y = self.moe(x)
        logits, self._logits = self._logits, None
        self.gate(logits)  # the model's recorder, if active, collects the logits here
        return y

    def to_hf(self) -> nn.Module:
        """The original block holding the current moekit weights (see :func:`unpatch_model`)."""
        block = self._hf_block[0]
        device = self.moe.router.weight.device
        block.to_empty(device=device)
        with torch.no_grad():
            for name, view in weight_pairs(block, self.moe):
                resolve(block, name).copy_(view)
        return block.train(self.training)


def _logits_emitter(gate: nn.Module) -> nn.Module:
    """A parameter-free instance of ``gate``'s class whose forward returns the logits it
    is given, in the router's output layout ``(logits, weights, indices)``.

    Models record router logits with forward hooks on modules of their router class
    (installed on first use), so the stand-in must be of that class; hooks already
    installed on ``gate`` are carried over.
    """
    cls = type(gate)
    emitter_cls = type(f"Moekit{cls.__name__}", (cls,), {"forward": _emit, "extra_repr": _repr})
    emitter = emitter_cls.__new__(emitter_cls)
    nn.Module.__init__(emitter)
    emitter._forward_hooks.update(gate._forward_hooks)
    return emitter


def _emit(self: nn.Module, logits: Tensor | None) -> tuple[Tensor | None, None, None]:
    return logits, None, None


def _repr(self: nn.Module) -> str:
    return "router logits of the moekit layer beside it"


def _moe_blocks(model: nn.Module, kind: type | None) -> list[tuple[nn.Module, str, nn.Module]]:
    # (parent, attribute, block) for each block to replace, outermost first
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            hit = isinstance(child, kind) if kind is not None else family_of(child) is not None
            if hit:
                found.append((parent, name, child))
    return found


def patch_model(model: nn.Module, **options: Any) -> int:
    """Replace every known MoE block of ``model`` in place by a moekit layer.

    Each block becomes an :class:`HFMoEBlock` around :func:`convert_block` of it; the
    model's logits do not change (to float32 rounding). Training works through it: the
    gradients reach moekit's weights, the model's own balancing loss
    (``output_router_logits=True``) sees moekit's router logits, and each layer's
    ``aux_loss`` holds moekit's (``options`` set its coefficients).

    Parameters
    ----------
    model : torch.nn.Module
        A transformers model (or any module holding such blocks).
    **options
        Passed to :func:`convert_block` for every block.

    Returns
    -------
    int
        How many blocks were replaced.
    """
    blocks = _moe_blocks(model, None)
    for parent, name, block in blocks:
        setattr(parent, name, HFMoEBlock(convert_block(block, **options), block))
    return len(blocks)


def unpatch_model(model: nn.Module) -> int:
    """Put the Hugging Face blocks back, holding moekit's current weights.

    After it, ``model.save_pretrained(directory)`` writes a standard checkpoint of the
    model's own class, which loads with ``from_pretrained`` and can be patched again.

    Parameters
    ----------
    model : torch.nn.Module
        A model patched by :func:`patch_model`.

    Returns
    -------
    int
        How many blocks were put back.
    """
    adapters = _moe_blocks(model, HFMoEBlock)
    for parent, name, adapter in adapters:
        setattr(parent, name, adapter.to_hf())
    return len(adapters)
