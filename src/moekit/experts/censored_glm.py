"""Censored and truncated responses for log-link experts without a latent normal:
Poisson and negative binomial counts and Gamma amounts.

Each row i is known to lie in [l_i, u_i] (l_i = u_i: observed exactly; u_i = inf:
right-censored; l_i = 0 or -inf: left-censored) and, with truncation, is observed only
inside a window [t_i, v_i]. Expert k's log-likelihood of the row is

.. math::  \\log p_k = \\begin{cases}
               \\log f_k(y_i \\mid x_i) & l_i = u_i \\\\
               \\log \\Pr_k(l_i \\le Y \\le u_i \\mid x_i) & l_i < u_i
           \\end{cases} \\; - \\log \\Pr_k(t_i \\le Y \\le v_i \\mid x_i),

the interval probabilities from regularised incomplete gamma functions in log space
(:mod:`moekit._core.incgamma`; the negative binomial's from regularised incomplete
beta functions, :mod:`moekit._core.incbeta`), finite far into either tail. For counts both ends
count: [3, inf] is Y >= 3 and a window [1, inf] is zero truncation.

E-step: the responsibilities from these log p_k. M-step (needs every row's
responsibility, so it is not available data-parallel): with d_ik and e_ik the first
and second derivatives of log p_ik in the linear predictor eta_ik,

.. math::  b_k \\leftarrow b_k + t \\Big(\\sum_i r_{ik} \\max(-e_{ik}, \\epsilon) x_i x_i^T
           + \\alpha D\\Big)^{-1} \\Big(\\sum_i r_{ik} d_{ik} x_i - \\alpha D b_k\\Big),

t = 1, 1/2, 1/4, ... until expert k's part of Q, sum_i r_ik log p_ik less its ridge,
does not fall (an expert whose step never passes keeps its coefficients). Gamma
experts then take a safeguarded Newton step in log a on the same objective, its
derivatives by central differences (torch has no derivative of the incomplete gamma
function in its shape): at most 1 long, uphill where Q is not concave, halved until
Q does not fall; negative binomial experts take the same step in log phi. Each part
never lowers Q, so the log-likelihood never decreases (generalised EM; ``monotone``).
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
from moekit.experts.negative_binomial import NegativeBinomialExperts
from moekit.experts.negative_binomial_intervals import NegativeBinomialIntervals

MAX_HALVINGS = 30
"""Most halvings of a coefficient step before an expert keeps its coefficients."""

SHAPE_H = 1e-3
"""Half-width in log a of the central differences of the shape step."""

MIN_CURVATURE = 1e-8
"""Least weight -e_ik of a row in the Newton step's Gram (where log p is not concave)."""

_DELEGATED = frozenset({
    "params_type", "predictive_family", "standardize_target", "n_outputs", "log_prior",
    "n_parameters", "min_samples", "select", "to_free", "mean_free",
    "log_prior_free", "report", "from_report", "moments", "predictive_extra",
    "param_shapes", "check_params", "residuals", "takes_offset", "alpha",
    "single_optimum",
})  # fmt: skip


# families whose interval methods live beside them rather than on them (their class
# or a base class -> the object that answers for them)
_INTERVALS = {NegativeBinomialExperts: NegativeBinomialIntervals()}


def interval_family(family):
    """What gives ``family``'s (a class or an instance) probabilities of intervals:
    the family itself (Poisson, Gamma), the object registered for its class
    (negative binomial), or None."""
    if hasattr(family, "interval_terms") and hasattr(family, "exact_derivatives"):
        return family
    cls = family if isinstance(family, type) else type(family)
    for owner, intervals in _INTERVALS.items():
        if issubclass(cls, owner):
            return intervals
    return None


def can_censor_glm(family) -> bool:
    """Whether ``family`` gives the probabilities of intervals (Poisson, negative
    binomial, Gamma)."""
    return interval_family(family) is not None


