"""Which interfaces are ours and where each one's lease comes from; the failures a VM owner sees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cni_netkit.kubevirt import leases
from cni_netkit.kubevirt.leases import Interface, LeaseError
from tests.kubevirt import shapes

MAC = "02:00:00:00:00:20"


class Clock:
    """Fake time for the bounded wait: sleeping advances it, and may run a callback."""

    def __init__(self) -> None:
        self.now = 0.0
        self.on_sleep: list[object] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        if self.on_sleep:
            action = self.on_sleep.pop(0)
            if callable(action):
                action()


def write_annotation(path: Path, *entries: dict[str, object]) -> None:
    path.write_text(json.dumps(list(entries)))


def test_only_interfaces_on_our_binding_are_bound() -> None:
    vmi = shapes.vmi({"fast": MAC}, pod_interfaces={"fast": "net1"})
    vmi["spec"]["domain"]["devices"]["interfaces"].append(
        {"name": "slow", "binding": {"name": "passt"}})
    assert leases.bound_interfaces(vmi, "netkit-afxdp") == [Interface("fast", MAC, "net1")]
    assert leases.bound_interfaces(vmi, "other") == []


def test_kubevirts_hashed_pod_interface_name() -> None:
    # "pod" + the first 11 hex digits of sha256(network name), as KubeVirt's
    # namescheme.GenerateHashedInterfaceName; 14 characters fit IFNAMSIZ.
    assert leases.hashed_pod_interface("fast") == "pod115dc3606fb"
    assert len(leases.hashed_pod_interface("a-long-network-name")) == 14


def test_the_annotation_entry_is_found_by_the_hashed_pod_interface_name(tmp_path: Path) -> None:
    pod_if = leases.hashed_pod_interface("fast")
    write_annotation(tmp_path / "leases", shapes.lease_entry("net9", mac="02:00:00:00:00:99"),
                     shapes.lease_entry(pod_if, mac=MAC, queues=2))
    (nic,) = leases.wait_for_leases([Interface("fast", MAC, None)], network_info=None,
                                    leases=str(tmp_path / "leases"), timeout=0)
    assert (nic.name, nic.mac, nic.queues) == ("fast", MAC, 2)
    assert nic.qemu_netdev == shapes.lease_entry(pod_if, mac=MAC, queues=2)["qemuNetdev"]


def test_the_vmi_status_pod_interface_name_wins_and_mac_is_the_last_resort(
        tmp_path: Path) -> None:
    write_annotation(tmp_path / "leases", shapes.lease_entry("net1", mac=MAC),
                     shapes.lease_entry("net2", mac="02:00:00:00:00:22"))
    by_status, by_mac = leases.wait_for_leases(
        [Interface("fast", None, "net1"), Interface("fast2", "02:00:00:00:00:22", None)],
        network_info=None, leases=str(tmp_path / "leases"), timeout=0)
    assert "ifname=net1," in by_status.qemu_netdev and by_status.mac == MAC  # MAC from the lease
    assert "ifname=net2," in by_mac.qemu_netdev


def test_network_info_device_info_with_our_netkit_key_is_used(tmp_path: Path) -> None:
    entry = shapes.lease_entry("pod123", mac=MAC)
    netkit = {"master": "ens1f0np0", "pairing": "single", "mode": "l2", "interface": "pod123",
              "queues": [{"id": 1, "masterQueue": 12}], "qemuNetdev": entry["qemuNetdev"],
              "mapPath": entry["mapPath"], "mapStartIndex": 1}
    info = {"interfaces": [{"network": "fast", "deviceInfo": {
        "type": "netkit", "version": "1.1.0", "netkit": netkit}}]}
    (tmp_path / "network-info").write_text(json.dumps(info))
    (nic,) = leases.wait_for_leases([Interface("fast", MAC, None)],
                                    network_info=str(tmp_path / "network-info"), leases=None,
                                    timeout=0)
    assert nic.qemu_netdev == entry["qemuNetdev"]


def test_network_info_stripped_to_the_standard_fields_is_no_lease(tmp_path: Path) -> None:
    # What a Multus/KubeVirt parsing device-info into its Go struct leaves.
    info = {"interfaces": [{"network": "fast",
                            "deviceInfo": {"type": "netkit", "version": "1.1.0"}}]}
    (tmp_path / "network-info").write_text(json.dumps(info))
    with pytest.raises(LeaseError, match="no netkit lease for interface fast"):
        leases.wait_for_leases([Interface("fast", MAC, None)],
                               network_info=str(tmp_path / "network-info"), leases=None,
                               timeout=0)


def test_a_lease_that_appears_late_is_waited_for(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "leases"
    path.write_text("")  # the downward API file exists, the annotation does not yet
    clock.on_sleep = [None, None, lambda: write_annotation(
        path, shapes.lease_entry("net1", mac=MAC))]
    (nic,) = leases.wait_for_leases([Interface("fast", MAC, "net1")], network_info=None,
                                    leases=str(path), timeout=10, clock=clock,
                                    sleep=clock.sleep)
    assert nic.name == "fast" and clock.now == pytest.approx(1.5)


def test_a_lease_that_never_comes_is_a_clear_error_after_the_bound(tmp_path: Path) -> None:
    clock = Clock()
    with pytest.raises(LeaseError) as err:
        leases.wait_for_leases([Interface("fast", MAC, "net1")],
                               network_info=str(tmp_path / "absent"),
                               leases=str(tmp_path / "absent-too"), timeout=5, clock=clock,
                               sleep=clock.sleep)
    assert clock.now == pytest.approx(5)
    msg = str(err.value)
    assert "no netkit lease for interface fast (pod interface net1) after 5s" in msg
    assert "netkit.cni.dev/leases" in msg and "network-status" in msg


def test_a_lease_without_afxdp_fails_at_once_with_the_plugins_reason(tmp_path: Path) -> None:
    entry = shapes.lease_entry("net1", mac=MAC)
    for key in ("qemuNetdev", "mapPath", "mapStartIndex", "xskMode"):
        del entry[key]
    entry["afxdpUnavailable"] = "master ens1f0np0 has no cni-netkit XDP program"
    write_annotation(tmp_path / "leases", entry)
    clock = Clock()
    with pytest.raises(LeaseError, match="cannot carry AF_XDP: master ens1f0np0 has no"):
        leases.wait_for_leases([Interface("fast", MAC, "net1")], network_info=None,
                               leases=str(tmp_path / "leases"), timeout=30, clock=clock,
                               sleep=clock.sleep)
    assert clock.now == 0


def test_a_mac_missing_everywhere_is_a_clear_error(tmp_path: Path) -> None:
    entry = shapes.lease_entry("net1", mac=MAC)
    entry["mac"] = None
    write_annotation(tmp_path / "leases", entry)
    with pytest.raises(LeaseError, match="no MAC address: set macAddress on the VMI interface"):
        leases.wait_for_leases([Interface("fast", None, "net1")], network_info=None,
                               leases=str(tmp_path / "leases"), timeout=0)


def test_a_vmi_mac_other_than_the_netkits_is_refused(tmp_path: Path) -> None:
    write_annotation(tmp_path / "leases", shapes.lease_entry("net1", mac=MAC))
    with pytest.raises(LeaseError, match="asks for MAC 02:00:00:00:00:77 but the netkit has"):
        leases.wait_for_leases([Interface("fast", "02:00:00:00:00:77", "net1")],
                               network_info=None, leases=str(tmp_path / "leases"), timeout=0)


def test_a_lease_file_of_another_shape_is_an_error_not_a_wait(tmp_path: Path) -> None:
    (tmp_path / "leases").write_text("{not json")
    with pytest.raises(LeaseError, match="cannot read the lease files"):
        leases.wait_for_leases([Interface("fast", MAC, "net1")], network_info=None,
                               leases=str(tmp_path / "leases"), timeout=30)


# --- the plugin's lease files in the sidecar's directory of the hooks volume ---------


def test_the_plugins_lease_file_is_read_from_the_leases_dir(tmp_path: Path) -> None:
    shapes.write_plugin_lease_file(tmp_path, "net1", mac=MAC)
    (nic,) = leases.wait_for_leases([Interface("fast", MAC, "net1")], network_info=None,
                                    leases=None, leases_dir=str(tmp_path), timeout=0)
    # The map path is the compute container's (QEMU's): no --map-dir needed.
    assert "map-path=/var/run/kubevirt-hooks/hook-sidecar-0/cni-netkit/netkit-fast:c1:net1," \
        in nic.qemu_netdev
    assert (nic.name, nic.mac, nic.queues) == ("fast", MAC, 1)


def test_lease_files_are_matched_by_mac_too_and_come_before_the_other_sources(
        tmp_path: Path) -> None:
    shapes.write_plugin_lease_file(tmp_path, "pod1234", mac=MAC)
    write_annotation(tmp_path / "leases", shapes.lease_entry("pod1234", mac=MAC))
    (nic,) = leases.wait_for_leases([Interface("fast", MAC, None)], network_info=None,
                                    leases=str(tmp_path / "leases"),
                                    leases_dir=str(tmp_path), timeout=0)
    assert "/var/run/kubevirt-hooks/hook-sidecar-0/" in nic.qemu_netdev


def test_the_sidecar_reads_the_format_the_plugin_writes() -> None:
    from cni_netkit.plugin import leasefile  # noqa: PLC0415 - the sidecar may not import it

    assert leases.LEASE_FILE_FORMAT == leasefile.FORMAT
    assert Path(leasefile.file_name("net1")).match(leases.LEASE_FILE_GLOB)


def test_a_lease_file_of_another_format_is_an_error_not_a_wait(tmp_path: Path) -> None:
    (tmp_path / "cni-netkit-net1.json").write_text(json.dumps(
        {"format": "cni-netkit.dev/lease/v2", "lease": {}}))
    with pytest.raises(LeaseError, match=r"is not a cni-netkit\.dev/lease/v1 lease file"):
        leases.wait_for_leases([Interface("fast", MAC, "net1")], network_info=None,
                               leases=None, leases_dir=str(tmp_path), timeout=30)


def test_a_lease_file_that_appears_late_is_waited_for_and_a_missing_one_named(
        tmp_path: Path) -> None:
    clock = Clock()
    clock.on_sleep = [None, lambda: shapes.write_plugin_lease_file(tmp_path, "net1", mac=MAC)]
    (nic,) = leases.wait_for_leases([Interface("fast", MAC, "net1")], network_info=None,
                                    leases=None, leases_dir=str(tmp_path), timeout=10,
                                    clock=clock, sleep=clock.sleep)
    assert nic.name == "fast" and clock.now == pytest.approx(1.0)
    with pytest.raises(LeaseError) as err:
        leases.wait_for_leases([Interface("slow", "02:00:00:00:00:77", "net2")], network_info=None,
                               leases=None, leases_dir=str(tmp_path), timeout=0)
    assert f"lease files {tmp_path}/cni-netkit-*.json have ['net1']" in str(err.value)
    assert "xskMapSubdir" in str(err.value)


def test_a_lease_file_without_afxdp_fails_at_once_with_the_plugins_reason(
        tmp_path: Path) -> None:
    entry = shapes.lease_entry("net1", mac=MAC)
    for key in ("qemuNetdev", "mapPath", "mapStartIndex", "xskMode"):
        del entry[key]
    entry["afxdpUnavailable"] = "master ens1f0np0 has no cni-netkit XDP program"
    (tmp_path / "cni-netkit-net1.json").write_text(json.dumps(
        {"format": leases.LEASE_FILE_FORMAT, "owner": {}, "lease": entry}))
    clock = Clock()
    with pytest.raises(LeaseError, match="cannot carry AF_XDP: master ens1f0np0 has no"):
        leases.wait_for_leases([Interface("fast", MAC, "net1")], network_info=None,
                               leases=None, leases_dir=str(tmp_path), timeout=30,
                               clock=clock, sleep=clock.sleep)
    assert clock.now == 0
