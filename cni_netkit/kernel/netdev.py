"""The ``netdev`` generic netlink family for pyroute2 (dev-get, queue-get, queue-create).

Written in the shape of pyroute2's generic families
(``pyroute2/netlink/generic/mptcp.py``, ``ethtool.py``): one ``genlmsg``
class per attribute set, an asyncio socket with one method per op, and a
synchronous wrapper.  Ids and names follow
Documentation/netlink/specs/netdev.yaml and include/uapi/linux/netdev.h;
method and argument names follow the spec's op and attribute names.

The message classes live here; the sockets in ``netdev_socket`` (re-exported
here on first use).  Upstream they would share one module, but pyroute2's
generic netlink sockets import asyncio (a cold CNI command paid ~70 ms on a
host for it, over a second in the test VM), while ``api`` needs only the
message classes, which it sends over ``rawnl``'s synchronous transport.

Errors are left as pyroute2's ``NetlinkError`` (code + extack text when the
socket was opened with ``ext_ack=True``): translating them is the caller's
business.  ``ops`` tells which ops the running kernel has, from the
CTRL_CMD_GETFAMILY reply ``bind()`` gets anyway: queue-create is Linux 7.1+.
"""

from __future__ import annotations

from typing import Any

from pyroute2.netlink import NLA_F_NESTED, genlmsg, nla

__all__ = [
    'NETDEV_CMD_BIND_RX',
    'NETDEV_CMD_BIND_TX',
    'NETDEV_CMD_DEV_GET',
    'NETDEV_CMD_NAPI_GET',
    'NETDEV_CMD_NAPI_SET',
    'NETDEV_CMD_QSTATS_GET',
    'NETDEV_CMD_QUEUE_CREATE',
    'NETDEV_CMD_QUEUE_GET',
    'NETDEV_GENL_NAME',
    'NETDEV_GENL_VERSION',
    'NETDEV_QUEUE_TYPE_RX',
    'NETDEV_QUEUE_TYPE_TX',
    'XDP_ACT',
    'XSK_FLAGS',
    'flag_names',
    'lease',
    'netdev_dev_msg',
    'netdev_queue_msg',
    'queue_id',
]


NETDEV_GENL_NAME = "netdev"
NETDEV_GENL_VERSION = 1

NETDEV_CMD_DEV_GET = 1
NETDEV_CMD_QUEUE_GET = 10
NETDEV_CMD_NAPI_GET = 11
NETDEV_CMD_QSTATS_GET = 12
NETDEV_CMD_BIND_RX = 13
NETDEV_CMD_NAPI_SET = 14
NETDEV_CMD_BIND_TX = 15
NETDEV_CMD_QUEUE_CREATE = 16

NETDEV_QUEUE_TYPE_RX = 0
NETDEV_QUEUE_TYPE_TX = 1

# enum flags xdp-act / xsk-flags: bit -> name, in spec order
XDP_ACT = (
    "basic",
    "redirect",
    "ndo-xmit",
    "xsk-zerocopy",
    "hw-offload",
    "rx-sg",
    "ndo-xmit-sg",
)
XSK_FLAGS = ("tx-timestamp", "tx-checksum", "tx-launch-time-fifo")


def queue_create_attrs(
    ifindex: int,
    type: int,
    lease_ifindex: int,
    lease_queue_id: int,
    lease_netns_id: int | None = None,
) -> list[Any]:
    """The attributes of a queue-create request (``netdev_queue_msg``).

    A new queue of ``type`` on ``ifindex`` leasing queue ``lease_queue_id``
    of ``lease_ifindex``; ``lease_netns_id`` is the nsid, seen from the
    requesting socket's netns, of the netns holding ``lease_ifindex`` (None:
    the same netns).
    """
    lease_attrs: list[Any] = [
        ('NETDEV_A_LEASE_IFINDEX', lease_ifindex),
        (
            'NETDEV_A_LEASE_QUEUE',
            {
                'attrs': [
                    ('NETDEV_A_QUEUE_ID', lease_queue_id),
                    ('NETDEV_A_QUEUE_TYPE', type),
                ]
            },
        ),
    ]
    if lease_netns_id is not None:
        lease_attrs.append(('NETDEV_A_LEASE_NETNS_ID', lease_netns_id))
    return [
        ('NETDEV_A_QUEUE_IFINDEX', ifindex),
        ('NETDEV_A_QUEUE_TYPE', type),
        ('NETDEV_A_QUEUE_LEASE', {'attrs': lease_attrs}),
    ]


