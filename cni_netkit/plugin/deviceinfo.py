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
    """Write atomically: Multus may read it the moment ADD returns."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(content))
    tmp.replace(final)


def remove(path: str | None) -> None:
    if path:
        Path(path).unlink(missing_ok=True)
