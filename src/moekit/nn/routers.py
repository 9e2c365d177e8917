"""Routers: which experts see each token, and with what weight.

Every router is a small module mapping tokens ``x`` of shape (T, d_model) to a
:class:`Routing`. Router maths runs in float32 even under bf16 autocast, since the
softmax over experts and the top-k choice are sensitive to rounding.

Token-choice routers (``topk``, ``noisy_topk``, ``switch``, and ``sigmoid_bias`` in
:mod:`moekit.nn.sigmoid_router`) give
each token ``k`` experts: ``weights`` and ``indices`` have shape (T, k). The
expert-choice router gives each expert ``C`` tokens: ``weights`` and ``indices``
have shape (E, C), and ``indices`` holds token positions.

The combine weights of a token are what its router learns from: the task loss reaches
the router only through them. Renormalising the kept weights to sum to one (Mixtral)
leaves that signal with ``k > 1``, since the weights still share the token between its
experts, but with ``k = 1`` it makes the one weight exactly 1 and the router learns
from the auxiliary losses alone. So ``normalize=None``, the default, renormalises for
``k > 1`` only and keeps the raw probability for ``k = 1``, as the Switch Transformer
does.

The 'topk' and 'sigmoid_bias' routers can also limit each token to a few groups of
experts (``n_group``, ``topk_group``; DeepSeek-V3), see
:func:`~moekit.nn.functional.group_limited_scores`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit._core.validation import Interval, InvalidParameterError, validate_params
from moekit.nn import functional as MF
from moekit.nn._checks import reject

__all__ = [
    "ExpertChoiceRouter",
    "NoisyTopKRouter",
    "Router",
    "Routing",
    "SwitchRouter",
    "TopKRouter",
]


_CONSTRAINTS = {
    name: [Interval(numbers.Integral, 1, None, closed="left")]
    for name in ("d_model", "n_experts", "top_k")
}


@dataclass
class Routing:
    """What a router decided for one batch of tokens.

    Attributes
    ----------
    weights : Tensor of shape (T, k), or (E, C) when ``expert_choice``
        Combine weight of each assignment, float32.
    indices : Tensor of shape (T, k), or (E, C) when ``expert_choice``
        Expert of each token's assignment; for expert choice, the token each expert
        picked.
    logits : Tensor of shape (T, E)
        Router logits in float32 (the z-loss is taken on them).
    balance_loss : Tensor
        The router's own balancing loss, unweighted (scalar): the Switch loss for
        softmax routers, importance + load for the noisy router, zero for the
        expert-choice and bias routers, which balance without a loss.
    expert_choice : bool
        Whether ``weights`` and ``indices`` are indexed by expert.
    """

    weights: Tensor
    indices: Tensor
    logits: Tensor
    balance_loss: Tensor
    expert_choice: bool = False


class Router(nn.Module):
    """Base class: a bias-free linear map to one logit per expert, in float32.

    Parameters
    ----------
    d_model : int
        Token width.
    n_experts : int
        ``E``.
    top_k : int
        Experts per token (for expert choice: the mean number of experts per token).
    n_group, topk_group : int or None, default=None
        Group-limited choice (token-choice routers that take them): the experts form
        ``n_group`` contiguous groups and each token chooses inside its best
        ``topk_group`` groups only (:func:`~moekit.nn.functional.group_limited_scores`).
        Both None (the default) or both set.
    """

    expert_choice = False
    scores = "softmax"  # how the logits become scores (moekit.nn.balance.score_distribution)

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        top_k: int,
        *,
        n_group: int | None = None,
        topk_group: int | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        validate_params(
            owner, {"d_model": d_model, "n_experts": n_experts, "top_k": top_k}, _CONSTRAINTS
        )
        if top_k > n_experts:
            raise InvalidParameterError(
                f"The 'top_k' parameter of {owner} must be an int in the range "
                f"[1, n_experts={n_experts}]. Got {top_k!r} instead."
            )
        check_groups(owner, n_experts, top_k, n_group, topk_group)
        self.d_model, self.n_experts, self.top_k = d_model, n_experts, top_k
        self.n_group, self.topk_group = n_group, topk_group
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        self.reset_parameters()

    def limit_to_groups(self, scores: Tensor) -> Tensor:
        """``scores`` of shape (T, E) with the experts outside each token's kept groups
        at ``-inf``; ``scores`` itself when the router has no groups."""
        if self.n_group is None:
            return scores
        return MF.group_limited_scores(scores, self.n_group, self.topk_group)

    def reset_parameters(self) -> None:
        # small weights give nearly uniform routing at start: Switch Transformer
        # (section 2.4) draws them with std sqrt(0.1 / fan_in)
        nn.init.normal_(self.weight, std=math.sqrt(0.1 / max(1, self.d_model)))

    def logits(self, x: Tensor) -> Tensor:
        """Router logits ``x W_r^T`` in float32 at least, autocast off."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.to(dtype), self.weight.to(dtype))  # (T, E)

    def forward(self, x: Tensor) -> Routing:  # pragma: no cover - abstract
        raise NotImplementedError

    def update_bias(self) -> None:
        """Apply the load statistics gathered since the last call; routers without a
        bias have none, and this does nothing (see :class:`SigmoidBiasRouter`)."""

    def extra_repr(self) -> str:
        groups = (
            ""
            if self.n_group is None
            else f", n_group={self.n_group}, topk_group={self.topk_group}"
        )
        return f"d_model={self.d_model}, n_experts={self.n_experts}, top_k={self.top_k}{groups}"


