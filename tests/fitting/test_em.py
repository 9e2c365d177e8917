"""The EM loop: monotone objective, restarts, warm start, convergence reporting."""

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

from moekit import MoEClassifier, MoERegressor
from moekit.datasets import make_moe_regression
from moekit.gates.softmax import SoftmaxGate

# Rounding of a mean over n float64 terms; EM's objective must not drop by more.
SLACK = 1e-10


def _assert_monotone(history):
    h = np.asarray(history)
    assert len(h) >= 2
    assert np.diff(h).min() >= -SLACK, f"objective decreased by {-np.diff(h).min():.3g}"


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("gate", ["softmax", "constant"])
def test_regressor_objective_never_decreases(seed, gate):
    K = 2 + seed % 3
    X, y, _ = make_moe_regression(600, n_features=3, n_experts=K, gate=gate, random_state=seed)
    m = MoERegressor(n_experts=K, gate=gate, init="random", max_iter=60, tol=0.0, random_state=seed)
    with pytest.warns(ConvergenceWarning):  # tol=0 runs all iterations
        m.fit(X, y)
    assert m.n_iter_ == 60
    _assert_monotone(m.log_likelihood_history_)


@pytest.mark.parametrize("seed", range(4))
def test_bohning_gate_is_monotone_and_reaches_newton_optimum(seed):
    X, y, _ = make_moe_regression(800, n_features=3, random_state=seed)
    newton = MoERegressor(3, random_state=seed, tol=1e-10, max_iter=1000).fit(X, y)
    bohning = MoERegressor(
        3,
        gate=SoftmaxGate(3, alpha=1e-3, solver="bohning"),
        random_state=seed,
        tol=1e-10,
        max_iter=3000,
    ).fit(X, y)
    _assert_monotone(bohning.log_likelihood_history_)
    assert bohning.log_likelihood_ == pytest.approx(newton.log_likelihood_, abs=1e-4)


@pytest.mark.parametrize("seed", range(3))
def test_classifier_objective_never_decreases(seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(400, 3))
    y = (X[:, 0] * X[:, 1] + 0.3 * rng.normal(size=400) > 0).astype(int)
    m = MoEClassifier(n_experts=3, max_iter=40, tol=0.0, random_state=seed)
    with pytest.warns(ConvergenceWarning):
        m.fit(X, y)
    _assert_monotone(m.log_likelihood_history_)


def test_one_step_warm_start_never_decreases():
    """The scikit-learn mixture test: refit one iteration at a time from the last fit."""
    X, y, _ = make_moe_regression(1000, n_features=4, random_state=3)
    m = MoERegressor(3, max_iter=1, warm_start=True, random_state=0)
    previous = -np.inf
    for _ in range(40):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # one step rarely converges
            m.fit(X, y)
        current = m.log_likelihood_history_[-1]
        assert current >= previous - SLACK
        previous = current


