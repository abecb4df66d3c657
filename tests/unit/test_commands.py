"""The plugin's decisions and undo paths, against an in-memory fake of our kernel seam.

Kernel behaviour is not claimed here (tests/kernel and tests/e2e do that in
the VM); these pin down what the plugin asks of the seam and how it cleans up.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from cni_netkit.config import Invocation, parse_invocation
from cni_netkit.errors import (
    CheckFailed,
    Degraded,
    InterfaceExists,
    InvalidNetns,
    KernelError,
    MasterNotFound,
    NetkitError,
    NotAvailable,
    PoolExhausted,
    QueueBusy,
)
from cni_netkit.plugin import commands
from cni_netkit.plugin.state import Owner, StateStore
from tests.unit.fake_kernel import POD, FakeKernel


def inv(command: str, state: Path, *, cid: str = "c1", netns: str = POD, ifname: str = "net1",
        **conf: Any) -> Invocation:
    c: dict[str, Any] = {"cniVersion": "1.1.0", "name": "afxdp", "type": "netkit",
                         "master": "eth0", "queues": "8-15", "stateDir": str(state)}
    c.update(conf)
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns,
           "CNI_IFNAME": ifname, "CNI_PATH": "", "CNI_NETKIT_STATE_DIRS": str(state)}
    return parse_invocation(env, json.dumps(c).encode())


def test_add_creates_single_netkit_with_leases_and_record(kernel: FakeKernel, state: Path) -> None:
    res = commands.add(inv("ADD", state, queuesPerAttachment=2), kernel)
    (link,) = kernel.links_in(POD)
    assert link.kind == "netkit" and link.up and link.num_rx_queues == 3
    assert Owner.from_alias(link.alias) == Owner("afxdp", "c1", "net1")
    assert kernel.leased_master_queues() == {8: link.index, 9: link.index}
    out = res.encode("1.1.0")
    assert out["netkit"]["queues"] == [{"id": 1, "masterQueue": 8}, {"id": 2, "masterQueue": 9}]
    assert out["interfaces"] == [{"name": "net1", "mac": link.mac, "mtu": 1500, "sandbox": POD}]
    att = StateStore(state).load(Owner("afxdp", "c1", "net1"))
    assert att is not None and att.netkit_ifindex == link.index


def test_add_skips_queues_in_use_by_anyone(kernel: FakeKernel, state: Path) -> None:
    kernel.foreign_in_use = {8, 9}
    commands.add(inv("ADD", state), kernel)
    assert list(kernel.leased_master_queues()) == [10]


def test_exhausted_names_the_pool_queues_bound_without_a_lease(
    kernel: FakeKernel, state: Path
) -> None:
    """A socket closed moments ago still holds its queue for a little while: the error
    says which queues are taken that way, so the admin (or the runtime's retry) knows."""
    kernel.foreign_in_use = {8, 9, 10}
    with pytest.raises(PoolExhausted) as e:
        commands.add(inv("ADD", state, queues="8-10"), kernel)
    assert e.value.code == 100
    assert e.value.details == (
        "need 1 free queue(s), 0 free of pool 8-10; bound by AF_XDP or a memory provider "
        "without a lease: 8-10 (a consumer outside any attachment, or one that closed "
        "moments ago: retry)")
    assert kernel.links_in(POD) == []


def test_add_rechooses_when_a_queue_is_taken_between_read_and_lease(
    kernel: FakeKernel, state: Path
) -> None:
    kernel.fail["queue_create"] = QueueBusy("queue-create: EBUSY")
    commands.add(inv("ADD", state), kernel)
    assert list(kernel.leased_master_queues()) == [9]


@pytest.mark.parametrize(
    "failing", ["ensure_netns_id", "create_netkit", "queue_create", "set_link"]
)
def test_add_failure_at_any_step_undoes_everything(
    kernel: FakeKernel, state: Path, failing: str
) -> None:
    kernel.fail[failing] = KernelError(f"{failing} failed")
    with pytest.raises(KernelError):
        commands.add(inv("ADD", state, queuesPerAttachment=2), kernel)
    assert kernel.links_in(POD) == []
    assert kernel.leased_master_queues() == {}
    assert list(StateStore(state)) == []


def test_add_second_lease_failure_releases_the_first(kernel: FakeKernel, state: Path) -> None:
    calls = 0
    real = kernel.queue_create

    def flaky(*a: Any, **kw: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KernelError("queue-create: EINVAL")
        return real(*a, **kw)

    kernel.queue_create = flaky  # type: ignore[method-assign]
    with pytest.raises(KernelError):
        commands.add(inv("ADD", state, queuesPerAttachment=2), kernel)
    assert kernel.leased_master_queues() == {} and kernel.links_in(POD) == []


def test_add_looks_the_master_up_once(kernel: FakeKernel, state: Path) -> None:
    """Each lookup is an RTM_GETLINK (~8 ms in the test VM): the allow-list's serves the ADD."""
    commands.add(inv("ADD", state), kernel)
    assert kernel.link_lookups.count(("eth0", None)) == 1


def test_add_refuses_existing_ifname_and_changes_nothing(kernel: FakeKernel, state: Path) -> None:
    commands.add(inv("ADD", state), kernel)
    with pytest.raises(InterfaceExists):
        commands.add(inv("ADD", state, cid="c2"), kernel)
    assert len(kernel.leased_master_queues()) == 1


def test_add_needs_a_netns_and_a_master(
    kernel: FakeKernel, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(InvalidNetns):
        commands.add(inv("ADD", state, netns="/var/run/netns/gone"), kernel)
    monkeypatch.setenv("CNI_NETKIT_MASTERS", "eth0=0-63;eth9=0-15")  # declared, yet absent
    with pytest.raises(MasterNotFound):
        commands.add(inv("ADD", state, master="eth9"), kernel)
    assert kernel.links_in(POD) == []


def test_pool_exhaustion_is_code_100_and_leaves_nothing(kernel: FakeKernel, state: Path) -> None:
    for i in range(8):
        kernel.add_netns(f"/p{i}")
        commands.add(inv("ADD", state, cid=f"c{i}", netns=f"/p{i}"), kernel)
    with pytest.raises(PoolExhausted) as e:
        commands.add(inv("ADD", state, cid="c9"), kernel)
    assert e.value.code == 100 and "eth0" in e.value.msg and "8-15" in e.value.details
    assert kernel.links_in(POD) == []


def test_pair_mode_leases_on_the_pod_side_peer(kernel: FakeKernel, state: Path) -> None:
    res = commands.add(inv("ADD", state, pairing="pair", mode="l3"), kernel)
    (peer,) = kernel.links_in(POD)
    (host,) = [link for link in kernel.links_in(None) if link.kind == "netkit"]
    assert peer.netkit is not None and not peer.netkit.primary
    assert set(kernel.leased_master_queues().values()) == {peer.index}
    assert host.name == commands.host_ifname(Owner("afxdp", "c1", "net1"))
    assert len(host.name) <= 15
    assert [i["name"] for i in res.encode("1.1.0")["interfaces"]] == [host.name, "net1"]


@pytest.mark.parametrize(("pairing", "set_links"), [("single", 1), ("pair", 2)])
def test_add_names_and_brings_up_each_side_in_one_request(
    kernel: FakeKernel, state: Path, pairing: str, set_links: int
) -> None:
    """Every RTM_NEWLINK/GETLINK is ~2-5 ms in the test VM: the alias, the final name and
    IFF_UP go in one request per side, and the pod side is looked up only to refuse a
    name already taken (``create_netkit`` returns a pair's peer)."""
    commands.add(inv("ADD", state, pairing=pairing), kernel)
    assert all(link.up for link in kernel.links_in(POD))
    assert all(link.up for link in kernel.links_in(None) if link.kind == "netkit")
    assert kernel.calls.count("set_link") == set_links
    assert kernel.link_lookups.count(("net1", POD)) == 1


def test_del_removes_device_record_and_is_idempotent(kernel: FakeKernel, state: Path) -> None:
    commands.add(inv("ADD", state), kernel)
    commands.delete(inv("DEL", state), kernel)
    assert kernel.links_in(POD) == [] and kernel.leased_master_queues() == {}
    assert list(StateStore(state)) == []
    commands.delete(inv("DEL", state), kernel)  # again: nothing left, still fine


def test_del_with_netns_gone_or_empty(kernel: FakeKernel, state: Path) -> None:
    commands.add(inv("ADD", state), kernel)
    kernel.del_netns(POD)
    commands.delete(inv("DEL", state), kernel)
    commands.delete(inv("DEL", state, netns=""), kernel)
    assert list(StateStore(state)) == []


def test_del_never_deletes_a_device_it_does_not_own(kernel: FakeKernel, state: Path) -> None:
    commands.add(inv("ADD", state), kernel)
    commands.delete(inv("DEL", state, cid="someone-else"), kernel)
    assert len(kernel.links_in(POD)) == 1


def _killed_at(step: str, kernel: FakeKernel, state: Path, monkeypatch: pytest.MonkeyPatch,
               **conf: Any) -> None:
    """Leave the kernel and the records as an ADD SIGKILLed right after ``step`` would.

    The state is captured at the fault point, before ADD's undo (which a SIGKILL
    never runs) restores it.
    """
    seen: dict[str, Any] = {}

    def fault(at: str) -> None:
        if at == step:
            seen["devices"] = copy.deepcopy(kernel.devices)
            seen["records"] = {p: p.read_bytes() for p in state.rglob("*.json")}
            raise commands.InjectedFault(at)

    monkeypatch.setattr(commands, "fault_point", fault)
    with pytest.raises(commands.InjectedFault):
        commands.add(inv("ADD", state, **conf), kernel)
    monkeypatch.undo()
    kernel.devices = seen["devices"]
    for path, data in seen["records"].items():
        path.write_bytes(data)


@pytest.mark.parametrize(("pairing", "step"), [
    ("single", "create:made"), ("single", "create:named"),
    ("pair", "create:made"), ("pair", "create:named"), ("pair", "create:peer-named"),
])
@pytest.mark.parametrize("follow_up", ["DEL", "GC"])
def test_an_add_killed_inside_the_netkits_creation_leaves_nothing_after_del_or_gc(
    kernel: FakeKernel, state: Path, monkeypatch: pytest.MonkeyPatch, *, pairing: str, step: str,
    follow_up: str,
) -> None:
    def netkits() -> list[Any]:
        return [d.link for d in kernel.devices.values() if d.link.kind == "netkit"]

    _killed_at(step, kernel, state, monkeypatch, pairing=pairing)
    left = netkits()
    assert left  # the kill left devices, the first of them without an alias
    assert left[0].alias is None or step != "create:made"
    if follow_up == "DEL":
        commands.delete(inv("DEL", state, pairing=pairing), kernel)
    else:
        commands.gc(inv("GC", state, pairing=pairing, **{"cni.dev/valid-attachments": []}),
                    kernel, [POD])
    assert netkits() == []
    assert list(StateStore(state)) == []


def test_only_the_owners_own_names_make_an_unaliased_device_ours() -> None:
    owner = Owner("afxdp", "c1", "net1")
    staged = commands.staging_ifname(owner)
    assert staged.startswith("nkt") and len(staged) == 15
    assert staged != commands.staging_ifname(Owner("afxdp", "c2", "net1"))

    def link(name: str, alias: str | None, kind: str = "netkit") -> Any:
        return type("L", (), {"name": name, "alias": alias, "kind": kind})()

    assert commands.is_ours(link(staged, None), owner)
    assert commands.is_ours(link(commands.host_ifname(owner), None), owner)
    assert not commands.is_ours(link("net1", None), owner)  # anyone's CNI_IFNAME
    assert not commands.is_ours(link(staged, None, kind="veth"), owner)
    assert not commands.is_ours(link(staged, "someone else's"), owner)
    assert commands.is_ours(link("net1", owner.alias), owner)


def test_check_passes_then_reports_a_lost_lease(kernel: FakeKernel, state: Path) -> None:
    res = commands.add(inv("ADD", state), kernel)
    prev = res.encode("1.1.0")
    commands.check(inv("CHECK", state, prevResult=prev), kernel)
    (link,) = kernel.links_in(POD)
    kernel.devices[link.index].leases.clear()
    with pytest.raises(CheckFailed, match="no longer leased"):
        commands.check(inv("CHECK", state, prevResult=prev), kernel)


def test_check_reports_wrong_mac_and_missing_device(kernel: FakeKernel, state: Path) -> None:
    res = commands.add(inv("ADD", state), kernel)
    prev = res.encode("1.1.0")
    prev["interfaces"][0]["mac"] = "02:de:ad:be:ef:00"
    with pytest.raises(CheckFailed, match="MAC"):
        commands.check(inv("CHECK", state, prevResult=prev), kernel)
    commands.delete(inv("DEL", state), kernel)
    with pytest.raises(CheckFailed, match="not found"):
        commands.check(inv("CHECK", state, prevResult=prev), kernel)


def test_status_ready_full_and_degraded(kernel: FakeKernel, state: Path) -> None:
    commands.status(inv("STATUS", state, queues=[8]), kernel)
    commands.add(inv("ADD", state, queues=[8]), kernel)
    # Exhausted is still ready: containerd would take the node out of service.
    commands.status(inv("STATUS", state, queues=[8]), kernel)
    with pytest.raises(PoolExhausted):
        commands.add(inv("ADD", state, cid="c2", ifname="net2", queues=[8]), kernel)
    with pytest.raises(Degraded) as d:
        commands.status(inv("STATUS", state, master="eth0", queues=[8]).__class__(
            **{**inv("STATUS", state, queues=[8]).__dict__}), _without_master(kernel))
    assert d.value.code == 51


def _without_master(kernel: FakeKernel) -> FakeKernel:
    kernel.devices.pop(kernel.master.link.index)
    return kernel


def test_status_without_kernel_support_is_50(kernel: FakeKernel, state: Path) -> None:
    kernel.support = kernel.support.__class__("6.18", False, True, False)
    with pytest.raises(NotAvailable, match=r"Linux >= 7\.1"):
        commands.status(inv("STATUS", state), kernel)


def test_gc_removes_only_invalid_attachments_of_its_network(
    kernel: FakeKernel, state: Path
) -> None:
    for i in range(3):
        kernel.add_netns(f"/p{i}")
        commands.add(inv("ADD", state, cid=f"c{i}", netns=f"/p{i}"), kernel)
    kernel.add_netns("/q")
    commands.add(inv("ADD", state, cid="c0", netns="/q", name="other"), kernel)
    valid = [{"containerID": "c1", "ifname": "net1"}]
    commands.gc(inv("GC", state, **{"cni.dev/valid-attachments": valid}), kernel,
                kernel.netns)
    assert kernel.links_in("/p0") == [] and kernel.links_in("/p2") == []
    assert len(kernel.links_in("/p1")) == 1
    assert len(kernel.links_in("/q")) == 1  # network "other" is not this GC's business
    assert {(a.network, a.container_id) for a in StateStore(state)} == {
        ("afxdp", "c1"), ("other", "c0")}


def test_gc_without_a_list_removes_nothing(kernel: FakeKernel, state: Path) -> None:
    commands.add(inv("ADD", state), kernel)
    commands.gc(inv("GC", state), kernel, kernel.netns)
    assert len(kernel.links_in(POD)) == 1


def test_gc_carries_on_past_errors_and_reports_them(kernel: FakeKernel, state: Path) -> None:
    for i in range(2):
        kernel.add_netns(f"/p{i}")
        commands.add(inv("ADD", state, cid=f"c{i}", netns=f"/p{i}"), kernel)
    kernel.fail["delete_link"] = KernelError("delete failed")
    with pytest.raises(NetkitError, match="GC left 1"):
        commands.gc(inv("GC", state, **{"cni.dev/valid-attachments": []}), kernel, kernel.netns)
    assert sum(len(kernel.links_in(f"/p{i}")) for i in range(2)) == 1


def test_injected_fault_undoes_the_add(kernel: FakeKernel, state: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(commands.FAULT_ENV, "leased:1")
    with pytest.raises(commands.InjectedFault):
        commands.add(inv("ADD", state), kernel)
    assert kernel.links_in(POD) == [] and kernel.leased_master_queues() == {}


def test_gc_waits_for_an_add_holding_the_masters_lock(kernel: FakeKernel, state: Path) -> None:
    import threading  # noqa: PLC0415
    import time  # noqa: PLC0415

    from cni_netkit.plugin.lock import master_lock  # noqa: PLC0415

    commands.add(inv("ADD", state), kernel)
    held, released_at, deleted_at = threading.Event(), [0.0], [0.0]
    real_delete = kernel.delete_link

    def delete_link(index: int, *, netns: str | None = None) -> bool:
        deleted_at[0] = time.monotonic()
        return real_delete(index, netns=netns)

    kernel.delete_link = delete_link  # type: ignore[method-assign]

    def an_add_in_its_locked_section() -> None:
        with master_lock(str(state), "eth0", 5):
            held.set()
            time.sleep(0.5)
            released_at[0] = time.monotonic()

    t = threading.Thread(target=an_add_in_its_locked_section)
    t.start()
    held.wait(5)
    commands.gc(inv("GC", state, **{"cni.dev/valid-attachments": []}), kernel, kernel.netns)
    t.join()
    assert kernel.links_in(POD) == []
    assert deleted_at[0] >= released_at[0] > 0  # torn down only once the ADD let go


def test_gc_scans_one_netns_at_a_time(kernel: FakeKernel, state: Path) -> None:
    for i in range(5):
        kernel.add_netns(f"/p{i}")
        commands.add(inv("ADD", state, cid=f"c{i}", netns=f"/p{i}"), kernel)
    kernel.close()  # what ADD left open is not GC's
    commands.gc(inv("GC", state, **{"cni.dev/valid-attachments": []}), kernel, kernel.netns)
    assert kernel.most_open_netns <= 1 and kernel.open_netns == set()


def test_gc_looks_only_at_named_netns_as_the_agent_without_host_pid_does(
    tmp_path: Path,
) -> None:
    import subprocess  # noqa: PLC0415
    import time  # noqa: PLC0415

    named = tmp_path / "netns"
    named.mkdir()
    (named / "pod-a").symlink_to("/proc/self/ns/net")  # our own: skipped
    # A netns only a process holds: the cold plugin could see it, the agent cannot.
    holder = subprocess.Popen(["unshare", "--net", "sleep", "30"])
    try:
        for _ in range(100):
            if Path(f"/proc/{holder.pid}/ns/net").stat().st_ino != Path(
                    "/proc/self/ns/net").stat().st_ino:
                break
            time.sleep(0.05)
        (named / "pod-b").symlink_to(f"/proc/{holder.pid}/ns/net")
        assert list(commands._candidate_netns(str(named))) == [str(named / "pod-b")]
        (named / "pod-b").unlink()
        assert list(commands._candidate_netns(str(named))) == []  # not via /proc/<pid>
    finally:
        holder.kill()
        holder.wait()
