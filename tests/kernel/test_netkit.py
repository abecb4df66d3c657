"""netkit links against a real 7.x kernel: created as asked, read back as created."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from cni_netkit.errors import AlreadyExists, InvalidRequest, NotSupported
from cni_netkit.kernel import Kernel, NetkitInfo, NetkitSpec, PeerSpec

pytestmark = pytest.mark.kernel

Defer = Callable[..., None]


def test_single_l2_netkit_reads_back_as_created(
    kernel: Kernel, make_netns: Callable[[], str], defer: Defer
) -> None:
    pod = make_netns()
    spec = NetkitSpec(
        name="eth0", netns=pod, pairing="single", mode="l2", mac="02:00:5e:10:00:01",
        mtu=1400, num_rx_queues=5, alias="cni-netkit/net1/abc/eth0",
    )

    created = kernel.create_netkit(spec)
    defer(kernel.delete_link, created.index, netns=pod)

    link = kernel.link("eth0", netns=pod)
    assert link == created
    assert link is not None
    assert (link.kind, link.mac, link.mtu, link.alias) == (
        "netkit", "02:00:5e:10:00:01", 1400, "cni-netkit/net1/abc/eth0",
    )
    assert link.num_rx_queues == 5
    assert link.netkit is not None
    info = link.netkit
    assert (info.pairing, info.mode, info.policy) == ("single", "l2", "forward")
    assert info.primary
    assert info.peer_policy is None  # no peer
    assert kernel.link("eth0") is None  # made in the pod netns, not here


def test_pair_l3_netkit_reads_back_on_both_sides(
    kernel: Kernel, make_netns: Callable[[], str], defer: Defer
) -> None:
    pod = make_netns()
    spec = NetkitSpec(
        name="nkh0", pairing="pair", mode="l3", mtu=1450, alias="host side",
        policy="blackhole", peer_policy="forward",
        peer=PeerSpec(name="eth0", netns=pod, num_rx_queues=3, mtu=1450, alias="pod side"),
    )

    primary = kernel.create_netkit(spec)
    defer(kernel.delete_link, primary.index)

    host = kernel.link("nkh0")
    peer = kernel.link("eth0", netns=pod)
    assert host is not None
    assert peer is not None
    assert host.netkit == NetkitInfo(
        pairing="pair", mode="l3", policy="blackhole", peer_policy="forward", primary=True,
        scrub="default", peer_scrub="default", headroom=0, tailroom=0,
    )
    assert peer.netkit is not None
    assert not peer.netkit.primary
    assert (peer.netkit.policy, peer.netkit.peer_policy) == ("forward", "blackhole")
    assert (host.mtu, host.alias) == (1450, "host side")
    assert (peer.mtu, peer.alias, peer.num_rx_queues) == (1450, "pod side", 3)
    # each side sees the other's netns by nsid
    assert host.link_netnsid == kernel.netns_id(pod)
    assert peer.link_netnsid == kernel.netns_id(None, netns=pod)


@pytest.mark.parametrize("pairing", ["single", "pair"])
def test_a_netkit_made_under_a_staging_name_is_returned_as_the_kernel_has_it(
    kernel: Kernel, make_netns: Callable[[], str], defer: Defer, pairing: str
) -> None:
    """create_netkit returns the renamed, aliased, up link (and a pair's peer) without
    reading it back: they must equal what the kernel reports afterwards, field for field.
    Renamed and brought up in one request: the kernel renames first (an up device
    could not be renamed)."""
    pod = make_netns()
    peer = None
    if pairing == "pair":
        peer = PeerSpec(name="nks-peer0", netns=pod, num_rx_queues=2, alias="peer alias",
                        up=True)
    spec = NetkitSpec(
        name="nks0" if pairing == "pair" else "eth0", netns=None if peer else pod,
        pairing=pairing, mode="l2", num_rx_queues=1 if peer else 2, alias="owner alias",
        staging_name="nkstage0", peer=peer, up=True,
    )
    created = kernel.create_netkit(spec)
    defer(kernel.delete_link, created.index, netns=spec.netns)
    assert (created.name, created.alias, created.up) == (spec.name, "owner alias", True)
    assert kernel.link(created.index, netns=spec.netns) == replace(created, peer=None)
    assert kernel.link("nkstage0", netns=spec.netns) is None
    if peer is None:
        assert created.peer is None
    else:
        assert created.peer is not None
        assert (created.peer.alias, created.peer.up) == ("peer alias", True)
        assert kernel.link("nks-peer0", netns=pod) == created.peer


def test_pair_l2_peer_gets_its_mac(kernel: Kernel, defer: Defer) -> None:
    primary = kernel.create_netkit(
        NetkitSpec(
            name="nkh0", pairing="pair", mode="l2", mac="02:00:5e:10:00:02",
            peer=PeerSpec(name="nkp0", mac="02:00:5e:10:00:03"),
        )
    )
    defer(kernel.delete_link, primary.index)

    host, peer = kernel.link("nkh0"), kernel.link("nkp0")
    assert host is not None
    assert peer is not None
    assert (host.mac, peer.mac) == ("02:00:5e:10:00:02", "02:00:5e:10:00:03")


def test_mac_in_l3_mode_is_refused(kernel: Kernel) -> None:
    with pytest.raises(NotSupported):
        kernel.create_netkit(NetkitSpec(name="nk0", mode="l3", mac="02:00:5e:10:00:04"))

    assert kernel.link("nk0") is None


def test_single_mode_refuses_a_blackhole_policy(kernel: Kernel) -> None:
    with pytest.raises(NotSupported):
        kernel.create_netkit(NetkitSpec(name="nk0", pairing="single", policy="blackhole"))

    assert kernel.link("nk0") is None


def test_links_lists_netkits_by_kind(kernel: Kernel, defer: Defer) -> None:
    nk = kernel.create_netkit(NetkitSpec(name="nk0"))
    defer(kernel.delete_link, nk.index)

    assert [lk.name for lk in kernel.links(kind="netkit")] == ["nk0"]
    assert "lo" in [lk.name for lk in kernel.links()]


def test_delete_link_on_a_gone_device_returns_false(kernel: Kernel) -> None:
    nk = kernel.create_netkit(NetkitSpec(name="nk0"))

    assert kernel.delete_link(nk.index) is True
    assert kernel.link(nk.index) is None
    assert kernel.delete_link(nk.index) is False


def test_a_name_taken_in_the_netns_is_eexist_and_leaves_the_first(
    kernel: Kernel, make_netns: Callable[[], str], defer: Defer
) -> None:
    pod = make_netns()
    first = kernel.create_netkit(NetkitSpec(name="nk0", netns=pod, alias="first"))
    defer(kernel.delete_link, first.index, netns=pod)

    with pytest.raises(AlreadyExists):
        kernel.create_netkit(NetkitSpec(name="nk0", netns=pod, alias="second"))

    assert kernel.link("nk0", netns=pod) == first


def test_refusals_carry_the_kernels_reason(kernel: Kernel, defer: Defer) -> None:
    nk = kernel.create_netkit(NetkitSpec(name="nk0"))
    defer(kernel.delete_link, nk.index)

    with pytest.raises(InvalidRequest) as e:
        kernel.set_link(nk.index, mtu=10)

    assert "mtu" in e.value.details.lower()  # the extack text, not strerror()


def ip_json(pod: str, *args: str) -> Any:
    out = subprocess.run(
        ["ip", "-j", "-n", Path(pod).name, *args], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout)


def test_addresses_and_routes_read_back_as_ip_route_adds_them(
    kernel: Kernel, make_netns: Callable[[], str], defer: Defer
) -> None:
    pod = make_netns()
    nk = kernel.create_netkit(NetkitSpec(name="nk0", netns=pod))
    defer(kernel.delete_link, nk.index, netns=pod)
    kernel.set_link(nk.index, netns=pod, up=True)

    for _ in range(2):  # EEXIST on the second round is not an error
        kernel.add_address(nk.index, "10.1.2.3/24", netns=pod)
        kernel.add_address(nk.index, "fd00::5/64", netns=pod)
        kernel.add_route("10.1.0.1/32", oif=nk.index, netns=pod, scope_link=True)
        kernel.add_route("0.0.0.0/0", oif=nk.index, gateway="10.1.0.1", netns=pod)
        kernel.add_route("10.9.0.0/16", oif=nk.index, gateway="10.1.0.1", netns=pod)

    (dev,) = ip_json(pod, "addr", "show", "dev", "nk0")
    addrs = {(a["local"], a["prefixlen"], a["scope"]) for a in dev["addr_info"]}
    assert {("10.1.2.3", 24, "global"), ("fd00::5", 64, "global")} <= addrs
    routes = {
        (r["dst"], r.get("gateway"), r.get("scope"), r.get("protocol"))
        for r in ip_json(pod, "-4", "route", "show")
    }
    assert {
        ("10.1.0.1", None, "link", "static"),
        ("default", "10.1.0.1", None, "static"),
        ("10.9.0.0/16", "10.1.0.1", None, "static"),
    } <= routes
