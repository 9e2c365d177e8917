"""Configuration of the sparse MoE layer, validated with the one error template."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any

from moekit._core.validation import Interval, Options, validate_params
from moekit.nn._checks import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    check_finite_params,
    reject,
)
from moekit.nn.balance import BALANCE_SCOPES
from moekit.nn.experts import ACTIVATIONS
from moekit.nn.functional import CAPACITY_PRIORITIES
from moekit.nn.routers import Router, check_groups

__all__ = ["ROUTERS", "MoEConfig", "validate_moe_params"]

ROUTERS = ("topk", "noisy_topk", "switch", "expert_choice", "sigmoid_bias")
"""Router names the layer understands (see :mod:`moekit.nn.routers`)."""

MOE_CONSTRAINTS: dict[str, list] = {
    "d_model": [POSITIVE_INT],
    "d_hidden": [POSITIVE_INT],
    "n_experts": [POSITIVE_INT],
    "top_k": [POSITIVE_INT],
    "router": [Options(ROUTERS), Router],
    "capacity_factor": [None, Interval(numbers.Real, 0, None, closed="neither")],
    "capacity_priority": [Options(CAPACITY_PRIORITIES)],
    "normalize_weights": [None, "boolean"],
    "n_shared_experts": [NON_NEGATIVE_INT],
    "activation": [Options(ACTIVATIONS)],
    "aux_loss_coef": [NON_NEGATIVE],
    "z_loss_coef": [NON_NEGATIVE],
    "bias_update_rate": [NON_NEGATIVE],
    "center_bias": ["boolean"],
    "expert_impl": [Options(("auto", "fused", "grouped_mm", "bmm", "mm"))],
    "n_group": [None, POSITIVE_INT],
    "topk_group": [None, POSITIVE_INT],
    "routed_scaling_factor": [Interval(numbers.Real, 0, None, closed="neither")],
    "d_shared": [None, POSITIVE_INT],
    "shared_expert_gate": ["boolean"],
    "balance_loss": [Options(BALANCE_SCOPES)],
}

GROUPED_ROUTERS = ("topk", "sigmoid_bias")
"""Routers that take ``n_group`` and ``topk_group``."""


def validate_moe_params(owner: str, params: dict[str, Any]) -> None:
    """Check the arguments of the MoE layer, one at a time, then together.

    Raises
    ------
    InvalidParameterError
        ``The {name!r} parameter of {owner} must be ... Got ... instead.``
    """
    validate_params(owner, params, MOE_CONSTRAINTS)
    finite = (
        "capacity_factor",
        "aux_loss_coef",
        "z_loss_coef",
        "bias_update_rate",
        "routed_scaling_factor",
    )
    check_finite_params(owner, params, finite)
    n_experts, top_k, router = params["n_experts"], params["top_k"], params["router"]
    if top_k > n_experts:
        reject(owner, "top_k", f"an int in the range [1, n_experts={n_experts}]", top_k)
    if router == "switch" and top_k != 1:
        reject(owner, "top_k", "1 with router='switch' (Switch routing is top-1)", top_k)
    normalize = params.get("normalize_weights")
    if normalize and router in ("switch", "expert_choice"):
        # Switch is defined by its raw weight; expert choice has no per-token top-k
        reject(owner, "normalize_weights", f"None or False with router={router!r}", normalize)
    if normalize is not None and isinstance(router, Router):
        reject(
            owner,
            "normalize_weights",
            "None with a router module (set normalize on the router)",
            normalize,
        )
    _check_groups_and_shared(owner, params)
    if isinstance(router, Router):
        for name in ("d_model", "n_experts", "top_k"):
            if getattr(router, name) != params[name]:
                reject(
                    owner,
                    "router",
                    f"a router with {name}={params[name]} like the layer",
                    router,
                )


def _check_groups_and_shared(owner: str, params: dict[str, Any]) -> None:
    router = params["router"]
    groups = params.get("n_group"), params.get("topk_group")
    if groups != (None, None):
        if isinstance(router, Router) or router not in GROUPED_ROUTERS:
            name = "n_group" if groups[0] is not None else "topk_group"
            reject(
                owner,
                name,
                f"None with router={router!r} (groups apply to {GROUPED_ROUTERS}; set them "
                "on a router module)",
                params[name],
            )
        check_groups(owner, params["n_experts"], params["top_k"], *groups)
    scope = params.get("balance_loss", "batch")
    own_loss = getattr(router, "expert_choice", False) or router in ("noisy_topk", "expert_choice")
    if scope != "batch" and own_loss:
        reject(owner, "balance_loss", f"'batch' with router={router!r}", scope)
    if params["n_shared_experts"] == 0:
        for name in ("d_shared", "shared_expert_gate"):
            if params.get(name):
                reject(owner, name, "None or False with n_shared_experts=0", params[name])


@dataclass
class MoEConfig:
    """Every argument of :class:`~moekit.nn.MoE`, checked in ``__post_init__``.

    Parameters
    ----------
    d_model : int
        Token width; input and output have shape (..., d_model).
    d_hidden : int
        Hidden width of each expert.
    n_experts : int
        ``E``, routed experts.
    top_k : int, default=2
        Experts per token (expert choice: mean experts per token). 1 for 'switch'.
    router : {'topk', 'noisy_topk', 'switch', 'expert_choice', 'sigmoid_bias'} or Router
        The router, by name or as a module.
    capacity_factor : float or None, default=None
        None is dropless. A number ``f`` lets each expert take
        :math:`\\lceil f T k / E \\rceil` tokens and drops the rest.
    capacity_priority : {'choice', 'weight'}, default='choice'
        Which assignments an expert over capacity keeps (token-choice routers):
        ``'choice'`` every token's first choice before any second choice, in token
        order (GShard); ``'weight'`` the same, with larger combine weights first within
        one choice rank (batch prioritized routing). See
        :func:`~moekit.nn.functional.capacity_keep`.
    normalize_weights : bool or None, default=None
        Renormalise each token's kept weights to sum to one ('topk', 'noisy_topk',
        'sigmoid_bias'). None: for ``top_k > 1`` only; with ``top_k = 1`` the one weight
        would always be 1 and the task loss would send the router no gradient, so the
        raw probability is kept, as in the Switch Transformer. True with ``top_k = 1``
        is honoured with a warning. 'switch' and 'expert_choice' never renormalise.
    n_shared_experts : int, default=0
        Always-on experts of width ``d_hidden`` (DeepSeek-MoE), added to the output.
    activation : {'swiglu', 'gelu'}, default='swiglu'
    aux_loss_coef : float, default=0.01
        Weight of the router's balancing loss in ``layer.aux_loss``.
    z_loss_coef : float, default=0.0
        Weight of the router z-loss in ``layer.aux_loss``.
    bias_update_rate : float, default=1e-3
        Bias step of the 'sigmoid_bias' router, taken by :meth:`MoE.update_bias
        <moekit.nn.MoE.update_bias>` once per optimiser step.
    center_bias : bool, default=False
        Keep the 'sigmoid_bias' router's biases at mean zero (torchtitan does, the
        DeepSeek-V3 paper does not); no routing decision changes, see
        :class:`~moekit.nn.SigmoidBiasRouter`.
    expert_impl : {'auto', 'fused', 'grouped_mm', 'bmm', 'mm'}, default='auto'
        Expert matmul implementation, see :class:`~moekit.nn.experts.ExpertBank`.
        Where the chosen one cannot serve (torch.func transforms, forward-mode AD,
        torch.compile, double backward) the layer falls back by itself, see
        :meth:`MoE.execution_path <moekit.nn.MoE.execution_path>`.
    n_group, topk_group : int or None, default=None
        Group-limited routing ('topk', 'sigmoid_bias'): each token chooses inside its
        best ``topk_group`` of ``n_group`` contiguous expert groups (DeepSeek-V3), see
        :func:`~moekit.nn.functional.group_limited_scores`.
    routed_scaling_factor : float, default=1.0
        Multiplies every combine weight of the routed experts (DeepSeek-V3 uses 2.5
        with normalised sigmoid scores); the shared experts are not scaled.
    d_shared : int or None, default=None
        Hidden width of the shared experts together; None: ``n_shared_experts *
        d_hidden`` (Qwen2-MoE's shared expert is wider than a routed one).
    shared_expert_gate : bool, default=False
        Multiply the shared experts' output by a learnt token gate
        :math:`\\sigma(x_t w_s)` (Qwen2-MoE).
    balance_loss : {'batch', 'sequence', 'global'}, default='batch'
        Where the balancing loss counts the load, see :mod:`moekit.nn.balance`.
    """

    d_model: int
    d_hidden: int
    n_experts: int
    top_k: int = 2
    router: str | Router = "topk"
    capacity_factor: float | None = None
    n_shared_experts: int = 0
    activation: str = "swiglu"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    bias_update_rate: float = 1e-3
    expert_impl: str = "auto"
    capacity_priority: str = "choice"
    normalize_weights: bool | None = None
    center_bias: bool = False
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    d_shared: int | None = None
    shared_expert_gate: bool = False
    balance_loss: str = "batch"

    def __post_init__(self) -> None:
        validate_moe_params(type(self).__name__, self.as_dict())

    def as_dict(self) -> dict[str, Any]:
        """The fields as a dict (the router module, if any, is not copied)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
