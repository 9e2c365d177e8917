"""moekit: Mixture-of-Experts models, from EM-fitted statistical MoE to sparse layers.

The public names are imported on first use (PEP 562), so that ``import moekit.nn``
loads PyTorch alone and not the statistical room's scikit-learn and pandas.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "BayesianMoERegressor": "moekit.estimators",
    "HierarchicalMoEClassifier": "moekit.estimators",
    "HierarchicalMoERegressor": "moekit.estimators",
    "MDNRegressor": "moekit.estimators",
    "MixturePrediction": "moekit.prediction",
    "ModelFormula": "moekit.formula",
    "MoEClassifier": "moekit.estimators",
    "MoERegressor": "moekit.estimators",
    "fit_formula": "moekit.formula",
    "load": "moekit.io",
    "predict_distribution": "moekit.pipeline",
    "select_n_experts": "moekit.estimators",
}

__all__ = [
    "BayesianMoERegressor",
    "HierarchicalMoEClassifier",
    "HierarchicalMoERegressor",
    "MDNRegressor",
    "MixturePrediction",
    "MoEClassifier",
    "MoERegressor",
    "ModelFormula",
    "fit_formula",
    "load",
    "predict_distribution",
    "select_n_experts",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from moekit.estimators import (
        BayesianMoERegressor,
        HierarchicalMoEClassifier,
        HierarchicalMoERegressor,
        MDNRegressor,
        MoEClassifier,
        MoERegressor,
        select_n_experts,
    )
    from moekit.formula import ModelFormula, fit_formula
    from moekit.io import load
    from moekit.pipeline import predict_distribution
    from moekit.prediction import MixturePrediction


def _lazy_names(package: str, names: dict[str, str]):
    """``__getattr__`` and ``__dir__`` (PEP 562) of a package whose public names are
    imported on first use: ``names`` maps each name to the module that defines it;
    any other name of a submodule imports that submodule."""

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is not None:
            value = getattr(importlib.import_module(module), name)
            setattr(sys.modules[package], name, value)  # later look-ups skip this function
            return value
        if not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}"):
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__


__getattr__, __dir__ = _lazy_names(__name__, _PUBLIC)
