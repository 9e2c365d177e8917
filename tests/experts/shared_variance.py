"""An expert family of one's own: linear-Gaussian experts that share one variance.

y | x, z = k ~ N(b_k . x, sigma^2), with one sigma^2 for all K experts. Its M-step is
closed-form: weighted least squares per expert, then the pooled variance,

.. math::  b_k = (X^T R_k X)^{-1} X^T R_k y, \\qquad
           \\sigma^2 = \\frac{\\sum_k (y^T R_k y - b_k^T X^T R_k y)}{\\sum_k \\sum_i r_{ik}},

the exact maximiser of Q, so ``monotone = True``. Everything it needs is a sum over
rows, gathered in the E-step's pass. The user guide's "Write your own family"
section shows this file; ``test_write_your_own.py`` fits it.
"""

from dataclasses import dataclass

import torch

from moekit._core.data import Chunk, EMData


@dataclass
class SharedVarianceParams:
    """coef of shape (K, p), the last column the intercept; var of shape (K,), all equal."""

    coef: torch.Tensor
    var: torch.Tensor


class SharedVarianceExperts:
    """K linear experts with one noise variance (an ExpertFamily)."""

    monotone = True  # the M-step maximises Q exactly
    needs_resp = False  # the M-step reads sums over rows only
    params_type = SharedVarianceParams

    def __init__(self, n_experts: int, var_floor: float = 1e-6) -> None:
        self.n_experts = n_experts
        self.var_floor = var_floor

    def prepare(self, data: EMData) -> None:
        pass  # nothing to precompute

    # ------------------------------------------------------------ E-step
    def log_prob(self, params: SharedVarianceParams, chunk: Chunk) -> torch.Tensor:
        """log N(y_i; b_k . x_i, sigma^2), shape (K, c)."""
        resid = chunk.y[0] - params.coef @ chunk.XeT  # (K, c)
        var = params.var.unsqueeze(1)  # (K, 1)
        return -0.5 * (resid**2 / var + torch.log(2 * torch.pi * var))

    # ------------------------------------------------------------ M-step
    def chunk_stats(self, params, chunk: Chunk, resp: torch.Tensor):
        """sum_i r_ik x_i x_i^T, sum_i r_ik x_i y_i, sum_i r_ik y_i^2 and sum_i r_ik."""
        x, y = chunk.XeT, chunk.y[0]  # (p, c), (c,)
        gram = torch.einsum("kc,pc,qc->kpq", resp, x, x)  # (K, p, p)
        xty = torch.einsum("kc,pc,c->kp", resp, x, y)  # (K, p)
        return gram, xty, resp @ (y * y), resp.sum(1)

    def m_step(self, params, stats, data: EMData, resp=None) -> SharedVarianceParams:
        gram, xty, yty, nk = stats
        # the minimum-norm least-squares solution: defined even for an expert without rows
        coef = (torch.linalg.pinv(gram, hermitian=True) @ xty.unsqueeze(-1)).squeeze(-1)
        rss = yty - (coef * xty).sum(1)  # y^T R y - b^T X^T R y at the solution
        var = (rss.sum() / nk.sum()).clamp(min=self.var_floor)
        empty = nk <= 1e-12 * nk.sum()  # no weight: not determined by the data, keep it
        if params is not None and bool(empty.any()):
            coef = torch.where(empty[:, None], params.coef, coef)
        return SharedVarianceParams(coef, var.expand(self.n_experts).clone())

    def log_prior(self, params) -> float:
        return 0.0  # no penalty

    def n_parameters(self, params: SharedVarianceParams) -> int:
        return params.coef.numel() + 1  # K p coefficients and one variance

    def min_samples(self, params: SharedVarianceParams) -> float:
        return float(params.coef.shape[1])  # fewer rows than coefficients: interpolation

    # ------------------------------------------------------------ starts and ordering
    def select(self, params: SharedVarianceParams, perm: torch.Tensor) -> SharedVarianceParams:
        return SharedVarianceParams(params.coef[perm], params.var[perm])

    def residuals(self, params: SharedVarianceParams, chunk: Chunk) -> torch.Tensor:
        """(y - b_k . x) / sigma, shape (K, 1, c)."""
        resid = chunk.y[0] - params.coef @ chunk.XeT
        return (resid / params.var.sqrt().unsqueeze(1)).unsqueeze(1)
