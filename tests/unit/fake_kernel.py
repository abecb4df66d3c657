"""An in-memory fake of OUR kernel seam (cni_netkit.kernel.types.KernelAPI).

For unit tests of the plugin's decisions and undo paths only. It models just
enough of the kernel's rules (leases end with their netkit, one lease per
queue, capacity num_rx_queues - 1) for the plugin logic to be exercised; what
the real kernel does is proven by tests/kernel and tests/e2e in the VM.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from cni_netkit.errors import (
    InvalidNetns,
    InvalidRequest,
    NotFound,
    QueueBusy,
    QueueOutOfRange,
)
from cni_netkit.kernel.types import (
    DevInfo,
    KernelSupport,
    Link,
    NetkitInfo,
    NetkitSpec,
    Queue,
    QueueLease,
    QueueType,
)

HOST = None
# The pod netns the plugin-logic tests put their attachments in (tests/unit/conftest.py).
POD = "/var/run/netns/pod1"


@dataclass
class FakeLink:
    link: Link
    netns: str | None
    leases: list[tuple[int, int]] = field(default_factory=list)  # (own queue id, master queue)
    peer_index: int | None = None
    addresses: list[str] = field(default_factory=list)
    routes: list[tuple[str, str | None]] = field(default_factory=list)


class FakeKernel:
    def __init__(self, master: str = "eth0", master_queues: int = 16) -> None:
        self._index = itertools.count(1)
        self.devices: dict[int, FakeLink] = {}
        self.netns: set[str] = set()
        self.nsids: dict[tuple[str | None, str | None], int] = {}
        self.foreign_in_use: set[int] = set()  # master queues bound by AF_XDP etc.
        self.fail: dict[str, Exception] = {}  # method name -> exception to raise once
        self.calls: list[str] = []
        self.link_lookups: list[tuple[str | int, str | None]] = []  # (name or index, netns)
        self.open_netns: set[str] = set()  # netns it would hold sockets in (links())
        self.most_open_netns = 0
        self.support = KernelSupport("7.2.13", True, True, True)
        # ifname -> its RSS indirection table; absent: no RSS ops (netdevsim's answer)
        self.rss: dict[str, tuple[int, ...]] = {}
        self.master = self._add(
            Link(next(self._index), master, None, "02:00:00:00:00:01", 1500, True, None,
                 master_queues, master_queues, parent_bus="netdevsim"),
            HOST,
        )

    # -- helpers for tests --
    def _add(self, link: Link, netns: str | None) -> FakeLink:
        fl = FakeLink(link, netns)
        self.devices[link.index] = fl
        return fl

    def _maybe_fail(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise self.fail.pop(name)

    def add_netns(self, path: str) -> str:
        self.netns.add(path)
        return path

    def del_netns(self, path: str) -> None:
        self.netns.discard(path)
        for idx, fl in list(self.devices.items()):
            if fl.netns == path:
                self._delete(idx)

    def leased_master_queues(self) -> dict[int, int]:
        """master queue -> netkit ifindex holding it."""
        return {mq: fl.link.index for fl in self.devices.values() for _, mq in fl.leases}

    def links_in(self, netns: str | None) -> list[Link]:
        return [fl.link for fl in self.devices.values() if fl.netns == netns]

    # -- KernelAPI --
    def probe(self) -> KernelSupport:
        self._maybe_fail("probe")
        return self.support

    def rss_table(self, ifname: str) -> tuple[int, ...] | None:
        self._maybe_fail("rss_table")
        return self.rss.get(ifname)

    def check_netns(self, path: str) -> None:
        if path not in self.netns:
            raise InvalidNetns(f"{path} is not a network namespace")

    def link(self, name_or_index: str | int, *, netns: str | None = None) -> Link | None:
        self.link_lookups.append((name_or_index, netns))
        for fl in self.devices.values():
            if fl.netns == netns and name_or_index in (fl.link.name, fl.link.index):
                return fl.link
        return None

    def links(self, *, netns: str | None = None, kind: str | None = None) -> list[Link]:
        if netns is not None and netns not in self.netns:
            raise InvalidNetns(netns)
        if netns is not None:  # what the real one holds open: sockets in that netns
            self.open_netns.add(netns)
            self.most_open_netns = max(self.most_open_netns, len(self.open_netns))
        return [link for link in self.links_in(netns) if kind is None or link.kind == kind]

    def create_netkit(
        self, spec: NetkitSpec, *, step: Callable[[str], None] | None = None
    ) -> Link:
        # As the kernel layer does it: created (under the staging name) without an
        # alias, then named and aliased, then the peer aliased; ``step`` after each.
        self._maybe_fail("create_netkit")
        info = NetkitInfo(spec.pairing, spec.mode, spec.policy, spec.peer_policy, True)
        main = Link(next(self._index), spec.staging_name or spec.name, "netkit",
                    spec.mac or "02:aa:00:00:00:01", spec.mtu or 1500, False, None,
                    spec.num_rx_queues or 1, 1, info)
        fl = self._add(main, spec.netns)
        pfl = None
        if spec.peer is not None:
            p = spec.peer
            peer = Link(next(self._index), p.name, "netkit", p.mac or "02:bb:00:00:00:01",
                        p.mtu or 1500, False, None, p.num_rx_queues or 1, 1,
                        replace(info, primary=False))
            pfl = self._add(peer, p.netns)
            fl.peer_index, pfl.peer_index = peer.index, main.index
        for name in ("create:made", "create:named", "create:peer-named"):
            if name == "create:peer-named" and (pfl is None or spec.peer is None):
                break
            if name != "create:made":
                try:
                    # the naming requests are set_links, and a failed one undoes the creation
                    self._maybe_fail("set_link")
                except Exception:
                    self._delete(main.index)
                    raise
            if name == "create:named":
                fl.link = replace(fl.link, name=spec.name, alias=spec.alias, up=spec.up)
            elif name == "create:peer-named" and pfl is not None and spec.peer is not None:
                pfl.link = replace(pfl.link, alias=spec.peer.alias, up=spec.peer.up)
            if step is not None:
                step(name)
        return replace(fl.link, peer=pfl.link if pfl is not None else None)

    def set_link(self, index: int, *, netns: str | None = None, up: bool | None = None,
                 mac: str | None = None, mtu: int | None = None, alias: str | None = None,
                 name: str | None = None) -> None:
        self._maybe_fail("set_link")
        fl = self.devices[index]
        changes: dict[str, Any] = {k: v for k, v in
                                   dict(up=up, mac=mac, mtu=mtu, alias=alias, name=name).items()
                                   if v is not None}
        fl.link = replace(fl.link, **changes)

    def move_link(self, index: int, *, target_netns: str, netns: str | None = None,
                  name: str | None = None) -> None:
        self.devices[index].netns = target_netns

    def _delete(self, index: int) -> None:
        fl = self.devices.pop(index, None)
        if fl is not None and fl.peer_index is not None:
            self.devices.pop(fl.peer_index, None)

    def delete_link(self, index: int, *, netns: str | None = None) -> bool:
        self._maybe_fail("delete_link")
        if index not in self.devices:
            return False
        self._delete(index)
        return True

    def dev_get(self, ifindex: int, *, netns: str | None = None) -> DevInfo:
        return DevInfo(ifindex)

    def _queue(self, qid: int) -> Queue:
        holder = {mq: (fl, own) for fl in self.devices.values() for own, mq in fl.leases}
        lease = None
        if qid in holder:
            fl, own = holder[qid]
            lease = QueueLease(fl.link.index, own, "rx", self.nsids.get((HOST, fl.netns)))
        return Queue(self.master.link.index, qid, "rx", lease=lease, xsk=qid in self.foreign_in_use)

    def queue_get(self, ifindex: int, queue_id: int, *, netns: str | None = None,
                  type: QueueType = "rx") -> Queue:
        if not 0 <= queue_id < self.master.link.num_rx_queues:
            raise NotFound("queue-get")
        return self._queue(queue_id)

    def queues(self, ifindex: int | None = None, *, netns: str | None = None) -> list[Queue]:
        self._maybe_fail("queues")
        return [self._queue(q) for q in range(self.master.link.num_rx_queues)]

    def queue_create(self, ifindex: int, *, lessor_ifindex: int, lessor_queue: int,
                     netns: str | None = None, lessor_netns_id: int | None = None) -> int:
        self._maybe_fail("queue_create")
        fl = self.devices[ifindex]
        if fl.link.netkit is None or (fl.link.netkit.primary and fl.link.netkit.pairing == "pair"):
            raise InvalidRequest("queue-create: not a lessee")
        if lessor_queue >= self.master.link.num_rx_queues:
            raise QueueOutOfRange("queue-create")
        if lessor_queue in self.leased_master_queues() or lessor_queue in self.foreign_in_use:
            raise QueueBusy("queue-create")
        if len(fl.leases) + 1 >= fl.link.num_rx_queues:
            raise InvalidRequest("queue-create", "netkit maximum queue limit reached")
        own = len(fl.leases) + 1
        fl.leases.append((own, lessor_queue))
        return own

    def add_address(self, index: int, cidr: str, *, netns: str | None = None) -> None:
        self._maybe_fail("add_address")
        self.devices[index].addresses.append(cidr)

    def add_route(self, dst: str, *, oif: int, gateway: str | None = None,
                  netns: str | None = None, scope_link: bool = False) -> None:
        self.devices[oif].routes.append((dst, gateway))

    def netns_id(self, target: str | None, *, netns: str | None = None) -> int | None:
        return self.nsids.get((netns, target))

    def ensure_netns_id(self, target: str | None, *, netns: str | None = None) -> int:
        self._maybe_fail("ensure_netns_id")
        return self.nsids.setdefault((netns, target), len(self.nsids))

    def forget_netns(self, netns: str) -> None:
        self.open_netns.discard(netns)

    def close(self) -> None:
        self.open_netns.clear()
