"""Inputs shaped like virt-launcher's: the domain XML KubeVirt's converter marshals
(Go ``encoding/xml``: double quotes, ``<x></x>`` for empty elements, the qemu
namespace declared on the root) and the VMI JSON it sends beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

UID = "5f4b6a8e-8d2e-4a0c-9c57-0d1c2b3a4f5e"
MASQUERADE_MAC = "02:00:00:aa:bb:01"


def domain_xml(*, machine: str = "pc-q35-rhel9.6.0", virt_type: str = "kvm",
               primary: bool = True, extra_devices: str = "", commandline: str = "",
               kubevirt_iface_for: tuple[str, ...] = ()) -> bytes:
    """A q35 domain with a masquerade primary (a tap on root port 1) and a disk.

    ``kubevirt_iface_for``: networks KubeVirt put an ``<interface>`` in for
    (as it does for bindings it handles itself), which the sidecar must remove.
    ``virt_type="qemu"`` is KubeVirt's domain with ``useEmulation``.
    """
    masquerade = (
        '<interface type="ethernet"><address type="pci" domain="0x0000" bus="0x01" '
        'slot="0x00" function="0x0"></address><source></source>'
        '<target dev="tap0" managed="no"></target><model type="virtio-non-transitional">'
        f'</model><mac address="{MASQUERADE_MAC}"></mac><mtu size="1480"></mtu>'
        '<alias name="ua-default"></alias><rom enabled="no"></rom></interface>'
    ) if primary else ""
    ours = "".join(
        f'<interface type="ethernet"><source></source><target dev="tap{n}" managed="no">'
        f'</target><model type="virtio-non-transitional"></model>'
        f'<mac address="02:00:00:00:00:f{i}"></mac><alias name="ua-{n}"></alias>'
        '<rom enabled="no"></rom></interface>'
        for i, n in enumerate(kubevirt_iface_for))
    return (
        f'<domain type="{virt_type}" xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0">'
        f"<name>default_vm-afxdp</name><uuid>{UID}</uuid>"
        '<memory unit="b">1073741824</memory>'
        f'<os><type arch="x86_64" machine="{machine}">hvm</type>'
        '<smbios mode="sysinfo"></smbios></os>'
        '<sysinfo type="smbios"><system><entry name="uuid">' + UID + "</entry>"
        '<entry name="manufacturer">KubeVirt</entry></system></sysinfo>'
        f"<devices>{masquerade}{ours}"
        '<channel type="unix"><target name="org.qemu.guest_agent.0" type="virtio"></target>'
        "</channel>"
        '<controller type="usb" index="0" model="none"></controller>'
        '<controller type="scsi" index="0" model="virtio-non-transitional"></controller>'
        '<controller type="virtio-serial" index="0" model="virtio-non-transitional">'
        "</controller>"
        '<controller type="pci" index="0" model="pcie-root"></controller>'
        '<controller type="pci" index="1" model="pcie-root-port"></controller>'
        '<controller type="pci" index="2" model="pcie-root-port"></controller>'
        '<video><model type="vga" heads="1" vram="16384"></model></video>'
        '<graphics type="vnc"><listen type="socket" '
        f'socket="/var/run/kubevirt-private/{UID}/virt-vnc"></listen></graphics>'
        '<memballoon model="virtio-non-transitional"><stats period="10"></stats></memballoon>'
        '<disk device="disk" type="file" model="virtio-non-transitional">'
        '<source file="/var/run/kubevirt-ephemeral-disks/disk-data/rootdisk/disk.qcow2">'
        '</source><target bus="virtio" dev="vda"></target>'
        '<driver cache="none" error_policy="stop" io="native" name="qemu" type="qcow2" '
        'discard="unmap"></driver><alias name="ua-rootdisk"></alias></disk>'
        '<serial type="unix"><target port="0"></target><source mode="bind" '
        f'path="/var/run/kubevirt-private/{UID}/virt-serial0"></source></serial>'
        '<console type="pty"><target type="serial" port="0"></target></console>'
        f"{extra_devices}"
        "</devices>"
        f"{commandline}"
        '<metadata><kubevirt xmlns="http://kubevirt.io"><uid>' + UID + "</uid>"
        "<graceperiod><deletionGracePeriodSeconds>30</deletionGracePeriodSeconds>"
        "</graceperiod></kubevirt></metadata>"
        "<features><acpi></acpi></features>"
        '<cpu mode="host-model"><topology sockets="1" cores="1" threads="1"></topology></cpu>'
        '<vcpu placement="static">1</vcpu>'
        "</domain>"
    ).encode()


def vmi(bound: dict[str, str | None], *, binding: str = "netkit-afxdp",
        pod_interfaces: dict[str, str] | None = None) -> dict[str, Any]:
    """A VMI with a masquerade primary and one interface per ``bound`` name (-> its MAC)."""
    ifaces: list[dict[str, Any]] = [{"name": "default", "masquerade": {}}]
    networks: list[dict[str, Any]] = [{"name": "default", "pod": {}}]
    for name, mac in bound.items():
        iface: dict[str, Any] = {"name": name, "binding": {"name": binding}}
        if mac:
            iface["macAddress"] = mac
        ifaces.append(iface)
        networks.append({"name": name, "multus": {"networkName": f"default/netkit-{name}"}})
    status = [{"name": n, "podInterfaceName": p, "infoSource": "multus-status"}
              for n, p in (pod_interfaces or {}).items()]
    return {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": "vm-afxdp", "namespace": "default", "uid": UID},
        "spec": {"domain": {"devices": {"interfaces": ifaces, "disks": [
            {"name": "rootdisk", "disk": {"bus": "virtio"}}]}}, "networks": networks},
        "status": {"interfaces": status},
    }


def vmi_json(*args: Any, **kwargs: Any) -> bytes:
    return json.dumps(vmi(*args, **kwargs)).encode()


def lease_entry(interface: str, *, mac: str, queues: int = 1, network: str = "netkit-fast",
                first_master_queue: int = 12) -> dict[str, Any]:
    """One ``netkit.cni.dev/leases`` entry as the agent writes it (plugin.leasefile.lease_entry)."""
    ids = list(range(1, queues + 1))
    pod_dir = "/sys/fs/bpf/cni-netkit/pods/default/virt-launcher-vm-afxdp-x7k2p"
    map_path = f"{pod_dir}/{network}:c1:{interface}"
    return {
        "network": network, "interface": interface, "master": "ens1f0np0",
        "queues": ids, "masterQueues": [first_master_queue + i for i in range(queues)],
        "mac": mac,
        "qemuNetdev": (f"ifname={interface},mode=native,queues={queues},start-queue=1,"
                       f"inhibit=on,map-path={map_path},map-start-index=1"),
        "mapPath": map_path, "mapStartIndex": 1, "xskMode": "copy",
    }


def write_plugin_lease_file(directory: Path, interface: str, *, mac: str,
                            container_id: str = "c1", network: str = "netkit-fast") -> Path:
    """The lease file the plugin writes (``plugin.leasefile.write``, its own code) for an
    attachment delivered into ``hook-sidecar-0`` of the launcher pod's hooks volume."""
    from cni_netkit.plugin import leasefile  # noqa: PLC0415 - the plugin, in tests only
    from cni_netkit.plugin.state import Attachment, LeasedQueue  # noqa: PLC0415

    pin = f"{network}:{container_id}:{interface}"
    att = Attachment(
        container_id=container_id, ifname=interface, netns="/var/run/netns/x", network=network,
        master="ens1f0np0", pairing="single", mode="l2", mac=mac, mtu=None,
        queues=(LeasedQueue(netkit_queue=1, master_queue=12),),
        extra={"map_path": f"/sys/fs/bpf/cni-netkit/pods/default/vm/{pin}",
               "pod_map_path": f"/var/run/kubevirt-hooks/hook-sidecar-0/cni-netkit/{pin}",
               "map_start_index": 1, "xsk_mode": "copy"})
    return leasefile.write(directory, att)
