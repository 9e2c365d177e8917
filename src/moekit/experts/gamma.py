"""Gamma GLM experts with a log link: y | x, z = k ~ Gamma(shape a_k, mean exp(b_k . x)).

.. math::  \\log p_k(y \\mid x) = a_k \\log a_k - \\log\\Gamma(a_k) + (a_k - 1) \\log y
           - a_k (\\eta_k + u_k), \\qquad \\eta_k = b_k^\\top x, \\; u_k = y e^{-\\eta_k}.

The M-step is two conditional maximisations of Q (ECM). First the shape, by maximum
likelihood at the current means (not by moments): with n_k = sum_i r_ik and
c_k = (1 / n_k) sum_i r_ik (u_ik - log u_ik) - 1 >= 0, Q's shape part is
n_k (a log a - log Gamma(a) - a c_k) + const, maximised where

.. math::  \\log a_k - \\psi(a_k) = c_k,

whose left side falls from infinity to 0: a 1-d Newton solve in log a from Minka's
(2002) approximation, kept inside [``SHAPE_MIN``, ``SHAPE_MAX``]. Then one Fisher
scoring (IRLS) step on the coefficients, as R's ``glm`` takes: the log link's
expected information is a_k sum_i r_ik x_i x_i^T, so the step

.. math::  b_k \\leftarrow b_k + \\Big(\\sum_i r_{ik} x_i x_i^T\\Big)^{-1}
           \\sum_i r_{ik} (u_{ik} - 1) x_i

does not depend on the shape. Every statistic is a sum over rows; the EM loop checks
the likelihood after the step and shortens it where it would fall.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moekit._core.batch import batched_grams, flat_grams
from moekit._core.data import Chunk, EMData
from moekit._core.derivatives import LocalDerivatives
from moekit._core.incgamma import log_difference, log_gamma_pq
from moekit._core.reporting import Report, Scaling
from moekit.experts._glm import (
    ShapedAmountGLM,
    chunk_eta,
    chunk_eta_many,
    coef_of_report,
    grams,
    has_weight,
    has_weight_many,
    linear_predictor,
    newton_step,
    newton_step_many,
    report_coef,
    row_sums_many,
)  # fmt: skip

SHAPE_MIN, SHAPE_MAX = 1e-4, 1e8

STEP_TOL = 1e-9
"""A shape's Newton iteration stops after a step of log a at most this long (plus the
rounding floor of large shapes): Newton's error after it is of its square, 1e-18."""

PLAIN_STEPS = 3
"""Newton steps every element takes before any is tested: from Minka's start, within
1.5% of the root, the third lands within rounding of it."""


@dataclass
class GammaParams:
    """coef of shape (K, p), the last column the intercept (log mean); shape a_k, (K,)."""

    coef: torch.Tensor
    shape: torch.Tensor


