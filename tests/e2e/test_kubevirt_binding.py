"""The KubeVirt path end to end in the VM, minus KubeVirt: ADD -> the lease file in the
launcher pod's hooks volume -> the sidecar's domain -> libvirt's QEMU command line ->
QEMU receives the leased queue's frames through the map in that volume.

The ADD runs through the executable with the VMI's MAC and the NAD of
docs/kubevirt.md (``xskMapVolume: hook-sidecar-sockets``, ``xskMapSubdir:
hook-sidecar-0``, ``xskMapMountPath: /var/run/kubevirt-hooks``), as Multus
would call it for a virt-launcher pod whose emptyDir the kubelet laid out
under a kubelet root of the test's own; no device-info, no annotation: the
plugin's lease file in ``hook-sidecar-0/`` (what KubeVirt mounts into hook
sidecar 0) is all the sidecar's OnDefineDomain decision
(``server.define_domain``) reads to rewrite a virt-launcher-shaped domain;
libvirt (the host's 9.0, embedded driver) turns it into QEMU's command line;
and the ``-netdev af-xdp`` argument libvirt wrote is what QEMU (the af-xdp
build, unprivileged as uid 107 with CAP_NET_RAW only) runs with, in a mount
namespace that has the node's bpffs unmounted and the whole volume at
``/var/run/kubevirt-hooks``, as the compute container mounts it. There
libvirt's ``-device`` is left out and the netdev is hubbed to the test's
socket (tests/e2e/consumers.py), so that the frames QEMU reads come out.

The second test: libvirt from sid (the ``libvirt`` root) defines and starts
the sidecar's whole domain, paused, with that QEMU as its emulator
(tests/e2e/sid_libvirt.py), in the same mount view: the q35 machine,
libvirt's devices and the sidecar's virtio-net-pci on its af-xdp netdev. A
paused guest's NIC reads nothing, so what reaches QEMU is counted in its
socket's RX ring (``consumers.rx_rings``).
"""

from __future__ import annotations

import collections
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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
    pod_view,
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
UID = "5f4b6a8e-8d2e-4a0c-9c57-0d1c2b3a4f5e"
FRAMES = 50
HOOKS = "/var/run/kubevirt-hooks"  # the hooks volume in the compute container (and sidecar)
DOMAIN = "default_vm-afxdp"  # shapes.domain_xml's <name>


def mounts_below(d: Path) -> list[str]:
    """Mount points below ``d`` (read back from /proc/self/mountinfo)."""
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(f"{d}/")]


@pytest.fixture
def kubelet(tmp_path: Path) -> Iterator[Path]:
    """A kubelet root of the test's own; a mount left below it by a failure is detached."""
    d = tmp_path / "kubelet"
    d.mkdir()
    yield d
    for point in reversed(mounts_below(d)):
        subprocess.run(["umount", "-l", point], check=False)


def hooks_volume(kubelet: Path) -> Path:
    """The launcher pod's hooks emptyDir as the kubelet makes it before the sandbox's ADD
    (0777); hook-sidecar-0/ does not exist yet (made when the sidecar starts)."""
    volume = kubelet / "pods" / UID / "volumes/kubernetes.io~empty-dir/hook-sidecar-sockets"
    volume.mkdir(parents=True)
    volume.chmod(0o777)
    return volume


def read_lease_file(sidecar_dir: Path) -> dict[str, Any]:
    """The lease the plugin left for sidecar 0, beside the pod's bpffs: root's, 0644."""
    assert sorted(p.name for p in sidecar_dir.iterdir()) == ["cni-netkit", "cni-netkit-net1.json"]
    st = (sidecar_dir / "cni-netkit-net1.json").stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o644)
    lease: dict[str, Any] = json.loads((sidecar_dir / "cni-netkit-net1.json").read_text())["lease"]
    return lease


