"""The linear algebra of the Bayesian linear-Gaussian experts.

Factorisations of posterior and prior precisions (Jacobi-scaled, as they mix prior
terms near 1e8 with data terms near n beta), the Gaussian KL divergence that is the
experts' part of the ELBO's log-prior, and the quadratic forms x^T B x of the
E-step. ``stacked``: the matrices of S fits of :mod:`moekit.fitting.batched` on a
leading axis, each fit's numbers independent of the others'.
"""

from __future__ import annotations

import torch

from moekit._core.linalg import even_system


# ---------------------------------------------------------------------- linear algebra
def _scaled_cholesky(P: torch.Tensor, stacked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Cholesky factor of D P D with D = diag(P)^{-1/2}, and D's diagonal.

    Precisions mix prior terms near 1e8 with data terms near n beta; the Jacobi
    scaling gives a unit diagonal, which keeps the factorisation stable where
    the raw matrix would be too ill-conditioned for float64. ``stacked``: P holds
    S fits on its leading axis, and a fit takes the jitter only where its own
    matrices need it, as it would alone.
    """
    d = P.diagonal(dim1=-2, dim2=-1).clamp(min=torch.finfo(P.dtype).tiny).rsqrt()
    Ps = P * d.unsqueeze(-1) * d.unsqueeze(-2)
    L, info = torch.linalg.cholesky_ex(Ps)
    bad = (info > 0).reshape(P.shape[0], -1).any(1) if stacked else info > 0
    if bool(bad.any()):
        # rounding on a nearly singular matrix: a jitter of 1e-10 on the unit diagonal
        eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
        if not stacked:
            return torch.linalg.cholesky(Ps + 1e-10 * eye), d
        L[bad] = torch.linalg.cholesky(Ps[bad] + 1e-10 * eye)
    return L, d


def even_size(P: torch.Tensor) -> torch.Tensor:
    """Matrices of odd size p grown to p + 1 with a unit diagonal entry (a batch of
    several fits factorises each matrix alike: :func:`moekit._core.linalg.even_system`)."""
    return even_system(P, P[..., :1], 1.0)[0]


def inverse_pd(P: torch.Tensor, stacked: bool = False) -> torch.Tensor:
    """Inverse of symmetric positive definite matrices (..., p, p), by Cholesky.

    ``stacked``: S fits on the leading axis, factorised as systems of even size.
    """
    p = P.shape[-1]
    L, d = _scaled_cholesky(even_size(P) if stacked else P, stacked)
    inv = torch.cholesky_inverse(L)
    inv = (inv * d.unsqueeze(-1) * d.unsqueeze(-2))[..., :p, :p]
    return 0.5 * (inv + inv.transpose(-1, -2))


def logdet_pd(P: torch.Tensor, stacked: bool = False) -> torch.Tensor:
    """log det of symmetric positive definite matrices (..., p, p) (``stacked``: as
    :func:`inverse_pd`; the unit entry adds log 1 = 0)."""
    L, d = _scaled_cholesky(even_size(P) if stacked else P, stacked)
    return 2.0 * (torch.log(L.diagonal(dim1=-2, dim2=-1)).sum(-1) - torch.log(d).sum(-1))


def gaussian_kl(
    m: torch.Tensor, B: torch.Tensor, m0: torch.Tensor, prec0: torch.Tensor, stacked: bool = False
) -> torch.Tensor:
    """KL(N(m, B) || N(m0, prec0^{-1})) over the trailing dimensions, shape (...).

    .. math::  \\tfrac12 \\big(\\operatorname{tr}(\\Lambda_0 B) + (m - m_0)^T \\Lambda_0
               (m - m_0) - p - \\log|\\Lambda_0| - \\log|B|\\big)
    """
    p = m.shape[-1]
    diff = (m - m0).unsqueeze(-1)
    tr = (prec0 * B).sum((-2, -1))  # both symmetric: tr(prec0 B)
    maha = (diff.transpose(-1, -2) @ prec0 @ diff)[..., 0, 0]
    return 0.5 * (tr + maha - p - logdet_pd(prec0, stacked) - logdet_pd(B, stacked))


def quad_forms(cov: torch.Tensor, XT: torch.Tensor, products: torch.Tensor | None = None):
    """x_i^T B x_i for every matrix B of ``cov`` (T, p, p) and column x_i of XT (p, c).

    With ``products`` (the chunk's packed pair products x_a x_b, a <= b, of shape
    (p (p + 1) / 2, c)) it is one matrix product, sum_{a <= b} (2 - delta_ab) B_ab x_a
    x_b; otherwise one (p, p) @ (p, c) product per matrix.

    Returns
    -------
    Tensor of shape (T, c)
    """
    T, p = cov.shape[0], cov.shape[-1]
    if products is not None:
        rows, cols = torch.triu_indices(p, p, device=cov.device)
        w = cov[:, rows, cols] * torch.where(rows == cols, 1.0, 2.0).to(cov)  # (T, f)
        return (w @ products).clamp_(min=0.0)
    out = XT.new_empty((T, XT.shape[1]))
    for t in range(T):
        out[t] = ((cov[t] @ XT) * XT).sum(0)
    return out.clamp_(min=0.0)
