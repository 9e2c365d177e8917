"""The observed information from analytic per-row derivatives equals autograd's."""

import warnings

import numpy as np
import pytest
import torch

from moekit import HierarchicalMoERegressor, MoEClassifier, MoERegressor
from moekit._core.derivatives import LocalDerivatives
from moekit.datasets import make_moe_regression
from moekit.estimators import _information
from moekit.estimators._information import analytic_hessian, row_hessian
from moekit.estimators.inference import ReportedLikelihood, _standard_errors

N = 400


def _targets(X, K, rng, gate):
    """One target per family from K experts: split along x0 (and x1 for K = 3) for a
    softmax gate, drawn at random for a constant one."""
    region = (X[:, 0] > 0).astype(int) + (K == 3) * (X[:, 1] > 0.5)
    if gate == "constant":
        region = rng.integers(0, K, size=len(X))
    b = np.array([[0.4, 0.6, -0.3], [1.2, -0.5, 0.4], [-0.3, 0.2, 0.8]])[region]
    eta = b[:, 0] + b[:, 1] * X[:, 0] + b[:, 2] * X[:, 1]
    s = rng.binomial(8, 1.0 / (1.0 + np.exp(-eta)))
    return {
        "linear": eta + 0.3 * rng.normal(size=len(X)),
        "student_t": eta + 0.3 * rng.standard_t(4, size=len(X)),
        "poisson": rng.poisson(np.exp(eta)),
        "negative_binomial": rng.negative_binomial(0.5, 0.5 / (0.5 + np.exp(eta + 0.5))),
        "gamma": np.exp(eta) * rng.gamma(4.0, 0.25, size=len(X)),
        "lognormal": np.exp(eta + 0.3 * rng.normal(size=len(X))),
        "weibull": np.exp(eta) * rng.weibull(3.0, size=len(X)),
        "binomial": np.c_[s, 8 - s],
        "classes": region,
    }


