"""A family per expert (``expert=[...]``): the zero-inflated Poisson recovers its
truth and equals a direct maximisation of its likelihood, mixed fits never fall below
the models they contain, and the list survives pruning, model files and prediction."""

import glm_checks as checks
import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import expit, gammaln, log_expit

from moekit import MoERegressor, load
from moekit._core.data import EMData
from moekit.experts.mixed import MixedExperts
from moekit.experts.negative_binomial import NegativeBinomialExperts
from moekit.experts.poisson import PoissonExperts

POISSON = np.array([0.5, 0.7])  # log rate: intercept, slope
ZERO_GATE = np.array([-0.5, 1.0])  # logit P(structural zero | x): intercept, slope


def _zip(n, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 1))
    zero = rng.random(n) < expit(ZERO_GATE[0] + ZERO_GATE[1] * X[:, 0])
    y = np.where(zero, 0, rng.poisson(np.exp(POISSON[0] + POISSON[1] * X[:, 0])))
    return X, y.astype(float)


def _zip_loglik(theta, X, y):
    """ZIP log-likelihood with a logistic zero probability on the same covariates."""
    g0, g1, b0, b1 = theta
    logit = g0 + g1 * X[:, 0]
    eta = b0 + b1 * X[:, 0]
    log_pois = y * eta - np.exp(eta) - gammaln(y + 1)
    log_pi, log_1m = log_expit(logit), log_expit(-logit)
    at_zero = np.logaddexp(log_pi, log_1m + log_pois)
    return np.sum(np.where(y == 0, at_zero, log_1m + log_pois))


@pytest.fixture(scope="module")
def zip_fit():
    X, y = _zip(3000, 0)
    return X, y, MoERegressor(2, expert=["zero", "poisson"], n_init=3, random_state=0).fit(X, y)


def test_zero_inflated_poisson_recovers_its_truth(zip_fit):
    m = zip_fit[2]
    table = m.summary().table
    pois = table[table.block == "expert 1"].set_index("parameter")
    z = (pois.estimate.to_numpy() - POISSON) / pois.std_error.to_numpy()
    assert np.all(np.abs(z) < 3.0), z
    # the gate's "expert 1 vs 0" is the logit of the Poisson's share: minus the zero's
    gate = table[table.block == "gate: expert 1 vs 0"].set_index("parameter")
    z = (gate.estimate.to_numpy() + ZERO_GATE) / gate.std_error.to_numpy()
    assert np.all(np.abs(z) < 3.0), z
    assert "0 point mass at 0, 1 Poisson" in str(m.summary())


def test_zero_inflated_poisson_equals_a_direct_maximisation(zip_fit):
    X, y, _ = zip_fit
    X, y = X[:800], y[:800]
    ours = MoERegressor(2, expert=["zero", "poisson"], n_init=3, random_state=0,
                        tol=1e-12, max_iter=2000, gate_alpha=1e-12).fit(X, y)  # fmt: skip
    ref = minimize(lambda t: -_zip_loglik(t, X, y), np.zeros(4), method="BFGS",
                   options={"gtol": 1e-9})  # fmt: skip
    assert len(y) * ours.log_likelihood(X, y) == pytest.approx(-ref.fun, abs=1e-4)


def test_zero_inflated_poisson_fits_at_least_as_well_as_the_poisson(zip_fit):
    X, y, m = zip_fit
    pois = MoERegressor(1, expert="poisson", n_init=1).fit(X, y)
    assert m.log_likelihood(X, y) >= pois.log_likelihood(X, y)
    assert m.log_likelihood(X, y) - pois.log_likelihood(X, y) > 0.05  # clearly better here


def test_zero_inflated_poisson_predicts_its_zeros(zip_fit):
    X, _, m = zip_fit
    d = m.predict_distribution(X[:20])
    assert d.family == ["zero", "poisson"]
    pi0, mu = m.gate_weights(X[:20])[:, 0], d.means[:, 1]
    np.testing.assert_allclose(d.pdf(np.zeros(20)), pi0 + (1 - pi0) * np.exp(-mu), rtol=1e-12)
    np.testing.assert_allclose(d.mean(), (1 - pi0) * mu, rtol=1e-12)
    np.testing.assert_allclose(d.var(), (1 - pi0) * mu * (1 + pi0 * mu), rtol=1e-10)
    draws = d.sample(20000, random_state=0)
    assert (draws == np.round(draws)).all()
    np.testing.assert_allclose((draws == 0).mean(1), d.pdf(np.zeros(20)), atol=0.015)
    np.testing.assert_allclose(d.cdf(np.zeros(20)), d.pdf(np.zeros(20)), rtol=1e-12)


