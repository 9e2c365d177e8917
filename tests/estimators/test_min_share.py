"""Experts below ``min_share`` of the rows are removed during EM (flexmix's minprior)."""

import warnings

import numpy as np
import pytest

from moekit import HierarchicalMoERegressor, MoEClassifier, MoERegressor, select_n_experts
from moekit.datasets import load_mcycle
from moekit.estimators._nesting import SmallExpertsRemovedWarning


@pytest.fixture(scope="module")
def spiky():
    """Two noisy lines, and five rows of exactly one value: a spike an expert of
    vanishing variance can sit on, a spurious maximum of the likelihood."""
    rng = np.random.default_rng(3)
    X = rng.uniform(-1, 1, (300, 1))
    y = np.where(X[:, 0] < 0, -2 * X[:, 0], 3 * X[:, 0]) + 0.3 * rng.normal(size=300)
    X = np.vstack([X, np.full((5, 1), 0.5)])
    y = np.concatenate([y, np.full(5, 1.5)])
    return X, y


def _fit(X, y, K=3, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MoERegressor(K, random_state=0, **kw).fit(X, y)


def test_without_min_share_an_expert_sits_on_the_spike(spiky):
    X, y = spiky
    m = _fit(X, y, min_share=0.0, reg_var=1e-8)
    assert m.n_experts_removed_ == 0 and len(m.expert_sizes_) == 3
    # the premise of the test: one expert holds about the five spike rows, with a
    # noise scale far below the data's
    assert m.expert_sizes_.min() < 0.05 * len(y)
    assert m.noise_std_.min() < 0.1 * y.std()


def test_the_default_removes_the_spike_expert_and_says_so(spiky):
    X, y = spiky
    with pytest.warns(SmallExpertsRemovedWarning, match=r"1 of 3 experts .* min_share=0\.05"):
        m = MoERegressor(3, random_state=0).fit(X, y)
    assert m.n_experts_removed_ == 1
    assert m.expert_sizes_.shape == (2,) and m.gate_weights(X).shape == (len(y), 2)
    assert (m.expert_sizes_ >= 0.05 * len(y)).all()
    assert m.noise_std_.min() > 0.1 * y.std()
    np.testing.assert_allclose(m.expert_sizes_.sum(), len(y))
    # the continued fit is EM's: its objective never decreases
    assert np.all(np.diff(m.log_likelihood_history_) >= -1e-9)
    # every expert kept: the same model as a fit asked for two experts
    two = _fit(X, y, K=2)
    assert m.log_likelihood_ == pytest.approx(two.log_likelihood_, abs=1e-3)


def test_n_iter_counts_the_iterations_before_the_removal(spiky, monkeypatch):
    import moekit.estimators._nesting as nesting

    X, y = spiky
    runs = []  # the iterations of the full fit and of each refit after a removal
    real = nesting.prune_small_experts

    def spy(model, data, result, min_share, rerun):
        runs.append(result.n_iter)

        def counted(small, start):
            out = rerun(small, start)
            runs.append(out.n_iter)
            return out

        return real(model, data, result, min_share, counted)

    monkeypatch.setattr(nesting, "prune_small_experts", spy)
    m = _fit(X, y)
    assert m.n_experts_removed_ == 1 and len(runs) == 2
    # the premise: the fit ran longer than the refit that follows the removal
    assert runs[0] > 1
    assert m.n_iter_ == sum(runs)
    # the history is the returned model's run: the refit's
    assert len(m.log_likelihood_history_) == runs[-1] + 1


def test_min_share_applies_to_the_classifier():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 2))
    y = (X[:, 0] > 0).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = MoEClassifier(3, min_share=0.3, n_init=2, random_state=0).fit(X, y)
    assert m.n_experts_removed_ >= 1
    assert (m.expert_sizes_ >= 0.3 * len(y)).all()
    assert m.predict_proba(X).shape == (200, 2)


@pytest.mark.parametrize("bad", [-0.1, 1.0, "a"])
def test_bad_min_share_names_the_argument(bad, spiky):
    X, y = spiky
    with pytest.raises(ValueError, match="'min_share' parameter of MoERegressor"):
        MoERegressor(2, min_share=bad).fit(X, y)


def test_a_tree_keeps_its_leaves():
    assert "min_share" not in HierarchicalMoERegressor().get_params()


def test_model_choice_never_picks_a_fit_that_shed_experts():
    """On 106 rows of mcycle K = 5 used to win BIC with an expert on four rows of
    -5.4 g (sd 0.047); with min_share that fit sheds it and is not chosen."""
    X, y = load_mcycle()[:2]
    X = np.asarray(X, dtype=float).reshape(len(y), -1)
    rows = np.random.default_rng(0).permutation(len(y))[:106]
    best, table = select_n_experts(MoERegressor(random_state=0), X[rows], y[rows], range(1, 6))
    chosen = table[table["best"]].iloc[0]
    assert chosen["n_experts_fitted"] == chosen["n_experts"]
    assert best.noise_std_.min() >= 0.01 * np.std(y[rows]) * (1 - 1e-9)
    assert (best.expert_sizes_ >= 0.05 * 106).all()
    assert int(chosen["n_experts"]) in (3, 4)


def test_more_experts_than_min_share_allows_is_refused(spiky):
    X, y = spiky
    with pytest.raises(ValueError, match=r"n_experts=40 with min_share=0.05: at most 20 experts"):
        MoERegressor(40).fit(X, y)
    MoERegressor(40, min_share=0.0, n_init=1, max_iter=2).fit(X, y)  # allowed without it
