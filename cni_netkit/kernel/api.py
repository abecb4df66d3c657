"""``Kernel``: the ``KernelAPI`` seam implemented over netlink (rtnetlink + genl netdev).

Everything netlink stops here: callers get the frozen dataclasses of
``types.py`` and the errors of ``cni_netkit.errors``, each kernel error
raised ``from`` pyroute2's ``NetlinkError`` and carrying the kernel's extack
text in ``details``.  Every message is built and decoded by pyroute2's
message classes (``ifinfmsg`` with our ``netkit`` link kind, ``ifaddrmsg``,
``rtmsg``, ``nsidmsg``, our ``netdev`` genl classes); they travel over
``rawnl``'s small synchronous transport, because pyroute2 0.9's own
synchronous sockets drive asyncio per request (see ``rawnl``).

A ``Kernel`` keeps one rtnetlink and one generic netlink socket per netns
path it touches, made together by ``netns.sockets_in`` (never by pyroute2's
``netns=``, which would create a missing netns).  An open socket pins its
netns: a pod netns whose last other user is gone stays alive, with its
netkit and leases, until ``close()``.  Short-lived owners (one CNI command)
are what this is for.  The netdev family's id is looked up once per process.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from types import TracebackType
from typing import Any, cast

from pyroute2.netlink import NETLINK_GENERIC, NETLINK_ROUTE, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTM_DELLINK,
    RTM_GETLINK,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP, ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import RT_SCOPE_LINK, RT_SCOPE_UNIVERSE, rtmsg

from cni_netkit.errors import (
    QUEUE_CREATE_ERRORS,
    KernelError,
    KernelUnsupported,
    NotSupported,
    kernel_error,
)
from cni_netkit.kernel import netkit as netkit_kind
from cni_netkit.kernel import netns as ns
from cni_netkit.kernel import rawnl as nl
from cni_netkit.kernel.netdev import (
    NETDEV_CMD_DEV_GET,
    NETDEV_CMD_QUEUE_CREATE,
    NETDEV_CMD_QUEUE_GET,
    NETDEV_GENL_NAME,
    NETDEV_GENL_VERSION,
    XDP_ACT,
    XSK_FLAGS,
    flag_names,
    netdev_dev_msg,
    netdev_queue_msg,
    queue_create_attrs,
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

# ifinfmsg encodes and decodes IFLA_INFO_DATA of kind "netkit" through our class
netkit_kind.register()

_QUEUE_TYPES: dict[QueueType, int] = {"rx": 0, "tx": 1}
_QUEUE_TYPE_NAMES: dict[int, QueueType] = {v: k for k, v in _QUEUE_TYPES.items()}
_POLICIES: dict[NetkitPolicy, int] = {"forward": 0, "blackhole": 2}
_MODES: dict[NetkitMode, int] = {"l2": 0, "l3": 1}
_PAIRINGS: dict[Pairing, int] = {"pair": 0, "single": 1}
# The netns the calling process lives in, as a path for RTM_GETNSID's NETNSA_FD
_OWN_NETNS = "/proc/self/ns/net"
# IFLA_EXT_MASK: no statistics in link answers (nothing here reads them)
RTEXT_FILTER_SKIP_STATS = 1 << 3
# what pyroute2 and `ip route add` default to: main table, "proto static", unicast
RT_TABLE_MAIN, RTPROT_STATIC, RTN_UNICAST = 254, 4, 1

# The netdev family's id and ops: genl families are global, not per netns, and
# live as long as the kernel (netdev is built in), so one lookup per process.
_netdev_family: tuple[int, frozenset[int]] | None = None


def _extack(e: NetlinkError) -> str:
    """The kernel's extack message; pyroute2 puts strerror() there when there is none."""
    text = e.args[1] if len(e.args) > 1 else None
    return "" if not text or text == os.strerror(e.code) else str(text)


@contextmanager
def _netlink(
    what: str, errors: Mapping[int, type[KernelError]] | None = None
) -> Iterator[None]:
    """Turn a NetlinkError into our KernelError subclass for its errno, naming ``what``.

    ``errors``: the request's own meanings of errnos (``QUEUE_CREATE_ERRORS``).
    """
    try:
        yield
    except NetlinkError as e:
        raise kernel_error(e.code, what, _extack(e), errors) from e


def _step(step: Callable[[str], None] | None, name: str) -> None:
    if step is not None:
        step(name)


def _in(netns: str | None) -> str:
    return f" in netns {netns}" if netns else ""