def test_a_family_per_expert_round_trips_through_a_model_file(zip_fit, tmp_path):
    X, y, m = zip_fit
    m.save(tmp_path / "zip.moe")
    back = load(tmp_path / "zip.moe")
    assert back.expert == ["zero", "poisson"]
    assert back.log_likelihood(X, y) == m.log_likelihood(X, y)
    assert str(back.summary(X, y)) == str(m.summary())


def test_removing_an_expert_removes_its_family():
    X, y = _zip(2000, 1)
    m = MoERegressor(3, expert=["zero", "poisson", "negative_binomial"], n_init=2,
                     random_state=0, min_share=0.0).fit(X, y)  # fmt: skip
    fam = m._expert_family
    assert sorted(fam.names) == ["negative_binomial", "poisson", "zero"]
    gone = fam.names.index("negative_binomial")
    m.remove_expert(gone, X, y)
    assert m._expert_family.names == ["zero", "poisson"]
    assert m._expert_family.names_of(m._params.expert) == ["zero", "poisson"]
    assert m.predict_distribution(X[:3]).family == ["zero", "poisson"]
    with pytest.warns(UserWarning, match="min_share"):  # pruning keeps the list too
        pruned = MoERegressor(3, expert=["zero", "poisson", "poisson"], n_init=2,
                              random_state=0, min_share=0.3).fit(X, y)  # fmt: skip
    names = pruned._expert_family.names
    assert names == pruned._expert_family.names_of(pruned._params.expert)
    assert len(names) == pruned.expert_sizes_.shape[0] < 3 and "zero" in names


