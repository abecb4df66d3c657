"""Queue leasing against a real 7.x kernel: what netdev's queue-create does and refuses.

Every lease is checked on the lessor's side, with queue-get on the physical
(netdevsim) queue: that is where the kernel records who holds it.
"""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from cni_netkit.errors import (
    InvalidRequest,
    NotFound,
    NotSupported,
    QueueBusy,
    QueueOutOfRange,
)
from cni_netkit.kernel import Kernel, Link, NetkitSpec, PeerSpec, QueueLease
from cni_netkit.kernel.netdev import NETDEV_QUEUE_TYPE_TX
from cni_netkit.kernel.netdev_socket import NetdevSocket
from tests.kernel.support import Nsim, del_nsim, lease_of, wait_for

pytestmark = pytest.mark.kernel

Defer = Callable[..., None]


def single(
    kernel: Kernel, defer: Defer, name: str, *, netns: str | None = None, leases: int = 2
) -> Link:
    """A single-mode netkit able to hold ``leases`` leases, deleted after the test."""
    link = kernel.create_netkit(
        NetkitSpec(name=name, netns=netns, pairing="single", num_rx_queues=1 + leases)
    )
    defer(kernel.delete_link, link.index, netns=netns)
    return link


def test_single_netkit_in_pod_leases_queues_as_ids_from_1(
    kernel: Kernel, nsim: Nsim, make_netns: Callable[[], str], defer: Defer
) -> None:
    pod = make_netns()
    nk = single(kernel, defer, "nk0", netns=pod, leases=2)
    # The request is sent from the pod netns, naming the host netns by its nsid there.
    host_nsid = kernel.ensure_netns_id(None, netns=pod)

    ids = [
        kernel.queue_create(
            nk.index, lessor_ifindex=nsim.ifindex, lessor_queue=q, netns=pod,
            lessor_netns_id=host_nsid,
        )
        for q in (2, 3)
    ]

    assert ids == [1, 2]
    # queue-get reports the netkit's netns by its nsid as seen from here
    pod_nsid = kernel.ensure_netns_id(pod)
    assert lease_of(kernel, nsim, 2) == QueueLease(nk.index, 1, "rx", pod_nsid)
    assert lease_of(kernel, nsim, 3) == QueueLease(nk.index, 2, "rx", pod_nsid)
    assert lease_of(kernel, nsim, 0) is None
    assert lease_of(kernel, nsim, 1) is None


def test_netkit_in_the_lessor_netns_leases_without_netns_id(
    kernel: Kernel, nsim: Nsim, defer: Defer
) -> None:
    nk = single(kernel, defer, "nk0")

    assert kernel.queue_create(nk.index, lessor_ifindex=nsim.ifindex, lessor_queue=1) == 1

    assert lease_of(kernel, nsim, 1) == QueueLease(nk.index, 1, "rx", None)


def test_double_lease_is_busy_and_keeps_the_first(
    kernel: Kernel, nsim: Nsim, defer: Defer
) -> None:
    first = single(kernel, defer, "nk0")
    second = single(kernel, defer, "nk1")
    kernel.queue_create(first.index, lessor_ifindex=nsim.ifindex, lessor_queue=1)

    with pytest.raises(QueueBusy) as e:
        kernel.queue_create(second.index, lessor_ifindex=nsim.ifindex, lessor_queue=1)

    assert e.value.err == errno.EBUSY
    # the kernel's extack reason travels in details (and so into the CNI error)
    assert "leasing" in e.value.details
    assert isinstance(e.value.__cause__, Exception)
    assert lease_of(kernel, nsim, 1) == QueueLease(first.index, 1, "rx", None)


def test_queue_id_out_of_range(kernel: Kernel, nsim: Nsim, defer: Defer) -> None:
    nk = single(kernel, defer, "nk0")

    with pytest.raises(QueueOutOfRange):
        kernel.queue_create(nk.index, lessor_ifindex=nsim.ifindex, lessor_queue=nsim.queues)

    assert [lease_of(kernel, nsim, q) for q in range(nsim.queues)] == [None] * nsim.queues


