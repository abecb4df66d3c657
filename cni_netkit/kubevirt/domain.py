"""The domain rewrite: an ``af-xdp`` netdev and a virtio-net device per bound interface.

Pure logic on the domain XML virt-launcher sends to ``OnDefineDomain``.
libvirt has no interface type for AF_XDP, so the NIC goes in through
libvirt's QEMU namespace: in ``<qemu:commandline>``, per interface,

    -netdev af-xdp,id=netkit-<iface>,<qemuNetdev of its lease>
    -device virtio-net-pci,netdev=netkit-<iface>,id=netkit-<iface>-nic,mac=<MAC>,
            bus=<root bus>,addr=<slot>[,mq=on,vectors=2N+2]

Whatever KubeVirt put in ``<devices>`` for that network (an ``<interface>``
whose alias is ``ua-<iface>``) is removed: the guest gets exactly one NIC
per bound interface.

**The PCI slot.** libvirt does not know about devices on the QEMU command
line, so the slot must collide neither with an address in the domain nor
with one libvirt assigns at define time. libvirt fills the root bus from
the bottom (slot 1 up: PIIX3/VGA on i440fx, the pcie-root-ports KubeVirt
asks for on q35, eight functions per slot) and keeps the top for its fixed
q35 devices (0x1a/0x1d USB, 0x1b sound, 0x1e the DMI-to-PCI bridge, 0x1f
LPC/SATA/SMBus). We take the highest free slot from :data:`SLOT_RANGE`'s top
(0x18) down, skipping every slot the domain's addresses or other
``-device`` arguments already name on the root bus: safe unless libvirt
auto-places more than 8 x 23 root ports and functions below it.

**Surviving the XML round trip** (kubevirt#16901): a KubeVirt before the
fix (kubevirt#18460) defines the domain from the string we return (so
QEMU gets our arguments) but keeps an in-memory copy parsed by Go's
``encoding/xml``, which drops ``qemu:commandline``; a later define from that
copy (and, with the fix, from the preserved arguments) calls the hook again.
So the rewrite is idempotent: our arguments are recognised by their ids and
replaced, never doubled; everyone else's ``qemu:arg`` (e.g. KubeVirt's own
``-fw_cfg``) stays, inside the one ``<qemu:commandline>`` libvirt's schema
allows, on the root element that declares the ``qemu`` prefix libvirt
expects.
"""

from __future__ import annotations

import itertools
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
KUBEVIRT_NS = "http://kubevirt.io"
_Q = f"{{{QEMU_NS}}}"
# Candidate slots on the root bus, highest first (see the module docstring).
SLOT_RANGE = range(0x18, 0x02, -1)
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class DomainError(ValueError):
    """The domain cannot take the NICs (no free slot, not a domain): said to virt-launcher."""


@dataclass(frozen=True)
class BoundNIC:
    """One VMI interface on our binding, resolved to its lease."""

    name: str  # the VMI interface name (KubeVirt aliases its devices "ua-<name>")
    mac: str
    qemu_netdev: str  # the lease's qemuNetdev: "ifname=…,…,map-start-index=…"
    queues: int

    @property
    def netdev_id(self) -> str:
        """A QEMU id (letters, digits, ``-._``, a letter first) naming this interface."""
        return "netkit-" + _ID_UNSAFE.sub("_", self.name)


def rewrite(domain_xml: bytes, nics: Sequence[BoundNIC]) -> bytes:
    """``domain_xml`` with ``nics`` added as QEMU arguments (module docstring)."""
    for prefix, uri in (("qemu", QEMU_NS), ("kubevirt", KUBEVIRT_NS)):
        ET.register_namespace(prefix, uri)
    try:
        # From virt-launcher, the sidecar's own pod: not untrusted input.
        root = ET.fromstring(domain_xml)  # noqa: S314
    except ET.ParseError as e:
        raise DomainError(f"the domain XML does not parse: {e}") from e
    if root.tag != "domain":
        raise DomainError(f"expected a <domain>, got <{root.tag}>")
    ours = {nic.netdev_id for nic in nics}
    _remove_kubevirt_interfaces(root, {f"ua-{nic.name}" for nic in nics})
    cmdline = root.find(f"{_Q}commandline")
    if cmdline is None:
        cmdline = ET.SubElement(root, f"{_Q}commandline")
    _drop_our_args(cmdline, ours)
    bus = root_bus(root)
    used = used_slots(root, cmdline)
    for nic in nics:
        slot = _free_slot(used)
        used.add(slot)
        for value in ("-netdev", f"af-xdp,id={nic.netdev_id},{nic.qemu_netdev}",
                      "-device", device_arg(nic, bus=bus, slot=slot)):
            ET.SubElement(cmdline, f"{_Q}arg", {"value": value})
    if len(cmdline) == 0:
        root.remove(cmdline)
    out: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return out


