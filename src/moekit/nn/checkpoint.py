"""Language-model checkpoints: safetensors and JSON, written whole, checked on load.

A checkpoint is one safetensors file. Its tensors are the model's weights
(``model.<name>``), AdamW's state (``optim.<name>.step``, ``.exp_avg``,
``.exp_avg_sq``), the global RNG state (``rng.torch``) and the expert loads counted
since the last evaluation (``expert_load``); its string metadata holds the model
and training settings, the step, the log and the corpus's SHA-256 as JSON. Nothing
is pickled, so loading never executes code from the file. One file, renamed into
place, keeps weights and optimiser state from ever coming from two different steps.

Loading checks, in this order, before anything is allocated: the file size against
a limit, the header, the stored model settings (validated as
:class:`TransformerConfig`), and every tensor's name, dtype and shape against what
those settings imply (on the meta device). Then it reads the tensors and refuses
NaN, infinities and negative second moments. Any failure is a ``ValueError``
naming the file and the problem.

A model trained expert parallel (:mod:`moekit.nn.sharding`) is saved whole: the
processes gather the expert shards of the weights and of AdamW's moments, and
process 0 writes the file. The file is therefore the same whatever the number of
processes that wrote it, and loads on any number (one process, or ``W`` that slice it
again).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moekit._core.files import write_safetensors
from moekit.nn.sharding import gathered_state, sharded_parameters
from moekit.nn.transformer import MoETransformer, TransformerConfig, check_state, expected_state

__all__ = ["MAX_FILE_BYTES", "Checkpoint", "load_checkpoint", "load_lm", "save_checkpoint"]

FORMAT = "1"
MAX_FILE_BYTES = 4 * 2**30
"""Default size limit of model and checkpoint files (4 GiB), checked before reading."""
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on its JSON header
_ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "U8": torch.uint8, "I64": torch.int64}  # fmt: skip


@dataclass
class Checkpoint:
    """Everything a training run needs to go on exactly where it stopped.

    Attributes
    ----------
    model : MoETransformer
    optimizer : dict of str to dict of str to Tensor
        AdamW's ``step``, ``exp_avg`` and ``exp_avg_sq`` by parameter name.
    rng : Tensor
        ``torch.get_rng_state()`` after ``step``.
    expert_load : Tensor of shape (n_moe_layers, n_experts)
        Assignments counted since the last evaluation.
    step : int
        The last step done (0-based).
    train : dict
        The training settings (``TrainConfig`` fields).
    log : dict
        The training log so far (``TrainLog`` fields).
    corpus_sha256 : str
    """

    model: MoETransformer
    optimizer: dict[str, dict[str, Tensor]]
    rng: Tensor
    expert_load: Tensor
    step: int
    train: dict
    log: dict
    corpus_sha256: str


def save_checkpoint(path: str | os.PathLike, ck: Checkpoint) -> Path:
    """Write ``ck`` to ``path`` whole or not at all (temporary file, fsync, rename).

    For an expert-parallel model it is a collective: every process calls it, the
    expert shards are gathered, and only process 0 of the default group writes.
    """
    path = Path(path)
    tensors = {f"model.{k}": v for k, v in ck.model._to_state()[2].items()}
    for name, state in ck.optimizer.items():
        tensors.update({f"optim.{name}.{key}": state[key] for key in _ADAM_KEYS})
    if sharded_parameters(ck.model):
        tensors = gathered_state(ck.model, tensors, "model.")
        tensors = gathered_state(ck.model, tensors, "optim.")
        if torch.distributed.get_rank() != 0:
            return path
    tensors["rng.torch"] = ck.rng
    tensors["expert_load"] = ck.expert_load
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {
        "moekit_checkpoint": FORMAT,
        "model": json.dumps(dataclasses.asdict(ck.model.config)),
        "train": json.dumps(ck.train),
        "log": json.dumps(ck.log),
        "step": json.dumps(ck.step),
        "corpus_sha256": json.dumps(ck.corpus_sha256),
    }
    return write_safetensors(tensors, path, metadata)


def load_checkpoint(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`, checking all it holds.

    Parameters
    ----------
    path : path-like
    max_bytes : int, default=MAX_FILE_BYTES
        Larger files are refused before they are read.

    Returns
    -------
    Checkpoint
        The model in training mode.

    Raises
    ------
    FileNotFoundError
    ValueError
        Naming the file and the problem.
    """
    path = Path(path)
    try:
        meta, tensors = _read_checked(path, max_bytes, checkpoint=True)
        model = _model(meta["config"], _strip("model.", tensors))
        optimizer = {
            name: {key: tensors[f"optim.{name}.{key}"] for key in _ADAM_KEYS}
            for name, _ in model.named_parameters()
            if f"optim.{name}.step" in tensors
        }
        step, digest = meta["step"], meta["corpus_sha256"]
        if not isinstance(step, int) or step < 0 or not isinstance(digest, str):
            raise ValueError(f"its step {step!r} or corpus digest {digest!r} is damaged")
        if not isinstance(meta["train"], dict) or not isinstance(meta["log"], dict):
            raise ValueError("its training settings or log are damaged")
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{str(path)!r} is not a valid language-model checkpoint: {exc}") from exc
    return Checkpoint(model.train(), optimizer, tensors["rng.torch"], tensors["expert_load"],
                      step, meta["train"], meta["log"], digest)  # fmt: skip


