"""Chained after a primary plugin: one conflist, one CNI_IFNAME for every plugin of it.

The primary (ptp, bridge, ...) made ``eth0`` and its addresses; our netkit
needs a name of its own (``podIfname``), our result is the primary's plus our
interface, and CHECK, DEL and GC find our device through the record while the
attachment stays keyed by the spec's (network, container id, CNI_IFNAME).
Against the fake of our kernel seam (tests/e2e/test_containerd.py drives the
same through a real runtime in the VM).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from cni_netkit.config import Invocation, parse_invocation
from cni_netkit.errors import CheckFailed, InterfaceExists, InvalidConfig
from cni_netkit.kernel.types import Link
from cni_netkit.plugin import commands
from cni_netkit.plugin.leasefile import lease_entry
from cni_netkit.plugin.state import Attachment, Owner, StateStore
from tests.unit.fake_kernel import POD, FakeKernel

# What ptp + host-local answer for the pod's eth0 (the CNI 1.0.0 result shape).
PREV: dict[str, Any] = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "veth1a2b3c4d", "mac": "ee:ee:ee:ee:ee:01"},
        {"name": "eth0", "mac": "ee:ee:ee:ee:ee:02", "sandbox": POD},
    ],
    "ips": [{"interface": 1, "address": "10.22.0.5/24", "gateway": "10.22.0.1"}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {"nameservers": ["10.96.0.10"]},
}


def inv(command: str, state: Path, *, cid: str = "c1", ifname: str = "eth0",
        **conf: Any) -> Invocation:
    c: dict[str, Any] = {"cniVersion": "1.0.0", "name": "chain", "type": "netkit",
                         "master": "eth0", "queues": "8-15", "stateDir": str(state)}
    c.update(conf)
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": POD,
           "CNI_IFNAME": ifname, "CNI_PATH": "", "CNI_NETKIT_STATE_DIRS": str(state),
           "CNI_NETKIT_MASTERS": "eth0=8-15"}
    return parse_invocation(env, json.dumps(c).encode())


@pytest.fixture
def primary(kernel: FakeKernel) -> Link:
    """The primary plugin's eth0 in the pod: a veth, not ours (no alias of ours)."""
    index = next(kernel._index)  # the fake's ifindex counter
    link = Link(index, "eth0", "veth", "ee:ee:ee:ee:ee:02", 1500, True, None, 1, 1)
    kernel._add(link, POD)  # the fake's helper: a foreign device
    return link


def test_pod_ifname_defaults_to_cni_ifname_and_is_validated(state: Path) -> None:
    assert inv("ADD", state).pod_ifname == "eth0"
    assert inv("ADD", state, podIfname="net1").pod_ifname == "net1"
    for bad in ("", "a" * 16, "net/1", "net 1", 1):
        with pytest.raises(InvalidConfig) as e:
            inv("ADD", state, podIfname=bad)
        assert e.value.code == 7 and "podIfname" in e.value.details


def test_chained_without_a_name_of_its_own_says_how_to_give_one(
    kernel: FakeKernel, state: Path, primary: Link
) -> None:
    with pytest.raises(InterfaceExists) as e:
        commands.add(inv("ADD", state, prevResult=PREV), kernel)
    assert e.value.code == 101 and "podIfname" in e.value.details
    assert "prevResult" in e.value.details
    assert kernel.leased_master_queues() == {} and list(StateStore(state)) == []


def test_chained_result_is_prev_plus_our_interface(
    kernel: FakeKernel, state: Path, primary: Link
) -> None:
    res = commands.add(inv("ADD", state, podIfname="net1", prevResult=PREV), kernel)
    ours = kernel.link("net1", netns=POD)
    assert ours is not None and ours.kind == "netkit"
    assert kernel.leased_master_queues() == {8: ours.index}
    out = res.encode("1.0.0")
    assert out["interfaces"] == [
        *PREV["interfaces"], {"name": "net1", "mac": ours.mac, "sandbox": POD}
    ]
    assert out["ips"] == PREV["ips"] and out["routes"] == PREV["routes"]
    assert out["dns"] == PREV["dns"]
    assert out["netkit"]["interface"] == "net1"
    # The attachment is the spec's (network, container id, CNI_IFNAME); the device is net1.
    assert Owner.from_alias(ours.alias) == Owner("chain", "c1", "eth0")
    att = StateStore(state).load(Owner("chain", "c1", "eth0"))
    assert att is not None and att.device == "net1" and att.pod_ifname == "net1"
    assert lease_entry(att)["interface"] == "net1"


