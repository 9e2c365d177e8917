"""Linear-Gaussian experts: y | x, z = k ~ N(B_k x, diag(sigma_k^2)).

The M-step is weighted least squares per expert and output,

.. math::  B_k = (X^T R_k X)^{-1} X^T R_k y, \\qquad
           \\sigma_{kj}^2 = \\max\\Big(\\frac{\\sum_i r_{ik} (y_{ij} - B_{kj} x_i)^2}
                                     {\\sum_i r_{ik}}, \\; \\text{floor}\\Big),

with R_k = diag(r_{1k}, ..., r_{nk}). Everything it needs is a sum over rows of
r_ik times a product of two of (x_1, ..., x_p, y_1, ..., y_m), so one matrix
product per chunk, ``resp @ products.T``, gathers all of it in the E-step's pass.
The variance floor is the constrained maximiser, so the step stays exact and the
likelihood stays bounded when an expert sits on a few points.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit._core.data import Chunk, EMData
from moekit._core.linalg import solve_psd, unpack_triu
from moekit._core.logspace import LOG_2PI


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

    monotone = True
    needs_resp = False
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
        c0 = -0.5 * (LOG_2PI + torch.log(params.var))  # (K, m)
        cm = -0.5 / params.var
        out = None
        for j in range(self.n_outputs):
            # y_j - B_kj x for every expert at once: (K, c)
            resid = torch.addmm(y[j : j + 1], params.coef[:, j, :], xt, alpha=-1.0)
            term = resid.square_().mul_(cm[:, j : j + 1]).add_(c0[:, j : j + 1])
            out = term if out is None else out.add_(term)
        return out

    # ------------------------------------------------------------ M-step
    def chunk_stats(self, params, chunk: Chunk, resp: torch.Tensor) -> torch.Tensor:
        # (f, c) @ (c, K) -> (f, K): every weighted Gram, X^T R y and y^T R y at once
        return chunk.products("e", with_target=True) @ resp.T

    def m_step(self, params, stats: torch.Tensor, data: EMData, resp=None) -> GaussianParams:
        p, m, K = data.XeT.shape[0], self.n_outputs, self.n_experts
        n_pairs = p * (p + 1) // 2
        S = stats.T  # (K, f)
        gram = unpack_triu(S[:, :n_pairs], p)  # (K, p, p)
        xty = S[:, n_pairs : n_pairs + p * m].reshape(K, m, p)  # (K, m, p)
        yty = S[:, n_pairs + p * m :]  # (K, m)
        nk = gram[:, -1, -1]  # the intercept's product with itself: sum_i r_ik
        coef = solve_psd(gram, xty.transpose(1, 2)).transpose(1, 2)  # (K, m, p)
        # RSS_kj = y^T R y - 2 b^T X^T R y + b^T X^T R X b
        rss = yty - 2.0 * (coef * xty).sum(-1) + torch.einsum("kmp,kpq,kmq->km", coef, gram, coef)
        var = torch.clamp(rss / nk.clamp(min=1e-300).unsqueeze(1), min=self.var_floor)
        # an expert with no weight at all is not determined by the data: keep it as it was
        empty = nk <= 1e-12 * max(float(nk.sum()), 1.0)
        if params is not None and bool(empty.any()):
            coef = torch.where(empty[:, None, None], params.coef, coef)
            var = torch.where(empty[:, None], params.var, var)
        elif bool(empty.any()):
            var = torch.where(empty[:, None], torch.ones_like(var), var)
        return GaussianParams(coef.contiguous(), var)

    def permute(self, params: GaussianParams, perm: torch.Tensor) -> GaussianParams:
        return GaussianParams(params.coef[perm].contiguous(), params.var[perm].contiguous())

    def log_prior(self, params: GaussianParams) -> float:
        return 0.0

    def min_samples(self, params: GaussianParams) -> float:
        """Effective samples below which an expert interpolates its points exactly."""
        return float(params.coef.shape[2])

    def n_parameters(self, params: GaussianParams) -> int:
        K, m, p = params.coef.shape
        return K * m * (p + 1)

    # ------------------------------------------------------------ prediction
    def moments(
        self, params: GaussianParams, XT: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-expert predictive means and standard deviations, each (n, K, m)."""
        means = torch.einsum("kmp,pn->nkm", params.coef, XT)
        stds = torch.sqrt(params.var).unsqueeze(0).expand_as(means)
        return means, stds

    def predictive_extra(self, params: GaussianParams) -> dict:
        return {}

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
        if not bool(torch.isfinite(params.coef).all()):
            raise ValueError(f"{prefix + 'coef'!r} holds NaN or infinite values")
        if not bool((torch.isfinite(params.var) & (params.var > 0)).all()):
            raise ValueError(f"{prefix + 'var'!r} holds variances that are not positive and finite")
