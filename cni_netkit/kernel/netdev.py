"""The ``netdev`` generic netlink family for pyroute2 (dev-get, queue-get, queue-create).

Written in the shape of pyroute2's generic families
(``pyroute2/netlink/generic/mptcp.py``, ``ethtool.py``): one ``genlmsg``
class per attribute set, an asyncio socket with one method per op, and a
synchronous wrapper.  Ids and names follow
Documentation/netlink/specs/netdev.yaml and include/uapi/linux/netdev.h;
method and argument names follow the spec's op and attribute names.

Errors are left as pyroute2's ``NetlinkError`` (code + extack text when the
socket was opened with ``ext_ack=True``): translating them is the caller's
business.  ``ops`` tells which ops the running kernel has, from the
CTRL_CMD_GETFAMILY reply ``bind()`` gets anyway: queue-create is Linux 7.0+.
"""

from __future__ import annotations

from typing import Any

from pyroute2.netlink import NLA_F_NESTED, NLM_F_DUMP, NLM_F_REQUEST, genlmsg, nla
from pyroute2.netlink.generic import AsyncGenericNetlinkSocket, GenericNetlinkSocket

# ids, names and flag decoding live in a pyroute2-free module (``api`` needs
# only them); re-exported here for users of this family module
from cni_netkit.kernel.netdev_ids import (
    NETDEV_CMD_BIND_RX,
    NETDEV_CMD_BIND_TX,
    NETDEV_CMD_DEV_GET,
    NETDEV_CMD_NAPI_GET,
    NETDEV_CMD_NAPI_SET,
    NETDEV_CMD_QSTATS_GET,
    NETDEV_CMD_QUEUE_CREATE,
    NETDEV_CMD_QUEUE_GET,
    NETDEV_GENL_NAME,
    NETDEV_GENL_VERSION,
    NETDEV_QUEUE_TYPE_RX,
    NETDEV_QUEUE_TYPE_TX,
    XDP_ACT,
    XSK_FLAGS,
    flag_names,
)

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
    'AsyncNetdevSocket',
    'NetdevSocket',
    'flag_names',
    'lease',
    'netdev_dev_msg',
    'netdev_queue_msg',
    'queue_id',
]


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


