"""Which VMI interfaces are ours, and each one's lease, from what reaches the launcher pod.

Two downward-API files can carry a lease (docs/kubevirt.md):

* ``kubevirt.io/network-info`` (``downwardAPI: device-info`` in the binding's
  registration, mounted at ``/etc/podinfo/network-info``): per VMI network,
  the Multus network-status ``device-info``, which our ``CNIDeviceInfoFile``
  writes as ``{"type": "netkit", "netkit": <the result's netkit key>}``. A
  Multus or KubeVirt that parses device-info into the standard Go structs
  keeps only ``type``/``version``: then it has no lease in it.
* our ``netkit.cni.dev/leases`` annotation, when mounted (``--leases``): one
  entry per attachment, matched to the VMI interface by its pod interface
  name (the VMI status' ``podInterfaceName``, else KubeVirt's hashed name
  ``pod<sha256(network)[:11]>``) or, failing that, by MAC.

Both are written after the CNI ADD, and the kubelet refreshes downward-API
files on its own schedule: :func:`wait_for_leases` re-reads them until every
bound interface has a lease or the time is up, then says what is missing.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cni_netkit.kubevirt.domain import BoundNIC

DEFAULT_BINDING = "netkit-afxdp"
NETWORK_INFO = "/etc/podinfo/network-info"


class LeaseError(Exception):
    """A bound interface cannot get its NIC: the message is for the VM owner."""


@dataclass(frozen=True)
class Interface:
    """A VMI interface on our binding."""

    name: str  # also its network's name (KubeVirt pairs them by name)
    mac: str | None
    pod_interface: str | None  # from the VMI status, when virt-controller recorded it


@dataclass(frozen=True)
class Lease:
    """What a lease source says about one attachment."""

    source: str  # where it was read, for messages
    interface: str | None
    mac: str | None
    queues: int
    qemu_netdev: str | None
    afxdp_unavailable: str | None


def bound_interfaces(vmi: Mapping[str, Any], binding: str) -> list[Interface]:
    """The VMI's interfaces whose ``binding.name`` is ``binding``, in spec order."""
    spec = vmi.get("spec") or {}
    ifaces = ((spec.get("domain") or {}).get("devices") or {}).get("interfaces") or []
    statuses = {s.get("name"): s for s in (vmi.get("status") or {}).get("interfaces") or []
                if isinstance(s, Mapping)}
    out = []
    for iface in ifaces:
        if not isinstance(iface, Mapping) or (iface.get("binding") or {}).get("name") != binding:
            continue
        name = str(iface.get("name", ""))
        status = statuses.get(name) or {}
        out.append(Interface(name=name, mac=iface.get("macAddress") or None,
                             pod_interface=status.get("podInterfaceName") or None))
    return out


def hashed_pod_interface(network: str) -> str:
    """KubeVirt's pod interface name for a secondary network (its hashed naming scheme)."""
    return "pod" + hashlib.sha256(network.encode()).hexdigest()[:11]


def from_network_info(text: str, source: str) -> dict[str, Lease]:
    """The leases in a ``kubevirt.io/network-info`` document, by VMI network name."""
    doc = json.loads(text) if text.strip() else {}
    out = {}
    for entry in doc.get("interfaces") or []:
        netkit = (entry.get("deviceInfo") or {}).get("netkit")
        if isinstance(netkit, Mapping) and entry.get("network"):
            out[str(entry["network"])] = Lease(
                source=source, interface=netkit.get("interface"), mac=None,
                queues=len(netkit.get("queues") or ()), qemu_netdev=netkit.get("qemuNetdev"),
                afxdp_unavailable=netkit.get("afxdpUnavailable"))
    return out


