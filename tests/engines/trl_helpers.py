"""Shared pieces of the TRL engine tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models run fastest on one intra-op thread; on a shared CPU, more threads spin against each other
    (measured: a parity case takes 4.4 s with 2 threads under load, 0.6 s with 1). Restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
