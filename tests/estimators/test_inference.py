"""Standard errors: consistency, a parametric bootstrap, and R's flexmix refit()."""

import subprocess
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from r_packages import r_has

from moekit import MoEClassifier, MoERegressor
from moekit.datasets import make_moe_regression
from moekit.estimators.inference import ReportedLikelihood

R_SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "r" / "fit_mixture.R"


def _fits():
    rng = np.random.default_rng(0)
    X, y, _ = make_moe_regression(1500, n_features=2, n_experts=2, random_state=1)
    counts = rng.poisson(np.exp(0.3 + 0.5 * X[:, 0] * (X[:, 1] > 0)))
    y_heavy = y + 0.2 * rng.standard_t(3, size=len(y))
    Xc = rng.normal(size=(600, 2))
    labels = (Xc[:, 0] * Xc[:, 1] > 0).astype(int) + (Xc[:, 0] > 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = dict(random_state=0, tol=1e-10, max_iter=3000)
        yield "linear", MoERegressor(2, **kw).fit(X, y), X, y
        yield "student_t", MoERegressor(2, expert="student_t", **kw).fit(X, y_heavy), X, y_heavy
        yield (
            "t_fixed_df",
            MoERegressor(2, expert="student_t", df=3.0, **kw).fit(X, y_heavy),
            X,
            y_heavy,
        )
        yield "poisson", MoERegressor(2, expert="poisson", **kw).fit(X, counts), X, counts
        yield "constant", MoERegressor(2, gate="constant", **kw).fit(X, y), X, y
        yield (
            "concomitant",
            MoERegressor(2, expert_features=[0], gate_features=[1], **kw).fit(X, y),
            X,
            y,
        )
        yield "classifier", MoEClassifier(2, **kw).fit(Xc, labels), Xc, labels


@pytest.mark.parametrize(
    "name, model, X, y", list(_fits()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_reporting_parametrisation_reproduces_the_fit(name, model, X, y):
    lik = ReportedLikelihood(model, X, y)
    # the same model: its log-likelihood in the reporting parametrisation is the fit's
    assert float(lik.loglik()) == pytest.approx(
        len(X) * model.log_likelihood(X, y), rel=1e-9, abs=1e-7
    )
    summary = model.summary()
    table = summary.table
    assert len(table) == len(lik.theta)
    if name == "classifier":
        # its experts' penalty is strong by design: at the penalised estimate the
        # log-likelihood alone may curve upwards somewhere, and the summary says so
        assert np.isfinite(table["std_error"]).all() or "NaN" in summary.note
    else:
        assert np.isfinite(table["std_error"]).all()
    table = table[np.isfinite(table["std_error"])]
    coef = table[
        ~table["parameter"].isin(["sigma", "df"]) & ~table["parameter"].str.endswith("sigma")
    ]
    np.testing.assert_allclose(coef["z_value"], coef["estimate"] / coef["std_error"])
    assert ((0 <= coef["p_value"]) & (coef["p_value"] <= 1)).all()
    assert "Signif. codes" in str(model.summary())
    if name != "classifier":  # (its experts' penalty is strong by design)
        # with penalties as small as the regressor's, the fit is the maximum of the
        # log-likelihood itself: the Newton decrement g^T (-H)^{-1} g, twice the
        # log-likelihood still to gain, is tiny (a wrong mapping would make it large)
        theta = lik.theta.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(lik.loglik(theta), theta)
        decrement = float(grad @ torch.linalg.solve(-lik.hessian(), grad))
        assert 0 <= decrement < 1e-2, decrement


def test_scales_and_degrees_of_freedom_get_no_test_against_zero():
    X, y, _ = make_moe_regression(800, n_features=1, n_experts=2, random_state=2)
    m = MoERegressor(2, expert="student_t", random_state=0).fit(X, y)
    m._params.expert.df[:] = torch.tensor([5.0, 8.0], dtype=torch.float64)
    table = m.summary().table
    scales = table[table["parameter"].isin(["sigma", "df"])]
    assert len(scales) == 4 and np.isfinite(scales["std_error"]).all()
    assert scales["z_value"].isna().all() and scales["p_value"].isna().all()
    assert "***" not in "".join(str(m.summary()).split("sigma")[1].splitlines()[0])


def test_standard_errors_are_the_unpenalised_observed_information():
    """A one-expert logistic classifier with a strong penalty, worked by hand.

    The estimate maximises the penalised likelihood; the standard errors must come
    from the Hessian of the log-likelihood alone at that estimate,
    X^T diag(p (1 - p)) X with X = [1, x] in the data's units, not of the penalised
    objective (which would add the penalty and shrink them).
    """
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 2)) * [1.0, 3.0] + [0.5, -1.0]
    y = (rng.random(400) < 1 / (1 + np.exp(-(0.3 + 1.5 * X[:, 0] - 0.4 * X[:, 1])))).astype(int)
    m = MoEClassifier(1, alpha=50.0, tol=1e-12, max_iter=500, random_state=0).fit(X, y)
    table = m.summary().table
    beta = table["estimate"].to_numpy()  # [intercept, x0, x1] of class 1 vs 0
    D = np.c_[np.ones(len(X)), X]
    p = 1 / (1 + np.exp(-(D @ beta)))
    np.testing.assert_allclose(p, m.predict_proba(X)[:, 1], rtol=1e-10)
    info = D.T @ (D * (p * (1 - p))[:, None])
    np.testing.assert_allclose(table["std_error"], np.sqrt(np.diag(np.linalg.inv(info))),
                               rtol=1e-8)  # fmt: skip
    # the penalised objective's curvature (alpha/2 on the standardised slopes, so
    # alpha scale_j^2 in the data's units) would give visibly smaller errors
    pen = np.diag([0.0, *(50.0 * X.std(0) ** 2)])
    shrunk = np.sqrt(np.diag(np.linalg.inv(info + pen)))
    assert (table["std_error"].to_numpy()[1:] > shrunk[1:] * 1.1).all()


def test_singular_information_gives_nan_and_says_so():
    X, y, _ = make_moe_regression(600, n_features=1, n_experts=2, random_state=0)
    X2 = np.c_[X, 2.0 * X[:, 0]]  # a collinear column: its slope is not determined
    m = MoERegressor(2, random_state=0, gate="constant").fit(X2, y)
    s = m.summary()
    slopes = s.table[s.table["parameter"].isin(["x0", "x1"])]
    assert slopes["std_error"].isna().all()
    assert "singular" in s.note and "singular" in str(s)
    assert np.isfinite(s.table.query("parameter == 'sigma'")["std_error"]).all()


def test_standard_errors_do_not_depend_on_a_features_units():
    # a feature in millions (of dollars, of people) scales its slope and its standard
    # error, and changes nothing the data determine
    X, y, _ = make_moe_regression(800, n_features=2, n_experts=2, random_state=3)
    fits = [MoERegressor(2, random_state=0).fit(X * [1.0, s], y) for s in (1.0, 1e6, 1e9)]
    base = fits[0].summary().table
    for s, m in zip((1e6, 1e9), fits[1:], strict=True):
        summary = m.summary()
        table = summary.table
        assert np.isfinite(table["std_error"]).all() and "singular" not in summary.note
        scale = np.where(table["parameter"] == "x1", s, 1.0)
        np.testing.assert_allclose(table["std_error"] * scale, base["std_error"], rtol=1e-5)


def test_a_dispersion_at_its_bound_leaves_the_other_standard_errors():
    # Poisson counts, right-censored: each negative binomial expert's dispersion goes
    # to its lower bound (the Poisson limit); the coefficients keep standard errors
    # near the Poisson mixture's
    rng = np.random.default_rng(1)
    n = 600
    x = rng.uniform(-1, 1, n)
    z = rng.random(n) < 0.5
    y = rng.poisson(np.exp(np.where(z, 1.0 + 0.8 * x, 2.5 - 0.5 * x))).astype(float)
    c = rng.poisson(12, n).astype(float)
    seen, upper = np.minimum(y, c), np.where(y > c, np.inf, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nb = MoERegressor(2, expert="negative_binomial", random_state=0)
        nb.fit(x[:, None], seen, y_upper=upper)
        pois = MoERegressor(2, expert="poisson", random_state=0)
        pois.fit(x[:, None], seen, y_upper=upper)
    table = nb.summary().table
    assert table.query("parameter == 'dispersion'")["estimate"].min() < 1e-6
    coef = table[table["parameter"] != "dispersion"]
    assert np.isfinite(coef["std_error"]).all()
    np.testing.assert_allclose(coef["std_error"], pois.summary().table["std_error"], rtol=0.25)


@pytest.mark.parametrize(
    "kw",
    [{"expert": "mlp"}, {"gate": "mlp"}, {"expert": "tree"}],
    ids=["mlp experts", "mlp gate", "tree experts"],
)
def test_summary_of_models_without_coefficients_is_one_clear_error(kw):
    from sklearn.tree import DecisionTreeRegressor

    if kw.get("expert") == "tree":
        kw = {"expert": DecisionTreeRegressor(max_depth=2)}
    X, y, _ = make_moe_regression(300, n_features=1, n_experts=2, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = MoERegressor(2, random_state=0, n_init=1, max_iter=5, **kw).fit(X, y)
    with pytest.raises(ValueError, match="no coefficients to report"):
        m.summary()


def test_information_summed_over_chunks_equals_one_pass(monkeypatch):
    from moekit.estimators import inference

    X, y, _ = make_moe_regression(3000, n_features=2, n_experts=2, random_state=5)
    m = MoERegressor(2, random_state=0).fit(X, y)
    whole = m.summary().table["std_error"].to_numpy()
    monkeypatch.setattr(inference, "HESSIAN_BUDGET", 64 * 2 * 3)  # chunks of 64 rows (K = 2, p = 3)
    assert ReportedLikelihood(m, X, y).chunk_rows() == 64
    np.testing.assert_allclose(m.summary().table["std_error"], whole, rtol=1e-10)


def test_degrees_of_freedom_at_their_bound_are_held_fixed():
    from moekit.experts.student_t import NU_MAX

    X, y, _ = make_moe_regression(800, n_features=1, n_experts=2, random_state=2)
    m = MoERegressor(2, expert="student_t", random_state=0).fit(X, y)
    m._params.expert.df[:] = torch.tensor([NU_MAX, 5.0], dtype=torch.float64)
    table = m.summary().table
    assert table.query("parameter == 'df'")["block"].tolist() == ["expert 1"]


def test_table_matches_the_fitted_attributes():
    X, y, _ = make_moe_regression(1000, n_features=2, n_experts=2, random_state=3)
    m = MoERegressor(2, random_state=0).fit(X, y)
    t = m.summary().table.set_index(["block", "parameter"])["estimate"]
    for k in range(2):
        assert t[(f"expert {k}", "intercept")] == pytest.approx(m.intercept_[k])
        assert t[(f"expert {k}", "x1")] == pytest.approx(m.coef_[k, 1])
        assert t[(f"expert {k}", "sigma")] == pytest.approx(m.noise_std_[k])
    assert t[("gate: expert 1 vs 0", "x0")] == pytest.approx(
        m.gate_coef_[1, 0] - m.gate_coef_[0, 0]
    )
    # relevelling the gate changes its block, not the experts
    t1 = m.summary(gate_reference=1).table.set_index(["block", "parameter"])["estimate"]
    assert t1[("gate: expert 0 vs 1", "x0")] == pytest.approx(-t[("gate: expert 1 vs 0", "x0")])


def test_standard_errors_agree_with_a_parametric_bootstrap():
    X, y, _ = make_moe_regression(1500, n_features=1, n_experts=2, random_state=0, noise=0.3)
    m = MoERegressor(2, random_state=0, tol=1e-9).fit(X, y)
    se = m.summary().table["std_error"].to_numpy()
    dist = m.predict_distribution(X)
    boots = []
    for b in range(40):
        y_b = dist.sample(1, random_state=b)[:, 0]
        fit = MoERegressor(2, random_state=0, tol=1e-9, n_init=2).fit(X, y_b)
        boots.append(fit.summary().table["estimate"].to_numpy())
    sd = np.std(boots, axis=0, ddof=1)
    ratio = sd / se
    assert 0.85 < np.median(ratio) < 1.15, ratio
    assert ((0.55 < ratio) & (ratio < 1.6)).all(), ratio


@pytest.mark.r
@pytest.mark.skipif(not r_has("flexmix"), reason="R with the flexmix package is not installed")
def test_standard_errors_agree_with_flexmix_refit(tmp_path):
    X, y, _ = make_moe_regression(2000, n_features=2, n_experts=2, random_state=4, noise=0.3)
    frame = pd.DataFrame({"x1": X[:, 0], "x2": X[:, 1], "y": y})
    frame.to_csv(tmp_path / "d.csv", index=False)
    out = tmp_path / "r.csv"
    subprocess.run(
        [
            "Rscript",
            str(R_SCRIPT),
            str(tmp_path / "d.csv"),
            "2",
            "3",
            "softmax",
            "flexmix",
            str(out),
            "refit",
        ],
        check=True,
        capture_output=True,
    )
    r = dict(pd.read_csv(out).itertuples(index=False, name=None))
    m = MoERegressor(2, random_state=0, n_init=3, tol=1e-10, max_iter=2000).fit(
        frame[["x1", "x2"]], y
    )
    assert m.log_likelihood(frame[["x1", "x2"]], y) * len(y) == pytest.approx(r["loglik"], abs=0.05)
    # flexmix numbers its components arbitrarily: match them by intercept
    ours = m.intercept_
    flex = np.array([r["intercept_1"], r["intercept_2"]])
    match = [int(np.argmin(np.abs(ours - f))) for f in flex]  # flexmix comp j -> our expert
    assert sorted(match) == [0, 1]
    table = m.summary(gate_reference=match[0]).table.set_index(["block", "parameter"])
    for j, k in enumerate(match, start=1):
        for rname, ours_name in (("(Intercept)", "intercept"), ("x1", "x1"), ("x2", "x2")):
            ours_se = table.loc[(f"expert {k}", ours_name), "std_error"]
            assert ours_se == pytest.approx(r[f"se_comp_{j}_{rname}"], rel=0.05), (k, rname)
    gate_block = f"gate: expert {match[1]} vs {match[0]}"
    for rname, ours_name in (("(Intercept)", "intercept"), ("x1", "x1"), ("x2", "x2")):
        ours_se = table.loc[(gate_block, ours_name), "std_error"]
        assert ours_se == pytest.approx(r[f"se_gate_2_{rname}"], rel=0.05), rname


def test_summary_of_a_frame_fit_takes_no_compiler_and_warns_nothing():
    """summary() after a fit on a frame: no feature-name warning from its own rows, and
    the Hessian by plain autograd (the compiler stack costs a second and tens of MB)."""
    import subprocess
    import sys

    code = (
        "import sys, warnings\n"
        "import pandas as pd\n"
        "from moekit import MoERegressor\n"
        "from moekit.datasets import make_moe_regression\n"
        "X, y, _ = make_moe_regression(400, n_features=2, n_experts=2, random_state=1)\n"
        "frame = pd.DataFrame(X, columns=['a', 'b'])\n"
        "m = MoERegressor(2, n_init=2, random_state=0).fit(frame, y)\n"
        "with warnings.catch_warnings():\n"
        "    warnings.simplefilter('error')\n"
        "    s = m.summary()\n"
        "assert s.table['std_error'].notna().all()\n"
        "print(sorted(k for k in ('torch._dynamo', 'sympy') if k in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
