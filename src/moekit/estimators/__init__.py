"""The scikit-learn estimators of moekit.

Each is imported on first use (PEP 562): a regression does not wait for the
Bayesian, hierarchical and MDN estimators, their gates and experts.
"""

from typing import TYPE_CHECKING

from moekit import _lazy_names

_PUBLIC = {
    "BayesianMoERegressor": "moekit.estimators.bayesian",
    "HierarchicalMoEClassifier": "moekit.estimators.hierarchical",
    "HierarchicalMoERegressor": "moekit.estimators.hierarchical",
    "MDNRegressor": "moekit.estimators.mdn",
    "MoEClassifier": "moekit.estimators.classifier",
    "MoERegressor": "moekit.estimators.regressor",
    "select_n_experts": "moekit.estimators.model_selection",
}

__all__ = [
    "BayesianMoERegressor",
    "HierarchicalMoEClassifier",
    "HierarchicalMoERegressor",
    "MDNRegressor",
    "MoEClassifier",
    "MoERegressor",
    "select_n_experts",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from moekit.estimators.bayesian import BayesianMoERegressor
    from moekit.estimators.classifier import MoEClassifier
    from moekit.estimators.hierarchical import HierarchicalMoEClassifier, HierarchicalMoERegressor
    from moekit.estimators.mdn import MDNRegressor
    from moekit.estimators.model_selection import select_n_experts
    from moekit.estimators.regressor import MoERegressor

__getattr__, __dir__ = _lazy_names(__name__, _PUBLIC)
