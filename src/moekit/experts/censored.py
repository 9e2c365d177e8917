"""Censored and truncated responses for experts with a latent normal: linear-Gaussian
experts (y ~ N(b_k . x, sigma_k^2)) and lognormal ones (log y ~ N(b_k . x, sigma_k^2)).

Each row i is known to lie in an interval [l_i, u_i] (l_i = u_i: observed exactly;
u_i = inf: right-censored at l_i; l_i = -inf: left-censored at u_i) and may be
observed only inside a window (t_i, v_i) (truncation). On the latent normal's scale
(y, or log y for lognormal experts) with alpha = (l - mu) / sigma, beta = (u - mu) /
sigma, expert k's log-likelihood of row i is

.. math::  \\log p_k = \\begin{cases}
               \\log N(y_i; \\mu_{ik}, \\sigma_k^2) - J_i & l_i = u_i \\\\
               \\log(\\Phi(\\beta_{ik}) - \\Phi(\\alpha_{ik})) & l_i < u_i
           \\end{cases} \\; - \\log(\\Phi(\\tau^+_{ik}) - \\Phi(\\tau^-_{ik})),

J_i the log-Jacobian of exact rows (log y for lognormal experts, and the target's
standardisation), tau^± the window's ends in standard units
(:mod:`moekit._core.truncnorm` keeps every term finite 40 standard deviations out).
Truncation renormalises each expert on the window: the mixture is
sum_k g_k(x) p_k(y | x) / P_k(window | x), so that g_k(x) is the share of expert k
among the rows that are observed; with one expert it is the truncated regression.

M-step: exact EM. The latent y_i is missing where the row is censored, and with
truncation every observed row stands for 1 / P_k(window) draws of which
m_ik = (1 - P_k) / P_k fell outside the window and were lost (the missing-data
formulation of truncated data: Dempster, Laird and Rubin 1977; McLachlan and
Krishnan 2008). The expected complete-data log-likelihood is expert k's
least-squares problem with the truncated normal's moments in place of y and y^2,

.. math::  b_k = (X^T W_k X)^{-1} X^T R_k \\tilde y_k, \\qquad
           \\sigma_k^2 = \\frac{\\sum_i r_{ik} (\\widetilde{y^2}_{ik} - 2 \\mu_{ik}' \\tilde y_{ik}
                         + \\mu_{ik}'^2 w_{ik})}{\\sum_i r_{ik} w_{ik}},

w_ik = 1 + m_ik, y~ and y^2~ the sums of E[y] and E[y^2] over the row's interval
and its lost draws outside the window (``_expected_stats``). Without truncation the
step is exact and monotone; with it the count of lost draws is capped at
``MAX_LOST`` per row (a window far in a tail), so the family lets the EM loop check
the likelihood (``monotone=False``).
"""

from __future__ import annotations

import copy
import math

import torch

from moekit._core.data import Chunk, EMData
from moekit._core.logspace import gaussian_logpdf
from moekit._core.truncnorm import log_normal_interval, log_normal_pdf, normal_interval_moments
from moekit.experts._glm import grams, has_weight
from moekit.experts.gaussian import weighted_least_squares

ROWS = 5
"""Rows of the coded target: the point, the interval [lower, upper], the window."""

MAX_LOST = 1e8
"""Most draws outside the truncation window one observed row may stand for."""

# what the censored family answers exactly as the family it wraps
_DELEGATED = frozenset({
    "params_type", "predictive_family", "standardize_target", "n_outputs", "var_floor",
    "log_prior", "n_parameters", "min_samples", "select", "to_free", "from_free",
    "mean_free", "log_prior_free", "report", "from_report", "moments", "predictive_extra",
    "param_shapes", "check_params",
})  # fmt: skip


def delegated(wrapper, name: str, names: frozenset):
    """``wrapper.base``'s attribute ``name`` where it is among ``names`` (what a family
    that reads intervals answers as the family it wraps), else an AttributeError."""
    if name in names:
        return getattr(wrapper.__dict__["base"], name)
    raise AttributeError(f"{type(wrapper).__name__!r} object has no attribute {name!r}")


def can_censor(family) -> bool:
    """Whether ``family`` has a latent normal that censoring can work on."""
    return hasattr(family, "latent_normal") and getattr(family, "n_outputs", 1) == 1


