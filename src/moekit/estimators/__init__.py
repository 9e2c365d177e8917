"""The scikit-learn estimators of moekit."""

from moekit.estimators.classifier import MoEClassifier
from moekit.estimators.mdn import MDNRegressor
from moekit.estimators.regressor import MoERegressor

__all__ = ["MDNRegressor", "MoEClassifier", "MoERegressor"]
