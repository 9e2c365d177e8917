"""Log-space maths shared by every likelihood in moekit.

Mixture likelihoods multiply small numbers; everything here works with logarithms
and normalises with log-sum-exp so that no density underflows.
"""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2.0 * math.pi)


def normalize_log(log_joint: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise log-weights along ``dim``.

    Parameters
    ----------
    log_joint : Tensor of shape (..., K)
        Unnormalised log-weights, e.g. ``log g_k(x) + log p_k(y|x)``.

    Returns
    -------
    log_norm : Tensor of shape (..., K)
        ``log_joint - logsumexp(log_joint)``: log posterior responsibilities.
    lse : Tensor of shape (...)
        The log normaliser, ``log sum_k exp(log_joint_k)``: the log-likelihood per row.
    """
    lse = torch.logsumexp(log_joint, dim=dim, keepdim=True)
    return log_joint - lse, lse.squeeze(dim)


def gaussian_logpdf(
    resid: torch.Tensor, var: torch.Tensor, *, inplace: bool = False
) -> torch.Tensor:
    """Log density of N(0, var) at ``resid``, elementwise with broadcasting.

    log N(r; 0, s^2) = -0.5 (log 2 pi + log s^2 + r^2 / s^2)

    The one Gaussian log-density of moekit: EM's E-step, gradient fitting, standard
    errors and the predictive mixtures all call it. ``inplace=True`` overwrites
    ``resid`` (EM's streamed pass, where a temporary per chunk would cost a page-fault
    round trip); it is refused for tensors that autograd tracks.
    """
    if inplace and not (resid.requires_grad or var.requires_grad):
        return resid.square_().div_(var).add_(LOG_2PI + torch.log(var)).mul_(-0.5)
    return -0.5 * (LOG_2PI + torch.log(var) + resid * resid / var)


def safe_log(x: torch.Tensor, eps: float = 1e-300) -> torch.Tensor:
    """``log(max(x, eps))``: the log of a probability that may underflow to zero."""
    return torch.log(torch.clamp(x, min=eps))


def student_t_logpdf(d2: torch.Tensor, log_scale: torch.Tensor, nu: torch.Tensor, m: int):
    """Log density of an m-variate t with diagonal scales, from its Mahalanobis distance.

    .. math::  \\log t_\\nu(y; \\mu, \\Sigma) = \\log\\Gamma\\big(\\tfrac{\\nu + m}{2}\\big)
               - \\log\\Gamma\\big(\\tfrac{\\nu}{2}\\big) - \\tfrac{m}{2} \\log(\\nu\\pi)
               - \\tfrac12 \\log|\\Sigma| - \\tfrac{\\nu + m}{2} \\log\\big(1 + d^2 / \\nu\\big)

    Parameters
    ----------
    d2 : Tensor
        Squared Mahalanobis distances sum_j ((y_j - mu_j) / sigma_j)^2.
    log_scale : Tensor
        sum_j log sigma_j, broadcastable to ``d2`` (half of log |Sigma|).
    nu : Tensor
        Degrees of freedom, broadcastable to ``d2``.
    m : int
        Dimension of y.
    """
    return (
        torch.lgamma((nu + m) / 2)
        - torch.lgamma(nu / 2)
        - 0.5 * m * torch.log(nu * math.pi)
        - log_scale
        - 0.5 * (nu + m) * torch.log1p(d2 / nu)
    )


def mvn_logpdf_chol(resid: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """Log density of N(0, L L^T) at residuals ``resid``, one covariance per leading index.

    .. math::  \\log N(r; 0, \\Sigma) = -\\tfrac12 \\big(q \\log 2\\pi + \\|L^{-1} r\\|^2\\big)
               - \\sum_j \\log L_{jj}, \\qquad \\Sigma = L L^T,

    with one triangular solve instead of an inverse (as scikit-learn's
    ``_estimate_log_gaussian_prob`` uses the Cholesky factor of the precision).

    Parameters
    ----------
    resid : Tensor of shape (..., q, c)
        c residual vectors per leading index.
    chol : Tensor of shape (..., q, q)
        Lower Cholesky factors of the covariances; broadcast against ``resid``.

    Returns
    -------
    Tensor of shape (..., c)
    """
    q = resid.shape[-2]
    white = torch.linalg.solve_triangular(chol, resid, upper=False)  # (..., q, c)
    log_det = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1, keepdim=True)  # (..., 1)
    return -0.5 * (q * LOG_2PI + white.square().sum(-2)) - log_det
