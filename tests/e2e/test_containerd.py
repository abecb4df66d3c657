"""containerd's CRI drives the plugin: kubelet's sandbox calls, made by our own CRI client.

Bookworm's containerd 1.6.20 and runc, unpacked into the cache by
scripts/fetch-containerd (scripts/vm setup runs it), run in the VM with a
private root, state and socket; the CRI plugin's CNI config is this test's.
The pause image is built here (busybox, as an OCI archive) and imported with
``ctr``: nothing is pulled. ``tests/e2e/cri`` is the CRI client (gRPC). The
plugin is served by the session's node agent (``warm_agent``), as on a
Kubernetes node. What it did is read back from the kernel (queue-get on the
netdevsim master, link dumps of the sandbox's netns), from host-local's files
and from our attachment records, alone and chained after ptp in one conflist.
The module adds ~85 s to the VM suite (both containerds started once each).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cni_netkit.config import parse_queue_pool
from cni_netkit.plugin import allowlist
from cni_netkit.plugin.state import StateStore
from tests.e2e.conftest import (
    NETKIT,
    AgentProc,
    Nic,
    cni_plugins_dir,
    leased_queues,
    make_nic,
    netkit_links,
)

pytestmark = pytest.mark.kernel

CACHE = Path(os.environ.get("CNI_NETKIT_CACHE", "/var/cache/cni-netkit"))
PAUSE = "localhost/cni-netkit/pause:1"


def containerd_root(dist: str) -> Path:
    """Where scripts/fetch-containerd unpacked ``dist``'s containerd (/run/host/... in the VM)."""
    for base in (Path("/run/host") / CACHE.relative_to("/"), CACHE):
        root = base / "containerd" / dist
        if (root / "usr" / "bin" / "containerd").exists():
            return root
    pytest.fail(f"{dist}'s containerd missing: scripts/vm setup runs scripts/fetch-containerd")


def _blob(blobs: dict[str, bytes], data: bytes) -> dict[str, Any]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"digest": digest, "size": len(data)}


def pause_archive(path: Path, name: str) -> None:
    """An OCI image archive: busybox sleeping forever, named ``name`` for ``ctr images import``."""
    busybox = shutil.which("busybox")
    assert busybox, "busybox missing: scripts/vm setup installs busybox-static"
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        tar.add(busybox, arcname="bin/busybox")
    layer = raw.getvalue()
    blobs: dict[str, bytes] = {}
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/bin/busybox", "sleep", "2147483647"]},
        "rootfs": {"type": "layers",
                   "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
    }
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   **_blob(blobs, json.dumps(config).encode())},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    **_blob(blobs, gzip.compress(layer))}],
    }
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        **_blob(blobs, json.dumps(manifest).encode()),
        "annotations": {"io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]},
    }]}
    files = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}',
             "index.json": json.dumps(index).encode(),
             **{f"blobs/sha256/{d.split(':')[1]}": b for d, b in blobs.items()}}
    with tarfile.open(path, "w") as tar:
        for arcname, data in files.items():
            info = tarfile.TarInfo(arcname)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@dataclass
class Containerd:
    proc: subprocess.Popen[bytes]
    socket: Path
    netd: Path
    state: Path
    log: Path

    def network(self, conflist: dict[str, Any]) -> None:
        """Make ``conflist`` the CRI's default (only) network."""
        for old in self.netd.iterdir():
            old.unlink()
        tmp = self.netd / ".tmp"
        tmp.write_text(json.dumps(conflist))
        tmp.rename(self.netd / "10-netkit.conflist")


