"""Shared fixtures: fixed seeds and few threads, so that runs are repeatable."""

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    np.random.seed(0)  # noqa: NPY002  (scikit-learn code under test may read the legacy global state)
    torch.manual_seed(0)
    yield


@pytest.fixture
def rng():
    return np.random.default_rng(0)
