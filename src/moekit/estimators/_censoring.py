"""Censored and truncated targets of ``MoERegressor``: the checks of ``y_upper`` and
``truncation``, their coding with the target, and the estimator's part.

The bounds travel with the target: a censored fit codes y as five rows,
[point, lower, upper, window lower, window upper] (``experts.censored.ROWS``), all
standardised as y is, and its expert family (:class:`~moekit.experts.censored.
CensoredExperts`) reads them. The point (y where exact, the finite end of a
one-sided interval, the middle of a finite one) is what the starts cluster on and
what y's standardisation is taken from.
"""

from __future__ import annotations

import numpy as np
import torch

from moekit._core.data import Chunk, EMData
from moekit._core.engine import EM_DTYPE
from moekit.estimators._design import rows_of
from moekit.estimators._targets import RealTarget
from moekit.estimators._weights import check_sample_weight
from moekit.experts.censored import ROWS, CensoredExperts, can_censor
from moekit.experts.censored_glm import CensoredGLMExperts, can_censor_glm, interval_family


def _per_row(value, n: int, name: str) -> np.ndarray:
    """A scalar or n values as a float array of n, or a ValueError naming ``name``."""
    a = np.asarray(value, dtype=np.float64)
    if a.ndim == 0:
        return np.full(n, float(a))
    a = a.reshape(-1) if a.ndim == 2 and 1 in a.shape else a
    if a.ndim != 1 or len(a) != n:
        raise ValueError(f"{name} must be a scalar or have one value per row of y ({n}); "
                         f"got shape {np.shape(value)}.")  # fmt: skip
    return a


def pack_bounds(y, y_upper=None, truncation=None) -> np.ndarray:
    """Check y, ``y_upper`` and ``truncation``; the target as rows (n, 5) in y's units.

    Columns: the point, the lower and upper ends of the interval y lies in (cut to
    the window; equal for an exact row), and the window (t, v) (-inf, inf without
    truncation). ``y_upper`` NaN marks an exact row, as does y_upper == y.

    Raises
    ------
    ValueError
        One line naming ``y``, ``y_upper`` or ``truncation``: wrong lengths, NaN,
        y_upper < y, a row known nowhere, a window that excludes the observed y.
    """
    lo = np.asarray(y, dtype=np.float64)
    if lo.ndim == 2 and lo.shape[1] == 1:
        lo = lo[:, 0]
    if lo.ndim != 1:
        raise ValueError(f"y must be one-dimensional with y_upper or truncation; got shape "
                         f"{lo.shape}.")  # fmt: skip
    n = len(lo)
    if np.isnan(lo).any() or np.isposinf(lo).any():
        raise ValueError("y contains NaN or +inf (a lower bound of -inf is left-censoring).")
    hi = lo.copy() if y_upper is None else _per_row(y_upper, n, "y_upper")
    hi = np.where(np.isnan(hi), lo, hi)  # NaN: an exact row
    bad = np.flatnonzero(hi < lo)
    if len(bad):
        i = bad[0]
        raise ValueError(f"y_upper must be >= y in every row; row {i} has y_upper={hi[i]:g} "
                         f"< y={lo[i]:g}.")  # fmt: skip
    nowhere = np.flatnonzero(np.isneginf(lo) & np.isposinf(hi) | np.isneginf(hi))
    if len(nowhere):
        raise ValueError(f"y_upper: row {nowhere[0]} is known nowhere (y=-inf and "
                         "y_upper=inf, or y_upper=-inf).")  # fmt: skip
    if truncation is None:
        t_lo, t_hi = np.full(n, -np.inf), np.full(n, np.inf)
    else:
        if not (isinstance(truncation, (tuple, list)) and len(truncation) == 2):
            raise ValueError("truncation must be a pair (lower, upper) of scalars or arrays; "
                             f"got {type(truncation).__name__}.")  # fmt: skip
        t_lo, t_hi = (_per_row(v, n, "truncation") for v in truncation)
        if np.isnan(t_lo).any() or np.isnan(t_hi).any() or (t_lo >= t_hi).any():
            raise ValueError("truncation=(lower, upper) needs lower < upper in every row "
                             "(no NaN).")  # fmt: skip
    exact = lo == hi
    a, b = np.maximum(lo, t_lo), np.minimum(hi, t_hi)
    out = np.flatnonzero(np.where(exact, (lo < t_lo) | (lo > t_hi), a >= b))
    if len(out):
        i = out[0]
        raise ValueError(f"truncation excludes the observed y of row {i}: y in "
                         f"[{lo[i]:g}, {hi[i]:g}], window ({t_lo[i]:g}, {t_hi[i]:g}).")  # fmt: skip
    point = np.where(np.isfinite(a) & np.isfinite(b), 0.5 * (a + b), np.where(np.isfinite(a), a, b))
    return np.stack([np.where(exact, lo, point), a, b, t_lo, t_hi], 1)


