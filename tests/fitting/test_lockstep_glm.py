"""Starts in lockstep for the GLM families (Poisson, binomial, Gamma, lognormal): each
run as it would go alone, the arithmetic batched."""

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
from moekit.experts.binomial import BinomialExperts
from moekit.experts.censored import CensoredExperts
from moekit.experts.censored_glm import CensoredGLMExperts
from moekit.experts.gamma import GammaExperts
from moekit.experts.lognormal import LogNormalExperts
from moekit.experts.poisson import PoissonExperts
from moekit.experts.weibull import WeibullExperts
from moekit.fitting import batched
from moekit.fitting.model import EMModel
from moekit.gates.constant import ConstantGate
from moekit.gates.softmax import SoftmaxGate

K = 2
COEF = np.array([[0.3, 0.8, -0.5], [1.2, -0.6, 0.4]])  # per expert: two slopes, intercept


def _draw(family: str, n: int, seed: int):
    """Features (n, 2), the target as the estimator takes it, and an offset (Poisson)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2))
    z = rng.integers(0, K, n)
    eta = (X * COEF[z, :2]).sum(1) + COEF[z, 2]
    offset = None
    if family == "poisson":
        offset = np.log(rng.uniform(0.5, 3.0, n))  # log exposure
        y = rng.poisson(np.exp(eta + offset)).astype(float)
    elif family == "binomial":
        trials = rng.integers(1, 30, n)
        s = rng.binomial(trials, 1.0 / (1.0 + np.exp(-eta)))
        y = np.column_stack([s, trials - s]).astype(float)
    elif family == "gamma":
        shape = np.array([3.0, 8.0])[z]
        y = rng.gamma(shape, np.exp(eta) / shape)
    elif family == "weibull":
        y = np.exp(eta) * rng.weibull(np.array([1.5, 4.0])[z])
    else:
        y = np.exp(eta + rng.normal(scale=np.array([0.3, 0.6])[z]))
    return X, y, offset


FAMILIES = {
    "poisson": lambda: PoissonExperts(K),
    "binomial": lambda: BinomialExperts(K),
    "gamma": lambda: GammaExperts(K),
    "lognormal": lambda: LogNormalExperts(K),
    "weibull": lambda: WeibullExperts(K),
}


def _data(family: str, n: int = 300, seed: int = 0, weighted: bool = False) -> EMData:
    X, y, offset = _draw(family, n, seed)
    X = (X - X.mean(0)) / X.std(0)
    XT = torch.as_tensor(np.hstack([X, np.ones((n, 1))]).T.copy())  # 3 columns: odd systems
    yt = torch.as_tensor((y.T if y.ndim == 2 else y[None, :]).copy())
    weight = None
    if weighted:
        weight = torch.as_tensor(np.random.default_rng(seed + 1).integers(1, 4, n).astype(float))
    return EMData(XT, XT, yt, weight=weight,
                  offset=None if offset is None else torch.as_tensor(offset))  # fmt: skip


def _model(family: str, gate, data: EMData) -> EMModel:
    model = EMModel(FAMILIES[family](), gate)
    model.prepare(data)
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_glm_family_is_batched_and_its_censored_form_is_not(family):
    data = _data(family)
    assert batched.can_batch(_model(family, SoftmaxGate(K), data), data)
    # censored rows go through a wrapper family, whose step is not batched
    wrap = {"poisson": CensoredGLMExperts, "gamma": CensoredGLMExperts,
            "weibull": CensoredGLMExperts, "lognormal": CensoredExperts}.get(family)  # fmt: skip
    if wrap is not None:
        censored = EMModel(wrap(FAMILIES[family]()), SoftmaxGate(K))
        assert not batched.can_batch(censored, data)


@pytest.mark.parametrize("gate", [SoftmaxGate, ConstantGate])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_start_is_bitwise_the_same_alone_and_among_nine_others(family, gate):
    data = _data(family)  # the Poisson data carry an offset
    model = _model(family, gate(K), data)
    starts = random_starts(model, data, 10)
    assert batched.can_batch(model, data)

    assert_alone_as_among_others(model, data, starts, checked=(0, 4, 9))


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("gate", [SoftmaxGate, ConstantGate])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_batched_pass_and_step_equal_the_single_start_ones(family, gate, weighted):
    data = _data(family, seed=3, weighted=weighted)
    model = _model(family, gate(K), data)
    starts = random_starts(model, data, 4, seed=2)
    assert_pass_and_step_match(model, data, starts)


@pytest.mark.parametrize("gate", ["softmax", "constant"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_batched_fit_equals_the_sequential_one(monkeypatch, family, gate):
    X, y, offset = _draw(family, 400, 5)
    kw = {} if offset is None else {"offset": offset}

    def fit():
        return MoERegressor(n_experts=K, gate=gate, expert=family, random_state=0).fit(X, y, **kw)

    a, b = fit_both(monkeypatch, fit)
    assert a.log_likelihood_ == pytest.approx(b.log_likelihood_, rel=1e-9)
    np.testing.assert_allclose(a.predict(X, **kw), b.predict(X, **kw), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_weighted_batched_fit_equals_the_sequential_one(monkeypatch, family):
    X, y, offset = _draw(family, 300, 6)
    kw = {"sample_weight": np.random.default_rng(7).integers(1, 4, len(X)).astype(float)}
    if offset is not None:
        kw["offset"] = offset

    def fit():
        return MoERegressor(n_experts=K, gate="constant", expert=family, random_state=0).fit(
            X, y, **kw
        )

    a, b = fit_both(monkeypatch, fit)
    assert a.log_likelihood_ == pytest.approx(b.log_likelihood_, rel=1e-9)
