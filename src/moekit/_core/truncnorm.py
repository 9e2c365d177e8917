"""The standard normal on an interval: its log probability and its first two moments.

Censored and truncated responses need log(Phi(b) - Phi(a)) for intervals anywhere
on the line, 40 standard deviations out included, where Phi(b) and Phi(a) are both
1 to the last bit and their difference underflows. Everything here works from
``torch.special.log_ndtr`` (accurate in the lower tail) on the side of the line
where the interval's mass is a difference of two lower-tail probabilities,

.. math::  \\Phi(b) - \\Phi(a) = \\Phi(-a) - \\Phi(-b),

and takes the difference in log space, log(e^u - e^v) = u + log(1 - e^{-(u - v)}),
with log1mexp computed as Maechler (2012) recommends. Infinite ends are allowed, and
the functions stay differentiable without NaN gradients there (autograd follows both
branches of a ``where``: the branch not taken is fed a harmless finite value).
"""

from __future__ import annotations

import math

import torch

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_LN2 = math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(-x)) for x >= 0, accurate near 0 and for large x (Maechler 2012)."""
    small = x < _LN2
    xs = torch.where(small, x, 1.0)  # each branch sees values it handles
    xl = torch.where(small, 1.0, x)
    return torch.where(small, torch.log(-torch.expm1(-xs)), torch.log1p(-torch.exp(-xl)))


def _log_ndtr(x: torch.Tensor) -> torch.Tensor:
    """log Phi(x), with -inf at -inf and 0 at +inf and zero gradients at either."""
    finite = torch.isfinite(x)
    inner = torch.special.log_ndtr(torch.where(finite, x, 0.0))
    ends = torch.where(x > 0, 0.0, -math.inf)  # exact in any float type
    return torch.where(finite, inner, ends)


def log_normal_interval(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Phi(b) - Phi(a)) for a < b, elementwise; either end may be infinite.

    Intervals right of 0 are mirrored to the left, where both lower-tail
    probabilities keep their digits: at (40, inf) this gives log Phi(-40) = -804.6
    where the naive difference gives log 0.

    Parameters
    ----------
    a, b : Tensor
        Lower and upper ends in standard units, broadcast together, a < b.

    Returns
    -------
    Tensor
    """
    a, b = torch.broadcast_tensors(a, b)
    # a + b is NaN only for (-inf, inf): no mirror needed there
    mirror = (a + b) > 0
    lo = torch.where(mirror, -b, a)
    hi = torch.where(mirror, -a, b)
    log_hi, log_lo = _log_ndtr(hi), _log_ndtr(lo)
    # hi > lo, so the gap is positive; where lo = -inf it is +inf and log1mexp gives 0
    gap = torch.where(torch.isfinite(log_lo), log_hi - log_lo, math.inf)
    return log_hi + log1mexp(gap)


def log_normal_pdf(z: torch.Tensor) -> torch.Tensor:
    """log phi(z) of the standard normal; -inf at infinite z (gradient zero there)."""
    finite = torch.isfinite(z)
    zs = torch.where(finite, z, 0.0)
    return torch.where(finite, -0.5 * zs * zs - LOG_SQRT_2PI, -math.inf)


def normal_interval_moments(
    a: torch.Tensor, b: torch.Tensor, log_mass: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """E[Z] and E[Z^2] of a standard normal Z conditioned on a < Z < b.

    .. math::  E[Z] = \\frac{\\phi(a) - \\phi(b)}{P}, \\qquad
               E[Z^2] = 1 + \\frac{a \\phi(a) - b \\phi(b)}{P}, \\qquad
               P = \\Phi(b) - \\Phi(a),

    each ratio phi / P taken as exp(log phi - log P), so that far tails keep their
    digits (on (40, inf), E[Z] = 40.025, the inverse Mills ratio). A term a phi(a)
    with a infinite is 0.

    Parameters
    ----------
    a, b : Tensor
        Ends in standard units, a < b, broadcast together.
    log_mass : Tensor, optional
        log P, where the caller has it already (:func:`log_normal_interval`).

    Returns
    -------
    mean, second : Tensor
    """
    a, b = torch.broadcast_tensors(a, b)
    log_p = log_normal_interval(a, b) if log_mass is None else log_mass
    ra = torch.exp(log_normal_pdf(a) - log_p)  # phi(a) / P; 0 where a is infinite
    rb = torch.exp(log_normal_pdf(b) - log_p)
    a0 = torch.where(torch.isfinite(a), a, 0.0)
    b0 = torch.where(torch.isfinite(b), b, 0.0)
    return ra - rb, 1.0 + a0 * ra - b0 * rb
