"""Censored and truncated responses for GLM experts without a latent normal:
Poisson and negative binomial counts, binomial successes, Gamma and Weibull amounts.

Each row i is known to lie in [l_i, u_i] (l_i = u_i: observed exactly; u_i = inf:
right-censored; l_i = 0 or -inf: left-censored) and, with truncation, is observed only
inside a window [t_i, v_i]. Expert k's log-likelihood of the row is

.. math::  \\log p_k = \\begin{cases}
               \\log f_k(y_i \\mid x_i) & l_i = u_i \\\\
               \\log \\Pr_k(l_i \\le Y \\le u_i \\mid x_i) & l_i < u_i
           \\end{cases} \\; - \\log \\Pr_k(t_i \\le Y \\le v_i \\mid x_i),

the interval probabilities from regularised incomplete gamma functions in log space
(:mod:`moekit._core.incgamma`; the negative binomial's from regularised incomplete
beta functions, :mod:`moekit._core.incbeta`, as are the binomial's; the Weibull's in
closed form, log(S(l) - S(u)) with log S = -(y / lambda)^a), finite far into either
tail. For counts both ends count: [3, inf] is Y >= 3 and a window [1, inf] is zero
truncation. The binomial's target is coded with its point's two columns (s, f) first,
whose sum, the row's trials, its ``interval_terms`` reads (``point=``).

E-step: the responsibilities from these log p_k. M-step (needs every row's
responsibility, so it is not available data-parallel): with d_ik and e_ik the first
and second derivatives of log p_ik in the linear predictor eta_ik,

.. math::  b_k \\leftarrow b_k + t \\Big(\\sum_i r_{ik} \\max(-e_{ik}, \\epsilon) x_i x_i^T
           + \\alpha D\\Big)^{-1} \\Big(\\sum_i r_{ik} d_{ik} x_i - \\alpha D b_k\\Big),

t = 1, 1/2, 1/4, ... until expert k's part of Q, sum_i r_ik log p_ik less its ridge,
does not fall (an expert whose step never passes keeps its coefficients). Gamma
(and Weibull) experts then take a safeguarded Newton step in log a on the same objective, its
derivatives by central differences (torch has no derivative of the incomplete gamma
function in its shape): at most 1 long, uphill where Q is not concave, halved until
Q does not fall; negative binomial experts take the same step in log phi. Each part
never lowers Q, so the log-likelihood never decreases (generalised EM; ``monotone``).
On small data a pass costs its number of tensor operations, so the passes are few:
the full coefficient step and both sides of the shape's differences go in one pass
(the experts stacked three times), and each pass's rows are kept per expert, so the
E-step after the M-step and the next Newton step recall what the M-step's passes
computed (``_Memo``).
The derivatives of a log-probability of an interval come from each family
(``interval_terms``): with m the mass and kernels k_lo, k_hi (the derivative of the
mass in eta is k_lo - k_hi),

.. math::  d = \\rho_{lo} - \\rho_{hi}, \\qquad
           e = \\rho_{lo} c_{lo} - \\rho_{hi} c_{hi} - d^2, \\qquad \\rho = k / m.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch

from moekit._core.data import Chunk, EMData
from moekit.experts._glm import chunk_eta, has_weight, linear_predictor, newton_step
from moekit.experts.censored import delegated

MAX_HALVINGS = 30
"""Most halvings of a coefficient step before an expert keeps its coefficients."""

SHAPE_H = 1e-3
"""Half-width in log a of the central differences of the shape step."""

MIN_CURVATURE = 1e-8
"""Least weight -e_ik of a row in the Newton step's Gram (where log p is not concave)."""

MEMO_PASSES = 64
"""Passes whose rows' (log p, d, e) an EM data set keeps, each expert's found by its
parameters: the next E-step is at parameters the M-step's last passes have seen, and
the Newton step after it at the E-step's (with n_init starts run in turn, their
passes interleave)."""

MEMO_VALUES = 2**20
"""Most values (experts x rows, each of log p, d and e) the kept passes hold: larger
data is not overhead-bound, and the passes' memory would grow with it."""


