"""Data-parallel EM: 2 and 4 gloo processes on the loopback equal one process.

Each test starts its processes with ``torch.multiprocessing`` (spawn), hands each
one an uneven shard of the same rows, fits with ``distributed=True`` and compares
every process's model with a single-process fit on the shards laid end to end in
rank order: log-likelihood and parameters to 1e-8. The processes talk over
127.0.0.1 only, and every launch is bounded in time (gloo's own timeout inside,
a kill from outside), so a broken exchange fails the test instead of hanging it.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import os
import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moekit import BayesianMoERegressor, HierarchicalMoERegressor, MoEClassifier, MoERegressor
from moekit._core.data import EMData
from moekit._core.distributed import DataGroup, bytes_exchanged
from moekit.datasets.synthetic import make_moe_regression
from moekit.experts.gaussian import GaussianExperts
from moekit.fitting.model import EMModel
from moekit.gates.softmax import SoftmaxGate

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)

LAUNCH_TIMEOUT = 120.0
"""Seconds a launch may take before its processes are killed (imports included)."""


# ---------------------------------------------------------------------------- cases
def _regression(n, n_experts=2, seed=0):
    X, y, _ = make_moe_regression(n, n_features=2, n_experts=n_experts, random_state=seed)
    return X, y


def _classification(n, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2))
    # two regions with different linear class boundaries among three classes
    logits = np.where(X[:, :1] > 0, X @ [[2.0, -1.0, 0.0], [0.0, 1.0, -2.0]],
                      X @ [[-2.0, 0.0, 1.0], [1.0, -2.0, 0.0]])  # fmt: skip
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in p])
    return X, np.array(["a", "b", "c"])[y]


def _counts(n, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (n, 1))
    z = rng.random(n) < 0.4
    rate = np.where(z, np.exp(0.5 + 1.5 * X[:, 0]), np.exp(2.0 - X[:, 0]))
    return X, rng.poisson(rate).astype(float)


def _glm(expert, n, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (n, 1))
    z = rng.random(n) < 0.4
    mean = np.where(z, np.exp(0.5 + 1.5 * X[:, 0]), np.exp(2.0 - X[:, 0]))
    if expert in ("gamma", "lognormal"):
        return X, rng.gamma(3.0, mean / 3.0)
    if expert == "weibull":
        return X, mean * rng.weibull(2.0, n)
    if expert == "negative_binomial":
        return X, rng.poisson(rng.gamma(2.0, mean / 2.0)).astype(float)
    s = rng.binomial(12, mean / (1 + mean))
    return X, np.c_[s, 12 - s].astype(float)


def _responses(n, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (n, 1))
    z = rng.random(n) < 0.4
    noise = rng.multivariate_normal([0, 0], [[1.0, 0.6], [0.6, 2.0]], n)
    return X, np.where(z[:, None], X @ [[2.0, -1.0]], 1.0 - X @ [[1.0, 3.0]]) + 0.3 * noise


COMMON = {"n_init": 3, "init_sample_size": 300, "tol": 1e-10, "max_iter": 400, "random_state": 0}
CASES = {
    "softmax": (lambda **kw: MoERegressor(n_experts=2, **COMMON, **kw), lambda: _regression(900)),
    "classifier": (
        lambda **kw: MoEClassifier(n_experts=2, **COMMON, **kw),
        lambda: _classification(900),
    ),
    "poisson_constant": (
        lambda **kw: MoERegressor(n_experts=2, expert="poisson", gate="constant", **COMMON, **kw),
        lambda: _counts(900),
    ),
    "poisson_softmax": (
        lambda **kw: MoERegressor(n_experts=2, expert="poisson", **COMMON, **kw),
        lambda: _counts(900),
    ),
    **{
        expert: (
            lambda expert=expert, **kw: MoERegressor(n_experts=2, expert=expert, **COMMON, **kw),
            lambda expert=expert: _glm(expert, 900),
        )
        for expert in ("gamma", "lognormal", "weibull", "negative_binomial", "binomial")
    },
    **{
        ct: (
            lambda ct=ct, **kw: MoERegressor(n_experts=2, covariance_type=ct, **COMMON, **kw),
            lambda: _responses(900),
        )
        for ct in ("full", "tied", "spherical")
    },
    "hierarchical": (
        lambda **kw: HierarchicalMoERegressor(depth=2, branching=2, **COMMON, **kw),
        lambda: _regression(900, n_experts=4, seed=1),
    ),
    "bayesian": (
        lambda **kw: BayesianMoERegressor(n_experts=2, **COMMON, **kw),
        lambda: _regression(900, seed=2),
    ),
}
SHARDS = {2: [350, 550], 4: [100, 400, 150, 250]}
"""Uneven shard sizes (rows per process) of the 900 rows."""


def _split(X, y, sizes, **rows):
    """Shards (X, y) or (X, y, fit keywords) of ``rows``' per-row arrays."""
    edges = np.cumsum([0, *sizes])
    return [(X[a:b], y[a:b], {k: v[a:b] for k, v in rows.items()}) if rows else (X[a:b], y[a:b])
            for a, b in itertools.pairwise(edges)]  # fmt: skip


