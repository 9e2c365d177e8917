"""Censored and truncated responses: survreg's fits, recovery under censoring, the
monotone EM, far tails, summaries, model files and one-line errors."""

from __future__ import annotations

import io
import subprocess

import numpy as np
import pytest
import torch
from r_packages import r_has
from scipy import optimize, stats

from moekit import MoERegressor, load
from moekit._core.truncnorm import log_normal_interval, normal_interval_moments

# survival::ovarian: futime, fustat (1 = died, 0 = censored), age, ecog.ps
OVARIAN = np.array([
    [59, 1, 72.3315, 1], [115, 1, 74.4932, 1], [156, 1, 66.4658, 2], [421, 0, 53.3644, 1],
    [431, 1, 50.3397, 1], [448, 0, 56.4301, 2], [464, 1, 56.9370, 2], [475, 1, 59.8548, 2],
    [477, 0, 64.1753, 1], [563, 1, 55.1781, 2], [638, 1, 56.7562, 2], [744, 0, 50.1096, 1],
    [769, 0, 59.6301, 2], [770, 0, 57.0521, 1], [803, 0, 39.2712, 1], [855, 0, 43.1233, 2],
    [1040, 0, 38.8932, 2], [1106, 0, 44.6000, 1], [1129, 0, 53.9068, 1], [1206, 0, 44.2055, 1],
    [1227, 0, 59.5890, 2], [268, 1, 74.5041, 2], [329, 1, 43.1370, 1], [353, 1, 63.2192, 2],
    [365, 1, 64.4247, 1], [377, 0, 58.3096, 1],
])  # fmt: skip

# From R 4.2.2, survival 3.4:
#   f <- survreg(Surv(futime, fustat) ~ age + ecog.ps, ovarian, dist = d)
#   c(f$loglik[2], coef(f), f$scale)
SURVREG = {
    "linear": (-96.34259536, [2807.99905795, -35.17946398, -5.90252731], 397.71297784),
    "lognormal": (-89.58372948, [11.10056231, -0.08466897, 0.20600883], 0.78407204),
}


def _ovarian():
    time, died = OVARIAN[:, 0], OVARIAN[:, 1] == 1
    return OVARIAN[:, 2:], time, np.where(died, time, np.inf)


def _fit_ovarian(expert):
    X, y, upper = _ovarian()
    return MoERegressor(1, expert=expert, tol=1e-12, max_iter=5000, n_init=1,
                        random_state=0).fit(X, y, y_upper=upper)  # fmt: skip


@pytest.mark.parametrize("expert", ["linear", "lognormal"])
def test_one_expert_equals_survreg_on_ovarian(expert):
    m = _fit_ovarian(expert)
    X, y, upper = _ovarian()
    loglik, coef, scale = SURVREG[expert]
    assert m.log_likelihood(X, y, y_upper=upper) * len(y) == pytest.approx(loglik, abs=1e-4)
    assert m.log_likelihood_ * len(y) == pytest.approx(loglik, abs=1e-4)
    table = m.summary().table
    est = table.set_index("parameter")["estimate"]
    np.testing.assert_allclose([est["intercept"], est["x0"], est["x1"]], coef, rtol=1e-3)
    assert est["sigma"] == pytest.approx(scale, rel=1e-3)
    assert np.isfinite(table["std_error"]).all()


@pytest.mark.r
@pytest.mark.skipif(not r_has("survival"), reason="R with the survival package is not installed")
@pytest.mark.parametrize(("expert", "dist"), [("linear", "gaussian"), ("lognormal", "lognormal")])
def test_one_expert_equals_survreg_run_live(expert, dist):
    code = ("library(survival); f <- survreg(Surv(futime, fustat) ~ age + ecog.ps, ovarian, "
            f"dist = '{dist}'); cat(sprintf('%.10f', f$loglik[2]))")  # fmt: skip
    out = subprocess.run(["Rscript", "-e", code], capture_output=True, text=True, check=True)
    X, y, upper = _ovarian()
    m = _fit_ovarian(expert)
    assert m.log_likelihood(X, y, y_upper=upper) * len(y) == pytest.approx(float(out.stdout),
                                                                           abs=1e-4)  # fmt: skip


