"""Hierarchical MoE: depth 1 is the flat model, deeper trees fit nested regions, and the
estimator contract (monotone EM, nesting, files, summary, scikit-learn checks, errors)."""

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.estimator_checks import parametrize_with_checks

from moekit import (
    HierarchicalMoEClassifier,
    HierarchicalMoERegressor,
    MoEClassifier,
    MoERegressor,
    load,
)
from moekit.datasets import make_moe_regression
from moekit.plotting import plot_hme_tree

# Rounding of a mean over n float64 terms; EM's objective must not drop by more.
SLACK = 1e-10

# the four regimes' lines y = a + b0 x0 + b1 x1, one per region
NESTED_COEF = np.array([[1.0, 2.0, 1.0], [-1.0, 0.0, -2.0], [0.0, -2.0, 2.0], [2.0, 1.0, -1.0]])
NESTED_NOISE = 0.25


def nested_regimes(n, seed, cut=0.5):
    """Four linear regimes in nested regions of the square [-1, 1]^2.

    The sign of x0 splits the square; the left half is split again at x1 = -cut and
    the right half at x1 = +cut. The cuts do not line up, so no flat softmax gate
    draws these regions exactly (its boundaries between the four would have to meet
    as one arrangement of lines), while a tree of depth 2 does.
    """
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (n, 2))
    right = X[:, 0] >= 0
    upper = X[:, 1] >= np.where(right, cut, -cut)
    k = 2 * right + upper
    c = NESTED_COEF[k]
    y = c[:, 0] + (c[:, 1:] * X).sum(1) + NESTED_NOISE * rng.normal(size=n)
    return X, y


def _monotone(history):
    h = np.asarray(history)
    assert len(h) >= 2
    assert np.diff(h).min() >= -SLACK, f"objective decreased by {-np.diff(h).min():.3g}"


@pytest.fixture(scope="module")
def nested():
    X, y = nested_regimes(1000, 0)
    Xt, yt = nested_regimes(5000, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hme = HierarchicalMoERegressor(2, random_state=0).fit(X, y)
    return hme, X, y, Xt, yt


# ---------------------------------------------------------------------------- depth 1
@pytest.mark.parametrize("init", ["kmeans", "auto"])
def test_depth_one_is_the_flat_model(init):
    X, y, _ = make_moe_regression(500, n_features=2, n_experts=3, random_state=1)
    kw = {"init": init, "n_init": 3, "random_state": 0, "tol": 1e-10, "max_iter": 500}
    flat = MoERegressor(3, **kw).fit(X, y)
    tree = HierarchicalMoERegressor(1, branching=3, **kw).fit(X, y)
    assert tree.n_experts == 3
    assert tree.log_likelihood_ == pytest.approx(flat.log_likelihood_, abs=1e-10)
    assert tree.n_iter_ == flat.n_iter_
    np.testing.assert_allclose(tree.predict(X), flat.predict(X), atol=1e-9)
    np.testing.assert_allclose(tree.gate_weights(X), flat.gate_weights(X), atol=1e-9)


def test_depth_one_classifier_is_the_flat_classifier():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 2))
    y = (X[:, 0] * X[:, 1] > 0).astype(int)
    kw = {"n_init": 2, "random_state": 0, "tol": 1e-10, "max_iter": 300}
    flat = MoEClassifier(2, **kw).fit(X, y)
    tree = HierarchicalMoEClassifier(1, branching=2, **kw).fit(X, y)
    assert tree.log_likelihood_ == pytest.approx(flat.log_likelihood_, abs=1e-10)
    np.testing.assert_allclose(tree.predict_proba(X), flat.predict_proba(X), atol=1e-9)


# ---------------------------------------------------------------------------- EM
@pytest.mark.parametrize(("depth", "branching"), [(2, 2), (2, 3), (3, 2)])
@pytest.mark.parametrize("expert", ["linear", "poisson"])
def test_objective_never_decreases(depth, branching, expert):
    X, y, _ = make_moe_regression(600, n_features=2, n_experts=4, random_state=3)
    if expert == "poisson":
        rng = np.random.default_rng(0)
        y = rng.poisson(np.exp(0.5 + 0.8 * np.sign(X[:, 0]) * X[:, 1]))
    m = HierarchicalMoERegressor(depth, branching=branching, expert=expert, init="random",
                                 n_init=2, max_iter=40, tol=0.0, random_state=0)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tol=0 runs every iteration; small leaves collapse
        m.fit(X, y)
    assert m.n_iter_ == 40
    _monotone(m.log_likelihood_history_)


