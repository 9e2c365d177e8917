"""The one place moekit talks to :mod:`torch.distributed`.

Both rooms use it: data-parallel EM (:class:`DataGroup`: each process keeps its rows
and exchanges only sums of them), and the sparse layers (the expert-parallel
all-to-all, the routers' load counts, data-parallel training). It holds

- :func:`is_initialized`, :func:`get_rank` and :func:`get_world_size`: whether a
  process group is running, and this process's place in it (0 of 1 without one);
- :func:`collective`, the one wrapper every collective call goes through: it counts
  the bytes each process contributes (:func:`bytes_exchanged`, for benchmarks) and
  turns a backend failure (a peer that died, a timeout set by
  ``init_process_group(timeout=...)``) into one :class:`DistributedError` that
  names the operation, this process and the group's size;
- :func:`init_distributed` and :func:`distributed_from_env`, which join the group
  ``torchrun`` describes in the environment, and :func:`close_group`, which leaves it
  (written in :mod:`moekit._core.process_group`, with the three queries above).

Nothing here launches processes; a group is opened only on request.

Nests. Statistics are tensors, ``None`` or tuples, lists and dataclasses of them.
:func:`all_reduce_sum` and :func:`broadcast` flatten every tensor of a nest into one
buffer per dtype and device, so a pass costs one message, whatever the number of
statistics: on a network the latency per message, not the bytes, dominates small
exchanges.
"""

from __future__ import annotations

import dataclasses
import numbers
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moekit._core.process_group import (
    DEFAULT_TIMEOUT_S,
    close_group,
    distributed_from_env,
    get_rank,
    get_world_size,
    init_distributed,
    is_initialized,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "CollectiveError",
    "DataGroup",
    "DistributedError",
    "all_reduce_sum",
    "broadcast",
    "bytes_exchanged",
    "close_group",
    "collective",
    "distributed_from_env",
    "gather_rows",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_initialized",
]


class DistributedError(RuntimeError):
    """A collective failed: another process of the group died, hung or left early."""


CollectiveError = DistributedError
"""The name :mod:`moekit.nn.parallel` documents for :class:`DistributedError`."""


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


# ---------------------------------------------------------------------------- the group
def nbytes(t: torch.Tensor) -> int:
    """The payload of tensor ``t`` in bytes (what :func:`bytes_exchanged` counts)."""
    return t.numel() * t.element_size()


def collective(
    what: str, fn: Callable[..., Any], *args: Any, n_bytes: int = 0, **kwargs: Any
) -> Any:
    """Run the collective ``fn(*args, **kwargs)``, counted in :func:`bytes_exchanged`.

    Parameters
    ----------
    what : str
        The operation, for the error message ("all-reduce of the gradients").
    fn : callable
        A :mod:`torch.distributed` collective, called synchronously; its ``group``
        keyword, if any, names the group in the message.
    n_bytes : int, default=0
        This process's payload, for :func:`bytes_exchanged`.

    Raises
    ------
    DistributedError
        When the backend fails. gloo fails at once with ``Connection closed by peer``
        when a peer process dies, and with a timeout error when one stops answering;
        NCCL raises (or aborts the process, with ``TORCH_NCCL_ASYNC_ERROR_HANDLING``)
        after the group's timeout. It is raised only once the backend has let go of
        the tensors it was handed (see :func:`_await_release`).
    """
    _TRAFFIC.calls += 1
    _TRAFFIC.bytes += int(n_bytes)
    handed = _tensors(args)
    refs = _refcounts(handed)
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, ValueError) as err:  # DistBackendError and gloo's errors subclass them
        group = kwargs.get("group")
        _await_release(err, handed, refs)
        raise DistributedError(
            f"process {get_rank()} of {get_world_size(group)}: the collective {what} failed, "
            "most likely because another process of the group died or stopped responding "
            "within the process group's timeout (torch.distributed.init_process_group("
            "timeout=...)); every process must make the same collective calls in the same "
            f"order. See the other processes' logs. Backend error: {err}"
        ) from err


RELEASE_WAIT_S = 5.0
"""Longest wait, after a failed collective, for the backend to let go of its tensors."""


