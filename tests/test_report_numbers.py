"""Every number the report and the terminal print is the fitted model's own.

The model's formula is parsed back from its text (not rebuilt the way the code
builds it) and each coefficient compared, by the name printed beside it, with the
model's attributes; the gate's scores are compared with the summary's contrasts
too. Models: separate gate columns (in both orders), a formula with a factor, a
constant gate, Poisson and Student-t experts, a tree of gates, network parts.
"""

from __future__ import annotations

import html as html_module
import re
import warnings

import numpy as np
import pandas as pd
import pytest

from moekit import HierarchicalMoERegressor, MoERegressor, fit_formula
from moekit.estimators.inference import Summary
from moekit.report import html_report
from moekit.report.describe import (
    WIDTH,
    expert_shares,
    model_formula,
    summary_text,
    text_report,
)
from moekit.report.headline import HeldOutCheck, held_out_check, wilson_interval

NUMBER = r"-?[0-9.]+(?:e[+-]\d+)?"


def _frame(n=300, seed=0):
    rng = np.random.default_rng(seed)
    x, z = rng.uniform(-2, 2, n), rng.normal(size=n)
    g = np.where(rng.random(n) < 0.4, "a", "b")
    k = rng.random(n) < 1 / (1 + np.exp(-2 * z))
    y = np.where(k, 1 + 2 * x, -1 - x) + 0.5 * (g == "b") + 0.3 * rng.normal(size=n)
    return pd.DataFrame({"z": z, "x": x, "g": g, "y": y})


def _X(t, columns):
    """The columns as a frame of their own (each column its own array)."""
    return pd.DataFrame({c: t[c].to_numpy().copy() for c in columns})


