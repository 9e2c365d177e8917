"""The report's headline: how the mixture does on held-out rows, against one expert.

A mixture with more experts always fits its own rows better; whether it predicts
better shows on rows it was not fitted on. The headline compares the mixture's
held-out log-likelihood and the coverage of its 90% predictive intervals with those
of the same model fitted with one expert (K = 1), and says so in a plain sentence
when the mixture does worse. Coverage is a share of few rows, so it comes with its
binomial (Wilson score) interval.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

HEADLINE_LEVEL = 0.9
"""Nominal level of the predictive intervals whose held-out coverage is the headline."""

CONFIDENCE = 0.95
"""Confidence of the binomial intervals of a coverage."""


def wilson_interval(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n.

    .. math::  \\frac{\\hat p + z^2/2n \\pm z \\sqrt{\\hat p (1 - \\hat p)/n + z^2/4n^2}}
               {1 + z^2/n}, \\qquad z = \\Phi^{-1}\\big((1 + \\text{confidence}) / 2\\big)

    It stays inside [0, 1] and keeps close to its nominal confidence for the few
    dozen rows a held-out share often has, where the normal interval does not.
    """
    from scipy.special import ndtri

    if n <= 0:
        return (0.0, 1.0)
    z = float(ndtri((1.0 + confidence) / 2.0))
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def fit_baseline(model: Any, X, y, rows: dict | None = None) -> Any | None:
    """The model refitted with one expert (K = 1) on the same rows (``rows``: their
    ``sample_weight``, ``offset``, ``y_upper``); None where the model already has one
    expert or has no ``n_experts`` to set (a tree of gates).

    With a family per expert (``expert=["zero", "poisson"]``) the one expert is of the
    last family named (the count family of a zero-inflated model)."""
    from sklearn.base import clone

    params = model.get_params()
    if "n_experts" not in params or len(np.atleast_1d(model.expert_sizes_)) == 1:
        return None
    one = clone(model).set_params(n_experts=1, n_init=1, verbose=0)
    if isinstance(params.get("expert"), (list, tuple)):
        one.set_params(expert=params["expert"][-1])
    with warnings.catch_warnings():  # the comparison, not the baseline, is the news
        warnings.simplefilter("ignore")
        return one.fit(X, y, **(rows or {}))


@dataclass
class HeldOutCheck:
    """The mixture against one expert on held-out rows.

    Attributes
    ----------
    n : int
        Held-out rows.
    n_experts : int
    log_likelihood, baseline_log_likelihood : float
        Mean log p(y | x) per held-out row, of the mixture and of K = 1 (NaN without one).
    covered, baseline_covered : int
        Rows inside the central :data:`HEADLINE_LEVEL` interval (-1 for a classifier).
    expected, baseline_expected : float
        The share each model expects inside its intervals (:func:`expected_inside`):
        the level itself, or more for counts, whose central intervals hold at least it.
    """

    n: int
    n_experts: int
    log_likelihood: float
    baseline_log_likelihood: float = float("nan")
    covered: int = -1
    baseline_covered: int = -1
    expected: float = HEADLINE_LEVEL
    baseline_expected: float = HEADLINE_LEVEL

    @property
    def coverage(self) -> float:
        return self.covered / self.n

    def coverage_text(self, covered: int | None = None) -> str:
        """``"79.6% of 27 rows (95% interval 61.1-91.0%)"``, and the share the model
        expects where it is not the level (counts)."""
        covered = self.covered if covered is None else covered
        lo, hi = wilson_interval(covered, self.n)
        text = (f"{covered / self.n:.1%} of {self.n} rows ({CONFIDENCE:.0%} interval "
                f"{lo:.1%}-{hi:.1%})")  # fmt: skip
        if covered == self.covered and abs(self.expected - HEADLINE_LEVEL) > 1e-9:
            text += (f"; the model expects {self.expected:.1%} (a count's central "
                     f"interval holds at least {HEADLINE_LEVEL:.0%})")  # fmt: skip
        return text

    def verdict(self) -> str:
        """A plain sentence when the mixture does worse than one expert; else ""."""
        if self.n_experts == 1 or not np.isfinite(self.baseline_log_likelihood):
            return ""
        said = []
        if self.log_likelihood < self.baseline_log_likelihood:
            said.append(f"its held-out log-likelihood is {self.log_likelihood:.4g} per row "
                        f"against {self.baseline_log_likelihood:.4g} for K = 1")  # fmt: skip
        if self.covered >= 0 and self.baseline_covered >= 0:
            # each against the share it expects: a count's 90% interval holds more
            lo, hi = wilson_interval(self.covered, self.n)
            off = abs(self.coverage - self.expected)
            off_one = abs(self.baseline_covered / self.n - self.baseline_expected)
            if not lo <= self.expected <= hi and off > off_one:
                said.append(f"its {HEADLINE_LEVEL:.0%} intervals cover {self.coverage_text()}, "
                            f"against {self.baseline_covered / self.n:.1%} for K = 1")  # fmt: skip
        if not said:
            return ""
        return (f"On {self.n} held-out rows this mixture of {self.n_experts} experts does worse "
                f"than a single expert: {'; and '.join(said)}. Fewer experts (or more data) "
                "would serve better.")  # fmt: skip


