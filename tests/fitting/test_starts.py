"""Starts that explore, and richer models that never fit worse than the ones they contain."""

import warnings

import numpy as np
import pytest

from moekit import MoEClassifier, MoERegressor, select_n_experts
from moekit.datasets import load_mcycle, make_moe_regression
from moekit.fitting.starts import AUTO, STRATEGIES, strategy_sequence


def _crossing_lines(n=400, seed=0):
    """Two regression lines that cross, mixed with constant weights (flexmix's NPreg shape)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 10, n)
    z = rng.random(n) < 0.5
    y = np.where(z, 5 * x, 15 + 10 * x - x**2) + rng.normal(0, 3, n)
    return np.c_[x, x**2], y


def test_auto_mixes_strategies_and_single_strategies_repeat():
    seq = strategy_sequence("auto", 10)
    assert seq == list(AUTO) and len(set(seq)) >= 6
    assert strategy_sequence("random", 3) == ["random"] * 3
    assert strategy_sequence("split", 2) == ["nested"] * 2


@pytest.mark.parametrize("init", [s for s in STRATEGIES if s != "auto"])
@pytest.mark.parametrize("expert", ["linear", "poisson"])
def test_every_strategy_fits(init, expert):
    X, y, _ = make_moe_regression(300, n_features=2, n_experts=2, random_state=0)
    if expert == "poisson":
        y = np.random.default_rng(0).poisson(np.exp(0.5 + 0.5 * X[:, 0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # two Poisson experts for one are slow to settle
        m = MoERegressor(2, expert=expert, init=init, n_init=2, random_state=0).fit(X, y)
    assert np.isfinite(m.log_likelihood_)
    assert np.diff(m.log_likelihood_history_).min() >= -1e-10


@pytest.mark.parametrize("init", ["residuals", "sem", "split"])
def test_every_strategy_fits_the_classifier(init):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 2))
    y = (X[:, 0] * X[:, 1] > 0).astype(int)
    m = MoEClassifier(2, init=init, n_init=2, random_state=0).fit(X, y)
    assert np.isfinite(m.log_likelihood_)
    assert np.diff(m.log_likelihood_history_).min() >= -1e-10


def test_crossing_lines_are_found_where_kmeans_starts_cut_them_into_bands():
    X, y = _crossing_lines()
    kmeans = MoERegressor(2, gate="constant", init="kmeans", random_state=0).fit(X, y)
    auto = MoERegressor(2, gate="constant", random_state=0).fit(X, y)
    # every k-means start lands in the x-band basin; the mix reaches the crossing lines
    assert auto.log_likelihood(X, y) > kmeans.log_likelihood(X, y) + 0.05
    slopes = sorted(auto.coef_[:, 0])
    assert slopes[0] == pytest.approx(5, abs=1.0) and slopes[1] == pytest.approx(10, abs=2.0)


def test_mcycle_default_fit_reaches_flexmix_optimum():
    # flexmix's best of stepFlexmix(accel ~ times, k = 2, nrep = 10, concomitant =
    # FLXPmultinom(~times)): logLik -614.5659 (R 4.2, flexmix 2.3-19); the k-means-only
    # start of earlier moekit versions stopped at -643.4
    X, y = load_mcycle()
    m = MoERegressor(2, random_state=0).fit(X, y)
    assert m.log_likelihood(X, y) * len(y) >= -614.5659 - 0.05


def test_verbose_says_how_many_optima_the_starts_reached(capsys):
    X, y = _crossing_lines(200)
    MoERegressor(2, gate="constant", verbose=1, random_state=0).fit(X, y)
    err = capsys.readouterr().err
    assert "10 starts ended their short runs at" in err
    assert "distinct optim" in err and "the best started from" in err


def test_log_likelihood_never_drops_as_experts_are_added():
    X, y = load_mcycle()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, table = select_n_experts(MoERegressor(random_state=0), X, y, range(1, 6))
    ll = table["log_likelihood"].to_numpy()
    assert (np.diff(ll) >= -1e-6).all(), ll


@pytest.mark.parametrize("n_init", [1, 3])
def test_k_plus_one_started_from_k_never_ends_below_it(n_init):
    X, y, _ = make_moe_regression(600, n_features=2, n_experts=4, random_state=3)
    small = MoERegressor(2, random_state=0, n_init=n_init).fit(X, y)
    big = MoERegressor(3, random_state=5, n_init=n_init, init="kmeans").fit(X, y, start_from=small)
    assert big.log_likelihood(X, y) >= small.log_likelihood(X, y) - 1e-9


def test_student_t_started_from_the_gaussian_fit_is_never_worse():
    X, y, _ = make_moe_regression(800, n_features=2, n_experts=2, random_state=4)
    gauss = MoERegressor(2, random_state=0).fit(X, y)
    t = MoERegressor(2, expert="student_t", random_state=0, n_init=1, init="kmeans")
    t.fit(X, y, start_from=gauss)
    # a t expert at the largest df is a Gaussian one to within 1e-7 nats per sample
    assert t.log_likelihood(X, y) >= gauss.log_likelihood(X, y) - 1e-6


def test_softmax_gate_started_from_the_constant_gate_is_never_worse():
    X, y = _crossing_lines(300, seed=2)
    const = MoERegressor(2, gate="constant", random_state=0).fit(X, y)
    soft = MoERegressor(2, random_state=1, n_init=1, init="kmeans").fit(X, y, start_from=const)
    assert soft.log_likelihood(X, y) >= const.log_likelihood(X, y) - 1e-9


def test_mlp_gate_started_from_the_softmax_gate_is_never_worse():
    X, y = load_mcycle()
    soft = MoERegressor(3, random_state=0).fit(X, y)
    mlp = MoERegressor(3, gate="mlp", random_state=0, n_init=1, init="kmeans")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlp.fit(X, y, start_from=soft)
    # the MLP gate is softmax(V0 x + V1 tanh(V2 x)): the softmax gate at V1 = 0, exactly;
    # only its hidden layer's weight decay separates the two objectives
    assert mlp.log_likelihood(X, y) >= soft.log_likelihood(X, y) - 1e-3


def test_start_from_must_be_a_simpler_model_of_the_same_data():
    X, y, _ = make_moe_regression(300, n_features=2, n_experts=2, random_state=0)
    small = MoERegressor(2, random_state=0, n_init=1).fit(X, y)
    with pytest.raises(ValueError, match="start_from: expected a MoERegressor fitted on the same"):
        MoERegressor(3, n_init=1).fit(X[:200], y[:200], start_from=small)
    with pytest.raises(ValueError, match="is not a simpler model"):
        MoERegressor(4, n_init=1).fit(X, y, start_from=small)


def test_cutoff_is_the_last_of_the_distinct_runs_continued():
    from moekit.fitting.em import FINAL_STARTS, _cutoff

    assert FINAL_STARTS == 3
    assert _cutoff([-1.0, -2.0], 0.1) is None  # fewer runs than are continued
    # -1.05 is the same basin as -1.0; the third distinct run ends at -3
    assert _cutoff([-1.0, -1.05, -2.0, -3.0, -4.0], 0.1) == -3.0
    assert _cutoff([-1.0, -1.05, -1.08], 0.1) is None


def test_short_runs_behind_the_best_end_early_and_change_nothing(monkeypatch):
    # iris: some short runs fall clearly behind; ending them early saves EM steps
    # and the fit is the very same as when every short run goes its full length
    from sklearn.datasets import load_iris

    import moekit.fitting.batched as batched
    import moekit.fitting.em as em
    from moekit.fitting.model import EMModel

    X, y = load_iris(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    passes = []
    e_pass, e_pass_many = EMModel.e_pass, batched.e_pass_many
    monkeypatch.setattr(EMModel, "e_pass", lambda *a, **k: passes.append(1) or e_pass(*a, **k))

    # starts sharing a batched pass: one pass each
    def many(model, params, data):
        passes.extend([1] * len(params))
        return e_pass_many(model, params, data)

    monkeypatch.setattr(batched, "e_pass_many", many)
    fits, default = {}, em.BEHIND_FACTOR
    for factor in (default, float("inf")):
        monkeypatch.setattr(em, "BEHIND_FACTOR", factor)
        passes.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # a seed whose short runs fall behind (at some seeds none does, and the
            # rule then has nothing to end: 645 against 778 passes here when written)
            fits[factor] = (MoEClassifier(3, random_state=4).fit(X, y), len(passes))
    (early, n_early), (full, n_full) = fits[default], fits[float("inf")]
    assert n_early < n_full
    assert early.log_likelihood_history_ == full.log_likelihood_history_
    np.testing.assert_array_equal(early.predict_proba(X), full.predict_proba(X))


def test_a_simpler_model_reached_by_two_routes_is_fitted_once(monkeypatch):
    # K = 3 softmax contains K = 2 constant through K = 2 softmax and K = 3 constant
    import moekit.fitting.em as em

    fitted = []
    run_em = em.run_em

    def spy(model, data, **kw):
        key = (em.family_key(model.expert), em.family_key(model.gate), kw["n_init"], id(data))
        fitted.append(key)
        return run_em(model, data, **kw)

    monkeypatch.setattr(em, "run_em", spy)
    X, y, _ = make_moe_regression(300, n_features=2, n_experts=3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        MoERegressor(3, n_init=8, random_state=0).fit(X, y)
    # the estimator calls run_em through its own import: every call seen is nested
    assert len(fitted) >= 3
    assert len(set(fitted)) == len(fitted)