def check_groups(
    owner: str, n_experts: int, top_k: int, n_group: int | None, topk_group: int | None
) -> None:
    """Check the group-limited routing settings of ``owner`` (see :class:`Router`)."""
    if n_group is None and topk_group is None:
        return
    if n_group is None or topk_group is None:
        name, value = ("n_group", n_group) if n_group is None else ("topk_group", topk_group)
        reject(owner, name, "set together with n_group and topk_group (or both None)", value)
    if isinstance(n_group, bool) or not isinstance(n_group, numbers.Integral) or n_group < 1:
        reject(owner, "n_group", "an int >= 1", n_group)
    if n_experts % n_group:
        reject(owner, "n_group", f"a divisor of n_experts={n_experts}", n_group)
    if (
        isinstance(topk_group, bool)
        or not isinstance(topk_group, numbers.Integral)
        or not 1 <= topk_group <= n_group
    ):
        reject(owner, "topk_group", f"an int in the range [1, n_group={n_group}]", topk_group)
    if top_k > topk_group * (n_experts // n_group):
        reject(
            owner,
            "topk_group",
            f"large enough to hold top_k={top_k} experts (groups of {n_experts // n_group})",
            topk_group,
        )


def resolve_normalize(normalize: bool | None, top_k: int, owner: str) -> bool:
    """Whether a router renormalises its kept weights: ``normalize``, or for None,
    ``top_k > 1`` (see the module notes). An explicit True with ``top_k = 1`` is
    honoured, with a warning, since it leaves the router no gradient from the task.
    """
    if normalize is None:
        return top_k > 1
    if normalize and top_k == 1:
        warnings.warn(
            f"{owner} with normalize=True and top_k=1 gives every token the weight 1, so "
            "the task loss sends the router no gradient (it learns from the auxiliary "
            "losses only); leave normalize=None to use the raw probability.",
            UserWarning,
            stacklevel=3,
        )
    return bool(normalize)


class TopKRouter(Router):
    """Softmax over experts, keep the top ``k``, renormalise (Mixtral, GShard).

    :math:`p_t = \\mathrm{softmax}(x_t W_r^T)`; token ``t`` goes to the ``k`` experts
    with largest :math:`p_{te}` with weights :math:`p_{te} / \\sum_{top-k} p_{te'}`
    (for ``k > 1``) or :math:`p_{te}` (for ``k = 1``, or ``normalize=False``).
    Balancing loss: :func:`~moekit.nn.functional.load_balancing_loss`.

    Parameters
    ----------
    d_model, n_experts, top_k : int
        See :class:`Router`.
    normalize : bool or None, default=None
        Renormalise the kept weights to sum to one. None: for ``k > 1`` only (with
        ``k = 1`` the weight would always be 1 and the router would get no gradient
        from the task loss; see the module notes). False with ``k > 1`` is OLMoE's
        ``norm_topk_prob=False``.
    n_group, topk_group : int or None, default=None
        Group-limited choice, see :class:`Router`.

    Examples
    --------
    >>> import torch
    >>> from moekit.nn import TopKRouter
    >>> router = TopKRouter(d_model=8, n_experts=4, top_k=2)
    >>> routing = router(torch.randn(5, 8))
    >>> routing.weights.shape, routing.indices.shape
    (torch.Size([5, 2]), torch.Size([5, 2]))
    >>> torch.allclose(routing.weights.sum(dim=-1), torch.ones(5))
    True
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        top_k: int,
        *,
        normalize: bool | None = None,
        n_group: int | None = None,
        topk_group: int | None = None,
    ) -> None:
        super().__init__(d_model, n_experts, top_k, n_group=n_group, topk_group=topk_group)
        self.normalize = resolve_normalize(normalize, top_k, type(self).__name__)

    def forward(self, x: Tensor) -> Routing:
        logits = self.logits(x)  # (T, E)
        probs = logits.softmax(dim=-1)  # (T, E)
        # the kept entries of the limited scores are the probabilities themselves
        choice = self.limit_to_groups(probs)  # (T, E)
        weights, indices = MF.top_k_routing(choice, self.top_k, normalize=self.normalize)
        balance = MF.load_balancing_loss(probs, indices, self.n_experts)
        return Routing(weights, indices, logits, balance)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, normalize={self.normalize}"


class SwitchRouter(TopKRouter):
    """Top-1 routing of the Switch Transformer (Fedus et al. 2021).

    Each token goes to its most probable expert with weight :math:`p_{te}` (not
    renormalised, so that the router gets a gradient through the weight).
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int = 1):
        if top_k != 1:
            raise InvalidParameterError(
                "The 'top_k' parameter of SwitchRouter must be 1 (Switch routing is top-1). "
                f"Got {top_k!r} instead."
            )
        super().__init__(d_model, n_experts, 1, normalize=False)


