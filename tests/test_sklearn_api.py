"""scikit-learn conformance: every estimator passes ``parametrize_with_checks``.

Small settings keep the many fits fast; each skipped check carries its reason.
"""

import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from moekit import MDNRegressor, MoEClassifier, MoERegressor

ESTIMATORS = [
    MoERegressor(n_experts=2, max_iter=30, random_state=0),
    MoEClassifier(n_experts=2, max_iter=30, random_state=0),
    MDNRegressor(
        2,
        hidden_layer_sizes=(16,),
        learning_rate=1e-2,
        max_iter=40,
        n_iter_no_change=3,
        random_state=0,
    ),
]

EXPECTED_FAILED = {}


@parametrize_with_checks(
    ESTIMATORS, expected_failed_checks=lambda est: EXPECTED_FAILED.get(type(est).__name__, {})
)
def test_sklearn_compatible(estimator, check):
    check(estimator)


def test_a_wrong_constructor_argument_names_the_estimator():
    with pytest.raises(TypeError, match=r"MoERegressor\(\): got an unexpected keyword .*'foo'"):
        MoERegressor(foo=1)
    with pytest.raises(TypeError, match=r"MoERegressor\(\): too many positional arguments"):
        MoERegressor(2, 3)
