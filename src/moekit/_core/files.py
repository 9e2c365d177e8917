"""Files written whole or not at all.

A model file or checkpoint is written to a temporary name in the target's folder,
flushed to disk, then renamed over the target: a reader sees the old file or the
new one, never half of one, even when the writer is killed mid-way. Temporary
names are ``.<name>.<random>.tmp`` so that :func:`remove_partial_writes` can find
what a killed write left.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def write_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]
) -> Path:
    """Write ``tensors`` and ``metadata`` to the safetensors file ``path``, atomically.

    The file gets the usual permissions (0666 less the umask), not the private ones
    of ``tempfile.mkstemp``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_partial_writes(path: str | os.PathLike) -> None:
    """Delete temporary files a write to ``path`` left when it was killed mid-way."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
