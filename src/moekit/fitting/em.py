"""The one EM loop of moekit, shaped like scikit-learn's mixture loop.

Every statistical estimator fits through :func:`run_em`; estimators differ only in
the expert family and the gate they hand it. One iteration is

1. **E-step** (one streamed pass over the data): per chunk, the joint log weights
   log g_k(x_i) + log p_k(y_i | x_i), their log-sum-exp (the row's log-likelihood)
   and the responsibilities r_ik = p(z = k | x_i, y_i); the experts' and the gate's
   sufficient statistics are summed in the same pass.
2. **M-step**: each component updates its parameters from its statistics.

The objective tracked is the mean per-sample log-likelihood plus the components'
log-priors divided by n (small ridge penalties that keep the gate finite). It never
decreases: exact or minorise-maximise M-steps guarantee it, and after a step that
is not guaranteed (a Newton step) the loop checks the objective and halves the step
until it does not decrease (generalised EM, Dempster, Laird and Rubin 1977).

Restarts follow flexmix's short-run strategy: each of ``n_init`` starts runs at
most ``init_max_iter`` iterations on a random subset of at most
``init_sample_size`` rows, and only the best start continues to convergence on all
the data.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from sklearn.exceptions import ConvergenceWarning

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
    """

    params: Params
    n_iter: int
    converged: bool
    objective: float
    loglik: float
    history: list[float] = field(default_factory=list)
    nk: torch.Tensor | None = None


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


def run_em(
    model: EMModel,
    data: EMData,
    *,
    init_resp: Callable[[EMData, torch.Generator], torch.Tensor],
    n_init: int,
    max_iter: int,
    tol: float,
    init_max_iter: int,
    init_sample_size: int | None,
    generator: torch.Generator,
    warm_params: Params | None = None,
    verbose: int = 0,
    verbose_interval: int = 10,
) -> FitResult:
    """Fit a mixture of experts by EM with restarts.

    Parameters
    ----------
    model : EMModel
    data : EMData
    init_resp : callable
        ``init_resp(data, generator) -> Tensor (K, n)``: starting responsibilities.
    n_init : int
        Number of starts.
    max_iter : int
        Most EM iterations on all the data; 0 only initialises.
    tol : float
        Stop when the mean objective changes by less than this.
    init_max_iter : int
        Most iterations of each start before the best one is chosen.
    init_sample_size : int or None
        Starts run on a random subset of this many rows (all rows if None or n is
        smaller).
    generator : torch.Generator
    warm_params : Params or None
        Continue from these parameters (warm start): no restarts.
    verbose, verbose_interval : int
        Progress reporting (see :class:`moekit.fitting.progress.Progress`).

    Returns
    -------
    FitResult
    """
    model.prepare(data)
    progress = Progress(verbose, verbose_interval)
    t0 = time.perf_counter()
    if warm_params is not None:
        params, done_iter, history, converged, current = warm_params, 0, [], False, None
    else:
        use_subset = init_sample_size is not None and data.n > init_sample_size
        sub = data
        if use_subset:
            rows = torch.randperm(data.n, generator=generator, device="cpu")[:init_sample_size]
            sub = data.subset(rows.to(data.XeT.device))
            model.prepare(sub)
        first_iter = min(init_max_iter, max_iter)
        best = None
        for s in range(n_init):
            progress.start_init(s, n_init, first_iter, on_subset=use_subset)
            p = model.init_from_resp(sub, init_resp(sub, generator))
            p, res, hist, conv = model.iterate(p, sub, first_iter, tol, progress)
            progress.end_init(s, res.objective, conv)
            if best is None or res.objective > best[1].objective:
                best = (p, res, hist, conv)
        params, res, hist, converged = best
        if use_subset:
            model.prepare(data)
            done_iter, history, current = 0, [], None
        else:
            done_iter, history, current = len(hist) - 1, hist, res
    remaining = max_iter - done_iter
    if remaining > 0 and not (converged and done_iter > 0):
        progress.start_final(remaining)
        params, current, hist, converged = model.iterate(
            params, data, remaining, tol, progress, current
        )
        history = history + hist[1:] if history else hist
        done_iter += len(hist) - 1
    if current is None:
        current = model.e_pass(params, data)
        history = history or [current.objective]
    # ``current`` is the E-step at the returned parameters: no further pass is needed
    progress.close(done_iter, current.objective, converged, time.perf_counter() - t0)
    if not converged and max_iter > 0:
        change = history[-1] - history[-2] if len(history) > 1 else float("nan")
        warnings.warn(
            f"EM did not converge in max_iter={max_iter} iterations (last change of the mean "
            f"log-likelihood {change:.3g} > tol={tol:g}). Try increasing max_iter or tol, "
            "more starts (n_init), fewer experts, or check the data for degenerate features.",
            ConvergenceWarning,
            stacklevel=3,
        )
    return FitResult(
        params=params,
        n_iter=done_iter,
        converged=converged,
        objective=current.objective,
        loglik=current.loglik,
        history=history,
        nk=current.nk,
    )
