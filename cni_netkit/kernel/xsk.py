"""AF_XDP steering: the XDP program on each master and every attachment's XSK map, on bpffs.

A netkit refuses XDP programs, so an AF_XDP application in a pod (QEMU's
``af-xdp`` netdev with ``inhibit=on,map-path=…``, a DPDK AF_XDP port with a
pinned map) cannot load its own. Instead one program per master
(``bpf/xsk_redirect.bpf.c``) looks each frame's RX queue up in the master's
outer map and redirects it into the XSK map of the attachment that leased
the queue. Every attachment has its own XSK map, so a pod can only place
sockets where its own queues' frames go.

Pins under the bpffs root (``/sys/fs/bpf/cni-netkit``, ``$CNI_NETKIT_BPF_ROOT``
for tests)::

    masters/<master>/link       the BPF link holding the program on the master:
                                pinned, so it outlives the agent that made it
    masters/<master>/xsk_maps   physical RX queue -> the attachment's XSK map
    masters/<master>/xsk_slots  physical RX queue -> index of its socket there
    <where the plugin pins each attachment's XSK map>

The node agent owns ``masters/`` (``ensure_program``, ``remove_program``);
the plugin creates, wires, checks and removes attachment maps. Everything
returned is a plain dataclass or int; no libbpf handle leaves the kernel
layer. Errors are ``KernelError`` subclasses carrying the errno.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cni_netkit.errors import KernelError, NoSuchDevice, NotFound, NotSupported, kernel_error
from cni_netkit.kernel import bpf
from cni_netkit.kernel.bpffs import (
    DEFAULT_ROOT,
    LINK_PIN,
    OUTER_MAP,
    ROOT_ENV,
    SLOT_MAP,
    bpf_root,
    master_dir,
    steering,
)

__all__ = [  # the pins' layout (kernel.bpffs) is part of this module's interface
    "DEFAULT_ROOT", "LINK_PIN", "OUTER_MAP", "PROGRAM", "ROOT_ENV", "SLOT_MAP", "XSK_QUEUES",
    "XSK_SLOTS", "ProgramAction", "ProgramChange", "Wiring", "XdpMode", "XdpProgram", "XskMap",
    "XskSlot", "bpf_root", "clear_socket", "create_map", "ensure_program", "insert_socket",
    "map_id", "master_dir", "pin_again", "program", "reconcile", "remove_map", "remove_program",
    "steering", "unwire", "verdict", "wire", "wiring",
]

# Mirrors of bpf/xsk_redirect.h (tests/unit/test_xsk_abi.py keeps them equal).
XSK_SLOTS = 64  # entries of every attachment's XSK map: the kernel wants one size for all
XSK_QUEUES = 1024  # physical RX queue ids the program can steer
PROGRAM = "xsk_redirect"

XdpMode = Literal["native", "generic"]
ProgramAction = Literal["attached", "replaced", "unchanged"]
# Why a native (driver) attach may fail where generic works: no ndo_bpf, the
# driver's XDP switched off, an MTU or feature the driver's XDP cannot take.
_NATIVE_REFUSALS = frozenset({errno.EOPNOTSUPP, errno.EINVAL})


@dataclass(frozen=True)
class XdpProgram:
    """The steering program of one master, as the kernel shows it now."""

    master: str
    ifindex: int | None  # None: the master does not exist
    steering: bool  # the master's maps are pinned: the agent set this master up
    mode: XdpMode | None = None  # None: our program is not attached
    prog_id: int | None = None
    tag: str | None = None
    link_id: int | None = None
    outer_map_id: int | None = None
    other_prog_id: int | None = None  # an XDP program on the master that is not ours

    @property
    def attached(self) -> bool:
        return self.mode is not None


@dataclass(frozen=True)
class ProgramChange:
    """What ``ensure_program`` did, and the program as it is afterwards."""

    action: ProgramAction
    program: XdpProgram
    native_refused: str | None = None  # why driver mode was refused, when generic was used


@dataclass(frozen=True)
class XskSlot:
    """One wiring: frames of physical RX ``queue`` go to the socket at ``index``."""

    queue: int
    index: int


@dataclass(frozen=True)
class XskMap:
    """An attachment's pinned XSK map."""

    path: str
    map_id: int


