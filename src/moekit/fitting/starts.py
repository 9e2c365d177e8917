"""Where EM starts: a mix of strategies, and the simpler models a fit contains.

EM climbs to the nearest optimum of the likelihood, and a mixture's likelihood has
many. One strategy started n times tends to land in one basin n times (k-means on
[x, y] cuts crossing regression lines into x-bands, whatever its seed), so
``init="auto"`` draws its starts from several strategies that fail differently:

===========  ===============================================================
kmeans       k-means on the standardised rows [x, y]
nested       a fit of a simpler model this one contains, carried over: the same
             model with K - 1 experts with one expert split along the sign of its
             residuals; Gaussian experts for Student-t experts; the softmax gate
             for the MLP gate; the constant gate for the softmax gate
residuals    k-means on the residuals of one pooled expert
random       a random expert per row (flexmix's start)
sem, cem     a few stochastic (or classification) EM steps from a random
             partition, as flexmix's ``initFlexmix`` runs them: hard, sampled
             assignments move far from the start before EM settles
dirichlet    soft random responsibilities
ward         Ward's agglomerative clustering of the rows k-means clusters, cut at
             K clusters (only when asked for: ``init="ward"``; deterministic,
             mclust's kind of start)
===========  ===============================================================

The simpler models are fitted on the same rows with half as many starts (their own
``auto`` mix, recursively), so their cost shrinks geometrically.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moekit._core.data import EMData
from moekit.fitting.init import (
    band_resp,
    dirichlet_resp,
    kmeans_resp,
    random_resp,
    residual_resp,
    split_resp,
    ward_resp,
)
from moekit.fitting.model import EMModel, Params, resized_family

AUTO = ("kmeans", "nested", "residuals", "random", "sem", "dirichlet", "random", "cem",
        "nested", "dirichlet")  # fmt: skip
"""The order ``init="auto"`` takes its starts in, cycled: the first few are the most
different from one another, so that even ``n_init=3`` explores three ways."""

STRATEGIES = ("auto", "kmeans", "random", "dirichlet", "residuals", "sem", "cem", "split",
              "ward")  # fmt: skip
"""Values of the estimators' ``init``; ``"split"`` makes every start a split of a
fitted model with one expert fewer."""

STOCHASTIC_STEPS = 5
"""Hard EM steps of a ``sem``/``cem`` start before ordinary EM takes over."""

POOLED_ITER = 20
"""EM iterations of the one-expert fit whose residuals a ``residuals`` start clusters."""


def family_key(family) -> tuple:
    """A family's kind and public settings (n_experts among them), to recognise it."""
    settings = sorted((k, repr(v)) for k, v in vars(family).items() if not k.startswith("_"))
    return (type(family).__qualname__, tuple(settings))


def strategy_sequence(init: str, n_init: int) -> list[str]:
    """The strategy of each of ``n_init`` starts."""
    if init == "auto":
        return [AUTO[i % len(AUTO)] for i in range(n_init)]
    if init == "split":
        return ["nested"] * n_init
    return [init] * n_init


# ---------------------------------------------------------------------------- nesting
@dataclass
class Simpler:
    """A simpler model contained in the fitted one, and how a fit of it carries over."""

    label: str
    model: EMModel
    split: bool  # K - 1 experts: carried over by splitting an expert
    embed: Callable[[Params, EMData], Params] | None = None
    origin: torch.Tensor | None = None  # fewer experts: the one each expert copies, (K,)


def simpler_models(model: EMModel) -> list[Simpler]:
    """The simpler models ``model`` contains, asked of its families.

    A family offers ``simpler()`` (a family it contains, or None) and ``embed(params,
    data)`` (a fit of that family as its own parameters, at the same likelihood). A
    gate whose simpler gate has fewer experts (a tree one level shallower) also says,
    with ``expert_origin()``, which of them each of its experts copies; and a gate
    that cannot drop one expert (``resizable`` false) offers no K - 1 model.
    """
    out = []
    expert, gate = model.expert, model.gate
    simpler = getattr(expert, "simpler", None)
    fam = simpler() if simpler is not None else None
    if fam is not None:
        out.append(Simpler(f"{type(fam).__name__}", EMModel(fam, gate, model.chunk_size), False,
                           lambda p, d: Params(expert.embed(p.expert, d), p.gate)))  # fmt: skip
    by_size = getattr(expert, "nested_by_size", True)  # False: a family per expert
    simpler = getattr(gate, "simpler", None)
    fam = simpler() if simpler is not None else None
    if fam is not None and fam.n_experts != model.n_experts and not by_size:
        pass
    elif fam is not None and fam.n_experts != model.n_experts:
        origin = gate.expert_origin()
        small = EMModel(resized_family(expert, fam.n_experts), fam, model.chunk_size)
        out.append(Simpler(f"{fam.n_experts} experts ({type(fam).__name__})", small, False,
                           lambda p, d: Params(expert.select(p.expert, origin),
                                               gate.embed(p.gate, d)), origin))  # fmt: skip
    elif fam is not None:
        out.append(Simpler(f"{type(fam).__name__}", EMModel(expert, fam, model.chunk_size), False,
                           lambda p, d: Params(p.expert, gate.embed(p.gate, d))))  # fmt: skip
    if model.n_experts > 1 and getattr(gate, "resizable", True) and by_size:
        out.append(Simpler(f"{model.n_experts - 1} experts", model.resized(model.n_experts - 1),
                           True))  # fmt: skip
    return out