class Kernel:
    """The real kernel, through netlink; see the module docstring for socket lifetimes."""

    def __init__(self) -> None:
        # ``rawnl`` transport sockets, by (netns, netlink protocol)
        self._raw: dict[tuple[str | None, int], nl.NetlinkSocket] = {}

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
        for sock in self._raw.values():
            sock.close()
        self._raw.clear()

    def forget_netns(self, netns: str) -> None:
        """Close this instance's sockets in ``netns``: a scan of many netns (GC) holds
        at most one netns's at a time rather than two sockets for every one it saw."""
        for key in [k for k in self._raw if k[0] == netns]:
            self._raw.pop(key).close()

    def rss_table(self, ifname: str) -> tuple[int, ...] | None:
        """``KernelAPI.rss_table``: ETHTOOL_GRXFHINDIR, in this process's (the host's) netns."""
        from cni_netkit.kernel.ethtool import Ethtool  # noqa: PLC0415 - only ADD asks

        try:
            return Ethtool().rss_table(ifname)
        except NotSupported:
            return None

    # --- sockets ----------------------------------------------------------

    def _nl(self, netns: str | None, proto: int) -> nl.NetlinkSocket:
        """The ``rawnl`` socket of ``proto`` in ``netns``.

        In another netns both protocols' sockets are made at once, in one
        thread trip: an ADD needs both there (links, then queue-create).
        """
        sock = self._raw.get((netns, proto))
        if sock is not None:
            return sock
        protos = [NETLINK_ROUTE, NETLINK_GENERIC]
        if netns is None:
            made = [socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, p) for p in protos]
        else:
            nsfd = ns.open_netns(netns)
            try:
                made = ns.sockets_in(
                    nsfd, [(socket.AF_NETLINK, socket.SOCK_RAW, p) for p in protos]
                )
            finally:
                os.close(nsfd)
        for p, raw in zip(protos, made, strict=True):
            if (netns, p) in self._raw:
                raw.close()
            else:
                self._raw[(netns, p)] = nl.NetlinkSocket(raw)
        return self._raw[(netns, proto)]

    def _rt(self, netns: str | None) -> nl.NetlinkSocket:
        return self._nl(netns, NETLINK_ROUTE)

    def _netdev(self, netns: str | None) -> tuple[nl.NetlinkSocket, int, frozenset[int]]:
        """The genl socket in ``netns``, the netdev family's id and its ops."""
        global _netdev_family  # noqa: PLW0603 - a per-process cache, see its comment
        sock = self._nl(netns, NETLINK_GENERIC)
        if _netdev_family is None:
            try:
                _netdev_family = nl.genl_family(sock, NETDEV_GENL_NAME)
            except NetlinkError as e:
                if e.code == errno.ENOENT:
                    raise KernelUnsupported(
                        f"the running kernel ({os.uname().release}) has no netdev generic "
                        "netlink family",
                        "netkit queue leasing needs Linux >= 7.1",
                        err=e.code,
                    ) from e
                raise kernel_error(e.code, "resolve genl family netdev", _extack(e)) from e
        family, ops = _netdev_family
        return sock, family, ops

    def _genl(
        self, netns: str | None, msg: Any, cmd: int, attrs: list[Any], *, dump: bool = False,
        parse: Callable[[Any], Any] | None = None, memo: dict[bytes, Any] | None = None,
    ) -> list[Any]:
        sock, family, _ = self._netdev(netns)
        return nl.genl_request(
            sock, family, msg, cmd, attrs, dump=dump, version=NETDEV_GENL_VERSION, parse=parse,
            memo=memo,
        )

    # --- probing ----------------------------------------------------------

    def probe(self) -> KernelSupport:
        """What the running kernel offers for netkit queue leasing (creates nothing)."""
        try:
            _, _, ops = self._netdev(None)
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
        msg = _ifinfmsg(
            0,
            ("IFLA_IFNAME", "/"),
            ("IFLA_LINKINFO", _linkinfo([("IFLA_NETKIT_PRIMARY", 1)])),
        )
        try:
            # Should the attribute ever be accepted, the invalid name still stops creation.
            self._rt(None).request(msg, RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL)
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
        skip_stats = ("IFLA_EXT_MASK", RTEXT_FILTER_SKIP_STATS)
        if isinstance(name_or_index, int):
            msg = _ifinfmsg(name_or_index, skip_stats)
        else:
            msg = _ifinfmsg(0, ("IFLA_IFNAME", name_or_index), skip_stats)
        try:
            with _netlink(f"get link {name_or_index}{_in(netns)}"):
                # The master is looked up by every ADD, and its answer repeats byte for
                # byte (no stats): decoded once (~3 ms a decode in the test VM).
                (found,) = self._rt(netns).request(msg, RTM_GETLINK, parse=_link,
                                                   memo=_LINK_MEMO, memo_limit=_LINK_MEMO_LIMIT)
        except KernelError as e:
            if e.err == errno.ENODEV:
                return None
            raise
        return cast(Link, found)

    def links(self, *, netns: str | None = None, kind: str | None = None) -> list[Link]:
        """Every link in ``netns`` (of ``kind`` only, when given)."""
        msg = _ifinfmsg(0, ("IFLA_EXT_MASK", RTEXT_FILTER_SKIP_STATS))
        with _netlink(f"dump links{_in(netns)}"):
            replies = self._rt(netns).request(msg, RTM_GETLINK, NLM_F_DUMP)
        found = [_link(reply) for reply in replies]
        return [lk for lk in found if kind is None or lk.kind == kind]

    def create_netkit(
        self, spec: NetkitSpec, *, step: Callable[[str], None] | None = None
    ) -> Link:
        """Create the device (and its peer); returns the link in ``spec.netns``.

        See ``types.KernelAPI.create_netkit`` for ``step`` and ``spec.staging_name``.
        """
        data: list[tuple[str, Any]] = [
            ("IFLA_NETKIT_PAIRING", _PAIRINGS[spec.pairing]),
            ("IFLA_NETKIT_MODE", _MODES[spec.mode]),
            ("IFLA_NETKIT_POLICY", _POLICIES[spec.policy]),
        ]
        made_as = spec.staging_name or spec.name
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
                # struct ifinfomsg + IFLA_* of the peer, like veth's VETH_INFO_PEER
                data.append(("IFLA_NETKIT_PEER_INFO", {"attrs": peer}))
            attrs = _ifla(made_as, spec.mac, spec.mtu, spec.num_rx_queues)
            msg = _ifinfmsg(0, ("IFLA_LINKINFO", _linkinfo(data)), *attrs)
            with _netlink(f"create netkit {made_as}{_in(spec.netns)}"):
                self._rt(spec.netns).request(msg, RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL)
        _step(step, "create:made")
        created = self.link(made_as, netns=spec.netns)
        if created is None:
            raise KernelError(f"netkit {made_as}{_in(spec.netns)} missing right after creation")
        # rtnetlink ignores IFLA_IFALIAS when creating: set it afterwards (with
        # the final name and the admin state, in one request), undoing the
        # creation if that fails. do_setlink renames before it changes flags.
        up = True if spec.up else None
        peer_link: Link | None = None
        with ExitStack() as undo:
            undo.callback(self.delete_link, created.index, netns=spec.netns)
            rename = spec.name if made_as != spec.name else None
            if spec.alias is not None or rename is not None or up:
                self.set_link(created.index, netns=spec.netns, alias=spec.alias, name=rename, up=up)
                _step(step, "create:named")
            if spec.peer is not None:
                # looked up once, here: the caller gets it back as ``peer``
                peer_link = self.link(spec.peer.name, netns=spec.peer.netns)
                if peer_link is None:
                    raise KernelError(
                        f"netkit peer {spec.peer.name}{_in(spec.peer.netns)} missing right "
                        "after creation"
                    )
                peer_up = True if spec.peer.up else None
                if spec.peer.alias is not None or peer_up:
                    self.set_link(peer_link.index, netns=spec.peer.netns, alias=spec.peer.alias,
                                  up=peer_up)
                    _step(step, "create:peer-named")
                    peer_link = replace(
                        peer_link,
                        alias=spec.peer.alias if spec.peer.alias is not None else peer_link.alias,
                        up=peer_link.up or spec.peer.up,
                    )
            undo.pop_all()
        # What the kernel just acknowledged, without reading the link back a third
        # time (an RTM_GETLINK and its decode: ~7 ms of a warm ADD in the test VM).
        return replace(
            created,
            name=spec.name,
            alias=spec.alias if spec.alias is not None else created.alias,
            up=created.up or spec.up,
            peer=peer_link,
        )

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
        what: list[str] = []
        attrs: list[tuple[str, Any]] = []
        flags = change = 0
        if up is not None:
            flags, change = (IFF_UP if up else 0), IFF_UP
            what += ["flags", "change"]
        for nla, value in (
            ("IFLA_ADDRESS", mac),
            ("IFLA_MTU", mtu),
            ("IFLA_IFALIAS", alias),
            ("IFLA_IFNAME", name),
        ):
            if value is not None:
                attrs.append((nla, value))
                what.append(nla)
        if not what:
            return
        msg = _ifinfmsg(index, *attrs, flags=flags, change=change)
        with _netlink(f"set link {index}{_in(netns)} ({', '.join(what)})"):
            self._rt(netns).request(msg, RTM_NEWLINK)

    def move_link(
        self, index: int, *, target_netns: str, netns: str | None = None, name: str | None = None
    ) -> None:
        """Move link ``index`` from ``netns`` into ``target_netns`` (renaming it to ``name``)."""
        nsfd = ns.open_netns(target_netns)
        try:
            attrs: list[tuple[str, Any]] = [("IFLA_NET_NS_FD", nsfd)]
            if name is not None:
                attrs.append(("IFLA_IFNAME", name))
            with _netlink(f"move link {index}{_in(netns)} to netns {target_netns}"):
                self._rt(netns).request(_ifinfmsg(index, *attrs), RTM_NEWLINK)
        finally:
            os.close(nsfd)

    def delete_link(self, index: int, *, netns: str | None = None) -> bool:
        """Delete; False when it was already gone (not an error)."""
        try:
            with _netlink(f"delete link {index}{_in(netns)}"):
                self._rt(netns).request(_ifinfmsg(index), RTM_DELLINK)
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
            msg = ifaddrmsg()
            msg["family"] = family
            msg["prefixlen"] = iface.network.prefixlen
            msg["scope"] = RT_SCOPE_UNIVERSE
            msg["index"] = index
            msg["attrs"] = [("IFA_ADDRESS", str(iface.ip))]
            if iface.version == 4:
                msg["attrs"].append(("IFA_LOCAL", str(iface.ip)))  # what `ip addr add` sends too
            with _netlink(f"add address {cidr} to link {index}{_in(netns)}"):
                self._rt(netns).request(msg, RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL)
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
        family = socket.AF_INET if net.version == 4 else socket.AF_INET6
        msg = rtmsg()
        msg["family"] = family
        msg["dst_len"] = net.prefixlen
        msg["table"] = RT_TABLE_MAIN
        msg["proto"] = RTPROT_STATIC
        msg["scope"] = RT_SCOPE_LINK if scope_link else RT_SCOPE_UNIVERSE
        msg["type"] = RTN_UNICAST
        msg["attrs"] = [("RTA_DST", str(net.network_address)), ("RTA_OIF", oif)]
        if gateway is not None:
            msg["attrs"].append(("RTA_GATEWAY", gateway))
        try:
            with _netlink(f"add route {dst} via {gateway or 'link'} dev {oif}{_in(netns)}"):
                self._rt(netns).request(msg, RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL)
        except KernelError as e:
            if e.err != errno.EEXIST:
                raise

    # --- netns ids --------------------------------------------------------

    def netns_id(self, target: str | None, *, netns: str | None = None) -> int | None:
        """The nsid of netns ``target`` as seen from ``netns``, or None if unassigned."""
        nsfd = ns.open_netns(target or _OWN_NETNS)
        try:
            with _netlink(f"get nsid of netns {target or 'of this process'}{_in(netns)}"):
                return ns.get_nsid(self._rt(netns), nsfd)
        finally:
            os.close(nsfd)

    def ensure_netns_id(self, target: str | None, *, netns: str | None = None) -> int:
        """Like ``netns_id`` but assigns one (RTM_NEWNSID) when there is none."""
        nsfd = ns.open_netns(target or _OWN_NETNS)
        try:
            with _netlink(f"assign nsid to netns {target or 'of this process'}{_in(netns)}"):
                return ns.ensure_nsid(self._rt(netns), nsfd)
        finally:
            os.close(nsfd)

    # --- netdev genl: queues ----------------------------------------------

    def dev_get(self, ifindex: int, *, netns: str | None = None) -> DevInfo:
        """``dev-get`` of device ``ifindex`` in ``netns``."""
        with _netlink(f"dev-get ifindex {ifindex}{_in(netns)}"):
            (msg,) = self._genl(
                netns, netdev_dev_msg(), NETDEV_CMD_DEV_GET, [("NETDEV_A_DEV_IFINDEX", ifindex)]
            )
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
            (msg,) = self._genl(
                netns,
                netdev_queue_msg(),
                NETDEV_CMD_QUEUE_GET,
                [
                    ("NETDEV_A_QUEUE_IFINDEX", ifindex),
                    ("NETDEV_A_QUEUE_TYPE", _QUEUE_TYPES[type]),
                    ("NETDEV_A_QUEUE_ID", queue_id),
                ],
            )
        return _queue(msg)

    def queues(self, ifindex: int | None = None, *, netns: str | None = None) -> list[Queue]:
        """``queue-get`` dump (all devices in the netns, or one device's queues)."""
        where = f" ifindex {ifindex}" if ifindex is not None else ""
        with _netlink(f"queue-get dump{where}{_in(netns)}"):
            # the kernel filters the dump by NETDEV_A_QUEUE_IFINDEX
            attrs = [] if ifindex is None else [("NETDEV_A_QUEUE_IFINDEX", ifindex)]
            # Every ADD dumps the master's queues (rx and tx: 2 answers per queue id).
            # Answers equal to ones seen before are not decoded again (_QUEUE_MEMO):
            # the kernel's dump is still the whole truth each time, but a long-lived
            # process (the node agent) decodes only the queues that changed.
            return self._genl(netns, netdev_queue_msg(), NETDEV_CMD_QUEUE_GET, attrs, dump=True,
                              parse=_queue, memo=_QUEUE_MEMO)

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
        _, _, ops = self._netdev(netns)
        if NETDEV_CMD_QUEUE_CREATE not in ops:
            raise KernelUnsupported(
                f"{what}: the running kernel ({os.uname().release}) has no queue-create op",
                "netkit queue leasing needs Linux >= 7.1",
                err=errno.EOPNOTSUPP,
            )
        with _netlink(what, QUEUE_CREATE_ERRORS):
            attrs = queue_create_attrs(
                ifindex, _QUEUE_TYPES["rx"], lessor_ifindex, lessor_queue, lessor_netns_id
            )
            (msg,) = self._genl(netns, netdev_queue_msg(), NETDEV_CMD_QUEUE_CREATE, attrs)
        return int(msg.get_attr("NETDEV_A_QUEUE_ID"))


