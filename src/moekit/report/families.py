"""The panel that checks a fit in its family's own terms.

The coverage table asks whether y falls inside the predictive intervals; each family
has a sharper question, drawn here from the fitted mixture's predictive
distribution (its ``cdf`` and ``logpdf``) with the numbers from
:mod:`moekit.report.describe`:

- positive amounts (Gamma, lognormal, Weibull) and censored responses: a P-P panel of the
  probability integral transform u_i = F(y_i | x_i) against the uniform, which it
  follows where the model is right (Kaplan-Meier for censored rows); censored counts
  and successes take the randomised transform of discrete responses
  (:func:`discrete_pit`), as their tables would count lower bounds as observations;
- counts (Poisson, negative binomial, zero and count mixtures): observed against
  expected numbers of rows at 0, 1, 2, ... (zeros first: their excess is the usual
  misfit of count models);
- proportions out of trials (binomial): observed against expected proportions of
  successes, in groups of rows by expected proportion.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np

from moekit.plotting import _named as named
from moekit.plotting import _pyplot
from moekit.report.describe import (
    binomial_proportions,
    count_frequencies,
    family_kind,
    pit_values,
    pp_distance,
    pp_points,
)
from moekit.report.page import embed_png, html_table

__all__ = ["family_check", "family_kind"]

COUNT_HEADER = ["count", "rows observed", "rows expected"]
PROPORTION_HEADER = ["group", "rows", "trials", "expected proportion", "observed proportion"]


def family_check(model: Any, X, y, *, y_upper=None, offset=None, where: str = "",
                 figures: dict | None = None) -> tuple[str, list[str]] | None:  # fmt: skip
    """(title, HTML fragments) of the family's panel and its table; None for a family
    the coverage table already checks (normal, Student-t).

    Parameters
    ----------
    model : fitted regressor with ``predict_distribution``
    X, y : array-like
        Rows to check (y: successes and failures for binomial experts).
    y_upper : array-like of shape (n_samples,), optional
        Upper bounds of censored responses (inf: right-censored at y); their
        P-P panel is drawn with Kaplan-Meier.
    offset : array-like of shape (n_samples,), optional
        The rows' offset (log exposure): expected counts and CDFs take it.
    where : str
        Which rows these are, for the title ("the training rows", "20 held-out rows").
    figures : dict, optional
        Filled with the panel's PNG bytes under "family".
    """
    d = model.predict_distribution(named(model, X),
                                   **({} if offset is None else {"offset": offset}))  # fmt: skip
    kind = family_kind(d)
    if y_upper is not None and kind in ("", "positive"):
        kind = "positive"
    if not kind:
        return None
    suffix = f" on {where}" if where else ""
    if y_upper is not None and kind in ("count", "binomial"):
        u, event = discrete_pit(d, y, y_upper)
        return _pp_part(u, event, "Predictive CDF at the observed y, randomised (P-P)" + suffix,
                        figures, " Each u is drawn uniformly between F(y - 1 | x) and "
                        "F(y | x) (seeded), which makes it uniform for counts too.")  # fmt: skip
    if kind == "count":
        rows = count_frequencies(d, y)
        fig = _count_figure(rows)
        title = "Observed against expected counts" + suffix
        return title, [embed_png(fig, "family", figures), html_table(rows, COUNT_HEADER)]
    if kind == "binomial":
        rows = binomial_proportions(d, y)
        fig = _proportion_figure(rows)
        title = "Observed against expected proportions" + suffix
        return title, [embed_png(fig, "family", figures), html_table(rows, PROPORTION_HEADER)]
    u, event = pit_values(d, y, y_upper)
    return _pp_part(u, event, "Predictive CDF at the observed y (P-P)" + suffix, figures)


def _pp_part(u, event, title: str, figures, how: str = "") -> tuple[str, list[str]]:
    fig = _pp_figure(u, event)
    censored = int((event == 0).sum())
    note = (f"Largest distance from the diagonal: {pp_distance(u, event):.3f} over {len(u)} "
            "rows" + (f", {censored} of them right-censored (Kaplan-Meier)" if censored else "")
            + "." + how)  # fmt: skip
    return title, [embed_png(fig, "family", figures), f'<p class="note">{html.escape(note)}</p>']


def discrete_pit(d: Any, y, y_upper, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The randomised probability integral transform of censored discrete responses.

    For a count (or successes out of t_i trials) with predictive CDF F_i, an exact
    y_i gives u_i = F_i(y_i - 1) + v_i (F_i(y_i) - F_i(y_i - 1)) with v_i uniform on
    (0, 1), which is uniform where the model is right (Brockwell 2007); a row known
    to lie in [y_i, y_upper_i] draws u_i the same way between F_i(y_i - 1) and
    F_i(y_upper_i); a right-censored one (y_upper_i infinite: Y_i >= y_i) only says
    U_i >= F_i(y_i - 1), returned as censored (event 0) for Kaplan-Meier. The
    binomial's F_i is the mixture sum_k g_k(x_i) Bin(. ; t_i, pi_k(x_i)).
    Returns (u, event), each (n,); ``seed`` makes the draws (and the report) repeatable.
    """
    y = np.asarray(y, dtype=float)
    upper = np.asarray(y_upper, dtype=float).reshape(-1)
    if y.ndim == 2:  # successes and failures: the mixture of binomials of t_i trials
        from moekit.successes import SuccessesPrediction

        s, cdf = y[:, 0], SuccessesPrediction(d, y.sum(1)).cdf
    else:
        s = y.reshape(-1)

        def cdf(j):
            return np.where(j >= 0, d.cdf(np.maximum(j, 0.0)), 0.0)

    low = np.where(np.isfinite(s), s, 0.0)  # y = -inf: left-censored, from 0
    right = np.isinf(upper) & (upper > 0)
    lo = cdf(low - 1.0)
    hi = np.where(right, 1.0, cdf(np.where(right, low, upper)))
    v = np.random.default_rng(seed).random(len(low))
    u = np.where(right, lo, lo + v * (hi - lo))
    return u, (~right).astype(float)


