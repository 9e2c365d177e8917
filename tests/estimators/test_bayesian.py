"""BayesianMoERegressor: variational EM through the one EM loop.

The loop's objective must be the ELBO and never decrease; surplus experts must
empty out under a small Dirichlet concentration; ARD must shrink the weights of
irrelevant features; and the predictive must carry the weights' uncertainty.
"""

import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch.distributions import Dirichlet, MultivariateNormal, kl_divergence

from moekit import BayesianMoERegressor, MoERegressor, load, select_n_experts
from moekit._core.data import EMData
from moekit._core.engine import em_threads
from moekit.datasets import make_moe_regression
from moekit.experts.bayesian_gaussian import BayesianGaussianExperts
from moekit.fitting.init import random_resp
from moekit.fitting.model import EMModel
from moekit.gates.dirichlet import DirichletGate
from moekit.gates.mlp import MLPGate
from moekit.gates.softmax import SoftmaxGate

# Rounding of a mean over n float64 terms; the ELBO must not drop by more.
SLACK = 1e-10


def _standardised(X, y):
    Z = (X - X.mean(0)) / X.std(0)
    XeT = torch.cat([torch.as_tensor(Z.T), torch.ones(1, len(y), dtype=torch.float64)])
    return EMData(XeT, XeT, torch.as_tensor(((y - y.mean()) / y.std())[None]))


# ------------------------------------------------------------------ the ELBO
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("gate", ["constant", "softmax", "mlp"])
def test_elbo_never_decreases(seed, gate):
    K = 2 + seed % 3
    kind = "constant" if gate == "constant" else "softmax"
    X, y, _ = make_moe_regression(300, n_features=3, n_experts=K, gate=kind, noise=0.3,
                                  random_state=seed)  # fmt: skip
    options = {"hidden": 4, "steps": 5} if gate == "mlp" else None
    prior = ("ard", "isotropic", "full")[seed % 3]
    m = BayesianMoERegressor(K, gate=gate, prior=prior, init="random", n_init=1, max_iter=30,
                             tol=0.0, random_state=seed, gate_options=options)  # fmt: skip
    with pytest.warns(ConvergenceWarning):  # tol=0 runs every iteration
        m.fit(X, y)
    h = np.asarray(m.elbo_history_)
    assert m.n_iter_ == 30 and len(h) == 31
    assert np.diff(h).min() >= -SLACK, f"the ELBO decreased by {-np.diff(h).min():.3g}"


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("gate", ["dirichlet", "bohning", "mlp"])
def test_every_variational_em_step_raises_the_elbo_without_the_safeguard(seed, gate):
    """E-step and M-step straight from EMModel, no step halving: each is exact (or checked)."""
    X, y, _ = make_moe_regression(250, n_features=2, n_experts=3, noise=0.3, random_state=seed)
    data = _standardised(X, y)
    K = 4
    gates = {
        "dirichlet": lambda: DirichletGate(K, 0.01),
        "bohning": lambda: SoftmaxGate(K, alpha=1e-3, solver="bohning"),
        "mlp": lambda: MLPGate(K, options={"hidden": 4, "steps": 5}),
    }
    noise = "per_expert" if seed % 2 else "shared"
    model = EMModel(BayesianGaussianExperts(K, 1, noise=noise, prior_mean="shared"), gates[gate]())
    model.prepare(data)
    assert model.expert.monotone and model.gate.monotone
    start = random_resp(data, K, torch.Generator().manual_seed(seed))
    with em_threads(data):  # one thread for small passes, as the estimators run them
        params = model.init_from_resp(data, start)
        cur = model.e_pass(params, data)
        for _ in range(25):
            params = model.m_step(params, cur, data)
            new = model.e_pass(params, data)
            assert new.objective >= cur.objective - SLACK
            cur = new


