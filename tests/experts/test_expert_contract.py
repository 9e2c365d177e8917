"""Every expert family of the package implements the contract of ``moekit.experts.base``.

The families are discovered (every class of ``moekit.experts`` with ``log_prob`` and
``m_step``), so a new family cannot be left out: it needs a line in ``FAMILIES``.
Each implements :class:`ExpertFamily` with compatible signatures, and every
capability protocol wholly or not at all; cheap behavioural checks follow: a fit of
two EM iterations that does not decrease the objective, ``select``, the free and
reported parametrisations round trip to the same log-density, model-file shapes and
checks, predictions, and the nested embedding.
"""

from __future__ import annotations

import itertools
import math
import re

import contract_checks as checks
import pytest
import torch
from sklearn.linear_model import LinearRegression, LogisticRegression

import moekit.experts
from moekit._core.components import FAMILIES as PREDICTIVE
from moekit._core.data import Chunk, EMData
from moekit._core.reporting import Scaling
from moekit.experts import base
from moekit.experts.bayesian_gaussian import BayesianGaussianExperts
from moekit.experts.binomial import BinomialExperts
from moekit.experts.censored import CensoredExperts
from moekit.experts.censored_glm import CensoredGLMExperts
from moekit.experts.gamma import GammaExperts
from moekit.experts.gaussian import GaussianExperts
from moekit.experts.gaussian_cov import (
    CovarianceGaussianExperts,
    FullGaussianExperts,
    SphericalGaussianExperts,
    TiedGaussianExperts,
)
from moekit.experts.logistic import LogisticExperts
from moekit.experts.lognormal import LogNormalExperts
from moekit.experts.mixed import MixedExperts
from moekit.experts.mlp import MLPExperts
from moekit.experts.negative_binomial import NegativeBinomialExperts
from moekit.experts.poisson import PoissonExperts
from moekit.experts.student_t import StudentTExperts
from moekit.experts.weibull import WeibullExperts
from moekit.experts.wrapped import WrappedExperts
from moekit.experts.zero import ZeroExperts
from moekit.fitting.model import EMModel, resized_family
from moekit.gates.constant import ConstantGate

K, N, P = 3, 240, 3  # experts, rows, design columns (two features and the intercept)


def _mixed(names):
    """A family per expert, its parts as MoERegressor builds them."""
    parts = {"poisson": PoissonExperts, "negative_binomial": NegativeBinomialExperts,
             "gamma": GammaExperts, "lognormal": LogNormalExperts,
             "weibull": WeibullExperts}  # fmt: skip
    return MixedExperts(names, {n: parts[n](names.count(n)) for n in dict.fromkeys(names)})


