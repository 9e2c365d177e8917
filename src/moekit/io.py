"""Model files without pickle: safetensors for arrays, JSON for everything else.

A ``.moe`` file is one safetensors file. Its tensors are the fitted arrays; its
string metadata holds ``moekit_format`` (the file version), ``class`` (the model's
class name, looked up in a registry of moekit classes, never imported from the
file), ``params`` (constructor arguments, JSON) and ``state`` (other fitted
attributes, JSON). Loading reads numbers and strings only: nothing in a file is
ever executed.

Files are written whole or not at all: to a temporary name in the target folder,
flushed, then renamed over the target, so a crash leaves the old file intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = "1"
_REGISTRY: dict[str, type] = {}
# modules whose import registers the models that moekit.load may rebuild
_PROVIDERS = ("moekit.estimators", "moekit.nn")

__all__ = ["load", "register_model", "save_model"]


def register_model(cls: type) -> type:
    """Class decorator: let :func:`load` rebuild ``cls`` from a file.

    The class provides ``_to_state(self) -> (params: dict, state: dict, tensors:
    dict[str, Tensor])`` and ``_from_state(cls, params, state, tensors)``.
    """
    _REGISTRY[cls.__name__] = cls
    return cls


def save_model(model: Any, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` atomically (temporary file, then rename).

    Parameters
    ----------
    model : registered moekit model
    path : str or path-like

    Returns
    -------
    Path
        The path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    name = type(model).__name__
    if name not in _REGISTRY:
        raise TypeError(f"{name} cannot be saved: it is not a moekit model class.")
    params, state, tensors = model._to_state()
    metadata = {
        "moekit_format": FORMAT_VERSION,
        "class": name,
        "params": json.dumps(params),
        "state": json.dumps(state),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"path: folder {str(folder)!r} does not exist.")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp makes a private file; give the model file the usual permissions
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ValueError(
            f"{str(path)!r} is not a readable moekit model file (corrupt, truncated or of "
            f"another format): {exc}"
        ) from exc
    return metadata, tensors


def load(path: str | os.PathLike) -> Any:
    """Load a model written by ``model.save(path)``.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    The fitted model, of the class named in the file.

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    ValueError
        If the file is corrupt, truncated, of another format or names a class that is
        not a moekit model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no model file at {str(path)!r}.")
    metadata, tensors = _read(path)
    if metadata.get("moekit_format") != FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} is not a moekit model file (format "
            f"{metadata.get('moekit_format')!r}, expected {FORMAT_VERSION!r})."
        )
    name = metadata.get("class", "")
    cls = _lookup(name)
    try:
        params = json.loads(metadata["params"])
        state = json.loads(metadata["state"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(path)!r} has damaged settings: {exc}") from exc
    try:
        return cls._from_state(params, state, tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{str(path)!r} does not hold a valid {name}: {exc}") from exc


def _lookup(name: str) -> type:
    import importlib

    for module in _PROVIDERS:
        if name in _REGISTRY:
            break
        try:
            importlib.import_module(module)
        except ImportError:  # pragma: no cover - a room that is not installed
            continue
    if name not in _REGISTRY:
        raise ValueError(f"the file names class {name!r}, which is not a moekit model.")
    return _REGISTRY[name]


def json_array(values: Any) -> dict[str, Any]:
    """Encode a small numpy array (e.g. ``classes_``) as JSON with its dtype kind."""
    import numpy as np

    arr = np.asarray(values)
    if arr.dtype.kind == "O" and all(
        isinstance(v, (str, bool, int, float)) for v in arr.ravel().tolist()
    ):
        # object arrays of plain strings or numbers (pandas labels) are JSON already
        return {"dtype": "object", "values": arr.tolist()}
    if arr.dtype.kind not in "biufU":
        raise TypeError(f"cannot store an array of dtype {arr.dtype} without pickle.")
    return {"dtype": arr.dtype.str, "values": arr.tolist()}


def array_from_json(obj: dict[str, Any]) -> Any:
    """Inverse of :func:`json_array`."""
    import numpy as np

    if obj["dtype"] == "object":
        values = obj["values"]
        if not all(isinstance(v, (str, bool, int, float)) for v in values):
            raise ValueError("object arrays in moekit files hold only strings and numbers")
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out
    dtype = np.dtype(obj["dtype"])
    if dtype.kind not in "biufU":
        raise ValueError(f"arrays of dtype {dtype} are not stored in moekit files")
    return np.asarray(obj["values"], dtype=dtype)