def inside_interval(d, y, level: float) -> np.ndarray:
    """Whether each y lies in the central ``level`` interval of the predictive
    distribution ``d`` (a :class:`~moekit.MixturePrediction`), shape (n,).

    Inside [F^{-1}(a), F^{-1}(b)], a = (1 - level) / 2 and b = (1 + level) / 2, exactly
    when a <= F(y) <= b (for counts, where F jumps: F(y) >= a and F(y - 1) < b), so
    it needs the CDF at y alone, not the quantiles' root finding.
    """
    from moekit._core.components import component_family

    F = d.cdf(y)
    a, b = (1 - level) / 2, (1 + level) / 2
    if component_family(d.family).discrete:  # one family, or one per component
        return (F >= a) & (d.cdf(y - 1) < b)
    return (F >= a) & (F <= b)


def expected_inside(d, level: float) -> np.ndarray:
    """The predictive distribution's own probability of each row's central ``level``
    interval, shape (n,): ``level`` for a continuous family; for counts, whose CDF
    jumps, P(q_a <= Y <= q_b) = F(q_b) - F(q_a - 1) >= level, with q_a and q_b the
    smallest counts whose CDF reaches a = (1 - level) / 2 and b = (1 + level) / 2
    (the rows :func:`inside_interval` counts)."""
    from moekit._core.components import component_family

    if not component_family(d.family).discrete:
        return np.full(len(d), level)
    q_a, q_b = d.quantile((1 - level) / 2), d.quantile((1 + level) / 2)
    below = np.where(q_a > 0, d.cdf(np.maximum(q_a - 1.0, 0.0)), 0.0)
    return d.cdf(q_b) - below


def two_column_target(model: Any) -> bool:
    """Whether the model reads y as two columns, successes and failures (binomial
    experts), and predicts one output from them."""
    expert = getattr(model, "expert", None)
    return expert == "binomial" or (isinstance(expert, (list, tuple)) and "binomial" in expert)


def held_out_check(model: Any, X_test, y_test, baseline: Any | None = None,
                   rows: dict | None = None) -> HeldOutCheck:  # fmt: skip
    """Compare ``model`` and its one-expert ``baseline`` on held-out rows.

    ``rows`` holds the held-out rows' ``sample_weight`` (the log-likelihood per row is
    then sum_i w_i log p(y_i | x_i) / sum_i w_i), ``offset`` and ``y_upper`` (a
    censored row contributes log P(y <= Y <= y_upper | x), and the interval coverage,
    which needs exact responses, is not counted).
    """
    from moekit.plotting import _named

    rows = rows or {}
    X_test = np.asarray(getattr(X_test, "values", X_test), dtype=float)
    y_test = np.asarray(getattr(y_test, "values", y_test))
    regression = not hasattr(model, "predict_proba")
    if regression:
        y_test = y_test.astype(float)
    ll = float(model.log_likelihood(_named(model, X_test), y_test, **rows))
    check = HeldOutCheck(len(y_test), len(np.atleast_1d(model.expert_sizes_)), ll)
    # intervals of y itself: not of successes and failures (binomial experts predict
    # one trial, whose interval says nothing of a proportion out of many), nor of
    # several responses at once, nor of censored ones
    intervals = (regression and not two_column_target(model) and y_test.ndim == 1
                 and rows.get("y_upper") is None)  # fmt: skip
    offset = {"offset": rows["offset"]} if rows.get("offset") is not None else {}
    if intervals:
        d = model.predict_distribution(_named(model, X_test), **offset)
        check.covered = int(inside_interval(d, y_test, HEADLINE_LEVEL).sum())
        check.expected = float(expected_inside(d, HEADLINE_LEVEL).mean())
    if baseline is not None:
        Xb = _named(baseline, X_test)
        check.baseline_log_likelihood = float(baseline.log_likelihood(Xb, y_test, **rows))
        if intervals:
            d = baseline.predict_distribution(Xb, **offset)
            check.baseline_covered = int(inside_interval(d, y_test, HEADLINE_LEVEL).sum())
            check.baseline_expected = float(expected_inside(d, HEADLINE_LEVEL).mean())
    return check
