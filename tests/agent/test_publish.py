"""What the agent publishes: resource names, capacity, the leases annotation, the plan."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import pytest

from cni_netkit.agent import publish
from cni_netkit.agent.k8s import Node, Pod
from cni_netkit.agent.publish import (
    LEASES_ANNOTATION,
    AnnotationChange,
    Plan,
    Pool,
    capacity,
    capacity_changes,
    is_extended_resource_name,
    is_qualified_name,
    leases_value,
    plan,
    pools_for_node,
    resource_name,
)
from cni_netkit.plugin.leasefile import lease_entry
from cni_netkit.plugin.state import Attachment, LeasedQueue

from . import fake_apiserver


def att(
    pod: str | None = "p",
    *,
    ifname: str = "net1",
    network: str = "netkit-eth0",
    queues: Mapping[int, int] | None = None,
    pairing: str = "single",
    namespace: str = "ns",
    container: str = "c1",
    uid: str | None = None,
) -> Attachment:
    leased = tuple(LeasedQueue(n, m) for n, m in (queues or {1: 15}).items())
    return Attachment(
        container_id=container,
        ifname=ifname,
        netns=f"/var/run/netns/cni-{container}",
        network=network,
        master="eth0",
        pairing=pairing,
        mode="l2",
        mac="02:00:00:00:00:01",
        mtu=None,
        queues=leased,
        pod_namespace=namespace if pod else None,
        pod_name=pod,
        extra={"pod_uid": uid} if uid else {},
    )


def pod(
    name: str = "p", *, uid: str = "uid-p", annotations: Mapping[str, str] | None = None
) -> Pod:
    return Pod(
        namespace="ns",
        name=name,
        uid=uid,
        node_name="n1",
        phase="Running",
        resource_version="1",
        annotations=dict(annotations or {}),
        deleting=False,
    )


def node(
    capacity: Mapping[str, str] | None = None, allocatable: Mapping[str, str] | None = None
) -> Node:
    base = {"cpu": "2", "pods": "110"}
    return Node(
        name="n1",
        uid="u",
        resource_version="1",
        annotations={},
        capacity={**base, **(capacity or {})},
        allocatable={**base, **(allocatable if allocatable is not None else capacity or {})},
    )


# --- names ---------------------------------------------------------------------------


@pytest.mark.parametrize("master", ["eth0", "ens1f0np0", "eth0.100", "enp65s0f1", "bond0_1"])
def test_resource_name_is_the_domain_and_the_master(master: str) -> None:
    name = resource_name(master)
    assert name == f"netkit.cni.dev/{master}"
    assert is_extended_resource_name(name)


@pytest.mark.parametrize("master", ["eth0@1", "vlan:2", "-eth0", "eth0_", "a b", ""])
def test_resource_name_refuses_ifnames_kubernetes_cannot_carry(master: str) -> None:
    with pytest.raises(ValueError, match="resourceName"):
        resource_name(master)


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("example.com/dongle", True),
        ("netkit.cni.dev/eth0", True),
        ("cpu", False),  # native
        ("kubernetes.io/eth0", False),  # the kubernetes.io namespace is reserved
        ("node.kubernetes.io/x", False),
        ("requests.example.com/x", False),
        ("Example.com/x", False),  # the domain must be lower case
        ("example.com/", False),
        ("example.com/" + "x" * 64, False),  # name part at most 63
        ("example.com/" + "x" * 63, True),
        ("ex_ample.com/x", False),
    ],
)
def test_extended_resource_names_follow_kubernetes(name: str, ok: bool) -> None:
    assert is_extended_resource_name(name) is ok


@pytest.mark.parametrize(
    "key",
    [
        "a",
        "netkit.cni.dev/leases",
        "k8s.v1.cni.cncf.io/network-status",
        "A_b.c-D",
        "x/y",
        "bad key",
        "Upper.Domain/x",
        "/x",
        "x/",
        "-a",
        "a" * 64,
        "d/" + "a" * 63,
    ],
)
def test_qualified_names_agree_with_the_fake_api_server(key: str) -> None:
    # Two independent implementations of the same apimachinery rule.
    assert is_qualified_name(key) == fake_apiserver.is_qualified_name(key)


# --- pool configuration ------------------------------------------------------------------


def test_pool_queues_follow_the_cni_config_rules() -> None:
    # The agent advertises the pool the plugin config leases from: one parser, one set of rules.
    doc = {"pools": [{"master": "eth0", "queues": "8-11,14"}]}
    assert pools_for_node(doc, "n1")[0].queues == (8, 9, 10, 11, 14)
    with pytest.raises(ValueError, match="listed twice"):
        pools_for_node({"pools": [{"master": "eth0", "queues": [5, 3, 3]}]}, "n1")
    with pytest.raises(ValueError, match="reversed"):
        pools_for_node({"pools": [{"master": "eth0", "queues": "11-8"}]}, "n1")


def test_pools_for_node_uses_the_node_override_instead_of_the_default() -> None:
    doc = {
        "pools": [{"master": "eth0", "queues": "8-15"}],
        "nodes": {
            "gpu-1": {
                "pools": [{"master": "ens1f0np0", "queues": [12, 13], "queuesPerAttachment": 2}]
            }
        },
    }
    (default,) = pools_for_node(doc, "worker-1")
    assert default == Pool("eth0", tuple(range(8, 16)), 1, "netkit.cni.dev/eth0")
    (special,) = pools_for_node(doc, "gpu-1")
    assert special == Pool("ens1f0np0", (12, 13), 2, "netkit.cni.dev/ens1f0np0")
    assert pools_for_node({}, "any") == ()


def test_pools_for_node_keeps_an_explicit_resource_name() -> None:
    doc = {"pools": [{"master": "eth0@x", "queues": "1", "resourceName": "example.com/fast"}]}
    assert pools_for_node(doc, "n")[0].resource == "example.com/fast"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"pools": [{"queues": "1"}]}, r"pools\[0\]: needs a 'master'"),
        ({"pools": [{"master": "eth0", "queues": "9-8"}]}, r"pools\[0\]: range 9-8 is reversed"),
        ({"pools": [{"master": "eth0"}]}, r"pools\[0\]: the pool is empty"),
        (
            {"pools": [{"master": "eth0", "queues": "1", "queuesPerAttachment": 0}]},
            "queuesPerAttachment must be >= 1",
        ),
        (
            {"pools": [{"master": "eth0", "queues": "1", "resourceName": "cpu"}]},
            "not an extended resource",
        ),
        (
            {"pools": [{"master": "eth0", "queues": "1"}, {"master": "eth0", "queues": "2"}]},
            "appears in two pools",
        ),
        ({"pools": {"master": "eth0"}}, "must be a list"),
        (
            {"nodes": {"n": {"pools": [{"master": "a:b", "queues": "1"}]}}},
            r"pools\[0\] of node n: .*resourceName",
        ),
    ],
)
def test_pools_for_node_names_the_bad_entry(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pools_for_node(doc, "n")


def test_capacity_counts_whole_attachments_of_usable_queues() -> None:
    pool = Pool("eth0", tuple(range(8, 16)))
    assert capacity(pool) == 8
    assert capacity(pool, existing=range(12)) == 4  # the NIC has queues 0-11 only
    assert capacity(pool, foreign={8, 9}) == 6  # held by another control plane
    assert capacity(pool, usable=False) == 0  # the probe says it cannot lease
    pairs = Pool("eth0", tuple(range(8, 15)), queues_per_attachment=2)
    assert capacity(pairs) == 3  # 7 queues serve 3 attachments of 2


# --- the annotation ---------------------------------------------------------------------


def test_lease_entry_has_the_documented_shape() -> None:
    entry = lease_entry(att(queues={2: 9, 1: 8}))
    assert entry == {
        "network": "netkit-eth0",
        "interface": "net1",
        "master": "eth0",
        "queues": [1, 2],
        "masterQueues": [8, 9],
        "mac": "02:00:00:00:00:01",
        # No steering program on the master: no consumer arguments, and why (as in the result).
        "afxdpUnavailable": att().netkit.afxdp_unavailable,
    }
    assert entry["afxdpUnavailable"].startswith("master eth0 has no cni-netkit XDP program")


def test_lease_entry_carries_the_xsk_map_when_there_is_one() -> None:
    with_map = dataclasses.replace(
        att(), extra={"map_path": "/sys/fs/bpf/cni-netkit/x/xsks", "map_start_index": 0}
    )
    entry = lease_entry(with_map)
    assert (entry["mapPath"], entry["mapStartIndex"]) == ("/sys/fs/bpf/cni-netkit/x/xsks", 0)
    assert entry["qemuNetdev"].endswith(",map-path=/sys/fs/bpf/cni-netkit/x/xsks,map-start-index=0")
    assert entry["dpdkVdev"].endswith(",dp_path=/sys/fs/bpf/cni-netkit/x/xsks,busy_budget=0")
    assert "mapPath" not in lease_entry(att()) and "qemuNetdev" not in lease_entry(att())


def test_pair_mode_gets_no_qemu_arguments() -> None:
    # The kernel refuses AF_XDP on a netkit pair; do not suggest it.
    assert "qemuNetdev" not in lease_entry(att(pairing="pair"))


def test_leases_value_is_canonical_and_none_when_empty() -> None:
    a, b = att(ifname="net2", container="c2"), att(ifname="net1")
    value = leases_value([a, b])
    assert value == leases_value([b, a])
    assert value is not None
    assert value == json.dumps(json.loads(value), sort_keys=True, separators=(",", ":"))
    assert [e["interface"] for e in json.loads(value)] == ["net1", "net2"]
    assert leases_value([]) is None


# --- the plan ---------------------------------------------------------------------------


def test_plan_annotates_a_pod_that_has_leases() -> None:
    a = att()
    got = plan(attachments=[a], pods=[pod()], node=node(), capacities={})
    assert got.annotations == (AnnotationChange("ns", "p", "uid-p", leases_value([a])),)
    assert got.orphans == ()


def test_plan_leaves_a_correct_annotation_alone() -> None:
    a = att()
    current = pod(annotations={LEASES_ANNOTATION: leases_value([a]) or ""})
    assert plan(attachments=[a], pods=[current], node=node(), capacities={}).empty


def test_plan_clears_the_annotation_once_the_leases_are_gone() -> None:
    stale = pod(annotations={LEASES_ANNOTATION: "[]", "other": "x"})
    got = plan(attachments=[], pods=[stale, pod("q", uid="uid-q")], node=node(), capacities={})
    assert got.annotations == (AnnotationChange("ns", "p", "uid-p", None),)


def test_plan_puts_all_of_a_pods_attachments_in_one_annotation() -> None:
    a, b = att(ifname="net1"), att(ifname="net2", network="netkit-eth1", container="c1")
    (change,) = plan(attachments=[a, b], pods=[pod()], node=node(), capacities={}).annotations
    assert change.value is not None
    assert [e["network"] for e in json.loads(change.value)] == ["netkit-eth0", "netkit-eth1"]


def test_plan_reports_attachments_of_pods_not_on_the_node_as_orphans() -> None:
    gone, here = att("gone", container="c9"), att("p")
    got = plan(attachments=[gone, here], pods=[pod()], node=node(), capacities={})
    assert got.orphans == (gone,)
    assert [c.name for c in got.annotations] == ["p"]


def test_plan_never_gives_a_new_pod_the_leases_of_the_old_one_of_the_same_name() -> None:
    old = att(uid="uid-old")
    got = plan(attachments=[old], pods=[pod(uid="uid-new")], node=node(), capacities={})
    assert got.orphans == (old,)
    assert got.annotations == ()  # nothing to publish for the new pod yet


def test_plan_ignores_attachments_without_a_pod() -> None:
    # A non-Kubernetes runtime (podman, a test): not ours to publish or collect.
    assert plan(attachments=[att(None)], pods=[], node=node(), capacities={}).empty


def test_capacity_changes_set_missing_and_differing_counts_only() -> None:
    res = "netkit.cni.dev/eth0"
    assert capacity_changes(node(), {res: 4}) == {res: 4}
    assert capacity_changes(node({res: "4"}), {res: 4}) == {}
    assert capacity_changes(node({res: "4"}), {res: 3}) == {res: 3}
    # capacity right but allocatable not (yet): the scheduler reads allocatable.
    assert capacity_changes(node({res: "4"}, {}), {res: 4}) == {res: 4}
    assert capacity_changes(node({res: "4k"}), {res: 4}) == {res: 4}


def test_capacity_changes_remove_our_resources_no_pool_declares_and_nothing_else() -> None:
    cur = node({"netkit.cni.dev/eth0": "4", "netkit.cni.dev/old": "2", "example.com/gpu": "1"})
    assert capacity_changes(cur, {"netkit.cni.dev/eth0": 4}) == {"netkit.cni.dev/old": None}


def test_capacity_changes_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="negative"):
        capacity_changes(node(), {"netkit.cni.dev/eth0": -1})
    with pytest.raises(ValueError, match="not an extended resource"):
        capacity_changes(node(), {"cpu": 1})


def test_plan_carries_the_capacity_changes() -> None:
    got = plan(attachments=[], pods=[], node=node(), capacities={"netkit.cni.dev/eth0": 2})
    assert got == Plan(capacity={"netkit.cni.dev/eth0": 2})
    assert not got.empty


def test_plan_is_pure() -> None:
    # Same inputs, same answer; inputs untouched.
    atts, pods = [att("gone", container="c9"), att()], [pod()]
    first = plan(attachments=atts, pods=pods, node=node(), capacities={})
    assert plan(attachments=atts, pods=pods, node=node(), capacities={}) == first
    assert pods == [pod()]
    assert publish.LEASES_ANNOTATION == "netkit.cni.dev/leases"
