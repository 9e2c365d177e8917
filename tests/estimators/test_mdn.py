"""MDNRegressor: multimodal inverse problems, the estimator contract, model files."""

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning, NotFittedError

import moekit
from moekit import MDNRegressor, MixturePrediction, MoERegressor
from moekit._core.validation import InvalidParameterError
from moekit.datasets import make_bishop_inverse, make_robot_arm

# Small, fast settings that still fit Bishop's problem well (a few seconds).
BISHOP_MDN = dict(hidden_layer_sizes=(32,), learning_rate=1e-2, batch_size=200, random_state=0)


def _fit_quietly(model, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(X, y)


# ------------------------------------------------------------------ Bishop (1994)
@pytest.fixture(scope="module")
def bishop():
    train = make_bishop_inverse(1000, random_state=0)
    test = make_bishop_inverse(1000, random_state=1)
    models = {
        "mdn": MDNRegressor(3, **BISHOP_MDN),
        "moe": MoERegressor(5, n_init=3, random_state=0),
    }
    for m in models.values():
        _fit_quietly(m, train.X, train.y)
    return train, test, models


def _best_single_gaussian(prob, X):
    """Mean and variance of the true p(t | x): no Gaussian predicts t better.

    With e ~ U(-noise, noise) and t ~ U(0, 1), p(t | x) is uniform on the t with
    |x - f(t)| <= noise; the moment-matched Gaussian maximises E[log q(t | x)]
    over all Gaussians q, so it bounds every single-Gaussian model from above.
    """
    t = np.linspace(0.0, 1.0, 20001)
    w = (np.abs(X - prob.forward(t)[:, 0][None]) <= prob.noise).astype(float)
    w /= w.sum(1, keepdims=True)
    mean = w @ t
    return mean, w @ t**2 - mean**2


@pytest.mark.parametrize("name", ["mdn", "moe"])
def test_bishop_mixtures_beat_a_single_gaussian_by_a_wide_margin(bishop, name):
    train, test, models = bishop
    ll = models[name].log_likelihood(test.X, test.y)
    mean, var = _best_single_gaussian(train, test.X)
    best_single = np.mean(-0.5 * (np.log(2 * np.pi * var) + (test.y - mean) ** 2 / var))
    linear = MoERegressor(1).fit(train.X, train.y).log_likelihood(test.X, test.y)
    assert best_single > linear
    assert ll > best_single + 0.3, (ll, best_single)
    # and they come close to the true conditional density's 1.27 nats per sample
    assert ll > 0.9


@pytest.mark.parametrize("name", ["mdn", "moe"])
def test_bishop_modes_sit_on_the_branches_of_the_inverse(bishop, name):
    train, _, models = bishop
    x = np.array([[0.45], [0.5], [0.55], [0.1], [0.9]])
    roots = train.inverse(x)
    modes = models[name].predict_distribution(x).modes()
    for r, md in zip(roots[:3], modes[:3], strict=True):  # found: the branches with a mode
        assert len(r) == 3  # three branches of t for these x
        found = {int(np.argmin(np.abs(r - v))) for v in md if np.abs(r - v).min() < 0.06}
        assert len(found) >= 2, (r, md)
    for r, md in zip(roots[3:], modes[3:], strict=True):
        assert len(r) == 1
        assert abs(md[0] - r[0]) < 0.05  # the highest mode is the single branch


def test_bishop_samples_pushed_through_the_forward_map_land_within_the_noise(bishop):
    train, test, models = bishop
    three = np.array([len(r) == 3 for r in test.inverse(test.X)])
    X3 = test.X[three]  # where the inverse is multimodal

    def miss(model):
        s = model.predict_distribution(X3).sample(100, random_state=0)  # (n, 100)
        return np.abs(train.forward(s.reshape(-1)).reshape(s.shape) - X3)

    mdn = miss(models["mdn"])
    # the exact posterior puts every sample within the noise (|e| <= 0.1)
    assert np.mean(mdn <= train.noise) > 0.9
    assert np.quantile(mdn, 0.99) < 2 * train.noise
    # the best single Gaussian puts its mass between the branches too
    mean, var = _best_single_gaussian(train, X3)
    s = mean[:, None] + np.sqrt(var)[:, None] * np.random.default_rng(0).normal(size=(len(X3), 100))
    single = np.abs(train.forward(s.reshape(-1)).reshape(s.shape) - X3)
    assert np.mean(single <= train.noise) < 0.8


# ------------------------------------------------------------------ robot arm
def test_robot_arm_sampled_angles_reach_the_target_mean_angles_do_not():
    train = make_robot_arm(3000, random_state=0)
    test = make_robot_arm(200, random_state=1)
    mdn = MDNRegressor(
        3, hidden_layer_sizes=(64, 64), activation="relu", learning_rate=3e-3, random_state=0
    )
    _fit_quietly(mdn, train.X, train.y)
    samples = mdn.predict_distribution(test.X).sample(50, random_state=0)  # (n, 50, 2)
    reached = test.forward(samples.reshape(-1, 2)).reshape(samples.shape)
    err_samples = np.linalg.norm(reached - test.X[:, None], axis=2)
    err_mean = np.linalg.norm(test.forward(mdn.predict(test.X)) - test.X, axis=1)
    assert np.median(err_samples) * 3 < np.median(err_mean), (
        np.median(err_samples),
        np.median(err_mean),
    )
    assert np.median(err_samples) < 5 * train.noise

    # targets that both elbow configurations reach, clearly apart: both are sampled
    sols = test.forward.solutions(test.X)  # (n, 2, 2), elbow up then down
    two = np.array([len(v) == 2 for v in test.inverse(test.X)]) & (np.abs(sols[:, 0, 1]) > 0.5)
    assert two.sum() > 50

    def near(s, target):  # (50, 2) samples within 0.2 rad of a solution
        return np.abs(s - target).max(axis=1) < 0.2

    both = [
        near(samples[i], sols[i, 0]).any() and near(samples[i], sols[i, 1]).any()
        for i in np.flatnonzero(two)
    ]
    assert np.mean(both) > 0.9


# ------------------------------------------------------------------ contract
@pytest.fixture(scope="module")
def small():
    prob = make_bishop_inverse(300, random_state=2)
    model = MDNRegressor(
        3, hidden_layer_sizes=(16,), learning_rate=1e-2, max_iter=60, random_state=0
    )
    return prob, _fit_quietly(model, prob.X, prob.y)


def test_predictions_have_the_contract_shapes(small):
    prob, m = small
    d = m.predict_distribution(prob.X[:7])
    assert isinstance(d, MixturePrediction)
    assert d.weights.shape == (7, 3) and d.means.shape == (7, 3) and d.stds.shape == (7, 3)
    assert m.predict(prob.X[:7]).shape == (7,)
    np.testing.assert_allclose(m.predict(prob.X[:7]), d.mean(), rtol=1e-12)
    assert m.log_likelihood_samples(prob.X[:7], prob.y[:7]).shape == (7,)
    assert -1 <= m.score(prob.X, prob.y) <= 1
    assert m.n_iter_ == len(m.log_likelihood_history_) == len(m.validation_scores_)
    assert m.best_validation_score_ == max(m.validation_scores_)


def test_log_likelihood_agrees_with_the_predictive_density(small):
    prob, m = small
    ll = m.log_likelihood(prob.X, prob.y)
    assert ll == pytest.approx(np.mean(m.predict_distribution(prob.X).logpdf(prob.y)), abs=1e-10)
    assert m.log_likelihood_ == pytest.approx(ll, abs=1e-12)


def test_units_are_the_users():
    """Rescaling y by 10 changes nothing inside and lowers log p(y|x) by log 10 exactly."""
    prob = make_bishop_inverse(200, random_state=3)
    kw = dict(hidden_layer_sizes=(8,), learning_rate=1e-2, max_iter=15, random_state=0)
    a = _fit_quietly(MDNRegressor(2, **kw), prob.X, prob.y)
    b = _fit_quietly(MDNRegressor(2, **kw), prob.X, 10 * prob.y + 3)
    np.testing.assert_allclose(b.predict(prob.X), 10 * a.predict(prob.X) + 3, rtol=1e-4)
    assert b.log_likelihood(prob.X, 10 * prob.y + 3) == pytest.approx(
        a.log_likelihood(prob.X, prob.y) - np.log(10), abs=1e-4
    )


def test_multi_output_target():
    prob = make_robot_arm(300, random_state=0)
    m = _fit_quietly(
        MDNRegressor(2, hidden_layer_sizes=(16,), learning_rate=1e-2, max_iter=10, random_state=0),
        prob.X,
        prob.y,
    )
    d = m.predict_distribution(prob.X[:5])
    assert d.means.shape == (5, 2, 2) and d.stds.shape == (5, 2, 2)
    assert m.predict(prob.X[:5]).shape == (5, 2)
    assert d.sample(4, random_state=0).shape == (5, 4, 2)
    assert d.logpdf(prob.y[:5]).shape == (5,)
    assert np.isfinite(m.log_likelihood(prob.X, prob.y))
    with pytest.raises(ValueError, match="y must have shape"):
        m.log_likelihood(prob.X, prob.y[:, 0])


def test_random_state_makes_runs_reproducible():
    prob = make_bishop_inverse(200, random_state=4)
    kw = dict(hidden_layer_sizes=(8,), max_iter=5)
    a = _fit_quietly(MDNRegressor(2, random_state=1, **kw), prob.X, prob.y).predict(prob.X)
    b = _fit_quietly(MDNRegressor(2, random_state=1, **kw), prob.X, prob.y).predict(prob.X)
    c = _fit_quietly(MDNRegressor(2, random_state=2, **kw), prob.X, prob.y).predict(prob.X)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_early_stopping_off_trains_on_every_row():
    prob = make_bishop_inverse(200, random_state=5)
    m = MDNRegressor(2, hidden_layer_sizes=(8,), learning_rate=1e-2, early_stopping=False,
                     n_iter_no_change=3, tol=1e-2, max_iter=500, random_state=0)  # fmt: skip
    m.fit(prob.X, prob.y)
    assert m.converged_ and m.n_iter_ < 500
    assert m.validation_scores_ is None and m.best_validation_score_ is None


def test_max_iter_reached_warns():
    prob = make_bishop_inverse(100, random_state=6)
    with pytest.warns(ConvergenceWarning, match="max_iter=2"):
        MDNRegressor(2, hidden_layer_sizes=(4,), max_iter=2).fit(prob.X, prob.y)


def test_verbose_shows_a_progress_bar(capsys):
    prob = make_bishop_inverse(100, random_state=7)
    _fit_quietly(MDNRegressor(2, hidden_layer_sizes=(4,), max_iter=3, verbose=1), prob.X, prob.y)
    assert "MDN" in capsys.readouterr().err


def test_save_and_load_round_trip(small, tmp_path):
    prob, m = small
    path = tmp_path / "mdn.moe"
    m.save(path)
    back = moekit.load(path)
    assert isinstance(back, MDNRegressor) and back.get_params() == m.get_params()
    np.testing.assert_array_equal(back.predict(prob.X), m.predict(prob.X))
    assert back.log_likelihood(prob.X, prob.y) == m.log_likelihood(prob.X, prob.y)
    assert back.n_iter_ == m.n_iter_ and back.validation_scores_ == m.validation_scores_


def test_save_keeps_feature_names_and_2d_targets(tmp_path):
    prob = make_robot_arm(100, random_state=1)
    X = pd.DataFrame(prob.X, columns=["hx", "hy"])
    m = _fit_quietly(
        MDNRegressor(2, hidden_layer_sizes=(4,), max_iter=3, random_state=0), X, prob.y
    )
    m.save(tmp_path / "arm.moe")
    back = moekit.load(tmp_path / "arm.moe")
    assert list(back.feature_names_in_) == ["hx", "hy"]
    np.testing.assert_array_equal(back.predict(X), m.predict(X))


def test_a_damaged_file_is_refused(small, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, m = small
    m.save(tmp_path / "good.moe")
    with safe_open(str(tmp_path / "good.moe"), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys() if k != "net.head.weight"}
    save_file(tensors, str(tmp_path / "bad.moe"), metadata=meta)
    with pytest.raises(ValueError, match="does not hold a valid MDNRegressor"):
        moekit.load(tmp_path / "bad.moe")


def _rewrite(src, dst, edit=None, **state):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    if edit is not None:
        edit(tensors)
    meta["state"] = json.dumps({**json.loads(meta["state"]), **state})
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _poke(name, value):
    def edit(t):
        t[name] = t[name].clone()
        t[name].view(-1)[0] = value

    return edit


def _replace(name, fn):
    def edit(t):
        t[name] = fn(t[name]).contiguous()

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_poke("net.head.weight", np.nan), r"'net\.head\.weight' holds NaN or infinite"),
        (_poke("net.trunk.0.bias", np.inf), r"'net\.trunk\.0\.bias' holds NaN or infinite"),
        (_poke("x_scale", 0.0), "'x_scale' must be positive"),
        (_poke("y_scale", -1.0), "'y_scale' must be positive"),
        (_poke("y_mean", np.nan), "'y_mean' holds NaN"),
        (
            _replace("net.trunk.0.weight", lambda w: w.float()),
            r"'net\.trunk\.0\.weight' has dtype float32, expected float64",
        ),
        (_replace("x_mean", lambda w: w.to(torch.int64)), "'x_mean' has dtype int64"),
        (
            _replace("net.trunk.0.weight", lambda w: torch.cat([w, w])),
            r"'net\.trunk\.0\.weight' has shape \(32, 1\), expected \(16, 1\) from "
            r"n_features_in_=1, n_outputs=1, n_components=3, hidden_layer_sizes=\(16,\)",
        ),
        (_replace("y_mean", lambda v: v.repeat(2)), r"'y_mean' has shape \(2,\), expected \(1,\)"),
        (lambda t: t.update(extra=torch.zeros(1)), r"unexpected tensor\(s\) \['extra'\]"),
    ],
)
def test_nan_wrong_shapes_and_dtypes_are_refused(small, tmp_path, edit, message):
    _, m = small
    m.save(tmp_path / "good.moe")
    bad = _rewrite(tmp_path / "good.moe", tmp_path / "bad.moe", edit)
    with pytest.raises(ValueError, match="does not hold a valid MDNRegressor"):
        moekit.load(bad)
    with pytest.raises(ValueError, match=message):
        moekit.load(bad)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"n_outputs": 2}, "'y_2d' is false .*, but n_outputs=2"),
        ({"n_outputs": 2, "y_2d": True}, r"'y_mean' has shape \(1,\), expected \(2,\)"),
        ({"n_features_in_": 0}, "'n_features_in_' must be an int >= 1"),
        ({"validation_scores_": [1.0, "x"]}, "'validation_scores_' must be a list"),
        ({"best_validation_score_": None, "converged_": "yes"}, "'converged_' must be true"),
    ],
)
def test_settings_that_disagree_with_the_arrays_are_refused(small, tmp_path, state, message):
    _, m = small
    m.save(tmp_path / "good.moe")
    with pytest.raises(ValueError, match=message):
        moekit.load(_rewrite(tmp_path / "good.moe", tmp_path / "bad.moe", **state))


