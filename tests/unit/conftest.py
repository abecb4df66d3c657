"""Fixtures the plugin-logic tests share: the fake of our kernel seam with one pod netns."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.fake_kernel import POD, FakeKernel


@pytest.fixture
def kernel() -> FakeKernel:
    """A host with master eth0 (16 RX queues) and the pod netns ``POD``."""
    k = FakeKernel(master="eth0", master_queues=16)
    k.add_netns(POD)
    return k


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"
