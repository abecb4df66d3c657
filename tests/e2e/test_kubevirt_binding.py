"""The KubeVirt path end to end in the VM, minus KubeVirt: ADD -> device-info -> the
sidecar's domain -> libvirt -> QEMU receives the leased queue's frames.

The ADD runs through the executable with the VMI's MAC and a CNIDeviceInfoFile,
as Multus would call it for a virt-launcher pod; the network-info document
is the one KubeVirt would mount if it kept our device-info's ``netkit`` key
(docs/kubevirt.md); the sidecar's OnDefineDomain decision
(``server.define_domain``) rewrites a virt-launcher-shaped domain. Then:

- the host's libvirt (bookworm's 9.0, embedded driver) turns it into QEMU's
  command line, and the ``-netdev af-xdp`` argument libvirt wrote is what
  QEMU (the af-xdp build, unprivileged as uid 107 with CAP_NET_RAW only)
  runs with, hubbed to the test's socket (tests/e2e/consumers.py) so that
  the frames it reads come out;
- libvirt from sid (the ``libvirt`` root) defines and starts the whole
  domain, paused, with that QEMU as its emulator (tests/e2e/sid_libvirt.py):
  the q35 machine, libvirt's devices and the sidecar's virtio-net-pci on its
  af-xdp netdev. A paused guest's NIC reads nothing, so what reaches QEMU is
  counted in its socket's RX ring (``consumers.rx_rings``).
"""

from __future__ import annotations

import collections
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cni_netkit.config import DEVICE_INFO_DIRS_ENV
from cni_netkit.kernel import xsk
from cni_netkit.kubevirt import server
from tests.e2e import sid_libvirt
from tests.e2e.conftest import Nic, Runtime, cni_plugins_dir, leased_queues, netkit_links
from tests.e2e.consumers import (
    CAP_NET_RAW,
    QEMU_UMEM,
    WORKLOAD_GID,
    WORKLOAD_OWNER,
    WORKLOAD_UID,
    RxRing,
    loopback,
    privileges,
    rx_rings,
    send_on_rx_queue,
    start_qemu,
    tag,
    tagged,
    wait_for_sockets,
)
from tests.kernel.xsk_support import FRAME, XDP_PASS, XDP_REDIRECT, bpf_object
from tests.kubevirt import shapes
from tests.kubevirt.libvirt import pci_devices, qemu_argv

pytestmark = pytest.mark.kernel

MAC = "02:00:00:00:00:20"
POD = "virt-launcher-vm-afxdp-x7k2p"
FRAMES = 50
DOMAIN = "default_vm-afxdp"  # shapes.domain_xml's <name>


@dataclass
class Launcher:
    """The virt-launcher pod after its ADD: the lease and the sidecar's inputs."""

    netns: str
    result: dict[str, Any]
    leased: list[int]
    device_info: Path
    network_info: Path


