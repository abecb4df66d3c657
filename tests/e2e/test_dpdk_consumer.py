"""DPDK's AF_XDP PMD, unprivileged in the pod, counts exactly its leased queues' frames.

``dpdk-testpmd --no-huge`` (Debian sid's, ``tests/e2e/consumers.py``) in the
pod's netns as uid/gid 107 with only CAP_NET_RAW (RLIMIT_MEMLOCK: see
DPDK_MEMLOCK), its port the result's ``dpdkVdev`` verbatim, forwarding
``rxonly``: its statistics must be the frames sent on its leased physical
queue, nothing from the other pod's queue. One queue: the PMD refuses
``queue_count`` above a netkit's channel count, 1 (docs/af_xdp.md).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from cni_netkit.kernel import xsk
from tests.e2e.conftest import Nic, Runtime, leased_queues
from tests.e2e.consumers import (
    RUNTIME_MEMLOCK,
    WORKLOAD_OWNER,
    loopback,
    send_on_rx_queue,
    sid_program,
    tag,
    tagged,
    workload,
)
from tests.kernel.xsk_support import FRAME, XDP_REDIRECT, bpf_object

pytestmark = pytest.mark.kernel

FRAMES_PER_QUEUE = 50
QPA = 1
# The PMD registers the memory of its mbuf pool as UMEM and fills its fill ring
# (2048 entries) from it, so the pool needs well over 2048 mbufs (8192: ~19 MB):
# the runtime's 8 MiB (RUNTIME_MEMLOCK) refuses the registration (ENOBUFS); the
# whole --no-huge memory (-m 64) is an upper bound.
DPDK_MEMLOCK = 64 << 20
PMDS = "usr/lib/x86_64-linux-gnu/dpdk/pmds-26.0"


@pytest.fixture
def steered(nic: Nic, root: Path) -> Nic:
    xsk.ensure_program(nic.name, bpf_object(), root=root)
    # Only our frames on the wire: no IPv6 neighbour/router traffic of the stack.
    Path(f"/proc/sys/net/ipv6/conf/{nic.name}/disable_ipv6").write_text("1")
    loopback(nic)
    return nic


def k8s_env(pod: str) -> dict[str, str]:
    return {"CNI_ARGS": f"K8S_POD_NAMESPACE=vms;K8S_POD_NAME={pod};K8S_POD_UID=uid-{pod}",
            xsk.ROOT_ENV: str(xsk.bpf_root())}


def start_testpmd(netns: str, vdev: str | list[str], queues: int,
                  memlock: int = DPDK_MEMLOCK, mbufs: int = 8192) -> subprocess.Popen[str]:
    """testpmd receiving on ``vdev``'s queues (a port per vdev) until a newline on stdin,
    then printing stats."""
    vdevs = [vdev] if isinstance(vdev, str) else vdev
    pmds = sid_program("dpdk", PMDS)[-1]
    argv = sid_program(
        "dpdk", "usr/bin/dpdk-testpmd", "--no-huge", "-m", "64", "--no-pci", "--in-memory",
        "--no-telemetry", "--lcores", "(0,1)@0",  # main and forwarding lcore on the VM's CPU
        "-d", f"{pmds}/librte_mempool_ring.so.26", "-d", f"{pmds}/librte_net_af_xdp.so.26",
        *(a for v in vdevs for a in ("--vdev", v)), "--",
        "--forward-mode=rxonly", f"--rxq={queues}", f"--txq={queues}", "--nb-cores=1",
        f"--total-num-mbufs={mbufs}", "--rxd=256", "--txd=256", "--no-mlockall",
    )
    return subprocess.Popen(workload(netns, argv, memlock=memlock),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def per_queue(stats: str) -> dict[int, int]:
    """RX packets by queue of port 0 from testpmd's statistics at exit (per stream when
    there are several, else the port's)."""
    streams = {int(q): int(n) for q, n in re.findall(
        r"Forward Stats for RX Port= 0/Queue= +(\d+) .*?\n\s+RX-packets: (\d+)", stats)}
    if streams:
        return streams
    (port,) = re.findall(r"Forward statistics for port 0 +-+\n\s+RX-packets: (\d+)", stats)
    return {0: int(port)}


def per_port(stats: str) -> dict[int, int]:
    """RX packets by port from testpmd's statistics at exit."""
    return {int(p): int(n) for p, n in re.findall(
        r"Forward statistics for port (\d+) +-+\n\s+RX-packets: (\d+)", stats)}


