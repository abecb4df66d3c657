"""The kernel layer: netkit links, netdev queue leasing and netns, over netlink.

The only package that imports pyroute2.  ``Kernel`` implements the
``KernelAPI`` seam of ``types``; the dataclasses it returns are re-exported
here.  ``Kernel`` is loaded on first use, so code that only needs the types (the
``cni`` layer, unit tests) pays nothing for pyroute2; and then only the
pyroute2 modules it uses are loaded (``_pyroute2``: its package ``__init__``
imports every pyroute2 feature).
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
        from cni_netkit.kernel import _pyroute2  # noqa: PLC0415 - see the module docstring

        _pyroute2.install()
        from cni_netkit.kernel.api import Kernel  # noqa: PLC0415

        return Kernel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
