"""The Hugging Face MoE blocks moekit reads, and where each of their weights lives in
a :class:`~moekit.nn.MoE`.

A block is read by its parts, not by running it: the router ``gate`` (a weight of shape
(E, d), and for DeepSeek-V3 a correction bias), the routed experts (one 3-D tensor per
projection, ``gate_up_proj`` of shape (E, 2H, d) and ``down_proj`` of shape (E, d, H),
or in older versions a ``ModuleList`` of MLPs) and the shared expert, if any. Every
weight of the block is paired with a *view* of a moekit parameter of the same shape
(a transpose or a slice), so that one list serves both directions: reading the block
copies each weight into its view, writing it back copies the view into the weight.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from moekit.nn.layer import MoE
from moekit.nn.upcycle import acts_as_silu

__all__ = ["FAMILIES", "Family", "family_of", "moe_settings", "resolve", "weight_pairs"]


@dataclass(frozen=True)
class Family:
    """How one family's MoE block routes and where its shared expert sits.

    Attributes
    ----------
    router : {'topk', 'sigmoid_bias'}
        Softmax top-k, or DeepSeek-V3's sigmoid scores with a correction bias.
    shared : str or None
        Attribute of the shared expert (an MLP with ``gate_proj``, ``up_proj``,
        ``down_proj``), None when the block has none.
    shared_gate : str or None
        Attribute of the shared expert's gate (a bias-free ``Linear(d, 1)``), None when
        the shared expert is not gated.
    """

    router: str = "topk"
    shared: str | None = None
    shared_gate: str | None = None


FAMILIES: dict[str, Family] = {
    "MixtralSparseMoeBlock": Family(),
    "Qwen2MoeSparseMoeBlock": Family(shared="shared_expert", shared_gate="shared_expert_gate"),
    "Qwen3MoeSparseMoeBlock": Family(),
    "OlmoeSparseMoeBlock": Family(),
    "DeepseekV3MoE": Family(router="sigmoid_bias", shared="shared_experts"),
}
"""Block class name -> :class:`Family`, for the blocks :func:`convert_block` takes."""

# names of the three projections of one expert MLP: Mixtral's ModuleList experts of
# transformers 4.x call them w1 (gate), w3 (up), w2 (down); every other MLP by role
_MLP_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))

_MISSING = object()


def family_of(block: nn.Module) -> Family | None:
    """The :class:`Family` of ``block``, or None when moekit does not know its class."""
    return FAMILIES.get(type(block).__name__)


def resolve(module: nn.Module, name: str) -> Tensor:
    """The parameter or buffer of ``module`` at the dotted path ``name``."""
    return functools.reduce(getattr, name.split("."), module)


def _setting(block: nn.Module, names: tuple[str, ...], default: Any = _MISSING) -> Any:
    # transformers 5 keeps the routing settings on the router, 4.x on the block
    for owner in (block.gate, block):
        for name in names:
            if hasattr(owner, name):
                return getattr(owner, name)
    if default is _MISSING:
        raise ValueError(
            f"convert_block could not find {' or '.join(names)} on the "
            f"{type(block).__name__} block or its gate."
        )
    return default


def _mlp_names(mlp: nn.Module) -> tuple[str, str, str]:
    for names in _MLP_NAMES:
        if all(hasattr(mlp, n) for n in names):
            return names
    raise ValueError(
        f"convert_block expects an expert MLP with gate_proj/up_proj/down_proj (or w1/w3/w2); "
        f"got {type(mlp).__name__}."
    )


def _check_silu(owner: nn.Module) -> None:
    act = getattr(owner, "act_fn", None)
    if not acts_as_silu(act):
        raise ValueError(
            f"convert_block supports SwiGLU experts (activation silu); {type(owner).__name__} "
            f"uses {act!r}."
        )


def _expert_width(block: nn.Module) -> int:
    experts = block.experts
    if hasattr(experts, "down_proj") and isinstance(experts.down_proj, Tensor):
        return experts.down_proj.shape[-1]  # (E, d, H)
    first = experts[0]
    return resolve(first, f"{_mlp_names(first)[2]}.weight").shape[-1]  # (d, H)


def moe_settings(block: nn.Module) -> dict[str, Any]:
    """The :class:`~moekit.nn.MoE` arguments that reproduce ``block``'s routing and shapes.

    Raises
    ------
    ValueError
        A block of a class moekit does not know, or one with parts it cannot reproduce
        (experts with biases, an activation other than silu).
    """
    family = family_of(block)
    if family is None:
        known = ", ".join(FAMILIES)
        raise ValueError(f"convert_block knows the blocks {known}; got {type(block).__name__}.")
    experts = block.experts
    if hasattr(experts, "gate_up_proj_bias") or hasattr(experts, "down_proj_bias"):
        raise ValueError("convert_block supports experts without biases.")
    _check_silu(experts if hasattr(experts, "act_fn") else experts[0])
    n_experts, d_model = block.gate.weight.shape
    settings: dict[str, Any] = {
        "d_model": d_model,
        "d_hidden": _expert_width(block),
        "n_experts": n_experts,
        "top_k": int(_setting(block, ("top_k", "num_experts_per_tok"))),
        "router": family.router,
        # Mixtral always renormalises; the others say so in norm_topk_prob
        "normalize_weights": bool(_setting(block, ("norm_topk_prob",), True)),
    }
    if family.router == "sigmoid_bias":
        n_group = int(_setting(block, ("num_group", "n_group"), 1))
        topk_group = int(_setting(block, ("topk_group",), 1))
        if n_group > 1:
            settings.update(n_group=n_group, topk_group=topk_group)
        settings["routed_scaling_factor"] = float(_setting(block, ("routed_scaling_factor",), 1.0))
    if family.shared is not None:
        shared = getattr(block, family.shared)
        _check_silu(shared)
        d_shared = resolve(shared, f"{_mlp_names(shared)[2]}.weight").shape[-1]
        settings.update(n_shared_experts=1, d_shared=d_shared)
        settings["shared_expert_gate"] = family.shared_gate is not None
    return settings


def weight_pairs(block: nn.Module, moe: MoE) -> list[tuple[str, Tensor]]:
    """Every weight of ``block`` by its dotted name, beside the view of ``moe`` that holds it.

    Each view has the shape of its weight and shares storage with a moekit parameter:
    copying the weight into the view sets the parameter, copying the view out reads it.

    Parameters
    ----------
    block : torch.nn.Module
        A block of :data:`FAMILIES`.
    moe : MoE
        A layer built from :func:`moe_settings` of the block.

    Returns
    -------
    list of (str, Tensor)
    """
    family = family_of(block)
    bank = moe.experts
    hidden = bank.d_hidden
    pairs = [("gate.weight", moe.router.weight)]  # (E, d) both
    if family is not None and family.router == "sigmoid_bias":
        pairs.append(("gate.e_score_correction_bias", moe.router.bias))
    experts = block.experts
    if isinstance(getattr(experts, "gate_up_proj", None), Tensor):
        pairs += [
            ("experts.gate_up_proj", bank.w_in.transpose(1, 2)),  # (E, 2H, d)
            ("experts.down_proj", bank.w_out.transpose(1, 2)),  # (E, d, H)
        ]
    else:
        for e, mlp in enumerate(experts):
            pairs += _mlp_pairs(f"experts.{e}", mlp, bank.w_in[e], bank.w_out[e], hidden)
    if family is not None and family.shared is not None:
        shared = moe.shared
        width = shared.w_out.shape[0]
        pairs += _mlp_pairs(
            family.shared, getattr(block, family.shared), shared.w_in, shared.w_out, width
        )
        if family.shared_gate is not None:
            pairs.append((f"{family.shared_gate}.weight", moe.shared_gate.weight))  # (1, d)
    return pairs


def _mlp_pairs(
    prefix: str, mlp: nn.Module, w_in: Tensor, w_out: Tensor, hidden: int
) -> list[tuple[str, Tensor]]:
    # moekit's w_in (d, 2H) holds the gate then the up projection side by side;
    # nn.Linear stores (out, in), hence the transposes
    gate, up, down = _mlp_names(mlp)
    return [
        (f"{prefix}.{gate}.weight", w_in[:, :hidden].t()),  # (H, d)
        (f"{prefix}.{up}.weight", w_in[:, hidden:].t()),  # (H, d)
        (f"{prefix}.{down}.weight", w_out.t()),  # (d, H)
    ]


def stored_names(block: nn.Module) -> set[str]:
    """Names of the parameters and saved buffers of ``block`` (what a checkpoint holds)."""
    return set(block.state_dict().keys())
