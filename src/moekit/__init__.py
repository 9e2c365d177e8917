"""moekit: Mixture-of-Experts models, from EM-fitted statistical MoE to sparse layers.

The public names are imported on first use (PEP 562), so that ``import moekit.nn``
loads PyTorch alone and not the statistical room's scikit-learn and pandas.
"""

from __future__ import annotations

import importlib
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


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'moekit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
