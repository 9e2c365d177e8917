"""Expert parallelism over gloo processes on this machine (loopback only).

Each test starts ``W`` processes of ``ep_worker.py`` with the environment torchrun
would give them, waits a bounded time, and compares what they wrote with one process
holding every expert, built from the same seed: outputs and every gradient in
float64, to 1e-12.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ep_worker  # noqa: E402

SRC = HERE.parents[1] / "src"
TOL = dict(rtol=1e-12, atol=1e-12)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback() -> str:
    names = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    return names[0] if names else "lo"


def launch(
    world: int, case: str, settings: dict, out: Path, timeout: float = 90.0, wait_for=None
) -> list:
    """Start ``world`` worker processes; return their (returncode, stderr) after at most
    ``timeout`` seconds (stragglers are killed, and the test fails). With ``wait_for``,
    a list of ranks, the others are killed once those have ended (code None)."""
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    env = {
        **os.environ,
        "PYTHONPATH": path,
        "MASTER_ADDR": "127.0.0.1",  # loopback only
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(world),
        "GLOO_SOCKET_IFNAME": _loopback(),
        "OMP_NUM_THREADS": "1",
    }
    args = [sys.executable, str(HERE / "ep_worker.py"), case, str(out), json.dumps(settings)]
    procs = [
        subprocess.Popen(
            args,
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    deadline, results = time.monotonic() + timeout, [(None, "")] * world
    for rank in range(world) if wait_for is None else wait_for:
        try:
            _, err = procs[rank].communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"the {world} processes did not finish within {timeout} s")
        results[rank] = (procs[rank].returncode, err)
    for q in procs:  # only stragglers that ``wait_for`` left are still running
        if q.poll() is None:
            q.kill()
            q.wait()
    return results


def _check_ok(results) -> None:
    for rank, (code, err) in enumerate(results):
        assert code == 0, f"process {rank} failed:\n{err[-3000:]}"


def _reference(s: dict) -> tuple[list[torch.Tensor], list[torch.Tensor], dict, list]:
    """One process, every expert: each rank's tokens through the layer (per-rank
    capacity and expert choice make the rank's batch the unit), the gradients of the
    sum of the ranks' losses."""
    layer = ep_worker.build_layer(s)
    x_all, g_all = ep_worker.data(s)
    ys, xgrads, counts = [], [], []
    for rank in range(len(s["sizes"])):
        x = x_all[ep_worker.rows(s, rank)].clone().requires_grad_()
        y = layer(x)
        (y * g_all[ep_worker.rows(s, rank)]).sum().backward()
        ys.append(y.detach())
        xgrads.append(x.grad)
        counts.append(layer.stats.tokens_per_expert)
    grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    return ys, xgrads, grads, counts


def _compare_layer(s: dict, out: Path) -> None:
    world = len(s["sizes"])
    ys, xgrads, grads, counts = _reference(s)
    got = [load_file(out / f"rank{r}.safetensors") for r in range(world)]
    n_local = s["E"] // world
    for r, g in enumerate(got):
        torch.testing.assert_close(g["y"], ys[r], **TOL)
        torch.testing.assert_close(g["x_grad"], xgrads[r], **TOL)
        torch.testing.assert_close(g["tokens_per_expert"], counts[r])
        for w in ("w_in", "w_out"):  # each process holds its slice of the experts
            local = slice(r * n_local, (r + 1) * n_local)
            torch.testing.assert_close(g[f"grad.experts.{w}"], grads[f"experts.{w}"][local], **TOL)
    # replicated parameters: the sum of the processes' gradients is the total gradient
    for name, grad in grads.items():
        if not name.startswith("experts."):
            total = sum(g[f"grad.{name}"] for g in got if f"grad.{name}" in g)
            torch.testing.assert_close(total, grad, **TOL)


BASE = dict(seed=3, d=8, h=12, E=4, k=2, router="topk")


def test_expert_parallel_group_is_checked_before_anything_is_built():
    from moekit._core.validation import InvalidParameterError
    from moekit.nn import MoE

    # torch.distributed is not initialised in the test process
    with pytest.raises(InvalidParameterError, match=r"'expert_parallel_group'.*initialised"):
        MoE(8, 12, 4, expert_parallel_group=object())


def test_two_processes_equal_one_uneven_loads(tmp_path):
    # uneven token counts per process, and uneven loads per expert from the routing
    s = {**BASE, "sizes": [7, 13]}
    _check_ok(launch(2, "layer", s, tmp_path))
    _compare_layer(s, tmp_path)
    # and 3 experts cannot be shared out over 2 processes
    refused = json.loads((tmp_path / "rank0.json").read_text())["refused"]
    assert "'expert_parallel_group' parameter of MoE must be a group whose size divides" in refused


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        # 4 processes; process 1 has no tokens to send, and the bias keeps every token
        # away from experts 6 and 7, so that process 3 receives none; a shared expert
        dict(sizes=[5, 0, 9, 3], E=8, router="sigmoid_bias", idle_experts=[6, 7], shared=1),
        dict(sizes=[6, 11, 1, 8], E=8, k=3),  # uneven, top-3
        dict(sizes=[9, 6], capacity=0.5),  # drops: capacity counted per process
        dict(sizes=[6, 10], router="expert_choice"),
        dict(sizes=[8, 5], router="switch", k=1, impl="mm"),
        dict(sizes=[8, 5], impl="bmm"),
    ],
    ids=["4-idle-ranks", "4-top3", "2-capacity", "2-expert-choice", "2-switch-mm", "2-bmm"],
)
def test_expert_parallel_equals_one_process(tmp_path, case):
    s = {**BASE, **case}
    _check_ok(launch(len(s["sizes"]), "layer", s, tmp_path))
    _compare_layer(s, tmp_path)


