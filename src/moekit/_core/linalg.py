"""Small dense linear algebra used by the M-steps."""

from __future__ import annotations

import torch


def solve_psd(gram: torch.Tensor, rhs: torch.Tensor, rcond: float = 1e-12) -> torch.Tensor:
    """Minimum-norm solution of ``gram @ x = rhs`` for symmetric PSD ``gram``, batched.

    Weighted least squares solves its normal equations G b = X^T W y. When an
    expert sees too few points, or a feature is constant, G is singular; any
    solution then maximises the expected log-likelihood equally, and the
    pseudo-inverse picks the shortest. Eigenvalues below ``rcond`` times the
    largest are treated as zero, so the answer is the exact solution whenever G is
    well conditioned and never infinite when it is not.

    Parameters
    ----------
    gram : Tensor of shape (..., p, p)
    rhs : Tensor of shape (..., p, m)
    rcond : float
        Relative eigenvalue cut-off.

    Returns
    -------
    Tensor of shape (..., p, m)
    """
    evals, evecs = torch.linalg.eigh(gram)
    cutoff = rcond * evals.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(gram.dtype).tiny)
    inv = torch.where(evals > cutoff, 1.0 / evals, torch.zeros_like(evals))
    return evecs @ (inv.unsqueeze(-1) * (evecs.transpose(-1, -2) @ rhs))


def triu_pairs(p: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of the upper triangle (diagonal included) of a p x p matrix."""
    iu = torch.triu_indices(p, p, device=device)
    return iu[0], iu[1]


def unpack_triu(packed: torch.Tensor, p: int) -> torch.Tensor:
    """Rebuild symmetric matrices from their packed upper triangles.

    Parameters
    ----------
    packed : Tensor of shape (..., p (p + 1) / 2)

    Returns
    -------
    Tensor of shape (..., p, p)
    """
    rows, cols = triu_pairs(p, device=packed.device)
    out = packed.new_zeros((*packed.shape[:-1], p, p))
    out[..., rows, cols] = packed
    out[..., cols, rows] = packed
    return out