def support_bounds(family, bounds: np.ndarray, y, y_upper) -> np.ndarray:
    """The packed bounds of a fit of count, Gamma or Weibull experts, checked against
    their support: the ends are whole counts (both included; a window's ends are rounded
    inwards) or amounts >= 0, and the point of an interval is inside it (a count for
    counts). Other families' bounds are returned as they are.
    """
    support = getattr(interval_family(family), "interval_support", None)
    if support is None:
        return bounds
    out = bounds.copy()
    lo, hi = np.maximum(out[:, 1], 0.0), out[:, 2]
    exact = out[:, 1] == out[:, 2]  # the family's own check of y takes these
    name = getattr(family, "report_name", family.__name__)
    below = np.flatnonzero(~exact & (hi < 0 if support == "counts" else hi <= 0))
    if len(below):
        raise ValueError(f"y_upper must be {'>= 0' if support == 'counts' else '> 0'} for "
                         f"{name} experts; row {below[0]} has {hi[below[0]]:g}.")  # fmt: skip
    if support == "counts":
        for given, what in ((y, "y"), (y_upper, "y_upper")):
            v = np.asarray(given if given is not None else [], dtype=np.float64).reshape(-1)
            v = v[np.isfinite(v)]
            if (v != np.round(v)).any():
                raise ValueError(f"{what} must hold whole counts for {name} experts (inf "
                                 "in y_upper: right-censored).")  # fmt: skip
        lo, hi = np.ceil(lo), np.floor(hi)
        point = np.where(np.isfinite(hi), np.floor(0.5 * (lo + hi)), lo)
    else:
        point = np.where(np.isfinite(hi), 0.5 * (lo + hi), lo)
    out[:, 0] = np.where(exact, out[:, 0], point)
    out[:, 1], out[:, 2] = np.where(exact, out[:, 1], lo), np.where(exact, out[:, 2], hi)
    return out


def pack_target(family, y, y_upper=None, truncation=None) -> np.ndarray:
    """The checked bounds of ``family``'s target (:func:`pack_bounds` and
    :func:`support_bounds`), (n, m + 4): the point's m columns, then l, u, t, v.

    A binomial target (s, f) is bounded in its successes: y's first column is the
    lower end, ``y_upper`` (<= the row's trials t = s + f; inf: S >= s) the upper
    one, and the point's columns are (s', t - s') of a count s' inside the interval.
    """
    if getattr(family, "target_columns", 1) == 1:
        return support_bounds(family, pack_bounds(y, y_upper, truncation), y, y_upper)
    y2 = family.check_target(np.asarray(y, dtype=np.float64).reshape(len(y), -1))
    s, trials = y2[:, 0], y2.sum(1)
    upper = None
    if y_upper is not None:
        upper = _per_row(y_upper, len(s), "y_upper")
        over = np.flatnonzero(np.isfinite(upper) & (upper > trials))
        if len(over):
            i = over[0]
            raise ValueError(f"y_upper must be <= the trials (successes + failures) in every "
                             f"row; row {i} has y_upper={upper[i]:g} > {trials[i]:g} "
                             "trials.")  # fmt: skip
        upper = np.where(np.isposinf(upper), trials, upper)  # inf: S >= s
    rows = support_bounds(family, pack_bounds(s, upper, truncation), s, upper)
    return np.concatenate([rows[:, :1], trials[:, None] - rows[:, :1], rows[:, 1:]], 1)


