"""Expert families recover the parameters of the models they generate."""

import numpy as np
import pytest
from scipy import stats

from moekit import MixturePrediction, MoERegressor


def _two_regimes(n, rng):
    X = rng.normal(size=(n, 2))
    first = rng.random(n) < 1.0 / (1.0 + np.exp(-2.5 * X[:, 1]))
    return X, first


def test_poisson_experts_recover_log_linear_rates():
    rng = np.random.default_rng(0)
    X, first = _two_regimes(20_000, rng)
    log_rate = np.where(first, 0.5 + 0.8 * X[:, 0], 1.5 - 0.5 * X[:, 0])
    y = rng.poisson(np.exp(log_rate))
    m = MoERegressor(2, expert="poisson", random_state=0, n_init=2).fit(X, y)
    # ordered by mean rate: exp(0.5 + ...) first
    np.testing.assert_allclose(m.intercept_, [0.5, 1.5], atol=0.05)
    np.testing.assert_allclose(m.coef_[:, 0], [0.8, -0.5], atol=0.05)
    np.testing.assert_allclose(m.coef_[:, 1], 0.0, atol=0.05)
    d = m.predict_distribution(X[:5])
    assert d.family == "poisson"
    samples = d.sample(50, random_state=0)
    assert (samples == np.round(samples)).all() and (samples >= 0).all()
    assert all(float(mode) == round(float(mode)) for row in d.modes() for mode in row)
    with pytest.raises(ValueError, match="non-negative integer counts"):
        MoERegressor(2, expert="poisson").fit(X, y - 0.5)


def test_student_t_experts_resist_outliers_that_pull_gaussian_experts():
    rng = np.random.default_rng(1)
    X = rng.uniform(-2, 2, (4000, 1))
    y = np.where(X[:, 0] > 0, 1.0 + 2.0 * X[:, 0], -1.0 - 1.0 * X[:, 0]) + 0.2 * rng.normal(
        size=4000
    )
    outliers = rng.random(4000) < 0.05
    y[outliers] += rng.normal(scale=15.0, size=outliers.sum())
    truth_coef, truth_int = np.array([-1.0, 2.0]), np.array([-1.0, 1.0])
    gauss = MoERegressor(2, random_state=0, n_init=3).fit(X, y)
    robust = MoERegressor(2, expert="student_t", random_state=0, n_init=3).fit(X, y)
    np.testing.assert_allclose(robust.coef_[:, 0], truth_coef, atol=0.05)
    np.testing.assert_allclose(robust.intercept_, truth_int, atol=0.05)

    # the Gaussian experts spend an expert on the outliers and lose a regime's line
    def error(m):
        return np.abs(m.coef_[:, 0] - truth_coef).max() + np.abs(m.intercept_ - truth_int).max()

    assert error(gauss) > 0.15 and error(gauss) > 8 * error(robust), (error(gauss), error(robust))
    assert robust.log_likelihood(X, y) > gauss.log_likelihood(X, y)


def test_student_t_degrees_of_freedom_are_estimated():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(30_000, 1))
    y = 1.0 + 0.5 * X[:, 0] + 0.3 * rng.standard_t(4, size=30_000)
    m = MoERegressor(1, expert="student_t", random_state=0).fit(X, y)
    assert m.df_[0] == pytest.approx(4.0, rel=0.15)
    assert m.noise_std_[0] == pytest.approx(0.3, rel=0.05)
    fixed = MoERegressor(1, expert="student_t", df=4.0, random_state=0).fit(X, y)
    assert fixed.df_[0] == 4.0 and fixed.n_parameters() == m.n_parameters() - 1
    d = fixed.predict_distribution(X[:3])
    ref = stats.t.logpdf(y[:3], 4.0, loc=fixed.predict(X[:3]), scale=fixed.noise_std_[0])
    np.testing.assert_allclose(d.logpdf(y[:3]), ref, rtol=1e-10)


def test_t_and_poisson_mixtures_against_scipy():
    w = np.array([[0.3, 0.7]])
    d = MixturePrediction(w, [[0.0, 4.0]], [[1.0, 0.5]], family="student_t", df=[3.0, 8.0])
    y = np.array([1.3])
    ref = np.log(0.3 * stats.t.pdf(1.3, 3, 0, 1) + 0.7 * stats.t.pdf(1.3, 8, 4, 0.5))
    np.testing.assert_allclose(d.logpdf(y), [ref])
    lo, hi = d.interval(0.95)
    cdf = lambda v: 0.3 * stats.t.cdf(v, 3, 0, 1) + 0.7 * stats.t.cdf(v, 8, 4, 0.5)  # noqa: E731
    assert cdf(hi[0]) - cdf(lo[0]) == pytest.approx(0.95, abs=1e-8)
    np.testing.assert_allclose(d.var(), 0.3 * 3 + 0.7 * 0.25 * 8 / 6 + 0.3 * 0.7 * 16, rtol=1e-12)
    assert len(d.modes()[0]) == 2
    p = MixturePrediction(w, [[1.0, 9.0]], np.sqrt([[1.0, 9.0]]), family="poisson")
    ref = np.log(0.3 * stats.poisson.pmf(5, 1.0) + 0.7 * stats.poisson.pmf(5, 9.0))
    np.testing.assert_allclose(p.logpdf([5.0]), [ref])
    assert p.logpdf([2.5])[0] == -np.inf
    lo, hi = p.interval(0.9)
    pmf_cdf = lambda k: 0.3 * stats.poisson.cdf(k, 1.0) + 0.7 * stats.poisson.cdf(k, 9.0)  # noqa: E731
    assert pmf_cdf(lo[0]) >= 0.05 > pmf_cdf(lo[0] - 1)
    # Poisson(1) ties at 0 and 1, Poisson(9) at 8 and 9; the other component breaks each tie
    np.testing.assert_array_equal(p.modes()[0], [1.0, 8.0])
    assert p.mean()[0] == pytest.approx(0.3 + 6.3)


