"""The regularised incomplete gamma functions in log space, and the log probability of
an interval from two of them.

Censored counts and amounts need, for X ~ Gamma(a, 1),

.. math::  P(a, x) = \\Pr(X \\le x) = \\frac{\\gamma(a, x)}{\\Gamma(a)}, \\qquad
           Q(a, x) = 1 - P(a, x),

(a Poisson count Y of mean lambda has Pr(Y >= j) = P(j, lambda)) far into either tail,
where both underflow. ``log_gamma_pq`` gives log P and log Q:

* by default from ``torch.special.gammainc`` / ``gammaincc`` (fast), and where either
  falls below ``TINY`` from the series or the continued fraction below, which
  converge quickly exactly there;
* with ``differentiable=True`` from the series and continued fraction everywhere
  (torch's functions have no derivative in a, and their second derivative in x is
  0), so that autograd's Hessians of a censored log-likelihood are exact:

.. math::  \\log P = a \\log x - x - \\log\\Gamma(a + 1)
           + \\log \\sum_{n \\ge 0} \\prod_{j=1}^n \\frac{x}{a + j} \\quad (x < a + 1),

and log Q from Legendre's continued fraction (modified Lentz; Press et al.,
Numerical Recipes, 6.2) for x >= a + 1. Both need about 10 sqrt(a) terms at worst
(x near a); far in a tail, a few.
"""

from __future__ import annotations

import math

import torch

from moekit._core.truncnorm import log1mexp

TINY = 1e-280
"""Below this, a probability from torch's functions is recomputed in log space."""

_FPMIN = 1e-300


def _terms(a: torch.Tensor) -> int:
    """Terms of the series or continued fraction that suffice for shapes up to max(a)."""
    top = float(a.detach().max()) if a.numel() else 1.0
    return int(min(4000, 40 + 10 * math.sqrt(max(top, 1.0))))


def _log_series_p(a: torch.Tensor, x: torch.Tensor, n_terms: int) -> torch.Tensor:
    """log P(a, x) by the series, for 0 < x < a + 1 (elementwise, differentiable)."""
    term = torch.ones_like(x)
    total = torch.ones_like(x)
    for n in range(1, n_terms):
        term = term * x / (a + n)
        total = total + term
    return a * torch.log(x) - x - torch.lgamma(a + 1.0) + torch.log(total)


def _log_fraction_q(a: torch.Tensor, x: torch.Tensor, n_terms: int) -> torch.Tensor:
    """log Q(a, x) by the continued fraction, for x >= a + 1 (elementwise, differentiable)."""
    fpmin = _FPMIN if x.dtype == torch.float64 else 1e-30
    b = x + 1.0 - a
    c = torch.full_like(x, 1.0 / fpmin)
    d = 1.0 / b
    h = d
    for i in range(1, n_terms):
        an = -i * (i - a)
        b = b + 2.0
        d = an * d + b
        d = torch.where(d.abs() < fpmin, torch.full_like(d, fpmin), d)
        c = b + an / c
        c = torch.where(c.abs() < fpmin, torch.full_like(c, fpmin), c)
        d = 1.0 / d
        h = h * d * c
    return a * torch.log(x) - x - torch.lgamma(a) + torch.log(h)


def _log_pq_series(a: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log P, log Q) for finite a, x > 0, from the side that converges there."""
    n_terms = _terms(a)
    low = x < a + 1.0
    # each branch sees only values it handles (autograd follows both)
    x_low = torch.where(low, x, torch.zeros_like(x) + 0.5 * (a + 1.0))
    x_high = torch.where(low, a + 1.0 + torch.zeros_like(x), x)
    log_p_low = _log_series_p(a, x_low, n_terms)
    log_q_high = _log_fraction_q(a, x_high, n_terms)
    log_p = torch.where(low, log_p_low, log1mexp(-log_q_high))
    log_q = torch.where(low, log1mexp(-log_p_low), log_q_high)
    return log_p, log_q


def log_gamma_pq(
    a: torch.Tensor, x: torch.Tensor, differentiable: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """log P(a, x) and log Q(a, x), elementwise (broadcast).

    Limits are allowed: a = 0 gives (0, -inf) (P(0, x) = 1: Pr(Y >= 0) of a count),
    a = inf gives (-inf, 0), x = 0 gives (-inf, 0) and x = inf gives (0, -inf).

    Parameters
    ----------
    a : Tensor
        Shapes, a >= 0.
    x : Tensor
        Arguments, x >= 0.
    differentiable : bool, default=False
        Compute every value by the series and continued fraction, differentiable
        twice in a and x (see the module docstring).

    Returns
    -------
    log_p, log_q : Tensor
    """
    a, x = torch.broadcast_tensors(a, x)
    zero_a, inf_a = a == 0, torch.isposinf(a)
    zero_x, inf_x = x == 0, torch.isposinf(x)
    special = zero_a | inf_a | zero_x | inf_x
    one = torch.ones_like(x)
    a_s = torch.where(special, one, a)
    x_s = torch.where(special, one, x)
    if differentiable:
        log_p, log_q = _log_pq_series(a_s, x_s)
    else:
        log_p = torch.log(torch.special.gammainc(a_s, x_s))
        log_q = torch.log(torch.special.gammaincc(a_s, x_s))
        tail = (log_p < math.log(TINY)) | (log_q < math.log(TINY))
        if bool(tail.any()):
            sp, sq = _log_pq_series(a_s[tail], x_s[tail])
            log_p, log_q = log_p.clone(), log_q.clone()
            log_p[tail], log_q[tail] = sp, sq
    # the limits: P = 1 at a = 0 or x = inf; P = 0 at a = inf or x = 0 (a = 0 first)
    p_one = zero_a | (inf_x & ~inf_a)
    p_zero = ~zero_a & (inf_a | zero_x)
    zeros, ninf = torch.zeros_like(log_p), torch.full_like(log_p, -math.inf)
    log_p = torch.where(p_one, zeros, torch.where(p_zero, ninf, log_p))
    log_q = torch.where(p_one, ninf, torch.where(p_zero, zeros, log_q))
    return log_p, log_q


def log_difference(u1: torch.Tensor, u2: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor):
    """log m of a mass written two ways, m = e^u1 - e^u2 = e^v1 - e^v2 (u1 >= u2, v1 >= v2).

    The side whose larger term is smaller is used: its two terms are both tail
    probabilities, which keep their digits (as the normal's mirror does in
    :func:`moekit._core.truncnorm.log_normal_interval`).
    """
    use_u = u1 <= v1
    hi = torch.where(use_u, u1, v1)
    lo = torch.where(use_u, u2, v2)
    gap = torch.where(torch.isfinite(lo), hi - lo, torch.full_like(hi, math.inf))
    return hi + log1mexp(gap.clamp(min=0.0))
