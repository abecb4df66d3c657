"""What the kernel seam hands upwards: plain frozen dataclasses, never netlink messages.

``KernelAPI`` is the seam itself as a Protocol, so the logic above it is typed
and can be unit-tested against a fake of *our* seam; the real implementation
(``cni_netkit.kernel.Kernel``) is tested only against a real 7.x kernel.

Netns arguments are paths (``/var/run/netns/foo``, ``/proc/PID/ns/net``) or
``None`` for the netns of the calling process (the host netns for the plugin).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

Pairing = Literal["pair", "single"]
NetkitMode = Literal["l2", "l3"]
NetkitPolicy = Literal["forward", "blackhole"]
QueueType = Literal["rx", "tx"]


@dataclass(frozen=True)
class NetkitInfo:
    """IFLA_INFO_DATA of a netkit link, as read back (names as in rt-link.yaml)."""

    pairing: Pairing
    mode: NetkitMode
    policy: NetkitPolicy
    peer_policy: NetkitPolicy | None
    primary: bool
    scrub: str | None = None  # "none" | "default"
    peer_scrub: str | None = None
    headroom: int | None = None
    tailroom: int | None = None


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str | None
    mac: str | None
    mtu: int
    up: bool  # IFF_UP (administrative state)
    alias: str | None
    num_rx_queues: int
    num_tx_queues: int
    netkit: NetkitInfo | None = None
    # IFLA_LINK_NETNSID: for a pair, the nsid (seen from this link's netns) of the peer's netns
    link_netnsid: int | None = None
    # IFLA_PARENT_DEV_NAME / _BUS_NAME: set for devices with a bus parent (physical NICs, netdevsim)
    parent_dev: str | None = None
    parent_bus: str | None = None
    # Only on what ``create_netkit`` returns for a pair: the peer, as the kernel
    # acknowledged it (``link()`` and ``links()`` leave it None).
    peer: Link | None = None


@dataclass(frozen=True)
class QueueLease:
    """The ``lease`` nest of ``queue-get``: the *other* end of a leased queue."""

    ifindex: int
    queue_id: int
    queue_type: QueueType = "rx"
    netns_id: int | None = None  # nsid, seen from the queried netns, of the other end's netns


@dataclass(frozen=True)
class Queue:
    ifindex: int
    id: int
    type: QueueType
    napi_id: int | None = None
    lease: QueueLease | None = None
    xsk: bool = False  # an AF_XDP socket is bound
    dmabuf: int | None = None  # a devmem memory provider is bound
    io_uring: bool = False  # an io_uring zero-copy memory provider is bound

    @property
    def in_use(self) -> bool:
        """Leased, or bound by AF_XDP or a memory provider: not ours to hand out."""
        return self.lease is not None or self.xsk or self.dmabuf is not None or self.io_uring


@dataclass(frozen=True)
class DevInfo:
    """``dev-get`` of the netdev family."""

    ifindex: int
    xdp_features: frozenset[str] = field(default_factory=frozenset)
    xdp_zc_max_segs: int | None = None
    xsk_features: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class KernelSupport:
    """What the running kernel offers for netkit queue leasing."""

    release: str  # os.uname().release
    netkit: bool  # the "netkit" rtnl link kind exists
    netdev_family: bool  # the "netdev" generic netlink family exists
    queue_create: bool  # ... and has the queue-create op (Linux >= 7.1)

    @property
    def can_lease(self) -> bool:
        return self.netkit and self.netdev_family and self.queue_create


@dataclass(frozen=True)
class PeerSpec:
    """The pod-side peer of a netkit pair (the side that may hold leases)."""

    name: str
    netns: str | None = None
    num_rx_queues: int | None = None
    mac: str | None = None
    mtu: int | None = None
    alias: str | None = None
    up: bool = False  # brought up in the request that sets its alias


@dataclass(frozen=True)
class NetkitSpec:
    """A netkit device to create, in ``netns`` (None: the caller's netns)."""

    name: str
    netns: str | None = None
    pairing: Pairing = "single"
    mode: NetkitMode = "l2"
    mac: str | None = None  # only with mode "l2"
    mtu: int | None = None
    num_rx_queues: int | None = None  # 1 + the number of leases it must hold
    alias: str | None = None
    # Created under this name, then renamed to ``name`` in the request that sets
    # the alias: a device the creator names after its owner is attributable
    # even if the creator dies before the alias is set (rtnetlink ignores
    # IFLA_IFALIAS at creation).
    staging_name: str | None = None
    # Brought up in that same request (the kernel renames before it changes
    # flags, and an up device could not be renamed afterwards).
    up: bool = False
    policy: NetkitPolicy = "forward"
    peer_policy: NetkitPolicy = "forward"
    peer: PeerSpec | None = None  # pairing "pair" only


class KernelAPI(Protocol):
    """The seam between the plugin's logic and netlink. Implemented by ``kernel.Kernel``."""

    def probe(self) -> KernelSupport: ...

    def check_netns(self, path: str) -> None:
        """Raise ``errors.InvalidNetns`` unless ``path`` is a netns; never creates one."""
        ...

    def link(self, name_or_index: str | int, *, netns: str | None = None) -> Link | None: ...

    def links(self, *, netns: str | None = None, kind: str | None = None) -> list[Link]: ...

    def create_netkit(
        self, spec: NetkitSpec, *, step: Callable[[str], None] | None = None
    ) -> Link:
        """Create the device (and its peer); returns the link in ``spec.netns``.

        For a pair, the returned link's ``peer`` is the peer's link. ``step(name)``
        is called after each kernel request: ``create:made`` (the device exists,
        no alias yet), ``create:named`` (its final name, alias, and admin state),
        ``create:peer-named`` (the peer's alias and admin state).
        """
        ...

    def set_link(
        self,
        index: int,
        *,
        netns: str | None = None,
        up: bool | None = None,
        mac: str | None = None,
        mtu: int | None = None,
        alias: str | None = None,
        name: str | None = None,
    ) -> None: ...

    def move_link(
        self, index: int, *, target_netns: str, netns: str | None = None, name: str | None = None
    ) -> None: ...

    def delete_link(self, index: int, *, netns: str | None = None) -> bool:
        """Delete; False when it was already gone (not an error)."""
        ...

    def dev_get(self, ifindex: int, *, netns: str | None = None) -> DevInfo: ...

    def queue_get(
        self, ifindex: int, queue_id: int, *, netns: str | None = None, type: QueueType = "rx"
    ) -> Queue: ...

    def queues(self, ifindex: int | None = None, *, netns: str | None = None) -> list[Queue]:
        """``queue-get`` dump (all devices in the netns, or one device's queues)."""
        ...

    def queue_create(
        self,
        ifindex: int,
        *,
        lessor_ifindex: int,
        lessor_queue: int,
        netns: str | None = None,
        lessor_netns_id: int | None = None,
    ) -> int:
        """Lease RX queue ``lessor_queue`` of ``lessor_ifindex`` to netkit ``ifindex``.

        The request is sent from ``netns``; ``lessor_netns_id`` is the nsid, as
        seen from ``netns``, of the netns holding the lessor (None: same netns).
        Returns the new queue id on the netkit.
        """
        ...

    def add_address(self, index: int, cidr: str, *, netns: str | None = None) -> None:
        """Add an IPv4/IPv6 address (``10.1.2.3/24``) to a link; EEXIST is not an error."""
        ...

    def add_route(
        self,
        dst: str,
        *,
        oif: int,
        gateway: str | None = None,
        netns: str | None = None,
        scope_link: bool = False,
    ) -> None:
        """Add a route (``0.0.0.0/0``, ``10.1.0.0/16``) out of ``oif``; EEXIST is not an error."""
        ...

    def netns_id(self, target: str | None, *, netns: str | None = None) -> int | None:
        """The nsid of netns ``target`` as seen from ``netns``, or None if unassigned."""
        ...

    def ensure_netns_id(self, target: str | None, *, netns: str | None = None) -> int:
        """Like ``netns_id`` but assigns one (RTM_NEWNSID) when there is none."""
        ...

    def forget_netns(self, netns: str) -> None:
        """Close the sockets opened in ``netns`` (which unpins it); reopened on next use."""
        ...

    def rss_table(self, ifname: str) -> tuple[int, ...] | None:
        """The default RSS context's indirection table of a host-netns device (entry -> ring).

        None when its driver has no RSS table (``EOPNOTSUPP``); KernelError otherwise.
        """
        ...

    def close(self) -> None: ...