def censored_family(base, log_scale: float = 0.0, truncated: bool = False):
    """``base`` reading the rows' intervals: exact EM for a latent normal (linear,
    lognormal), guarded Newton steps for count, Gamma and Weibull experts; else a
    ValueError."""
    if can_censor(base):
        return CensoredExperts(base, log_scale, truncated)
    if can_censor_glm(base):
        return CensoredGLMExperts(base, truncated)
    refuse_censoring(type(base))


def censorable_names() -> tuple[str, ...]:
    """The names ``expert=`` takes whose families read censored and truncated
    responses: a latent normal (linear with one output, lognormal) or the probabilities
    of intervals (:func:`~moekit.experts.censored_glm.can_censor_glm`)."""
    from moekit.estimators._families import EXPERTS

    return tuple(name for name, family in EXPERTS.items()
                 if hasattr(family, "latent_normal") or can_censor_glm(family))  # fmt: skip


def refuse_censoring(family: type, expert=None) -> None:
    """The error for a family that cannot read intervals (checked before the bounds);
    ``expert`` is the estimator's argument, named as the user gave it."""
    got = f"expert={expert!r}" if expert is not None else getattr(family, "__name__", family)
    if isinstance(expert, (list, tuple)):
        got += " (a list of families has no censored form yet)"
    names = ", ".join(repr(n) + " (one output)" * (n == "linear") for n in censorable_names())
    raise ValueError(
        f"y_upper and truncation (censored or truncated responses) are for expert={names}; "
        f"got {got}."
    )


def exact_rows(y: np.ndarray) -> np.ndarray:
    """Observed y of shape (n,) or (n, m) (binomial: s, f) as the rows (n, m + 4) of
    exact observations: the point, l = u = its first column, no window."""
    y2 = y.reshape(len(y), -1)
    n, s = len(y2), y2[:, :1]
    return np.concatenate([y2, s, s, np.full((n, 1), -np.inf), np.full((n, 1), np.inf)], 1)


def encode_rows(rows: np.ndarray, coding, device) -> torch.Tensor:
    """The five rows (n, 5) standardised as y is, output-major (5, n); infinities stay."""
    z = (rows - coding["_y_mean"][0]) / coding["_y_scale"][0]
    return torch.as_tensor(z.T.copy(), dtype=EM_DTYPE, device=device)


class CensoredTarget(RealTarget):
    """A real target of one output with the bounds of :func:`pack_bounds`.

    ``fit`` and ``check`` receive the points (which scikit-learn's checks see, and
    which must be finite) and return the five rows of ``bounds`` (None: every row
    exact); ``check`` also takes the five rows themselves (a summary's held rows).
    Likelihoods are in y's units already: exact rows carry the standardisation's
    Jacobian in the family, censored ones, probabilities, need none.

    Parameters
    ----------
    family : type
    bounds : ndarray of shape (n, 5) or None
    """

    def __init__(self, family: type, bounds: np.ndarray | None = None) -> None:
        super().__init__(family)
        self.bounds = bounds
        self.n_rows = getattr(family, "target_columns", 1) + ROWS - 1  # point, l, u, t, v

    def _rows(self, points: np.ndarray) -> np.ndarray:
        if self.bounds is None:
            return exact_rows(points)
        if len(self.bounds) != len(points):
            raise ValueError(f"y_upper and truncation are for {len(self.bounds)} rows; y has "
                             f"{len(points)}.")  # fmt: skip
        return self.bounds

    def fit(self, y, weight=None):
        y, coding = super().fit(y, weight)
        if len(coding["_y_mean"]) != 1:
            raise ValueError("y_upper and truncation are for a target of one column.")
        return self._rows(np.asarray(y)), coding

    def check(self, y, coding):
        y = np.asarray(y, dtype=np.float64)
        if y.ndim == 2 and y.shape[1] == self.n_rows:
            return y
        points = super().check(y, coding)
        return self._rows(points[:, 0] if self.n_rows == ROWS else points)

    def encode(self, y, coding, device):
        rows = np.asarray(y, dtype=np.float64)
        if rows.ndim == 1 or rows.shape[1] != self.n_rows:
            rows = exact_rows(rows)
        return encode_rows(rows, coding, device)

    def log_jacobian(self, coding):
        return 0.0


