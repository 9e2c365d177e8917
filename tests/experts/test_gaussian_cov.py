"""Full, tied and spherical linear-Gaussian experts: the M-step against weighted
least squares and weighted covariances, the eigenvalue floor, and nesting: a richer
covariance started from a nested fit never ends below it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moekit._core.data import EMData
from moekit.experts.gaussian import GaussianParams
from moekit.experts.gaussian_cov import (
    COVARIANCE_EXPERTS,
    CovGaussianParams,
    floor_eigenvalues,
)
from moekit.fitting.model import EMModel
from moekit.gates.constant import ConstantGate

K, N, Q = 2, 300, 3


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, 2))
    z = rng.random(N) < 0.5
    noise = rng.multivariate_normal(np.zeros(Q), [[1, 0.7, 0], [0.7, 1, 0.3], [0, 0.3, 1]], N)
    y = np.where(z[:, None], x @ [[1, 0, -1], [0, 2, 1]], -x @ [[1, 1, 0], [0, 1, 1]]) + noise
    XeT = torch.as_tensor(np.c_[x, np.ones(N)].T.copy())  # intercept last
    data = EMData(XeT, XeT, torch.as_tensor(y.T.copy()))
    resp = torch.as_tensor(np.c_[z, ~z].T.astype(float) * 0.8 + 0.1)
    return data, resp


def _m_step(family, data, resp):
    model = EMModel(family, ConstantGate(K))
    model.prepare(data)
    return model.init_from_resp(data, resp).expert


def _weighted_reference(data, resp):
    """Per expert: weighted least squares of every column and the weighted residual
    covariance (numpy)."""
    X, Y = data.XeT.numpy().T, data.y.numpy().T
    out = []
    for k in range(K):
        w = resp[k].numpy()
        B = np.linalg.solve(X.T @ (w[:, None] * X), X.T @ (w[:, None] * Y))  # (p, q)
        R = Y - X @ B
        out.append((B.T, (w[:, None] * R).T @ R, w.sum()))
    return out


@pytest.mark.parametrize("ct", ["full", "tied", "spherical"])
def test_m_step_is_weighted_least_squares_and_covariance(ct):
    data, resp = _data()
    params = _m_step(COVARIANCE_EXPERTS[ct](K, Q, 1e-6), data, resp)
    ref = _weighted_reference(data, resp)
    for k, (B, S, nk) in enumerate(ref):
        np.testing.assert_allclose(params.coef[k].numpy(), B, atol=1e-10)
        want = {
            "full": S / nk,
            "tied": sum(s for _, s, _ in ref) / sum(n for *_, n in ref),
            "spherical": np.trace(S) / (Q * nk) * np.eye(Q),
        }[ct]
        np.testing.assert_allclose(params.cov[k].numpy(), want, atol=1e-10)


def test_the_floor_raises_only_the_eigenvalues_below_it():
    cov = torch.tensor([[[1.0, 0.999999], [0.999999, 1.0]]], dtype=torch.float64)
    out = floor_eigenvalues(cov, 1e-3)
    evals = torch.linalg.eigvalsh(out)[0]
    torch.testing.assert_close(evals, torch.tensor([1e-3, 1.999999], dtype=torch.float64))
    # a covariance above the floor is kept as it is
    torch.testing.assert_close(floor_eigenvalues(out, 1e-4), out)


def test_an_expert_on_identical_points_has_a_finite_likelihood():
    data, resp = _data()
    data.y[:, :5] = 0.0  # five identical rows, expert 1 holding only them
    resp = torch.zeros_like(resp)
    resp[0, 5:], resp[1, :5] = 1.0, 1.0
    family = COVARIANCE_EXPERTS["full"](K, Q, 1e-4)
    params = _m_step(family, data, resp)
    assert torch.linalg.eigvalsh(params.cov[1]).min() >= 1e-4 * (1 - 1e-9)
    chunk = next(iter(data.chunks(N)))
    assert torch.isfinite(family.log_prob(params, chunk)).all()


def _embed(params, source: str, target: str):
    """A fit of the ``source`` covariance as parameters of the richer ``target``."""
    cov = torch.diag_embed(params.var) if source == "diag" else params.cov
    if target == "diag":
        return GaussianParams(params.coef, torch.diagonal(cov, dim1=1, dim2=2).contiguous())
    return CovGaussianParams(params.coef, cov)


def _run(family, data, expert_params, gate_params, n_iter=60):
    model = EMModel(family, ConstantGate(K))
    model.prepare(data)
    params = type(gate_params)(expert_params, gate_params.gate) if gate_params else None
    history = []
    for _ in range(n_iter):
        res = model.e_pass(params, data)
        history.append(res.loglik)
        params = model.m_step(params, res, data)
    return params, history


@pytest.mark.parametrize(("nested", "richer"), [("diag", "full"), ("tied", "full"),
                                                ("spherical", "diag")])  # fmt: skip
def test_a_richer_covariance_from_a_nested_fit_never_fits_worse(nested, richer):
    data, resp = _data(seed=1)
    small = COVARIANCE_EXPERTS[nested](K, Q, 1e-6)
    model = EMModel(small, ConstantGate(K))
    model.prepare(data)
    start = model.init_from_resp(data, resp)
    fit, small_history = _run(small, data, start.expert, start)
    big = COVARIANCE_EXPERTS[richer](K, Q, 1e-6)
    _, big_history = _run(big, data, _embed(fit.expert, nested, richer), fit)
    assert np.all(np.diff(small_history) >= -1e-12) and np.all(np.diff(big_history) >= -1e-12)
    # the embedding starts at the nested fit's likelihood and EM only climbs from it
    assert big_history[0] == pytest.approx(small_history[-1], abs=1e-9)
    assert big_history[-1] >= small_history[-1] - 1e-12


@pytest.mark.parametrize("ct", ["full", "tied", "spherical"])
def test_the_batched_statistics_take_the_output_products_made_once(ct):
    """The products y_a y_b are made on the first pass and kept with the data; the
    statistics are those of products made afresh (the single-start pass's)."""
    data, resp = _data()
    family = COVARIANCE_EXPERTS[ct](K, Q, 1e-6)
    params = _m_step(family, data, resp)
    stacked = CovGaussianParams(params.coef.unsqueeze(0), params.cov.unsqueeze(0))
    first = family.chunk_stats_many(stacked, next(data.chunks()), resp.unsqueeze(0))
    kept = [v for k, v in data.cache.items() if isinstance(k, tuple) and k[0] == "output_pairs"]
    assert len(kept) == 1
    again = family.chunk_stats_many(stacked, next(data.chunks()), resp.unsqueeze(0))
    assert next(v for k, v in data.cache.items() if isinstance(k, tuple)) is kept[0]
    torch.testing.assert_close(again[1], first[1], rtol=0, atol=0)
    single = family.chunk_stats(params, next(data.chunks()), resp)[1]  # (f, K)
    torch.testing.assert_close(first[1][0], single)
