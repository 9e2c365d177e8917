"""EM runs written as request generators, and their lockstep driver.

The control flow of one EM run (plain steps, the safeguard's halvings, SQUAREM
cycles, convergence and an early stop) is written once, as a generator that yields
requests and receives their results:

- ``(E_PASS, params)``: the E-step pass at ``params``, answered with a
  :class:`~moekit.fitting.model.PassResult`;
- ``(M_STEP, params, result)``: the M-step of ``params`` with the statistics of
  ``result``, answered with the new :class:`~moekit.fitting.model.Params`.

:func:`drive` advances many runs in rounds: each round it gathers the requests of
every run still going and serves each kind with one batched call where the families
offer one (:mod:`moekit.fitting.batched`), with one call per run otherwise. A run
therefore takes exactly the decisions it would take alone; only the arithmetic is
shared, so S short runs on small data cost about the per-operation overhead of one.
A batched call that raises (a singular system at a far SQUAREM point) is served
again run by run, and the error goes to the run it belongs to, where the loop
handles it as it would alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from typing import Any

from moekit._core.data import EMData
from moekit.fitting.progress import Progress

E_PASS = "e"
M_STEP = "m"

MAX_HALVINGS = 8
"""Most halvings of a step that lowered the objective before only its guaranteed part is kept."""

#: EM's observed linear rate (ratio of successive changes of the objective) above
#: which iterations are accelerated: at 0.5 plain EM gains a digit in ~3 steps.
SLOW_RATE = 0.5

Run = Generator[tuple, Any, Any]


def _slow(history: list[float], rate: float) -> bool:
    """Whether the last two changes of ``history`` shrink slower than ``rate``."""
    if len(history) < 3:
        return False
    d1, d2 = history[-2] - history[-3], history[-1] - history[-2]
    return d1 > 0 and d2 > rate * d1


def step(model, params, cur) -> Run:
    """One EM iteration from ``params`` (whose E-step is ``cur``), safeguarded.

    Returns the new parameters and their pass.
    """
    new_params = yield (M_STEP, params, cur)
    new = yield (E_PASS, new_params)
    if not (model.expert.monotone and model._gate_monotone):
        new_params, new = yield from safeguard(model, params, cur, new_params, new)
    return new_params, new


def safeguard(model, old, cur, new_params, new) -> Run:
    """Halve a step that lowered the objective (generalised EM); at worst keep its
    guaranteed part (t = 0: the monotone components' steps alone)."""
    slack = 1e-12 * (1.0 + abs(cur.objective))
    t = 1.0
    for _ in range(MAX_HALVINGS):
        if new.objective >= cur.objective - slack:
            return new_params, new
        t *= 0.5
        cand = model.interpolate(old, new_params, t)
        new, new_params = (yield (E_PASS, cand)), cand
    if new.objective < cur.objective - slack:
        new_params = model.interpolate(old, new_params, 0.0)
        new = yield (E_PASS, new_params)
    return new_params, new


def _squarem(model, p0, c0, tol: float) -> Run:
    """One SQUAREM cycle (Varadhan and Roland 2008, scheme S3) in the free parameters.

    With r = theta_1 - theta_0 and v = theta_2 - 2 theta_1 + theta_0 from two EM
    steps, the extrapolation theta_0 - 2 a r + a^2 v with a = -|r| / |v| jumps
    along the path EM creeps on; one EM step from there stabilises it. It is kept
    only if its objective is at least the second EM step's, with a shortened
    towards a = -1 (the plain steps) otherwise. Free tensors keep every
    extrapolated point a valid model (variances positive, weights normalised).
    """
    p1, c1 = yield from step(model, p0, c0)
    if abs(c1.objective - c0.objective) < tol:
        return p1, c1, [c1.objective], True
    p2, c2 = yield from step(model, p1, c1)
    if abs(c2.objective - c1.objective) < tol:
        return p2, c2, [c1.objective, c2.objective], True
    f0, f1, f2 = (model._flat(p) for p in (p0, p1, p2))
    r, v = f1 - f0, f2 - 2.0 * f1 + f0
    rn, vn = float(r.norm()), float(v.norm())
    alpha = -rn / vn if vn > 0 else -1.0
    for _ in range(3):
        if alpha > -1.0 + 1e-3:
            break
        try:
            px = model._unflat(f0 - 2.0 * alpha * r + alpha**2 * v, p0)
            cx = yield (E_PASS, px)
            if math.isfinite(cx.objective):
                p3, c3 = yield from step(model, px, cx)
                if math.isfinite(c3.objective) and c3.objective >= c2.objective:
                    done = abs(c3.objective - cx.objective) < tol
                    return p3, c3, [c1.objective, c2.objective, c3.objective], done
        except (RuntimeError, ValueError):  # a singular system at a far point
            pass
        alpha = 0.5 * (alpha - 1.0)
    return p2, c2, [c1.objective, c2.objective], False


def iterate(
    model,
    params,
    max_iter: int,
    tol: float,
    progress: Progress | None = None,
    current=None,
    accelerate: bool | None = None,
    stop: Callable[[list[float]], bool] | None = None,
) -> Run:
    """The run of :meth:`moekit.fitting.model.EMModel.iterate`, as a request generator.

    Returns (params, pass at them, objective history, converged) as that method does.
    """
    cur = current if current is not None else (yield (E_PASS, params))
    history = [cur.objective]
    converged = False
    accelerate = model.can_accelerate if accelerate is None else accelerate
    while len(history) - 1 < max_iter and not converged:
        if accelerate and max_iter - (len(history) - 1) >= 3 and _slow(history, SLOW_RATE):
            params, cur, objectives, converged = yield from _squarem(model, params, cur, tol)
        else:
            prev = cur.objective
            params, cur = yield from step(model, params, cur)
            objectives, converged = [cur.objective], abs(cur.objective - prev) < tol
        for value in objectives:
            if progress is not None:
                progress.iteration(len(history), value, value - history[-1])
            history.append(value)
        if stop is not None and not converged and stop(history):
            break
    return params, cur, history, converged


def _serve_one(model, data: EMData, request: tuple):
    if request[0] == E_PASS:
        return model.e_pass(request[1], data)
    return model.m_step(request[1], request[2], data)


def drive(
    model,
    data: EMData,
    runs: list[Run],
    *,
    serve_many: Callable[[Any, EMData, str, list[tuple]], list] | None = None,
    on_end: Callable[[int, Any], None] | None = None,
) -> list:
    """Advance ``runs`` together until each has returned; their return values, in order.

    Each round serves the E-passes asked for, then the M-steps, each kind in one
    call ``serve_many(model, data, kind, requests)`` when given (see
    :func:`moekit.fitting.batched.serve`), else run by run. ``on_end(i, value)``
    is called as soon as run i returns, before the next round.
    """
    results: list = [None] * len(runs)
    waiting: dict[int, tuple] = {}

    def advance(i: int, value=None, error: BaseException | None = None) -> None:
        try:
            request = runs[i].send(value) if error is None else runs[i].throw(error)
        except StopIteration as end:
            results[i] = end.value
            waiting.pop(i, None)
            if on_end is not None:
                on_end(i, end.value)
            return
        waiting[i] = request

    for i in range(len(runs)):
        advance(i)
    while waiting:
        for kind in (E_PASS, M_STEP):
            ids = [i for i in sorted(waiting) if waiting[i][0] == kind]
            if not ids:
                continue
            requests = [waiting[i] for i in ids]
            answers = None
            if serve_many is not None:
                try:
                    answers = serve_many(model, data, kind, requests)
                except (RuntimeError, ValueError):
                    answers = None  # served again run by run: the error finds its run
            for j, i in enumerate(ids):
                if answers is not None:
                    advance(i, answers[j])
                    continue
                try:
                    # alone, but the same arithmetic as in a batch (a batch of one)
                    alone = requests[j : j + 1]
                    answer = (_serve_one(model, data, alone[0]) if serve_many is None
                              else serve_many(model, data, kind, alone)[0])  # fmt: skip
                except (RuntimeError, ValueError) as exc:
                    advance(i, error=exc)
                else:
                    advance(i, answer)
    return results
