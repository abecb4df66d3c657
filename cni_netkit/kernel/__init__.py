"""The kernel layer: netkit links, netdev queue leasing and netns, over netlink.

The only package that imports pyroute2.  ``Kernel`` implements the
``KernelAPI`` seam of ``types``; the dataclasses it returns are re-exported
here.  ``Kernel`` is loaded on first use: importing pyroute2 0.9.7 runs its
package ``__init__``, which imports every pyroute2 module (~0.13 s on a
host, seconds in the test VM), and code that only needs the types (the
``cni`` layer, unit tests) should not pay for that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cni_netkit.kernel.types import (
    DevInfo,
    KernelAPI,
    KernelSupport,
    Link,
    NetkitInfo,
    NetkitMode,
    NetkitPolicy,
    NetkitSpec,
    Pairing,
    PeerSpec,
    Queue,
    QueueLease,
    QueueType,
)

if TYPE_CHECKING:
    from cni_netkit.kernel.api import Kernel

__all__ = [
    "DevInfo",
    "Kernel",
    "KernelAPI",
    "KernelSupport",
    "Link",
    "NetkitInfo",
    "NetkitMode",
    "NetkitPolicy",
    "NetkitSpec",
    "Pairing",
    "PeerSpec",
    "Queue",
    "QueueLease",
    "QueueType",
]


def __getattr__(name: str) -> Any:
    if name == "Kernel":
        from cni_netkit.kernel.api import Kernel  # noqa: PLC0415 - see the module docstring

        return Kernel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
