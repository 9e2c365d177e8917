"""``moekit fit`` with what each row carries besides x and y: frequency weights, an
offset (log exposure), censored responses, a family per expert and several responses;
``moekit predict`` on the models it writes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moekit import MoERegressor, load
from moekit.cli import main
from moekit.formula import FormulaError, ModelFormula


def _run(tmp_path, frame, *flags, out="out") -> int:
    frame.to_csv(tmp_path / "data.csv", index=False)
    return main(["fit", str(tmp_path / "data.csv"), *flags, "--out", str(tmp_path / out),
                 "--n-init", "1", "--verbose", "0"])  # fmt: skip


def _exposure(n=160, seed=0) -> pd.DataFrame:
    """Counts whose mean is hours * exp(0.2 + 0.6 x): exposure enters with coefficient 1."""
    rng = np.random.default_rng(seed)
    x, hours = rng.uniform(0, 2, n), rng.uniform(1, 20, n)
    return pd.DataFrame({"x": x, "hours": hours, "w": rng.integers(1, 4, n),
                         "y": rng.poisson(hours * np.exp(0.2 + 0.6 * x))})  # fmt: skip


def _survival(n=200, seed=1) -> pd.DataFrame:
    """Lognormal times, right-censored at random: both the bound and the event forms."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 2, n)
    t = np.exp(1.0 + 0.5 * x + 0.3 * rng.normal(size=n))
    c = np.exp(1.6 + 0.3 * rng.normal(size=n))
    event = (t <= c).astype(int)
    time = np.minimum(t, c)
    return pd.DataFrame({"x": x, "time": time, "upper": np.where(event == 1, time, np.nan),
                         "event": event})  # fmt: skip


def test_integer_weights_fit_as_the_rows_repeated(tmp_path, capsys):
    frame = _exposure()
    flags = ["--target", "y", "--features", "x", "--expert", "poisson", "--experts", "2",
             "--holdout", "0", "--random-state", "3"]  # fmt: skip
    assert _run(tmp_path, frame, *flags, "--weights", "w", out="weighted") == 0
    out = capsys.readouterr().out
    total = int(frame.w.sum())
    assert f"frequency weights; {total} weighted rows" in out
    assert f"n = {total} (their sum) over {len(frame)} rows" in out
    page = (tmp_path / "weighted" / "report.html").read_text()
    assert "frequency weights" in page
    repeated = frame.loc[frame.index.repeat(frame.w)].drop(columns="w")
    assert _run(tmp_path, repeated, *flags, out="repeated") == 0
    a, b = load(tmp_path / "weighted" / "model.moe"), load(tmp_path / "repeated" / "model.moe")
    assert a.log_likelihood_ == pytest.approx(b.log_likelihood_, abs=1e-6)
    order = np.argsort(a.intercept_.ravel()), np.argsort(b.intercept_.ravel())
    np.testing.assert_allclose(a.coef_[order[0]], b.coef_[order[1]], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bad", [-1.0, np.inf, "many"])
def test_a_bad_weight_is_one_line_naming_weights(tmp_path, capsys, bad):
    frame = _exposure().astype({"w": object})
    frame.loc[5, "w"] = bad
    assert _run(tmp_path, frame, "--target", "y", "--features", "x", "--weights", "w") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'w'" in err and "row 6" in err
    if bad != "many":  # a text cell is caught as the table is read, naming its column
        assert "--weights 'w'" in err
    assert _run(tmp_path, _exposure(), "--target", "y", "--weights", "nope") == 2
    assert "--weights 'nope' is not a column" in capsys.readouterr().err


def test_an_offset_doubles_the_expected_count_with_the_exposure(tmp_path, capsys):
    frame = _exposure(400)
    flags = ["--target", "y", "--features", "x", "--expert", "poisson", "--experts", "1"]
    assert _run(tmp_path, frame, *flags, "--offset", "log(hours)") == 0
    out = capsys.readouterr().out
    assert "offset: log(hours)" in out and "hours" not in out.split("not used:")[-1][:40]
    model = load(tmp_path / "out" / "model.moe")
    assert model.offset_term_ == "log(hours)" and list(model.feature_names_in_) == ["x"]
    # the known slope of log exposure is 1: the fit finds the generating 0.2 + 0.6 x
    assert model.intercept_.ravel()[0] == pytest.approx(0.2, abs=0.1)
    assert model.coef_.ravel()[0] == pytest.approx(0.6, abs=0.1)
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Observed against expected counts" in page and "+ log(hours)" in page
    # the same model from offset(...) in the formula
    assert _run(tmp_path, frame, "--formula", "y ~ x + offset(log(hours))", "--expert",
                "poisson", "--experts", "1", out="formula") == 0  # fmt: skip
    same = load(tmp_path / "formula" / "model.moe")
    np.testing.assert_allclose(same.coef_, model.coef_, rtol=1e-6)
    # predict: twice the hours, twice the expected count
    new = frame.head(5).assign(hours=lambda d: 2 * d.hours)
    new.to_csv(tmp_path / "new.csv", index=False)
    frame.head(5).to_csv(tmp_path / "old.csv", index=False)
    means = []
    for data, path in (("old", tmp_path / "out" / "model.moe"),
                       ("new", tmp_path / "out" / "model.moe"),
                       ("new", tmp_path / "formula" / "model.moe")):  # fmt: skip
        extra = [] if "formula" in str(path) else ["--offset", "log(hours)"]
        assert main(["predict", str(path), str(tmp_path / f"{data}.csv"), "--out",
                     str(tmp_path / "p.csv"), *extra]) == 0  # fmt: skip
        means.append(pd.read_csv(tmp_path / "p.csv")["mean"].to_numpy())
    np.testing.assert_allclose(means[1], 2 * means[0], rtol=1e-9)
    np.testing.assert_allclose(means[2], means[1], rtol=1e-6)
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "out" / "model.moe"), str(tmp_path / "old.csv")]) == 2
    assert "fitted with --offset 'log(hours)'; give --offset" in capsys.readouterr().err


