"""The regularised incomplete beta function and its complement in log space.

Censored negative binomial and binomial counts need, for X ~ Beta(a, b),

.. math::  I_x(a, b) = \\Pr(X \\le x) = \\frac{1}{B(a, b)} \\int_0^x t^{a-1} (1-t)^{b-1} dt,
           \\qquad 1 - I_x(a, b) = I_{1-x}(b, a),

far into either tail, where both underflow (a negative binomial count Y of mean mu
and dispersion phi has Pr(Y <= k) = I_p(1/phi, k + 1), p = 1 / (1 + phi mu)).
``log_beta_inc`` gives both logs from the continued fraction (Press et al.,
Numerical Recipes, 6.4, ``betacf``; evaluated by the modified Lentz method),

.. math::  I_x(a, b) = \\frac{x^a (1-x)^b}{a B(a, b)} \\cfrac{1}{1 + \\cfrac{d_1}{1 +
           \\cfrac{d_2}{1 + \\cdots}}}, \\quad
           d_{2m+1} = -\\frac{(a+m)(a+b+m) x}{(a+2m)(a+2m+1)}, \\quad
           d_{2m} = \\frac{m (b-m) x}{(a+2m-1)(a+2m)},

which converges quickly for x < (a+1)/(a+b+2); beyond it the fraction gives the
complement, I_{1-x}(b, a), and the other log is log(1 - e^v). Everything is in torch
operations, so autograd differentiates the values (twice) in a, b and x.
The log of the front factor takes log B(a, b) from :func:`log_beta`, which keeps its
digits where one argument is large and the other is not (the negative binomial's
1 / phi near the Poisson limit).
"""

from __future__ import annotations

import math

import torch

from moekit._core.truncnorm import log1mexp

_FPMIN = 1e-300
_EPS = 1e-15
CHECK_EVERY = 8
"""Terms of the continued fraction between two checks of convergence."""

STIRLING_FROM = 100.0
"""From this larger argument, log B takes lgamma(a + b) - lgamma(a) by Stirling's series."""


def _stirling_tail(z: torch.Tensor) -> torch.Tensor:
    """lgamma(z) less (z - 1/2) log z - z + log(2 pi) / 2, for z >= ``STIRLING_FROM``
    (four terms: the next is below 1e-21 there)."""
    r = 1.0 / z
    r2 = r * r
    return r * (1.0 / 12.0 - r2 * (1.0 / 360.0 - r2 * (1.0 / 1260.0 - r2 / 1680.0)))


