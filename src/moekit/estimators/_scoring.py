"""What every fitted EM estimator answers: gate weights, responsibilities, likelihoods.

A fitted model is p(y | x) = sum_k g_k(x) p_k(y | x). The queries build the designs
of the rows they are given (:mod:`moekit.estimators._design`), ask the fitted
families for log g_k(x) and log p_k(y | x), and add the target coding's
log-Jacobian so that every likelihood is in the user's units of y.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted, validate_data

from moekit._core.data import Chunk, EMData
from moekit._core.engine import to_numpy
from moekit.estimators._design import build_designs, rows_of, shared_tensor
from moekit.estimators._weights import as_row_tensor, check_offset, check_sample_weight

SCORE_BLOCK_ROWS = 2**17
"""Rows per block when scoring large data (see ``log_likelihood_samples``)."""


class ScoringMixin:
    """Queries of a fitted mixture of experts (mixed into :class:`BaseMoE`)."""

    # ------------------------------------------------------------------ data
    def _designs(self, X) -> tuple[torch.Tensor, torch.Tensor]:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64,
                          ensure_min_features=self._min_features)  # fmt: skip
        Xt = shared_tensor(X, self._x_mean.device)
        return build_designs(Xt, vars(self))

    def _row_vector(self, values, n: int, name: str, device) -> torch.Tensor | None:
        """``sample_weight`` or ``offset`` of n query rows as a tensor (checked), or None."""
        if values is None:
            return None
        if name == "offset":
            if not getattr(self._expert_family, "takes_offset", False):
                raise ValueError(
                    "offset is a known term of the experts' linear predictor, for Poisson, "
                    "negative binomial, Gamma and binomial experts; this model's "
                    f"{type(self._expert_family).__name__} have none."
                )
            return as_row_tensor(check_offset(values, n), device)
        return as_row_tensor(check_sample_weight(values, n), device)

    def _em_data(self, X, y, offset=None, sample_weight=None) -> EMData:
        XeT, XgT = self._designs(X)
        coder = self._target()
        y = coder.check(np.asarray(y) if not hasattr(y, "iloc") else y.to_numpy(), vars(self))
        if y.shape[0] != XeT.shape[1]:
            raise ValueError(
                f"X and y have inconsistent numbers of samples: {XeT.shape[1]} and {y.shape[0]}."
            )
        return EMData(
            XeT,
            XgT,
            coder.encode(y, vars(self), XeT.device),
            offset=self._row_vector(offset, XeT.shape[1], "offset", XeT.device),
            weight=self._row_vector(sample_weight, XeT.shape[1], "sample_weight", XeT.device),
        )

    def _log_jacobian(self) -> float:
        """log |d y_coded / d y| per row of the fitted coding (see ``_targets``)."""
        return self._target().log_jacobian(vars(self))

    # ------------------------------------------------------------------ queries
    def gate_weights(self, X) -> np.ndarray:
        """Gate weights g_k(x) of shape (n_samples, n_experts); rows sum to 1."""
        _, XgT = self._designs(X)
        return to_numpy(torch.exp(self._gate_family.log_weights(self._params.gate, XgT)).T)

    def _log_joint(self, X, y, offset=None) -> torch.Tensor:
        data = self._em_data(X, y, offset)
        chunk = Chunk(0, data.n, data)
        logp = self._expert_family.log_prob(self._params.expert, chunk)
        return logp + self._gate_family.log_weights(self._params.gate, data.XgT)  # (K, n)

    def responsibilities(self, X, y, offset=None) -> np.ndarray:
        """Posterior p(z = k | x, y) of shape (n_samples, n_experts); rows sum to 1.

        .. math::  r_{ik} = \\frac{g_k(x_i)\\, p_k(y_i \\mid x_i)}
                               {\\sum_j g_j(x_i)\\, p_j(y_i \\mid x_i)}

        ``offset`` (n_samples,) is the experts' known term of each row, as in ``fit``.
        """
        return to_numpy(torch.softmax(self._log_joint(X, y, offset), dim=0).T)

    def log_likelihood_samples(self, X, y, offset=None) -> np.ndarray:
        """Log-likelihood log p(y_i | x_i) of every row, shape (n_samples,).

        Rows go through in blocks of ``SCORE_BLOCK_ROWS``, so that the designs built
        for them never take more memory than a block's. ``offset`` (n_samples,) is
        the experts' known term of each row, as in ``fit``.
        """
        n = len(X) if hasattr(X, "__len__") else np.shape(X)[0]
        if n > SCORE_BLOCK_ROWS and np.ndim(X) == 2:
            off = None if offset is None else np.asarray(offset)
            return np.concatenate([
                self.log_likelihood_samples(
                    rows_of(X, slice(i, i + SCORE_BLOCK_ROWS)),
                    rows_of(y, slice(i, i + SCORE_BLOCK_ROWS)),
                    None if off is None else off[i : i + SCORE_BLOCK_ROWS])
                for i in range(0, n, SCORE_BLOCK_ROWS)
            ])  # fmt: skip
        lse = torch.logsumexp(self._log_joint(X, y, offset), dim=0)
        return to_numpy(lse) + self._log_jacobian()

    def log_likelihood(self, X, y, sample_weight=None, offset=None) -> float:
        """Mean per-sample log-likelihood, sum_i w_i log p(y_i | x_i) / sum_i w_i.

        ``sample_weight`` (frequency weights; default 1) and ``offset`` as in ``fit``.
        """
        values = self.log_likelihood_samples(X, y, offset)
        w = check_sample_weight(sample_weight, len(values))
        return float(np.mean(values) if w is None else np.average(values, weights=w))

    def n_parameters(self) -> int:
        """Free parameters of the fitted model (experts and gate)."""
        check_is_fitted(self)
        return int(
            self._expert_family.n_parameters(self._params.expert)
            + self._gate_family.n_parameters(self._params.gate)
        )

    def _n_rows(self, X, sample_weight) -> float:
        """n of the criteria: the rows, or the sum of their frequency weights."""
        w = check_sample_weight(sample_weight, len(X))
        return float(len(X) if w is None else w.sum())

    def bic(self, X, y, sample_weight=None, offset=None) -> float:
        """Bayesian information criterion, -2 log L + n_parameters log n (lower is better).

        With frequency weights, n = sum_i w_i and log L = sum_i w_i log p(y_i | x_i).
        """
        n = self._n_rows(X, sample_weight)
        ll = self.log_likelihood(X, y, sample_weight, offset)
        return -2.0 * n * ll + self.n_parameters() * math.log(n)

    def aic(self, X, y, sample_weight=None, offset=None) -> float:
        """Akaike information criterion, -2 log L + 2 n_parameters (lower is better)."""
        n = self._n_rows(X, sample_weight)
        return (
            -2.0 * n * self.log_likelihood(X, y, sample_weight, offset) + 2.0 * self.n_parameters()
        )


class CoefficientsMixin:
    """Fitted coefficients in the data's units (mixed into :class:`BaseMoE`).

    EM fits slopes b on standardised columns (x - mean) / scale; in the data's units
    they are b / scale, and the centring adds -sum_j b_j mean_j / scale_j to the
    intercept.
    """

    def _scatter(self, coef: np.ndarray, cols) -> np.ndarray:
        # slopes on selected, standardised columns -> one column per feature of X
        d = self.n_features_in_
        cols = np.arange(d) if cols is None else cols
        out = np.zeros((*coef.shape[:-1], d))
        out[..., cols] = coef / to_numpy(self._x_scale)[cols]
        return out

    def _shift(self, coef: np.ndarray, cols) -> np.ndarray:
        # what the centring of x adds to the intercept: -sum_j b_j mean_j / scale_j
        cols = np.arange(self.n_features_in_) if cols is None else cols
        ratio = to_numpy(self._x_mean / self._x_scale)[cols]
        return -(coef * ratio).sum(-1)

    def _check_linear_gate(self, name: str) -> None:
        gate = self._params.gate
        if not (hasattr(gate, "coef") or hasattr(gate, "log_pi")):
            raise AttributeError(
                f"{name} exists for gates linear in x (softmax, constant, tree); the "
                f"{type(self._gate_family).__name__} has no such coefficients."
            )

    @property
    def gate_coef_(self) -> np.ndarray:
        """Gate slopes V in g(x) = softmax(V x + v), shape (K, n_features).

        The softmax is unchanged by adding one vector to every row; the gate's
        penalty makes the slopes sum to zero over experts. Columns the gate does not
        see (``gate_features``) are zero, and so is everything for a constant gate.
        """
        gate = self._params.gate
        self._check_linear_gate("gate_coef_")
        if not hasattr(gate, "coef"):
            return np.zeros((self._n_experts_fitted, self.n_features_in_))
        return self._scatter(to_numpy(gate.coef)[:, :-1], self._gate_cols)

    @property
    def gate_intercept_(self) -> np.ndarray:
        """Gate intercepts v, shape (K,), centred to sum to zero; log pi_k for a constant gate."""
        gate = self._params.gate
        self._check_linear_gate("gate_intercept_")
        if not hasattr(gate, "coef"):
            return to_numpy(gate.log_pi)
        coef = to_numpy(gate.coef)
        v = coef[:, -1] + self._shift(coef[:, :-1], self._gate_cols)
        return v - v.mean()
