"""The HTML report of a fitted model: its sections, its numbers and its figures.

The models are small and fitted once per module (one EM start, a fixed seed); every
number the report prints is compared with the model's own attribute or method.
"""

from __future__ import annotations

import base64
import html
import io
import re

import matplotlib
import matplotlib.image
import numpy as np
import pandas as pd
import pytest

import moekit.report.sections
from moekit import MDNRegressor, MoEClassifier, MoERegressor
from moekit.datasets import make_bishop_inverse, make_moe_regression
from moekit.report import (
    LEVELS,
    TOUR_CHAPTERS,
    html_report,
    mdn_sections,
    report_sections,
    tour_page,
    tour_report,
)
from moekit.report.headline import wilson_interval
from moekit.report.page import html_table
from moekit.report.regression import coverage, model_formula

matplotlib.use("Agg")  # before pyplot is first imported (moekit.plotting imports it lazily)

PNG = b"\x89PNG\r\n\x1a\n"
SECTIONS = ["summary", "formula", "fit", "gate", "coverage", "convergence", "criterion",
            "coefficients", "sizes"]  # fmt: skip


@pytest.fixture(scope="module")
def regression():
    X, y, _ = make_moe_regression(240, n_features=2, n_experts=2, random_state=0)
    X = pd.DataFrame(X, columns=["a", "b"])
    model = MoERegressor(2, n_init=1, random_state=0).fit(X[:180], y[:180])
    return model, X[:180], y[:180], X[180:], y[180:]


@pytest.fixture(scope="module")
def regression_page(regression):
    model, X, y, Xt, yt = regression
    table = pd.DataFrame({"n_experts": [1, 2, 3], "bic": [900.0, 700.0, 720.0],
                          "best": [False, True, False]})  # fmt: skip
    figures: dict[str, bytes] = {}
    page = html_report(model, X, y, X_test=Xt, y_test=yt, table=table, target="out",
                       source="toy.csv", figures=figures)  # fmt: skip
    return page, figures


def test_a_held_out_check_given_is_not_computed_again(regression, regression_page, monkeypatch):
    from moekit.report.headline import fit_baseline, held_out_check

    model, X, y, Xt, yt = regression
    baseline = fit_baseline(model, X, y)
    check = held_out_check(model, Xt, yt, baseline)

    def again(*args, **kwargs):
        raise AssertionError("held_out_check computed again")

    monkeypatch.setattr(moekit.report.sections, "held_out_check", again)
    table = pd.DataFrame({"n_experts": [1, 2, 3], "bic": [900.0, 700.0, 720.0],
                          "best": [False, True, False]})  # fmt: skip
    page = html_report(model, X, y, X_test=Xt, y_test=yt, table=table, target="out",
                       source="toy.csv", baseline=baseline, check=check)  # fmt: skip
    assert page == regression_page[0]  # the same page as when the report computes it


def _cells(page: str) -> dict[str, str]:
    """The two-column tables' rows: first cell -> second cell (unescaped)."""
    rows = re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td>", page)
    return {html.unescape(a): html.unescape(b) for a, b in rows}


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(s) for s in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_the_regression_page_holds_every_section_in_order(regression_page):
    page, _ = regression_page
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert re.findall(r'<h2 id="(\w+)"', page) == SECTIONS
    assert "<h1>MoERegressor: out</h1>" in page
    assert "Predictive intervals on 60 held-out rows" in page
    assert 'src="http' not in page  # nothing fetched: the page opens offline


def test_the_summary_table_holds_the_models_numbers(regression, regression_page):
    model, X, y, Xt, yt = regression
    cells = _cells(regression_page[0])
    assert cells["data"] == "toy.csv" and cells["rows fitted"] == "180"
    assert cells["features"] == "a, b" and cells["experts"] == "2"
    assert cells["expert / gate"] == "linear / softmax"
    assert cells["log-likelihood per row (fitted rows)"] == f"{model.log_likelihood(X, y):.4g}"
    assert cells["log-likelihood per row (60 held-out rows)"] == (
        f"{model.log_likelihood(Xt, yt):.4g}"
    )
    assert cells["BIC"] == f"{model.bic(X, y):.4g}"
    assert cells["EM"].startswith(f"{model.n_iter_} iterations")


