"""Pure functions behind the sparse MoE layer: routing maths, capacity and losses.

Nothing here holds state. The routers in :mod:`moekit.nn.routers` and the layer in
:mod:`moekit.nn.layer` are thin shells around these functions, so that each formula
can be tested on its own against a plain loop.

Notation: ``T`` tokens, ``E`` experts, ``k`` experts per token, ``C`` the capacity
of one expert (tokens it may take).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "CAPACITY_PRIORITIES",
    "capacity_keep",
    "expert_capacity",
    "expert_choice",
    "expert_counts",
    "gates_from_top_k",
    "group_limited_scores",
    "importance_loss",
    "load_balancing_loss",
    "noisy_top_k_load",
    "router_z_loss",
    "top_k_routing",
]


def top_k_routing(probs: Tensor, top_k: int, *, normalize: bool = True) -> tuple[Tensor, Tensor]:
    """Keep the ``k`` largest router probabilities of each token.

    With ``normalize`` the kept weights are divided by their sum (Mixtral),
    :math:`w_{tj} = p_{t,e_j} / \\sum_{i \\le k} p_{t,e_i}`, so that they sum to one;
    without it they are the raw probabilities (Switch, GShard).

    Parameters
    ----------
    probs : Tensor of shape (T, E)
        Router probabilities (or any scores; the largest are kept).
    top_k : int
        Experts kept per token, ``1 <= top_k <= E``.
    normalize : bool, default=True
        Renormalise the kept weights to sum to one.

    Returns
    -------
    weights : Tensor of shape (T, k)
        Combine weights, largest first.
    indices : Tensor of shape (T, k)
        Expert index of each weight.
    """
    weights, indices = probs.topk(top_k, dim=-1)  # (T, k), (T, k)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return weights, indices


def group_limited_scores(scores: Tensor, n_group: int, topk_group: int) -> Tensor:
    """Restrict each token's choice to its best ``topk_group`` of ``n_group`` expert groups.

    The experts are cut into ``n_group`` contiguous groups of ``E / n_group``. A group's
    score is the sum of its two largest scores (its largest when a group holds one
    expert), :math:`\\gamma_{tg} = \\sum_{\\mathrm{top\\text{-}2}\\, e \\in g} s_{te}`;
    each token keeps the ``topk_group`` groups with the largest :math:`\\gamma` and the
    scores outside them become :math:`-\\infty`, so that a top-k taken afterwards picks
    inside the kept groups only. This is DeepSeek-V3's node-limited routing (2024,
    section 2.1.2), which bounds how many devices a token is sent to when each group
    lives on one device.

    Parameters
    ----------
    scores : Tensor of shape (T, E)
        The scores the top-k is taken on (for DeepSeek-V3 the sigmoid scores plus the
        bias).
    n_group : int
        Groups; must divide ``E``.
    topk_group : int
        Groups kept per token, ``1 <= topk_group <= n_group``.

    Returns
    -------
    Tensor of shape (T, E)
        ``scores`` where the expert's group is kept, ``-inf`` elsewhere (differentiable
        through the kept entries).
    """
    n_tokens, n_experts = scores.shape
    size = n_experts // n_group
    grouped = scores.reshape(n_tokens, n_group, size)  # (T, G, E/G)
    group_score = grouped.topk(min(2, size), dim=-1).values.sum(dim=-1)  # (T, G)
    kept = group_score.topk(topk_group, dim=-1).indices  # (T, g)
    mask = torch.zeros_like(group_score, dtype=torch.bool).scatter(1, kept, True)  # (T, G)
    mask = mask[:, :, None].expand(n_tokens, n_group, size).reshape(n_tokens, n_experts)
    return scores.masked_fill(~mask, float("-inf"))  # (T, E)


def expert_counts(indices: Tensor, n_experts: int) -> Tensor:
    """Assignments per expert, :math:`c_e = \\sum_{t, j} [\\, e_{tj} = e \\,]`.

    ``torch.bincount`` gives the same numbers, but the length of its output depends on
    the largest index, so ``torch.compile`` cannot trace it without a graph break and
    ``vmap`` has no rule for it; a scatter-add into ``E`` zeros has a fixed shape.

    Parameters
    ----------
    indices : Tensor of shape (...,)
        Expert indices in ``[0, E)``, any shape.
    n_experts : int
        ``E``.

    Returns
    -------
    Tensor of shape (E,)
        int64 counts.
    """
    flat = indices.reshape(-1).long()  # (N,)
    return flat.new_zeros(n_experts).scatter_add_(0, flat, torch.ones_like(flat))


def expert_capacity(
    n_tokens: int, n_experts: int, top_k: int, capacity_factor: float | None
) -> int | None:
    """Tokens one expert may take: :math:`C = \\lceil f \\, T k / E \\rceil`.

    This is the Switch Transformer capacity (Fedus et al. 2021, eq. 3) with ``k``
    assignments per token. ``capacity_factor=None`` means dropless and gives None.
    The capacity never exceeds ``T``: an expert cannot receive a token twice.

    Parameters
    ----------
    n_tokens, n_experts, top_k : int
        ``T``, ``E`` and ``k``.
    capacity_factor : float or None
        The factor ``f``; 1.0 is exactly the mean load.

    Returns
    -------
    int or None
    """
    if capacity_factor is None:
        return None
    return min(n_tokens, math.ceil(capacity_factor * n_tokens * top_k / n_experts))


CAPACITY_PRIORITIES = ("choice", "weight")
"""Orders in which :func:`capacity_keep` fills the experts."""


def capacity_keep(
    indices: Tensor, weights: Tensor, n_experts: int, capacity: int, priority: str = "choice"
) -> Tensor:
    """Which token-choice assignments fit in their expert's capacity.

    Each expert takes at most ``C`` assignments; the order in which they are taken is
    the *priority*:

    - ``'choice'``: every token's first choice before any token's second choice, and
      so on; within one choice rank, in token order. This is GShard's order (Lepikhin
      et al. 2020, algorithm 1, which fills the top-1 slots, then the top-2 slots):
      a token's main expert is never displaced by another token's spare one.
    - ``'weight'``: choice ranks as above, but within one rank the assignments with
      the larger combine weight go first, so that when an expert overflows it drops
      the tokens it matters least to. This is the batch prioritized routing of
      Riquelme et al. (2021, section 3.1), ordered by each assignment's own weight
      (for the first choices of the softmax routers, the token's largest weight:
      the paper's priority score).

    With ``k = 1`` and ``'choice'`` this is the token order of the Switch Transformer.
    Every step has a fixed shape (no data-dependent sizes), so the function also runs
    under ``vmap`` and ``torch.compile``.

    Parameters
    ----------
    indices : Tensor of shape (T, k)
        Expert of each token's ``j``-th choice (``j = 0`` the first).
    weights : Tensor of shape (T, k)
        Their combine weights (used by ``'weight'`` only; no gradient flows here).
    n_experts : int
        ``E``.
    capacity : int
        ``C``.
    priority : {'choice', 'weight'}, default='choice'

    Returns
    -------
    Tensor of shape (T, k)
        True where the assignment is kept.
    """
    n_tokens, top_k = indices.shape
    rank = torch.arange(top_k, device=indices.device)  # (k,)
    if priority == "weight":
        # per choice rank, tokens by decreasing weight (stable: ties in token order)
        by_weight = weights.detach().t().sort(dim=1, descending=True, stable=True).indices
        order = (by_weight * top_k + rank[:, None]).reshape(-1)  # (k*T,) assignment ids
    else:
        tokens = torch.arange(n_tokens, device=indices.device)  # (T,)
        order = (tokens[None, :] * top_k + rank[:, None]).reshape(-1)  # (k*T,) rank-major
    expert = indices.reshape(-1)[order]  # (k*T,) expert of each assignment, by priority
    # group by expert keeping the priority order; an assignment's place in its group
    # is its place in the expert's queue
    grouped = torch.argsort(expert, stable=True)  # (k*T,)
    counts = expert_counts(expert, n_experts)  # (E,)
    start = torch.cumsum(counts, 0) - counts  # (E,) first slot of each expert
    place = torch.arange(expert.numel(), device=expert.device) - start[expert[grouped]]
    keep = torch.zeros(n_tokens * top_k, dtype=torch.bool, device=indices.device)
    keep = keep.scatter(0, order[grouped], place < capacity)  # back to assignment ids
    return keep.reshape(n_tokens, top_k)


def expert_choice(probs: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    """Each expert picks its ``C`` highest-scoring tokens (Zhou et al. 2022).

    With :math:`S = \\mathrm{softmax}(X W_r)` of shape (T, E), expert ``e`` takes the
    tokens :math:`I_e = \\mathrm{TopK}(S_{:,e}, C)` with gates :math:`G_e = S_{I_e, e}`.
    Every expert gets exactly ``C`` tokens; a token may be taken by none or by many.

    Parameters
    ----------
    probs : Tensor of shape (T, E)
        Router probabilities.
    capacity : int
        ``C``, tokens per expert, ``1 <= C <= T``.

    Returns
    -------
    weights : Tensor of shape (E, C)
        Gate of each (expert, chosen token) pair.
    tokens : Tensor of shape (E, C)
        Token index chosen by each expert.
    """
    weights, tokens = probs.t().topk(capacity, dim=-1)  # (E, C), (E, C)
    return weights, tokens


def load_balancing_loss(probs: Tensor, indices: Tensor, n_experts: int) -> Tensor:
    """Switch/GShard auxiliary load-balancing loss.

    .. math::

        L = E \\sum_{e=1}^{E} f_e P_e, \\qquad
        f_e = \\frac{1}{T k} \\sum_{t, j} [\\, e_{tj} = e \\,], \\qquad
        P_e = \\frac{1}{T} \\sum_t p_{te}

    (Fedus et al. 2021, eqs. 4-6; ``f`` counts all ``k`` choices of a token, and is
    divided by ``k`` so that it sums to one). ``f`` is a count and carries no
    gradient; ``P`` does. Under uniform routing (every ``f_e = P_e = 1/E``) the loss
    is exactly 1, the value it is designed to be pushed to; a router that sends all
    tokens to one expert with certainty gives ``E``.

    Parameters
    ----------
    probs : Tensor of shape (T, E)
        Router probabilities (softmax of the logits).
    indices : Tensor of shape (T, k)
        Experts chosen for each token.
    n_experts : int
        ``E``.

    Returns
    -------
    Tensor
        Scalar.

    Examples
    --------
    >>> import torch
    >>> from moekit.nn import load_balancing_loss
    >>> uniform = torch.full((8, 4), 0.25)  # every expert equally likely
    >>> each_twice = torch.arange(8).remainder(4).unsqueeze(1)  # (8, 1)
    >>> float(load_balancing_loss(uniform, each_twice, 4))
    1.0
    >>> collapsed = torch.zeros(8, 4)
    >>> collapsed[:, 0] = 1.0  # every token certain of expert 0
    >>> float(load_balancing_loss(collapsed, torch.zeros(8, 1, dtype=torch.long), 4))
    4.0
    """
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    counts = expert_counts(indices, n_experts)  # (E,)
    f = counts.to(probs.dtype) / indices.numel()  # (E,)
    p = probs.mean(dim=0)  # (E,)
    return n_experts * (f * p).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """Router z-loss of ST-MoE (Zoph et al. 2022, eq. 5).

    :math:`L_z = \\frac{1}{T} \\sum_t \\big(\\log \\sum_e e^{x_{te}}\\big)^2`; it keeps the
    router logits small, which keeps the softmax stable in low precision.

    Parameters
    ----------
    logits : Tensor of shape (T, E)

    Returns
    -------
    Tensor
        Scalar.

    Examples
    --------
    >>> import math, torch
    >>> from moekit.nn import router_z_loss
    >>> loss = router_z_loss(torch.zeros(3, 4))  # logsumexp = log 4 for every token
    >>> math.isclose(float(loss), math.log(4) ** 2, rel_tol=1e-6)
    True
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).square().mean()