# bookworm: 1.6.20 with runc 1.1.5; sid: 2.1 (CNI STATUS from the CRI Status call),
# with bookworm's runc (sid's needs a newer glibc than the shared root has).
@pytest.fixture(scope="module", params=["bookworm", "sid"])
def containerd(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
               warm_agent: AgentProc) -> Iterator[Containerd]:
    if cni_plugins_dir() is None:
        pytest.fail("host-local missing: scripts/vm setup extracts containernetworking-plugins")
    root = containerd_root(request.param)
    runc = containerd_root("bookworm") / "usr" / "sbin"
    if not os.path.ismount("/sys/fs/cgroup"):  # the guest boots without it; runc needs it
        subprocess.run(["mount", "-t", "cgroup2", "none", "/sys/fs/cgroup"], check=True)
    w = tmp_path_factory.mktemp("containerd")
    bins, netd, state = w / "cni-bin", w / "net.d", w / "state-netkit"
    bins.mkdir()
    netd.mkdir()
    (bins / "netkit").symlink_to(NETKIT)
    for plugin in ("host-local", "loopback", "ptp"):
        (bins / plugin).symlink_to(Path(str(cni_plugins_dir())) / plugin)
    sock = w / "containerd.sock"
    (w / "config.toml").write_text(f"""version = 2
root = "{w}/root"
state = "{w}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{sock}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bins}"
    conf_dir = "{netd}"
""")
    env = {**os.environ, **warm_agent.env,
           "PATH": f"{root}/usr/bin:{runc}:{os.environ['PATH']}",
           "CNI_NETKIT_STATE_DIRS": str(state)}
    log = w / "containerd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([f"{root}/usr/bin/containerd", "--config", str(w / "config.toml")],
                                env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + 180
    while not sock.exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "containerd did not start: " + log.read_text()[-2000:]
        time.sleep(0.2)
    pause_archive(w / "pause.tar", PAUSE)
    imported = subprocess.run(
        [f"{root}/usr/bin/ctr", "--address", str(sock), "-n", "k8s.io", "images", "import",
         # 2.x imports through its transfer service, which has no unpack platform
         # for the native snapshotter unless configured: import client-side.
         *(["--local"] if request.param == "sid" else []),
         "--snapshotter", "native", str(w / "pause.tar")],
        env=env, check=False, capture_output=True, text=True, timeout=300)
    assert imported.returncode == 0, imported.stderr + log.read_text()[-3000:]
    yield Containerd(proc, sock, netd, state, log)
    proc.terminate()
    proc.wait(60)


@pytest.fixture
def cri(containerd: Containerd) -> Iterator[Any]:
    from tests.e2e.cri.client import CRI  # noqa: PLC0415 - grpc only where a test needs it

    c = CRI(str(containerd.socket))
    yield c
    c.close()


@pytest.fixture
def nic() -> Iterator[Nic]:
    n = make_nic(4)
    yield n
    if Path(f"/sys/bus/netdevsim/devices/netdevsim{n.dev_id}").exists():
        n.remove()


def pair_network(nic: Nic, containerd: Containerd, data: Path, version: str = "1.0.0",
                 queues: str = "1-2") -> dict[str, Any]:
    ipam = {"type": "host-local", "ranges": [[{"subnet": "10.88.9.0/24"}]], "dataDir": str(data)}
    # The node's pools, declared where the plugin reads them on every ADD (closed by
    # default), as the agent writes them from its ConfigMap.
    allowlist.write(containerd.state, [allowlist.DeclaredPool(
        nic.name, frozenset(parse_queue_pool(queues)), nic.ifindex)])
    return {"cniVersion": version, "name": "netkit-default", "plugins": [
        {"type": "netkit", "master": nic.name, "queues": queues, "pairing": "pair",
         "mode": "l3", "stateDir": str(containerd.state), "ipam": ipam}]}


def run_sandbox(cri: Any, containerd: Containerd, name: str, uid: str) -> str:
    deadline = time.monotonic() + 60
    while True:  # the CRI plugin reloads its CNI config on a file event, asynchronously
        try:
            return str(cri.run_pod_sandbox(name, "rtns", uid))
        except Exception as e:
            if "cni config" not in str(e).lower() or time.monotonic() > deadline:
                raise AssertionError(f"{e}\n{containerd.log.read_text()[-3000:]}") from e
            time.sleep(1)


def test_run_stop_remove_pod_sandbox_as_default_network(
    cri: Any, containerd: Containerd, nic: Nic, tmp_path: Path
) -> None:
    data = tmp_path / "ipam"
    containerd.network(pair_network(nic, containerd, data))
    sid = run_sandbox(cri, containerd, "p1", "uid-p1")

    (att,) = list(StateStore(str(containerd.state)))
    # kubelet's K8S_POD_* CNI_ARGS reached us, and host-local (which got them with
    # containerd's IgnoreUnknown=1) allocated the pod's address.
    assert (att.container_id, att.ifname) == (sid, "eth0")
    assert (att.pod_namespace, att.pod_name, att.extra.get("pod_uid")) == ("rtns", "p1", "uid-p1")
    status = cri.pod_sandbox_status(sid).status
    assert status.network.ip.startswith("10.88.9.")
    assert (data / "netkit-default" / status.network.ip).read_text().startswith(sid)
    (pod,) = netkit_links(att.netns)
    assert pod.name == "eth0"
    assert {lease["ifindex"] for lease in leased_queues(nic).values()} == {pod.index}

    cri.stop_pod_sandbox(sid)  # DEL
    assert leased_queues(nic) == {}
    assert not (data / "netkit-default" / status.network.ip).exists()
    assert [link.name for link in netkit_links(None)] == []
    cri.remove_pod_sandbox(sid)
    assert list(StateStore(str(containerd.state))) == []


