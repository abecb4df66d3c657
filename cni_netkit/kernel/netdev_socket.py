"""Sockets of the ``netdev`` generic netlink family, pyroute2 style (see ``netdev``).

Apart from ``netdev`` only because pyroute2's generic netlink sockets import
asyncio, which the message classes, and ``api``, do without.
"""

from __future__ import annotations

from typing import Any

from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST, genlmsg
from pyroute2.netlink.generic import AsyncGenericNetlinkSocket, GenericNetlinkSocket

from cni_netkit.kernel.netdev import (
    NETDEV_CMD_DEV_GET,
    NETDEV_CMD_QUEUE_CREATE,
    NETDEV_CMD_QUEUE_GET,
    NETDEV_GENL_NAME,
    NETDEV_GENL_VERSION,
    NETDEV_QUEUE_TYPE_RX,
    netdev_dev_msg,
    netdev_queue_msg,
    queue_create_attrs,
)

__all__ = ['AsyncNetdevSocket', 'NetdevSocket']


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
        return await self._request(
            netdev_queue_msg,
            NETDEV_CMD_QUEUE_CREATE,
            queue_create_attrs(
                ifindex, type, lease_ifindex, lease_queue_id, lease_netns_id
            ),
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
