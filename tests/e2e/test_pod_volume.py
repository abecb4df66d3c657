"""The XSK map reaches its pod through the pod's own emptyDir: no hostPath, no CAP_BPF.

With ``xskMapVolume`` ADD mounts a fresh bpffs instance on the pod's emptyDir
of that name, found by ``K8S_POD_UID`` under the kubelet's root (a temporary
stand-in laid out as the kubelet lays it out), and pins the attachment's map
there, with its lease file beside; DEL unpins it, unmounts and removes the
file. An unprivileged QEMU, in a mount namespace
where the node's bpffs is gone and only the volume is bind-mounted (as the
runtime mounts a container's volume), opens the map at the result's
``mapPath`` and receives exactly its queue's frames. Mounts are read back
from ``/proc/self/mountinfo`` and maps by id with bpftool.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cni_netkit.kernel import xsk
from tests.e2e.conftest import Nic, Runtime, leased_queues, netkit_links
from tests.e2e.consumers import (
    QEMU_UMEM,
    WORKLOAD_GID,
    WORKLOAD_OWNER,
    WORKLOAD_UID,
    loopback,
    pod_view,
    send_on_rx_queue,
    start_qemu,
    tag,
    tagged,
    wait_for_sockets,
)
from tests.kernel.xsk_support import FRAME, XDP_PASS, bpf_object, bpftool

pytestmark = pytest.mark.kernel

VOLUME = "netkit"
MOUNT_PATH = "/run/netkit"  # xskMapMountPath's default
POD_BPFFS = "cni-netkit"  # the directory of the volume the plugin mounts its bpffs on
LEASE_FILE = "cni-netkit-net1.json"  # the attachment's lease file beside it
FRAMES_PER_QUEUE = 50


@pytest.fixture
def steered(nic: Nic, root: Path) -> Nic:
    xsk.ensure_program(nic.name, bpf_object(), root=root)
    loopback(nic)
    return nic


@pytest.fixture
def kubelet(tmp_path: Path) -> Iterator[Path]:
    """A kubelet root of our own (what ``kubeletRoot`` names); mounts left under it are
    detached afterwards so that a failing test does not leak them into the next."""
    d = tmp_path / "kubelet"
    d.mkdir()
    yield d
    for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
        point = line.split()[4]
        if point.startswith(f"{d}/"):
            os.system(f"umount -l {point}")  # noqa: S605 - a test's own temp path


def empty_dir(kubelet: Path, uid: str, name: str = VOLUME) -> Path:
    """The pod's emptyDir as the kubelet makes it before the sandbox's CNI ADD (0777)."""
    d = kubelet / "pods" / uid / "volumes" / "kubernetes.io~empty-dir" / name
    d.mkdir(parents=True)
    d.chmod(0o777)
    return d


def mounts() -> dict[str, str]:
    """Mount point -> file system type, topmost mount (read back independently)."""
    out: dict[str, str] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        out[fields[4]] = fields[fields.index("-") + 1]
    return out


def map_ids_below(d: Path) -> dict[str, int]:
    """Every file below ``d`` -> the id of the map pinned there (bpftool)."""
    return {str(p.relative_to(d)): bpftool("map", "show", "pinned", str(p))["id"]
            for p in d.rglob("*") if p.is_file()}


def pod_env(pod: str, kubelet: Path, nic: Nic) -> dict[str, str]:
    return {"CNI_ARGS": f"K8S_POD_NAMESPACE=vms;K8S_POD_NAME={pod};K8S_POD_UID=uid-{pod}",
            "CNI_NETKIT_KUBELET_ROOTS": str(kubelet), "CNI_NETKIT_MASTERS": f"{nic.name}=0-15",
            xsk.ROOT_ENV: str(xsk.bpf_root())}


def conf_for(runtime: Runtime, nic: Nic, kubelet: Path) -> dict[str, Any]:
    return runtime.conf(nic.name, queues="1-4", xskMapOwner=WORKLOAD_OWNER,
                        xskMapVolume=VOLUME, kubeletRoot=str(kubelet))


def assert_delivered(nk: dict[str, Any], volume: Path, key: str, map_id: int,
                     others: set[int]) -> None:
    """The result names the map as the pod's container sees it (the volume's mountPath);
    the volume holds a bpffs with that map and nothing else, the workload's to open."""
    seen = f"{MOUNT_PATH}/{POD_BPFFS}/{key}"
    assert nk["mapPath"] == seen
    assert f"map-path={seen}," in nk["qemuNetdev"] and f"dp_path={seen}," in nk["dpdkVdev"]
    bpf = volume / POD_BPFFS
    assert mounts()[str(bpf)] == "bpf"
    assert sorted(p.name for p in volume.iterdir()) == [POD_BPFFS, LEASE_FILE]
    # Beside the bpffs, the lease as the agent's annotation has it (plugin.leasefile).
    lease = volume / LEASE_FILE
    assert (lease.stat().st_uid, lease.stat().st_mode & 0o777) == (0, 0o644)
    doc = json.loads(lease.read_text())
    assert doc["format"] == "cni-netkit.dev/lease/v1"
    assert (doc["lease"]["mapPath"], doc["lease"]["qemuNetdev"]) == (seen, nk["qemuNetdev"])
    held = map_ids_below(bpf)
    assert held == {key: map_id} and not others & set(held.values())
    st = (bpf / key).stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (WORKLOAD_UID, WORKLOAD_GID, 0o600)
    assert (bpf.stat().st_uid, bpf.stat().st_mode & 0o777) == (0, 0o755)