def test_the_sidecars_domain_through_libvirt_gives_qemu_the_leased_queue(
    nic: Nic, root: Path, make_netns: Any, tmp_path: Path, kubelet: Path
) -> None:
    # Cold invocations only (the plugin in the executable, the invocation's
    # CNI_NETKIT_MASTERS): no session agent to wait for.
    runtime = Runtime(state_dir=tmp_path / "state", cni_path=cni_plugins_dir() or "")
    xsk.ensure_program(nic.name, bpf_object(), root=root)
    loopback(nic)
    volume = hooks_volume(kubelet)
    conf = runtime.conf(nic.name, queues="1-4", queuesPerAttachment=1,
                        xskMapOwner=WORKLOAD_OWNER, xskMapVolume="hook-sidecar-sockets",
                        xskMapSubdir="hook-sidecar-0", xskMapMountPath=HOOKS,
                        kubeletRoot=str(kubelet), runtimeConfig={"mac": MAC})
    env = {"CNI_ARGS": f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={POD};K8S_POD_UID={UID}",
           xsk.ROOT_ENV: str(xsk.bpf_root()), "CNI_NETKIT_MASTERS": f"{nic.name}=1-4",
           "CNI_NETKIT_KUBELET_ROOTS": str(kubelet)}
    netns = make_netns()
    out = runtime("ADD", conf, container_id="c-vm", netns=netns, env=env)
    assert out.code == 0, out.stdout + out.stderr
    result = out.json
    leased = [q["masterQueue"] for q in result["netkit"]["queues"]]
    sidecar_dir = volume / "hook-sidecar-0"  # sidecar 0's /var/run/kubevirt-hooks
    try:
        assert read_lease_file(sidecar_dir)["qemuNetdev"] == result["netkit"]["qemuNetdev"]
        assert result["netkit"]["mapPath"] == f"{HOOKS}/hook-sidecar-0/cni-netkit/afxdp:c-vm:net1"
        # The sidecar reads nothing else: no network-info, no annotation, no --map-dir.
        domain_xml = server.define_domain(
            shapes.domain_xml(machine="q35", virt_type="qemu", primary=False),
            shapes.vmi_json({"fast": MAC}),
            server.Settings(network_info=None, leases=None, leases_dir=str(sidecar_dir),
                            wait=5))
        argv = qemu_argv(domain_xml)
        prefix = "-netdev af-xdp,id=netkit-fast,"
        (netdev,) = [a for a in argv if a.startswith("-netdev af-xdp,")]
        assert netdev == prefix + result["netkit"]["qemuNetdev"]
        assert any(a.startswith(f"-device virtio-net-pci,netdev=netkit-fast,id=netkit-fast-nic,"
                                f"mac={MAC},bus=pcie.0,addr=0x18") for a in argv), argv

        # QEMU opens the map through the volume only, as the compute container sees it.
        qemu = start_qemu(netns, netdev.removeprefix(prefix), memlock=QEMU_UMEM,
                          view=pod_view(volume, HOOKS))
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
    finally:
        done = runtime("DEL", {**conf, "prevResult": result}, container_id="c-vm",
                       netns=netns, env=env)
        assert (done.code, done.stdout) == (0, ""), done.stderr
    assert mounts_below(kubelet) == [] and list(volume.iterdir()) == []
    assert not (root / "pods").exists()
    assert netkit_links(netns) == []
    assert leased_queues(nic) == {}
    assert xsk.wiring(nic.name) == {}