@dataclass(frozen=True)
class Wiring:
    """One outer-map slot as read back: the XSK map (by id) and index a queue goes to."""

    queue: int
    map_id: int
    index: int | None


@contextlib.contextmanager
def _fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _ifindex(master: str) -> int | None:
    try:
        return socket.if_nametoindex(master)
    except OSError:
        return None


def _open_pin(path: Path) -> int | None:
    """An fd of what is pinned at ``path``; None when nothing is."""
    try:
        return bpf.obj_get(str(path))
    except NotFound:
        return None


# --- the program (node agent) ---------------------------------------------------------


def program(master: str, *, root: Path | None = None) -> XdpProgram:
    """The steering state of ``master``: maps pinned, our program attached and how."""
    d = master_dir(master, root)
    ifindex = _ifindex(master)
    state = XdpProgram(master, ifindex, steering(master, root))
    if ifindex is None or not state.steering:
        return state
    query = bpf.xdp_query(ifindex)
    link_fd = _open_pin(d / LINK_PIN)
    if link_fd is None:
        return _with_other(state, query)
    with _fd(link_fd):
        link = bpf.link_info(link_fd)
    if link.ifindex != ifindex:  # defunct: the device it was attached to is gone
        return _with_other(state, query)
    with _fd(bpf.prog_fd_by_id(link.prog_id)) as prog_fd:
        prog = bpf.prog_info(prog_fd)
    outer_id = map_id(d / OUTER_MAP)
    mode: XdpMode | None = None
    if query.drv_prog_id == prog.id:
        mode = "native"
    elif query.skb_prog_id == prog.id:
        mode = "generic"
    return XdpProgram(master, ifindex, True, mode, prog.id, prog.tag, link.id, outer_id)


def _with_other(state: XdpProgram, query: bpf.XdpQuery) -> XdpProgram:
    """``state`` naming an XDP program on the master that is not ours, if any."""
    others = {query.drv_prog_id, query.skb_prog_id, query.hw_prog_id, query.prog_id} - {0}
    return XdpProgram(state.master, state.ifindex, state.steering,
                      other_prog_id=min(others) if others else None)


def ensure_program(master: str, obj_path: str, *, root: Path | None = None) -> ProgramChange:
    """Attach ``obj_path``'s program to ``master``, or replace an attached one atomically.

    Idempotent, and safe for an agent to call on every start:

    - the maps are reused from their pins (created and pinned the first
      time), so attachments stay wired across restarts and upgrades;
    - an attached program with the same code (kernel tag) and maps is left
      alone ("unchanged");
    - different code replaces it through the pinned BPF link in one step
      (BPF_LINK_UPDATE, only if the link still runs the program we read:
      no moment without a program, no lost race with another updater);
    - otherwise it is attached as a new link, native (driver) mode first and
      generic mode when the driver refuses, and the link is pinned, so the
      program stays when the agent exits.
    """
    ifindex = _ifindex(master)
    if ifindex is None:
        raise NoSuchDevice(f"master {master} not found in this netns", err=errno.ENODEV)
    d = master_dir(master, root)
    d.mkdir(parents=True, exist_ok=True)
    with bpf.BpfObject(obj_path) as obj:
        obj.pin_map(OUTER_MAP, str(d / OUTER_MAP))
        obj.pin_map(SLOT_MAP, str(d / SLOT_MAP))
        obj.load()
        prog_fd = obj.prog_fd(PROGRAM)
    with _fd(prog_fd):
        new = bpf.prog_info(prog_fd)
        # The maps every version must share: the pinned ones, which new reuses.
        shared = set(new.map_ids) & {map_id(d / OUTER_MAP), map_id(d / SLOT_MAP)}
        link_fd = _live_link(d / LINK_PIN, ifindex)
        if link_fd is not None:
            with _fd(link_fd):
                old_id = bpf.link_info(link_fd).prog_id
                with _fd(bpf.prog_fd_by_id(old_id)) as old_fd:
                    old = bpf.prog_info(old_fd)
                    # Same code on the same pinned maps (its private maps may differ).
                    if old.tag == new.tag and shared <= set(old.map_ids):
                        return ProgramChange("unchanged", program(master, root=root))
                    bpf.link_update(link_fd, prog_fd, expected_prog_fd=old_fd)
            return ProgramChange("replaced", program(master, root=root))
        refused = _attach(prog_fd, ifindex, d / LINK_PIN)
    return ProgramChange("attached", program(master, root=root), refused)


