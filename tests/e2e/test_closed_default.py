"""Closed by default on the 7.2 kernel: ADD leases only queues the node's admin declared.

Through the real executable, cold (the plugin in the executable) and warm
(relayed to the session's agent, which runs the same plugin code and reads
the same declaration). Each refusal is error 7 and touches nothing: read
back independently, no netkit in the pod's netns, no lease on any master
(queue-get), no attachment record, no pin. The unit tests of the decision
and of the file's trust checks: tests/unit/test_allowlist.py.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Nic, Runtime, leased_queues, make_nic, netkit_links

pytestmark = pytest.mark.kernel

NOTE = "node agent not used, running the command in this process"


@pytest.fixture
def uplink() -> Iterator[Nic]:
    """The node's primary NIC: carries the default route (the VM has no other)."""
    n = make_nic(4)
    subprocess.run(["ip", "addr", "add", "192.0.2.10/24", "dev", n.name], check=True)
    subprocess.run(["ip", "route", "add", "default", "via", "192.0.2.1", "dev", n.name],
                   check=True)
    yield n
    n.remove()


def untouched(rt: Runtime, netns: str, *nics: Nic) -> None:
    assert netkit_links(netns) == []
    for n in nics:
        assert leased_queues(n) == {}
    records = rt.state_dir / "attachments"
    assert not records.exists() or list(records.iterdir()) == []
    pins = Path("/sys/fs/bpf/cni-netkit/pods")
    assert not pins.exists() or list(pins.iterdir()) == []


def files(directory: Path) -> list[str]:
    return sorted(str(p) for p in directory.rglob("*")) if directory.exists() else []


def refused(rt: Runtime, conf: dict[str, Any], netns: str, path: str, **env: str) -> Any:
    """ADD answers 7, and the state dir is as before (not even a lock file made)."""
    before = files(rt.state_dir)
    out = rt("ADD", conf, netns=netns, cold=path == "cold", env=env)
    assert files(rt.state_dir) == before
    assert out.code == 1, out.stdout + out.stderr
    reply = out.json
    assert reply["code"] == 7, reply
    if path == "warm":
        assert NOTE not in out.stderr  # the agent answered it
    return reply


@pytest.mark.parametrize("path", ["cold", "warm"])
def test_undeclared_master_queue_and_primary_nic_are_refused_and_nothing_is_touched(
    nic: Nic, uplink: Nic, make_netns: Any, runtime: Runtime, path: str
) -> None:
    netns = make_netns()
    runtime.masters = f"{nic.name}=8-15"
    conf = runtime.conf(nic.name, queues="8-15")
    # The NAD names a master nobody declared (the node has it, with free queues).
    other = make_nic(4)
    try:
        got = refused(runtime, runtime.conf(other.name, queues="0-3"), netns, path)
        assert got["msg"] == f"master {other.name} is not a NIC this node leases queues of"
        assert f"declared: {nic.name} (by the node's CNI_NETKIT_MASTERS)" in got["details"]
        untouched(runtime, netns, nic, other)
    finally:
        other.remove()
    # An undeclared queue of a declared master.
    got = refused(runtime, runtime.conf(nic.name, queues="0-15"), netns, path)
    assert got["msg"] == f"queues 0-7 of {nic.name} are not declared for leasing"
    untouched(runtime, netns, nic)
    # The primary NIC, carrying the node's own traffic.
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True, check=True).stdout
    got = refused(runtime, runtime.conf(uplink.name, queues="0-3"), netns, path)
    assert got["msg"].startswith(f"master {uplink.name} is not a NIC")
    untouched(runtime, netns, nic, uplink)
    assert subprocess.run(["ip", "route"], capture_output=True, text=True,
                          check=True).stdout == routes
    # With neither the agent's pools nor the environment: refused, saying what to set.
    runtime.masters = ""
    got = refused(runtime, conf, netns, path)
    assert got["msg"] == "no master is declared for leasing on this node"
    assert "cni-netkit-pools" in got["details"] and "CNI_NETKIT_MASTERS" in got["details"]
    untouched(runtime, netns, nic)
    # What was declared still leases (and DEL needs no declaration).
    runtime.masters = f"{nic.name}=8-15"
    added = runtime("ADD", conf, netns=netns, cold=path == "cold")
    assert added.code == 0, added.stdout + added.stderr
    assert set(leased_queues(nic)) <= set(range(8, 16)) and len(leased_queues(nic)) == 1
    runtime.masters = ""
    assert runtime("DEL", conf, netns=netns, cold=path == "cold").code == 0
    untouched(runtime, netns, nic)


@pytest.mark.parametrize("path", ["cold", "warm"])
def test_the_agents_pool_file_declares_and_the_environment_narrows_it(
    nic: Nic, make_netns: Any, runtime: Runtime, path: str
) -> None:
    from cni_netkit.plugin import allowlist  # noqa: PLC0415 - after the VM check

    netns = make_netns()
    allowlist.write(runtime.state_dir, [allowlist.DeclaredPool(
        nic.name, frozenset(range(8, 16)), nic.ifindex)])
    runtime.masters = ""  # the file alone
    conf = runtime.conf(nic.name, queues="8-15")
    added = runtime("ADD", conf, netns=netns, cold=path == "cold")
    assert added.code == 0, added.stdout + added.stderr
    assert runtime("DEL", conf, netns=netns, cold=path == "cold").code == 0
    runtime.masters = f"{nic.name}=12-15"  # the environment narrows the agent's pools
    got = refused(runtime, conf, netns, path)
    assert got["msg"] == f"queues 8-11 of {nic.name} are not declared for leasing"
    assert "narrowed by the node's CNI_NETKIT_MASTERS" in got["details"]
    untouched(runtime, netns, nic)
    # A list someone other than root could have changed fails closed.
    policy = allowlist.policy_path(runtime.state_dir)
    policy.chmod(0o666)
    got = refused(runtime, runtime.conf(nic.name, queues="12-15"), netns, path)
    assert "refusing to trust it" in got["msg"]
    untouched(runtime, netns, nic)


def test_netdevsim_has_no_rss_table_so_the_declaration_alone_decides(
    nic: Nic, make_netns: Any, runtime: Runtime
) -> None:
    # The kernel's own answer for a NIC without RSS ops (EOPNOTSUPP), read here
    # with ethtool's ioctl, independently of the plugin: the plugin then trusts the
    # declaration (plugin.allowlist) -- declared queues lease, undeclared ones are
    # refused. A NIC whose table points at a pool queue is refused (unit-tested:
    # no device of the test VM has an RSS table).
    from cni_netkit.kernel import Kernel  # noqa: PLC0415

    with Kernel() as k:
        assert k.rss_table(nic.name) is None
    proc = subprocess.run(["ethtool", "-x", nic.name], capture_output=True, text=True,
                          check=False)
    assert proc.returncode != 0 and "not supported" in (proc.stderr + proc.stdout).lower()
    netns = make_netns()
    runtime.masters = f"{nic.name}=15"
    ok = runtime("ADD", runtime.conf(nic.name, queues=[15]), netns=netns)
    assert ok.code == 0, ok.stdout + ok.stderr
    assert list(leased_queues(nic)) == [15]
    got = refused(runtime, runtime.conf(nic.name, queues=[14]), netns, "warm",
                  CNI_CONTAINERID="c2", CNI_IFNAME="net2")
    assert got["msg"] == f"queues 14 of {nic.name} are not declared for leasing"
    assert list(leased_queues(nic)) == [15]
    assert runtime("DEL", runtime.conf(nic.name, queues=[15]), netns=netns).code == 0