def from_annotation(text: str, source: str) -> list[Lease]:
    """The entries of a ``netkit.cni.dev/leases`` annotation value."""
    entries = json.loads(text) if text.strip() else []
    return [Lease(source=source, interface=e.get("interface"), mac=e.get("mac"),
                  queues=len(e.get("queues") or ()), qemu_netdev=e.get("qemuNetdev"),
                  afxdp_unavailable=e.get("afxdpUnavailable"))
            for e in entries if isinstance(e, Mapping)]


def find_lease(iface: Interface, by_network: Mapping[str, Lease],
               annotation: Sequence[Lease]) -> Lease | None:
    """``iface``'s lease: network-info's entry for its network, else the annotation's."""
    if iface.name in by_network:
        return by_network[iface.name]
    names = {iface.pod_interface, hashed_pod_interface(iface.name)} - {None}
    for lease in annotation:
        if lease.interface in names:
            return lease
    if iface.mac:
        for lease in annotation:
            if lease.mac and lease.mac.lower() == iface.mac.lower():
                return lease
    return None


def nic_for(iface: Interface, lease: Lease) -> BoundNIC:
    """The NIC to add for ``iface``; LeaseError when its lease cannot carry one."""
    if lease.afxdp_unavailable:
        raise LeaseError(f"interface {iface.name}: the lease ({lease.source}) cannot carry "
                         f"AF_XDP: {lease.afxdp_unavailable}")
    if not lease.qemu_netdev or lease.queues < 1:
        raise LeaseError(f"interface {iface.name}: the lease ({lease.source}) has no "
                         "qemuNetdev or no queues")
    if iface.mac and lease.mac and iface.mac.lower() != lease.mac.lower():
        raise LeaseError(f"interface {iface.name}: the VMI asks for MAC {iface.mac} but the "
                         f"netkit has {lease.mac}; the NIC steers only the netkit's MAC to "
                         "the leased queues")
    mac = iface.mac or lease.mac
    if not mac:
        raise LeaseError(f"interface {iface.name}: no MAC address: set macAddress on the "
                         "VMI interface (the NAD needs the \"mac\" capability, nad.yaml)")
    return BoundNIC(name=iface.name, mac=mac, qemu_netdev=lease.qemu_netdev,
                    queues=lease.queues)


def _read(path: str | None) -> str:
    if not path:
        return ""
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        return ""


def wait_for_leases(
    ifaces: Sequence[Interface],
    *,
    network_info: str | None,
    leases: str | None,
    timeout: float,
    interval: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[BoundNIC]:
    """Each bound interface's NIC, re-reading the files until all have a lease.

    Raises LeaseError naming the interfaces still without one after
    ``timeout`` seconds, the files read and what they held; a lease that
    exists but cannot carry a NIC fails at once (waiting will not fix it).
    """
    deadline = clock() + timeout
    while True:
        problems = []
        try:
            by_network = from_network_info(_read(network_info), network_info or "")
            annotation = from_annotation(_read(leases), leases or "")
        except (ValueError, AttributeError) as e:
            # A half-written file cannot happen (the kubelet swaps a symlink); a
            # document of another shape can, and stays so.
            raise LeaseError(f"cannot read the lease files: {e}") from e
        nics = []
        for iface in ifaces:
            lease = find_lease(iface, by_network, annotation)
            if lease is None:
                problems.append(iface)
            else:
                nics.append(nic_for(iface, lease))
        if not problems:
            return nics
        if clock() >= deadline:
            missing = ", ".join(
                f"{i.name} (pod interface {i.pod_interface or hashed_pod_interface(i.name)})"
                for i in problems)
            raise LeaseError(
                f"no netkit lease for interface {missing} after {timeout:g}s: "
                f"network-info {network_info or 'not read'} has "
                f"{sorted(by_network) or 'no netkit device-info'}, leases annotation "
                f"{leases or 'not mounted'} has "
                f"{[e.interface for e in annotation] or 'no entries'}; check the pod's "
                "k8s.v1.cni.cncf.io/network-status and netkit.cni.dev/leases annotations")
        sleep(interval)