def test_each_pods_map_is_delivered_into_its_own_volume_and_carries_its_frames(
    steered: Nic, root: Path, make_netns: Any, runtime: Runtime, kubelet: Path
) -> None:
    conf = conf_for(runtime, steered, kubelet)
    pods = {pod: make_netns() for pod in ("vm-a", "vm-b")}
    volumes = {pod: empty_dir(kubelet, f"uid-{pod}") for pod in pods}
    results = {}
    for pod, netns in pods.items():
        out = runtime("ADD", conf, container_id=f"c-{pod}", netns=netns,
                      env=pod_env(pod, kubelet, steered))
        assert out.code == 0, out.stdout + out.stderr
        results[pod] = out.json["netkit"]
    key = {pod: f"afxdp:c-{pod}:net1" for pod in pods}
    host_pin = {pod: root / "pods" / "vms" / pod / key[pod] for pod in pods}
    map_id = {pod: bpftool("map", "show", "pinned", str(host_pin[pod]))["id"] for pod in pods}
    master_ids = {bpftool("map", "show", "pinned", str(xsk.master_dir(steered.name, root) / m))
                  ["id"] for m in (xsk.OUTER_MAP, xsk.SLOT_MAP)}

    for pod, nk in results.items():
        others = {map_id[p] for p in pods if p != pod} | master_ids
        assert_delivered(nk, volumes[pod], key[pod], map_id[pod], others)
    out = runtime("CHECK", {**conf, "prevResult": {"cniVersion": "1.1.0"}},
                  container_id="c-vm-a", netns=pods["vm-a"], env=pod_env("vm-a", kubelet, steered))
    assert out.code == 0, out.stdout + out.stderr  # CHECK reads the pod's pin back too
    # Each pod's bpffs is an instance of its own, neither the node's nor another pod's.
    assert len({root.stat().st_dev} | {(v / POD_BPFFS).stat().st_dev
                                       for v in volumes.values()}) == 3

    mine = [q["masterQueue"] for q in results["vm-a"]["queues"]]
    theirs = [q["masterQueue"] for q in results["vm-b"]["queues"]]
    qemu = start_qemu(pods["vm-a"], results["vm-a"]["qemuNetdev"], memlock=QEMU_UMEM,
                      view=pod_view(volumes["vm-a"], MOUNT_PATH))
    try:
        wait_for_sockets(qemu, steered.name, mine)
        sent: collections.Counter[bytes] = collections.Counter()
        for q in mine + theirs:
            tags = [tag("a" if q in mine else "b", q, i) for i in range(FRAMES_PER_QUEUE)]
            send_on_rx_queue(steered, q, (tagged(t) for t in tags))
            if q in mine:
                sent.update(tags)
        got = collections.Counter(qemu.sink.tags(timeout=5.0))
        print(json.dumps({"sent": {str(q): FRAMES_PER_QUEUE for q in mine + theirs},
                          "vm-a received": len(list(got.elements()))}))
        assert got == sent, qemu.output
    finally:
        rc = qemu.stop()
    assert rc == 0, qemu.output
    assert {xsk.verdict(steered.name, q, FRAME) for q in mine} == {XDP_PASS}

    for pod, netns in pods.items():
        out = runtime("DEL", {**conf, "prevResult": {"cniVersion": "1.1.0"}},
                      container_id=f"c-{pod}", netns=netns, env=pod_env(pod, kubelet, steered))
        assert (out.code, out.stdout) == (0, ""), out.stderr
        assert f"{volumes[pod]}/{POD_BPFFS}" not in mounts()
        assert list(volumes[pod].iterdir()) == []  # as the kubelet made it: it can remove it
        assert netkit_links(netns) == []
    out = runtime("DEL", conf, container_id="c-vm-a", netns=pods["vm-a"],
                  env=pod_env("vm-a", kubelet, steered))
    assert (out.code, out.stdout) == (0, ""), out.stderr  # again: idempotent
    assert leased_queues(steered) == {} and xsk.wiring(steered.name) == {}
    assert not (root / "pods").exists()


