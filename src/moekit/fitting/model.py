"""What one EM fit is made of: parameters, a pass over the data, and the iteration.

:class:`EMModel` pairs an expert family with a gate; its :meth:`EMModel.e_pass` is the
E-step (one streamed pass that also sums the M-step's statistics) and
:meth:`EMModel.iterate` the E/M alternation with its safeguard. The restarts and the
choice among them live in :mod:`moekit.fitting.em`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from moekit._core.data import DEFAULT_CHUNK, EMData, lerp_params
from moekit.fitting.progress import Progress

MAX_HALVINGS = 8


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


def _add(acc, new):
    if acc is None:
        return new
    if isinstance(new, tuple):
        return tuple(_add(a, b) for a, b in zip(acc, new, strict=True))
    if new is None:
        return None
    return acc + new


class EMModel:
    """An expert family and a gate, with the pass and step they share."""

    def __init__(self, expert, gate, chunk_size: int = DEFAULT_CHUNK) -> None:
        self.expert = expert
        self.gate = gate
        self.chunk_size = chunk_size

    @property
    def n_experts(self) -> int:
        return self.expert.n_experts

    def resized(self, n_experts: int) -> EMModel:
        """The same families with another number of experts (for nested starts).

        Families keep ``n_experts`` as their only setting that depends on K and build
        anything else that does in ``prepare``, so a shallow copy is enough.
        """
        expert, gate = copy.copy(self.expert), copy.copy(self.gate)
        expert.n_experts = gate.n_experts = n_experts
        return EMModel(expert, gate, self.chunk_size)

    @property
    def needs_resp(self) -> bool:
        return self.expert.needs_resp or self.gate.needs_resp

    def prepare(self, data: EMData) -> None:
        self.expert.prepare(data)
        self.gate.prepare(data)

    def e_pass(
        self, params: Params, data: EMData, *, stats: bool = True, keep_resp: bool = False
    ) -> PassResult:
        """One streamed pass: log-likelihood, responsibilities and statistics at ``params``."""
        keep = keep_resp or (stats and self.needs_resp)
        K = self.expert.n_experts
        resp_all = data.XeT.new_empty((K, data.n)) if keep else None
        total = data.XeT.new_zeros(())
        nk = data.XeT.new_zeros(K)
        es = gs = None
        for chunk in data.chunks(self.chunk_size):
            joint = self.expert.log_prob(params.expert, chunk)  # (K, c)
            joint.add_(self.gate.log_prob(params.gate, chunk))
            top = joint.amax(0, keepdim=True)
            resp = joint.sub_(top).exp_()  # unnormalised, in place
            s = resp.sum(0, keepdim=True)
            resp.div_(s)
            total += (torch.log(s) + top).sum()
            nk += resp.sum(1)
            if keep:
                resp_all[:, chunk.start : chunk.stop] = resp
            if stats:
                es = _add(es, self.expert.chunk_stats(params.expert, chunk, resp))
                gs = _add(gs, self.gate.chunk_stats(params.gate, chunk, resp))
        loglik = float(total) / data.n
        prior = self.expert.log_prior(params.expert) + self.gate.log_prior(params.gate)
        return PassResult(loglik + prior / data.n, loglik, es, gs, resp_all, nk)

    def stats_from_resp(self, params: Params, data: EMData, resp: torch.Tensor) -> PassResult:
        """Statistics for given responsibilities (K, n), as for the first M-step."""
        es = gs = None
        for chunk in data.chunks(self.chunk_size):
            r = resp[:, chunk.start : chunk.stop]
            self.gate.log_prob(params.gate, chunk)  # leaves the gate's scratch
            if params.expert is not None:
                self.expert.log_prob(params.expert, chunk)
            es = _add(es, self.expert.chunk_stats(params.expert, chunk, r))
            gs = _add(gs, self.gate.chunk_stats(params.gate, chunk, r))
        return PassResult(-math.inf, -math.inf, es, gs, resp, resp.sum(1))

    def m_step(self, params: Params, res: PassResult, data: EMData) -> Params:
        return Params(
            self.expert.m_step(params.expert, res.expert_stats, data, res.resp),
            self.gate.m_step(params.gate, res.gate_stats, data, res.resp),
        )

    def init_from_resp(self, data: EMData, resp: torch.Tensor) -> Params:
        """The first M-step, from initial responsibilities (K, n)."""
        init = getattr(self.expert, "init_params", None)
        start = Params(None if init is None else init(data), self.gate.init_params(data))
        return self.m_step(start, self.stats_from_resp(start, data, resp), data)

    def interpolate(self, old: Params, new: Params, t: float) -> Params:
        """Shorten the step of the non-monotone components to a fraction t."""
        e = new.expert if self.expert.monotone else lerp_params(old.expert, new.expert, t)
        g = new.gate if self.gate.monotone else lerp_params(old.gate, new.gate, t)
        return Params(e, g)

    def iterate(
        self,
        params: Params,
        data: EMData,
        max_iter: int,
        tol: float,
        progress: Progress | None = None,
        current: PassResult | None = None,
    ) -> tuple[Params, PassResult, list[float], bool]:
        """Run up to ``max_iter`` EM iterations from ``params``.

        Returns the parameters, the pass at them (the final E-step), the objective
        history (starting with the objective at the given parameters) and whether
        the change fell below ``tol``.
        """
        cur = current if current is not None else self.e_pass(params, data)
        history = [cur.objective]
        converged = False
        monotone = self.expert.monotone and self.gate.monotone
        for it in range(1, max_iter + 1):
            new_params = self.m_step(params, cur, data)
            new = self.e_pass(new_params, data)
            if not monotone:
                new_params, new = self._safeguard(params, cur, new_params, new, data)
            change = new.objective - cur.objective
            params, cur = new_params, new
            history.append(cur.objective)
            if progress is not None:
                progress.iteration(it, cur.objective, change)
            if abs(change) < tol:
                converged = True
                break
        return params, cur, history, converged

    def _safeguard(self, old, cur, new_params, new, data):
        slack = 1e-12 * (1.0 + abs(cur.objective))
        t = 1.0
        for _ in range(MAX_HALVINGS):
            if new.objective >= cur.objective - slack:
                return new_params, new
            t *= 0.5
            cand = self.interpolate(old, new_params, t)
            new, new_params = self.e_pass(cand, data), cand
        if new.objective < cur.objective - slack:
            # keep only the guaranteed part of the step (t = 0)
            new_params = self.interpolate(old, new_params, 0.0)
            new = self.e_pass(new_params, data)
        return new_params, new