def test_chained_pair_mode_appends_both_sides_and_keeps_prevs_indexes(
    kernel: FakeKernel, state: Path, primary: Link
) -> None:
    res = commands.add(
        inv("ADD", state, podIfname="net1", pairing="pair", prevResult=PREV), kernel
    )
    out = res.encode("1.0.0")
    host = commands.host_ifname(Owner("chain", "c1", "eth0"))
    assert [i["name"] for i in out["interfaces"]] == ["veth1a2b3c4d", "eth0", host, "net1"]
    assert out["ips"] == PREV["ips"]  # still pointing at the primary's eth0 (index 1)


def test_chained_check_and_del_find_our_device_and_leave_the_primarys(
    kernel: FakeKernel, state: Path, primary: Link
) -> None:
    res = commands.add(inv("ADD", state, podIfname="net1", prevResult=PREV), kernel)
    prev = res.encode("1.0.0")
    commands.check(inv("CHECK", state, podIfname="net1", prevResult=prev), kernel)
    # CHECK of a config naming another device than the one ADD made fails.
    with pytest.raises(CheckFailed, match="not found"):
        commands.check(inv("CHECK", state, podIfname="net2", prevResult=prev), kernel)
    # DEL by the record: even a config without podIfname (changed since ADD) finds net1.
    commands.delete(inv("DEL", state, prevResult=prev), kernel)
    assert [link.name for link in kernel.links_in(POD)] == ["eth0"]
    assert kernel.leased_master_queues() == {} and list(StateStore(state)) == []
    commands.delete(inv("DEL", state, podIfname="net1"), kernel)  # idempotent


def test_del_without_a_record_finds_the_device_by_the_configs_name(
    kernel: FakeKernel, state: Path, primary: Link
) -> None:
    commands.add(inv("ADD", state, podIfname="net1", prevResult=PREV), kernel)
    StateStore(state).remove(Owner("chain", "c1", "eth0"))
    commands.delete(inv("DEL", state, podIfname="net1"), kernel)
    assert [link.name for link in kernel.links_in(POD)] == ["eth0"]
    assert kernel.leased_master_queues() == {}


def test_del_with_an_unreadable_record_finds_the_device_by_what_it_still_says(
    kernel: FakeKernel, state: Path, primary: Link
) -> None:
    commands.add(inv("ADD", state, podIfname="net1", prevResult=PREV), kernel)
    (record,) = (state / "attachments").iterdir()
    torn = record.read_text().replace('"queues"', '"queues_torn"').replace('"master"', '"m"')
    record.write_text(torn)  # no master: unreadable, but its pod_ifname is still there
    commands.delete(inv("DEL", state), kernel)  # a config without podIfname
    assert [link.name for link in kernel.links_in(POD)] == ["eth0"]
    assert kernel.leased_master_queues() == {}


def test_gc_keys_chained_attachments_by_cni_ifname(
    kernel: FakeKernel, state: Path, primary: Link
) -> None:
    commands.add(inv("ADD", state, podIfname="net1", prevResult=PREV), kernel)
    def gc(valid: list[dict[str, str]]) -> None:
        request = inv("GC", state, cniVersion="1.1.0", **{"cni.dev/valid-attachments": valid})
        commands.gc(request, kernel, netns_paths=[POD])

    gc([{"containerID": "c1", "ifname": "eth0"}])  # the runtime's key: CNI_IFNAME
    assert kernel.link("net1", netns=POD) is not None
    gc([])
    assert [link.name for link in kernel.links_in(POD)] == ["eth0"]
    assert kernel.leased_master_queues() == {} and list(StateStore(state)) == []


def test_a_record_without_pod_ifname_names_its_device_by_ifname(state: Path) -> None:
    base = Attachment(container_id="c1", ifname="net1", netns=POD, network="n", master="eth0",
                      pairing="single", mode="l2", mac=None, mtu=None, queues=())
    old = {k: v for k, v in base.to_json().items() if k != "pod_ifname"}
    assert Attachment.from_json(old).device == "net1"
    chained = dataclasses.replace(base, ifname="eth0", pod_ifname="net1")
    back = Attachment.from_json(json.loads(json.dumps(chained.to_json())))
    assert back == chained and back.device == "net1" and back.netkit.interface == "net1"
    with pytest.raises(ValueError, match="pod_ifname"):
        Attachment.from_json({**chained.to_json(), "pod_ifname": 5})
