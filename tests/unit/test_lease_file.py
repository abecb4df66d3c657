"""The attachment's lease file in the pod's volume (xskMapVolume, xskMapSubdir).

ADD's transaction with the BPF side replaced by recorders (the mounts of the
pod's bpffs are directories here; tests/e2e/test_pod_volume.py and
test_kubevirt_binding.py show the kernel's side): where the file and the
pin go, what the file says, that every failure undoes it, that DEL and GC
remove only their own, and that nothing planted in the volume is followed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cni_netkit.config import parse_invocation
from cni_netkit.errors import CheckFailed, InvalidConfig, IOFailure
from cni_netkit.kernel import bpffs as bpffs_module
from cni_netkit.kernel import xsk
from cni_netkit.plugin import afxdp, commands, leasefile
from cni_netkit.plugin.state import Owner, StateStore
from tests.unit.fake_kernel import FakeKernel
from tests.unit.test_xsk_decisions import Bpffs, add_inv

UID = "0f9d6c1e-7b7a-4c1e-9a53-2b8c1d0e4f11"
OWNER = Owner("afxdp", "c1", "net1")
PIN = "afxdp:c1:net1"
HOOKS = "/var/run/kubevirt-hooks"


class PodBpffs:
    """The pod's bpffs instances as directories, and its second pins as files."""

    def __init__(self) -> None:
        self.mounted: set[Path] = set()

    def mount_instance(self, directory: Path, name: str) -> bool:
        target = directory / name
        if target in self.mounted:
            return False
        if not directory.is_dir():
            raise FileNotFoundError(directory)
        target.mkdir()
        self.mounted.add(target)
        return True

    def is_instance(self, path: Path) -> bool:
        return path in self.mounted

    def unmount_instance(self, path: Path) -> bool:
        self.mounted.discard(path)
        path.rmdir()
        return True

    def pin_again(self, path: Path, at: Path, *, owner: Any = None) -> None:
        at.write_text(f"pin of {path}")


@pytest.fixture
def pod_bpffs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> PodBpffs:
    fake, maps = PodBpffs(), Bpffs()
    for name in ("create_map", "wire", "unwire", "remove_map"):
        monkeypatch.setattr(xsk, name, getattr(maps, name))
    monkeypatch.setattr(xsk, "pin_again", fake.pin_again)
    for name in ("mount_instance", "is_instance", "unmount_instance"):
        monkeypatch.setattr(bpffs_module, name, getattr(fake, name))
    monkeypatch.setenv(xsk.ROOT_ENV, str(tmp_path / "bpf"))
    monkeypatch.setattr(afxdp, "_steering", lambda master: master == "eth0")
    return fake


@pytest.fixture
def kernel() -> FakeKernel:
    k = FakeKernel(master="eth0", master_queues=16)
    k.add_netns("/var/run/netns/pod1")
    return k


def volume(tmp_path: Path, name: str = "hook-sidecar-sockets") -> Path:
    """The launcher pod's emptyDir as the kubelet makes it before the sandbox's ADD."""
    d = tmp_path / "kubelet/pods" / UID / "volumes/kubernetes.io~empty-dir" / name
    d.mkdir(parents=True)
    d.chmod(0o777)
    return d


def kubevirt(tmp_path: Path, *, container: str = "c1", command: str = "ADD",
             **conf: Any) -> Any:
    """An invocation for the virt-launcher pod, NAD as docs/kubevirt.md has it."""
    c = {"cniVersion": "1.1.0", "name": "afxdp", "type": "netkit", "master": "eth0",
         "queues": "8-15", "stateDir": str(tmp_path / "state"),
         "xskMapVolume": "hook-sidecar-sockets", "xskMapMountPath": HOOKS,
         "xskMapSubdir": "hook-sidecar-0", "kubeletRoot": str(tmp_path / "kubelet"),
         "runtimeConfig": {"mac": "02:00:00:00:00:20"}, **conf}
    environ = {"CNI_COMMAND": command, "CNI_CONTAINERID": container,
               "CNI_NETNS": "/var/run/netns/pod1", "CNI_IFNAME": "net1", "CNI_PATH": "",
               "CNI_NETKIT_STATE_DIRS": str(tmp_path / "state"),
               "CNI_NETKIT_KUBELET_ROOTS": str(tmp_path / "kubelet"),
               "CNI_ARGS": f"K8S_POD_NAMESPACE=vms;K8S_POD_NAME=vm-a;K8S_POD_UID={UID}"}
    return parse_invocation(environ, json.dumps(c).encode())