def _tensors(args: tuple) -> list[torch.Tensor]:
    """The tensors among ``args``, and inside the lists and tuples among them."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(t for t in a if isinstance(t, torch.Tensor))
    return out


def _refcounts(tensors: list[torch.Tensor]) -> list[int]:
    return [sys.getrefcount(t) for t in tensors]


def _await_release(err: BaseException, tensors: list[torch.Tensor], refs: list[int]) -> None:
    """Wait until the backend's threads have dropped the failed collective's ``tensors``.

    Why: a collective runs on a backend thread (gloo's worker threads), which keeps
    the failed operation and its tensors until it gets round to releasing them, and
    releasing a tensor that Python created takes the GIL. If the program ends first
    (it usually does, after such an error), that thread asks for the GIL while the
    interpreter is finalising; Python then ends the thread with ``pthread_exit``,
    whose unwinding through the operation's ``noexcept`` destructor calls
    ``std::terminate``: ``terminate called without an active exception``, and the
    process aborts. ``torch.distributed.destroy_process_group`` does not prevent it
    when anything else still holds the group, since only the group's destructor
    joins its threads.

    While a C++ object holds a tensor, torch keeps one extra reference to its Python
    object; so the backend has let go once every tensor's reference count is back to
    ``refs``, counted before the call. The traceback's frames hold references of
    their own, which are cleared first (their lines stay). Sleeping releases the
    GIL for the backend's thread; the wait is bounded by :data:`RELEASE_WAIT_S`.
    """
    traceback.clear_frames(err.__traceback__)
    deadline = time.monotonic() + RELEASE_WAIT_S
    while time.monotonic() < deadline:
        if all(now <= r for now, r in zip(_refcounts(tensors), refs, strict=True)):
            return
        time.sleep(0.001)


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


def _flat_exchange(nest: Any, run: Callable[[torch.Tensor], None]) -> Any:
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
        run(buf)
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

    def run(b: torch.Tensor) -> None:
        collective("all_reduce", dist.all_reduce, b, group=group, n_bytes=nbytes(b))

    return _flat_exchange(nest, run)


def broadcast(nest: Any, src: int = 0, group=None) -> Any:
    """Every tensor of ``nest`` as process ``src`` holds it (same structure everywhere)."""

    def run(b: torch.Tensor) -> None:
        collective("broadcast", dist.broadcast, b, src=src, group=group, n_bytes=nbytes(b))

    return _flat_exchange(nest, run)


def gather_rows(t: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate the processes' (..., n_r) tensors along the last axis, in rank order.

    The row counts n_r may differ (one may be 0): they are exchanged first, and each
    block is padded to the largest for the all-gather, which wants equal sizes.
    """
    size = dist.get_world_size(group)
    n = torch.tensor([t.shape[-1]], dtype=torch.int64, device=t.device)
    counts = [torch.zeros_like(n) for _ in range(size)]
    collective("all_gather", dist.all_gather, counts, n, group=group, n_bytes=nbytes(n))
    counts = [int(c) for c in counts]
    top = max(counts)
    padded = t.new_zeros((*t.shape[:-1], top))
    padded[..., : t.shape[-1]] = t
    blocks = [torch.empty_like(padded) for _ in range(size)]
    collective("all_gather", dist.all_gather, blocks, padded.contiguous(), group=group,
               n_bytes=nbytes(padded))  # fmt: skip
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
        return dist.get_rank(self.group)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def device(self) -> torch.device:
        """Where this group's tensors must be: NCCL exchanges CUDA tensors only."""
        if dist.get_backend(self.group) == "nccl":
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
        n = torch.tensor([n_local], dtype=torch.int64, device=self.device)
        counts = [torch.zeros_like(n) for _ in range(self.size)]
        collective("all_gather", dist.all_gather, counts, n, group=self.group, n_bytes=nbytes(n))
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
        message = None if error is None else f"{type(error).__name__}: {error}"
        messages: list[Any] = [None] * self.size
        collective("all_gather_object", dist.all_gather_object, messages, message,
                   group=self.group, n_bytes=len(message or ""))  # fmt: skip
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
        out: list[Any] = [None] * self.size
        collective("all_gather_object", dist.all_gather_object, out, obj, group=self.group)
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

    def moments(
        self, Xt: torch.Tensor, n: int, weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Column means and standard deviations (n in the denominator) of all the rows;
        with frequency weights w (n,), those of the rows repeated w_i times (W = sum w).

        Two all-reduces, the sums and then the centred sums of squares, which round
        as one process's two-pass formula does.
        """
        Xt = Xt.to(self.device)
        w = Xt.new_ones((Xt.shape[0], 1)) if weight is None else weight.to(Xt).reshape(-1, 1)
        total = n if weight is None else self.sum(w.sum())
        mean = self.sum((w * Xt).sum(0)) / total
        return mean.cpu(), torch.sqrt(self.sum((w * (Xt - mean) ** 2).sum(0)) / total).cpu()
