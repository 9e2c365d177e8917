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

Restarts follow flexmix's short-run strategy, with starts of several kinds
(:mod:`moekit.fitting.starts`): each of ``n_init`` starts runs at most
``init_max_iter`` iterations on a random subset of at most ``init_sample_size``
rows (:mod:`moekit.fitting.rows`: taken in an order fixed by the rows' values, with
integer weights written out as repeated rows, so that a weighted fit starts as the
fit of the repeated rows does); the few best distinct ones then run to convergence
on that subset, and the best of those continues on all the data. Starts from a
fitted simpler model (say, the same model with one expert fewer) run to convergence
on all the data and compete too, so that a richer model never ends below the one it contains.

Starts in lockstep. The starts are made first, in order, and then their short runs
advance together (:mod:`moekit.fitting.lockstep`): each round serves every run's
E-pass (then M-step) in one batched call where the families offer one
(:mod:`moekit.fitting.batched`: S starts cost about the per-operation overhead of
one on small data), one call per run otherwise. Each run takes the decisions it
would take alone, and on one thread (small passes, see
:func:`moekit._core.engine.em_threads`) its numbers are bitwise the same whichever
runs share its batch. The finals, and the runs on all rows, go in lockstep too. A
short run ends early as behind only against runs that have already ended.

Data-parallel EM. When the data are one process's shard of rows (``data.comm``, see
:mod:`moekit._core.distributed`), each E-step runs on the local rows and its sums
are all-reduced (:meth:`EMModel.e_pass`), so every process takes the same M-step.
The starts are decided as one process would: every process draws the same subset's
global row indices with the same generator, the rows are gathered onto every
process (all of them when n <= ``init_sample_size``: the starts' exchange is
O(init_sample_size) rows, once per fit), every process runs the same starts on them,
and process 0's winner is broadcast before the run on all rows. The fit then equals
one process's fit on the shards laid end to end in rank order, up to rounding.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from sklearn.exceptions import ConvergenceWarning

from moekit._core.data import EMData
from moekit._core.engine import em_threads
from moekit.fitting import batched, lockstep
from moekit.fitting.model import EMModel, FitResult, Params, PassResult
from moekit.fitting.progress import Progress
from moekit.fitting.rows import start_rows, start_rows_distributed
from moekit.fitting.starts import StartMaker, family_key, strategy_sequence

__all__ = ["EMModel", "FitResult", "Params", "PassResult", "run_em"]

FINAL_STARTS = 3
"""How many of the best short runs continue to convergence."""

NESTED_SHARE = 1 / 3
"""The short runs of a fit of a simpler model (a nested fit, see
:mod:`moekit.fitting.starts`) take this share of ``init_max_iter``: the nested fit
is a starting point, not an answer, and a few iterations find the basin its
starts are in; this model's own short and final runs take it the rest of the
way. (On the 12 real-data fits of ``bench/real_data.py`` and on iris, wine and
breast cancer, nested runs of 5, 10 and 30 iterations end at the same
log-likelihoods, and 10 takes about 2/3 of the time of 30.)"""

BEHIND_FACTOR = 2.0
"""Safety factor on the linear bound of a short run's remaining gain (see _behind)."""


def _cutoff(values: list[float], gap: float) -> float | None:
    """The objective a short run must beat to be among the runs continued.

    The runs continued are the ``FINAL_STARTS`` best whose objectives lie at least
    ``gap`` apart, picked greedily from the top. Greedy picking is the largest such
    packing of points on a line, and a packing only grows with more points, so once
    ``FINAL_STARTS`` runs ending at or above this value are picked, a run ending
    below it is never continued, whatever the later runs do.
    """
    picked: list[float] = []
    for v in sorted(values, reverse=True):
        if all(abs(v - w) >= gap for w in picked):
            picked.append(v)
            if len(picked) == FINAL_STARTS:
                return v
    return None


def _behind(cutoff: float | None, max_iter: int):
    """Whether a short run is clearly behind: it cannot end above ``cutoff``.

    While the objective's increments shrink, a run of ``max_iter`` iterations
    gains at most its last increment times the iterations left; the check asks
    for ``BEHIND_FACTOR`` times that (SQUAREM's extrapolations can gain more
    than one step's increment) and ends the run only when even that stays below
    the cutoff. Where increments grow (EM leaving a saddle), the run goes on.
    """
    if cutoff is None:
        return None

    def stop(history: list[float]) -> bool:
        if len(history) < 4:
            return False
        d = [b - a for a, b in zip(history[-4:-1], history[-3:], strict=True)]
        if not d[2] <= d[1] <= d[0]:
            return False
        left = max_iter - (len(history) - 1)
        return history[-1] + BEHIND_FACTOR * max(d[0], 0.0) * left < cutoff

    return stop


@dataclass
class _Run:
    label: str
    params: Params
    current: PassResult | None  # None: no pass yet (a run on other rows starts with one)
    history: list[float]
    converged: bool


def _distinct(values: list[float], gap: float) -> int:
    """How many groups ``values`` form when values closer than ``gap`` are merged."""
    groups, last = 0, None
    for v in sorted(values):
        if last is None or v - last > gap:
            groups += 1
        last = v
    return groups