def test_the_loops_objective_is_the_elbo():
    """Checked against the ELBO written out term by term, with torch's KL divergences."""
    X, y, _ = make_moe_regression(200, n_features=2, n_experts=2, gate="constant", noise=0.3,
                                  random_state=0)  # fmt: skip
    data = _standardised(X, y)
    K, mu = 3, 0.2
    model = EMModel(BayesianGaussianExperts(K, 1, noise="per_expert"), DirichletGate(K, mu))
    model.prepare(data)
    params = model.init_from_resp(data, random_resp(data, K, torch.Generator().manual_seed(0)))
    for _ in range(3):
        params = model.m_step(params, model.e_pass(params, data), data)
    res = model.e_pass(params, data, keep_resp=True)
    e, lam = params.expert, params.gate.concentration
    x, t = data.XeT.T, data.y[0]
    r = res.resp  # the optimal q(Z) at these parameters
    mean = e.coef[:, 0] @ data.XeT  # (K, n)
    quad = torch.einsum("ni,kij,nj->kn", x, e.cov[:, 0], x)
    beta = e.beta[:, :1]
    e_loglik = 0.5 * torch.log(beta / (2 * math.pi)) - 0.5 * beta * ((t - mean) ** 2 + quad)
    e_logpi = torch.special.digamma(lam) - torch.special.digamma(lam.sum())
    kl_w = kl_divergence(
        MultivariateNormal(e.coef[:, 0], e.cov[:, 0]),
        MultivariateNormal(e.prior_mean[:, 0], precision_matrix=e.prior_prec[:, 0]),
    ).sum()
    kl_pi = kl_divergence(Dirichlet(lam), Dirichlet(torch.full_like(lam, mu)))
    entropy = -(r * torch.log(r.clamp(min=1e-300))).sum()
    elbo = (r * (e_loglik + e_logpi[:, None])).sum() + entropy - kl_w - kl_pi
    assert res.objective * data.n == pytest.approx(float(elbo), rel=1e-10)


# ------------------------------------------------------------------ what the model finds
def test_surplus_experts_empty_out_under_a_small_dirichlet_concentration():
    X, y, truth = make_moe_regression(600, n_features=2, n_experts=3, gate="constant", noise=0.3,
                                      random_state=1)  # fmt: skip
    m = BayesianMoERegressor(10, gate="constant", dirichlet_concentration=1e-3, random_state=0)
    m.fit(X, y)
    assert m.n_effective_experts_ == 3
    np.testing.assert_allclose(np.sort(m.expected_weights_[:3]),
                               np.sort(np.exp(truth.gate_intercept)), atol=0.05)  # fmt: skip
    assert m.expected_weights_[3:].max() < 1e-3
    # the used experts are the true ones
    order = np.argsort(m.intercept_[:3])
    true = np.argsort(truth.expert_intercept)
    np.testing.assert_allclose(m.coef_[:3][order], truth.expert_coef[true], atol=0.1)


def test_recovers_the_true_experts_and_agrees_with_maximum_likelihood_on_large_data():
    X, y, truth = make_moe_regression(4000, n_features=2, n_experts=3, noise=0.3, random_state=0)
    m = BayesianMoERegressor(3, random_state=0).fit(X, y)
    order = np.argsort(m.intercept_)
    true = np.argsort(truth.expert_intercept)
    np.testing.assert_allclose(m.intercept_[order], truth.expert_intercept[true], atol=0.05)
    np.testing.assert_allclose(m.coef_[order], truth.expert_coef[true], atol=0.05)
    np.testing.assert_allclose(m.noise_std_, 0.3, rtol=0.05)
    ml = MoERegressor(3, random_state=0).fit(X, y)
    ml_order = np.argsort(ml.intercept_)
    np.testing.assert_allclose(m.coef_[order], ml.coef_[ml_order], atol=0.01)
    # the posterior is narrow here: the predictive sd is about the noise sd
    d = m.predict_distribution(X[:100])
    assert np.median(d.stds / m.noise_std_) < 1.01
    assert (d.stds / m.noise_std_).max() < 1.05