def test_the_formula_prints_the_fitted_coefficients(regression, regression_page):
    model, *_ = regression
    text = html.unescape(re.search(r"<pre>(.*?)</pre>", regression_page[0], re.S).group(1))
    assert text.startswith("p(out | x) = sum over k = 1..2 of g_k(x) p_k(out | x)")
    for k in range(2):
        intercept, (ca, cb) = model.intercept_[k], model.coef_[k]
        sd = model.noise_std_[k]
        assert f"expert {k}: N(mean = {intercept:.4g} " in text
        assert f"{abs(ca):.4g}·a" in text and f"{abs(cb):.4g}·b" in text
        assert f"sd = {sd:.4g})" in text
        assert f"s_{k}(x) = {model.gate_intercept_[k]:.4g}" in text


def test_the_sizes_table_holds_each_experts_share(regression, regression_page):
    model, *_ = regression
    page = regression_page[0]
    sizes = np.asarray(model.expert_sizes_)
    rows = re.findall(r"<tr><td>(\d)</td><td>([^<]+)</td><td>([^<]+)</td></tr>", page)
    assert [int(k) for k, _, _ in rows] == [0, 1]
    np.testing.assert_allclose([float(r) for _, r, _ in rows], sizes, rtol=1e-3)
    np.testing.assert_allclose([float(s) for _, _, s in rows], sizes / sizes.sum(), rtol=1e-3)


def test_the_figures_are_pngs_that_decode_and_match_the_kept_bytes(regression_page):
    page, figures = regression_page
    images = _images(page)
    # fit, gate, convergence, criterion, sizes: one image per section that draws
    assert set(figures) == {"fit", "gate", "convergence", "criterion", "sizes"}
    assert len(images) == 5 and sorted(images) == sorted(figures.values())
    for data in images:
        assert data[:8] == PNG
        pixels = matplotlib.image.imread(io.BytesIO(data), format="png")
        assert pixels.ndim == 3 and min(pixels.shape[:2]) > 50


def test_the_coverage_is_the_share_of_rows_inside_each_interval(regression):
    model, _, _, Xt, yt = regression
    rows = coverage(model, Xt.to_numpy(), yt)
    assert [r[0] for r in rows] == [f"{level:.0%}" for level in LEVELS]
    d = model.predict_distribution(Xt)
    for (_, expected, covered, interval, width), level in zip(rows, LEVELS, strict=True):
        assert expected == pytest.approx(level)  # a continuous central interval holds its level
        lo, hi = d.interval(level)
        assert covered == pytest.approx(np.mean((lo <= yt) & (yt <= hi)))
        assert width == pytest.approx(np.mean(hi - lo), rel=1e-6)
        k_lo, k_hi = wilson_interval(round(covered * len(yt)), len(yt))
        assert interval == f"{k_lo:.3f}-{k_hi:.3f}" and k_lo <= covered <= k_hi
    assert np.all(np.diff([r[4] for r in rows]) > 0)  # wider intervals at higher levels


def test_sections_take_a_prefix_and_a_level_and_skip_the_criterion_without_a_table(regression):
    model, X, y, _, _ = regression
    parts = report_sections(model, X, y, prefix="toy_", level=3)
    ids = re.findall(r'<h3 id="(\w+)"', "".join(parts))
    assert ids == ["toy_" + s for s in SECTIONS if s != "criterion"]
    assert "the training rows (nothing was held out)" in "".join(parts)


def test_a_model_with_many_parameters_gets_a_note_instead_of_its_table(regression, monkeypatch):
    model, X, y, _, _ = regression
    monkeypatch.setattr(moekit.report.sections, "MAX_TABLE_PARAMETERS", 3)
    page = "".join(report_sections(model, X, y))
    assert f"{model.n_parameters()} parameters: too many to list here" in page
    assert "std_error" not in page


def test_the_formula_of_a_constant_gate_and_of_poisson_experts():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 2, 200)
    y = rng.poisson(np.exp(np.where(rng.random(200) < 0.5, 0.5 + x, 2.0 - 0.5 * x)))
    model = MoERegressor(2, expert="poisson", gate="constant", n_init=1, random_state=0)
    model.fit(x[:, None], y)
    text = model_formula(model, ["x"], "count")
    assert "expert 0: Poisson with log mean = " in text and "expert 1: Poisson" in text
    weights = model.gate_weights(np.zeros((1, 1)))[0]
    assert "g(x) = (" + ", ".join(f"{w:.3f}" for w in weights) + "), whatever x" in text