def duplicate_expert(model: EMModel, params: Params, j: int) -> Params:
    """Expert j of a (K - 1)-expert fit as two identical experts of half its weight each.

    The mixture density is unchanged, so the K-expert model starts exactly at the
    smaller model's likelihood (and EM, by symmetry, stays there): the floor that
    makes a richer fit never worse than the nested one.
    """
    K1 = model.n_experts - 1
    idx = torch.tensor([*range(K1), j])  # the experts where they were, the copy last
    delta = torch.zeros(K1 + 1, dtype=torch.float64)
    delta[[j, K1]] = -math.log(2.0)
    gate = model.gate.shift(model.gate.select(params.gate, idx), delta)
    return Params(model.expert.select(params.expert, idx), gate)


def expert_fit_order(model: EMModel, params: Params, data: EMData) -> tuple[torch.Tensor, list]:
    """Responsibilities (K, n) at ``params`` and the experts from worst fit to best.

    An expert's fit is its responsibility-weighted mean log-density; the worst is
    the first one a split should try.
    """
    res = model.e_pass(params, data, stats=False, keep_resp=True)
    score = torch.zeros(model.n_experts, dtype=res.resp.dtype)
    for chunk in data.chunks(model.chunk_size):
        logp = model.expert.log_prob(params.expert, chunk)  # (K, c)
        score += (res.resp[:, chunk.start : chunk.stop] * logp).sum(1).cpu()
    score /= res.nk.cpu().clamp(min=1e-12)
    return res.resp, torch.argsort(score).tolist()


def split_starts(model: EMModel, small: EMModel, params: Params, data: EMData) -> list[Params]:
    """Starts of ``model`` from a fit of ``small`` (one expert fewer): each expert, worst
    first, split along the sign of its residuals, then one M-step."""
    resp, order = expert_fit_order(small, params, data)
    resid = torch.cat(
        [small.expert.residuals(params.expert, c) for c in data.chunks(small.chunk_size)], -1
    )  # (K - 1, r, n)
    return [model.init_from_resp(data, split_resp(resp, resid[j], j)) for j in order]


def grow_starts(model: EMModel, option: Simpler, params: Params, data: EMData) -> list[Params]:
    """Starts of ``model`` from a fit of ``option.model``, whose expert j becomes the
    experts k with ``option.origin[k] == j``: each expert's rows shared among its
    copies in bands of its residuals (weighted quantiles along its split direction),
    one M-step, and the fitted gate carried over (:meth:`Simpler.embed`); then the
    exact embedding, which starts at the simpler fit's likelihood (and stays there,
    by symmetry): the floor under the richer fit.
    """
    small = option.model
    res = small.e_pass(params, data, stats=False, keep_resp=True)
    resid = torch.cat(
        [small.expert.residuals(params.expert, c) for c in data.chunks(small.chunk_size)], -1
    )  # (K', r, n)
    resp = res.resp.new_zeros((model.n_experts, data.n))
    origin = option.origin.to(resp.device)
    for j in range(small.n_experts):
        copies = torch.nonzero(origin == j).flatten()
        resp[copies] = band_resp(res.resp[j], resid[j], len(copies))
    exact = option.embed(params, data)
    split = model.init_from_resp(data, resp)
    return [Params(split.expert, exact.gate), exact]


