"""Binomial GLM experts with a logit link, for successes out of trials.

The target is two columns, successes s and failures f (R's ``cbind(s, f)``), with
t = s + f trials; expert k has success probability pi_k(x) = sigmoid(b_k . x):

.. math::  \\log p_k(s \\mid x) = \\log\\binom{t}{s} + s\\,\\eta_k - t \\log(1 + e^{\\eta_k}).

The M-step is one Newton (IRLS) step, exact for the logit link (the observed and
expected information agree):

.. math::  b_k \\leftarrow b_k + \\Big(\\sum_i r_{ik} t_i \\pi_{ik} (1 - \\pi_{ik}) x_i x_i^T
           \\Big)^{-1} \\sum_i r_{ik} (s_i - t_i \\pi_{ik}) x_i,

from sums over rows at the rates the E-step has just computed; the EM loop checks the
likelihood after the step and halves it where it would fall. Predictions are of one
trial: the predictive mixture is of Bernoulli components, whose mean is the
probability of success. Censored and truncated successes
(:mod:`moekit.experts.censored_glm`) take the probabilities of intervals from
``interval_terms``, regularised incomplete beta functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from moekit._core.batch import batched_grams, flat_grams
from moekit._core.data import Chunk, EMData
from moekit._core.derivatives import LocalDerivatives
from moekit._core.incbeta import log_beta_inc
from moekit._core.incgamma import log_difference
from moekit._core.reporting import Report, Scaling
from moekit._core.validation import check_finite
from moekit.experts import _glm
from moekit.experts._glm import (
    RidgeGLM,
    check_columns,
    coef_of_report,
    grams,
    has_weight,
    has_weight_many,
    newton_step,
    newton_step_many,
    report_coef,
)  # fmt: skip


@dataclass
class BinomialParams:
    """coef of shape (K, p), the last column the intercept (log odds at the mean x)."""

    coef: torch.Tensor


def binomial_logpmf(eta, s, t, log_choose):
    """log p of Binomial(t, sigmoid(eta)) at s successes, broadcast, out of place."""
    return log_choose + s * eta - t * F.softplus(eta)


def binomial_logpmf_many(eta, s, t, log_choose):
    """:func:`binomial_logpmf` from exp and log1p alone, for stacked starts.

    softplus(eta) = max(eta, 0) + log1p(e^{-|eta|}): torch's own softplus (and
    sigmoid) round the last elements of a tensor, which its vectorised loop leaves
    to a scalar one, apart from the others, so a start's values would depend on how
    many starts are stacked before it; exp and log1p round alike in both loops.
    """
    softplus = torch.log1p(torch.exp(-eta.abs())).add_(eta.clamp(min=0.0))
    return log_choose + s * eta - t * softplus


def sigmoid_many(eta: torch.Tensor) -> torch.Tensor:
    """1 / (1 + e^{-eta}): the logistic function of stacked starts (as
    :func:`binomial_logpmf_many`, rounded alike wherever an element sits)."""
    return torch.exp(-eta).add_(1.0).reciprocal_()


def _log_choose(chunk: Chunk) -> torch.Tensor:
    cached = chunk.data.cache.get("log_choose")
    if cached is not None:
        return cached[chunk.start : chunk.stop]
    return _log_choose_of(chunk.y)


def _log_choose_of(y: torch.Tensor) -> torch.Tensor:
    s, f = y[0], y[1]
    return torch.lgamma(s + f + 1.0) - torch.lgamma(s + 1.0) - torch.lgamma(f + 1.0)


class BinomialExperts(RidgeGLM):
    """K logistic regressions of successes out of trials.

    Parameters
    ----------
    n_experts : int
    alpha : float
        L2 penalty on the slopes, on the summed log-likelihood scale: it keeps the
        fit finite where an expert's rows separate perfectly.
    """

    report_name = "binomial (logit link)"
    monotone = False  # a Newton step; the EM loop checks and shortens it
    params_type = BinomialParams
    predictive_family = "binomial"
    target_columns = 2  # successes and failures; one output, the probability of success

    @staticmethod
    def check_target(y2: np.ndarray) -> np.ndarray:
        """Two columns of non-negative integer counts with positive totals."""
        check_columns(y2, "binomial", 2, "two columns, successes and failures (R's cbind(s, f))")
        if (y2 < 0).any() or (y2 != np.round(y2)).any():
            raise ValueError(
                "expert='binomial' needs successes and failures that are non-negative "
                "integer counts."
            )
        if (y2.sum(1) <= 0).any():
            raise ValueError(
                f"expert='binomial' needs at least one trial per row; "
                f"{int((y2.sum(1) <= 0).sum())} row(s) have successes + failures = 0."
            )
        return y2

    def prepare(self, data: EMData) -> None:
        data.cache["log_choose"] = _log_choose_of(data.y)

    def init_params(self, data: EMData) -> BinomialParams:
        s, t = float(data.y[0].sum()), float(data.y.sum())
        share = min(max(s / t, 1e-3), 1.0 - 1e-3)
        return BinomialParams(self.start_coef(data.XeT, math.log(share / (1.0 - share))))

    def log_prob(self, params: BinomialParams, chunk: Chunk) -> torch.Tensor:
        eta = _glm.chunk_eta(params.coef, chunk)  # (K, c)
        chunk.scratch["binomial_eta"] = eta
        s, t = chunk.y[0], chunk.y[0] + chunk.y[1]
        return binomial_logpmf(eta, s, t, _log_choose(chunk))

    def chunk_stats(self, params: BinomialParams, chunk: Chunk, resp: torch.Tensor):
        eta = chunk.scratch.get("binomial_eta")
        if eta is None:  # first M-step: at the starting parameters
            eta = _glm.chunk_eta(params.coef, chunk)
        s, t = chunk.y[0], chunk.y[0] + chunk.y[1]
        pi = torch.sigmoid(eta)
        grad = (resp * (s - t * pi)) @ chunk.XeT.T  # (K, p)
        hess = chunk.weighted_grams(resp * t * pi * (1.0 - pi), "e")
        return grad, hess, resp.sum(1)

    def m_step(self, params, stats, data: EMData, resp=None) -> BinomialParams:
        if params is None:
            params = self.init_params(data)
        grad, hess, nk = stats
        step = newton_step(params.coef, grad, grams(hess, grad.shape[1]), self.alpha)
        keep = has_weight(nk)
        return BinomialParams(torch.where(keep[:, None], params.coef + step, params.coef))

    # ------------------------------------------------------------ many starts at once
    # S starts stacked on a leading axis (moekit._core.batch): coef (S, K, p)
    batchable = True

    def log_prob_many(self, params: BinomialParams, chunk: Chunk) -> torch.Tensor:
        """:meth:`log_prob` of S stacked starts, shape (S, K, c)."""
        eta = chunk.scratch["binomial_eta_many"] = _glm.chunk_eta_many(params.coef, chunk)
        s, t = chunk.y[0], chunk.y[0] + chunk.y[1]
        return binomial_logpmf_many(eta, s, t, _log_choose(chunk))

    def chunk_stats_many(self, params: BinomialParams, chunk: Chunk, resp: torch.Tensor):
        """:meth:`chunk_stats` of S stacked starts (resp (S, K, c)), each stacked."""
        eta = chunk.scratch.get("binomial_eta_many")
        if eta is None:
            eta = _glm.chunk_eta_many(params.coef, chunk)
        s, t = chunk.y[0], chunk.y[0] + chunk.y[1]
        pi = sigmoid_many(eta)
        grad = _glm.row_sums_many(resp * (s - t * pi), chunk)  # (S, K, p)
        hess = batched_grams(chunk, resp * t * pi * (1.0 - pi))
        return grad, hess, resp.sum(2)

    def m_step_many(self, params: BinomialParams, stats, data: EMData) -> BinomialParams:
        """:meth:`m_step` of S stacked starts; the systems solved at an even size."""
        grad, hess, nk = stats
        S, K, p = params.coef.shape
        coef = params.coef.reshape(S * K, p)
        step = newton_step_many(coef, grad.reshape(S * K, p), grams(flat_grams(hess), p),
                                self.alpha)  # fmt: skip
        keep = has_weight_many(nk)
        return BinomialParams(torch.where(keep[:, None], coef + step, coef).view(S, K, p))

    def n_parameters(self, params: BinomialParams) -> int:
        return int(params.coef.numel())

    def min_samples(self, params: BinomialParams) -> float:
        return float(params.coef.shape[1])

    def select(self, params: BinomialParams, perm: torch.Tensor) -> BinomialParams:
        """The experts ``perm`` (indices may repeat), as the parameters of len(perm) experts."""
        return BinomialParams(params.coef[perm].contiguous())

    def residuals(self, params: BinomialParams, chunk: Chunk) -> torch.Tensor:
        """Pearson residuals (s - t pi_k) / sqrt(t pi_k (1 - pi_k)), shape (K, 1, c)."""
        pi = torch.sigmoid(_glm.chunk_eta(params.coef, chunk))
        s, t = chunk.y[0], chunk.y[0] + chunk.y[1]
        return ((s - t * pi) / (t * pi * (1.0 - pi)).clamp(min=1e-12).sqrt()).unsqueeze(1)

    # ------------------------------------------------------------ differentiable view
    def to_free(self, params: BinomialParams) -> dict[str, torch.Tensor]:
        return {"coef": params.coef}

    def from_free(self, free: dict[str, torch.Tensor]) -> BinomialParams:
        return BinomialParams(free["coef"])

    def mean_free(self, free: dict[str, torch.Tensor], XT: torch.Tensor) -> torch.Tensor:
        """Expert success probabilities (K, 1, n) for a design XT (p, n)."""
        return torch.sigmoid(free["coef"] @ XT).unsqueeze(1)

    def log_prob_free(self, free: dict[str, torch.Tensor], XT: torch.Tensor, y: torch.Tensor,
                      offset: torch.Tensor | None = None):  # fmt: skip
        """log p_k(s_i | x_i) of shape (K, n), differentiable in ``free``; y is (2, n)."""
        s, t = y[0], y[0] + y[1]
        return binomial_logpmf(
            _glm.linear_predictor(free["coef"], XT, offset), s, t, _log_choose_of(y)
        )

    # ------------------------------------------------------------ reporting
    def report(self, params: BinomialParams, scaling: Scaling) -> Report:
        """Intercept and slopes of every expert's log odds, in the data's units."""
        return report_coef(params.coef, scaling)

    def from_report(self, values: dict, scaling: Scaling, fixed: dict) -> dict:
        return {"coef": coef_of_report(values, scaling)}

    # ------------------------------------------------------------ analytic information
    def local_derivatives(self, params: BinomialParams, chunk: Chunk, scaling: Scaling):
        """d log p / d eta = s - t pi and d^2 / d eta^2 = -t pi (1 - pi), eta the log odds."""
        pi = torch.sigmoid(_glm.chunk_eta(params.coef, chunk))  # (K, c), with the offset
        s, t = chunk.y[0], chunk.y[0] + chunk.y[1]
        d2 = (-t * pi * (1.0 - pi)).view(pi.shape[0], 1, 1, -1)
        return LocalDerivatives((s - t * pi).unsqueeze(1), d2, 1)

    def local_parameters(self, values: dict, scaling: Scaling, fixed: dict):
        """The log odds' coefficients on the standardised design; no scalars."""
        coef = coef_of_report(values, scaling)
        return coef.unsqueeze(1), coef.new_zeros((coef.shape[0], 0))

    # ------------------------------------------------------------ censored successes
    #: what y and y_upper of a censored fit hold: whole counts, both ends included
    interval_support = "counts"

    def interval_terms(self, params: BinomialParams, eta: torch.Tensor, lo: torch.Tensor,
                       hi: torch.Tensor, differentiable: bool = False,
                       point: torch.Tensor | None = None):  # fmt: skip
        """log Pr(lo <= S <= hi) of the successes in [lo, hi] out of t = s + f trials
        (``point`` (2, c): the rows' s and f), (K, c), and the pieces of its
        derivatives in eta (:mod:`moekit.experts.censored_glm`):
        (log m, log k_lo, log k_hi, c_lo, c_hi).

        With p = sigmoid(eta) and q = 1 - p, Pr(S >= j) = I_p(j, t - j + 1) and
        Pr(S <= j - 1) = I_q(t - j + 1, j) (:mod:`moekit._core.incbeta`; 1 and 0 at
        j = 0, 0 and 1 at j = t + 1), so the mass is I_p(lo, t - lo + 1) -
        I_p(hi + 1, t - hi), read on the side whose terms are tail probabilities
        (``log_difference``). With dp/d eta = p q, its derivative in eta is
        k_lo - k_hi at j = lo and j = hi + 1,

        .. math::  k_j = \\frac{p^j q^{t - j + 1}}{B(j, t - j + 1)} = j q \\Pr(S = j),
                   \\qquad \\frac{d \\log k_j}{d \\eta} = c_j = j - (t + 1) p.
        """
        t = point[0] + point[1]  # (c,)
        # the counts inside the ends, within the support [0, t]
        lo = torch.minimum(torch.ceil(lo).clamp(min=0.0), t)
        hi = torch.minimum(torch.floor(hi), t)
        c = eta.shape[1]
        p, q = torch.sigmoid(eta), torch.sigmoid(-eta)  # each to all its digits
        # both ends in one call, (K, 2c)
        ends = torch.cat([lo, hi + 1.0]).expand(eta.shape[0], -1)
        rest = torch.cat([t, t]) + 1.0 - ends
        down, up, front = log_beta_inc(ends, rest, p.repeat(1, 2), q.repeat(1, 2),
                                       differentiable, front=True)  # fmt: skip
        # down: log Pr(S >= j), up: log Pr(S <= j - 1)
        log_mass = log_difference(down[:, :c], down[:, c:], up[:, c:], up[:, :c])
        ninf = torch.full_like(log_mass, -math.inf)
        k_lo = torch.where(lo > 0, front[:, :c], ninf)
        k_hi = torch.where(hi < t, front[:, c:], ninf)
        return log_mass, k_lo, k_hi, lo - (t + 1.0) * p, hi + 1.0 - (t + 1.0) * p

    def exact_derivatives(self, params: BinomialParams, eta: torch.Tensor, y: torch.Tensor):
        """d log p / d eta = s - t pi and d^2 / d eta^2 = -t pi (1 - pi) of observed
        successes (y (2, c): s and f)."""
        pi = torch.sigmoid(eta)
        t = y[0] + y[1]
        return y[0] - t * pi, -t * pi * (1.0 - pi)

    # ------------------------------------------------------------ prediction
    def moments(self, params: BinomialParams, XT: torch.Tensor, offset: torch.Tensor | None = None):
        """Success probabilities pi_k(x) and sqrt(pi_k (1 - pi_k)) of one trial, (n, K, 1)."""
        pi = torch.sigmoid(_glm.linear_predictor(params.coef, XT, offset)).T.unsqueeze(-1)
        return pi, (pi * (1.0 - pi)).sqrt().clamp(min=1e-150)

    # ------------------------------------------------------------ model files
    def param_shapes(self, p: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the :class:`BinomialParams` fields for a design of p columns."""
        return {"coef": (self.n_experts, p)}

    def check_params(self, params: BinomialParams, prefix: str = "") -> None:
        """Refuse non-finite coefficients (ValueError naming the field)."""
        check_finite(prefix + "coef", params.coef)
