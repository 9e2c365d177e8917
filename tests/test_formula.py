"""Wilkinson formulas: designs, their learnt state, model files, and safety."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from moekit import MoERegressor, load
from moekit.formula import FormulaError, ModelFormula, check_term, fit_formula


def _frame(n=200, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, n)
    g = rng.choice(["lo", "mid", "hi"], n)
    z = rng.normal(size=n)
    shift = pd.Series(g).map({"lo": -1.0, "mid": 0.0, "hi": 2.0}).to_numpy()
    y = np.where(z > 0, 1 + 2 * x, -1 - x**2) + shift + 0.3 * rng.normal(size=n)
    return pd.DataFrame({"y": y, "x": x, "g": g, "z": z})


def test_the_design_is_what_the_formula_says():
    frame = _frame()
    f = ModelFormula("y ~ x + I(x**2) + C(g)", gate_formula="~ z").fit(frame)
    X = f.transform(frame)
    assert f.expert_columns == ["x", "I(x ** 2)", "C(g)[T.lo]", "C(g)[T.mid]"]
    assert f.gate_columns == ["z"] and list(X.columns) == [*f.expert_columns, "z"]
    np.testing.assert_array_equal(X["I(x ** 2)"], frame.x**2)
    np.testing.assert_array_equal(X["C(g)[T.mid]"], (frame.g == "mid").astype(float))
    assert f.variables == {"y", "x", "g", "z"}
    np.testing.assert_array_equal(f.response_values(frame), frame.y)


def test_a_formula_fit_equals_the_fit_on_the_hand_built_design():
    frame = _frame()
    m = fit_formula(MoERegressor(n_experts=2, n_init=3, random_state=0),
                    "y ~ x + I(x**2)", frame, gate_formula="~ z")  # fmt: skip
    X = pd.DataFrame({"x": frame.x, "x2": frame.x**2, "z": frame.z})
    ref = MoERegressor(n_experts=2, n_init=3, random_state=0, expert_features=["x", "x2"],
                       gate_features=["z"]).fit(X, frame.y)  # fmt: skip
    assert m.log_likelihood_ == pytest.approx(ref.log_likelihood_, abs=1e-9)
    assert list(m.expert_features) == ["x", "I(x ** 2)"] and list(m.gate_features) == ["z"]


def test_levels_and_centres_learnt_on_fitting_apply_to_new_data(tmp_path):
    frame = _frame()
    m = fit_formula(MoERegressor(n_experts=2, n_init=2, random_state=0),
                    "y ~ center(x) + C(g)", frame, gate_formula="~ z")  # fmt: skip
    m.save(tmp_path / "m.moe")
    back = load(tmp_path / "m.moe")
    # new rows: one level only, in another order, and x far from the training mean
    new = pd.DataFrame({"x": [5.0, 6.0], "g": ["mid", "mid"], "z": [0.1, -0.1], "y": [0.0, 0.0]})
    Xn = back.formula_.transform(new)
    assert list(Xn.columns) == list(m.formula_.columns)
    np.testing.assert_allclose(Xn["center(x)"], new.x - frame.x.mean())
    np.testing.assert_array_equal(Xn["C(g)[T.mid]"], [1.0, 1.0])
    np.testing.assert_allclose(back.predict(Xn), m.predict(m.formula_.transform(new)))


def test_a_level_not_seen_in_fitting_or_a_missing_value_is_named():
    f = ModelFormula("y ~ x + C(g)").fit(_frame())
    with pytest.raises(ValueError, match="not seen in original dataset"):
        f.transform(pd.DataFrame({"x": [0.0], "g": ["new"]}))
    with pytest.raises(ValueError, match="column 'x' has a missing value in row 2"):
        f.transform(pd.DataFrame({"x": [0.0, np.nan], "g": ["lo", "lo"]}))


def test_a_constant_gate_formula_fits_a_mixture_of_regressions():
    m = fit_formula(MoERegressor(n_experts=2, n_init=2, random_state=0), "y ~ x", _frame(),
                    gate_formula="~ 1")  # fmt: skip
    assert m.gate == "constant" and m.formula_.columns == ["x"]


@pytest.mark.parametrize(
    "formula, message",
    [
        ("y ~ xx", "'xx' is not a column of the data; did you mean 'x'"),
        ("y ~ x - 1", "every expert and gate has an intercept"),
        ("y ~ 1", "no regressor"),
        ("y ~ foo(x)", "calls foo()"),
        ("y ~ I(x[0])", "Subscript"),
        ("y ~ I(__import__)", "'__import__'"),
        ("y ~ {os.system('true')}", "'os.system'"),
        ("y ~ I((lambda: x)())", "not a named function"),
        ("y ~ x +", "cannot read"),
        ("~ x", "one target on the left"),
    ],
)
def test_formulas_that_cannot_be_used_are_refused_before_anything_runs(formula, message):
    with pytest.raises(FormulaError, match=re.escape(message)):
        ModelFormula(formula).fit(_frame())


def test_check_term_allows_arithmetic_numpy_and_transforms():
    for term in ("I(x ** 2)", "np.log(x + 1)", "bs(x, df=4)", "C(g, Treatment('mid'))", "x > 0"):
        check_term(term, {"x", "g"})
    with pytest.raises(FormulaError, match=re.escape("np.<function>")):
        check_term("np.load('f')", {"x"})


def test_a_model_file_whose_formula_would_run_code_is_refused(tmp_path):
    """Loading never runs code: a tampered formula is refused before any evaluation."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    m = fit_formula(MoERegressor(n_experts=2, n_init=1, random_state=0), "y ~ x", _frame())
    m.save(tmp_path / "m.moe")
    with safe_open(str(tmp_path / "m.moe"), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    for bad in ("y ~ I(__import__('os').system('touch pwned'))", "y ~ {open('f').read()}"):
        state = json.loads(meta["state"])
        state["formula"]["formula"] = bad
        save_file(tensors, str(tmp_path / "bad.moe"), {**meta, "state": json.dumps(state)})
        with pytest.raises(ValueError, match="formula"):
            load(tmp_path / "bad.moe")
    assert not (tmp_path / "pwned").exists()
    # a formula that is safe but not the one whose state is stored
    state = json.loads(meta["state"])
    state["formula"]["formula"] = "y ~ z"
    save_file(tensors, str(tmp_path / "other.moe"), {**meta, "state": json.dumps(state)})
    with pytest.raises(ValueError, match="another formula"):
        load(tmp_path / "other.moe")


def test_a_fresh_fit_on_other_columns_forgets_the_formula():
    frame = _frame()
    m = fit_formula(MoERegressor(n_experts=2, n_init=1, random_state=0), "y ~ x", frame)
    m.fit(frame[["x", "z"]], frame.y)
    assert not hasattr(m, "formula_")
