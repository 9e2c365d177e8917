"""The scikit-learn estimators of moekit."""

from moekit.estimators.classifier import MoEClassifier
from moekit.estimators.regressor import MoERegressor

__all__ = ["MoEClassifier", "MoERegressor"]
