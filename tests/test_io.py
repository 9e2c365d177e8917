"""Model files: exact round trips, atomic writes, and clear errors for bad files."""

import json
import os
import warnings

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


# ------------------------------------------------------------------ files checked for meaning
def _contents(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}


def _rewrite(src, dst, edit_tensors=None, state=None, params=None):
    """Save ``src`` again as ``dst`` with its tensors and settings edited."""
    meta, tensors = _contents(src)
    if edit_tensors is not None:
        edit_tensors(tensors)
    if state is not None:
        meta["state"] = json.dumps({**json.loads(meta["state"]), **state})
    if params is not None:
        meta["params"] = json.dumps({**json.loads(meta["params"]), **params})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst), metadata=meta)
    return dst


@pytest.fixture
def saved(tmp_path, fitted):
    # three experts over three features, one output: expert.coef is (3, 1, 4)
    m, *_ = fitted
    m.save(tmp_path / "m.moe")
    return tmp_path / "m.moe"


def _set(name, value):
    def edit(t):
        t[name] = value(t[name]) if callable(value) else value

    return edit


def _poke(name, index, value):
    def edit(t):
        t[name] = t[name].clone()
        t[name].view(-1)[index] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_poke("expert.coef", 2, float("nan")), r"'expert\.coef' holds NaN or infinite"),
        (_poke("gate.coef", 0, float("inf")), r"'gate\.coef' holds NaN or infinite"),
        (_poke("x_mean", 1, float("nan")), r"'x_mean' holds NaN or infinite"),
        (_poke("y_mean", 0, float("-inf")), r"'y_mean' holds NaN or infinite"),
        (_poke("expert.var", 1, -0.5), r"'expert\.var' holds variances that are not positive"),
        (_poke("x_scale", 0, 0.0), r"'x_scale' must be positive"),
        (_poke("y_scale", 0, -2.0), "target scaling is not positive"),
        (_poke("expert_sizes", 0, -1.0), r"'expert_sizes' holds negative sizes"),
    ],
)
def test_nan_and_impossible_values_are_refused(tmp_path, saved, edit, message):
    bad = _rewrite(saved, tmp_path / "bad.moe", edit)
    with pytest.raises(ValueError, match=r"'.*bad\.moe' does not hold a valid MoERegressor: "):
        load(bad)
    with pytest.raises(ValueError, match=message):
        load(bad)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            _set("expert.coef", lambda t: torch.cat([t, t[..., :1]], -1)),
            r"tensor 'expert\.coef' has shape \(3, 1, 5\), expected \(3, 1, 4\) from n_experts=3, "
            r"n_features_in_=3 and an intercept \(GaussianExperts\)",
        ),
        (_set("gate.coef", lambda t: t[:2]), r"'gate\.coef' has shape \(2, 4\), expected \(3, 4\)"),
        (
            _set("expert.var", lambda t: t[:, 0]),
            r"'expert\.var' has shape \(3,\), expected \(3, 1\)",
        ),
        (_set("x_scale", lambda t: t[:2]), r"'x_scale' has shape \(2,\), expected \(3,\)"),
        (_set("expert_sizes", lambda t: t[None]), r"'expert_sizes' has shape \(1, 3\), expected"),
        (_set("y_scale", lambda t: t.repeat(2)), r"'y_scale' has shape \(2,\), expected \(1,\)"),
        (_set("y_mean", lambda t: t[None]), r"'y_mean' has shape \(1, 1\), expected \(n,\)"),
    ],
)
def test_wrong_shaped_arrays_are_refused(tmp_path, saved, edit, message):
    with pytest.raises(ValueError, match=message):
        load(_rewrite(saved, tmp_path / "bad.moe", edit))


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("expert.coef", torch.float32),
        ("gate.coef", torch.float16),
        ("expert.var", torch.bfloat16),
        ("x_mean", torch.int64),
        ("expert_sizes", torch.int32),
        ("x_scale", torch.bool),
        ("y_scale", torch.float32),
    ],
)
def test_wrong_dtype_arrays_are_refused_not_cast(tmp_path, saved, name, dtype):
    bad = _rewrite(saved, tmp_path / "bad.moe", _set(name, lambda t: t.to(dtype)))
    got = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=rf"'{name}' has dtype {got}, expected float64"):
        load(bad)


