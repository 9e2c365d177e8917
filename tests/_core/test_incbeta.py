"""The regularised incomplete beta function in log space matches scipy and mpmath,
stays finite far into either tail, keeps its digits near the Poisson limit of the
negative binomial, takes its limits, and has autograd derivatives that agree with
differences."""

import mpmath
import numpy as np
import pytest
import torch
from scipy import special

from moekit._core.incbeta import log_beta, log_beta_inc


def _grid(n=3000, seed=0):
    """Parameters from 0.02 to 8000 and arguments crowding both ends of (0, 1)."""
    rng = np.random.default_rng(seed)
    a, b = np.exp(rng.uniform(-4, 9, n)), np.exp(rng.uniform(-4, 9, n))
    x = rng.uniform(0, 1, n) ** 3
    return a, b, np.where(rng.random(n) < 0.5, x, 1 - x)


@pytest.mark.parametrize("differentiable", [False, True])
def test_log_incomplete_beta_matches_scipy_and_stays_finite_where_it_underflows(differentiable):
    a, b, x = _grid()
    log_i, log_ic = (t.numpy() for t in log_beta_inc(*map(torch.tensor, (a, b, x)),
                                                      differentiable=differentiable))  # fmt: skip
    assert np.isfinite(log_i).all() and np.isfinite(log_ic).all()
    i, ic = special.betainc(a, b, x), special.betaincc(a, b, x)
    # the grid reaches far past where the probabilities underflow
    assert min(log_i.min(), log_ic.min()) < -700 and ((i == 0) | (ic == 0)).sum() > 100
    for ours, theirs in ((log_i, i), (log_ic, ic)):
        seen = theirs > 1e-300
        # scipy's deep tails carry errors up to ~1e-7 relative (at a=266, b=32,
        # x=0.061 it is 6e-5 off log I = -648.19573275059, which mpmath and ours
        # agree on); elsewhere the two agree to ~1e-12
        np.testing.assert_allclose(ours[seen], np.log(theirs[seen]), rtol=2e-7, atol=1e-12)
        close = seen & (np.log(np.maximum(theirs, 1e-300)) > -200)
        np.testing.assert_allclose(ours[close], np.log(theirs[close]), rtol=1e-10, atol=1e-12)


def test_log_incomplete_beta_matches_mpmath_in_the_far_tails():
    mpmath.mp.dps = 40
    cases = [(2.5, 3.0, 1e-300), (0.3, 40.0, 0.999999), (900.0, 2.0, 0.5), (5.0, 5000.0, 0.2),
             (3000.0, 4000.0, 0.45), (0.05, 0.05, 0.5), (1e4, 3.0, 0.9999),
             (265.91521431948473, 31.56408523265326, 0.06138329905057113)]  # fmt: skip
    a, b, x = (torch.tensor(v, dtype=torch.float64) for v in zip(*cases, strict=True))
    log_i, log_ic = log_beta_inc(a, b, x)
    for k, (ak, bk, xk) in enumerate(cases):
        exact = mpmath.betainc(ak, bk, 0, xk, regularized=True)
        exact_c = mpmath.betainc(bk, ak, 0, 1 - mpmath.mpf(xk), regularized=True)  # no 1 - I
        assert float(log_i[k]) == pytest.approx(float(mpmath.log(exact)), rel=1e-12, abs=1e-13)
        assert float(log_ic[k]) == pytest.approx(float(mpmath.log(exact_c)), rel=1e-12, abs=1e-13)


def test_negative_binomial_tails_keep_their_digits_near_the_poisson_limit():
    # Pr(Y <= k) = I_p(1/phi, k + 1) with p = 1 / (1 + phi mu) within 1e-8 of 1:
    # given 1 - p to all its digits, the logs agree with mpmath to ~1e-14
    mpmath.mp.dps = 50
    for phi in (1e-8, 1e-4):
        mu, k = torch.tensor([0.5, 3.0, 20.0]).double(), torch.tensor([0.0, 3.0, 60.0]).double()
        p, q = 1 / (1 + phi * mu), phi * mu / (1 + phi * mu)
        log_i, log_ic = log_beta_inc(torch.full_like(mu, 1 / phi), k + 1, p, q)
        for j in range(3):
            pj = 1 / (1 + mpmath.mpf(phi) * mpmath.mpf(float(mu[j])))
            th, bj = 1 / mpmath.mpf(phi), float(k[j]) + 1
            exact = mpmath.log(mpmath.betainc(th, bj, 0, pj, regularized=True))
            exact_c = mpmath.log(mpmath.betainc(bj, th, 0, 1 - pj, regularized=True))
            assert float(log_i[j]) == pytest.approx(float(exact), rel=1e-12, abs=1e-13)
            assert float(log_ic[j]) == pytest.approx(float(exact_c), rel=1e-12, abs=1e-13)


