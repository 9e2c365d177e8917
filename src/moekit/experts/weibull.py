"""Weibull experts for positive amounts and survival times, in survreg's accelerated
failure time form: log y = eta_k + sigma_k W, eta_k = b_k . x, W standard minimum
extreme value, shape a_k = 1 / sigma_k and scale lambda = e^eta.

.. math::  S_k(y) = e^{-z}, \\quad z = (y / \\lambda)^a = e^{w}, \\quad
           w = a (\\log y - \\eta_k), \\qquad
           \\log p_k(y \\mid x) = \\log a - \\log y + w - e^{w}.

The coefficients are survreg's (of log lambda) and the reported ``scale`` is its
sigma, so that one expert is R's ``survreg(..., dist = "weibull")``.

M-step: one Newton-type step on expert k's part of Q in (b_k, log a_k), from sums
over rows at the current parameters (the statistics of a data-parallel fit). With
x = log a the derivatives of log p are

.. math::  \\partial_\\eta = a (z - 1), \\; \\partial_x = 1 + w (1 - z), \\;
           \\partial^2_{\\eta\\eta} = -a^2 z, \\; \\partial^2_{\\eta x} = a (z - 1 + z w), \\;
           \\partial^2_{xx} = w (1 - z) - w^2 z.

Q is concave in eta, so the coefficients' block -H_bb is positive definite. Far from
the optimum the step is the coefficients' Newton step at a fixed shape beside a
guarded Newton step in log a at fixed b (uphill by 2 where Q is not concave in it);
where both are short (``JOINT_NEAR``) and the Schur complement of the joint Hessian is
positive, the joint Newton step, which converges quadratically, as survreg's does.
Both parts are shortened together to ``MAX_ETA_STEP`` and a step of log a of at most
2; the EM loop checks the likelihood after the step and shortens it where it would
fall (``monotone = False``).
Censored and truncated rows go through :mod:`moekit.experts.censored_glm`, whose
M-step is guarded by halving on Q itself (:meth:`WeibullExperts.interval_terms`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moekit._core.batch import batched_grams, flat_grams
from moekit._core.data import Chunk, EMData
from moekit._core.derivatives import LocalDerivatives
from moekit._core.reporting import Report, Scaling
from moekit.experts._glm import (
    MAX_ETA_STEP,
    ShapedAmountGLM,
    chunk_eta,
    chunk_eta_many,
    coef_of_report,
    grams,
    has_weight,
    has_weight_many,
    linear_predictor,
    psd_step,
    report_coef,
    ridged,
    row_sums_many,
)  # fmt: skip

SHAPE_MIN, SHAPE_MAX = 1e-3, 1e3
"""Bounds of a shape a = 1 / sigma: a spread of log y between 1e-3 and 1e3."""

MAX_SHAPE_STEP = 2.0
"""Longest step of log a in one M-step (a factor of e^2 on the shape)."""

JOINT_NEAR = 0.1
"""The joint Newton step is taken only where the separate steps (of b at a fixed shape,
of log a at fixed b) are at most this long: far from the optimum, from a pooled start,
the joint quadratic model misleads (a first step to a shape of 9 and a scale 20 times
too small was seen) where the separate steps, each on a concave or guarded 1-d model,
do not."""

W_MAX = 600.0
"""Largest w = a (log y - eta) the M-step's sums read: a row further out has
log p_k = w - e^w below -1e260, so its responsibility is 0, and e^w, which overflows
from 709, would make 0 * inf = NaN of the sums."""

EULER = 0.5772156649015329
"""Euler's constant: E[W] = -EULER for W standard minimum extreme value."""


@dataclass
class WeibullParams:
    """coef of shape (K, p), the last column the intercept (of log lambda); shape a_k, (K,)."""

    coef: torch.Tensor
    shape: torch.Tensor


def weibull_logpdf(eta, log_y, shape):
    """log p of the Weibull of scale e^eta and shape a at y (log y given), broadcast."""
    w = shape * (log_y - eta)
    return torch.log(shape) - log_y + w - torch.exp(w)


def _log_y(chunk: Chunk) -> torch.Tensor:
    cached = chunk.data.cache.get("log_y")
    return cached[chunk.start : chunk.stop] if cached is not None else torch.log(chunk.y[0])


