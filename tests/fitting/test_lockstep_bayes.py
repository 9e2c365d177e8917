"""Starts in lockstep for the Bayesian estimator: its experts and Dirichlet gate batched."""

import numpy as np
import pytest
import torch
from lockstep_checks import (
    assert_alone_as_among_others,
    assert_pass_and_step_match,
    fit_both,
    random_starts,
)

from moekit import BayesianMoERegressor
from moekit._core.data import EMData
from moekit.datasets import load_mcycle, make_moe_regression
from moekit.experts import bayesian_gaussian
from moekit.experts.bayesian_gaussian import BayesianGaussianExperts
from moekit.fitting import batched
from moekit.fitting.model import EMModel
from moekit.gates.dirichlet import DirichletGate
from moekit.gates.softmax import SoftmaxGate


def _regression(n=400, n_features=4, n_outputs=1, weighted=False):
    X, y, _ = make_moe_regression(n, n_features=n_features, n_experts=3, random_state=1)
    X = (X - X.mean(0)) / X.std(0)
    XT = torch.as_tensor(np.hstack([X, np.ones((n, 1))]).T.copy())  # 5 columns: odd systems
    Y = np.column_stack([y, y**2 + X[:, 0]][:n_outputs])
    Y = (Y - Y.mean(0)) / Y.std(0)
    weight = torch.as_tensor(1.0 + np.arange(n) % 3) if weighted else None
    return EMData(XT, XT, torch.as_tensor(Y.T.copy()), weight=weight)


GATES = {"softmax": lambda: SoftmaxGate(3, alpha=1.0), "dirichlet": lambda: DirichletGate(3, 1 / 3)}
# the estimator's default, then the couplings across experts (full prior, shared mean)
# and the experts apart (one noise each)
EXPERTS = {
    "default": {},
    "full, shared mean": {"prior": "full", "prior_mean": "shared"},
    "isotropic, own noise": {"prior": "isotropic", "noise": "per_expert"},
}


def _model(gate, kind, n_outputs=1, **data_options):
    data = _regression(n_outputs=n_outputs, **data_options)
    model = EMModel(BayesianGaussianExperts(3, n_outputs, **EXPERTS[kind]), GATES[gate]())
    model.prepare(data)
    return model, data


@pytest.mark.parametrize("kind", sorted(EXPERTS))
@pytest.mark.parametrize("gate", sorted(GATES))
def test_a_start_is_bitwise_the_same_alone_and_among_nine_others(gate, kind):
    model, data = _model(gate, kind)
    starts = random_starts(model, data, 10)
    assert batched.can_batch(model, data)

    assert_alone_as_among_others(model, data, starts)


PASS_CASES = {
    "one output": {},
    "two outputs": {"n_outputs": 2},
    "weighted": {"weighted": True},
    "wide (per-matrix quadratic forms)": {"n_features": 26},
}


@pytest.mark.parametrize("case", sorted(PASS_CASES))
@pytest.mark.parametrize("kind", sorted(EXPERTS))
@pytest.mark.parametrize("gate", sorted(GATES))
def test_a_batched_pass_and_step_equal_the_single_start_ones(gate, kind, case):
    model, data = _model(gate, kind, **PASS_CASES[case])
    starts = random_starts(model, data, 4, seed=2)
    assert_pass_and_step_match(model, data, starts)


@pytest.mark.parametrize("gate", ["softmax", "constant"])
def test_the_batched_bayesian_fit_equals_the_sequential_one(monkeypatch, gate):
    X, y = load_mcycle()
    a, b = fit_both(monkeypatch,
                     lambda: BayesianMoERegressor(gate=gate, random_state=0).fit(X, y))  # fmt: skip
    assert a.elbo_ == pytest.approx(b.elbo_, rel=1e-9)
    assert a.log_likelihood_ == pytest.approx(b.log_likelihood_, rel=1e-9)
    np.testing.assert_allclose(a.predict(X), b.predict(X), rtol=1e-6, atol=1e-6)


def test_only_a_start_whose_own_factorisation_fails_takes_the_jitter():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn((2, 3, 1, 5, 5), generator=gen, dtype=torch.float64)
    P = A @ A.transpose(-1, -2) + 0.1 * torch.eye(5, dtype=torch.float64)
    v = torch.randn((5, 1), generator=gen, dtype=torch.float64)
    P[1, 2, 0] = v @ v.T  # rank one: no Cholesky factor without the jitter
    both = bayesian_gaussian.inverse_pd(P, stacked=True)
    for s in range(2):
        assert torch.equal(both[s], bayesian_gaussian.inverse_pd(P[s : s + 1], stacked=True)[0])
    # the start with a factor of its own is its exact inverse, untouched by the other's jitter
    torch.testing.assert_close(both[0], torch.linalg.inv(P[0]), rtol=1e-9, atol=1e-9)
