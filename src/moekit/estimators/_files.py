"""Model files for the EM-fitted estimators: their state as JSON and tensors.

The fitted parameters are dataclasses of tensors (stored under ``expert.*`` and
``gate.*``); everything else is plain JSON. See :mod:`moekit.io` for the format.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from moekit._core.engine import resolve_device, to_numpy
from moekit.fitting.em import Params


class ModelFileMixin:
    """``save`` and the ``_to_state`` / ``_from_state`` pair of :mod:`moekit.io`."""

    def save(self, path) -> None:
        """Write the fitted model to ``path`` (safetensors + JSON, no pickle)."""
        from moekit.io import save_model

        check_is_fitted(self)
        save_model(self, path)

    def _extra_state(self) -> tuple[dict, dict]:
        return {}, {}

    def _set_extra_state(self, state: dict, tensors: dict) -> None:
        pass

    def _to_state(self) -> tuple[dict, dict, dict]:
        params = self.get_params(deep=False)
        for name in ("gate", "expert"):
            if name in params and not isinstance(params[name], str):
                raise TypeError(
                    f"save() cannot store {name}={params[name]!r}: only built-in experts and "
                    "gates (given by name) are saved, since anything else would need pickle."
                )
        if not isinstance(params["random_state"], (int, type(None))):
            params["random_state"] = None
        params["device"] = str(params["device"])
        state = {
            "n_features_in_": int(self.n_features_in_),
            "n_iter_": int(self.n_iter_),
            "converged_": bool(self.converged_),
            "log_likelihood_": float(self.log_likelihood_),
            "log_likelihood_history_": [float(v) for v in self.log_likelihood_history_],
            "n_experts_fitted": int(self._n_experts_fitted),
            "expert_family": type(self._expert_family).__name__,
            "gate_family": type(self._gate_family).__name__,
        }
        if hasattr(self, "feature_names_in_"):
            state["feature_names_in_"] = [str(v) for v in self.feature_names_in_]
        for name in ("expert_features", "gate_features"):
            value = params.get(name)
            if value is not None:
                params[name] = np.asarray(value).tolist()
        for attr in ("_expert_cols", "_gate_cols"):
            cols = getattr(self, attr)
            state[attr] = None if cols is None else [int(c) for c in cols]
        tensors = {
            "x_mean": self._x_mean,
            "x_scale": self._x_scale,
            "expert_sizes": torch.as_tensor(self.expert_sizes_),
        }
        for prefix, obj in (("expert.", self._params.expert), ("gate.", self._params.gate)):
            for f in fields(obj):
                tensors[prefix + f.name] = getattr(obj, f.name)
        extra_state, extra_tensors = self._extra_state()
        state.update(extra_state)
        tensors.update(extra_tensors)
        return params, state, tensors

    @classmethod
    def _from_state(cls, params: dict, state: dict, tensors: dict) -> Any:
        model = cls(**params)
        model._validate_params()
        device = resolve_device(model.device if torch.cuda.is_available() else "cpu")
        tensors = {k: v.to(device=device) for k, v in tensors.items()}
        model.n_features_in_ = state["n_features_in_"]
        if "feature_names_in_" in state:
            model.feature_names_in_ = np.asarray(state["feature_names_in_"], dtype=object)
        model.n_iter_ = state["n_iter_"]
        model.converged_ = state["converged_"]
        model.log_likelihood_ = state["log_likelihood_"]
        model.log_likelihood_history_ = state["log_likelihood_history_"]
        model._n_experts_fitted = state["n_experts_fitted"]
        for attr in ("_expert_cols", "_gate_cols"):
            cols = state.get(attr)
            setattr(model, attr, None if cols is None else np.asarray(cols, dtype=int))
        model._x_mean, model._x_scale = tensors["x_mean"], tensors["x_scale"]
        if model._x_mean.shape != (model.n_features_in_,):
            raise ValueError("feature scaling does not match n_features_in_")
        model.expert_sizes_ = to_numpy(tensors["expert_sizes"])
        model._set_extra_state(state, tensors)
        expert = model._make_expert(vars(model), seed=0)
        gate = model._make_gate(seed=0)
        if type(expert).__name__ != state["expert_family"] or (
            type(gate).__name__ != state["gate_family"]
        ):
            raise ValueError("the stored experts or gate do not match the stored settings")

        def build(kind: type, prefix: str) -> Any:
            return kind(**{f.name: tensors[prefix + f.name] for f in fields(kind)})

        model._params = Params(
            build(expert.params_type, "expert."), build(gate.params_type, "gate.")
        )
        model._expert_family, model._gate_family = expert, gate
        return model
