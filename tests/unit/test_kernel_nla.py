"""The netkit and netdev netlink classes: bytes as the kernel expects and sends them.

Pure encode/decode, no kernel: requests are encoded and parsed back field by
field at the byte level where the kernel is picky (NLA_F_NESTED, attribute
ids), and kernel-shaped replies are decoded into the seam's dataclasses.
"""

from __future__ import annotations

import errno
import struct
from typing import Any

import pytest
from pyroute2.netlink import NLA_F_NESTED
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from cni_netkit.errors import (
    QUEUE_CREATE_ERRORS,
    KernelError,
    KernelUnsupported,
    QueueBusy,
    QueueOutOfRange,
)
from cni_netkit.kernel import Kernel, NetkitInfo, Queue, QueueLease, api, netkit
from cni_netkit.kernel.api import _extack, _link, _netlink, _queue
from cni_netkit.kernel.netdev import (
    NETDEV_CMD_QUEUE_CREATE,
    NETDEV_CMD_QUEUE_GET,
    XDP_ACT,
    flag_names,
    netdev_queue_msg,
)
from cni_netkit.kernel.rawnl import NetlinkSocket


def nlas(data: bytes, offset: int = 0) -> list[tuple[int, bytes]]:
    """(type with flags, payload) of each attribute in ``data[offset:]``."""
    out = []
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("HH", data, offset)
        assert length >= 4, f"bad attribute length {length} at {offset}"
        out.append((kind, data[offset + 4 : offset + length]))
        offset += (length + 3) & ~3
    return out


netkit.register()  # pyroute2 encodes the netkit replies these tests decode


def netkit_link(data: list[tuple[str, Any]], **attrs: Any) -> Any:
    msg = ifinfmsg()
    msg["index"] = 7
    msg["flags"] = 1
    msg["attrs"] = [
        *attrs.items(),
        (
            "IFLA_LINKINFO",
            {"attrs": [("IFLA_INFO_KIND", "netkit"), ("IFLA_INFO_DATA", {"attrs": data})]},
        ),
    ]
    msg.encode()
    parsed = ifinfmsg(msg.data)
    parsed.decode()
    return parsed


def test_netkit_attributes_have_the_uapi_ids() -> None:
    msg = netkit_link(
        [
            ("IFLA_NETKIT_POLICY", 2),
            ("IFLA_NETKIT_PEER_POLICY", 0),
            ("IFLA_NETKIT_MODE", 1),
            ("IFLA_NETKIT_HEADROOM", 32),
            ("IFLA_NETKIT_PAIRING", 1),
        ]
    )
    # ifinfomsg is 16 bytes after the 16-byte header; IFLA_LINKINFO is attribute 18
    (linkinfo,) = [p for t, p in nlas(msg.data, 32) if t == 18]
    (data,) = [p for t, p in nlas(linkinfo) if t == 2]
    assert [(t, p) for t, p in nlas(data)] == [
        (3, struct.pack("I", 2)),
        (4, struct.pack("I", 0)),
        (5, struct.pack("I", 1)),
        (8, struct.pack("H", 32)),  # u16: length 6, padded to 8
        (10, struct.pack("I", 1)),
    ]


def test_netkit_peer_info_is_an_ifinfomsg_with_its_own_attributes() -> None:
    msg = netkit_link(
        [
            (
                "IFLA_NETKIT_PEER_INFO",
                {"attrs": [("IFLA_IFNAME", "eth0"), ("IFLA_NUM_RX_QUEUES", 3)]},
            )
        ]
    )
    peer = msg.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA").get_attr(
        "IFLA_NETKIT_PEER_INFO"
    )
    assert peer.get_attr("IFLA_IFNAME") == "eth0"
    assert peer.get_attr("IFLA_NUM_RX_QUEUES") == 3