def test_missing_and_unexpected_tensors_are_named(tmp_path, saved):
    def drop(t):
        del t["expert.var"]

    with pytest.raises(ValueError, match=r"\['expert\.var'\] are missing"):
        load(_rewrite(saved, tmp_path / "a.moe", drop))
    with pytest.raises(ValueError, match="'y_mean' is missing"):
        load(_rewrite(saved, tmp_path / "b.moe", lambda t: t.pop("y_mean")))
    extra = _set("payload", torch.zeros(1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \['payload'\]"):
        load(_rewrite(saved, tmp_path / "c.moe", extra))


def test_shapes_are_checked_against_the_settings_before_reading(tmp_path, saved, monkeypatch):
    from moekit.io import FileTensors

    # settings that disagree with the arrays: refused on the header, no parameter read
    read = []
    original = FileTensors.__getitem__
    monkeypatch.setattr(
        FileTensors, "__getitem__", lambda self, k: read.append(k) or original(self, k)
    )
    with pytest.raises(ValueError, match=r"'x_mean' has shape \(3,\), expected \(4,\)"):
        load(_rewrite(saved, tmp_path / "a.moe", state={"n_features_in_": 4}))
    assert read == []
    big = _set("expert.coef", lambda t: t.repeat(1, 1, 1000))  # 96 kB where 96 B are expected
    with pytest.raises(ValueError, match=r"'expert\.coef' has shape \(3, 1, 4000\)"):
        load(_rewrite(saved, tmp_path / "b.moe", big))
    assert not any(k.startswith(("expert.", "gate.")) for k in read)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        # fewer fitted experts than n_experts is legal (min_share), but not these tensors
        ({"state": {"n_experts_fitted": 2}}, r"'expert_sizes' has shape \(3,\), expected \(2,\)"),
        ({"state": {"n_experts_fitted": 4}}, "'n_experts_fitted' is 4, but n_experts=3"),
        ({"params": {"n_experts": 2}}, "'n_experts_fitted' is 3, but n_experts=2"),
        ({"state": {"n_features_in_": "3"}}, "'n_features_in_' must be an int >= 1"),
        ({"state": {"n_iter_": -1}}, "'n_iter_' must be an int >= 0"),
        ({"state": {"converged_": 1}}, "'converged_' must be true or false"),
        ({"state": {"log_likelihood_": float("nan")}}, "'log_likelihood_' must be a finite"),
        ({"state": {"log_likelihood_history_": [1.0, None]}}, "'log_likelihood_history_'"),
        ({"state": {"_expert_cols": [0, 3]}}, r"'_expert_cols' must list distinct .* \[0, 3\)"),
        ({"state": {"_gate_cols": [1, 1]}}, "'_gate_cols' must list distinct"),
        ({"state": {"feature_names_in_": ["a"]}}, "'feature_names_in_' must list"),
        ({"state": {"expert_family": "PoissonExperts"}}, "do not match the stored settings"),
        ({"params": {"expert": "poisson"}}, "do not match the stored settings"),
    ],
)
def test_inconsistent_settings_are_refused(tmp_path, saved, settings, message):
    with pytest.raises(ValueError, match=message):
        load(_rewrite(saved, tmp_path / "bad.moe", **settings))


def test_column_selections_set_the_expected_widths(tmp_path, fitted):
    _, X, y = fitted
    m = MoERegressor(2, expert_features=[0, 2], gate_features=[1], max_iter=5, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.fit(X, y)
    m.save(tmp_path / "m.moe")
    np.testing.assert_array_equal(load(tmp_path / "m.moe").predict(X), m.predict(X))
    # the gate sees one column and the intercept: (2, 2); a file saying three is refused
    with pytest.raises(ValueError, match=r"'gate\.coef' has shape \(2, 2\), expected \(2, 3\)"):
        load(_rewrite(tmp_path / "m.moe", tmp_path / "bad.moe", state={"_gate_cols": [0, 1]}))


def _header_bytes(path):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _with_header(path, header, body):
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + body)
    return path