def _gamma_and_lognormal_rows(n: int, seed: int):
    """Half the rows from a Gamma regression (shape 4), half from a lognormal one."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (n, 1))
    first = rng.random(n) < 0.5
    y = np.where(first, rng.gamma(4.0, np.exp(0.2 + X[:, 0]) / 4.0),
                 np.exp(1.5 - 0.5 * X[:, 0] + 0.3 * rng.normal(size=n)))  # fmt: skip
    return X, y


def test_gamma_and_lognormal_experts_in_one_mixture():
    X, y = _gamma_and_lognormal_rows(2000, seed=2)
    m = MoERegressor(2, expert=["gamma", "lognormal"], n_init=3, random_state=0).fit(X, y)
    for alone in ("gamma", "lognormal"):
        one = MoERegressor(1, expert=alone, n_init=1).fit(X, y)
        assert m.log_likelihood(X, y) > one.log_likelihood(X, y)
    assert sorted(m.predict_distribution(X[:2]).family) == ["gamma", "lognormal"]
    assert np.isfinite(m.summary().table.std_error).all()


def test_a_mixed_m_step_never_lowers_its_objective():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(400, 1))
    y = rng.poisson(np.exp(1.0 + 0.5 * X[:, 0])).astype(float)
    data = EMData(checks.design(X), checks.design(X), torch.as_tensor(y).reshape(1, -1))
    names = ["poisson", "negative_binomial", "poisson"]
    for seed in range(3):
        family = MixedExperts(names, {"poisson": PoissonExperts(2),
                                      "negative_binomial": NegativeBinomialExperts(1)})  # fmt: skip
        q = checks.m_step_objectives(family, data, steps=12, seed=seed)
        assert checks.never_falls(q), q


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"n_experts": 3, "expert": ["zero", "poisson"]},
      r"expert lists 2 families but n_experts=3"),
     ({"n_experts": 2, "expert": ["zero", "gamma"]}, r"mixes families of different targets"),
     ({"n_experts": 2, "expert": ["linear", "poisson"]}, r"\['linear'\] cannot share a list"),
     ({"n_experts": 2, "expert": ["zero", "zero"]}, r"expert='zero' is a point mass at 0"),
     ({"n_experts": 2, "expert": ["zero", "poisson"], "fit_method": "gradient"},
      r"fitted by EM only"),
     ({"n_experts": 2, "expert": ["zero", "bogus"]}, r"'expert' parameter of MoERegressor")],
)  # fmt: skip
def test_a_bad_list_of_families_is_refused_naming_expert(kwargs, match):
    X, y = _zip(50, 4)
    with pytest.raises(ValueError, match=match):
        MoERegressor(**kwargs).fit(X, y)


def test_a_family_list_checks_the_target_of_its_families():
    X, y = _zip(50, 5)
    with pytest.raises(ValueError, match="expert='poisson' needs y of non-negative integer"):
        MoERegressor(2, expert=["zero", "poisson"]).fit(X, y + 0.5)
    with pytest.raises(ValueError, match="expert='gamma' needs y > 0"):
        MoERegressor(2, expert=["gamma", "lognormal"]).fit(X, y)


def test_one_name_repeated_is_that_family():
    X, y = _zip(500, 6)
    a = MoERegressor(2, expert=["poisson", "poisson"], n_init=2, random_state=0).fit(X, y)
    b = MoERegressor(2, expert="poisson", n_init=2, random_state=0).fit(X, y)
    assert a.log_likelihood(X, y) == b.log_likelihood(X, y)
    assert type(a._expert_family) is PoissonExperts


def test_zero_inflated_poisson_with_exposure():
    """An offset reaches the Poisson part of a family list (the zero ignores it):
    doubling the exposure doubles the Poisson expert's mean, the slope is recovered,
    and the standard errors (by autograd: a list has no analytic derivatives) take the
    offset: a constant one is the Poisson intercept, with the same likelihood and so
    the same standard errors."""
    import copy

    rng = np.random.default_rng(5)
    n = 600
    X = rng.normal(size=(n, 1))
    hours = rng.uniform(0.5, 3.0, size=n)
    zero = rng.random(n) < 1 / (1 + np.exp(-(-0.5 + 0.8 * X[:, 0])))
    y = np.where(zero, 0, rng.poisson(hours * np.exp(0.3 + 0.5 * X[:, 0])))
    m = MoERegressor(2, expert=["zero", "poisson"], random_state=0).fit(X, y, offset=np.log(hours))
    mu1 = m.predict_distribution(X[:5], offset=np.log(hours[:5])).means[:, 1]
    mu2 = m.predict_distribution(X[:5], offset=np.log(2 * hours[:5])).means[:, 1]
    np.testing.assert_allclose(mu2, 2 * mu1, rtol=1e-12)
    table = m.summary().table.set_index(["block", "parameter"])
    est, se = table.loc[("expert 1", "x0"), ["estimate", "std_error"]]
    assert abs(est - 0.5) < 3 * se
    # a constant offset is the Poisson intercept: the same likelihood, the same SEs
    c = MoERegressor(2, expert=["zero", "poisson"], random_state=0).fit(
        X, y, offset=np.full(n, 0.4)
    )
    plain = copy.deepcopy(c)
    plain._params.expert.poisson__coef[:, -1] += 0.4  # the intercept: the last column
    a, b = plain.summary(X, y).table, c.summary().table
    np.testing.assert_allclose(a["std_error"], b["std_error"], rtol=1e-8)


def test_coef_of_a_family_per_expert_is_each_experts_own(zip_fit):
    X, y, m = zip_fit
    table = m.summary().table
    pois = table[table.block == "expert 1"].set_index("parameter").estimate
    assert m.coef_.shape == (2, 1) and m.intercept_.shape == (2,)
    assert np.isnan(m.coef_[0]).all() and np.isnan(m.intercept_[0])  # 'zero' has none
    np.testing.assert_allclose([m.intercept_[1], m.coef_[1, 0]], pois[["intercept", "x0"]],
                               rtol=1e-10)  # fmt: skip
    # Gamma (log mean) and lognormal (mean of log y) rows, each against its summary
    X, y = _gamma_and_lognormal_rows(800, seed=4)
    m = MoERegressor(2, expert=["gamma", "lognormal"], n_init=3, random_state=0).fit(X, y)
    table = m.summary().table
    for k in range(2):
        est = table[table.block == f"expert {k}"].set_index("parameter").estimate
        np.testing.assert_allclose([m.intercept_[k], m.coef_[k, 0]], est[["intercept", "x0"]],
                                   rtol=1e-10)  # fmt: skip


def test_an_expert_removed_for_its_small_share_takes_its_own_family_along():
    """min_share removes the Gamma expert of a fit on lognormal data: the lognormal one
    stays (it once failed with an IndexError: the survivor was taken for the list's
    first family), and the fit continues to the one lognormal expert's maximum."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 1))
    y = np.exp(0.5 * X[:, 0] + 0.3 * rng.normal(size=300))
    with pytest.warns(UserWarning, match="removed"):
        m = MoERegressor(2, expert=["gamma", "lognormal"], random_state=0, tol=1e-10).fit(X, y)
    assert m.n_experts_removed_ == 1 and m._expert_family.names == ["lognormal"]
    alone = MoERegressor(1, expert="lognormal", tol=1e-10).fit(X, y)
    assert m.log_likelihood(X, y) == pytest.approx(alone.log_likelihood(X, y), abs=1e-8)
