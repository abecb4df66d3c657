"""AF_XDP steering decisions: pin paths, slots, what CHECK and GC conclude, what QEMU is told.

Pure functions, plus ADD's transaction with the bpffs side replaced by a
recorder (tests/kernel and tests/e2e show what the kernel does).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from cni_netkit.config import parse_invocation
from cni_netkit.errors import InvalidConfig, InvalidEnvironment
from cni_netkit.kernel import xsk
from cni_netkit.kernel.xsk import Wiring, XskMap, XskSlot
from cni_netkit.plugin import afxdp, commands
from cni_netkit.plugin.leasefile import lease_entry
from cni_netkit.plugin.state import Attachment, LeasedQueue, Owner, StateStore
from cni_netkit.result import NetkitQueue, NetkitResult, Result
from tests.unit.fake_kernel import FakeKernel

OWNER = Owner("afxdp", "c1", "net1")
ROOT = Path("/sys/fs/bpf/cni-netkit")
LEASED = (LeasedQueue(netkit_queue=2, master_queue=12), LeasedQueue(netkit_queue=1, master_queue=9))


def test_pin_path_is_per_pod_when_kubernetes_names_the_pod() -> None:
    assert afxdp.pin_path(ROOT, OWNER, "vms", "vm-a") == ROOT / "pods/vms/vm-a/afxdp:c1:net1"


@pytest.mark.parametrize(("namespace", "pod"), [
    (None, None), ("vms", None), ("..", "vm-a"), ("vms", "VM"), ("vms", "a/b"), ("", "vm-a"),
])
def test_pin_path_without_a_usable_pod_name_is_per_container(
    namespace: str | None, pod: str | None
) -> None:
    assert afxdp.pin_path(ROOT, OWNER, namespace, pod) == ROOT / "containers/afxdp:c1:net1"


def test_pin_of_a_very_long_container_id_is_hashed_and_owned_by_nobody_gc_can_name() -> None:
    path = afxdp.pin_path(ROOT, Owner("afxdp", "c" * 250, "net1"), "vms", "vm-a")
    assert path.name.startswith("sha256-") and len(path.name) < 80
    assert afxdp.owner_of_pin(path) is None


def test_owner_of_pin_reads_the_record_key_back() -> None:
    assert afxdp.owner_of_pin(afxdp.pin_path(ROOT, OWNER, "vms", "vm-a")) == OWNER
    assert afxdp.owner_of_pin(Path("/x/link")) is None
    assert afxdp.owner_of_pin(Path("/x/a::b")) is None


def test_each_queue_is_steered_to_the_index_of_its_netkit_queue_id() -> None:
    assert afxdp.slots(LEASED) == (XskSlot(queue=9, index=1), XskSlot(queue=12, index=2))
    # QEMU's queue i binds netkit queue start-queue + i and sits at map-start-index + i.
    assert afxdp.start_index(LEASED) == 1


def test_wiring_problems_name_each_queue_that_differs() -> None:
    good = {9: Wiring(9, 40, 1), 12: Wiring(12, 40, 2)}
    assert afxdp.wiring_problems(LEASED, 40, good) == []
    assert afxdp.wiring_problems(LEASED, 40, {9: Wiring(9, 41, 1), 12: Wiring(12, 40, 3)}) == [
        "queue 12 goes to index 3, not 2", "queue 9 goes to map id 41, not 40"]
    assert afxdp.wiring_problems(LEASED, 40, {}) == [
        "queue 12 is not wired", "queue 9 is not wired"]


def test_dead_slots_are_wired_queues_nobody_leases() -> None:
    assert afxdp.dead_slots([1, 5, 9], leased=[5, 6]) == [1, 9]


def nk(**kw: Any) -> NetkitResult:
    return NetkitResult(master="eth0", pairing="single", mode="l2", interface="net1",
                        queues=(NetkitQueue(1, 9), NetkitQueue(2, 12)), **kw)


def test_qemu_netdev_with_a_map_inhibits_qemus_program() -> None:
    with_map = nk(map_path="/sys/fs/bpf/cni-netkit/pods/vms/vm-a/afxdp:c1:net1",
                  map_start_index=1)
    assert with_map.qemu_netdev == (
        "ifname=net1,mode=native,queues=2,start-queue=1,inhibit=on,"
        "map-path=/sys/fs/bpf/cni-netkit/pods/vms/vm-a/afxdp:c1:net1,map-start-index=1")
    assert nk().qemu_netdev is None and nk().dpdk_vdev is None
    assert nk().afxdp_unavailable == (
        "master eth0 has no cni-netkit XDP program: nothing steers its queues' frames to "
        "AF_XDP sockets (a lease for io_uring zero-copy, or for an application that brings "
        "its own steering)")


def test_the_dpdk_vdev_uses_the_pinned_map_and_no_busy_polling() -> None:
    one = NetkitResult(master="eth0", pairing="single", mode="l2", interface="net1",
                       queues=(NetkitQueue(3, 9),), map_path="/run/netkit/xsk/afxdp:c1:net1",
                       map_start_index=3)
    assert one.dpdk_vdev == (
        "net_af_xdp0,iface=net1,start_queue=3,queue_count=1,use_pinned_map=1,"
        "dp_path=/run/netkit/xsk/afxdp:c1:net1,busy_budget=0")
    # DPDK's devargs cannot quote a comma; its PMD takes one queue of a netkit.
    assert dataclasses.replace(one, map_path="/m,n").dpdk_vdev is None
    assert nk(map_path="/m", map_start_index=1).dpdk_vdev is None


def test_dpdk_vdevs_are_one_port_per_netkit_queue_for_any_number_of_queues() -> None:
    two = nk(map_path="/run/netkit/cni-netkit/afxdp:c1:net1", map_start_index=1)
    assert two.dpdk_vdevs == tuple(
        f"net_af_xdp_net1_{q},iface=net1,start_queue={q},queue_count=1,shared_umem=1,"
        "use_pinned_map=1,dp_path=/run/netkit/cni-netkit/afxdp:c1:net1,busy_budget=0"
        for q in (1, 2))
    out = Result(netkit=two).encode("1.1.0")["netkit"]
    assert "dpdkVdev" not in out and out["dpdkVdevs"] == list(two.dpdk_vdevs)
    assert dataclasses.replace(two, map_path="/m,n").dpdk_vdevs is None
    assert nk().dpdk_vdevs is None and "dpdkVdevs" not in Result(netkit=nk()).encode("1.1.0")[
        "netkit"]


def test_the_xsk_mode_follows_the_masters_xdp_features() -> None:
    assert afxdp.xsk_mode({"basic", "redirect", "xsk-zerocopy"}) == "zerocopy"
    assert afxdp.xsk_mode({"basic", "redirect"}) == "copy"


def test_qemu_option_values_double_their_commas() -> None:
    odd = NetkitResult("eth0", "single", "l2", "n,1", (NetkitQueue(1, 9),), "/p,q", 1)
    assert odd.qemu_netdev == (
        "ifname=n,,1,mode=native,queues=1,start-queue=1,inhibit=on,map-path=/p,,q,"
        "map-start-index=1")


def test_result_carries_map_path_and_start_index_and_reads_them_back() -> None:
    out = Result(netkit=nk(map_path="/m", map_start_index=1)).encode("1.1.0")
    assert (out["netkit"]["mapPath"], out["netkit"]["mapStartIndex"]) == ("/m", 1)
    assert Result.from_prev(out, "1.1.0").netkit == nk(map_path="/m", map_start_index=1)
    assert "mapPath" not in Result(netkit=nk()).encode("1.1.0")["netkit"]


def test_the_pod_annotation_gets_map_path_start_index_and_the_qemu_string() -> None:
    att = Attachment(container_id="c1", ifname="net1", netns="/x", network="afxdp",
                     master="eth0", pairing="single", mode="l2", mac=None, mtu=None,
                     queues=LEASED, extra={afxdp.MAP_PATH: "/m", afxdp.MAP_START_INDEX: 1,
                                           afxdp.MAP_ID: 40})
    entry = lease_entry(att)
    assert (entry["mapPath"], entry["mapStartIndex"]) == ("/m", 1)
    assert entry["qemuNetdev"].endswith(",inhibit=on,map-path=/m,map-start-index=1")


# --- ADD's transaction, with the bpffs side recorded ---------------------------------


class Bpffs:
    """Stands in for kernel.xsk: records what the plugin asks, fails where told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.wired: dict[int, Wiring] = {}

    def create_map(self, path: Path, *, owner: tuple[int, int] | None = None) -> XskMap:
        self.calls.append(("create_map", str(path)) if owner is None
                          else ("create_map", str(path), owner))
        return XskMap(str(path), 40)

    def wire(self, master: str, xsk_map: XskMap, slots: Any, *, root: Any = None) -> None:
        self.calls.append(("wire", [(s.queue, s.index) for s in slots]))
        self.wired.update({s.queue: Wiring(s.queue, xsk_map.map_id, s.index) for s in slots})

    def unwire(self, master: str, queues: Any, map_id: int, *, root: Any = None) -> tuple[int, ...]:
        self.calls.append(("unwire", sorted(queues)))
        return tuple(q for q in queues if self.wired.pop(q, None))

    def remove_map(self, path: Path, *, prune_below: Path | None = None) -> bool:
        self.calls.append(("remove_map", str(path)))
        return True


