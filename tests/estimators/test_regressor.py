"""MoERegressor against the truth on data drawn from known mixtures of experts."""

import itertools
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.exceptions import NotFittedError
from sklearn.tree import DecisionTreeRegressor

from moekit import MixturePrediction, MoERegressor
from moekit._core.validation import InvalidParameterError
from moekit.datasets import make_moe_regression, make_moe_truth
from moekit.estimators._base import CollapsedExpertWarning


@pytest.fixture(scope="module")
def moe_problem():
    """K=3 softmax-gated linear experts in d=5, n=30,000 train and 30,000 held out."""
    X, y, truth = make_moe_regression(30_000, n_features=5, n_experts=3, random_state=0)
    X_test, y_test = truth.sample(30_000, random_state=1)
    return X, y, X_test, y_test, truth


def test_heldout_loglik_within_002_nats_of_truth(moe_problem):
    X, y, X_test, y_test, truth = moe_problem
    m = MoERegressor(n_experts=3, n_init=3, random_state=0).fit(X, y)
    gap = truth.log_likelihood(X_test, y_test) - m.log_likelihood(X_test, y_test)
    assert abs(gap) < 0.02, gap
    assert m.converged_


def test_bic_picks_the_true_number_of_experts(moe_problem):
    X, y, *_ = moe_problem
    X, y = X[:10_000], y[:10_000]
    bic = {
        K: MoERegressor(n_experts=K, n_init=2, random_state=0).fit(X, y).bic(X, y)
        for K in (1, 3, 6)
    }
    assert min(bic, key=bic.get) == 3, bic


def _best_permutation(est: np.ndarray, true: np.ndarray) -> tuple[int, ...]:
    K = len(true)
    return min(itertools.permutations(range(K)), key=lambda p: np.abs(est[list(p)] - true).sum())


def test_constant_gate_recovers_a_mixture_of_regressions():
    truth = make_moe_truth(2, 3, gate="constant", coef_scale=3.0, noise=0.3, random_state=4)
    X, y = truth.sample(20_000, random_state=0)
    m = MoERegressor(3, gate="constant", n_init=3, random_state=0).fit(X, y)
    # expert k's mean at the origin and along each axis identifies its line
    grid = np.vstack([np.zeros(2), np.eye(2)])
    means = m.predict_distribution(grid).means  # (3, K)
    true_means = truth.expert_means(grid)
    perm = list(_best_permutation(means.T, true_means.T))
    np.testing.assert_allclose(means[:, perm], true_means, atol=0.05)
    weights = m.gate_weights(grid[:1])[0, perm]
    np.testing.assert_allclose(weights, np.exp(truth.gate_intercept), atol=0.02)
    stds = m.predict_distribution(grid[:1]).stds[0, perm]
    np.testing.assert_allclose(stds, truth.noise_std, rtol=0.05)
    # the constant gate gives the same weights everywhere
    assert (
        np.ptp(m.gate_weights(np.random.default_rng(0).normal(size=(50, 2))), axis=0).max() < 1e-12
    )


def test_predictions_are_consistent_with_the_mixture(moe_problem):
    X, y, X_test, y_test, _ = moe_problem
    m = MoERegressor(3, random_state=0).fit(X[:3000], y[:3000])
    d = m.predict_distribution(X_test[:200])
    assert isinstance(d, MixturePrediction)
    np.testing.assert_allclose(d.mean(), m.predict(X_test[:200]), atol=1e-10)
    np.testing.assert_allclose(d.weights, m.gate_weights(X_test[:200]), atol=1e-12)
    np.testing.assert_allclose(m.gate_weights(X_test).sum(1), 1.0, atol=1e-12)
    r = m.responsibilities(X_test, y_test)
    assert r.shape == (len(X_test), 3)
    np.testing.assert_allclose(r.sum(1), 1.0, atol=1e-12)
    # the mixture's log density is the model's per-sample log-likelihood
    np.testing.assert_allclose(
        d.logpdf(y_test[:200]), m.log_likelihood_samples(X_test[:200], y_test[:200]), atol=1e-9
    )
    n, k = 3000, m.n_parameters()
    ll = m.log_likelihood(X[:n], y[:n])
    assert k == 3 * 7 + 2 * 6  # 3 experts (6 coefs + variance), gate (2 free rows of 6)
    assert m.bic(X[:n], y[:n]) == pytest.approx(-2 * n * ll + k * np.log(n))
    assert m.aic(X[:n], y[:n]) == pytest.approx(-2 * n * ll + 2 * k)
    assert 0.0 < m.score(X_test, y_test) <= 1.0


