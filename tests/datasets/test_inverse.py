"""The inverse-problem generators: data lie on the forward map, inverses are exact."""

import numpy as np
import pytest

from moekit.datasets import make_bishop_inverse, make_robot_arm


def test_bishop_data_lie_within_the_noise_of_the_forward_map():
    prob = make_bishop_inverse(500, noise=0.1, random_state=0)
    assert prob.X.shape == (500, 1) and prob.y.shape == (500,)
    assert ((prob.y >= 0) & (prob.y <= 1)).all()
    resid = prob.X - prob.forward(prob.y)
    assert np.abs(resid).max() <= 0.1
    # uniform noise on (-0.1, 0.1): its standard deviation is 0.1 / sqrt(3)
    assert resid.std() == pytest.approx(0.1 / np.sqrt(3), rel=0.1)


def test_bishop_inverse_finds_every_branch():
    prob = make_bishop_inverse(10, random_state=0)
    x = np.array([[0.1], [0.5], [0.9]])
    roots = prob.inverse(x)
    assert [len(r) for r in roots] == [1, 3, 1]
    for xi, r in zip(x[:, 0], roots, strict=True):
        np.testing.assert_allclose(prob.forward(r)[:, 0], xi, atol=1e-12)
    # every noise-free x gives back the t it came from among its roots
    t = np.linspace(0.01, 0.99, 50)
    back = prob.inverse(prob.forward(t))
    assert all(np.abs(r - ti).min() < 1e-9 for r, ti in zip(back, t, strict=True))


def test_same_seed_same_data():
    a, b = make_bishop_inverse(20, random_state=3), make_bishop_inverse(20, random_state=3)
    np.testing.assert_array_equal(a.X, b.X)
    a, b = make_robot_arm(20, random_state=3), make_robot_arm(20, random_state=3)
    np.testing.assert_array_equal(a.y, b.y)


def test_robot_arm_forward_and_both_analytic_inverses():
    prob = make_robot_arm(400, noise=0.01, random_state=0)
    assert prob.X.shape == (400, 2) and prob.y.shape == (400, 2)
    assert np.abs(prob.X - prob.forward(prob.y)).max() < 0.06  # 6 sigma
    clean = prob.forward(prob.y)
    sols = prob.forward.solutions(clean)  # (n, 2, 2): elbow up, elbow down
    for s in range(2):
        np.testing.assert_allclose(prob.forward(sols[:, s]), clean, atol=1e-9)
    assert (sols[:, 0, 1] >= 0).all() and (sols[:, 1, 1] <= 0).all()
    # the generating angles are one of the in-range solutions
    for angles, found in zip(prob.y, prob.inverse(clean), strict=True):
        assert np.abs(found - angles).max(axis=1).min() < 1e-8
    # most hand positions are reached by both elbow configurations
    both = np.mean([len(v) == 2 for v in prob.inverse(clean)])
    assert both > 0.5


@pytest.mark.parametrize(
    ("make", "kwargs", "match"),
    [
        (make_bishop_inverse, {"n_samples": 0}, "n_samples"),
        (make_bishop_inverse, {"noise": -1.0}, "noise"),
        (make_robot_arm, {"noise": float("nan")}, "noise"),
        (make_robot_arm, {"link_lengths": (1.0, 0.0)}, "link_lengths"),
        (make_robot_arm, {"theta1_range": (0.0, 7.0)}, "theta1_range"),
        (make_robot_arm, {"theta2_max": 4.0}, "theta2_max"),
    ],
)
def test_bad_arguments_are_named(make, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)
