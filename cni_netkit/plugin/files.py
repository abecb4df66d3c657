"""The plugin's own files: private directories and files that are never reached through a symlink.

The plugin runs as root and its state directory is a name from the network
config (confined to the node admin's list, ``config.STATE_DIRS_ENV``).  What
it creates there is private (0700 directories, 0600 files); what it opens
there it opens with ``O_NOFOLLOW``, and a directory it did not make safe -- a
symlink, owned by another user, writable by group or others -- is refused
rather than used: whoever could write there could swap a record or a lock for
a link to any file on the node.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cni_netkit.errors import IOFailure

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` (created 0700 with its parents if missing), checked to be ours alone.

    Raises IOFailure (5) when it is a symlink, not a directory, not owned by
    this user, or writable by group or others.
    """
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    st = p.lstat()
    problem = None
    if stat.S_ISLNK(st.st_mode):
        problem = "is a symlink"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "is not a directory"
    elif st.st_uid != os.geteuid():
        problem = f"is owned by uid {st.st_uid}, not by the plugin's uid {os.geteuid()}"
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    if problem:
        raise IOFailure(f"{p} {problem}",
                        "the plugin keeps its state only in a directory no one else can change")
    return p


def open_private(path: str | os.PathLike[str], flags: int) -> int:
    """``os.open`` with O_NOFOLLOW|O_CLOEXEC; a new file is created 0600."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)


def write_synced(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (write(2) may take part of it) and fsync it."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)
