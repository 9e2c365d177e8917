"""Starts in lockstep: each run as it would go alone, the arithmetic batched."""

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

from moekit import MoEClassifier, MoERegressor
from moekit._core.data import EMData
from moekit.datasets import make_moe_regression
from moekit.experts.gaussian import GaussianExperts
from moekit.experts.logistic import LogisticExperts
from moekit.experts.student_t import StudentTExperts
from moekit.fitting import batched, lockstep
from moekit.fitting.model import EMModel
from moekit.gates.constant import ConstantGate
from moekit.gates.softmax import SoftmaxGate


def _design(X):
    X = (X - X.mean(0)) / X.std(0)
    ones = np.ones((len(X), 1))
    return torch.as_tensor(np.hstack([X, ones]).T.copy())


def _regression():
    X, y, _ = make_moe_regression(400, n_features=4, n_experts=3, random_state=1)
    XT = _design(X)
    return EMData(XT, XT, torch.as_tensor(((y - y.mean()) / y.std())[None, :].copy()))


def _iris():
    X, y = load_iris(return_X_y=True)
    XT = _design(X)  # 5 columns: odd-sized systems, grown to even ones in a batch
    return EMData(XT, XT, torch.as_tensor(y))


CASES = {
    "regressor": (_regression, lambda: GaussianExperts(3, 1, 1e-6)),
    "classifier": (_iris, lambda: LogisticExperts(3, 3)),
}


def _fields(params):
    return [params.expert.coef, *vars(params.gate).values()]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("solver", ["newton", "bohning"])
def test_a_start_is_bitwise_the_same_alone_and_among_nine_others(case, solver):
    make_data, expert = CASES[case]
    data = make_data()
    model = EMModel(expert(), SoftmaxGate(3, solver=solver))
    model.prepare(data)
    starts = random_starts(model, data, 10)
    assert batched.can_batch(model, data)

    assert_alone_as_among_others(model, data, starts, fields=_fields)


@pytest.mark.parametrize("gate", [SoftmaxGate, ConstantGate])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_batched_pass_and_step_equal_the_single_start_ones(case, gate):
    make_data, expert = CASES[case]
    data = make_data()
    model = EMModel(expert(), gate(3))
    model.prepare(data)
    starts = random_starts(model, data, 4, seed=2)
    assert_pass_and_step_match(model, data, starts, fields=_fields)


def test_the_batched_regressor_fit_equals_the_sequential_one(monkeypatch):
    X, y, _ = make_moe_regression(500, n_features=3, n_experts=3, random_state=4)
    a, b = fit_both(monkeypatch, lambda: MoERegressor(n_experts=3, random_state=0).fit(X, y))
    assert a.log_likelihood_ == pytest.approx(b.log_likelihood_, rel=1e-9)
    np.testing.assert_allclose(a.predict(X), b.predict(X), rtol=1e-6, atol=1e-6)


def test_the_batched_classifier_fit_equals_the_sequential_one_on_iris(monkeypatch):
    X, y = load_iris(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    # converged tightly: the two paths round differently, and at the default tol the
    # flat likelihood of iris lets them stop 1e-10 apart
    a, b = fit_both(
        monkeypatch, lambda: MoEClassifier(n_experts=3, tol=1e-10, random_state=0).fit(X, y)
    )
    assert a.log_likelihood_ == pytest.approx(b.log_likelihood_, rel=1e-9)
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), atol=1e-5)


class _GaussianSubclass(GaussianExperts):
    """Inherits the Gaussian's batched methods without declaring them its own."""


@pytest.mark.parametrize(
    "expert",
    [lambda: StudentTExperts(3, 1, 1e-6), lambda: _GaussianSubclass(3, 1, 1e-6)],
    ids=["student_t", "subclass (inherits the Gaussian's batched methods)"],
)
def test_a_family_without_a_batched_path_runs_each_start_as_alone(monkeypatch, expert):
    data = _regression()
    model = EMModel(expert(), SoftmaxGate(3))
    model.prepare(data)
    assert not batched.can_batch(model, data)
    starts = random_starts(model, data, 4, seed=3)
    alone = [model.iterate(p, data, 25, 1e-8) for p in starts]

    def refuse(*args):
        raise AssertionError("a family without a batched path was batched")

    monkeypatch.setattr(batched, "serve", refuse)
    from moekit.fitting import em

    runs = [lockstep.iterate(model, p, 25, 1e-8) for p in starts]
    together = lockstep.drive(model, data, runs, serve_many=em._server(model, data))
    for a, b in zip(alone, together, strict=True):
        assert a[2] == b[2]
        assert torch.equal(a[0].expert.coef, b[0].expert.coef)
        assert torch.equal(a[0].gate.coef, b[0].gate.coef)


def test_a_batched_request_that_fails_is_served_alone_and_the_error_reaches_its_run():
    data = _regression()
    model = EMModel(GaussianExperts(3, 1, 1e-6), SoftmaxGate(3))
    model.prepare(data)
    starts = random_starts(model, data, 3, seed=5)
    bad = object()
    calls = []

    def serve(model, data, kind, requests):
        calls.append(len(requests))
        if any(r[1] is bad for r in requests):
            raise RuntimeError("singular")
        return batched.serve(model, data, kind, requests)

    def fragile():
        try:
            yield (lockstep.E_PASS, bad)
        except RuntimeError as exc:
            return str(exc)
        return "no error"

    runs = [lockstep.iterate(model, p, 5, 1e-8) for p in starts]
    out = lockstep.drive(model, data, [*runs, fragile()], serve_many=serve)
    assert out[3] == "singular"
    assert calls[:5] == [4, 1, 1, 1, 1]  # the batch, then each request alone
    alone = lockstep.drive(model, data, [lockstep.iterate(model, starts[1], 5, 1e-8)],
                           serve_many=batched.serve)[0]  # fmt: skip
    assert alone[2] == out[1][2]
