"""Frequency weights and offsets: integer weights fit as repeated rows, offsets scale the mean."""

import warnings

import numpy as np
import pytest
from scipy.optimize import minimize

from moekit import BayesianMoERegressor, HierarchicalMoERegressor, MoEClassifier, MoERegressor


def _regression(n=200, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (n, 2))
    y = np.where(X[:, 0] < 0, -2 * X[:, 0], 3 * X[:, 0]) + 0.1 * rng.normal(size=n)
    return X, y, rng.integers(0, 4, n)


def _fit_pair(make, X, y, w):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weighted = make().fit(X, y, sample_weight=w)
        repeated = make().fit(np.repeat(X, w, 0), np.repeat(y, w))
    return weighted, repeated


@pytest.mark.parametrize("K", [2, 3])
def test_integer_weights_give_the_fit_of_the_repeated_rows_regressor(K):
    X, y, w = _regression()
    a, b = _fit_pair(lambda: MoERegressor(n_experts=K, tol=1e-10, random_state=0), X, y, w)
    assert a.n_experts_removed_ == b.n_experts_removed_
    np.testing.assert_allclose(a.log_likelihood_, b.log_likelihood_, rtol=1e-9)
    np.testing.assert_allclose(a.coef_, b.coef_, atol=1e-6)
    np.testing.assert_allclose(a.intercept_, b.intercept_, atol=1e-6)
    np.testing.assert_allclose(a.predict(X), b.predict(X), atol=1e-6)


@pytest.mark.parametrize("K", [2, 3])
def test_integer_weights_give_the_fit_of_the_repeated_rows_classifier(K):
    rng = np.random.default_rng(4)
    X = rng.uniform(-1, 1, (300, 2))
    region = np.digitize(X[:, 0], [-1 / 3, 1 / 3])  # three regions, three class boundaries
    logit = np.array([3.0, -3.0, 0.0])[region] * X[:, 1] + np.array([0, 0, 2.0])[region]
    yc = (rng.uniform(size=300) < 1 / (1 + np.exp(-logit))).astype(int)
    w = rng.integers(0, 4, 300)
    a, b = _fit_pair(lambda: MoEClassifier(n_experts=K, tol=1e-10, random_state=0), X, yc, w)
    np.testing.assert_allclose(a.log_likelihood_, b.log_likelihood_, rtol=1e-9)
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), atol=1e-8)
    np.testing.assert_allclose(a.gate_coef_, b.gate_coef_, atol=1e-6)


def test_integer_weights_hierarchical_and_rows_in_another_order():
    X, y, w = _regression(seed=2)
    order = np.random.default_rng(5).permutation(len(y))  # the weighted rows shuffled
    make = lambda: HierarchicalMoERegressor(depth=2, tol=1e-10, random_state=0)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = make().fit(X[order], y[order], sample_weight=w[order])
        b = make().fit(np.repeat(X, w, 0), np.repeat(y, w))
    np.testing.assert_allclose(a.log_likelihood_, b.log_likelihood_, rtol=1e-9)
    np.testing.assert_allclose(a.predict(X), b.predict(X), atol=1e-6)


def test_integer_weights_bayesian():
    X, y, w = _regression()
    a, b = _fit_pair(lambda: BayesianMoERegressor(n_experts=2, tol=1e-10, random_state=0), X, y, w)
    np.testing.assert_allclose(a.log_likelihood_, b.log_likelihood_, rtol=1e-9)
    np.testing.assert_allclose(a.elbo_, b.elbo_, rtol=1e-9)
    np.testing.assert_allclose(a.predict(X), b.predict(X), atol=1e-8)
    Xr, yr = np.repeat(X, w, 0), np.repeat(y, w)
    np.testing.assert_allclose(a.log_likelihood(X, y, sample_weight=w), b.log_likelihood(Xr, yr))


def test_weighted_summary_bic_and_scores_equal_the_repeated_rows():
    X, y, w = _regression()
    a, b = _fit_pair(lambda: MoERegressor(n_experts=2, tol=1e-10, random_state=0), X, y, w)
    Xr, yr = np.repeat(X, w, 0), np.repeat(y, w)
    sa, sb = a.summary(), b.summary()
    assert sa.n_samples == sb.n_samples == w.sum()
    np.testing.assert_allclose(sa.log_likelihood, sb.log_likelihood, rtol=1e-9)
    np.testing.assert_allclose(sa.table.estimate, sb.table.estimate, atol=1e-6)
    np.testing.assert_allclose(sa.table.std_error, sb.table.std_error, rtol=1e-5)
    np.testing.assert_allclose(a.bic(X, y, sample_weight=w), b.bic(Xr, yr), rtol=1e-9)
    np.testing.assert_allclose(a.aic(X, y, sample_weight=w), b.aic(Xr, yr), rtol=1e-9)
    np.testing.assert_allclose(a.log_likelihood(X, y, sample_weight=w), b.log_likelihood(Xr, yr))
    np.testing.assert_allclose(a.score(X, y, sample_weight=w), b.score(Xr, yr), rtol=1e-9)