def _two_lines(n=2000, seed=0, cap=1.0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, n)
    first = rng.random(n) < 0.5
    latent = np.where(first, -1.0 - 1.5 * x, 1.0 + 2.0 * x) + 0.5 * rng.normal(size=n)
    y = np.minimum(latent, cap)
    return x[:, None], y, np.where(latent > cap, np.inf, y), latent


def test_censored_two_experts_recover_both_slopes_where_ignoring_censoring_does_not():
    X, y, upper, _ = _two_lines()
    assert 0.2 < np.isinf(upper).mean() < 0.4  # a real share of the rows is censored
    m = MoERegressor(2, gate="constant", random_state=0).fit(X, y, y_upper=upper)
    table = m.summary().table.set_index(["block", "parameter"])
    truth = [-1.5, 2.0]  # experts in increasing order of their mean
    ses = []
    for k, slope in enumerate(truth):
        est, se = table.loc[(f"expert {k}", "x0"), ["estimate", "std_error"]]
        assert abs(est - slope) < 3 * se, (k, est, se)
        ses.append(se)
    naive = MoERegressor(2, gate="constant", random_state=0).fit(X, y)
    off = [min(abs(naive.coef_[:, 0] - s)) / se for s, se in zip(truth, ses, strict=True)]
    assert max(off) > 3, off  # some slope is far off when the censoring is ignored


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_em_never_decreases_with_censoring_and_truncation():
    X, y, upper, latent = _two_lines(800, seed=1)
    keep = latent > -1.8  # observed only above -1.8: truncated from below
    X, y, upper = X[keep], y[keep], upper[keep]
    m = MoERegressor(2, random_state=0, warm_start=True, max_iter=1, n_init=1)
    m.fit(X, y, y_upper=upper, truncation=(-1.8, np.inf))
    previous = m.log_likelihood(X, y, y_upper=upper, truncation=(-1.8, np.inf))
    for _ in range(30):
        m.fit(X, y, y_upper=upper, truncation=(-1.8, np.inf))
        now = m.log_likelihood(X, y, y_upper=upper, truncation=(-1.8, np.inf))
        assert now >= previous - 1e-10
        previous = now
    full = MoERegressor(2, random_state=0, max_iter=300).fit(X, y, y_upper=upper,
                                                             truncation=(-1.8, np.inf))  # fmt: skip
    assert np.all(np.diff(full.log_likelihood_history_) >= -1e-10)


def test_one_truncated_expert_reaches_the_truncated_normal_maximum():
    rng = np.random.default_rng(3)
    x = rng.normal(size=3000)
    y = 0.5 + 1.2 * x + rng.normal(size=3000)
    keep = (y > 0) & (y < 3)
    x, y = x[keep], y[keep]
    m = MoERegressor(1, tol=1e-12, max_iter=5000).fit(x[:, None], y, truncation=(0.0, 3.0))

    def nll(theta):
        mu, s = theta[0] + theta[1] * x, np.exp(theta[2])
        window = stats.norm.cdf(3.0, mu, s) - stats.norm.cdf(0.0, mu, s)
        return -(stats.norm.logpdf(y, mu, s) - np.log(window)).sum()

    best = optimize.minimize(nll, [0.0, 1.0, 0.0], method="Nelder-Mead",
                             options={"xatol": 1e-9, "fatol": 1e-10, "maxiter": 20000})  # fmt: skip
    assert m.log_likelihood_ * len(y) == pytest.approx(-best.fun, abs=1e-4)
    assert m.coef_[0, 0] == pytest.approx(best.x[1], abs=1e-3)