def gamma_shape_mle(c: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """The root a of log a - digamma(a) = c (c > 0), elementwise.

    Newton's method in x = log a, where f(x) = x - psi(e^x) - c falls monotonely
    (f'(x) = 1 - e^x psi'(e^x) < 0), started from Minka's (2002) approximation
    a = (3 - c + sqrt((c - 3)^2 + 24 c)) / (12 c), within 1.5% of the root, and kept
    inside [``SHAPE_MIN``, ``SHAPE_MAX``] (c = 0: a perfect fit, the largest shape).
    Newton converges quadratically from there: 3 or 4 steps reach the root to rounding.

    Each element stops on its own, after the first step that moves its x by at most
    ``max(STEP_TOL, 64 eps) + 512 eps a`` (eps of c's dtype), so that its answer does
    not depend on the others solved beside it (the S K experts of a batch of fits).
    The second term is the rounding floor of the step for large shapes:
    log a - psi(a) ~ 1 / (2a) is computed with an absolute error of a few eps log a,
    and f' ~ -1 / (2a), so the step of x is rounding noise of about 50 eps a there.
    At most ``iterations`` steps are taken.
    """
    c = c.clamp(min=1e-300)
    a = (3.0 - c + torch.sqrt((c - 3.0) ** 2 + 24.0 * c)) / (12.0 * c)
    lo, hi = math.log(SHAPE_MIN), math.log(SHAPE_MAX)
    x = torch.log(a.clamp(SHAPE_MIN, SHAPE_MAX))
    eps = torch.finfo(x.dtype).eps
    tol, floor = max(STEP_TOL, 64.0 * eps), 512.0 * eps
    going = None  # every element takes the first PLAIN_STEPS steps: no test needed
    for step in range(iterations):
        a = torch.exp(x)
        f = x - torch.digamma(a) - c
        df = 1.0 - a * torch.polygamma(1, a)
        new = (x - f.div_(df.clamp_(max=-1e-300))).clamp_(lo, hi)
        if step < PLAIN_STEPS:
            x = new
            continue
        if going is None:
            going = torch.ones_like(x, dtype=torch.bool)
        moved = (new - x).abs_()
        x = torch.where(going, new, x)
        going &= moved > a.mul_(floor).add_(tol)
        if not bool(going.any()):
            break
    return torch.exp(x)


def start_log_mean(data: EMData) -> float:
    """The intercept of every expert's first step: the log mean of the model without
    features, log(mean y); with an offset o, log(mean(y e^{-o})), the maximum of that
    model's likelihood (its score sum_i (y_i e^{-b - o_i} - 1) is zero there) rather
    than a start that takes o for 0."""
    if data.offset is None:
        return math.log(float(data.y.mean()))
    return float(torch.logsumexp(torch.log(data.y[0]) - data.offset, 0)) - math.log(data.n)


def gamma_logpdf(eta, log_y, y, shape):
    """log p of Gamma(shape, mean e^eta) at y (log y given), broadcast, out of place."""
    return (shape * torch.log(shape) - torch.lgamma(shape) + (shape - 1.0) * log_y
            - shape * (eta + y * torch.exp(-eta)))  # fmt: skip


def _log_density(eta, u, a, log_y) -> torch.Tensor:
    """log p of every expert and row from eta, u = y e^{-eta} (used up) and shapes a."""
    return (eta + u).mul_(-a).add_((a - 1.0) * log_y).add_(a * torch.log(a) - torch.lgamma(a))


def _log_y(chunk: Chunk) -> torch.Tensor:
    cached = chunk.data.cache.get("log_y")
    return cached[chunk.start : chunk.stop] if cached is not None else torch.log(chunk.y[0])


class GammaExperts(ShapedAmountGLM):
    """K Gamma regressions with a log link and a shape per expert.

    Parameters
    ----------
    n_experts : int
    alpha : float
        L2 penalty on the slopes, on the summed log-likelihood scale.
    """

    report_name = "Gamma (log link)"
    monotone = False  # a scoring step; the EM loop checks and shortens it
    params_type = GammaParams
    predictive_family = "gamma"

    def init_params(self, data: EMData) -> GammaParams:
        coef = self.start_coef(data.XeT, start_log_mean(data))
        return GammaParams(coef, data.XeT.new_ones(self.n_experts))

    def log_prob(self, params: GammaParams, chunk: Chunk) -> torch.Tensor:
        eta = chunk_eta(params.coef, chunk)  # (K, c)
        u = chunk.y[0] * torch.exp(-eta)
        chunk.scratch["gamma_u"] = u
        return _log_density(eta, u, params.shape.unsqueeze(1), _log_y(chunk))

    def chunk_stats(self, params: GammaParams, chunk: Chunk, resp: torch.Tensor):
        u = chunk.scratch.get("gamma_u")
        if u is None:  # first M-step: at the starting parameters
            self.log_prob(params, chunk)
            u = chunk.scratch["gamma_u"]
        grad = (resp * (u - 1.0)) @ chunk.XeT.T  # (K, p)
        dev = (resp * (u - torch.log(u))).sum(1)  # sum r (u - log u), (K,)
        return grad, chunk.weighted_grams(resp, "e"), dev, resp.sum(1)

    def m_step(self, params, stats, data: EMData, resp=None) -> GammaParams:
        if params is None:
            params = self.init_params(data)
        grad, hess, dev, nk = stats
        return self._update(params, grad, grams(hess, grad.shape[1]), dev, nk, has_weight(nk))

    def _update(self, params: GammaParams, grad, H, dev, nk, keep, many: bool = False):
        """The shape by maximum likelihood, then the scoring step, for every expert that
        holds weight (``keep``); ``many``: experts of several fits, systems of even size."""
        shape = gamma_shape_mle(dev / nk.clamp(min=1e-300) - 1.0)
        # the ridge is on the summed log-likelihood, whose information is a_k times the Gram
        a = shape.view(-1, 1)
        step = (newton_step_many if many else newton_step)(
            params.coef, a * grad, a.unsqueeze(-1) * H, self.alpha)  # fmt: skip
        coef = torch.where(keep[:, None], params.coef + step, params.coef)
        return GammaParams(coef, torch.where(keep, shape, params.shape))

    # ------------------------------------------------------------ many starts at once
    # S starts stacked on a leading axis (moekit._core.batch): coef (S, K, p), shape (S, K)
    batchable = True

    def log_prob_many(self, params: GammaParams, chunk: Chunk) -> torch.Tensor:
        """:meth:`log_prob` of S stacked starts, shape (S, K, c)."""
        eta = chunk_eta_many(params.coef, chunk)  # (S, K, c), with the offset
        u = chunk.scratch["gamma_u_many"] = chunk.y[0] * torch.exp(-eta)
        return _log_density(eta, u, params.shape.unsqueeze(2), _log_y(chunk))

    def chunk_stats_many(self, params: GammaParams, chunk: Chunk, resp: torch.Tensor):
        """:meth:`chunk_stats` of S stacked starts (resp (S, K, c)), each stacked."""
        u = chunk.scratch.get("gamma_u_many")
        if u is None:
            self.log_prob_many(params, chunk)
            u = chunk.scratch["gamma_u_many"]
        grad = row_sums_many(resp * (u - 1.0), chunk)  # (S, K, p)
        dev = (resp * (u - torch.log(u))).sum(2)  # (S, K)
        return grad, batched_grams(chunk, resp), dev, resp.sum(2)

    def m_step_many(self, params: GammaParams, stats, data: EMData) -> GammaParams:
        """:meth:`m_step` of S stacked starts: the shapes' 1-d solves elementwise over
        all S K experts (no operation mixes them), the systems solved at an even size."""
        grad, hess, dev, nk = stats
        S, K, p = params.coef.shape
        flat = GammaParams(params.coef.reshape(S * K, p), params.shape.reshape(S * K))
        H = grams(flat_grams(hess), p)  # (S K, p, p)
        keep = has_weight_many(nk)
        new = self._update(flat, grad.reshape(S * K, p), H, dev.reshape(-1), nk.reshape(-1), keep,
                           many=True)  # fmt: skip
        return GammaParams(new.coef.view(S, K, p), new.shape.view(S, K))

    def residuals(self, params: GammaParams, chunk: Chunk) -> torch.Tensor:
        """Pearson residuals (y - mu_k) / (mu_k / sqrt(a_k)), shape (K, 1, c)."""
        u = chunk.y[0] * torch.exp(-(chunk_eta(params.coef, chunk)))
        return ((u - 1.0) * params.shape.sqrt().unsqueeze(1)).unsqueeze(1)

    # ------------------------------------------------------------ differentiable view
    def from_free(self, free: dict[str, torch.Tensor]) -> GammaParams:
        return GammaParams(free["coef"], _shape(free))

    def mean_free(self, free: dict[str, torch.Tensor], XT: torch.Tensor) -> torch.Tensor:
        """Expert means (K, 1, n) for a design XT (p, n)."""
        return torch.exp(free["coef"] @ XT).unsqueeze(1)

    def log_prob_free(self, free: dict[str, torch.Tensor], XT: torch.Tensor, y: torch.Tensor,
                      offset: torch.Tensor | None = None):  # fmt: skip
        """log p_k(y_i | x_i) of shape (K, n), differentiable in ``free``."""
        y = y.reshape(-1)
        return gamma_logpdf(
            linear_predictor(free["coef"], XT, offset), torch.log(y), y, _shape(free).unsqueeze(1)
        )

    # ------------------------------------------------------------ reporting
    def report(self, params: GammaParams, scaling: Scaling) -> Report:
        """Intercept and slopes of every expert's log mean in the data's units, then its shape."""
        return report_coef(params.coef, scaling, {"shape": params.shape})

    def from_report(self, values: dict, scaling: Scaling, fixed: dict) -> dict:
        return {"coef": coef_of_report(values, scaling), "shape": values["shape"]}

    # ------------------------------------------------------------ analytic information
    def local_derivatives(self, params: GammaParams, chunk: Chunk, scaling: Scaling):
        """Derivatives of log p_k in (eta, a), eta the log mean, u = y e^{-eta}:

        .. math::  \\partial_\\eta = a (u - 1), \\quad
                   \\partial_a = \\log a + 1 - \\psi(a) + \\log y - \\eta - u, \\quad
                   \\partial^2_{\\eta\\eta} = -a u, \\quad \\partial^2_{\\eta a} = u - 1, \\quad
                   \\partial^2_{aa} = 1 / a - \\psi'(a).
        """
        eta = chunk_eta(params.coef, chunk)  # (K, c), with the offset
        u = chunk.y[0] * torch.exp(-eta)
        a = params.shape.unsqueeze(1)  # (K, 1)
        d_a = torch.log(a) + 1.0 - torch.digamma(a) + _log_y(chunk) - eta - u
        d1 = torch.stack([a * (u - 1.0), d_a], 1)  # (K, 2, c)
        d2 = torch.stack([torch.stack([-a * u, u - 1.0], 1),
                          torch.stack([u - 1.0, (1.0 / a - torch.polygamma(1, a)).expand_as(u)],
                                      1)], 1)  # fmt: skip
        return LocalDerivatives(d1, d2, 1)

    def local_parameters(self, values: dict, scaling: Scaling, fixed: dict):
        """The log mean's coefficients on the standardised design, then the shape."""
        return coef_of_report(values, scaling).unsqueeze(1), values["shape"].unsqueeze(1)

    # ------------------------------------------------------------ censored amounts
    shape_bounds = (SHAPE_MIN, SHAPE_MAX)  # the censored fit's range of the shape

    def interval_terms(self, params: GammaParams, eta: torch.Tensor, lo: torch.Tensor,
                       hi: torch.Tensor, differentiable: bool = False):  # fmt: skip
        """log Pr(lo <= Y <= hi) for 0 <= lo < hi <= inf, (K, c), and the pieces of its
        derivatives in eta (:mod:`moekit.experts.censored_glm`).

        a Y / mu ~ Gamma(a, 1), so with x = a y e^{-eta} the mass is
        P(a, x_hi) - P(a, x_lo) = Q(a, x_lo) - Q(a, x_hi); dx / d eta = -x, so the
        kernels are x f(x) = x^a e^{-x} / Gamma(a) at either end, with c = x - a.
        """
        a = params.shape.unsqueeze(1)  # (K, 1)
        scale = a * torch.exp(-eta)  # (K, c)
        finite = torch.isfinite(hi)
        hi_s = torch.where(finite, hi, torch.zeros_like(hi))  # no inf * 0 in any gradient
        x_lo = lo * scale
        x_hi = torch.where(finite, hi_s * scale, torch.full_like(scale, math.inf))
        a_full = a.expand_as(scale)
        down_lo, up_lo = log_gamma_pq(a_full, x_lo, differentiable)
        down_hi, up_hi = log_gamma_pq(a_full, x_hi, differentiable)
        log_mass = log_difference(up_lo, up_hi, down_hi, down_lo)
        ninf = torch.full_like(log_mass, -math.inf)
        lg = torch.lgamma(a)
        pos = lo > 0
        x_lo_s = torch.where(pos, x_lo, torch.ones_like(x_lo))
        k_lo = torch.where(pos, a * torch.log(x_lo_s) - x_lo_s - lg, ninf)
        x_hi_s = torch.where(finite, x_hi, torch.ones_like(x_hi))
        k_hi = torch.where(finite, a * torch.log(x_hi_s) - x_hi_s - lg, ninf)
        return log_mass, k_lo, k_hi, x_lo - a, torch.where(finite, x_hi, a_full) - a

    def exact_derivatives(self, params: GammaParams, eta: torch.Tensor, y: torch.Tensor):
        """d log p / d eta = a (u - 1) and d^2 / d eta^2 = -a u, u = y e^{-eta}."""
        a = params.shape.unsqueeze(1)
        u = y * torch.exp(-eta)
        return a * (u - 1.0), -a * u

    # ------------------------------------------------------------ prediction
    def moments(self, params: GammaParams, XT: torch.Tensor, offset: torch.Tensor | None = None):
        """Means exp(b_k . x) and standard deviations mean / sqrt(a_k), each (n, K, 1)."""
        mean = torch.exp(linear_predictor(params.coef, XT, offset)).T.unsqueeze(-1)
        return mean, mean / params.shape.sqrt().view(1, -1, 1)

    # ------------------------------------------------------------ model files


def _shape(free: dict[str, torch.Tensor]) -> torch.Tensor:
    # reported values hold the shape itself, free tensors its log
    return free["shape"] if "shape" in free else torch.exp(free["log_shape"])