def test_depth_two_fits_nested_regions_as_well_as_four_flat_experts(nested):
    """Held out: far above two flat experts, level with four (tolerance 0.02 nats per row),
    and within 0.03 nats of the true model's log-likelihood."""
    hme, X, y, Xt, yt = nested
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flat2 = MoERegressor(2, random_state=0).fit(X, y)
        flat4 = MoERegressor(4, random_state=0).fit(X, y)
    ll = hme.log_likelihood(Xt, yt)
    assert ll > flat2.log_likelihood(Xt, yt) + 0.5
    assert ll >= flat4.log_likelihood(Xt, yt) - 0.02
    truth = -0.5 * np.log(2 * np.pi * np.e * NESTED_NOISE**2)  # expected log-density
    assert ll >= truth - 0.03


def test_depth_two_recovers_the_four_regimes(nested):
    """At the centre of every region one leaf holds the gate and predicts the true line."""
    hme, *_ = nested
    centres = np.array([[-0.5, -0.75], [-0.5, 0.25], [0.5, -0.25], [0.5, 0.75]])  # regions 0-3
    d = hme.predict_distribution(centres)
    leaf = d.weights.argmax(1)
    assert sorted(leaf) == [0, 1, 2, 3]  # four regions, four different leaves
    assert d.weights.max(1).min() > 0.9
    truth = NESTED_COEF[:, 0] + (NESTED_COEF[:, 1:] * centres).sum(1)
    # a region holds about 125 to 375 of the 1000 rows: standard errors of about 0.02
    np.testing.assert_allclose(d.means[np.arange(4), leaf], truth, atol=0.1)
    np.testing.assert_allclose(hme.noise_std_, NESTED_NOISE, atol=0.03)


def test_node_weights_multiply_down_the_tree(nested):
    hme, X, *_ = nested
    levels = hme.node_weights(X[:50])
    assert [w.shape for w in levels] == [(50, 2), (50, 4)]
    np.testing.assert_allclose(levels[1].reshape(50, 2, 2).sum(2), levels[0], atol=1e-12)
    np.testing.assert_allclose(levels[-1], hme.gate_weights(X[:50]))
    assert hme.gate_coef_.shape == (3, 2, 2) and hme.gate_intercept_.shape == (3, 2)
    d = hme.predict_distribution(X[:50])
    assert d.weights.shape == (50, 4)
    np.testing.assert_allclose(d.mean(), hme.predict(X[:50]))
    r = hme.responsibilities(X[:50], nested[2][:50])
    np.testing.assert_allclose(r.sum(1), 1.0)
    assert np.isfinite(hme.bic(X, nested[2])) and np.isfinite(hme.aic(X, nested[2]))