# one or more instances per family, and the kind of target each models
FAMILIES = {
    GaussianExperts: [(lambda: GaussianExperts(K, 2, 1e-6), "real2")],
    StudentTExperts: [(lambda: StudentTExperts(K, 1, 1e-6), "real"),
                      (lambda: StudentTExperts(K, 1, 1e-6, df=5.0), "real")],
    PoissonExperts: [(lambda: PoissonExperts(K), "count")],
    LogisticExperts: [(lambda: LogisticExperts(K, 3), "class")],
    MLPExperts: [(lambda: MLPExperts(K, 1, 1e-6, options={"hidden": 4, "steps": 3}), "real")],
    WrappedExperts: [(lambda: WrappedExperts(LinearRegression(), K), "real"),
                     (lambda: WrappedExperts(LogisticRegression(), K, classes=3), "class")],
    BayesianGaussianExperts: [(lambda: BayesianGaussianExperts(K, 1), "real")],
    BinomialExperts: [(lambda: BinomialExperts(K), "binomial")],
    GammaExperts: [(lambda: GammaExperts(K), "positive")],
    LogNormalExperts: [(lambda: LogNormalExperts(K), "positive")],
    WeibullExperts: [(lambda: WeibullExperts(K), "positive")],
    NegativeBinomialExperts: [(lambda: NegativeBinomialExperts(K), "count")],
    ZeroExperts: [(lambda: ZeroExperts(K), "zeros")],
    MixedExperts: [(lambda: _mixed(["poisson", "negative_binomial", "poisson"]), "count"),
                   (lambda: _mixed(["gamma", "lognormal", "gamma"]), "positive"),
                   (lambda: _mixed(["weibull", "gamma", "weibull"]), "positive")],
    CensoredExperts: [(lambda: CensoredExperts(GaussianExperts(K, 1, 1e-6), 0.3), "censored"),
                      (lambda: CensoredExperts(LogNormalExperts(K), 0.0, True), "censored_log")],
    CensoredGLMExperts: [(lambda: CensoredGLMExperts(PoissonExperts(K)), "censored_count"),
                         (lambda: CensoredGLMExperts(GammaExperts(K), True), "censored_amount"),
                         (lambda: CensoredGLMExperts(WeibullExperts(K), True), "censored_amount")],
    CovarianceGaussianExperts: [(lambda: CovarianceGaussianExperts(K, 2, 1e-6), "real2")],
    FullGaussianExperts: [(lambda: FullGaussianExperts(K, 2, 1e-6), "real2")],
    TiedGaussianExperts: [(lambda: TiedGaussianExperts(K, 2, 1e-6), "real2")],
    SphericalGaussianExperts: [(lambda: SphericalGaussianExperts(K, 2, 1e-6), "real2")],
}  # fmt: skip
CASES = [
    pytest.param(make, kind, id=f"{cls.__name__}-{i}")
    for cls, makers in FAMILIES.items()
    for i, (make, kind) in enumerate(makers)
]
CAPABILITIES = [
    base.InitialisedExperts, base.RegressionExperts, base.ClassifierExperts,
    base.StoredExperts, base.DifferentiableExperts, base.MeanExperts, base.ReportedExperts,
    base.NestedExperts, base.ResizableExperts, base.TargetExperts, base.AnalyticExperts,
]  # fmt: skip


# ---------------------------------------------------------------------------- building blocks


discover, has_any, protocol_problems = checks.discover, checks.has_any, checks.protocol_problems


def data_for(kind: str, seed: int = 0) -> EMData:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(P - 1, N, generator=g, dtype=torch.float64)
    XeT = torch.cat([X, torch.ones(1, N, dtype=torch.float64)])
    half = X[0] > 0
    if kind in ("count", "positive", "binomial"):
        rate = torch.exp(torch.where(half, 0.5 + 0.4 * X[1], 1.5 - 0.3 * X[1]))
        y = torch.poisson(rate.unsqueeze(0), generator=g)
        if kind == "positive":
            y = rate.unsqueeze(0) * torch.exp(0.3 * torch.randn(1, N, generator=g, dtype=X.dtype))
        elif kind == "binomial":  # successes and failures
            y = torch.cat([y, torch.poisson(torch.full((1, N), 3.0, dtype=X.dtype), generator=g)])
    elif kind == "zeros":
        y = torch.zeros(1, N, dtype=torch.float64)
    elif kind == "class":
        y = torch.where(half, (X[1] > 0).long(), 2 * (X[1] > -0.5).long())
    else:
        m = 2 if kind == "real2" else 1
        y = torch.where(half, 1.0 + X[1], -1.0 - 0.5 * X[1]).expand(m, N)
        y = y + 0.3 * torch.randn(m, N, generator=g, dtype=torch.float64)
    if kind.startswith("censored"):  # rows [point, lower, upper, window]: see experts.censored
        y = torch.where(half, 1.0 + X[1], -1.0 - 0.5 * X[1])
        y = y + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)
        if kind == "censored_log":
            y = torch.exp(y)
        cap = torch.quantile(y, 0.8)
        up = torch.where(y > cap, torch.inf, torch.minimum(y, cap))
        lo = torch.minimum(y, cap)
        inf = torch.full_like(y, torch.inf)
        t_lo = torch.zeros_like(y) if kind == "censored_log" else -inf
        y = torch.stack([lo, lo, up, t_lo, inf])
    if kind in ("censored_count", "censored_amount"):  # Poisson or Gamma, capped
        y = data_for("count" if kind == "censored_count" else "positive", seed).y[0]
        cap = torch.quantile(y, 0.8)
        lo = torch.minimum(y, cap)
        up = torch.where(y >= cap, torch.inf, lo)
        inf = torch.full_like(y, torch.inf)
        # the amounts are observed only above half their least value: truncated
        t_lo = -inf if kind == "censored_count" else torch.full_like(y, 0.5 * float(y.min()))
        y = torch.stack([lo, lo, up, t_lo, inf])
    return EMData(XeT, XeT, y)