def _cv_squared(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation, :math:`\\mathrm{Var}(x) / (\\bar x^2 + \\epsilon)`."""
    if x.numel() <= 1:
        return x.sum() * 0.0
    return x.var(unbiased=False) / (x.mean().square() + eps)


def importance_loss(gates: Tensor) -> Tensor:
    """Importance loss of Shazeer et al. (2017), eq. 6.

    :math:`L_{imp} = \\mathrm{CV}(\\mathrm{Importance})^2` with
    :math:`\\mathrm{Importance}_e = \\sum_t G_{te}`, the total gate weight each expert
    receives in the batch.

    Parameters
    ----------
    gates : Tensor of shape (T, E)
        Sparse gate values (zero outside each token's top-k).

    Returns
    -------
    Tensor
        Scalar.

    Examples
    --------
    >>> import torch
    >>> from moekit.nn import importance_loss
    >>> float(importance_loss(torch.full((6, 3), 1 / 3)))  # equal importance
    0.0
    >>> float(importance_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0]])))  # all on one
    1.0
    """
    return _cv_squared(gates.sum(dim=0))


def noisy_top_k_load(
    clean_logits: Tensor, noisy_logits: Tensor, noise_std: Tensor, top_k: int
) -> Tensor:
    """Smooth load estimator of Shazeer et al. (2017), eqs. 8-10, as a loss.

    The probability that expert ``e`` is in token ``t``'s top-k when only its own
    noise is redrawn is

    .. math::

        P_{te} = \\Phi\\Big(\\frac{(x W_g)_{te} - \\mathrm{kth\\_excluding}(H_t, k, e)}
        {\\mathrm{softplus}((x W_{noise})_{te})}\\Big),

    where ``kth_excluding`` is the k-th largest noisy logit of the token among the
    other experts. :math:`\\mathrm{Load}_e = \\sum_t P_{te}` and the loss is
    :math:`\\mathrm{CV}(\\mathrm{Load})^2`.

    Parameters
    ----------
    clean_logits : Tensor of shape (T, E)
        :math:`x W_g`.
    noisy_logits : Tensor of shape (T, E)
        ``H``, the logits with noise added.
    noise_std : Tensor of shape (T, E)
        :math:`\\mathrm{softplus}(x W_{noise})`, positive.
    top_k : int
        ``k``; must be smaller than ``E`` (with ``k = E`` every expert is always
        chosen and the load is constant).

    Returns
    -------
    Tensor
        Scalar.
    """
    n_experts = clean_logits.shape[-1]
    if top_k >= n_experts or clean_logits.shape[0] == 0:
        return clean_logits.sum() * 0.0
    top = noisy_logits.topk(top_k + 1, dim=-1).values  # (T, k+1)
    kth_in = top[:, top_k : top_k + 1]  # (T, 1) threshold for an expert inside the top-k
    kth_out = top[:, top_k - 1 : top_k]  # (T, 1) threshold for an expert outside it
    is_in = noisy_logits > kth_in  # (T, E)
    threshold = torch.where(is_in, kth_in, kth_out)  # (T, E)
    normal = torch.distributions.Normal(
        torch.zeros((), dtype=clean_logits.dtype, device=clean_logits.device),
        torch.ones((), dtype=clean_logits.dtype, device=clean_logits.device),
    )
    prob_in = normal.cdf((clean_logits - threshold) / noise_std)  # (T, E)
    return _cv_squared(prob_in.sum(dim=0))


def gates_from_top_k(weights: Tensor, indices: Tensor, n_experts: int) -> Tensor:
    """Scatter top-k weights of shape (T, k) into a dense (T, E) gate matrix, zero elsewhere."""
    dense = weights.new_zeros(weights.shape[0], n_experts)  # (T, E)
    return dense.scatter(1, indices, weights)