class AsyncNetdevSocket(AsyncGenericNetlinkSocket):  # type: ignore[misc]
    """The netdev family over an asyncio netlink socket; ``bind()`` first."""

    # a kernel without the family is an expected answer, not a log-worthy error
    module_err_level = 'debug'
    ops: frozenset[int] = frozenset()

    async def discovery(self, proto: str) -> Any:
        msg = await super().discovery(proto)
        self.ops = frozenset(
            op.get_attr('CTRL_ATTR_OP_ID') for op in msg.get_attr('CTRL_ATTR_OPS') or ()
        )
        return msg

    async def _request(
        self, msg_class: type[genlmsg], cmd: int, attrs: list[Any], flags: int
    ) -> Any:
        # One family, several attribute sets: the marshal parses replies by
        # family id only, so point it at this op's set before asking (requests
        # on one socket are sequential; pyroute2's ethtool re-binds instead,
        # which costs a CTRL_CMD_GETFAMILY round trip each time).
        self.marshal.msg_map[self.prid] = msg_class
        msg = msg_class()
        msg['cmd'] = cmd
        msg['version'] = NETDEV_GENL_VERSION
        msg['attrs'] = attrs
        return await self.nlm_request(msg, msg_type=self.prid, msg_flags=flags)

    async def dev_get(self, ifindex: int | None = None) -> Any:
        """dev-get: do with ``ifindex``, dump without."""
        if ifindex is None:
            return await self._request(
                netdev_dev_msg, NETDEV_CMD_DEV_GET, [], NLM_F_REQUEST | NLM_F_DUMP
            )
        return await self._request(
            netdev_dev_msg,
            NETDEV_CMD_DEV_GET,
            [('NETDEV_A_DEV_IFINDEX', ifindex)],
            NLM_F_REQUEST,
        )

    async def queue_get(
        self, ifindex: int, id: int, type: int = NETDEV_QUEUE_TYPE_RX
    ) -> Any:
        """queue-get do: one queue of one device."""
        return await self._request(
            netdev_queue_msg,
            NETDEV_CMD_QUEUE_GET,
            [
                ('NETDEV_A_QUEUE_IFINDEX', ifindex),
                ('NETDEV_A_QUEUE_TYPE', type),
                ('NETDEV_A_QUEUE_ID', id),
            ],
            NLM_F_REQUEST,
        )

    async def queue_dump(self, ifindex: int | None = None) -> Any:
        """queue-get dump: every queue in the netns, or of ``ifindex``."""
        attrs = [] if ifindex is None else [('NETDEV_A_QUEUE_IFINDEX', ifindex)]
        return await self._request(
            netdev_queue_msg,
            NETDEV_CMD_QUEUE_GET,
            attrs,
            NLM_F_REQUEST | NLM_F_DUMP,
        )

    async def queue_create(
        self,
        ifindex: int,
        type: int,
        lease_ifindex: int,
        lease_queue_id: int,
        lease_netns_id: int | None = None,
    ) -> Any:
        """queue-create: a new queue on ``ifindex`` leasing a queue of ``lease_ifindex``.

        ``lease_netns_id`` is the nsid, seen from this socket's netns, of the
        netns holding ``lease_ifindex``; None when it is this netns.
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
        return await self._request(
            netdev_queue_msg,
            NETDEV_CMD_QUEUE_CREATE,
            [
                ('NETDEV_A_QUEUE_IFINDEX', ifindex),
                ('NETDEV_A_QUEUE_TYPE', type),
                ('NETDEV_A_QUEUE_LEASE', {'attrs': lease_attrs}),
            ],
            NLM_F_REQUEST,
        )


class NetdevSocket(GenericNetlinkSocket):  # type: ignore[misc]
    """Synchronous netdev family socket; methods return tuples of reply messages."""

    async_class = AsyncNetdevSocket

    def bind(self, groups: int = 0, pid: int | None = None) -> None:
        """Resolve the family (NetlinkError ENOENT when the kernel lacks it)."""
        super().bind(NETDEV_GENL_NAME, netdev_queue_msg, groups, pid)

    @property
    def ops(self) -> frozenset[int]:
        """Ids of the ops the running kernel has (filled by ``bind()``)."""
        return frozenset(self.asyncore.ops)

    def dev_get(self, ifindex: int | None = None) -> tuple[Any, ...]:
        """dev-get: do with ``ifindex``, dump without."""
        return tuple(self._run_sync_cleanup(self.asyncore.dev_get, ifindex))

    def queue_get(
        self, ifindex: int, id: int, type: int = NETDEV_QUEUE_TYPE_RX
    ) -> tuple[Any, ...]:
        """queue-get do: one queue of one device."""
        return tuple(
            self._run_sync_cleanup(self.asyncore.queue_get, ifindex, id, type)
        )

    def queue_dump(self, ifindex: int | None = None) -> tuple[Any, ...]:
        """queue-get dump: every queue in the netns, or of ``ifindex``."""
        return tuple(self._run_sync_cleanup(self.asyncore.queue_dump, ifindex))

    def queue_create(
        self,
        ifindex: int,
        type: int,
        lease_ifindex: int,
        lease_queue_id: int,
        lease_netns_id: int | None = None,
    ) -> tuple[Any, ...]:
        """queue-create: the reply carries the new queue's ``NETDEV_A_QUEUE_ID``."""
        return tuple(
            self._run_sync_cleanup(
                self.asyncore.queue_create,
                ifindex,
                type,
                lease_ifindex,
                lease_queue_id,
                lease_netns_id,
            )
        )
