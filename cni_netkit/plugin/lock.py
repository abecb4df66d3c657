"""An exclusive lock per master, with a bounded wait.

Queue choice reads the master's queues and then leases some: two ADDs on one
master must not interleave there. ``flock`` locks die with their process, so
a plugin killed while holding one leaves nothing to clean up.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cni_netkit.errors import TryAgainLater
from cni_netkit.plugin.files import open_private, private_dir

_POLL_INTERVAL = 0.005


@contextmanager
def master_lock(state_dir: str, master: str, timeout: float) -> Iterator[None]:
    """Hold ``<state_dir>/locks/<master>.lock`` exclusively.

    Raises TryAgainLater (code 11) after ``timeout`` seconds.
    """
    private_dir(state_dir)
    lock_dir = private_dir(Path(state_dir) / "locks")
    fd = open_private(lock_dir / f"{master}.lock", os.O_RDWR | os.O_CREAT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() >= deadline:
                raise TryAgainLater(
                    f"timed out after {timeout:g}s waiting for the queue lock of {master}",
                    "another ADD on this master holds it; retry",
                )
            time.sleep(_POLL_INTERVAL)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
