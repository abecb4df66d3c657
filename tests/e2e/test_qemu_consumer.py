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
import signal
import subprocess
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
    RxRing,
    loopback,
    privileges,
    rx_rings,
    send_on_rx_queue,
    start_qemu,
    tag,
    tagged,
    umem_registration,
    wait_for_sockets,
)
from tests.kernel.xsk_support import FRAME, XDP_PASS, bpf_object

pytestmark = pytest.mark.kernel

FRAMES_PER_QUEUE = 50
QPA = 1


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
            # netdevsim has no AF_XDP zero-copy: the kernel bound QEMU's sockets in copy
            # mode (QEMU asks for neither), as the result said it would.
            assert nk[pod]["xskMode"] == "copy"
            assert xdp_sockets(pods[pod]).count("zc:0") == QPA, xdp_sockets(pods[pod])
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
    """32 MiB of UMEM per queue, charged to RLIMIT_MEMLOCK without CAP_IPC_LOCK: 8 MiB refuse.

    The kernel's answer to the registration is ENOBUFS (xdp_umem_account_pages);
    QEMU 10.2 then crashes in its error path (SIGSEGV) without a word.
    """
    conf = runtime.conf(steered.name, queues="1-4", xskMapOwner=WORKLOAD_OWNER)
    netns = make_netns()
    result = add(runtime, conf, "vm-a", netns)
    assert umem_registration(netns, QEMU_UMEM, memlock=RUNTIME_MEMLOCK) == "ENOBUFS"
    assert umem_registration(netns, QEMU_UMEM, memlock=QEMU_UMEM) == "ok"
    qemu = start_qemu(netns, result["netkit"]["qemuNetdev"], memlock=RUNTIME_MEMLOCK)
    assert qemu.wait() == -signal.SIGSEGV, qemu.output
    assert xsk.verdict(steered.name, result["netkit"]["queues"][0]["masterQueue"],
                       FRAME) == XDP_PASS
    delete(runtime, conf, "vm-a", netns, result)


def test_without_xsk_map_owner_the_unprivileged_qemu_cannot_open_the_pin(
    steered: Nic, root: Path, make_netns: Any, runtime: Runtime
) -> None:
    """The one step the kernel refuses uid 107 without xskMapOwner: BPF_OBJ_GET, by the
    pin's mode (0600 root): EACCES; its socket and UMEM were made without a capability."""
    conf = runtime.conf(steered.name, queues="1-4")
    netns = make_netns()
    result = add(runtime, conf, "vm-a", netns)
    qemu = start_qemu(netns, result["netkit"]["qemuNetdev"], memlock=QEMU_UMEM)
    assert qemu.wait() == 1
    assert (f"failed to insert AF_XDP socket into map {result['netkit']['mapPath']}: "
            "Permission denied") in qemu.output, qemu.output
    delete(runtime, conf, "vm-a", netns, result)


def test_lease_only_arguments_cannot_carry_traffic(
    nic: Nic, root: Path, make_netns: Any, runtime: Runtime
) -> None:
    """A master without the agent's program: what QEMU does with ``ifname,queues,start-queue``
    (what the result used to carry there), so the result now carries no QEMU arguments.

    QEMU must load its own XDP program on the netkit. Unprivileged, libxdp's
    load is refused (EPERM: no CAP_BPF); as root the netkit refuses it in
    native mode (EOPNOTSUPP) and QEMU's retry in generic mode fails on the
    socket it already bound (EBUSY). Either way QEMU does not start.
    """
    conf = runtime.conf(nic.name, queues="1-4")
    netns = make_netns()
    result = add(runtime, conf, "vm-a", netns)
    nk = result["netkit"]
    assert "qemuNetdev" not in nk and "dpdkVdev" not in nk and "mapPath" not in nk
    assert "no cni-netkit XDP program" in nk["afxdpUnavailable"]
    lease_only = f"ifname=net1,queues=1,start-queue={nk['queues'][0]['id']}"

    refused = start_qemu(netns, lease_only, memlock=QEMU_UMEM)
    assert refused.wait() == 1
    assert "libxdp: Failed to load dispatcher: Operation not permitted" in refused.output
    assert "failed to create AF_XDP socket for net1 queue_id: 1:" in refused.output

    as_root = start_qemu(netns, lease_only, memlock=QEMU_UMEM, privileged=True)
    assert as_root.wait() == 1
    assert "Error attaching XDP program to ifindex" in as_root.output
    assert "Operation not supported" in as_root.output
    assert ("failed to create AF_XDP socket for net1 queue_id: 1: Device or resource busy"
            in as_root.output), as_root.output
    delete(runtime, conf, "vm-a", netns, result)


