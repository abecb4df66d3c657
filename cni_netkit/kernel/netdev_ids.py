"""Ids and names of the ``netdev`` generic netlink family, without pyroute2.

From Documentation/netlink/specs/netdev.yaml and include/uapi/linux/netdev.h.
``api`` frames its requests itself and needs only these; importing
``netdev`` (pyroute2's generic netlink sockets, hence asyncio) for them cost
a cold CNI command ~70 ms on a host, over a second in the test VM.
"""

from __future__ import annotations

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

# attribute set dev
NETDEV_A_DEV_IFINDEX = 1
NETDEV_A_DEV_XDP_FEATURES = 3
NETDEV_A_DEV_XDP_ZC_MAX_SEGS = 4
NETDEV_A_DEV_XSK_FEATURES = 6
# attribute set queue (queue-id is its ID / IFINDEX / TYPE subset)
NETDEV_A_QUEUE_ID = 1
NETDEV_A_QUEUE_IFINDEX = 2
NETDEV_A_QUEUE_TYPE = 3
NETDEV_A_QUEUE_NAPI_ID = 4
NETDEV_A_QUEUE_DMABUF = 5
NETDEV_A_QUEUE_IO_URING = 6
NETDEV_A_QUEUE_XSK = 7
NETDEV_A_QUEUE_LEASE = 8
# attribute set lease
NETDEV_A_LEASE_IFINDEX = 1
NETDEV_A_LEASE_QUEUE = 2
NETDEV_A_LEASE_NETNS_ID = 3

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


def flag_names(value: int, names: tuple[str, ...]) -> frozenset[str]:
    """Decode a spec 'flags' bitmask; bits the spec (as known here) lacks stay visible."""
    return frozenset(
        names[bit] if bit < len(names) else f"bit{bit}"
        for bit in range(value.bit_length())
        if value >> bit & 1
    )
