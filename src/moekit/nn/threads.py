"""Run the blocks of the fused dispatch on helper threads, one intra-op thread each.

Why. On the CPU one expert's block is about twenty small operations (gather, two
matmuls, the activation, the weighting, the scatter-add; more in the backward), and
ATen runs each as an OpenMP parallel region over the intra-op threads: about 1,200
regions for one forward and backward at E=64. Every region ends at a barrier, and
between regions libgomp's idle threads spin (300,000 iterations by default) waiting
for the next one. On a quiet machine that costs little. When other processes compete
for the cores, the scheduler takes one of the threads off its core mid-region and
the others wait for it at the barrier, spinning through the time slices the working
threads need, again at every one of the 1,200 barriers; libgomp reads its wait policy
(``OMP_WAIT_POLICY``) once, when torch loads it, so a library cannot change it.
Running the same process with ``OMP_WAIT_POLICY=PASSIVE`` took the fused dispatch
from 31.5 s to 5.1 s per pass on this machine under contention (E=64, 2 threads).

So the blocks run as tasks instead: ``n`` helper threads (``n`` = the caller's
intra-op threads) take whole blocks from a shared counter, each running its
operations on one intra-op thread. There is no barrier inside the pass, and a
helper that loses its core delays only its own block while the others take the
remaining ones. What blocks add into shared rows (the output, the input gradient) is
added in block order under a lock, so that results do not depend on timing; blocks
write their other results (weight gradients, combine-weight gradients) to disjoint
places.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

__all__ = ["helper_threads", "run_blocks", "use_helpers"]

helper_threads = True
"""Run the blocks on helper threads when more than one intra-op thread is set (see the
module notes). False runs them one after another on the calling thread, each
operation on its intra-op team, as before the helpers existed; the benchmark sets it
to compare the two."""


class _Helpers:
    """``n`` threads that run torch operations on one intra-op thread each."""

    def __init__(self, n_threads: int) -> None:
        self.n_threads = n_threads
        self.executor = ThreadPoolExecutor(
            n_threads, thread_name_prefix="moekit-blocks", initializer=_one_intra_op_thread
        )
        # start every helper now: torch.set_num_threads(1) also sets the count that
        # threads starting later take, and that count is given back just below
        started = threading.Barrier(n_threads)
        list(self.executor.map(lambda _: started.wait(), range(n_threads)))
        torch.set_num_threads(n_threads)

    def run(self, n_blocks: int, work: Callable[[int], Any], add: Callable[[int, Any], None]):
        lock = threading.Lock()
        done: dict[int, Any] = {}  # finished blocks waiting for their turn to add
        next_to_take = next_to_add = 0

        def take() -> int:
            nonlocal next_to_take
            with lock:
                i, next_to_take = next_to_take, next_to_take + 1
            return i

        def take_blocks() -> None:
            nonlocal next_to_add
            with torch.no_grad():  # grad mode is per thread; the caller's is off here
                while (i := take()) < n_blocks:
                    result = work(i)
                    with lock:
                        done[i] = result
                        while next_to_add in done:
                            add(next_to_add, done.pop(next_to_add))
                            next_to_add += 1

        tasks = [self.executor.submit(take_blocks) for _ in range(self.n_threads)]
        for task in tasks:
            task.result()  # re-raises a helper's exception here


def _one_intra_op_thread() -> None:
    # ATen gives a thread its count lazily, from the process-wide setting, at the
    # thread's first use; use it first, or that would later overwrite the 1 set here
    torch.get_num_threads()
    torch.set_num_threads(1)


_helpers: _Helpers | None = None
_helpers_lock = threading.Lock()


def _forget_helpers() -> None:
    # a forked child has none of the parent's threads
    global _helpers
    _helpers = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_helpers)


GRAIN = 32_768
"""ATen's grain: operations on fewer elements run on one thread anyway."""

LARGE_BLOCK = 1 << 20
"""Elements from which a block's operations are long enough for the intra-op team
(about a millisecond each on two threads, against microseconds for a barrier)."""

BLOCKS_PER_THREAD = 8
"""Blocks per helper from which the helpers' uneven tail costs little (see
:func:`use_helpers`)."""


def use_helpers(n_blocks: int, n_threads: int, block_size: int) -> bool:
    """Whether :func:`run_blocks` hands ``n_blocks`` blocks of ``block_size`` elements
    (on average) to ``n_threads`` helpers, rather than run them here on the team.

    - Not with one thread, nor with fewer than two blocks per thread: the tail would
      leave helpers idle while the last blocks run on one thread each, where the team
      splits every operation.
    - Not below the grain: ATen runs each operation on one thread then, so the team
      has no barrier to wait at, and handing blocks to helpers would only add
      wake-ups (a scheduler slice each on a busy machine).
    - Not for few large blocks (fewer than :data:`BLOCKS_PER_THREAD` per thread, of at
      least :data:`LARGE_BLOCK` elements): each operation then runs long against its
      barrier, so the team loses little there, while the helpers finish unevenly (the
      last block runs while the other helpers wait; with ``b`` blocks per helper, the
      idle share is about ``1 / (2 b)``) and keep ``n_threads`` blocks' temporaries
      alive at once. Measured at E=8, top-2, 8,192 tokens, d_model 512, d_hidden 1024
      (``bench/layer_speed.py``, 2 threads, 4 blocks per thread of 4 M elements): the
      team was 8% faster, with a tenth of the page faults. At E=64 (32 blocks per
      thread) the two were even, and under contention the helpers are the ones that
      hold up (see the module notes).
    """
    if n_threads == 1 or n_blocks < 2 * n_threads or block_size < GRAIN:
        return False
    return n_blocks >= BLOCKS_PER_THREAD * n_threads or block_size < LARGE_BLOCK


def run_blocks(
    n_blocks: int,
    work: Callable[[int], Any],
    add: Callable[[int, Any], None],
    block_size: int,
) -> None:
    """``add(i, work(i))`` for every block ``i``, the ``add`` calls in block order.

    ``work`` runs on helper threads (see the module notes), with gradients off, where
    :func:`use_helpers` says so. Otherwise, and with :data:`helper_threads` False,
    everything runs here, one block after another.

    Parameters
    ----------
    n_blocks : int
    work : callable
        ``work(i)`` computes block ``i``; it may write to places no other block writes.
    add : callable
        ``add(i, result)`` adds block ``i``'s result into places blocks share.
    block_size : int
        Elements of a block's largest tensor, on average.
    """
    global _helpers
    n_threads = torch.get_num_threads()
    if not helper_threads or not use_helpers(n_blocks, n_threads, block_size):
        for i in range(n_blocks):
            add(i, work(i))
        return
    with _helpers_lock:
        if _helpers is None or _helpers.n_threads != n_threads:
            if _helpers is not None:
                _helpers.executor.shutdown(wait=True)
            _helpers = _Helpers(n_threads)
        helpers = _helpers
    helpers.run(n_blocks, work, add)
