"""Logistic experts' M-steps: against autograd, scikit-learn and their own bounds."""

import functools
import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_iris, load_wine
from sklearn.linear_model import LogisticRegression

from moekit import MoEClassifier
from moekit._core.data import EMData
from moekit._core.linalg import solve_psd
from moekit.estimators import classifier
from moekit.experts import logistic
from moekit.experts.logistic import LogisticExperts, LogisticParams

SOLVERS = ["newton", "diagonal", "bohning"]


def _problem(seed, n=300, d=3, C=3, K=2):
    """Standardised design with an intercept row, class codes, responsibilities (K, n)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    W = 1.5 * torch.randn(C, d, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(X @ W.T, 1), 1, generator=g).squeeze(1)
    XT = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], 1).T.contiguous()
    resp = torch.softmax(torch.randn(K, n, generator=g, dtype=torch.float64), 0)
    return EMData(XT, XT, y), resp


def _stats(fam, params, data, resp, chunk_size):
    stats = None
    for chunk in data.chunks(chunk_size):
        fam.log_prob(params, chunk)
        s = fam.chunk_stats(params, chunk, resp[:, chunk.start : chunk.stop])
        stats = s if stats is None else tuple(a + b for a, b in zip(stats, s, strict=True))
    return stats


def _loglik(coef, data, resp):
    """sum_k sum_i r_ik log p_k(y_i | x_i)."""
    logp = torch.log_softmax(torch.einsum("kcp,pn->kcn", coef, data.XeT), 1)
    ll = logp.gather(1, data.y.view(1, 1, -1).expand(coef.shape[0], 1, -1)).squeeze(1)
    return (resp * ll).sum()


def _q(fam, coef, data, resp):
    """Q(W): the experts' expected complete-data log-likelihood plus the log-prior."""
    return _loglik(coef, data, resp) - 0.5 * fam.alpha * (coef[..., :-1] ** 2).sum()


def _fam(solver, K, C, data, alpha=0.7):
    fam = LogisticExperts(K, C, alpha=alpha, solver=solver)
    fam.prepare(data)
    return fam


def _step(fam, coef, data, resp, chunk_size=64):
    params = LogisticParams(coef)
    return fam.m_step(params, _stats(fam, params, data, resp, chunk_size), data).coef


@pytest.mark.parametrize("C", [2, 4])
def test_newton_step_is_the_autograd_newton_step(C):
    data, resp = _problem(0, C=C)
    fam = _fam("newton", 2, C, data)
    coef = 0.3 * torch.randn(2, C, 4, dtype=torch.float64)
    got = _step(fam, coef, data, resp) - coef
    for k in range(2):
        f = lambda w, k=k: _q(fam, w.reshape(1, C, 4), data, resp[k : k + 1])  # noqa: E731
        w = coef[k].reshape(-1)
        grad = torch.autograd.functional.jacobian(f, w)
        hess = torch.autograd.functional.hessian(f, w)
        # minimum-norm solution: the intercepts' common shift is not determined
        ref = -torch.linalg.pinv(hess, hermitian=True, rtol=1e-10) @ grad
        torch.testing.assert_close(got[k].reshape(-1), ref, rtol=1e-8, atol=1e-10)