def test_zero_weights_drop_the_rows():
    X, y, w = _regression()
    keep = w > 0
    a, _ = _fit_pair(lambda: MoERegressor(n_experts=2, random_state=0), X, y, w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = MoERegressor(n_experts=2, random_state=0).fit(X[keep], y[keep], sample_weight=w[keep])
    np.testing.assert_allclose(a.coef_, c.coef_, atol=1e-10)


@pytest.mark.parametrize(
    ("w", "match"),
    [
        (-np.ones(200), r"sample_weight must be >= 0"),
        (np.full(200, np.nan), r"sample_weight holds NaN or infinite"),
        (np.ones(199), r"sample_weight must have shape \(200,\)"),
        (np.zeros(200), r"sample_weight: every weight is zero"),
    ],
)
def test_bad_weights_are_one_line_errors_naming_sample_weight(w, match):
    X, y, _ = _regression()
    with pytest.raises(ValueError, match=match) as err:
        MoERegressor(n_experts=2).fit(X, y, sample_weight=w)
    assert "\n" not in str(err.value)


def test_real_weights_climb_the_weighted_likelihood():
    # weights that are not whole numbers stay with their rows: EM climbs
    # sum_i w_i log p(y_i | x_i) / sum_i w_i, which log_likelihood reports
    X, y, w = _regression()
    w = w + 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = MoERegressor(n_experts=2, tol=1e-10, random_state=0).fit(X, y, sample_weight=w)
    assert np.all(np.diff(m.log_likelihood_history_) >= -1e-12)
    np.testing.assert_allclose(m.log_likelihood(X, y, sample_weight=w), m.log_likelihood_)
    assert m.log_likelihood(X, y) != pytest.approx(m.log_likelihood_, abs=1e-6)


# ---------------------------------------------------------------------------- offsets
def _exposure(n=400, seed=1):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2))
    hours = rng.uniform(0.5, 5, n)
    y = rng.poisson(hours * np.exp(0.3 + 0.5 * X[:, 0] - 0.2 * X[:, 1]))
    return X, y, hours, rng.integers(1, 4, n).astype(float)


def test_weighted_poisson_with_offset_at_k1_equals_a_direct_fit():
    X, y, hours, w = _exposure()
    m = MoERegressor(n_experts=1, expert="poisson", random_state=0)
    m.fit(X, y, sample_weight=w, offset=np.log(hours))
    Z = np.column_stack([np.ones(len(y)), X])
    off = np.log(hours)

    def nll(b):
        eta = Z @ b + off
        return -(w * (y * eta - np.exp(eta))).sum()

    def grad(b):
        return -Z.T @ (w * (y - np.exp(Z @ b + off)))

    ref = minimize(nll, np.zeros(3), jac=grad, method="BFGS", options={"gtol": 1e-12}).x
    np.testing.assert_allclose(m.intercept_, ref[:1], atol=1e-6)
    np.testing.assert_allclose(m.coef_[0], ref[1:], atol=1e-6)


@pytest.mark.parametrize("expert", ["poisson", "negative_binomial", "gamma", "weibull"])
def test_doubling_the_exposure_doubles_the_expected_count(expert):
    X, y, hours, _ = _exposure()
    y = y + 1.0 if expert in ("gamma", "weibull") else y
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = MoERegressor(n_experts=2, expert=expert, random_state=0, n_init=2)
        m.fit(X, y, offset=np.log(hours))
    one = m.predict(X, offset=np.log(hours))
    two = m.predict(X, offset=np.log(2 * hours))
    np.testing.assert_allclose(two, 2 * one, rtol=1e-12)
    d = m.predict_distribution(X, offset=np.log(2 * hours))
    np.testing.assert_allclose(d.mean(), two, rtol=1e-10)
    ll = m.log_likelihood(X, y, offset=np.log(hours))
    assert np.isclose(ll, m.log_likelihood_)
    assert ll > m.log_likelihood(X, y)  # the exposure explains the counts


def test_an_offset_on_a_family_without_a_linear_predictor_is_an_error_naming_offset():
    X, y, hours, _ = _exposure()
    with pytest.raises(ValueError, match=r"^offset .*expert='linear'"):
        MoERegressor(n_experts=2).fit(X, y, offset=np.log(hours))
    m = MoERegressor(n_experts=1, random_state=0).fit(X, y)
    with pytest.raises(ValueError, match=r"^offset"):
        m.predict(X, offset=np.log(hours))
    p = MoERegressor(n_experts=1, expert="poisson").fit(X, y)
    with pytest.raises(ValueError, match=r"offset must have shape \(400,\)"):
        p.predict(X, offset=np.ones(3))


def test_remove_expert_refits_the_held_rows_with_their_weights():
    X, y, w = _regression()
    a, b = _fit_pair(lambda: MoERegressor(n_experts=3, tol=1e-10, min_share=0.0, random_state=0),
                     X, y, w)  # fmt: skip
    # the smallest expert is the one the two-regime data do not need: without it the
    # refit has one well-determined optimum (removing a real regime instead leaves a
    # path-sensitive one, which once ended 2 nats apart in a full-suite run)
    k = int(np.argmin(a.expert_sizes_))
    assert k == int(np.argmin(b.expert_sizes_))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.remove_expert(k)
        b.remove_expert(k)
    np.testing.assert_allclose(a.log_likelihood_, b.log_likelihood_, rtol=1e-9)