def fitted(family, data: EMData, iterations: int = 2):
    """Parameters after a start from random responsibilities and a few EM iterations."""
    model = EMModel(family, ConstantGate(family.n_experts))
    model.prepare(data)
    g = torch.Generator().manual_seed(1)
    e = -torch.log(torch.rand(family.n_experts, data.n, generator=g, dtype=torch.float64))
    params = model.init_from_resp(data, e / e.sum(0))
    params, _, history, _ = model.iterate(params, data, iterations, 0.0, accelerate=False)
    return params.expert, history


def scaling_for(family, data: EMData) -> Scaling:
    m = data.y.shape[0] if data.y.ndim == 2 else 1
    if getattr(family, "censored", False):  # one output, coded with its bounds
        m = 1
    real = getattr(family, "standardize_target", False)
    y_mean = torch.full((m,), 0.3 if real else 0.0, dtype=torch.float64)
    y_scale = torch.full((m,), 1.5 if real else 1.0, dtype=torch.float64)
    outputs = [f"c{c}" for c in range(family.n_classes)] if hasattr(family, "class_probs") else (
        ["y"] if m == 1 else [f"y{j}" for j in range(m)])  # fmt: skip
    return Scaling(torch.tensor([0.5, -1.0], dtype=torch.float64),
                   torch.tensor([2.0, 0.7], dtype=torch.float64), y_mean, y_scale,
                   ["a", "b"], outputs)  # fmt: skip


def same_params(a, b) -> bool:
    for name in vars(a):
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, torch.Tensor):
            if not torch.equal(x, y):
                return False
        elif isinstance(x, list) and not all(u is v for u, v in zip(x, y, strict=True)):
            return False
    return True


# ---------------------------------------------------------------------------- tests
def test_every_expert_family_is_listed():
    found = discover(moekit.experts, "log_prob", "m_step")
    assert found == set(FAMILIES), f"families without a line in FAMILIES: {found - set(FAMILIES)}"


@pytest.mark.parametrize(("make", "kind"), CASES)
def test_family_implements_the_protocol(make, kind):
    family = make()
    assert protocol_problems(family, base.ExpertFamily) == []
    for proto in CAPABILITIES:  # a capability wholly, or not at all
        if has_any(family, proto):
            assert protocol_problems(family, proto) == [], proto.__name__
    if hasattr(family, "report_name"):
        assert isinstance(family.report_name, str)
    if hasattr(family, "mean_free") or hasattr(family, "from_report"):
        assert not protocol_problems(family, base.DifferentiableExperts)


def test_every_family_given_by_name_can_be_stored():
    from moekit.estimators.regressor import EXPERTS

    for cls in (*EXPERTS.values(), LogisticExperts, BayesianGaussianExperts):
        family = FAMILIES[cls][0][0]()
        assert protocol_problems(family, base.StoredExperts) == [], cls.__name__