@pytest.fixture
def bpffs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Bpffs:
    fake = Bpffs()
    for name in ("create_map", "wire", "unwire", "remove_map"):
        monkeypatch.setattr(xsk, name, getattr(fake, name))
    monkeypatch.setenv(xsk.ROOT_ENV, str(tmp_path / "bpf"))
    monkeypatch.setattr(afxdp, "_steering", lambda master: master == "eth0")
    return fake


def add_inv(state: Path, *, env: dict[str, str] | None = None, **conf: Any) -> Any:
    c = {"cniVersion": "1.1.0", "name": "afxdp", "type": "netkit", "master": "eth0",
         "queues": "8-15", "stateDir": str(state), **conf}
    environ = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/pod1",
               "CNI_IFNAME": "net1", "CNI_PATH": "", "CNI_NETKIT_STATE_DIRS": str(state),
               "CNI_ARGS": "K8S_POD_NAMESPACE=vms;K8S_POD_NAME=vm-a", **(env or {})}
    return parse_invocation(environ, json.dumps(c).encode())


@pytest.fixture
def kernel() -> FakeKernel:
    k = FakeKernel(master="eth0", master_queues=16)
    k.add_netns("/var/run/netns/pod1")
    return k


def test_add_on_a_steered_master_records_and_returns_the_map(
    bpffs: Bpffs, kernel: FakeKernel, tmp_path: Path
) -> None:
    result = commands.add(add_inv(tmp_path / "state", queuesPerAttachment=2), kernel)

    path = tmp_path / "bpf" / "pods" / "vms" / "vm-a" / "afxdp:c1:net1"
    assert bpffs.calls == [("create_map", str(path)), ("wire", [(8, 1), (9, 2)])]
    out = result.encode("1.1.0")["netkit"]
    assert (out["mapPath"], out["mapStartIndex"]) == (str(path), 1)
    att = StateStore(tmp_path / "state").load(OWNER)
    assert att is not None and att.extra[afxdp.MAP_ID] == 40