def test_testpmd_counts_exactly_the_frames_of_its_leased_queues(
    steered: Nic, root: Path, make_netns: Any, runtime: Runtime
) -> None:
    conf = runtime.conf(steered.name, queues="1-4", queuesPerAttachment=QPA,
                        xskMapOwner=WORKLOAD_OWNER)
    pods = {pod: make_netns() for pod in ("vm-a", "vm-b")}
    results = {}
    for pod, netns in pods.items():
        out = runtime("ADD", conf, container_id=f"c-{pod}", netns=netns, env=k8s_env(pod),
                      cold=True)
        assert out.code == 0, out.stdout + out.stderr
        results[pod] = out.json
    nk = results["vm-a"]["netkit"]
    mine = [q["masterQueue"] for q in sorted(nk["queues"], key=lambda q: q["id"])]
    theirs = [q["masterQueue"] for q in results["vm-b"]["netkit"]["queues"]]

    pmd = start_testpmd(pods["vm-a"], nk["dpdkVdev"], len(mine))
    try:
        deadline = time.monotonic() + 120
        while not all(xsk.verdict(steered.name, q, FRAME) == XDP_REDIRECT for q in mine):
            assert pmd.poll() is None, pmd.communicate()[0]
            assert time.monotonic() < deadline, "testpmd's sockets never arrived in the map"
            time.sleep(0.2)
        for q in mine + theirs:
            send_on_rx_queue(steered, q, (tagged(tag("x", q, i))
                                          for i in range(FRAMES_PER_QUEUE)))
        stats, _ = pmd.communicate("\n", timeout=120)
    finally:
        if pmd.poll() is None:
            pmd.kill()
            pmd.wait()
    assert pmd.returncode == 0, stats
    # testpmd's queue i is netkit queue start_queue + i, leased from mine[i].
    assert per_queue(stats) == dict.fromkeys(range(len(mine)), FRAMES_PER_QUEUE), stats

    for pod, netns in pods.items():
        out = runtime("DEL", {**conf, "prevResult": results[pod]}, container_id=f"c-{pod}",
                      netns=netns, env=k8s_env(pod), cold=True)
        assert (out.code, out.stdout) == (0, ""), out.stderr
    assert leased_queues(steered) == {} and xsk.wiring(steered.name) == {}


def test_a_two_queue_attachment_is_one_testpmd_port_per_queue(
    steered: Nic, root: Path, make_netns: Any, runtime: Runtime
) -> None:
    """The PMD takes a netkit's combined channel count as 1 (ETHTOOL_GCHANNELS is not
    supported there), so ``queue_count=2`` is refused; the result's ``dpdkVdevs``, one
    port per netkit queue, carry both queues: exact counts per queue, none from a
    queue of the pool this pod did not lease. Within DPDK_MEMLOCK thanks to the ports'
    ``shared_umem=1``: without it each port registers testpmd's whole mbuf pool again,
    and the second registration is refused there (ENOBUFS; both fit in twice that)."""
    conf = runtime.conf(steered.name, queues="1-4", queuesPerAttachment=2,
                        xskMapOwner=WORKLOAD_OWNER)
    netns = make_netns()
    env = k8s_env("vm-a")
    out = runtime("ADD", conf, container_id="c-vm-a", netns=netns, env=env)
    assert out.code == 0, out.stdout + out.stderr
    nk = out.json["netkit"]
    queues = sorted(nk["queues"], key=lambda q: q["id"])
    mine = [q["masterQueue"] for q in queues]
    assert "dpdkVdev" not in nk and len(nk["dpdkVdevs"]) == 2
    channels = subprocess.run(["nsenter", f"--net={netns}", "ethtool", "-l", "net1"],
                              capture_output=True, text=True, check=False)
    assert channels.returncode != 0 and "Operation not supported" in channels.stderr, channels

    pmd = start_testpmd(netns, nk["dpdkVdevs"], 1)
    sent = {0: 30, 1: 50}  # port i is netkit queue queues[i]: different counts tell them apart
    try:
        deadline = time.monotonic() + 120
        while not all(xsk.verdict(steered.name, q, FRAME) == XDP_REDIRECT for q in mine):
            assert pmd.poll() is None, pmd.communicate()[0]
            assert time.monotonic() < deadline, "testpmd's sockets never arrived in the map"
            time.sleep(0.2)
        for port, q in enumerate(mine):
            send_on_rx_queue(steered, q, (tagged(tag("x", q, i)) for i in range(sent[port])))
        for q in sorted({1, 2, 3, 4} - set(mine)):  # the pool's other queues: not ours
            send_on_rx_queue(steered, q, (tagged(tag("y", q, i)) for i in range(20)))
        stats, _ = pmd.communicate("\n", timeout=120)
    finally:
        if pmd.poll() is None:
            pmd.kill()
            pmd.wait()
    assert pmd.returncode == 0, stats
    print(json.dumps({"sent per port": sent, "received per port": per_port(stats)}))
    assert per_port(stats) == sent, stats
    out = runtime("DEL", {**conf, "prevResult": out.json}, container_id="c-vm-a", netns=netns,
                  env=env)
    assert (out.code, out.stdout) == (0, ""), out.stderr
    assert leased_queues(steered) == {} and xsk.wiring(steered.name) == {}


