"""Dtype and device policy: every numerical computation in moekit is PyTorch.

EM and the other statistical fits run in float64 on the CPU by default, since
likelihood differences of 1e-6 per sample matter there; neural layers choose their
own precision. Estimators take numpy arrays, pandas frames or lists and give numpy
back; these helpers do the crossing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

EM_DTYPE = torch.float64
"""Default floating type of the statistical room."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Turn a user's ``device`` argument into a :class:`torch.device`.

    Parameters
    ----------
    device : str, torch.device or None
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``, a device object, or None for the CPU.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        If the string is not a device name, or CUDA is asked for where it is absent.
    """
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"The 'device' parameter must be 'cpu', 'cuda' or a torch.device. Got {device!r} "
            "instead."
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"The 'device' parameter is {device!r} but CUDA is not available here; use 'cpu'."
        )
    return dev


def as_tensor(a, dtype: torch.dtype = EM_DTYPE, device: str | torch.device = "cpu") -> torch.Tensor:
    """Convert an array-like to a contiguous tensor without copying when possible."""
    if isinstance(a, torch.Tensor):
        return a.to(dtype=dtype, device=device).contiguous()
    return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Detach a tensor and return it as a numpy array on the host."""
    return t.detach().cpu().numpy()


def torch_generator(random_state, device: str | torch.device = "cpu") -> torch.Generator:
    """A :class:`torch.Generator` seeded from a scikit-learn style ``random_state``.

    Integers seed it directly; a :class:`numpy.random.RandomState` or ``None`` draws a
    seed from numpy so that a given numpy state always gives the same torch stream.
    """
    from sklearn.utils import check_random_state

    if isinstance(random_state, (int, np.integer)) and not isinstance(random_state, bool):
        seed = int(random_state)
    else:
        seed = int(check_random_state(random_state).randint(0, 2**31 - 1))
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


SMALL_PASS = 4_000_000
"""Elements of the design (rows x columns) below which an EM pass runs on one thread."""


@contextlib.contextmanager
def em_threads(data) -> Iterator[None]:
    """Run EM on one CPU thread when its passes are small; restore the setting after.

    An EM pass over a small design is a few hundred tiny tensor operations. Handing
    each to a pool of threads costs more than the work, and where other processes
    load the CPU, every parallel region waits for a thread that is not scheduled:
    measured here on mcycle (133 rows, 10 starts), 0.9 s on one thread against 9 to
    45 s on two with the machine loaded, and no faster on two when it is quiet.
    """
    n_elements = data.XeT.shape[0] * data.XeT.shape[1]
    if data.XeT.device.type != "cpu" or n_elements >= SMALL_PASS:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