def test_add_gives_the_pin_to_the_configured_xsk_map_owner(
    bpffs: Bpffs, kernel: FakeKernel, tmp_path: Path
) -> None:
    commands.add(add_inv(tmp_path / "state", xskMapOwner="107:107"), kernel)
    path = tmp_path / "bpf" / "pods" / "vms" / "vm-a" / "afxdp:c1:net1"
    assert bpffs.calls[0] == ("create_map", str(path), (107, 107))


def test_add_failing_after_the_wiring_unwires_and_unpins(
    bpffs: Bpffs, kernel: FakeKernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(commands.FAULT_ENV, "result")
    with pytest.raises(commands.InjectedFault):
        commands.add(add_inv(tmp_path / "state"), kernel)

    path = str(tmp_path / "bpf" / "pods" / "vms" / "vm-a" / "afxdp:c1:net1")
    assert bpffs.calls[2:] == [("unwire", [8]), ("remove_map", path)]
    assert bpffs.wired == {} and kernel.leased_master_queues() == {}


def test_add_refuses_more_queues_than_an_xsk_map_has_slots(
    bpffs: Bpffs, kernel: FakeKernel, tmp_path: Path
) -> None:
    att = Attachment(container_id="c1", ifname="net1", netns="/x", network="afxdp",
                     master="eth0", pairing="single", mode="l2", mac=None, mtu=None,
                     queues=(LeasedQueue(xsk.XSK_SLOTS, 3),))
    cfg = add_inv(tmp_path / "state").config
    with pytest.raises(InvalidConfig, match="too many for AF_XDP steering"):
        afxdp.wire(cfg, att, None, None, 1)  # type: ignore[arg-type] - refused before any use
    assert bpffs.calls == []


def test_pair_mode_and_unsteered_masters_get_no_map(
    bpffs: Bpffs, kernel: FakeKernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CNI_NETKIT_MASTERS", "eth0=0-63;eth1=0-63")
    pair = commands.add(add_inv(tmp_path / "s1", pairing="pair", mode="l3"), kernel)
    assert pair.netkit is not None and pair.netkit.map_path is None
    other = FakeKernel(master="eth1")
    other.add_netns("/var/run/netns/pod1")
    plain = commands.add(add_inv(tmp_path / "s2", master="eth1"), other)
    assert plain.netkit is not None and plain.netkit.map_path is None
    assert bpffs.calls == []


def test_a_pin_is_restricted_only_where_it_is_a_file_never_through_a_link(tmp_path: Path) -> None:
    # The pin's directory may be mounted into the pod: a link planted at the pin's
    # name must not make root chmod/chown what it points to.
    pin = tmp_path / "pin"
    pin.write_text("")
    pin.chmod(0o644)
    xsk._restrict_pin(pin, (os.getuid(), os.getgid()))
    assert pin.stat().st_mode & 0o777 == 0o600
    victim = tmp_path / "host-file"
    victim.write_text("")
    victim.chmod(0o644)
    link = tmp_path / "planted"
    link.symlink_to(victim)
    with pytest.raises(OSError, match=r"Too many levels|not the pin"):
        xsk._restrict_pin(link, (os.getuid(), os.getgid()))
    assert victim.stat().st_mode & 0o777 == 0o644


# --- delivery into the pod's emptyDir (xskMapVolume) ----------------------------------


def delivering(tmp_path: Path, uid: str | None = "0f9d6c1e-7b7a-4c1e-9a53-2b8c1d0e4f11"
               ) -> dict[str, Any]:
    """ADD arguments for a pod that gets its map in its emptyDir ``xsk``."""
    args = "K8S_POD_NAMESPACE=vms;K8S_POD_NAME=vm-a" + (f";K8S_POD_UID={uid}" if uid else "")
    return {"env": {"CNI_NETKIT_KUBELET_ROOTS": str(tmp_path / "kubelet"), "CNI_ARGS": args},
            "xskMapVolume": "xsk", "kubeletRoot": str(tmp_path / "kubelet")}


def test_the_volume_is_the_pods_empty_dir_under_the_kubelet_root() -> None:
    assert afxdp.volume_dir("/var/lib/kubelet", "uid-1", "xsk") == Path(
        "/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~empty-dir/xsk")


@pytest.mark.parametrize("uid", [None, "", "..", "a/b", "-x", "u" * 65])
def test_the_volume_needs_a_pod_uid_that_is_one_path_component(uid: str | None) -> None:
    with pytest.raises(InvalidEnvironment, match="K8S_POD_UID"):
        afxdp.volume_dir("/var/lib/kubelet", uid, "xsk")


def test_add_into_a_pod_without_the_volume_is_refused_and_undone(
    bpffs: Bpffs, kernel: FakeKernel, tmp_path: Path
) -> None:
    with pytest.raises(InvalidConfig, match="no emptyDir volume 'xsk'") as e:
        commands.add(add_inv(tmp_path / "state", **delivering(tmp_path)), kernel)
    assert "kubernetes.io~empty-dir/xsk is missing" in e.value.details
    path = str(tmp_path / "bpf" / "pods" / "vms" / "vm-a" / "afxdp:c1:net1")
    assert bpffs.calls[2:] == [("unwire", [8]), ("remove_map", path)]
    assert kernel.leased_master_queues() == {}
    assert StateStore(tmp_path / "state").load(OWNER) is None


def test_add_delivering_without_a_pod_uid_is_an_environment_error_and_undone(
    bpffs: Bpffs, kernel: FakeKernel, tmp_path: Path
) -> None:
    with pytest.raises(InvalidEnvironment, match="K8S_POD_UID"):
        commands.add(add_inv(tmp_path / "state", **delivering(tmp_path, uid=None)), kernel)
    assert bpffs.calls[2:3] == [("unwire", [8])] and kernel.leased_master_queues() == {}


def test_a_delivered_map_is_reported_as_the_pod_sees_it() -> None:
    att = Attachment(container_id="c1", ifname="net1", netns="/x", network="afxdp",
                     master="eth0", pairing="single", mode="l2", mac=None, mtu=None,
                     queues=LEASED, extra={
                         afxdp.MAP_PATH: "/sys/fs/bpf/cni-netkit/pods/vms/vm-a/afxdp:c1:net1",
                         afxdp.POD_MAP_PATH: "/run/netkit/xsk/afxdp:c1:net1",
                         afxdp.VOLUME_PIN: "/var/lib/kubelet/pods/u/volumes/"
                                           "kubernetes.io~empty-dir/xsk/afxdp:c1:net1",
                         afxdp.MAP_START_INDEX: 1, afxdp.MAP_ID: 40})
    assert att.netkit.map_path == "/run/netkit/xsk/afxdp:c1:net1"
    assert "map-path=/run/netkit/xsk/afxdp:c1:net1," in (att.qemu_netdev or "")
    assert lease_entry(att)["mapPath"] == "/run/netkit/xsk/afxdp:c1:net1"
    assert Attachment.from_json(json.loads(json.dumps(att.to_json()))) == att


def test_the_volume_is_found_through_a_kubelet_root_that_is_a_link(tmp_path: Path) -> None:
    # /proc/self/mountinfo names the resolved path: a linked root must resolve too,
    # or DEL would never see the pod's bpffs as mounted (and leave it).
    (tmp_path / "disk").mkdir()
    (tmp_path / "kubelet").symlink_to(tmp_path / "disk")
    assert afxdp.volume_dir(str(tmp_path / "kubelet"), "uid-1", "xsk") == (
        tmp_path / "disk/pods/uid-1/volumes/kubernetes.io~empty-dir/xsk")


def test_del_after_an_add_killed_past_delivery_undelivers_the_pods_pin(
    bpffs: Bpffs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ADD saved its intent record (pod uid only), delivered, then was killed before
    # the final record: DEL must still find the pin in the pod's volume.
    uid = "0f9d6c1e-7b7a-4c1e-9a53-2b8c1d0e4f11"
    cfg = add_inv(tmp_path / "state", **delivering(tmp_path, uid=uid)).config
    undelivered: list[Path] = []
    monkeypatch.setattr(afxdp, "_undeliver", lambda _, at, owner: undelivered.append(at))
    intent = Attachment(container_id="c1", ifname="net1", netns="/x", network="afxdp",
                        master="eth0", pairing="single", mode="l2", mac=None, mtu=None,
                        queues=(), pod_namespace="vms", pod_name="vm-a",
                        extra={afxdp.POD_UID: uid})
    afxdp.release(cfg, OWNER, intent)
    assert undelivered == [afxdp.volume_dir(cfg.kubelet_root, uid, "xsk")
                           / afxdp.POD_BPFFS / "afxdp:c1:net1"]
