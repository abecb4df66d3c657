"""``Kernel``: the ``KernelAPI`` seam implemented over pyroute2 (rtnetlink + genl netdev).

Everything netlink stops here: callers get the frozen dataclasses of
``types.py`` and the errors of ``cni_netkit.errors``, each kernel error
raised ``from`` pyroute2's ``NetlinkError`` and carrying the kernel's extack
text in ``details``.

A ``Kernel`` keeps one rtnetlink and one netdev socket per netns path it
touches, made by ``netns.socket_in`` (never by pyroute2's ``netns=``, which
would create a missing netns).  An open socket pins its netns: a pod netns
whose last other user is gone stays alive, with its netkit and leases, until
``close()``.  Short-lived owners (one CNI command) are what this is for.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from types import TracebackType
from typing import Any, cast

from pyroute2.iproute.linux import IPRoute
from pyroute2.netlink import NETLINK_GENERIC, NETLINK_ROUTE
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP
from pyroute2.netlink.rtnl.rtmsg import RT_SCOPE_LINK

from cni_netkit.errors import KernelError, KernelUnsupported, kernel_error
from cni_netkit.kernel import netkit as netkit_kind
from cni_netkit.kernel import netns as ns
from cni_netkit.kernel.netdev import (
    NETDEV_CMD_QUEUE_CREATE,
    XDP_ACT,
    XSK_FLAGS,
    NetdevSocket,
    flag_names,
)
from cni_netkit.kernel.types import (
    DevInfo,
    KernelSupport,
    Link,
    NetkitInfo,
    NetkitMode,
    NetkitPolicy,
    NetkitSpec,
    Pairing,
    Queue,
    QueueLease,
    QueueType,
)

netkit_kind.register()

_QUEUE_TYPES: dict[QueueType, int] = {"rx": 0, "tx": 1}
_QUEUE_TYPE_NAMES: dict[int, QueueType] = {v: k for k, v in _QUEUE_TYPES.items()}
_POLICIES: dict[NetkitPolicy, int] = {"forward": 0, "blackhole": 2}
_MODES: dict[NetkitMode, int] = {"l2": 0, "l3": 1}
_PAIRINGS: dict[Pairing, int] = {"pair": 0, "single": 1}
# The netns the calling process lives in, as a path for RTM_GETNSID's NETNSA_FD
_OWN_NETNS = "/proc/self/ns/net"


def _extack(e: NetlinkError) -> str:
    """The kernel's extack message; pyroute2 puts strerror() there when there is none."""
    text = e.args[1] if len(e.args) > 1 else None
    return "" if not text or text == os.strerror(e.code) else str(text)


@contextmanager
def _netlink(what: str) -> Iterator[None]:
    """Turn a NetlinkError into our KernelError subclass for its errno, naming ``what``."""
    try:
        yield
    except NetlinkError as e:
        raise kernel_error(e.code, what, _extack(e)) from e


def _in(netns: str | None) -> str:
    return f" in netns {netns}" if netns else ""