class CensoringMixin:
    """``y_upper`` and ``truncation`` in ``MoERegressor`` (mixed in before BaseMoE).

    During a fit, ``_pending_bounds`` holds the fit's bounds (None: uncensored); after
    it, ``_censored`` says whether the fitted family reads bounds.
    """

    def _censoring(self) -> tuple[bool, np.ndarray | None]:
        """(whether the target is coded with bounds, the fit's bounds if fitting)."""
        if "_pending_bounds" in self.__dict__:
            bounds = self.__dict__["_pending_bounds"]
            return bounds is not None, bounds
        return bool(getattr(self, "_censored", False)), None

    def _target(self):
        censored, bounds = self._censoring()
        if censored:
            return CensoredTarget(self._expert_class(), bounds)
        return super()._target()

    def _make_expert(self, coding, seed: int):
        """The subclass's family (``_family``), reading bounds where the target has them."""
        family = self._family(coding, seed)
        censored, bounds = self._censoring()
        if not censored:
            return family
        truncated = bounds is not None and bool(np.isfinite(bounds[:, 3:]).any())
        return censored_family(family, float(np.log(coding["_y_scale"][0])), truncated)

    def _fit_censored(self, X, y, y_upper, truncation, parent, sample_weight=None, offset=None):
        """A fit with the bounds checked and packed, or a plain one without them."""
        bounds = None
        if y_upper is not None or truncation is not None:
            if self.distributed:
                raise ValueError("y_upper and truncation are not available with distributed=True.")
            family = self._expert_class()
            if not (hasattr(family, "latent_normal") or can_censor_glm(family)):
                refuse_censoring(family, self.expert)
            bounds = pack_target(family, y, y_upper, truncation)
            w = check_sample_weight(sample_weight, len(bounds))
            if w is not None and not (w > 0).all():
                # rows of weight zero are dropped before the target is coded: drop
                # their bounds with them
                keep = w > 0
                X, bounds, sample_weight = rows_of(X, keep), bounds[keep], w[keep]
                offset = None if offset is None else np.asarray(offset)[keep]
            m = getattr(family, "target_columns", 1)
            y = bounds[:, 0] if m == 1 else bounds[:, :m]
        self._pending_bounds = bounds  # read by _target and _make_expert, then dropped
        try:
            return self._fit(X, y, parent=parent, sample_weight=sample_weight, offset=offset)
        finally:
            self.__dict__.pop("_pending_bounds", None)

    def _fitted_state(self, model, result, prepared, frozen=()):
        state = super()._fitted_state(model, result, prepared, frozen)
        state["_censored"] = bool(getattr(model.expert, "censored", False))
        return state

    def summary(self, X=None, y=None, *, y_upper=None, truncation=None, **options):
        """:meth:`SummaryMixin.summary`; on given rows with ``y_upper`` and
        ``truncation`` as ``fit`` takes them, the information of their intervals.

        Without X and y, the fit's own rows, bounds included. A censored fit's
        summary(X, y) without bounds treats every given y as exact.
        """
        if y_upper is None and truncation is None:
            return super().summary(X, y, **options)
        if X is None or y is None:
            raise ValueError("summary(y_upper=..., truncation=...) needs the rows' X and y.")
        if not getattr(self, "_censored", False):
            raise ValueError("y_upper and truncation in summary() are for a censored fit "
                             "(fit(X, y, y_upper=...)).")  # fmt: skip
        rows = pack_target(self._expert_class(), y, y_upper, truncation)
        return super().summary(X, rows, **options)

    def _bounded_log_joint(self, X, y, offset, y_upper, truncation) -> torch.Tensor:
        """log g_k(x_i) + log P_k(y_i <= Y <= y_upper_i | x_i), renormalised on each
        row's truncation window, of shape (K, n); a model fitted without bounds is
        evaluated on them with its family's censored form."""
        rows = pack_target(self._expert_class(), y, y_upper, truncation)
        if getattr(self, "_censored", False):
            return self._log_joint(X, rows, offset)
        family = censored_family(self._expert_family, float(np.log(self._y_scale[0])))
        XeT, XgT = self._designs(X)
        if len(rows) != XeT.shape[1]:
            raise ValueError(f"X and y have inconsistent numbers of samples: {XeT.shape[1]} "
                             f"and {len(rows)}.")  # fmt: skip
        off = self._row_vector(offset, len(rows), "offset", XeT.device)
        data = EMData(XeT, XgT, encode_rows(rows, vars(self), XeT.device), offset=off)
        logp = family.log_prob(self._params.expert, Chunk(0, len(rows), data))
        return logp + self._gate_family.log_weights(self._params.gate, XgT)

    def responsibilities(self, X, y, offset=None, *, y_upper=None, truncation=None):
        """Posterior p(z = k | x, y) of shape (n_samples, n_experts), as
        :meth:`ScoringMixin.responsibilities`; with ``y_upper`` or ``truncation`` (as
        ``fit`` takes them) each expert's density at y is replaced by the probability of
        the row's interval, renormalised on its window, as in the fit's E-step."""
        if y_upper is None and truncation is None:
            return super().responsibilities(X, y, offset)
        joint = self._bounded_log_joint(X, y, offset, y_upper, truncation)
        return torch.softmax(joint, dim=0).T.cpu().numpy()

    def log_likelihood_samples(self, X, y, offset=None, *, y_upper=None,
                               truncation=None) -> np.ndarray:  # fmt: skip
        """Log-likelihood log p(y_i | x_i) of every row, shape (n_samples,).

        With ``y_upper`` or ``truncation`` (as ``fit`` takes them), the log
        probability of each row's interval, renormalised on its window; a model fitted
        without them is evaluated on them too (linear, lognormal, Poisson, negative
        binomial, Gamma or Weibull experts).
        """
        if y_upper is None and truncation is None:
            return super().log_likelihood_samples(X, y, offset)
        if getattr(self, "_censored", False):  # in blocks, as any fit's rows
            rows = pack_target(self._expert_class(), y, y_upper, truncation)
            return super().log_likelihood_samples(X, rows, offset)
        joint = self._bounded_log_joint(X, y, offset, y_upper, truncation)
        return torch.logsumexp(joint, 0).cpu().numpy()

    def log_likelihood(self, X, y, sample_weight=None, offset=None, *, y_upper=None,
                       truncation=None) -> float:  # fmt: skip
        """Mean per-sample log-likelihood, sum_i w_i log p(y_i | x_i) / sum_i w_i
        (``sample_weight`` and ``offset`` as in ``fit``; see
        :meth:`log_likelihood_samples` for ``y_upper`` and ``truncation``)."""
        rows = self.log_likelihood_samples(X, y, offset, y_upper=y_upper, truncation=truncation)
        w = check_sample_weight(sample_weight, len(rows))
        return float(np.mean(rows) if w is None else np.average(rows, weights=w))
