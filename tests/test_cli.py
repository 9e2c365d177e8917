"""The ``moekit`` command: demo, fit and predict on files."""

import ast
import os
import re

import numpy as np
import pandas as pd
import pytest

from moekit import load
from moekit.cli import main
from moekit.datasets import make_moe_regression


def test_demo_writes_its_report(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--n-init", "2"]) == 0
    out, err = capsys.readouterr()
    assert "feature names" not in err
    assert "BIC picks K =" in out and "std_error" in out and "gate: expert 1 vs 0" in out
    for name in ("mcycle_fit.png", "mcycle_bic.png", "mcycle.moe", "mcycle_bic.csv"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "mcycle_fit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = load(tmp_path / "mcycle.moe")
    assert model.n_features_in_ == 1
    # the tour: three chapters in one page, each with its own sections
    page = (tmp_path / "report.html").read_text()
    chapters = re.findall(r'<h2 id="(\w+)" class="chapter"', page)
    assert chapters == ["mcycle", "digits", "bishop"]
    sections = re.findall(r'<h3 id="(\w+)"', page)
    assert sections[:3] == ["mcycle_summary", "mcycle_formula", "mcycle_fit"]
    assert {"mcycle_criterion", "digits_coverage", "digits_division", "bishop_density",
            "bishop_coverage"} <= set(sections)  # fmt: skip
    assert page.count("<img") >= 10 and page.count("data:image/png;base64,") == page.count("<img")
    assert load(tmp_path / "digits.moe").classes_.tolist() == list(range(10))
    assert load(tmp_path / "bishop_mdn.moe").n_components == 3
    assert "held-out accuracy" in out and "held-out log-likelihood" in out


def test_fit_then_predict_round_trip(tmp_path, capsys):
    X, y, _ = make_moe_regression(400, n_features=2, random_state=0)
    pd.DataFrame({"a": X[:, 0], "b": X[:, 1], "target": y}).to_csv(tmp_path / "d.csv", index=False)
    assert (
        main(
            [
                "fit",
                str(tmp_path / "d.csv"),
                "--target",
                "target",
                "--experts",
                "3",
                "--out",
                str(tmp_path / "fit"),
            ]
        )
        == 0
    )
    assert "log-likelihood per row (fitted rows): " in (tmp_path / "fit" / "report.txt").read_text()
    assert (
        main(
            [
                "predict",
                str(tmp_path / "fit" / "model.moe"),
                str(tmp_path / "d.csv"),
                "--out",
                str(tmp_path / "pred.csv"),
            ]
        )
        == 0
    )
    pred = pd.read_csv(tmp_path / "pred.csv")
    assert list(pred.columns) == ["mean", "std", "q05", "q95", "expert"]
    model = load(tmp_path / "fit" / "model.moe")
    np.testing.assert_allclose(pred["mean"], model.predict(pd.DataFrame(X, columns=["a", "b"])))
    assert (pred["q05"] < pred["mean"]).all() and (pred["mean"] < pred["q95"]).all()


def test_classification_is_detected_from_the_target(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 2))
    frame = pd.DataFrame({"u": X[:, 0], "v": X[:, 1], "label": np.where(X[:, 0] > 0, "a", "b")})
    frame.to_csv(tmp_path / "c.csv", index=False)
    assert (
        main(
            [
                "fit",
                str(tmp_path / "c.csv"),
                "--target",
                "label",
                "--experts",
                "2",
                "--out",
                str(tmp_path / "f"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "predict",
                str(tmp_path / "f" / "model.moe"),
                str(tmp_path / "c.csv"),
                "--out",
                str(tmp_path / "p.csv"),
            ]
        )
        == 0
    )
    assert {"prediction", "p[a]", "p[b]"} <= set(pd.read_csv(tmp_path / "p.csv").columns)


def test_bad_target_and_bad_model_file_are_clear(tmp_path, capsys):
    pd.DataFrame({"a": [1.0, 2.0]}).to_csv(tmp_path / "d.csv", index=False)
    assert main(["fit", str(tmp_path / "d.csv"), "--target", "y"]) == 2
    assert "--target 'y' is not a column" in capsys.readouterr().err
    (tmp_path / "junk.moe").write_text("junk")
    assert main(["predict", str(tmp_path / "junk.moe"), str(tmp_path / "d.csv")]) == 1
    assert "not a readable moekit model file" in capsys.readouterr().err


# ------------------------------------------------------------------ moekit lm


@pytest.fixture
def one_thread():
    """The language model's matrices are tiny: a second thread only adds waiting."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_lm_train_tiny_then_generate_from_the_checkpoint(tmp_path, capsys, one_thread):
    out = tmp_path / "lm"
    assert main(["lm", "train", "--config", "tiny", "--steps", "20", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Jane Austen" in text and "Held-out loss" in text and "auxiliary loss" in text
    for name in ("checkpoint.safetensors", "lm.moe", "lm_training.png"):
        assert (out / name).stat().st_size > 1000
    assert (out / "lm_training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = []
    for source in ("checkpoint.safetensors", "lm.moe"):
        args = ["lm", "generate", str(out / source), "--prompt", "It is a tr", "--tokens", "12"]
        assert main([*args, "--temperature", "0"]) == 0
        samples.append(capsys.readouterr().out)
    assert samples[0] == samples[1] and samples[0].startswith("It is a tr")
    args = ["lm", "generate", str(out / "lm.moe"), "--prompt", "é", "--tokens", "5"]
    assert main([*args, "--top-k", "3", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("é")


def test_lm_resume_needs_a_checkpoint_and_keeps_its_settings(tmp_path, capsys):
    assert main(["lm", "train", "--resume", "--out", str(tmp_path)]) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err
    assert main(["lm", "train", "--resume", "--lr", "0.1", "--out", str(tmp_path)]) == 2
    assert "drop --lr" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tokens", "-1"], "--tokens must be a non-negative int"),
        (["--temperature", "nan"], "--temperature must be a finite number"),
        (["--top-k", "0"], "--top-k must be a positive int"),
        (["--prompt", ""], "--prompt must not be empty"),
    ],
)
def test_lm_generate_checks_its_settings(tmp_path, capsys, flags, message):
    assert main(["lm", "generate", str(tmp_path / "absent.moe"), "--prompt", "a", *flags]) == 2
    assert message in capsys.readouterr().err


def test_lm_train_checks_its_settings_before_writing(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["lm", "train", "--top-k", "9", "--out", str(out)]) == 2
    assert "top_k" in capsys.readouterr().err and not out.exists()


def test_lm_generate_refuses_a_model_that_is_not_a_language_model(tmp_path, capsys):
    X = np.random.default_rng(0).normal(size=(40, 1))
    from moekit import MoERegressor

    MoERegressor(2, random_state=0).fit(X, X[:, 0]).save(tmp_path / "r.moe")
    assert main(["lm", "generate", str(tmp_path / "r.moe"), "--prompt", "a"]) == 2
    assert "not a valid language model" in capsys.readouterr().err


def test_a_language_model_checkpoint_given_to_predict_gets_one_clear_line(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    ckpt = tmp_path / "checkpoint.safetensors"
    save_file({"model.w": torch.zeros(2)}, str(ckpt), metadata={"moekit_checkpoint": "1"})
    data = tmp_path / "x.csv"
    data.write_text("x\n1\n")
    assert main(["predict", str(ckpt), str(data)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "language-model checkpoint" in err[0] and "lm generate" in err[0]


def test_the_command_starts_without_pandas_or_torch():
    import subprocess
    import sys

    heavy = "{'pandas', 'torch', 'sklearn'}"
    code = f"import sys, moekit.cli; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _modules_after(tmp_path, code: str) -> list[str]:
    """Which of the heavy libraries a fresh interpreter holds after running ``code``."""
    import subprocess
    import sys

    heavy = ("matplotlib", "pandas", "torch", "sklearn", "moekit.report.sections")
    script = tmp_path / "run.py"
    report = f"print(sorted(m for m in {heavy} if m in sys.modules))"
    script.write_text(f"import sys\n{code}\n{report}\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         check=True)  # fmt: skip
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])


def test_fit_and_its_help_start_without_the_heavy_libraries(tmp_path):
    code = ("import moekit.cli.fit\nfrom moekit.cli import main\n"
            "try:\n    main(['fit', '--help'])\n"
            "except SystemExit as e:\n    assert e.code == 0")  # fmt: skip
    assert _modules_after(tmp_path, code) == []


@pytest.mark.parametrize("flags, drawn", [(["--no-report"], False), ([], True)])
def test_a_fit_without_its_report_never_loads_matplotlib(tmp_path, flags, drawn):
    _table().to_csv(tmp_path / "data.csv", index=False)
    out = tmp_path / "out"
    argv = ["fit", str(tmp_path / "data.csv"), "--target", "y", "--features", "x", "--experts", "2",
            "--n-init", "1", "--out", str(out), *flags]  # fmt: skip
    loaded = _modules_after(tmp_path, f"from moekit.cli import main\nassert main({argv!r}) == 0")
    # the fit needs pandas, torch and scikit-learn either way; the report alone draws
    assert {"pandas", "torch", "sklearn"} <= set(loaded)
    assert ("matplotlib" in loaded) is drawn and ("moekit.report.sections" in loaded) is drawn
    assert (out / "model.moe").is_file() and "log-likelihood" in (out / "report.txt").read_text()
    assert (out / "report.html").is_file() is drawn and (out / "fit.png").is_file() is drawn


@pytest.mark.parametrize("serial_rows, during", [(10_000, 1), (10, 2)])
def test_a_small_table_is_fitted_on_one_thread_and_the_setting_restored(
    tmp_path, monkeypatch, serial_rows, during
):
    import torch

    import moekit.cli.fit as command

    seen, fit_models = [], command.fit_models

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return fit_models(*args, **kwargs)

    monkeypatch.setattr(command, "fit_models", spy)
    monkeypatch.setattr(command, "SERIAL_ROWS", serial_rows)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert _fit_cli(tmp_path, _table(), "--target", "y", "--experts", "2", "--no-report") == 0
        assert seen == [during]  # 60 rows: one thread, unless the limit is below them
        assert torch.get_num_threads() == 2  # the caller's setting, back
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("subcommand, quick", [("fit", True), ("inspect", False)])
def test_the_program_ends_at_once_after_a_fit_with_its_files_and_output_whole(
    tmp_path, subcommand, quick
):
    import subprocess
    import sys

    _table().to_csv(tmp_path / "data.csv", index=False)
    out = tmp_path / "out"
    if subcommand == "inspect":
        assert _fit_cli(tmp_path, _table(), "--target", "y", "--experts", "2") == 0
    argv = (["fit", str(tmp_path / "data.csv"), "--target", "y", "--features", "x", "--experts",
             "2", "--n-init", "1", "--out", str(out)] if subcommand == "fit"
            else ["inspect", str(out / "model.moe")])  # fmt: skip
    # an exit handler runs only where Python tears the process down as usual
    code = ("import atexit, sys\natexit.register(print, 'torn down')\n"
            f"sys.argv = ['moekit', *{argv!r}]\n"
            "from moekit.cli import command\ncommand()")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # output buffered
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert ("torn down" in lines) is not quick
    # the output is whole (flushed before the quick exit): the command's last line is there
    last = [line for line in lines if line != "torn down"][-1]
    assert last.startswith("Wrote" if quick else "  ")
    page = (out / "report.html").read_text()
    assert page.rstrip().endswith("</html>") and len(load(out / "model.moe").expert_sizes_) == 2
    missing = subprocess.run([sys.executable, "-m", "moekit.cli", "fit", str(tmp_path / "no.csv"),
                              "--target", "y"], capture_output=True, text=True)  # fmt: skip
    assert missing.returncode == 1 and "no such file" in missing.stderr


def test_a_fresh_command_reads_a_model_file(tmp_path):
    # no estimator imported beforehand: the file's class is found by loading alone
    import subprocess
    import sys

    assert _fit_cli(tmp_path, _table(), "--target", "y", "--experts", "2", "--no-report") == 0
    model = str(tmp_path / "out" / "model.moe")
    out = subprocess.run([sys.executable, "-m", "moekit.cli", "inspect", model],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "a fitted MoERegressor" in out.stdout and "n_experts: 2" in out.stdout


def _fit_cli(tmp_path, frame, *flags):
    path = tmp_path / "data.csv"
    if isinstance(frame, str):
        path.write_text(frame)
    else:
        frame.to_csv(path, index=False)
    return main(["fit", str(path), *flags, "--out", str(tmp_path / "out"), "--n-init", "1"])


def _table(n=60, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    return pd.DataFrame({"x": x, "z": rng.normal(size=n), "y": 2 * x + rng.normal(size=n)})


@pytest.mark.parametrize(
    "make, flags, status, message",
    [
        (lambda t: t, ["--target", "yy"], 2, "did you mean 'y'"),
        (lambda t: "", ["--target", "y"], 1, "is empty"),
        (lambda t: "x,y\n", ["--target", "y"], 1, "no rows"),
        (lambda t: t.assign(z=t.z.astype(str).where(t.index != 7, "6,5")), ["--target", "y"], 1,
         "column 'z' is numeric but row 8 (line 9"),
        (lambda t: t.assign(y=3.0), ["--target", "y"], 1, "is constant"),
        (lambda t: t.head(5), ["--target", "y", "--experts", "3"], 1, "too few for 3 experts"),
        (lambda t: t.assign(y=[f"w{i}" for i in range(len(t))]), ["--target", "y"], 1,
         "60 distinct values"),
        (lambda t: t.assign(z=t.z.where(t.index != 4)), ["--target", "y"], 1,
         "the feature 'z' is missing in row 5"),
        (lambda t: t.assign(x=t.x.where(t.index != 9, np.inf)), ["--target", "y"], 1,
         "the feature 'x' holds inf in row 10"),
    ],
)  # fmt: skip
def test_errors_a_person_meets_are_one_line_with_their_status(
    tmp_path, capsys, make, flags, status, message
):
    assert _fit_cli(tmp_path, make(_table()), *flags) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_a_missing_file_is_named(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "absent.csv"), "--target", "y"]) == 1
    assert "no such file" in capsys.readouterr().err


def test_counts_are_a_regression_and_every_column_is_accounted_for(tmp_path, capsys):
    t = _table().assign(y=lambda d: np.round(np.exp(d.x)).astype(int), name="a")
    assert _fit_cli(tmp_path, t, "--target", "y", "--experts", "2") == 0
    out = capsys.readouterr().out
    assert "regression of 'y' on x, z" in out and "not used: name" in out


def test_classic_models_are_expressible(tmp_path, capsys):
    """A Poisson mixture with a concomitant gate on another column, as flexmix fits it."""
    rng = np.random.default_rng(1)
    n = 400
    x, z = rng.uniform(0, 2, n), rng.normal(size=n)
    k = (z > 0).astype(int)
    y = rng.poisson(np.exp(np.where(k == 1, 0.5 + 1.0 * x, 2.0 - 0.5 * x)))
    t = pd.DataFrame({"x": x, "z": z, "y": y, "other": rng.normal(size=n)})
    flags = ["--target", "y", "--features", "x", "--gate-features", "z",
             "--expert", "poisson", "--experts", "2"]  # fmt: skip
    assert _fit_cli(tmp_path, t, *flags) == 0
    out = capsys.readouterr().out
    assert "the gate sees z" in out and "not used: other" in out
    m = load(tmp_path / "out" / "model.moe")
    assert m.expert == "poisson" and list(m.feature_names_in_) == ["x", "z"]
    assert list(m.gate_features) == ["z"] and list(m.expert_features) == ["x"]
    # the gate splits on z, where the regimes were drawn
    assert abs(np.corrcoef(m.gate_weights(t[["x", "z"]])[:, 0], z)[0, 1]) > 0.8


def test_k_chosen_over_a_range_with_a_constant_gate(tmp_path, capsys):
    X, y, _ = make_moe_regression(300, n_features=1, n_experts=2, random_state=0)
    t = pd.DataFrame({"x": X[:, 0], "y": y})
    assert _fit_cli(tmp_path, t, "--target", "y", "--experts", "1-3", "--gate", "constant") == 0
    assert "BIC picks K = " in capsys.readouterr().out
    for figure in ("bic.png", "fit.png"):  # the report's figures, also as files
        assert (tmp_path / "out" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(pd.read_csv(tmp_path / "out" / "criterion.csv")) == 3
    assert load(tmp_path / "out" / "model.moe").gate == "constant"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--features", "x,nope"], "'nope' is not a feature column"),
        (["--experts", "0"], "positive numbers of experts"),
        (["--experts", "a-b"], "expected K or a range"),
    ],
)
def test_bad_model_options_are_usage_errors(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as stop:
        status = _fit_cli(tmp_path, _table(), "--target", "y", *flags)
        raise SystemExit(status)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def _report_sections(page: str) -> list[str]:
    import re

    return re.findall(r'<h2 id="(\w+)"', page)


def test_fit_writes_a_self_contained_report(tmp_path, capsys):
    import base64
    import re

    X, y, _ = make_moe_regression(300, n_features=3, n_experts=2, random_state=0)
    t = pd.DataFrame({"a": X[:, 0], "b": X[:, 1], "c": X[:, 2], "y": y})
    assert _fit_cli(tmp_path, t, "--target", "y", "--experts", "1-3") == 0
    assert "60 random rows held out" in capsys.readouterr().out
    page = (tmp_path / "out" / "report.html").read_text()
    assert _report_sections(page) == [
        "summary",
        "formula",
        "fit",
        "gate",
        "coverage",
        "convergence",
        "criterion",
        "coefficients",
        "sizes",
    ]
    assert "60 held-out rows" in page and 'src="http' not in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 5  # fit, gate, convergence, criterion, sizes: every one a PNG
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)


@pytest.mark.slow
def test_report_renders_in_a_headless_browser(tmp_path, capsys):
    """Every section and image loads in Chromium (Debian's package), and the page the
    browser shows holds the gate that `moekit inspect` prints and the model file holds;
    skipped without Chromium."""
    import html
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    X, y, _ = make_moe_regression(200, n_features=1, n_experts=2, random_state=0)
    rng = np.random.default_rng(0)
    z = rng.normal(size=200)
    t = pd.DataFrame({"z": z, "x": X[:, 0], "y": np.where(z > 0, y, -y)})
    flags = ["--formula", "y ~ x", "--gate-formula", "~ z", "--experts", "2"]
    assert _fit_cli(tmp_path, t, *flags) == 0
    page = tmp_path / "out" / "report.html"
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert _report_sections(dom) == _report_sections(page.read_text())
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "out" / "model.moe")]) == 0
    inspected = capsys.readouterr().out
    model = load(tmp_path / "out" / "model.moe")
    shown = html.unescape(dom)
    z_col = list(model.feature_names_in_).index("z")
    for k in range(2):
        line = re.search(rf"s_{k}\(x\) = [^\n]*", inspected).group(0)
        assert line in shown  # the browser shows the line inspect prints
        sign, value = re.search(r"([+-]) (\S+)·z", line).groups()
        slope = float(value) * (-1 if sign == "-" else 1)
        assert slope == pytest.approx(model.gate_coef_[k, z_col], rel=1e-3)
        assert abs(slope) > 0.1  # the gate's real slope, not the 0 of a mispaired column
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                    f"--screenshot={shot}", "--window-size=1000,3000", page.as_uri()],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    assert shot.stat().st_size > 10_000


def test_predict_intervals_samples_and_experts_then_inspect(tmp_path, capsys):
    X, y, _ = make_moe_regression(200, n_features=1, n_experts=2, random_state=0)
    t = pd.DataFrame({"x": X[:, 0], "y": y})
    assert _fit_cli(tmp_path, t, "--target", "y", "--experts", "2") == 0
    model, data, out = tmp_path / "out" / "model.moe", tmp_path / "data.csv", tmp_path / "p.csv"
    flags = ["--interval", "0.5", "--samples", "3", "--out", str(out)]
    assert main(["predict", str(model), str(data), *flags]) == 0
    pred = pd.read_csv(out)
    assert list(pred.columns) == ["mean", "std", "q25", "q75", "sample_0", "sample_1",
                                  "sample_2", "expert"]  # fmt: skip
    assert set(pred["expert"]) <= {0, 1} and (pred["q25"] < pred["q75"]).all()
    inside = (pred[["sample_0", "sample_1", "sample_2"]].to_numpy() >= pred[["q25"]].to_numpy()) & (
        pred[["sample_0", "sample_1", "sample_2"]].to_numpy() <= pred[["q75"]].to_numpy()
    )
    assert 0.3 < inside.mean() < 0.7  # half the draws fall in the central 50% interval
    capsys.readouterr()
    assert main(["inspect", str(model)]) == 0
    said = capsys.readouterr().out
    assert "a fitted MoERegressor" in said and "n_experts: 2" in said and "features (1): x" in said
    assert main(["predict", str(model), str(data), "--interval", "1.5"]) == 2


def _grouped(n=120, seed=0):
    t = _table(n, seed)
    return t.assign(group=np.where(np.arange(n) % 3 == 0, "a", "b"))


@pytest.mark.parametrize(
    "make, flags, status, message",
    [
        (_grouped, ["--formula", "y ~ xx"], 2, "--formula: 'xx' is not a column of the data; "
         "did you mean 'x'?"),
        (_grouped, ["--formula", "y ~ x", "--gate-formula", "~ open('f')"], 2,
         "--gate-formula: the term \"open('f')\" calls open()"),
        (_grouped, ["--formula", "y ~ x +"], 2, "--formula: cannot read"),
        (_grouped, ["--formula", "y ~ x", "--target", "y"], 2, "not both"),
        (_grouped, [], 2, "give either --target COL or --formula"),
        (_grouped, ["--gate-formula", "~ z", "--target", "y"], 2, "goes with --formula"),
        (lambda: _grouped().assign(z=lambda t: t.z.where(t.index != 4)),
         ["--formula", "y ~ x", "--gate-formula", "~ z"], 1,
         "column 'z' has a missing value in row 5"),
        (lambda: _grouped().assign(y=2.0), ["--formula", "y ~ x"], 1, "is constant"),
    ],
)  # fmt: skip
def test_formula_errors_are_one_line_with_their_status(tmp_path, capsys, make, flags, status,
                                                       message):  # fmt: skip
    assert _fit_cli(tmp_path, make(), *flags) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_formula_fit_predicts_new_rows_through_its_formula(tmp_path, capsys):
    t = _grouped(150)
    flags = ["--formula", "y ~ x + I(x**2) + C(group)", "--gate-formula", "~ z", "--experts", "2"]
    assert _fit_cli(tmp_path, t, *flags) == 0
    out = capsys.readouterr().out
    assert "on x, I(x ** 2), C(group)[T.b], z" in out and "the gate sees z" in out
    assert "formula: y ~ x + I(x**2) + C(group); gate: ~ z" in out
    model = load(tmp_path / "out" / "model.moe")
    assert model.formula_.gate_columns == ["z"]
    assert main(["inspect", str(tmp_path / "out" / "model.moe")]) == 0
    assert "formula: y ~ x + I(x**2) + C(group); gate: ~ z" in capsys.readouterr().out
    # raw columns in, in another order, one level only: the model's formula builds the design
    new = t[["group", "z", "x"]].iloc[3:9].assign(group="b")
    new.to_csv(tmp_path / "new.csv", index=False)
    assert main(["predict", str(tmp_path / "out" / "model.moe"), str(tmp_path / "new.csv"),
                 "--out", str(tmp_path / "p.csv")]) == 0  # fmt: skip
    got = pd.read_csv(tmp_path / "p.csv")
    np.testing.assert_allclose(got["mean"], model.predict(model.formula_.transform(new)))
    assert "y ~ x + I(x**2) + C(group); gate: ~ z" in (tmp_path / "out" / "report.html").read_text()
    # a level the model never saw is a data error naming it
    new.assign(group="c").to_csv(tmp_path / "bad.csv", index=False)
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "out" / "model.moe"), str(tmp_path / "bad.csv")]) == 1
    assert "{'c'}" in capsys.readouterr().err


def test_a_constant_gate_formula(tmp_path, capsys):
    assert _fit_cli(tmp_path, _grouped(), "--formula", "y ~ x", "--gate-formula", "~ 1",
                    "--experts", "2") == 0  # fmt: skip
    assert "constant gate" in capsys.readouterr().out
    assert load(tmp_path / "out" / "model.moe").gate == "constant"


def test_debug_shows_the_traceback(tmp_path, capsys):
    _table().to_csv(tmp_path / "d.csv", index=False)
    args = ["fit", str(tmp_path / "d.csv"), "--target", "yy", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["--debug", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "did you mean 'y'" in err


def test_predict_names_a_missing_feature_cell(tmp_path, capsys):
    assert _fit_cli(tmp_path, _table(), "--target", "y", "--experts", "2") == 0
    new = _table(seed=1).drop(columns="y")
    new.loc[3, "z"] = np.nan
    new.to_csv(tmp_path / "new.csv", index=False)
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "out" / "model.moe"), str(tmp_path / "new.csv")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["moekit: the feature 'z' is missing in row 4; fill the cell or drop the row."]


def test_a_warning_is_one_line(tmp_path, capsys):
    # six experts for one line on 40 rows: some collapse, and the command says so
    t = _table(40)
    assert _fit_cli(tmp_path, t, "--target", "y", "--experts", "6") == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    warned = [ln for ln in err if "warning" in ln.lower()]
    assert warned and all(ln.startswith("moekit: warning: ") for ln in warned)
    assert not [ln for ln in err if ".py:" in ln], err