def _ard_problem(seed, n=800):
    """Two experts on features (0, 1) and (2, 3); features 4 and 5 matter to neither."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 6))
    first = rng.random(n) < 0.5
    y = np.where(first, 2 * X[:, 0] - 1.5 * X[:, 1] + 1, -1.8 * X[:, 2] + 1.2 * X[:, 3] - 1)
    return X, y + 0.3 * rng.normal(size=n)


def test_ard_shrinks_the_weights_of_irrelevant_features():
    X, y = _ard_problem(0)
    fits = {}
    for prior in ("ard", "isotropic"):
        est = BayesianMoERegressor(2, gate="constant", prior=prior, tol=1e-9, max_iter=3000,
                                   random_state=0)  # fmt: skip
        fits[prior] = est.fit(X, y)
    m = fits["ard"]
    assert m.converged_
    k_first = int(np.argmax(np.abs(m.coef_[:, 0])))  # the expert on features 0 and 1
    relevant = np.zeros((2, 6), bool)
    relevant[k_first, [0, 1]] = relevant[1 - k_first, [2, 3]] = True
    sd = np.sqrt(np.diagonal(m.coef_covariance_, axis1=1, axis2=2))[:, 1:]
    ratio = np.abs(m.coef_) / sd
    assert ratio[relevant].min() > 50
    # ARD keeps a weight only where its ML t-value exceeds 1 (Tipping 2001): the
    # others are pruned to zero, the few kept ones stay small
    assert ratio[~relevant].max() < 2.0
    assert np.median(ratio[~relevant]) < 0.1
    assert np.abs(m.coef_[~relevant]).max() < 0.03
    assert (ratio[~relevant] < 0.1).sum() >= 5
    iso = fits["isotropic"]
    assert np.abs(m.coef_[~relevant]).sum() < 0.5 * np.abs(iso.coef_[~relevant]).sum()


def test_predictive_variance_by_hand_on_one_row():
    X, y, _ = make_moe_regression(60, n_features=2, n_experts=2, noise=0.3, random_state=2)
    m = BayesianMoERegressor(2, random_state=0).fit(X, y)
    x = np.array([0.7, -1.3])
    d = m.predict_distribution(x[None])
    row = np.r_[1.0, x]  # [intercept, x_1, x_2], the order of coef_covariance_
    for k in range(2):
        var = m.noise_std_[k] ** 2 + row @ m.coef_covariance_[k] @ row
        assert d.stds[0, k] ** 2 == pytest.approx(var, rel=1e-10)
        assert d.means[0, k] == pytest.approx(m.intercept_[k] + m.coef_[k] @ x, rel=1e-10)
        # the weights' uncertainty is part of it, and grows away from the data
        assert d.stds[0, k] > m.noise_std_[k]
    far = m.predict_distribution(10 * x[None])
    assert (far.stds[0] > d.stds[0]).all()
    np.testing.assert_allclose(d.weights[0], m.gate_weights(x[None])[0])
    assert m.log_likelihood(x[None], np.array([0.1])) == pytest.approx(
        float(np.log(d.pdf(np.array([0.1]))[0]))
    )


def test_two_outputs_fit_with_a_posterior_each():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 2))
    noise = rng.normal(size=(400, 2)) * [0.1, 0.2]
    Y = np.c_[X @ [1.0, -2.0], 3.0 * X[:, 1]] + noise
    m = BayesianMoERegressor(1, random_state=0).fit(X, Y)
    np.testing.assert_allclose(m.coef_[0], [[1.0, -2.0], [0.0, 3.0]], atol=0.03)
    np.testing.assert_allclose(m.noise_std_[0], [0.1, 0.2], rtol=0.15)  # shared over experts only
    assert m.coef_covariance_.shape == (1, 2, 3, 3)
    assert m.predict_distribution(X[:5]).means.shape == (5, 1, 2)


# ------------------------------------------------------------------ choosing K
def test_select_n_experts_by_the_elbo():
    X, y, _ = make_moe_regression(500, n_features=2, n_experts=2, gate="constant", noise=0.3,
                                  random_state=4)  # fmt: skip
    template = BayesianMoERegressor(gate="constant", random_state=0, n_init=4)
    best, table = select_n_experts(template, X, y, n_experts=[1, 2, 3, 4], criterion="elbo")
    assert best.n_experts == table.loc[table["elbo"].idxmax(), "n_experts"] == 2
    assert table.loc[table["best"], "elbo"].item() == pytest.approx(best.elbo_ * len(X))
    with pytest.raises(ValueError, match="criterion='elbo' needs an estimator fitted by"):
        select_n_experts(MoERegressor(), X, y, criterion="elbo")


# ------------------------------------------------------------------ files, summary, errors
def test_save_and_load_round_trip(tmp_path):
    X, y, _ = make_moe_regression(300, n_features=3, n_experts=3, gate="constant", noise=0.3,
                                  random_state=0)  # fmt: skip
    m = BayesianMoERegressor(5, gate="constant", prior="full", dirichlet_concentration=0.01,
                             random_state=0).fit(X, y)  # fmt: skip
    m.save(tmp_path / "b.moe")
    back = load(tmp_path / "b.moe")
    assert type(back) is BayesianMoERegressor and back.get_params() == m.get_params()
    np.testing.assert_array_equal(back.predict_distribution(X).stds, m.predict_distribution(X).stds)
    np.testing.assert_array_equal(back.coef_covariance_, m.coef_covariance_)
    assert back.elbo_history_ == m.elbo_history_ and back.elbo_ == m.elbo_
    assert back.n_effective_experts_ == m.n_effective_experts_
    assert back.log_likelihood(X, y) == m.log_likelihood(X, y)


def test_load_refuses_a_posterior_covariance_that_is_not_positive_definite(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    X, y, _ = make_moe_regression(200, n_features=2, n_experts=2, random_state=0)
    BayesianMoERegressor(2, n_init=1, random_state=0).fit(X, y).save(tmp_path / "b.moe")
    with safe_open(str(tmp_path / "b.moe"), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    tensors["expert.cov"] = -tensors["expert.cov"]
    save_file(tensors, str(tmp_path / "bad.moe"), metadata=meta)
    with pytest.raises(ValueError, match=r"'expert\.cov' holds matrices that are not symmetric"):
        load(tmp_path / "bad.moe")


def test_summary_tabulates_posterior_means_and_sds():
    X, y, _ = make_moe_regression(300, n_features=2, n_experts=2, gate="constant", random_state=0)
    m = BayesianMoERegressor(2, gate="constant", random_state=0).fit(X, y)
    s = m.summary()
    experts = s.table[s.table["block"] != "gate"]
    assert list(experts["parameter"][:3]) == ["intercept", "x0", "x1"]
    sd = np.sqrt(np.diagonal(m.coef_covariance_, axis1=1, axis2=2)).reshape(-1)
    np.testing.assert_allclose(experts["std_error"], sd)
    np.testing.assert_allclose(experts["estimate"], np.c_[m.intercept_, m.coef_].reshape(-1))
    assert s.table["p_value"].isna().all()
    gate = s.table[s.table["block"] == "gate"]
    np.testing.assert_allclose(gate["estimate"], m.expected_weights_)
    assert "variational posterior" in str(s) and "no p-values" in s.note


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"prior": "laplace"}, "The 'prior' parameter of BayesianMoERegressor must be one of"),
        ({"noise": "heteroscedastic"}, "The 'noise' parameter"),
        ({"prior_mean": "per_expert"}, "The 'prior_mean' parameter"),
        ({"dirichlet_concentration": 0.0}, "The 'dirichlet_concentration' parameter"),
        ({"effective_threshold": 1.5}, "The 'effective_threshold' parameter"),
        ({"gate": "tree"}, "The 'gate' parameter"),
        ({"gate": "constant", "gate_options": {"hidden": 3}}, "gate_options are for gate='mlp'"),
    ],
)
def test_bad_arguments_are_named_and_leave_the_fit_as_it_was(params, message):
    X, y, _ = make_moe_regression(200, n_features=2, n_experts=2, random_state=0)
    m = BayesianMoERegressor(2, n_init=1, random_state=0).fit(X, y)
    before, settings = pickle.dumps(m), m.get_params()
    m.set_params(**params)
    with pytest.raises(ValueError, match=message):
        m.fit(X, y)
    m.set_params(**{k: settings[k] for k in params})
    assert pickle.dumps(m) == before
    with pytest.raises(ValueError, match="NaN"):
        BayesianMoERegressor(2).fit(np.where(X == X[0, 0], np.nan, X), y)


def test_warm_start_one_step_at_a_time_never_lowers_the_elbo():
    X, y, _ = make_moe_regression(500, n_features=2, n_experts=3, noise=0.3, random_state=3)
    m = BayesianMoERegressor(3, gate="constant", max_iter=1, warm_start=True, random_state=0)
    previous = -np.inf
    for _ in range(20):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            m.fit(X, y)
        assert m.elbo_ >= previous - SLACK
        previous = m.elbo_


@parametrize_with_checks(
    [
        BayesianMoERegressor(n_experts=2, max_iter=20, n_init=2, random_state=0),
        BayesianMoERegressor(n_experts=2, gate="constant", max_iter=20, n_init=2, random_state=0),
    ]
)
def test_sklearn_compatible(estimator, check):
    check(estimator)
