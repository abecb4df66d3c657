"""Which VMI interfaces are ours, and each one's lease, from what reaches the launcher pod.

Three sources can carry a lease (docs/kubevirt.md), read in this order:

* the lease files the plugin writes into the pod's volume (``--leases-dir``,
  default ``/var/run/kubevirt-hooks``): with ``xskMapVolume:
  hook-sidecar-sockets`` and ``xskMapSubdir: hook-sidecar-N`` in the NAD, the
  plugin puts ``cni-netkit-<CNI_IFNAME>.json`` (format
  ``cni-netkit.dev/lease/v1``: ``{"format", "owner", "lease": <one
  annotation entry>}``, ``cni_netkit/plugin/leasefile.py``) beside the XSK
  map it delivers, in the directory KubeVirt mounts into hook sidecar N. This
  is the source that works with a stock Multus and KubeVirt; its entry is
  matched like an annotation entry (below);
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

All are written after the CNI ADD, and the kubelet refreshes downward-API
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
LEASES_DIR = "/var/run/kubevirt-hooks"  # hook sidecar N's view of hook-sidecar-N/
# The plugin's lease files (cni_netkit/plugin/leasefile.py, which this package may not import).
LEASE_FILE_FORMAT = "cni-netkit.dev/lease/v1"
LEASE_FILE_GLOB = "cni-netkit-*.json"


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


def from_lease_dir(directory: str) -> list[Lease]:
    """The leases of the plugin's lease files in ``directory`` (none when it is missing).

    A file of another format is an error, not skipped: a newer plugin's file
    this sidecar cannot read must not look like a missing lease.
    """
    try:
        paths = sorted(Path(directory).glob(LEASE_FILE_GLOB))
    except OSError:
        return []
    out = []
    for path in paths:
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            continue  # its DEL removed it meanwhile
        if not isinstance(doc, Mapping) or doc.get("format") != LEASE_FILE_FORMAT:
            found = doc.get("format") if isinstance(doc, Mapping) else type(doc).__name__
            raise ValueError(f"{path} is not a {LEASE_FILE_FORMAT} lease file ({found!r}): "
                             "is the sidecar older than the node's cni-netkit?")
        out += from_annotation(json.dumps([doc.get("lease")]), str(path))
    return out


def find_lease(iface: Interface, by_network: Mapping[str, Lease],
               annotation: Sequence[Lease], files: Sequence[Lease] = ()) -> Lease | None:
    """``iface``'s lease: a lease file's, else network-info's entry for its network, else
    the annotation's; a file or annotation entry matched by pod interface name, then MAC."""
    return (_match(iface, files) or by_network.get(iface.name) or _match(iface, annotation))


def _match(iface: Interface, entries: Sequence[Lease]) -> Lease | None:
    names = {iface.pod_interface, hashed_pod_interface(iface.name)} - {None}
    for lease in entries:
        if lease.interface in names:
            return lease
    if iface.mac:
        for lease in entries:
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
    leases_dir: str | None = None,
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
            files = from_lease_dir(leases_dir) if leases_dir else []
            by_network = from_network_info(_read(network_info), network_info or "")
            annotation = from_annotation(_read(leases), leases or "")
        except (ValueError, AttributeError) as e:
            # A half-written file cannot happen (the kubelet swaps a symlink); a
            # document of another shape can, and stays so.
            raise LeaseError(f"cannot read the lease files: {e}") from e
        nics = []
        for iface in ifaces:
            lease = find_lease(iface, by_network, annotation, files)
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
                f"lease files {leases_dir + '/' + LEASE_FILE_GLOB if leases_dir else 'not read'}"
                f" have {[e.interface for e in files] or 'none'}, "
                f"network-info {network_info or 'not read'} has "
                f"{sorted(by_network) or 'no netkit device-info'}, leases annotation "
                f"{leases or 'not mounted'} has "
                f"{[e.interface for e in annotation] or 'no entries'}; check the pod's "
                "k8s.v1.cni.cncf.io/network-status and netkit.cni.dev/leases annotations, and "
                "the NAD's xskMapVolume/xskMapSubdir (docs/kubevirt.md)")
        sleep(interval)
