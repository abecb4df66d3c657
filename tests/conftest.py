"""Session-wide rule for ``@pytest.mark.kernel`` tests (tests/kernel, tests/e2e, tests/reliability).

They need a real Linux >= 7.1 with netkit and netdevsim, i.e. the test VM
(``scripts/vm``). Elsewhere they are skipped with the reason; but where
``CNI_NETKIT_REQUIRE_KERNEL=1`` (``scripts/test`` sets it in the VM) a
missing kernel feature fails them instead, so a VM that could not run them
can never look green.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NSIM_BUS = Path("/sys/bus/netdevsim")


def kernel_skip_reason() -> str | None:
    """Why kernel tests cannot run here, or None when they can."""
    release = os.uname().release
    try:
        version = tuple(int(part) for part in release.split("-")[0].split(".")[:2])
    except ValueError:
        version = (0, 0)
    if version < (7, 1):  # queue leasing first shipped in 7.1 (the 7.0 merge was reverted)
        return f"needs Linux >= 7.1 with netkit and netdevsim, this is {release}: run in scripts/vm"
    if not (NSIM_BUS / "new_device").exists():
        return "needs the netdevsim module loaded (scripts/vm's guest loads it)"
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if "kernel" not in item.keywords:
        return
    reason = kernel_skip_reason()
    if reason is None:
        return
    if os.environ.get("CNI_NETKIT_REQUIRE_KERNEL") == "1":
        pytest.fail(f"kernel test cannot run here: {reason}", pytrace=False)
    pytest.skip(reason)
