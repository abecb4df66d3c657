"""libvirt itself turns the sidecar's domain into QEMU's command line.

``virsh domxml-to-native qemu-argv`` through libvirt's embedded QEMU driver
(``qemu:///embed``: no daemon, a private root) on the host's bookworm
libvirt 9.0 and QEMU 7.2: libvirt accepts the domain, passes our
``qemu:arg``s through unchanged and places its own devices, and nothing it
places on the root bus takes the slot the sidecar chose; and ``virsh define``
+ ``start --paused`` has QEMU realize every device, our NICs at their slots
(with each af-xdp netdev swapped for a hub port: QEMU 7.2 has no af-xdp; the
VM runs the domain with its af-xdp netdev under sid's libvirt and the af-xdp
QEMU: tests/e2e/test_kubevirt_binding.py).

Two differences from a KubeVirt node's domain, both forced by this host:
``type="qemu"`` (KubeVirt's domain with ``useEmulation``; there is no KVM)
and machine ``q35`` (``pc-q35-rhel*`` exist only in RHEL's QEMU); and no
masquerade ``<interface>`` where noted, because domxml-to-native opens the
tap of every interface on /dev/net/tun, which only root may (and libvirt's
privileged driver would want its ``libvirt-qemu`` user).
"""

from __future__ import annotations

import re

import pytest

from cni_netkit.kubevirt import domain
from cni_netkit.kubevirt.domain import BoundNIC
from tests.kubevirt import shapes
from tests.kubevirt.libvirt import pci_devices, qemu_argv, root_bus_slots, start_paused
from tests.kubevirt.validate import assert_valid_domain

NETDEV = ("ifname={ifname},mode=native,queues={queues},start-queue=1,inhibit=on,"
          "map-path=/run/netkit/xsk/netkit-fast:c1:{ifname},map-start-index=1")
def nic(name: str, ifname: str, mac: str, queues: int = 1) -> BoundNIC:
    return BoundNIC(name=name, mac=mac, queues=queues,
                    qemu_netdev=NETDEV.format(ifname=ifname, queues=queues))


def kubevirt_domain(**kwargs: object) -> bytes:
    return shapes.domain_xml(machine="q35", virt_type="qemu", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("nics", "slots"), [
    ([nic("fast", "net1", "02:00:00:00:00:20")], [0x18]),
    ([nic("fast", "net1", "02:00:00:00:00:20", queues=2)], [0x18]),
    ([nic("fast", "net1", "02:00:00:00:00:20"),
      nic("fast2", "net2", "02:00:00:00:00:21", queues=2)], [0x18, 0x17]),
], ids=["one-queue", "two-queues", "two-interfaces"])
def test_libvirt_passes_our_arguments_and_places_nothing_on_our_slots(
        nics: list[BoundNIC], slots: list[int]) -> None:
    out = domain.rewrite(kubevirt_domain(primary=False, kubevirt_iface_for=()), nics)
    assert_valid_domain(out)
    argv = qemu_argv(out)
    for n, slot in zip(nics, slots, strict=True):
        assert f"-netdev af-xdp,id={n.netdev_id},{n.qemu_netdev}" in argv
        assert f"-device {domain.device_arg(n, bus='pcie.0', slot=slot)}" in argv
    taken = root_bus_slots(argv)
    for n, slot in zip(nics, slots, strict=True):
        assert taken[slot] == [f"{n.netdev_id}-nic"], taken
    # libvirt did place its own devices on the root bus (VGA, the root ports).
    assert len(taken) > len(nics)


def test_a_slot_kubevirt_addressed_stays_kubevirts() -> None:
    port = ('<controller type="pci" index="3" model="pcie-root-port"><address type="pci" '
            'domain="0x0000" bus="0x00" slot="0x18" function="0x0"></address></controller>')
    out = domain.rewrite(kubevirt_domain(primary=False, extra_devices=port),
                         [nic("fast", "net1", "02:00:00:00:00:20")])
    taken = root_bus_slots(qemu_argv(out))
    assert taken[0x18] == ["pci.3"] and taken[0x17] == ["netkit-fast-nic"]


def test_libvirt_defines_and_starts_the_domain_with_our_nics_where_we_put_them() -> None:
    """``virsh define`` + ``start --paused``: QEMU realizes every device, ours included.

    The host's QEMU 7.2 has no af-xdp netdev (8.2 added it), so here each
    af-xdp argument is swapped for a hub port of the same id; the -device
    arguments are the sidecar's. No disk, serial, console or VNC: their
    files and sockets live in directories of the launcher pod.
    """
    source = kubevirt_domain(primary=False).decode()
    for element in ("graphics", "disk", "serial", "console"):
        source = re.sub(rf"<{element} .*?</{element}>", "", source)
    out = domain.rewrite(source.encode(), [
        nic("fast", "net1", "02:00:00:00:00:20", queues=2),
        nic("fast2", "net2", "02:00:00:00:00:21")])
    assert_valid_domain(out)
    hubbed = re.sub(rb'value="af-xdp,id=(netkit-[a-z0-9]+),[^"]*"',
                    rb'value="hubport,id=\1,hubid=0"', out)
    devices = pci_devices(start_paused(hubbed, "default_vm-afxdp"))
    assert devices[(0, 0x18, 0)] == "netkit-fast-nic"
    assert devices[(0, 0x17, 0)] == "netkit-fast2-nic"
    # libvirt's own devices were realized beside them (VGA, its root ports).
    assert devices[(0, 1, 0)] == "video0" and devices[(0, 2, 0)] == "pci.1"