def test_an_offset_needs_a_log_link_and_finite_values(tmp_path, capsys):
    frame = _exposure()
    assert _run(tmp_path, frame, "--target", "y", "--features", "x", "--offset", "hours") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--offset" in err and "--expert linear has none" in err
    bad = frame.assign(hours=lambda d: d.hours.where(d.index != 3, 0.0))
    flags = ["--target", "y", "--features", "x", "--expert", "poisson", "--offset", "log(hours)"]
    assert _run(tmp_path, bad, *flags) == 1
    assert "--offset 'log(hours)' is -inf in row 4" in capsys.readouterr().err
    assert _run(tmp_path, frame, *flags[:-1], "open(hours)") == 2
    assert "open" in capsys.readouterr().err


def test_a_formulas_offset_is_no_column_of_the_design():
    frame = _exposure(20)
    f = ModelFormula("y ~ x + offset(log(hours))")
    X, _ = f.fit_transform(frame)
    assert list(X.columns) == ["x"] and f.offset_terms == ["log(hours)"]
    np.testing.assert_allclose(f.offset_values(frame), np.log(frame.hours))
    assert ModelFormula.from_state(f.to_state()).offset_terms == ["log(hours)"]
    assert ModelFormula("y ~ x").offset_values(frame) is None
    with pytest.raises(FormulaError, match="gate_formula: offset"):
        ModelFormula("y ~ x", "~ x + offset(hours)")


def test_a_family_per_expert_fixes_k(tmp_path, capsys):
    rng = np.random.default_rng(2)
    frame = _exposure(200).assign(y=lambda d: d.y * (rng.uniform(size=len(d)) > 0.3))
    assert _run(tmp_path, frame, "--target", "y", "--features", "x", "--expert",
                "zero,poisson") == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "K = 2: one expert per family of --expert zero,poisson (no search over K)" in out
    model = load(tmp_path / "out" / "model.moe")
    assert model.expert == ["zero", "poisson"] and model.n_experts == 2
    assert "Observed against expected counts" in (tmp_path / "out" / "report.html").read_text()
    assert _run(tmp_path, frame, "--target", "y", "--expert", "zero,poisson", "--experts",
                "3") == 2  # fmt: skip
    assert "--experts must be 2" in capsys.readouterr().err


def test_a_zero_inflated_poisson_with_exposure(tmp_path, capsys):
    """--expert zero,poisson --offset "log(hours)": the offset reaches the Poisson expert
    (its slope recovered), the text says what each expert is, and predictions of the
    saved model double with the exposure."""
    rng = np.random.default_rng(3)
    frame = _exposure(400).assign(y=lambda d: d.y * (rng.uniform(size=len(d)) > 0.3))
    assert _run(tmp_path, frame, "--target", "y", "--features", "x", "--expert",
                "zero,poisson", "--offset", "log(hours)", "--holdout", "0") == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "expert 0: a point mass at 0" in out and "a network" not in out
    model = load(tmp_path / "out" / "model.moe")
    table = model.summary(frame[["x"]], frame.y, offset=np.log(frame.hours)).table
    est, se = table.set_index(["block", "parameter"]).loc[("expert 1", "x"),
                                                          ["estimate", "std_error"]]  # fmt: skip
    assert abs(est - 0.6) < 3 * se
    one = model.predict_distribution(frame[["x"]][:4], offset=np.log(frame.hours[:4]))
    two = model.predict_distribution(frame[["x"]][:4], offset=np.log(2 * frame.hours[:4]))
    np.testing.assert_allclose(two.means[:, 1], 2 * one.means[:, 1], rtol=1e-12)