def load_lm(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> MoETransformer:
    """The language model of a checkpoint or of a ``model.save()`` file, checked as in
    :func:`load_checkpoint`; returned in eval mode with its ``training_log``."""
    path = Path(path)
    try:
        meta, tensors = _read_checked(path, max_bytes, checkpoint=None)
        if "step" in meta:  # a checkpoint
            model, log = _model(meta["config"], _strip("model.", tensors)), meta["log"]
        else:
            model, log = _model(meta["config"], tensors), meta.get("state", {}).get("training", {})
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{str(path)!r} is not a valid language model: {exc}") from exc
    model.training_log = log
    return model.eval()


def _strip(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _model(config: TransformerConfig, tensors: dict[str, Tensor]) -> MoETransformer:
    check_state(config, tensors)
    model = MoETransformer(config)
    model.load_state_dict(tensors, strict=False)  # lm_head.weight is tied to wte
    return model


def _header(path: Path, max_bytes: int) -> tuple[dict[str, str], dict[str, dict]]:
    """The metadata and tensor entries of a safetensors file, read before any tensor."""
    if not path.is_file():
        raise FileNotFoundError(f"no model or checkpoint file at {str(path)!r}.")
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"the file has {size:,} bytes, more than the limit of {max_bytes:,}")
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if size < 8 or n > min(size - 8, _MAX_HEADER_BYTES):
            raise ValueError("it is not a safetensors file (bad header length)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"its header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    return metadata, header


def _read_checked(
    path: Path, max_bytes: int, checkpoint: bool | None
) -> tuple[dict, dict[str, Tensor]]:
    """Settings and tensors of a model file or checkpoint, every check done.

    ``checkpoint``: True or False to insist on one kind, None to take either.
    """
    from safetensors import safe_open

    metadata, entries = _header(path, max_bytes)
    is_checkpoint = metadata.get("moekit_checkpoint") == FORMAT
    if not is_checkpoint and metadata.get("class") != "MoETransformer":
        raise ValueError("it is neither a language-model checkpoint nor a MoETransformer file")
    if checkpoint is not None and checkpoint != is_checkpoint:
        raise ValueError("it is a model file without training state; train anew")
    keys = ["model", "train", "log", "step", "corpus_sha256"] if is_checkpoint else ["params"]
    missing = [k for k in keys if k not in metadata]
    if missing:
        raise ValueError(f"its metadata lacks {missing}")
    meta = {k: json.loads(metadata[k]) for k in [*keys, "state"] if k in metadata}
    config = TransformerConfig(**meta["model" if is_checkpoint else "params"])
    shapes = expected_state(config)  # on the meta device: nothing allocated yet
    expected = {f"model.{k}": v for k, v in shapes.items()} if is_checkpoint else dict(shapes)
    if is_checkpoint:
        for name, (shape, dtype) in shapes.items():
            if f"optim.{name}.step" in entries:  # a parameter without gradients has none
                expected.update({f"optim.{name}.step": ((), torch.float32),
                                 f"optim.{name}.exp_avg": (shape, dtype),
                                 f"optim.{name}.exp_avg_sq": (shape, dtype)})  # fmt: skip
        n_moe = config.n_layer // config.moe_every  # blocks i with i % m == m - 1
        expected["rng.torch"] = (tuple(torch.get_rng_state().shape), torch.uint8)
        expected["expert_load"] = ((n_moe, config.n_experts), torch.float64)
    _check_entries(entries, expected)
    with safe_open(str(path), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"tensor {name!r} holds NaN or infinite values")
        if name.endswith((".exp_avg_sq", ".step", "expert_load")) and bool((t < 0).any()):
            raise ValueError(f"tensor {name!r} holds negative values")
    return {**meta, "config": config}, tensors


def _check_entries(entries: dict[str, dict], expected: dict[str, tuple]) -> None:
    """Names, dtypes and shapes of the header against what the stored settings imply."""
    missing, unexpected = sorted(set(expected) - set(entries)), sorted(set(entries) - set(expected))
    if missing or unexpected:
        raise ValueError(f"its tensors do not match its settings (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")  # fmt: skip
    for name, (shape, dtype) in expected.items():
        entry = entries[name]
        if not isinstance(entry, dict) or _DTYPES.get(entry.get("dtype")) != dtype:
            found = entry.get("dtype") if isinstance(entry, dict) else entry
            raise ValueError(f"tensor {name!r} has dtype {found!r}; the model needs {dtype}")
        if list(entry.get("shape", [])) != list(shape):
            raise ValueError(
                f"tensor {name!r} has shape {tuple(entry.get('shape', []))}; the stored "
                f"settings imply {tuple(shape)}"
            )