def test_warm_start_continues_from_previous_fit():
    X, y, _ = make_moe_regression(1500, n_features=2, random_state=0)
    cold = MoERegressor(3, random_state=0, tol=1e-9, max_iter=500).fit(X, y)
    warm = MoERegressor(3, random_state=0, max_iter=5, warm_start=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warm.fit(X, y)
    first = warm.log_likelihood_
    warm.set_params(max_iter=500, tol=1e-9)
    warm.fit(X, y)
    assert warm.log_likelihood_ >= first - SLACK
    assert warm.log_likelihood_ == pytest.approx(cold.log_likelihood_, abs=1e-6)


@pytest.mark.parametrize("sample_size", [None, 700])
def test_more_starts_never_do_worse_than_the_first(sample_size):
    # the first start of n_init=5 is the only start of n_init=1 (same generator stream)
    X, y, _ = make_moe_regression(1500, n_features=2, n_experts=4, random_state=5)
    kw = dict(
        n_experts=4, init="random", random_state=2, init_sample_size=sample_size, init_max_iter=200
    )
    one = MoERegressor(n_init=1, **kw).fit(X, y)
    five = MoERegressor(n_init=5, **kw).fit(X, y)
    assert five.log_likelihood_ >= one.log_likelihood_ - 1e-6


def test_max_iter_zero_only_initialises():
    X, y, _ = make_moe_regression(300, n_features=2, random_state=0)
    m = MoERegressor(2, max_iter=0, random_state=0).fit(X, y)
    assert m.n_iter_ == 0 and not m.converged_
    assert len(m.log_likelihood_history_) == 1
    assert np.isfinite(m.predict(X)).all()


def test_convergence_warning_gives_advice():
    X, y, _ = make_moe_regression(500, n_features=2, random_state=0)
    with pytest.warns(ConvergenceWarning, match="increasing max_iter"):
        MoERegressor(3, max_iter=2, random_state=0).fit(X, y)


def test_verbose_reports_progress(capsys):
    X, y, _ = make_moe_regression(400, n_features=2, random_state=0)
    MoERegressor(2, verbose=2, verbose_interval=1, random_state=0, n_init=2).fit(X, y)
    err = capsys.readouterr().err
    assert "start 1/2" in err and "start 2/2" in err
    assert "iteration 1: mean log-likelihood" in err
    assert "EM converged after" in err


def test_fit_is_reproducible_and_predict_consistent():
    X, y, _ = make_moe_regression(800, n_features=3, random_state=1)
    a = MoERegressor(3, random_state=7, n_init=3).fit(X, y)
    b = MoERegressor(3, random_state=7, n_init=3).fit(X, y)
    np.testing.assert_array_equal(a.predict(X), b.predict(X))
    # the stored log-likelihood is the final E-step's: it equals a fresh evaluation
    assert a.log_likelihood_ == pytest.approx(a.log_likelihood(X, y), abs=1e-12)


def test_safeguard_shortens_a_step_that_lowers_the_objective():
    """A Newton step is not guaranteed to climb; the loop must halve it until it does."""
    import torch

    from moekit._core.data import EMData
    from moekit.experts.gaussian import GaussianExperts
    from moekit.fitting.em import EMModel, Params
    from moekit.fitting.init import kmeans_resp

    X, y, _ = make_moe_regression(2000, n_features=2, random_state=0)
    Xt = torch.as_tensor((X - X.mean(0)) / X.std(0))
    XT = torch.cat([Xt, torch.ones(len(X), 1, dtype=torch.float64)], 1).T.contiguous()
    data = EMData(XT, XT, torch.as_tensor(((y - y.mean()) / y.std())[None, :].copy()))
    model = EMModel(GaussianExperts(3, 1, 1e-6), SoftmaxGate(3, solver="newton"))
    model.prepare(data)
    gen = torch.Generator().manual_seed(0)
    params = model.init_from_resp(data, kmeans_resp(data, 3, gen))
    cur = model.e_pass(params, data)
    good = model.m_step(params, cur, data)
    # an overshooting gate step (thirty Newton steps long), experts unchanged
    step = good.gate.coef - params.gate.coef
    wild = Params(params.expert, type(good.gate)(params.gate.coef + 30 * step))
    bad = model.e_pass(wild, data)
    assert bad.objective < cur.objective  # the wild step does lower the objective
    kept, res = model._safeguard(params, cur, wild, bad, data)
    assert res.objective >= cur.objective
    assert not torch.equal(kept.gate.coef, wild.gate.coef)


def _family_data(family, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(700, 2))
    first = rng.random(700) < 1 / (1 + np.exp(-2 * X[:, 1]))
    if family == "poisson":
        return X, rng.poisson(np.exp(np.where(first, 0.3 + 0.7 * X[:, 0], 1.2 - 0.4 * X[:, 0])))
    y = np.where(first, 1 + 2 * X[:, 0], -1 - X[:, 0]) + 0.3 * rng.standard_t(3, size=700)
    return X, y


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(
    "family, extra",
    [
        ("student_t", {}),
        ("student_t", {"df": 4.0}),
        ("poisson", {}),
    ],
)
def test_every_expert_family_never_decreases_the_objective(family, extra, seed):
    X, y = _family_data(family, seed)
    m = MoERegressor(
        3, expert=family, init="random", max_iter=50, tol=0.0, random_state=seed, **extra
    )
    with pytest.warns(ConvergenceWarning):
        m.fit(X, y)
    _assert_monotone(m.log_likelihood_history_)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", ["mlp_expert", "mlp_gate", "tree_expert", "tree_classifier"])
def test_generalised_em_families_never_decrease_the_objective(kind, seed):
    from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

    X, y = _family_data("linear", seed)
    X, y = X[:400], y[:400]
    small = {"hidden": 6, "steps": 5}
    if kind == "tree_classifier":
        m = MoEClassifier(
            2,
            expert=DecisionTreeClassifier(max_depth=2),
            init="random",
            max_iter=15,
            tol=0.0,
            random_state=seed,
        )
        y = (y > np.median(y)).astype(int)
    else:
        m = MoERegressor(
            2,
            init="random",
            max_iter=15,
            tol=0.0,
            random_state=seed,
            **{
                "mlp_expert": {"expert": "mlp", "expert_options": small},
                "mlp_gate": {"gate": "mlp", "gate_options": small},
                "tree_expert": {"expert": DecisionTreeRegressor(max_depth=3)},
            }[kind],
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        m.fit(X, y)
    _assert_monotone(m.log_likelihood_history_)


def test_squarem_never_decreases_and_needs_fewer_iterations():
    """SQUAREM cycles keep EM's ascent and reach its optimum in fewer EM steps."""
    from moekit.datasets import load_mcycle
    from moekit.fitting.model import EMModel

    X, y = load_mcycle()
    start = MoERegressor(3, init="kmeans", n_init=1, max_iter=0, random_state=0).fit(X, y)
    data = start._em_data(X, y)
    runs = {}
    for accelerate in (False, True):
        model = EMModel(start._expert_family, start._gate_family)
        model.prepare(data)
        _, cur, history, converged = model.iterate(
            start._params, data, max_iter=2000, tol=1e-9, accelerate=accelerate
        )
        assert converged
        _assert_monotone(history)
        runs[accelerate] = (cur.objective, len(history) - 1)
    (plain, n_plain), (fast, n_fast) = runs[False], runs[True]
    assert fast >= plain - 1e-6
    assert n_fast < n_plain