# --- messages -------------------------------------------------------------


def _ifinfmsg(index: int, *attrs: tuple[str, Any], flags: int = 0, change: int = 0) -> Any:
    """An ifinfmsg (AF_UNSPEC) for link ``index`` (0: none) carrying ``attrs``."""
    msg = ifinfmsg()
    msg["family"] = socket.AF_UNSPEC
    msg["index"] = index
    msg["flags"] = flags
    msg["change"] = change
    msg["attrs"] = list(attrs)
    return msg


def _linkinfo(data: list[tuple[str, Any]]) -> dict[str, Any]:
    """IFLA_LINKINFO of kind netkit; IFLA_INFO_DATA is encoded by our ``netkit`` class."""
    return {"attrs": [("IFLA_INFO_KIND", "netkit"), ("IFLA_INFO_DATA", {"attrs": data})]}


def _ifla(
    name: str, mac: str | None, mtu: int | None, num_rx_queues: int | None
) -> list[tuple[str, Any]]:
    """The IFLA_* a new link (or a netkit peer) is created with."""
    attrs: list[tuple[str, Any]] = [("IFLA_IFNAME", name)]
    if mac is not None:
        attrs.append(("IFLA_ADDRESS", mac))
    if mtu is not None:
        attrs.append(("IFLA_MTU", mtu))
    if num_rx_queues is not None:
        attrs.append(("IFLA_NUM_RX_QUEUES", num_rx_queues))
    return attrs