def test_netkit_link_decodes_into_link_and_netkit_info() -> None:
    msg = netkit_link(
        [
            ("IFLA_NETKIT_PRIMARY", 1),
            ("IFLA_NETKIT_POLICY", 2),
            ("IFLA_NETKIT_PEER_POLICY", 0),
            ("IFLA_NETKIT_MODE", 0),
            ("IFLA_NETKIT_SCRUB", 1),
            ("IFLA_NETKIT_PEER_SCRUB", 0),
            ("IFLA_NETKIT_HEADROOM", 0),
            ("IFLA_NETKIT_TAILROOM", 0),
            ("IFLA_NETKIT_PAIRING", 0),
        ],
        IFLA_IFNAME="nk0",
        IFLA_MTU=1400,
        IFLA_IFALIAS="owner",
        IFLA_NUM_RX_QUEUES=5,
        IFLA_NUM_TX_QUEUES=1,
        IFLA_LINK_NETNSID=3,
    )

    link = _link(msg)

    assert (link.index, link.name, link.kind, link.mtu, link.up) == (7, "nk0", "netkit", 1400, True)
    assert (link.alias, link.num_rx_queues, link.num_tx_queues) == ("owner", 5, 1)
    assert link.link_netnsid == 3
    assert link.netkit == NetkitInfo(
        pairing="pair", mode="l2", policy="blackhole", peer_policy="forward", primary=True,
        scrub="default", peer_scrub="none", headroom=0, tailroom=0,
    )


def test_a_netkit_without_pairing_attribute_is_a_pair() -> None:
    # kernels before 7.1 have no IFLA_NETKIT_PAIRING: every netkit was a pair then
    info = _link(netkit_link([("IFLA_NETKIT_MODE", 1)])).netkit
    assert info is not None
    assert (info.pairing, info.mode, info.primary) == ("pair", "l3", False)


def queue_reply(attrs: list[tuple[str, Any]], cmd: int = NETDEV_CMD_QUEUE_GET) -> Any:
    """A queue-get answer encoded by pyroute2, decoded as the transport decodes it."""
    msg = netdev_queue_msg()
    msg["cmd"] = cmd
    msg["version"] = 1
    msg["attrs"] = attrs
    msg.encode()
    parsed = netdev_queue_msg(bytes(msg.data))
    parsed.decode()
    return parsed


def lease_nest(netns_id: int | None) -> tuple[str, Any]:
    attrs: list[tuple[str, Any]] = [
        ("NETDEV_A_LEASE_IFINDEX", 9),
        ("NETDEV_A_LEASE_QUEUE", {"attrs": [("NETDEV_A_QUEUE_ID", 1), ("NETDEV_A_QUEUE_TYPE", 0)]}),
    ]
    if netns_id is not None:
        attrs.append(("NETDEV_A_LEASE_NETNS_ID", netns_id))
    return ("NETDEV_A_QUEUE_LEASE", {"attrs": attrs})


class RecordingSocket:
    """Stands in for a ``rawnl.NetlinkSocket``: records requests, answers ``answers``."""

    def __init__(self, answers: list[Any] | None = None) -> None:
        self.sent: list[tuple[int, int, bytes]] = []
        self.answers = answers or []

    def request(self, msg: Any, msg_type: int, flags: int = 0, **_: Any) -> list[Any]:
        msg["header"] = {"type": msg_type, "flags": flags, "sequence_number": 1, "pid": 0}
        msg.encode()
        self.sent.append((msg_type, flags, bytes(msg.data[16:])))  # without the nlmsghdr
        return self.answers

    def close(self) -> None:
        pass


def test_queue_create_request_nests_say_they_are_nests(monkeypatch: pytest.MonkeyPatch) -> None:
    # netdev's genl policies are strict: a nest without NLA_F_NESTED is EINVAL
    monkeypatch.setattr(api, "_netdev_family", (0x1D, frozenset({NETDEV_CMD_QUEUE_CREATE})))
    answer = queue_reply([("NETDEV_A_QUEUE_ID", 3)], cmd=NETDEV_CMD_QUEUE_CREATE)
    sock = RecordingSocket([answer])
    kernel = Kernel()
    kernel._raw[(None, 16)] = sock  # type: ignore[assignment]  # NETLINK_GENERIC

    assert kernel.queue_create(4, lessor_ifindex=9, lessor_queue=1, lessor_netns_id=0) == 3

    ((family, flags, payload),) = sock.sent
    assert (family, flags) == (0x1D, 0)
    assert payload[:2] == bytes([NETDEV_CMD_QUEUE_CREATE, 1])
    top = nlas(payload, 4)  # genlmsghdr 4
    assert top[0] == (2, struct.pack("I", 4))
    assert top[1] == (3, struct.pack("I", 0))  # rx
    lease_type, lease = top[2]
    assert lease_type == 8 | NLA_F_NESTED
    inner = nlas(lease)
    assert [t for t, _ in inner] == [1, 2 | NLA_F_NESTED, 3]
    assert inner[0][1] == struct.pack("I", 9)
    assert inner[2][1] == struct.pack("i", 0)
    assert nlas(inner[1][1]) == [(1, struct.pack("I", 1)), (3, struct.pack("I", 0))]


