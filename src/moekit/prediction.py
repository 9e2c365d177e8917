"""The predictive mixture p(y|x) = sum_k w_k(x) N(y; mu_k(x), diag sigma_k(x)^2).

Every probabilistic estimator in moekit answers ``predict_distribution(X)`` with a
:class:`MixturePrediction`: one Gaussian mixture per row of ``X``. For inverse
problems (one x, several valid y) the mixture, its modes and its samples are the
answer; its mean is only a summary, and may itself be an invalid answer.
"""

from __future__ import annotations

import numpy as np
import torch

from moekit._core.engine import EM_DTYPE, to_numpy, torch_generator
from moekit._core.logspace import LOG_2PI

__all__ = ["MixturePrediction"]


class MixturePrediction:
    """Per-row Gaussian mixtures with diagonal covariances.

    Row i is the density

    .. math::  p(y \\mid x_i) = \\sum_k w_{ik} \\prod_j N(y_j; \\mu_{ikj}, \\sigma_{ikj}^2).

    Parameters
    ----------
    weights : array-like of shape (n_samples, n_components)
        Mixing weights; each row is non-negative and sums to one.
    means : array-like of shape (n_samples, n_components) or (n_samples, n_components, n_outputs)
        Component means.
    stds : array-like, same shape as ``means``
        Component standard deviations, all positive.

    Attributes
    ----------
    weights, means, stds : ndarray
        The arrays given, as float64 numpy arrays of the shapes above.
    n_outputs : int or None
        None for a scalar target (means of shape (n, K)), else m.

    Notes
    -----
    Methods return arrays shaped like the target: ``(n,)`` for a scalar target and
    ``(n, m)`` for m outputs; ``logpdf`` always returns ``(n,)``, the joint density.

    Examples
    --------
    >>> d = MixturePrediction([[0.5, 0.5]], [[-1.0, 1.0]], [[0.2, 0.2]])
    >>> d.mean()
    array([0.])
    >>> [m.round(3) for m in d.modes()]
    [array([-1.,  1.])]
    """

    def __init__(self, weights, means, stds) -> None:
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64), dtype=EM_DTYPE)
        mu = torch.as_tensor(np.asarray(means, dtype=np.float64), dtype=EM_DTYPE)
        sd = torch.as_tensor(np.asarray(stds, dtype=np.float64), dtype=EM_DTYPE)
        if w.ndim != 2:
            raise ValueError(
                f"weights must have shape (n_samples, n_components); got shape {tuple(w.shape)}."
            )
        if mu.ndim not in (2, 3) or mu.shape[:2] != w.shape:
            raise ValueError(
                "means must have shape (n_samples, n_components) or (n_samples, n_components, "
                f"n_outputs) matching weights {tuple(w.shape)}; got {tuple(mu.shape)}."
            )
        if sd.shape != mu.shape:
            raise ValueError(
                f"stds must have the shape of means {tuple(mu.shape)}; got {tuple(sd.shape)}."
            )
        if not bool(torch.isfinite(w).all() and torch.isfinite(mu).all()):
            raise ValueError("weights and means must be finite.")
        if bool((w < 0).any()) or not torch.allclose(
            w.sum(1), torch.ones((), dtype=w.dtype), atol=1e-6
        ):
            raise ValueError("weights must be non-negative and each row must sum to 1.")
        if not bool((sd > 0).all() and torch.isfinite(sd).all()):
            raise ValueError("stds must be positive and finite.")
        self.n_outputs: int | None = None if mu.ndim == 2 else int(mu.shape[2])
        self._w = w / w.sum(1, keepdim=True)
        self._mu = mu if mu.ndim == 3 else mu.unsqueeze(-1)  # (n, K, m)
        self._sd = sd if sd.ndim == 3 else sd.unsqueeze(-1)  # (n, K, m)

    # ------------------------------------------------------------------ basics
    @property
    def weights(self) -> np.ndarray:
        return to_numpy(self._w)

    @property
    def means(self) -> np.ndarray:
        return to_numpy(self._shape_out(self._mu))

    @property
    def stds(self) -> np.ndarray:
        return to_numpy(self._shape_out(self._sd))

    @property
    def n_components(self) -> int:
        return int(self._w.shape[1])

    def __len__(self) -> int:
        return int(self._w.shape[0])

    def __getitem__(self, rows) -> MixturePrediction:
        """Select rows, e.g. ``d[:10]`` or ``d[mask]``; the result is a mixture too."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1 if rows != -1 else None)
        out = object.__new__(MixturePrediction)
        out.n_outputs = self.n_outputs
        out._w, out._mu, out._sd = self._w[rows], self._mu[rows], self._sd[rows]
        return out

    def __repr__(self) -> str:
        m = "" if self.n_outputs is None else f", n_outputs={self.n_outputs}"
        return f"MixturePrediction(n_samples={len(self)}, n_components={self.n_components}{m})"

    def _shape_out(self, t: torch.Tensor) -> torch.Tensor:
        # internal tensors carry a trailing output axis; drop it for a scalar target
        return t.squeeze(-1) if self.n_outputs is None else t

    # ----------------------------------------------------------- moments, density
    def mean(self) -> np.ndarray:
        """E[y|x] = sum_k w_k mu_k, of shape (n,) or (n, m)."""
        return to_numpy(self._shape_out(self._mean()))

    def _mean(self) -> torch.Tensor:
        return torch.einsum("nk,nkm->nm", self._w, self._mu)

    def var(self) -> np.ndarray:
        """Marginal variance, sum_k w_k (sigma_k^2 + mu_k^2) - E[y|x]^2; (n,) or (n, m).

        The first term is the expected noise variance, the rest the spread of the
        component means (law of total variance).
        """
        m = self._mean()
        second = torch.einsum("nk,nkm->nm", self._w, self._sd**2 + self._mu**2)
        return to_numpy(self._shape_out(torch.clamp(second - m**2, min=0.0)))

    def std(self) -> np.ndarray:
        """Square root of :meth:`var`."""
        return np.sqrt(self.var())

    def _check_y(self, y) -> torch.Tensor:
        y = torch.as_tensor(np.asarray(y, dtype=np.float64), dtype=EM_DTYPE)
        n = len(self)
        if self.n_outputs is None:
            if y.shape != (n,):
                raise ValueError(f"y must have shape ({n},); got {tuple(y.shape)}.")
            return y.unsqueeze(-1)
        if y.shape != (n, self.n_outputs):
            raise ValueError(f"y must have shape ({n}, {self.n_outputs}); got {tuple(y.shape)}.")
        return y

    def _log_components(self, y: torch.Tensor) -> torch.Tensor:
        # log w_k + sum_j log N(y_j; mu_kj, sd_kj^2) for y of shape (n, m) -> (n, K)
        z = (y.unsqueeze(1) - self._mu) / self._sd  # (n, K, m)
        logn = -0.5 * (LOG_2PI + z * z) - torch.log(self._sd)
        return torch.log(self._w) + logn.sum(-1)

    def logpdf(self, y) -> np.ndarray:
        """Log density log p(y_i|x_i) per row, of shape (n,), for y of the target's shape."""
        return to_numpy(torch.logsumexp(self._log_components(self._check_y(y)), dim=1))

    def pdf(self, y) -> np.ndarray:
        """Density p(y_i|x_i) per row, of shape (n,)."""
        return np.exp(self.logpdf(y))

    def cdf(self, y) -> np.ndarray:
        """Marginal CDF, P(Y_j <= y_j | x) = sum_k w_k Phi((y_j - mu_kj) / sigma_kj).

        Returns an array of the target's shape, one marginal probability per output.
        """
        yt = self._check_y(y)
        return to_numpy(self._shape_out(self._cdf(yt)))

    def _cdf(self, y: torch.Tensor) -> torch.Tensor:
        z = (y.unsqueeze(1) - self._mu) / self._sd  # (n, K, m)
        return torch.einsum("nk,nkm->nm", self._w, torch.special.ndtr(z))

    # ------------------------------------------------------------ quantiles
    def quantile(self, q: float) -> np.ndarray:
        """Marginal quantile F^{-1}(q) per row and output, found by bisection on the CDF.

        The mixture CDF is monotone, so 64 halvings of a bracket that holds every
        component's [mu - 40 sigma, mu + 40 sigma] give the answer to machine precision.
        """
        if not 0.0 < q < 1.0:
            raise ValueError(f"q must be in (0, 1); got {q!r}.")
        lo = (self._mu - 40 * self._sd).amin(1)  # (n, m)
        hi = (self._mu + 40 * self._sd).amax(1)
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            below = self._cdf(mid) < q
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        return to_numpy(self._shape_out(0.5 * (lo + hi)))

    def interval(self, alpha: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
        """Central interval holding probability ``alpha`` of each marginal.

        Returns ``(lower, upper)`` = (F^{-1}((1 - alpha) / 2), F^{-1}((1 + alpha) / 2)),
        each of the target's shape. For a multimodal row the interval covers the gap
        between modes too; :meth:`modes` and :meth:`sample` show the structure.
        """
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1); got {alpha!r}.")
        return self.quantile((1.0 - alpha) / 2.0), self.quantile((1.0 + alpha) / 2.0)

    # -------------------------------------------------------------- sampling
    def sample(self, n_samples: int = 1, random_state=None) -> np.ndarray:
        """Draw ``n_samples`` values of y for each row.

        Returns
        -------
        ndarray of shape (n, n_samples) or (n, n_samples, m)
        """
        if (
            isinstance(n_samples, bool)
            or not isinstance(n_samples, (int, np.integer))
            or (n_samples < 1)
        ):
            raise ValueError(f"n_samples must be a positive int; got {n_samples!r}.")
        gen = torch_generator(random_state)
        n = len(self)
        comp = torch.multinomial(self._w, int(n_samples), replacement=True, generator=gen)
        idx = comp.unsqueeze(-1).expand(-1, -1, self._mu.shape[2])  # (n, s, m)
        mu = torch.gather(self._mu, 1, idx)
        sd = torch.gather(self._sd, 1, idx)
        eps = torch.randn(mu.shape, generator=gen, dtype=EM_DTYPE)
        out = mu + sd * eps
        return to_numpy(out.squeeze(-1) if self.n_outputs is None else out).reshape(
            (n, int(n_samples)) if self.n_outputs is None else (n, int(n_samples), -1)
        )

    # ----------------------------------------------------------------- modes
    def modes(
        self, *, tol: float = 1e-10, max_iter: int = 1000, return_density: bool = False
    ) -> list:
        """The modes (local maxima) of each row's mixture density.

        Modes are not the component means: two close components merge into one mode,
        and a wide component under a narrow one adds none. Following Carreira-Perpinan
        (2000), a fixed-point iteration started from every component mean climbs the
        density; for diagonal covariances it reads, per output j,

        .. math::  y_j \\leftarrow \\frac{\\sum_k p(k|y) \\mu_{kj} / \\sigma_{kj}^2}
                                      {\\sum_k p(k|y) / \\sigma_{kj}^2},

        with p(k|y) the posterior of component k at y. Its limits are stationary
        points; those closer than 1e-4 of the smallest scale are merged and only
        points where the Hessian of the density is negative definite are kept.

        Parameters
        ----------
        tol : float, default=1e-10
            Stop when no point moves more than ``tol`` times the smallest scale.
        max_iter : int, default=1000
            Iteration cap (convergence is linear where components nearly merge).
        return_density : bool, default=False
            Also return the density at each mode.

        Returns
        -------
        list of length n
            Row i holds an array of shape (n_modes_i,) or (n_modes_i, m), sorted by
            density, highest first; with ``return_density`` each entry is a pair
            ``(modes, densities)``.
        """
        w, mu, sd = self._w, self._mu, self._sd
        inv_var = 1.0 / sd**2  # (n, K, m)
        scale = sd.amin(dim=(1, 2))  # (n,)
        x = mu.clone()  # (n, S, m): one start per component mean
        log_w = torch.log(w).unsqueeze(1)  # (n, 1, K)
        for _ in range(max_iter):
            post = self._posterior_at(x, log_w)  # (n, S, K)
            num = torch.einsum("nsk,nkm->nsm", post, mu * inv_var)
            den = torch.einsum("nsk,nkm->nsm", post, inv_var)
            x_new = num / den
            step = (x_new - x).abs().amax(dim=(1, 2))
            x = x_new
            if bool((step <= tol * scale).all()):
                break
        logp = torch.logsumexp(self._log_comp_at(x, log_w), dim=2)  # (n, S)
        hess_ok = self._negative_definite(x)  # (n, S)
        out = []
        for i in range(len(self)):
            order = torch.argsort(logp[i], descending=True)
            kept: list[int] = []
            for s in order.tolist():
                if not bool(hess_ok[i, s]) or w[i, s] <= 0:
                    continue
                if any(
                    float((x[i, s] - x[i, t]).abs().max()) <= 1e-4 * float(scale[i]) for t in kept
                ):
                    continue
                kept.append(s)
            if not kept:  # degenerate flat tops: fall back to the highest point
                kept = [int(order[0])]
            m = x[i, kept]
            m = m.squeeze(-1) if self.n_outputs is None else m
            dens = torch.exp(logp[i, kept])
            out.append((to_numpy(m), to_numpy(dens)) if return_density else to_numpy(m))
        return out

    def _log_comp_at(self, x: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
        # log w_k + log N(x_s; mu_k, sd_k) for points x (n, S, m) -> (n, S, K)
        z = (x.unsqueeze(2) - self._mu.unsqueeze(1)) / self._sd.unsqueeze(1)  # (n, S, K, m)
        logn = (-0.5 * (LOG_2PI + z * z) - torch.log(self._sd).unsqueeze(1)).sum(-1)
        return log_w + logn

    def _posterior_at(self, x: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self._log_comp_at(x, log_w), dim=2)

    def _negative_definite(self, x: torch.Tensor) -> torch.Tensor:
        """Whether the density's Hessian at each point x (n, S, m) is negative definite.

        For p(y) = sum_k c_k(y) with Gaussian c_k, the Hessian is
        sum_k c_k(y) [u_k u_k^T - diag(1/sigma_k^2)] with u_k = (mu_k - y) / sigma_k^2;
        dividing by p(y) > 0 keeps its sign, so posteriors replace c_k.
        """
        post = self._posterior_at(x, torch.log(self._w).unsqueeze(1))  # (n, S, K)
        inv_var = 1.0 / self._sd**2  # (n, K, m)
        u = (self._mu.unsqueeze(1) - x.unsqueeze(2)) * inv_var.unsqueeze(1)  # (n, S, K, m)
        outer = torch.einsum("nsk,nskm,nskl->nsml", post, u, u)
        diag = torch.einsum("nsk,nkm->nsm", post, inv_var)
        hess = outer - torch.diag_embed(diag)
        # scale-free test: eigenvalues relative to the curvature of the sharpest component
        eig = torch.linalg.eigvalsh(hess)  # (n, S, m), ascending
        ref = diag.amax(-1)
        return eig[..., -1] < 1e-6 * ref
