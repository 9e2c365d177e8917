"""The ``moekit`` command: demo, fit and predict on files."""

import numpy as np
import pandas as pd
import pytest

from moekit import load
from moekit.cli import main
from moekit.datasets import make_moe_regression


def test_demo_writes_its_report(tmp_path, capsys, recwarn):
    assert main(["demo", "--out", str(tmp_path), "--n-init", "2"]) == 0
    assert not [w for w in recwarn if "feature names" in str(w.message)]
    out = capsys.readouterr().out
    assert "BIC picks K =" in out and "std_error" in out and "gate: expert 1 vs 0" in out
    for name in ("mcycle_fit.png", "mcycle_bic.png", "mcycle.moe", "mcycle_bic.csv"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "mcycle_fit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = load(tmp_path / "mcycle.moe")
    assert model.n_features_in_ == 1


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
    assert "mean log-likelihood" in (tmp_path / "fit" / "report.txt").read_text()
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
    assert list(pred.columns) == ["mean", "std", "q05", "q95"]
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
    with pytest.raises(SystemExit, match="--target 'y' is not a column"):
        main(["fit", str(tmp_path / "d.csv"), "--target", "y"])
    (tmp_path / "junk.moe").write_text("junk")
    assert main(["predict", str(tmp_path / "junk.moe"), str(tmp_path / "d.csv")]) == 2
    assert "not a readable moekit model file" in capsys.readouterr().err
