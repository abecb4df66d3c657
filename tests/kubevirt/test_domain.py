"""The domain rewrite: what QEMU gets for each bound interface, and what stays as it was.

Every domain the rewrite returns validates against libvirt's RNG schema.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from cni_netkit.kubevirt import domain
from cni_netkit.kubevirt.domain import QEMU_NS, BoundNIC, DomainError
from tests.kubevirt import shapes
from tests.kubevirt.validate import assert_valid_domain

Q = f"{{{QEMU_NS}}}"
NETDEV = ("ifname=pod0a1b2c3d4e5,mode=native,queues=1,start-queue=1,inhibit=on,"
          "map-path=/sys/fs/bpf/cni-netkit/pods/default/p/netkit-fast:c1:pod0a1b2c3d4e5,"
          "map-start-index=1")


def nic(name: str = "fast", *, queues: int = 1, mac: str = "02:00:00:00:00:20") -> BoundNIC:
    return BoundNIC(name=name, mac=mac, qemu_netdev=NETDEV.replace("queues=1", f"queues={queues}"),
                    queues=queues)


def qemu_args(xml: bytes) -> list[str]:
    root = ET.fromstring(xml)  # noqa: S314 - our own output
    (cmdline,) = root.findall(f"{Q}commandline")
    return [a.get("value", "") for a in cmdline.findall(f"{Q}arg")]


def rewritten(source: bytes, nics: list[BoundNIC]) -> bytes:
    out = domain.rewrite(source, nics)
    assert_valid_domain(out)
    return out


def test_the_input_shapes_are_valid_libvirt_domains() -> None:
    assert_valid_domain(shapes.domain_xml())
    assert_valid_domain(shapes.domain_xml(kubevirt_iface_for=("fast",)))


def test_one_queue_gets_the_leases_netdev_verbatim_and_a_virtio_nic_at_a_free_slot() -> None:
    out = rewritten(shapes.domain_xml(), [nic()])
    assert qemu_args(out) == [
        "-netdev", f"af-xdp,id=netkit-fast,{NETDEV}",
        "-device", "virtio-net-pci,netdev=netkit-fast,id=netkit-fast-nic,mac=02:00:00:00:00:20,"
                   "bus=pcie.0,addr=0x18",
    ]


def test_the_masquerade_primary_and_everything_else_stay() -> None:
    source = shapes.domain_xml()
    out = rewritten(source, [nic()])
    before, after = ET.fromstring(source), ET.fromstring(out)  # noqa: S314
    assert [ET.tostring(e) for e in before.find("devices") or []] == \
        [ET.tostring(e) for e in after.find("devices") or []]
    assert [e.tag for e in after if not e.tag.startswith(Q)] == [e.tag for e in before]


def test_two_queues_make_a_multiqueue_nic_with_a_vector_pair_per_queue() -> None:
    out = rewritten(shapes.domain_xml(), [nic(queues=2)])
    netdev, device = qemu_args(out)[1], qemu_args(out)[3]
    assert ",queues=2," in netdev
    assert device.endswith(",bus=pcie.0,addr=0x18,mq=on,vectors=6")


def test_two_bound_interfaces_get_their_own_netdev_device_and_slot() -> None:
    out = rewritten(shapes.domain_xml(),
                    [nic("fast"), nic("fast2", queues=2, mac="02:00:00:00:00:21")])
    args = qemu_args(out)
    assert args[0::2] == ["-netdev", "-device", "-netdev", "-device"]
    assert args[1].startswith("af-xdp,id=netkit-fast,") and args[5].startswith(
        "af-xdp,id=netkit-fast2,")
    assert "netdev=netkit-fast,id=netkit-fast-nic,mac=02:00:00:00:00:20,bus=pcie.0,addr=0x18" \
        in args[3]
    assert "netdev=netkit-fast2,id=netkit-fast2-nic,mac=02:00:00:00:00:21,bus=pcie.0,addr=0x17" \
        in args[7]


def test_what_kubevirt_put_in_the_domain_for_the_network_is_removed() -> None:
    out = rewritten(shapes.domain_xml(kubevirt_iface_for=("fast", "other")), [nic()])
    aliases = [a.get("name") for a in ET.fromstring(out).iter("alias")]  # noqa: S314
    assert "ua-fast" not in aliases
    assert {"ua-default", "ua-other", "ua-rootdisk"} <= set(aliases)


def test_other_qemu_arguments_stay_in_the_one_commandline() -> None:
    fw_cfg = ('<qemu:commandline><qemu:arg value="-fw_cfg"></qemu:arg>'
              '<qemu:arg value="name=opt/com.coreos/config,file=/ign.json"></qemu:arg>'
              "</qemu:commandline>")
    out = rewritten(shapes.domain_xml(commandline=fw_cfg), [nic()])
    args = qemu_args(out)
    assert args[:2] == ["-fw_cfg", "name=opt/com.coreos/config,file=/ign.json"]
    assert args[2:4] == ["-netdev", f"af-xdp,id=netkit-fast,{NETDEV}"]


def test_the_rewrite_is_idempotent_when_the_hook_runs_again() -> None:
    once = rewritten(shapes.domain_xml(), [nic("fast"), nic("fast2", queues=2)])
    assert domain.rewrite(once, [nic("fast"), nic("fast2", queues=2)]) == once


def test_the_qemu_namespace_is_declared_on_the_root_with_libvirts_prefix() -> None:
    out = rewritten(shapes.domain_xml(), [nic()])
    head = out.split(b">", 1)[0]
    assert head.startswith(b"<domain ")
    assert b'xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0"' in head
    assert b"<qemu:commandline>" in out and b"<qemu:arg " in out
    # KubeVirt's metadata keeps its namespace (Go matches it by URI).
    assert b'xmlns:kubevirt="http://kubevirt.io"' in head and b"<kubevirt:uid>" in out


def test_the_slot_avoids_addresses_in_the_domain_and_in_other_device_args() -> None:
    taken = ('<controller type="pci" index="3" model="pcie-root-port"><address type="pci" '
             'domain="0x0000" bus="0x00" slot="0x18" function="0x0"></address></controller>')
    other = ('<qemu:commandline><qemu:arg value="-device"></qemu:arg><qemu:arg '
             'value="pvpanic-pci,bus=pcie.0,addr=0x17"></qemu:arg></qemu:commandline>')
    out = rewritten(shapes.domain_xml(extra_devices=taken, commandline=other), [nic()])
    assert qemu_args(out)[-1].endswith(",bus=pcie.0,addr=0x16")


def test_an_i440fx_machine_puts_the_nic_on_pci_0() -> None:
    source = shapes.domain_xml(machine="pc-i440fx-9.2").replace(
        b'<controller type="pci" index="0" model="pcie-root"></controller>'
        b'<controller type="pci" index="1" model="pcie-root-port"></controller>'
        b'<controller type="pci" index="2" model="pcie-root-port"></controller>',
        b'<controller type="pci" index="0" model="pci-root"></controller>').replace(
        b'bus="0x01"', b'bus="0x00"').replace(b'slot="0x00"', b'slot="0x03"')
    out = rewritten(source, [nic()])
    assert qemu_args(out)[-1].endswith(",bus=pci.0,addr=0x18")


def test_no_free_slot_is_a_clear_error() -> None:
    used = "".join(f'<controller type="pci" index="{10 + i}" model="pcie-root-port">'
                   f'<address type="pci" domain="0x0000" bus="0x00" slot="{s:#04x}" '
                   'function="0x0"></address></controller>'
                   for i, s in enumerate(domain.SLOT_RANGE))
    source = shapes.domain_xml(extra_devices=used)
    with pytest.raises(DomainError, match="no free PCI slot"):
        domain.rewrite(source, [nic()])


def test_a_vmi_without_bound_interfaces_changes_nothing_but_an_empty_commandline() -> None:
    source = shapes.domain_xml()
    assert domain.rewrite(source, []).count(b"commandline") == 0


def test_not_a_domain_is_a_clear_error() -> None:
    with pytest.raises(DomainError, match="does not parse"):
        domain.rewrite(b"<domain", [nic()])
    with pytest.raises(DomainError, match="expected a <domain>"):
        domain.rewrite(b"<network></network>", [nic()])


def test_map_dir_moves_only_the_map_paths_directory() -> None:
    moved = domain.with_map_dir(nic(), "/var/run/netkit/xsk/")
    assert moved.qemu_netdev == NETDEV.replace(
        "/sys/fs/bpf/cni-netkit/pods/default/p/", "/var/run/netkit/xsk/")


@pytest.mark.parametrize("bad", [
    '<qemu:commandline><qemu:arg></qemu:arg></qemu:commandline>',
    '<qemu:commandline></qemu:commandline><qemu:commandline></qemu:commandline>',
])
def test_the_schema_check_refuses_a_broken_commandline(bad: str) -> None:
    with pytest.raises(AssertionError, match="refuses"):
        assert_valid_domain(shapes.domain_xml(commandline=bad))
