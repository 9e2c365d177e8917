"""select_n_experts finds the number of experts that generated the data."""

import numpy as np
import pytest

from moekit import MoERegressor, select_n_experts
from moekit.datasets import make_moe_regression
from moekit.estimators.model_selection import icl


@pytest.mark.parametrize("true_k", [2, 3, 4])
def test_bic_picks_the_true_number_of_experts(true_k):
    X, y, _ = make_moe_regression(
        4000, n_features=2, n_experts=true_k, random_state=true_k, noise=0.25, coef_scale=3.0
    )
    best, table = select_n_experts(MoERegressor(random_state=0), X, y, range(1, 7), n_init=3)
    assert best.n_experts == true_k, table
    assert table["best"].sum() == 1 and list(table["n_experts"]) == [1, 2, 3, 4, 5, 6]
    assert (np.diff(table["log_likelihood"][:true_k]) > 0).all()  # more experts fit better


def test_criteria_and_table_contents():
    X, y, _ = make_moe_regression(1500, n_features=2, n_experts=2, random_state=0)
    best, table = select_n_experts(MoERegressor(random_state=0), X, y, [1, 2, 3], criterion="icl")
    row = table.set_index("n_experts").loc[best.n_experts]
    assert row["icl"] == pytest.approx(icl(best, X, y))
    assert row["icl"] >= row["bic"]  # ICL adds the entropy of the responsibilities
    assert row["aic"] == pytest.approx(best.aic(X, y))
    with pytest.raises(ValueError, match="'criterion' parameter of select_n_experts"):
        select_n_experts(MoERegressor(), X, y, [1, 2], criterion="waic")
    with pytest.raises(ValueError, match="positive ints"):
        select_n_experts(MoERegressor(), X, y, [0, 1])


def test_criterion_plot(tmp_path):
    from moekit.plotting import plot_criterion

    X, y, _ = make_moe_regression(600, n_features=1, n_experts=2, random_state=0)
    _, table = select_n_experts(MoERegressor(random_state=0), X, y, [1, 2, 3])
    fig = plot_criterion(table, "bic")
    fig.savefig(tmp_path / "bic.png")
    assert (tmp_path / "bic.png").stat().st_size > 1000


def test_a_family_per_expert_repeats_its_last_family_for_more_experts():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 1))
    zero, first = rng.random(600) < 0.3, rng.random(600) < 0.5
    rate = np.exp(np.where(first, 0.2 + 0.5 * X[:, 0], 1.8 - 0.4 * X[:, 0]))
    y = np.where(zero, 0, rng.poisson(rate)).astype(float)
    template = MoERegressor(expert=["zero", "poisson"], n_init=3, random_state=0)
    best, table = select_n_experts(template, X, y, n_experts=[2, 3])
    assert best.expert == ["zero", "poisson", "poisson"]  # two Poisson regimes and the zeros
    assert table.loc[table.n_experts == 3, "log_likelihood"].item() > table.loc[
        table.n_experts == 2, "log_likelihood"].item() + 50  # fmt: skip
    assert template.expert == ["zero", "poisson"]  # the template is not changed
    with pytest.raises(ValueError, match="n_experts must hold numbers >= 2") as err:
        select_n_experts(template, X, y, n_experts=[1, 2])
    assert "\n" not in str(err.value)


def test_icl_with_weights_is_the_icl_of_the_rows_repeated():
    X, y, _ = make_moe_regression(400, n_features=1, n_experts=2, random_state=1)
    w = np.random.default_rng(0).integers(1, 4, len(y))
    m = MoERegressor(2, n_init=2, random_state=0).fit(X, y, sample_weight=w)
    rows = np.repeat(np.arange(len(y)), w)
    assert icl(m, X, y, sample_weight=w) == pytest.approx(icl(m, X[rows], y[rows]), rel=1e-10)
    _, table = select_n_experts(MoERegressor(random_state=0), X, y, [1, 2], n_init=2,
                                fit_params={"sample_weight": w})  # fmt: skip
    assert np.isfinite(table["icl"]).all() and (table["icl"] >= table["bic"] - 1e-9).all()


def test_icl_reads_an_offset_and_censored_rows_as_the_fit_did():
    rng = np.random.default_rng(2)
    n = 400
    X = rng.uniform(0, 2, (n, 1))
    exposure = rng.uniform(1, 30, n)
    z = rng.random(n) < 0.5
    y = rng.poisson(exposure * np.exp(np.where(z, -1.0 + 0.8 * X[:, 0], 0.5 - 0.3 * X[:, 0])))
    y = y.astype(float)
    cap = np.quantile(y, 0.8)
    seen, upper = np.minimum(y, cap), np.where(y > cap, np.inf, y)
    for params in ({"offset": np.log(exposure)}, {"offset": np.log(exposure), "y_upper": upper}):
        target = seen if "y_upper" in params else y
        best, table = select_n_experts(MoERegressor(expert="poisson", random_state=0), X, target,
                                       [1, 2], n_init=2, fit_params=params)  # fmt: skip
        row = table.set_index("n_experts").loc[2]
        r = best.responsibilities(X, target, **params)
        entropy = -np.sum(r * np.log(np.clip(r, 1e-300, None)))
        assert row["icl"] == pytest.approx(row["bic"] + 2 * entropy, rel=1e-10)
        # the responsibilities without the offset (or the bounds) are another posterior
        assert abs(icl(best, X, target) - row["icl"]) > 1.0
        assert table.loc[0, "icl"] == pytest.approx(table.loc[0, "bic"])  # one expert: EN = 0


def test_verbose_lines_say_which_fits_shed_experts(capsys):
    rng = np.random.default_rng(0)
    X = rng.uniform(size=(150, 1))
    y = 1.0 + 2.0 * X[:, 0] + 0.3 * rng.normal(size=150)  # one line: extra experts starve
    _, table = select_n_experts(MoERegressor(random_state=0), X, y, [1, 2, 3], verbose=1)
    lines = capsys.readouterr().out.splitlines()
    shed = table["n_experts_fitted"] < table["n_experts"]
    assert shed.any() and len(lines) == len(table)
    for line, (_, row) in zip(lines, table.iterrows(), strict=True):
        left = int(row["n_experts_fitted"])
        said = f"({left} expert{'s' * (left != 1)} left: the others held less than min_share"
        assert (said in line) == (left < row["n_experts"]), line