def test_multi_output_targets():
    rng = np.random.default_rng(0)
    X = rng.uniform(-2, 2, (3000, 1))
    left = X[:, 0] < 0
    Y = np.column_stack(
        [np.where(left, 1 + X[:, 0], -1 - 2 * X[:, 0]), np.where(left, -X[:, 0], 3 * X[:, 0])]
    )
    Y += 0.1 * rng.normal(size=Y.shape)
    m = MoERegressor(2, random_state=0).fit(X, Y)
    assert m.predict(X).shape == (3000, 2)
    d = m.predict_distribution(X[:5])
    assert d.means.shape == (5, 2, 2) and d.logpdf(Y[:5]).shape == (5,)
    assert m.score(X, Y) > 0.97
    assert np.allclose(np.sort(d.stds[0, :, 0]), 0.1, rtol=0.15)


def test_pandas_input_and_column_target():
    X, y, _ = make_moe_regression(500, n_features=2, random_state=0)
    frame = pd.DataFrame(X, columns=["a", "b"])
    m = MoERegressor(2, random_state=0).fit(frame, y.reshape(-1, 1))
    assert list(m.feature_names_in_) == ["a", "b"]
    assert m.predict(frame).shape == (500, 1)


def test_constant_target_fits_without_nan():
    X = np.random.default_rng(0).normal(size=(200, 3))
    y = np.full(200, 4.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = MoERegressor(3, random_state=0).fit(X, y)
    assert np.isfinite(m.log_likelihood_)
    np.testing.assert_allclose(m.predict(X), 4.2, atol=1e-6)
    assert np.isfinite(m.predict_distribution(X).stds).all()


def test_collapsing_experts_are_reported_not_fatal():
    X = np.random.default_rng(0).normal(size=(20, 2))
    y = X[:, 0] + 0.1 * np.random.default_rng(1).normal(size=20)
    with pytest.warns(CollapsedExpertWarning, match="fewer experts"):
        m = MoERegressor(8, random_state=0, max_iter=50).fit(X, y)
    assert np.isfinite(m.predict(X)).all()
    assert np.isfinite(m.log_likelihood_)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"n_experts": 0}, "'n_experts' parameter of MoERegressor must be an int in the range"),
        ({"gate": "tree-ish"}, "'gate' parameter of MoERegressor must be one of"),
        (
            {"expert": "cubic"},
            "'expert' parameter of MoERegressor must be one of 'binomial', 'gamma', 'linear'",
        ),
        ({"tol": -1.0}, "'tol' parameter"),
        ({"init": "best"}, "'init' parameter"),
        ({"reg_var": 0.0}, "'reg_var' parameter"),
    ],
)
def test_bad_parameters_are_named(params, match):
    X, y, _ = make_moe_regression(50, n_features=2, random_state=0)
    with pytest.raises(InvalidParameterError, match=match):
        MoERegressor(**params).fit(X, y)


