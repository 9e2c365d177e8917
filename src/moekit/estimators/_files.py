"""Model files for the EM-fitted estimators: their state as JSON and tensors.

The fitted parameters are dataclasses of tensors (stored under ``expert.*`` and
``gate.*``); everything else is plain JSON. See :mod:`moekit.io` for the format.

Loading trusts nothing in the file. The settings are checked for type and range
first; then every tensor's header entry is compared with what the settings imply
before it is read: all are float64 (EM's dtype, never cast), the scaling has one
entry per feature, and the expert family and the gate state the shapes of their
own parameters (``param_shapes(p)`` for a design of p columns) and check their
values (``check_params``: variances positive, degrees of freedom in range, ...).
The helpers below are shared with the other estimators' file states.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from moekit._core.engine import resolve_device, to_numpy
from moekit.fitting.em import Params
from moekit.fitting.model import resized_family

_OWN = ("x_mean", "x_scale", "expert_sizes")  # the base's tensors; expert.*, gate.*; the rest


# ------------------------------------------------------------------ checks of stored state
def int_setting(state: dict, name: str, low: int = 0) -> int:
    """``state[name]`` as an int of at least ``low``, or a ValueError naming it."""
    value = state.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"setting {name!r} must be an int >= {low}; got {value!r}")
    return value


def bool_setting(state: dict, name: str) -> bool:
    value = state.get(name)
    if not isinstance(value, bool):
        raise ValueError(f"setting {name!r} must be true or false; got {value!r}")
    return value


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def real_setting(state: dict, name: str, optional: bool = False) -> float | None:
    """``state[name]`` as a finite float (or None where ``optional``)."""
    value = state.get(name)
    if optional and value is None:
        return None
    if not _is_real(value):
        raise ValueError(f"setting {name!r} must be a finite number; got {value!r}")
    return float(value)


def reals_setting(state: dict, name: str, optional: bool = False) -> list[float] | None:
    """``state[name]`` as a list of finite floats (or None where ``optional``)."""
    value = state.get(name)
    if optional and value is None:
        return None
    if not (isinstance(value, list) and all(map(_is_real, value))):
        raise ValueError(f"setting {name!r} must be a list of finite numbers")
    return [float(v) for v in value]


def feature_names(state: dict, d: int) -> np.ndarray | None:
    """``feature_names_in_``: absent, or d strings."""
    if "feature_names_in_" not in state:
        return None
    names = state["feature_names_in_"]
    if not (isinstance(names, list) and len(names) == d and all(isinstance(v, str) for v in names)):
        raise ValueError(f"setting 'feature_names_in_' must list n_features_in_={d} strings")
    return np.asarray(names, dtype=object)


def columns_setting(state: dict, name: str, d: int) -> np.ndarray | None:
    """A column selection: None, or distinct indices in [0, d)."""
    cols = state.get(name)
    if cols is None:
        return None
    ok = (
        isinstance(cols, list)
        and len(cols) > 0
        and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < d for c in cols)
        and len(set(cols)) == len(cols)
    )
    if not ok:
        raise ValueError(f"setting {name!r} must list distinct column indices in [0, {d})")
    return np.asarray(cols, dtype=int)


def check_values(name: str, t: torch.Tensor, positive: bool = False) -> None:
    """Refuse a tensor holding NaN or infinities (or values <= 0 where ``positive``)."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"tensor {name!r} holds NaN or infinite values")
    if positive and not bool((t > 0).all()):
        raise ValueError(
            f"tensor {name!r} must be positive; its smallest value is {float(t.min())}"
        )


class _Vectors:
    """The subclass's own tensors, handed to ``_set_extra_state``: float64 vectors,
    each checked before it is read and for finite values after."""

    def __init__(self, tensors, device) -> None:
        self._tensors, self._device = tensors, device

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in _OWN or name.startswith(("expert.", "gate.")):
            raise KeyError(name)
        self._tensors.check(name, (None,), why="one value per output")
        t = self._tensors[name].to(self._device)
        check_values(name, t)
        return t


