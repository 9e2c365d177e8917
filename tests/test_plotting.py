"""The figures of moekit.plotting: what each draws, compared with the model it draws.

Small models fitted once per module (one EM start, a fixed seed), the Agg backend.
"""

from __future__ import annotations

import warnings

import matplotlib
import numpy as np
import pandas as pd
import pytest

from moekit import HierarchicalMoERegressor, MoERegressor
from moekit.datasets import make_moe_regression
from moekit.plotting import (
    expert_colors,
    plot_conditional_density,
    plot_criterion,
    plot_hme_tree,
    plot_lm_training,
    plot_regression_fit,
)

matplotlib.use("Agg")  # before pyplot is first imported (moekit.plotting imports it lazily)

import matplotlib.pyplot as plt


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def one_input():
    """A two-expert regression on one named feature."""
    X, y, _ = make_moe_regression(200, n_features=1, n_experts=2, random_state=0)
    X = pd.DataFrame(X, columns=["t"])
    return MoERegressor(2, n_init=1, random_state=0).fit(X, y), X, y


def _labels(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_expert_colors_are_distinct_and_switch_palette_past_ten():
    assert expert_colors(3) == [plt.get_cmap("tab10")(i) for i in range(3)]
    many = expert_colors(12)
    assert len(set(many)) == 12 and many[0] == plt.get_cmap("tab20")(0)


def test_regression_fit_draws_the_mean_and_the_gate_weights_of_the_model(one_input):
    model, X, y = one_input
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a grid without the model's names would warn
        fig = plot_regression_fit(model, X, y, xlabel="time", ylabel="accel", title="T")
    ax, axg = fig.axes
    assert sorted(_labels(ax)) == ["90% predictive interval", "E[y | x]", "data", "expert 0",
                                   "expert 1"]  # fmt: skip
    assert (ax.get_ylabel(), ax.get_title()) == ("accel", "T")
    assert (axg.get_xlabel(), axg.get_ylabel()) == ("time", "gate g_k(x)")
    grid = np.linspace(X["t"].min(), X["t"].max(), 400)
    frame = pd.DataFrame({"t": grid})
    mean = next(line for line in ax.get_lines() if line.get_label() == "E[y | x]")
    np.testing.assert_allclose(mean.get_xdata(), grid)
    np.testing.assert_allclose(mean.get_ydata(), model.predict(frame), rtol=1e-10)
    gate = np.column_stack([line.get_ydata() for line in axg.get_lines()])
    np.testing.assert_allclose(gate, model.gate_weights(frame), rtol=1e-10)
    assert len(ax.collections) == 2  # the interval's band and the data's scatter
    np.testing.assert_allclose(ax.collections[1].get_offsets(), np.column_stack([X["t"], y]))


def test_regression_fit_labels_an_unnamed_feature_by_its_index():
    X, y, _ = make_moe_regression(120, n_features=2, n_experts=2, random_state=1)
    model = MoERegressor(2, n_init=1, random_state=0).fit(X, y)
    fig = plot_regression_fit(model, X, y, feature=1, alpha=0.5)
    ax, axg = fig.axes
    assert axg.get_xlabel() == "x[1]" and ax.get_ylabel() == "y"
    assert "50% predictive interval" in _labels(ax)


def test_conditional_density_is_the_models_density_on_the_grid(one_input):
    model, X, y = one_input
    x = X["t"].to_numpy()
    truth = (np.array([0.0, 1.0]), np.array([0.0, 1.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the grid carries the model's feature name
        fig = plot_conditional_density(model, x, y, grid=30, truth=truth, xlabel="t", ylabel="y")
    ax, colorbar = fig.axes
    assert colorbar.get_ylabel() == "p(y | x)"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("t", "y")
    assert {"truth", "modes of p(y | x)", "E[y | x]"} <= set(_labels(ax))
    mesh = ax.collections[0]
    dens = np.asarray(mesh.get_array()).reshape(30, 30)  # rows: y, columns: x
    xs = np.linspace(x.min() - 0.05 * np.ptp(x), x.max() + 0.05 * np.ptp(x), 30)
    ys = np.linspace(y.min() - 0.05 * np.ptp(y), y.max() + 0.05 * np.ptp(y), 30)
    d = model.predict_distribution(pd.DataFrame({"t": xs}))
    np.testing.assert_allclose(dens[7], np.exp(d.logpdf(np.full(30, ys[7]))), rtol=1e-10)


def test_conditional_density_draws_on_a_given_axes(one_input):
    model, X, y = one_input
    fig, ax = plt.subplots()
    assert plot_conditional_density(model, X["t"], y, grid=20, ax=ax, title="D") is fig
    assert ax.get_title() == "D" and len(fig.axes) == 2  # its axes and the colorbar


def test_criterion_marks_the_marked_best_or_else_the_lowest():
    table = pd.DataFrame({"n_experts": [1, 2, 3], "bic": [30.0, 10.0, 20.0]})
    fig = plot_criterion(table, "bic")
    ax = fig.axes[0]
    line, best = ax.get_lines()
    np.testing.assert_array_equal(line.get_ydata(), [30.0, 10.0, 20.0])
    assert (best.get_xdata()[0], best.get_ydata()[0]) == (2, 10.0)
    assert _labels(ax) == ["best: K = 2"] and ax.get_ylabel() == "BIC"
    assert list(ax.get_xticks()) == [1, 2, 3]
    # select_n_experts's mark wins (the ELBO is best highest)
    elbo = table.rename(columns={"bic": "elbo"}).assign(best=[False, False, True])
    _, ax = plt.subplots()
    assert plot_criterion(elbo, "elbo", ax=ax) is ax.figure
    assert ax.get_lines()[1].get_xdata()[0] == 3 and ax.get_ylabel() == "ELBO"


def test_lm_training_draws_the_losses_and_the_last_load():
    log = {"step": [1, 2, 3], "train_loss": [3.0, 2.5, 2.2], "eval_step": [3],
           "val_loss": [2.4], "tokens_per_expert": [[10.0, 30.0, 20.0, 40.0]]}  # fmt: skip
    fig = plot_lm_training(log, title="LM")
    ax, axl = fig.axes
    assert ax.get_title() == "LM" and _labels(ax) == ["train (per step)", "held out"]
    heights = [bar.get_height() for bar in axl.patches]
    np.testing.assert_allclose(heights, [0.1, 0.3, 0.2, 0.4])
    uniform = axl.get_lines()[0]
    assert uniform.get_label() == "uniform" and uniform.get_ydata()[0] == pytest.approx(0.25)


def test_lm_training_draws_the_first_layer_of_a_train_log():
    from moekit.nn.train import TrainLog

    log = TrainLog(step=[1, 2], train_loss=[3.0, 2.0], aux_loss=[0.1, 0.1], eval_step=[2],
                   val_loss=[2.5], tokens_per_expert=[[[1.0, 3.0], [2.0, 2.0]]])  # fmt: skip
    _, axl = plot_lm_training(log.as_dict()).axes
    np.testing.assert_allclose([bar.get_height() for bar in axl.patches], [0.25, 0.75])


def test_lm_training_without_loads_leaves_the_load_panel_empty():
    log = {"step": [1], "train_loss": [3.0], "eval_step": [1], "val_loss": [3.1]}
    _, axl = plot_lm_training(log).axes
    assert not axl.patches and not axl.get_lines()


@pytest.fixture(scope="module")
def tree():
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, (300, 2))
    y = np.where(X[:, 0] > 0, 1 + X[:, 1], -1 - X[:, 1]) + 0.1 * rng.normal(size=300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a leaf may collapse on so simple a problem
        model = HierarchicalMoERegressor(2, n_init=1, random_state=0).fit(X, y)
    return model, X


def test_hme_tree_stacks_each_levels_node_probabilities(tree):
    model, X = tree
    fig = plot_hme_tree(model, X, feature=0, title="tree", xlabel="x0")
    top, leaves = fig.axes
    assert top.get_title() == "tree" and leaves.get_xlabel() == "x0"
    assert _labels(top) == ["node 0", "node 1"]
    assert _labels(leaves) == ["leaf 0 (0.0)", "leaf 1 (0.1)", "leaf 2 (1.0)", "leaf 3 (1.1)"]
    assert [len(ax.collections) for ax in (top, leaves)] == [2, 4]
    # the stacks fill [0, 1]: the last band's upper edge is 1 everywhere
    upper = leaves.collections[-1].get_paths()[0].vertices[:, 1]
    assert upper.max() == pytest.approx(1.0) and upper.min() > 0


def test_hme_tree_names_a_feature_that_is_not_a_column(tree):
    model, X = tree
    with pytest.raises(ValueError, match=r"feature must be a column of X in \[0, 2\); got 2"):
        plot_hme_tree(model, X, feature=2)
