"""The real `netkit` executable against the real 7.x kernel, invoked as a runtime does.

Every test reads kernel state back independently (queue-get on the netdevsim
master, link dumps) rather than trusting the plugin's own output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import (
    Nic,
    Runtime,
    cni_plugins_dir,
    leased_queues,
    make_nic,
    netkit_links,
)

pytestmark = pytest.mark.kernel

VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]


def with_prev(conf: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    return {**conf, "prevResult": result}


# Every version through the agent, and the newest also with the plugin running
# in the executable itself (no agent on the node).
@pytest.mark.parametrize(
    ("version", "cold"), [*((v, False) for v in VERSIONS), ("1.1.0", True)],
    ids=[*VERSIONS, "1.1.0-cold"],
)
def test_add_check_del_del_in_every_version(
    version: str, cold: bool, nic: Nic, make_netns: Any, runtime: Runtime
) -> None:
    netns = make_netns()
    conf = runtime.conf(nic.name, cniVersion=version, queuesPerAttachment=2)
    added = runtime("ADD", conf, netns=netns, cold=cold)
    assert added.code == 0, added.stdout + added.stderr
    result = added.json
    assert result["cniVersion"] == version
    (iface,) = result["interfaces"]
    assert iface["name"] == "net1" and iface["sandbox"] == netns
    nk = result["netkit"]
    assert [q["id"] for q in nk["queues"]] == [1, 2]
    # A lease-only master (no steering program): no consumer arguments that could not
    # carry traffic, and the result says why (tests/e2e/test_qemu_consumer.py).
    assert "qemuNetdev" not in nk and "dpdkVdev" not in nk
    assert nk["afxdpUnavailable"]
    if version == "1.1.0":
        assert iface["mtu"] == 1500
    else:
        assert "mtu" not in iface

    leases = leased_queues(nic)
    masters = sorted(q["masterQueue"] for q in nk["queues"])
    assert sorted(leases) == masters
    (link,) = netkit_links(netns)
    assert {leases[m]["ifindex"] for m in masters} == {link.index}
    assert sorted(leases[m]["queue"] for m in masters) == [1, 2]
    assert link.netkit is not None and link.netkit.pairing == "single"
    assert link.up and link.mac == iface["mac"]

    checked = runtime("CHECK", with_prev(conf, result), netns=netns, cold=cold)
    if version in ("0.3.0", "0.3.1"):
        # CHECK arrived in 0.4.0: older configs get "incompatible version", as from libcni's skel.
        assert checked.json["code"] == 1, checked.stdout
    else:
        assert (checked.code, checked.stdout) == (0, ""), checked.stdout + checked.stderr
    deleted = runtime("DEL", with_prev(conf, result), netns=netns, cold=cold)
    assert (deleted.code, deleted.stdout) == (0, "")
    assert leased_queues(nic) == {}
    assert netkit_links(netns) == []
    again = runtime("DEL", with_prev(conf, result), netns=netns, cold=cold)
    assert (again.code, again.stdout) == (0, ""), again.stderr


def test_mac_from_runtime_config(nic: Nic, make_netns: Any, runtime: Runtime) -> None:
    netns = make_netns()
    conf = runtime.conf(nic.name, runtimeConfig={"mac": "02:12:34:56:78:9a"})
    out = runtime("ADD", conf, netns=netns)
    assert out.code == 0, out.stdout + out.stderr
    (link,) = netkit_links(netns)
    assert link.mac == "02:12:34:56:78:9a"
    assert runtime("DEL", conf, netns=netns).code == 0


def test_chained_after_another_plugin_keeps_prev_result(
    nic: Nic, make_netns: Any, runtime: Runtime
) -> None:
    netns = make_netns()
    prev = {
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "eth0", "mac": "02:00:00:00:00:aa", "sandbox": netns}],
        "ips": [{"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 0}],
        "routes": [{"dst": "0.0.0.0/0"}],
    }
    conf = {**runtime.conf(nic.name), "prevResult": prev}
    out = runtime("ADD", conf, netns=netns)
    assert out.code == 0, out.stdout + out.stderr
    res = out.json
    assert [i["name"] for i in res["interfaces"]] == ["eth0", "net1"]
    assert res["ips"] == prev["ips"]
    assert res["routes"] == prev["routes"]
    assert runtime("DEL", conf, netns=netns).code == 0
    assert leased_queues(nic) == {}


def test_pair_mode_with_host_local_ipam(
    nic: Nic, make_netns: Any, runtime: Runtime, tmp_path: Path
) -> None:
    if cni_plugins_dir() is None:
        pytest.fail("host-local missing: scripts/vm setup extracts containernetworking-plugins")
    netns = make_netns()
    ipam = {
        "type": "host-local",
        "ranges": [[{"subnet": "10.77.0.0/24"}]],
        "dataDir": str(tmp_path / "ipam"),
    }
    conf = runtime.conf(nic.name, pairing="pair", mode="l3", ipam=ipam)
    out = runtime("ADD", conf, netns=netns)
    assert out.code == 0, out.stdout + out.stderr
    res = out.json
    host_side, pod_side = res["interfaces"]
    assert pod_side["sandbox"] == netns and "sandbox" not in host_side
    (ip,) = res["ips"]
    assert ip["address"].startswith("10.77.0.") and ip["interface"] == 1
    # The lease sits on the pod-side peer, never on the primary.
    (peer,) = netkit_links(netns)
    assert peer.netkit is not None and not peer.netkit.primary
    assert {lease["ifindex"] for lease in leased_queues(nic).values()} == {peer.index}
    assert (tmp_path / "ipam" / "afxdp" / ip["address"].split("/")[0]).exists()

    assert runtime("CHECK", with_prev(conf, res), netns=netns).code == 0
    assert runtime("DEL", with_prev(conf, res), netns=netns).code == 0
    assert leased_queues(nic) == {}
    assert not (tmp_path / "ipam" / "afxdp" / ip["address"].split("/")[0]).exists()
    assert host_side["name"] not in {link.name for link in netkit_links(None)}


@pytest.mark.parametrize(
    ("step", "cold"),
    [("locked", False), ("created", False), ("leased:1", False), ("leased:1", True),
     ("leased:2", False), ("result", False)],
)
def test_add_failing_midway_leaves_nothing(
    step: str, cold: bool, nic: Nic, make_netns: Any, runtime: Runtime
) -> None:
    netns = make_netns()
    conf = runtime.conf(nic.name, queuesPerAttachment=2)
    out = runtime("ADD", conf, netns=netns, env={"CNI_NETKIT_TEST_FAULT": step}, cold=cold)
    assert out.code != 0
    assert out.json["code"] == 199 and step in out.json["msg"]
    assert leased_queues(nic) == {}
    assert netkit_links(netns) == []
    assert list((runtime.state_dir / "attachments").glob("*")) == []
    # ... and the pool is whole again.
    ok = runtime("ADD", conf, netns=netns)
    assert ok.code == 0, ok.stdout + ok.stderr


def test_sixteen_concurrent_adds_get_distinct_queues_and_17th_is_exhausted(
    make_netns: Any, runtime: Runtime
) -> None:
    nic = make_nic(17)
    try:
        # 16 cold plugins share one emulated vCPU here, so the lock holder runs
        # at 1/16 speed: wait as long as the config allows rather than return 11.
        conf = runtime.conf(nic.name, queues="1-16", lockTimeout=300)
        pods = [make_netns() for _ in range(17)]
        procs = [runtime.spawn("ADD", conf, container_id=f"c{i}", netns=ns)
                 for i, ns in enumerate(pods[:16])]
        results = []
        for p in procs:
            out, err = p.communicate(timeout=900)
            assert p.returncode == 0, out + err
            results.append(json.loads(out))
        got = [q["masterQueue"] for r in results for q in r["netkit"]["queues"]]
        assert sorted(got) == list(range(1, 17))
        assert sorted(leased_queues(nic)) == list(range(1, 17))

        seventeenth = runtime("ADD", conf, container_id="c16", netns=pods[16])
        assert seventeenth.code != 0
        err = seventeenth.json
        assert err["code"] == 100
        assert nic.name in err["msg"] and "1-16" in err["details"]
        assert netkit_links(pods[16]) == []

        # Exhausted is capacity, not readiness (containerd would mark the node NotReady).
        status = runtime("STATUS", conf)
        assert status.code == 0 and status.stdout == "", status.stdout
    finally:
        nic.remove()


def test_del_after_netns_deleted(nic: Nic, make_netns: Any, runtime: Runtime) -> None:
    import subprocess  # noqa: PLC0415

    netns = make_netns()
    conf = runtime.conf(nic.name)
    assert runtime("ADD", conf, netns=netns).code == 0
    subprocess.run(["ip", "netns", "del", Path(netns).name], check=True)
    assert leased_queues(nic) == {}  # the kernel ended the lease with the netns
    out = runtime("DEL", conf, netns=netns)
    assert (out.code, out.stdout) == (0, ""), out.stderr
    assert list((runtime.state_dir / "attachments").glob("*")) == []


def test_gc_removes_exactly_the_invalid_attachments(
    nic: Nic, make_netns: Any, runtime: Runtime
) -> None:
    conf = runtime.conf(nic.name)
    pods = {f"c{i}": make_netns() for i in range(3)}
    for cid, ns in pods.items():
        assert runtime("ADD", conf, container_id=cid, netns=ns).code == 0
    gc_conf = {**conf, "cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "net1"}]}
    out = runtime("GC", gc_conf)
    assert (out.code, out.stdout) == (0, ""), out.stderr
    assert netkit_links(pods["c0"]) == [] and netkit_links(pods["c2"]) == []
    assert len(netkit_links(pods["c1"])) == 1
    assert len(leased_queues(nic)) == 1
    # Without the key, GC removes nothing.
    assert runtime("GC", conf).code == 0
    assert len(netkit_links(pods["c1"])) == 1


def test_add_refuses_existing_ifname_and_missing_netns(
    nic: Nic, make_netns: Any, runtime: Runtime
) -> None:
    netns = make_netns()
    conf = runtime.conf(nic.name)
    assert runtime("ADD", conf, netns=netns).code == 0
    dup = runtime("ADD", conf, container_id="other", netns=netns)
    assert dup.json["code"] == 101
    assert len(leased_queues(nic)) == 1
    missing = runtime("ADD", conf, container_id="c9", netns="/var/run/netns/nope")
    assert missing.json["code"] == 8
    assert not Path("/var/run/netns/nope").exists()


def test_status_ready_then_version(nic: Nic, runtime: Runtime) -> None:
    conf = runtime.conf(nic.name)
    out = runtime("STATUS", conf)
    assert (out.code, out.stdout) == (0, ""), out.stderr
    version = runtime("VERSION", {"cniVersion": "1.1.0"})
    assert set(version.json["supportedVersions"]) == set(VERSIONS)
