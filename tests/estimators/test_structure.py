"""Gate and expert features, and the documented order of the experts."""

import numpy as np
import pandas as pd
import pytest

from moekit import MoERegressor
from moekit.datasets import make_moe_regression


def _concomitant_problem(n=6000, seed=0):
    """Experts on x, the gate on a separate variable z (flexmix's concomitant model)."""
    rng = np.random.default_rng(seed)
    x, z = rng.normal(size=n), rng.normal(size=n)
    g1 = 1.0 / (1.0 + np.exp(-3.0 * z))
    first = rng.random(n) < g1
    y = np.where(first, 1.0 + 2.0 * x, -1.0 - 1.0 * x) + 0.2 * rng.normal(size=n)
    return np.column_stack([x, z]), y


def test_gate_on_other_features_than_the_experts():
    X, y = _concomitant_problem()
    m = MoERegressor(2, expert_features=[0], gate_features=[1], random_state=0).fit(X, y)
    # experts ordered by mean prediction: the falling line (mean -1) comes first
    np.testing.assert_allclose(m.intercept_, [-1.0, 1.0], atol=0.03)
    np.testing.assert_allclose(m.coef_, [[-1.0, 0.0], [2.0, 0.0]], atol=0.03)
    np.testing.assert_allclose(m.noise_std_, 0.2, rtol=0.05)
    # the gate sees z only: its slope difference recovers 3, its x column is zero
    assert m.gate_coef_[:, 0].tolist() == [0.0, 0.0]
    assert m.gate_coef_[1, 1] - m.gate_coef_[0, 1] == pytest.approx(3.0, rel=0.1)
    both = MoERegressor(2, random_state=0).fit(X, y)
    # one slope fewer per expert (2) and one fewer in the gate (1)
    assert m.n_parameters() == both.n_parameters() - 3
    assert m.bic(X, y) < both.bic(X, y)


def test_feature_selection_by_name_and_mask_and_errors():
    X, y = _concomitant_problem(2000)
    frame = pd.DataFrame(X, columns=["x", "z"])
    by_name = MoERegressor(2, expert_features=["x"], gate_features=["z"], random_state=0)
    by_mask = MoERegressor(
        2, expert_features=[True, False], gate_features=[False, True], random_state=0
    )
    np.testing.assert_allclose(by_name.fit(frame, y).predict(frame), by_mask.fit(X, y).predict(X))
    with pytest.raises(ValueError, match="gate_features: unknown columns"):
        MoERegressor(2, gate_features=["w"]).fit(frame, y)
    with pytest.raises(ValueError, match=r"expert_features: expected column indices in \[0, 2\)"):
        MoERegressor(2, expert_features=[5]).fit(X, y)
    with pytest.raises(ValueError, match="gate_features: column names need X to be a DataFrame"):
        MoERegressor(2, gate_features=["z"]).fit(X, y)
    with pytest.raises(ValueError, match="boolean mask needs 2 entries"):
        MoERegressor(2, gate_features=[True]).fit(X, y)


def test_save_and_load_keep_the_feature_selection(tmp_path):
    from moekit import load

    X, y = _concomitant_problem(1000)
    m = MoERegressor(2, expert_features=[0], gate_features=[1], random_state=0).fit(X, y)
    m.save(tmp_path / "m.moe")
    back = load(tmp_path / "m.moe")
    np.testing.assert_array_equal(back.predict(X), m.predict(X))
    assert back.get_params()["gate_features"] == [1]


def test_expert_order_is_stable_across_starts():
    """Experts are numbered by their mean prediction, whatever start found them."""
    X, y, _ = make_moe_regression(4000, n_features=2, random_state=3, noise=0.2)
    fits = [MoERegressor(3, init="random", random_state=s, n_init=3).fit(X, y) for s in range(3)]
    means = [f.predict_distribution(X).means.mean(0) for f in fits]
    for f, mu in zip(fits, means, strict=True):
        assert np.all(np.diff(mu) > 0)
        np.testing.assert_allclose(f.coef_, fits[0].coef_, atol=0.02)
        np.testing.assert_allclose(f.gate_weights(X[:50]), fits[0].gate_weights(X[:50]), atol=0.02)
