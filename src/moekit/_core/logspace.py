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


def gaussian_logpdf(resid: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Log density of N(0, var) at ``resid``, elementwise with broadcasting.

    log N(r; 0, s^2) = -0.5 (log 2 pi + log s^2 + r^2 / s^2)
    """
    return -0.5 * (LOG_2PI + torch.log(var) + resid * resid / var)


def safe_log(x: torch.Tensor, eps: float = 1e-300) -> torch.Tensor:
    """``log(max(x, eps))``: the log of a probability that may underflow to zero."""
    return torch.log(torch.clamp(x, min=eps))
