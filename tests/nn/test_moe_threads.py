"""The fused dispatch's blocks on helper threads: same numbers, same bits, order kept."""

import random
import threading
import time

import pytest
import torch

from moekit.nn import MoE
from moekit.nn import threads as TH

# blocks above ATen's grain: 512 tokens, top-2 over 8 experts, about 128 rows of 2 * 256
D, H, T = 64, 256, 512


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def run_layer(layer, x, g):
    for p in (*layer.parameters(), x):
        p.grad = None
    y = layer(x)
    y.backward(g)
    return [y.detach(), x.grad, *(p.grad for p in layer.parameters())]


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_helper_threads_give_the_serial_result_with_the_same_bits_every_run(
    activation, monkeypatch
):
    torch.manual_seed(0)
    layer = MoE(D, H, 8, 2, activation=activation, n_shared_experts=1)
    x = torch.randn(T, D, requires_grad=True)
    g = torch.randn(T, D)
    runs = [run_layer(layer, x, g) for _ in range(3)]
    for run in runs[1:]:  # sums are added in block order: no dependence on timing
        for a, b in zip(runs[0], run, strict=True):
            assert torch.equal(a, b)
    monkeypatch.setattr(TH, "helper_threads", False)
    for a, b in zip(runs[0], run_layer(layer, x, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("two_threads")
def test_blocks_run_on_helpers_and_the_thread_count_is_kept(monkeypatch):
    from moekit.nn import fused

    names = set()
    block_forward = fused._block_forward

    def spy(*args):
        names.add((threading.current_thread().name, torch.get_num_threads()))
        return block_forward(*args)

    monkeypatch.setattr(fused, "_block_forward", spy)
    torch.manual_seed(0)
    MoE(D, H, 8, 2)(torch.randn(T, D))
    assert names and all(n.startswith("moekit-blocks") and t == 1 for n, t in names)
    assert torch.get_num_threads() == 2  # the caller's count
    seen = []
    new = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    new.start()
    new.join()
    assert seen == [2]  # and the count threads starting later take


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize(
    "n_experts, n_tokens",
    [(3, T), (8, 16)],  # at most 3 blocks for 2 threads; blocks below the grain
)
def test_few_or_small_blocks_stay_on_the_calling_thread(n_experts, n_tokens, monkeypatch):
    names = _block_threads(monkeypatch, n_experts, n_tokens, D, H, top_k=1)
    assert names == {threading.current_thread().name}


@pytest.mark.usefixtures("two_threads")
def test_adds_follow_block_order_whatever_finishes_first():
    order = []

    def work(i):
        time.sleep(random.random() / 200)
        return i

    TH.run_blocks(24, work, lambda i, result: order.append((i, result)), TH.GRAIN)
    assert order == [(i, i) for i in range(24)]


@pytest.mark.usefixtures("two_threads")
def test_a_helpers_exception_reaches_the_caller():
    def work(i):
        if i == 5:
            raise RuntimeError("block 5 failed")
        return i

    with pytest.raises(RuntimeError, match="block 5 failed"):
        TH.run_blocks(12, work, lambda i, r: None, TH.GRAIN)
    TH.run_blocks(12, lambda i: i, lambda i, r: None, TH.GRAIN)  # the helpers still serve


@pytest.mark.parametrize(
    "n_blocks, n_threads, block_size, helpers",
    [
        (64, 1, TH.LARGE_BLOCK, False),  # one thread: nothing to hand out
        (3, 2, TH.LARGE_BLOCK, False),  # fewer than two blocks per thread
        (64, 2, TH.GRAIN - 1, False),  # below the grain: no barrier to avoid
        (8, 2, TH.LARGE_BLOCK, False),  # E=8 on 2 threads, large blocks: the team
        (8, 2, TH.LARGE_BLOCK - 1, True),  # E=8, smaller blocks: the helpers
        (16, 2, TH.LARGE_BLOCK, True),  # eight blocks per thread: an even tail
        (64, 2, 4 * TH.LARGE_BLOCK, True),
        (16, 4, TH.LARGE_BLOCK, False),
    ],
)
def test_helpers_take_many_or_small_blocks_the_team_few_large_ones(
    n_blocks, n_threads, block_size, helpers
):
    assert TH.use_helpers(n_blocks, n_threads, block_size) is helpers


def _block_threads(monkeypatch, n_experts, n_tokens, d_model, d_hidden, top_k=2):
    """The names of the threads that ran the layer's expert blocks in one forward."""
    from moekit.nn import fused

    names = set()
    block_forward = fused._block_forward
    monkeypatch.setattr(
        fused,
        "_block_forward",
        lambda *a: names.add(threading.current_thread().name) or block_forward(*a),
    )
    torch.manual_seed(0)
    MoE(d_model, d_hidden, n_experts, top_k)(torch.randn(n_tokens, d_model))
    return names


@pytest.mark.usefixtures("two_threads")
def test_few_large_blocks_run_on_the_team_and_many_on_helpers(monkeypatch):
    # 4,096 tokens, top-2: 8,192 assignments; SwiGLU blocks of (rows, 2 * 1024)
    # 8 experts: 1,024 rows a block, 2 M elements, 4 blocks per thread -> the team
    team = _block_threads(monkeypatch, 8, 4096, 16, 1024)
    assert team == {threading.current_thread().name}
    # 32 experts: 256 rows a block, 0.5 M elements -> helpers
    helpers = _block_threads(monkeypatch, 32, 4096, 16, 1024)
    assert helpers and all(n.startswith("moekit-blocks") for n in helpers)
