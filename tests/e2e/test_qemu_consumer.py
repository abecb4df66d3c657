"""QEMU's af-xdp netdev, unprivileged in the pod, receives its leased queues' frames.

The seed's consumer for real: ADD through the executable on a master whose
XDP program the agent attached, then QEMU (built from Debian's source with
af-xdp, ``tests/e2e/consumers.py``) started in the pod's netns as KubeVirt's
virt-launcher would, as uid/gid 107 with only CAP_NET_RAW, its netdev
argument ``id=…,`` + the result's ``qemuNetdev`` verbatim. No guest OS: the
af-xdp netdev is joined through a hub to a ``-netdev dgram`` unix socket the
test reads, so every frame QEMU receives comes out to the test.
"""

from __future__ import annotations

import collections
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cni_netkit.kernel import xsk
from tests.e2e.conftest import Nic, Runtime, leased_queues, netkit_links
from tests.e2e.consumers import (
    CAP_NET_RAW,
    QEMU_UMEM,
    RUNTIME_MEMLOCK,
    WORKLOAD_GID,
    WORKLOAD_OWNER,
    WORKLOAD_UID,
    loopback,
    privileges,
    send_on_rx_queue,
    start_qemu,
    tag,
    tagged,
    wait_for_sockets,
)
from tests.kernel.xsk_support import FRAME, XDP_PASS, bpf_object, private_root

pytestmark = pytest.mark.kernel

FRAMES_PER_QUEUE = 50
QPA = 1


