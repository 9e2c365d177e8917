"""The Weibull distribution's shape from its coefficient of variation, for predictive
mixtures whose components are given by mean and standard deviation
(:class:`moekit._core.components.Weibull`).

A Weibull of shape a and scale lambda has mean lambda Gamma(1 + 1/a) and
coefficient of variation sqrt(Gamma(1 + 2/a) / Gamma(1 + 1/a)^2 - 1), which falls
strictly in a: the shape is a monotone 1-d solve, vectorised over every component.
"""

from __future__ import annotations

import torch

WEIBULL_LOG_SHAPE = (-9.0, 9.0)
"""The log shapes :func:`weibull_shape` searches: coefficients of variation from
about 1e-4 to beyond 1e100."""


def weibull_shape(cv: torch.Tensor, iterations: int = 60) -> torch.Tensor:
    """The Weibull shape a of coefficient of variation ``cv`` = sd / mean, elementwise.

    h(x) = lgamma(1 + 2 e^{-x}) - 2 lgamma(1 + e^{-x}) = log(1 + cv^2) falls strictly
    in x = log a, so the root is bracketed: bisection in x keeps the bracket and a
    Newton step from its middle is taken wherever it lands inside (h' = -2 e^{-x}
    (psi(1 + 2/a) - psi(1 + 1/a))), which ends in a few steps; the bracket's width
    bounds the error where Newton stalls (60 halvings of 18: 1.6e-17).
    """
    target = torch.log1p(cv * cv)
    lo = torch.full_like(target, WEIBULL_LOG_SHAPE[0])
    hi = torch.full_like(target, WEIBULL_LOG_SHAPE[1])
    x = 0.5 * (lo + hi)
    for _ in range(iterations):
        inv = torch.exp(-x)
        f = torch.lgamma(1.0 + 2.0 * inv) - 2.0 * torch.lgamma(1.0 + inv) - target
        above = f > 0  # h(x) too large: the shape is larger
        lo, hi = torch.where(above, x, lo), torch.where(above, hi, x)
        df = -2.0 * inv * (torch.digamma(1.0 + 2.0 * inv) - torch.digamma(1.0 + inv))
        newton = x - f / df.clamp(max=-1e-300)
        inside = (newton > lo) & (newton < hi)
        x_next = torch.where(inside, newton, 0.5 * (lo + hi))
        if bool(((x_next - x).abs() <= 1e-15 * x.abs().clamp(min=1.0)).all()):
            x = x_next
            break
        x = x_next
    return torch.exp(x)
