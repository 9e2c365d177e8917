"""Gradient fitting: the same optimum as EM, and what the cooperative objective changes."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

from moekit._core.data import EMData
from moekit.datasets import make_bishop_inverse, make_moe_regression
from moekit.experts.gaussian import GaussianExperts
from moekit.experts.mlp import MLPExperts
from moekit.fitting.em import EMModel, Params, run_em
from moekit.fitting.gradient import run_gradient
from moekit.gates.constant import ConstantGate
from moekit.gates.mlp import MLPGate
from moekit.gates.softmax import SoftmaxGate

# alpha = 0: the unpenalised likelihood, whose optimum does not depend on how the
# softmax's shift invariance is fixed
GATES = {
    "softmax": lambda K: SoftmaxGate(K, alpha=0.0),
    "penalised": lambda K: SoftmaxGate(K, alpha=1e-3),
    "constant": ConstantGate,
}


def _data(X, y) -> EMData:
    """The layout the estimators build: standardised (p, n) design with an intercept row."""
    X = (X - X.mean(0)) / X.std(0)
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    y = (y - y.mean(0)) / y.std(0)
    XT = torch.as_tensor(np.vstack([X.T, np.ones(len(X))])).contiguous()
    return EMData(XT, XT, torch.as_tensor(y.T.copy()))


def _model(K, m=1, gate="penalised") -> EMModel:
    return EMModel(GaussianExperts(K, m, var_floor=1e-6), GATES[gate](K))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _em(data, K, seed, gate="penalised", m=1):
    return run_em(
        _model(K, m, gate), data, init="kmeans", n_init=1, max_iter=2000, tol=1e-11,
        init_max_iter=30, init_sample_size=None, generator=_gen(seed),
    )  # fmt: skip


@pytest.mark.parametrize("gate", ["softmax", "constant"])
@pytest.mark.parametrize("seed", [0, 1])
def test_lbfgs_reaches_the_em_optimum(gate, seed):
    """Same start (EM's first M-step), same likelihood, so the same optimum."""
    kind = "constant" if gate == "constant" else "softmax"
    X, y, _ = make_moe_regression(800, n_features=3, n_experts=3, gate=kind, random_state=seed)
    data = _data(X, y)
    em = _em(data, 3, seed, gate)
    gr = run_gradient(_model(3, gate=gate), data, init="kmeans", generator=_gen(seed))
    assert gr.converged
    assert gr.loglik == pytest.approx(em.loglik, abs=1e-6)
    assert gr.objective == pytest.approx(em.objective, abs=1e-6)
    # same start, same optimum: the parameters agree too, expert by expert
    np.testing.assert_allclose(gr.params.expert.coef, em.params.expert.coef, atol=2e-3)
    np.testing.assert_allclose(gr.params.expert.var, em.params.expert.var, atol=2e-3)
    np.testing.assert_allclose(gr.nk, em.nk, atol=0.5)


def test_penalised_gate_reaches_the_em_optimum():
    X, y, _ = make_moe_regression(800, n_features=3, n_experts=3, random_state=2)
    data = _data(X, y)
    em = _em(data, 3, 2)
    gr = run_gradient(_model(3), data, init="kmeans", generator=_gen(2))
    # the gate's ridge penalty is part of the objective both maximise
    assert gr.objective >= em.objective - 1e-7
    assert gr.loglik == pytest.approx(em.loglik, abs=1e-4)


def test_lbfgs_history_never_decreases():
    X, y, _ = make_moe_regression(500, n_features=2, n_experts=3, random_state=3)
    gr = run_gradient(_model(3), _data(X, y), init="kmeans", generator=_gen(3))
    # history is EM's objective: the line search only accepts steps that raise it
    assert np.diff(gr.history).min() >= -1e-12
    assert gr.history[-1] == pytest.approx(gr.objective, abs=1e-9)


def test_multi_output_reaches_the_em_optimum():
    rng = np.random.default_rng(0)
    X, y, _ = make_moe_regression(600, n_features=2, n_experts=2, random_state=4)
    Y = np.stack([y, 0.5 * y + X[:, 0] + 0.3 * rng.standard_normal(len(y))], axis=1)
    data = _data(X, Y)
    em = _em(data, 2, 0, m=2)
    gr = run_gradient(_model(2, m=2), data, init="kmeans", generator=_gen(0))
    assert gr.params.expert.coef.shape == (2, 2, 3)
    assert gr.loglik == pytest.approx(em.loglik, abs=1e-6)


def test_adam_reaches_the_em_optimum():
    X, y, _ = make_moe_regression(400, n_features=2, n_experts=2, random_state=5)
    data = _data(X, y)
    em = _em(data, 2, 0)
    full = run_gradient(
        _model(2), data, init="kmeans", generator=_gen(0), optimizer="adam",
        learning_rate=0.02, max_iter=1500, tol=1e-10,
    )  # fmt: skip
    assert full.loglik == pytest.approx(em.loglik, abs=1e-4)
    batched = run_gradient(
        _model(2), data, init="kmeans", generator=_gen(0), optimizer="adam",
        batch_size=64, max_iter=100,
    )  # fmt: skip
    # mini-batch noise keeps Adam near, not at, the optimum
    assert batched.loglik == pytest.approx(em.loglik, abs=1e-2)


def test_warm_start_at_the_em_optimum_stays_there():
    X, y, _ = make_moe_regression(500, n_features=2, n_experts=2, random_state=6)
    data = _data(X, y)
    em = _em(data, 2, 0)
    gr = run_gradient(_model(2), data, init="kmeans", generator=_gen(0), warm_params=em.params)
    assert gr.loglik >= em.loglik - 1e-9
    assert gr.loglik == pytest.approx(em.loglik, abs=1e-6)


def test_neural_gate_and_experts_train_jointly():
    """MLP gate and MLP experts: joint L-BFGS steps keep raising EM's own objective."""
    prob = make_bishop_inverse(300, random_state=0)
    data = _data(prob.X, prob.y)

    def model():
        return EMModel(
            MLPExperts(2, 1, 1e-6, seed=0, options={"hidden": 4}),
            MLPGate(2, seed=0, options={"hidden": 4}),
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        em = run_em(
            model(), data, init="kmeans", n_init=1, max_iter=5, tol=1e-8,
            init_max_iter=5, init_sample_size=None, generator=_gen(0),
        )  # fmt: skip
    gr = run_gradient(
        model(), data, init="kmeans", generator=_gen(0), warm_params=em.params, max_iter=60
    )
    # the out-of-place likelihood and penalties here are the families' own
    assert gr.history[0] == pytest.approx(em.objective, abs=1e-9)
    assert gr.history[-1] == pytest.approx(gr.objective, abs=1e-9)
    assert np.diff(gr.history).min() >= -1e-12
    assert gr.objective > em.objective + 0.01


def test_competitive_experts_specialise_cooperative_ones_average():
    """Bishop's inverse problem: at x = 0.5, t has three branches (0.21, 0.5, 0.79).

    Maximum likelihood (competitive) gives the branches their own narrow experts;
    squared error of the blend (cooperative) is minimised by the conditional mean,
    so one broad expert covers the middle and the others do not share it.
    """
    prob = make_bishop_inverse(600, random_state=0)
    data = _data(prob.X, prob.y)
    fits = {
        obj: run_gradient(_model(3), data, init="kmeans", generator=_gen(0), objective=obj)
        for obj in ("competitive", "cooperative")
    }
    comp, coop = fits["competitive"], fits["cooperative"]
    assert comp.loglik > coop.loglik + 0.2

    xm, xs, tm, ts = prob.X.mean(), prob.X.std(), prob.y.mean(), prob.y.std()
    xt = torch.tensor([[(0.5 - xm) / xs], [1.0]], dtype=torch.float64)  # (p, 1)
    roots = prob.inverse([[0.5]])[0]

    def branches_covered(params):
        g = torch.softmax(params.gate.coef @ xt, 0)[:, 0].numpy()
        mu = (params.expert.coef[:, 0, :] @ xt)[:, 0].numpy() * ts + tm
        return {
            int(np.argmin(np.abs(roots - mu[k])))
            for k in range(3)
            if g[k] > 0.1 and np.abs(roots - mu[k]).min() < 0.1
        }

    assert len(roots) == 3
    assert len(branches_covered(comp.params)) >= 2
    assert len(branches_covered(coop.params)) == 1

    def blend_mse(params):
        g = torch.softmax(params.gate.coef @ data.XgT, 0)
        mu = params.expert.coef[:, 0, :] @ data.XeT
        return float(((data.y[0] - (g * mu).sum(0)) ** 2).mean())

    # each objective wins on its own terms
    assert blend_mse(coop.params) < blend_mse(comp.params)


def test_bad_arguments_are_named():
    X, y, _ = make_moe_regression(100, n_features=2, n_experts=2, random_state=0)
    data = _data(X, y)
    with pytest.raises(ValueError, match="objective"):
        run_gradient(_model(2), data, init="kmeans", generator=_gen(0), objective="x")
    with pytest.raises(ValueError, match="optimizer"):
        run_gradient(_model(2), data, init="kmeans", generator=_gen(0), optimizer="sgd")

    class Unknown:  # a gate with no differentiable form registered
        n_experts = 2

        def prepare(self, data):
            pass

    model = EMModel(GaussianExperts(2, 1, 1e-6), Unknown())
    with pytest.raises(ValueError, match="differentiable form of the gate Unknown"):
        run_gradient(model, data, init="kmeans", generator=_gen(0), warm_params=Params(None, None))