# --- decoding ---------------------------------------------------------------


def _attrs(msg: Any) -> dict[str, Any]:
    """Name -> attribute slot of a decoded pyroute2 message, the first of a name winning.

    What ``get_attr`` answers, in one pass: ``get_attr`` walks every
    attribute for each name asked (a link answer has ~40), which under
    emulation cost as much as decoding the message.  A slot's value is still
    decoded by pyroute2, lazily, on ``.value``.
    """
    slots: dict[str, Any] = {}
    for slot in reversed(msg["attrs"]):
        slots[slot.name] = slot
    return slots


def _value(slots: dict[str, Any], name: str) -> Any:
    slot = slots.get(name)
    return None if slot is None else slot.value


def _link(msg: Any) -> Link:
    """A Link from a decoded RTM_NEWLINK answer (pyroute2's ``ifinfmsg``)."""
    a = _attrs(msg)
    linkinfo = _value(a, "IFLA_LINKINFO")
    kind = info = None
    if linkinfo is not None:
        li = _attrs(linkinfo)
        kind = _value(li, "IFLA_INFO_KIND")
        if kind == "netkit":
            info = _netkit_info(_value(li, "IFLA_INFO_DATA"))
    return Link(
        index=msg["index"],
        name=_value(a, "IFLA_IFNAME"),
        kind=kind,
        mac=_value(a, "IFLA_ADDRESS"),
        mtu=_value(a, "IFLA_MTU"),
        up=bool(msg["flags"] & IFF_UP),
        alias=_value(a, "IFLA_IFALIAS"),
        num_rx_queues=_value(a, "IFLA_NUM_RX_QUEUES"),
        num_tx_queues=_value(a, "IFLA_NUM_TX_QUEUES"),
        netkit=info,
        link_netnsid=_value(a, "IFLA_LINK_NETNSID"),
        parent_dev=_value(a, "IFLA_PARENT_DEV_NAME"),
        parent_bus=_value(a, "IFLA_PARENT_DEV_BUS_NAME"),
    )