def run_em(
    model: EMModel,
    data: EMData,
    *,
    init: str = "auto",
    n_init: int,
    max_iter: int,
    tol: float,
    init_max_iter: int,
    init_sample_size: int | None,
    generator: torch.Generator,
    warm_params: Params | None = None,
    extra_starts: tuple[Params, ...] = (),
    verbose: int = 0,
    verbose_interval: int = 10,
    loglik_offset: float = 0.0,
    warn: bool = True,
    _nested_fits: dict | None = None,
) -> FitResult:
    """Fit a mixture of experts by EM with restarts.

    Parameters
    ----------
    model : EMModel
    data : EMData
    init : str, default='auto'
        Strategy of the starts (see :data:`moekit.fitting.starts.STRATEGIES`).
    n_init : int
        Number of starts.
    max_iter : int
        Most EM iterations on all the data; 0 only initialises.
    tol : float
        Stop when the mean objective changes by less than this.
    init_max_iter : int
        Most iterations of each start before the best ones are chosen.
    init_sample_size : int or None
        Starts run on a random subset of this many rows (all rows if None or n is
        smaller).
    generator : torch.Generator
    warm_params : Params or None
        Continue from these parameters (warm start): no restarts.
    extra_starts : tuple of Params
        Starting parameters on all the data from a fitted simpler model; each runs to
        convergence on all the data and competes with the best of the starts.
    verbose, verbose_interval : int
        Progress reporting (see :class:`moekit.fitting.progress.Progress`).
    loglik_offset : float, default=0.0
        Added to the log-likelihoods shown (the log-Jacobian of a standardised
        target, so that they read in the target's units).
    warn : bool, default=True
        Whether to warn when the returned fit did not converge.
    _nested_fits : dict or None
        Fits of simpler models already made on these rows, shared by the nested
        fits of one fit (internal).

    Returns
    -------
    FitResult
        ``n_optima`` is the number of distinct optima the starts run to convergence
        reached (0 for a warm start).
    """
    model.prepare(data)
    progress = Progress(verbose, verbose_interval, loglik_offset)
    t0 = time.perf_counter()
    if warm_params is not None:
        best = _continue(model, data, [_Run("warm start", warm_params, None, [], False)],
                         max_iter, tol, progress)[0]  # fmt: skip
        return _result(best, max_iter, tol, 0, progress, t0, warn)

    # the rows of the starts: in a fixed order, integer weights written out as rows
    pick = start_rows if data.comm is None else start_rows_distributed
    sub, whole = pick(data, init_sample_size, generator)
    use_subset = not whole
    model.prepare(sub)

    nested_fits = {} if _nested_fits is None else _nested_fits
    if (
        model.n_experts == 1
        and getattr(model.expert, "single_optimum", False)
        and (_nested_fits is None)
    ):
        # one expert alone is a GLM (or least squares): every start reaches its one
        # maximum, so the others would repeat the first. (A nested fit of one expert
        # inside a larger fit keeps its starts: it stops after short runs, where the
        # best of several is a better starting point.)
        n_init = 1

    def fit_nested(small: EMModel, d: EMData, n: int) -> Params:
        # a starting point, not an answer: its starts get their short runs only (the
        # best of them is the start), and this model's own short run and final run
        # take it the rest of the way.
        # Different routes reach the same simpler model (K = 3 softmax contains K = 2
        # constant through K = 2 softmax and through K = 3 constant): it is fitted once
        key = (family_key(small.expert), family_key(small.gate), n, id(d))
        if key not in nested_fits:
            budget = max(min(max_iter, round(NESTED_SHARE * init_max_iter)), 1)
            # the entry holds d itself: while it is cached, no other rows' data can be
            # allocated at its address and take its id (and so its fit)
            nested_fits[key] = d, run_em(
                small, d, init="auto", n_init=n, max_iter=budget, tol=tol,
                init_max_iter=init_max_iter, init_sample_size=None, generator=generator,
                warn=False, _nested_fits=nested_fits).params  # fmt: skip
        model.prepare(d)  # the nested fit may have prepared shared families on other widths
        return nested_fits[key][1]

    # 1-2 run on the subset: on one thread when it is small, whatever the full data
    with em_threads(sub):
        # 1. short runs of every start, in lockstep (the starts made first, in order,
        # so that they draw from the generator as they would one by one)
        maker = StartMaker(model, sub, generator, fit_nested, n_init, shared=nested_fits)
        first_iter = min(init_max_iter, max_iter)
        short_gap = max(1e-4, 10 * tol)
        made = [maker.make(strategy) for strategy in strategy_sequence(init, n_init)]
        ended: list[float] = []  # the objectives of the short runs that have ended

        def stop(history: list[float]) -> bool:
            # a run that cannot reach the runs continued stops early: it would not be
            # continued anyway (see _cutoff; only runs that have ended count), so the
            # fit is the same, for fewer steps
            rule = _behind(_cutoff(ended, short_gap), first_iter)
            return rule is not None and rule(history)

        short = [lockstep.iterate(model, p, first_iter, tol, stop=stop) for _, p in made]
        outs = lockstep.drive(model, sub, short, serve_many=_server(model, sub),
                              on_end=lambda i, out: ended.append(out[1].objective))  # fmt: skip
        runs: list[_Run] = []
        stopped: set[int] = set()
        for s, ((label, _), (p, cur, hist, conv)) in enumerate(zip(made, outs, strict=True)):
            progress.start_init(s, n_init, first_iter, on_subset=use_subset)
            _replay(progress, hist)
            behind = not conv and len(hist) - 1 < first_iter
            if behind:
                stopped.add(s)
            runs.append(_Run(label, p, cur, hist, conv))
            progress.end_init(
                s, cur.objective, conv, label + "; behind the best, ended early" * behind
            )
        n_short = _distinct([r.current.objective for i, r in enumerate(runs) if i not in stopped],
                            short_gap)  # fmt: skip

        # 2. the few best distinct ones to convergence on the subset
        finals: list[_Run] = []
        for run in sorted(runs, key=lambda r: -r.current.objective):
            if len(finals) == FINAL_STARTS:
                break
            if any(abs(run.current.objective - f.current.objective) < short_gap for f in finals):
                continue  # the same basin as a run already chosen
            finals.append(run)
        finals = _continue(model, sub, finals, max_iter, tol, progress, "best starts")
        optima = [f.current.objective for f in finals]
        best = max(finals, key=lambda r: r.current.objective)
    if data.comm is not None:
        # the starts ran alike on every process; process 0's winner makes sure that
        # last-bit differences between machines cannot leave two models
        best.params = data.comm.broadcast(best.params)

    # 3. on all the data, in lockstep: the best, and the starts from a fitted simpler model
    model.prepare(data)
    starts = [(best.label, best.params, "all rows")] if use_subset else []
    starts += [(f"carried over {i + 1}", p, "nested start") for i, p in enumerate(extra_starts)]
    begun = [_Run(label, p, None, [], False) for label, p, _ in starts]
    ended_runs = _continue(model, data, begun, max_iter, tol, progress, [s[2] for s in starts])
    if use_subset:
        best = ended_runs.pop(0)
    for run in ended_runs:
        optima.append(run.current.objective)
        if run.current.objective > best.current.objective:
            best = run
    n_optima = _distinct(optima, max(1e-6, 10 * tol))
    progress.summary(len(runs), n_short, len(optima), n_optima, best.label)
    return _result(best, max_iter, tol, n_optima, progress, t0, warn)


