"""The gate's balance penalty: every expert keeps weight, and the objective still climbs."""

import warnings

import numpy as np
import pytest

from moekit import HierarchicalMoERegressor, MoEClassifier, MoERegressor


def _one_regime(n=600, seed=0):
    # one line fits everything: without a penalty, experts are free to die out
    rng = np.random.default_rng(seed)
    X = rng.uniform(-2, 2, (n, 2))
    y = 1.0 + X @ np.array([0.5, -1.0]) + 0.3 * rng.normal(size=n)
    y[: n // 20] += 4.0  # a few outliers that one expert can take alone
    return X, y


def _fit(est, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return est.fit(X, y)


@pytest.mark.parametrize("gate", ["softmax", "constant"])
@pytest.mark.parametrize("lam", [0.5, 3.0])
def test_every_expert_keeps_its_share_of_the_penalised_targets(gate, lam):
    X, y = _one_regime()
    K = 3
    m = _fit(MoERegressor(K, gate=gate, gate_balance=lam, random_state=0, tol=1e-10,
                          max_iter=2000), X, y)  # fmt: skip
    # at the gate's optimum its mean weight equals the mean target (the intercepts'
    # stationarity), and each target is at least lambda / K / (1 + lambda)
    floor = lam / K / (1 + lam)
    assert m.gate_weights(X).mean(0).min() >= floor - 1e-6


def test_balance_spreads_the_data_over_experts():
    X, y = _one_regime()
    shares = []
    for lam in (0.0, 1.0, 10.0):
        # min_share=0: the experts the penalty keeps alive are the subject here
        m = _fit(MoERegressor(3, gate_balance=lam, min_share=0.0, random_state=0), X, y)
        shares.append(m.gate_weights(X).mean(0).min())
    assert shares[0] < shares[1] < shares[2]
    assert shares[2] > 0.25  # a strong penalty makes the gate nearly uniform


@pytest.mark.parametrize(
    "make",
    [
        lambda: MoERegressor(3, gate_balance=1.0, random_state=1, max_iter=60),
        lambda: MoERegressor(3, gate="constant", gate_balance=1.0, random_state=1, max_iter=60),
        lambda: MoERegressor(3, gate_balance=1.0, random_state=1, max_iter=60, expert="student_t"),
        lambda: HierarchicalMoERegressor(2, gate_balance=1.0, random_state=1, max_iter=60),
    ],
)
def test_the_penalised_objective_never_decreases(make):
    X, y = _one_regime(seed=3)
    m = _fit(make(), X, y)
    steps = np.diff(m.log_likelihood_history_)
    assert steps.min() >= -1e-9 * (1 + abs(m.log_likelihood_history_[-1]))


def test_classifier_balance_keeps_the_objective_climbing():
    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    m = _fit(MoEClassifier(3, gate_balance=2.0, random_state=0, max_iter=80), X, y)
    assert np.diff(m.log_likelihood_history_).min() >= -1e-9
    assert m.gate_weights(X).mean(0).min() >= 2.0 / 3 / 3 - 1e-3


def test_zero_balance_is_the_plain_fit():
    X, y = _one_regime()
    a = _fit(MoERegressor(3, random_state=0), X, y)
    b = _fit(MoERegressor(3, gate_balance=0.0, random_state=0), X, y)
    np.testing.assert_array_equal(a.coef_, b.coef_)


def test_balance_is_refused_where_the_gate_cannot_take_it():
    X, y = _one_regime(n=100)
    with pytest.raises(ValueError, match="gate_balance is for the softmax"):
        MoERegressor(2, gate="mlp", gate_balance=1.0, max_iter=2).fit(X, y)
    with pytest.raises(ValueError, match="gate_balance"):
        MoERegressor(2, gate_balance=-1.0).fit(X, y)
