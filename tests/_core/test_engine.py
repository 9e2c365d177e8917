"""Dtype and device policy: conversions, seeds and EM's thread setting."""

import numpy as np
import pytest
import torch

from moekit._core.engine import (
    EM_DTYPE,
    SMALL_PASS,
    as_tensor,
    em_threads,
    resolve_device,
    to_numpy,
    torch_generator,
)


def test_resolve_device_names_the_argument():
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"The 'device' parameter must be .*Got 'gpu0'"):
        resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_is_refused_where_absent():
    with pytest.raises(ValueError, match=r"'device' parameter is 'cuda' but CUDA is not"):
        resolve_device("cuda")


def test_as_tensor_keeps_contiguous_float64_memory_and_converts_the_rest():
    a = np.arange(6.0).reshape(2, 3)
    t = as_tensor(a)
    assert t.dtype == EM_DTYPE == torch.float64
    assert np.shares_memory(t.numpy(), a)  # no copy of a contiguous float64 array
    strided = as_tensor(a.T)  # a transposed view is made contiguous
    assert strided.is_contiguous() and torch.equal(strided, torch.from_numpy(a.T.copy()))
    assert as_tensor([[1, 2]], dtype=torch.float32).dtype == torch.float32
    back = as_tensor(torch.ones(3, 2).T)
    assert back.is_contiguous() and back.dtype == torch.float64


def test_to_numpy_detaches():
    t = torch.ones(2, requires_grad=True) * 2
    np.testing.assert_array_equal(to_numpy(t), [2.0, 2.0])


def test_torch_generator_seeds_from_ints_and_numpy_states():
    draw = lambda g: torch.rand(4, generator=g)  # noqa: E731
    assert torch.equal(draw(torch_generator(3)), draw(torch.Generator().manual_seed(3)))
    assert torch.equal(draw(torch_generator(np.int64(3))), draw(torch_generator(3)))
    a = draw(torch_generator(np.random.RandomState(7)))
    b = draw(torch_generator(np.random.RandomState(7)))
    assert torch.equal(a, b)  # the same numpy state gives the same torch stream


class _Data:
    def __init__(self, rows, cols):
        self.XeT = torch.empty(rows, cols)


def test_em_threads_runs_small_passes_on_one_thread_and_restores():
    before = torch.get_num_threads()
    with em_threads(_Data(3, 100)):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with em_threads(_Data(1, SMALL_PASS)):  # large: left as it is
        assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), em_threads(_Data(3, 100)):
        raise RuntimeError("restored on errors too")
    assert torch.get_num_threads() == before
