"""Where cni-netkit's BPF pins live: bpffs paths only, no BPF calls, nothing heavy to import.

Split from ``kernel.xsk`` so that the plugin tells whether a master has AF_XDP
steering with one path check, without loading libbpf for the masters (and
the commands) that have none. Also the mounts of the bpffs instances that
deliver an attachment's map into its pod's volume (libc's ``mount``, no BPF).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
from pathlib import Path

DEFAULT_ROOT = "/sys/fs/bpf/cni-netkit"
ROOT_ENV = "CNI_NETKIT_BPF_ROOT"
# A master's pins (kernel.xsk): the link holding the program, its two maps.
LINK_PIN = "link"
OUTER_MAP = "xsk_maps"
SLOT_MAP = "xsk_slots"


def bpf_root() -> Path:
    """Where our pins live: ``$CNI_NETKIT_BPF_ROOT`` or ``/sys/fs/bpf/cni-netkit``."""
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def master_dir(master: str, root: Path | None = None) -> Path:
    return (root or bpf_root()) / "masters" / master


def steering(master: str, root: Path | None = None) -> bool:
    """The node agent pinned this master's maps (``kernel.xsk.ensure_program``)."""
    return (master_dir(master, root) / OUTER_MAP).exists()


def pinned_files(under: Path) -> list[Path]:
    """Every file pinned below ``under``, sorted; empty if the directory is missing."""
    if not under.is_dir():
        return []
    return sorted(p for p in under.rglob("*") if p.is_file())


# --- a bpffs instance of a pod's own (the XSK map delivered into a pod's volume) -------

_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x2, 0x4, 0x8
_MNT_DETACH, _UMOUNT_NOFOLLOW = 0x2, 0x8
_libc: ctypes.CDLL | None = None


def _mount_call() -> ctypes.CDLL:
    global _libc  # noqa: PLW0603 - loaded once, on first use
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def mount_instance(directory: Path, name: str) -> bool:
    """Mount a fresh bpffs instance (nothing pinned in it) on ``directory/name``, made if
    missing; False when a bpffs is already mounted there (nothing done).

    Every ``mount -t bpf`` makes a new superblock: what is pinned there is
    reachable through that mount (and its bind mounts) only. Its root is
    0755, root's: only root pins or makes directories there; nosuid, nodev,
    noexec. ``directory`` may be writable by a pod: ``name`` is made and
    mounted on through file descriptors opened without following links, so
    a link or file planted there is refused (``OSError``), never followed.
    """
    target = directory / name
    if is_instance(target):
        return False
    dfd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=dfd)
        fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
    finally:
        os.close(dfd)
    try:
        # Through the descriptor's magic link: exactly the directory just checked.
        ret = _mount_call().mount(b"bpf", f"/proc/self/fd/{fd}".encode(), b"bpf",
                                  _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, b"mode=0755")
        if ret != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount bpffs on {target}: {os.strerror(err)}")
    finally:
        os.close(fd)
    return True


def unmount_instance(path: Path) -> bool:
    """Detach the bpffs instance mounted on ``path`` and remove the then empty directory;
    False when none is mounted there (already gone).

    Only a bpffs exactly at ``path`` is unmounted, never through a link.
    """
    if not is_instance(path):
        return False
    ret = _mount_call().umount2(os.fsencode(path), _MNT_DETACH | _UMOUNT_NOFOLLOW)
    if ret != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):  # unmounted meanwhile
            return False
        raise OSError(err, f"unmount bpffs on {path}: {os.strerror(err)}")
    with contextlib.suppress(OSError):  # not empty (not ours underneath), or gone
        path.rmdir()
    return True


def is_instance(path: Path) -> bool:
    """The topmost mount exactly at ``path`` is a bpffs."""
    return _mount_types().get(str(path)) == "bpf"


def instances_below(directory: Path) -> list[Path]:
    """Mount points of bpffs instances below ``directory`` (topmost mounts), sorted."""
    prefix = str(directory).rstrip("/") + "/"
    return sorted(Path(p) for p, fstype in _mount_types().items()
                  if fstype == "bpf" and p.startswith(prefix))


def _mount_types() -> dict[str, str]:
    """Mount point -> file system type of the topmost mount there (``/proc/self/mountinfo``)."""
    types: dict[str, str] = {}
    with Path("/proc/self/mountinfo").open(encoding="utf-8", errors="surrogateescape") as f:
        for line in f:  # later lines are mounted on top of earlier ones
            fields = line.split()
            sep = fields.index("-")
            types[_unescape(fields[4])] = fields[sep + 1]
    return types


def _unescape(field: str) -> str:
    """mountinfo's octal escapes (``\\040`` for a space) undone."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