def _fit(expert, K, gate, **kw):
    X, _, _ = make_moe_regression(N, n_features=2, n_experts=2, random_state=K)
    y = _targets(X, K, np.random.default_rng(K), gate)[expert]
    opts = dict(random_state=0, n_init=1, max_iter=2000, tol=1e-10, gate=gate, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if expert == "classes":
            return MoEClassifier(K, **opts).fit(X, y), X, y
        return MoERegressor(K, expert=expert, **opts).fit(X, y), X, y


def _compare(lik, rtol=1e-6, determined=True):
    """Analytic and autograd Hessians, log-likelihoods and standard errors agree."""
    assert lik.analytic
    h_an, ll_an = lik.observed_hessian("analytic")
    h_ad, ll_ad = lik.observed_hessian("autograd")
    scale = float(h_ad.abs().max())
    # (not closer: torch's trigamma, in autograd's second derivative of log Gamma, is
    # good to about 1e-10, and the negative binomial's curvature in phi amplifies it)
    assert float((h_an - h_ad).abs().max()) <= 1e-8 * scale
    assert ll_an == pytest.approx(ll_ad, rel=1e-12, abs=1e-9)
    se_an, note_an = _standard_errors(-h_an)
    se_ad, note_ad = _standard_errors(-h_ad)
    assert note_an == note_ad
    np.testing.assert_array_equal(np.isnan(se_an), np.isnan(se_ad))
    if determined:
        assert np.isfinite(se_ad).all()
    np.testing.assert_allclose(se_an, se_ad, rtol=rtol)


FAMILIES = ["linear", "student_t", "poisson", "negative_binomial", "gamma", "lognormal",
            "weibull", "binomial", "classes"]  # fmt: skip


@pytest.mark.parametrize("gate", ["softmax", "constant"])
@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("expert", FAMILIES)
def test_analytic_standard_errors_equal_autograd(expert, K, gate):
    model, X, y = _fit(expert, K, gate)
    if expert == "negative_binomial":
        # near 0 autograd's curvature in phi is rounding (see test_nb_small_dispersion)
        assert bool((model._params.expert.dispersion > 1e-2).all())
    # the classifier's experts are penalised by design: the information may be
    # indefinite at the penalised estimate (the same parameters NaN in both)
    _compare(ReportedLikelihood(model, X, y), determined=expert != "classes")
    # the summary takes the analytic path, and the same numbers
    se = model.summary().table["std_error"].to_numpy()
    np.testing.assert_allclose(se, _standard_errors(-ReportedLikelihood(model, X, y).hessian())[0],
                               rtol=1e-6)  # fmt: skip


def test_fixed_degrees_of_freedom_and_several_outputs():
    X, y, _ = make_moe_regression(N, n_features=2, n_experts=2, random_state=0)
    y2 = np.c_[y, 0.5 * y + 0.2 * np.random.default_rng(0).normal(size=N)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lin = MoERegressor(2, random_state=0, n_init=1).fit(X, y2)
        t = MoERegressor(2, expert="student_t", df=4.0, random_state=0, n_init=1).fit(X, y2)
    _compare(ReportedLikelihood(lin, X, y2))
    _compare(ReportedLikelihood(t, X, y2))
    _compare(ReportedLikelihood(lin, X, y2, gate_reference=1))


def test_gate_and_experts_on_designs_of_their_own():
    X, y, _ = make_moe_regression(N, n_features=3, n_experts=2, random_state=3)
    m = MoERegressor(2, expert_features=[0, 1], gate_features=[2], random_state=0).fit(X, y)
    lik = ReportedLikelihood(m, X, y)
    assert not lik.data.shared_design
    _compare(lik)


def test_a_wide_design_takes_grams_one_weight_at_a_time():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(600, 30))  # 31 columns: past the packed products
    y = X[:, 0] * (X[:, 1] > 0) + 0.3 * rng.normal(size=600)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = MoERegressor(2, gate="constant", random_state=0, n_init=1).fit(X, y)
    _compare(ReportedLikelihood(m, X, y))


def test_chunks_sum_to_one_pass(monkeypatch):
    model, X, y = _fit("poisson", 3, "softmax")
    whole = analytic_hessian(ReportedLikelihood(model, X, y))
    monkeypatch.setattr(_information, "INFORMATION_BUDGET", 1)  # 1,024-row chunks
    X3, y3 = np.tile(X, (3, 1)), np.tile(y, 3)
    lik = ReportedLikelihood(model, X3, y3)
    assert len(list(lik.data.chunks(_information._chunk_rows(lik.data, 9)))) == 2
    hess, ll = analytic_hessian(lik)
    torch.testing.assert_close(hess, 3 * whole[0], rtol=1e-12, atol=0)
    assert ll == pytest.approx(3 * whole[1], rel=1e-12)


def test_integer_row_weights_equal_repeated_rows():
    model, X, y = _fit("gamma", 2, "softmax")
    w = np.random.default_rng(0).integers(0, 4, size=len(y))
    hess, ll = analytic_hessian(ReportedLikelihood(model, X, y),
                                torch.as_tensor(w, dtype=torch.float64))  # fmt: skip
    rep = np.repeat(np.arange(len(y)), w)
    h_rep, ll_rep = analytic_hessian(ReportedLikelihood(model, X[rep], y[rep]))
    torch.testing.assert_close(hess, h_rep, rtol=1e-10, atol=1e-9)
    assert ll == pytest.approx(ll_rep, rel=1e-12)


def test_row_hessian_is_the_hessian_of_the_log_mixture():
    """Per row, W equals autograd's Hessian of log sum_k exp(a_k) in the local parameters."""
    g = torch.Generator().manual_seed(0)
    K, L, Lg = 3, 2, 2
    u = torch.randn(K * L + Lg, dtype=torch.float64, generator=g)
    A = torch.randn(K, L, dtype=torch.float64, generator=g)
    B = torch.randn(K, Lg, dtype=torch.float64, generator=g)

    def terms(v):  # a_k: a smooth function of expert k's locals and the gate's
        e, q = v[: K * L].view(K, L), v[K * L :]
        return torch.sin(e * A).sum(1) + (e * e).sum(1) * 0.3 + torch.cos(B @ q) + (B @ q) ** 2

    a = terms(u)
    r = torch.softmax(a, 0).unsqueeze(1)
    jac = torch.autograd.functional.jacobian(terms, u)  # (K, G)
    hes = torch.stack([torch.autograd.functional.hessian(lambda v, k=k: terms(v)[k], u)
                       for k in range(K)])  # fmt: skip
    d1e = torch.stack([jac[k, k * L : (k + 1) * L] for k in range(K)]).unsqueeze(-1)
    d2e = torch.stack([hes[k, k * L : (k + 1) * L, k * L : (k + 1) * L] for k in range(K)])
    de = LocalDerivatives(d1e, d2e.unsqueeze(-1), L)
    dg = LocalDerivatives(jac[:, K * L :].unsqueeze(-1),
                                       hes[:, K * L :, K * L :].unsqueeze(-1), Lg)  # fmt: skip
    W = row_hessian(r, de, dg)[..., 0]
    want = torch.autograd.functional.hessian(lambda v: torch.logsumexp(terms(v), 0), u)
    torch.testing.assert_close(W, want, rtol=1e-12, atol=1e-12)


def test_families_without_analytic_pieces_fall_back_to_autograd():
    X, y, _ = make_moe_regression(N, n_features=2, n_experts=2, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = HierarchicalMoERegressor(depth=2, branching=2, random_state=0, n_init=1).fit(X, y)
    lik = ReportedLikelihood(m, X, y)
    assert not lik.analytic  # the tree gate has none
    hess, _ = lik.observed_hessian()
    torch.testing.assert_close(hess, lik.hessian())
    assert np.isfinite(m.summary().table["std_error"]).any()
    with pytest.raises(ValueError, match="method must be"):
        lik.observed_hessian("numeric")


@pytest.mark.parametrize("expert", ["poisson", "negative_binomial", "gamma", "weibull",
                                    "binomial"])  # fmt: skip
def test_standard_errors_of_a_fit_with_an_offset(expert):
    """A constant offset c is an intercept: the model fitted with it and the same
    model with every intercept raised by c and no offset have the same likelihood, so
    the same standard errors (the derivatives are taken at the predictor with the
    offset) and, given explicitly, the same summary as from the fit's own rows."""
    import copy

    X, _, _ = make_moe_regression(N, n_features=2, n_experts=2, random_state=2)
    y = _targets(X, 2, np.random.default_rng(2), "softmax")[expert]
    opts = dict(random_state=0, n_init=1, max_iter=2000, tol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shifted = MoERegressor(2, expert=expert, **opts).fit(X, y, offset=np.full(N, 0.7))
    plain = copy.deepcopy(shifted)
    plain._params.expert.coef[:, -1] += 0.7  # the intercept is the design's last column
    np.testing.assert_allclose(plain.intercept_, shifted.intercept_ + 0.7, atol=1e-12)
    a, b = plain.summary(X, y), shifted.summary()  # (a copy keeps no training rows)
    assert a.log_likelihood == pytest.approx(b.log_likelihood, rel=1e-12)
    est = b.table["estimate"].to_numpy()
    assert np.isfinite(b.table["std_error"]).all()
    np.testing.assert_allclose(b.table["std_error"], a.table["std_error"], rtol=1e-9)
    raised = (b.table["parameter"] == "intercept") & b.table["block"].str.startswith("expert")
    np.testing.assert_allclose(a.table["estimate"].to_numpy() - est, 0.7 * raised, atol=1e-12)
    again = shifted.summary(X, y, offset=np.full(N, 0.7)).table["std_error"]
    np.testing.assert_allclose(again, b.table["std_error"], rtol=1e-12)
