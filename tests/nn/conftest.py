"""Fixtures for the neural-layer tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test on one thread: with tiny matrices a second thread only adds
    synchronisation, and training results become independent of the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