def test_add_puts_the_lease_file_beside_the_pin_in_the_sidecars_directory(
    pod_bpffs: PodBpffs, kernel: FakeKernel, tmp_path: Path
) -> None:
    vol = volume(tmp_path)
    result = commands.add(kubevirt(tmp_path), kernel)
    sub = vol / "hook-sidecar-0"
    # Made as the kubelet makes a subPath directory: the volume's mode, so the sidecar
    # (uid 107) can create its socket there.
    assert sub.stat().st_mode & 0o7777 == 0o777
    assert sorted(p.name for p in sub.iterdir()) == ["cni-netkit", "cni-netkit-net1.json"]
    assert (sub / "cni-netkit" / PIN).is_file()
    # The compute container (QEMU) sees the whole volume at its mountPath.
    seen = f"{HOOKS}/hook-sidecar-0/cni-netkit/{PIN}"
    nk = result.encode("1.1.0")["netkit"]
    assert nk["mapPath"] == seen and f"map-path={seen}," in nk["qemuNetdev"]

    lease = sub / "cni-netkit-net1.json"
    assert lease.stat().st_mode & 0o777 == 0o644
    att = StateStore(tmp_path / "state").load(OWNER)
    assert att is not None and att.extra[afxdp.LEASE_FILE] == str(lease)
    doc = json.loads(lease.read_text())
    assert doc == {"format": "cni-netkit.dev/lease/v1",
                   "owner": {"network": "afxdp", "containerId": "c1", "ifname": "net1"},
                   "lease": leasefile.lease_entry(att)}  # the annotation's entry, exactly
    assert doc["lease"]["mapPath"] == seen and doc["lease"]["mac"] == "02:00:00:00:00:20"
    assert doc["lease"]["queues"] == [1] and doc["lease"]["interface"] == "net1"
    assert [p.name for p in sub.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_without_a_subdir_the_lease_file_sits_in_the_volume_itself(
    pod_bpffs: PodBpffs, kernel: FakeKernel, tmp_path: Path
) -> None:
    vol = volume(tmp_path, "xsk")
    inv = kubevirt(tmp_path, xskMapVolume="xsk", xskMapMountPath="/run/netkit",
                   xskMapSubdir=None)
    result = commands.add(inv, kernel)
    assert sorted(p.name for p in vol.iterdir()) == ["cni-netkit", "cni-netkit-net1.json"]
    assert result.netkit is not None
    assert result.netkit.map_path == f"/run/netkit/cni-netkit/{PIN}"
    commands.delete(kubevirt(tmp_path, command="DEL", xskMapVolume="xsk",
                             xskMapMountPath="/run/netkit", xskMapSubdir=None), kernel)
    assert list(vol.iterdir()) == []


def test_a_subdir_the_kubelet_already_made_is_used_and_kept(
    pod_bpffs: PodBpffs, kernel: FakeKernel, tmp_path: Path
) -> None:
    sub = volume(tmp_path) / "hook-sidecar-0"
    sub.mkdir(mode=0o750)
    (sub / "netkit-afxdp.sock").write_text("")  # the sidecar already listens
    commands.add(kubevirt(tmp_path), kernel)
    assert sub.stat().st_mode & 0o777 == 0o750  # not ours to change
    commands.delete(kubevirt(tmp_path, command="DEL"), kernel)
    assert [p.name for p in sub.iterdir()] == ["netkit-afxdp.sock"]


def test_del_removes_the_lease_file_the_pin_and_the_emptied_subdir(
    pod_bpffs: PodBpffs, kernel: FakeKernel, tmp_path: Path
) -> None:
    vol = volume(tmp_path)
    commands.add(kubevirt(tmp_path), kernel)
    commands.delete(kubevirt(tmp_path, command="DEL"), kernel)
    assert list(vol.iterdir()) == [] and pod_bpffs.mounted == set()
    commands.delete(kubevirt(tmp_path, command="DEL"), kernel)  # again: idempotent
    assert list(vol.iterdir()) == []


def test_add_failing_after_the_lease_file_undoes_it_and_the_subdir(
    pod_bpffs: PodBpffs, kernel: FakeKernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol = volume(tmp_path)
    monkeypatch.setenv(commands.FAULT_ENV, "result")  # the last step before success
    with pytest.raises(commands.InjectedFault):
        commands.add(kubevirt(tmp_path), kernel)
    assert list(vol.iterdir()) == [] and pod_bpffs.mounted == set()
    assert kernel.leased_master_queues() == {}


def test_add_failing_to_write_the_lease_file_undoes_the_delivery(
    pod_bpffs: PodBpffs, kernel: FakeKernel, tmp_path: Path
) -> None:
    sub = volume(tmp_path) / "hook-sidecar-0"
    sub.mkdir()
    (sub / "cni-netkit-net1.json").mkdir()  # something the pod left in the way
    with pytest.raises(IOFailure, match="cannot write the lease file") as e:
        commands.add(kubevirt(tmp_path), kernel)
    assert "directory" in e.value.details
    assert [p.name for p in sub.iterdir()] == ["cni-netkit-net1.json"]  # the pin is gone
    assert pod_bpffs.mounted == set() and kernel.leased_master_queues() == {}
    assert StateStore(tmp_path / "state").load(OWNER) is None


def test_a_link_planted_at_the_subdir_is_refused_not_followed(
    pod_bpffs: PodBpffs, kernel: FakeKernel, tmp_path: Path
) -> None:
    vol = volume(tmp_path)
    elsewhere = tmp_path / "node-dir"
    elsewhere.mkdir()
    (vol / "hook-sidecar-0").symlink_to(elsewhere)
    with pytest.raises(IOFailure, match=r"cannot make .*/hook-sidecar-0 for the XSK map"):
        commands.add(kubevirt(tmp_path), kernel)
    assert list(elsewhere.iterdir()) == [] and kernel.leased_master_queues() == {}


def test_a_link_planted_at_the_lease_files_name_is_replaced_not_followed(
    pod_bpffs: PodBpffs, kernel: FakeKernel, tmp_path: Path
) -> None:
    sub = volume(tmp_path) / "hook-sidecar-0"
    sub.mkdir()
    victim = tmp_path / "node-file"
    victim.write_text("keep")
    (sub / "cni-netkit-net1.json").symlink_to(victim)
    commands.add(kubevirt(tmp_path), kernel)
    assert victim.read_text() == "keep"
    lease = sub / "cni-netkit-net1.json"
    assert not lease.is_symlink() and json.loads(lease.read_text())["owner"]["containerId"] == "c1"


def test_an_earlier_sandboxs_del_leaves_the_later_sandboxs_lease_file(
    pod_bpffs: PodBpffs, kernel: FakeKernel, tmp_path: Path
) -> None:
    # The same pod (same volume, same CNI_IFNAME) gets a new sandbox before the old
    # one's DEL: the file's name is the same, its owner is not.
    sub = volume(tmp_path) / "hook-sidecar-0"
    old = kubevirt(tmp_path, container="old")
    commands.add(old, kernel)
    commands.delete(kubevirt(tmp_path, container="old", command="DEL"), kernel)
    kernel.add_netns("/var/run/netns/pod1")
    commands.add(kubevirt(tmp_path, container="new"), kernel)
    assert not leasefile.remove(sub / "cni-netkit-net1.json", Owner("afxdp", "old", "net1"))
    assert json.loads((sub / "cni-netkit-net1.json").read_text())["owner"]["containerId"] == "new"


def test_gc_removes_a_stale_owners_lease_file_without_its_record(
    pod_bpffs: PodBpffs, kernel: FakeKernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol = volume(tmp_path)
    commands.add(kubevirt(tmp_path), kernel)
    StateStore(tmp_path / "state").remove(OWNER)  # the record is lost
    monkeypatch.setattr(bpffs_module, "instances_below",
                        lambda d: sorted(p for p in pod_bpffs.mounted if str(p).startswith(
                            f"{d}/")))
    monkeypatch.setattr(afxdp, "_sweep", lambda cfg, kernel: None)  # the kernel's part
    failures: list[str] = []
    afxdp.gc(kubevirt(tmp_path, command="GC").config, kernel, frozenset(), failures)
    assert failures == [] and list(vol.iterdir()) == []


@pytest.mark.parametrize("subdir", ["", ".", "..", "a/b", "../x", ".hidden", "a..b", "x" * 254])
def test_the_subdir_is_one_plain_path_component(tmp_path: Path, subdir: str) -> None:
    with pytest.raises(InvalidConfig, match="xskMapSubdir"):
        kubevirt(tmp_path, xskMapSubdir=subdir)


def test_the_subdir_needs_the_volume(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfig, match="set xskMapVolume too"):
        add_inv(tmp_path / "state", xskMapSubdir="hook-sidecar-0")


def test_a_lease_file_of_another_format_or_a_link_reads_as_none(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"format": "cni-netkit.dev/lease/v9"}))
    (tmp_path / "b.json").write_text("{not json")
    (tmp_path / "c.json").symlink_to(tmp_path / "a.json")
    assert [leasefile.read(tmp_path / n) for n in ("a.json", "b.json", "c.json", "d")] == [
        None] * 4
    assert not leasefile.remove(tmp_path / "a.json", OWNER)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json", "c.json"]


def test_check_finds_a_lease_file_gone_or_changed(
    pod_bpffs: PodBpffs, kernel: FakeKernel, tmp_path: Path
) -> None:
    sub = volume(tmp_path) / "hook-sidecar-0"
    commands.add(kubevirt(tmp_path), kernel)
    att = StateStore(tmp_path / "state").load(OWNER)
    assert att is not None
    lease = sub / "cni-netkit-net1.json"
    afxdp._check_lease_file(att)
    doc = json.loads(lease.read_text())
    doc["lease"]["qemuNetdev"] = "ifname=net1,map-path=/elsewhere"
    lease.write_text(json.dumps(doc))
    with pytest.raises(CheckFailed, match="differs from the attachment"):
        afxdp._check_lease_file(att)
    lease.unlink()
    with pytest.raises(CheckFailed, match="does not hold its lease file any more"):
        afxdp._check_lease_file(att)


def test_a_master_without_steering_still_tells_the_pod_why_through_the_lease_file(
    pod_bpffs: PodBpffs, kernel: FakeKernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No map to deliver, but the sidecar must not wait 40 s for a lease that exists.
    monkeypatch.setattr(afxdp, "_steering", lambda master: False)
    sub = volume(tmp_path) / "hook-sidecar-0"
    commands.add(kubevirt(tmp_path), kernel)
    assert [p.name for p in sub.iterdir()] == ["cni-netkit-net1.json"]  # no bpffs
    lease = json.loads((sub / "cni-netkit-net1.json").read_text())["lease"]
    assert "qemuNetdev" not in lease
    assert lease["afxdpUnavailable"].startswith("master eth0 has no cni-netkit XDP program")
    commands.delete(kubevirt(tmp_path, command="DEL"), kernel)
    assert list(sub.parent.iterdir()) == []


def test_a_master_without_steering_refuses_a_pod_without_the_volume(
    pod_bpffs: PodBpffs, kernel: FakeKernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(afxdp, "_steering", lambda master: False)
    with pytest.raises(InvalidConfig, match="no emptyDir volume 'hook-sidecar-sockets'"):
        commands.add(kubevirt(tmp_path), kernel)
    assert kernel.leased_master_queues() == {}