def reconcile(master: str, obj_path: str, *, startup: bool, root: Path | None = None
              ) -> ProgramChange | None:
    """The node agent's call: ``ensure_program`` at start-up (where an upgrade takes
    effect); on later passes only when the master has no program of ours (its driver
    was reloaded, an earlier attach failed). None when nothing was to be done."""
    if not startup:
        state = program(master, root=root)
        if state.attached or state.ifindex is None:
            return None
    return ensure_program(master, obj_path, root=root)


def _live_link(pin: Path, ifindex: int) -> int | None:
    """The pinned link's fd if it still holds a program on ``ifindex``; unpins a dead one."""
    link_fd = _open_pin(pin)
    if link_fd is None:
        return None
    if bpf.link_info(link_fd).ifindex == ifindex:
        return link_fd
    # The device it was attached to went away (the link is defunct, ifindex 0)
    # or was re-created: a new link replaces it.
    os.close(link_fd)
    pin.unlink(missing_ok=True)
    return None


def _attach(prog_fd: int, ifindex: int, pin: Path) -> str | None:
    """Attach as a pinned link, native first; returns why native was refused, if it was."""
    refused = None
    try:
        link_fd = bpf.xdp_link_create(prog_fd, ifindex, bpf.XDP_FLAGS_DRV_MODE)
    except KernelError as e:
        if e.err not in _NATIVE_REFUSALS:
            raise _explain_busy(e, ifindex) from e
        refused = str(e)
        try:
            link_fd = bpf.xdp_link_create(prog_fd, ifindex, bpf.XDP_FLAGS_SKB_MODE)
        except KernelError as e2:
            raise _explain_busy(e2, ifindex) from e2
    with _fd(link_fd):
        bpf.obj_pin(link_fd, str(pin))
    return refused


def _explain_busy(e: KernelError, ifindex: int) -> KernelError:
    """Name the program in the way when the master already runs someone else's XDP."""
    if e.err not in (errno.EBUSY, errno.EEXIST):
        return e
    query = bpf.xdp_query(ifindex)
    e.details = (f"{e.details}; " if e.details else "") + (
        f"ifindex {ifindex} already runs XDP program id {query.prog_id}: cni-netkit does not "
        "replace a program it did not attach"
    )
    return e


def remove_program(master: str, *, root: Path | None = None) -> bool:
    """Detach the program (unpin its link) and unpin the master's maps; False if none was there.

    For uninstalling: attachments still wired lose their AF_XDP traffic.
    """
    d = master_dir(master, root)
    found = False
    for name in (LINK_PIN, OUTER_MAP, SLOT_MAP):
        with contextlib.suppress(FileNotFoundError):
            (d / name).unlink()
            found = True
    with contextlib.suppress(OSError):  # gone, or holds something not ours
        d.rmdir()
    return found


