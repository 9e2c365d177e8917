"""Small dense linear algebra used by the M-steps."""

from __future__ import annotations

import functools

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
    index = _triu_gather(p, packed.device)
    return packed.index_select(-1, index).reshape(*packed.shape[:-1], p, p)


@functools.lru_cache(maxsize=32)
def _triu_gather(p: int, device: torch.device) -> torch.Tensor:
    """Where each entry of a p x p symmetric matrix sits in its packed upper triangle,
    (p p,): one gather rebuilds the matrix (an M-step unpacks its Grams every
    iteration, and on small data the two scatters this replaces cost more than
    the arithmetic)."""
    rows, cols = triu_pairs(p)
    index = torch.empty((p, p), dtype=torch.long)
    position = torch.arange(rows.numel())
    index[rows, cols] = position
    index[cols, rows] = position
    return index.reshape(-1).to(device)


def even_system(
    A: torch.Tensor, rhs: torch.Tensor, fill: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Systems A x = rhs of odd size q grown to q + 1: A with ``fill`` on the new
    diagonal entry, rhs with a zero row; their solution is x with a zero appended.

    MKL's factorisations round by the operands' addresses: in a batch of q x q
    matrices with q odd every other one starts at an address 8 bytes off 16, and
    its factor came out different in the last bit from the same matrix alone.
    With q even every matrix of a batch sits alike, so a start's step does not
    depend on its place in the batch. ``fill`` is 1 for a Cholesky solve and 0
    for a pseudo-inverse (the new direction then carries no weight).

    Parameters
    ----------
    A : Tensor of shape (..., q, q)
    rhs : Tensor of shape (..., q, r)
    """
    q = A.shape[-1]
    if q % 2 == 0:
        return A, rhs
    out = torch.nn.functional.pad(A, (0, 1, 0, 1))
    if fill:
        out[..., q, q] = fill
    return out, torch.nn.functional.pad(rhs, (0, 0, 0, 1))


def _cholesky(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cholesky factors of a batch, and a mask of the matrices that have none (or None).

    The failed factors are replaced by the identity, so that solving with the whole
    batch stays finite (and cannot raise) before those matrices are solved apart.
    """
    L, info = torch.linalg.cholesky_ex(A)
    bad = info != 0
    if not bool(bad.any()):
        return L, None
    L[bad] = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return L, bad


def solve_pd(A: torch.Tensor, rhs: torch.Tensor, even: bool = False) -> torch.Tensor:
    """A^{-1} rhs by Cholesky; the minimum-norm solution where some A is singular.

    Only the singular matrices of the batch take the (eigendecomposition's)
    pseudo-inverse: on digits (K C = 30 blocks of 65 x 65) a class that an expert
    never sees leaves its block singular along the intercept in most M-steps, and
    decomposing all 30 blocks then was a quarter of a fit's time. ``even``: the
    factorisation runs on systems of even size (:func:`even_system`), as for a
    batch of several fits.
    """
    q = A.shape[-1]
    Ae, re = even_system(A, rhs, 1.0) if even else (A, rhs)
    L, bad = _cholesky(Ae)
    out = torch.cholesky_solve(re, L)[..., :q, :]
    if bad is not None:  # an expert or class without weight: not determined
        out[bad] = _pseudo_solve(A[bad], rhs[bad], even)
    return out


def _pseudo_solve(A: torch.Tensor, rhs: torch.Tensor, even: bool) -> torch.Tensor:
    """:func:`solve_psd`, on systems of even size where ``even`` (a zero appended)."""
    if not even:
        return solve_psd(A, rhs)
    return solve_psd(*even_system(A, rhs, 0.0))[..., : A.shape[-1], :]


def inverse_pd(A: torch.Tensor, even: bool = False) -> torch.Tensor:
    """A^{-1} by Cholesky; the pseudo-inverse for the singular matrices of the batch."""
    q = A.shape[-1]
    L, bad = _cholesky(even_system(A, A[..., :1], 1.0)[0] if even else A)
    out = torch.cholesky_inverse(L)[..., :q, :q]
    if bad is not None:
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        out[bad] = _pseudo_solve(A[bad], eye.expand(int(bad.sum()), -1, -1), even)
    return out
