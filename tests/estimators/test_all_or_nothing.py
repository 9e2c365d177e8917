"""A fit or refit that fails at any point leaves the estimator exactly as it was."""

import pickle
import warnings

import numpy as np
import pytest

from moekit import MoEClassifier, MoERegressor
from moekit.datasets import make_moe_regression
from moekit.experts.gaussian import GaussianExperts


def _snapshot(model, X):
    """Everything observable: the pickled state (fitted attributes) and the predictions."""
    return pickle.dumps(model), model.predict(X).copy()


def _assert_unchanged(model, before, X):
    state, pred = before
    assert pickle.dumps(model) == state
    np.testing.assert_array_equal(model.predict(X), pred)


@pytest.fixture
def fitted():
    X, y, _ = make_moe_regression(300, n_features=2, n_experts=2, random_state=0)
    return MoERegressor(2, random_state=0, n_init=2).fit(X, y), X, y


def test_bad_options_leave_the_fit_as_it_was(fitted):
    m, X, y = fitted
    before = _snapshot(m, X)
    m.set_params(expert_options={"hidden": 4})  # only for expert='mlp'
    with pytest.raises(ValueError, match="expert_options are for expert='mlp'"):
        m.fit(X, y)
    m.set_params(expert_options=None)
    _assert_unchanged(m, before, X)


def test_non_finite_data_leaves_the_fit_as_it_was(fitted):
    m, X, y = fitted
    before = _snapshot(m, X)
    Xbad = np.c_[X[:, :1], X[:, 1]]
    Xbad[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        m.fit(Xbad, y)
    with pytest.raises(ValueError, match=r"NaN|infinity"):
        m.fit(X, np.where(np.arange(len(y)) == 5, np.inf, y))
    # a different number of features is not half-taken either
    with pytest.raises(ValueError):
        m.fit(np.c_[X, X[:, :1]][:1], y[:1])
    _assert_unchanged(m, before, X)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_error_inside_em_leaves_the_fit_as_it_was(fitted, monkeypatch, error):
    m, X, _ = fitted
    before = _snapshot(m, X)
    calls = {"n": 0}
    original = GaussianExperts.m_step

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:  # fail in the middle of EM, not at its first step
            raise error("interrupted")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GaussianExperts, "m_step", failing)
    X2, y2, _ = make_moe_regression(400, n_features=2, n_experts=3, random_state=7)
    with pytest.raises(error):
        m.set_params(n_experts=3).fit(X2, y2)
    m.set_params(n_experts=2)
    _assert_unchanged(m, before, X)


def test_a_failed_first_fit_leaves_no_fitted_attribute():
    X, y, _ = make_moe_regression(100, n_features=2, n_experts=2, random_state=0)
    m = MoERegressor(2, expert_options={"hidden": 3})
    with pytest.raises(ValueError):
        m.fit(X, y)
    assert not [k for k in vars(m) if k.endswith("_") and not k.startswith("__")]
    assert not hasattr(m, "n_features_in_") and not hasattr(m, "_params")


def test_warm_start_with_other_features_is_a_clear_error(fitted):
    m, X, y = fitted
    m.set_params(warm_start=True)
    before = _snapshot(m, X)
    with pytest.raises(ValueError, match="X has 3 features, but MoERegressor is expecting 2"):
        m.fit(np.c_[X, X[:, 0]], y)
    _assert_unchanged(m, before, X)


def test_warm_start_keeps_the_scaling_of_the_fit_it_continues():
    # warm start continues in the units of the first fit, even when y's spread changes
    X, y, _ = make_moe_regression(500, n_features=2, n_experts=2, random_state=1)
    m = MoERegressor(2, random_state=0, warm_start=True, n_init=2).fit(X, y)
    scale = m._y_scale.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.set_params(max_iter=3).fit(X, 3 * y)
    np.testing.assert_array_equal(m._y_scale, scale)


def test_classifier_warm_start_refuses_unseen_classes():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 2))
    y = (X[:, 0] > 0).astype(int)
    # min_share=0 keeps both experts, so that the second fit is a warm start (one
    # with other experts than the first fit's would start afresh)
    m = MoEClassifier(2, random_state=0, warm_start=True, n_init=1, min_share=0.0).fit(X, y)
    assert m._n_experts_fitted == 2
    before = pickle.dumps(m)
    with pytest.raises(ValueError, match="labels not seen in fit"):
        m.fit(X, np.where(X[:, 1] > 1, 2, y))
    assert pickle.dumps(m) == before