class NoisyTopKRouter(Router):
    """Noisy top-k gating of Shazeer et al. (2017).

    :math:`H(x) = x W_g + \\varepsilon \\cdot \\mathrm{softplus}(x W_{noise})` with
    :math:`\\varepsilon \\sim N(0, 1)` in training only; the gates are the softmax over
    the ``k`` largest entries of ``H`` (zero elsewhere), which is
    :math:`\\mathrm{softmax}(H)` renormalised over the top ``k``. Without
    renormalisation (the default for ``k = 1``, where the paper's gate would always be
    1) the gates are :math:`\\mathrm{softmax}(H)_{te}` itself. Balancing loss: the
    importance loss plus the load loss of the paper (eqs. 6-10).

    Parameters
    ----------
    d_model, n_experts, top_k : int
        See :class:`Router`.
    normalize : bool or None, default=None
        Renormalise over the kept experts; None: for ``k > 1`` only.
    """

    def __init__(
        self, d_model: int, n_experts: int, top_k: int, *, normalize: bool | None = None
    ) -> None:
        super().__init__(d_model, n_experts, top_k)
        self.normalize = resolve_normalize(normalize, top_k, type(self).__name__)
        # the noise weights start at zero, as in the paper's code: softplus(0) ~ 0.69
        self.noise_weight = nn.Parameter(torch.zeros(n_experts, d_model))

    def forward(self, x: Tensor) -> Routing:
        logits = self.logits(x)  # (T, E) clean
        with torch.autocast(device_type=x.device.type, enabled=False):
            raw = F.linear(x.to(logits.dtype), self.noise_weight.to(logits.dtype))
        noise_std = F.softplus(raw) + 1e-2  # (T, E), positive
        noisy = logits + torch.randn_like(logits) * noise_std if self.training else logits
        top, indices = noisy.topk(self.top_k, dim=-1)  # (T, k)
        if self.normalize:
            weights = top.softmax(dim=-1)  # (T, k) softmax over the kept logits only
        else:
            weights = noisy.softmax(dim=-1).gather(1, indices)  # (T, k) over all experts
        gates = MF.gates_from_top_k(weights, indices, self.n_experts)  # (T, E)
        balance = MF.importance_loss(gates) + MF.noisy_top_k_load(
            logits, noisy, noise_std, self.top_k
        )
        return Routing(weights, indices, logits, balance)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, normalize={self.normalize}"


class ExpertChoiceRouter(Router):
    """Expert-choice routing (Zhou et al. 2022): each expert picks its top tokens.

    Every expert takes exactly :math:`C = \\lceil f\\, T k / E \\rceil` tokens (``f`` the
    capacity factor, 1 when None), so the load is balanced by construction and no
    balancing loss is needed; a token may be picked by several experts or by none.
    The choice depends on the whole batch, so unlike token choice the output of a
    token depends on the other tokens (and it is not causal).

    Examples
    --------
    >>> import torch
    >>> from moekit.nn import ExpertChoiceRouter
    >>> router = ExpertChoiceRouter(d_model=8, n_experts=4, top_k=2)
    >>> router(torch.randn(6, 8)).indices.shape  # each expert picks C = 6 * 2 / 4 tokens
    torch.Size([4, 3])
    """

    expert_choice = True

    def __init__(
        self, d_model: int, n_experts: int, top_k: int, capacity_factor: float | None = None
    ):
        super().__init__(d_model, n_experts, top_k)
        self.capacity_factor = capacity_factor

    def forward(self, x: Tensor) -> Routing:
        logits = self.logits(x)  # (T, E)
        probs = logits.softmax(dim=-1)  # (T, E)
        n_tokens = x.shape[0]
        factor = 1.0 if self.capacity_factor is None else self.capacity_factor
        capacity = MF.expert_capacity(n_tokens, self.n_experts, self.top_k, factor)
        weights, tokens = MF.expert_choice(probs, capacity)  # (E, C), (E, C)
        return Routing(weights, tokens, logits, logits.new_zeros(()), expert_choice=True)