def _row_terms(w: torch.Tensor, a: torch.Tensor, resp: torch.Tensor):
    """Per-row weights of the M-step's sums from w (K, c) or (S, K, c), shapes a:
    the score in eta, the curvature z, the cross term, and Q's derivatives in log a."""
    w = w.clamp(max=W_MAX)
    z = torch.exp(w)
    rz = resp * z
    score = resp * a * (z - 1.0)
    cross = a * (rz - resp + rz * w)
    d_x = resp + resp * w - rz * w  # r (1 + w (1 - z))
    d_xx = resp * w - rz * w - rz * w * w  # r (w (1 - z) - w^2 z)
    return score, rz, cross, d_x, d_xx


def start_params(data: EMData) -> tuple[float, float]:
    """The intercept and shape of the model without features: sigma from the standard
    deviation of log y (the extreme value distribution's is sigma pi / sqrt 6), and
    eta = mean(log y - o) + EULER sigma, as E[log y] = eta - EULER sigma."""
    log_y = torch.log(data.y[0])
    if data.offset is not None:
        log_y = log_y - data.offset
    sd = float(log_y.std(correction=0)) if data.n > 1 else 1.0
    sigma = min(max(sd * math.sqrt(6.0) / math.pi, 1.0 / SHAPE_MAX), 1.0 / SHAPE_MIN)
    return float(log_y.mean()) + EULER * sigma, 1.0 / sigma


