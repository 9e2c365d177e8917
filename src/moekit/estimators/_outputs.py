"""What a regression knows about its outputs (mixed into :class:`MoERegressor`).

A target of q columns is standardised per column (``RealTarget``); linear experts
then hold a noise covariance per expert of the standardised target, constrained by
``covariance_type`` (:mod:`moekit.experts.gaussian_cov`). Here: building those
experts, their covariances and predictive mixture in y's units, D Sigma_k D with
D = diag(y_scale), and the target scaling's part of model files.
"""

from __future__ import annotations

import numpy as np
import torch

from moekit._core.engine import to_numpy
from moekit.experts.gaussian_cov import COVARIANCE_EXPERTS
from moekit.mvn_prediction import GaussianMixturePrediction


class OutputsMixin:
    """Covariances of the outputs and the target scaling's file state."""

    covariance_type = "diag"

    def _covariance_class(self) -> type | None:
        """The linear experts' class for ``covariance_type``; None for the default 'diag'.

        Raises
        ------
        ValueError
            A covariance type other than 'diag' with experts that are not linear-Gaussian.
        """
        if self.covariance_type == "diag":
            return None
        if self.expert != "linear":
            raise ValueError(
                f"covariance_type={self.covariance_type!r} is for Gaussian experts "
                f"(expert='linear'); got expert={self.expert!r}. Leave covariance_type='diag'."
            )
        return COVARIANCE_EXPERTS[self.covariance_type]

    @property
    def covariances_(self) -> np.ndarray:
        """Expert noise covariances in y's units, shape (K, m, m).

        Diagonal for ``covariance_type='diag'``, the same matrix for every expert for
        'tied', sigma_k^2 I for 'spherical'. Linear experts only.
        """
        expert = getattr(self, "expert", None)
        if expert != "linear":
            raise AttributeError(f"covariances_ is for expert='linear'; got {expert!r}.")
        family, params = self._expert_family, self._params.expert
        cov = (family.covariances(params) if hasattr(family, "covariances")
               else torch.diag_embed(params.var))  # fmt: skip
        scale = np.asarray(self._y_scale)
        return to_numpy(cov) * scale[:, None] * scale[None, :]

    def _q_variate(self, w: torch.Tensor, means: torch.Tensor) -> GaussianMixturePrediction:
        """The predictive mixture with the experts' covariances, in y's units."""
        return GaussianMixturePrediction(to_numpy(w), to_numpy(means), self.covariances_)

    # ------------------------------------------------------------------ files
    def _extra_state(self):
        censored = bool(getattr(self, "_censored", False))
        return {"y_2d": bool(self._y_2d), "censored": censored}, {
            "y_mean": torch.as_tensor(self._y_mean),
            "y_scale": torch.as_tensor(self._y_scale),
        }

    def _set_extra_state(self, state, tensors):
        if not isinstance(state.get("y_2d"), bool):
            raise ValueError(f"setting 'y_2d' must be true or false; got {state.get('y_2d')!r}")
        self._y_2d = state["y_2d"]
        self._censored = state.get("censored", False) is True
        self._y_mean = to_numpy(tensors["y_mean"]).astype(np.float64)
        self._y_scale = to_numpy(tensors["y_scale"]).astype(np.float64)
        if not (np.isfinite(self._y_scale).all() and (self._y_scale > 0).all()):
            raise ValueError("target scaling is not positive and finite")
        if not self._y_2d and len(self._y_mean) != 1:
            raise ValueError(
                f"setting 'y_2d' is false (one target) but 'y_mean' has {len(self._y_mean)} outputs"
            )
