"""Starts in lockstep for Gaussian experts of several outputs, every covariance type."""

import numpy as np
import pytest
import torch
from lockstep_checks import assert_pass_and_step_match, fit_both, param_fields, random_starts
from sklearn.datasets import load_iris

from moekit import MoERegressor
from moekit._core.data import EMData
from moekit._core.engine import em_threads
from moekit.experts.gaussian_cov import COVARIANCE_EXPERTS, COVARIANCE_TYPES
from moekit.fitting import batched, lockstep
from moekit.fitting.model import EMModel
from moekit.gates.constant import ConstantGate
from moekit.gates.softmax import SoftmaxGate


def _standardise(a):
    return (a - a.mean(0)) / a.std(0)


def _design(X):
    ones = np.ones((len(X), 1))
    return torch.as_tensor(np.hstack([_standardise(X) if X.shape[1] else X, ones]).T.copy())


def _mixture():
    """Iris as a Gaussian mixture: q = 4 outputs, the intercept alone as design."""
    y = load_iris().data
    XT = _design(np.empty((len(y), 0)))
    return EMData(XT, XT, torch.as_tensor(_standardise(y).T.copy()))


def _regression():
    """q = 3 outputs on 2 features (p = 3 with the intercept): odd systems both ways,
    and an odd number of rows."""
    rng = np.random.default_rng(7)
    n = 301
    X = rng.normal(size=(n, 2))
    z = rng.integers(0, 3, n)
    B = rng.normal(scale=2.0, size=(3, 3, 2))  # (K, q, features)
    mix = rng.normal(size=(3, 3))  # correlated noise
    y = np.einsum("nqf,nf->nq", B[z], X) + 2.0 * z[:, None] + rng.normal(size=(n, 3)) @ mix
    XT = _design(X)
    return EMData(XT, XT, torch.as_tensor(_standardise(y).T.copy()))


CASES = {"mixture": (_mixture, 4), "regression": (_regression, 3)}


def _model(case, ct, gate=SoftmaxGate):
    make_data, q = CASES[case]
    data = make_data()
    model = EMModel(COVARIANCE_EXPERTS[ct](3, q, var_floor=1e-6), gate(3))
    model.prepare(data)
    return model, data


@pytest.mark.parametrize("ct", COVARIANCE_TYPES)
def test_every_covariance_family_declares_its_batched_path(ct):
    family = COVARIANCE_EXPERTS[ct]
    assert family.__dict__.get("batchable") is True
    model, data = _model("mixture", ct)
    assert batched.can_batch(model, data)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("ct", COVARIANCE_TYPES)
def test_a_start_is_bitwise_the_same_alone_and_among_nine_others(case, ct):
    # the constant gate: these are the experts' batched paths under test (the
    # softmax gate's own are in test_lockstep.py)
    model, data = _model(case, ct, ConstantGate)
    starts = random_starts(model, data, 10)

    def run(p):  # SQUAREM cycles included
        try:
            return (yield from lockstep.iterate(model, p, 40, 1e-10))
        except RuntimeError as exc:  # a start whose expert collapses, as it does alone
            return str(exc)

    # on one thread, as EM runs small passes
    with em_threads(data):
        together = lockstep.drive(model, data, [run(p) for p in starts], serve_many=batched.serve)
        for s in (0, 1, 3, 9):
            alone = lockstep.drive(model, data, [run(starts[s])], serve_many=batched.serve)[0]
            if isinstance(alone, str):
                assert alone == together[s]
                continue
            assert alone[2] == together[s][2]  # the objective histories, exactly
            for a, b in zip(param_fields(alone[0]), param_fields(together[s][0]), strict=True):
                assert torch.equal(a, b)
    # the runs differ from one another: the batch really held ten different runs
    assert len({r[2][-1] for r in together if not isinstance(r, str)}) > 1


@pytest.mark.parametrize("gate", [SoftmaxGate, ConstantGate])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("ct", COVARIANCE_TYPES)
def test_a_batched_pass_and_step_equal_the_single_start_ones(ct, case, gate):
    model, data = _model(case, ct, gate)
    starts = random_starts(model, data, 4, seed=2)
    assert_pass_and_step_match(model, data, starts, objective_tol=1e-12,
                               stats_tol=(1e-12, 1e-12))  # fmt: skip


def test_an_expert_without_weight_keeps_its_parameters_in_a_batch():
    model, data = _model("regression", "tied")
    starts = random_starts(model, data, 3, seed=4)
    results = batched.e_pass_many(model, starts, data)
    # the second start's first expert sees no row at all
    gone = results[1].expert_stats
    results[1].expert_stats = tuple(t.clone() for t in gone)
    for t in results[1].expert_stats:
        t[..., 0] = 0.0
    new = batched.m_step_many(model, starts, results, data)
    assert torch.equal(new[1].expert.cov[0], starts[1].expert.cov[0])
    assert torch.equal(new[1].expert.coef[0], starts[1].expert.coef[0])
    # the other starts' steps are those they take alone
    for s in (0, 2):
        alone = batched.m_step_many(model, [starts[s]], [results[s]], data)[0]
        assert torch.equal(alone.expert.cov, new[s].expert.cov)


@pytest.mark.parametrize("ct", COVARIANCE_TYPES)
def test_the_batched_gaussian_mixture_fit_equals_the_sequential_one_on_iris(monkeypatch, ct):
    y, X = load_iris().data, np.empty((150, 0))
    a, b = fit_both(monkeypatch, lambda: MoERegressor(
        n_experts=3, covariance_type=ct, gate="constant", random_state=0).fit(X, y))  # fmt: skip
    assert a.log_likelihood_ == pytest.approx(b.log_likelihood_, rel=1e-9)
    np.testing.assert_allclose(a.covariances_, b.covariances_, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("ct", COVARIANCE_TYPES)
def test_the_batched_fit_with_features_equals_the_sequential_one(monkeypatch, ct):
    iris = load_iris().data
    X, y = iris[:, 2:], iris[:, :2]  # petals explain the two sepal columns
    a, b = fit_both(monkeypatch, lambda: MoERegressor(
        n_experts=2, covariance_type=ct, random_state=0).fit(X, y))  # fmt: skip
    assert a.log_likelihood_ == pytest.approx(b.log_likelihood_, rel=1e-9)
    np.testing.assert_allclose(a.predict(X), b.predict(X), rtol=1e-6, atol=1e-6)