def test_far_tails_stay_finite():
    a = torch.tensor([40.0, -torch.inf, -41.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([torch.inf, -40.0, -40.0], dtype=torch.float64)
    logp = log_normal_interval(a, b)
    assert torch.isfinite(logp).all()
    assert float(logp[0].detach()) == pytest.approx(stats.norm.logsf(40.0), rel=1e-12)
    logp.sum().backward()
    assert torch.isfinite(a.grad).all()
    mean, second = normal_interval_moments(a.detach(), b)
    assert float(mean[0]) == pytest.approx(stats.truncnorm.mean(40, np.inf), rel=1e-10)
    assert torch.isfinite(second).all()
    # a model whose data sit 40 standard deviations beyond a censoring point
    X, y, _, _ = _two_lines(300, seed=2)
    m = MoERegressor(1, random_state=0).fit(X, y)
    far = y + 40 * m.noise_std_[0] + 10.0
    rows = m.log_likelihood_samples(X, far, y_upper=np.full(len(y), np.inf))
    assert np.isfinite(rows).all() and rows.max() < -700


def test_censored_fit_predicts_the_latent_response_and_round_trips_a_model_file(tmp_path):
    X, y, upper, _ = _two_lines(600, seed=4)
    m = MoERegressor(2, random_state=0).fit(X, y, y_upper=upper)
    d = m.predict_distribution(X)
    assert d.means.max() > 1.5  # an expert's latent mean passes the censoring point (1)
    np.testing.assert_allclose(d.mean(), m.predict(X))
    m.save(tmp_path / "c.moe")
    back = load(tmp_path / "c.moe")
    assert back.log_likelihood(X, y, y_upper=upper) == pytest.approx(
        m.log_likelihood(X, y, y_upper=upper), abs=1e-12)  # fmt: skip
    # without y_upper every row counts as exact, as for a model fitted without it
    assert back.log_likelihood(X, y) == pytest.approx(m.log_likelihood(X, y), abs=1e-12)


def test_uncensored_model_evaluates_censored_rows():
    X, y, upper, _ = _two_lines(400, seed=5)
    m = MoERegressor(1, random_state=0).fit(X, y)
    exact = m.log_likelihood(X, y, y_upper=y)
    assert exact == pytest.approx(m.log_likelihood(X, y), abs=1e-10)
    mu, sd = m.predict(X), m.noise_std_[0]
    ref = np.where(np.isinf(upper), stats.norm.logsf(y, mu, sd), stats.norm.logpdf(y, mu, sd))
    rows = m.log_likelihood_samples(X, y, y_upper=upper)
    np.testing.assert_allclose(rows, ref, rtol=1e-10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"y_upper": "lower"}, "y_upper must be >= y"),
        ({"y_upper": "short"}, "y_upper must be a scalar or have one value per row"),
        ({"truncation": (2.0, np.inf)}, "truncation excludes the observed y"),
        ({"truncation": (1.0, 0.0)}, "truncation=\\(lower, upper\\) needs lower < upper"),
        ({"truncation": 1.0}, "truncation must be a pair"),
        ({"truncation": (np.zeros(3), np.inf)}, "truncation must be a scalar or have one"),
    ],
)
def test_bad_bounds_are_one_line_errors(kwargs, match):
    X, y, upper, _ = _two_lines(50)
    if kwargs.get("y_upper") == "lower":
        kwargs = {"y_upper": y - 1.0}
    elif kwargs.get("y_upper") == "short":
        kwargs = {"y_upper": upper[:-1]}
    m = MoERegressor(1)
    with pytest.raises(ValueError, match=match) as err:
        m.fit(X, y, **kwargs)
    assert "\n" not in str(err.value)
    assert not hasattr(m, "coef_") and "_pending_bounds" not in vars(m)


