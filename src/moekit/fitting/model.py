"""What one EM fit is made of: parameters, a pass over the data, and the iteration.

:class:`EMModel` pairs an expert family with a gate; its :meth:`EMModel.e_pass` is the
E-step (one streamed pass that also sums the M-step's statistics) and
:meth:`EMModel.iterate` the E/M alternation with its safeguard. The restarts and the
choice among them live in :mod:`moekit.fitting.em`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from moekit._core.batch import lerp_params
from moekit._core.data import DEFAULT_CHUNK, EMData
from moekit.fitting import lockstep
from moekit.fitting.progress import Progress


@dataclass
class Params:
    """Parameters of one MoE: the experts' and the gate's."""

    expert: Any
    gate: Any


@dataclass
class PassResult:
    """What one E-step pass computed at some parameters."""

    objective: float  # mean log-likelihood + log-prior / n
    loglik: float  # mean log-likelihood
    expert_stats: Any
    gate_stats: Any
    resp: torch.Tensor | None  # (K, n) when a component needs it
    nk: torch.Tensor | None = None  # (K,) total responsibility of each expert


@dataclass
class FitResult:
    """Outcome of :func:`run_em`.

    Attributes
    ----------
    params : Params
    n_iter : int
        EM iterations on all the data for the returned parameters.
    converged : bool
    objective : float
        Final mean objective (log-likelihood plus log-prior / n).
    loglik : float
        Final mean log-likelihood.
    history : list of float
        Objective after 0, 1, ..., n_iter iterations on all the data.
    nk : Tensor of shape (K,)
        Total responsibility of each expert at the end.
    n_optima : int
        Distinct optima reached by the starts that ran to convergence.
    start : str
        Where the returned fit started ("kmeans", "split of 2 experts", ...).
    """

    params: Params
    n_iter: int
    converged: bool
    objective: float
    loglik: float
    history: list[float] = field(default_factory=list)
    nk: torch.Tensor | None = None
    n_optima: int = 1
    start: str = ""


def _scale(stats, factor: float):
    """Statistics (a tensor, a tuple of them, or None) times ``factor``."""
    if factor == 1.0 or stats is None:
        return stats
    if isinstance(stats, tuple):
        return tuple(_scale(s, factor) for s in stats)
    return stats * factor


def _add(acc, new):
    if acc is None:
        return new
    if isinstance(new, tuple):
        return tuple(_add(a, b) for a, b in zip(acc, new, strict=True))
    if new is None:
        return None
    return acc + new


def posterior(joint: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Responsibilities and row log-likelihoods from log g_k(x) + log p_k(y | x).

    One log-sum-exp pass over the experts' axis ``dim`` (``joint`` is used up):
    r_k = exp(j_k - m) / s and log p(y | x) = log s + m, with m = max_k j_k and
    s = sum_k exp(j_k - m). With one expert that is r = exp(j - j) = 1 and
    log p = j + (j - j), which three operations give, the same floats (NaN where
    j is not finite, as the general pass gives).
    """
    if joint.shape[dim] == 1:
        d = joint - joint
        return torch.exp(d), joint.add_(d)
    top = joint.amax(dim, keepdim=True)
    resp = joint.sub_(top).exp_()  # unnormalised, in place
    s = resp.sum(dim, keepdim=True)
    resp.div_(s)
    return resp, torch.log(s).add_(top)


def resized_family(family, n_experts: int):
    """``family`` with ``n_experts`` experts (see :meth:`EMModel.resized`)."""
    resized = getattr(family, "resized", None)
    if resized is not None:
        return resized(n_experts)
    family = copy.copy(family)
    family.n_experts = n_experts
    return family


def keep_experts(old: Any, new: Any, experts: tuple[int, ...]) -> Any:
    """``new`` expert parameters with those of ``experts`` taken from ``old``.

    Every field of an expert family's parameters is indexed by expert first (a
    tensor of shape (K, ...) or a list of K fitted estimators).
    """
    idx = list(experts)
    values = {}
    for f in fields(new):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if isinstance(b, torch.Tensor):
            b = b.clone()
            b[idx] = a[idx].to(b)
        elif isinstance(b, list):
            b = [a[k] if k in experts else v for k, v in enumerate(b)]
        values[f.name] = b
    return type(new)(**values)