def _state(est) -> dict:
    """Every tensor of the fitted parameters and scalings, and the log-likelihood."""
    out = {"log_likelihood_": est.log_likelihood_, "n_iter_": est.n_iter_,
           "_x_mean": est._x_mean, "_x_scale": est._x_scale}  # fmt: skip
    for part in ("expert", "gate"):
        p = getattr(est._params, part)
        for f in dataclasses.fields(p):
            out[f"{part}.{f.name}"] = getattr(p, f.name)
    for name in ("_y_mean", "_y_scale"):
        if hasattr(est, name):
            out[name] = torch.as_tensor(getattr(est, name))
    if hasattr(est, "classes_"):
        out["classes_"] = [str(c) for c in est.classes_]
    return out


# ---------------------------------------------------------------------------- launching
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, case, shard, out, timeout_s, die_after):
    torch.set_num_threads(1)  # several processes share this machine's cores
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timeout)  # fmt: skip
    result: dict = {}
    t0 = time.perf_counter()
    try:
        if die_after is not None and rank == world - 1:
            _die_after(die_after)
        make, _ = CASES[case]
        est = make(distributed=True).fit(*shard[:2], **(shard[2] if len(shard) > 2 else {}))
        result = _state(est)
    except Exception as err:  # reported to the test, which checks the message
        result = {"error": f"{type(err).__name__}: {err}"}
    result["elapsed"] = time.perf_counter() - t0
    torch.save(result, f"{out}.{rank}")
    try:
        dist.destroy_process_group()
    except Exception:  # a dead peer may already have broken the group
        pass


def _die_after(n_passes: int) -> None:
    """Make this process exit abruptly in its n-th data-parallel E-step."""
    from moekit.fitting import model as model_module

    real, calls = model_module.EMModel.e_pass, [0]

    def e_pass(self, params, data, **kw):
        if data.comm is not None:
            calls[0] += 1
            if calls[0] >= n_passes:
                os._exit(3)
        return real(self, params, data, **kw)

    model_module.EMModel.e_pass = e_pass


def _launch(world, case, shards, tmp_path, timeout_s=60, die_after=None):
    """Run ``world`` processes; their results by rank (None for a process that died)."""
    ctx = mp.get_context("spawn")
    port, out = _free_port(), str(tmp_path / "rank")
    procs = [
        ctx.Process(target=_worker,
                    args=(r, world, port, case, shards[r], out, timeout_s, die_after))
        for r in range(world)
    ]  # fmt: skip
    for p in procs:
        p.start()
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"processes {hung} still ran after {LAUNCH_TIMEOUT} s"
    return [torch.load(f"{out}.{r}") if os.path.exists(f"{out}.{r}") else None
            for r in range(world)]  # fmt: skip


def _check_equal(case, world, tmp_path, **rows):
    make, data = CASES[case]
    X, y = data()
    reference = _state(make().fit(X, y, **rows))
    results = _launch(world, case, _split(X, y, SHARDS[world], **rows), tmp_path)
    for rank, got in enumerate(results):
        assert "error" not in got, f"process {rank}: {got['error']}"
        assert got["n_iter_"] == reference["n_iter_"]
        assert got["log_likelihood_"] == pytest.approx(reference["log_likelihood_"], abs=1e-8)
        for name, want in reference.items():
            if isinstance(want, list):
                assert got[name] == want
            elif isinstance(want, torch.Tensor):
                torch.testing.assert_close(
                    torch.as_tensor(got[name]), torch.as_tensor(want), rtol=1e-8, atol=1e-8,
                    msg=lambda m, n=name: f"{n}: {m}",
                )  # fmt: skip
        # every process holds the very same model, not merely a close one
        for name, value in got.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, results[0][name]), (rank, name)
    return reference


# ---------------------------------------------------------------------------- tests
def test_two_processes_equal_one_process(tmp_path):
    reference = _check_equal("softmax", 2, tmp_path)
    assert reference["n_iter_"] > 1  # the fit ran on all rows after the starts' subset


@pytest.mark.parametrize("integer", [True, False])
def test_two_processes_with_weights_and_offsets_equal_one_process(integer, tmp_path):
    """Weights and offsets are sums' terms: the all-reduce carries them. Integer weights
    (zeros among them) start as the repeated rows do, others with their rows."""
    rng = np.random.default_rng(5)
    n = sum(SHARDS[2])
    w = rng.integers(0, 4, n).astype(float) if integer else rng.uniform(0.2, 3.0, n)
    rows = {"sample_weight": w, "offset": rng.uniform(-0.5, 0.5, n)}
    reference = _check_equal("poisson_softmax", 2, tmp_path, **rows)
    assert reference["n_iter_"] > 1
    if not integer:  # weighted standardisations of a real target and its features
        _check_equal("softmax", 2, tmp_path, sample_weight=w)
    X, y = _counts(n)  # the weights and the offset change the fit
    plain = _state(CASES["poisson_softmax"][0]().fit(X, y))
    assert abs(plain["log_likelihood_"] - reference["log_likelihood_"]) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("case", ["classifier", "poisson_constant", "hierarchical", "bayesian"])