def test_log_beta_matches_mpmath_where_one_argument_is_large():
    mpmath.mp.dps = 40
    a = torch.tensor([1e8, 1e5, 150.0, 99.0, 0.3, 2e3], dtype=torch.float64)
    b = torch.tensor([3.0, 0.01, 150.0, 2.0, 0.7, 2e3], dtype=torch.float64)
    ours = log_beta(a, b)
    for k in range(len(a)):
        exact = float(mpmath.log(mpmath.beta(float(a[k]), float(b[k]))))
        assert float(ours[k]) == pytest.approx(exact, rel=1e-14, abs=1e-14)


def test_limits_of_the_incomplete_beta():
    inf = np.inf
    a = torch.tensor([0.0, 2.0, 2.0, inf, 2.0, 2.0], dtype=torch.float64)
    b = torch.tensor([2.0, 0.0, inf, 2.0, 2.0, 2.0], dtype=torch.float64)
    x = torch.tensor([0.3, 0.3, 0.3, 0.3, 0.0, 1.0], dtype=torch.float64)
    log_i, log_ic = log_beta_inc(a, b, x)
    one = np.array([True, False, True, False, False, True])  # I = 1 there, else 0
    np.testing.assert_array_equal(log_i.numpy(), np.where(one, 0.0, -inf))
    np.testing.assert_array_equal(log_ic.numpy(), np.where(one, -inf, 0.0))


def test_autograd_derivatives_agree_with_central_differences():
    a = torch.tensor([2.5, 0.3, 40.0, 7.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([3.0, 7.0, 2.0, 300.0], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([0.3, 0.9, 0.95, 0.01], dtype=torch.float64, requires_grad=True)

    def f(a, b, x):
        log_i, log_ic = log_beta_inc(a, b, x, differentiable=True)
        return log_i + 0.3 * log_ic

    grads = torch.autograd.grad(f(a, b, x).sum(), (a, b, x), create_graph=True)
    h = 1e-5
    for i, g in enumerate(grads):
        args = [v.detach() for v in (a, b, x)]
        up, down = list(args), list(args)
        up[i], down[i] = args[i] + h, args[i] - h
        numeric = (f(*up) - f(*down)) / (2 * h)
        np.testing.assert_allclose(g.detach().numpy(), numeric.numpy(), rtol=1e-6, atol=1e-8)
        # and the second derivative, differentiated again through the fraction
        (g2,) = torch.autograd.grad(g.sum(), (a, b, x)[i], retain_graph=True)
        step = 1e-3 * (torch.minimum(args[i], 1 - args[i]) if i == 2 else args[i])  # relative
        up[i], down[i] = args[i] + step, args[i] - step
        second = (f(*up) - 2 * f(*args) + f(*down)) / step**2
        np.testing.assert_allclose(g2.numpy(), second.numpy(), rtol=1e-4, atol=1e-6)


def test_the_unguarded_recurrence_hands_back_where_a_guard_would_act(monkeypatch):
    from moekit._core import incbeta

    one = torch.ones(3, dtype=torch.float64)
    coefs = [torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)]  # 1 + aa d = 0 at [0]
    factors = torch.empty((2, 3), dtype=torch.float64)
    assert incbeta._lentz_unguarded(one.clone(), one.clone(), coefs, factors, 1e-300) is None
    fine = [torch.tensor([-0.5, 0.5, 2.0], dtype=torch.float64)]
    d, c = incbeta._lentz_unguarded(one.clone(), one.clone(), fine, factors, 1e-300)
    np.testing.assert_array_equal(d.numpy(), 1 / (1 + fine[0].numpy()))
    np.testing.assert_array_equal(c.numpy(), 1 + fine[0].numpy())
    np.testing.assert_array_equal(factors[1].numpy(), (d * c).numpy())
    # the guarded recurrence gives the same bits wherever no guard acts
    a, b, x = (torch.tensor(v) for v in _grid(600, seed=1))
    fast = log_beta_inc(a, b, x)
    monkeypatch.setattr(incbeta, "_lentz_unguarded", lambda *args: None)
    for ours, guarded in zip(fast, log_beta_inc(a, b, x), strict=True):
        assert torch.equal(ours, guarded)


def test_log_beta_second_derivatives_hold_where_the_arguments_tie():
    # d^2/da^2 log B(a, b) = trigamma(a) - trigamma(a + b), at a = b on either branch
    a = torch.tensor([2.0, 7.0, 150.0], dtype=torch.float64, requires_grad=True)
    b = a.detach().clone()
    (g,) = torch.autograd.grad(log_beta(a, b).sum(), a, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), a)
    ad = a.detach()
    torch.testing.assert_close(g.detach(), torch.digamma(ad) - torch.digamma(2 * ad))
    torch.testing.assert_close(h, torch.polygamma(1, ad) - torch.polygamma(1, 2 * ad),
                               rtol=1e-9, atol=1e-12)  # fmt: skip
