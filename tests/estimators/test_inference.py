"""Standard errors: consistency, a parametric bootstrap, and R's flexmix refit()."""

import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from moekit import MoEClassifier, MoERegressor
from moekit.datasets import make_moe_regression
from moekit.estimators.inference import _Spec

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
    spec = _Spec(model, X, y)
    theta = spec.theta0.clone().requires_grad_(True)
    ll = spec.loglik(theta)
    # the same model: its log-likelihood in the reporting parametrisation is the fit's
    assert float(ll) == pytest.approx(len(X) * model.log_likelihood(X, y), rel=1e-9, abs=1e-7)
    # and the fit is the maximum of the objective (log-likelihood + log-prior) in this
    # parametrisation: the Newton decrement g^T (-H)^{-1} g, twice the objective still
    # to gain, is tiny (a wrong mapping of parameters or penalties would make it large)
    (grad,) = torch.autograd.grad(spec.objective(theta), theta)
    hess = torch.func.hessian(spec.objective)(spec.theta0)
    decrement = float(grad @ torch.linalg.solve(-hess, grad))
    # (1e-3: EM's partial M-steps approach the optimum slowly along flat directions)
    assert 0 <= decrement < 1e-3, decrement
    table = model.summary().table
    assert len(table) == len(spec.theta0)
    assert np.isfinite(table["std_error"]).all()
    np.testing.assert_allclose(table["z_value"], table["estimate"] / table["std_error"])
    assert ((0 <= table["p_value"]) & (table["p_value"] <= 1)).all()
    assert "Signif. codes" in str(model.summary())


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
        fit = MoERegressor(2, random_state=0, tol=1e-9).fit(X, y_b)
        boots.append(fit.summary().table["estimate"].to_numpy())
    sd = np.std(boots, axis=0, ddof=1)
    ratio = sd / se
    assert 0.85 < np.median(ratio) < 1.15, ratio
    assert ((0.55 < ratio) & (ratio < 1.6)).all(), ratio


def _r_with_flexmix() -> bool:
    if shutil.which("Rscript") is None:
        return False
    res = subprocess.run(["Rscript", "-e", "library(flexmix)"], capture_output=True)
    return res.returncode == 0


@pytest.mark.r
@pytest.mark.skipif(not _r_with_flexmix(), reason="R with the flexmix package is not installed")
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