def test_censored_responses_from_bounds_or_events_give_one_fit(tmp_path, capsys):
    frame = _survival()
    flags = ["--target", "time", "--features", "x", "--expert", "lognormal", "--experts", "1"]
    assert _run(tmp_path, frame, *flags, "--censored-above", "upper", out="above") == 0
    censored = int((frame.event == 0).sum())
    assert f"{censored} of 200 responses right-censored" in capsys.readouterr().out
    assert _run(tmp_path, frame, *flags, "--event", "event", out="event") == 0
    a, b = load(tmp_path / "above" / "model.moe"), load(tmp_path / "event" / "model.moe")
    assert a.log_likelihood_ == pytest.approx(b.log_likelihood_, rel=1e-9)
    page = (tmp_path / "above" / "report.html").read_text()
    assert "(P-P)" in page and "right-censored (Kaplan-Meier)" in page
    # ignoring the censoring pulls the slope and level down; with it, the truth is near
    assert a.coef_.ravel()[0] == pytest.approx(0.5, abs=0.15)
    bad = frame.assign(upper=lambda d: d.upper.where(d.index != 7, -1.0))
    assert _run(tmp_path, bad, *flags, "--censored-above", "upper") == 1
    assert "--censored-above 'upper': row 8" in capsys.readouterr().err
    bad = frame.assign(event=lambda d: d.event.where(d.index != 2, 2))
    assert _run(tmp_path, bad, *flags, "--event", "event") == 1
    assert "--event 'event': row 3 holds 2.0" in capsys.readouterr().err


def test_several_responses_fit_together_and_predict_a_column_each(tmp_path, capsys):
    rng = np.random.default_rng(4)
    x = rng.uniform(0, 2, 150)
    frame = pd.DataFrame({"x": x, "y1": x + 0.2 * rng.normal(size=150),
                          "y2": 1 - x + 0.3 * rng.normal(size=150)})  # fmt: skip
    assert _run(tmp_path, frame, "--target", "y1,y2", "--covariance-type", "full",
                "--experts", "2") == 0  # fmt: skip
    model = load(tmp_path / "out" / "model.moe")
    assert model.covariance_type == "full" and model.target_names_ == ["y1", "y2"]
    page = (tmp_path / "out" / "report.html").read_text()
    assert "y1 (the first of 2 responses)" in page
    frame.to_csv(tmp_path / "new.csv", index=False)
    assert main(["predict", str(tmp_path / "out" / "model.moe"), str(tmp_path / "new.csv"),
                 "--out", str(tmp_path / "p.csv")]) == 0  # fmt: skip
    pred = pd.read_csv(tmp_path / "p.csv")
    assert {"mean[y1]", "mean[y2]", "std[y1]", "q95[y2]"} <= set(pred.columns)
    np.testing.assert_allclose(pred[["mean[y1]", "mean[y2]"]], model.predict(frame[["x"]]))
    capsys.readouterr()
    assert _run(tmp_path, frame, "--target", "y1,y2", "--expert", "poisson") == 2
    assert "are the responses of linear experts" in capsys.readouterr().err
    assert _run(tmp_path, frame, "--target", "y1", "--covariance-type", "full") == 2
    assert "--covariance-type" in capsys.readouterr().err


