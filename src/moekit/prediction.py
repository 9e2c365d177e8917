"""The predictive mixture p(y|x) = sum_k w_k(x) p_k(y | x) of every row.

Every probabilistic estimator in moekit answers ``predict_distribution(X)`` with a
:class:`MixturePrediction`: one mixture per row of ``X``, of normal components by
default, of Student-t components for robust experts or of Poisson components for
count experts. For inverse problems (one x, several valid y) the mixture, its modes
and its samples are the answer; its mean is only a summary, and may itself be an
invalid answer.
"""

from __future__ import annotations

import numpy as np
import torch

from moekit._core.components import check_components, component_family
from moekit._core.engine import EM_DTYPE, to_numpy, torch_generator
from moekit._core.modes import grid_modes, integer_modes

__all__ = ["MixturePrediction"]


def _as64(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=EM_DTYPE)


def _check_n_samples(n_samples) -> int:
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int; got {n_samples!r}.")
    return int(n_samples)


class MixturePrediction:
    """Per-row mixtures with diagonal scales.

    Row i is the density

    .. math::  p(y \\mid x_i) = \\sum_k w_{ik}\\, p(y; \\mu_{ik}, \\sigma_{ik}),

    with p a normal N(mu, diag sigma^2) (default), a multivariate Student-t with
    location mu, diagonal scales sigma and ``df`` degrees of freedom, a Poisson of
    rate mu, or (one output) a Gamma, lognormal, Weibull or negative binomial of mean mu and
    standard deviation sigma, a one-trial binomial of success probability mu, or a
    point mass at zero (mu = sigma = 0).

    Parameters
    ----------
    weights : array-like of shape (n_samples, n_components)
        Mixing weights; each row is non-negative and sums to one.
    means : array-like of shape (n_samples, n_components) or (n_samples, n_components, n_outputs)
        Component locations (means; rates for the Poisson).
    stds : array-like, same shape as ``means``
        Component standard deviations (scales for the t; sqrt(rate) for the Poisson).
    family : {'normal', 'student_t', 'poisson', 'gamma', 'lognormal', 'weibull', \
'negative_binomial', 'binomial', 'zero'} or list of them, default='normal'
        The components' family, or one per component (``['zero', 'poisson']``: a
        zero-inflated Poisson).
    df : array-like of shape (n_samples, n_components) or (n_components,), optional
        Degrees of freedom of Student-t components.

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

    def __init__(self, weights, means, stds, *, family: str | list = "normal", df=None) -> None:
        self._family = component_family(family)
        w, mu, sd = _as64(weights), _as64(means), _as64(stds)
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
        check_components(self._family.name, mu, sd)
        self._df = None
        if family == "student_t":
            if df is None:
                raise ValueError("df is required for family='student_t'.")
            nu = _as64(df)
            nu = nu.expand(w.shape) if nu.ndim <= 1 else nu
            if nu.shape != w.shape or not bool((nu > 0).all()):
                raise ValueError(f"df must be positive, of shape {tuple(w.shape)} or (K,).")
            self._df = nu.contiguous()
        self.n_outputs: int | None = None if mu.ndim == 2 else int(mu.shape[2])
        self._w = w / w.sum(1, keepdim=True)
        self._mu = mu if mu.ndim == 3 else mu.unsqueeze(-1)  # (n, K, m)
        self._sd = sd if sd.ndim == 3 else sd.unsqueeze(-1)  # (n, K, m)

    @property
    def family(self) -> str:
        return self._family.name

    @property
    def df(self) -> np.ndarray | None:
        return None if self._df is None else to_numpy(self._df)

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
        out = object.__new__(type(self))
        out.n_outputs, out._family = self.n_outputs, self._family
        out._w, out._mu, out._sd = self._w[rows], self._mu[rows], self._sd[rows]
        out._df = None if self._df is None else self._df[rows]
        return out

    def __repr__(self) -> str:
        m = "" if self.n_outputs is None else f", n_outputs={self.n_outputs}"
        fam = "" if self.family == "normal" else f", family={self.family!r}"
        return f"MixturePrediction(n_samples={len(self)}, n_components={self.n_components}{m}{fam})"

    def _shape_out(self, t: torch.Tensor) -> torch.Tensor:
        # internal tensors carry a trailing output axis; drop it for a scalar target
        return t.squeeze(-1) if self.n_outputs is None else t

    def _comp(self, points: torch.Tensor, fn: str) -> torch.Tensor:
        """Apply a family function to points (n, S, m) against every component -> (n, S, K)."""
        df = None if self._df is None else self._df.unsqueeze(1)  # (n, 1, K)
        return getattr(self._family, fn)(
            points.unsqueeze(2), self._mu.unsqueeze(1), self._sd.unsqueeze(1), df
        )

    # ----------------------------------------------------------- moments, density
    def mean(self) -> np.ndarray:
        """E[y|x] = sum_k w_k mu_k, of shape (n,) or (n, m)."""
        return to_numpy(self._shape_out(self._mean()))

    def _mean(self) -> torch.Tensor:
        return torch.einsum("nk,nkm->nm", self._w, self._mu)

    def var(self) -> np.ndarray:
        """Marginal variance, sum_k w_k (Var_k + mu_k^2) - E[y|x]^2; (n,) or (n, m).

        The first term is the expected noise variance, the rest the spread of the
        component means (law of total variance). Infinite for t components with at
        most 2 degrees of freedom.
        """
        m = self._mean()
        comp_var = self._family.variance(self._mu, self._sd, self._df)
        second = torch.einsum("nk,nkm->nm", self._w, comp_var + self._mu**2)
        return to_numpy(self._shape_out(torch.clamp(second - m**2, min=0.0)))

    def std(self) -> np.ndarray:
        """Square root of :meth:`var`."""
        return np.sqrt(self.var())

    def _check_y(self, y) -> torch.Tensor:
        y = _as64(y)
        n = len(self)
        if self.n_outputs is None:
            if y.shape != (n,):
                raise ValueError(f"y must have shape ({n},); got {tuple(y.shape)}.")
            return y.unsqueeze(-1)
        if y.shape != (n, self.n_outputs):
            raise ValueError(f"y must have shape ({n}, {self.n_outputs}); got {tuple(y.shape)}.")
        return y

    def _log_joint_at(self, points: torch.Tensor) -> torch.Tensor:
        # log w_k + log p_k(point) for points (n, S, m) -> (n, S, K)
        return torch.log(self._w).unsqueeze(1) + self._comp(points, "log_prob")

    def logpdf(self, y) -> np.ndarray:
        """Log density (log probability for Poisson) of y per row, of shape (n,)."""
        y = self._check_y(y).unsqueeze(1)  # (n, 1, m)
        return to_numpy(torch.logsumexp(self._log_joint_at(y), dim=2)[:, 0])

    def pdf(self, y) -> np.ndarray:
        """Density p(y_i | x_i) per row, of shape (n,)."""
        return np.exp(self.logpdf(y))

    def cdf(self, y) -> np.ndarray:
        """Marginal CDF, P(Y_j <= y_j | x) = sum_k w_k F_k(y_j), of the target's shape."""
        return to_numpy(self._shape_out(self._cdf(self._check_y(y))))

    def _cdf(self, y: torch.Tensor) -> torch.Tensor:
        # marginals: the t's marginals are t's with the same df; (n, m)
        df = None if self._df is None else self._df.unsqueeze(-1)  # (n, K, 1)
        comp = self._family.cdf(y.unsqueeze(1), self._mu, self._sd, df)  # (n, K, m)
        return torch.einsum("nk,nkm->nm", self._w, comp)

    # ------------------------------------------------------------ quantiles
    def quantile(self, q: float) -> np.ndarray:
        """Marginal quantile F^{-1}(q) per row and output, by bisection on the CDF.

        The mixture CDF is monotone. The bracket starts at every component's
        mu -/+ 40 sigma and is widened until it holds q (heavy t tails), then halved 64
        times; for the Poisson the answer is the smallest integer k with F(k) >= q.
        """
        if not 0.0 < q < 1.0:
            raise ValueError(f"q must be in (0, 1); got {q!r}.")
        width = 40 * self._sd if not self._family.discrete else 10 * self._mu.sqrt() + 10
        lo = (self._mu - width).amin(1)  # (n, m)
        hi = (self._mu + width).amax(1)
        for _ in range(60):  # widen until F(lo) < q <= F(hi)
            bad_lo, bad_hi = self._cdf(lo) >= q, self._cdf(hi) < q
            if not bool(bad_lo.any() or bad_hi.any()):
                break
            span = hi - lo
            lo = torch.where(bad_lo, lo - span, lo)
            hi = torch.where(bad_hi, hi + span, hi)
        if self._family.discrete:
            lo, hi = torch.floor(lo).clamp(min=-1), torch.ceil(hi)
            while bool((hi - lo > 1).any()):
                mid = torch.floor(0.5 * (lo + hi))
                below = self._cdf(mid) < q
                lo = torch.where(below, mid, lo)
                hi = torch.where(below, hi, mid)
            return to_numpy(self._shape_out(hi))
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
        gen = torch_generator(random_state)
        n, s = len(self), _check_n_samples(n_samples)
        comp = torch.multinomial(self._w, s, replacement=True, generator=gen)  # (n, s)
        idx = comp.unsqueeze(-1).expand(-1, -1, self._mu.shape[2])  # (n, s, m)
        mu = torch.gather(self._mu, 1, idx)
        sd = torch.gather(self._sd, 1, idx)
        df = None if self._df is None else torch.gather(self._df, 1, comp)
        per_component = {"comp": comp} if hasattr(self._family, "groups") else {}
        out = self._family.sample(mu, sd, df, gen, **per_component)
        return to_numpy(out.squeeze(-1) if self.n_outputs is None else out).reshape(
            (n, s) if self.n_outputs is None else (n, s, -1)
        )

    # ----------------------------------------------------------------- modes
    def modes(
        self,
        *,
        tol: float = 1e-10,
        max_iter: int = 1000,
        min_relative_density: float = 0.0,
        return_density: bool = False,
    ) -> list:
        """The modes (local maxima) of each row's mixture density.

        Modes are not the component means: two close components merge into one mode,
        and a wide component under a narrow one adds none. Following Carreira-Perpinan
        (2000), a fixed-point iteration started from every component mean climbs the
        density; for diagonal scales it reads, per output j,

        .. math::  y_j \\leftarrow \\frac{\\sum_k a_k(y)\\, \\mu_{kj} / \\sigma_{kj}^2}
                                      {\\sum_k a_k(y) / \\sigma_{kj}^2},

        with a_k(y) the posterior of component k at y (times, for t components, the
        latent-scale weight (nu + m) / (nu + d_k(y)^2) of the EM for the t). Its
        limits are stationary points; those closer than 1e-4 of the smallest scale are
        merged and only points where the Hessian of the log density is negative
        definite are kept. Poisson mixtures are searched on the integers.

        Parameters
        ----------
        tol : float, default=1e-10
            Stop when no point moves more than ``tol`` times the smallest scale.
        max_iter : int, default=1000
            Iteration cap (convergence is linear where components nearly merge).
        min_relative_density : float, default=0.0
            Drop modes whose density is below this fraction of the row's highest mode
            (e.g. 0.05 hides negligible bumps of far-away components).
        return_density : bool, default=False
            Also return the density at each mode.

        Returns
        -------
        list of length n
            Row i holds an array of shape (n_modes_i,) or (n_modes_i, m), sorted by
            density, highest first; with ``return_density`` each entry is a pair
            ``(modes, densities)``.
        """
        if not 0.0 <= min_relative_density < 1.0:
            raise ValueError(
                f"min_relative_density must be in [0, 1); got {min_relative_density!r}."
            )
        if self._family.discrete:
            return self._prune(self._integer_modes(), min_relative_density, return_density)
        if not hasattr(self._family, "shift_weights"):  # no mean-shift fixed point
            return self._prune(self._grid_modes(), min_relative_density, return_density)
        scale = self._sd.amin(dim=(1, 2))  # (n,)
        x = self._mu.clone()  # (n, S, m): one start per component mean
        for _ in range(max_iter):
            a = torch.softmax(self._log_joint_at(x), dim=2) * self._comp(x, "shift_weights")
            x_new = self._shift(a)
            step = (x_new - x).abs().amax(dim=(1, 2))
            x = x_new
            if bool((step <= tol * scale).all()):
                break
        logp = torch.logsumexp(self._log_joint_at(x), dim=2)  # (n, S)
        is_max = self._is_local_max(x, scale)  # (n, S)
        out = []
        for i in range(len(self)):
            order = torch.argsort(logp[i], descending=True)
            kept: list[int] = []
            for s in order.tolist():
                if not bool(is_max[i, s]) or self._w[i, s] <= 0:
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
            out.append((to_numpy(m), to_numpy(torch.exp(logp[i, kept]))))
        return self._prune(out, min_relative_density, return_density)

    def _shift(self, a: torch.Tensor) -> torch.Tensor:
        """The fixed point's next points from the weights a (n, S, K) of the components."""
        inv_var = 1.0 / self._sd**2  # (n, K, m)
        num = torch.einsum("nsk,nkm->nsm", a, self._mu * inv_var)
        return num / torch.einsum("nsk,nkm->nsm", a, inv_var)

    @staticmethod
    def _prune(found: list, ratio: float, return_density: bool) -> list:
        out = []
        for modes, dens in found:
            keep = dens >= ratio * dens.max() if len(dens) else dens > 0
            out.append((modes[keep], dens[keep]) if return_density else modes[keep])
        return out

    def _is_local_max(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Whether the Hessian of log p at each point x (n, S, m) is negative definite.

        Central second differences with a step of 1e-3 of the row's smallest scale,
        compared with the curvature of that scale, 1 / scale^2.
        """
        n, S, m = x.shape
        h = (1e-3 * scale).view(n, 1, 1)

        def f(pts):
            return torch.logsumexp(self._log_joint_at(pts), dim=2)  # (n, S)

        f0 = f(x)
        hess = x.new_empty((n, S, m, m))
        eye = torch.eye(m, dtype=x.dtype)
        for a in range(m):
            ea = eye[a].view(1, 1, m) * h
            hess[..., a, a] = (f(x + ea) - 2 * f0 + f(x - ea)) / h[..., 0] ** 2
            for b in range(a + 1, m):
                eb = eye[b].view(1, 1, m) * h
                val = (f(x + ea + eb) - f(x + ea - eb) - f(x - ea + eb) + f(x - ea - eb)) / (
                    4 * h[..., 0] ** 2
                )
                hess[..., a, b] = hess[..., b, a] = val
        top = torch.linalg.eigvalsh(hess)[..., -1]
        return top < 1e-4 / scale.view(n, 1) ** 2

    def _integer_modes(self) -> list:
        spread = torch.maximum(self._mu.sqrt(), self._sd)  # sqrt(rate) for the Poisson
        top = int(torch.ceil((self._mu + 10 * spread + 10).max()))
        return integer_modes(self._log_density, top, len(self))

    def _grid_modes(self) -> list:
        # positive variables: from just above 0 to far in every component's right tail
        hi = (self._mu + 10 * self._sd).amax(dim=(1, 2))
        return grid_modes(self._log_density, 1e-9 * hi, hi)

    def _log_density(self, points: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(self._log_joint_at(points), dim=2)
