"""Starts in lockstep with the tree gate: batched passes and steps of the hierarchical MoE."""

import numpy as np
import pytest
import torch
from lockstep_checks import (
    assert_alone_as_among_others,
    assert_pass_and_step_match,
    fit_both,
    random_starts,
)
from sklearn.datasets import load_iris

from moekit import HierarchicalMoEClassifier, HierarchicalMoERegressor
from moekit._core.data import EMData
from moekit.datasets import load_mcycle, make_moe_regression
from moekit.experts.gaussian import GaussianExperts
from moekit.experts.logistic import LogisticExperts
from moekit.fitting import batched
from moekit.fitting.model import EMModel
from moekit.gates.tree import TreeGate


def _design(X):
    X = (X - X.mean(0)) / X.std(0)
    return torch.as_tensor(np.hstack([X, np.ones((len(X), 1))]).T.copy())


def _regression(n=400, n_features=4, weighted=False):
    X, y, _ = make_moe_regression(n, n_features=n_features, n_experts=3, random_state=1)
    XT = _design(X)
    weight = None
    if weighted:  # frequency weights 1, 2, 3
        weight = torch.as_tensor(1.0 + np.arange(n) % 3, dtype=torch.float64)
    y = torch.as_tensor(((y - y.mean()) / y.std())[None, :].copy())
    return EMData(XT, XT, y, weight=weight)


def _iris():
    X, y = load_iris(return_X_y=True)
    XT = _design(X)  # 5 columns: a node's system of b p = 10 (b = 2) or 15 (b = 3) unknowns
    return EMData(XT, XT, torch.as_tensor(y))


def _gaussian(K):
    return GaussianExperts(K, 1, 1e-6)


def _logistic(K):
    return LogisticExperts(K, 3)


# (data, experts of K leaves, depth, branching)
CASES = {
    "regression 2x2": (_regression, _gaussian, 2, 2),
    "regression 2x3 (odd systems)": (_regression, _gaussian, 2, 3),
    "iris 2x2": (_iris, _logistic, 2, 2),
}


def _model(case, solver="auto", make_data=None):
    make, expert, depth, branching = CASES[case]
    data = (make_data or make)()
    model = EMModel(expert(branching**depth), TreeGate(depth, branching, solver=solver))
    model.prepare(data)
    return model, data


def _fields(params):
    return [*vars(params.expert).values(), params.gate.coef]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("solver", ["newton", "bohning"])
def test_a_start_is_bitwise_the_same_alone_and_among_nine_others(case, solver):
    model, data = _model(case, solver)
    starts = random_starts(model, data, 10)
    assert batched.can_batch(model, data)

    assert_alone_as_among_others(model, data, starts, fields=_fields)


PASS_CASES = [
    ("regression 2x2", None),
    ("regression 2x3 (odd systems)", None),
    ("iris 2x2", None),
    ("regression 2x2", lambda: _regression(weighted=True)),
    # 27 gate columns: the weighted Grams one weight at a time, not from packed products
    # (400 rows: with fewer, the experts' own systems are too ill-conditioned to compare)
    ("regression 2x2", lambda: _regression(n=400, n_features=26)),
]


@pytest.mark.parametrize(("case", "make_data"), PASS_CASES,
                         ids=["2x2", "2x3", "iris", "weighted", "wide"])  # fmt: skip
@pytest.mark.parametrize("solver", ["newton", "bohning"])
def test_a_batched_pass_and_step_equal_the_single_start_ones(case, make_data, solver):
    model, data = _model(case, solver, make_data)
    starts = random_starts(model, data, 4, seed=2)
    assert_pass_and_step_match(model, data, starts, fields=_fields)


def test_a_tree_of_depth_one_batches_its_one_node():
    data = _regression()
    model = EMModel(_gaussian(3), TreeGate(1, 3))  # a node of b p = 15 unknowns
    model.prepare(data)
    starts = random_starts(model, data, 3, seed=4)
    many = batched.m_step_many(model, starts, batched.e_pass_many(model, starts, data), data)
    for p, b in zip(starts, many, strict=True):
        a = model.m_step(p, model.e_pass(p, data), data)
        torch.testing.assert_close(b.gate.coef, a.gate.coef, rtol=1e-9, atol=1e-10)


def test_the_batched_hierarchical_regressor_fit_equals_the_sequential_one(monkeypatch):
    X, y = load_mcycle()
    a, b = fit_both(monkeypatch, lambda: HierarchicalMoERegressor(random_state=0).fit(X, y))
    assert a.log_likelihood_ == pytest.approx(b.log_likelihood_, rel=1e-9)
    np.testing.assert_allclose(a.predict(X), b.predict(X), rtol=1e-6, atol=1e-6)


def test_the_batched_hierarchical_classifier_fit_equals_the_sequential_one_on_iris(monkeypatch):
    X, y = load_iris(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    # iris is nearly separable: EM creeps along a flat ridge of the experts'
    # coefficients, and at tol=1e-6 where it stops moves with the last bits of the
    # steps (by 4e-6 in the log-likelihood between the two paths); run to tol=1e-10
    # both paths reach the same optimum
    a, b = fit_both(monkeypatch, lambda: HierarchicalMoEClassifier(
        random_state=0, tol=1e-10, max_iter=2000).fit(X, y))  # fmt: skip
    assert a.log_likelihood_ == pytest.approx(b.log_likelihood_, rel=1e-9)
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), atol=1e-5)
