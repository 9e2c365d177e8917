"""Negative binomial starts in lockstep: each run as it would go alone, the arithmetic batched."""

import numpy as np
import pytest
import torch
from lockstep_checks import (
    assert_alone_as_among_others,
    assert_pass_and_step_match,
    fit_both,
    random_starts,
)

from moekit import MoERegressor
from moekit._core.data import EMData
from moekit.experts import negative_binomial
from moekit.experts.negative_binomial import NegativeBinomialExperts
from moekit.fitting import batched
from moekit.fitting.model import EMModel
from moekit.gates.constant import ConstantGate
from moekit.gates.softmax import SoftmaxGate


def _draw(n, seed, scale=1.0):
    """X (n, 4) and over-dispersed counts from three experts split by the features."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    region = np.argmax(X[:, :3] @ np.array([[2.0, 0, -2], [0, 2, -2], [-1, 1, 0]]), axis=1)
    eta = np.log(scale) + X @ np.array([0.3, -0.2, 0.1, 0.2]) + np.array([0.2, 1.2, -0.3])[region]
    mu = np.exp(eta)
    theta = np.array([2.0, 5.0, 1.0])[region]
    return X, rng.poisson(rng.gamma(theta, mu / theta)).astype(float)


def _data(kind="plain", n=300, scale=1.0):
    """EMData of five design columns (odd: systems grown to even ones in a batch)."""
    X, y = _draw(n, 1, scale)
    X = (X - X.mean(0)) / X.std(0)
    XT = torch.as_tensor(np.hstack([X, np.ones((n, 1))]).T.copy())
    rng = np.random.default_rng(7)
    weight = torch.as_tensor(rng.integers(1, 4, n).astype(float)) if kind == "weights" else None
    offset = torch.as_tensor(rng.normal(0, 0.3, n)) if kind == "offset" else None
    return EMData(XT, XT, torch.as_tensor(y).reshape(1, -1), weight=weight, offset=offset)


def _fields(params):
    return [params.expert.coef, params.expert.dispersion, *vars(params.gate).values()]


@pytest.mark.parametrize("kind", ["plain", "weights", "offset"])
@pytest.mark.parametrize("solver", ["newton", "bohning"])
def test_a_start_is_bitwise_the_same_alone_and_among_nine_others(kind, solver):
    data = _data(kind)
    model = EMModel(NegativeBinomialExperts(3), SoftmaxGate(3, solver=solver))
    model.prepare(data)
    starts = random_starts(model, data, 10)
    assert batched.can_batch(model, data)

    assert_alone_as_among_others(model, data, starts, fields=_fields, checked=(0, 4, 9))


@pytest.mark.parametrize(
    ("kind", "scale", "table_max"),
    [("plain", 1.0, None), ("weights", 1.0, None), ("offset", 1.0, None),
     ("plain", 60.0, None),  # counts past the rows: the tables read per row, not summed by count
     ("plain", 1.0, 3)],  # counts past the tables: lgamma, digamma and trigamma
)  # fmt: skip
@pytest.mark.parametrize("gate", [SoftmaxGate, ConstantGate])
def test_a_batched_pass_and_step_equal_the_single_start_ones(
    monkeypatch, kind, scale, table_max, gate
):
    if table_max is not None:
        monkeypatch.setattr(negative_binomial, "COUNT_TABLE_MAX", table_max)
    data = _data(kind, scale=scale)
    model = EMModel(NegativeBinomialExperts(3), gate(3))
    model.prepare(data)
    assert (data.cache["nb_counts"] is None) == (table_max is not None)
    assert (data.cache["nb_top"] > data.n) == (scale > 1.0)
    starts = random_starts(model, data, 4, seed=2)
    assert_pass_and_step_match(model, data, starts, fields=_fields, stats_tol=(1e-11, 1e-9),
                               own_tensors=True)  # fmt: skip


@pytest.mark.parametrize("kind", ["plain", "weights and offset"])
def test_the_batched_negative_binomial_fit_equals_the_sequential_one(monkeypatch, kind):
    X, y = _draw(500, 4)
    kw = {}
    if kind != "plain":
        rng = np.random.default_rng(5)
        kw = {"sample_weight": rng.integers(1, 4, len(y)).astype(float),
              "offset": rng.normal(0, 0.3, len(y))}  # fmt: skip

    def fit():
        est = MoERegressor(n_experts=3, expert="negative_binomial", random_state=0)
        return est.fit(X, y, **kw)

    a, b = fit_both(monkeypatch, fit)
    assert a.log_likelihood_ == pytest.approx(b.log_likelihood_, rel=1e-9)
    offset = kw.get("offset")
    np.testing.assert_allclose(a.predict(X, offset=offset), b.predict(X, offset=offset),
                               rtol=1e-6, atol=1e-6)  # fmt: skip