def test_leased_queue_decodes_with_its_lease() -> None:
    msg = queue_reply(
        [
            ("NETDEV_A_QUEUE_ID", 2),
            ("NETDEV_A_QUEUE_TYPE", 0),
            ("NETDEV_A_QUEUE_IFINDEX", 4),
            ("NETDEV_A_QUEUE_NAPI_ID", 8193),
            lease_nest(0),
        ]
    )

    assert _queue(msg) == Queue(4, 2, "rx", napi_id=8193, lease=QueueLease(9, 1, "rx", 0))
    assert _queue(msg).in_use


def test_free_queue_and_xsk_bound_queue_decode() -> None:
    free = _queue(
        queue_reply(
            [("NETDEV_A_QUEUE_ID", 0), ("NETDEV_A_QUEUE_TYPE", 1), ("NETDEV_A_QUEUE_IFINDEX", 4)]
        )
    )
    xsk = _queue(
        queue_reply(
            [
                ("NETDEV_A_QUEUE_ID", 3),
                ("NETDEV_A_QUEUE_TYPE", 0),
                ("NETDEV_A_QUEUE_IFINDEX", 4),
                ("NETDEV_A_QUEUE_XSK", True),
            ]
        )
    )

    assert free == Queue(4, 0, "tx")
    assert not free.in_use
    assert (xsk.xsk, xsk.lease, xsk.in_use) == (True, None, True)


def test_flag_names_decode_the_spec_bits_and_keep_unknown_ones() -> None:
    assert flag_names(0b1001, XDP_ACT) == {"basic", "xsk-zerocopy"}
    assert flag_names(1 << 40, XDP_ACT) == {"bit40"}
    assert flag_names(0, XDP_ACT) == frozenset()


def test_netlink_errors_become_our_errors_with_the_extack_text() -> None:
    cause = NetlinkError(errno.EBUSY, "Device queue in use due to queue leasing")

    with pytest.raises(QueueBusy) as e, _netlink("queue-create on ifindex 5", QUEUE_CREATE_ERRORS):
        raise cause

    assert e.value.__cause__ is cause
    assert e.value.err == errno.EBUSY
    assert e.value.details == "Device queue in use due to queue leasing"
    assert e.value.msg.startswith("queue-create on ifindex 5: EBUSY")


@pytest.mark.parametrize("err", [errno.ERANGE, errno.EBUSY])
def test_busy_and_range_mean_queues_only_for_queue_create(err: int) -> None:
    # ERANGE from setting an MTU, EBUSY from a busy device: not a queue out of range or in use.
    with pytest.raises(KernelError) as other, _netlink("set link 5 (mtu 70000)"):
        raise NetlinkError(err, "MTU greater than device maximum")
    assert type(other.value) is KernelError
    assert other.value.err == err
    assert other.value.details == "MTU greater than device maximum"

    with pytest.raises(KernelError) as lease, _netlink("queue-create", QUEUE_CREATE_ERRORS):
        raise NetlinkError(err, "out of range")
    assert type(lease.value) is {errno.ERANGE: QueueOutOfRange, errno.EBUSY: QueueBusy}[err]


def test_an_error_without_extack_has_empty_details() -> None:
    # pyroute2 fills in strerror() when the kernel sent no message
    assert _extack(NetlinkError(errno.ERANGE)) == ""
    assert _extack(NetlinkError(errno.EINVAL, "Lease device is a virtual device")) != ""


