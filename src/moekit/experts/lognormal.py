"""Lognormal experts: log y | x, z = k ~ N(b_k . x, sigma_k^2), for positive amounts.

.. math::  \\log p_k(y \\mid x) = \\log N(\\log y;\\ b_k^\\top x,\\ \\sigma_k^2) - \\log y.

The M-step is exact: weighted least squares on log y,

.. math::  b_k = (X^T R_k X)^{-1} X^T R_k \\log y, \\qquad
           \\sigma_k^2 = \\max\\Big(\\frac{\\sum_i r_{ik} (\\log y_i - b_k^\\top x_i)^2}
                                   {\\sum_i r_{ik}}, \\; \\text{floor}\\Big),

from the weighted Gram matrix and the sums of r_ik x_i log y_i and r_ik (log y_i)^2.
The Jacobian term -log y does not depend on the parameters. The floor is on the
log scale, where sigma is a relative spread: 1e-4 keeps every expert's spread above
1% of its median.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moekit._core.batch import batched_grams, flat_grams, times_design
from moekit._core.data import Chunk, EMData
from moekit._core.logspace import gaussian_logpdf
from moekit._core.reporting import Report, Scaling
from moekit._core.validation import check_finite
from moekit.experts._glm import (
    check_positive,
    coef_of_report,
    grams,
    has_weight,
    has_weight_many,
    report_coef,
    row_sums_many,
)  # fmt: skip
from moekit.experts.gaussian import log_excess_var, normal_derivatives, weighted_least_squares


@dataclass
class LogNormalParams:
    """coef of shape (K, p), the last column the intercept (of log y); var (K,), on log y."""

    coef: torch.Tensor
    var: torch.Tensor


def _log_y(chunk: Chunk) -> torch.Tensor:
    cached = chunk.data.cache.get("log_y")
    return cached[chunk.start : chunk.stop] if cached is not None else torch.log(chunk.y[0])


class LogNormalExperts:
    """K lognormal regressions (linear-Gaussian on log y).

    Parameters
    ----------
    n_experts : int
    var_floor : float
        Smallest variance of log y an expert may take.
    """

    report_name = "lognormal"
    monotone = True  # exact weighted least squares
    needs_resp = False
    single_optimum = True  # alone, a concave (or closed-form) fit: K = 1 needs one start
    params_type = LogNormalParams
    predictive_family = "lognormal"
    standardize_target = False
    target_columns = 1

    def __init__(self, n_experts: int, var_floor: float = 1e-4) -> None:
        self.n_experts = n_experts
        self.var_floor = var_floor

    @staticmethod
    def check_target(y2: np.ndarray) -> np.ndarray:
        """One column of positive values (ValueError naming the option otherwise)."""
        return check_positive(y2, "lognormal")

    def prepare(self, data: EMData) -> None:
        data.cache["log_y"] = torch.log(data.y[0])

    def log_prob(self, params: LogNormalParams, chunk: Chunk) -> torch.Tensor:
        log_y = _log_y(chunk)
        resid = torch.addmm(log_y.unsqueeze(0), params.coef, chunk.XeT, alpha=-1.0)  # (K, c)
        return gaussian_logpdf(resid, params.var.unsqueeze(1), inplace=True).sub_(log_y)

    def chunk_stats(self, params, chunk: Chunk, resp: torch.Tensor):
        log_y = _log_y(chunk)
        rz = resp * log_y  # (K, c)
        return chunk.weighted_grams(resp, "e"), rz @ chunk.XeT.T, (rz * log_y).sum(1)

    def m_step(self, params, stats, data: EMData, resp=None) -> LogNormalParams:
        hess, xtz, ztz = stats
        gram = grams(hess, xtz.shape[1])
        nk = gram[:, -1, -1]  # the intercept's product with itself: sum_i r_ik
        return self._solve(params, gram, xtz, ztz, nk, has_weight(nk))

    def _solve(self, params, gram, xtz, ztz, nk, keep, even: bool = False) -> LogNormalParams:
        """Weighted least squares of every expert that holds weight (``keep``); ``even``:
        systems of even size (:func:`weighted_least_squares`), as for several fits."""
        coef, var = weighted_least_squares(gram, xtz.unsqueeze(1), ztz.unsqueeze(1), nk,
                                           self.var_floor, even)  # fmt: skip
        coef, var = coef[:, 0], var[:, 0]
        if params is not None:
            coef = torch.where(keep[:, None], coef, params.coef)
            var = torch.where(keep, var, params.var)
        else:
            var = torch.where(keep, var, torch.ones_like(var))
        return LogNormalParams(coef.contiguous(), var)

    # ------------------------------------------------------------ many starts at once
    # S starts stacked on a leading axis (moekit._core.batch): coef (S, K, p), var (S, K)
    batchable = True

    def log_prob_many(self, params: LogNormalParams, chunk: Chunk) -> torch.Tensor:
        """:meth:`log_prob` of S stacked starts, shape (S, K, c)."""
        log_y = _log_y(chunk)
        resid = times_design(params.coef, chunk.XeT, log_y.unsqueeze(0), alpha=-1.0)
        return gaussian_logpdf(resid, params.var.unsqueeze(2), inplace=True).sub_(log_y)

    def chunk_stats_many(self, params, chunk: Chunk, resp: torch.Tensor):
        """:meth:`chunk_stats` of S stacked starts (resp (S, K, c)), each stacked."""
        log_y = _log_y(chunk)
        rz = resp * log_y  # (S, K, c)
        return batched_grams(chunk, resp), row_sums_many(rz, chunk), (rz * log_y).sum(2)

    def m_step_many(self, params: LogNormalParams, stats, data: EMData) -> LogNormalParams:
        """:meth:`m_step` of S stacked starts; the systems solved at an even size."""
        hess, xtz, ztz = stats
        S, K, p = params.coef.shape
        gram = grams(flat_grams(hess), p)  # (S K, p, p)
        nk = gram[:, -1, -1]
        flat = LogNormalParams(params.coef.reshape(S * K, p), params.var.reshape(S * K))
        new = self._solve(flat, gram, xtz.reshape(S * K, p), ztz.reshape(-1), nk,
                          has_weight_many(nk.view(S, K)), even=True)  # fmt: skip
        return LogNormalParams(new.coef.view(S, K, p), new.var.view(S, K))

    def log_prior_many(self, params: LogNormalParams) -> torch.Tensor:
        return params.var.new_zeros(params.var.shape[0])

    def log_prior(self, params: LogNormalParams) -> float:
        return 0.0

    def n_parameters(self, params: LogNormalParams) -> int:
        return int(params.coef.numel() + params.var.numel())

    def min_samples(self, params: LogNormalParams) -> float:
        return float(params.coef.shape[1])

    def select(self, params: LogNormalParams, perm: torch.Tensor) -> LogNormalParams:
        """The experts ``perm`` (indices may repeat), as the parameters of len(perm) experts."""
        return LogNormalParams(params.coef[perm].contiguous(), params.var[perm].contiguous())

    def residuals(self, params: LogNormalParams, chunk: Chunk) -> torch.Tensor:
        """Standardised residuals of log y, (log y - b_k . x) / sigma_k, shape (K, 1, c)."""
        resid = _log_y(chunk).unsqueeze(0) - params.coef @ chunk.XeT
        return (resid / params.var.sqrt().unsqueeze(1)).unsqueeze(1)

    # ------------------------------------------------------------ differentiable view
    def to_free(self, params: LogNormalParams) -> dict[str, torch.Tensor]:
        return {"coef": params.coef, "log_excess_var": log_excess_var(params.var, self.var_floor)}

    def from_free(self, free: dict[str, torch.Tensor]) -> LogNormalParams:
        return LogNormalParams(free["coef"], self._var(free))

    def _var(self, free: dict[str, torch.Tensor]) -> torch.Tensor:
        if "sigma" in free:  # reported values: sigma of log y itself
            return free["sigma"] ** 2
        return self.var_floor + torch.exp(free["log_excess_var"])

    def mean_free(self, free: dict[str, torch.Tensor], XT: torch.Tensor) -> torch.Tensor:
        """Expert means exp(b_k . x + sigma_k^2 / 2), (K, 1, n), for a design XT (p, n)."""
        return torch.exp(free["coef"] @ XT + 0.5 * self._var(free).unsqueeze(1)).unsqueeze(1)

    def log_prob_free(self, free: dict[str, torch.Tensor], XT: torch.Tensor, y: torch.Tensor):
        """log p_k(y_i | x_i) of shape (K, n), differentiable in ``free``."""
        log_y = torch.log(y.reshape(-1))
        resid = log_y.unsqueeze(0) - free["coef"] @ XT
        return gaussian_logpdf(resid, self._var(free).unsqueeze(1)) - log_y

    def log_prior_free(self, free: dict[str, torch.Tensor]) -> torch.Tensor:
        return free["coef"].new_zeros(())

    # ------------------------------------------------------------ reporting
    def report(self, params: LogNormalParams, scaling: Scaling) -> Report:
        """Intercept and slopes of every expert's mean log y in the data's units, then
        sigma, the standard deviation of log y."""
        return report_coef(params.coef, scaling, {"sigma": params.var.sqrt()})

    def from_report(self, values: dict, scaling: Scaling, fixed: dict) -> dict:
        return {"coef": coef_of_report(values, scaling), "sigma": values["sigma"]}

    # ------------------------------------------------------------ analytic information
    def local_derivatives(self, params: LogNormalParams, chunk: Chunk, scaling: Scaling):
        """Derivatives of log p_k in (b_k . x, sigma_k): a normal's, on log y."""
        resid = _log_y(chunk).unsqueeze(0) - params.coef @ chunk.XeT  # (K, c)
        return normal_derivatives(resid.unsqueeze(1), params.var.sqrt().view(-1, 1, 1))

    def local_parameters(self, values: dict, scaling: Scaling, fixed: dict):
        """The mean of log y (a linear predictor) and sigma, per expert."""
        return coef_of_report(values, scaling).unsqueeze(1), values["sigma"].unsqueeze(1)

    # ------------------------------------------------------------ prediction
    def moments(self, params: LogNormalParams, XT: torch.Tensor):
        """Means exp(mu + s^2 / 2) and standard deviations mean sqrt(exp(s^2) - 1), (n, K, 1)."""
        s2 = params.var.view(1, -1)
        mean = torch.exp((params.coef @ XT).T + 0.5 * s2)  # (n, K)
        return mean.unsqueeze(-1), (mean * torch.sqrt(torch.expm1(s2))).unsqueeze(-1)

    def predictive_extra(self, params: LogNormalParams) -> dict:
        return {}

    # ------------------------------------------------------------ censored responses
    latent_log = True  # the latent normal is of log y (see moekit.experts.censored)

    def latent_normal(self, params: LogNormalParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Coefficients (K, p) and variances (K,) of the normal of log y."""
        return params.coef, params.var

    def with_latent_normal(self, coef: torch.Tensor, var: torch.Tensor) -> LogNormalParams:
        """The parameters from :meth:`latent_normal`'s two tensors."""
        return LogNormalParams(coef, var)

    # ------------------------------------------------------------ model files
    @property
    def n_outputs(self) -> int:
        """One positive target."""
        return 1

    def param_shapes(self, p: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the :class:`LogNormalParams` fields for a design of p columns."""
        return {"coef": (self.n_experts, p), "var": (self.n_experts,)}

    def check_params(self, params: LogNormalParams, prefix: str = "") -> None:
        """Refuse non-finite coefficients and variances that are not positive and finite."""
        check_finite(prefix + "coef", params.coef)
        if not bool((torch.isfinite(params.var) & (params.var > 0)).all()):
            raise ValueError(f"{prefix + 'var'!r} holds variances that are not positive and finite")
