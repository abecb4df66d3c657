"""AF_XDP steering end to end on the real 7.x kernel: plugin, XDP program, pods' sockets.

The node agent's part (``xsk.ensure_program``) is done by a fixture; the
plugin runs as the real executable for one full ADD/CHECK/DEL, and in-process
elsewhere (Python in the VM is slow). Kernel state is read back with bpftool
and, for traffic, by real AF_XDP sockets in the pods' netns: frames sent on
the netdevsim master in loopback arrive on the leased physical RX queue, go
through the attached program and land in the pod's copy-mode socket bound
to its netkit queue, as QEMU's would be.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cni_netkit.config import parse_invocation
from cni_netkit.errors import CheckFailed, Degraded
from cni_netkit.kernel import Kernel, xsk
from cni_netkit.plugin import commands
from cni_netkit.plugin.state import StateStore
from cni_netkit.result import Result
from tests.e2e.conftest import Nic, Runtime, declared_by_admin, netkit_links
from tests.e2e.consumers import send_on_rx_queue
from tests.kernel.xsk_receiver import XskReceiver
from tests.kernel.xsk_support import (
    FRAME,
    XDP_PASS,
    bpf_object,
    bpftool,
    outer_map,
    slot_map,
)

pytestmark = pytest.mark.kernel


@pytest.fixture
def steered(nic: Nic, root: Path) -> Nic:
    """The NIC after the node agent's part: the program attached, its maps pinned."""
    xsk.ensure_program(nic.name, bpf_object(), root=root)
    return nic


def k8s_args(pod: str, namespace: str = "vms") -> str:
    return f"K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};K8S_POD_UID=uid-{pod}"


def call(command: str, conf: dict[str, Any], *, container_id: str = "c1", netns: str = "",
         ifname: str = "net1", cni_args: str = "") -> Result | None:
    """The plugin in-process, with the real kernel."""
    environ = {"CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": netns,
               "CNI_IFNAME": ifname, "CNI_PATH": "", "CNI_ARGS": cni_args,
               "CNI_NETKIT_STATE_DIRS": conf["stateDir"]}
    inv = parse_invocation(environ, json.dumps(conf).encode())
    # The node's admin declares the test's NIC (closed by default), in this
    # request's environment as the agent sets it for a relayed one.
    token = commands.request_environ.set({**os.environ, **declared_by_admin(conf)})
    try:
        with Kernel() as kernel:
            return commands.run(inv, kernel)
    finally:
        commands.request_environ.reset(token)


def add(conf: dict[str, Any], **kw: Any) -> dict[str, Any]:
    result = call("ADD", conf, **kw)
    assert result is not None
    return result.encode("1.1.0")["netkit"]  # type: ignore[no-any-return]


def pins(root: Path, nic: Nic) -> Path:
    return xsk.master_dir(nic.name, root)


def test_add_check_del_through_the_executable(
    steered: Nic, root: Path, make_netns: Any, runtime: Runtime
) -> None:
    netns = make_netns()
    conf = runtime.conf(steered.name, queuesPerAttachment=2)
    env = {"CNI_ARGS": k8s_args("vm-a"), xsk.ROOT_ENV: str(root)}
    added = runtime("ADD", conf, netns=netns, env=env, cold=True)
    assert added.code == 0, added.stdout + added.stderr
    nk = added.json["netkit"]

    path = root / "pods" / "vms" / "vm-a" / "afxdp:c1:net1"
    assert (nk["mapPath"], nk["mapStartIndex"]) == (str(path), 1)
    assert nk["qemuNetdev"] == (
        f"ifname=net1,mode=native,queues=2,start-queue=1,inhibit=on,map-path={path},"
        "map-start-index=1")
    pinned = bpftool("map", "show", "pinned", str(path))
    assert (pinned["type"], pinned["max_entries"]) == ("xskmap", xsk.XSK_SLOTS)
    by_master = {q["masterQueue"]: q["id"] for q in nk["queues"]}
    assert outer_map(pins(root, steered) / "xsk_maps") == dict.fromkeys(by_master, pinned["id"])
    assert slot_map(pins(root, steered) / "xsk_slots") == by_master

    with_prev = {**conf, "prevResult": added.json}
    checked = runtime("CHECK", with_prev, netns=netns, env=env, cold=True)
    assert checked.code == 0, checked.stdout + checked.stderr
    # A slot unwired behind the plugin's back: CHECK says so.
    first = min(by_master)
    subprocess.run(["bpftool", "map", "delete", "pinned", str(pins(root, steered) / "xsk_maps"),
                    "key", *str(first.to_bytes(4, "little").hex(" ")).split()], check=True)
    broken = runtime("CHECK", with_prev, netns=netns, env=env, cold=True)
    assert broken.json["code"] == 102 and f"queue {first} is not wired" in broken.json["details"]

    deleted = runtime("DEL", with_prev, netns=netns, env=env, cold=True)
    assert (deleted.code, deleted.stdout) == (0, ""), deleted.stderr
    assert not path.exists() and not (root / "pods").exists()
    assert outer_map(pins(root, steered) / "xsk_maps") == {}


def tagged(tag: str) -> bytes:
    return FRAME[:14] + tag.encode() + FRAME[14 + len(tag):]


