"""Helpers of the kernel tests: netdevsim devices, netns, polling, reading leases back."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from cni_netkit.errors import NotFound
from cni_netkit.kernel import Kernel, QueueLease

NSIM_BUS = Path("/sys/bus/netdevsim")
T = TypeVar("T")


@dataclass(frozen=True)
class Nsim:
    """A netdevsim device with one port: the physical NIC whose queues get leased."""

    id: int
    name: str
    ifindex: int
    queues: int

    @property
    def sysfs(self) -> Path:
        return NSIM_BUS / "devices" / f"netdevsim{self.id}"


def del_nsim(nsim: Nsim) -> None:
    """Remove the device (and so its port netdev) unless it is gone already."""
    if nsim.sysfs.exists():
        (NSIM_BUS / "del_device").write_text(str(nsim.id))


def del_netns(name_or_path: str) -> None:
    """Delete a named netns unless it is gone already."""
    name = Path(name_or_path).name
    if (Path("/var/run/netns") / name).exists():
        subprocess.run(["ip", "netns", "del", name], check=True)


def wait_for(probe: Callable[[], T | None], what: str, timeout: float = 10.0) -> T:
    """Poll ``probe`` until it returns something; the kernel tears down asynchronously."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def lease_of(kernel: Kernel, nsim: Nsim, queue: int) -> QueueLease | None:
    """The lease on physical queue ``queue`` as queue-get reports it (None: free)."""
    try:
        return kernel.queue_get(nsim.ifindex, queue).lease
    except NotFound:
        pytest.fail(f"queue-get {nsim.name} rx {queue}: ENOENT (device down?)")