def test_two_processes_equal_one_process_other_families(case, tmp_path):
    _check_equal(case, 2, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gamma", "lognormal", "weibull", "negative_binomial", "binomial"])
def test_two_processes_equal_one_process_glm_families(case, tmp_path):
    _check_equal(case, 2, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["full", "tied", "spherical"])
def test_two_processes_equal_one_process_covariance_types(case, tmp_path):
    _check_equal(case, 2, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["softmax", "classifier", "poisson_constant"])
def test_four_processes_equal_one_process(case, tmp_path):
    _check_equal(case, 4, tmp_path)


@pytest.mark.slow
def test_a_process_that_dies_mid_fit_makes_the_others_fail_in_time(tmp_path):
    _, data = CASES["softmax"]
    X, y = data()
    timeout = 10
    results = _launch(2, "softmax", _split(X, y, SHARDS[2]), tmp_path, timeout_s=timeout,
                      die_after=3)  # fmt: skip
    assert results[1] is None  # it died without a word
    assert "DistributedError" in results[0]["error"]
    assert "collective" in results[0]["error"] and "died" in results[0]["error"]
    assert results[0]["elapsed"] < timeout + 20


@pytest.mark.slow
def test_a_bad_shard_stops_every_process_with_its_message(tmp_path):
    _, data = CASES["softmax"]
    X, y = data()
    shards = _split(X, y, SHARDS[2])
    X1 = shards[1][0].copy()
    X1[5, 0] = np.nan
    shards[1] = (X1, shards[1][1])
    results = _launch(2, "softmax", shards, tmp_path, timeout_s=10)
    assert "NaN" in results[1]["error"]
    assert "process 1" in results[0]["error"] and "NaN" in results[0]["error"]


# ---------------------------------------------------------------------------- one process
@pytest.fixture
def one_process_group(tmp_path):
    """A gloo group of this process alone (world size 1), torn down afterwards."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)  # fmt: skip
    yield
    dist.destroy_process_group()


def test_distributed_needs_a_process_group():
    X, y = _regression(200)
    est = MoERegressor(n_experts=2, distributed=True)
    with pytest.raises(ValueError, match="distributed=True needs an initialised"):
        est.fit(X, y)
    assert not hasattr(est, "n_iter_")  # the failed fit left nothing behind


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"expert": "mlp"}, "MLPExperts family's M-step needs every row"),
     ({"gate": "mlp"}, "MLPGate family's M-step needs every row"),
     ({"fit_method": "gradient"}, "fit_method='gradient'")],
)  # fmt: skip
def test_families_that_need_every_row_are_refused(one_process_group, kwargs, match):
    X, y = _regression(200)
    with pytest.raises(ValueError, match=match):
        MoERegressor(n_experts=2, n_init=1, distributed=True, **kwargs).fit(X, y)


def test_one_process_group_gives_the_plain_fit(one_process_group):
    X, y = _regression(600)
    kw = {"n_experts": 2, "n_init": 2, "init_sample_size": 200, "random_state": 1}
    plain = MoERegressor(**kw).fit(X, y)
    dp = MoERegressor(**kw, distributed=True).fit(X, y)
    assert dp.log_likelihood_ == pytest.approx(plain.log_likelihood_, abs=1e-10)
    np.testing.assert_allclose(dp.coef_, plain.coef_, rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="summary\\(\\) needs X and y"):
        dp.summary()


@pytest.mark.parametrize("d", [5, 20])
def test_an_e_step_sends_the_documented_bytes(one_process_group, d):
    # the count docs/user_guide/distributed.md and EMModel.e_pass give for linear experts under a
    # softmax gate with Newton steps: 2 + K + K (p(p+1)/2 + p m + m) + K p + K(K+1)/2 p(p+1)/2
    K, m, n = 3, 1, 500
    p = d + 1
    gen = torch.Generator().manual_seed(0)
    XeT = torch.cat([torch.randn(d, n, generator=gen, dtype=torch.float64),
                     torch.ones(1, n, dtype=torch.float64)])  # fmt: skip
    y = torch.randn(1, n, generator=gen, dtype=torch.float64)
    data = EMData(XeT, XeT, y, comm=DataGroup(), n_global=n)
    model = EMModel(GaussianExperts(K, m, var_floor=1e-6), SoftmaxGate(K))
    model.prepare(data)
    params = model.init_from_resp(data, torch.rand(K, n, generator=gen, dtype=torch.float64))
    calls, sent = bytes_exchanged()
    res = model.e_pass(params, data)
    calls_after, sent_after = bytes_exchanged()
    floats = (
        2 + K + K * (p * (p + 1) // 2 + p * m + m) + K * p + K * (K + 1) // 2 * p * (p + 1) // 2
    )
    assert (calls_after - calls, sent_after - sent) == (1, 8 * floats)
    local = model.e_pass(params, EMData(XeT, XeT, y))  # the same pass without a group
    assert res.objective == pytest.approx(local.objective, abs=1e-12)