class CensoredExperts:
    """A family with a latent normal (see :func:`can_censor`), fitted to intervals.

    Parameters
    ----------
    base : expert family
        Linear-Gaussian experts of one output or lognormal experts; the parameters,
        predictions and reports are the base family's (of the latent, uncensored y).
    log_scale : float, default=0.0
        log of the target's standardisation scale, part of the exact rows' Jacobian.
    truncated : bool, default=False
        Whether the fit's rows are truncated (then the loop checks every step).
    """

    needs_resp = False
    censored = True

    def __init__(self, base, log_scale: float = 0.0, truncated: bool = False) -> None:
        if not can_censor(base):
            raise ValueError(
                "y_upper and truncation (censored or truncated responses) are for "
                f"expert='linear' with one output or expert='lognormal'; got {type(base).__name__}."
            )
        self.base = base
        self.n_experts = base.n_experts
        self.log_scale = float(log_scale)
        self.truncated = bool(truncated)
        self.monotone = not truncated
        self.report_name = f"{getattr(base, 'report_name', type(base).__name__)}, censored"

    def __getattr__(self, name: str):
        return delegated(self, name, _DELEGATED)

    def resized(self, n_experts: int) -> CensoredExperts:
        """This family with ``n_experts`` experts."""
        base = getattr(self.base, "resized", None)
        if base is not None:
            base = base(n_experts)
        else:
            base = copy.copy(self.base)
            base.n_experts = n_experts
        return CensoredExperts(base, self.log_scale, self.truncated)

    # ------------------------------------------------------------ the latent normal
    def _rows(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The coded target's rows on the latent normal's scale: point, l, u, t, v."""
        y = y.reshape(ROWS, -1)
        if self.base.latent_log:
            # y >= 0: a lower end of 0 is -inf on the log scale
            return tuple(torch.log(r.clamp(min=0.0)) for r in y)
        return tuple(y)

    def _normal(self, params, XT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        coef, var = self.base.latent_normal(params)  # (K, p), (K,)
        return coef @ XT, var.unsqueeze(1)  # (K, c), (K, 1)

    def _log_prob(self, mu, var, rows, known: Known | None = None) -> tuple[torch.Tensor, dict]:
        """log p_k of every row (K, c), and the interval quantities the M-step reuses.

        ``known``: what the rows alone determine (:func:`_known`), where the caller has it.
        """
        point, lo, hi, t_lo, t_hi = rows
        exact, finite, windowed = _known(rows) if known is None else known
        sd = var.sqrt()
        # exact rows take the density: their interval is set to the whole line, so
        # that the branch not taken stays finite (and so do autograd's gradients)
        a = torch.where(exact, -math.inf, _standard(lo, mu, sd, finite[0]))
        b = torch.where(exact, math.inf, _standard(hi, mu, sd, finite[1]))
        log_mass = log_normal_interval(a, b)
        jac = self.log_scale + (point if self.base.latent_log else 0.0)
        dens = gaussian_logpdf(point - mu, var) - jac
        out = torch.where(exact, dens, log_mass)
        parts = {"a": a, "b": b, "log_mass": log_mass, "exact": exact}
        if windowed:
            ta, tb = _standard(t_lo, mu, sd, finite[2]), _standard(t_hi, mu, sd, finite[3])
            log_window = log_normal_interval(ta, tb)
            out = out - log_window
            parts.update(ta=ta, tb=tb, log_window=log_window)
        return out, parts

    # ------------------------------------------------------------ E-step
    def prepare(self, data: EMData) -> None:
        # the target's rows on the latent scale and what they alone determine, once per
        # fit instead of in every pass (the base's caches are of y itself, not needed:
        # here y is the first of the target's rows)
        rows = self._rows(data.y)
        data.cache["censored_rows"] = rows, _known(rows)

    def _chunk_rows(self, chunk: Chunk) -> tuple[tuple[torch.Tensor, ...], Known]:
        """:meth:`_rows` of the chunk and :func:`_known` of them, from the cache if prepared."""
        cached = chunk.data.cache.get("censored_rows")
        if cached is None:
            rows = self._rows(chunk.y)
            return rows, _known(rows)
        rows, (exact, finite, windowed) = cached
        if (chunk.start, chunk.stop) == (0, chunk.data.n):  # all the rows: no views to take
            return cached
        part = slice(chunk.start, chunk.stop)
        finite = tuple(f[part] for f in finite)
        if windowed and (chunk.start, chunk.stop) != (0, chunk.data.n):
            windowed = bool(finite[2].any() or finite[3].any())  # this chunk's own window
        return tuple(r[part] for r in rows), (exact[part], finite, windowed)

    def log_prob(self, params, chunk: Chunk) -> torch.Tensor:
        mu, var = self._normal(params, chunk.XeT)
        out, parts = self._log_prob(mu, var, *self._chunk_rows(chunk))
        chunk.scratch["censored"] = (mu, var, parts)
        return out

    # ------------------------------------------------------------ M-step
    def chunk_stats(self, params, chunk: Chunk, resp: torch.Tensor):
        point = self._chunk_rows(chunk)[0][0]
        if params is None:  # a first M-step: every row as if observed at its point
            ey, ey2, weight = point.expand_as(resp), (point * point).expand_as(resp), resp
        else:
            if "censored" not in chunk.scratch:
                self.log_prob(params, chunk)
            mu, var, parts = chunk.scratch["censored"]
            ey, ey2, lost = _expected_stats(mu, var, point, parts)
            weight = resp if lost is None else resp * (1.0 + lost)
        xty = (resp * ey) @ chunk.XeT.T  # (K, p)
        return chunk.weighted_grams(weight, "e"), xty, (resp * ey2).sum(1), weight.sum(1)

    def m_step(self, params, stats, data: EMData, resp=None):
        gram_stats, xty, yty, nk = stats
        gram = grams(gram_stats, xty.shape[1])
        coef, var = weighted_least_squares(gram, xty.unsqueeze(1), yty.unsqueeze(1), nk,
                                           self.base.var_floor)  # fmt: skip
        coef, var = coef[:, 0], var[:, 0]
        keep = has_weight(nk)
        if params is not None:
            old_coef, old_var = self.base.latent_normal(params)
            coef = torch.where(keep[:, None], coef, old_coef)
            var = torch.where(keep, var, old_var)
        else:
            var = torch.where(keep, var, 1.0)
        return self.base.with_latent_normal(coef.contiguous(), var)

    def residuals(self, params, chunk: Chunk) -> torch.Tensor:
        """(point - mu_k) / sigma_k on the latent scale, shape (K, 1, c)."""
        mu, var = self._normal(params, chunk.XeT)
        return ((self._rows(chunk.y)[0] - mu) / var.sqrt()).unsqueeze(1)

    # ------------------------------------------------------------ differentiable view
    def log_prob_free(self, free: dict[str, torch.Tensor], XT: torch.Tensor, y: torch.Tensor):
        """log p_k(y_i | x_i) of shape (K, n), differentiable in ``free``."""
        mu, var = self._normal(self.base.from_free(free), XT)
        return self._log_prob(mu, var, self._rows(y))[0]


Known = tuple[torch.Tensor, tuple[torch.Tensor, ...], bool]
"""What a censored target's rows alone determine (:func:`_known`)."""


def _known(rows: tuple[torch.Tensor, ...]) -> Known:
    """(exact, finite, windowed) of the rows (point, l, u, t, v): where l = u (the row
    is observed exactly), whether each of l, u, t, v is finite, and whether any
    window end is (the rows are truncated)."""
    _, lo, hi, t_lo, t_hi = rows
    finite = tuple(torch.isfinite(r) for r in (lo, hi, t_lo, t_hi))
    return lo == hi, finite, bool(finite[2].any() or finite[3].any())


def _standard(bound: torch.Tensor, mu: torch.Tensor, sd: torch.Tensor,
              finite: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """(bound - mu) / sd, (K, c); an infinite bound stays infinite with zero gradients
    (not inf - mu, whose gradient in sd is infinite). ``finite``: isfinite(bound)."""
    finite = torch.isfinite(bound) if finite is None else finite
    z = (torch.where(finite, bound, 0.0) - mu) / sd
    return torch.where(finite, z, bound.expand_as(z))


def _expected_stats(mu, var, point, parts):
    """Per expert and row: the sums of E[y] and E[y^2] over the row's interval and its
    lost draws outside the window, and the count of lost draws (None: no window).

    An interval's moments are mu + sigma E[Z] and mu^2 + 2 mu sigma E[Z] + sigma^2 E[Z^2]
    (:func:`normal_interval_moments`). Outside a window (tau^-, tau^+) of mass P the
    standard normal's partial moments are the whole line's (1, 0, 1) less the
    window's: q = 1 - P, -(phi(tau^-) - phi(tau^+)) and 1 - P E_P[Z^2].
    """
    sd = var.sqrt()
    ez, ez2 = normal_interval_moments(parts["a"], parts["b"], parts["log_mass"])
    exact = parts["exact"]
    ey = torch.where(exact, point, mu + sd * ez)
    ey2 = torch.where(exact, point * point, mu * mu + 2.0 * mu * sd * ez + var * ez2)
    if "log_window" not in parts:
        return ey, ey2, None
    ta, tb, log_p = parts["ta"], parts["tb"], parts["log_window"]
    p = torch.exp(log_p)
    q = -torch.expm1(log_p)  # mass outside the window
    lost = (q / p).clamp(max=MAX_LOST)  # (1 - P) / P draws lost per row kept
    pa, pb = torch.exp(log_normal_pdf(ta)), torch.exp(log_normal_pdf(tb))
    ta0 = torch.where(torch.isfinite(ta), ta, 0.0)
    tb0 = torch.where(torch.isfinite(tb), tb, 0.0)
    out1 = -(pa - pb)  # integral of z phi(z) outside the window
    out2 = q - (ta0 * pa - tb0 * pb)  # integral of z^2 phi(z) outside: 1 - (P + ta pa - tb pb)
    per = lost / q.clamp(min=1e-300)  # lost draws per unit of outside mass
    ey = ey + lost * mu + sd * out1 * per
    ey2 = ey2 + lost * mu * mu + 2.0 * mu * sd * out1 * per + var * out2 * per
    return ey, ey2, lost