def test_sid_libvirt_defines_and_starts_the_sidecars_domain_on_the_leased_queue(
    nic: Nic, root: Path, make_netns: Any, tmp_path: Path, kubelet: Path
) -> None:
    """``virsh define`` + ``start --paused`` of the sidecar's domain under sid's libvirt,
    as the pod's workload with the compute container's mounts; QEMU's socket in the map
    at 1, the leased queue's frames in its RX ring and none of another pod's queue;
    ``virsh destroy``, DEL, nothing left.

    The domain is virt-launcher's shape (``type="qemu"``, q35) without its disk,
    serial, console and VNC, whose files and sockets live in the launcher pod's
    directories (as in tests/kubevirt/test_libvirt.py), and with 64 MiB of guest
    memory for its 1 GiB: QEMU reserves it at start, and the VM has 1 GiB in all."""
    runtime = Runtime(state_dir=tmp_path / "state", cni_path=cni_plugins_dir() or "")
    xsk.ensure_program(nic.name, bpf_object(), root=root)
    loopback(nic)
    volume = hooks_volume(kubelet)
    conf = runtime.conf(nic.name, queues="1-4", queuesPerAttachment=1,
                        xskMapOwner=WORKLOAD_OWNER, xskMapVolume="hook-sidecar-sockets",
                        xskMapSubdir="hook-sidecar-0", xskMapMountPath=HOOKS,
                        kubeletRoot=str(kubelet), runtimeConfig={"mac": MAC})
    env = {"CNI_ARGS": f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={POD};K8S_POD_UID={UID}",
           xsk.ROOT_ENV: str(xsk.bpf_root()), "CNI_NETKIT_MASTERS": f"{nic.name}=1-4",
           "CNI_NETKIT_KUBELET_ROOTS": str(kubelet)}
    # Another pod on the same master, its queue leased: none of its frames may reach QEMU.
    other_conf = runtime.conf(nic.name, queues="1-4", queuesPerAttachment=1,
                              runtimeConfig={"mac": "02:00:00:00:00:21"})
    other_env = {"CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=other;K8S_POD_UID=uid-o",
                 xsk.ROOT_ENV: str(xsk.bpf_root()), "CNI_NETKIT_MASTERS": f"{nic.name}=1-4"}
    source = shapes.domain_xml(machine="q35", virt_type="qemu", primary=False).decode()
    for element in ("graphics", "disk", "serial", "console"):
        source = re.sub(rf"<{element} .*?</{element}>", "", source)
    source = source.replace('<memory unit="b">1073741824</memory>',
                            f'<memory unit="b">{64 << 20}</memory>')
    netns, other_netns = make_netns(), make_netns()
    out = runtime("ADD", conf, container_id="c-vm", netns=netns, env=env)
    assert out.code == 0, out.stdout + out.stderr
    result = out.json
    other = runtime("ADD", other_conf, container_id="c-other", netns=other_netns, env=other_env)
    assert other.code == 0, other.stdout + other.stderr
    try:
        (queue,) = [q["masterQueue"] for q in result["netkit"]["queues"]]
        (other_queue,) = [q["masterQueue"] for q in other.json["netkit"]["queues"]]
        domain_xml = server.define_domain(
            source.encode(), shapes.vmi_json({"fast": MAC}),
            server.Settings(network_info=None, leases=None,
                            leases_dir=str(volume / "hook-sidecar-0"), wait=5))
        assert b"-netdev" in domain_xml and b"virtio-net-pci" in domain_xml
        assert f'<memory unit="b">{64 << 20}</memory>'.encode() in domain_xml
        libvirt_runs_the_domain(nic, netns, volume, domain_xml, queue=queue,
                                other_queue=other_queue)
    finally:
        for c, cf, ns, e, r in (("c-vm", conf, netns, env, result),
                                ("c-other", other_conf, other_netns, other_env, other.json)):
            done = runtime("DEL", {**cf, "prevResult": r}, container_id=c, netns=ns, env=e)
            assert (done.code, done.stdout) == (0, ""), done.stderr
    assert mounts_below(kubelet) == [] and list(volume.iterdir()) == []
    assert not (root / "pods").exists()
    assert netkit_links(netns) == [] and netkit_links(other_netns) == []
    assert leased_queues(nic) == {}
    assert xsk.wiring(nic.name) == {}


def libvirt_runs_the_domain(nic: Nic, netns: str, volume: Path, domain_xml: bytes, *,
                            queue: int, other_queue: int) -> None:
    """sid's libvirt defines and starts ``domain_xml`` paused; what the kernel and QEMU did,
    read back; then destroy. ``queue`` is the domain's leased queue, ``other_queue``
    another pod's."""
    # libvirt, and the QEMU it starts, see the volume as the compute container does.
    virsh = sid_libvirt.start(netns, memlock=QEMU_UMEM, view=pod_view(volume, HOOKS))
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
        said = virsh.output
    finally:
        virsh.close()
    assert rc == 0, said
    for line in (f"Domain '{DOMAIN}' defined", f"Domain '{DOMAIN}' started",
                 f"Domain '{DOMAIN}' destroyed"):
        assert line in said, said
    # QEMU realized the sidecar's virtio-net-pci (on the af-xdp netdev) at its slot.
    assert pci_devices(said)[(0, 0x18, 0)] == "netkit-fast-nic", said
    assert not Path(f"/proc/{pid}").exists()
    assert xsk.verdict(nic.name, queue, FRAME) == XDP_PASS