def verdict(master: str, rx_queue: int, frame: bytes, *, root: Path | None = None) -> int:
    """What the master's attached program returns for ``frame`` on RX queue ``rx_queue``.

    BPF_PROG_TEST_RUN: XDP_REDIRECT (4) when a socket is at the queue's
    slot, XDP_PASS (2) otherwise. Diagnostics and tests; nothing is sent.
    """
    state = program(master, root=root)
    if state.prog_id is None or state.ifindex is None:
        raise NotFound(f"no cni-netkit XDP program attached to {master}", err=errno.ENOENT)
    with _fd(bpf.prog_fd_by_id(state.prog_id)) as prog_fd:
        return bpf.xdp_test_run(prog_fd, frame, ifindex=state.ifindex, rx_queue=rx_queue)


# --- attachment maps (CNI plugin) -----------------------------------------------------


def create_map(path: Path, *, owner: tuple[int, int] | None = None) -> XskMap:
    """A new XSK map of ``XSK_SLOTS`` entries pinned at ``path`` (parents made).

    A pin already there is replaced: the path is derived from the attachment's
    owner, so it can only be the leftover of an earlier ADD of the same owner.
    The pin is mode 0600: with ``owner`` (uid, gid) it belongs to that user,
    who can then open it (BPF_OBJ_GET checks the file's permissions, nothing
    else) and put sockets in the map without CAP_BPF; otherwise to root.
    """
    fd = bpf.map_create(bpf.BPF_MAP_TYPE_XSKMAP, "cnk_xsks", 4, 4, XSK_SLOTS)
    with _fd(fd):
        # Twice: a DEL of a neighbour may prune an emptied parent between our mkdir and pin.
        for attempt in range(2):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.unlink(missing_ok=True)
                bpf.obj_pin(fd, str(path))
                break
            except (NotFound, FileNotFoundError):
                if attempt:
                    raise
        try:
            _restrict_pin(path, owner)
        except OSError as e:
            path.unlink(missing_ok=True)  # a pin the workload cannot open is no use to it
            whom = f"uid:gid {owner[0]}:{owner[1]}" if owner else "root"
            raise kernel_error(e.errno or errno.EPERM, f"give the XSK map pin {path} to {whom}",
                               str(e)) from e
        return XskMap(str(path), bpf.map_info(fd).id)


def pin_again(path: Path, at: Path, *, owner: tuple[int, int] | None = None) -> None:
    """Pin the map pinned at ``path`` a second time, at ``at`` (e.g. on a pod's own bpffs
    instance), mode 0600 and owned by ``owner`` as ``create_map`` does; replaces a pin
    already at ``at`` (a leftover of the same owner's earlier ADD)."""
    fd = _open_pin(path)
    if fd is None:
        raise NotFound(f"no XSK map pinned at {path}", err=errno.ENOENT)
    with _fd(fd):
        at.unlink(missing_ok=True)
        bpf.obj_pin(fd, str(at))
    try:
        _restrict_pin(at, owner)
    except OSError as e:
        at.unlink(missing_ok=True)
        whom = f"uid:gid {owner[0]}:{owner[1]}" if owner else "root"
        raise kernel_error(e.errno or errno.EPERM, f"give the XSK map pin {at} to {whom}",
                           str(e)) from e


def _restrict_pin(path: Path, owner: tuple[int, int] | None) -> None:
    """Mode 0600, owned by ``owner`` (else root), never through a symlink.

    The pin's directory may be mounted into the pod: what is at ``path`` now
    must be the pin we just made, not a link to a host file that root would
    then hand to the workload.
    """
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.ELOOP, "not the pin just made (a link or another file)")
        # Through /proc/self/fd: chmod/chown of this very inode (fchmod refuses O_PATH).
        inode = Path(f"/proc/self/fd/{fd}")
        inode.chmod(0o600)
        if owner is not None:
            os.chown(inode, *owner)
    finally:
        os.close(fd)


def map_id(path: Path) -> int | None:
    """The id of the map pinned at ``path``; None when nothing is pinned there."""
    fd = _open_pin(path)
    if fd is None:
        return None
    with _fd(fd):
        return bpf.map_info(fd).id


def remove_map(path: Path, *, prune_below: Path | None = None) -> bool:
    """Unpin an attachment's XSK map (it is freed with its last user); False if gone.

    Then removes the directories it leaves empty, up to (not including) ``prune_below``.
    """
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    finally:
        if prune_below is not None:
            _prune(path.parent, prune_below)
    return True


