"""Fixtures shared by the rollout-engine tests (test_engine_*.py).

A test module takes a fixture by importing it: ``from engine_helpers import one_thread  # noqa: F401``.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls run far faster on one thread than on two contended ones; the old count comes back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
