"""Process groups: whether one is running, this process's place in it, joining and
leaving the group ``torchrun`` describes.

Every other use of :mod:`torch.distributed` goes through :mod:`moekit._core.distributed`,
which stands on this module.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "close_group",
    "distributed_from_env",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_initialized",
]

DEFAULT_TIMEOUT_S = 300.0
"""Seconds a collective waits for the other processes before failing (see
:func:`init_distributed`)."""


def is_initialized() -> bool:
    """Whether :mod:`torch.distributed` is available and a process group is set up."""
    return dist.is_available() and dist.is_initialized()


def get_rank(group: Any = None) -> int:
    """This process's rank in ``group`` (None: the default group); 0 without a group."""
    return dist.get_rank(group) if is_initialized() else 0


def get_world_size(group: Any = None) -> int:
    """The number of processes of ``group`` (None: the default group); 1 without a group."""
    return dist.get_world_size(group) if is_initialized() else 1


def init_distributed(
    timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None
) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment.

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (set by
    ``torchrun``); with ``WORLD_SIZE`` unset or 1 it does nothing. The backend is NCCL
    when CUDA is available, else gloo.

    Parameters
    ----------
    timeout_s : float, default=DEFAULT_TIMEOUT_S
        How long a collective waits for the others before it fails: a process that
        dies or hangs makes the rest fail with an error within this time, never hang.
    backend : str, optional

    Returns
    -------
    rank, world_size : int
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or is_initialized():
        return get_rank(), get_world_size()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def close_group() -> None:
    """Leave the default process group and every group made from it, if one is set up.

    Call it on every path out of a distributed run, the failing ones included.
    """
    if is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_from_env(timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[tuple[int, int]]:
    """:func:`init_distributed` for a ``with`` block; leaves the group it made at the end."""
    made = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_initialized()
    rank, world = init_distributed(timeout_s)
    try:
        yield rank, world
    finally:
        if made:
            close_group()
