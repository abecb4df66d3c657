"""netkit links against a real 7.x kernel: created as asked, read back as created."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cni_netkit.errors import NotSupported
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