TINY_LM = dict(block_size=16, n_layer=2, n_head=2, d_model=32, d_hidden=32, n_experts=4,
               top_k=2, router="sigmoid_bias", aux_loss_coef=0.0, z_loss_coef=0.0)  # fmt: skip
TRAIN = dict(steps=3, batch_size=4, eval_every=2, eval_batches=3, checkpoint_every=2)
IDX = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(7))


def _corpus(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    words = ["the", "expert", "router", "token", "sends", "back", "all", "to", "gate", "loss"]
    text = " ".join(words[i] for i in torch.randint(0, len(words), (1500,), generator=gen).tolist())
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return path


def _logits_match(model, out: Path, world: int) -> None:
    with torch.no_grad():
        logits, _ = model.eval()(IDX)
    parts = [load_file(out / f"rank{r}.safetensors")["logits"] for r in range(world)]
    torch.testing.assert_close(torch.cat(parts), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_training_on_two_processes_equals_one_and_loads_on_one(tmp_path):
    """Data + expert parallel training on 2 processes (batch_size B each) takes the same
    steps as one process with batch 2B: gradients averaged, the expert gradients
    divided, clipping by the global norm, the routers' bias from the global loads."""
    from moekit.nn import MoETransformer, TrainConfig, TransformerConfig, train_lm
    from moekit.nn.checkpoint import load_checkpoint, load_lm

    corpus = _corpus(tmp_path)
    s = dict(seed=0, model=TINY_LM, train=TRAIN, corpus=str(corpus))
    _check_ok(launch(2, "train", s, tmp_path))
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert logs[0]["train_loss"] == logs[1]["train_loss"]  # all-reduced
    # the checkpoint (step 2, the last) loads on one process with the same outputs
    ck = load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert ck.step == 2 and ck.model.blocks[0].ffn.experts.w_in.shape[0] == 4  # whole
    _logits_match(load_lm(tmp_path / "checkpoint.safetensors"), tmp_path, 2)
    torch.manual_seed(0)
    single = MoETransformer(TransformerConfig(**TINY_LM))
    log = train_lm(single, corpus.read_text(), TrainConfig(**{**TRAIN, "batch_size": 8}),
                   verbose=0)  # fmt: skip
    assert log.train_loss == pytest.approx(logs[0]["train_loss"], rel=1e-5)
    assert log.val_loss == pytest.approx(logs[0]["val_loss"], rel=1e-5)
    for (name, a), b in zip(
        single.state_dict().items(), ck.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_checkpoint_from_four_processes_loads_on_one_and_two(tmp_path):
    from moekit.nn.checkpoint import load_lm

    s = dict(seed=0, model={**TINY_LM, "router": "topk"}, train=TRAIN,
             corpus=str(_corpus(tmp_path)))  # fmt: skip
    _check_ok(launch(4, "train", s, tmp_path, timeout=150.0))
    model = load_lm(tmp_path / "checkpoint.safetensors")
    _logits_match(model, tmp_path, 4)
    out = tmp_path / "on_two"
    out.mkdir()
    _check_ok(launch(2, "load", {**s, "checkpoint": str(tmp_path / "checkpoint.safetensors")}, out))
    _logits_match(model, out, 2)
    refused = json.loads((out / "rank1.save.json").read_text())["refused"]
    assert "gather_experts(model) on every process first" in refused


@pytest.mark.slow
@pytest.mark.parametrize("hang", [False, True], ids=["dies", "hangs"])
def test_a_failed_process_makes_the_others_fail_in_time(tmp_path, hang):
    """Process 1 dies (or hangs) in its third forward; process 0 must stop with the
    clear error, at once for a death (the connection closes) and after the group's
    5 s timeout for a hang, never wait for ever."""
    s = dict(seed=0, model=TINY_LM, train=TRAIN, corpus=str(_corpus(tmp_path)),
             fail_at=2, hang=hang, timeout=5.0)  # fmt: skip
    results = launch(2, "train", s, tmp_path, timeout=60.0, wait_for=[0])
    assert results[0][0] == 0, results[0][1][-3000:]
    report = json.loads((tmp_path / "rank0.json").read_text())
    assert "another process of the group died or stopped responding" in report["error"]
    assert report["seconds"] < 30.0


@pytest.mark.slow
def test_lm_train_command_under_torchrun(tmp_path):
    """``moekit lm train`` under torchrun: one report (process 0), the files written."""
    port = str(_free_port())
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1",
           "GLOO_SOCKET_IFNAME": _loopback()}  # fmt: skip
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", port, "-m", "moekit.cli", "lm",
            "train", "--corpus", str(_corpus(tmp_path)), "--steps", "2", "--batch-size", "2",
            "--eval-every", "1", "--out", str(tmp_path / "lm")]  # fmt: skip
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Training the 'tiny'") == 1
    assert sorted(p.name for p in (tmp_path / "lm").iterdir()) == [
        "checkpoint.safetensors", "lm.moe", "lm_training.png"]  # fmt: skip