@pytest.fixture
def no_safetensors_read(monkeypatch):
    """Fail a test if load asks safetensors to open the file."""

    def refuse(*args, **kwargs):
        raise AssertionError("safetensors opened a file that should have been refused")

    monkeypatch.setattr("safetensors.safe_open", refuse)


def test_sizes_are_checked_before_anything_is_read(tmp_path, saved, no_safetensors_read):
    header, body = _header_bytes(saved)
    # a tensor whose shape claims more bytes than its offsets span
    h = json.loads(json.dumps(header))
    h["expert.coef"]["shape"] = [3, 1, 10**9]
    with pytest.raises(ValueError, match=r"'expert\.coef' .* needs 24000000000 bytes but its"):
        load(_with_header(tmp_path / "a.moe", h, body))
    # offsets (and a shape) that run past the end of the file
    h = json.loads(json.dumps(header))
    last = max(h, key=lambda k: h[k]["data_offsets"][1] if k != "__metadata__" else -1)
    start = h[last]["data_offsets"][0]
    h[last]["shape"] = [2**30]
    h[last]["data_offsets"] = [start, start + 8 * 2**30]
    with pytest.raises(ValueError, match=r"tensors need \d+ bytes after the header; the file has"):
        load(_with_header(tmp_path / "b.moe", h, body))
    # a header length beyond the file, or beyond what moekit parses
    data = saved.read_bytes()
    (tmp_path / "c.moe").write_bytes((2**62).to_bytes(8, "little") + data[8:])
    with pytest.raises(ValueError, match="header claims 4611686018427387904 bytes"):
        load(tmp_path / "c.moe")
    # dtypes safetensors knows but moekit does not read, and malformed entries
    h = json.loads(json.dumps(header))
    h["x_mean"]["dtype"] = "C64"
    with pytest.raises(ValueError, match="'x_mean' has an unknown dtype 'C64'"):
        load(_with_header(tmp_path / "d.moe", h, body))
    h = json.loads(json.dumps(header))
    h["x_mean"]["shape"] = [-3]
    with pytest.raises(ValueError, match="'x_mean' has a malformed shape"):
        load(_with_header(tmp_path / "e.moe", h, body))


def test_file_and_header_size_limits(tmp_path, saved, monkeypatch, no_safetensors_read):
    size = saved.stat().st_size
    with pytest.raises(ValueError, match=rf"holds {size} bytes, more than max_bytes=1000"):
        load(saved, max_bytes=1000)
    monkeypatch.setattr("moekit.io.MAX_HEADER_BYTES", 64)
    with pytest.raises(ValueError, match="more than 64"):
        load(saved)


def test_settings_that_are_not_json_objects_are_refused(tmp_path, saved):
    meta, tensors = _contents(saved)
    for params, message in (("[" * 100_000, "damaged settings"), ("[1, 2]", "not a JSON object")):
        save_file(tensors, str(tmp_path / "bad.moe"), metadata={**meta, "params": params})
        with pytest.raises(ValueError, match=message):
            load(tmp_path / "bad.moe")


# ------------------------------------------------------------------ every family round-trips
def _fit(model, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(X, y)


@pytest.fixture(scope="module")
def small_data():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(150, 2))
    y = np.where(X[:, 0] > 0, 2 * X[:, 1], -X[:, 1]) + 0.1 * rng.normal(size=150)
    return X, y


