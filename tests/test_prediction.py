"""MixturePrediction against closed forms, Monte Carlo and brute-force grids."""

import numpy as np
import pytest
from scipy import stats

from moekit import MixturePrediction


@pytest.fixture
def mix():
    w = np.array([[0.5, 0.5], [0.3, 0.7], [0.9, 0.1]])
    mu = np.array([[-1.0, 1.0], [0.0, 3.0], [2.0, 2.5]])
    sd = np.array([[0.2, 0.2], [1.0, 0.3], [0.5, 1.0]])
    return MixturePrediction(w, mu, sd), w, mu, sd


def test_moments_and_density_match_scipy(mix):
    d, w, mu, sd = mix
    np.testing.assert_allclose(d.mean(), (w * mu).sum(1))
    second = (w * (sd**2 + mu**2)).sum(1)
    np.testing.assert_allclose(d.var(), second - d.mean() ** 2)
    y = np.array([0.1, 2.0, -1.0])
    ref = np.log((w * stats.norm.pdf(y[:, None], mu, sd)).sum(1))
    np.testing.assert_allclose(d.logpdf(y), ref, rtol=1e-12)
    np.testing.assert_allclose(d.cdf(y), (w * stats.norm.cdf(y[:, None], mu, sd)).sum(1))


def test_samples_follow_the_mixture(mix):
    d, *_ = mix
    s = d.sample(200_000, random_state=0)
    assert s.shape == (3, 200_000)
    np.testing.assert_allclose(s.mean(1), d.mean(), atol=0.01)
    np.testing.assert_allclose(s.var(1), d.var(), rtol=0.02)
    np.testing.assert_array_equal(s, d.sample(200_000, random_state=0))


def test_interval_holds_its_mass(mix):
    d, *_ = mix
    lo, hi = d.interval(0.9)
    np.testing.assert_allclose(d.cdf(hi) - d.cdf(lo), 0.9, atol=1e-10)
    np.testing.assert_allclose(d.cdf(lo), 0.05, atol=1e-10)
    q = d.quantile(0.3)
    np.testing.assert_allclose(d.cdf(q), 0.3, atol=1e-10)


def test_modes_are_the_density_maxima_found_on_a_grid(mix):
    d, *_ = mix
    grid = np.linspace(-4, 7, 220_001)
    for i, found in enumerate(d.modes()):
        row = MixturePrediction(
            d.weights[[i] * len(grid)], d.means[[i] * len(grid)], d.stds[[i] * len(grid)]
        )
        p = row.pdf(grid)
        peaks = grid[1:-1][(p[1:-1] > p[:-2]) & (p[1:-1] > p[2:])]
        np.testing.assert_allclose(np.sort(found), np.sort(peaks), atol=1e-4)


def test_close_components_merge_into_one_mode():
    d = MixturePrediction([[0.5, 0.5]], [[-0.5, 0.5]], [[1.0, 1.0]])  # unimodal: |mu1-mu2| < 2 sd
    (modes,) = d.modes()
    np.testing.assert_allclose(modes, [0.0], atol=1e-6)
    d2 = MixturePrediction([[0.5, 0.5]], [[-1.5, 1.5]], [[1.0, 1.0]])  # bimodal
    assert len(d2.modes()[0]) == 2


def test_multi_output_shapes_and_values():
    w = np.array([[0.4, 0.6]])
    mu = np.array([[[0.0, 0.0], [3.0, -3.0]]])
    sd = np.array([[[1.0, 0.5], [0.5, 1.0]]])
    d = MixturePrediction(w, mu, sd)
    assert d.n_outputs == 2 and d.mean().shape == (1, 2) and d.var().shape == (1, 2)
    y = np.array([[0.5, -0.5]])
    ref = np.log(sum(w[0, k] * stats.norm.pdf(y[0], mu[0, k], sd[0, k]).prod() for k in range(2)))
    np.testing.assert_allclose(d.logpdf(y), [ref])
    assert d.sample(7, random_state=1).shape == (1, 7, 2)
    lo, hi = d.interval(0.5)
    assert lo.shape == (1, 2) and (lo < hi).all()
    modes, dens = d.modes(return_density=True)[0]
    assert modes.shape == (2, 2) and dens[0] >= dens[1]
    np.testing.assert_allclose(modes[np.argmin(modes[:, 0])], [0.0, 0.0], atol=1e-3)


def test_bad_arrays_are_refused():
    with pytest.raises(ValueError, match="sum to 1"):
        MixturePrediction([[0.5, 0.6]], [[0.0, 1.0]], [[1.0, 1.0]])
    with pytest.raises(ValueError, match="stds must be positive"):
        MixturePrediction([[0.5, 0.5]], [[0.0, 1.0]], [[1.0, 0.0]])
    with pytest.raises(ValueError, match="means must have shape"):
        MixturePrediction([[0.5, 0.5]], [[0.0, 1.0, 2.0]], [[1.0, 1.0, 1.0]])
    d = MixturePrediction([[1.0]], [[0.0]], [[1.0]])
    with pytest.raises(ValueError, match="y must have shape"):
        d.logpdf([[0.0, 1.0]])
    with pytest.raises(ValueError, match="alpha must be in"):
        d.interval(1.5)
    with pytest.raises(ValueError, match="n_samples must be a positive int"):
        d.sample(0)


def test_negligible_modes_can_be_hidden():
    d = MixturePrediction([[0.98, 0.02]], [[0.0, 10.0]], [[1.0, 1.0]])
    assert len(d.modes()[0]) == 2
    (kept,) = d.modes(min_relative_density=0.05)
    np.testing.assert_allclose(kept, [0.0], atol=1e-8)
    with pytest.raises(ValueError, match="min_relative_density"):
        d.modes(min_relative_density=1.5)