class WeibullExperts(ShapedAmountGLM):
    """K Weibull regressions (accelerated failure time: log lambda = b_k . x) with a
    shape per expert.

    Parameters
    ----------
    n_experts : int
    alpha : float
        L2 penalty on the slopes, on the summed log-likelihood scale.
    """

    report_name = "Weibull (AFT, log scale)"
    monotone = False  # a Newton step; the EM loop checks and shortens it
    params_type = WeibullParams
    predictive_family = "weibull"

    def init_params(self, data: EMData) -> WeibullParams:
        intercept, shape = start_params(data)
        return WeibullParams(self.start_coef(data.XeT, intercept),
                             data.XeT.new_full((self.n_experts,), shape))  # fmt: skip

    def log_prob(self, params: WeibullParams, chunk: Chunk) -> torch.Tensor:
        log_y = _log_y(chunk)
        a = params.shape.unsqueeze(1)  # (K, 1)
        w = chunk.scratch["weibull_w"] = a * (log_y - chunk_eta(params.coef, chunk))  # (K, c)
        return (w - torch.exp(w)).add_(torch.log(a) - log_y)

    def chunk_stats(self, params: WeibullParams, chunk: Chunk, resp: torch.Tensor):
        w = chunk.scratch.get("weibull_w")
        if w is None:  # first M-step: at the starting parameters
            self.log_prob(params, chunk)
            w = chunk.scratch["weibull_w"]
        score, rz, cross, d_x, d_xx = _row_terms(w, params.shape.unsqueeze(1), resp)
        XT = chunk.XeT.T
        return (score @ XT, chunk.weighted_grams(rz, "e"), cross @ XT, d_x.sum(1), d_xx.sum(1),
                resp.sum(1))  # fmt: skip

    def m_step(self, params, stats, data: EMData, resp=None) -> WeibullParams:
        if params is None:
            params = self.init_params(data)
        g_b, hess, cross, d_x, d_xx, nk = stats
        return self._update(params, g_b, grams(hess, g_b.shape[1]), cross, d_x, d_xx,
                            has_weight(nk))  # fmt: skip

    def _update(self, params: WeibullParams, g_b, Hz, cross, d_x, d_xx, keep,
                even: bool = False) -> WeibullParams:  # fmt: skip
        """The Newton step in (b_k, log a_k) of every expert that holds weight
        (``keep``); ``even``: systems of even size, as for the experts of several fits.

        With the negative Hessian [[A, c], [c^T, d]] (A = a^2 sum r z x x^T plus the
        ridge) and gradient (g, g_x): u = A^-1 g, v = A^-1 c, s = d - c . v; where
        s > 0 the joint step is dx = (g_x - c . u) / s, db = u - v dx."""
        a = params.shape
        A, g = ridged(params.coef, g_b, (a * a).view(-1, 1, 1) * Hz, self.alpha)
        c = -cross
        u, v = psd_step(A, g, even), psd_step(A, c, even)
        s = -d_xx - (c * v).sum(1)
        # the shape's own guarded step at the current b
        dx_alone = torch.where(d_xx < 0, -d_x / d_xx.clamp(max=-1e-300),
                               torch.sign(d_x) * MAX_SHAPE_STEP)  # fmt: skip
        near = (dx_alone.abs() <= JOINT_NEAR) & (u.abs().amax(1) <= JOINT_NEAR)
        joint = near & (s > 1e-12 * (-d_xx).abs().clamp(min=1e-300)) & (-d_xx > 0)
        dx_joint = (d_x - (c * u).sum(1)) / torch.where(joint, s, torch.ones_like(s))
        dx = torch.where(joint, dx_joint, dx_alone)
        db = torch.where(joint[:, None], u - v * dx.unsqueeze(1), u)
        # one factor for both parts: the joint step's direction is kept
        longest = (db.abs().amax(1) / MAX_ETA_STEP).clamp(min=1.0)
        t = 1.0 / torch.maximum(longest, (dx.abs() / MAX_SHAPE_STEP).clamp(min=1.0))
        t = torch.where(torch.isfinite(t) & torch.isfinite(dx), t, torch.zeros_like(t))
        log_a = (torch.log(a) + t * torch.nan_to_num(dx)).clamp(math.log(SHAPE_MIN),
                                                                math.log(SHAPE_MAX))  # fmt: skip
        coef = params.coef + t.unsqueeze(1) * torch.nan_to_num(db)
        return WeibullParams(torch.where(keep[:, None], coef, params.coef),
                             torch.where(keep, torch.exp(log_a), a))  # fmt: skip

    # ------------------------------------------------------------ many starts at once
    # S starts stacked on a leading axis (moekit._core.batch): coef (S, K, p), shape (S, K)
    batchable = True

    def log_prob_many(self, params: WeibullParams, chunk: Chunk) -> torch.Tensor:
        """:meth:`log_prob` of S stacked starts, shape (S, K, c)."""
        log_y = _log_y(chunk)
        a = params.shape.unsqueeze(2)  # (S, K, 1)
        w = chunk.scratch["weibull_w_many"] = a * (log_y - chunk_eta_many(params.coef, chunk))
        return (w - torch.exp(w)).add_(torch.log(a) - log_y)

    def chunk_stats_many(self, params: WeibullParams, chunk: Chunk, resp: torch.Tensor):
        """:meth:`chunk_stats` of S stacked starts (resp (S, K, c)), each stacked."""
        w = chunk.scratch.get("weibull_w_many")
        if w is None:
            self.log_prob_many(params, chunk)
            w = chunk.scratch["weibull_w_many"]
        score, rz, cross, d_x, d_xx = _row_terms(w, params.shape.unsqueeze(2), resp)
        return (row_sums_many(score, chunk), batched_grams(chunk, rz), row_sums_many(cross, chunk),
                d_x.sum(2), d_xx.sum(2), resp.sum(2))  # fmt: skip

    def m_step_many(self, params: WeibullParams, stats, data: EMData) -> WeibullParams:
        """:meth:`m_step` of S stacked starts: every operation elementwise over the S K
        experts or a batched solve at an even size, so no start depends on another."""
        g_b, hess, cross, d_x, d_xx, nk = stats
        S, K, p = params.coef.shape
        flat = WeibullParams(params.coef.reshape(S * K, p), params.shape.reshape(S * K))
        new = self._update(flat, g_b.reshape(S * K, p), grams(flat_grams(hess), p),
                           cross.reshape(S * K, p), d_x.reshape(-1), d_xx.reshape(-1),
                           has_weight_many(nk), even=True)  # fmt: skip
        return WeibullParams(new.coef.view(S, K, p), new.shape.view(S, K))

    def residuals(self, params: WeibullParams, chunk: Chunk) -> torch.Tensor:
        """Standardised residuals of log y, (w + EULER) / (pi / sqrt 6), W's mean and
        standard deviation taken out, shape (K, 1, c)."""
        w = params.shape.unsqueeze(1) * (_log_y(chunk) - chunk_eta(params.coef, chunk))
        return ((w + EULER) * (math.sqrt(6.0) / math.pi)).unsqueeze(1)

    # ------------------------------------------------------------ differentiable view
    def from_free(self, free: dict[str, torch.Tensor]) -> WeibullParams:
        """The parameters of free tensors, the shape kept inside [``SHAPE_MIN``,
        ``SHAPE_MAX``]: SQUAREM extrapolates in the free tensors, and a shape far
        outside the M-step's range overflows z = e^w."""
        return WeibullParams(free["coef"], _shape(free).clamp(SHAPE_MIN, SHAPE_MAX))

    def mean_free(self, free: dict[str, torch.Tensor], XT: torch.Tensor) -> torch.Tensor:
        """Expert means lambda Gamma(1 + 1 / a), (K, 1, n), for a design XT (p, n)."""
        a = _shape(free).unsqueeze(1)
        return torch.exp(free["coef"] @ XT + torch.lgamma(1.0 + 1.0 / a)).unsqueeze(1)

    def log_prob_free(self, free: dict[str, torch.Tensor], XT: torch.Tensor, y: torch.Tensor,
                      offset: torch.Tensor | None = None):  # fmt: skip
        """log p_k(y_i | x_i) of shape (K, n), differentiable in ``free``."""
        eta = linear_predictor(free["coef"], XT, offset)
        return weibull_logpdf(eta, torch.log(y.reshape(-1)), _shape(free).unsqueeze(1))

    # ------------------------------------------------------------ reporting
    def report(self, params: WeibullParams, scaling: Scaling) -> Report:
        """Intercept and slopes of every expert's log lambda in the data's units, then
        its ``scale`` sigma = 1 / a (survreg's Scale)."""
        return report_coef(params.coef, scaling, {"scale": 1.0 / params.shape})

    def from_report(self, values: dict, scaling: Scaling, fixed: dict) -> dict:
        return {"coef": coef_of_report(values, scaling), "scale": values["scale"]}

    # ------------------------------------------------------------ analytic information
    def local_derivatives(self, params: WeibullParams, chunk: Chunk, scaling: Scaling):
        """Derivatives of log p_k = -log s - log y + w - e^w in (eta, s), s = sigma = 1 / a,
        w = (log y - eta) / s, z = e^w:

        .. math::  \\partial_\\eta = (z - 1) / s, \\quad \\partial_s = (w (z - 1) - 1) / s, \\quad
                   \\partial^2_{\\eta\\eta} = -z / s^2, \\quad
                   \\partial^2_{\\eta s} = (1 - z - w z) / s^2, \\quad
                   \\partial^2_{ss} = (1 + 2 w (1 - z) - w^2 z) / s^2.
        """
        s = 1.0 / params.shape.unsqueeze(1)  # (K, 1)
        w = (_log_y(chunk) - chunk_eta(params.coef, chunk)) / s  # (K, c)
        z = torch.exp(w)
        d1 = torch.stack([(z - 1.0) / s, (w * (z - 1.0) - 1.0) / s], 1)  # (K, 2, c)
        s2 = s * s
        cross = (1.0 - z - w * z) / s2
        d2 = torch.stack([torch.stack([-z / s2, cross], 1),
                          torch.stack([cross, (1.0 + 2.0 * w * (1.0 - z) - w * w * z) / s2],
                                      1)], 1)  # fmt: skip
        return LocalDerivatives(d1, d2, 1)

    def local_parameters(self, values: dict, scaling: Scaling, fixed: dict):
        """The log scale's coefficients on the standardised design, then sigma."""
        return coef_of_report(values, scaling).unsqueeze(1), values["scale"].unsqueeze(1)

    # ------------------------------------------------------------ censored amounts
    shape_bounds = (SHAPE_MIN, SHAPE_MAX)  # the censored fit's range of the shape

    def interval_terms(self, params: WeibullParams, eta: torch.Tensor, lo: torch.Tensor,
                       hi: torch.Tensor, differentiable: bool = False):  # fmt: skip
        """log Pr(lo <= Y <= hi) = log(S(lo) - S(hi)) for 0 <= lo < hi <= inf, (K, c),
        and the pieces of its derivatives in eta (:mod:`moekit.experts.censored_glm`).

        With z = e^w at either end, log(e^{-z_lo} - e^{-z_hi}) = -z_lo + log(1 - e^{-D}),
        D = z_hi - z_lo = z_lo expm1(a log(hi / lo)) without cancellation
        (:func:`log1mexp_exp`). dS / d eta = a z e^{-z}, so the kernels are
        log k = log a + w - z, and d log k / d eta = a (z - 1). Every branch is
        computed on finite stand-ins, so autograd sees no infinities.
        """
        a = params.shape.unsqueeze(1)  # (K, 1)
        pos, finite = lo > 0, torch.isfinite(hi)
        log_lo = torch.log(torch.where(pos, lo, torch.ones_like(lo)))
        log_hi = torch.log(torch.where(finite, hi, torch.ones_like(hi)))
        w_lo, w_hi = a * (log_lo - eta), a * (log_hi - eta)
        z_lo, z_hi = torch.exp(w_lo), torch.exp(w_hi)
        both = pos & finite
        spread = a * torch.where(both, log_hi - log_lo, torch.ones_like(log_hi))
        log_gap = torch.where(both, w_lo + _log_expm1(spread), w_hi)  # log D, or log z_hi
        tail = log1mexp_exp(log_gap)
        log_mass = torch.where(pos, -z_lo, torch.zeros_like(z_lo))
        log_mass = log_mass + torch.where(finite, tail, torch.zeros_like(tail))
        log_a = torch.log(a).expand_as(w_lo)
        ninf = torch.full_like(w_lo, -math.inf)
        k_lo = torch.where(pos, log_a + w_lo - z_lo, ninf)
        k_hi = torch.where(finite, log_a + w_hi - z_hi, ninf)
        c_hi = torch.where(finite, a * (z_hi - 1.0), -a.expand_as(z_hi))
        return log_mass, k_lo, k_hi, a * (z_lo - 1.0), c_hi

    def exact_derivatives(self, params: WeibullParams, eta: torch.Tensor, y: torch.Tensor):
        """d log p / d eta = a (z - 1) and d^2 / d eta^2 = -a^2 z, z = (y e^{-eta})^a."""
        a = params.shape.unsqueeze(1)
        z = torch.exp(a * (torch.log(y) - eta))
        return a * (z - 1.0), -a * a * z

    # ------------------------------------------------------------ prediction
    def moments(self, params: WeibullParams, XT: torch.Tensor, offset: torch.Tensor | None = None):
        """Means lambda Gamma(1 + 1/a) and standard deviations
        mean sqrt(Gamma(1 + 2/a) / Gamma(1 + 1/a)^2 - 1), each (n, K, 1)."""
        inv = (1.0 / params.shape).view(1, -1)
        lg1 = torch.lgamma(1.0 + inv)
        mean = torch.exp(linear_predictor(params.coef, XT, offset).T + lg1)  # (n, K)
        cv = torch.sqrt(torch.expm1(torch.lgamma(1.0 + 2.0 * inv) - 2.0 * lg1))
        return mean.unsqueeze(-1), (mean * cv).unsqueeze(-1)

    # ------------------------------------------------------------ model files