def test_virtual_lessor_is_rejected(kernel: Kernel, nsim: Nsim, defer: Defer) -> None:
    nk = single(kernel, defer, "nk0")
    other = single(kernel, defer, "nk1")

    with pytest.raises(InvalidRequest) as e:
        kernel.queue_create(nk.index, lessor_ifindex=other.index, lessor_queue=0)

    assert e.value.details == "Lease device is a virtual device"
    assert "Lease device is a virtual device" in str(e.value)


def test_physical_lessee_is_rejected(kernel: Kernel, make_nsim: Callable[[int], Nsim]) -> None:
    lessee, lessor = make_nsim(2), make_nsim(2)

    with pytest.raises(InvalidRequest) as e:
        kernel.queue_create(lessee.ifindex, lessor_ifindex=lessor.ifindex, lessor_queue=1)

    assert e.value.details == "Device is not a virtual device"
    assert lease_of(kernel, lessor, 1) is None


def test_pair_primary_is_rejected_and_peer_accepted(
    kernel: Kernel, nsim: Nsim, make_netns: Callable[[], str], defer: Defer
) -> None:
    pod = make_netns()
    primary = kernel.create_netkit(
        NetkitSpec(
            name="nkh0", pairing="pair", mode="l2",
            peer=PeerSpec(name="eth0", netns=pod, num_rx_queues=2),
        )
    )
    defer(kernel.delete_link, primary.index)
    peer = kernel.link("eth0", netns=pod)
    assert peer is not None

    with pytest.raises(NotSupported):
        kernel.queue_create(primary.index, lessor_ifindex=nsim.ifindex, lessor_queue=1)
    assert lease_of(kernel, nsim, 1) is None

    host_nsid = kernel.ensure_netns_id(None, netns=pod)
    got = kernel.queue_create(
        peer.index, lessor_ifindex=nsim.ifindex, lessor_queue=1, netns=pod,
        lessor_netns_id=host_nsid,
    )
    assert got == 1
    pod_nsid = kernel.ensure_netns_id(pod)
    assert lease_of(kernel, nsim, 1) == QueueLease(peer.index, 1, "rx", pod_nsid)


def test_capacity_is_num_rx_queues_minus_one(kernel: Kernel, nsim: Nsim, defer: Defer) -> None:
    nk = single(kernel, defer, "nk0", leases=2)
    for q in (1, 2):
        kernel.queue_create(nk.index, lessor_ifindex=nsim.ifindex, lessor_queue=q)

    with pytest.raises(InvalidRequest) as e:
        kernel.queue_create(nk.index, lessor_ifindex=nsim.ifindex, lessor_queue=3)

    assert "maximum queue limit" in e.value.details
    assert lease_of(kernel, nsim, 3) is None
    assert nk.num_rx_queues == 3


def test_leases_of_one_netkit_come_from_one_device(
    kernel: Kernel, make_nsim: Callable[[int], Nsim], defer: Defer
) -> None:
    a, b = make_nsim(2), make_nsim(2)
    nk = single(kernel, defer, "nk0")
    kernel.queue_create(nk.index, lessor_ifindex=a.ifindex, lessor_queue=1)

    with pytest.raises(NotSupported):
        kernel.queue_create(nk.index, lessor_ifindex=b.ifindex, lessor_queue=1)

    assert lease_of(kernel, b, 1) is None


def test_lease_survives_netns_move_and_link_flap(
    kernel: Kernel, nsim: Nsim, make_netns: Callable[[], str], defer: Defer
) -> None:
    pod = make_netns()
    nk = kernel.create_netkit(NetkitSpec(name="nk0", num_rx_queues=2))
    defer(kernel.delete_link, nk.index)  # only if the move below never happens
    kernel.queue_create(nk.index, lessor_ifindex=nsim.ifindex, lessor_queue=1)

    kernel.move_link(nk.index, target_netns=pod, name="eth0")
    moved = kernel.link("eth0", netns=pod)
    assert moved is not None
    defer(kernel.delete_link, moved.index, netns=pod)
    pod_nsid = kernel.ensure_netns_id(pod)
    assert lease_of(kernel, nsim, 1) == QueueLease(moved.index, 1, "rx", pod_nsid)

    for up in (True, False, True):
        kernel.set_link(moved.index, netns=pod, up=up)
    assert lease_of(kernel, nsim, 1) == QueueLease(moved.index, 1, "rx", pod_nsid)