def _netkit_info(data: Any) -> NetkitInfo:
    """NetkitInfo from IFLA_INFO_DATA as our ``netkit`` class decoded it."""
    nk = netkit_kind.netkit
    a = {} if data is None else _attrs(data)  # no IFLA_INFO_DATA: every field unknown

    def name(names: Any, nla: str) -> Any:
        value = _value(a, nla)
        # a value newer than this code stays visible rather than failing a whole dump
        return None if value is None else names.get(value, str(value))

    return NetkitInfo(
        # PAIRING came with queue leasing (7.1+): older netkits are all pairs
        pairing=name(nk.pairings, "IFLA_NETKIT_PAIRING") or "pair",
        mode=name(nk.modes, "IFLA_NETKIT_MODE"),
        policy=name(nk.policies, "IFLA_NETKIT_POLICY"),
        peer_policy=name(nk.policies, "IFLA_NETKIT_PEER_POLICY"),
        primary=bool(_value(a, "IFLA_NETKIT_PRIMARY")),
        scrub=name(nk.scrubs, "IFLA_NETKIT_SCRUB"),
        peer_scrub=name(nk.scrubs, "IFLA_NETKIT_PEER_SCRUB"),
        headroom=_value(a, "IFLA_NETKIT_HEADROOM"),
        tailroom=_value(a, "IFLA_NETKIT_TAILROOM"),
    )