def _shape(free: dict[str, torch.Tensor]) -> torch.Tensor:
    # reported values hold the scale sigma = 1 / a, free tensors log a
    return 1.0 / free["scale"] if "scale" in free else torch.exp(free["log_shape"])


def _log_expm1(x: torch.Tensor) -> torch.Tensor:
    """log(e^x - 1) for x > 0, without overflow for large x."""
    big = x > 1.0
    small = torch.log(torch.expm1(torch.where(big, torch.ones_like(x), x)))
    large = x + torch.log(-torch.expm1(-torch.where(big, x, torch.ones_like(x))))
    return torch.where(big, large, small)


def log1mexp_exp(t: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(-e^t)), the log probability mass of a gap D = e^t, elementwise.

    Below t = -20 by log D - D / 2 (its error is of D^2 / 24, under 1e-18 there, where
    -expm1(-D) would underflow with D); below D = log 2 by log(-expm1(-D)); above by
    log1p(-e^{-D}) (Maechler's log1mexp). Each branch on finite stand-ins.
    """
    tiny, mid = t < -20.0, t < math.log(math.log(2.0))
    t_tiny = torch.where(tiny, t, torch.full_like(t, -20.0))
    t_mid = torch.where(mid & ~tiny, t, torch.full_like(t, -1.0))
    t_big = torch.where(mid, torch.zeros_like(t), t.clamp(max=700.0))
    out_tiny = t_tiny - 0.5 * torch.exp(t_tiny)
    out_mid = torch.log(-torch.expm1(-torch.exp(t_mid)))
    out_big = torch.log1p(-torch.exp(-torch.exp(t_big)))
    return torch.where(tiny, out_tiny, torch.where(mid, out_mid, out_big))
