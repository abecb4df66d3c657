"""Fixtures for tests against a real Linux >= 7.1 kernel with netkit and netdevsim.

These tests run inside the test VM (``scripts/vm run -- .venv/bin/python -m
pytest tests/kernel``); anywhere else tests/conftest.py skips them with the
reason.  The fixtures make what the product never does: netdevsim devices (the only
queue-leasing lessor QEMU can offer) and named network namespaces.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from cni_netkit.kernel import Kernel
from tests.kernel.support import NSIM_BUS, Nsim, del_netns, del_nsim, wait_for


@pytest.fixture
def defer() -> Iterator[Callable[..., None]]:
    """Register a cleanup right after a setup step; all run (last first) after the test."""
    with ExitStack() as stack:

        def push(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
            stack.callback(fn, *args, **kwargs)

        yield push


@pytest.fixture
def kernel() -> Iterator[Kernel]:
    """The product's Kernel; closed after the test (closing unpins netns)."""
    with Kernel() as k:
        yield k


_nsim_ids = itertools.count(os.getpid() % 10_000 * 100)


@pytest.fixture
def make_nsim(kernel: Kernel, defer: Callable[..., None]) -> Callable[[int], Nsim]:
    """Create a netdevsim device with ``queues`` RX/TX queues, up (queue-get needs it up)."""

    def make(queues: int = 4) -> Nsim:
        nsim_id = next(_nsim_ids)
        (NSIM_BUS / "new_device").write_text(f"{nsim_id} 1 {queues}")
        ports = NSIM_BUS / "devices" / f"netdevsim{nsim_id}" / "net"

        def port_names() -> list[str] | None:
            try:
                return [p.name for p in ports.iterdir()] or None
            except FileNotFoundError:
                return None

        (name,) = wait_for(port_names, f"netdevsim{nsim_id}'s port netdev")
        link = kernel.link(name)
        assert link is not None
        nsim = Nsim(nsim_id, name, link.index, queues)
        defer(del_nsim, nsim)
        kernel.set_link(link.index, up=True)
        return nsim

    return make


@pytest.fixture
def nsim(make_nsim: Callable[[int], Nsim]) -> Nsim:
    return make_nsim(4)


_netns_names = itertools.count()


@pytest.fixture
def make_netns(defer: Callable[..., None]) -> Callable[[], str]:
    """Create a named netns (with iproute2, as a container runtime would); returns its path."""

    def make() -> str:
        name = f"cnk-test-{os.getpid()}-{next(_netns_names)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        defer(del_netns, name)
        return f"/var/run/netns/{name}"

    return make


