"""Component distributions of predictive mixtures: normal, Student-t and Poisson.

Each family works on tensors of shape (n, K, m): component locations ``loc``,
scales ``scale`` (the standard deviation for the normal, the scale for the t; unused
for the Poisson, whose ``loc`` is its rate) and, for the t, degrees of freedom
``df`` of shape (n, K). Outputs are independent given the component, except for the
multivariate t, whose outputs share one latent scale (the t of Student-t mixture
regression).
"""

from __future__ import annotations

import numpy as np
import torch

from moekit._core.logspace import gaussian_logpdf, student_t_logpdf


class Normal:
    """N(loc, scale^2) per output; the component density is the product over outputs."""

    name = "normal"
    discrete = False

    @staticmethod
    def log_prob(y, loc, scale, df=None):  # y (n, S, 1, m) vs (n, 1, K, m) -> (n, S, K)
        return gaussian_logpdf(y - loc, scale * scale).sum(-1)

    @staticmethod
    def cdf(y, loc, scale, df=None):
        return torch.special.ndtr((y - loc) / scale)

    @staticmethod
    def variance(loc, scale, df=None):
        return scale**2

    @staticmethod
    def sample(loc, scale, df, gen):
        return loc + scale * torch.randn(loc.shape, generator=gen, dtype=loc.dtype)

    @staticmethod
    def shift_weights(y, loc, scale, df=None):
        """Per-component weights a_k of the mode-finding fixed point (1 for the normal)."""
        return torch.ones(y.shape[:-1], dtype=y.dtype)


class StudentT:
    """Multivariate t with diagonal scales: y = loc + scale * z / sqrt(u), u ~ Gamma(df/2, df/2)."""

    name = "student_t"
    discrete = False

    @staticmethod
    def log_prob(y, loc, scale, df):
        d2 = (((y - loc) / scale) ** 2).sum(-1)  # Mahalanobis distance^2
        return student_t_logpdf(d2, torch.log(scale).sum(-1), df, y.shape[-1])

    @staticmethod
    def cdf(y, loc, scale, df):
        from scipy.special import stdtr  # the t CDF is not in torch

        z = ((y - loc) / scale).cpu().numpy()
        return torch.as_tensor(stdtr(df.cpu().numpy(), z), dtype=y.dtype, device=y.device)

    @staticmethod
    def variance(loc, scale, df):
        nu = df.unsqueeze(-1)
        factor = torch.where(
            nu > 2, nu / (nu - 2).clamp(min=1e-300), torch.full_like(nu, torch.inf)
        )
        return scale**2 * factor

    @staticmethod
    def sample(loc, scale, df, gen):
        nu = df.unsqueeze(-1).expand((*loc.shape[:-1], 1))
        u = torch._standard_gamma(nu / 2, generator=gen) / (nu / 2)
        return loc + scale * torch.randn(loc.shape, generator=gen, dtype=loc.dtype) / u.sqrt()

    @staticmethod
    def shift_weights(y, loc, scale, df):
        # the latent-scale weight E[u | y, k] = (df + m) / (df + d^2) of the EM for t
        m = y.shape[-1]
        d2 = (((y - loc) / scale) ** 2).sum(-1)
        return (df + m) / (df + d2)


class Poisson:
    """Poisson(loc) per output (``loc`` is the rate; ``scale`` is sqrt(rate))."""

    name = "poisson"
    discrete = True

    @staticmethod
    def log_prob(y, loc, scale=None, df=None):
        rate = loc.clamp(min=1e-300)
        valid = (y >= 0) & (y == torch.round(y))
        lp = y * torch.log(rate) - rate - torch.lgamma(y.clamp(min=0) + 1)
        return torch.where(valid, lp, torch.full_like(lp, -torch.inf)).sum(-1)

    @staticmethod
    def cdf(y, loc, scale=None, df=None):
        from scipy.special import pdtr  # regularised incomplete gamma, P(Y <= k)

        k, rate = np.broadcast_arrays(torch.floor(y).cpu().numpy(), loc.cpu().numpy())
        out = np.where(k < 0, 0.0, pdtr(np.maximum(k, 0), rate))
        return torch.as_tensor(out, dtype=y.dtype, device=y.device)

    @staticmethod
    def variance(loc, scale=None, df=None):
        return loc

    @staticmethod
    def sample(loc, scale, df, gen):
        return torch.poisson(loc, generator=gen)


FAMILIES = {f.name: f for f in (Normal, StudentT, Poisson)}