def without_experts(model: EMModel, params: Params, keep: torch.Tensor,
                    gate_row: torch.Tensor) -> tuple[EMModel, Params]:  # fmt: skip
    """The model and parameters with only the experts ``keep`` (indices, increasing).

    The gate is renormalised over the experts kept, so that log sum_k g_k(x) = 0 at
    the gate design ``gate_row`` (one column): exact at every x for a softmax gate,
    whose weights renormalise by themselves, and for a constant gate.
    """
    small = model.resized(len(keep))
    gate = model.gate.select(params.gate, keep)
    lse = torch.logsumexp(small.gate.log_weights(gate, gate_row), 0)
    gate = small.gate.shift(gate, -lse.reshape(1).expand(len(keep)))
    small.gate_balance = model.gate_balance
    expert = model.expert.select(params.expert, keep)
    if hasattr(model.expert, "named"):  # a family per expert: the kept experts' own families
        small.expert = model.expert.named(expert)
    return small, Params(expert, gate)


class EMModel:
    """An expert family and a gate, with the pass and step they share."""

    def __init__(self, expert, gate, chunk_size: int = DEFAULT_CHUNK) -> None:
        self.expert = expert
        self.gate = gate
        self.chunk_size = chunk_size
        #: experts whose parameters the M-step keeps as they are
        self.frozen_experts: tuple[int, ...] = ()
        #: whether the M-step keeps the gate as it is
        self.gate_frozen = False
        #: strength lambda of the gate's balance penalty (see :meth:`e_pass`)
        self.gate_balance = 0.0

    @property
    def n_experts(self) -> int:
        return self.expert.n_experts

    def resized(self, n_experts: int) -> EMModel:
        """The same families with another number of experts (for nested starts).

        Families keep ``n_experts`` as their only setting that depends on K and build
        anything else that does in ``prepare``, so a shallow copy is enough; a family
        whose size is tied to its shape (a tree gate) answers ``resized`` itself.
        """
        return EMModel(resized_family(self.expert, n_experts), resized_family(self.gate, n_experts),
                       self.chunk_size)  # fmt: skip

    @property
    def needs_resp(self) -> bool:
        return self.expert.needs_resp or self.gate.needs_resp

    def prepare(self, data: EMData) -> None:
        self.expert.prepare(data)
        self.gate.prepare(data)

    def e_pass(
        self, params: Params, data: EMData, *, stats: bool = True, keep_resp: bool = False
    ) -> PassResult:
        """One streamed pass: log-likelihood, responsibilities and statistics at ``params``.

        For data-parallel data (``data.comm``) the pass runs on this process's rows and
        its sums (log-likelihood, n_k, the experts' and the gate's statistics) are then
        all-reduced in one message; responsibilities stay local. The message does not
        depend on n: with p design columns, m targets and K linear-Gaussian experts
        under a softmax gate taking Newton steps it holds
        2 + K + K (p (p + 1) / 2 + p m + m) + K p + K (K + 1) / 2 p (p + 1) / 2 floats,
        O(K^2 p^2) (233 floats, 1,864 bytes, for K = 3, p = 6, m = 1); with Bohning
        steps the gate sends only its gradient and the message is O(K p^2).
        """
        keep = keep_resp or (stats and self.needs_resp)
        K = self.expert.n_experts
        resp_all = data.XeT.new_empty((K, data.n)) if keep else None
        total = data.XeT.new_zeros(())
        nk = data.XeT.new_zeros(K)
        es = gs = None
        lam, balance = self.gate_balance, data.XeT.new_zeros(())
        for chunk in data.chunks(self.chunk_size):
            joint = self.expert.log_prob(params.expert, chunk)  # (K, c)
            log_gate = self.gate.log_prob(params.gate, chunk)
            if lam:
                balance += (log_gate.sum() if chunk.weight is None
                            else (log_gate.sum(0) * chunk.weight).sum())  # fmt: skip
            joint.add_(log_gate)
            resp, row_ll = posterior(joint, 0)  # (K, c), (1, c)
            if keep:  # the posterior probabilities, before any row weight
                resp_all[:, chunk.start : chunk.stop] = resp
            if chunk.weight is not None:
                # frequency weights: row i counts w_i times in every sum of the pass
                row_ll.mul_(chunk.weight)
                resp.mul_(chunk.weight)
            total += row_ll.sum()
            nk += resp.sum(1)
            if stats:
                es = _add(es, self.expert.chunk_stats(params.expert, chunk, resp))
                targets = self._gate_targets(resp, chunk.weight)
                gs = _add(gs, self.gate.chunk_stats(params.gate, chunk, targets))
        if data.comm is not None:
            # data-parallel: every process's sums in one message, O(K p^2) floats for
            # linear experts whatever the rows; then every process takes the same M-step
            total, nk, balance, es, gs = data.reduce((total, nk, balance, es, gs))
        n = data.w_total
        loglik = float(total) / n
        prior = self.expert.log_prior(params.expert) + self.gate.log_prior(params.gate)
        prior += lam / K * float(balance)
        return PassResult(loglik + prior / n, loglik, es, _scale(gs, 1.0 + lam), resp_all, nk)

    def _gate_targets(self, resp: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """The gate's soft targets: r_ik, or (r_ik + lambda / K) / (1 + lambda) when balanced.

        With the balance penalty (lambda / K) sum_i sum_k log g_k(x_i) (the gate's
        cross-entropy to uniform weights, largest when every expert keeps weight),
        the gate's part of the objective is (1 + lambda) sum_i sum_k t_ik log g_k(x_i)
        with these targets t: the gate's own M-step on t, with its statistics (linear
        in the targets) scaled by 1 + lambda, maximises it exactly.
        """
        lam = self.gate_balance
        if not lam:
            return resp
        prior = lam / resp.shape[0]
        if weight is not None:  # (w_i r_ik + w_i lambda / K) / (1 + lambda)
            return resp.add(weight * prior).div_(1.0 + lam)
        return resp.add(prior).div_(1.0 + lam)

    def stats_from_resp(self, params: Params, data: EMData, resp: torch.Tensor) -> PassResult:
        """Statistics for given responsibilities (K, n), as for the first M-step."""
        es = gs = None
        nk = resp.new_zeros(resp.shape[0])
        for chunk in data.chunks(self.chunk_size):
            r = resp[:, chunk.start : chunk.stop]
            if chunk.weight is not None:
                r = r * chunk.weight
            nk += r.sum(1)
            self.gate.log_prob(params.gate, chunk)  # leaves the gate's scratch
            if params.expert is not None:
                self.expert.log_prob(params.expert, chunk)
            es = _add(es, self.expert.chunk_stats(params.expert, chunk, r))
            targets = self._gate_targets(r, chunk.weight)
            gs = _add(gs, self.gate.chunk_stats(params.gate, chunk, targets))
        if data.comm is not None:
            es, gs, nk = data.reduce((es, gs, nk))
        gs = _scale(gs, 1.0 + self.gate_balance)
        return PassResult(-math.inf, -math.inf, es, gs, resp, nk)

    def m_step(self, params: Params, res: PassResult, data: EMData) -> Params:
        """Each family's M-step, but for frozen parts, which keep their parameters.

        Holding some blocks fixed while the others take their maximising step is
        still a (generalised) EM step, so the objective keeps increasing.
        """
        resp = res.resp
        if resp is not None and data.weight is not None:
            resp = resp * data.weight  # what each row gives each expert: w_i r_ik
        expert = self.expert.m_step(params.expert, res.expert_stats, data, resp)
        if self.frozen_experts and params.expert is not None:
            expert = keep_experts(params.expert, expert, self.frozen_experts)
        if self.gate_frozen and params.gate is not None:
            return Params(expert, params.gate)
        return Params(expert, self.gate.m_step(params.gate, res.gate_stats, data, resp))

    def init_from_resp(self, data: EMData, resp: torch.Tensor) -> Params:
        """The first M-step, from initial responsibilities (K, n)."""
        init = getattr(self.expert, "init_params", None)
        start = Params(None if init is None else init(data), self.gate.init_params(data))
        return self.m_step(start, self.stats_from_resp(start, data, resp), data)

    def interpolate(self, old: Params, new: Params, t: float) -> Params:
        """Shorten the step of the non-monotone components to a fraction t."""
        e = new.expert if self.expert.monotone else lerp_params(old.expert, new.expert, t)
        g = new.gate if self._gate_monotone else lerp_params(old.gate, new.gate, t)
        return Params(e, g)

    @property
    def _gate_monotone(self) -> bool:
        # a bound-based (MM) gate step is built for unit row weights: with the balance
        # penalty's weights 1 + lambda it may overshoot, so the loop checks it
        return self.gate.monotone and not self.gate_balance

    @property
    def can_accelerate(self) -> bool:
        """Whether both families offer free tensors, which SQUAREM extrapolates in."""
        return all(
            hasattr(f, "to_free") and hasattr(f, "from_free") for f in (self.expert, self.gate)
        )

    def step(self, params: Params, cur: PassResult, data: EMData) -> tuple[Params, PassResult]:
        """One EM iteration from ``params`` (whose E-step is ``cur``), safeguarded."""
        return lockstep.drive(self, data, [lockstep.step(self, params, cur)])[0]

    def _safeguard(self, old, cur, new_params, new, data):
        """Halve a step that lowered the objective (:func:`moekit.fitting.lockstep.safeguard`)."""
        return lockstep.drive(self, data, [lockstep.safeguard(self, old, cur, new_params, new)])[0]

    def iterate(
        self,
        params: Params,
        data: EMData,
        max_iter: int,
        tol: float,
        progress: Progress | None = None,
        current: PassResult | None = None,
        accelerate: bool | None = None,
        stop: Callable[[list[float]], bool] | None = None,
    ) -> tuple[Params, PassResult, list[float], bool]:
        """Run up to ``max_iter`` EM iterations from ``params``.

        Where the families allow it (``accelerate=None``) and EM creeps (the last
        two changes of the objective shrink by a factor above
        :data:`~moekit.fitting.lockstep.SLOW_RATE`, EM's linear rate), iterations go
        in SQUAREM cycles: two EM steps, an extrapolation along them and one more EM
        step, kept only if it ends above the two plain steps, so the objective still
        never decreases. While EM converges fast, plain steps are cheaper: a cycle
        costs one extra E-step. Each EM step counts as one iteration. A step that
        is not guaranteed to raise the objective (a Newton step) is halved until
        it does not lower it.

        ``stop(history)``, asked after every iteration (or cycle), ends the run
        early, not converged, when it answers True.

        Returns the parameters, the pass at them (the final E-step), the objective
        history (starting with the objective at the given parameters, then one entry
        per EM step) and whether the change of one EM step fell below ``tol``. The
        run is :func:`moekit.fitting.lockstep.iterate`, served one call at a time.
        """
        run = lockstep.iterate(self, params, max_iter, tol, progress, current, accelerate, stop)
        return lockstep.drive(self, data, [run])[0]

    def _flat(self, params: Params) -> torch.Tensor:
        parts = [
            *self.expert.to_free(params.expert).values(),
            *self.gate.to_free(params.gate).values(),
        ]
        return torch.cat([t.reshape(-1) for t in parts])

    def _unflat(self, flat: torch.Tensor, like: Params) -> Params:
        out, i = [], 0
        for family, params in ((self.expert, like.expert), (self.gate, like.gate)):
            free = {}
            for name, t in family.to_free(params).items():
                free[name] = flat[i : i + t.numel()].reshape(t.shape)
                i += t.numel()
            out.append(family.from_free(free))
        return Params(*out)