def _entries(text: str) -> dict[str, str]:
    """Each line of the formula with its wrapped continuation lines joined, by its key
    ("expert 0", "s_1", "s_root,0", "g"); continuation lines start with "+ " or "- "."""
    flat = re.sub(r"\n\s+(?=[+-] )", " ", text)
    out = {}
    for line in flat.splitlines()[1:]:
        m = re.match(r"\s+(expert \d+|s_[\w.]+,?\d*|g)(?:\(x\))?(?::| =)\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _linear(text: str) -> tuple[float, dict[str, float]]:
    """'a + b·x - c·I(x ** 2)' -> (a, {"x": b, "I(x ** 2)": -c})."""
    intercept = float(re.match(NUMBER, text).group(0))
    terms = re.findall(rf"([+-]) ({NUMBER})·(.+?)(?= [+-] {NUMBER}·|, |\)?$)", text)
    return intercept, {name: float(v) * (-1 if s == "-" else 1) for s, v, name in terms}


def _check_part(values: dict[str, float], slopes: np.ndarray, names: list[str], seen) -> None:
    """The printed slopes are the attribute's, by name, for exactly the columns seen."""
    seen_names = [names[c] for c in seen]
    assert list(values) == seen_names
    for name, v in values.items():
        assert v == pytest.approx(slopes[names.index(name)], rel=1e-3, abs=1e-12)


def _check_experts(model, entries, names):
    cols = range(len(names)) if model._expert_cols is None else model._expert_cols
    for k in range(model.n_experts):
        text = entries[f"expert {k}"]
        body = re.search(r"(?:mean|location) = (.*?)(?:, (?:sd|scale) = |$)", text).group(1)
        intercept, slopes = _linear(body)
        assert intercept == pytest.approx(model.intercept_[k], rel=1e-3)
        _check_part(slopes, model.coef_[k], names, cols)
        if model.expert == "linear":
            sd = float(re.search(rf"sd = ({NUMBER})\)", text).group(1))
            assert sd == pytest.approx(model.noise_std_[k], rel=1e-3)


def _check_softmax_gate(model, entries, names, summary):
    cols = range(len(names)) if model._gate_cols is None else model._gate_cols
    scores = []
    for k in range(model.n_experts):
        intercept, slopes = _linear(entries[f"s_{k}"])
        assert intercept == pytest.approx(model.gate_intercept_[k], rel=1e-3)
        _check_part(slopes, model.gate_coef_[k], names, cols)
        scores.append((intercept, slopes))
    # the summary reports the gate relative to expert 0: s_k - s_0, coefficient by coefficient
    table = summary.table
    for k in range(1, model.n_experts):
        block = table[table.block == f"gate: expert {k} vs 0"].set_index("parameter")
        assert scores[k][0] - scores[0][0] == pytest.approx(block.estimate["intercept"],
                                                            rel=1e-2, abs=1e-3)  # fmt: skip
        for name, v in scores[k][1].items():
            assert v - scores[0][1][name] == pytest.approx(block.estimate[name], rel=1e-2,
                                                           abs=1e-3)  # fmt: skip


@pytest.mark.parametrize("columns", [["z", "x"], ["x", "z"]])
def test_separate_gate_columns_print_the_gates_own_slopes(columns):
    t = _frame()
    X = _X(t, columns)
    model = MoERegressor(2, expert_features=["x"], gate_features=["z"], n_init=2,
                         random_state=0).fit(X, t.y)  # fmt: skip
    text = model_formula(model, target="y")
    entries = _entries(text)
    _check_experts(model, entries, columns)
    _check_softmax_gate(model, entries, columns, model.summary())
    assert abs(model.gate_coef_[1, columns.index("z")]) > 0.5  # the gate does use z
    assert "0·z" not in text


def test_a_formula_with_a_factor_prints_each_level_and_the_gate():
    t = _frame()
    model = fit_formula(MoERegressor(2, n_init=2, random_state=0), "y ~ x + I(x**2) + C(g)", t,
                        gate_formula="~ z")  # fmt: skip
    names = list(model.feature_names_in_)
    assert "C(g)[T.b]" in names and "I(x ** 2)" in names
    entries = _entries(model_formula(model, target="y"))
    _check_experts(model, entries, names)
    _check_softmax_gate(model, entries, names, model.summary())


def test_a_constant_gate_prints_its_weights():
    t = _frame()
    model = MoERegressor(2, gate="constant", n_init=2, random_state=0).fit(_X(t, ["x"]), t.y)
    entries = _entries(model_formula(model, target="y"))
    _check_experts(model, entries, ["x"])
    weights = [float(v) for v in re.findall(NUMBER, entries["g"])]
    np.testing.assert_allclose(weights, model.gate_weights(_X(t, ["x"]).iloc[:1])[0], atol=1e-3)


@pytest.mark.parametrize("expert", ["poisson", "student_t"])
def test_other_families_print_their_own_parameters(expert):
    t = _frame()
    y = np.round(np.exp(0.5 * t.x.clip(-1, 2))) if expert == "poisson" else t.y
    model = MoERegressor(2, expert=expert, n_init=1, random_state=0).fit(_X(t, ["x", "z"]), y)
    text = model_formula(model, target="y")
    entries = _entries(text)
    for k in range(2):
        line = entries[f"expert {k}"]
        if expert == "poisson":
            intercept, slopes = _linear(line.split("log mean = ")[1])
        else:
            intercept, slopes = _linear(line.split("location = ")[1].split(", scale")[0])
            scale, df = re.search(rf"scale = ({NUMBER}), df = ({NUMBER})\)", line).groups()
            assert float(scale) == pytest.approx(model.noise_std_[k], rel=1e-3)
            assert float(df) == pytest.approx(model.df_[k], rel=1e-3)
        assert intercept == pytest.approx(model.intercept_[k], rel=1e-3)
        _check_part(slopes, model.coef_[k], ["x", "z"], [0, 1])


def test_a_tree_of_gates_prints_every_nodes_scores():
    t = _frame()
    model = HierarchicalMoERegressor(depth=2, branching=2, n_init=1, max_iter=50,
                                     random_state=0)  # fmt: skip
    with warnings.catch_warnings():  # 50 iterations may not converge; the numbers are the point
        warnings.simplefilter("ignore")
        model.fit(_X(t, ["x", "z"]), t.y)
    entries = _entries(model_formula(model, target="y"))
    _check_experts(model, entries, ["x", "z"])
    nodes = ["root", "0", "1"]  # level by level, as gate_coef_ orders them
    for i, node in enumerate(nodes):
        for c in range(2):
            intercept, slopes = _linear(entries[f"s_{node},{c}"])
            assert intercept == pytest.approx(model.gate_intercept_[i, c], rel=1e-3)
            _check_part(slopes, model.gate_coef_[i, c], ["x", "z"], [0, 1])


def test_network_parts_are_named_not_printed_and_the_report_says_why():
    t = _frame(160)
    model = MoERegressor(2, expert="mlp", gate="mlp", n_init=1, max_iter=5, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(_X(t, ["x", "z"]), t.y)
    text = model_formula(model, target="y")
    assert "expert 0: a mlp expert (a network" in text and "a mlp gate (a network" in text
    out = text_report(model, _X(t, ["x", "z"]), t.y)
    assert "No coefficient table: summary() reports" in out
    page = html_report(model, _X(t, ["x", "z"]), t.y)
    assert "No coefficient table: summary() reports" in page and "std_error" not in page


def test_the_terminal_and_the_report_print_one_text():
    t = _frame()
    model = MoERegressor(2, expert_features=["x"], gate_features=["z"], n_init=1,
                         random_state=0).fit(_X(t, ["z", "x"]), t.y)  # fmt: skip
    summary = model.summary()
    terminal = text_report(model, _X(t, ["z", "x"]), t.y, summary)
    page = html_report(model, _X(t, ["z", "x"]), t.y, summary=summary)
    shown = html_module.unescape(page)
    formula = model_formula(model, target="y")
    assert formula in terminal and formula in shown
    assert summary_text(summary) in terminal and summary_text(summary) in shown


def test_long_formula_lines_and_notes_wrap_inside_the_page():
    rng = np.random.default_rng(0)
    names = [f"a_rather_long_feature_name_{j}" for j in range(8)]
    X = pd.DataFrame(rng.normal(size=(200, 8)), columns=names)
    y = X.to_numpy() @ rng.normal(size=8) + rng.normal(size=200)
    model = MoERegressor(2, n_init=1, random_state=0).fit(X, y)
    text = model_formula(model, target="y")
    assert max(len(line) for line in text.splitlines()) <= WIDTH
    _check_experts(model, _entries(text), names)  # wrapping loses no term
    note = "The observed information is singular along 2 direction(s): " + "words " * 40
    table = pd.DataFrame({"block": ["expert 0"], "parameter": ["intercept"], "estimate": [1.0],
                          "std_error": [np.nan], "z_value": [np.nan],
                          "p_value": [np.nan]})  # fmt: skip
    shown = summary_text(Summary(table, -1.0, 10, "title", note))
    assert max(len(line) for line in shown.splitlines()) <= WIDTH
    assert " ".join(shown.split()).endswith(" ".join(note.split()))


def test_the_coefficient_table_has_no_empty_header_row():
    t = _frame()
    model = MoERegressor(2, n_init=1, random_state=0).fit(_X(t, ["x"]), t.y)
    lines = summary_text(model.summary()).splitlines()
    for i, line in enumerate(lines):
        if line.endswith(":") and not line.startswith(" "):  # a block's title
            assert lines[i + 1].split() == ["parameter", "estimate", "std_error", "z_value",
                                            "p_value"]  # fmt: skip
            assert lines[i + 2].split()[0] == "intercept"
    assert not [line for line in lines if line.strip() == "parameter"]


def test_shares_are_fractions_that_sum_to_one():
    t = _frame()
    model = MoERegressor(3, n_init=1, random_state=0).fit(_X(t, ["x"]), t.y)
    shares = expert_shares(model)
    assert shares.sum() == pytest.approx(1.0) and np.all(shares > 0)
    np.testing.assert_allclose(shares, model.expert_sizes_ / len(t))


def test_wilson_interval_matches_its_closed_form_and_stays_in_range():
    lo, hi = wilson_interval(43, 54)  # worked by hand: p = 0.7963, z = 1.96
    assert lo == pytest.approx(0.6710, abs=2e-4) and hi == pytest.approx(0.8823, abs=2e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    # the interval covers its proportion about 95% of the time
    rng = np.random.default_rng(0)
    draws = rng.binomial(30, 0.9, 4000)
    inside = [lo <= 0.9 <= hi for lo, hi in (wilson_interval(int(k), 30) for k in draws)]
    assert 0.92 < np.mean(inside) < 0.98


def test_the_headline_says_when_the_mixture_does_worse_than_one_expert():
    worse = HeldOutCheck(n=27, n_experts=3, log_likelihood=-5.636, baseline_log_likelihood=-5.394,
                         covered=20, baseline_covered=24)  # fmt: skip
    said = worse.verdict()
    assert said.startswith("On 27 held-out rows this mixture of 3 experts does worse than a")
    assert "-5.636 per row against -5.394 for K = 1" in said and "cover 74.1% of 27 rows" in said
    better = HeldOutCheck(n=27, n_experts=3, log_likelihood=-5.0, baseline_log_likelihood=-5.4,
                          covered=24, baseline_covered=23)  # fmt: skip
    assert better.verdict() == ""
    t = _frame()
    model = MoERegressor(2, expert_features=["x"], gate_features=["z"], n_init=1,
                         random_state=0).fit(_X(t, ["x", "z"])[:240], t.y[:240])  # fmt: skip
    one = MoERegressor(1).fit(_X(t, ["x", "z"])[:240], t.y[:240])
    check = held_out_check(model, _X(t, ["x", "z"])[240:], t.y[240:], one)
    assert check.log_likelihood == pytest.approx(model.log_likelihood(_X(t, ["x", "z"])[240:],
                                                                      t.y[240:]))  # fmt: skip
    assert check.baseline_log_likelihood < check.log_likelihood and check.verdict() == ""
    lo, hi = model.predict_distribution(_X(t, ["x", "z"])[240:]).interval(0.9)
    assert check.covered == int(np.sum((lo <= t.y[240:]) & (t.y[240:] <= hi)))


def test_experts_removed_during_em_are_counted_not_hidden():
    rng = np.random.default_rng(3)
    X = pd.DataFrame({"x": rng.normal(size=48)})
    y = rng.standard_t(3, size=48)
    model = MoERegressor(8, n_init=1, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(X, y)
    removed = model.n_experts_removed_
    assert removed > 0  # this data cannot carry eight experts
    K = len(model.expert_sizes_)
    said = f"{K} ({removed} of the 8 asked for were removed during EM"
    assert said in text_report(model, X, y) and said in html_report(model, X, y)
    assert f"sum over k = 1..{K} of" in model_formula(model)


def test_counts_are_held_to_the_coverage_their_intervals_promise():
    # a count's central 90% interval holds more than 90%: the share the model expects
    # is F(q_b) - F(q_a - 1), and the headline compares each model with its own
    from scipy import stats

    from moekit.report.headline import expected_inside

    rng = np.random.default_rng(0)
    X = rng.uniform(0, 2, (400, 1))
    z = rng.random(400) < 0.5
    y = rng.poisson(np.exp(np.where(z, 0.2 + 0.5 * X[:, 0], 1.8 - 0.3 * X[:, 0]))).astype(float)
    model = MoERegressor(2, expert="poisson", n_init=2, random_state=0).fit(X[:300], y[:300])
    d = model.predict_distribution(X[300:])
    q_a, q_b = d.quantile(0.05), d.quantile(0.95)
    mu, w = d.means, d.weights
    cdf = lambda q: (w * stats.poisson.cdf(q[:, None], mu)).sum(1)  # noqa: E731
    promised = expected_inside(d, 0.9)
    np.testing.assert_allclose(promised, cdf(q_b) - cdf(q_a - 1), rtol=1e-10)
    assert (promised >= 0.9 - 1e-12).all() and promised.mean() > 0.92
    check = held_out_check(model, X[300:], y[300:], MoERegressor(1, expert="poisson").fit(
        X[:300], y[:300]))  # fmt: skip
    assert check.expected == pytest.approx(promised.mean())
    assert "; the model expects" in check.coverage_text()
    # a mixture covering what it promises is not "worse" than one expert nearer 90%
    fair = HeldOutCheck(n=400, n_experts=2, log_likelihood=-2.0, baseline_log_likelihood=-2.1,
                        covered=382, baseline_covered=361, expected=0.955,
                        baseline_expected=0.95)  # fmt: skip
    assert fair.verdict() == ""
    nominal = HeldOutCheck(n=400, n_experts=2, log_likelihood=-2.0, baseline_log_likelihood=-2.1,
                           covered=382, baseline_covered=361)  # fmt: skip
    assert nominal.verdict() != ""  # against 90%, as before
