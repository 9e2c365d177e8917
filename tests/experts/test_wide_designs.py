"""Wide designs take the per-weight Gram path; the fit is the same as with packed products."""

import warnings

import numpy as np
import pytest
import torch

import moekit._core.data as data_mod
from moekit import MoERegressor
from moekit._core.data import unpack_grams
from moekit.datasets import make_moe_regression
from moekit.fitting.model import EMModel

PACKED, PER_WEIGHT = 10**6, 0  # values of PACKED_MAX_P that force each path


def _force(monkeypatch, path):
    monkeypatch.setattr(data_mod, "PACKED_MAX_P", path)
    # data of one chunk would otherwise keep packed products on either path
    monkeypatch.setattr(data_mod, "KEPT_PRODUCTS_BYTES", path)


def _problem(expert, n=6000, d=6, seed=0):
    X, y, _ = make_moe_regression(n, n_features=d, n_experts=3, random_state=seed)
    rng = np.random.default_rng(seed)
    if expert == "poisson":
        y = rng.poisson(np.exp(0.3 * y / y.std()))
    elif expert == "student_t":  # heavy tails, so that the degrees of freedom are finite
        y = y + 0.3 * rng.standard_t(3, size=n)
    return X, y


def _fit(expert, X, y, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MoERegressor(3, expert=expert, random_state=0, **kw).fit(X, y)


def _stats_and_step(m, X, y):
    """One E-step pass at the fitted parameters: unpacked statistics and the M-step."""
    data = m._em_data(X, y)
    model = EMModel(m._expert_family, m._gate_family, chunk_size=2048)  # several chunks
    model.prepare(data)
    res = model.e_pass(m._params, data)
    p, m_out = data.XeT.shape[0], data.n_targets
    es = res.expert_stats
    if isinstance(es, tuple) and len(es) == 3:  # Student-t: Grams of [x, y] and scalars
        stats = [*unpack_grams(es[0], p, m_out), *es[1:]]
    elif isinstance(es, tuple):  # Poisson: gradient and Hessian
        stats = [es[0], unpack_grams(es[1], p)[0]]
    else:
        stats = list(unpack_grams(es, p, m_out))
    stats += [res.gate_stats[0], unpack_grams(res.gate_stats[1], p)[0]]
    step = model.m_step(m._params, res, data)
    return stats, [*vars(step.expert).values(), *vars(step.gate).values()]


@pytest.mark.parametrize("expert", ["linear", "student_t", "poisson"])
def test_statistics_and_m_step_are_the_same_on_both_paths(monkeypatch, expert):
    X, y = _problem(expert)
    m = _fit(expert, X, y, max_iter=5)
    assert m._gate_family._use_newton  # the gate's Hessian goes through the Grams too
    out = {}
    for path in (PACKED, PER_WEIGHT):
        _force(monkeypatch, path)
        out[path] = _stats_and_step(m, X, y)
    for a, b in zip(out[PACKED][0], out[PER_WEIGHT][0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * float(a.abs().max()))
    # the gate's Newton system is conditioned like 1/alpha: compare against the scale
    for a, b in zip(out[PACKED][1], out[PER_WEIGHT][1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-8 * float(a.abs().max()))


@pytest.mark.parametrize("expert", ["linear", "student_t"])
def test_fit_is_the_same_on_both_paths(monkeypatch, expert):
    X, y = _problem(expert, n=4000, d=4, seed=2)
    fits = {}
    for path in (PACKED, PER_WEIGHT):
        _force(monkeypatch, path)
        fits[path] = _fit(expert, X, y, max_iter=20, tol=0.0)
    a, b = fits[PACKED], fits[PER_WEIGHT]
    # the same optimum (which of two nearly tied starts leads there may differ)
    assert a.log_likelihood_ == pytest.approx(b.log_likelihood_, rel=1e-10)
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(a.gate_coef_, b.gate_coef_, rtol=1e-7, atol=1e-9)


def test_wide_fit_is_least_squares():
    # 60 features, one expert: the per-weight path's fit is ordinary least squares
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 60))
    y = X[:, :3] @ [1.0, -2.0, 0.5] + 0.7 + 0.1 * rng.normal(size=3000)
    assert not data_mod.packed(61)
    m = MoERegressor(1, random_state=0).fit(X, y)
    ols = np.linalg.lstsq(np.c_[X, np.ones(3000)], y, rcond=None)[0]
    np.testing.assert_allclose(m.coef_[0], ols[:-1], atol=1e-10)
    np.testing.assert_allclose(m.intercept_[0], ols[-1], atol=1e-10)
