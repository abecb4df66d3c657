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


@pytest.fixture(autouse=True)
def declared_master(monkeypatch: pytest.MonkeyPatch) -> str:
    """This test node's admin declares the fake master's queues (closed by default).

    ADD refuses every master nobody declared (plugin.allowlist); tests of that
    refusal delete or replace the setting.
    """
    value = "eth0=0-63"
    monkeypatch.setenv("CNI_NETKIT_MASTERS", value)
    return value
