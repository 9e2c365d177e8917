"""moekit: Mixture-of-Experts models, from EM-fitted statistical MoE to sparse layers."""

from moekit.estimators import MDNRegressor, MoEClassifier, MoERegressor, select_n_experts
from moekit.io import load
from moekit.prediction import MixturePrediction

__version__ = "0.1.0"

__all__ = [
    "MDNRegressor",
    "MixturePrediction",
    "MoEClassifier",
    "MoERegressor",
    "load",
    "select_n_experts",
]