# ---------------------------------------------------------------------------- nesting
def test_deeper_tree_started_from_shallower_fit_is_never_worse():
    X, y = nested_regimes(600, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flat = MoERegressor(2, random_state=0, n_init=2).fit(X, y)
        d2 = HierarchicalMoERegressor(2, random_state=5, n_init=1, init="kmeans")
        d2.fit(X, y, start_from=flat)
        d3 = HierarchicalMoERegressor(3, random_state=5, n_init=1, init="kmeans")
        d3.fit(X, y, start_from=d2)
        d3_from_flat = HierarchicalMoERegressor(3, random_state=5, n_init=1, init="random")
        d3_from_flat.fit(X, y, start_from=flat)
    assert d2.log_likelihood(X, y) >= flat.log_likelihood(X, y) - 1e-9
    assert d3.log_likelihood(X, y) >= d2.log_likelihood(X, y) - 1e-9
    assert d3_from_flat.log_likelihood(X, y) >= flat.log_likelihood(X, y) - 1e-9


def test_start_from_must_be_a_shallower_tree_or_the_flat_model_of_the_same_data():
    X, y = nested_regimes(300, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flat3 = MoERegressor(3, random_state=0, n_init=1).fit(X, y)
        d2 = HierarchicalMoERegressor(2, random_state=0, n_init=1).fit(X, y)
    with pytest.raises(ValueError, match="n_experts=branching=2 and the softmax gate"):
        HierarchicalMoERegressor(2, n_init=1).fit(X, y, start_from=flat3)
    with pytest.raises(ValueError, match="branching=2 and depth <= 1"):
        HierarchicalMoERegressor(1, n_init=1).fit(X, y, start_from=d2)
    with pytest.raises(ValueError, match="fitted on the same X and y"):
        HierarchicalMoERegressor(3, n_init=1).fit(X[:200], y[:200], start_from=d2)
    before = dict(d2.__dict__)
    with pytest.raises(ValueError, match="expected a fitted HierarchicalMoERegressor"):
        d2.fit(X, y, start_from=object())
    assert d2.__dict__.keys() == before.keys()  # a failed fit leaves the estimator as it was
    assert all(d2.__dict__[k] is before[k] for k in before)


def test_warm_start_with_another_shape_of_the_same_size_starts_afresh():
    X, y = nested_regimes(300, 5)
    m = HierarchicalMoERegressor(2, branching=2, n_init=1, warm_start=True, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.fit(X, y)
        m.set_params(depth=1, branching=4).fit(X, y)  # 4 leaves either way
    assert m.gate_coef_.shape == (1, 4, 2)


# ---------------------------------------------------------------------------- contract
def test_model_file_round_trip_and_checks(tmp_path, nested):
    hme, X, y, *_ = nested
    hme.save(tmp_path / "hme.moe")
    back = load(tmp_path / "hme.moe")
    assert type(back) is HierarchicalMoERegressor and back.get_params() == hme.get_params()
    np.testing.assert_array_equal(back.predict(X), hme.predict(X))
    for a, b in zip(back.node_weights(X), hme.node_weights(X), strict=True):
        np.testing.assert_array_equal(a, b)
    assert back.log_likelihood(X, y) == hme.log_likelihood(X, y)
    # a file whose settings say another tree is refused before its tensors are read
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tmp_path / "hme.moe"), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    meta["params"] = json.dumps({**json.loads(meta["params"]), "depth": 1, "branching": 4})
    save_file(tensors, str(tmp_path / "bad.moe"), metadata=meta)
    with pytest.raises(ValueError, match=r"gate\.coef"):
        load(tmp_path / "bad.moe")


def test_summary_reports_every_node(nested):
    hme, X, y, *_ = nested
    s = hme.summary()
    gate_rows = s.table[s.table["block"].str.startswith("gate")]
    assert len(gate_rows) == 3 * 3  # three nodes, one child against the other, 3 coefficients
    assert set(gate_rows["block"]) == {"gate root: child 1 vs 0", "gate 0: child 1 vs 0",
                                       "gate 1: child 1 vs 0"}  # fmt: skip
    assert s.log_likelihood == pytest.approx(hme.log_likelihood(X, y) * len(y))
    assert np.isfinite(s.table["std_error"]).sum() >= len(s.table) - 3  # sharp gates: few NaN
    with pytest.raises(ValueError, match="gate_reference"):
        hme.summary(gate_reference=2)


def test_plot_of_the_tree(tmp_path, nested):
    hme, X, *_ = nested
    fig = plot_hme_tree(hme, X, feature=1, title="HME")
    assert len(fig.axes) == 2
    fig.savefig(tmp_path / "tree.png")
    assert (tmp_path / "tree.png").stat().st_size > 0
    with pytest.raises(ValueError, match="feature must be a column"):
        plot_hme_tree(hme, X, feature=2)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"depth": 0}, r"'depth' parameter of HierarchicalMoERegressor must be an int in the "
                       r"range \[1, inf\)"),
        ({"branching": 1}, r"'branching' parameter .* must be an int in the range \[2, inf\)"),
        ({"gate": "constant"}, r"'gate' parameter .* must be"),
        ({"depth": 2.0}, r"'depth' parameter"),
    ],
)  # fmt: skip
def test_bad_arguments_are_named(params, message):
    X, y = nested_regimes(100, 0)
    with pytest.raises(ValueError, match=message):
        HierarchicalMoERegressor(**params).fit(X, y)


def test_more_leaves_than_rows_is_refused():
    X, y = nested_regimes(20, 0)
    with pytest.raises(ValueError, match=r"n_samples >= n_experts .* n_experts = 32"):
        HierarchicalMoERegressor(5).fit(X, y)


# scikit-learn conformance, as tests/test_sklearn_api.py checks the flat estimators
# (about 8 s for each estimator; the classifier's run with -m slow)
@parametrize_with_checks([HierarchicalMoERegressor(2, n_init=2, max_iter=30, random_state=0)])
def test_sklearn_compatible(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


# weighted and repeated rows take the same EM path (test below) but sum in another
# order: on this check's three-class data the penalised logistic leaves under a tree
# gate drift apart along a flat direction, 1e-5 in probabilities after 30 iterations
# (3e-6 at convergence), over the check's 1e-7
CLASSIFIER_FAILS = {
    "check_sample_weight_equivalence_on_dense_data": "round-off drift on a flat optimum"
}


@pytest.mark.slow
@parametrize_with_checks(
    [HierarchicalMoEClassifier(2, n_init=2, max_iter=30, random_state=0)],
    expected_failed_checks=lambda est: CLASSIFIER_FAILS,
)
def test_sklearn_compatible_classifier(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


def test_classifier_weights_take_the_repeated_rows_em_path():
    """Integer weights and the rows repeated: the same starts and EM steps (to
    round-off) for the hierarchical classifier."""
    from sklearn.datasets import make_classification

    X, y = make_classification(120, 4, n_informative=3, n_redundant=0, n_classes=3,
                               random_state=0)  # fmt: skip
    w = np.random.default_rng(0).integers(0, 3, len(y))
    rep = np.repeat(np.arange(len(y)), w)
    opts = dict(max_iter=10, n_init=1, tol=1e-14, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = HierarchicalMoEClassifier(**opts).fit(X, y, sample_weight=w)
        b = HierarchicalMoEClassifier(**opts).fit(X[rep], y[rep])
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), atol=1e-9)
    np.testing.assert_allclose(a.log_likelihood_history_, b.log_likelihood_history_, rtol=1e-12)
