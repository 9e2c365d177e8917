"""Model files without pickle: safetensors for arrays, JSON for everything else.

A ``.moe`` file is one safetensors file. Its tensors are the fitted arrays; its
string metadata holds ``moekit_format`` (the file version), ``class`` (the model's
class name, looked up in a registry of moekit classes, never imported from the
file), ``params`` (constructor arguments, JSON) and ``state`` (other fitted
attributes, JSON). Loading reads numbers and strings only: nothing in a file is
ever executed.

Loading checks sizes before it allocates anything: the file against ``max_bytes``,
the header's length against :data:`MAX_HEADER_BYTES` and the file, and every
tensor's dtype, shape and byte range against the file's size. The model class then
compares each tensor's header entry (dtype, shape) with what its stored settings
imply before reading it (:class:`FileTensors`), and checks the values it reads.

Files are written whole or not at all: to a temporary name in the target folder,
flushed, then renamed over the target, so a crash leaves the old file intact.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit._core.files import write_safetensors

FORMAT_VERSION = "1"
MAX_FILE_BYTES = 16 * 2**30
"""Largest file :func:`load` reads unless told otherwise (``max_bytes``)."""
MAX_HEADER_BYTES = 64 * 2**20
"""Largest header (tensor table and JSON settings) :func:`load` parses."""

# safetensors' dtype codes: torch's name and bytes per element
_DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2),
    "BF16": ("bfloat16", 2), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}  # fmt: skip
_REGISTRY: dict[str, type] = {}
# modules whose import registers the models that moekit.load may rebuild
_PROVIDERS = ("moekit.estimators", "moekit.nn")

__all__ = ["MAX_FILE_BYTES", "FileTensors", "TensorSpec", "load", "register_model", "save_model"]


def register_model(cls: type) -> type:
    """Class decorator: let :func:`load` rebuild ``cls`` from a file.

    The class provides ``_to_state(self) -> (params: dict, state: dict, tensors:
    dict[str, Tensor])`` and ``_from_state(cls, params, state, tensors)``, where on
    loading ``tensors`` is a :class:`FileTensors` mapping, read on demand, whose
    :meth:`~FileTensors.check` and :meth:`~FileTensors.check_names` compare the
    header with what the settings imply before any tensor is read.
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
    return write_safetensors(tensors, path, metadata)


# ------------------------------------------------------------------ reading
@dataclass(frozen=True)
class TensorSpec:
    """What a file's header says of one tensor, before it is read."""

    dtype: str  # torch's name: "float64", "int64", ...
    shape: tuple[int, ...]


def _shape_text(shape: Iterable[int | None]) -> str:
    dims = ["n" if d is None else str(d) for d in shape]
    return f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"


