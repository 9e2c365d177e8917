"""Upcycle a dense Hugging Face model: every SwiGLU MLP becomes an equal moekit MoE."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moekit.nn.hf.families import family_of
from moekit.nn.upcycle import upcycle

__all__ = ["upcycle_model"]


def _is_dense_mlp(module: nn.Module) -> bool:
    names = ("gate_proj", "up_proj", "down_proj")
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in names)


def upcycle_model(
    model: nn.Module,
    n_experts: int,
    top_k: int,
    granularity: int = 1,
    noise: float = 0.0,
    *,
    seed: int = 0,
    **options: Any,
) -> int:
    """Replace every dense SwiGLU MLP of a transformers model by :func:`~moekit.nn.upcycle`.

    The MLPs are the modules with ``gate_proj``, ``up_proj`` and ``down_proj`` (Llama,
    Mistral, Qwen2 and their kin); each becomes a :class:`~moekit.nn.MoE`, which takes
    and returns what the MLP did, so the model's logits are unchanged at init (with
    ``noise=0``). Train it as any model, adding ``sum(layer.aux_loss ...)`` of the
    moekit layers for balance. Its state dict then holds moekit's weights; transformers
    has no class for a dense model with MoE layers, so ``save_pretrained`` does not
    give a checkpoint ``from_pretrained`` reads back (save ``model.state_dict()``).

    Parameters
    ----------
    model : torch.nn.Module
        A dense transformers model (one whose blocks hold no MoE block already).
    n_experts, top_k, granularity, noise
        See :func:`~moekit.nn.upcycle`.
    seed : int, default=0
        Seeds the routers' rows and the noise (one generator for the whole model).
    **options
        Further :class:`~moekit.nn.MoE` arguments, as for :func:`~moekit.nn.upcycle`.

    Returns
    -------
    int
        How many MLPs were upcycled.
    """
    if any(family_of(m) is not None for m in model.modules()):
        raise ValueError(
            "upcycle_model takes a dense model; this one has MoE blocks already (its shared "
            "experts would be upcycled too). Use patch_model."
        )
    generator = torch.Generator().manual_seed(seed)
    found = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if _is_dense_mlp(child)
    ]
    for parent, name, mlp in found:
        layer = upcycle(mlp, n_experts, top_k, granularity, noise, generator=generator, **options)
        for module in layer.modules():  # transformers must not re-initialise it
            module._is_hf_initialized = True
        setattr(parent, name, layer.train(mlp.training))
    return len(found)