_DELEGATED = frozenset({
    "params_type", "predictive_family", "standardize_target", "n_outputs", "log_prior",
    "n_parameters", "min_samples", "select", "to_free", "mean_free",
    "log_prior_free", "report", "from_report", "moments", "predictive_extra",
    "param_shapes", "check_params", "residuals", "takes_offset", "alpha",
    "single_optimum",
})  # fmt: skip


def interval_family(family):
    """What gives ``family``'s (a class or an instance) probabilities of intervals:
    the family itself where it has ``interval_terms`` and ``exact_derivatives``
    (Poisson, negative binomial, binomial, Gamma, Weibull), else None."""
    if hasattr(family, "interval_terms") and hasattr(family, "exact_derivatives"):
        return family
    return None


def can_censor_glm(family) -> bool:
    """Whether ``family`` gives the probabilities of intervals (Poisson, negative
    binomial, binomial, Gamma, Weibull)."""
    return interval_family(family) is not None


class CensoredGLMExperts:
    """A GLM family with ``interval_terms`` (:func:`can_censor_glm`), fitted to
    intervals of its response; parameters and predictions are the base family's.

    Parameters
    ----------
    base : PoissonExperts, NegativeBinomialExperts, BinomialExperts, GammaExperts or
        WeibullExperts
    truncated : bool, default=False
        Whether the fit's rows are truncated.
    """

    needs_resp = True  # the step is checked on every row's log p_k
    monotone = True  # every part of the M-step is kept only where it does not lower Q
    censored = True

    def __init__(self, base, truncated: bool = False) -> None:
        self.base = base
        self.intervals = interval_family(base)  # interval_terms, exact_derivatives
        self.n_experts = base.n_experts
        self.truncated = bool(truncated)
        # the coded target's leading rows that are the point: its columns (binomial:
        # successes and failures, whose sum is the rows' trials), then l, u, t, v
        self.point_rows = getattr(base, "target_columns", 1)
        self.report_name = f"{getattr(base, 'report_name', type(base).__name__)}, censored"

    def __getattr__(self, name: str):
        return delegated(self, name, _DELEGATED)

    def resized(self, n_experts: int) -> CensoredGLMExperts:
        """This family with ``n_experts`` experts."""
        base = copy.copy(self.base)
        base.n_experts = n_experts
        return CensoredGLMExperts(base, self.truncated)

    # ------------------------------------------------------------ log p of the rows
    def _terms(self, params, eta, rows, exact_logp, derivatives: bool, differentiable: bool):
        """log p_k of every row (K, c) and, if asked, its derivatives d, e in eta."""
        m = self.point_rows
        point = rows[0] if m == 1 else torch.stack(rows[:m])
        lo, hi, t_lo, t_hi = rows[m:]
        # the probabilities of intervals of the censored rows alone (exact rows have
        # their density); the support starts at 0
        cens = torch.nonzero(lo != hi).flatten()
        logp, d, e = exact_logp, None, None
        if derivatives:
            d, e = self.intervals.exact_derivatives(params, eta, point)
        if cens.numel():
            # a family of several target columns (binomial: s, f) reads its rows' point
            given = {} if m == 1 else {"point": point[:, cens]}
            out = self.intervals.interval_terms(params, eta[:, cens], lo[cens].clamp(min=0.0),
                                                hi[cens], differentiable, **given)  # fmt: skip
            logp = logp.index_copy(1, cens, out[0])
            if derivatives:
                d_int, e_int = _derivatives(out)
                d, e = d.index_copy(1, cens, d_int), e.index_copy(1, cens, e_int)
        if bool(torch.isfinite(t_lo).any() or torch.isfinite(t_hi).any()):
            given = {} if m == 1 else {"point": point}
            window = self.intervals.interval_terms(params, eta, t_lo.clamp(min=0.0), t_hi,
                                                   differentiable, **given)  # fmt: skip
            logp = logp - window[0]
            if derivatives:
                d_w, e_w = _derivatives(window)
                d, e = d - d_w, e - e_w
        return logp, d, e

    def _chunk_terms(self, params, chunk: Chunk, derivatives: bool = False):
        """log p_k, d and e (K, c) of the chunk's rows, with its derivatives always (a
        pass's cost is its incomplete beta or gamma functions, not these): recalled
        per expert from the data's last passes (``MEMO_SIZE``) where they saw the
        expert's parameters."""
        key = ("censored_glm", type(self.base), self.truncated)
        memo = chunk.data.cache.get(key)
        if memo is None:
            memo = chunk.data.cache[key] = _Memo()
        rows = [(chunk.start, chunk.stop, r) for r in _row_keys(self._param_rows(params))]
        kept = memo.recall(rows)
        if kept is not None:
            return kept
        eta = chunk_eta(params.coef, chunk)  # (K, c), with the offset
        exact_logp = self.base.log_prob(params, chunk)  # the density at the point
        out = self._terms(params, eta, tuple(chunk.y), exact_logp, True, False)
        memo.remember(rows, out)
        return out

    def _param_rows(self, params) -> torch.Tensor:
        """Each expert's parameters as one row (K, p [+ 1]): what its log p depends on."""
        field = getattr(self.intervals, "shape_field", None)
        if field is None:
            return params.coef
        return torch.cat([params.coef, getattr(params, field).unsqueeze(1)], 1)

    def _stacked(self, params, field: str, offsets: tuple[float, ...]):
        """The K experts repeated once per offset, the shape of copy j at log shape +
        offsets[j] (the shape itself at offset 0)."""
        K = params.coef.shape[0]
        shape = getattr(params, field)
        log_shape = torch.log(shape)
        shapes = [shape if o == 0.0 else torch.exp(log_shape + o) for o in offsets]
        copies = self.base.select(params, torch.arange(K, device=shape.device).repeat(len(offsets)))
        return dataclasses.replace(copies, **{field: torch.cat(shapes)})

    def _objectives(self, params, field: str, offsets, data: EMData, resp: torch.Tensor):
        """Q (len(offsets), K) at each offset of every expert's log shape, in one pass
        of len(offsets) K experts (a pass of a few hundred rows costs its number of
        tensor operations, hardly its width)."""
        K = params.coef.shape[0]
        stacked = self._stacked(params, field, offsets)
        q = self._objective(stacked, data, resp.repeat(len(offsets), 1))
        return q.view(len(offsets), K)

    # ------------------------------------------------------------ E-step
    def prepare(self, data: EMData) -> None:
        self.base.prepare(data)  # its caches are of the first row, the point

    def init_params(self, data: EMData):
        # the base family's start from the points alone (the other rows hold infinities)
        return self.base.init_params(dataclasses.replace(data, y=data.y[: self.point_rows],
                                                         cache={}))  # fmt: skip

    def log_prob(self, params, chunk: Chunk) -> torch.Tensor:
        return self._chunk_terms(params, chunk)[0].clone()  # the EM loop adds to it in place

    # ------------------------------------------------------------ M-step
    def chunk_stats(self, params, chunk: Chunk, resp: torch.Tensor):
        return None  # the M-step reads every row's responsibility

    def _objective(self, params, data: EMData, resp: torch.Tensor) -> torch.Tensor:
        """Every expert's part of Q less its ridge, sum_i r_ik log p_ik - alpha |b_k|^2 / 2."""
        q = resp.new_zeros(resp.shape[0])
        for chunk in data.chunks():
            r = resp[:, chunk.start : chunk.stop]
            logp = self._chunk_terms(params, chunk)[0]
            q += torch.where(r > 0, r * logp, torch.zeros_like(logp)).sum(1)
        return q - 0.5 * self.base.alpha * (params.coef[:, :-1] ** 2).sum(1)

    def _newton(self, params, data: EMData, resp: torch.Tensor):
        """Q (K,), and the Newton step of the coefficients (K, p)."""
        K, p = params.coef.shape
        grad = params.coef.new_zeros((K, p))
        hess = params.coef.new_zeros((K, p, p))
        q = resp.new_zeros(K)
        for chunk in data.chunks():
            r = resp[:, chunk.start : chunk.stop]
            logp, d, e = self._chunk_terms(params, chunk, derivatives=True)
            used = r > 0
            q += torch.where(used, r * logp, torch.zeros_like(logp)).sum(1)
            d = torch.where(used, d, torch.zeros_like(d))  # rows no expert needs may be -inf
            w = torch.where(used, r * (-e).clamp(min=MIN_CURVATURE), torch.zeros_like(e))
            grad += (r * d) @ chunk.XeT.T
            hess += (w.unsqueeze(1) * chunk.XeT) @ chunk.XeT.T  # X^T diag(w_k) X, (K, p, p)
        q = q - 0.5 * self.base.alpha * (params.coef[:, :-1] ** 2).sum(1)
        return q, newton_step(params.coef, grad, hess, self.base.alpha)

    def m_step(self, params, stats, data: EMData, resp: torch.Tensor | None = None):
        if params is None:
            params = self.init_params(data)
        keep = has_weight(resp.sum(1))
        q0, step = self._newton(params, data, resp)
        step = torch.where(keep[:, None], step, torch.zeros_like(step))
        field = getattr(self.intervals, "shape_field", None)
        if field is None:
            return self._halve(params, step, q0, data, resp)[0]
        # the full step's Q and, ahead of knowing that it passes, Q at its shape
        # -/+ SHAPE_H for the shape's step: one pass instead of three
        full = dataclasses.replace(params, coef=params.coef + 1.0 * step)
        ahead = self._objectives(full, field, (0.0, -SHAPE_H, SHAPE_H), data, resp)
        params, q, whole = self._halve(params, step, q0, data, resp, ahead[0])
        sides = (ahead[1], ahead[2]) if bool(whole.all()) else None
        return self._shape_search(params, field, q, keep, data, resp, sides)

    def _halve(self, params, step, q0, data, resp, q_full=None):
        """The longest step 2^-j of each expert that does not lower its Q; (params, Q,
        whether each expert is at its full step). ``q_full``: Q after the full step."""
        coef, best_q = params.coef.clone(), q0.clone()
        done = step.abs().amax(1) == 0
        whole = done.clone()  # no step: at its full step
        t = 1.0
        for _ in range(MAX_HALVINGS):
            trial = dataclasses.replace(params, coef=params.coef + t * step)
            if t == 1.0 and q_full is not None:
                q = q_full
            else:
                q = self._objective(trial, data, resp)
            ok = ~done & torch.isfinite(q) & (q >= q0)
            if t == 1.0:
                whole |= ok
            coef[ok], best_q[ok] = trial.coef[ok], q[ok]
            done |= ok | (t * step.abs().amax(1) < 1e-12)
            if bool(done.all()):
                break
            t *= 0.5
        return dataclasses.replace(params, coef=coef), best_q, whole

    def _shape_search(self, params, field: str, q0, keep, data, resp, sides=None):
        """A safeguarded Newton step on each expert's log shape x, from central
        differences of Q at x -/+ ``SHAPE_H`` (``sides``, where already known); at
        most 1 long, halved until Q does not fall."""
        lower, upper = (math.log(b) for b in self.intervals.shape_bounds)
        x0 = torch.log(getattr(params, field))

        def q_at(x):
            return self._objective(dataclasses.replace(params, **{field: torch.exp(x)}), data,
                                   resp)  # fmt: skip

        if sides is None:
            sides = self._objectives(params, field, (-SHAPE_H, SHAPE_H), data, resp)
        q_minus, q_plus = sides
        d1 = (q_plus - q_minus) / (2.0 * SHAPE_H)
        d2 = (q_plus - 2.0 * q0 + q_minus) / SHAPE_H**2
        step = torch.where(d2 < 0, -d1 / d2.clamp(max=-1e-300), torch.sign(d1)).clamp(-1.0, 1.0)
        step = torch.where(keep & torch.isfinite(step), step, torch.zeros_like(step))
        x, done = x0.clone(), step == 0
        moved = torch.zeros_like(done)
        t = 1.0
        for _ in range(MAX_HALVINGS):
            if bool(done.all()):
                break
            trial = (x0 + t * step).clamp(lower, upper)
            q = q_at(trial)
            ok = ~done & torch.isfinite(q) & (q >= q0)
            x[ok], moved[ok] = trial[ok], True
            done |= ok | (t * step.abs() < 1e-12)
            t *= 0.5
        # an expert whose step failed keeps its shape (not exp(log(shape)), a bit away)
        shape = torch.where(moved, torch.exp(x), getattr(params, field))
        return dataclasses.replace(params, **{field: shape})

    # ------------------------------------------------------------ differentiable view
    def from_free(self, free: dict[str, torch.Tensor]):
        """The base family's parameters of free tensors, the shape (Gamma's, the
        negative binomial's dispersion) kept inside ``shape_bounds``.

        SQUAREM extrapolates in the free tensors and may land far outside the range
        the M-step searches (a dispersion of 1e-46 has been seen): there an interval's
        incomplete beta function takes its continued fraction on the side that needs
        about sqrt(mu) terms, 1e5 of them, seconds per pass. Inside the bounds every
        point is one the M-step could reach.
        """
        params = self.base.from_free(free)
        field = getattr(self.intervals, "shape_field", None)
        if field is None:
            return params
        lower, upper = self.intervals.shape_bounds
        return dataclasses.replace(params, **{field: getattr(params, field).clamp(lower, upper)})

    def log_prob_free(self, free: dict[str, torch.Tensor], XT: torch.Tensor, y: torch.Tensor,
                      offset: torch.Tensor | None = None):  # fmt: skip
        """log p_k(y_i | x_i) of shape (K, n), differentiable twice in ``free``."""
        rows = tuple(y.reshape(len(y), -1))
        params = self.base.from_free(free)
        eta = linear_predictor(params.coef, XT, offset)
        point = rows[0] if self.point_rows == 1 else y.reshape(len(y), -1)[: self.point_rows]
        exact_logp = self.base.log_prob_free(free, XT, point, offset)
        return self._terms(params, eta, rows, exact_logp, False, True)[0]


