"""Successes out of t trials under a fitted mixture of binomial experts.

A binomial mixture's :meth:`~moekit.MoERegressor.predict_distribution` is that of
one trial: success with probability pi_i = sum_k g_k(x_i) pi_k(x_i). A row of t_i
trials has successes S_i with

.. math::  P(S_i \\le j) = \\sum_k g_k(x_i)\\, \\operatorname{Bin}(j;\\, t_i, \\pi_k(x_i)),
           \\qquad E S_i = t_i \\pi_i, \\qquad
           \\operatorname{Var} S_i = \\sum_k g_k \\big(t_i \\pi_k (1 - \\pi_k)
                                     + t_i^2 \\pi_k^2\\big) - (t_i \\pi_i)^2,

whose spread is wider than the one binomial Bin(t_i, pi_i) wherever the experts'
pi_k differ (the overdispersion the mixture models).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class SuccessesPrediction:
    """The predictive distribution of the successes of rows with known trials.

    Parameters
    ----------
    d : MixturePrediction
        A binomial mixture's one-trial prediction (``weights`` and ``means``, each
        (n, K): g_k(x_i) and pi_k(x_i)).
    trials : array-like of shape (n,)
        Each row's number of trials, a whole number >= 0.
    """

    def __init__(self, d: Any, trials) -> None:
        t = np.asarray(trials, dtype=float).reshape(-1)
        self.weights, self.probs = np.asarray(d.weights), np.asarray(d.means)  # (n, K)
        if len(t) != len(self.weights):
            raise ValueError(f"trials has {len(t)} values for {len(self.weights)} rows.")
        if not np.isfinite(t).all() or (t < 0).any() or (t != np.round(t)).any():
            row = int(np.flatnonzero(~np.isfinite(t) | (t < 0) | (t != np.round(t)))[0])
            raise ValueError(f"trials must be whole numbers >= 0; row {row} has {t[row]!r}.")
        self.trials = t.astype(np.int64)

    def __len__(self) -> int:
        return len(self.trials)

    def mean(self) -> np.ndarray:
        """E S_i = t_i sum_k g_k pi_k, shape (n,)."""
        return self.trials * (self.weights * self.probs).sum(1)

    def var(self) -> np.ndarray:
        """Var S_i: each expert's binomial variance plus the spread of their means."""
        t = self.trials[:, None]
        second = (self.weights * (t * self.probs * (1 - self.probs) + (t * self.probs) ** 2)).sum(1)
        return np.maximum(second - self.mean() ** 2, 0.0)

    def std(self) -> np.ndarray:
        return np.sqrt(self.var())

    def cdf(self, j) -> np.ndarray:
        """P(S_i <= j_i), shape (n,); 0 below 0 and 1 from t_i on."""
        from scipy.special import bdtr  # the regularised incomplete beta function

        j = np.broadcast_to(np.floor(np.asarray(j, dtype=float)), self.trials.shape)
        k = np.clip(j, 0, self.trials).astype(np.int64)[:, None]
        each = bdtr(k, self.trials[:, None], self.probs)
        return np.where(j < 0, 0.0, np.where(j >= self.trials, 1.0, (self.weights * each).sum(1)))

    def quantile(self, q: float) -> np.ndarray:
        """The smallest whole j with P(S_i <= j) >= q, per row (bisection on 0..t_i)."""
        if not 0.0 < q < 1.0:
            raise ValueError(f"q must be in (0, 1); got {q!r}.")
        lo, hi = np.full(len(self), -1.0), self.trials.astype(float)  # F(lo) < q <= F(hi)
        while (hi - lo > 1).any():
            mid = np.floor(0.5 * (lo + hi))
            below = self.cdf(mid) < q
            lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
        return hi

    def interval(self, alpha: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
        """The central ``alpha`` interval: the (1 - alpha) / 2 and (1 + alpha) / 2 quantiles."""
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1); got {alpha!r}.")
        return self.quantile(0.5 * (1 - alpha)), self.quantile(0.5 * (1 + alpha))

    def sample(self, n_samples: int = 1, random_state=None) -> np.ndarray:
        """Draws of S_i, shape (n, n_samples): an expert by the gate, then its binomial."""
        rng = np.random.default_rng(random_state)
        n = len(self)
        u = rng.random((n, n_samples))
        comp = (u[:, :, None] > np.cumsum(self.weights, 1)[:, None, :]).sum(2)
        comp = np.minimum(comp, self.weights.shape[1] - 1)
        pi = np.take_along_axis(self.probs, comp, 1)
        return rng.binomial(np.broadcast_to(self.trials[:, None], pi.shape), pi).astype(float)
