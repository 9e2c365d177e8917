"""Censored and truncated counts of negative binomial (NB2) experts: the probabilities
of intervals of counts and their derivatives in the linear predictor, for
:mod:`moekit.experts.censored_glm`.

A count Y of mean mu = e^eta and dispersion phi (theta = 1 / phi) has, with
p = 1 / (1 + phi mu),

.. math::  \\Pr(Y \\le k) = I_p(\\theta, k + 1), \\qquad \\Pr(Y \\ge j) = I_{1-p}(j, \\theta),

regularised incomplete beta functions (:mod:`moekit._core.incbeta`, in log space).
Both ends of an interval count: [3, inf] is Y >= 3 and a window [1, inf] is zero
truncation. With dI_p(a, b)/dp = p^(a-1) (1-p)^(b-1) / B(a, b) and
dp/d eta = -p (1 - p), the mass of [lo, hi] has the derivative k_lo - k_hi in eta,

.. math::  k_j = \\frac{p^\\theta (1-p)^j}{B(\\theta, j)} = j \\Pr(Y = j), \\qquad
           \\frac{d \\log k_j}{d \\eta} = j p - \\theta (1 - p) = p (j - \\mu),

at j = lo and j = hi + 1 (the Poisson's lambda pmf(j - 1) = j pmf(j) in the limit
phi -> 0). The dispersion has no closed-form step: the censored family searches it
in log phi (``shape_field``).
"""

from __future__ import annotations

import math

import torch

from moekit._core.incbeta import log_beta_inc
from moekit._core.incgamma import log_difference
from moekit.experts.negative_binomial import DISPERSION_MAX, DISPERSION_MIN


class NegativeBinomialIntervals:
    """The interval methods of :class:`~moekit.experts.negative_binomial.
    NegativeBinomialExperts` for :mod:`moekit.experts.censored_glm`: a mixin (it reads
    nothing of the family but the parameters given), or a stand-alone object that
    the censored family asks in the family's place."""

    #: the parameter a censored fit maximises in one dimension, in its log
    shape_field = "dispersion"
    shape_bounds = (DISPERSION_MIN, DISPERSION_MAX)
    #: what y and y_upper of a censored fit hold: whole counts, both ends included
    interval_support = "counts"

    def interval_terms(self, params, eta: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                       differentiable: bool = False):  # fmt: skip
        """log Pr(lo <= Y <= hi) of the counts in [lo, hi] (hi may be inf), (K, c), and
        the pieces of its derivatives in eta: (log m, log k_lo, log k_hi, c_lo, c_hi).

        The mass is I_p(theta, hi + 1) - I_p(theta, lo) = I_q(lo, theta) -
        I_q(hi + 1, theta) with q = 1 - p = phi mu / (1 + phi mu), each difference
        read on the side whose terms are tail probabilities (``log_difference``).
        """
        lo, hi = torch.ceil(lo), torch.floor(hi)  # the counts inside the ends
        phi = params.dispersion.unsqueeze(1)  # (K, 1)
        c = eta.shape[1]
        x = phi * torch.exp(eta)  # phi mu
        # q = 1 - p to all its digits where p is near 1 (and 1, not NaN, at mu = inf)
        p, q = 1.0 / (1.0 + x), torch.where(x > 1.0, 1.0 / (1.0 + 1.0 / x), x / (1.0 + x))
        # both ends in one call, (K, 2c): I_p(theta, lo) and I_p(theta, hi + 1), and
        # their front factors p^theta q^j / B(theta, j), the kernels k_lo and k_hi
        ends = torch.cat([lo, hi + 1.0]).expand(eta.shape[0], -1)
        down, up, front = log_beta_inc((1.0 / phi).expand_as(ends), ends, p.repeat(1, 2),
                                       q.repeat(1, 2), differentiable, front=True)  # fmt: skip
        log_mass = log_difference(up[:, :c], up[:, c:], down[:, c:], down[:, :c])
        ninf = torch.full_like(log_mass, -math.inf)
        k_lo = torch.where(lo > 0, front[:, :c], ninf)
        k_hi = torch.where(torch.isfinite(hi), front[:, c:], ninf)
        hi_s = torch.where(torch.isfinite(hi), hi, torch.zeros_like(hi))  # no inf * 0
        mu = torch.exp(eta)
        return log_mass, k_lo, k_hi, p * (lo - mu), p * (hi_s + 1.0 - mu)

    def exact_derivatives(self, params, eta: torch.Tensor, y: torch.Tensor):
        """d log p / d eta = (y - mu) / (1 + phi mu) and
        d^2 / d eta^2 = -mu (1 + phi y) / (1 + phi mu)^2 of observed counts."""
        phi = params.dispersion.unsqueeze(1)
        mu = torch.exp(eta)
        denom = 1.0 + phi * mu
        return (y - mu) / denom, -mu * (1.0 + phi * y) / denom**2