def test_queue_create_on_a_kernel_without_the_op_is_unsupported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the netdev family of a 6.x kernel: queue-get, no queue-create
    monkeypatch.setattr(api, "_netdev_family", (0x1D, frozenset({1, NETDEV_CMD_QUEUE_GET})))
    sock = RecordingSocket()
    kernel = Kernel()
    kernel._raw[(None, 16)] = sock  # type: ignore[assignment]  # NETLINK_GENERIC

    with pytest.raises(KernelUnsupported, match="no queue-create op") as e:
        kernel.queue_create(5, lessor_ifindex=2, lessor_queue=1)

    assert "7.1" in e.value.details
    assert sock.sent == []  # queue-create must not be sent to a kernel without it
    kernel.close()


class FakeNetlink:
    """A socket.socket stand-in: keeps what is sent, answers ``replies`` in turn."""

    def __init__(self, replies: list[bytes]) -> None:
        self.replies = replies
        self.sent: list[bytes] = []

    def setsockopt(self, *_: Any) -> None:
        pass

    def bind(self, _: Any) -> None:
        pass

    def send(self, data: bytes) -> int:
        self.sent.append(bytes(data))
        return len(data)

    def recv(self, _: int) -> bytes:
        return self.replies.pop(0)


def nlmsgerr(seq: int, error: int, extack: str | None) -> bytes:
    """NLMSG_ERROR as a NETLINK_CAP_ACK | NETLINK_EXT_ACK socket gets it."""
    body = struct.pack("=i", error) + struct.pack("=IHHII", 16, 18, 5, seq, 0)
    flags = 0x100  # NLM_F_CAPPED
    if extack is not None:
        text = extack.encode() + b"\0"
        body += struct.pack("=HH", 4 + len(text), 1) + text + b"\0" * (-len(text) % 4)
        flags |= 0x200  # NLM_F_ACK_TLVS
    return struct.pack("=IHHII", 16 + len(body), 2, flags, seq, 0) + body


def queue_request() -> Any:
    msg = netdev_queue_msg()
    msg["cmd"] = NETDEV_CMD_QUEUE_GET
    msg["version"] = 1
    return msg


def test_transport_raises_netlink_error_with_the_extack_text() -> None:
    fake = FakeNetlink([nlmsgerr(1, -errno.EINVAL, "Lease device is a virtual device")])
    sock = NetlinkSocket(fake)  # type: ignore[arg-type]

    with pytest.raises(NetlinkError) as e:
        sock.request(queue_request(), 0x1D)

    assert e.value.code == errno.EINVAL
    assert _extack(e.value) == "Lease device is a virtual device"
    # the request went out as pyroute2 encoded it, numbered, asking for the ACK
    (sent,) = fake.sent
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", sent)
    assert (length, kind, flags & 0x5, seq) == (len(sent), 0x1D, 0x5, 1)


def test_transport_error_without_extack_is_strerror_and_an_ack_returns_nothing() -> None:
    fake = FakeNetlink([nlmsgerr(1, -errno.ENODEV, None), nlmsgerr(2, 0, None)])
    sock = NetlinkSocket(fake)  # type: ignore[arg-type]

    with pytest.raises(NetlinkError) as e:
        sock.request(queue_request(), 0x1D)
    assert (e.value.code, _extack(e.value)) == (errno.ENODEV, "")
    assert sock.request(queue_request(), 0x1D) == []


def test_transport_decodes_answers_with_the_reply_class_and_skips_stale_ones() -> None:
    def answer(seq: int, queue: int) -> bytes:
        data = bytearray(queue_reply([("NETDEV_A_QUEUE_ID", queue)]).data)
        struct.pack_into("=I", data, 8, seq)
        return bytes(data)

    done = struct.pack("=IHHII", 20, 3, 2, 2, 0) + struct.pack("=i", 0)
    fake = FakeNetlink([answer(1, 7) + answer(2, 3), answer(2, 4) + done])
    sock = NetlinkSocket(fake)  # type: ignore[arg-type]
    sock._seq = 1  # request 1 has been answered before: its late answer is skipped

    got = sock.request(queue_request(), 0x1D, 0x300)  # NLM_F_DUMP
    assert [m.get_attr("NETDEV_A_QUEUE_ID") for m in got] == [3, 4]


