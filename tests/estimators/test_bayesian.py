"""BayesianMoERegressor: variational EM through the one EM loop."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from moekit import BayesianMoERegressor


@parametrize_with_checks(
    [
        BayesianMoERegressor(n_experts=2, max_iter=20, n_init=2, random_state=0),
        BayesianMoERegressor(n_experts=2, gate="constant", max_iter=20, n_init=2, random_state=0),
    ]
)
def test_sklearn_compatible(estimator, check):
    check(estimator)