def _row_keys(rows: torch.Tensor) -> list[bytes]:
    """Each expert's parameter row (K, P) as bytes: equal bytes, equal log p."""
    flat = rows.detach().cpu().contiguous().numpy()
    return [flat[k].tobytes() for k in range(flat.shape[0])]


class _Memo:
    """The last passes' (log p, d, e) of a data set's chunks, per expert row: a row is
    found by (its chunk, its parameters' bytes), so an E-step at parameters whose
    experts came from several passes (some took the shape step, some did not) is
    assembled from them. Bounded by ``MEMO_PASSES`` and ``MEMO_VALUES``, the oldest
    passes dropped first."""

    def __init__(self) -> None:
        self.rows: dict = {}  # (start, stop, row bytes) -> (pass id, index)
        self.passes: dict = {}  # pass id -> ((log p, d, e), its row keys), oldest first
        self.values = 0
        self.count = 0

    def recall(self, keys: list) -> tuple | None:
        found = [self.rows.get(key) for key in keys]
        if any(f is None or f[0] not in self.passes for f in found):
            return None
        return tuple(torch.stack([self.passes[i][0][t][j] for i, j in found])
                     for t in range(3))  # fmt: skip

    def remember(self, keys: list, out: tuple) -> None:
        size = out[0].numel()
        if size > MEMO_VALUES:
            return
        while self.passes and (len(self.passes) >= MEMO_PASSES
                               or self.values + size > MEMO_VALUES):  # fmt: skip
            old = next(iter(self.passes))
            kept, old_keys = self.passes.pop(old)
            self.values -= kept[0].numel()
            for key in old_keys:
                if self.rows.get(key, (None,))[0] == old:
                    del self.rows[key]
        self.count += 1
        self.passes[self.count] = (out, keys)
        self.values += size
        for j, key in enumerate(keys):
            self.rows[key] = (self.count, j)


def _derivatives(terms):
    """d and e of log m in eta from (log m, log k_lo, log k_hi, c_lo, c_hi)."""
    log_mass, k_lo, k_hi, c_lo, c_hi = terms
    rho_lo, rho_hi = torch.exp(k_lo - log_mass), torch.exp(k_hi - log_mass)
    d = rho_lo - rho_hi
    return d, rho_lo * c_lo - rho_hi * c_hi - d * d