@pytest.mark.parametrize(("make", "kind"), CASES)
def test_em_steps_log_prob_select_and_residuals(make, kind):
    family, data = make(), data_for(kind)
    params, history = fitted(family, data)
    assert all(b >= a - 1e-9 for a, b in itertools.pairwise(history)), history
    chunk = Chunk(0, data.n, data)
    logp = family.log_prob(params, chunk)
    assert logp.shape == (K, N) and bool(torch.isfinite(logp).all())
    assert same_params(family.select(params, torch.arange(K)), params)
    perm = torch.tensor([2, 0, 1])
    moved = family.log_prob(family.select(params, perm), Chunk(0, data.n, data))
    torch.testing.assert_close(moved, logp[perm])
    two = family.select(params, torch.tensor([1, 1]))  # a repeated expert, as a split makes
    pair = resized_family(family, 2)
    torch.testing.assert_close(pair.log_prob(two, Chunk(0, data.n, data)), logp[[1, 1]])
    resid = family.residuals(params, Chunk(0, data.n, data))
    assert resid.ndim == 3 and resid.shape[0] == K and resid.shape[2] == N
    assert bool(torch.isfinite(resid).all())
    n_params = family.n_parameters(params)
    # a point mass at zero has no parameters of its own; every other family has some
    assert isinstance(n_params, int) and (n_params == 0 if kind == "zeros" else n_params > 0)
    assert math.isfinite(family.log_prior(params)) and family.min_samples(params) >= 0


@pytest.mark.parametrize(("make", "kind"), CASES)
def test_free_and_reported_parametrisations_round_trip(make, kind):
    family, data = make(), data_for(kind)
    if not hasattr(family, "to_free"):
        pytest.skip("no differentiable view")
    params, _ = fitted(family, data)
    logp = family.log_prob(params, Chunk(0, data.n, data))
    free = family.to_free(params)
    torch.testing.assert_close(family.log_prob_free(free, data.XeT, data.y), logp)
    back = family.from_free(free)
    torch.testing.assert_close(family.log_prob(back, Chunk(0, data.n, data)), logp)
    assert family.log_prior_free(free).ndim == 0
    if hasattr(family, "mean_free"):
        assert family.mean_free(free, data.XeT).shape[::2] == (K, N)
    if hasattr(family, "report"):
        scaling = scaling_for(family, data)
        report = family.report(params, scaling)
        assert len(report.labels) == report.flat().numel() == len(report.blocks)
        free = family.from_report(report.values, scaling, report.fixed)
        torch.testing.assert_close(family.log_prob_free(free, data.XeT, data.y), logp)


@pytest.mark.parametrize(("make", "kind"), CASES)
def test_model_file_shapes_and_checks(make, kind):
    family, data = make(), data_for(kind)
    if not hasattr(family, "param_shapes"):
        pytest.skip("not stored in model files")
    params, _ = fitted(family, data)
    shapes = family.param_shapes(P)
    assert list(shapes) == [f for f in vars(params)]
    assert isinstance(params, family.params_type)
    assert {k: tuple(v.shape) for k, v in vars(params).items()} == shapes
    family.check_params(params, prefix="expert.")
    for i, name in enumerate(shapes):
        bad = family.params_type(**vars(params))
        t = getattr(bad, name).clone(memory_format=torch.contiguous_format)
        t.view(-1)[0] = float("nan")
        setattr(bad, name, t)
        with pytest.raises(ValueError, match=re.escape(repr("expert." + name))) as err:
            family.check_params(bad, prefix="expert.")
        if i == 0:  # the coefficients: one check, one wording, in every family
            assert str(err.value) == f"{'expert.' + name!r} holds NaN or infinite values"