def _check_classes(classes: Any) -> None:
    # a classifier's labels, indexed by their codes: distinct and sorted, as LabelEncoder
    # gives them, and at least two
    classes = np.asarray(classes)
    if classes.ndim != 1 or len(classes) < 2:
        raise ValueError(f"setting 'classes_' must list at least 2 labels; got {classes.tolist()}")
    if not np.array_equal(np.unique(classes), classes):
        raise ValueError(f"setting 'classes_' must be distinct and sorted; got {classes.tolist()}")


class ModelFileMixin:
    """``save`` and the ``_to_state`` / ``_from_state`` pair of :mod:`moekit.io`."""

    def save(self, path) -> None:
        """Write the fitted model to ``path`` (safetensors + JSON, no pickle)."""
        from moekit.io import save_model

        check_is_fitted(self)
        save_model(self, path)

    def _extra_state(self) -> tuple[dict, dict]:
        """A subclass's own (JSON state, tensors); its tensors are float64 vectors with
        one value per output of the expert family (``n_outputs``)."""
        return {}, {}

    def _set_extra_state(self, state: dict, tensors) -> None:
        pass

    def _to_state(self) -> tuple[dict, dict, dict]:
        params = self.get_params(deep=False)
        for name in ("gate", "expert"):
            value = params.get(name)
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                params[name] = list(value)  # a family per expert, by name
            elif name in params and not isinstance(value, str):
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
            "n_experts_removed": int(getattr(self, "n_experts_removed_", 0)),
            "frozen_experts": [int(k) for k in getattr(self, "frozen_experts_", ())],
            "expert_family": type(self._expert_family).__name__,
            "gate_family": type(self._gate_family).__name__,
        }
        if hasattr(self, "feature_names_in_"):
            state["feature_names_in_"] = [str(v) for v in self.feature_names_in_]
        if getattr(self, "formula_", None) is not None:
            state["formula"] = self.formula_.to_state()
        # what the command fitted with: the offset's expression, the responses' names
        for name in ("offset_term_", "target_names_"):
            if getattr(self, name, None) is not None:
                value = getattr(self, name)
                state[name] = value if isinstance(value, str) else [str(v) for v in value]
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
    def _from_state(cls, params: dict, state: dict, tensors) -> Any:
        model = cls(**params)
        model._validate_params()
        device = resolve_device(model.device if torch.cuda.is_available() else "cpu")
        # settings first: every expected shape follows from them
        d = model.n_features_in_ = int_setting(state, "n_features_in_", 1)
        # a fit may end with fewer experts than n_experts (min_share), never more
        K = int_setting(state, "n_experts_fitted", 1)
        if K > model.n_experts:
            raise ValueError(f"setting 'n_experts_fitted' is {K}, but n_experts={model.n_experts}")
        model._n_experts_fitted = K
        model.n_experts_removed_ = (
            int_setting(state, "n_experts_removed") if "n_experts_removed" in state else 0
        )
        frozen = state.get("frozen_experts", [])
        model.frozen_experts_ = (
            ()
            if frozen == []
            else tuple(int(k) for k in columns_setting(state, "frozen_experts", K))
        )
        names = feature_names(state, d)
        if names is not None:
            model.feature_names_in_ = names
        if "formula" in state:
            from moekit.formula import ModelFormula

            formula = ModelFormula.from_state(state["formula"])
            if names is None or formula.columns != [str(v) for v in names]:
                raise ValueError("the stored formula's columns are not the model's features")
            model.formula_ = formula
        offset_term = state.get("offset_term_")
        if offset_term is not None:
            if not isinstance(offset_term, str):
                raise ValueError("setting 'offset_term_' must be a string")
            from moekit.formula import check_term

            check_term(offset_term, where="offset")  # code: checked before it is ever run
            model.offset_term_ = offset_term
        target_names = state.get("target_names_")
        if target_names is not None:
            if not isinstance(target_names, list) or not all(
                isinstance(v, str) for v in target_names
            ):
                raise ValueError("setting 'target_names_' must be a list of strings")
            model.target_names_ = target_names
        model.n_iter_ = int_setting(state, "n_iter_")
        model.converged_ = bool_setting(state, "converged_")
        model.log_likelihood_ = real_setting(state, "log_likelihood_")
        model.log_likelihood_history_ = reals_setting(state, "log_likelihood_history_")
        model._expert_cols = columns_setting(state, "_expert_cols", d)
        model._gate_cols = columns_setting(state, "_gate_cols", d)

        # the scaling and expert sizes, then the subclass's vectors (target scaling)
        why = f"n_features_in_={d}, n_experts={K}"
        own = {"x_mean": (d,), "x_scale": (d,), "expert_sizes": (K,)}
        for name, shape in own.items():
            tensors.check(name, shape, why=why)
        own_t = {name: tensors[name].to(device) for name in own}
        check_values("x_mean", own_t["x_mean"])
        check_values("x_scale", own_t["x_scale"], positive=True)
        check_values("expert_sizes", own_t["expert_sizes"])
        if bool((own_t["expert_sizes"] < 0).any()):
            raise ValueError("tensor 'expert_sizes' holds negative sizes")
        model._x_mean, model._x_scale = own_t["x_mean"], own_t["x_scale"]
        model.expert_sizes_ = to_numpy(own_t["expert_sizes"])
        model._set_extra_state(state, _Vectors(tensors, device))
        if hasattr(model, "classes_"):
            _check_classes(model.classes_)

        # the families state their parameters' shapes; checked before they are read
        expert, gate = model._make_expert(vars(model), seed=0), model._make_gate(seed=0)
        if K != model.n_experts:
            expert, gate = resized_family(expert, K), resized_family(gate, K)
        if type(expert).__name__ != state.get("expert_family") or (
            type(gate).__name__ != state.get("gate_family")
        ):
            raise ValueError("the stored experts or gate do not match the stored settings")
        extra = model._extra_state()[1]
        m = getattr(expert, "n_outputs", None)
        for name, t in extra.items():
            if tuple(t.shape) != (m,):
                raise ValueError(
                    f"tensor {name!r} has shape {tuple(t.shape)}, expected ({m},): one value "
                    f"per output of the {type(expert).__name__}"
                )
        p_e = (d if model._expert_cols is None else len(model._expert_cols)) + 1
        p_g = (d if model._gate_cols is None else len(model._gate_cols)) + 1
        parts = {}
        for prefix, family, p, cols in (
            ("expert.", expert, p_e, model._expert_cols),
            ("gate.", gate, p_g, model._gate_cols),
        ):
            shapes = family.param_shapes(p)
            assert set(shapes) == {f.name for f in fields(family.params_type)}
            where = (
                f"n_experts={K}, {p - 1} of n_features_in_={d} columns and an intercept"
                if cols is not None
                else f"n_experts={K}, n_features_in_={d} and an intercept"
            )
            parts[prefix] = (family, shapes, where)
        tensors.check_names(
            [*own, *extra, *(pre + n for pre, (_, shapes, _) in parts.items() for n in shapes)]
        )
        for prefix, (family, shapes, where) in parts.items():
            for name, shape in shapes.items():
                tensors.check(prefix + name, shape, why=f"{where} ({type(family).__name__})")
        built = []
        for prefix, (family, shapes, _) in parts.items():
            obj = family.params_type(**{n: tensors[prefix + n].to(device) for n in shapes})
            family.check_params(obj, prefix=prefix)
            built.append(obj)
        model._params = Params(*built)
        if hasattr(expert, "named"):  # a family per expert: each expert's as stored
            expert = expert.named(model._params.expert)
        model._expert_family, model._gate_family = expert, gate
        return model
