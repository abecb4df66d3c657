"""The probe's findings, from a fake of our kernel seam (the read-only part of KernelAPI)."""

from __future__ import annotations

import errno

import pytest

from cni_netkit.agent.probe import probe, probe_master
from cni_netkit.errors import NotFound
from cni_netkit.kernel.types import DevInfo, KernelSupport, Link, Queue, QueueLease

ZC = frozenset({"basic", "redirect", "ndo-xmit", "xsk-zerocopy", "rx-sg"})


class FakeKernel:
    def __init__(
        self,
        *,
        support: KernelSupport | None = None,
        links: list[Link] | None = None,
        features: frozenset[str] = ZC,
        zc_segs: int | None = 1,
        queues: list[Queue] | None = None,
    ) -> None:
        self.support = support or KernelSupport("7.2.13", True, True, True)
        self.links = {lk.name: lk for lk in links or []}
        self.features = features
        self.zc_segs = zc_segs
        self.qs = queues if queues is not None else [Queue(2, i, "rx") for i in range(16)]
        self.queue_error: Exception | None = None

    def probe(self) -> KernelSupport:
        return self.support

    def link(self, name_or_index: str | int, *, netns: str | None = None) -> Link | None:
        return self.links.get(str(name_or_index))

    def dev_get(self, ifindex: int, *, netns: str | None = None) -> DevInfo:
        return DevInfo(ifindex, self.features, self.zc_segs)

    def queues(self, ifindex: int | None = None, *, netns: str | None = None) -> list[Queue]:
        if self.queue_error:
            raise self.queue_error
        return [*self.qs, Queue(2, 0, "tx")]


def nic(name: str = "eth0", *, up: bool = True, parent: str | None = "0000:3b:00.0") -> Link:
    return Link(
        2,
        name,
        None,
        "02:00:00:00:00:01",
        1500,
        up,
        None,
        16,
        16,
        parent_dev=parent,
        parent_bus="pci" if parent else None,
    )


def mlx5(name: str) -> str | None:
    return "mlx5_core"


def test_kernel_without_queue_create_cannot_lease() -> None:
    k = FakeKernel(support=KernelSupport("6.18.0", False, True, False), links=[nic()])
    report = probe(k, [("eth0", [15])], driver_of=mlx5)
    assert not report.can_lease
    assert "queue leasing unavailable" in report.summary()


def test_missing_master_is_reported() -> None:
    report = probe(FakeKernel(), [("eth9", [1])])
    m = report.master("eth9")
    assert m is not None and not m.found and not m.can_lease
    assert "eth9: not found" in report.summary()


def test_master_without_a_bus_parent_cannot_lease() -> None:
    m = probe_master(FakeKernel(links=[nic("bond0", parent=None)]), "bond0", (1,), driver_of=mlx5)
    assert m.queue_ops == "absent" and not m.can_lease
    assert m.driver is None  # no device, no driver to ask
    assert any("parent bus device" in p for p in m.problems)


def test_known_driver_is_likely_unknown_driver_is_unknown() -> None:
    k = FakeKernel(links=[nic()])
    assert probe_master(k, "eth0", (15,), driver_of=mlx5).queue_ops == "likely"
    m = probe_master(k, "eth0", (15,), driver_of=lambda n: "ixgbe")
    assert m.queue_ops == "unknown" and m.can_lease  # not ruled out
    assert "only a lease attempt" in m.queue_ops_reason


def test_an_existing_lease_proves_queue_ops_and_is_counted() -> None:
    qs = [Queue(2, i, "rx") for i in range(14)] + [
        Queue(2, 14, "rx", xsk=True),  # someone's AF_XDP directly on the NIC
        Queue(2, 15, "rx", lease=QueueLease(7, 1, netns_id=3)),
    ]
    m = probe_master(
        FakeKernel(links=[nic()], queues=qs), "eth0", (13, 14, 15), driver_of=lambda n: "ixgbe"
    )
    assert m.queue_ops == "proven"
    assert m.leased == (15,) and m.busy == (14,)
    assert "1 leased, 1 busy" in m.summary()


def test_zero_copy_and_af_xdp_via_netkit() -> None:
    m = probe_master(FakeKernel(links=[nic()], zc_segs=4), "eth0", (15,), driver_of=mlx5)
    assert m.zerocopy and m.af_xdp_via_netkit and m.zc_max_segs == 4
    assert not m.problems

    # netdevsim's case: no zero-copy, but native XDP with redirect, so AF_XDP
    # through the netkit works in copy mode (the VM suite's consumers use it).
    k = FakeKernel(links=[nic()], features=frozenset({"basic", "redirect", "ndo-xmit"}))
    m = probe_master(k, "eth0", (15,), driver_of=mlx5)
    assert not m.zerocopy and m.af_xdp_via_netkit
    assert any("copy mode only" in p for p in m.problems)

    k = FakeKernel(links=[nic()], features=frozenset({"ndo-xmit"}))
    m = probe_master(k, "eth0", (15,), driver_of=mlx5)
    assert not m.zerocopy and not m.af_xdp_via_netkit
    assert any("not receive AF_XDP" in p for p in m.problems)


def test_pool_queues_the_nic_lacks_are_reported() -> None:
    k = FakeKernel(links=[nic()], queues=[Queue(2, i, "rx") for i in range(8)])
    m = probe_master(k, "eth0", (6, 7, 8, 9), driver_of=mlx5)
    assert m.missing == (8, 9)
    assert any("[8, 9]" in p for p in m.problems)


def test_master_down_reports_no_queues_but_no_missing_ones() -> None:
    k = FakeKernel(links=[nic(up=False)])
    k.queue_error = NotFound("queue-get", err=errno.ENOENT)
    m = probe_master(k, "eth0", (15,), driver_of=mlx5)
    assert m.rx_queues == () and m.missing == ()
    assert any("device down" in p for p in m.problems)
    assert "DOWN" in m.summary()


@pytest.mark.parametrize("pool", [[15, 15, 14], (14, 15)])
def test_pool_ids_are_normalised(pool: list[int] | tuple[int, ...]) -> None:
    report = probe(FakeKernel(links=[nic()]), [("eth0", pool)], driver_of=mlx5)
    assert report.masters[0].pool == (14, 15)