# queue-get answer bytes (past the netlink header) -> their Queue; see Kernel.queues
_QUEUE_MEMO: dict[bytes, Queue] = {}
# RTM_NEWLINK answer bytes -> their Link; see Kernel.link. Small: a link's answer is
# ~1 KB, and what repeats is the few masters (a pod's new netkit never does).
_LINK_MEMO: dict[bytes, Link] = {}
_LINK_MEMO_LIMIT = 32


def _queue(msg: Any) -> Queue:
    """A Queue from a decoded queue-get answer (our ``netdev_queue_msg``)."""
    a = _attrs(msg)
    lease = _value(a, "NETDEV_A_QUEUE_LEASE")
    leased = None
    if lease is not None:
        la = _attrs(lease)
        queue = _attrs(_value(la, "NETDEV_A_LEASE_QUEUE"))
        leased = QueueLease(
            ifindex=_value(la, "NETDEV_A_LEASE_IFINDEX"),
            queue_id=_value(queue, "NETDEV_A_QUEUE_ID"),
            queue_type=_QUEUE_TYPE_NAMES[_value(queue, "NETDEV_A_QUEUE_TYPE")],
            netns_id=_value(la, "NETDEV_A_LEASE_NETNS_ID"),
        )
    return Queue(
        ifindex=_value(a, "NETDEV_A_QUEUE_IFINDEX"),
        id=_value(a, "NETDEV_A_QUEUE_ID"),
        type=_QUEUE_TYPE_NAMES[_value(a, "NETDEV_A_QUEUE_TYPE")],
        napi_id=_value(a, "NETDEV_A_QUEUE_NAPI_ID"),
        lease=leased,
        # xsk-info and io-uring-provider-info are empty nests: presence is the news
        xsk="NETDEV_A_QUEUE_XSK" in a,
        dmabuf=_value(a, "NETDEV_A_QUEUE_DMABUF"),
        io_uring="NETDEV_A_QUEUE_IO_URING" in a,
    )