class FileTensors(Mapping):
    """The tensors of an open model file, each read when it is asked for.

    :func:`load` has checked the header against the file's size; a model class
    compares each entry with what its settings imply (:meth:`check`) before reading
    it, so a file cannot make it allocate more than it expects.

    Attributes
    ----------
    specs : dict of str to TensorSpec
        The header's entry for every tensor in the file.
    """

    def __init__(self, handle: Any, specs: dict[str, TensorSpec]) -> None:
        self._handle = handle
        self.specs = specs

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.specs:
            raise KeyError(name)
        return self._handle.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def check(
        self, name: str, shape: tuple[int | None, ...], dtype: str = "float64", why: str = ""
    ) -> None:
        """Refuse a tensor that is missing or has another dtype or shape, before reading it.

        Parameters
        ----------
        name : str
        shape : tuple of int or None
            The expected shape; None matches any length along that axis.
        dtype : str, default='float64'
            torch's name of the expected dtype; no other is cast to it.
        why : str, optional
            Where the expected shape comes from, for the message.

        Raises
        ------
        ValueError
            Naming the tensor, what it has and what was expected.
        """
        spec = self.specs.get(name)
        if spec is None:
            raise ValueError(f"tensor {name!r} is missing")
        if spec.dtype != dtype:
            raise ValueError(f"tensor {name!r} has dtype {spec.dtype}, expected {dtype}")
        if len(spec.shape) != len(shape) or any(
            want is not None and got != want for got, want in zip(spec.shape, shape, strict=False)
        ):
            raise ValueError(
                f"tensor {name!r} has shape {_shape_text(spec.shape)}, expected "
                f"{_shape_text(shape)}" + (f" from {why}" if why else "")
            )

    def check_names(self, names: Iterable[str]) -> None:
        """Refuse a file whose tensors are not exactly ``names`` (missing or unexpected ones)."""
        names = set(names)
        missing, extra = sorted(names - set(self.specs)), sorted(set(self.specs) - names)
        if missing:
            raise ValueError(f"tensor(s) {missing} are missing")
        if extra:
            raise ValueError(f"unexpected tensor(s) {extra}")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_header(path: Path, size: int) -> tuple[dict[str, str], dict[str, TensorSpec]]:
    """The metadata and tensor table of a safetensors file, checked against its size."""

    def unreadable(why: str) -> ValueError:
        return ValueError(
            f"{str(path)!r} is not a readable moekit model file (corrupt, truncated or of "
            f"another format): {why}."
        )

    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise unreadable(f"{size} bytes are too few for a safetensors header")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise unreadable(f"its header claims {n} bytes but only {size - 8} follow")
        if n > MAX_HEADER_BYTES:
            raise unreadable(f"its header claims {n} bytes, more than {MAX_HEADER_BYTES}")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise unreadable(f"its header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise unreadable("its header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise unreadable("its metadata are not strings")
    specs, spans = {}, []
    for name, entry in header.items():
        try:
            code, shape, (start, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (TypeError, KeyError, ValueError) as exc:
            raise unreadable(f"tensor {name!r} has a malformed header entry") from exc
        if not isinstance(code, str) or code not in _DTYPES:
            raise unreadable(f"tensor {name!r} has an unknown dtype {code!r}")
        if not (isinstance(shape, list) and all(map(_is_count, shape))):
            raise unreadable(f"tensor {name!r} has a malformed shape {shape!r}")
        if not (_is_count(start) and _is_count(stop)):
            raise unreadable(f"tensor {name!r} has malformed offsets")
        dtype, itemsize = _DTYPES[code]
        nbytes = math.prod(shape) * itemsize
        if stop - start != nbytes:
            raise unreadable(
                f"tensor {name!r} of shape {_shape_text(shape) if shape else '()'} and dtype "
                f"{dtype} needs {nbytes} bytes but its offsets span {stop - start}"
            )
        specs[name] = TensorSpec(dtype, tuple(shape))
        spans.append((start, stop, name))
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            raise unreadable(f"tensor {name!r} starts at byte {start}, not {end}")
        end = stop
    if end != size - 8 - n:
        raise unreadable(
            f"its tensors need {end} bytes after the header; the file has {size - 8 - n}"
        )
    return metadata, specs


def _settings(path: Path, metadata: dict[str, str]) -> tuple[dict, dict]:
    out = []
    for key in ("params", "state"):
        text = metadata.get(key)
        if text is None:
            raise ValueError(f"{str(path)!r} has damaged settings: {key!r} is missing.")
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"{str(path)!r} has damaged settings: {key!r}: {exc}") from exc
        if not isinstance(value, dict):
            raise ValueError(f"{str(path)!r} has damaged settings: {key!r} is not a JSON object.")
        out.append(value)
    return out[0], out[1]


def load(path: str | os.PathLike, *, max_bytes: int = MAX_FILE_BYTES) -> Any:
    """Load a model written by ``model.save(path)``.

    Nothing in the file is executed, and what it holds is checked before it is
    used: the file's size against ``max_bytes`` and its header against the file,
    before anything is allocated; then each tensor's dtype and shape against the
    stored settings, before it is read; then its values (finite, and within the
    ranges the model's parts allow).

    Parameters
    ----------
    path : str or path-like
    max_bytes : int, default=MAX_FILE_BYTES (16 GiB)
        Largest file to read; a larger one is refused before it is read.

    Returns
    -------
    The fitted model, of the class named in the file.

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    ValueError
        If the file is too large, corrupt, truncated or of another format, names a
        class that is not a moekit model, or holds arrays of another dtype or shape
        than its settings imply, or values (NaN, infinities, negative variances, ...)
        no fit gives. The message names the file and what was wrong.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from moekit import MoERegressor, load
    >>> X = np.linspace(-1, 1, 200)[:, None]
    >>> y = np.abs(X[:, 0]) + 0.01 * np.random.default_rng(0).normal(size=200)
    >>> model = MoERegressor(n_experts=2, n_init=2, random_state=0).fit(X, y)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     model.save(Path(tmp) / "model.moe")
    ...     again = load(Path(tmp) / "model.moe")
    >>> bool(np.allclose(again.predict(X), model.predict(X)))
    True
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no model file at {str(path)!r}.")
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(
            f"{str(path)!r} holds {size} bytes, more than max_bytes={max_bytes}; pass a larger "
            "max_bytes to load it."
        )
    metadata, specs = _read_header(path, size)
    if "moekit_checkpoint" in metadata:
        raise ValueError(
            f"{str(path)!r} is a moekit language-model checkpoint, not a statistical model "
            "file: load it with moekit.nn.checkpoint.load_lm (or `moekit lm generate`)."
        )
    if metadata.get("moekit_format") != FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} is not a moekit model file (format "
            f"{metadata.get('moekit_format')!r}, expected {FORMAT_VERSION!r})."
        )
    name = metadata.get("class", "")
    cls = _lookup(name)
    params, state = _settings(path, metadata)
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error types for bad files
        raise ValueError(
            f"{str(path)!r} is not a readable moekit model file (corrupt, truncated or of "
            f"another format): {exc}"
        ) from exc
    with handle as fh:
        try:
            return cls._from_state(params, state, FileTensors(fh, specs))
        except (
            KeyError, TypeError, ValueError, RuntimeError, OverflowError, IndexError,
            SafetensorError,
        ) as exc:  # fmt: skip
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
    """Inverse of :func:`json_array`; refuses anything it would not have written."""
    import numpy as np

    if not (isinstance(obj, dict) and isinstance(obj.get("values"), list)):
        raise ValueError("a stored array is not of the form {'dtype': ..., 'values': [...]}")
    if obj.get("dtype") == "object":
        values = obj["values"]
        if not all(isinstance(v, (str, bool, int, float)) for v in values):
            raise ValueError("object arrays in moekit files hold only strings and numbers")
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out
    if not isinstance(obj.get("dtype"), str):
        raise ValueError(f"a stored array has no dtype name: {obj.get('dtype')!r}")
    dtype = np.dtype(obj["dtype"])
    if dtype.kind not in "biufU":
        raise ValueError(f"arrays of dtype {dtype} are not stored in moekit files")
    return np.asarray(obj["values"], dtype=dtype)