def test_chained_after_ptp_our_netkit_is_added_and_the_primary_keeps_the_pod_ip(
    cri: Any, containerd: Containerd, nic: Nic, tmp_path: Path
) -> None:
    """One conflist [ptp + host-local, netkit]: every plugin gets CNI_IFNAME eth0.

    ptp makes eth0 and the pod's address; ours, single mode, is named by
    ``podIfname`` and appended to ptp's result; Stop (DEL) removes ours and
    ptp's, the record is keyed by (network, sandbox, eth0) throughout.
    """
    data = tmp_path / "ipam"
    # The node's pools, declared where the plugin reads them (closed by default), as
    # the agent writes them: for this test's NIC (an earlier test's file names another).
    allowlist.write(containerd.state, [allowlist.DeclaredPool(
        nic.name, frozenset(parse_queue_pool("1-2")), nic.ifindex)])
    containerd.network({"cniVersion": "1.0.0", "name": "chained", "plugins": [
        {"type": "ptp", "ipam": {"type": "host-local", "dataDir": str(data),
                                 "ranges": [[{"subnet": "10.88.10.0/24"}]]}},
        {"type": "netkit", "master": nic.name, "queues": "1-2", "podIfname": "net1",
         "stateDir": str(containerd.state)},
    ]})
    sid = run_sandbox(cri, containerd, "p2", "uid-p2")

    (att,) = list(StateStore(str(containerd.state)))
    assert (att.container_id, att.ifname, att.device) == (sid, "eth0", "net1")
    ip = cri.pod_sandbox_status(sid).status.network.ip
    assert ip.startswith("10.88.10."), ip  # ptp's address, the pod's IP as CRI reports it
    (pod,) = netkit_links(att.netns)
    assert pod.name == "net1"
    assert {lease["ifindex"] for lease in leased_queues(nic).values()} == {pod.index}
    eth0 = json.loads(subprocess.run(
        ["nsenter", f"--net={att.netns}", "ip", "-j", "address", "show", "dev", "eth0"],
        check=True, capture_output=True, text=True).stdout)
    assert [a["local"] for a in eth0[0]["addr_info"] if a["family"] == "inet"] == [ip]

    cri.stop_pod_sandbox(sid)  # DEL down the chain: ours, then ptp's
    assert leased_queues(nic) == {}
    assert [link.name for link in netkit_links(None)] == []
    assert not (data / "chained" / ip).exists()
    cri.remove_pod_sandbox(sid)
    assert list(StateStore(str(containerd.state))) == []


@pytest.mark.parametrize("containerd", ["sid"], indirect=True)
def test_an_exhausted_pool_keeps_the_node_network_ready(
    cri: Any, containerd: Containerd, nic: Nic, tmp_path: Path
) -> None:
    """containerd 2.1 calls our STATUS from the CRI Status call (cniVersion 1.1.0 lists).

    The pool's one queue leased: NetworkReady stays true. The control: with the
    master gone STATUS fails, and the same call reports NetworkReady=false with
    our message, so STATUS really is on this path.
    """
    containerd.network(pair_network(nic, containerd, tmp_path / "ipam", "1.1.0", queues="1"))
    assert wait_network_ready(cri, want=True)[0]
    sid = run_sandbox(cri, containerd, "p1", "uid-p1")
    assert len(leased_queues(nic)) == 1  # the whole pool
    ready, message = cri.network_ready()
    assert ready, message
    cri.stop_pod_sandbox(sid)
    cri.remove_pod_sandbox(sid)

    nic.remove()
    ready, message = wait_network_ready(cri, want=False)
    assert not ready
    assert f"master {nic.name} not found" in message, message


def wait_network_ready(cri: Any, *, want: bool) -> tuple[bool, str]:
    """NetworkReady once it is ``want`` (the CRI reloads its CNI config asynchronously)."""
    deadline = time.monotonic() + 60
    while True:
        ready, message = cri.network_ready()
        if ready == want or time.monotonic() > deadline:
            return ready, message
        time.sleep(1)