def test_mlp_experts_learn_a_nonlinear_regime():
    rng = np.random.default_rng(3)

    def draw(n):
        X = rng.uniform(-3, 3, (n, 1))
        y = np.where(X[:, 0] < 0, np.sin(2 * X[:, 0]), 0.5 * X[:, 0] ** 2)
        return X, y + 0.1 * rng.normal(size=n)

    X, y = draw(1500)
    X_test, y_test = draw(1500)
    kw = dict(random_state=0, max_iter=60, tol=1e-5)
    linear = MoERegressor(2, **kw).fit(X, y)
    with _ignore():
        mlp = MoERegressor(2, expert="mlp", expert_options={"hidden": 12}, **kw).fit(X, y)
    np.testing.assert_allclose(mlp.noise_std_, 0.1, rtol=0.15)
    assert mlp.log_likelihood(X_test, y_test) > linear.log_likelihood(X_test, y_test) + 0.8
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['width'\]"):
        MoERegressor(2, expert="mlp", expert_options={"width": 3}).fit(X, y)
    with pytest.raises(ValueError, match="expert_options are for expert='mlp'"):
        MoERegressor(2, expert_options={"hidden": 3}).fit(X, y)


def _ignore():
    import warnings

    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore")

    class _Exit:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            ctx.__exit__(*exc)

    return _Exit()


def test_decision_tree_experts_fit_step_functions():
    from sklearn.tree import DecisionTreeRegressor

    rng = np.random.default_rng(4)

    def draw(n):
        X = rng.uniform(-3, 3, (n, 2))
        step = np.where(X[:, 0] < -1, -2.0, np.where(X[:, 0] < 1, 0.5, 3.0))
        y = np.where(X[:, 1] > 0, step, 1.0 - step) + 0.1 * rng.normal(size=n)
        return X, y

    X, y = draw(3000)
    X_test, y_test = draw(3000)
    # k-means on [x, y] would hand each flexible expert a band of y values, a local
    # optimum the gate cannot express; random starts (flexmix's default) avoid it
    trees = MoERegressor(
        2,
        expert=DecisionTreeRegressor(max_depth=2),
        expert_features=[0],
        gate_features=[1],
        init="random",
        n_init=2,
        random_state=0,
    ).fit(X, y)
    linear = MoERegressor(2, expert_features=[0], gate_features=[1], random_state=0).fit(X, y)
    np.testing.assert_allclose(trees.noise_std_, 0.1, rtol=0.1)
    assert trees.score(X_test, y_test) > 0.97 > linear.score(X_test, y_test)
    grid = np.column_stack([[-2.0, 0.0, 2.0], [1.0, 1.0, 1.0]])  # the x1 > 0 regime
    np.testing.assert_allclose(trees.predict(grid), [-2.0, 0.5, 3.0], atol=0.05)
    with pytest.raises(TypeError, match="cannot store expert=DecisionTreeRegressor"):
        trees.save("unused.moe")
    assert trees.n_parameters() == 2 * 4 + 2 + 1 * 2  # leaves + noise + gate


def test_an_estimator_without_sample_weight_is_refused_clearly():
    from sklearn.neighbors import KNeighborsRegressor

    X = np.random.default_rng(0).normal(size=(50, 1))
    with pytest.raises(TypeError, match="does not accept sample_weight"):
        MoERegressor(2, expert=KNeighborsRegressor()).fit(X, X[:, 0])


def test_mlp_gate_separates_a_ring_that_a_linear_gate_cannot():
    rng = np.random.default_rng(5)

    def draw(n):
        X = rng.uniform(-2, 2, (n, 2))
        inner = np.sqrt((X**2).sum(1)) < 1.2
        return X, np.where(inner, 1 + X[:, 0], -1 + 2 * X[:, 1]) + 0.1 * rng.normal(size=n)

    X, y = draw(2000)
    X_test, y_test = draw(2000)
    kw = dict(random_state=0, n_init=2, max_iter=80, tol=1e-5)
    linear = MoERegressor(2, **kw).fit(X, y)
    with _ignore():
        ring = MoERegressor(2, gate="mlp", gate_options={"hidden": 8}, **kw).fit(X, y)
    assert ring.log_likelihood(X_test, y_test) > linear.log_likelihood(X_test, y_test) + 0.3
    inner = np.sqrt((X_test**2).sum(1)) < 1.2
    g = ring.gate_weights(X_test)
    # one expert owns the disc, the other the ring around it
    assert abs(g[inner].mean(0) - g[~inner].mean(0)).max() > 0.8