FAMILIES = {
    "linear": {},
    "student_t": {"expert": "student_t"},
    "student_t-fixed-df": {"expert": "student_t", "df": 4.0},
    "mlp-expert": {"expert": "mlp", "expert_options": {"hidden": 3, "steps": 2}},
    "constant-gate": {"gate": "constant"},
    "mlp-gate": {"gate": "mlp", "gate_options": {"hidden": 4, "steps": 2}},
    "two-outputs": {"two_outputs": True},
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_built_in_family_round_trips(tmp_path, small_data, name):
    X, y = small_data
    kw = dict(FAMILIES[name])
    if kw.pop("two_outputs", False):
        y = np.c_[y, X[:, 0] + y]
    m = _fit(MoERegressor(2, max_iter=4, random_state=0, **kw), X, y)
    m.save(tmp_path / "m.moe")
    back = load(tmp_path / "m.moe")
    np.testing.assert_array_equal(back.predict(X), m.predict(X))
    assert back.log_likelihood(X, y) == m.log_likelihood(X, y)


def test_poisson_and_classifier_files_round_trip(tmp_path, small_data):
    X, _ = small_data
    counts = np.random.default_rng(2).poisson(np.exp(0.5 * X[:, 0]))
    m = _fit(MoERegressor(2, expert="poisson", max_iter=4, random_state=0), X, counts)
    m.save(tmp_path / "p.moe")
    np.testing.assert_array_equal(load(tmp_path / "p.moe").predict(X), m.predict(X))
    labels = np.array(["a", "b", "c"])[(X[:, 0] > 0).astype(int) + (X[:, 1] > 1)]
    c = _fit(MoEClassifier(2, max_iter=3, random_state=0), X, labels)
    c.save(tmp_path / "c.moe")
    np.testing.assert_array_equal(load(tmp_path / "c.moe").predict_proba(X), c.predict_proba(X))


def _glm_target(expert: str, X: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(3)
    mean = np.exp(0.5 * X[:, 0])
    if expert in ("gamma", "lognormal"):
        return mean * rng.gamma(4.0, 0.25, len(X))
    if expert == "weibull":
        return mean * rng.weibull(2.0, len(X))
    if expert == "negative_binomial":
        return rng.poisson(mean * rng.gamma(2.0, 0.5, len(X))).astype(float)
    s = rng.binomial(10, 1 / (1 + np.exp(-X[:, 0])))
    return np.c_[s, 10 - s].astype(float)


@pytest.mark.parametrize("expert", ["binomial", "gamma", "lognormal", "negative_binomial",
                                    "weibull"])  # fmt: skip
def test_glm_expert_files_round_trip(tmp_path, small_data, expert):
    X, _ = small_data
    y = _glm_target(expert, X)
    m = _fit(MoERegressor(2, expert=expert, max_iter=4, random_state=0), X, y)
    m.save(tmp_path / "g.moe")
    back = load(tmp_path / "g.moe")
    np.testing.assert_array_equal(back.predict(X), m.predict(X))
    assert back.log_likelihood(X, y) == m.log_likelihood(X, y)
    field = {"gamma": "shape", "lognormal": "var", "negative_binomial": "dispersion",
             "weibull": "shape"}.get(expert)  # fmt: skip
    if field is not None:  # a scale parameter that is not positive is refused
        with pytest.raises(ValueError, match=rf"'expert\.{field}' holds"):
            load(
                _rewrite(tmp_path / "g.moe", tmp_path / "g1.moe", _poke(f"expert.{field}", 0, -1.0))
            )


def test_family_constraints_are_checked(tmp_path, small_data):
    X, y = small_data
    t = _fit(MoERegressor(2, expert="student_t", max_iter=4, random_state=0), X, y)
    t.save(tmp_path / "t.moe")
    with pytest.raises(ValueError, match=r"'expert\.df' holds fitted degrees of freedom outside"):
        load(_rewrite(tmp_path / "t.moe", tmp_path / "t1.moe", _poke("expert.df", 0, 2e6)))
    # a fixed df may lie outside the fitted range, but must be positive
    fixed = _rewrite(tmp_path / "t.moe", tmp_path / "t2.moe", params={"df": 2e6})
    load(_rewrite(fixed, fixed, _set("expert.df", lambda d: torch.full_like(d, 2e6))))
    with pytest.raises(ValueError, match=r"'expert\.df' holds degrees of freedom that are not"):
        load(_rewrite(fixed, tmp_path / "t3.moe", _poke("expert.df", 1, 0.0)))

    c = _fit(MoERegressor(2, gate="constant", max_iter=4, random_state=0), X, y)
    c.save(tmp_path / "c.moe")
    shifted = _set("gate.log_pi", lambda v: v + 0.1)
    with pytest.raises(ValueError, match=r"'gate\.log_pi' is not normalised: the weights sum to"):
        load(_rewrite(tmp_path / "c.moe", tmp_path / "c1.moe", shifted))
    # an expert left without any weight (log pi = -inf) is a valid, if degenerate, model
    dead = _set("gate.log_pi", lambda v: torch.tensor([0.0, float("-inf")], dtype=v.dtype))
    load(_rewrite(tmp_path / "c.moe", tmp_path / "c2.moe", dead))
    with pytest.raises(ValueError, match=r"'gate\.log_pi' holds NaN"):
        load(_rewrite(tmp_path / "c.moe", tmp_path / "c3.moe", _poke("gate.log_pi", 0, np.nan)))

    # the MLP expert's hidden width comes from expert_options
    options = {"hidden": 3, "steps": 2}
    n = _fit(
        MoERegressor(2, expert="mlp", expert_options=options, max_iter=2, random_state=0), X, y
    )
    n.save(tmp_path / "n.moe")
    wider = {"expert_options": {"hidden": 5, "steps": 2}}
    with pytest.raises(
        ValueError, match=r"'expert\.w1' has shape \(2, 3, 3\), expected \(2, 3, 5\)"
    ):
        load(_rewrite(tmp_path / "n.moe", tmp_path / "n1.moe", params=wider))


def test_classifier_labels_must_match_the_coefficients(tmp_path, small_data):
    X, _ = small_data
    labels = np.array(["a", "b", "c"])[(X[:, 0] > 0).astype(int) + (X[:, 1] > 1)]
    c = _fit(MoEClassifier(2, max_iter=3, random_state=0), X, labels)
    c.save(tmp_path / "c.moe")
    four = {"classes_": {"dtype": "<U1", "values": ["a", "b", "c", "d"]}}
    with pytest.raises(
        ValueError, match=r"'expert\.coef' has shape \(2, 3, 3\), expected \(2, 4, 3\)"
    ):
        load(_rewrite(tmp_path / "c.moe", tmp_path / "c1.moe", state=four))
    unsorted = {"classes_": {"dtype": "<U1", "values": ["b", "a", "c"]}}
    with pytest.raises(ValueError, match="'classes_' must be distinct and sorted"):
        load(_rewrite(tmp_path / "c.moe", tmp_path / "c2.moe", state=unsorted))
    nested = {"classes_": {"dtype": "object", "values": [["a"], "b", "c"]}}
    with pytest.raises(ValueError, match="only strings and numbers"):
        load(_rewrite(tmp_path / "c.moe", tmp_path / "c3.moe", state=nested))


def test_a_model_that_shed_experts_round_trips(tmp_path):
    """A fit that removed experts below min_share has fewer experts than n_experts; its
    file stores and restores that model, and the count of removed experts."""
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, (300, 1))
    y = np.where(X[:, 0] < 0, -2 * X[:, 0], 3 * X[:, 0]) + 0.05 * rng.normal(size=300)
    with pytest.warns(UserWarning, match="removed during EM"):
        m = MoERegressor(5, min_share=0.2, n_init=2, random_state=0).fit(X, y)
    assert m.n_experts_removed_ > 0 and len(m.expert_sizes_) == 5 - m.n_experts_removed_
    m.save(tmp_path / "small.moe")
    back = moekit.load(tmp_path / "small.moe")
    assert back.n_experts_removed_ == m.n_experts_removed_
    np.testing.assert_allclose(back.predict(X), m.predict(X), rtol=1e-12)
    assert back.gate_weights(X).shape == (300, len(m.expert_sizes_))