@contextmanager
def launcher_pod(nic: Nic, root: Path, make_netns: Any, tmp_path: Path, *, pod: str = POD,
                 mac: str = MAC, container: str = "c-vm") -> Iterator[Launcher]:
    """ADD for a virt-launcher pod as Multus calls it (the VMI's MAC, a CNIDeviceInfoFile),
    yielded; then DEL, and its device-info and map pin gone, no netkit left in its netns."""
    # Cold invocations only (the plugin in the executable, the invocation's
    # CNI_NETKIT_MASTERS): no session agent to wait for.
    runtime = Runtime(state_dir=tmp_path / "state", cni_path=cni_plugins_dir() or "")
    xsk.ensure_program(nic.name, bpf_object(), root=root)
    info_dir = tmp_path / f"device-info-{container}"
    info_dir.mkdir()
    device_info = info_dir / "fast.json"
    conf = runtime.conf(nic.name, queues="1-4", queuesPerAttachment=1,
                        xskMapOwner=WORKLOAD_OWNER,
                        runtimeConfig={"mac": mac, "CNIDeviceInfoFile": str(device_info)})
    env = {"CNI_ARGS": f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};K8S_POD_UID=uid-{container}",
           xsk.ROOT_ENV: str(xsk.bpf_root()), "CNI_NETKIT_MASTERS": f"{nic.name}=1-4",
           DEVICE_INFO_DIRS_ENV: str(info_dir)}
    netns = make_netns()
    out = runtime("ADD", conf, container_id=container, netns=netns, env=env)
    assert out.code == 0, out.stdout + out.stderr
    result = out.json
    try:
        network_info = tmp_path / f"network-info-{container}"
        network_info.write_text(json.dumps({"interfaces": [
            {"network": "fast", "deviceInfo": json.loads(device_info.read_text())}]}))
        yield Launcher(netns, result, [q["masterQueue"] for q in result["netkit"]["queues"]],
                       device_info, network_info)
    finally:
        done = runtime("DEL", {**conf, "prevResult": result}, container_id=container,
                       netns=netns, env=env)
        assert (done.code, done.stdout) == (0, ""), done.stderr
    assert not Path(result["netkit"]["mapPath"]).exists()
    assert not device_info.exists()
    assert netkit_links(netns) == []


def sidecar_domain(pod: Launcher, source: bytes) -> bytes:
    """The sidecar's OnDefineDomain output for ``source`` and the pod's network-info."""
    return server.define_domain(source, shapes.vmi_json({"fast": MAC}),
                                server.Settings(network_info=str(pod.network_info),
                                                leases=None, wait=5))


def test_the_sidecars_domain_through_libvirt_gives_qemu_the_leased_queue(
    nic: Nic, root: Path, make_netns: Any, tmp_path: Path
) -> None:
    loopback(nic)
    with launcher_pod(nic, root, make_netns, tmp_path) as pod:
        result, leased = pod.result, pod.leased
        domain_xml = sidecar_domain(
            pod, shapes.domain_xml(machine="q35", virt_type="qemu", primary=False))
        argv = qemu_argv(domain_xml)
        prefix = "-netdev af-xdp,id=netkit-fast,"
        (netdev,) = [a for a in argv if a.startswith("-netdev af-xdp,")]
        assert netdev == prefix + result["netkit"]["qemuNetdev"]
        assert any(a.startswith(f"-device virtio-net-pci,netdev=netkit-fast,id=netkit-fast-nic,"
                                f"mac={MAC},bus=pcie.0,addr=0x18") for a in argv), argv

        qemu = start_qemu(pod.netns, netdev.removeprefix(prefix), memlock=QEMU_UMEM)
        try:
            wait_for_sockets(qemu, nic.name, leased)
            sent: collections.Counter[bytes] = collections.Counter()
            for q in leased:
                tags = [tag("k", q, i) for i in range(FRAMES)]
                send_on_rx_queue(nic, q, (tagged(t) for t in tags))
                sent.update(tags)
            got = collections.Counter(qemu.sink.tags(timeout=5.0))
            print(json.dumps({"sent": sum(sent.values()), "received": sum(got.values()),
                              "queues": leased}))
            assert got == sent, qemu.output
        finally:
            rc = qemu.stop()
        assert rc == 0, qemu.output
        assert {xsk.verdict(nic.name, q, FRAME) for q in leased} == {XDP_PASS}
    assert leased_queues(nic) == {}
    assert xsk.wiring(nic.name) == {}


