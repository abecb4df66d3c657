"""podman (bookworm's 4.3.1, CNI backend) drives the plugin: a real runtime, not our harness.

Root podman in the VM with ``network_backend = "cni"``, our own containers.conf
and storage (vfs under the guest's tmpfs) and a netkit conflist per network;
each container is ``podman run --rootfs`` of a tiny busybox root built here.
There is no node agent on a podman host, so every request runs cold in the
executable, as it would there.  What the plugin did is read back from the
kernel (queue-get on the netdevsim master, link dumps of the container's netns)
and from host-local's own files; one network chains netkit after ptp.

Each podman start or removal costs ~10 s in the VM (the cold plugin and podman
itself); the module adds ~2 min to the VM suite (132 s alone, 168 s with other
VMs running on the host).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import (
    NETKIT,
    Nic,
    cni_plugins_dir,
    leased_queues,
    make_nic,
    netkit_links,
)

pytestmark = pytest.mark.kernel

TIMEOUT = 300  # one podman command, cold plugin calls included, on a busy TCG VM


@dataclass
class Podman:
    """``podman`` with this test's containers.conf: its networks, plugins and state."""

    base: Path
    env: dict[str, str]

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True,
                           timeout=TIMEOUT, check=False)
        if check:
            assert p.returncode == 0, f"podman {' '.join(args)}: {p.stdout}{p.stderr}"
        return p

    def start(self, name: str, *networks: str, extra: tuple[str, ...] = ()) -> str:
        """Start ``sleep`` in a new container; its network namespace's path."""
        self("run", "-d", "--name", name, *(f"--network={n}" for n in networks), *extra,
             "--rootfs", str(self.base / "rootfs"), "sleep", "1000")
        return self("inspect", "-f", "{{.NetworkSettings.SandboxKey}}", name).stdout.strip()

    def remove(self, *names: str) -> None:
        self("rm", "-f", "-t", "0", *names)


