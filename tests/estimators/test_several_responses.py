"""Several responses: MoERegressor(covariance_type=...) against Gaussian mixtures and OLS.

With no features the model is a Gaussian mixture of y, which scikit-learn's
``GaussianMixture`` and R's mclust fit; with features and one expert, full
covariances are multivariate least squares.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pandas as pd
import pytest
from r_packages import r_has
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.datasets import load_iris
from sklearn.mixture import GaussianMixture

from moekit import MoERegressor, load
from moekit.mvn_prediction import GaussianMixturePrediction

TYPES = ["full", "tied", "diag", "spherical"]
MCLUST = {"full": "VVV", "tied": "EEE", "diag": "VVI", "spherical": "VII"}

# Rscript -e 'library(mclust); for (G in 2:3) for (mn in c("VVV","EEE","VVI","VII"))
#   print(Mclust(iris[, 1:4], G = G, modelNames = mn)$loglik)'   (mclust 6.0.0)
MCLUST_IRIS = {
    (2, "full"): -214.354704, (2, "tied"): -296.447575,
    (2, "diag"): -386.185347, (2, "spherical"): -478.559096,
    (3, "full"): -180.185839, (3, "tied"): -256.354743,
    (3, "diag"): -307.180833, (3, "spherical"): -384.316804,
}  # fmt: skip


@pytest.fixture(scope="module")
def iris():
    return load_iris().data


def _total(m, X, y) -> float:
    return m.log_likelihood(X, y) * len(y)


def _no_features(n):
    return np.empty((n, 0))


@pytest.fixture(scope="module")
def iris_fits(iris):
    return {
        (K, ct): MoERegressor(K, covariance_type=ct, random_state=0).fit(_no_features(150), iris)
        for K in (2, 3)
        for ct in TYPES
    }


@pytest.mark.parametrize("ct", TYPES)
def test_no_features_reaches_gaussian_mixture(iris, iris_fits, ct):
    n = len(iris)
    g = GaussianMixture(3, covariance_type=ct, n_init=10, random_state=0).fit(iris)
    ours = _total(iris_fits[3, ct], _no_features(n), iris)
    assert ours >= g.score(iris) * n - 1e-3 * n


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("ct", TYPES)
def test_no_features_reaches_mclust(iris, iris_fits, K, ct):
    ours = _total(iris_fits[K, ct], _no_features(150), iris)
    assert ours >= MCLUST_IRIS[K, ct] - 1e-3 * 150


@pytest.mark.r
@pytest.mark.skipif(not r_has("mclust"), reason="R with the mclust package is not installed")
@pytest.mark.parametrize("data", ["faithful", "iris[, 1:4]"])
def test_no_features_reaches_live_mclust(tmp_path, data):
    script = (
        f"suppressMessages(library(mclust)); X <- {data};"
        f"write.csv(X, '{tmp_path}/x.csv', row.names=FALSE);"
        "r <- sapply(c('VVV','EEE','VVI','VII'), function(mn)"
        " Mclust(X, G=2, modelNames=mn, verbose=FALSE)$loglik);"
        f"write.csv(data.frame(model=names(r), loglik=r), '{tmp_path}/ll.csv', row.names=FALSE)"
    )
    subprocess.run(["Rscript", "-e", script], check=True, capture_output=True)
    y = pd.read_csv(tmp_path / "x.csv").to_numpy(float)
    r = dict(pd.read_csv(tmp_path / "ll.csv").itertuples(index=False, name=None))
    for ct in TYPES:
        m = MoERegressor(2, covariance_type=ct, random_state=0).fit(_no_features(len(y)), y)
        assert _total(m, _no_features(len(y)), y) >= r[MCLUST[ct]] - 1e-3 * len(y), ct


@pytest.mark.parametrize("ct", TYPES)
def test_log_likelihood_is_in_the_data_units(iris, iris_fits, ct):
    """The reported likelihood is the density of y (standardisation's Jacobian included):
    the mixture of the fitted normals in y's units, evaluated directly, and rescaling y
    by D shifts it by exactly -n log|D|."""
    m = iris_fits[3, ct]
    d = m.predict_distribution(_no_features(1))
    w, mu, cov = d.weights[0], d.means[0], m.covariances_
    direct = logsumexp(
        [np.log(w[k]) + multivariate_normal(mu[k], cov[k]).logpdf(iris) for k in range(3)], axis=0
    ).sum()
    assert _total(m, _no_features(150), iris) == pytest.approx(direct, abs=1e-8)
    # spherical covariances are spherical in y's units: only a common scale keeps them so
    scale = np.full(4, 10.0) if ct == "spherical" else np.array([10.0, 0.1, 3.0, 0.5])
    m2 = MoERegressor(3, covariance_type=ct, random_state=0).fit(_no_features(150), iris * scale)
    shifted = _total(m2, _no_features(150), iris * scale) + 150 * np.log(scale).sum()
    assert shifted == pytest.approx(_total(m, _no_features(150), iris), abs=1e-4)


def _regression(n=400, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2))
    B = np.array([[1.0, -2.0, 0.5], [0.3, 0.0, 2.0]])  # (q=3 outputs) via X @ B
    noise = rng.multivariate_normal(np.zeros(3), [[1.0, 0.8, 0.2], [0.8, 1.0, 0.0],
                                                   [0.2, 0.0, 0.5]], size=n)  # fmt: skip
    return X, X @ B + [1.0, 2.0, 3.0] + noise


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_one_full_expert_is_multivariate_least_squares():
    X, y = _regression()
    m = MoERegressor(1, covariance_type="full", n_init=1, tol=0).fit(X, y)
    design = np.c_[np.ones(len(X)), X]
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)  # (3, q)
    resid = y - design @ beta
    np.testing.assert_allclose(m.intercept_[0], beta[0], rtol=0, atol=1e-8)
    np.testing.assert_allclose(m.coef_[0], beta[1:].T, rtol=0, atol=1e-8)
    np.testing.assert_allclose(m.covariances_[0], resid.T @ resid / len(X), rtol=0, atol=1e-8)
    np.testing.assert_allclose(m.predict(X), design @ beta, rtol=0, atol=1e-8)
    # standard errors of the coefficients: sqrt(Sigma_jj [(X^T X)^{-1}]_aa) at the MLE
    table = m.summary().table
    se = table.loc[table["parameter"].str.contains("intercept|x"), "std_error"].to_numpy()
    want = np.sqrt(np.outer(np.diag(resid.T @ resid / len(X)),
                            np.diag(np.linalg.inv(design.T @ design))))  # (q, 3)  # fmt: skip
    np.testing.assert_allclose(se, want.ravel(), rtol=1e-5)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("ct", TYPES)
def test_log_likelihood_never_decreases(ct):
    X, y = _regression(seed=1)
    y[: len(y) // 2] *= -1  # two regimes for the gate to find
    m = MoERegressor(2, covariance_type=ct, init="random", n_init=1, init_max_iter=0,
                     tol=1e-12, max_iter=100, random_state=0).fit(X, y)  # fmt: skip
    history = np.asarray(m.log_likelihood_history_)
    assert len(history) > 3
    assert (np.diff(history) >= -1e-10).all(), np.diff(history).min()


def test_full_started_from_diag_never_fits_worse():
    X, y = _regression(seed=2)
    y[::2] = -y[::2]
    diag = MoERegressor(2, covariance_type="diag", n_init=2, random_state=0).fit(X, y)
    full = MoERegressor(2, covariance_type="full", n_init=2, random_state=0)
    full.fit(X, y, start_from=diag)
    assert full.log_likelihood_ >= diag.log_likelihood_ - 1e-12


def test_prediction_is_the_q_variate_mixture():
    X, y = _regression(seed=3)
    m = MoERegressor(2, covariance_type="full", n_init=2, random_state=0).fit(X, y)
    d = m.predict_distribution(X[:5])
    assert isinstance(d, GaussianMixturePrediction)
    assert d.means.shape == (5, 2, 3) and d.covariances.shape == (5, 2, 3, 3)
    assert m.predict(X[:5]).shape == (5, 3)
    np.testing.assert_allclose(d.mean(), m.predict(X[:5]), atol=1e-10)
    # the joint density is the mixture of the fitted normals
    w, mu, cov = d.weights, d.means, d.covariances
    want = [logsumexp([np.log(w[i, k]) + multivariate_normal(mu[i, k], cov[i, k]).logpdf(y[i])
                       for k in range(2)]) for i in range(5)]  # fmt: skip
    np.testing.assert_allclose(d.logpdf(y[:5]), want, atol=1e-10)
    # samples have the mixture's mean and covariance
    s = d[:1].sample(40_000, random_state=0)[0]
    np.testing.assert_allclose(s.mean(0), d.mean()[0], atol=0.03)
    np.testing.assert_allclose(np.cov(s.T), d.cov()[0], atol=0.05)
    lo, hi = d.interval(0.9)
    assert lo.shape == (5, 3) and (lo < d.mean()).all() and (d.mean() < hi).all()
    assert d[2:4].covariances.shape == (2, 2, 3, 3)


def test_modes_of_a_correlated_mixture_are_its_separated_means():
    mu = np.array([[[0.0, 0.0], [6.0, 6.0]]])
    cov = np.array([[[1.0, 0.9], [0.9, 1.0]], [[1.0, -0.5], [-0.5, 1.0]]])
    d = GaussianMixturePrediction([[0.5, 0.5]], mu, cov)
    modes = d.modes()[0]
    assert len(modes) == 2
    np.testing.assert_allclose(np.sort(modes, 0), mu[0], atol=1e-4)


def test_spherical_is_spherical_in_the_data_units():
    X, y = _regression(seed=4)
    y = y * [1.0, 100.0, 0.01]
    m = MoERegressor(2, covariance_type="spherical", n_init=2, random_state=0).fit(X, y)
    for cov in m.covariances_:
        np.testing.assert_allclose(cov, cov[0, 0] * np.eye(3), rtol=1e-12, atol=0)
    tied = MoERegressor(2, covariance_type="tied", n_init=2, random_state=0).fit(X, y)
    np.testing.assert_allclose(tied.covariances_[0], tied.covariances_[1], rtol=1e-12)


@pytest.mark.parametrize("ct", ["full", "tied", "spherical"])
def test_model_files_restore_it(tmp_path, ct):
    X, y = _regression(seed=5)
    m = MoERegressor(2, covariance_type=ct, n_init=1, random_state=0).fit(X, y)
    m.save(tmp_path / "m.moe")
    back = load(tmp_path / "m.moe")
    assert back.covariance_type == ct
    np.testing.assert_array_equal(back.predict(X), m.predict(X))
    np.testing.assert_array_equal(back.covariances_, m.covariances_)
    assert back.log_likelihood(X, y) == m.log_likelihood(X, y)


def test_bad_covariance_types_are_named():
    X, y = _regression(n=50)
    with pytest.raises(ValueError, match="'covariance_type' parameter of MoERegressor must be"):
        MoERegressor(2, covariance_type="VVV").fit(X, y)
    with pytest.raises(ValueError, match=r"covariance_type='full' is for Gaussian experts"):
        MoERegressor(2, covariance_type="full", expert="poisson").fit(X, np.abs(y[:, 0]))