# One port's smallest working pool, found by a ladder of pools (1100-8192 mbufs) and
# limits (2-64 MiB) in the VM: fewer than 2048 mbufs cannot fill the PMD's fill ring
# ("Failed to configure xdp socket" at any limit); 2048 start (within 10 MiB, not 8)
# but receive nothing (every rx burst is short of mbufs); 3072 work within 16 MiB
# (12 refused) but, at the edge, drop frames when the machine is loaded (41 of 50 on a
# fresh-machine run); 4096 start within 24 MiB, 8192 within 48 (one port each).
MIN_MBUFS = 3072  # refused within the runtime's limit
WORKING_MBUFS, WORKING_MEMLOCK = 4096, 24 << 20  # receives every frame of its queue


def test_testpmds_smallest_pool_per_queue_and_the_runtimes_memlock(
    steered: Nic, root: Path, make_netns: Any, runtime: Runtime
) -> None:
    """The memlock one testpmd queue needs: a pool with margin (WORKING_MBUFS) receives
    every frame of its queue within WORKING_MEMLOCK, and the smallest pool's UMEM registration is
    refused within the runtime's default RLIMIT_MEMLOCK (8 MiB): a DPDK pod needs a raised
    limit or CAP_IPC_LOCK, as QEMU does (docs/af_xdp.md, "Memlock")."""
    conf = runtime.conf(steered.name, queues="1-4", queuesPerAttachment=1,
                        xskMapOwner=WORKLOAD_OWNER)
    netns = make_netns()
    env = k8s_env("vm-a")
    out = runtime("ADD", conf, container_id="c-vm-a", netns=netns, env=env)
    assert out.code == 0, out.stdout + out.stderr
    nk = out.json["netkit"]
    (q,) = [q["masterQueue"] for q in nk["queues"]]

    refused = start_testpmd(netns, nk["dpdkVdev"], 1, memlock=RUNTIME_MEMLOCK, mbufs=MIN_MBUFS)
    text, _ = refused.communicate("\n", timeout=120)
    assert refused.returncode != 0 and (
        "Failed to create umem [105]: [No buffer space available]" in text), text

    pmd = start_testpmd(netns, nk["dpdkVdev"], 1, memlock=WORKING_MEMLOCK, mbufs=WORKING_MBUFS)
    try:
        deadline = time.monotonic() + 120
        while xsk.verdict(steered.name, q, FRAME) != XDP_REDIRECT:
            assert pmd.poll() is None, pmd.communicate()[0]
            assert time.monotonic() < deadline, "testpmd's socket never arrived in the map"
            time.sleep(0.2)
        send_on_rx_queue(steered, q, (tagged(tag("m", q, i)) for i in range(FRAMES_PER_QUEUE)))
        stats, _ = pmd.communicate("\n", timeout=120)
    finally:
        if pmd.poll() is None:
            pmd.kill()
            pmd.wait()
    assert pmd.returncode == 0, stats
    print(json.dumps({"mbufs": WORKING_MBUFS, "memlock MiB": WORKING_MEMLOCK >> 20,
                      "received": per_queue(stats)}))
    assert per_queue(stats) == {0: FRAMES_PER_QUEUE}, stats
    out = runtime("DEL", {**conf, "prevResult": out.json}, container_id="c-vm-a", netns=netns,
                  env=env)
    assert (out.code, out.stdout) == (0, ""), out.stderr
    assert leased_queues(steered) == {} and xsk.wiring(steered.name) == {}