def test_network_shapes_are_stated_without_building_it():
    from moekit.fitting.mdn import _MDNNet, mdn_param_shapes

    net = _MDNNet(3, (4, 5), "tanh", 10)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert mdn_param_shapes(3, (4, 5), 10) == shapes


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"n_components": 0}, "n_components"),
        ({"hidden_layer_sizes": (8, 0)}, "hidden_layer_sizes"),
        ({"hidden_layer_sizes": ()}, "hidden_layer_sizes"),
        ({"hidden_layer_sizes": 8}, "hidden_layer_sizes"),
        ({"activation": "sigmoid"}, "activation"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"batch_size": 0}, "batch_size"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"min_std": -1.0}, "min_std"),
        ({"early_stopping": "yes"}, "early_stopping"),
    ],
)
def test_bad_parameters_are_named(params, name):
    prob = make_bishop_inverse(50, random_state=0)
    with pytest.raises(InvalidParameterError, match=f"The '{name}' parameter of MDNRegressor"):
        MDNRegressor(**params).fit(prob.X, prob.y)


def test_bad_data_and_unfitted_use_are_refused():
    prob = make_bishop_inverse(50, random_state=0)
    with pytest.raises(NotFittedError):
        MDNRegressor().predict(prob.X)
    X = prob.X.copy()
    X[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        MDNRegressor().fit(X, prob.y)
    with pytest.raises(ValueError, match="1 sample"):
        MDNRegressor().fit(prob.X[:1], prob.y[:1])
