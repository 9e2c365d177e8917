"""Poisson GLM experts with a log link: y | x, z = k ~ Poisson(exp(b_k . x)).

The M-step is weighted Poisson regression (IRLS). Its gradient and Hessian,

.. math::  \\nabla_k = \\sum_i r_{ik} (y_i - \\lambda_{ik}) x_i, \\qquad
           H_k = \\sum_i r_{ik} \\lambda_{ik} x_i x_i^T,

use the rates at the current parameters, which the E-step has just computed, so one
Newton (IRLS) step per EM iteration costs no extra pass over the data; the loop
shortens the step in the rare case it lowers the likelihood. A small ridge
``alpha`` on the slopes keeps the fit finite when an expert's region holds only
zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from moekit._core.batch import batched_grams, flat_grams
from moekit._core.data import Chunk, EMData, unpack_grams
from moekit._core.derivatives import LocalDerivatives
from moekit._core.incgamma import log_difference, log_gamma_pq
from moekit._core.reporting import Report, Scaling, coef_from_data, coef_labels, coef_to_data
from moekit._core.validation import check_finite
from moekit.experts._glm import (
    RidgeGLM,
    check_counts,
    chunk_eta,
    chunk_eta_many,
    linear_predictor,
    psd_step,
    ridged,
    row_sums_many,
)  # fmt: skip


@dataclass
class PoissonParams:
    """coef of shape (K, p), the last column the intercept (log rate at the mean x)."""

    coef: torch.Tensor


def _log_factorial(chunk: Chunk) -> torch.Tensor:
    """log y! of the chunk's counts (computed once per fit by ``prepare``)."""
    lg = chunk.data.cache.get("poisson_lgamma")
    return lg[chunk.start : chunk.stop] if lg is not None else torch.lgamma(chunk.y[0] + 1.0)


def start_log_rate(data: EMData) -> float:
    """The intercept of every expert's first step: the log rate of the model without
    features, log(mean y) (at least log 1e-3).

    With an offset o (a log exposure) that model's rate is exp(b + o_i), whose maximum
    likelihood b = log(sum y / sum e^o) is log(mean y) - log(mean e^o): starting there,
    rather than as if o were 0, saves the first Newton steps the travel from
    log(mean y) to it (on R's Insurance claims, 9 columns and an offset, one
    expert converged in 3 EM iterations instead of 9).
    """
    log_mean = math.log(max(float(data.y.mean()), 1e-3))
    if data.offset is None:
        return log_mean
    log_mean_exposure = float(torch.logsumexp(data.offset, 0)) - math.log(data.offset.numel())
    return log_mean - log_mean_exposure