@pytest.fixture
def root(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    with private_root() as r:
        monkeypatch.setenv(xsk.ROOT_ENV, str(r))
        yield r


@pytest.fixture
def steered(nic: Nic, root: Path) -> Nic:
    """The NIC after the node agent's part: the program attached, its maps pinned."""
    xsk.ensure_program(nic.name, bpf_object(), root=root)
    loopback(nic)
    return nic


def k8s_args(pod: str) -> str:
    return f"K8S_POD_NAMESPACE=vms;K8S_POD_NAME={pod};K8S_POD_UID=uid-{pod}"


def xdp_sockets(netns: str) -> str:
    """``ss``'s view of the AF_XDP sockets in ``netns`` (queues, UMEM, drop counters)."""
    return subprocess.run(["nsenter", f"--net={netns}", "ss", "--xdp", "-a", "-e", "-m", "-p"],
                          capture_output=True, text=True, check=False).stdout


def add(runtime: Runtime, conf: dict[str, Any], pod: str, netns: str) -> dict[str, Any]:
    out = runtime("ADD", conf, container_id=f"c-{pod}", netns=netns,
                  env={"CNI_ARGS": k8s_args(pod), xsk.ROOT_ENV: str(xsk.bpf_root())})
    assert out.code == 0, out.stdout + out.stderr
    return out.json  # type: ignore[no-any-return]


def delete(runtime: Runtime, conf: dict[str, Any], pod: str, netns: str,
           result: dict[str, Any]) -> None:
    out = runtime("DEL", {**conf, "prevResult": result}, container_id=f"c-{pod}", netns=netns,
                  env={"CNI_ARGS": k8s_args(pod), xsk.ROOT_ENV: str(xsk.bpf_root())})
    assert (out.code, out.stdout) == (0, ""), out.stderr


def test_two_pods_qemus_receive_exactly_their_leased_queues_frames(
    steered: Nic, root: Path, make_netns: Any, runtime: Runtime
) -> None:
    conf = runtime.conf(steered.name, queues="1-4", queuesPerAttachment=QPA,
                        xskMapOwner=WORKLOAD_OWNER)
    pods = {pod: make_netns() for pod in ("vm-a", "vm-b")}
    results = {pod: add(runtime, conf, pod, netns) for pod, netns in pods.items()}
    nk = {pod: r["netkit"] for pod, r in results.items()}
    leased = {pod: [q["masterQueue"] for q in n["queues"]] for pod, n in nk.items()}
    for n in nk.values():
        pin = Path(n["mapPath"])
        assert (pin.stat().st_uid, pin.stat().st_gid, pin.stat().st_mode & 0o777) == (
            WORKLOAD_UID, WORKLOAD_GID, 0o600)
        assert f"queues={QPA}," in n["qemuNetdev"] and "inhibit=on" in n["qemuNetdev"]

    # Each QEMU's UMEM is charged to uid 107 as a whole, whatever the process.
    memlock = 2 * QPA * QEMU_UMEM
    qemus = {pod: start_qemu(pods[pod], n["qemuNetdev"], memlock=memlock)
             for pod, n in nk.items()}
    try:
        for pod, qemu in qemus.items():
            wait_for_sockets(qemu, steered.name, leased[pod])
            p = privileges(qemu.proc.pid)
            # setpriv execs the loader, which runs QEMU: the pid is QEMU's.
            assert (p.uid, p.gid, p.groups) == (WORKLOAD_UID, WORKLOAD_GID, ())
            assert p.effective == p.permitted == p.ambient == p.bounding == 1 << CAP_NET_RAW
            assert p.no_new_privs and p.memlock == memlock
        # The pod's map holds QEMU's sockets at indexes 1..N: the slots say which
        # index each queue goes to, the program's verdict that a socket is there.
        for pod in pods:
            wired = xsk.wiring(steered.name, leased[pod])
            assert sorted(w.index for w in wired.values()) == list(range(1, QPA + 1))

        sent: dict[str, collections.Counter[bytes]] = {}
        for pod in pods:
            sent[pod] = collections.Counter()
            for q in leased[pod]:
                tags = [tag(pod[-1], q, i) for i in range(FRAMES_PER_QUEUE)]
                send_on_rx_queue(steered, q, (tagged(t) for t in tags))
                sent[pod].update(tags)
        got = {pod: collections.Counter(qemu.sink.tags(timeout=5.0))
               for pod, qemu in qemus.items()}
        per_queue = {pod: collections.Counter(t.split(b"#")[0] for t in got[pod]) for pod in got}
        print(json.dumps({pod: {k.decode(): v for k, v in c.items()}
                          for pod, c in per_queue.items()}))
        for pod, netns in pods.items():
            assert got[pod] == sent[pod], (
                f"{pod}: {per_queue[pod]}\n{xdp_sockets(netns)}\n{qemus[pod].output}")
    finally:
        rcs = {pod: qemu.stop() for pod, qemu in qemus.items()}
    assert rcs == {"vm-a": 0, "vm-b": 0}, {pod: q.output for pod, q in qemus.items()}

    for pod, netns in pods.items():  # QEMU took its sockets out: frames go to the stack
        assert {xsk.verdict(steered.name, q, FRAME) for q in leased[pod]} == {XDP_PASS}
        delete(runtime, conf, pod, netns, results[pod])
        assert not Path(nk[pod]["mapPath"]).exists()
        assert netkit_links(netns) == []
    assert leased_queues(steered) == {}
    assert xsk.wiring(steered.name) == {}
    assert not (root / "pods").exists()


def test_qemus_umem_does_not_fit_the_runtimes_default_memlock(
    steered: Nic, root: Path, make_netns: Any, runtime: Runtime
) -> None:
    """32 MiB of UMEM per queue, charged to RLIMIT_MEMLOCK without CAP_IPC_LOCK: 8 MiB refuse."""
    conf = runtime.conf(steered.name, queues="1-4", xskMapOwner=WORKLOAD_OWNER)
    netns = make_netns()
    result = add(runtime, conf, "vm-a", netns)
    qemu = start_qemu(netns, result["netkit"]["qemuNetdev"], memlock=RUNTIME_MEMLOCK)
    rc = qemu.stop()
    # xdp_umem_account_pages: the user's locked pages would pass the limit.
    assert rc == 1 and "failed to create umem for net1 queue_index: 0: No buffer space available" \
        in qemu.output, qemu.output
    delete(runtime, conf, "vm-a", netns, result)
