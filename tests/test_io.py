"""Model files: exact round trips, atomic writes, and clear errors for bad files."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import moekit
from moekit import MoEClassifier, MoERegressor, load
from moekit.datasets import make_moe_regression
from moekit.gates.constant import ConstantGate


@pytest.fixture(scope="module")
def fitted():
    X, y, _ = make_moe_regression(400, n_features=3, random_state=0)
    return MoERegressor(3, random_state=0).fit(X, y), X, y


def test_regressor_round_trip_is_exact(tmp_path, fitted):
    m, X, y = fitted
    path = tmp_path / "model.moe"
    m.save(path)
    back = load(path)
    assert type(back) is MoERegressor and back.get_params() == m.get_params()
    np.testing.assert_array_equal(back.predict(X), m.predict(X))
    np.testing.assert_array_equal(back.gate_weights(X), m.gate_weights(X))
    assert back.log_likelihood(X, y) == m.log_likelihood(X, y)
    assert back.log_likelihood_history_ == m.log_likelihood_history_
    assert back.n_iter_ == m.n_iter_ and back.converged_ == m.converged_
    assert [f.name for f in tmp_path.iterdir()] == ["model.moe"]  # no temporary left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def test_classifier_round_trip_keeps_labels(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 2))
    y = np.array(["no", "yes"])[(X[:, 0] > 0).astype(int)]
    m = MoEClassifier(2, random_state=0).fit(X, y)
    m.save(tmp_path / "c.moe")
    back = moekit.load(tmp_path / "c.moe")
    assert back.classes_.tolist() == ["no", "yes"]
    np.testing.assert_array_equal(back.predict_proba(X), m.predict_proba(X))


def test_failed_write_leaves_the_old_file_intact(tmp_path, fitted, monkeypatch):
    m, *_ = fitted
    path = tmp_path / "model.moe"
    m.save(path)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        m.save(path)
    assert path.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["model.moe"]


def test_truncated_file_is_a_value_error(tmp_path, fitted):
    m, *_ = fitted
    path = tmp_path / "model.moe"
    m.save(path)
    data = path.read_bytes()
    for cut in (5, len(data) // 2, len(data) - 3):
        (tmp_path / "cut.moe").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a readable moekit model file"):
            load(tmp_path / "cut.moe")


def test_foreign_and_hostile_files_are_refused(tmp_path):
    (tmp_path / "text.moe").write_text("hello, I am not a model")
    with pytest.raises(ValueError, match="not a readable moekit model file"):
        load(tmp_path / "text.moe")
    # a valid safetensors file without moekit's metadata
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.moe"))
    with pytest.raises(ValueError, match="not a moekit model file"):
        load(tmp_path / "plain.moe")
    # a file naming an arbitrary importable class: looked up in the registry, never imported
    meta = {"moekit_format": "1", "class": "os.system", "params": "{}", "state": "{}"}
    save_file({"w": torch.zeros(2)}, str(tmp_path / "evil.moe"), metadata=meta)
    with pytest.raises(ValueError, match="not a moekit model"):
        load(tmp_path / "evil.moe")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.moe")


def test_damaged_contents_are_a_value_error(tmp_path, fitted):
    m, *_ = fitted
    params, state, tensors = m._to_state()
    meta = {
        "moekit_format": "1",
        "class": "MoERegressor",
        "params": json.dumps(params),
        "state": json.dumps(state),
    }
    broken = dict(tensors)
    del broken["gate.coef"]
    save_file(
        {k: v.contiguous() for k, v in broken.items()}, str(tmp_path / "a.moe"), metadata=meta
    )
    with pytest.raises(ValueError, match="does not hold a valid MoERegressor"):
        load(tmp_path / "a.moe")
    bad_params = dict(meta, params=json.dumps({**params, "n_experts": -1}))
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(tmp_path / "b.moe"),
        metadata=bad_params,
    )
    with pytest.raises(ValueError, match="n_experts"):
        load(tmp_path / "b.moe")


def test_objects_that_would_need_pickle_are_not_saved(tmp_path, fitted):
    _, X, y = fitted
    clone = MoERegressor(2, gate=ConstantGate(2), random_state=0).fit(X, y)
    with pytest.raises(TypeError, match="only built-in experts and gates"):
        clone.save(tmp_path / "x.moe")
    assert not os.listdir(tmp_path)
