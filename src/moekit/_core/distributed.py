"""Small helpers over :mod:`torch.distributed` for data-parallel fits.

Data-parallel EM keeps each process's rows where they are and exchanges only sums:
every E-step's sufficient statistics are all-reduced, so every process takes the
same M-step and holds the same model. These helpers are that exchange and the few
others a fit needs (row counts and offsets, a seed, the rows of the starts' subset,
a consensus on validation errors). They use the process group the caller set up
(``torch.distributed.init_process_group``, usually under ``torchrun``); nothing here
opens connections or launches processes.

Every collective goes through :func:`_collective`, which counts the bytes each
process contributes (:func:`bytes_exchanged`, for benchmarks) and turns a failure
(a peer that died, a timeout set by ``init_process_group(timeout=...)``) into one
:class:`DistributedError` that names the operation and the group's size.

Nests. Statistics are tensors, ``None`` or tuples, lists and dataclasses of them.
:func:`all_reduce_sum` and :func:`broadcast` flatten every tensor of a nest into one
buffer per dtype and device, so a pass costs one message, whatever the number of
statistics: on a network the latency per message, not the bytes, dominates small
exchanges.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "DataGroup",
    "DistributedError",
    "all_reduce_sum",
    "broadcast",
    "bytes_exchanged",
    "gather_rows",
    "is_initialized",
]


class DistributedError(RuntimeError):
    """A collective operation failed: a peer process died, hung or disagreed."""


@dataclass
class _Traffic:
    calls: int = 0
    bytes: int = 0


_TRAFFIC = _Traffic()


def bytes_exchanged() -> tuple[int, int]:
    """Collective calls made by this process so far, and the bytes it contributed.

    The bytes are the payload this process hands to each collective (for an
    all-reduce, the size of the buffer reduced). A ring all-reduce then sends about
    2 (W - 1) / W times that over each process's link, W the group's size. The
    counters only grow: benchmarks read them before and after what they measure.
    """
    return _TRAFFIC.calls, _TRAFFIC.bytes


def is_initialized() -> bool:
    """Whether :mod:`torch.distributed` is available and a process group is set up."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def _collective(name: str, n_bytes: int, op: Callable[[], Any], group=None) -> Any:
    _TRAFFIC.calls += 1
    _TRAFFIC.bytes += int(n_bytes)
    try:
        return op()
    except (RuntimeError, ValueError) as err:  # gloo and NCCL report failures as these
        size = torch.distributed.get_world_size(group)
        raise DistributedError(
            f"data-parallel fit: the collective {name} over {size} processes failed ({err}). "
            "A process of the group died, timed out or left the fit early; every process "
            "must call fit with its shard at the same time. The time to wait is set by "
            "torch.distributed.init_process_group(timeout=...)."
        ) from err


# ---------------------------------------------------------------------------- nests
def _leaves(nest: Any, out: list[torch.Tensor]) -> None:
    if nest is None or isinstance(nest, (bool, int, float, str)):
        return
    if isinstance(nest, torch.Tensor):
        out.append(nest)
    elif isinstance(nest, (tuple, list)):
        for item in nest:
            _leaves(item, out)
    elif dataclasses.is_dataclass(nest):
        for f in dataclasses.fields(nest):
            _leaves(getattr(nest, f.name), out)
    else:
        raise TypeError(f"cannot exchange a {type(nest).__name__} between processes")


def _rebuild(nest: Any, new: list[torch.Tensor]) -> Any:
    """``nest`` with its tensors replaced, in order, by those of ``new`` (consumed)."""
    if nest is None or isinstance(nest, (bool, int, float, str)):
        return nest
    if isinstance(nest, torch.Tensor):
        return new.pop(0)
    if isinstance(nest, (tuple, list)):
        return type(nest)(_rebuild(item, new) for item in nest)
    values = {f.name: _rebuild(getattr(nest, f.name), new) for f in dataclasses.fields(nest)}
    return type(nest)(**values)


