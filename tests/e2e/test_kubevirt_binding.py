"""The KubeVirt path end to end in the VM, minus KubeVirt: ADD -> device-info -> the
sidecar's domain -> libvirt's QEMU command line -> QEMU receives the leased queue's frames.

The ADD runs through the executable with the VMI's MAC and a CNIDeviceInfoFile,
as Multus would call it for a virt-launcher pod; the network-info document
is the one KubeVirt would mount if it kept our device-info's ``netkit`` key
(docs/kubevirt.md); the sidecar's OnDefineDomain decision
(``server.define_domain``) rewrites a virt-launcher-shaped domain; libvirt
(the host's 9.0, embedded driver) turns it into QEMU's command line; and the
``-netdev af-xdp`` argument libvirt wrote is what QEMU (the af-xdp build,
unprivileged as uid 107 with CAP_NET_RAW only) runs with. That QEMU has no
q35 or virtio-net-pci, so libvirt's ``-device`` is left out and the netdev
is hubbed to the test's socket (tests/e2e/consumers.py).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import pytest

from cni_netkit.config import DEVICE_INFO_DIRS_ENV
from cni_netkit.kernel import xsk
from cni_netkit.kubevirt import server
from tests.e2e.conftest import Nic, Runtime, cni_plugins_dir, leased_queues, netkit_links
from tests.e2e.consumers import (
    QEMU_UMEM,
    WORKLOAD_OWNER,
    loopback,
    send_on_rx_queue,
    start_qemu,
    tag,
    tagged,
    wait_for_sockets,
)
from tests.kernel.xsk_support import FRAME, XDP_PASS, bpf_object
from tests.kubevirt import shapes
from tests.kubevirt.libvirt import qemu_argv

pytestmark = pytest.mark.kernel

MAC = "02:00:00:00:00:20"
POD = "virt-launcher-vm-afxdp-x7k2p"
FRAMES = 50


def test_the_sidecars_domain_through_libvirt_gives_qemu_the_leased_queue(
    nic: Nic, root: Path, make_netns: Any, tmp_path: Path
) -> None:
    # Cold invocations only (the plugin in the executable, the invocation's
    # CNI_NETKIT_MASTERS): no session agent to wait for.
    runtime = Runtime(state_dir=tmp_path / "state", cni_path=cni_plugins_dir() or "")
    xsk.ensure_program(nic.name, bpf_object(), root=root)
    loopback(nic)
    info_dir = tmp_path / "device-info"
    info_dir.mkdir()
    device_info = info_dir / "fast.json"
    conf = runtime.conf(nic.name, queues="1-4", queuesPerAttachment=1,
                        xskMapOwner=WORKLOAD_OWNER,
                        runtimeConfig={"mac": MAC, "CNIDeviceInfoFile": str(device_info)})
    env = {"CNI_ARGS": f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={POD};K8S_POD_UID=uid-1",
           xsk.ROOT_ENV: str(xsk.bpf_root()), "CNI_NETKIT_MASTERS": f"{nic.name}=1-4",
           DEVICE_INFO_DIRS_ENV: str(info_dir)}
    netns = make_netns()
    out = runtime("ADD", conf, container_id="c-vm", netns=netns, env=env)
    assert out.code == 0, out.stdout + out.stderr
    result = out.json
    leased = [q["masterQueue"] for q in result["netkit"]["queues"]]
    try:
        network_info = tmp_path / "network-info"
        network_info.write_text(json.dumps({"interfaces": [
            {"network": "fast", "deviceInfo": json.loads(device_info.read_text())}]}))
        domain_xml = server.define_domain(
            shapes.domain_xml(machine="q35", virt_type="qemu", primary=False),
            shapes.vmi_json({"fast": MAC}),
            server.Settings(network_info=str(network_info), leases=None, wait=5))
        argv = qemu_argv(domain_xml)
        prefix = "-netdev af-xdp,id=netkit-fast,"
        (netdev,) = [a for a in argv if a.startswith("-netdev af-xdp,")]
        assert netdev == prefix + result["netkit"]["qemuNetdev"]
        assert any(a.startswith(f"-device virtio-net-pci,netdev=netkit-fast,id=netkit-fast-nic,"
                                f"mac={MAC},bus=pcie.0,addr=0x18") for a in argv), argv

        qemu = start_qemu(netns, netdev.removeprefix(prefix), memlock=QEMU_UMEM)
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
    assert not Path(result["netkit"]["mapPath"]).exists()
    assert not device_info.exists()
    assert netkit_links(netns) == []
    assert leased_queues(nic) == {}
    assert xsk.wiring(nic.name) == {}
