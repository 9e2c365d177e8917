"""MoEClassifier against one logistic regression on real data."""

import warnings

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from moekit import MoEClassifier


def test_digits_as_good_as_logistic_regression_and_its_own_best_optimum():
    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    scaler = StandardScaler().fit(X_tr)
    X_tr, X_te = scaler.transform(X_tr), scaler.transform(X_te)
    lr = LogisticRegression(max_iter=5000).fit(X_tr, y_tr)
    kw = dict(n_experts=4, random_state=0, max_iter=100, tol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # collapsed experts are expected here (see below)
        moe = MoEClassifier(n_init=5, **kw).fit(X_tr, y_tr)
        kmeans = MoEClassifier(n_init=1, init="kmeans", **kw).fit(X_tr, y_tr)
    # the mixed starts reach a higher penalised likelihood than k-means alone; on digits
    # that optimum gives nearly all rows to one expert (the penalised likelihood does
    # not support four), so it predicts as well as one logistic regression
    assert moe.log_likelihood_history_[-1] >= kmeans.log_likelihood_history_[-1] - 1e-9
    acc_lr, acc_moe = (
        accuracy_score(y_te, lr.predict(X_te)),
        accuracy_score(y_te, moe.predict(X_te)),
    )
    ll_lr, ll_moe = log_loss(y_te, lr.predict_proba(X_te)), log_loss(y_te, moe.predict_proba(X_te))
    assert acc_moe >= acc_lr - 0.01, (acc_moe, acc_lr)
    assert ll_moe < 1.05 * ll_lr, (ll_moe, ll_lr)


def test_mixture_of_experts_solves_what_one_linear_model_cannot():
    """XOR: each quadrant pair needs its own linear boundary."""
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, (2000, 2))
    y = np.where(X[:, 0] > 0, X[:, 1] > 0.3 * X[:, 0], X[:, 1] < -0.5 * X[:, 0]).astype(int)
    lr = LogisticRegression().fit(X, y)
    moe = MoEClassifier(n_experts=2, n_init=3, random_state=0).fit(X, y)
    assert moe.score(X, y) > 0.95 > lr.score(X, y) + 0.2


def test_string_labels_probabilities_and_likelihood():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 2))
    labels = np.array(["cat", "dog", "emu"])
    y = labels[(X[:, 0] > 0).astype(int) + (X[:, 1] > 1).astype(int)]
    m = MoEClassifier(n_experts=2, random_state=0).fit(X, y)
    assert list(m.classes_) == ["cat", "dog", "emu"]
    p = m.predict_proba(X)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-12)
    assert set(m.predict(X)) <= set(labels)
    # mean log-likelihood is the mean log-probability of the observed classes
    expected = np.mean(np.log(p[np.arange(300), np.searchsorted(m.classes_, y)]))
    assert m.log_likelihood(X, y) == pytest.approx(expected, abs=1e-10)
    np.testing.assert_allclose(m.responsibilities(X, y).sum(1), 1.0, atol=1e-12)


def test_one_class_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 classes"):
        MoEClassifier(2).fit(np.zeros((10, 2)), np.ones(10))
    m = MoEClassifier(2, random_state=0).fit(
        np.random.default_rng(0).normal(size=(20, 2)), np.arange(20) % 2
    )
    with pytest.raises(ValueError, match="labels not seen in fit"):
        m.log_likelihood(np.zeros((2, 2)), [0, 7])


def test_one_expert_is_a_logistic_regression():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 2)) * [3, 1] + [10, 0]
    p = 1 / (1 + np.exp(-(X[:, 1] + 0.3 * (X[:, 0] - 10))))
    y = (rng.random(3000) < p).astype(int)
    m = MoEClassifier(1, alpha=1e-8, tol=1e-10, random_state=0).fit(X, y)
    lr = LogisticRegression(C=1e8).fit(X, y)
    # class scores are symmetric: their difference is the binary logit
    np.testing.assert_allclose(m.coef_[0, 1] - m.coef_[0, 0], lr.coef_[0], rtol=1e-4)
    np.testing.assert_allclose(m.intercept_[0, 1] - m.intercept_[0, 0], lr.intercept_, rtol=1e-4)
    np.testing.assert_allclose(m.predict_proba(X), lr.predict_proba(X), atol=1e-5)
    assert m.gate_coef_.shape == (1, 2)


def test_probabilities_stay_in_the_unit_interval_and_sum_to_one():
    # a confident fit on breast cancer summed a row's mixture to 1 + 2e-16, which
    # scikit-learn's log_loss refused
    from sklearn.datasets import load_breast_cancer
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold

    X, y = load_breast_cancer(return_X_y=True)
    tr, te = list(StratifiedKFold(5, shuffle=True, random_state=0).split(X, y))[1]
    mean, sd = X[tr].mean(0), X[tr].std(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = MoEClassifier(3, n_init=1, random_state=0).fit((X[tr] - mean) / sd, y[tr])
    P = m.predict_proba((X[te] - mean) / sd)
    assert P.min() >= 0.0 and P.max() <= 1.0
    np.testing.assert_allclose(P.sum(1), 1.0, rtol=0, atol=1e-15)
    assert log_loss(y[te], P) < 0.3
