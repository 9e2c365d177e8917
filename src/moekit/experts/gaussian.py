"""Linear-Gaussian experts: y | x, z = k ~ N(B_k x, diag(sigma_k^2)).

The M-step is weighted least squares per expert and output,

.. math::  B_k = (X^T R_k X)^{-1} X^T R_k y, \\qquad
           \\sigma_{kj}^2 = \\max\\Big(\\frac{\\sum_i r_{ik} (y_{ij} - B_{kj} x_i)^2}
                                     {\\sum_i r_{ik}}, \\; \\text{floor}\\Big),

with R_k = diag(r_{1k}, ..., r_{nk}). Everything it needs is a sum over rows of
r_ik times a product of two of (x_1, ..., x_p, y_1, ..., y_m): the weighted Gram
matrices of [x, y], which :meth:`~moekit._core.data.Chunk.weighted_grams` gathers
in the E-step's pass (one matrix product per chunk, or per expert for wide x).
The variance floor is the constrained maximiser, so the step stays exact and the
likelihood stays bounded when an expert sits on a few points.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit._core.batch import batched_grams, empty_experts, flat_grams, times_design
from moekit._core.data import Chunk, EMData, unpack_grams
from moekit._core.derivatives import LocalDerivatives
from moekit._core.linalg import even_system, solve_psd
from moekit._core.logspace import gaussian_logpdf
from moekit._core.reporting import Report, Scaling, coef_from_data, coef_labels, coef_to_data
from moekit._core.validation import check_finite


# ---------------------------------------------------------------------- linear experts
# The maths every linear expert with a diagonal (squared) scale shares: the
# Student-t experts use it too, with their precision-weighted Grams.
def weighted_least_squares(
    gram: torch.Tensor, xty: torch.Tensor, yty: torch.Tensor, nk: torch.Tensor, var_floor: float,
    even: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """B_k = (X^T W_k X)^{-1} X^T W_k y and sigma_kj^2 = max(RSS_kj / n_k, floor).

    Parameters
    ----------
    gram, xty, yty : Tensor of shapes (K, p, p), (K, m, p), (K, m)
        The weighted Grams X^T W_k X, X^T W_k y and y^T W_k y (:func:`unpack_grams`).
    nk : Tensor of shape (K,)
        sum_i r_ik, the denominator of the variances.
    var_floor : float
    even : bool, default=False
        Solve systems of even size (:func:`moekit._core.linalg.even_system`), as for
        a batch of several fits.

    Returns
    -------
    coef : Tensor of shape (K, m, p)
    var : Tensor of shape (K, m)
    """
    p = gram.shape[-1]
    if even:
        coef = solve_psd(*even_system(gram, xty.transpose(1, 2), 0.0))[:, :p].transpose(1, 2)
    else:
        coef = solve_psd(gram, xty.transpose(1, 2)).transpose(1, 2)  # (K, m, p)
    # RSS_kj = y^T W y - 2 b^T X^T W y + b^T X^T W X b
    rss = yty - 2.0 * (coef * xty).sum(-1) + torch.einsum("kmp,kpq,kmq->km", coef, gram, coef)
    var = torch.clamp(rss / nk.clamp(min=1e-300).unsqueeze(1), min=var_floor)
    return coef, var


def linear_means(coef: torch.Tensor, XT: torch.Tensor) -> torch.Tensor:
    """B_k x of shape (K, m, n) for coef (K, m, p) and a design XT (p, n)."""
    K, m, p = coef.shape
    # one (K m, p) @ (p, n) product: several times faster than einsum at this size
    return (coef.reshape(K * m, p) @ XT).reshape(K, m, -1)


def scaled_residuals(coef: torch.Tensor, var: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """(y - B_k x) / sigma_k of every expert and row of the chunk, shape (K, m, c)."""
    mean = torch.einsum("kmp,pc->kmc", coef, chunk.XeT)
    return (chunk.y.unsqueeze(0) - mean) / var.sqrt().unsqueeze(-1)


def linear_moments(coef: torch.Tensor, var: torch.Tensor, XT: torch.Tensor):
    """Locations B_k x and scales sigma_k, each of shape (n, K, m)."""
    loc = torch.einsum("kmp,pn->nkm", coef, XT)
    return loc, torch.sqrt(var).unsqueeze(0).expand_as(loc)


def log_excess_var(var: torch.Tensor, var_floor: float) -> torch.Tensor:
    """The free form of variances above a floor: log(var - floor), var = floor + exp(s)."""
    return torch.log((var - var_floor).clamp(min=1e-6 * var_floor + 1e-300))


def normal_derivatives(resid: torch.Tensor, sigma: torch.Tensor) -> LocalDerivatives:
    """Derivatives of log N(y; mu, sigma^2) in (mu_1..mu_m, sigma_1..sigma_m), per row.

    With e = y - mu,

    .. math::  \\partial_\\mu = e / \\sigma^2, \\quad
               \\partial_\\sigma = (e^2 / \\sigma^2 - 1) / \\sigma, \\quad
               \\partial^2_{\\mu\\mu} = -1 / \\sigma^2, \\quad
               \\partial^2_{\\mu\\sigma} = -2 e / \\sigma^3, \\quad
               \\partial^2_{\\sigma\\sigma} = (1 - 3 e^2 / \\sigma^2) / \\sigma^2;

    outputs are independent, so their cross terms are zero.

    Parameters
    ----------
    resid : Tensor of shape (K, m, c)
        y - mu in the units sigma is reported in.
    sigma : Tensor of shape (K, m, 1)
    """
    K, m, c = resid.shape
    s2 = sigma * sigma
    z2 = resid * resid / s2
    d1 = torch.cat([resid / s2, (z2 - 1.0) / sigma], 1)  # (K, 2m, c)
    d2 = resid.new_zeros((K, 2 * m, 2 * m, c))
    j = torch.arange(m)
    d2[:, j, j] = (-1.0 / s2).expand(K, m, c)
    d2[:, j, m + j] = d2[:, m + j, j] = -2.0 * resid / (s2 * sigma)
    d2[:, m + j, m + j] = (1.0 - 3.0 * z2) / s2
    return LocalDerivatives(d1, d2, m)


@dataclass
class GaussianParams:
    """coef of shape (K, m, p), the last column the intercept; var of shape (K, m)."""

    coef: torch.Tensor
    var: torch.Tensor


class GaussianExperts:
    """K linear-Gaussian experts with a diagonal covariance over m outputs.

    Parameters
    ----------
    n_experts : int
    n_outputs : int
    var_floor : float
        Smallest variance an expert may take, in the units of the (standardised)
        target the family is fitted on.
    """

    report_name = "linear-Gaussian"
    monotone = True
    needs_resp = False
    single_optimum = True  # alone, a concave (or closed-form) fit: K = 1 needs one start
    params_type = GaussianParams
    predictive_family = "normal"
    standardize_target = True

    def __init__(self, n_experts: int, n_outputs: int, var_floor: float) -> None:
        self.n_experts = n_experts
        self.n_outputs = n_outputs
        self.var_floor = var_floor

    # ------------------------------------------------------------ E-step
    def prepare(self, data: EMData) -> None:
        pass

    def log_prob(self, params: GaussianParams, chunk: Chunk) -> torch.Tensor:
        xt, y = chunk.XeT, chunk.y  # (p, c), (m, c)
        out = None
        for j in range(self.n_outputs):
            # y_j - B_kj x for every expert at once: (K, c), then its log density in place
            resid = torch.addmm(y[j : j + 1], params.coef[:, j, :], xt, alpha=-1.0)
            term = gaussian_logpdf(resid, params.var[:, j : j + 1], inplace=True)
            out = term if out is None else out.add_(term)
        return out

    # ------------------------------------------------------------ M-step
    def chunk_stats(self, params, chunk: Chunk, resp: torch.Tensor) -> torch.Tensor:
        # every X^T R_k X, X^T R_k y and y^T R_k y of the chunk
        return chunk.weighted_grams(resp, "e", with_target=True)

    def m_step(
        self, params, stats: torch.Tensor, data: EMData, resp=None, *, even: bool = False
    ) -> GaussianParams:
        """Weighted least squares; ``params`` and ``stats`` may hold the experts of several
        fits of ``n_experts`` each, fit after fit (``even``: see :func:`weighted_least_squares`)."""
        p = data.XeT.shape[0]
        gram, xty, yty = unpack_grams(stats, p, self.n_outputs)  # (K, p, p), (K, m, p), (K, m)
        nk = gram[:, -1, -1]  # the intercept's product with itself: sum_i r_ik
        coef, var = weighted_least_squares(gram, xty, yty, nk, self.var_floor, even)
        # an expert with no weight at all is not determined by the data: keep it as it was
        empty = empty_experts(nk, self.n_experts)
        if not bool(empty.any()):
            pass
        elif params is not None:
            coef = torch.where(empty[:, None, None], params.coef, coef)
            var = torch.where(empty[:, None], params.var, var)
        else:
            var = torch.where(empty[:, None], 1.0, var)
        return GaussianParams(coef.contiguous(), var)

    # ------------------------------------------------------------ many starts at once
    # S starts stacked on a leading axis (moekit._core.batch): coef (S, K, m, p)
    batchable = True

    def log_prob_many(self, params: GaussianParams, chunk: Chunk) -> torch.Tensor:
        """:meth:`log_prob` of S stacked starts, shape (S, K, c)."""
        coef, y = params.coef, chunk.y
        out = None
        for j in range(self.n_outputs):
            resid = times_design(coef[:, :, j, :], chunk.XeT, y[j : j + 1], alpha=-1.0)
            term = gaussian_logpdf(resid, params.var[:, :, j : j + 1], inplace=True)
            out = term if out is None else out.add_(term)
        return out

    def chunk_stats_many(self, params, chunk: Chunk, resp: torch.Tensor) -> torch.Tensor:
        return batched_grams(chunk, resp, "e", with_target=True)

    def m_step_many(self, params: GaussianParams, stats: torch.Tensor, data: EMData):
        S, K, m, p = params.coef.shape
        flat = GaussianParams(params.coef.reshape(S * K, m, p), params.var.reshape(S * K, m))
        new = self.m_step(flat, flat_grams(stats), data, even=True)
        return GaussianParams(new.coef.view(S, K, m, p), new.var.view(S, K, m))

    def select(self, params: GaussianParams, perm: torch.Tensor) -> GaussianParams:
        """The experts ``perm`` (indices may repeat), as the parameters of len(perm) experts."""
        return GaussianParams(params.coef[perm].contiguous(), params.var[perm].contiguous())

    def residuals(self, params: GaussianParams, chunk: Chunk) -> torch.Tensor:
        """Standardised residuals (y - B_k x) / sigma_k of every expert, shape (K, m, c)."""
        return scaled_residuals(params.coef, params.var, chunk)

    def log_prior(self, params: GaussianParams) -> float:
        return 0.0

    def min_samples(self, params: GaussianParams) -> float:
        """Effective samples below which an expert interpolates its points exactly."""
        return float(params.coef.shape[2])

    def n_parameters(self, params: GaussianParams) -> int:
        K, m, p = params.coef.shape
        return K * m * (p + 1)

    # ------------------------------------------------------------ differentiable view
    # Gradient fitting and standard errors see the family through these: free
    # (unconstrained) tensors, var = var_floor + exp(log_excess_var), and an
    # out-of-place log-density autograd can follow.
    def to_free(self, params: GaussianParams) -> dict[str, torch.Tensor]:
        return {"coef": params.coef, "log_excess_var": log_excess_var(params.var, self.var_floor)}

    def from_free(self, free: dict[str, torch.Tensor]) -> GaussianParams:
        return GaussianParams(free["coef"], _variance(self, free))

    def mean_free(self, free: dict[str, torch.Tensor], XT: torch.Tensor) -> torch.Tensor:
        """Expert means (K, m, n) for a design XT (p, n)."""
        return linear_means(free["coef"], XT)

    def log_prob_free(self, free: dict[str, torch.Tensor], XT: torch.Tensor, y: torch.Tensor):
        """log p_k(y_i | x_i) of shape (K, n), differentiable in ``free``."""
        resid = y.reshape(1, self.n_outputs, -1) - self.mean_free(free, XT)
        var = _variance(self, free).unsqueeze(-1)  # (K, m, 1)
        return gaussian_logpdf(resid, var).sum(1)

    def log_prior_free(self, free: dict[str, torch.Tensor]) -> torch.Tensor:
        return free["coef"].new_zeros(())

    # ------------------------------------------------------------ reporting
    def report(self, params: GaussianParams, scaling: Scaling) -> Report:
        """Intercept and slopes per expert and output in the data's units, then sigma."""
        K, m = params.var.shape
        ys = scaling.y_scale.view(1, m, 1)
        ab = coef_to_data(params.coef, scaling) * ys  # (K, m, p)
        ab[..., 0] += scaling.y_mean
        sigma = params.var.sqrt() * scaling.y_scale  # (K, m)
        tag = _output_tags(scaling, m)
        labels = coef_labels(scaling)
        out = Report()
        out.add("coef", ab, [f"expert {k}" for k in range(K) for _ in range(m * len(labels))],
                [f"{tag[j]}{nm}" for _ in range(K) for j in range(m) for nm in labels])  # fmt: skip
        out.add("sigma", sigma, [f"expert {k}" for k in range(K) for _ in range(m)],
                [f"{tag[j]}sigma" for _ in range(K) for j in range(m)], tested=False)  # fmt: skip
        return out

    def from_report(self, values: dict, scaling: Scaling, fixed: dict) -> dict:
        m = self.n_outputs
        ys = scaling.y_scale.view(1, m, 1)
        ab = values["coef"]
        ab = torch.cat([(ab[..., :1] - scaling.y_mean.view(1, m, 1)), ab[..., 1:]], -1) / ys
        # the variance itself, not its excess over the floor: the floor is an
        # optimisation constraint, and a fit may sit on it
        return {
            "coef": coef_from_data(ab, scaling),
            "var": (values["sigma"] / scaling.y_scale) ** 2,
        }

    # ------------------------------------------------------------ analytic information
    # local parameters: each output's mean in the data's units, mu = (B x)(data units)
    # (a linear predictor on the standardised design), then each output's sigma
    def local_derivatives(self, params: GaussianParams, chunk: Chunk, scaling: Scaling):
        """Derivatives of log p_k in (mu_kj, sigma_kj), data units (:func:`normal_derivatives`)."""
        ys = scaling.y_scale.view(1, -1, 1)
        resid = chunk.y.reshape(1, self.n_outputs, -1) - linear_means(params.coef, chunk.XeT)
        return normal_derivatives(resid * ys, params.var.sqrt().unsqueeze(-1) * ys)

    def local_parameters(self, values: dict, scaling: Scaling, fixed: dict):
        """mu_kj = (coef_from_data of the reported [intercept, slopes]) . z, and sigma_kj."""
        return coef_from_data(values["coef"], scaling), values["sigma"]

    # ------------------------------------------------------------ prediction
    def moments(
        self, params: GaussianParams, XT: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-expert predictive means and standard deviations, each (n, K, m)."""
        return linear_moments(params.coef, params.var, XT)

    def predictive_extra(self, params: GaussianParams) -> dict:
        return {}

    # ------------------------------------------------------------ censored responses
    latent_log = False  # the latent normal is of y itself (see moekit.experts.censored)

    def latent_normal(self, params: GaussianParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Coefficients (K, p) and variances (K,) of the one output's normal."""
        return params.coef[:, 0, :], params.var[:, 0]

    def with_latent_normal(self, coef: torch.Tensor, var: torch.Tensor) -> GaussianParams:
        """The parameters of one output from :meth:`latent_normal`'s two tensors."""
        return GaussianParams(coef.unsqueeze(1).contiguous(), var.unsqueeze(1))

    # ------------------------------------------------------------ model files
    def param_shapes(self, p: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the :class:`GaussianParams` fields for a design of p columns."""
        K, m = self.n_experts, self.n_outputs
        return {"coef": (K, m, p), "var": (K, m)}

    def check_params(self, params: GaussianParams, prefix: str = "") -> None:
        """Refuse values no fit gives: non-finite coefficients, variances not positive.

        Raises
        ------
        ValueError
            Naming the field (after ``prefix``) and what is wrong with it.
        """
        check_finite(prefix + "coef", params.coef)
        if not bool((torch.isfinite(params.var) & (params.var > 0)).all()):
            raise ValueError(f"{prefix + 'var'!r} holds variances that are not positive and finite")


def _variance(family, free: dict[str, torch.Tensor]) -> torch.Tensor:
    """Variances (K, m) from free tensors: ``var`` itself, or the floor plus exp(excess)."""
    if "var" in free:
        return free["var"]
    return family.var_floor + torch.exp(free["log_excess_var"])


def _output_tags(scaling: Scaling, m: int) -> list[str]:
    """Label prefixes per output: none for a single output, "[name] " otherwise."""
    return [""] if m == 1 else [f"[{name}] " for name in scaling.output_names]