def test_diagonal_step_is_newtons_for_two_classes():
    data, resp = _problem(1, C=2)
    coef = 0.5 * torch.randn(2, 2, 4, dtype=torch.float64)
    coef -= coef.mean(1, keepdim=True)  # centred slopes: Newton then leaves the mean row alone
    newton = _step(_fam("newton", 2, 2, data), coef, data, resp)
    diagonal = _step(_fam("diagonal", 2, 2, data), coef, data, resp)
    torch.testing.assert_close(diagonal, newton, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("seed", range(4))
def test_diagonal_and_bohning_curvatures_lie_above_the_hessian(seed):
    """Both lie above the Hessian of -Q at the current W (Bohning's at every W)."""
    C, p = 4, 4
    data, resp = _problem(seed, C=C, K=1)
    r = resp[:1]
    coef = 2.0 * torch.randn(1, C, p, dtype=torch.float64)
    S = torch.eye(C, dtype=torch.float64) - 1.0 / C
    H = -torch.autograd.functional.hessian(
        lambda w: _loglik(w.reshape(1, C, p), data, r), coef.reshape(-1)
    )
    for solver in ["diagonal", "bohning"]:
        fam = _fam(solver, 1, C, data)
        _, _, packed = _stats(fam, LogisticParams(coef), data, r, 1000)
        G = logistic._unpack(packed, p)  # (C, p, p) or (1, p, p), the penalty excluded
        B = torch.block_diag(*G) if solver == "diagonal" else torch.kron(S, G[0])
        gap = torch.linalg.eigvalsh(B - H)
        assert gap.min() >= -1e-9 * gap.abs().max(), (solver, gap.min())


@pytest.mark.parametrize("seed", range(6))
def test_bohning_step_never_lowers_q(seed):
    C = 3 + seed % 3
    data, resp = _problem(seed, C=C, K=3)
    fam = _fam("bohning", 3, C, data, alpha=0.1)
    coef = 3.0 * torch.randn(3, C, 4, dtype=torch.float64)  # far from the optimum
    for _ in range(20):
        new = _step(fam, coef, data, resp)
        for k in range(3):
            before = _q(fam, coef[k : k + 1], data, resp[k : k + 1])
            after = _q(fam, new[k : k + 1], data, resp[k : k + 1])
            assert after >= before - 1e-10 * abs(before)
        coef = new


def test_statistics_do_not_depend_on_the_chunking():
    data, resp = _problem(2, n=257, C=4)
    coef = torch.randn(2, 4, 4, dtype=torch.float64)
    for solver in SOLVERS:
        fam = _fam(solver, 2, 4, data)
        whole = _stats(fam, LogisticParams(coef), data, resp, 1000)
        parts = _stats(fam, LogisticParams(coef), data, resp, 10)
        for a, b in zip(whole, parts, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("C", [2, 3])
def test_repeated_steps_reach_weighted_logistic_regression(solver, C):
    """With the responsibilities held fixed, the steps converge to scikit-learn's fit."""
    data, resp = _problem(3, n=400, d=3, C=C)
    alpha = 0.5
    fam = _fam(solver, 2, C, data, alpha=alpha)
    coef = torch.zeros(2, C, 4, dtype=torch.float64)
    for _ in range({"newton": 30, "diagonal": 100, "bohning": 600}[solver]):
        coef = _step(fam, coef, data, resp)
    X, y = data.XeT[:-1].T.numpy(), data.y.numpy()
    # with two classes scikit-learn penalises the one logit w = W_1 - W_0, and
    # |W_0|^2 + |W_1|^2 = |w|^2 / 2 when the scores are centred: its C is then 2 / alpha
    C_sk = 2 / alpha if C == 2 else 1 / alpha
    for k in range(2):
        lr = LogisticRegression(C=C_sk, tol=1e-12, max_iter=10_000)
        lr.fit(X, y, sample_weight=resp[k].numpy())
        W = coef[k].numpy()
        if C == 2:  # scikit-learn reports one logit, class 1 against class 0
            np.testing.assert_allclose(W[1, :-1] - W[0, :-1], lr.coef_[0], atol=1e-6)
            np.testing.assert_allclose(W[1, -1] - W[0, -1], lr.intercept_[0], atol=1e-6)
        else:  # both symmetric, with slopes centred over classes
            np.testing.assert_allclose(W[:, :-1], lr.coef_, atol=1e-6)
            np.testing.assert_allclose(
                W[:, -1] - W[:, -1].mean(), lr.intercept_ - lr.intercept_.mean(), atol=1e-6
            )


def test_an_expert_without_weight_is_kept():
    data, resp = _problem(4, C=3)
    resp[1] = 0.0
    resp[0] = 1.0
    coef = torch.randn(2, 3, 4, dtype=torch.float64)
    for solver in SOLVERS:
        new = _step(_fam(solver, 2, 3, data), coef, data, resp)
        assert torch.isfinite(new).all()
        torch.testing.assert_close(new[1], coef[1])


def test_solves_with_singular_blocks_take_the_pseudo_inverse_of_those_alone():
    # a class an expert never sees leaves its block singular along the intercept:
    # that block gets the minimum-norm answer, the others their Cholesky solve
    g = torch.Generator().manual_seed(0)
    B = torch.randn(3, 2, 5, 5, generator=g, dtype=torch.float64)
    A = B @ B.transpose(-1, -2) + 0.1 * torch.eye(5, dtype=torch.float64)
    A[1, 0, -1, :] = 0.0
    A[1, 0, :, -1] = 0.0  # singular along the last coordinate
    A[2, 1] = 0.0  # no weight at all
    rhs = torch.randn(3, 2, 5, 1, generator=g, dtype=torch.float64)
    torch.testing.assert_close(logistic._solve_pd(A, rhs), solve_psd(A, rhs))
    eye = torch.eye(5, dtype=torch.float64).expand_as(A)
    torch.testing.assert_close(logistic._inverse_pd(A), solve_psd(A, eye))
    assert torch.isfinite(logistic._inverse_pd(A)).all()


def test_auto_takes_newton_for_few_parameters_and_diagonal_otherwise():
    def chosen(C, p):
        fam = LogisticExperts(2, C, solver="auto")
        fam.prepare(EMData(torch.zeros(p, 5), torch.zeros(p, 5), torch.zeros(5)))
        return fam._step, fam.monotone

    assert chosen(3, 5) == ("newton", False)
    assert chosen(2, 5) == ("diagonal", False)  # Newton's step exactly, for less
    assert chosen(10, 65) == ("diagonal", False)
    with pytest.raises(ValueError, match="solver must be one of"):
        LogisticExperts(2, 3, solver="lbfgs")


def _datasets():
    X, y = load_iris(return_X_y=True)
    yield "iris", X, y
    X, y = load_wine(return_X_y=True)
    yield "wine", X[:, :6], y
    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 3))
    yield "xor", X, (X[:, 0] * X[:, 1] + 0.3 * rng.normal(size=500) > 0).astype(int)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("seed", range(3))
def test_em_objective_never_decreases_with_any_step(solver, seed, monkeypatch):
    """Bohning by its bound; Newton and diagonal steps through the loop's safeguard."""
    monkeypatch.setitem(
        classifier.EXPERTS, "logistic", functools.partial(LogisticExperts, solver=solver)
    )
    for name, X, y in _datasets():
        m = MoEClassifier(2 + seed, init="random", max_iter=40, tol=0.0, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tol=0 never converges; experts may collapse
            m.fit(X, y)
        h = np.asarray(m.log_likelihood_history_)
        assert len(h) == 41
        assert np.diff(h).min() >= -1e-10, (name, np.diff(h).min())
