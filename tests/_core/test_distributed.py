"""The one collective wrapper and the group helpers, in a gloo group of this process alone.

With one process every reduction is the identity, so the tests check what does not
depend on the peers: structure and values kept, the bytes counted, the rank helpers,
and a failing collective turned into the one error that names it.
"""

import threading
import time
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from moekit._core import distributed as D
from moekit._core.data import EMData
from moekit._core.distributed import (
    CollectiveError,
    DataGroup,
    DistributedError,
    bytes_exchanged,
    collective,
    distributed_from_env,
    get_rank,
    get_world_size,
    init_distributed,
    is_initialized,
)

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)


@pytest.fixture
def group(tmp_path):
    """A gloo group of this process alone (world size 1), torn down afterwards."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)  # fmt: skip
    yield DataGroup()
    D.close_group()
    assert not dist.is_initialized()


@dataclass
class _Stats:
    a: torch.Tensor
    b: tuple
    n: int


def test_without_a_group_the_helpers_say_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not is_initialized() and (get_rank(), get_world_size()) == (0, 1)
    assert init_distributed() == (0, 1)  # nothing to join
    with distributed_from_env() as (rank, world):
        assert (rank, world) == (0, 1) and not is_initialized()
    with pytest.raises(ValueError, match="distributed=True needs an initialised"):
        DataGroup.default()


def test_nests_keep_structure_and_values_and_count_one_buffer_per_dtype(group):
    assert is_initialized() and (get_rank(), get_world_size()) == (0, 1)
    assert (group.rank, group.size, group.device.type) == (0, 1, "cpu")
    stats = _Stats(torch.arange(6.0, dtype=torch.float64).view(2, 3),
                   (torch.ones(2, dtype=torch.float64), None, torch.tensor([3, 4])), 7)  # fmt: skip
    calls, sent = bytes_exchanged()
    out = group.sum(stats)
    calls_after, sent_after = bytes_exchanged()
    # one float64 buffer (8 values) and one int64 buffer (2 values)
    assert (calls_after - calls, sent_after - sent) == (2, 8 * 8 + 2 * 8)
    assert isinstance(out, _Stats) and out.n == 7 and out.b[1] is None
    assert torch.equal(out.a, stats.a) and out.a is not stats.a
    assert torch.equal(out.b[2], stats.b[2])
    assert torch.equal(group.broadcast((stats.a,))[0], stats.a)
    assert group.broadcast_int(11) == 11
    assert group.row_counts(5) == [5]
    t = torch.arange(8.0).view(2, 4)
    assert torch.equal(group.gather_rows(t), t)
    assert group.gather_objects(("a", 1)) == [("a", 1)]
    group.agree(None)
    with pytest.raises(KeyError, match="own error"):
        group.agree(KeyError("own error"))
    with pytest.raises(TypeError, match="cannot exchange a set"):
        group.sum({1})


def test_gathered_rows_follow_the_global_order(group):
    gen = torch.Generator().manual_seed(0)
    XeT, y = torch.randn(3, 10, generator=gen), torch.randn(1, 10, generator=gen)
    data = EMData(XeT, XeT, y, comm=group, n_global=10)
    rows = torch.tensor([7, 2, 5])
    got = data.gathered(rows)
    assert torch.equal(got.XeT, XeT[:, rows]) and torch.equal(got.y, y[:, rows])
    assert got.shared_design


def test_a_failing_collective_is_the_one_error_naming_it(group):
    t = torch.ones(2)
    with pytest.raises(DistributedError) as info:
        collective("broadcast of the test", dist.broadcast, t, src=3, group=None)  # no rank 3
    msg = str(info.value)
    assert msg.startswith("process 0 of 1: the collective broadcast of the test failed")
    assert "another process of the group died or stopped responding" in msg
    assert info.value.__cause__ is not None
    assert CollectiveError is DistributedError and issubclass(DistributedError, RuntimeError)


def test_the_wrapper_passes_results_and_counts_calls(group):
    calls, sent = bytes_exchanged()
    assert collective("no-op", lambda x, *, k: x + k, 1, k=2, n_bytes=5) == 3
    assert bytes_exchanged() == (calls + 1, sent + 5)


def test_a_failed_collective_returns_once_the_backend_let_go_of_its_tensors():
    # a backend thread that still holds the tensor for a while after the failure, as
    # gloo's worker holds its failed operation; releasing it needs the GIL, which must
    # not happen after the interpreter has begun to finalise (see _await_release)
    t, held = torch.ones(3), []

    def backend(x):
        held.append(x)
        threading.Timer(0.3, held.clear).start()
        raise RuntimeError("Connection closed by peer")

    tick = time.monotonic()
    with pytest.raises(DistributedError, match="Connection closed by peer"):
        collective("test", backend, t)
    assert not held and time.monotonic() - tick >= 0.3


def test_a_failed_collective_that_holds_nothing_raises_at_once():
    def backend(x, parts):
        local = [x, *parts]  # references in the failed frames do not count
        raise ValueError(f"refused {len(local)}")

    tick = time.monotonic()
    with pytest.raises(DistributedError, match="refused 3"):
        collective("test", backend, torch.ones(2), [torch.ones(1), torch.ones(1)])
    assert time.monotonic() - tick < 1.0