def with_map_dir(nic: BoundNIC, map_dir: str) -> BoundNIC:
    """``nic`` with its ``map-path`` moved to ``map_dir`` (the pin directory mounted elsewhere)."""
    parts = re.split(r"(?<!,),(?!,)", nic.qemu_netdev)
    for i, part in enumerate(parts):
        if part.startswith("map-path="):
            name = part.removeprefix("map-path=").replace(",,", ",").rsplit("/", 1)[-1]
            parts[i] = "map-path=" + f"{map_dir.rstrip('/')}/{name}".replace(",", ",,")
    return replace(nic, qemu_netdev=",".join(parts))


def device_arg(nic: BoundNIC, *, bus: str, slot: int) -> str:
    """The ``-device`` value: the guest's virtio-net NIC on the netdev, multiqueue past 1."""
    arg = (f"virtio-net-pci,netdev={nic.netdev_id},id={nic.netdev_id}-nic,mac={nic.mac},"
           f"bus={bus},addr={slot:#04x}")
    if nic.queues > 1:
        # One RX/TX vector pair per queue, plus config and control.
        arg += f",mq=on,vectors={2 * nic.queues + 2}"
    return arg


def root_bus(root: ET.Element) -> str:
    """QEMU's name of the root PCI bus: ``pci.0`` on i440fx (``pc*``), else ``pcie.0``."""
    os_type = root.find("os/type")
    machine = "" if os_type is None else os_type.get("machine", "")
    return "pci.0" if machine.startswith("pc") and "q35" not in machine else "pcie.0"


def used_slots(root: ET.Element, cmdline: ET.Element) -> set[int]:
    """Root-bus slots taken: by the domain's PCI addresses and other ``-device`` args."""
    used: set[int] = set()
    for addr in root.iter("address"):
        if addr.get("type") != "pci":
            continue
        try:
            if int(addr.get("domain", "0"), 0) == 0 and int(addr.get("bus", "0"), 0) == 0:
                used.add(int(addr.get("slot", "0"), 0))
        except ValueError:
            continue  # libvirt refuses such an address itself
    for value in _arg_values(cmdline):
        m = re.search(r"(?:^|,)addr=(0x[0-9a-fA-F]+|\d+)", value)
        if m and re.search(r"(?:^|,)bus=pcie?\.0(?:,|$)", value):
            used.add(int(m.group(1).split(".")[0], 0))
    return used


def _free_slot(used: set[int]) -> int:
    for slot in SLOT_RANGE:
        if slot not in used:
            return slot
    raise DomainError("no free PCI slot on the root bus for the netkit NIC "
                      f"(slots {SLOT_RANGE.stop + 1:#x}..{SLOT_RANGE.start:#x} all taken)")


def _remove_kubevirt_interfaces(root: ET.Element, aliases: set[str]) -> None:
    devices = root.find("devices")
    if devices is None:
        return
    for iface in devices.findall("interface"):
        alias = iface.find("alias")
        if alias is not None and alias.get("name") in aliases:
            devices.remove(iface)


def _arg_values(cmdline: ET.Element) -> Iterable[str]:
    return (a.get("value", "") for a in cmdline.findall(f"{_Q}arg"))


def _drop_our_args(cmdline: ET.Element, ours: set[str]) -> None:
    """Remove earlier ``-netdev``/``-device`` pairs of our ids (a re-run of the hook)."""
    args = cmdline.findall(f"{_Q}arg")
    drop: list[ET.Element] = []
    for flag, value in itertools.pairwise(args):
        v = value.get("value", "")
        key = {"-netdev": "id", "-device": "netdev"}.get(flag.get("value", ""))
        if key is not None and _option(v, key) in ours:
            drop += [flag, value]
    for arg in drop:
        if arg in list(cmdline):
            cmdline.remove(arg)


def _option(value: str, key: str) -> str | None:
    """``key``'s value in a QEMU option string (``a,k=v,…``; ``,,`` is a literal comma)."""
    for part in re.split(r"(?<!,),(?!,)", value):
        name, eq, val = part.partition("=")
        if eq and name == key:
            return val.replace(",,", ",")
    return None
