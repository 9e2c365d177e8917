"""The MMoE paper's two-task generator: geometry, labels, and the label correlation."""

import math

import numpy as np
import pytest

from moekit.datasets import make_multitask_regression, make_multitask_truth


def test_weight_vectors_have_norm_c_and_cosine_p():
    truth = make_multitask_truth(50, correlation=0.3, scale=2.0, random_state=0)
    w1, w2 = truth.weights
    assert truth.weights.shape == (2, 50)
    np.testing.assert_allclose([w1 @ w1, w2 @ w2], [4.0, 4.0], rtol=1e-12)
    assert w1 @ w2 / 4.0 == pytest.approx(0.3, abs=1e-12)
    # w2 = c (p u1 + sqrt(1 - p^2) u2) with u2 orthogonal to u1 = w1 / c
    u2 = (w2 / 2.0 - 0.3 * w1 / 2.0) / math.sqrt(1 - 0.3**2)
    assert u2 @ w1 == pytest.approx(0.0, abs=1e-12)
    assert u2 @ u2 == pytest.approx(1.0, abs=1e-12)


def test_labels_follow_the_formula_with_the_stated_noise():
    X, y, truth = make_multitask_regression(20_000, 20, 0.5, noise_std=0.1, random_state=1)
    assert X.shape == (20_000, 20) and y.shape == (20_000, 2)
    mean = np.empty_like(y)
    for t in range(2):  # the paper's formula written out, one sine at a time
        z = X @ truth.weights[t]
        sines = [np.sin(a * z + b) for a, b in zip(truth.alpha, truth.beta, strict=True)]
        mean[:, t] = z + np.sum(sines, axis=0)
    np.testing.assert_allclose(truth.mean(X), mean, rtol=1e-12, atol=1e-12)
    resid = y - mean
    assert resid.std(axis=0) == pytest.approx([0.1, 0.1], rel=0.03)
    assert abs(np.corrcoef(resid.T)[0, 1]) < 0.03  # independent noise per task
    assert len(truth.alpha) == len(truth.beta) == 10


@pytest.mark.parametrize("p", [-0.5, 0.0, 0.5, 0.9, 1.0])
def test_exact_label_covariance_matches_a_large_sample(p):
    truth = make_multitask_truth(20, correlation=p, random_state=2)  # d does not enter
    n = 100_000
    _, y = truth.sample(n, random_state=3)
    exact = truth.label_covariance()
    # four standard errors: a (co)variance from n draws is off by about var * sqrt(2 / n),
    # a correlation by about (1 - rho^2) / sqrt(n)
    tol = 4 * exact[0, 0] * np.sqrt(2 / n)
    np.testing.assert_allclose(np.cov(y.T), exact, rtol=0, atol=tol)
    assert np.corrcoef(y.T)[0, 1] == pytest.approx(truth.label_correlation(), abs=4 / np.sqrt(n))


def test_label_correlation_is_monotone_in_p_and_near_one_at_one():
    ps = [0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0]
    for seed in range(5):
        truths = [make_multitask_truth(correlation=p, random_state=seed) for p in ps]
        exact = [truth.label_correlation() for truth in truths]
        assert np.all(np.diff(exact) > 0), exact
        assert exact[0] == pytest.approx(0.0, abs=1e-12)
        # at p = 1 the labels differ by the noise alone: Var g / (Var g + sigma^2)
        assert 0.9 < exact[-1] < 1.0
        noiseless = make_multitask_truth(correlation=1.0, noise_std=0.0, random_state=seed)
        assert noiseless.label_correlation() == pytest.approx(1.0, abs=1e-12)
    # the sampled labels agree: same seed, so the same x, directions and sines for every p
    sampled = [
        np.corrcoef(make_multitask_regression(20_000, correlation=p, random_state=7)[1].T)[0, 1]
        for p in ps
    ]
    assert np.all(np.diff(sampled) > 0), sampled


def test_same_seed_same_data_and_p_changes_only_the_labels():
    a = make_multitask_regression(50, correlation=0.5, random_state=4)
    b = make_multitask_regression(50, correlation=0.5, random_state=4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    c = make_multitask_regression(50, correlation=0.9, random_state=4)
    np.testing.assert_array_equal(a[0], c[0])
    np.testing.assert_array_equal(a[2].weights[0], c[2].weights[0])
    np.testing.assert_array_equal(a[1][:, 0], c[1][:, 0])  # task 1 does not depend on p
    assert not np.allclose(a[1][:, 1], c[1][:, 1])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_samples": 0}, "n_samples"),
        ({"n_samples": 2.5}, "n_samples"),
        ({"n_features": 1}, "n_features"),
        ({"correlation": 1.5}, "correlation"),
        ({"correlation": float("nan")}, "correlation"),
        ({"scale": 0.0}, "scale"),
        ({"scale": float("inf")}, "scale"),
        ({"n_sines": -1}, "n_sines"),
        ({"noise_std": -0.1}, "noise_std"),
        ({"random_state": "zero"}, "random_state"),
    ],
)
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=f"'{name}' parameter of make_multitask"):
        make_multitask_regression(**kwargs)