def payloads(rx: XskReceiver) -> list[bytes]:
    """What arrived, as the 8-byte tags of our frames (the stack's own traffic is ignored)."""
    return [f[14:22] for f in rx.receive(timeout=1.0) if f[:12] == FRAME[:12]]


def test_each_pod_receives_only_its_own_queues_frames(
    steered: Nic, root: Path, make_netns: Any, runtime: Runtime
) -> None:
    subprocess.run(["ethtool", "-K", steered.name, "loopback", "on"], check=True)
    conf = runtime.conf(steered.name, queues="1-2")
    pods = {}
    for pod in ("a", "b"):
        netns = make_netns()
        nk = add(conf, container_id=f"c-{pod}", netns=netns, cni_args=k8s_args(f"vm-{pod}"))
        (queue,) = [q["masterQueue"] for q in nk["queues"]]
        (link,) = netkit_links(netns)
        # What QEMU does with start-queue=1,map-start-index=1: bind queue 1, insert at 1.
        rx = XskReceiver(netns, link.index, nk["queues"][0]["id"])
        xsk.insert_socket(nk["mapPath"], nk["mapStartIndex"], rx.fileno())
        pods[pod] = (queue, rx, netns, nk)
    (qa, rx_a, netns_a, _), (qb, rx_b, _, nk_b) = pods["a"], pods["b"]

    # Pod B puts its socket into every index of its own map: the only map it has.
    for index in range(xsk.XSK_SLOTS):
        xsk.insert_socket(nk_b["mapPath"], index, rx_b.fileno())
    send_on_rx_queue(steered, qa, [tagged("to-pod-a")])
    send_on_rx_queue(steered, qb, [tagged("to-pod-b")])

    assert payloads(rx_a) == [b"to-pod-a"]
    assert payloads(rx_b) == [b"to-pod-b"]

    # Once A is deleted its queue is no longer steered: frames go to the stack.
    call("DEL", conf, container_id="c-a", netns=netns_a, cni_args=k8s_args("vm-a"))
    assert xsk.verdict(steered.name, qa, FRAME) == XDP_PASS
    send_on_rx_queue(steered, qa, [tagged("afterdel")])
    assert payloads(rx_a) == [] and payloads(rx_b) == []


def test_gc_removes_maps_and_slots_of_attachments_that_are_gone(
    steered: Nic, root: Path, make_netns: Any, runtime: Runtime
) -> None:
    conf = runtime.conf(steered.name)
    paths = {}
    for cid in ("c0", "c1", "c2"):
        paths[cid] = Path(add(conf, container_id=cid, netns=make_netns(),
                              cni_args=k8s_args(f"vm-{cid}"))["mapPath"])
    # c2's record is lost: its pin alone says whose it is.
    store = StateStore(runtime.state_dir)
    (lost,) = [a for a in store if a.container_id == "c2"]
    store.remove(lost.owner)
    # A slot wired for a queue nobody leases (its pod's netkit died with its netns).
    dead = xsk.create_map(root / "containers" / "other:c9:net1")
    xsk.wire(steered.name, dead, [xsk.XskSlot(9, 1)])
    kept = xsk.map_id(paths["c1"])

    gc_conf = {**conf, "cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "net1"}]}
    call("GC", gc_conf)

    assert [p.exists() for p in paths.values()] == [False, True, False]
    (queue,) = [q.master_queue for q in next(iter(store)).queues]
    assert outer_map(pins(root, steered) / "xsk_maps") == {queue: kept}
    assert Path(dead.path).exists()  # another network's pin: not this GC's to remove


def test_status_and_check_report_a_master_that_lost_its_program(
    steered: Nic, root: Path, make_netns: Any, runtime: Runtime
) -> None:
    conf = runtime.conf(steered.name)
    netns = make_netns()
    result = call("ADD", conf, netns=netns, cni_args=k8s_args("vm-a"))
    assert result is not None
    assert call("STATUS", conf) is None
    (pins(root, steered) / "link").unlink()  # the program goes with its only link

    with pytest.raises(Degraded, match="no cni-netkit XDP program"):
        call("STATUS", conf)
    with pytest.raises(CheckFailed, match="no cni-netkit XDP program"):
        call("CHECK", {**conf, "prevResult": result.encode("1.1.0")}, netns=netns,
             cni_args=k8s_args("vm-a"))

    xsk.ensure_program(steered.name, bpf_object())  # what the agent does on its next pass
    assert call("STATUS", conf) is None


def test_pair_mode_and_unsteered_masters_get_leases_without_a_map(
    nic: Nic, root: Path, make_netns: Any, runtime: Runtime
) -> None:
    plain = add(runtime.conf(nic.name), netns=make_netns(), cni_args=k8s_args("vm-a"))
    assert "mapPath" not in plain and "qemuNetdev" not in plain and "afxdpUnavailable" in plain
    xsk.ensure_program(nic.name, bpf_object())
    pair = add(runtime.conf(nic.name, pairing="pair", mode="l3"), container_id="c2",
               netns=make_netns(), cni_args=k8s_args("vm-b"))
    assert "mapPath" not in pair
    assert not (root / "pods").exists()
