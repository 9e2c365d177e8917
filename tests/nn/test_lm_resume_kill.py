"""A training run killed with SIGKILL and resumed reaches the same losses as one never killed.

Both runs are real `moekit lm train` processes on the bundled corpus; the first is
killed (SIGKILL: no handler, no clean-up) after its second checkpoint, at a moment
of its own choosing, then continued with ``--resume``.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moekit.nn.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

SETTINGS = ["--config", "tiny", "--steps", "60", "--batch-size", "8",
            "--eval-every", "20", "--checkpoint-every", "10"]  # fmt: skip


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "moekit.cli", "lm", "train", "--out", str(out), *extra]


def _env() -> dict:
    # one thread in both runs: the same thread count makes the same floating-point sums
    src = str(Path(__file__).resolve().parents[2] / "src")
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def _checkpoint_step(path: Path) -> int:
    try:
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        return int(json.loads(raw[8 : 8 + n])["__metadata__"]["step"])
    except (OSError, ValueError, KeyError):  # not there yet
        return -1


def test_sigkill_then_resume_gives_the_uninterrupted_loss_curve(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = subprocess.run(_command(whole, *SETTINGS), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    proc = subprocess.Popen(_command(killed, *SETTINGS), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 600
    while (_checkpoint_step(killed / "checkpoint.safetensors")) < 19:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    stopped_at = load_checkpoint(killed / "checkpoint.safetensors").step
    assert 19 <= stopped_at < 59

    resumed = subprocess.run(_command(killed, "--resume"), env=_env(), capture_output=True,
                             text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming" in resumed.stdout

    a = load_checkpoint(whole / "checkpoint.safetensors")
    b = load_checkpoint(killed / "checkpoint.safetensors")
    assert a.step == b.step == 59
    assert b.log["step"] == list(range(60)) and b.log["eval_step"] == a.log["eval_step"]
    for key in ("train_loss", "aux_loss", "val_loss"):
        assert b.log[key] == pytest.approx(a.log[key], rel=1e-6, abs=1e-9), key
    assert b.log["tokens_per_expert"] == a.log["tokens_per_expert"]
    weights_b = b.model.state_dict()
    for name, x in a.model.state_dict().items():
        torch.testing.assert_close(x, weights_b[name], rtol=1e-6, atol=1e-7, msg=name)
    assert not list(killed.glob(".checkpoint.safetensors.*.tmp"))