def test_censored_successes_out_of_trials_fit_as_the_api_fits_them(tmp_path, capsys):
    rng = np.random.default_rng(2)
    n = 120
    x = rng.uniform(0, 2, n)
    trials = rng.integers(5, 30, n)
    s = rng.binomial(trials, 1 / (1 + np.exp(1.0 - 0.8 * x)))
    known = rng.random(n) < 0.7  # elsewhere only "at least half the successes" is known
    s = np.where(known, s, s // 2)
    frame = pd.DataFrame({"x": x, "s": s, "f": trials - s, "upper": np.where(known, s, np.nan),
                          "event": known.astype(int)})  # fmt: skip
    flags = ["--target", "s,f", "--features", "x", "--expert", "binomial", "--experts", "1",
             "--holdout", "0"]  # fmt: skip
    assert _run(tmp_path, frame, *flags, "--censored-above", "upper", out="above") == 0
    assert f"{n - known.sum()} of {n} responses right-censored" in capsys.readouterr().out
    assert _run(tmp_path, frame, *flags, "--event", "event", out="event") == 0
    a, b = load(tmp_path / "above" / "model.moe"), load(tmp_path / "event" / "model.moe")
    assert a.log_likelihood_ == pytest.approx(b.log_likelihood_, rel=1e-9)
    y, upper = frame[["s", "f"]].to_numpy(float), np.where(known, s, np.inf)
    api = MoERegressor(1, expert="binomial", random_state=0).fit(frame[["x"]], y, y_upper=upper)
    np.testing.assert_allclose(a.coef_, api.coef_, rtol=1e-6)
    assert api.coef_.ravel()[0] == pytest.approx(0.8, abs=0.2)  # the truth
    assert api.intercept_[0] == pytest.approx(-1.0, abs=0.25)
    uncensored = MoERegressor(1, expert="binomial").fit(frame[["x"]], y)
    assert np.abs(uncensored.intercept_ - api.intercept_).max() > 0.1  # bounds are not counts
    page = (tmp_path / "above" / "report.html").read_text()
    assert "randomised (P-P) on the training rows" in page and "(Kaplan-Meier)" in page


def test_predict_gives_a_binomial_models_successes_for_each_rows_trials(tmp_path, capsys):
    rng = np.random.default_rng(4)
    n = 150
    x, trials = rng.uniform(0, 2, n), rng.integers(2, 60, n)
    s = rng.binomial(trials, 1 / (1 + np.exp(1.0 - 0.8 * x)))
    frame = pd.DataFrame({"x": x, "s": s, "f": trials - s, "total": trials})
    flags = ["--target", "s,f", "--features", "x", "--expert", "binomial", "--experts", "2"]
    assert _run(tmp_path, frame, *flags, "--no-report") == 0
    path = tmp_path / "out" / "model.moe"
    model = load(path)
    capsys.readouterr()

    def predict(data, *extra):
        data.to_csv(tmp_path / "new.csv", index=False)
        code = main(["predict", str(path), str(tmp_path / "new.csv"), "--out",
                     str(tmp_path / "pred.csv"), *extra])  # fmt: skip
        return code, (pd.read_csv(tmp_path / "pred.csv") if code == 0 else None)

    # the model's successes and failures columns give the trials; --trials names them
    for data, extra in ((frame, ()), (frame[["x", "total"]], ("--trials", "total"))):
        code, pred = predict(data, *extra)
        assert code == 0
        p = model.predict(frame[["x"]])
        np.testing.assert_allclose(pred["p"], p, rtol=1e-12)
        np.testing.assert_allclose(pred["mean"], trials * p, rtol=1e-12)
        assert (pred["q05"] <= pred["mean"]).all() and (pred["mean"] <= pred["q95"]).all()
        assert (pred["q95"] <= trials).all() and (pred["q95"] > 1).any()  # not one trial's 0/1
    # without trials: the proportion, and a line saying how to get the successes
    code, pred = predict(frame[["x"]])
    assert code == 0 and list(pred.columns) == ["p", "expert"]
    assert "give --trials COLUMN" in capsys.readouterr().err
    code, _ = predict(frame.assign(total=frame.total.astype(float).where(frame.index != 3, 2.5)),
                      "--trials", "total")  # fmt: skip
    assert code == 1 and "--trials 'total'" in capsys.readouterr().err
    linear = ["--target", "s", "--features", "x", "--experts", "1", "--no-report"]
    assert _run(tmp_path, frame, *linear, out="lin") == 0
    assert main(["predict", str(tmp_path / "lin" / "model.moe"), str(tmp_path / "data.csv"),
                 "--trials", "total"]) == 2  # fmt: skip
    assert "--trials is for a model of binomial experts" in capsys.readouterr().err


@pytest.mark.parametrize(("expert", "said"), [
    ("zero,poisson", "--expert zero,poisson has no censored form (a list of families has none"),
    ("student_t", "--expert student_t has no censored form."),
])  # fmt: skip
def test_censoring_with_a_family_that_cannot_read_it_is_one_line_in_the_commands_words(
    tmp_path, capsys, expert, said
):
    frame = _survival().assign(time=lambda d: np.round(d.time * 3))
    assert _run(tmp_path, frame, "--target", "time", "--features", "x", "--expert", expert,
                "--censored-above", "upper") == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert said in err and "--censored-above and --event are for --expert linear" in err
    assert "\n" not in err and "y_upper" not in err
