"""Component distributions of predictive mixtures.

Each family works on tensors of shape (n, K, m): component locations ``loc``,
scales ``scale`` (the standard deviation for the normal, the scale for the t; unused
for the Poisson, whose ``loc`` is its rate) and, for the t, degrees of freedom
``df`` of shape (n, K). Outputs are independent given the component, except for the
multivariate t, whose outputs share one latent scale (the t of Student-t mixture
regression).

The families of GLM experts (Gamma, lognormal, negative binomial, binomial, a point
mass at zero) take ``loc`` as the component's mean and ``scale`` as its standard
deviation, from which each recovers its own parameters: the Gamma's shape
(mean / sd)^2, the lognormal's s^2 = log(1 + (sd / mean)^2), the Weibull's shape by a
1-d solve, the negative binomial's
dispersion (sd^2 - mean) / mean^2, the one-trial binomial's probability (its mean).
"""

from __future__ import annotations

import numpy as np
import torch

from moekit._core.logspace import gaussian_logpdf, student_t_logpdf
from moekit._core.weibull import weibull_shape


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


def _at_support(lp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log p where ``valid``, -inf elsewhere, summed over outputs."""
    return torch.where(valid, lp, torch.full_like(lp, -torch.inf)).sum(-1)


class Gamma:
    """Gamma with mean ``loc`` and standard deviation ``scale``: shape (loc / scale)^2."""

    name = "gamma"
    discrete = False

    @staticmethod
    def _shape_rate(loc, scale):
        a = (loc / scale) ** 2
        return a, a / loc

    @staticmethod
    def log_prob(y, loc, scale, df=None):
        a, rate = Gamma._shape_rate(loc, scale)
        yp = y.clamp(min=1e-300)
        lp = a * torch.log(rate) + (a - 1.0) * torch.log(yp) - rate * yp - torch.lgamma(a)
        return _at_support(lp, y > 0)

    @staticmethod
    def cdf(y, loc, scale, df=None):
        a, rate = Gamma._shape_rate(loc, scale)
        return torch.special.gammainc(a, rate * y.clamp(min=0.0))

    @staticmethod
    def variance(loc, scale, df=None):
        return scale**2

    @staticmethod
    def sample(loc, scale, df, gen):
        a, rate = Gamma._shape_rate(loc, scale)
        return torch._standard_gamma(a, generator=gen) / rate


class LogNormal:
    """Lognormal with mean ``loc`` and standard deviation ``scale``."""

    name = "lognormal"
    discrete = False

    @staticmethod
    def _mu_s(loc, scale):
        s2 = torch.log1p((scale / loc) ** 2)
        return torch.log(loc) - 0.5 * s2, s2.sqrt()

    @staticmethod
    def log_prob(y, loc, scale, df=None):
        mu, s = LogNormal._mu_s(loc, scale)
        log_y = torch.log(y.clamp(min=1e-300))
        return _at_support(gaussian_logpdf(log_y - mu, s * s) - log_y, y > 0)

    @staticmethod
    def cdf(y, loc, scale, df=None):
        mu, s = LogNormal._mu_s(loc, scale)
        z = (torch.log(y.clamp(min=1e-300)) - mu) / s
        return torch.where(y > 0, torch.special.ndtr(z), torch.zeros_like(z))

    @staticmethod
    def variance(loc, scale, df=None):
        return scale**2

    @staticmethod
    def sample(loc, scale, df, gen):
        mu, s = LogNormal._mu_s(loc, scale)
        return torch.exp(mu + s * torch.randn(loc.shape, generator=gen, dtype=loc.dtype))


class Weibull:
    """Weibull with mean ``loc`` and standard deviation ``scale``: the shape a solves
    Gamma(1 + 2/a) / Gamma(1 + 1/a)^2 = 1 + (sd / mean)^2 (:func:`weibull_shape`),
    then its scale is lambda = mean / Gamma(1 + 1/a)."""

    name = "weibull"
    discrete = False

    @staticmethod
    def _shape_scale(loc, scale):
        a = weibull_shape(scale / loc)
        return a, loc * torch.exp(-torch.lgamma(1.0 + 1.0 / a))

    @staticmethod
    def log_prob(y, loc, scale, df=None):
        a, lam = Weibull._shape_scale(loc, scale)
        log_y = torch.log(y.clamp(min=1e-300))
        w = a * (log_y - torch.log(lam))
        return _at_support(torch.log(a) - log_y + w - torch.exp(w), y > 0)

    @staticmethod
    def cdf(y, loc, scale, df=None):
        a, lam = Weibull._shape_scale(loc, scale)
        z = (y.clamp(min=0.0) / lam) ** a
        return -torch.expm1(-z)

    @staticmethod
    def variance(loc, scale, df=None):
        return scale**2

    @staticmethod
    def sample(loc, scale, df, gen):
        # lambda E^(1/a), E standard exponential: P(Y > y) = P(E > (y/lambda)^a)
        a, lam = Weibull._shape_scale(loc, scale)
        e = torch.empty(loc.shape, dtype=loc.dtype).exponential_(generator=gen)
        return lam * e ** (1.0 / a)


class NegativeBinomial:
    """NB2 with mean ``loc`` and standard deviation ``scale``: variance mu + phi mu^2."""

    name = "negative_binomial"
    discrete = True

    @staticmethod
    def _dispersion(loc, scale):
        # at most the experts' smallest dispersion below: a Poisson to rounding
        return ((scale**2 - loc) / loc**2).clamp(min=1e-8)

    @staticmethod
    def log_prob(y, loc, scale, df=None):
        phi = NegativeBinomial._dispersion(loc, scale)
        theta, k = 1.0 / phi, y.clamp(min=0)
        lp = (torch.lgamma(k + theta) - torch.lgamma(theta) - torch.lgamma(k + 1.0)
              - (theta + k) * torch.log1p(phi * loc) + k * torch.log(phi * loc))  # fmt: skip
        return _at_support(lp, (y >= 0) & (y == torch.round(y)))

    @staticmethod
    def cdf(y, loc, scale, df=None):
        from scipy.special import betainc  # P(Y <= k) = I_{theta/(theta+mu)}(theta, k + 1)

        phi = NegativeBinomial._dispersion(loc, scale)
        k, theta, mu = np.broadcast_arrays(
            torch.floor(y).cpu().numpy(), (1.0 / phi).cpu().numpy(), loc.cpu().numpy()
        )
        out = np.where(k < 0, 0.0, betainc(theta, np.maximum(k, 0) + 1.0, theta / (theta + mu)))
        return torch.as_tensor(out, dtype=y.dtype, device=y.device)

    @staticmethod
    def variance(loc, scale, df=None):
        return scale**2

    @staticmethod
    def sample(loc, scale, df, gen):
        # a Gamma-mixed Poisson: rate ~ Gamma(theta, mean mu)
        theta = 1.0 / NegativeBinomial._dispersion(loc, scale)
        rate = torch._standard_gamma(theta, generator=gen) * loc / theta
        return torch.poisson(rate, generator=gen)


class Binomial:
    """One trial (Bernoulli) with success probability ``loc``; y in {0, 1}."""

    name = "binomial"
    discrete = True

    @staticmethod
    def log_prob(y, loc, scale=None, df=None):
        p = loc.clamp(1e-300, 1.0)
        lp = torch.where(y > 0.5, torch.log(p), torch.log1p(-p.clamp(max=1.0 - 1e-16)))
        return _at_support(lp, (y == 0) | (y == 1))

    @staticmethod
    def cdf(y, loc, scale=None, df=None):
        below = torch.where(y >= 0, 1.0 - loc, torch.zeros_like(loc))
        return torch.where(y >= 1, torch.ones_like(below), below)

    @staticmethod
    def variance(loc, scale=None, df=None):
        return loc * (1.0 - loc)

    @staticmethod
    def sample(loc, scale, df, gen):
        return torch.bernoulli(loc, generator=gen)


class Zero:
    """A point mass at zero (``loc`` and ``scale`` are 0)."""

    name = "zero"
    discrete = True

    @staticmethod
    def log_prob(y, loc, scale=None, df=None):
        lp = torch.zeros(torch.broadcast_shapes(y.shape, loc.shape), dtype=y.dtype)
        return _at_support(lp, y == 0)

    @staticmethod
    def cdf(y, loc, scale=None, df=None):
        return (y >= 0).to(loc.dtype).expand(torch.broadcast_shapes(y.shape, loc.shape))

    @staticmethod
    def variance(loc, scale=None, df=None):
        return torch.zeros_like(loc)

    @staticmethod
    def sample(loc, scale, df, gen):
        return torch.zeros_like(loc)


FAMILIES = {
    f.name: f
    for f in (
        Normal,
        StudentT,
        Poisson,
        Gamma,
        LogNormal,
        Weibull,
        NegativeBinomial,
        Binomial,
        Zero,
    )
}
#: families whose locations are means of positive or non-negative variables
POSITIVE = {"poisson", "gamma", "lognormal", "weibull", "negative_binomial", "binomial", "zero"}


class PerComponent:
    """A family per component: component k of every row follows ``families[k]``.

    Each function applies every family to its own components (the component axis of
    ``loc`` is -2) and puts the results back in component order; ``sample`` takes the
    component each draw comes from.
    """

    def __init__(self, names) -> None:
        unknown = sorted({n for n in names if n not in FAMILIES})
        if unknown:
            raise ValueError(f"family must name families of {sorted(FAMILIES)}; got {unknown}.")
        self.names = list(names)
        self.groups = [(FAMILIES[n], torch.tensor([k for k, m in enumerate(names) if m == n]))
                       for n in dict.fromkeys(names)]  # fmt: skip
        self.discrete = all(f.discrete for f, _ in self.groups)
        if not self.discrete and any(f.discrete for f, _ in self.groups):
            raise ValueError("family mixes discrete and continuous components.")

    @property
    def name(self) -> list[str]:
        return self.names

    def _each(self, fn: str, out_shape, y, loc, scale, df, axis: int):
        out = loc.new_empty(out_shape)
        for fam, idx in self.groups:
            d = None if df is None else df.index_select(axis if df.ndim > 2 else -1, idx)
            val = getattr(fam, fn)(y, loc.index_select(-2, idx), scale.index_select(-2, idx), d)
            out.index_copy_(axis, idx, val)
        return out

    def log_prob(self, y, loc, scale, df=None):  # (n, S, 1, m) vs (n, 1, K, m) -> (n, S, K)
        shape = torch.broadcast_shapes(y.shape, loc.shape)[:-1]
        return self._each("log_prob", shape, y, loc, scale, df, -1)

    def cdf(self, y, loc, scale, df=None):  # (n, 1, m) vs (n, K, m) -> (n, K, m)
        return self._each("cdf", torch.broadcast_shapes(y.shape, loc.shape), y, loc, scale, df, -2)

    def variance(self, loc, scale, df=None):
        out = torch.empty_like(loc)
        for fam, idx in self.groups:
            d = None if df is None else df.index_select(-1, idx)
            out[..., idx, :] = fam.variance(loc[..., idx, :], scale[..., idx, :], d)
        return out

    def sample(self, loc, scale, df, gen, comp=None):
        """Draws (n, s, m) at the gathered parameters of the components ``comp`` (n, s)."""
        out = torch.empty_like(loc)
        for fam, idx in self.groups:
            mask = torch.isin(comp, idx)
            out[mask] = fam.sample(loc[mask], scale[mask], None, gen)
        return out


def component_family(family):
    """The component family of a name, or of a list of names (one per component)."""
    if isinstance(family, str):
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {sorted(FAMILIES)}; got {family!r}.")
        return FAMILIES[family]
    return PerComponent(family)


def check_components(family, mu: torch.Tensor, sd: torch.Tensor) -> None:
    """Refuse locations and scales no component of ``family`` (a name, or one per
    component) can take; mu and sd are (n, K) or (n, K, m)."""
    names = [family] * mu.shape[1] if isinstance(family, str) else list(family)
    if len(names) != mu.shape[1]:
        raise ValueError(f"family names {len(names)} components; the means have {mu.shape[1]}.")
    is_zero = torch.tensor([n == "zero" for n in names], dtype=torch.bool)
    is_zero = is_zero.view(1, -1, *([1] * (mu.ndim - 2)))
    if not bool(((sd > 0) | is_zero).all() and torch.isfinite(sd).all()):
        raise ValueError("stds must be positive and finite.")
    for name in dict.fromkeys(names):
        cols = mu[:, [k for k, n in enumerate(names) if n == name]]
        if name in POSITIVE and mu.ndim != 2:
            raise ValueError(f"family={name!r} supports a single output only.")
        if name in POSITIVE and name != "poisson" and bool((cols < 0).any()):
            raise ValueError(f"family={name!r} needs non-negative means.")
        if name == "poisson" and bool((cols <= 0).any()):
            raise ValueError("Poisson rates (means) must be positive.")