class CensoredGLMExperts:
    """A log-link family with ``interval_terms`` (:func:`can_censor_glm`), fitted to
    intervals of its response; parameters and predictions are the base family's.

    Parameters
    ----------
    base : PoissonExperts, NegativeBinomialExperts or GammaExperts
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
        point, lo, hi, t_lo, t_hi = rows
        exact = lo == hi
        zero = torch.zeros_like(lo)
        # exact rows' interval is the whole support, so that the branch not taken stays
        # finite (and so do autograd's gradients); the support starts at 0
        lo_s = torch.where(exact, zero, lo.clamp(min=0.0))
        hi_s = torch.where(exact, torch.full_like(hi, math.inf), hi)
        out = self.intervals.interval_terms(params, eta, lo_s, hi_s, differentiable)
        logp = torch.where(exact, exact_logp, out[0])
        d = e = None
        if derivatives:
            d_exact, e_exact = self.intervals.exact_derivatives(params, eta, point)
            d_int, e_int = _derivatives(out)
            d, e = torch.where(exact, d_exact, d_int), torch.where(exact, e_exact, e_int)
        if bool(torch.isfinite(t_lo).any() or torch.isfinite(t_hi).any()):
            window = self.intervals.interval_terms(params, eta, t_lo.clamp(min=0.0), t_hi,
                                              differentiable)  # fmt: skip
            logp = logp - window[0]
            if derivatives:
                d_w, e_w = _derivatives(window)
                d, e = d - d_w, e - e_w
        return logp, d, e

    def _chunk_terms(self, params, chunk: Chunk, derivatives: bool = False):
        eta = chunk_eta(params.coef, chunk)  # (K, c), with the offset
        exact_logp = self.base.log_prob(params, chunk)  # the density at the point
        return self._terms(params, eta, tuple(chunk.y), exact_logp, derivatives, False)

    # ------------------------------------------------------------ E-step
    def prepare(self, data: EMData) -> None:
        self.base.prepare(data)  # its caches are of the first row, the point

    def init_params(self, data: EMData):
        # the base family's start from the points alone (the other rows hold infinities)
        return self.base.init_params(dataclasses.replace(data, y=data.y[:1], cache={}))

    def log_prob(self, params, chunk: Chunk) -> torch.Tensor:
        return self._chunk_terms(params, chunk)[0]

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
        params, q = self._halve(params, step, q0, data, resp)
        field = getattr(self.intervals, "shape_field", None)
        if field is not None:
            params = self._shape_search(params, field, q, keep, data, resp)
        return params

    def _halve(self, params, step, q0, data, resp):
        """The longest step 2^-j of each expert that does not lower its Q; (params, Q)."""
        coef, best_q = params.coef.clone(), q0.clone()
        done = step.abs().amax(1) == 0
        t = 1.0
        for _ in range(MAX_HALVINGS):
            trial = dataclasses.replace(params, coef=params.coef + t * step)
            q = self._objective(trial, data, resp)
            ok = ~done & torch.isfinite(q) & (q >= q0)
            coef[ok], best_q[ok] = trial.coef[ok], q[ok]
            done |= ok | (t * step.abs().amax(1) < 1e-12)
            if bool(done.all()):
                break
            t *= 0.5
        return dataclasses.replace(params, coef=coef), best_q

    def _shape_search(self, params, field: str, q0, keep, data, resp):
        """A safeguarded Newton step on each expert's log shape x, from central
        differences of Q at x -/+ ``SHAPE_H``; at most 1 long, halved until Q does not fall."""
        lower, upper = (math.log(b) for b in self.intervals.shape_bounds)
        x0 = torch.log(getattr(params, field))

        def q_at(x):
            return self._objective(dataclasses.replace(params, **{field: torch.exp(x)}), data,
                                   resp)  # fmt: skip

        q_minus, q_plus = q_at(x0 - SHAPE_H), q_at(x0 + SHAPE_H)
        d1 = (q_plus - q_minus) / (2.0 * SHAPE_H)
        d2 = (q_plus - 2.0 * q0 + q_minus) / SHAPE_H**2
        step = torch.where(d2 < 0, -d1 / d2.clamp(max=-1e-300), torch.sign(d1)).clamp(-1.0, 1.0)
        step = torch.where(keep & torch.isfinite(step), step, torch.zeros_like(step))
        x, done = x0.clone(), step == 0
        t = 1.0
        for _ in range(MAX_HALVINGS):
            trial = (x0 + t * step).clamp(lower, upper)
            q = q_at(trial)
            ok = ~done & torch.isfinite(q) & (q >= q0)
            x[ok] = trial[ok]
            done |= ok | (t * step.abs() < 1e-12)
            if bool(done.all()):
                break
            t *= 0.5
        return dataclasses.replace(params, **{field: torch.exp(x)})

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
        exact_logp = self.base.log_prob_free(free, XT, rows[0], offset)
        return self._terms(params, eta, rows, exact_logp, False, True)[0]


def _derivatives(terms):
    """d and e of log m in eta from (log m, log k_lo, log k_hi, c_lo, c_hi)."""
    log_mass, k_lo, k_hi, c_lo, c_hi = terms
    rho_lo, rho_hi = torch.exp(k_lo - log_mass), torch.exp(k_hi - log_mass)
    d = rho_lo - rho_hi
    return d, rho_lo * c_lo - rho_hi * c_hi - d * d