def log_beta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log B(a, b) = lgamma(a) + lgamma(b) - lgamma(a + b), for a, b > 0, broadcast.

    With g = max(a, b) >= ``STIRLING_FROM`` and s = min(a, b), the difference of
    the two large lgamma is taken from Stirling's series,

    .. math::  \\log\\Gamma(g + s) - \\log\\Gamma(g) = (g - \\tfrac12) \\log(1 + s/g)
               + s \\log(g + s) - s + \\sigma(g + s) - \\sigma(g),

    which loses no digits to cancellation where g is large and s is not (the direct
    form loses about log10(g log g) of them).
    """
    a, b = torch.broadcast_tensors(a, b)
    # where, not maximum and minimum: at a tie those split the gradient between a and
    # b, which leaves first derivatives right (B is symmetric) but halves second ones
    first = a >= b
    g, s = torch.where(first, a, b), torch.where(first, b, a)
    big = g >= STIRLING_FROM
    # each branch sees only values it handles (autograd follows both)
    g_big = torch.where(big, g, torch.full_like(g, STIRLING_FROM))
    diff = ((g_big - 0.5) * torch.log1p(s / g_big) + s * torch.log(g_big + s) - s
            + _stirling_tail(g_big + s) - _stirling_tail(g_big))  # fmt: skip
    g_small = torch.where(big, torch.ones_like(g), g)
    direct = torch.lgamma(g_small) - torch.lgamma(g_small + s)
    return torch.lgamma(s) + torch.where(big, -diff, direct)


def _log_fraction(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor,
                  max_terms: int, extra: int) -> torch.Tensor:  # fmt: skip
    """log of the continued fraction's value h (I_x(a, b) = front h / a), elementwise.

    Each element takes terms until its last factor is within ``_EPS`` of 1, then
    ``extra`` more (so that derivatives, which converge a little later, settle too),
    and no more: past convergence the factors of some elements drift from 1 by a few
    eps (the d_{2m+1} of x near 1 and a large cancel in 1 + d), which would keep a
    test on every element's last factor from ever passing and move the value by
    ~1e-13 over thousands of terms.

    The terms go in blocks of ``CHECK_EVERY``: the coefficients d_j of a block in
    one step, the Lentz recurrence in place (a dozen operations a term: on a few
    hundred elements the cost is the number of operations, not their size), then
    each element's product of factors up to its last term (a running product, the
    same multiplications in the same order as one factor at a time) and the test.
    """
    fpmin = _FPMIN if x.dtype == torch.float64 else 1e-30
    eps = _EPS if x.dtype == torch.float64 else 1e-7

    # in place, unless autograd follows (then the same operations out of place)
    tracked = torch.is_grad_enabled() and any(t.requires_grad for t in (a, b, x))

    def clip(v):  # Lentz's guard against a zero denominator
        small = v.abs() < fpmin
        return v.masked_fill(small, fpmin) if tracked else v.masked_fill_(small, fpmin)

    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = torch.ones_like(x)
    d = 1.0 / clip(1.0 - qab * x / qap)
    h = d.clone()
    never = 2 * max_terms + 1
    last = torch.full(x.shape, never, dtype=torch.int64, device=x.device)  # last factor taken
    shape = (-1,) + (1,) * x.dim()
    done = 0  # terms so far
    while done < max_terms:
        # the first block long enough for most elements, then shorter ones: the value
        # does not depend on where the blocks end, only the terms computed in vain
        size = min(CHECK_EVERY if done == 0 else CHECK_EVERY // 2, max_terms - done)
        m = torch.arange(done + 1, done + size + 1, dtype=x.dtype, device=x.device).view(shape)
        m2 = 2.0 * m
        even = m * (b - m) * x / ((qam + m2) * (a + m2))  # d_{2m}, (size, ...)
        odd = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))  # d_{2m+1}
        if tracked:
            factors = [h]
            for i in range(2 * size):
                aa = odd[i // 2] if i % 2 else even[i // 2]
                d = 1.0 / clip(1.0 + aa * d)
                c = clip(1.0 + aa / c)
                factors.append(d * c)
            factors = torch.stack(factors)
        else:
            factors = x.new_empty((2 * size + 1, *x.shape))
            factors[0] = h
            coefs = [odd[i // 2] if i % 2 else even[i // 2] for i in range(2 * size)]
            fast = _lentz_unguarded(d, c, coefs, factors, fpmin)
            if fast is not None:
                d, c = fast
            else:  # a denominator within fpmin of 0: the block again, guarded
                for i, aa in enumerate(coefs):
                    d = clip(d.mul_(aa).add_(1.0)).reciprocal_()
                    c = clip(torch.div(aa, c).add_(1.0))
                    torch.mul(d, c, out=factors[i + 1])
        # NaN (from NaN inputs) counts as converged: it would never pass the test
        converged = ~((factors[2::2] - 1.0).abs() > eps)  # (size, ...)
        # the block's first converged term, 1-based from the start (never: none)
        # (a float reduction: several times quicker than one of integers)
        first = torch.where(converged, m, float(never)).amin(0)
        # the factors of terms 1..m_conv + extra
        new = (last == never) & (first < never)
        last = torch.where(new, 2 * (first.to(torch.int64) + extra), last)
        take = (last - 2 * done).clamp(0, 2 * size)  # this block's factors an element takes
        products = factors.cumprod(0) if tracked else factors.cumprod_(0)
        h = products.gather(0, take.unsqueeze(0)).squeeze(0)
        done += size
        if not bool((last > 2 * done).any()):
            break
    return torch.log(h)


def _lentz_unguarded(d, c, coefs, factors, fpmin):
    """Lentz's recurrence d <- 1 / (1 + aa d), c <- 1 + aa / c over the coefficients
    ``coefs``, the factors d c written to ``factors[1:]``, without the guard of
    every denominator against 0 (six operations a coefficient instead of twelve):
    the final (d, c), or None where a guard would have acted (a |1 + aa d| or
    |c| below ``fpmin``, seen as a |d| of at least 1 / fpmin), d and c untouched."""
    n = len(coefs)
    ds = d.new_empty((n, *d.shape))
    cs = c.new_empty((n, *c.shape))
    d_rows, c_rows, f_rows = ds.unbind(0), cs.unbind(0), factors.unbind(0)
    d_prev, c_prev = d, c
    for i, aa in enumerate(coefs):
        d_i, c_i = d_rows[i], c_rows[i]
        torch.mul(d_prev, aa, out=d_i).add_(1.0).reciprocal_()
        torch.div(aa, c_prev, out=c_i).add_(1.0)
        torch.mul(d_i, c_i, out=f_rows[i + 1])
        d_prev, c_prev = d_i, c_i
    if bool((ds.abs() >= 1.0 / fpmin).any() | (cs.abs() < fpmin).any()):
        return None
    return d_prev.clone(), c_prev.clone()


def _max_terms(a: torch.Tensor, b: torch.Tensor) -> int:
    """A ceiling on the terms: O(sqrt(max(a, b))) suffice (Numerical Recipes, 6.4)."""
    top = float(torch.maximum(a, b).detach().max()) if a.numel() else 1.0
    return int(min(100_000, 100 + 20 * math.sqrt(max(top, 1.0))))


def log_beta_inc(
    a: torch.Tensor,
    b: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    differentiable: bool = False,
    front: bool = False,
) -> tuple[torch.Tensor, ...]:
    """log I_x(a, b) and log(1 - I_x(a, b)) = log I_{1-x}(b, a), elementwise (broadcast).

    Limits are allowed: I = 1, (0, -inf), at a = 0, x = 1 or b = inf (a finite);
    I = 0, (-inf, 0), at b = 0, x = 0 or a = inf (the Beta(a, b) mass goes to 0 as
    a -> 0, to 1 as b -> 0; a = b = 0 is not defined and gives I = 1).

    Parameters
    ----------
    a, b : Tensor
        Parameters, >= 0 (inf allowed).
    x : Tensor
        Arguments in [0, 1].
    y : Tensor, optional
        1 - x where the caller has it to more digits than 1 - x itself (x near 1):
        the logs of x and of 1 - x are taken from whichever is farther from 1.
    differentiable : bool, default=False
        Add terms past convergence so that autograd's first and second derivatives
        have settled too (the values are the same).
    front : bool, default=False
        Also return the log of the front factor x^a (1-x)^b / B(a, b) (a times the
        derivative of I_x(a, b) in log(x / (1 - x)); the negative binomial's
        kernels), -inf at the limits.

    Returns
    -------
    log_i, log_ic : Tensor
        log I_x(a, b) and log(1 - I_x(a, b)).
    log_front : Tensor
        With ``front``.
    """
    if y is None:
        y = 1.0 - x
    a, b, x, y = torch.broadcast_tensors(a, b, x, y)
    # the limits: I = 1 at a = 0, x = 1 or b = inf (a finite); I = 0 at b = 0, x = 0
    # or a = inf
    i_one = (a == 0) | (y <= 0) | (torch.isposinf(b) & torch.isfinite(a))
    i_zero = ~i_one & ((b == 0) | (x <= 0) | torch.isposinf(a))
    special = i_one | i_zero
    half, one = torch.full_like(x, 0.5), torch.ones_like(a)
    a_s, b_s = torch.where(special, one, a), torch.where(special, one, b)
    x_s, y_s = torch.where(special, half, x), torch.where(special, half, y)
    log_x = torch.where(x_s > 0.5, torch.log1p(-y_s), torch.log(x_s))
    log_y = torch.where(y_s > 0.5, torch.log1p(-x_s), torch.log(y_s))
    log_front = a_s * log_x + b_s * log_y - log_beta(a_s, b_s)
    # the fraction of I_x(a, b) where x < (a+1)/(a+b+2), else of I_{1-x}(b, a)
    direct = x_s * (a_s + b_s + 2.0) < a_s + 1.0
    pa, pb = torch.where(direct, a_s, b_s), torch.where(direct, b_s, a_s)
    px = torch.where(direct, x_s, y_s)
    extra = 4 * CHECK_EVERY if differentiable else 0
    work = ~special
    if not bool(work.any()):  # every element a limit (the open ends of censored rows)
        log_h = torch.zeros_like(px)
    elif bool(work.all()):
        log_h = _log_fraction(pa, pb, px, _max_terms(pa, pb), extra)
    else:  # the fraction of the other elements only (a censored fit's exact rows are limits)
        pa_w, pb_w = pa[work], pb[work]
        log_h = torch.zeros_like(px).masked_scatter(
            work, _log_fraction(pa_w, pb_w, px[work], _max_terms(pa_w, pb_w), extra)
        )
    log_side = log_front + log_h - torch.log(pa)
    log_side = log_side.clamp(max=0.0)  # rounding near the switch
    log_other = log1mexp(-log_side)
    log_i = torch.where(direct, log_side, log_other)
    log_ic = torch.where(direct, log_other, log_side)
    zeros, ninf = torch.zeros_like(log_i), torch.full_like(log_i, -math.inf)
    log_i = torch.where(i_one, zeros, torch.where(i_zero, ninf, log_i))
    log_ic = torch.where(i_one, ninf, torch.where(i_zero, zeros, log_ic))
    if front:
        return log_i, log_ic, torch.where(special, ninf, log_front)
    return log_i, log_ic
