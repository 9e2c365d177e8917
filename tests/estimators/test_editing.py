"""Editing a fitted mixture: add, remove and freeze experts, refit parts."""

import warnings

import numpy as np
import pytest

from moekit import HierarchicalMoERegressor, MoEClassifier, MoERegressor, load
from moekit.datasets import make_moe_regression


@pytest.fixture(scope="module")
def data():
    X, y, _ = make_moe_regression(1500, n_features=2, n_experts=3, random_state=0)
    return X, y


def _fit(K, X, y, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MoERegressor(K, random_state=0, **kw).fit(X, y)


def test_adding_an_expert_where_too_few_raises_the_likelihood(data):
    X, y = data
    two, three = _fit(2, X, y), _fit(3, X, y)
    grown = _fit(2, X, y).add_expert(X, y)
    assert grown.n_experts == 3 and grown.coef_.shape[0] == 3
    # the data hold three experts: the added one finds the third
    assert grown.log_likelihood(X, y) > two.log_likelihood(X, y) + 0.2
    assert grown.log_likelihood(X, y) >= three.log_likelihood(X, y) - 1e-3


def test_adding_an_expert_never_lowers_the_likelihood(data):
    X, y = data
    three = _fit(3, X, y)
    before = three.log_likelihood(X, y)
    assert three.add_expert(X, y).log_likelihood(X, y) >= before - 1e-9


def test_removing_an_expert_gives_a_valid_refitted_model(data):
    X, y = data
    m = _fit(3, X, y)
    kept = np.delete(m.coef_, 1, axis=0)
    m.remove_expert(1)
    assert m.n_experts == 2 and m.coef_.shape[0] == 2
    np.testing.assert_allclose(m.gate_weights(X).sum(1), 1.0)
    assert np.isfinite(m.log_likelihood(X, y)) and np.isfinite(m.predict(X)).all()
    # the refit moved the two remaining experts from where they were
    assert m.coef_.shape == kept.shape
    assert (
        m.log_likelihood(X, y) >= _fit(2, X, y, n_init=1, init="kmeans").log_likelihood(X, y) - 0.05
    )


def test_removing_with_a_constant_gate_renormalises_its_weights(data):
    X, y = data
    m = _fit(3, X, y, gate="constant", max_iter=0)
    m.remove_expert(0, X, y)
    np.testing.assert_allclose(m.gate_weights(X[:5]).sum(1), 1.0)


def test_frozen_experts_stay_put_and_the_likelihood_never_drops(data):
    X, y = data
    m = _fit(3, X, y, max_iter=3)  # stopped early: a refit has room to climb
    before, coef, std = m.log_likelihood(X, y), m.coef_.copy(), m.noise_std_.copy()
    m.freeze_experts([0, 2]).refit(X, y)
    assert m.frozen_experts_ == (0, 2)
    np.testing.assert_array_equal(m.coef_[[0, 2]], coef[[0, 2]])
    np.testing.assert_array_equal(m.noise_std_[[0, 2]], std[[0, 2]])
    assert not np.allclose(m.coef_[1], coef[1])
    assert m.log_likelihood(X, y) >= before - 1e-12


def test_gate_refit_keeps_every_expert_and_never_lowers_the_likelihood(data):
    X, y = data
    m = _fit(3, X, y, max_iter=3)
    before, coef, gate = m.log_likelihood(X, y), m.coef_.copy(), m.gate_coef_.copy()
    m.refit(X, y, part="gate")
    np.testing.assert_array_equal(m.coef_, coef)
    assert not np.allclose(m.gate_coef_, gate)
    assert m.log_likelihood(X, y) >= before - 1e-12
    assert m.frozen_experts_ == ()  # part="gate" holds the experts for this refit only


def test_experts_refit_keeps_the_gate(data):
    X, y = data
    m = _fit(3, X, y, max_iter=3)
    before, gate = m.log_likelihood(X, y), m.gate_coef_.copy()
    m.refit(X, y, part="experts")
    np.testing.assert_allclose(m.gate_coef_, gate)
    assert m.log_likelihood(X, y) >= before - 1e-12


def test_frozen_marks_follow_their_experts_through_edits(data):
    X, y = data
    m = _fit(3, X, y).freeze_experts(2)
    frozen = m.coef_[2].copy()
    m.remove_expert(0)
    assert m.frozen_experts_ == (1,)
    np.testing.assert_array_equal(m.coef_[1], frozen)
    m.add_expert(X, y)
    k = m.frozen_experts_[0]
    np.testing.assert_array_equal(m.coef_[k], frozen)
    m.unfreeze_experts()
    assert m.frozen_experts_ == ()


def test_edits_round_trip_through_model_files(data, tmp_path):
    X, y = data
    m = _fit(2, X, y).add_expert(X, y).freeze_experts([1])
    m.save(tmp_path / "m.moe")
    back = load(tmp_path / "m.moe")
    assert back.frozen_experts_ == (1,) and back.n_experts == 3
    np.testing.assert_allclose(back.predict(X), m.predict(X))
    with pytest.raises(ValueError, match="no longer holds the data"):
        back.remove_expert(0)
    back.remove_expert(0, X, y)
    assert back.frozen_experts_ == (0,)


def test_classifier_edits(data):
    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = MoEClassifier(2, random_state=0, max_iter=5).fit(X, y)
        # the classifier's EM maximises a penalised likelihood (its default alpha):
        # a gate refit never lowers that objective
        before = m.log_likelihood_history_[-1]
        m.refit(X, y, part="gate")
        assert m.log_likelihood_history_[0] == pytest.approx(before, abs=1e-9)
        assert m.log_likelihood_history_[-1] >= before - 1e-12
        m.add_expert(X, y)
    assert m.n_experts == 3 and len(m.expert_sizes_) == 3
    np.testing.assert_allclose(m.predict_proba(X).sum(1), 1.0)
    assert m.score(X, y) > 0.9


def test_a_failed_edit_leaves_the_model_as_it_was(data):
    X, y = data
    m = _fit(3, X, y)
    state, coef, pred = dict(m.__dict__), m.coef_.copy(), m.predict(X)
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError):
        m.add_expert(bad, y)
    with pytest.raises(ValueError):
        m.refit(X[:, :1], y)
    assert m.n_experts == 3 and m.__dict__.keys() == state.keys()
    assert all(m.__dict__[k] is v for k, v in state.items())
    np.testing.assert_array_equal(m.coef_, coef)
    np.testing.assert_array_equal(m.predict(X), pred)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, X, y: m.freeze_experts([5]), "does not exist"),
        (lambda m, X, y: m.freeze_experts(["a"]), "integer"),
        (lambda m, X, y: m.refit(X, y, part="tail"), "part must be"),
        (lambda m, X, y: m.freeze_experts([0, 1, 2]).refit(X, y, part="experts"), "every expert"),
    ],
)
def test_bad_edits_are_named(data, call, match):
    X, y = data
    with pytest.raises(ValueError, match=match):
        # min_share=0: the three experts the edits name stay, whatever two iterations do
        call(_fit(3, X, y, max_iter=2, min_share=0.0), X, y)


def test_tree_leaves_cannot_be_added_or_removed(data):
    X, y = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = HierarchicalMoERegressor(depth=2, branching=2, random_state=0, max_iter=3).fit(X, y)
    with pytest.raises(ValueError, match="depth and branching"):
        m.add_expert(X, y)
    with pytest.raises(ValueError, match="depth and branching"):
        m.remove_expert(0)
    m.freeze_experts([0]).refit(X, y)  # freezing a leaf is fine


def test_bayesian_edits_keep_the_elbo_climbing(data):
    from moekit import BayesianMoERegressor

    X, y = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = BayesianMoERegressor(3, noise="per_expert", random_state=0, max_iter=5).fit(X, y)
        before, coef = m.elbo_, m.coef_[0].copy()
        m.freeze_experts(0).refit(X, y)
        np.testing.assert_array_equal(m.coef_[m.frozen_experts_[0]], coef)
        assert m.elbo_ >= before - 1e-12
        assert np.diff(m.elbo_history_).min() >= -1e-10
        shared = BayesianMoERegressor(2, random_state=0, max_iter=5).fit(X, y)
    with pytest.raises(ValueError, match="share hyper-parameters"):
        shared.freeze_experts(0)