def _count_figure(rows):
    plt = _pyplot()
    labels = [r[0] for r in rows]
    at = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(at, [r[1] for r in rows], color="0.75", label="observed")
    ax.plot(at, [r[2] for r in rows], "o-", color="C3", label="expected, sum_i P(Y_i = j)")
    ax.set_xticks(at, labels, rotation=90 if len(rows) > 12 else 0, fontsize=8)
    ax.set_xlabel("count j")
    ax.set_ylabel("rows")
    ax.set_title("rows at each count: observed (bars) and expected (line)")
    ax.legend(fontsize=8)
    return fig


def _proportion_figure(rows):
    plt = _pyplot()
    expected = np.array([r[3] for r in rows])
    observed = np.array([r[4] for r in rows])
    trials = np.array([r[2] for r in rows])
    fig, ax = plt.subplots(figsize=(5, 5))
    lo, hi = float(min(expected.min(), observed.min())), float(max(expected.max(), observed.max()))
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="k", lw=1)
    ax.scatter(expected, observed, s=20 + 80 * trials / trials.max(), color="C0", alpha=0.8)
    ax.set_xlabel("expected proportion of successes")
    ax.set_ylabel("observed proportion")
    ax.set_title("groups of rows by expected proportion (area: trials)", fontsize=10)
    return fig


def _pp_figure(u, event):
    plt = _pyplot()
    x, f = pp_points(u, event)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="k", lw=1)
    ax.step(x, f, where="post", color="C0")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("u = F(y | x), the fitted mixture's CDF at the observed y")
    ax.set_ylabel("share of rows with F(y | x) <= u")
    ax.set_title("P-P: a fit that is right follows the diagonal", fontsize=10)
    return fig
