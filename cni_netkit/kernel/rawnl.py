"""Netlink framing by hand, for the few requests every ADD and DEL makes.

pyroute2 builds and parses each message through its generic nla machinery
and runs every synchronous request through an asyncio loop: about 1.2 ms
per request on a host and 6-30 ms in the test VM (Python under QEMU TCG),
against 0.01 ms for the same request packed with ``struct``.  The requests
of the hot path (links, nsids, netdev queues) are therefore framed here;
the message layouts they carry live in ``api`` next to their decoding.

Errors are raised as pyroute2's ``NetlinkError`` (errno + the kernel's
extack text, or strerror() when there is none), exactly what a pyroute2
socket opened with ``ext_ack=True`` raises, so callers translate both alike.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable

from pyroute2.netlink.exceptions import NetlinkError

NLMSG_ERROR = 2
NLMSG_DONE = 3

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_ECHO = 0x8
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_DUMP = 0x300
# in an NLMSG_ERROR's own flags: extack attributes follow the echoed header
NLM_F_ACK_TLVS = 0x200
NLMSGERR_ATTR_MSG = 1

SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

NLA_F_NESTED = 0x8000
_NLA_TYPE_MASK = 0x3FFF

GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
CTRL_ATTR_OPS = 6
CTRL_ATTR_OP_ID = 1

_HDR = struct.Struct("=IHHII")  # struct nlmsghdr
_NLA = struct.Struct("=HH")
_GENL = struct.Struct("=BBH")  # struct genlmsghdr
# Past SKB_WITH_OVERHEAD(32768), the most a dump puts in one datagram
_RECV_BUF = 1 << 16


# --- attributes -----------------------------------------------------------------


def nla(kind: int, data: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    size = _NLA.size + len(data)
    return _NLA.pack(size, kind) + data + b"\0" * (-size % 4)


def nla_u8(kind: int, value: int) -> bytes:
    return nla(kind, struct.pack("=B", value))


def nla_u16(kind: int, value: int) -> bytes:
    return nla(kind, struct.pack("=H", value))


def nla_u32(kind: int, value: int) -> bytes:
    return nla(kind, struct.pack("=I", value))


def nla_s32(kind: int, value: int) -> bytes:
    return nla(kind, struct.pack("=i", value))


def nla_str(kind: int, value: str) -> bytes:
    """A NUL-terminated string (pyroute2's ``asciiz``)."""
    return nla(kind, value.encode() + b"\0")


def nla_nest(kind: int, attrs: Iterable[bytes], *, flag: bool = False) -> bytes:
    """A nest; ``flag``: mark it NLA_F_NESTED (strict policies, e.g. netdev's, want it)."""
    return nla(kind | (NLA_F_NESTED if flag else 0), b"".join(attrs))


def parse_attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    """Attribute type -> payload; the last one wins for a repeated type."""
    attrs: dict[int, bytes] = {}
    end = len(data)
    while offset + _NLA.size <= end:
        size, kind = _NLA.unpack_from(data, offset)
        if size < _NLA.size:
            break
        attrs[kind & _NLA_TYPE_MASK] = data[offset + _NLA.size : offset + size]
        offset += (size + 3) & ~3
    return attrs


def parse_attr_list(data: bytes) -> list[tuple[int, bytes]]:
    """Attributes in order, repeats kept (arrays such as CTRL_ATTR_OPS)."""
    out: list[tuple[int, bytes]] = []
    offset, end = 0, len(data)
    while offset + _NLA.size <= end:
        size, kind = _NLA.unpack_from(data, offset)
        if size < _NLA.size:
            break
        out.append((kind & _NLA_TYPE_MASK, data[offset + _NLA.size : offset + size]))
        offset += (size + 3) & ~3
    return out


def u8(data: bytes | None) -> int | None:
    return None if data is None else data[0]


def u16(data: bytes | None) -> int | None:
    return None if data is None else int(struct.unpack_from("=H", data)[0])


def u32(data: bytes | None) -> int | None:
    return None if data is None else int(struct.unpack_from("=I", data)[0])


def s32(data: bytes | None) -> int | None:
    return None if data is None else int(struct.unpack_from("=i", data)[0])


def u64(data: bytes | None) -> int | None:
    return None if data is None else int(struct.unpack_from("=Q", data)[0])


def string(data: bytes | None) -> str | None:
    return None if data is None else data.split(b"\0", 1)[0].decode(errors="replace")


# --- sockets --------------------------------------------------------------------


class NetlinkSocket:
    """One netlink socket (already made in its netns) that sends requests and reads answers."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        # extack text with errors; the failed request is not echoed back in them
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def request(self, msg_type: int, flags: int, payload: bytes) -> list[bytes]:
        """Send one request; the payloads of its answers (none for a bare ACK).

        A dump (``NLM_F_DUMP`` in ``flags``) ends at NLMSG_DONE; anything else
        is sent with NLM_F_ACK and ends at the kernel's ACK.  An error raises
        ``NetlinkError``.
        """
        self._seq += 1
        seq = self._seq
        dump = flags & NLM_F_DUMP == NLM_F_DUMP
        if not dump:
            flags |= NLM_F_ACK
        self._sock.send(_HDR.pack(_HDR.size + len(payload), msg_type, flags | NLM_F_REQUEST, seq, 0)
                        + payload)
        answers: list[bytes] = []
        while True:
            data = self._sock.recv(_RECV_BUF)
            offset, end = 0, len(data)
            while offset + _HDR.size <= end:
                size, kind, mflags, mseq, _ = _HDR.unpack_from(data, offset)
                if size < _HDR.size:
                    break
                body = data[offset + _HDR.size : offset + size]
                offset += (size + 3) & ~3
                if mseq != seq:
                    continue  # a late answer to an earlier request
                if kind in (NLMSG_ERROR, NLMSG_DONE):
                    _raise_for(body, mflags, echoes_header=kind == NLMSG_ERROR)
                    return answers  # error 0: the ACK, or the end of the dump
                answers.append(body)


def _raise_for(body: bytes, flags: int, *, echoes_header: bool) -> None:
    """Raise for an NLMSG_ERROR / NLMSG_DONE carrying a negative errno."""
    if len(body) < 4:
        return
    (error,) = struct.unpack_from("=i", body)
    if error >= 0:
        return
    code = -error
    text = None
    if flags & NLM_F_ACK_TLVS:
        # NLMSG_ERROR: errno + the request's header (NETLINK_CAP_ACK); NLMSG_DONE: errno only
        start = 4 + _HDR.size if echoes_header else 4
        text = string(parse_attrs(body, start).get(NLMSGERR_ATTR_MSG))
    raise NetlinkError(code, text or os.strerror(code))


def genl_request(
    sock: NetlinkSocket, family: int, cmd: int, attrs: Iterable[bytes], *, dump: bool = False,
    version: int = 1,
) -> list[dict[int, bytes]]:
    """A generic netlink request; the attributes of each answer."""
    payload = _GENL.pack(cmd, version, 0) + b"".join(attrs)
    answers = sock.request(family, NLM_F_DUMP if dump else 0, payload)
    return [parse_attrs(a, _GENL.size) for a in answers]


def genl_family(sock: NetlinkSocket, name: str) -> tuple[int, frozenset[int]]:
    """The id and the op ids of generic netlink family ``name`` (ENOENT without it)."""
    (reply,) = genl_request(sock, GENL_ID_CTRL, CTRL_CMD_GETFAMILY,
                            [nla_str(CTRL_ATTR_FAMILY_NAME, name)])
    family = u16(reply.get(CTRL_ATTR_FAMILY_ID))
    if family is None:
        raise NetlinkError(errno.EPROTO, f"genl family {name}: no id in the answer")
    ops = frozenset(
        op_id
        for _, op in parse_attr_list(reply.get(CTRL_ATTR_OPS, b""))
        if (op_id := u32(parse_attrs(op).get(CTRL_ATTR_OP_ID))) is not None
    )
    return family, ops