def test_a_classifier_report_shows_accuracy_and_the_division_of_labour():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(160, 2))
    labels = np.where((X[:, 0] > 0) == (X[:, 1] > 0), "yes", "no")  # two experts' work
    model = MoEClassifier(2, n_init=1, random_state=0).fit(X[:120], labels[:120])
    parts = report_sections(model, X[:120], labels[:120], X_test=X[120:], y_test=labels[120:],
                            target="label")  # fmt: skip
    page = "".join(parts)
    ids = re.findall(r'<h2 id="(\w+)"', page)
    assert ids == ["summary", "gate", "coverage", "division", "convergence", "coefficients",
                   "sizes"]  # fmt: skip
    assert "Accuracy on 40 held-out rows" in page
    assert _cells(page)["accuracy"] == f"{model.score(X[120:], labels[120:]):.4g}"
    images = _images(page)  # gate, confusion, division, convergence, sizes
    assert len(images) == 5 and all(i[:8] == PNG for i in images)


def test_mdn_sections_show_the_density_and_the_held_out_fit():
    train, test = make_bishop_inverse(200, random_state=0), make_bishop_inverse(100, random_state=1)
    model = MDNRegressor(2, hidden_layer_sizes=(8,), max_iter=3, random_state=0)
    with pytest.warns(Warning):  # three epochs: it says it stopped early
        model.fit(train.X, train.y)
    parts = mdn_sections(model, train.X, train.y, X_test=test.X, y_test=test.y, target="t",
                         prefix="b_", level=3)  # fmt: skip
    page = "".join(parts)
    assert re.findall(r'<h3 id="(\w+)"', page) == ["b_summary", "b_density", "b_coverage",
                                                   "b_convergence"]  # fmt: skip
    cells = _cells(page)
    assert cells["mixture components"] == "2" and cells["rows fitted / held out"] == "200 / 100"
    assert cells["log-likelihood per row (held-out rows)"] == (
        f"{model.log_likelihood(test.X, test.y):.4g}"
    )
    assert len(_images(page)) == 2


def test_the_tour_page_puts_each_chapter_under_its_title():
    sections = {key: [f"<p>{key} body</p>"] for key in TOUR_CHAPTERS}
    page = tour_page(sections)
    assert re.findall(r'<h2 id="(\w+)" class="chapter"', page) == ["mcycle", "digits", "bishop"]
    for key, title in TOUR_CHAPTERS.items():
        assert f'<li><a href="#{key}">{html.escape(title)}</a></li>' in page
        assert page.index(title) < page.index(f"<p>{key} body</p>")
    assert "<h1>moekit: a guided tour</h1>" in page
    assert tour_report("T & U", "<p>i</p>", []).count("T &amp; U") == 2  # title and heading


def test_tables_escape_text_and_round_floats():
    table = html_table([["<b>", 1.23456789, 7]], ["name", "value", "n"])
    assert "<td>&lt;b&gt;</td><td>1.235</td><td>7</td>" in table
    assert table.startswith("<table><tr><th>name</th><th>value</th><th>n</th></tr>")


def test_the_gate_map_has_a_legend_naming_each_experts_colour(regression):
    from matplotlib.colors import to_rgba

    from moekit.plotting import expert_colors
    from moekit.report.regression import gate_figure

    model, X, *_ = regression
    fig = gate_figure(model, X.to_numpy(), ["a", "b"])
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["expert 0", "expert 1"]
    for patch, color in zip(legend.get_patches(), expert_colors(2), strict=True):
        assert patch.get_facecolor()[:3] == pytest.approx(to_rgba(color)[:3])


def test_a_gate_of_one_other_feature_is_drawn_and_a_constant_one_is_said():
    rng = np.random.default_rng(0)
    X = pd.DataFrame({"x": rng.uniform(-2, 2, 200), "z": rng.normal(size=200)})
    y = np.where(X.z > 0, 2 * X.x, -X.x) + 0.2 * rng.normal(size=200)
    model = MoERegressor(2, expert_features=["x"], gate_features=["z"], n_init=1,
                         random_state=0).fit(X, y)  # fmt: skip
    parts = "".join(report_sections(model, X, y))
    gate = parts[parts.index('id="gate"') : parts.index('id="coverage"')]
    assert "<img" in gate and "formula above" not in gate  # the gate's own figure
    constant = MoERegressor(2, gate="constant", n_init=1, random_state=0).fit(X, y)
    parts = "".join(report_sections(constant, X, y))
    gate = parts[parts.index('id="gate"') : parts.index('id="coverage"')]
    weights = constant.gate_weights(X.iloc[:1])[0]
    assert "<img" not in gate and "figure" not in gate
    assert f"the same weights g = ({weights[0]:.3f}, {weights[1]:.3f})" in gate


def test_the_summary_table_has_no_empty_header_row(regression_page):
    page = regression_page[0]
    summary = page[page.index('id="summary"') : page.index('id="formula"')]
    assert "<th>" not in summary and "<th></th>" not in page