def test_families_without_interval_probabilities_refuse_y_upper():
    # Gamma, Poisson, negative binomial and binomial experts take censored rows too
    # (tests/estimators/test_censored_glm.py, test_censored_nb.py,
    # test_censored_binomial.py); a list of families does not
    X, y, upper, _ = _two_lines(50)
    with pytest.raises(ValueError, match=r"y_upper.*got expert='student_t'"):
        MoERegressor(1, expert="student_t").fit(X, y, y_upper=upper)
    counts = np.round(np.exp(y))
    # named as given, not by the class that holds the list
    with pytest.raises(ValueError, match=r"got expert=\['zero', 'poisson'\] \(a list of fami"):
        MoERegressor(2, expert=["zero", "poisson"]).fit(X, counts, y_upper=counts + 1)


def test_left_and_interval_censoring():
    rng = np.random.default_rng(6)
    x = rng.normal(size=1500)
    latent = 1.0 + 0.8 * x + 0.5 * rng.normal(size=1500)
    lo, hi = latent.copy(), latent.copy()
    left = latent < 0.5
    lo[left], hi[left] = -np.inf, 0.5  # left-censored at 0.5
    mid = (latent > 1.5) & (latent < 2.0)
    lo[mid], hi[mid] = 1.5, 2.0  # known only to lie in [1.5, 2]
    m = MoERegressor(1, tol=1e-10).fit(x[:, None], lo, y_upper=hi)
    table = m.summary().table.set_index("parameter")
    for name, truth in (("intercept", 1.0), ("x0", 0.8), ("sigma", 0.5)):
        est, se = table.loc[name, ["estimate", "std_error"]]
        assert abs(est - truth) < 3 * se, name
    buf = io.StringIO()
    print(m.summary(), file=buf)
    assert "censored" in buf.getvalue()


def test_integer_weights_of_censored_rows_equal_the_rows_repeated():
    """Frequency weights with censoring: a row of weight w counts as w copies of its
    interval (zero weights drop the row and its bounds)."""
    X, y, upper, _ = _two_lines(n=300, seed=3)
    w = np.random.default_rng(0).integers(0, 4, size=len(y))
    rep = np.repeat(np.arange(len(y)), w)
    opts = dict(gate="constant", random_state=0, min_share=0, tol=1e-10, max_iter=2000)
    weighted = MoERegressor(2, **opts).fit(X, y, y_upper=upper, sample_weight=w)
    repeated = MoERegressor(2, **opts).fit(X[rep], y[rep], y_upper=upper[rep])
    ll_w = weighted.log_likelihood(X, y, sample_weight=w, y_upper=upper)
    ll_r = repeated.log_likelihood(X[rep], y[rep], y_upper=upper[rep])
    assert ll_w == pytest.approx(ll_r, rel=1e-8)
    np.testing.assert_allclose(weighted.coef_, repeated.coef_, atol=1e-5)
    a, b = weighted.summary().table, repeated.summary().table
    np.testing.assert_allclose(a["std_error"], b["std_error"], rtol=1e-4)


def test_summary_of_given_rows_takes_their_bounds():
    """summary(X, y, y_upper=...) on the fit's rows equals summary() of the fit; the
    same rows without their bounds (every y exact) give other standard errors."""
    X, y, upper, _ = _two_lines(n=400, seed=4)
    m = MoERegressor(2, gate="constant", random_state=0, min_share=0).fit(X, y, y_upper=upper)
    own = m.summary().table["std_error"].to_numpy()
    given = m.summary(X, y, y_upper=upper).table["std_error"].to_numpy()
    np.testing.assert_allclose(given, own, rtol=1e-10)
    exact = m.summary(X, y).table["std_error"].to_numpy()
    # the information of exact rows, at the censored fit's optimum: another matrix
    # (here not even positive definite, so without standard errors)
    assert not np.allclose(exact, own, rtol=0.05)
    with pytest.raises(ValueError, match="needs the rows"):
        m.summary(y_upper=upper)
    plain = MoERegressor(1).fit(X, y)
    with pytest.raises(ValueError, match="for a censored fit"):
        plain.summary(X, y, y_upper=upper)