def _server(model: EMModel, data: EMData):
    """The batched server of lockstep runs where the families allow it, else None."""
    return batched.serve if batched.can_batch(model, data) else None


def _replay(progress: Progress, history: list[float], done: int = 0) -> None:
    """Report a run's iterations once it has ended (runs in lockstep end together)."""
    for it in range(1, len(history)):
        progress.iteration(done + it, history[it], history[it] - history[it - 1])


def _continue(model, data, runs: list[_Run], max_iter, tol, progress, phase="final") -> list[_Run]:
    """Run each of ``runs`` on ``data`` until convergence or ``max_iter`` iterations in all.

    The runs go in lockstep. A run without a pass (``current`` None) starts with one,
    and its history with the objective there. ``phase`` names the runs' phase, or
    each run's.
    """
    phases = phase if isinstance(phase, list) else [phase] * len(runs)
    going, gens = [], []
    for i, run in enumerate(runs):
        done = max(len(run.history) - 1, 0)
        if run.current is not None and (max_iter - done <= 0 or (run.converged and done > 0)):
            continue
        going.append(i)
        gens.append(lockstep.iterate(model, run.params, max_iter - done, tol, None, run.current))
    outs = lockstep.drive(model, data, gens, serve_many=_server(model, data))
    ended = list(runs)
    for i, (params, cur, hist, conv) in zip(going, outs, strict=True):
        run = runs[i]
        done = max(len(run.history) - 1, 0)
        progress.start_final(max_iter - done, phases[i])
        _replay(progress, hist, done)
        ended[i] = _Run(run.label, params, cur, (run.history or hist[:1]) + hist[1:], conv)
    return ended


def _result(run: _Run, max_iter, tol, n_optima, progress, t0, warn) -> FitResult:
    history, converged = run.history, run.converged
    n_iter = len(history) - 1
    progress.close(n_iter, run.current.objective, converged, time.perf_counter() - t0)
    if warn and not converged and max_iter > 0:
        change = history[-1] - history[-2] if len(history) > 1 else float("nan")
        warnings.warn(
            f"EM did not converge in max_iter={max_iter} iterations (last change of the mean "
            f"log-likelihood {change:.3g} > tol={tol:g}). Try increasing max_iter or tol, "
            "more starts (n_init), fewer experts, or check the data for degenerate features.",
            ConvergenceWarning,
            stacklevel=4,
        )
    return FitResult(
        params=run.params,
        n_iter=n_iter,
        converged=converged,
        objective=run.current.objective,
        loglik=run.current.loglik,
        history=history,
        nk=run.current.nk,
        n_optima=n_optima,
        start=run.label,
    )
