"""The scikit-learn estimators of moekit."""

from moekit.estimators.bayesian import BayesianMoERegressor
from moekit.estimators.classifier import MoEClassifier
from moekit.estimators.hierarchical import HierarchicalMoEClassifier, HierarchicalMoERegressor
from moekit.estimators.mdn import MDNRegressor
from moekit.estimators.model_selection import select_n_experts
from moekit.estimators.regressor import MoERegressor

__all__ = [
    "BayesianMoERegressor",
    "HierarchicalMoEClassifier",
    "HierarchicalMoERegressor",
    "MDNRegressor",
    "MoEClassifier",
    "MoERegressor",
    "select_n_experts",
]