def test_bad_data_errors():
    X, y, _ = make_moe_regression(50, n_features=2, random_state=0)
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="Input X contains NaN"):
        MoERegressor(2).fit(bad, y)
    y_bad = y.copy()
    y_bad[0] = np.inf
    with pytest.raises(ValueError, match="Input y contains infinity"):
        MoERegressor(2).fit(X, y_bad)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        MoERegressor(2).fit(X, y[:-1])
    with pytest.raises(
        ValueError, match="n_samples >= n_experts but got n_experts = 5, n_samples = 4"
    ):
        MoERegressor(5).fit(X[:4], y[:4])
    with pytest.raises(NotFittedError):
        MoERegressor(2).predict(X)
    m = MoERegressor(2, random_state=0).fit(X, y)
    with pytest.raises(ValueError, match="X has 3 features, but MoERegressor is expecting 2"):
        m.predict(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        m.log_likelihood(X, y[:10])


def test_gradient_fitting_reaches_the_em_optimum_and_cooperation_trades_likelihood():
    X, y, _ = make_moe_regression(3000, n_features=2, random_state=0)
    em = MoERegressor(3, random_state=0).fit(X, y)
    grad = MoERegressor(3, fit_method="gradient", random_state=0, max_iter=300, n_init=3).fit(X, y)
    assert grad.log_likelihood(X, y) == pytest.approx(em.log_likelihood(X, y), abs=1e-4)
    coop = MoERegressor(
        3, fit_method="gradient", objective="cooperative", random_state=0, max_iter=300, n_init=3
    ).fit(X, y)
    # the blended squared error is what it minimises; the likelihood is what it gives up
    assert coop.score(X, y) >= em.score(X, y) - 1e-3
    assert coop.log_likelihood(X, y) < em.log_likelihood(X, y) - 0.1
    assert coop.log_likelihood_history_ == [coop.log_likelihood_] and coop.loss_history_
    with pytest.raises(ValueError, match="cooperative objective needs fit_method='gradient'"):
        MoERegressor(3, objective="cooperative").fit(X, y)
    with pytest.raises(ValueError, match="differentiable form of the expert WrappedExperts"):
        MoERegressor(3, fit_method="gradient", expert=DecisionTreeRegressor()).fit(X, y)
    with pytest.raises(ValueError, match=r"fit_options: unknown option\(s\) \['momentum'\]"):
        MoERegressor(3, fit_method="gradient", fit_options={"momentum": 0.9}).fit(X, y)


def test_gradient_fitting_asks_the_family_so_student_t_experts_join():
    # the family's own differentiable form serves gradient fitting: no list of classes
    X, y, _ = make_moe_regression(1500, n_features=2, n_experts=2, random_state=1)
    y = y + 0.3 * np.random.default_rng(0).standard_t(3, size=len(y))
    em = MoERegressor(2, expert="student_t", random_state=0, tol=1e-9, max_iter=2000).fit(X, y)
    grad = MoERegressor(2, expert="student_t", fit_method="gradient", random_state=0,
                        n_init=3, max_iter=500).fit(X, y)  # fmt: skip
    assert grad.log_likelihood(X, y) == pytest.approx(em.log_likelihood(X, y), abs=2e-3)


def test_a_read_only_frame_view_is_fitted_without_a_copy(monkeypatch):
    """A frame over a float64 block (pandas hands out read-only views of it) is read in
    place: the designs are built from the block itself, not from a writable copy."""
    from moekit.estimators import _base

    seen = []
    build = _base.build_designs
    monkeypatch.setattr(
        _base, "build_designs", lambda Xt, state: seen.append(Xt) or build(Xt, state)
    )
    X, y, _ = make_moe_regression(600, n_features=3, n_experts=2, random_state=0)
    block = np.ascontiguousarray(X)
    frame = pd.DataFrame(block, columns=["a", "b", "c"], copy=False).iloc[100:]
    m = MoERegressor(2, n_init=2, random_state=0).fit(frame, y[100:])
    assert seen and all(np.shares_memory(Xt.numpy(), block) for Xt in seen)
    ref = MoERegressor(2, n_init=2, random_state=0).fit(X[100:].copy(), y[100:])
    np.testing.assert_allclose(m.predict(frame), ref.predict(X[100:]), rtol=1e-12)


def test_gate_coefficients_of_a_nonlinear_gate_are_a_clear_attribute_error():
    X, y, _ = make_moe_regression(200, n_features=1, n_experts=2, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = MoERegressor(2, gate="mlp", n_init=1, random_state=0).fit(X, y)
    for name in ("gate_coef_", "gate_intercept_"):
        with pytest.raises(AttributeError, match=f"{name} exists for gates linear in x"):
            getattr(m, name)


def test_frame_columns_picked_out_of_order_are_fitted():
    """``frame[["x", "z"]]`` of a frame holding z before x comes as a view with a
    negative stride; it is fitted as the same columns in a fresh array are."""
    rng = np.random.default_rng(0)
    t = pd.DataFrame({"z": rng.normal(size=80), "x": rng.normal(size=80)})
    y = 2 * t["x"].to_numpy() + 0.1 * rng.normal(size=80)
    m = MoERegressor(2, n_init=1, random_state=0).fit(t[["x", "z"]], y)
    ref = MoERegressor(2, n_init=1, random_state=0).fit(t[["x", "z"]].to_numpy().copy(), y)
    np.testing.assert_allclose(m.predict(t[["x", "z"]]), ref.predict(t[["x", "z"]].to_numpy()))