class Kernel:
    """The real kernel, through netlink; see the module docstring for socket lifetimes."""

    def __init__(self) -> None:
        self._rtnl: dict[str | None, Any] = {}
        self._netdev: dict[str | None, NetdevSocket] = {}

    def __enter__(self) -> Kernel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close every socket this instance opened (and so unpin their netns)."""
        for sock in [*self._rtnl.values(), *self._netdev.values()]:
            sock.close()
        self._rtnl.clear()
        self._netdev.clear()

    # --- sockets ----------------------------------------------------------

    @staticmethod
    def _raw_socket(netns: str | None, proto: int) -> int | None:
        """An fd for pyroute2's ``fileno=`` made in ``netns``; None for our own netns."""
        if netns is None:
            return None
        nsfd = ns.open_netns(netns)
        try:
            return ns.socket_in(nsfd, socket.AF_NETLINK, socket.SOCK_DGRAM, proto).detach()
        finally:
            os.close(nsfd)

    def _ipr(self, netns: str | None) -> Any:
        ipr = self._rtnl.get(netns)
        if ipr is None:
            # ext_ack: the kernel's reason comes back with the errno
            ipr = IPRoute(fileno=self._raw_socket(netns, NETLINK_ROUTE), ext_ack=True)
            self._rtnl[netns] = ipr
        return ipr

    def _genl(self, netns: str | None) -> NetdevSocket:
        sock = self._netdev.get(netns)
        if sock is None:
            sock = NetdevSocket(fileno=self._raw_socket(netns, NETLINK_GENERIC), ext_ack=True)
            try:
                sock.bind()
            except NetlinkError as e:
                sock.close()
                if e.code == errno.ENOENT:
                    raise KernelUnsupported(
                        f"the running kernel ({os.uname().release}) has no netdev generic "
                        "netlink family",
                        "netkit queue leasing needs Linux >= 7.0",
                        err=e.code,
                    ) from e
                raise kernel_error(e.code, "resolve genl family netdev", _extack(e)) from e
            self._netdev[netns] = sock
        return sock

    # --- probing ----------------------------------------------------------

    def probe(self) -> KernelSupport:
        """What the running kernel offers for netkit queue leasing (creates nothing)."""
        try:
            ops = self._genl(None).ops
            family = True
        except KernelUnsupported:
            ops, family = frozenset(), False
        return KernelSupport(
            release=os.uname().release,
            netkit=self._has_netkit(),
            netdev_family=family,
            queue_create=NETDEV_CMD_QUEUE_CREATE in ops,
        )

    def _has_netkit(self) -> bool:
        # netkit is a bool Kconfig option: built in or absent, so /sys/module
        # tells nothing, and no read-only netlink request names link kinds.
        # Ask rtnetlink to create a netkit with the read-only PRIMARY attribute:
        # a kernel that knows the kind rejects that attribute (EINVAL) while
        # parsing, before anything exists; one that does not answers
        # EOPNOTSUPP "Unknown device type".
        linkinfo = {
            "attrs": [
                ("IFLA_INFO_KIND", "netkit"),
                ("IFLA_INFO_DATA", {"attrs": [("IFLA_NETKIT_PRIMARY", 1)]}),
            ]
        }
        try:
            # Should the attribute ever be accepted, the invalid name still stops creation.
            self._ipr(None).link("add", IFLA_IFNAME="/", IFLA_LINKINFO=linkinfo)
        except NetlinkError as e:
            if e.code == errno.EOPNOTSUPP:
                return False
            if e.code == errno.EINVAL:
                return True
            raise kernel_error(e.code, "probe link kind netkit", _extack(e)) from e
        raise KernelError("probe link kind netkit: the kernel accepted a request it must refuse")

    def check_netns(self, path: str) -> None:
        """Raise ``errors.InvalidNetns`` unless ``path`` is a network namespace.

        Never creates one, unlike pyroute2's ``netns=`` with its default flags.
        """
        ns.check_netns(path)

    # --- links ------------------------------------------------------------

    def link(self, name_or_index: str | int, *, netns: str | None = None) -> Link | None:
        """The link with this name or index in ``netns``; None when there is none."""
        key = "index" if isinstance(name_or_index, int) else "ifname"
        try:
            with _netlink(f"get link {name_or_index}{_in(netns)}"):
                (msg,) = self._ipr(netns).link("get", **{key: name_or_index})
        except KernelError as e:
            if e.err == errno.ENODEV:
                return None
            raise
        return _link(msg)

    def links(self, *, netns: str | None = None, kind: str | None = None) -> list[Link]:
        """Every link in ``netns`` (of ``kind`` only, when given)."""
        with _netlink(f"dump links{_in(netns)}"):
            found = [_link(msg) for msg in self._ipr(netns).link("dump")]
        return [lk for lk in found if kind is None or lk.kind == kind]

    def create_netkit(self, spec: NetkitSpec) -> Link:
        """Create the device (and its peer); returns the link in ``spec.netns``."""
        data: list[tuple[str, Any]] = [
            ("IFLA_NETKIT_PAIRING", _PAIRINGS[spec.pairing]),
            ("IFLA_NETKIT_MODE", _MODES[spec.mode]),
            ("IFLA_NETKIT_POLICY", _POLICIES[spec.policy]),
        ]
        with ExitStack() as stack:
            if spec.pairing == "pair":
                # single mode refuses any peer attribute, even a default one
                data.append(("IFLA_NETKIT_PEER_POLICY", _POLICIES[spec.peer_policy]))
            if spec.peer is not None:
                peer = _ifla(spec.peer.name, spec.peer.mac, spec.peer.mtu, spec.peer.num_rx_queues)
                if spec.peer.netns is not None:
                    nsfd = ns.open_netns(spec.peer.netns)
                    stack.callback(os.close, nsfd)
                    peer.append(("IFLA_NET_NS_FD", nsfd))
                data.append(("IFLA_NETKIT_PEER_INFO", {"attrs": peer}))
            attrs = _ifla(spec.name, spec.mac, spec.mtu, spec.num_rx_queues)
            linkinfo = {
                "attrs": [("IFLA_INFO_KIND", "netkit"), ("IFLA_INFO_DATA", {"attrs": data})]
            }
            with _netlink(f"create netkit {spec.name}{_in(spec.netns)}"):
                self._ipr(spec.netns).link("add", IFLA_LINKINFO=linkinfo, **dict(attrs))
        created = self.link(spec.name, netns=spec.netns)
        if created is None:
            raise KernelError(f"netkit {spec.name}{_in(spec.netns)} missing right after creation")
        # rtnetlink ignores IFLA_IFALIAS when creating: set it afterwards,
        # undoing the creation if that fails.
        with ExitStack() as undo:
            undo.callback(self.delete_link, created.index, netns=spec.netns)
            if spec.alias is not None:
                self.set_link(created.index, netns=spec.netns, alias=spec.alias)
            if spec.peer is not None and spec.peer.alias is not None:
                peer_link = self.link(spec.peer.name, netns=spec.peer.netns)
                if peer_link is None:
                    raise KernelError(
                        f"netkit peer {spec.peer.name}{_in(spec.peer.netns)} missing right "
                        "after creation"
                    )
                self.set_link(peer_link.index, netns=spec.peer.netns, alias=spec.peer.alias)
            undo.pop_all()
        return self.link(created.index, netns=spec.netns) or created

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
    ) -> None:
        """Change what is given (admin state, MAC, MTU, alias, name) of link ``index``."""
        change: dict[str, Any] = {}
        if up is not None:
            change.update(flags=IFF_UP if up else 0, change=IFF_UP)
        for nla, value in (
            ("IFLA_ADDRESS", mac),
            ("IFLA_MTU", mtu),
            ("IFLA_IFALIAS", alias),
            ("IFLA_IFNAME", name),
        ):
            if value is not None:
                change[nla] = value
        if not change:
            return
        with _netlink(f"set link {index}{_in(netns)} ({', '.join(change)})"):
            self._ipr(netns).link("set", index=index, **change)

    def move_link(
        self, index: int, *, target_netns: str, netns: str | None = None, name: str | None = None
    ) -> None:
        """Move link ``index`` from ``netns`` into ``target_netns`` (renaming it to ``name``)."""
        nsfd = ns.open_netns(target_netns)
        try:
            change: dict[str, Any] = {"IFLA_NET_NS_FD": nsfd}
            if name is not None:
                change["IFLA_IFNAME"] = name
            with _netlink(f"move link {index}{_in(netns)} to netns {target_netns}"):
                self._ipr(netns).link("set", index=index, **change)
        finally:
            os.close(nsfd)

    def delete_link(self, index: int, *, netns: str | None = None) -> bool:
        """Delete; False when it was already gone (not an error)."""
        try:
            with _netlink(f"delete link {index}{_in(netns)}"):
                self._ipr(netns).link("del", index=index)
        except KernelError as e:
            if e.err == errno.ENODEV:
                return False
            raise
        return True

    def add_address(self, index: int, cidr: str, *, netns: str | None = None) -> None:
        """Add an IPv4/IPv6 address (``10.1.2.3/24``) to a link; EEXIST is not an error."""
        iface = ipaddress.ip_interface(cidr)
        family = socket.AF_INET if iface.version == 4 else socket.AF_INET6
        try:
            with _netlink(f"add address {cidr} to link {index}{_in(netns)}"):
                self._ipr(netns).addr(
                    "add",
                    index=index,
                    address=str(iface.ip),
                    prefixlen=iface.network.prefixlen,
                    family=family,
                )
        except KernelError as e:
            if e.err != errno.EEXIST:
                raise

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
        net = ipaddress.ip_network(dst)
        route: dict[str, Any] = {
            "dst": str(net.network_address),
            "dst_len": net.prefixlen,
            "family": socket.AF_INET if net.version == 4 else socket.AF_INET6,
            "oif": oif,
        }
        if gateway is not None:
            route["gateway"] = gateway
        if scope_link:
            route["scope"] = RT_SCOPE_LINK
        try:
            with _netlink(f"add route {dst} via {gateway or 'link'} dev {oif}{_in(netns)}"):
                self._ipr(netns).route("add", **route)
        except KernelError as e:
            if e.err != errno.EEXIST:
                raise

    # --- netns ids --------------------------------------------------------

    def netns_id(self, target: str | None, *, netns: str | None = None) -> int | None:
        """The nsid of netns ``target`` as seen from ``netns``, or None if unassigned."""
        nsfd = ns.open_netns(target or _OWN_NETNS)
        try:
            with _netlink(f"get nsid of netns {target or 'of this process'}{_in(netns)}"):
                return ns.get_nsid(self._ipr(netns), nsfd)
        finally:
            os.close(nsfd)

    def ensure_netns_id(self, target: str | None, *, netns: str | None = None) -> int:
        """Like ``netns_id`` but assigns one (RTM_NEWNSID) when there is none."""
        nsfd = ns.open_netns(target or _OWN_NETNS)
        try:
            with _netlink(f"assign nsid to netns {target or 'of this process'}{_in(netns)}"):
                return ns.ensure_nsid(self._ipr(netns), nsfd)
        finally:
            os.close(nsfd)

    # --- netdev genl: queues ----------------------------------------------

    def dev_get(self, ifindex: int, *, netns: str | None = None) -> DevInfo:
        """``dev-get`` of device ``ifindex`` in ``netns``."""
        with _netlink(f"dev-get ifindex {ifindex}{_in(netns)}"):
            (msg,) = self._genl(netns).dev_get(ifindex)
        return DevInfo(
            ifindex=msg.get_attr("NETDEV_A_DEV_IFINDEX"),
            xdp_features=flag_names(msg.get_attr("NETDEV_A_DEV_XDP_FEATURES") or 0, XDP_ACT),
            xdp_zc_max_segs=msg.get_attr("NETDEV_A_DEV_XDP_ZC_MAX_SEGS"),
            xsk_features=flag_names(msg.get_attr("NETDEV_A_DEV_XSK_FEATURES") or 0, XSK_FLAGS),
        )

    def queue_get(
        self, ifindex: int, queue_id: int, *, netns: str | None = None, type: QueueType = "rx"
    ) -> Queue:
        """``queue-get`` of one queue (ENOENT, i.e. ``NotFound``, while the device is down)."""
        with _netlink(f"queue-get ifindex {ifindex} {type} queue {queue_id}{_in(netns)}"):
            (msg,) = self._genl(netns).queue_get(ifindex, queue_id, _QUEUE_TYPES[type])
        return _queue(msg)

    def queues(self, ifindex: int | None = None, *, netns: str | None = None) -> list[Queue]:
        """``queue-get`` dump (all devices in the netns, or one device's queues)."""
        where = f" ifindex {ifindex}" if ifindex is not None else ""
        with _netlink(f"queue-get dump{where}{_in(netns)}"):
            return [_queue(msg) for msg in self._genl(netns).queue_dump(ifindex)]

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
        lessor = f"ifindex {lessor_ifindex} rx queue {lessor_queue}"
        if lessor_netns_id is not None:
            lessor += f" of netns-id {lessor_netns_id}"
        what = f"queue-create on ifindex {ifindex}{_in(netns)} leasing {lessor}"
        sock = self._genl(netns)
        if NETDEV_CMD_QUEUE_CREATE not in sock.ops:
            raise KernelUnsupported(
                f"{what}: the running kernel ({os.uname().release}) has no queue-create op",
                "netkit queue leasing needs Linux >= 7.0",
                err=errno.EOPNOTSUPP,
            )
        with _netlink(what):
            (msg,) = sock.queue_create(
                ifindex, _QUEUE_TYPES["rx"], lessor_ifindex, lessor_queue, lessor_netns_id
            )
        return cast(int, msg.get_attr("NETDEV_A_QUEUE_ID"))