def test_a_memo_decodes_an_answer_once_per_distinct_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    # The queue dump of every ADD: answers the kernel repeats byte for byte (all but the
    # header: another sequence number) are not decoded again; changed ones are.
    def dump(seq: int, *queues: list[Any]) -> bytes:
        out = b""
        for attrs in queues:
            data = bytearray(queue_reply(attrs).data)
            struct.pack_into("=I", data, 8, seq)
            out += bytes(data)
        return out + struct.pack("=IHHII", 20, 3, 2, seq, 0) + struct.pack("=i", 0)

    free = [("NETDEV_A_QUEUE_ID", 1), ("NETDEV_A_QUEUE_TYPE", 0), ("NETDEV_A_QUEUE_IFINDEX", 4)]
    leased = [*free, lease_nest(0)]
    other = [("NETDEV_A_QUEUE_ID", 2), ("NETDEV_A_QUEUE_TYPE", 0), ("NETDEV_A_QUEUE_IFINDEX", 4)]
    fake = FakeNetlink([dump(1, free, other), dump(2, free, other), dump(3, leased, other),
                        dump(4, free, other)])
    sock = NetlinkSocket(fake)  # type: ignore[arg-type]
    parsed: list[Queue] = []

    def parse(msg: Any) -> Queue:
        parsed.append(_queue(msg))
        return parsed[-1]

    memo: dict[bytes, Any] = {}
    rounds = [sock.request(queue_request(), 0x1D, 0x300, parse=parse, memo=memo)
              for _ in range(4)]

    q1, q2 = Queue(4, 1, "rx"), Queue(4, 2, "rx")
    q1_leased = Queue(4, 1, "rx", lease=QueueLease(9, 1, "rx", 0))
    assert rounds == [[q1, q2], [q1, q2], [q1_leased, q2], [q1, q2]]
    assert parsed == [q1, q2, q1_leased]  # each distinct answer decoded once
    # Full: emptied, then filled again (a long-lived agent's memo stays bounded).
    monkeypatch.setattr("cni_netkit.kernel.rawnl.MEMO_LIMIT", 3)
    fake.replies.append(dump(5, other, [*other, lease_nest(1)]))
    assert sock.request(queue_request(), 0x1D, 0x300, parse=parse, memo=memo)[1].lease
    assert len(memo) == 1


def test_a_request_sent_again_is_not_encoded_again_but_numbered_anew(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The master's GETLINK, its queue dump and RSS table repeat on every ADD, each ADD on
    # sockets of its own: the process keeps their encoding, and a socket packs only the
    # header (length, type, flags, its own sequence number).
    monkeypatch.setattr("cni_netkit.kernel.rawnl._encoded", {})
    fake = FakeNetlink([nlmsgerr(seq, 0, None) for seq in range(1, 4)])
    sock = NetlinkSocket(fake)  # type: ignore[arg-type]
    encoded = 0
    real = netdev_queue_msg.encode

    def counting(self: Any) -> Any:
        nonlocal encoded
        encoded += 1
        return real(self)

    monkeypatch.setattr(netdev_queue_msg, "encode", counting)

    def other_queue() -> Any:
        msg = queue_request()
        msg["attrs"] = [("NETDEV_A_QUEUE_ID", 3)]
        return msg

    for msg in (queue_request(), queue_request(), other_queue()):
        assert sock.request(msg, 0x1D) == []
    later = FakeNetlink([nlmsgerr(1, 0, None)])  # the next ADD's socket
    assert NetlinkSocket(later).request(queue_request(), 0x1D) == []  # type: ignore[arg-type]
    assert encoded == 2  # the repeated request once, the one with another field once
    first, again, other = fake.sent
    (last,) = later.sent
    assert first[8:12] != again[8:12] and again[12:] == first[12:] == last[12:]
    assert struct.unpack_from("=IHHI", again) == (len(first), 0x1D, 0x5, 2)
    assert struct.unpack_from("=I", last, 8) == (1,)
    assert other != first and struct.unpack_from("=I", other) == (len(other),)
