"""The attachment's lease as a file in the pod's volume, beside its delivered XSK map.

A pod's own containers cannot read our ``netkit.cni.dev/leases`` annotation
unless its spec mounts it, and KubeVirt mounts it into no hook sidecar;
Multus and KubeVirt copy device-info through Go structs that drop our
``netkit`` key. So with ``xskMapVolume`` ADD also writes what a consumer
needs into the volume, as a regular file beside the pod's bpffs (which
holds pins only)::

    <volume>[/<xskMapSubdir>]/cni-netkit-<CNI_IFNAME>.json

    {"format": "cni-netkit.dev/lease/v1",
     "owner": {"network": ..., "containerId": ..., "ifname": <CNI_IFNAME>},
     "lease": <one netkit.cni.dev/leases entry: lease_entry()>}

``lease`` is built by :func:`lease_entry`, the function the agent's
annotation uses, so the two never differ. ``format`` changes only when a
reader would misread the new document; new keys of ``lease`` do not change
it. ``owner`` lets DEL and GC remove only their own file: a later sandbox
of the same pod (same volume, same CNI_IFNAME) writes the same name.

The volume (and its subdirectory) is writable by the pod: the directory is
opened without following links, the file is written under a fresh name
(``O_EXCL|O_NOFOLLOW``) and renamed over the final one in that directory,
so a link planted there is replaced or refused, never followed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from cni_netkit.plugin.files import write_synced
from cni_netkit.plugin.state import Attachment, Owner
from cni_netkit.result import consumer_fields

FORMAT = "cni-netkit.dev/lease/v1"
PREFIX, SUFFIX = "cni-netkit-", ".json"
FILE_MODE = 0o644  # the pod's consumers (QEMU as 107, a sidecar) read it; only root writes


def lease_entry(att: Attachment) -> dict[str, Any]:
    """One attachment as the pod sees it in ``netkit.cni.dev/leases`` and in its lease file.

    ``queues`` are the netkit's queue ids (what AF_XDP binds to inside the
    pod), ``masterQueues`` the physical ones they proxy, index by index.
    ``qemuNetdev`` (the ``-netdev af-xdp`` arguments) and ``dpdkVdev`` (DPDK's
    ``--vdev``), ``mapPath``, ``mapStartIndex`` and ``xskMode`` when the
    attachment has a pinned XSK map: without one nothing steers the queues'
    frames to an AF_XDP socket, and ``afxdpUnavailable`` says why (as in the
    CNI result: ``result.consumer_fields``).
    """
    leased = sorted(att.queues, key=lambda q: q.netkit_queue)
    entry: dict[str, Any] = {
        "network": att.network,
        "interface": att.device,  # its name in the pod
        "master": att.master,
        "queues": [q.netkit_queue for q in leased],
        "masterQueues": [q.master_queue for q in leased],
        "mac": att.mac,
    }
    # The same consumer fields as the CNI result's netkit key.
    entry.update(consumer_fields(att.netkit))
    return entry


def file_name(ifname: str) -> str:
    """The lease file's name for CNI_IFNAME ``ifname`` (validated: no ``/``, not ``..``)."""
    return f"{PREFIX}{ifname}{SUFFIX}"


def document(att: Attachment) -> dict[str, Any]:
    """The lease file's content (see the module docstring)."""
    return {"format": FORMAT, "owner": _owner(att.owner), "lease": lease_entry(att)}


def make_dir(directory: Path, name: str) -> bool:
    """Make ``directory/name`` if missing, as the kubelet makes a subPath directory (root's,
    the mode of ``directory``: an emptyDir is 0777, so the container that mounts it as its
    subPath can write there); False when it already is a directory.

    ``name`` is one path component; a link or file in its place is refused
    (``OSError``), never followed.
    """
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        mode = stat.S_IMODE(os.fstat(dfd).st_mode)
        try:
            os.mkdir(name, 0o700, dir_fd=dfd)  # no one else's until its mode is set
        except FileExistsError:
            fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=dfd)
            os.close(fd)
            return False
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=dfd)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        return True
    finally:
        os.close(dfd)


def remove_dir_if_empty(path: Path) -> bool:
    """Remove the directory ``path`` if it holds nothing (a link there is left alone)."""
    with contextlib.suppress(OSError):  # not empty, gone, a link or a mount point
        if stat.S_ISDIR(path.lstat().st_mode):
            path.rmdir()
            return True
    return False


def write(directory: Path, att: Attachment) -> Path:
    """Write the attachment's lease file into ``directory`` atomically; its path."""
    data = json.dumps(document(att), sort_keys=True, indent=1).encode() + b"\n"
    name = file_name(att.ifname)
    temp = f".{name}.{secrets.token_hex(6)}"
    dfd = _open_dir(directory)
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     FILE_MODE, dir_fd=dfd)
        try:
            try:
                os.fchmod(fd, FILE_MODE)  # whatever the umask
                write_synced(fd, data)
            finally:
                os.close(fd)
            os.replace(temp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dfd)
            raise
    finally:
        os.close(dfd)
    return directory / name


def read(path: Path) -> dict[str, Any] | None:
    """A lease file's document; None when missing, a link, or not ours (another format)."""
    try:
        dfd = _open_dir(path.parent)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:  # missing, a link (ELOOP), ...
        return None
    finally:
        os.close(dfd)
    with os.fdopen(fd, "rb") as f:
        try:
            doc = json.loads(f.read(1 << 20))
        except ValueError:
            return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return None
    return doc


def remove(path: Path, owner: Owner) -> bool:
    """Remove the lease file at ``path`` if ``owner`` wrote it; False when missing or
    someone else's (a later sandbox of the same pod rewrote it)."""
    doc = read(path)
    if doc is None or doc.get("owner") != _owner(owner):
        return False
    with contextlib.suppress(FileNotFoundError):
        dfd = _open_dir(path.parent)
        try:
            os.unlink(path.name, dir_fd=dfd)
        finally:
            os.close(dfd)
        return True
    return False


def _owner(owner: Owner) -> dict[str, str]:
    return {"network": owner.network, "containerId": owner.container_id, "ifname": owner.ifname}


def _open_dir(directory: Path) -> int:
    return os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