# ---------------------------------------------------------------------------- the starts
@dataclass
class StartMaker:
    """Builds the starting parameters of one fit, strategy by strategy.

    Parameters
    ----------
    model : EMModel
    data : EMData
        The rows the starts run on (a subset of the fit's rows, for large data).
    generator : torch.Generator
    fit_nested : callable
        ``fit_nested(model, data, n_init) -> Params``: fits a simpler model (the EM
        loop with its own mix of starts).
    n_init : int
        Starts of the fit; the simpler models get half as many.
    kmeans_target : Tensor or None
        What k-means clusters on besides the features (see ``kmeans_resp``).
    shared : dict or None
        Work shared by the starts of one fit and of the simpler models it fits on the
        same rows: the pooled one-expert fit of the ``residuals`` starts. With one
        expert, a gate that is then the constant 1 (``constant_with_one_expert``)
        leaves that fit the same computation whatever the gate, so the constant and
        the softmax gate's models share it.
    """

    model: EMModel
    data: EMData
    generator: torch.Generator
    fit_nested: Callable[[EMModel, EMData, int], Params]
    n_init: int
    kmeans_target: torch.Tensor | None = None
    _nested: list = field(default_factory=list)  # per option: list of ready starts
    _nested_calls: int = 0
    shared: dict | None = None
    _pooled_resid: torch.Tensor | None = None

    def make(self, strategy: str) -> tuple[str, Params]:
        """Starting parameters (after the first M-step) and a label saying where from."""
        K, data, gen = self.model.n_experts, self.data, self.generator
        if strategy == "nested":
            made = self._next_nested()
            if made is not None:
                return made
            strategy = "kmeans"  # one expert: nothing simpler to start from
        if strategy in ("sem", "cem"):
            return strategy, self._stochastic(strategy == "sem")
        makers = {
            "kmeans": lambda: kmeans_resp(data, K, gen, target=self.kmeans_target),
            "ward": lambda: ward_resp(data, K, gen, target=self.kmeans_target),
            "random": lambda: random_resp(data, K, gen),
            "dirichlet": lambda: dirichlet_resp(data, K, gen),
            "residuals": lambda: residual_resp(self._residuals(), K, gen),
        }
        return strategy, self.model.init_from_resp(data, makers[strategy]())

    def _next_nested(self) -> tuple[str, Params] | None:
        options = simpler_models(self.model)
        if not options:
            return None
        if not self._nested:
            self._nested = [None] * len(options)
        call = self._nested_calls
        self._nested_calls += 1
        i = call % len(options)
        rank = call // len(options)  # the rank-th start this option gives
        option = options[i]
        if self._nested[i] is None:
            n_sub = max(1, self.n_init // 2)
            small = self.fit_nested(option.model, self.data, n_sub)
            if option.split:
                self._nested[i] = split_starts(self.model, option.model, small, self.data)
            elif option.origin is not None:
                self._nested[i] = grow_starts(self.model, option, small, self.data)
            else:
                self._nested[i] = [option.embed(small, self.data)]
        starts = self._nested[i]
        if rank >= len(starts):  # every expert split already: a random split instead
            return None
        which = f"split of {option.label}" if option.split else f"from {option.label}"
        return which, starts[rank]

    def _residuals(self) -> torch.Tensor:
        """Residuals (r, n) of one expert fitted to all rows (cached, and shared with
        the other starts of the fit on these rows through ``shared``)."""
        if self._pooled_resid is None:
            pooled = self.model.resized(1)
            # the same computation: the same expert family on the same rows, under the
            # same gate or any two that are constant with one expert, with the same
            # safeguard (a step that lowered the objective is checked, or is not)
            key = ("pooled", family_key(pooled.expert), id(self.data),
                   pooled.expert.monotone and pooled._gate_monotone)  # fmt: skip
            if not getattr(pooled.gate, "constant_with_one_expert", False):
                key += (family_key(pooled.gate),)
            shared = {} if self.shared is None else self.shared
            if key not in shared:
                pooled.prepare(self.data)
                ones = self.data.XeT.new_ones((1, self.data.n))
                params = pooled.init_from_resp(self.data, ones)
                params = pooled.iterate(params, self.data, POOLED_ITER, 1e-8)[0]
                resid = torch.cat(
                    [pooled.expert.residuals(params.expert, c) for c in self.data.chunks()], -1
                )[0]
                self.model.prepare(self.data)
                # the entry holds the rows too: while it is kept, no other rows can be
                # allocated at their address and take their id (and so this fit)
                shared[key] = self.data, resid
            self._pooled_resid = shared[key][1]
        return self._pooled_resid

    def _stochastic(self, sample: bool) -> Params:
        """A few hard EM steps from a random partition: S-EM draws each row's expert from
        its responsibilities, C-EM takes the most responsible one."""
        K, data, gen = self.model.n_experts, self.data, self.generator
        params = self.model.init_from_resp(data, random_resp(data, K, gen))
        for _ in range(STOCHASTIC_STEPS):
            resp = self.model.e_pass(params, data, stats=False, keep_resp=True).resp
            if sample:
                draws = torch.multinomial(resp.T.cpu().clamp(min=0), 1, generator=gen)[:, 0]
            else:
                draws = resp.argmax(0).cpu()
            hard = torch.zeros_like(resp)
            hard[draws.to(resp.device), torch.arange(data.n, device=resp.device)] = 1.0
            if bool((hard.sum(1) == 0).any()):  # an expert lost every row: keep the last step
                break
            params = self.model.m_step(params, self.model.stats_from_resp(params, data, hard), data)
        return params


def carry_over(model: EMModel, small: EMModel, params: Params, data: EMData) -> list[Params]:
    """Starts of ``model`` from a fit of a simpler model it contains, on the same data.

    With one expert fewer: every expert split along its residuals, and the exact
    embedding (the worst expert duplicated), which starts at the simpler fit's
    likelihood and guarantees the richer fit never ends below it. With a simpler
    family (Gaussian for t experts, softmax for the MLP gate, ...): its embedding.
    Anything else carries nothing over.
    """
    for option in simpler_models(model):
        m = option.model
        if (type(m.expert), type(m.gate), m.n_experts) != (
            type(small.expert),
            type(small.gate),
            small.n_experts,
        ):
            continue
        if option.split:
            starts = split_starts(model, small, params, data)
            _, order = expert_fit_order(small, params, data)
            return [*starts, duplicate_expert(model, params, order[0])]
        if option.origin is not None:
            return grow_starts(model, Simpler(option.label, small, False, option.embed,
                                              option.origin), params, data)  # fmt: skip
        return [option.embed(params, data)]
    return []
