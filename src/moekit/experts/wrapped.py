"""Any scikit-learn estimator that accepts ``sample_weight`` as an expert.

The estimator is cloned once per expert and refitted in every M-step on all rows,
with the responsibilities r_ik as sample weights. A regressor's expert density is
Gaussian around its prediction, with the noise variance estimated from the
weighted residuals,

.. math::  \\sigma_k^2 = \\frac{\\sum_i r_{ik} (y_i - f_k(x_i))^2}{\\sum_i r_{ik}},

and a classifier's is its ``predict_proba``. Refitting a tree or a boosted
ensemble is a greedy search, not a maximisation, so an expert's refit is kept only
if its expected log-likelihood Q_k did not decrease (generalised EM); the
likelihood never decreases.

The estimators see the standardised features (without the intercept column).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.base import clone, is_classifier

from moekit._core.data import Chunk, EMData
from moekit._core.engine import to_numpy
from moekit._core.logspace import gaussian_logpdf


@dataclass
class WrappedParams:
    """estimators: K fitted estimators; var (K, 1) noise variances (regressors);
    train_out: their outputs on the fit data, (K, n) or (K, C, n), cached per M-step."""

    estimators: list
    var: torch.Tensor
    train_out: torch.Tensor | None = field(default=None, repr=False)
    train_data: Any = field(default=None, repr=False)


class WrappedExperts:
    """K clones of a scikit-learn estimator (see the module docstring).

    Parameters
    ----------
    template : estimator
        A scikit-learn regressor or classifier whose ``fit`` accepts ``sample_weight``.
    n_experts : int
    var_floor : float
        Smallest noise variance (regressors), in the standardised target's units.
    classes : int or None
        Number of classes for a classifier (class codes 0..C-1).
    """

    monotone = True
    needs_resp = True
    params_type = WrappedParams
    predictive_family = "normal"
    standardize_target = True
    target_columns = 1

    def __init__(
        self, template, n_experts: int, var_floor: float = 1e-6, classes: int | None = None
    ) -> None:
        self.template = template
        self.n_experts = n_experts
        self.var_floor = var_floor
        self.classifier = is_classifier(template)
        self.n_classes = classes

    @staticmethod
    def check_target(y2: np.ndarray) -> np.ndarray:
        """A regressor as expert models one target column."""
        if y2.shape[1] != 1:
            raise ValueError(
                f"an estimator as expert models one target; y has {y2.shape[1]} columns."
            )
        return y2

    def prepare(self, data: EMData) -> None:
        pass

    @staticmethod
    def _features(XT: torch.Tensor) -> np.ndarray:
        return to_numpy(XT[:-1].T)  # drop the intercept row: (n, p - 1)

    def _outputs(self, estimators, XT: torch.Tensor) -> torch.Tensor:
        Z = self._features(XT)
        if self.classifier:
            probs = []
            for est in estimators:
                p = np.zeros((len(Z), self.n_classes))
                p[:, est.classes_.astype(int)] = est.predict_proba(Z)
                probs.append(p.T)
            return torch.as_tensor(np.stack(probs), dtype=XT.dtype, device=XT.device)  # (K, C, n)
        preds = np.stack([est.predict(Z) for est in estimators])
        return torch.as_tensor(preds, dtype=XT.dtype, device=XT.device)  # (K, n)

    def _log_prob_from(self, out: torch.Tensor, var: torch.Tensor, y: torch.Tensor):
        if self.classifier:
            idx = y.view(1, 1, -1).expand(self.n_experts, 1, -1)
            return torch.log(out.gather(1, idx).squeeze(1).clamp(min=1e-12))
        return gaussian_logpdf(y[0] - out, var)

    def log_prob(self, params: WrappedParams, chunk: Chunk) -> torch.Tensor:
        if params.train_data is chunk.data and params.train_out is not None:
            out = params.train_out[..., chunk.start : chunk.stop]
        else:
            out = self._outputs(params.estimators, chunk.XeT)
        return self._log_prob_from(out, params.var, chunk.y)

    def chunk_stats(self, params, chunk, resp):
        return None

    def _fit_one(self, k: int, Z: np.ndarray, y: np.ndarray, weight: np.ndarray):
        est = clone(self.template)
        try:
            est.fit(Z, y, sample_weight=weight)
        except TypeError as exc:
            raise TypeError(
                f"expert: {type(self.template).__name__}.fit does not accept sample_weight, "
                "which EM needs to weigh each row by its responsibility."
            ) from exc
        return est

    def m_step(self, params, stats, data: EMData, resp: torch.Tensor) -> WrappedParams:
        Z = self._features(data.XeT)
        y = to_numpy(data.y) if self.classifier else to_numpy(data.y[0])
        R = to_numpy(resp)
        nk = resp.sum(1).clamp(min=1e-12)
        estimators = [self._fit_one(k, Z, y, R[k]) for k in range(self.n_experts)]
        out = self._outputs(estimators, data.XeT)
        if self.classifier:
            var = resp.new_ones((self.n_experts, 1))
        else:
            rss = (resp * (data.y[0] - out) ** 2).sum(1)
            var = torch.clamp(rss / nk, min=self.var_floor).unsqueeze(1)
        if params is not None:
            # keep an expert's old fit where the refit did not raise its Q_k
            old_out = (
                params.train_out
                if params.train_data is data
                else self._outputs(params.estimators, data.XeT)
            )
            q_new = (resp * self._log_prob_from(out, var, data.y)).sum(1)
            q_old = (resp * self._log_prob_from(old_out, params.var, data.y)).sum(1)
            for k in range(self.n_experts):
                if not bool(q_new[k] >= q_old[k]):
                    estimators[k] = params.estimators[k]
                    out[k] = old_out[k]
                    var[k] = params.var[k]
        return WrappedParams(estimators, var, out, data)

    def log_prior(self, params) -> float:
        return 0.0

    def n_parameters(self, params: WrappedParams) -> int:
        """Leaves of trees and ensembles, or coefficients of linear models."""
        total = 0
        for est in params.estimators:
            total += _count_parameters(est)
        return total + (0 if self.classifier else self.n_experts)

    def min_samples(self, params) -> float:
        return 1.0

    def select(self, params: WrappedParams, perm: torch.Tensor) -> WrappedParams:
        """The experts ``perm`` (indices may repeat; a repeated estimator is shared until refit)."""
        order = perm.tolist()
        out = None if params.train_out is None else params.train_out[perm]
        return WrappedParams(
            [params.estimators[k] for k in order], params.var[perm], out, params.train_data
        )

    def residuals(self, params: WrappedParams, chunk: Chunk) -> torch.Tensor:
        """(y - f_k(x)) / sigma_k for regressors (K, 1, c); onehot(y) - p_k for classifiers."""
        out = self._outputs(params.estimators, chunk.XeT)
        if self.classifier:
            onehot = torch.nn.functional.one_hot(chunk.y, self.n_classes).T.to(out.dtype)
            return onehot.unsqueeze(0) - out
        return ((chunk.y[0] - out) / params.var.sqrt()).unsqueeze(1)

    def moments(self, params: WrappedParams, XT: torch.Tensor):
        """Predictions and noise standard deviations, each (n, K, 1)."""
        out = self._outputs(params.estimators, XT).T.unsqueeze(-1)
        return out, torch.sqrt(params.var).unsqueeze(0).expand_as(out)

    def class_probs(self, params: WrappedParams, XT: torch.Tensor) -> torch.Tensor:
        return self._outputs(params.estimators, XT)

    def predictive_extra(self, params) -> dict:
        return {}


def _count_parameters(est) -> int:
    if hasattr(est, "tree_"):
        return int(est.get_n_leaves())
    if hasattr(est, "estimators_"):
        members = np.asarray(est.estimators_, dtype=object).ravel()
        return int(sum(_count_parameters(m) for m in members))
    if hasattr(est, "coef_"):
        return int(np.size(est.coef_) + np.size(getattr(est, "intercept_", 0)))
    raise ValueError(
        f"cannot count the parameters of {type(est).__name__} for BIC/AIC; compare models "
        "with held-out log-likelihood instead."
    )