class PoissonExperts(RidgeGLM):
    """K Poisson regressions with a log link.

    Parameters
    ----------
    n_experts : int
    alpha : float
        L2 penalty on the slopes, on the summed log-likelihood scale.
    """

    report_name = "Poisson (log link)"
    monotone = False  # a Newton step; the EM loop checks and shortens it
    params_type = PoissonParams
    predictive_family = "poisson"

    @staticmethod
    def check_target(y2: np.ndarray) -> np.ndarray:
        """One column of non-negative integer counts (ValueError naming the option)."""
        return check_counts(y2, "poisson")

    def prepare(self, data: EMData) -> None:
        # log y! once per fit
        data.cache["poisson_lgamma"] = torch.lgamma(data.y[0] + 1.0)

    def init_params(self, data: EMData) -> PoissonParams:
        return PoissonParams(self.start_coef(data.XeT, start_log_rate(data)))

    def log_prob(self, params: PoissonParams, chunk: Chunk) -> torch.Tensor:
        eta = chunk_eta(params.coef, chunk)  # (K, c)
        rate = torch.exp(eta)
        chunk.scratch["poisson_rate"] = rate
        return eta.mul_(chunk.y[0]).sub_(rate).sub_(_log_factorial(chunk))

    def chunk_stats(self, params, chunk: Chunk, resp: torch.Tensor):
        rate = chunk.scratch.get("poisson_rate")
        if rate is None:  # first M-step: rates at the starting parameters
            self.log_prob(params, chunk)
            rate = chunk.scratch["poisson_rate"]
        wr = resp * rate  # (K, c)
        grad = (resp * chunk.y[0] - wr) @ chunk.XeT.T  # (K, p)
        hess = chunk.weighted_grams(wr, "e")  # every X^T diag(r_k lambda_k) X
        return grad, hess

    def m_step(self, params, stats, data: EMData, resp=None) -> PoissonParams:
        if params is None:
            params = self.init_params(data)
        grad, hess = stats
        H = unpack_grams(hess, grad.shape[1])[0]  # (K, p, p)
        return PoissonParams(params.coef + self._coef_step(params.coef, grad, H))

    def _coef_step(self, coef, grad, H, even: bool = False) -> torch.Tensor:
        """The ridge-penalised Newton step of every expert (``even``: see :func:`psd_step`)."""
        return psd_step(*ridged(coef, grad, H, self.alpha), even)

    # ------------------------------------------------------------ many starts at once
    # S starts stacked on a leading axis (moekit._core.batch): coef (S, K, p)
    batchable = True

    def log_prob_many(self, params: PoissonParams, chunk: Chunk) -> torch.Tensor:
        """:meth:`log_prob` of S stacked starts, shape (S, K, c)."""
        eta = chunk_eta_many(params.coef, chunk)  # (S, K, c), with the offset
        rate = chunk.scratch["poisson_rate_many"] = torch.exp(eta)
        return eta.mul_(chunk.y[0]).sub_(rate).sub_(_log_factorial(chunk))

    def chunk_stats_many(self, params: PoissonParams, chunk: Chunk, resp: torch.Tensor):
        """:meth:`chunk_stats` of S stacked starts (resp (S, K, c)), each stacked."""
        rate = chunk.scratch.get("poisson_rate_many")
        if rate is None:
            self.log_prob_many(params, chunk)
            rate = chunk.scratch["poisson_rate_many"]
        wr = resp * rate  # (S, K, c)
        return row_sums_many(resp * chunk.y[0] - wr, chunk), batched_grams(chunk, wr)

    def m_step_many(self, params: PoissonParams, stats, data: EMData) -> PoissonParams:
        """:meth:`m_step` of S stacked starts; the systems solved at an even size."""
        grad, hess = stats
        S, K, p = params.coef.shape
        coef = params.coef.reshape(S * K, p)
        H = unpack_grams(flat_grams(hess), p)[0]  # (S K, p, p)
        step = self._coef_step(coef, grad.reshape(S * K, p), H, even=True)
        return PoissonParams((coef + step).view(S, K, p))

    def n_parameters(self, params: PoissonParams) -> int:
        return int(params.coef.numel())

    def min_samples(self, params: PoissonParams) -> float:
        return float(params.coef.shape[1])

    def select(self, params: PoissonParams, perm: torch.Tensor) -> PoissonParams:
        """The experts ``perm`` (indices may repeat), as the parameters of len(perm) experts."""
        return PoissonParams(params.coef[perm].contiguous())

    def residuals(self, params: PoissonParams, chunk: Chunk) -> torch.Tensor:
        """Pearson residuals (y - lambda_k) / sqrt(lambda_k), shape (K, 1, c)."""
        rate = torch.exp(chunk_eta(params.coef, chunk))  # (K, c)
        return ((chunk.y[0] - rate) / rate.sqrt()).unsqueeze(1)

    # ------------------------------------------------------------ differentiable view
    def to_free(self, params: PoissonParams) -> dict[str, torch.Tensor]:
        return {"coef": params.coef}

    def from_free(self, free: dict[str, torch.Tensor]) -> PoissonParams:
        return PoissonParams(free["coef"])

    def mean_free(self, free: dict[str, torch.Tensor], XT: torch.Tensor) -> torch.Tensor:
        """Expert rates (K, 1, n) for a design XT (p, n)."""
        return torch.exp(free["coef"] @ XT).unsqueeze(1)

    def log_prob_free(self, free: dict[str, torch.Tensor], XT: torch.Tensor, y: torch.Tensor,
                      offset: torch.Tensor | None = None):  # fmt: skip
        """log p_k(y_i | x_i) = y eta - exp(eta) - log y! of shape (K, n), differentiable."""
        eta = linear_predictor(free["coef"], XT, offset)  # (K, n)
        y = y.reshape(-1)
        return y * eta - torch.exp(eta) - torch.lgamma(y + 1.0)

    # ------------------------------------------------------------ reporting
    def report(self, params: PoissonParams, scaling: Scaling) -> Report:
        """Intercept and slopes of every expert's log rate, in the data's units."""
        labels = coef_labels(scaling)
        out = Report()
        out.add("coef", coef_to_data(params.coef, scaling),
                [f"expert {k}" for k in range(self.n_experts) for _ in labels],
                labels * self.n_experts)  # fmt: skip
        return out

    def from_report(self, values: dict, scaling: Scaling, fixed: dict) -> dict:
        return {"coef": coef_from_data(values["coef"], scaling)}

    # ------------------------------------------------------------ analytic information
    def local_derivatives(self, params: PoissonParams, chunk: Chunk, scaling: Scaling):
        """d log p / d eta = y - lambda and d^2 / d eta^2 = -lambda, eta the log rate."""
        rate = torch.exp(chunk_eta(params.coef, chunk))  # (K, c), with the offset
        d1 = (chunk.y[0] - rate).unsqueeze(1)
        return LocalDerivatives(d1, -rate.view(rate.shape[0], 1, 1, -1), 1)

    def local_parameters(self, values: dict, scaling: Scaling, fixed: dict):
        """The log rate's coefficients on the standardised design; no scalars."""
        coef = coef_from_data(values["coef"], scaling)
        return coef.unsqueeze(1), coef.new_zeros((coef.shape[0], 0))

    # ------------------------------------------------------------ censored counts
    #: what y and y_upper of a censored fit hold: whole counts, both ends included
    interval_support = "counts"

    def interval_terms(self, params: PoissonParams, eta: torch.Tensor, lo: torch.Tensor,
                       hi: torch.Tensor, differentiable: bool = False):  # fmt: skip
        """log Pr(lo <= Y <= hi) of the counts in [lo, hi] (hi may be inf), (K, c), and
        the pieces of its derivatives in eta (:mod:`moekit.experts.censored_glm`).

        With lambda = e^eta, Pr(Y >= j) = P(j, lambda) and Pr(Y <= j) = Q(j + 1, lambda)
        (regularised incomplete gamma functions), so the mass is
        P(lo, lambda) - P(hi + 1, lambda) = Q(hi + 1, lambda) - Q(lo, lambda), and
        d/d lambda P(j, lambda) = pmf(j - 1): the kernels are lambda pmf(lo - 1) and
        lambda pmf(hi), with c = lo - lambda and hi + 1 - lambda.
        """
        lo, hi = torch.ceil(lo), torch.floor(hi)  # the counts inside the ends
        lam = torch.exp(eta)
        up_lo, down_lo = log_gamma_pq(lo, lam, differentiable)  # Pr(Y >= lo), Pr(Y < lo)
        up_hi, down_hi = log_gamma_pq(hi + 1.0, lam, differentiable)  # Pr(Y > hi), Pr(Y <= hi)
        log_mass = log_difference(up_lo, up_hi, down_hi, down_lo)
        finite = torch.isfinite(hi)
        hi_s = torch.where(finite, hi, torch.zeros_like(hi))  # no inf * 0 in any gradient
        lo_s = torch.where(lo > 0, lo, torch.ones_like(lo))
        ninf = torch.full_like(log_mass, -math.inf)
        k_lo = torch.where(lo > 0, lo * eta - lam - torch.lgamma(lo_s), ninf)
        k_hi = torch.where(finite, (hi_s + 1.0) * eta - lam - torch.lgamma(hi_s + 1.0), ninf)
        return log_mass, k_lo, k_hi, lo - lam, hi_s + 1.0 - lam

    def exact_derivatives(self, params: PoissonParams, eta: torch.Tensor, y: torch.Tensor):
        """d log p / d eta = y - lambda and d^2 / d eta^2 = -lambda of observed counts."""
        lam = torch.exp(eta)
        return y - lam, -lam

    # ------------------------------------------------------------ prediction
    def moments(self, params: PoissonParams, XT: torch.Tensor, offset: torch.Tensor | None = None):
        """Rates and their square roots, each (n, K, 1)."""
        rate = torch.exp(linear_predictor(params.coef, XT, offset)).T.unsqueeze(-1)
        return rate, rate.sqrt()

    # ------------------------------------------------------------ model files
    def param_shapes(self, p: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the :class:`PoissonParams` fields for a design of p columns."""
        return {"coef": (self.n_experts, p)}

    def check_params(self, params: PoissonParams, prefix: str = "") -> None:
        """Refuse non-finite coefficients (ValueError naming the field)."""
        check_finite(prefix + "coef", params.coef)
