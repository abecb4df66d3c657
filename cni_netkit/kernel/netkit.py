"""The ``netkit`` rtnetlink link kind for pyroute2 (IFLA_INFO_DATA of netkit links).

Written in the shape of pyroute2's own link-kind plugins
(``pyroute2/netlink/rtnl/ifinfmsg/plugins/*.py``) so that it can go upstream
as is.  pyroute2 0.9.7 does not know netkit: without a registered class it
can neither encode nor decode IFLA_INFO_DATA for it, hence ``register()``.

Attribute ids are ``IFLA_NETKIT_*`` from include/uapi/linux/if_link.h (the
nla_map position is the id); value names are those of
Documentation/netlink/specs/rt-link.yaml (netkit-policy, netkit-mode,
netkit-scrub, netkit-pairing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pyroute2.netlink import nla
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg, ifinfveth


class netkit(nla):  # type: ignore[misc]  # pyroute2 is untyped
    prefix = 'IFLA_'
    nla_map = (
        ('IFLA_NETKIT_UNSPEC', 'none'),
        # struct ifinfomsg + IFLA_* of the peer, exactly like VETH_INFO_PEER
        ('IFLA_NETKIT_PEER_INFO', 'info_peer'),
        # read only: the kernel rejects it in requests
        ('IFLA_NETKIT_PRIMARY', 'uint8'),
        ('IFLA_NETKIT_POLICY', 'uint32'),
        ('IFLA_NETKIT_PEER_POLICY', 'uint32'),
        ('IFLA_NETKIT_MODE', 'uint32'),
        ('IFLA_NETKIT_SCRUB', 'uint32'),
        ('IFLA_NETKIT_PEER_SCRUB', 'uint32'),
        ('IFLA_NETKIT_HEADROOM', 'uint16'),
        ('IFLA_NETKIT_TAILROOM', 'uint16'),
        ('IFLA_NETKIT_PAIRING', 'uint32'),
    )

    # attribute values -> rt-link.yaml names (cf. ipvlan.modes)
    policies: ClassVar[Mapping[int, str]] = {0: 'forward', 2: 'blackhole'}
    modes: ClassVar[Mapping[int, str]] = {0: 'l2', 1: 'l3'}
    scrubs: ClassVar[Mapping[int, str]] = {0: 'none', 1: 'default'}
    pairings: ClassVar[Mapping[int, str]] = {0: 'pair', 1: 'single'}

    @staticmethod
    def info_peer(msg: nla, *argv: object, **kwarg: object) -> Any:
        return ifinfveth


def register() -> None:
    """Teach pyroute2's ifinfmsg the netkit kind (idempotent, no pyroute2 file touched)."""
    ifinfmsg.ifinfo.register_link_kind(module={'netkit': netkit})
