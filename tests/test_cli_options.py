"""``moekit fit``: every option its ``--help`` lists runs to a report; the choices it
makes for the user (the task, K) are said; ``inspect`` prints the model's numbers."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from moekit import load
from moekit.cli import build_parser, main


def _choices(flag: str) -> list[str]:
    """The choices ``moekit fit --help`` lists for ``flag``, read from the parser itself."""
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    fit = sub.choices["fit"]
    return list(next(a for a in fit._actions if flag in a.option_strings).choices)


def _counts(n=120, seed=0) -> pd.DataFrame:
    """Counts (valid for every expert family) that depend on x, in two regimes set by z."""
    rng = np.random.default_rng(seed)
    x, z = rng.uniform(0, 2, n), rng.normal(size=n)
    rate = np.exp(np.where(z > 0, 0.5 + x, 2.0 - 0.5 * x))
    return pd.DataFrame({"x": x, "z": z, "y": rng.poisson(rate)})


def _target_flags(expert: str, n=120, seed=0) -> tuple[pd.DataFrame, list[str]]:
    """Data the family can model and its --target flags: counts, their positive shift
    for Gamma, lognormal and Weibull experts, successes and failures for binomial ones."""
    frame = _counts(n, seed)
    if expert in ("gamma", "lognormal", "weibull"):
        return frame.assign(y=frame.y + 0.5), ["--target", "y"]
    if expert == "binomial":
        s = np.minimum(frame.y, 12)
        return frame.assign(s=s, f=12 - s).drop(columns="y"), ["--target", "s,f"]
    return frame, ["--target", "y"]


def _fit(tmp_path, frame, *flags) -> int:
    frame.to_csv(tmp_path / "data.csv", index=False)
    return main(["fit", str(tmp_path / "data.csv"), *flags, "--out", str(tmp_path / "out"),
                 "--n-init", "1", "--verbose", "0"])  # fmt: skip


EXPERTS, GATES = _choices("--expert"), _choices("--gate")


def test_the_help_lists_the_families_the_test_runs():
    assert {"linear", "poisson", "student_t", "mlp", "binomial", "gamma", "lognormal",
            "weibull", "negative_binomial"} <= set(EXPERTS)  # fmt: skip
    assert {"softmax", "constant", "mlp"} <= set(GATES)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("expert", EXPERTS)
def test_every_expert_and_gate_in_the_help_runs_to_a_report(tmp_path, capsys, expert, gate):
    frame, target = _target_flags(expert)
    flags = [*target, "--experts", "2", "--expert", expert, "--gate", gate, "--max-iter", "20"]
    assert _fit(tmp_path, frame, *flags) == 0, capsys.readouterr().err
    page = (tmp_path / "out" / "report.html").read_text()
    model = load(tmp_path / "out" / "model.moe")
    assert model.expert == expert and model.gate == gate and model.max_iter == 20
    assert re.findall(r'<h2 id="(\w+)"', page)[-2:] == ["coefficients", "sizes"]
    if "mlp" in (expert, gate):  # no coefficients: the report says why, not a traceback
        assert "No coefficient table: summary() reports" in page and "std_error" not in page
        assert "No coefficient table" in capsys.readouterr().out
    else:
        assert "std_error" in page


def test_a_warning_names_the_commands_flags(tmp_path, capsys):
    assert _fit(tmp_path, _counts(), "--target", "y", "--experts", "3", "--max-iter", "2") == 0
    err = capsys.readouterr().err
    assert "did not converge" in err and "--max-iter" in err and "(--n-init)" in err
    assert "max_iter" not in err.replace("max_iter=2", "")  # the advice names the flag
    assert load(tmp_path / "out" / "model.moe").max_iter == 2


def test_a_numeric_target_of_two_values_is_a_classification(tmp_path, capsys):
    t = _counts().assign(y=lambda d: (d.z > 0).astype(int))
    assert _fit(tmp_path, t, "--target", "y", "--experts", "2") == 0
    out = capsys.readouterr().out
    assert "the target 'y' takes two values (0, 1): fitted as a classification" in out
    model = load(tmp_path / "out" / "model.moe")
    assert model.classes_.tolist() == [0, 1]
    assert _fit(tmp_path, t, "--target", "y", "--experts", "2", "--task", "regression") == 0
    assert "takes two values" not in capsys.readouterr().out
    assert not hasattr(load(tmp_path / "out" / "model.moe"), "classes_")
    # another family than the classifier's asks for --task regression, in one line
    assert _fit(tmp_path, t, "--target", "y", "--expert", "poisson") == 2
    assert "--task regression fits a numeric target as numbers" in capsys.readouterr().err


def test_k_is_chosen_by_bic_over_one_to_four_by_default(tmp_path, capsys):
    assert _fit(tmp_path, _counts(), "--target", "y", "--features", "x",
                "--gate-features", "z") == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "choosing K in 1-4 by BIC (the default; --experts K fixes it)" in out
    table = pd.read_csv(tmp_path / "out" / "criterion.csv")
    assert table.n_experts.tolist() == [1, 2, 3, 4]
    model = load(tmp_path / "out" / "model.moe")
    assert model.n_experts == table.n_experts[table.bic.idxmin()]
    # a table too small for four experts tries what its rows carry
    assert _fit(tmp_path, _counts(5), "--target", "y") == 0
    assert "choosing K in 1-2 by BIC" in capsys.readouterr().out


def test_the_headline_compares_with_one_expert(tmp_path, capsys):
    # noise alone: five experts cannot predict held-out rows better than one (with one
    # start, none of them falls under min_share: the model keeps all five)
    rng = np.random.default_rng(3)
    t = pd.DataFrame({"x": rng.normal(size=60), "y": rng.standard_t(3, size=60)})
    assert _fit(tmp_path, t, "--target", "y", "--experts", "5") == 0
    out = capsys.readouterr().out
    model = load(tmp_path / "out" / "model.moe")
    page = (tmp_path / "out" / "report.html").read_text()
    assert "held-out log-likelihood per row:" in out and "(one expert: " in out
    assert re.search(r"held-out 90% intervals cover [0-9.]+% of 12 rows \(95% interval", out)
    said = re.search(r"warning: (On 12 held-out rows this mixture of 5 experts does worse .*)", out)
    assert said and said.group(1) in page  # the report's headline says it too
    assert '<p class="warning">On 12 held-out rows' in page
    assert model.n_experts == 5 and "one expert (12 held-out rows)" in page


def test_inspect_prints_shares_and_the_models_formula(tmp_path, capsys):
    flags = ["--target", "y", "--features", "x", "--gate-features", "z", "--experts", "2",
             "--expert", "poisson"]  # fmt: skip
    assert _fit(tmp_path, _counts(200), *flags) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "out" / "model.moe")]) == 0
    out = capsys.readouterr().out
    model = load(tmp_path / "out" / "model.moe")
    shares = [float(v) for v in re.search(r"shares of the data: (.*) \(", out).group(1).split(",")]
    assert sum(shares) == pytest.approx(1.0, abs=2e-3)
    np.testing.assert_allclose(shares, model.expert_sizes_ / model.expert_sizes_.sum(), atol=1e-3)
    for k in range(2):  # the gate's slope on z, as the model holds it
        slope = re.search(rf"s_{k}\(x\) = \S+ ([+-]) (\S+)·z", out)
        value = float(slope.group(2)) * (-1 if slope.group(1) == "-" else 1)
        assert value == pytest.approx(model.gate_coef_[k, 1], rel=1e-3)


def test_binomial_takes_successes_and_failures_as_two_target_columns(tmp_path, capsys):
    frame, _ = _target_flags("binomial")
    for target in (["--target", "s,f"], ["--target", "s", "--target", "f"]):
        flags = [*target, "--features", "x", "--experts", "2", "--expert", "binomial"]
        assert _fit(tmp_path, frame, *flags) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        assert "regression of 'cbind(s, f)' on x" in out
        model = load(tmp_path / "out" / "model.moe")
        X = frame[["x"]]
        pi = model.predict(X)  # the probability of success of one trial
        assert pi.shape == (len(frame),) and ((pi > 0) & (pi < 1)).all()
        page = (tmp_path / "out" / "report.html").read_text()
        assert "Observed against expected proportions" in page


@pytest.mark.parametrize(("flags", "message"), [
    (["--target", "s", "--expert", "binomial"],
     "--expert binomial takes two --target columns, successes and failures"),
    # two columns are several responses of linear experts (the default) now; of another
    # family, neither those nor successes and failures: one line naming both meanings
    (["--target", "s,f", "--expert", "poisson"],
     "several --target columns (s, f) are the responses of linear experts (or the successes "
     "and failures of --expert binomial)"),
    (["--formula", "s ~ x", "--expert", "binomial"],
     "--expert binomial takes its successes and failures from --target s,f"),
    (["--target", "s,g", "--expert", "binomial"], "--target 'g' is not a column"),
])  # fmt: skip
def test_binomial_targets_that_do_not_fit_are_one_line_errors(tmp_path, capsys, flags, message):
    frame, _ = _target_flags("binomial")
    assert _fit(tmp_path, frame, *flags) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
