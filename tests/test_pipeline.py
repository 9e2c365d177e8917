"""``moekit.predict_distribution``: p(y | x) of a fitted pipeline ending in a mixture."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LinearRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import PolynomialFeatures, StandardScaler

import moekit
from moekit import MoERegressor, predict_distribution


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 2)) * [1.0, 50.0] + [0.0, 100.0]
    y = np.where(X[:, 0] > 0, 2 * X[:, 0], -X[:, 0]) + 0.1 * rng.normal(size=200)
    return X, y


def test_a_pipeline_gives_its_last_steps_distribution_of_the_transformed_rows(data):
    X, y = data
    pipe = make_pipeline(StandardScaler(), PolynomialFeatures(2, include_bias=False),
                         MoERegressor(2, n_init=1, random_state=0)).fit(X, y)  # fmt: skip
    got = predict_distribution(pipe, X[:7])
    want = pipe[-1].predict_distribution(pipe[:-1].transform(X[:7]))
    for attr in ("weights", "means", "stds"):
        np.testing.assert_array_equal(getattr(got, attr), getattr(want, attr))
    np.testing.assert_allclose(got.mean(), pipe.predict(X[:7]))  # the route predict takes


def test_a_bare_estimator_and_a_one_step_pipeline_work_too(data):
    X, y = data
    model = MoERegressor(2, n_init=1, random_state=0).fit(X, y)
    np.testing.assert_array_equal(predict_distribution(model, X[:5]).means,
                                  model.predict_distribution(X[:5]).means)  # fmt: skip
    pipe = make_pipeline(MoERegressor(2, n_init=1, random_state=0)).fit(X, y)
    np.testing.assert_array_equal(predict_distribution(pipe, X[:5]).means,
                                  model.predict_distribution(X[:5]).means)  # fmt: skip
    assert moekit.predict_distribution is predict_distribution


def test_a_last_step_without_a_distribution_is_a_clear_error(data):
    X, y = data
    pipe = make_pipeline(StandardScaler(), LinearRegression()).fit(X, y)
    with pytest.raises(TypeError, match="the pipeline's last step, LinearRegression, has no "
                                        "predict_distribution"):  # fmt: skip
        predict_distribution(pipe, X)
    with pytest.raises(TypeError, match="LinearRegression, has no predict_distribution"):
        predict_distribution(pipe[-1], X)