def test_sid_libvirt_defines_and_starts_the_sidecars_domain_on_the_leased_queue(
    nic: Nic, root: Path, make_netns: Any, tmp_path: Path
) -> None:
    """``virsh define`` + ``start --paused`` of the sidecar's domain under sid's libvirt,
    as the pod's workload; QEMU's socket in the map at 1, the leased queue's frames in
    its RX ring and none of another pod's; ``virsh destroy``, DEL, nothing left.

    The domain is virt-launcher's shape (``type="qemu"``, q35) without its disk,
    serial, console and VNC, whose files and sockets live in the launcher pod's
    directories (as in tests/kubevirt/test_libvirt.py), and with 64 MiB of guest
    memory for its 1 GiB: QEMU reserves it at start, more than the VM spares."""
    loopback(nic)
    source = shapes.domain_xml(machine="q35", virt_type="qemu", primary=False).decode()
    source = source.replace('<memory unit="b">1073741824</memory>',
                            f'<memory unit="b">{64 << 20}</memory>')
    for element in ("graphics", "disk", "serial", "console"):
        source = re.sub(rf"<{element} .*?</{element}>", "", source)
    with launcher_pod(nic, root, make_netns, tmp_path) as pod, \
            launcher_pod(nic, root, make_netns, tmp_path, pod="virt-launcher-other-q9z8v",
                         mac="02:00:00:00:00:21", container="c-other") as other:
        (queue,) = pod.leased
        (other_queue,) = other.leased
        domain_xml = sidecar_domain(pod, source.encode())
        assert b"-netdev" in domain_xml and b"virtio-net-pci" in domain_xml
        assert f'<memory unit="b">{64 << 20}</memory>'.encode() in domain_xml
        virsh = sid_libvirt.start(pod.netns, memlock=QEMU_UMEM)
        try:
            xml = virsh.dir / "domain.xml"
            xml.write_bytes(domain_xml)
            xml.chmod(0o644)
            virsh.send(f"define {xml}", f"start {DOMAIN} --paused")
            pid = virsh.qemu_pid(DOMAIN, timeout=600)
            deadline = time.monotonic() + 120
            while xsk.verdict(nic.name, queue, FRAME) != XDP_REDIRECT:
                assert Path(f"/proc/{pid}").exists(), f"QEMU exited:\n{virsh.output}"
                assert time.monotonic() < deadline, f"QEMU's socket never arrived:\n{virsh.output}"
                time.sleep(0.5)
            assert {q: w.index for q, w in xsk.wiring(nic.name, [queue]).items()} == {queue: 1}
            assert rx_rings(pid) == [RxRing(1, 0, 0)]
            creds = privileges(pid)
            assert (creds.uid, creds.gid, creds.groups) == (WORKLOAD_UID, WORKLOAD_GID, ())
            assert (creds.effective, creds.permitted) == (1 << CAP_NET_RAW, 1 << CAP_NET_RAW)

            send_on_rx_queue(nic, queue, (tagged(tag("v", queue, i)) for i in range(FRAMES)))
            send_on_rx_queue(nic, other_queue,
                             (tagged(tag("o", other_queue, i)) for i in range(FRAMES)))
            time.sleep(1)
            rings = rx_rings(pid)
            print(json.dumps({"libvirt": sid_libvirt.version(), "sent": FRAMES,
                              "queue": queue, "other pod's queue": other_queue,
                              "rings": [vars(r) for r in rings]}))
            # The kernel put every frame of the leased queue into QEMU's socket, none of
            # the other pod's (what QEMU took out of the ring for a paused guest is
            # printed above, not asserted: no guest reads it).
            assert [(r.queue, r.produced) for r in rings] == [(1, FRAMES)], virsh.output

            virsh.send(f"qemu-monitor-command {DOMAIN} --hmp 'info pci'",
                       f"destroy {DOMAIN}", f"undefine {DOMAIN}")
            rc = virsh.quit()
            out = virsh.output
        finally:
            virsh.close()
        assert rc == 0, out
        for said in (f"Domain '{DOMAIN}' defined", f"Domain '{DOMAIN}' started",
                     f"Domain '{DOMAIN}' destroyed"):
            assert said in out, out
        # QEMU realized the sidecar's virtio-net-pci (on the af-xdp netdev) at its slot.
        assert pci_devices(out)[(0, 0x18, 0)] == "netkit-fast-nic", out
        assert not Path(f"/proc/{pid}").exists()
        assert xsk.verdict(nic.name, queue, FRAME) == XDP_PASS
    assert leased_queues(nic) == {}
    assert xsk.wiring(nic.name) == {}