# --- decoding ---------------------------------------------------------------


def _ifla(
    name: str, mac: str | None, mtu: int | None, num_rx_queues: int | None
) -> list[tuple[str, Any]]:
    """The IFLA_* a new link (or a netkit peer) is created with."""
    attrs: list[tuple[str, Any]] = [("IFLA_IFNAME", name)]
    for nla, value in (
        ("IFLA_ADDRESS", mac),
        ("IFLA_MTU", mtu),
        ("IFLA_NUM_RX_QUEUES", num_rx_queues),
    ):
        if value is not None:
            attrs.append((nla, value))
    return attrs


def _link(msg: Any) -> Link:
    linkinfo = msg.get_attr("IFLA_LINKINFO")
    kind = linkinfo.get_attr("IFLA_INFO_KIND") if linkinfo is not None else None
    info = None
    if kind == "netkit":
        info = _netkit_info(linkinfo.get_attr("IFLA_INFO_DATA"))
    return Link(
        index=msg["index"],
        name=msg.get_attr("IFLA_IFNAME"),
        kind=kind,
        mac=msg.get_attr("IFLA_ADDRESS"),
        mtu=msg.get_attr("IFLA_MTU"),
        up=bool(msg["flags"] & IFF_UP),
        alias=msg.get_attr("IFLA_IFALIAS"),
        num_rx_queues=msg.get_attr("IFLA_NUM_RX_QUEUES"),
        num_tx_queues=msg.get_attr("IFLA_NUM_TX_QUEUES"),
        netkit=info,
        link_netnsid=msg.get_attr("IFLA_LINK_NETNSID"),
        parent_dev=msg.get_attr("IFLA_PARENT_DEV_NAME"),
        parent_bus=msg.get_attr("IFLA_PARENT_DEV_BUS_NAME"),
    )