def test_deleting_the_pod_netns_releases_the_lease(
    kernel: Kernel, nsim: Nsim, make_netns: Callable[[], str], defer: Defer
) -> None:
    pod = make_netns()
    nk = kernel.create_netkit(NetkitSpec(name="eth0", netns=pod, num_rx_queues=2))
    kernel.queue_create(
        nk.index, lessor_ifindex=nsim.ifindex, lessor_queue=1, netns=pod,
        lessor_netns_id=kernel.ensure_netns_id(None, netns=pod),
    )
    assert lease_of(kernel, nsim, 1) is not None
    # our sockets in the pod netns would keep it (and the netkit) alive
    kernel.close()

    subprocess.run(["ip", "netns", "del", Path(pod).name], check=True)

    wait_for(lambda: True if lease_of(kernel, nsim, 1) is None else None, "the lease to end")


def test_released_queue_can_be_leased_again(kernel: Kernel, nsim: Nsim, defer: Defer) -> None:
    first = single(kernel, defer, "nk0")
    kernel.queue_create(first.index, lessor_ifindex=nsim.ifindex, lessor_queue=1)
    assert kernel.delete_link(first.index)
    assert lease_of(kernel, nsim, 1) is None
    second = single(kernel, defer, "nk1")

    assert kernel.queue_create(second.index, lessor_ifindex=nsim.ifindex, lessor_queue=1) == 1

    assert lease_of(kernel, nsim, 1) == QueueLease(second.index, 1, "rx", None)


def test_removing_the_lessor_device_deletes_the_netkit(
    kernel: Kernel, nsim: Nsim, make_netns: Callable[[], str], defer: Defer
) -> None:
    pod = make_netns()
    nk = single(kernel, defer, "eth0", netns=pod)
    kernel.queue_create(
        nk.index, lessor_ifindex=nsim.ifindex, lessor_queue=1, netns=pod,
        lessor_netns_id=kernel.ensure_netns_id(None, netns=pod),
    )

    del_nsim(nsim)

    wait_for(lambda: True if kernel.link(nk.index, netns=pod) is None else None, "netkit gone")
    assert kernel.link(nsim.name) is None


def test_tx_queue_type_is_rejected(kernel: Kernel, nsim: Nsim, defer: Defer) -> None:
    from pyroute2.netlink.exceptions import NetlinkError  # noqa: PLC0415 - loaded with Kernel

    nk = single(kernel, defer, "nk0")
    # Kernel.queue_create leases RX only: ask the genl socket itself.
    with NetdevSocket(ext_ack=True) as sock:
        sock.bind()
        with pytest.raises(NetlinkError) as e:
            sock.queue_create(nk.index, NETDEV_QUEUE_TYPE_TX, nsim.ifindex, 1)

    assert e.value.code == errno.EINVAL
    assert lease_of(kernel, nsim, 1) is None


def test_queue_get_on_a_down_device_is_not_found(kernel: Kernel, nsim: Nsim) -> None:
    kernel.set_link(nsim.ifindex, up=False)

    with pytest.raises(NotFound):
        kernel.queue_get(nsim.ifindex, 0)


def test_queue_dump_lists_rx_and_tx_queues_of_the_device(kernel: Kernel, nsim: Nsim) -> None:
    queues = kernel.queues(nsim.ifindex)

    assert sorted((q.type, q.id) for q in queues) == sorted(
        (t, i) for t in ("rx", "tx") for i in range(nsim.queues)
    )
    assert all(q.ifindex == nsim.ifindex and not q.in_use for q in queues)
    assert all(q.napi_id is not None for q in queues if q.type == "rx")


def test_queue_dump_of_one_device_leaves_the_others_out(
    kernel: Kernel, make_nsim: Callable[[int], Nsim]
) -> None:
    a, b = make_nsim(2), make_nsim(3)

    # the kernel filters the dump by ifindex: ADD reads only its master's queues
    assert {q.ifindex for q in kernel.queues(a.ifindex)} == {a.ifindex}
    assert len(kernel.queues(b.ifindex)) == 2 * b.queues
    assert {a.ifindex, b.ifindex} <= {q.ifindex for q in kernel.queues()}


def test_probe_reports_queue_leasing(kernel: Kernel) -> None:
    support = kernel.probe()

    assert (support.netkit, support.netdev_family, support.queue_create) == (True, True, True)
    assert support.can_lease
