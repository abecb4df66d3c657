"""Network namespaces by path: check, open and make sockets in them, never create them.

pyroute2's ``netns=`` arguments default to ``flags=os.O_CREAT``: pointing one
at a pod netns that has just gone silently makes a new, empty one there (and
leaves a mount behind).  Nothing here ever creates a netns, and nothing
``setns()``s the process: a socket for another netns is made by a
short-lived thread that moves only itself (a netns is per thread, and a
socket stays in the netns it was made in for life).

The nsid helpers take a ``rawnl.NetlinkSocket`` (NETLINK_ROUTE) made in the
netns the nsid is seen from, and speak pyroute2's ``nsidmsg``; nsids are per
pair of namespaces.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import stat
import threading
from typing import Any

from cni_netkit.errors import InvalidNetns

CLONE_NEWNET = 0x40000000
# include/uapi/linux/nsfs.h: _IO(0xb7, 0x3); only nsfs files answer it
NS_GET_NSTYPE = 0xB703
# NETNSA_NSID_NOT_ASSIGNED (-1), read as the u32 it is sent as
_NSID_NOT_ASSIGNED = 0xFFFFFFFF
# include/uapi/linux/rtnetlink.h (pyroute2.netlink.rtnl has them too, but loads more)
RTM_NEWNSID = 88
RTM_GETNSID = 90

_libc = ctypes.CDLL(None, use_errno=True)


def open_netns(path: str) -> int:
    """An O_RDONLY fd of the network namespace at ``path`` (caller closes it).

    Raises ``InvalidNetns`` when the path is missing, or is (or links to)
    anything but a network namespace: a plain file, a directory, another
    kind of namespace, a mount point whose netns is gone.
    """
    try:
        # stat() before open(): opening a FIFO would block, a device could be anything
        st = os.stat(path)  # noqa: PTH116 - the fd-based calls below are os-level too
    except OSError as e:
        raise InvalidNetns(f"netns {path} is not usable", _reason(e)) from e
    if not stat.S_ISREG(st.st_mode):
        raise InvalidNetns(f"netns {path} is not a network namespace", "not a namespace file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        raise InvalidNetns(f"netns {path} is not usable", _reason(e)) from e
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as e:
        os.close(fd)
        # ENOTTY: not an nsfs file, e.g. the empty file left once a netns is unmounted
        raise InvalidNetns(
            f"netns {path} is not a network namespace",
            "not a namespace file" if e.errno == errno.ENOTTY else _reason(e),
        ) from e
    if kind != CLONE_NEWNET:
        os.close(fd)
        raise InvalidNetns(
            f"netns {path} is not a network namespace", f"namespace type {kind:#x}"
        )
    return fd


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


def check_netns(path: str) -> None:
    """Raise ``InvalidNetns`` unless ``path`` is a network namespace."""
    os.close(open_netns(path))


def is_netns(path: str) -> bool:
    """Whether ``path`` is a network namespace (never creates one)."""
    try:
        check_netns(path)
    except InvalidNetns:
        return False
    return True


def socket_in(nsfd: int, family: int, type: int, proto: int = 0) -> socket.socket:
    """A socket living in the netns ``nsfd`` refers to, made without moving this thread."""
    (made,) = sockets_in(nsfd, [(family, type, proto)])
    return made


def sockets_in(nsfd: int, specs: list[tuple[int, int, int]]) -> list[socket.socket]:
    """Sockets (family, type, proto) living in the netns ``nsfd``: one thread trip for all.

    A thread is the costly part (milliseconds under emulation), so a caller
    that will need several sockets there asks for them at once.
    """
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def make() -> None:
        # Only this thread enters the netns, and it ends right after.
        try:
            if _libc.setns(nsfd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns: {os.strerror(err)}")
            for family, type_, proto in specs:
                made.append(socket.socket(family, type_, proto))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            failed.append(e)

    thread = threading.Thread(target=make, name="netns-socket")
    thread.start()
    thread.join()
    if failed:
        for sock in made:
            sock.close()
        raise failed[0]
    return made


def _nsidmsg(*attrs: tuple[str, int]) -> Any:
    """pyroute2's nsidmsg (AF_UNSPEC) carrying ``attrs``."""
    # pyroute2 loads lazily here so that check_netns() stays cheap to import
    from pyroute2.netlink.rtnl.nsidmsg import nsidmsg  # noqa: PLC0415

    msg = nsidmsg()
    msg["attrs"] = list(attrs)
    return msg


def get_nsid(sock: Any, nsfd: int) -> int | None:
    """The nsid of netns ``nsfd`` as seen from ``sock``'s netns (a ``rawnl.NetlinkSocket``).

    None if unassigned.
    """
    (reply,) = sock.request(_nsidmsg(("NETNSA_FD", nsfd)), RTM_GETNSID)
    nsid = reply.get_attr("NETNSA_NSID")
    if nsid is None or nsid == _NSID_NOT_ASSIGNED:
        return None
    return int(nsid)


def ensure_nsid(sock: Any, nsfd: int) -> int:
    """Like ``get_nsid`` but has the kernel assign one (RTM_NEWNSID) when unassigned."""
    nsid = get_nsid(sock, nsfd)
    if nsid is not None:
        return nsid
    from pyroute2.netlink.exceptions import NetlinkError  # noqa: PLC0415 - see _nsidmsg

    try:
        # NETNSA_NSID -1: the kernel picks one
        sock.request(
            _nsidmsg(("NETNSA_NSID", _NSID_NOT_ASSIGNED), ("NETNSA_FD", nsfd)), RTM_NEWNSID
        )
    except NetlinkError as e:
        # EEXIST: someone else assigned one since we looked; use theirs
        if e.code != errno.EEXIST:
            raise
    nsid = get_nsid(sock, nsfd)
    if nsid is None:
        raise OSError(errno.ENOENT, "the kernel assigned no nsid")
    return nsid
