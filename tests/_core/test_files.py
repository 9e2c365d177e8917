"""Atomic safetensors writes: whole or not at all, no temporary left behind."""

import os
import stat

import pytest
import torch
from safetensors import safe_open

from moekit._core.files import remove_partial_writes, write_safetensors


def test_write_round_trips_with_usual_permissions(tmp_path):
    path = tmp_path / "m.safetensors"
    tensors = {"w": torch.arange(6.0).view(2, 3)}
    assert write_safetensors(tensors, path, {"kind": "test"}) == path
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata() == {"kind": "test"} and torch.equal(fh.get_tensor("w"), tensors["w"])
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "m.safetensors"
    write_safetensors({"w": torch.ones(2)}, path, {})
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - safetensors' own error type
        write_safetensors({"w": torch.ones(2)}, path, {"bad": 1})  # metadata must be str
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_remove_partial_writes_removes_only_that_files_temporaries(tmp_path):
    path = tmp_path / "m.safetensors"
    names = [".m.safetensors.abc.tmp", ".other.safetensors.abc.tmp", "m.safetensors"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    remove_partial_writes(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])