@pytest.mark.parametrize(("make", "kind"), CASES)
def test_predictions(make, kind):
    family, data = make(), data_for(kind)
    params, _ = fitted(family, data)
    if hasattr(family, "moments") and kind != "class":
        means, stds = family.moments(params, data.XeT)
        # one output per target row, but one for a family reading several as one
        one = getattr(family, "target_columns", 1) > 1 or getattr(family, "censored", False)
        m = 1 if one else data.y.shape[0]
        assert means.shape == stds.shape == (N, K, m)
        # a point mass at zero has no spread; every other component has some
        assert bool((stds == 0).all() if kind == "zeros" else (stds > 0).all())
        per_expert = getattr(family, "predictive_families", None)  # a family per expert
        names = per_expert(params) if per_expert else [family.predictive_family]
        assert len(names) == (K if per_expert else 1) and all(n in PREDICTIVE for n in names)
        assert isinstance(family.predictive_extra(params), dict)
    if hasattr(family, "class_probs") and kind == "class":
        probs = family.class_probs(params, data.XeT)
        assert probs.shape == (K, family.n_classes, N)
        torch.testing.assert_close(probs.sum(1), torch.ones(K, N, dtype=torch.float64))


@pytest.mark.parametrize(("make", "kind"), CASES)
def test_nested_family_embeds_at_the_same_likelihood(make, kind):
    family, data = make(), data_for(kind)
    simpler = family.simpler() if hasattr(family, "simpler") else None
    if simpler is None:
        pytest.skip("contains no simpler family")
    small, _ = fitted(simpler, data)
    family.prepare(data)
    embedded = family.embed(small, data)
    # the same log-likelihood, to within 1e-6 nats per row (t experts embed a Gaussian
    # fit at the largest degrees of freedom, not at infinity)
    torch.testing.assert_close(
        family.log_prob(embedded, Chunk(0, data.n, data)).mean(1),
        simpler.log_prob(small, Chunk(0, data.n, data)).mean(1),
        rtol=0.0, atol=1e-6,
    )  # fmt: skip


@pytest.mark.parametrize(("make", "kind"), CASES)
def test_analytic_derivatives_equal_autograd(make, kind):
    """sum_ik c_ik log p_k(y_i | x_i) in the reported parameters: its gradient and Hessian
    from local_derivatives and local_parameters equal autograd's through from_report."""
    family, data = make(), data_for(kind)
    if not hasattr(family, "local_derivatives"):
        pytest.skip("no analytic derivatives")
    params, _ = fitted(family, data, iterations=4)
    scaling = scaling_for(family, data)
    report = family.report(params, scaling)
    theta = report.flat()
    c = torch.rand(K, N, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def total(t):
        free = family.from_report(report.unflatten(t), scaling, report.fixed)
        return (c * family.log_prob_free(free, data.XeT, data.y)).sum()

    def phi(t):
        coef, scalars = family.local_parameters(report.unflatten(t), scaling, report.fixed)
        return torch.cat([coef.reshape(K, -1), scalars], 1).reshape(-1)

    d = family.local_derivatives(params, Chunk(0, N, data), scaling)
    L = d.d1.shape[1]
    Z = [data.XeT if l < d.n_linear else torch.ones(1, N, dtype=torch.float64) for l in range(L)]
    d1, d2 = d.d1.expand(K, L, N), d.d2.expand(K, L, L, N)
    grad = torch.cat([(c[k] * d1[k, l]) @ Z[l].T for k in range(K) for l in range(L)])
    blocks = [torch.cat([(Z[l] * c[k] * d2[k, l, j]) @ Z[j].T for j in range(L)], 1)
              for k in range(K) for l in range(L)]  # fmt: skip
    per_expert = torch.cat(blocks).reshape(K, -1, grad.numel() // K)
    hess = torch.block_diag(*[per_expert[k] for k in range(K)])
    J = torch.autograd.functional.jacobian(phi, theta)
    torch.testing.assert_close(J.T @ grad, torch.autograd.functional.jacobian(total, theta))
    torch.testing.assert_close(J.T @ hess @ J, torch.autograd.functional.hessian(total, theta),
                               rtol=1e-7, atol=1e-7)  # fmt: skip