def test_a_pod_without_the_volume_is_refused_and_nothing_is_left(
    steered: Nic, root: Path, make_netns: Any, runtime: Runtime, kubelet: Path
) -> None:
    conf = conf_for(runtime, steered, kubelet)
    netns = make_netns()
    env = pod_env("vm-a", kubelet, steered)
    out = runtime("ADD", conf, container_id="c-vm-a", netns=netns, env=env)
    err = out.json
    assert out.code != 0 and err["code"] == 7, out.stdout + out.stderr
    assert "has no emptyDir volume 'netkit'" in err["msg"], err
    assert "kubernetes.io~empty-dir/netkit is missing" in err["details"], err
    assert leased_queues(steered) == {} and xsk.wiring(steered.name) == {}
    assert netkit_links(netns) == [] and not (root / "pods").exists()
    out = runtime("DEL", conf, container_id="c-vm-a", netns=netns, env=env)
    assert (out.code, out.stdout) == (0, ""), out.stderr


def test_gc_unmounts_the_volume_of_a_pod_the_runtime_no_longer_knows(
    steered: Nic, root: Path, make_netns: Any, runtime: Runtime, kubelet: Path
) -> None:
    conf = conf_for(runtime, steered, kubelet)
    netns = make_netns()
    volume = empty_dir(kubelet, "uid-vm-a")
    env = pod_env("vm-a", kubelet, steered)
    out = runtime("ADD", conf, container_id="c-vm-a", netns=netns, env=env)
    assert out.code == 0, out.stdout + out.stderr
    # The record is lost (a state dir restored from before): only the pins say whose.
    records = list((runtime.state_dir / "attachments").iterdir())
    assert len(records) == 1
    records[0].unlink()
    gc_env = {k: v for k, v in env.items() if k != "CNI_ARGS"}
    out = runtime("GC", {**conf, "cni.dev/valid-attachments": []}, env=gc_env)
    assert (out.code, out.stdout) == (0, ""), out.stdout + out.stderr
    assert f"{volume}/{POD_BPFFS}" not in mounts() and list(volume.iterdir()) == []
    assert xsk.wiring(steered.name) == {} and leased_queues(steered) == {}
    assert not (root / "pods").exists()
