"""The Multus device-info file (Network Plumbing WG "Device Information" 1.1.0).

Multus passes ``runtimeConfig.CNIDeviceInfoFile``; what we write there ends up
in the pod's ``k8s.v1.cni.cncf.io/network-status`` as ``device-info``. None of
the standard types (pci, vdpa, vhost-user, memif) carries queue ids, so we
write type ``netkit`` with our lease details. Consumers that parse into the
standard Go structs keep only ``type``/``version``; the node agent's pod
annotation is the path that always carries the queue ids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cni_netkit.errors import IOFailure
from cni_netkit.result import Result

DEVICE_INFO_VERSION = "1.1.0"


def device_info(result: Result) -> dict[str, Any]:
    """``{"type": "netkit", "version": "1.1.0", "netkit": <the result's netkit key>}``."""
    return {
        "type": "netkit",
        "version": DEVICE_INFO_VERSION,
        "netkit": result.encode(DEVICE_INFO_VERSION)["netkit"],
    }


def write(path: str, content: dict[str, Any]) -> None:
    """Write atomically (Multus may read it the moment ADD returns), never over anything.

    The path comes from the request: replacing whatever is there, or writing
    through a symlink planted at the temporary name, would let the caller
    overwrite any file as root. ``link()`` publishes the complete file and
    fails when the name is taken (by a symlink too).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp.{os.getpid()}")
    tmp.unlink(missing_ok=True)  # a leftover of a killed run with our pid (unlink never follows)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(content, f)
        os.link(tmp, final)
    except FileExistsError as e:
        raise IOFailure(f"device-info file {path} already exists",
                        "cni-netkit writes a new file there and never replaces one") from e
    finally:
        tmp.unlink(missing_ok=True)


def remove(path: str | None) -> None:
    """Remove the file, and what a ``write`` killed midway left: its temporary names.

    A SIGKILL between creating the temporary file and its ``finally`` (a
    killed node agent serves many ADDs) leaves ``.<name>.tmp.<pid>`` behind,
    which nothing else would ever remove. Only ADD of this attachment writes
    these names, and the runtime never overlaps its ADD and DEL.
    """
    if not path:
        return
    final = Path(path)
    final.unlink(missing_ok=True)
    for tmp in leftovers(final):
        tmp.unlink(missing_ok=True)  # unlink never follows a symlink


def leftovers(final: Path) -> list[Path]:
    """The temporary files killed ``write``s of ``final`` left (``.<name>.tmp.<pid>``)."""
    prefix = f".{final.name}.tmp."
    try:
        names = [e.name for e in os.scandir(final.parent) if e.name.startswith(prefix)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [final.parent / n for n in names if n[len(prefix):].isdigit()]
