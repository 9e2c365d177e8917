"""Negative binomial (NB2) experts with a log link, for over-dispersed counts.

y | x, z = k has mean mu_k = exp(b_k . x) and variance mu_k + phi_k mu_k^2; with
theta = 1 / phi,

.. math::  \\log p_k(y \\mid x) = \\log\\Gamma(y + \\theta) - \\log\\Gamma(\\theta)
           - \\log y! - (\\theta + y) \\log(1 + \\phi\\mu) + y \\log(\\phi\\mu),

the Poisson as phi -> 0 (a Gamma-mixed Poisson: MASS's ``glm.nb``). The M-step
takes, from sums over rows at the current parameters, one Fisher scoring (IRLS)
step on the coefficients,

.. math::  b_k \\leftarrow b_k + \\Big(\\sum_i r_{ik} w_{ik} x_i x_i^T\\Big)^{-1}
           \\sum_i r_{ik} \\frac{y_i - \\mu_{ik}}{1 + \\phi_k \\mu_{ik}} x_i, \\qquad
           w_{ik} = \\frac{\\mu_{ik}}{1 + \\phi_k \\mu_{ik}},

and one guarded Newton step on log phi_k from the first and second derivatives of
Q's dispersion part (sums of digamma and trigamma terms), at most a factor e^2 and
inside [``DISPERSION_MIN``, ``DISPERSION_MAX``]. The EM loop checks the likelihood
after the step and shortens it where it would fall. At ``DISPERSION_MIN`` an
expert is a Poisson to within about y^2 phi / 2 nats per row. Censored and truncated
counts (:mod:`moekit.experts.censored_glm`) take the probabilities of intervals of
counts from ``interval_terms``, regularised incomplete beta functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from moekit._core.batch import (
    batched_grams,
    design_sums,
    empty_experts,
    flat_grams,
    times_design,
)
from moekit._core.data import Chunk, EMData
from moekit._core.derivatives import LocalDerivatives
from moekit._core.incbeta import log_beta, log_beta_inc
from moekit._core.incgamma import log_difference
from moekit._core.linalg import even_system, solve_psd
from moekit._core.reporting import Report, Scaling
from moekit._core.validation import check_finite
from moekit.experts import _nb_pass as _pass
from moekit.experts._glm import (
    MAX_ETA_STEP,
    RidgeGLM,
    check_counts,
    chunk_eta,
    coef_of_report,
    grams,
    guarded_newton_1d,
    has_weight,
    linear_predictor,
    newton_step,
    report_coef,
)  # fmt: skip
from moekit.experts.poisson import start_log_rate

DISPERSION_MIN, DISPERSION_MAX = 1e-8, 1e4


@dataclass
class NegativeBinomialParams:
    """coef of shape (K, p), the last column the intercept (log mean); dispersion phi_k (K,)."""

    coef: torch.Tensor
    dispersion: torch.Tensor


def nb_logpmf(eta, y, phi):
    """log p of NB2(mean e^eta, dispersion phi) at the counts y, broadcast, out of place.

    .. math::  \\log p = -\\log(\\theta + y) - \\log B(\\theta, y + 1)
               - (\\theta + y) \\log(1 + \\phi \\mu) + y \\log(\\phi \\mu),
               \\qquad \\theta = 1 / \\phi,

    the binomial coefficient Gamma(y + theta) / (Gamma(theta) y!) through
    :func:`~moekit._core.incbeta.log_beta`, whose Stirling branch keeps its digits
    where theta is large (near the Poisson limit lgamma(y + theta) - lgamma(theta)
    loses about 2e-7 per row at theta = 1e8, enough to spoil a Hessian in phi).
    """
    theta = 1.0 / phi
    l1p = torch.log1p(phi * torch.exp(eta))
    return (-torch.log(theta + y) - log_beta(theta, y + 1.0) - (theta + y) * l1p
            + y * (torch.log(phi) + eta))  # fmt: skip


COUNT_TABLE_MAX = 2**20
"""Largest count whose sums over j < y are read from a table of cumulative sums."""


def count_sums(y: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """T_1 = sum_{j<y} j / (1 + j phi) and T_2 = sum_{j<y} (j / (1 + j phi))^2, (K, c).

    Read from cumulative sums over j = 0..max(y) - 1 (one table per expert), exact
    for integer counts; past ``COUNT_TABLE_MAX`` from digamma and trigamma functions
    of theta = 1 / phi (T_1 = theta y - theta^2 (psi(y + theta) - psi(theta))).
    """
    K = phi.shape[0]
    top = int(y.max()) if y.numel() else 0
    if top <= COUNT_TABLE_MAX:
        j = torch.arange(top, dtype=phi.dtype, device=phi.device)
        a = j / (1.0 + j * phi)  # (K, top)
        zero = a.new_zeros((K, 1))
        idx = y.long().unsqueeze(0).expand(K, -1)
        t1 = torch.cat([zero, a.cumsum(1)], 1).gather(1, idx)
        t2 = torch.cat([zero, (a * a).cumsum(1)], 1).gather(1, idx)
        return t1, t2
    theta = 1.0 / phi
    D1 = torch.digamma(y + theta) - torch.digamma(theta)
    D2 = torch.polygamma(1, theta) - torch.polygamma(1, y + theta)
    return theta * y - theta**2 * D1, theta**2 * (y - 2.0 * theta * D1 + theta**2 * D2)


_SERIES_BELOW = 0.05
_N = torch.arange(14, dtype=torch.float64)
_H1 = ((-1.0) ** _N * (_N + 1) / (_N + 2)).tolist()  # h_1's Taylor coefficients
_H2 = ((-1.0) ** (_N + 1) * (_N + 2 / (_N + 3))).tolist()  # h_2's


def log1p_ratios(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h_1(x) = (log(1+x) - x/(1+x)) / x^2 and
    h_2(x) = -2 log(1+x) / x^3 + 2 / (x^2 (1+x)) + 1 / (x (1+x)^2), for x >= 0.

    Below x = 0.05 by their Taylor series, sum_n (-1)^n (n+1)/(n+2) x^n and
    sum_n (-1)^(n+1) (n + 2/(n+3)) x^n (14 terms: an error below 1e-18), as the
    closed forms cancel to about eps / x^2 there.
    """
    small = x < _SERIES_BELOW
    xs = torch.where(small, x, torch.zeros_like(x))
    s1, s2 = torch.zeros_like(x), torch.zeros_like(x)
    for c1, c2 in zip(reversed(_H1), reversed(_H2), strict=True):  # Horner
        s1 = s1 * xs + c1
        s2 = s2 * xs + c2
    xl = torch.where(small, torch.ones_like(x), x)
    lg, inv = torch.log1p(xl), 1.0 / (1.0 + xl)
    c1 = (lg - xl * inv) / (xl * xl)
    c2 = -2.0 * lg / xl**3 + 2.0 * inv / (xl * xl) + inv * inv / xl
    return torch.where(small, s1, c1), torch.where(small, s2, c2)