def _flat_exchange(nest: Any, name: str, run: Callable[[torch.Tensor], None], group) -> Any:
    """Apply the in-place collective ``run`` to one flat buffer per (dtype, device)."""
    leaves: list[torch.Tensor] = []
    _leaves(nest, leaves)
    if not leaves:
        return nest
    keys = [(t.dtype, t.device) for t in leaves]
    out: list[torch.Tensor | None] = [None] * len(leaves)
    for key in dict.fromkeys(keys):  # first-seen order, the same on every process
        idx = [i for i, k in enumerate(keys) if k == key]
        buf = torch.cat([leaves[i].reshape(-1) for i in idx])
        _collective(name, buf.numel() * buf.element_size(), lambda b=buf: run(b), group)
        start = 0
        for i in idx:
            size = leaves[i].numel()
            out[i] = buf[start : start + size].view(leaves[i].shape)
            start += size
    return _rebuild(nest, out)


def all_reduce_sum(nest: Any, group=None) -> Any:
    """The sum over the group's processes of every tensor of ``nest``.

    Parameters
    ----------
    nest : Tensor, None, or a tuple, list or dataclass of them (nested)
        The same structure, shapes and dtypes on every process.
    group : ProcessGroup or None
        None for the default group.

    Returns
    -------
    The same structure, with new tensors holding the sums (the inputs are kept).
    """
    dist = torch.distributed
    return _flat_exchange(nest, "all_reduce", lambda b: dist.all_reduce(b, group=group), group)


def broadcast(nest: Any, src: int = 0, group=None) -> Any:
    """Every tensor of ``nest`` as process ``src`` holds it (same structure everywhere)."""
    dist = torch.distributed
    return _flat_exchange(
        nest, "broadcast", lambda b: dist.broadcast(b, src=src, group=group), group
    )


