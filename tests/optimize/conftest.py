"""Fixtures shared by the optimize tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is ~10x faster than two under load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