def _even_newton_step(coef, grad, H, alpha: float) -> torch.Tensor:
    """:func:`moekit.experts._glm.newton_step` with its systems grown to an even size
    (:func:`moekit._core.linalg.even_system`), as for a batch of several fits."""
    p = coef.shape[1]
    pen = coef.new_ones(p)
    pen[-1] = 0.0
    H = H + alpha * torch.diag(pen)
    g = grad - alpha * coef * pen
    step = solve_psd(*even_system(H, g.unsqueeze(-1), 0.0))[:, :p, 0]
    longest = step.abs().amax(1, keepdim=True)
    return step * (MAX_ETA_STEP / longest.clamp(min=MAX_ETA_STEP))


def _updated(params, step, d1, d2, keep) -> NegativeBinomialParams:
    """The coefficients' Newton step and the guarded step on log phi, for the experts
    ``keep`` (an expert without weight keeps its parameters)."""
    coef = torch.where(keep[:, None], params.coef + step, params.coef)
    log_phi = guarded_newton_1d(torch.log(params.dispersion), d1, d2,
                                math.log(DISPERSION_MIN), math.log(DISPERSION_MAX))  # fmt: skip
    return NegativeBinomialParams(coef, torch.where(keep, torch.exp(log_phi), params.dispersion))


class NegativeBinomialExperts(RidgeGLM):
    """K negative binomial (NB2) regressions with a log link and a dispersion per expert.

    Parameters
    ----------
    n_experts : int
    alpha : float
        L2 penalty on the slopes, on the summed log-likelihood scale.
    """

    report_name = "negative binomial (NB2, log link)"
    monotone = False  # Newton steps; the EM loop checks and shortens them
    params_type = NegativeBinomialParams
    predictive_family = "negative_binomial"

    @staticmethod
    def check_target(y2: np.ndarray) -> np.ndarray:
        """One column of non-negative integer counts (ValueError naming the option)."""
        return check_counts(y2, "negative_binomial")

    def prepare(self, data: EMData) -> None:
        data.cache["lgamma_y1"] = torch.lgamma(data.y[0] + 1.0)
        top = int(data.y[0].max()) if data.n else 0
        # the counts as indices of per-expert tables of sums over j < y
        # (moekit.experts._nb_pass.count_tables)
        data.cache["nb_counts"] = data.y[0].long() if top <= COUNT_TABLE_MAX else None
        data.cache["nb_top"] = top

    def init_params(self, data: EMData) -> NegativeBinomialParams:
        # the Poisson limit's intercept-only maximum, with the offset in it
        coef = self.start_coef(data.XeT, start_log_rate(data))
        return NegativeBinomialParams(coef, data.XeT.new_full((self.n_experts,), 0.1))

    def log_prob(self, params: NegativeBinomialParams, chunk: Chunk) -> torch.Tensor:
        eta = chunk_eta(params.coef, chunk)  # (K, c), fresh: it becomes log p in place
        K, c = eta.shape
        ws = chunk.data.workspace  # reused buffers: a new (K, c) tensor costs page faults
        phi = params.dispersion.unsqueeze(1)
        mu = torch.exp(eta, out=ws("nb:mu", K, c)[:K, :c])
        l1p = torch.mul(mu, phi, out=ws("nb:l1p", K, c)[:K, :c]).log1p_()
        # the buffers hold this chunk's rows until the next log_prob: a token says whose
        token = chunk.data.cache["nb_token"] = object()
        chunk.scratch["nb"] = (mu, l1p, token)
        base = _pass.base_terms(chunk, params.dispersion, phi, ws("nb:base", K, c)[:K, :c])
        return _pass.log_density(eta, l1p, chunk.y[0], phi, base)

    def chunk_stats(self, params: NegativeBinomialParams, chunk: Chunk, resp: torch.Tensor):
        """The coefficients' gradient (K, p) and weighted Grams, the first and second
        derivatives of Q in log phi_k (K,) each, and n_k (K,)."""
        kept = chunk.scratch.pop("nb", None)
        if kept is None or chunk.data.cache.get("nb_token") is not kept[2]:
            self.log_prob(params, chunk)  # first M-step: at the starting parameters
            kept = chunk.scratch.pop("nb")
        mu, l1p, _ = kept  # l1p is overwritten below
        K, c = mu.shape
        phi = params.dispersion.unsqueeze(1)

        def buffer(name: str) -> torch.Tensor:
            return chunk.data.workspace(name, K, c)[:K, :c]

        inv, u, h = _pass.coef_weights(mu, phi, resp, chunk.y[0], buffer)
        grad = u @ chunk.XeT.T  # (K, p)
        hess = chunk.weighted_grams(h, "e")
        sums = _pass.weighted_count_sums(resp, chunk, params.dispersion, phi)
        d1, d2 = _pass.dispersion_derivatives(inv, u, h, l1p, resp, phi, *sums)
        return grad, hess, d1, d2, resp.sum(1)

    def m_step(self, params, stats, data: EMData, resp=None) -> NegativeBinomialParams:
        if params is None:
            params = self.init_params(data)
        grad, hess, d1, d2, nk = stats
        step = newton_step(params.coef, grad, grams(hess, grad.shape[1]), self.alpha)
        return _updated(params, step, d1, d2, has_weight(nk))

    # ------------------------------------------------------------ many starts at once
    # S starts stacked on a leading axis (moekit._core.batch): coef (S, K, p), dispersion (S, K)
    batchable = True

    def log_prob_many(self, params: NegativeBinomialParams, chunk: Chunk) -> torch.Tensor:
        """:meth:`log_prob` of S stacked starts, shape (S, K, c)."""
        eta = times_design(params.coef, chunk.XeT).contiguous()  # (S, K, c)
        if chunk.offset is not None:
            eta.add_(chunk.offset)
        phi = params.dispersion.unsqueeze(2)  # (S, K, 1)
        mu = torch.exp(eta)
        l1p = _pass.log1p_in_lanes(mu, phi)
        chunk.scratch["nb_many"] = (mu, l1p)
        base = _pass.base_terms(chunk, params.dispersion.reshape(-1), phi, torch.empty_like(eta))
        return _pass.log_density(eta, l1p, chunk.y[0], phi, base)

    def chunk_stats_many(self, params: NegativeBinomialParams, chunk: Chunk, resp: torch.Tensor):
        """:meth:`chunk_stats` of S stacked starts (resp (S, K, c)), each stacked."""
        if "nb_many" not in chunk.scratch:
            self.log_prob_many(params, chunk)
        mu, l1p = chunk.scratch.pop("nb_many")
        phi = params.dispersion.unsqueeze(2)
        inv, u, h = _pass.coef_weights(mu, phi, resp, chunk.y[0], lambda name: torch.empty_like(mu))
        grad = design_sums(u, chunk.XeT)  # (S, K, p)
        hess = batched_grams(chunk, h)
        sums = _pass.weighted_count_sums(resp, chunk, params.dispersion.reshape(-1), phi)
        d1, d2 = _pass.dispersion_derivatives(inv, u, h, l1p, resp, phi, *sums)
        return grad, hess, d1, d2, resp.sum(2)

    def log_prior_many(self, params: NegativeBinomialParams) -> torch.Tensor:
        """:meth:`log_prior` of S stacked starts, shape (S,)."""
        return -0.5 * self.alpha * (params.coef[..., :-1] ** 2).sum((1, 2))

    def m_step_many(self, params: NegativeBinomialParams, stats, data: EMData):
        """:meth:`m_step` of S stacked starts, each start's systems grown to an even size."""
        grad, hess, d1, d2, nk = stats
        S, K, p = params.coef.shape
        flat = NegativeBinomialParams(params.coef.reshape(S * K, p),
                                      params.dispersion.reshape(S * K))  # fmt: skip
        step = _even_newton_step(flat.coef, grad.reshape(S * K, p), grams(flat_grams(hess), p),
                                 self.alpha)  # fmt: skip
        keep = ~empty_experts(nk.reshape(-1), K)
        new = _updated(flat, step, d1.reshape(-1), d2.reshape(-1), keep)
        return NegativeBinomialParams(new.coef.view(S, K, p), new.dispersion.view(S, K))

    def n_parameters(self, params: NegativeBinomialParams) -> int:
        return int(params.coef.numel() + params.dispersion.numel())

    def min_samples(self, params: NegativeBinomialParams) -> float:
        return float(params.coef.shape[1] + 1)

    def select(self, params: NegativeBinomialParams, perm: torch.Tensor):
        """The experts ``perm`` (indices may repeat), as the parameters of len(perm) experts."""
        return NegativeBinomialParams(params.coef[perm].contiguous(),
                                      params.dispersion[perm].contiguous())  # fmt: skip

    def residuals(self, params: NegativeBinomialParams, chunk: Chunk) -> torch.Tensor:
        """Pearson residuals (y - mu_k) / sqrt(mu_k + phi_k mu_k^2), shape (K, 1, c)."""
        mu = torch.exp(chunk_eta(params.coef, chunk))
        var = mu + params.dispersion.unsqueeze(1) * mu * mu
        return ((chunk.y[0] - mu) / var.sqrt()).unsqueeze(1)

    # ------------------------------------------------------------ differentiable view
    def to_free(self, params: NegativeBinomialParams) -> dict[str, torch.Tensor]:
        return {"coef": params.coef, "log_dispersion": torch.log(params.dispersion)}

    def from_free(self, free: dict[str, torch.Tensor]) -> NegativeBinomialParams:
        return NegativeBinomialParams(free["coef"], _dispersion(free))

    def mean_free(self, free: dict[str, torch.Tensor], XT: torch.Tensor) -> torch.Tensor:
        """Expert means (K, 1, n) for a design XT (p, n)."""
        return torch.exp(free["coef"] @ XT).unsqueeze(1)

    def log_prob_free(self, free: dict[str, torch.Tensor], XT: torch.Tensor, y: torch.Tensor,
                      offset: torch.Tensor | None = None):  # fmt: skip
        """log p_k(y_i | x_i) of shape (K, n), differentiable in ``free``."""
        y = y.reshape(-1)
        eta = linear_predictor(free["coef"], XT, offset)
        return nb_logpmf(eta, y, _dispersion(free).unsqueeze(1))

    # ------------------------------------------------------------ reporting
    def report(self, params: NegativeBinomialParams, scaling: Scaling) -> Report:
        """Intercept and slopes of every expert's log mean in the data's units, then its
        dispersion phi (variance mu + phi mu^2)."""
        return report_coef(params.coef, scaling, {"dispersion": params.dispersion})

    def from_report(self, values: dict, scaling: Scaling, fixed: dict) -> dict:
        return {"coef": coef_of_report(values, scaling), "dispersion": values["dispersion"]}

    # ------------------------------------------------------------ analytic information
    def local_derivatives(self, params: NegativeBinomialParams, chunk: Chunk, scaling: Scaling):
        """Derivatives of log p_k in (eta, phi), eta the log mean, x = phi mu:

        .. math::  \\partial_\\eta = \\frac{y - \\mu}{1 + x}, \\quad
                   \\partial^2_{\\eta\\eta} = -\\frac{\\mu (1 + \\phi y)}{(1 + x)^2}, \\quad
                   \\partial^2_{\\eta\\phi} = -\\frac{(y - \\mu) \\mu}{(1 + x)^2},

        and, from log p = sum_{j<y} log(1 + j phi) - (1/phi + y) log(1 + x) + y eta - log y!,

        .. math::  \\partial_\\phi = T_1 + \\mu^2 h_1(x) - \\frac{y\\mu}{1 + x}, \\quad
                   \\partial^2_{\\phi\\phi} = -T_2 + \\mu^3 h_2(x) + \\frac{y\\mu^2}{(1 + x)^2},

        T_1 = sum_{j<y} j / (1 + j phi), T_2 = sum_{j<y} j^2 / (1 + j phi)^2
        (:func:`count_sums`) and h_1, h_2 (:func:`log1p_ratios`) written so that
        nothing cancels as phi goes to 0, where the forms in digamma functions of
        1 / phi lose every digit (their second derivative in phi is theta^4 times a
        difference of trigammas).
        """
        eta = chunk_eta(params.coef, chunk)  # (K, c), with the offset
        y, phi = chunk.y[0], params.dispersion.unsqueeze(1)
        mu = torch.exp(eta)
        x = phi * mu
        denom = 1.0 + x
        t1, t2 = count_sums(y, phi)
        h1, h2 = log1p_ratios(x)
        cross = -(y - mu) * mu / denom**2
        d1 = torch.stack([(y - mu) / denom, t1 + mu * mu * h1 - y * mu / denom], 1)  # (K, 2, c)
        d2 = torch.stack([torch.stack([-mu * (1.0 + phi * y) / denom**2, cross], 1),
                          torch.stack([cross, -t2 + mu**3 * h2 + y * mu * mu / denom**2], 1)],
                         1)  # fmt: skip
        return LocalDerivatives(d1, d2, 1)

    def local_parameters(self, values: dict, scaling: Scaling, fixed: dict):
        """The log mean's coefficients on the standardised design, then the dispersion."""
        return coef_of_report(values, scaling).unsqueeze(1), values["dispersion"].unsqueeze(1)

    # ------------------------------------------------------------ censored counts
    #: the parameter a censored fit maximises in one dimension, in its log
    shape_field = "dispersion"
    shape_bounds = (DISPERSION_MIN, DISPERSION_MAX)
    #: what y and y_upper of a censored fit hold: whole counts, both ends included
    interval_support = "counts"

    def interval_terms(self, params: NegativeBinomialParams, eta: torch.Tensor, lo: torch.Tensor,
                       hi: torch.Tensor, differentiable: bool = False):  # fmt: skip
        """log Pr(lo <= Y <= hi) of the counts in [lo, hi] (hi may be inf), (K, c), and
        the pieces of its derivatives in eta (:mod:`moekit.experts.censored_glm`):
        (log m, log k_lo, log k_hi, c_lo, c_hi).

        With p = 1 / (1 + phi mu), theta = 1 / phi and q = 1 - p, Pr(Y <= k) =
        I_p(theta, k + 1) and Pr(Y >= j) = I_q(j, theta) (:mod:`moekit._core.incbeta`),
        so the mass is I_p(theta, hi + 1) - I_p(theta, lo) = I_q(lo, theta) -
        I_q(hi + 1, theta), read on the side whose terms are tail probabilities
        (``log_difference``). With dp/d eta = -p q, its derivative in eta is
        k_lo - k_hi at j = lo and j = hi + 1,

        .. math::  k_j = \\frac{p^\\theta q^j}{B(\\theta, j)} = j \\Pr(Y = j), \\qquad
                   \\frac{d \\log k_j}{d \\eta} = c_j = p (j - \\mu),

        the front factors of the incomplete beta functions (in the limit phi -> 0, the
        Poisson's lambda pmf(j - 1) = j pmf(j)).
        """
        lo, hi = torch.ceil(lo), torch.floor(hi)  # the counts inside the ends
        phi = params.dispersion.unsqueeze(1)  # (K, 1)
        c = eta.shape[1]
        x = phi * torch.exp(eta)  # phi mu
        # q = 1 - p to all its digits where p is near 1 (and 1, not NaN, at mu = inf)
        p, q = 1.0 / (1.0 + x), torch.where(x > 1.0, 1.0 / (1.0 + 1.0 / x), x / (1.0 + x))
        # both ends in one call, (K, 2c)
        ends = torch.cat([lo, hi + 1.0]).expand(eta.shape[0], -1)
        down, up, front = log_beta_inc((1.0 / phi).expand_as(ends), ends, p.repeat(1, 2),
                                       q.repeat(1, 2), differentiable, front=True)  # fmt: skip
        log_mass = log_difference(up[:, :c], up[:, c:], down[:, c:], down[:, :c])
        ninf = torch.full_like(log_mass, -math.inf)
        finite = torch.isfinite(hi)
        k_lo = torch.where(lo > 0, front[:, :c], ninf)
        k_hi = torch.where(finite, front[:, c:], ninf)
        hi_s = torch.where(finite, hi, torch.zeros_like(hi))  # no inf * 0
        mu = torch.exp(eta)
        return log_mass, k_lo, k_hi, p * (lo - mu), p * (hi_s + 1.0 - mu)

    def exact_derivatives(self, params: NegativeBinomialParams, eta: torch.Tensor,
                          y: torch.Tensor):  # fmt: skip
        """d log p / d eta = (y - mu) / (1 + phi mu) and
        d^2 / d eta^2 = -mu (1 + phi y) / (1 + phi mu)^2 of observed counts."""
        phi = params.dispersion.unsqueeze(1)
        mu = torch.exp(eta)
        denom = 1.0 + phi * mu
        return (y - mu) / denom, -mu * (1.0 + phi * y) / denom**2

    # ------------------------------------------------------------ prediction
    def moments(
        self, params: NegativeBinomialParams, XT: torch.Tensor, offset: torch.Tensor | None = None
    ):
        """Means and standard deviations sqrt(mu + phi mu^2), each (n, K, 1)."""
        mean = torch.exp(linear_predictor(params.coef, XT, offset)).T  # (n, K)
        var = mean + params.dispersion.view(1, -1) * mean**2
        return mean.unsqueeze(-1), var.sqrt().unsqueeze(-1)

    # ------------------------------------------------------------ model files
    def param_shapes(self, p: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the :class:`NegativeBinomialParams` fields for a design of p columns."""
        return {"coef": (self.n_experts, p), "dispersion": (self.n_experts,)}

    def check_params(self, params: NegativeBinomialParams, prefix: str = "") -> None:
        """Refuse non-finite coefficients and dispersions that are not positive and finite."""
        check_finite(prefix + "coef", params.coef)
        d = params.dispersion
        if not bool((torch.isfinite(d) & (d > 0)).all()):
            raise ValueError(
                f"{prefix + 'dispersion'!r} holds dispersions that are not positive and finite"
            )


def _dispersion(free: dict[str, torch.Tensor]) -> torch.Tensor:
    # reported values hold the dispersion itself, free tensors its log
    return free["dispersion"] if "dispersion" in free else torch.exp(free["log_dispersion"])