@pytest.fixture(scope="module")
def podman_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The rootfs and the container storage, shared by this module's tests."""
    if shutil.which("podman") is None:
        pytest.fail("podman missing: scripts/vm setup installs it on the host")
    busybox = shutil.which("busybox")
    assert busybox, "busybox missing: scripts/vm setup installs busybox-static"
    # The guest boots without cgroupfs; podman's runtime (crun) needs cgroup2.
    if not os.path.ismount("/sys/fs/cgroup"):
        subprocess.run(["mount", "-t", "cgroup2", "none", "/sys/fs/cgroup"], check=True)
    base = tmp_path_factory.mktemp("podman")
    root = base / "rootfs"
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp"):
        (root / d).mkdir(parents=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    for applet in ("sh", "sleep"):
        (root / "bin" / applet).symlink_to("busybox")
    (base / "storage.conf").write_text(
        f'[storage]\ndriver = "vfs"\nrunroot = "{base}/run"\ngraphroot = "{base}/graph"\n'
    )
    return base


@pytest.fixture
def nic() -> Iterator[Nic]:
    n = make_nic(4)
    yield n
    n.remove()


@pytest.fixture
def podman(podman_base: Path, tmp_path: Path) -> Iterator[Podman]:
    """podman whose CNI networks are this test's (``write_network``), plugins ours + host-local."""
    plugins, netd = tmp_path / "cni-bin", tmp_path / "net.d"
    plugins.mkdir()
    netd.mkdir()
    (plugins / "netkit").symlink_to(NETKIT)
    if cni_plugins_dir():
        for plugin in ("host-local", "ptp"):
            (plugins / plugin).symlink_to(Path(str(cni_plugins_dir())) / plugin)
    conf = tmp_path / "containers.conf"
    conf.write_text(
        f'[network]\nnetwork_backend = "cni"\ncni_plugin_dirs = ["{plugins}"]\n'
        f'network_config_dir = "{netd}"\n'
        '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
    )
    env = {**os.environ, "CONTAINERS_CONF": str(conf),
           "CONTAINERS_STORAGE_CONF": str(podman_base / "storage.conf"),
           "CNI_NETKIT_STATE_DIRS": str(tmp_path / "state")}
    env.pop("CNI_NETKIT_AGENT_SOCKET", None)  # a podman host has no agent
    p = Podman(podman_base, env)
    yield p
    p("rm", "-af", "-t", "0", check=False)


def write_network(tmp_path: Path, name: str, version: str, nic: Nic, **over: Any) -> None:
    from cni_netkit.config import parse_queue_pool  # noqa: PLC0415 - after the VM check
    from cni_netkit.plugin import allowlist  # noqa: PLC0415

    plugin = {"type": "netkit", "master": nic.name, "queues": "1-2",
              "stateDir": str(tmp_path / "state"), **over}
    # The node's pools, declared where the plugin reads them on every ADD (closed by
    # default), as the agent writes them from its ConfigMap.
    allowlist.write(plugin["stateDir"], [allowlist.DeclaredPool(
        nic.name, frozenset(parse_queue_pool(plugin["queues"])), nic.ifindex)])
    (tmp_path / "net.d" / f"{name}.conflist").write_text(
        json.dumps({"cniVersion": version, "name": name, "plugins": [plugin]})
    )


def records(tmp_path: Path) -> list[str]:
    d = tmp_path / "state" / "attachments"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_start_leases_two_get_distinct_queues_exhausted_fails_rm_cleans(
    podman: Podman, nic: Nic, tmp_path: Path
) -> None:
    write_network(tmp_path, "nk", "1.0.0", nic)
    ns_a = podman.start("a", "nk")
    ns_b = podman.start("b", "nk")
    leases = leased_queues(nic)
    assert sorted(leases) == [1, 2]  # the pool, one queue each
    pods = [netkit_links(ns) for ns in (ns_a, ns_b)]
    assert all(len(links) == 1 and links[0].name == "eth0" for links in pods)
    assert {lease["ifindex"] for lease in leases.values()} == {links[0].index for links in pods}
    assert len({lease["netns_id"] for lease in leases.values()}) == 2  # two netns

    full = podman("run", "-d", "--name", "c", "--network=nk", "--rootfs",
                  str(podman.base / "rootfs"), "sleep", "1000", check=False)
    assert full.returncode != 0
    assert f"queue pool of {nic.name} exhausted" in full.stderr, full.stderr
    assert sorted(leased_queues(nic)) == [1, 2]
    assert len(records(tmp_path)) == 2

    podman.remove("a", "b", "c")
    assert leased_queues(nic) == {}
    assert records(tmp_path) == []
    assert netkit_links(None) == []


def test_cni_versions_as_podman_sends_them(podman: Podman, nic: Nic, tmp_path: Path) -> None:
    for version in ("0.3.1", "0.4.0", "1.0.0"):
        write_network(tmp_path, f"nk{version.replace('.', '')}", version, nic, queues="0-3")
    netns = podman.start("v", "nk031", "nk040", "nk100")
    links = netkit_links(netns)
    assert sorted(link.name for link in links) == ["eth0", "eth1", "eth2"]
    assert {lease["ifindex"] for lease in leased_queues(nic).values()} == {
        link.index for link in links}
    podman.remove("v")
    assert leased_queues(nic) == {}
    assert records(tmp_path) == []


def test_pair_with_host_local_honours_podman_ip(podman: Podman, nic: Nic, tmp_path: Path) -> None:
    if cni_plugins_dir() is None:
        pytest.fail("host-local missing: scripts/vm setup extracts containernetworking-plugins")
    data = tmp_path / "ipam"
    ipam = {"type": "host-local", "ranges": [[{"subnet": "10.88.9.0/24"}]], "dataDir": str(data)}
    write_network(tmp_path, "nkpair", "1.0.0", nic, pairing="pair", mode="l3", ipam=ipam)
    netns = podman.start("p", "nkpair", extra=("--ip", "10.88.9.50"))
    out = subprocess.run(["nsenter", f"--net={netns}", "ip", "-j", "-4", "addr", "show", "eth0"],
                         check=True, capture_output=True, text=True).stdout
    assert [a["local"] for link in json.loads(out) for a in link["addr_info"]] == ["10.88.9.50"]
    assert (data / "nkpair" / "10.88.9.50").exists()
    assert len(leased_queues(nic)) == 1
    podman.remove("p")
    assert not (data / "nkpair" / "10.88.9.50").exists()
    assert leased_queues(nic) == {}
    assert netkit_links(None) == []


def test_chained_after_ptp_with_its_own_pod_ifname(
    podman: Podman, nic: Nic, tmp_path: Path
) -> None:
    """One conflist [ptp + host-local, netkit]: ptp keeps eth0 and its address, ours is net1."""
    if cni_plugins_dir() is None:
        pytest.fail("ptp missing: scripts/vm setup extracts containernetworking-plugins")
    podman.env["CNI_NETKIT_MASTERS"] = f"{nic.name}=1-2"  # the node admin's declaration
    data = tmp_path / "ipam"
    ptp = {"type": "ptp", "ipam": {"type": "host-local", "dataDir": str(data),
                                   "ranges": [[{"subnet": "10.88.11.0/24"}]]}}
    ours = {"type": "netkit", "master": nic.name, "queues": "1-2", "podIfname": "net1",
            "stateDir": str(tmp_path / "state")}
    (tmp_path / "net.d" / "chained.conflist").write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "chained", "plugins": [ptp, ours]}))
    netns = podman.start("ch", "chained")
    out = subprocess.run(["nsenter", f"--net={netns}", "ip", "-j", "-4", "addr", "show", "eth0"],
                         check=True, capture_output=True, text=True).stdout
    (ip,) = [a["local"] for link in json.loads(out) for a in link["addr_info"]]
    assert ip.startswith("10.88.11.") and (data / "chained" / ip).exists()
    (link,) = netkit_links(netns)
    assert link.name == "net1"
    assert {lease["ifindex"] for lease in leased_queues(nic).values()} == {link.index}
    podman.remove("ch")
    assert leased_queues(nic) == {} and netkit_links(None) == []
    assert records(tmp_path) == [] and not (data / "chained" / ip).exists()
