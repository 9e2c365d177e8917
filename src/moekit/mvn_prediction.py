"""The predictive mixture of q-variate normals with full covariances.

Linear-Gaussian experts with a full, tied or spherical covariance predict, for every
row, the mixture

.. math::  p(y \\mid x_i) = \\sum_k w_{ik}\\, N(y; \\mu_{ik}, \\Sigma_k),

whose marginal for column j is the normal mixture with standard deviations
sqrt(Sigma_k,jj): :class:`GaussianMixturePrediction` is a :class:`MixturePrediction`
whose marginal methods (``cdf``, ``quantile``, ``interval``, ``var``) are the base
class's on those marginals, and whose joint ones (``logpdf``, ``sample``, ``modes``,
``cov``) use the covariances.
"""

from __future__ import annotations

import numpy as np
import torch

from moekit._core.engine import EM_DTYPE, to_numpy, torch_generator
from moekit._core.logspace import mvn_logpdf_chol
from moekit.prediction import MixturePrediction, _check_n_samples

__all__ = ["GaussianMixturePrediction"]


class GaussianMixturePrediction(MixturePrediction):
    """Per-row mixtures of q-variate normals with full covariances.

    Parameters
    ----------
    weights : array-like of shape (n_samples, n_components)
    means : array-like of shape (n_samples, n_components, n_outputs)
    covariances : array-like of shape (n_components, n_outputs, n_outputs) or \
(n_samples, n_components, n_outputs, n_outputs)
        Symmetric positive definite covariances of the components, shared by every
        row or one set per row.

    Examples
    --------
    >>> d = GaussianMixturePrediction([[1.0]], [[[0.0, 0.0]]], [[[1.0, 0.8], [0.8, 1.0]]])
    >>> d.cov().round(2)
    array([[[1. , 0.8],
            [0.8, 1. ]]])
    """

    def __init__(self, weights, means, covariances) -> None:
        cov = torch.as_tensor(np.asarray(covariances, dtype=np.float64), dtype=EM_DTYPE)
        mu = np.asarray(means, dtype=np.float64)
        if mu.ndim != 3:
            raise ValueError(
                f"means must have shape (n_samples, n_components, n_outputs); got {mu.shape}."
            )
        n, K, q = mu.shape
        if cov.shape not in ((K, q, q), (n, K, q, q)):
            raise ValueError(
                f"covariances must have shape ({K}, {q}, {q}) or ({n}, {K}, {q}, {q}); got "
                f"{tuple(cov.shape)}."
            )
        chol, info = torch.linalg.cholesky_ex(cov)
        symmetric = torch.allclose(cov, cov.transpose(-1, -2), rtol=1e-10, atol=1e-300)
        if not symmetric or bool((info != 0).any()):
            raise ValueError("covariances must be symmetric positive definite.")
        stds = torch.diagonal(cov, dim1=-2, dim2=-1).sqrt().expand(n, K, q)
        super().__init__(weights, mu, to_numpy(stds), family="normal")
        self._cov = cov if cov.ndim == 4 else cov.unsqueeze(0)  # (n or 1, K, q, q)
        self._chol = chol if chol.ndim == 4 else chol.unsqueeze(0)

    @property
    def covariances(self) -> np.ndarray:
        """The components' covariances, shape (n, K, q, q)."""
        return to_numpy(self._cov.expand(len(self), -1, -1, -1))

    def __getitem__(self, rows) -> GaussianMixturePrediction:
        out = super().__getitem__(rows)
        if isinstance(rows, int):
            rows = slice(rows, rows + 1 if rows != -1 else None)
        per_row = self._cov.shape[0] > 1
        out._cov = self._cov[rows] if per_row else self._cov
        out._chol = self._chol[rows] if per_row else self._chol
        return out

    def __repr__(self) -> str:
        return super().__repr__().replace("MixturePrediction", type(self).__name__, 1)

    # the joint density: points (n, S, q) against every component -> (n, S, K)
    def _comp(self, points: torch.Tensor, fn: str) -> torch.Tensor:
        if fn != "log_prob":
            return super()._comp(points, fn)
        resid = points.unsqueeze(2) - self._mu.unsqueeze(1)  # (n, S, K, q)
        chol = self._chol.unsqueeze(1)  # (n or 1, 1, K, q, q)
        return mvn_logpdf_chol(resid.unsqueeze(-1), chol)[..., 0]

    def _shift(self, a: torch.Tensor) -> torch.Tensor:
        # Carreira-Perpinan's fixed point with full precisions P_k = Sigma_k^{-1}:
        # y <- (sum_k a_k P_k)^{-1} sum_k a_k P_k mu_k
        prec = torch.cholesky_inverse(self._chol).expand(len(self), -1, -1, -1)  # (n, K, q, q)
        lhs = torch.einsum("nsk,nkab->nsab", a, prec)
        rhs = torch.einsum("nsk,nkab,nkb->nsa", a, prec, self._mu)
        return torch.linalg.solve(lhs, rhs)

    def cov(self) -> np.ndarray:
        """Covariance of y | x: sum_k w_k (Sigma_k + mu_k mu_k^T) - m m^T, shape (n, q, q)."""
        m = self._mean()  # (n, q)
        second = self._cov + self._mu.unsqueeze(-1) * self._mu.unsqueeze(-2)  # (n, K, q, q)
        out = torch.einsum("nk,nkab->nab", self._w, second) - m.unsqueeze(-1) * m.unsqueeze(-2)
        return to_numpy(0.5 * (out + out.transpose(-1, -2)))

    def sample(self, n_samples: int = 1, random_state=None) -> np.ndarray:
        """Draw ``n_samples`` vectors y for each row: mu_k + L_k z, k ~ w.

        Returns
        -------
        ndarray of shape (n, n_samples, q)
        """
        s = _check_n_samples(n_samples)
        gen = torch_generator(random_state)
        n, q = len(self), self._mu.shape[2]
        comp = torch.multinomial(self._w, s, replacement=True, generator=gen)
        mu = torch.gather(self._mu, 1, comp.unsqueeze(-1).expand(-1, -1, q))  # (n, s, q)
        chol = self._chol.expand(n, -1, -1, -1)
        idx = comp.view(n, -1, 1, 1).expand(-1, -1, q, q)
        L = torch.gather(chol, 1, idx)  # (n, s, q, q)
        z = torch.randn(mu.shape, generator=gen, dtype=mu.dtype)
        return to_numpy(mu + (L @ z.unsqueeze(-1))[..., 0])