def _netkit_info(data: Any) -> NetkitInfo:
    nk = netkit_kind.netkit

    def name(names: Any, nla: str) -> Any:
        value = data.get_attr(nla)
        # a value newer than this code stays visible rather than failing a whole dump
        return None if value is None else names.get(value, str(value))

    return NetkitInfo(
        # PAIRING is 7.0+: older netkits are all pairs
        pairing=name(nk.pairings, "IFLA_NETKIT_PAIRING") or "pair",
        mode=name(nk.modes, "IFLA_NETKIT_MODE"),
        policy=name(nk.policies, "IFLA_NETKIT_POLICY"),
        peer_policy=name(nk.policies, "IFLA_NETKIT_PEER_POLICY"),
        primary=bool(data.get_attr("IFLA_NETKIT_PRIMARY")),
        scrub=name(nk.scrubs, "IFLA_NETKIT_SCRUB"),
        peer_scrub=name(nk.scrubs, "IFLA_NETKIT_PEER_SCRUB"),
        headroom=data.get_attr("IFLA_NETKIT_HEADROOM"),
        tailroom=data.get_attr("IFLA_NETKIT_TAILROOM"),
    )


def _queue(msg: Any) -> Queue:
    lease = msg.get_attr("NETDEV_A_QUEUE_LEASE")
    leased = None
    if lease is not None:
        queue = lease.get_attr("NETDEV_A_LEASE_QUEUE")
        leased = QueueLease(
            ifindex=lease.get_attr("NETDEV_A_LEASE_IFINDEX"),
            queue_id=queue.get_attr("NETDEV_A_QUEUE_ID"),
            queue_type=_QUEUE_TYPE_NAMES[queue.get_attr("NETDEV_A_QUEUE_TYPE")],
            netns_id=lease.get_attr("NETDEV_A_LEASE_NETNS_ID"),
        )
    return Queue(
        ifindex=msg.get_attr("NETDEV_A_QUEUE_IFINDEX"),
        id=msg.get_attr("NETDEV_A_QUEUE_ID"),
        type=_QUEUE_TYPE_NAMES[msg.get_attr("NETDEV_A_QUEUE_TYPE")],
        napi_id=msg.get_attr("NETDEV_A_QUEUE_NAPI_ID"),
        lease=leased,
        xsk=msg.get_attr("NETDEV_A_QUEUE_XSK") is not None,
        dmabuf=msg.get_attr("NETDEV_A_QUEUE_DMABUF"),
        io_uring=msg.get_attr("NETDEV_A_QUEUE_IO_URING") is not None,
    )
