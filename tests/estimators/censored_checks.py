"""Checks every censored count or amount family must pass (test_censored_glm.py,
test_censored_nb.py, test_censored_binomial.py, test_weibull.py): the censored fit
recovers what ignoring censoring misses, EM's log-likelihood and the family's M-step
never fall, and the reference standard errors its summary() is held to."""

import numpy as np
import torch

from moekit import MoERegressor
from moekit.estimators._censoring import pack_bounds
from moekit.experts.censored_glm import CensoredGLMExperts


def numerical_se(nll, theta, h: float = 1e-4) -> np.ndarray:
    """Standard errors from the inverse of a central-difference Hessian of ``nll`` (a
    negative log-likelihood) at ``theta``: the observed information, numerically."""
    P = len(theta)
    hess = np.zeros((P, P))
    for i, j in np.ndindex(P, P):
        di, dj = np.eye(P)[i] * h, np.eye(P)[j] * h
        hess[i, j] = (nll(theta + di + dj) - nll(theta + di - dj) - nll(theta - di + dj)
                      + nll(theta - di - dj)) / (4 * h * h)  # fmt: skip
    return np.sqrt(np.diag(np.linalg.inv(hess)))


def assert_censoring_recovers_slopes(expert, X, y, upper, truth):
    """Two experts fitted with ``y_upper`` put both slopes within 3 SEs of ``truth``
    (experts in increasing order of their mean); fitted as if every row were exact,
    one slope is more than 3 of those SEs off."""
    opts = dict(expert=expert, gate="constant", random_state=0)
    m = MoERegressor(2, **opts).fit(X, y, y_upper=upper)
    table = m.summary().table.set_index(["block", "parameter"])
    ses = []
    for k, slope in enumerate(truth):
        est, se = table.loc[(f"expert {k}", "x0"), ["estimate", "std_error"]]
        assert abs(est - slope) < 3 * se, (k, est, se)
        ses.append(se)
    naive = MoERegressor(2, **opts).fit(X, y)
    off = [min(abs(naive.coef_[:, 0] - s)) / se for s, se in zip(truth, ses, strict=True)]
    assert max(off) > 3, off


def m_steps_never_lower_q(m, X, y, upper, window, steps=5):
    """From the fit ``m`` and fixed random responsibilities, ``steps`` M-steps of its
    censored family, each asserted not to lower any expert's Q_k; returns the rows'
    data and the parameters before and after each step."""
    family = m._expert_family
    assert isinstance(family, CensoredGLMExperts)
    data = m._em_data(X, pack_bounds(y, upper, window))
    family.prepare(data)
    resp = torch.softmax(torch.randn(2, data.n, generator=torch.Generator().manual_seed(0),
                                     dtype=torch.float64), 0)  # fmt: skip
    path = [m._params.expert]
    for _ in range(steps):
        before = family._objective(path[-1], data, resp)
        path.append(family.m_step(path[-1], None, data, resp))
        after = family._objective(path[-1], data, resp)
        assert (after >= before).all(), (before, after)
    return data, path


def warm_steps_never_lower_loglik(family, X, y, steps=8, **kw):
    """One EM iteration at a time (``warm_start``, ``max_iter=1``) of a K = 2 fit of
    ``family`` on the rows (``kw``: their ``y_upper`` and ``truncation``), each asserted
    not to lower the log-likelihood; returns the fit."""
    m = MoERegressor(2, expert=family, random_state=0, warm_start=True, max_iter=1, n_init=1)
    m.fit(X, y, **kw)
    previous = m.log_likelihood(X, y, **kw)
    for _ in range(steps):
        m.fit(X, y, **kw)
        now = m.log_likelihood(X, y, **kw)
        assert now >= previous - 1e-12
        previous = now
    return m