def gather_rows(t: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate the processes' (..., n_r) tensors along the last axis, in rank order.

    The row counts n_r may differ (one may be 0): they are exchanged first, and each
    block is padded to the largest for the all-gather, which wants equal sizes.
    """
    dist = torch.distributed
    size = dist.get_world_size(group)
    n = torch.tensor([t.shape[-1]], dtype=torch.int64, device=t.device)
    counts = [torch.zeros_like(n) for _ in range(size)]
    _collective("all_gather", 8, lambda: dist.all_gather(counts, n, group=group), group)
    counts = [int(c) for c in counts]
    top = max(counts)
    padded = t.new_zeros((*t.shape[:-1], top))
    padded[..., : t.shape[-1]] = t
    blocks = [torch.empty_like(padded) for _ in range(size)]
    nbytes = padded.numel() * padded.element_size()
    _collective("all_gather", nbytes, lambda: dist.all_gather(blocks, padded.contiguous(),
                                                               group=group), group)  # fmt: skip
    return torch.cat([b[..., :c] for b, c in zip(blocks, counts, strict=True)], -1)


# ---------------------------------------------------------------------------- the group
@dataclass(frozen=True)
class DataGroup:
    """The processes a data-parallel fit spans, and what it asks of them.

    Parameters
    ----------
    group : ProcessGroup or None
        None for the default group (``torchrun``'s world).
    """

    group: Any = None

    @classmethod
    def default(cls) -> DataGroup:
        """The default group; ValueError naming ``distributed`` when there is none."""
        if not is_initialized():
            raise ValueError(
                "distributed=True needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group, for instance under torchrun); "
                "none is initialised in this process."
            )
        return cls(None)

    @property
    def rank(self) -> int:
        return torch.distributed.get_rank(self.group)

    @property
    def size(self) -> int:
        return torch.distributed.get_world_size(self.group)

    @property
    def device(self) -> torch.device:
        """Where this group's tensors must be: NCCL exchanges CUDA tensors only."""
        if torch.distributed.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def sum(self, nest: Any) -> Any:
        """See :func:`all_reduce_sum`."""
        return all_reduce_sum(nest, self.group)

    def broadcast(self, nest: Any, src: int = 0) -> Any:
        """See :func:`broadcast`."""
        return broadcast(nest, src, self.group)

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """See :func:`gather_rows`."""
        return gather_rows(t, self.group)

    def row_counts(self, n_local: int) -> list[int]:
        """Every process's number of rows, in rank order."""
        dist = torch.distributed
        n = torch.tensor([n_local], dtype=torch.int64, device=self.device)
        counts = [torch.zeros_like(n) for _ in range(self.size)]
        _collective("all_gather", 8, lambda: dist.all_gather(counts, n, group=self.group),
                    self.group)  # fmt: skip
        return [int(c) for c in counts]

    def broadcast_int(self, value: int) -> int:
        """Process 0's ``value`` (a seed, say), on every process."""
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        return int(self.broadcast(t))

    def agree(self, error: BaseException | None) -> None:
        """Raise on every process when any process hit ``error`` (None: no error).

        Validation that fails on one shard only (a NaN in its rows, say) must stop
        every process, or the others would wait at their next collective until the
        timeout. The failing process re-raises its own error; the others raise a
        ValueError that names the process and repeats its message.
        """
        dist = torch.distributed
        message = None if error is None else f"{type(error).__name__}: {error}"
        messages: list[Any] = [None] * self.size
        _collective("all_gather_object", len(message or ""),
                    lambda: dist.all_gather_object(messages, message, group=self.group),
                    self.group)  # fmt: skip
        if error is not None:
            raise error
        for rank, msg in enumerate(messages):
            if msg is not None:
                raise ValueError(f"data-parallel fit: the shard of process {rank} failed: {msg}")

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every process's small picklable ``obj`` (class labels, say), in rank order.

        Uses :func:`torch.distributed.all_gather_object`, which pickles: only between
        the processes of one fit, never for files.
        """
        dist = torch.distributed
        out: list[Any] = [None] * self.size
        _collective("all_gather_object", 0,
                    lambda: dist.all_gather_object(out, obj, group=self.group),
                    self.group)  # fmt: skip
        return out

    # ------------------------------------------------- a data-parallel fit's set-up
    def shared_seed(self, random_state: Any) -> int:
        """One seed for every process: process 0's draw from its ``random_state``.

        An int is used as it is; a RandomState, a Generator or None draws one. Every
        process then makes the same random choices (starts, subsets).
        """
        from moekit._core.engine import torch_generator

        if not isinstance(random_state, numbers.Integral) or isinstance(random_state, bool):
            gen = torch_generator(random_state)
            random_state = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        return self.broadcast_int(int(random_state))

    def total_rows(self, n_local: int, shape: tuple, n_min: int, what: str = "n_experts") -> int:
        """The number of rows of all the shards, once they agree on their shapes.

        ``shape`` is what must be the same on every process (features, target
        columns); ``n_min`` is the fewest rows the fit needs over all the shards,
        named ``what`` in the error. Call :meth:`agree` on the shards' validation
        first: a shard that failed may have no shape to compare.
        """
        shapes = self.gather_objects(shape)
        if len(set(shapes)) > 1:
            raise ValueError(
                "distributed=True: the processes' shards differ in shape (features, "
                f"target columns per process: {shapes}); every shard needs the same columns."
            )
        counts = self.row_counts(n_local)
        n = sum(counts)
        if n < n_min:
            raise ValueError(
                f"Expected n_samples >= {what} but got {what} = {n_min}, "
                f"n_samples = {n} over {len(counts)} processes."
            )
        return n

    def moments(self, Xt: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Column means and standard deviations (n in the denominator) of all the rows.

        Two all-reduces, the sums and then the centred sums of squares, which round
        as one process's two-pass formula does.
        """
        Xt = Xt.to(self.device)
        mean = self.sum(Xt.sum(0)) / n
        return mean.cpu(), torch.sqrt(self.sum(((Xt - mean) ** 2).sum(0)) / n).cpu()