def flag_names(value: int, names: tuple[str, ...]) -> frozenset[str]:
    """Decode a spec 'flags' bitmask; bits the spec (as known here) lacks stay visible."""
    return frozenset(
        names[bit] if bit < len(names) else f"bit{bit}"
        for bit in range(value.bit_length())
        if value >> bit & 1
    )


class netdev_dev_msg(genlmsg):  # type: ignore[misc]  # pyroute2 is untyped
    """Attribute set ``dev``."""

    prefix = 'NETDEV_A_DEV_'
    nla_map = (
        ('NETDEV_A_DEV_UNSPEC', 'none'),
        ('NETDEV_A_DEV_IFINDEX', 'uint32'),
        ('NETDEV_A_DEV_PAD', 'none'),
        ('NETDEV_A_DEV_XDP_FEATURES', 'uint64'),
        ('NETDEV_A_DEV_XDP_ZC_MAX_SEGS', 'uint32'),
        ('NETDEV_A_DEV_XDP_RX_METADATA_FEATURES', 'uint64'),
        ('NETDEV_A_DEV_XSK_FEATURES', 'uint64'),
    )


class queue_id(nla):  # type: ignore[misc]
    """Attribute set ``queue-id`` (a subset of ``queue``)."""

    # netdev's policies are strict: a nest must say it is one
    nla_flags = NLA_F_NESTED
    prefix = 'NETDEV_A_QUEUE_'
    nla_map = (
        ('NETDEV_A_QUEUE_UNSPEC', 'none'),
        ('NETDEV_A_QUEUE_ID', 'uint32'),
        ('NETDEV_A_QUEUE_IFINDEX', 'uint32'),
        ('NETDEV_A_QUEUE_TYPE', 'uint32'),
    )


class lease(nla):  # type: ignore[misc]
    """Attribute set ``lease``: the other end of a leased queue."""

    nla_flags = NLA_F_NESTED
    prefix = 'NETDEV_A_LEASE_'
    nla_map = (
        ('NETDEV_A_LEASE_UNSPEC', 'none'),
        ('NETDEV_A_LEASE_IFINDEX', 'uint32'),
        ('NETDEV_A_LEASE_QUEUE', 'queue_id'),
        ('NETDEV_A_LEASE_NETNS_ID', 'int32'),
    )

    queue_id = queue_id


class netdev_queue_msg(genlmsg):  # type: ignore[misc]
    """Attribute set ``queue``."""

    prefix = 'NETDEV_A_QUEUE_'
    nla_map = (
        ('NETDEV_A_QUEUE_UNSPEC', 'none'),
        ('NETDEV_A_QUEUE_ID', 'uint32'),
        ('NETDEV_A_QUEUE_IFINDEX', 'uint32'),
        ('NETDEV_A_QUEUE_TYPE', 'uint32'),
        ('NETDEV_A_QUEUE_NAPI_ID', 'uint32'),
        ('NETDEV_A_QUEUE_DMABUF', 'uint32'),
        # io-uring-provider-info and xsk-info are empty sets: presence is the news
        ('NETDEV_A_QUEUE_IO_URING', 'flag'),
        ('NETDEV_A_QUEUE_XSK', 'flag'),
        ('NETDEV_A_QUEUE_LEASE', 'lease'),
    )

    lease = lease


def __getattr__(name: str) -> Any:
    """``AsyncNetdevSocket`` / ``NetdevSocket``, loaded (with asyncio) on first use."""
    if name in ('AsyncNetdevSocket', 'NetdevSocket'):
        from cni_netkit.kernel import netdev_socket  # noqa: PLC0415 - asyncio: see module doc

        return getattr(netdev_socket, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