def test_qemu_with_two_queues_gets_every_frame_per_queue_and_reads_only_its_last(
    steered: Nic, root: Path, make_netns: Any, runtime: Runtime
) -> None:
    """``queuesPerAttachment: 2``, QEMU ``queues=2`` with the result's arguments verbatim.

    QEMU binds one socket to each netkit queue and inserts it at that queue's index, so
    the program redirects each leased queue to it, and the kernel puts every frame of
    each leased queue, and none of another's, into that queue's socket: counted in the
    sockets' own RX rings (``rx_rings``). QEMU itself reads only its last queue's
    socket: net/af-xdp.c enables the read handler once, after its per-queue loop, for
    the last queue's state (``af_xdp_read_poll(s, true)``; with ``inhibit=off`` for the
    first), and nothing enables the others' until a send to the peer completes, which
    cannot happen before one is read. So the first queue's frames wait in its ring
    forever, with a guest's multi-queue NIC as here with a hub (the hub peers with
    queue 0 only; queue 1's frames, read, have no peer and are dropped). This pins
    QEMU's behaviour: when QEMU reads every queue, the ``consumed`` figures change."""
    conf = runtime.conf(steered.name, queues="1-4", queuesPerAttachment=2,
                        xskMapOwner=WORKLOAD_OWNER)
    netns = make_netns()
    result = add(runtime, conf, "vm-a", netns)
    nk = result["netkit"]
    queues = sorted(nk["queues"], key=lambda q: q["id"])
    assert [q["id"] for q in queues] == [1, 2]
    assert "queues=2,start-queue=1," in nk["qemuNetdev"]
    assert nk["qemuNetdev"].endswith(",map-start-index=1")
    leased = [q["masterQueue"] for q in queues]
    other = next(q for q in range(1, 5) if q not in leased)
    assert {xsk.verdict(steered.name, q, FRAME) for q in leased} == {XDP_PASS}
    qemu = start_qemu(netns, nk["qemuNetdev"], memlock=2 * QEMU_UMEM)
    try:
        wait_for_sockets(qemu, steered.name, leased)  # a socket at each queue's index
        assert xdp_sockets(netns).count("zc:0") == 2, xdp_sockets(netns)
        wired = xsk.wiring(steered.name, leased)
        assert {q: wired[q].index for q in leased} == {leased[0]: 1, leased[1]: 2}
        assert rx_rings(qemu.proc.pid) == [RxRing(1, 0, 0), RxRing(2, 0, 0)], xdp_sockets(netns)

        sent = {q: FRAMES_PER_QUEUE + 10 * i for i, q in enumerate([*leased, other])}
        for q, n in sent.items():
            send_on_rx_queue(steered, q, (tagged(tag("a", q, i)) for i in range(n)))
        out = qemu.sink.tags(timeout=5.0)
        rings = rx_rings(qemu.proc.pid)
        print(json.dumps({"sent": sent, "rings": [vars(r) for r in rings],
                          "out of QEMU": len(out)}))
        # The kernel: each netkit queue's socket got exactly its master queue's frames.
        assert [(r.queue, r.produced) for r in rings] == [
            (1, sent[leased[0]]), (2, sent[leased[1]])], xdp_sockets(netns)
        # QEMU: the last queue read, the first never.
        assert [(r.queue, r.consumed) for r in rings] == [(1, 0), (2, sent[leased[1]])]
        assert out == []
    finally:
        rc = qemu.stop()
    assert rc == 0, qemu.output
    assert {xsk.verdict(steered.name, q, FRAME) for q in leased} == {XDP_PASS}
    delete(runtime, conf, "vm-a", netns, result)
    assert leased_queues(steered) == {} and xsk.wiring(steered.name) == {}