def _prune(directory: Path, stop: Path) -> None:
    while directory != stop and stop in directory.parents:
        try:
            directory.rmdir()
        except OSError:  # not empty (another attachment of the pod), or gone
            return
        directory = directory.parent


def _master_maps(master: str, root: Path | None) -> tuple[int, int]:
    """Fds of the master's outer and slot maps (caller closes); NotSupported without steering."""
    d = master_dir(master, root)
    outer = _open_pin(d / OUTER_MAP)
    if outer is None:
        raise NotSupported(
            f"master {master} has no AF_XDP steering maps under {d}",
            "the node agent pins them when it attaches the XDP program",
            err=errno.EOPNOTSUPP,
        )
    slots = _open_pin(d / SLOT_MAP)
    if slots is None:
        os.close(outer)
        raise NotSupported(f"master {master} has no {SLOT_MAP} map under {d}",
                           err=errno.EOPNOTSUPP)
    return outer, slots


def wire(master: str, xsk_map: XskMap, slots: Iterable[XskSlot], *, root: Path | None = None
         ) -> None:
    """Point each slot's physical queue of ``master`` at ``xsk_map``, index first.

    The index is written before the map, so the program never pairs a new
    map with a stale index.
    """
    slots = tuple(slots)
    for s in slots:
        if not (0 <= s.queue < XSK_QUEUES and 0 <= s.index < XSK_SLOTS):
            raise KernelError(
                f"cannot steer queue {s.queue} to XSK index {s.index}",
                f"the program steers queues 0-{XSK_QUEUES - 1} into indexes 0-{XSK_SLOTS - 1}",
                err=errno.ERANGE,
            )
    outer, index_map = _master_maps(master, root)
    with _fd(outer), _fd(index_map), _fd(bpf.obj_get(xsk_map.path)) as map_fd:
        for s in slots:
            bpf.map_update(index_map, s.queue, s.index)
            bpf.map_update(outer, s.queue, map_fd)


def unwire(master: str, queues: Iterable[int], map_id: int, *, root: Path | None = None
           ) -> tuple[int, ...]:
    """Empty the outer-map slots of ``queues`` that still point at map ``map_id``.

    Slots pointing elsewhere belong to whoever leased the queue since and
    are left alone. Returns the queues unwired; nothing without steering maps.
    """
    try:
        outer, index_map = _master_maps(master, root)
    except NotSupported:
        return ()
    done = []
    with _fd(outer), _fd(index_map):
        for q in queues:
            if 0 <= q < XSK_QUEUES and bpf.map_lookup(outer, q) == map_id:
                bpf.map_delete(outer, q)
                done.append(q)
    return tuple(done)


def wiring(master: str, queues: Iterable[int] | None = None, *, root: Path | None = None
           ) -> dict[int, Wiring]:
    """The wired slots among ``queues`` (default: all), by physical queue id."""
    outer, index_map = _master_maps(master, root)
    found = {}
    with _fd(outer), _fd(index_map):
        for q in range(XSK_QUEUES) if queues is None else queues:
            if not 0 <= q < XSK_QUEUES:
                continue
            target = bpf.map_lookup(outer, q)
            if target is not None:
                found[q] = Wiring(q, target, bpf.map_lookup(index_map, q))
    return found


def insert_socket(map_path: str, index: int, sock_fd: int) -> None:
    """Put an AF_XDP socket at ``index`` of a pinned XSK map: what QEMU or DPDK do in the pod."""
    with _fd(bpf.obj_get(map_path)) as map_fd:
        bpf.map_update(map_fd, index, sock_fd)


def clear_socket(map_path: str, index: int) -> bool:
    """Remove the socket at ``index`` of a pinned XSK map; False if there was none."""
    with _fd(bpf.obj_get(map_path)) as map_fd:
        return bpf.map_delete(map_fd, index)
