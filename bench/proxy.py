"""What the netkit proxy costs an AF_XDP socket: leased queue vs the physical queue (VM only).

``python -m bench.proxy [--samples N] [--batch B] [--rounds R] [--cross-samples C]
[--loopback-frames F] [--loopback-rounds L]`` prints JSON on stdout.

One netdevsim master with our XDP program attached (``kernel.xsk``), and a
copy-mode AF_XDP socket with its own UMEM, bound one of two ways:

- ``leased``: in a pod netns, bound to queue 1 of the pod's netkit, which
  leases physical queue 0 (a real ADD through the plugin, the queue declared
  in ``CNI_NETKIT_MASTERS``), and put into the attachment's XSK map, as QEMU
  or DPDK do;
- ``direct``: in the host netns, bound to physical queue 0 of the master
  itself, in an XSK map wired to that queue the same way (same program, same
  lookups: only the socket's binding differs).

Why queue 0 for both: in live-frames mode (``BPF_F_TEST_XDP_LIVE_FRAMES``)
the kernel runs the frames on a fake rxq of its own, registered with queue
index 0 of the ingress device (``xdp_test_run_setup`` in net/bpf/test_run.c:
``xdp_rxq_info_reg(&xdp->rxq, orig_ctx->rxq->dev, 0, 0)``), whatever
``rx_queue_index`` the context names. So the program sees queue 0, and
``xsk_rcv_check`` (net/xdp/xsk.c) accepts a redirect only into a socket bound
to that device's queue 0. The two sockets cannot hold queue 0 at once (a
queue bound by AF_XDP cannot be leased, a leased one cannot be bound), so the
run alternates blocks in one boot: (ADD, leased samples, DEL, direct samples)
x ``R`` rounds (default: one sample per block), the two in reverse order
every other round, so that load drift hits both sides alike.

A sample is one ``BPF_PROG_TEST_RUN`` of ``B`` live frames: each runs the
master's program and its XDP_REDIRECT is carried out through the XSK map into
the socket's RX ring (copy mode: the frame is copied into the UMEM). The
kernel times its loop: ns per frame from program entry to the frame in the
ring. Then the RX ring is read and its buffers go back to the fill ring,
outside the timed part. Every frame must arrive: one missing frame fails the
run (a rate of frames that were lost is no rate). Each block starts with one
warm-up sample, not counted.

:func:`measure_two_masters` cross-checks it on two identical masters, the
two sockets open at once and alternating every sample (no ADD or DEL
between them), ``C`` samples per side.

``--loopback-frames F`` (0: skipped) measures the real receive path too
(netdevsim loopback): native vs generic XDP on the master, and leased vs
direct again: see :func:`measure_loopback`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import mmap
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import pct, summary
from bench.steering import FRAME, PROGRAM, make_nic

AF_XDP, SOL_XDP = 44, 283
XDP_MMAP_OFFSETS, XDP_RX_RING, XDP_UMEM_REG = 1, 2, 4
XDP_UMEM_FILL_RING, XDP_UMEM_COMPLETION_RING, XDP_STATISTICS = 5, 6, 7
XDP_COPY = 1 << 1
XDP_PGOFF_RX_RING, XDP_UMEM_PGOFF_FILL_RING = 0, 0x100000000
FRAME_SIZE = 2048
RING = 4096  # entries of each ring, and frames of each UMEM
QUEUE = 0  # the only queue live frames run on (the module's docstring says why)
SLOT = 1  # the direct socket's index in its XSK map
NSIM_DEBUGFS = Path("/sys/kernel/debug/netdevsim")
_libc = ctypes.CDLL(None, use_errno=True)


def summary10(values: list[float]) -> dict[str, float]:
    """``summary`` plus p10: the low end the shared machine's load disturbs least."""
    return {**summary(values), "p10": round(pct(values, 0.1), 2)}


class FramesLost(RuntimeError):
    """A sample where not every frame sent reached the socket's RX ring."""


class Receiver:
    """A copy-mode AF_XDP socket with a UMEM of ``RING`` frames, all on the fill ring."""

    def __init__(self, sock: socket.socket, ifindex: int, queue: int) -> None:
        self.sock = sock
        self.foreign = 0  # frames ``drain`` found not to begin with its ``match``
        fd = sock.fileno()
        self.umem = mmap.mmap(-1, RING * FRAME_SIZE)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self.umem))
        sock.setsockopt(SOL_XDP, XDP_UMEM_REG,
                        struct.pack("QQIIII", addr, len(self.umem), FRAME_SIZE, 0, 0, 0))
        for ring in (XDP_UMEM_FILL_RING, XDP_UMEM_COMPLETION_RING, XDP_RX_RING):
            sock.setsockopt(SOL_XDP, ring, RING)
        off = struct.unpack("16Q", sock.getsockopt(SOL_XDP, XDP_MMAP_OFFSETS, 128))
        self.rx_prod, self.rx_cons, self.rx_desc = off[0:3]
        self.fill_prod, _, self.fill_desc = off[8:11]
        self.rx = mmap.mmap(fd, self.rx_desc + RING * 16, offset=XDP_PGOFF_RX_RING)
        self.fill = mmap.mmap(fd, self.fill_desc + RING * 8, offset=XDP_UMEM_PGOFF_FILL_RING)
        for i in range(RING):
            struct.pack_into("Q", self.fill, self.fill_desc + 8 * i, i * FRAME_SIZE)
        struct.pack_into("I", self.fill, self.fill_prod, RING)
        sxdp = ctypes.create_string_buffer(
            struct.pack("HHIII", AF_XDP, XDP_COPY, ifindex, queue, 0))
        if _libc.bind(fd, sxdp, len(sxdp.raw)) != 0:
            err = ctypes.get_errno()
            self.close()
            raise OSError(err, f"bind AF_XDP to ifindex {ifindex} queue {queue}: "
                               f"{os.strerror(err)}")

    def drain(self, match: bytes | None = None) -> int:
        """Frames in the RX ring now (with ``match``: those that begin with it, the others
        counted in ``foreign``); their buffers go back to the fill ring."""
        (prod,) = struct.unpack_from("I", self.rx, self.rx_prod)
        (cons,) = struct.unpack_from("I", self.rx, self.rx_cons)
        (fprod,) = struct.unpack_from("I", self.fill, self.fill_prod)
        others = 0
        for i in range(cons, prod):
            (addr,) = struct.unpack_from("Q", self.rx, self.rx_desc + 16 * (i % RING))
            if match is not None and self.umem[addr:addr + len(match)] != match:
                others += 1
            struct.pack_into("Q", self.fill, self.fill_desc + 8 * ((fprod + i - cons) % RING),
                             addr - addr % FRAME_SIZE)
        struct.pack_into("I", self.fill, self.fill_prod, (fprod + prod - cons) & 0xFFFFFFFF)
        struct.pack_into("I", self.rx, self.rx_cons, prod)
        self.foreign += others
        return int((prod - cons) & 0xFFFFFFFF) - others

    def stats(self) -> dict[str, int]:
        raw = self.sock.getsockopt(SOL_XDP, XDP_STATISTICS, 48)
        names = ("rx_dropped", "rx_invalid_descs", "tx_invalid_descs", "rx_ring_full",
                 "rx_fill_ring_empty_descs", "tx_ring_empty_descs")
        return dict(zip(names, struct.unpack(f"{len(raw) // 8}Q", raw), strict=False))

    def close(self) -> None:
        """Unmap the rings and close: the socket leaves its queue (and its XSK map) only
        once no mapping holds its file."""
        for m in (self.rx, self.fill) if hasattr(self, "fill") else ():
            m.close()
        self.sock.close()
        self.umem.close()


def live_sample(prog: int, ifindex: int, rx: Receiver, *, batch: int, side: str) -> float:
    """One live-frames run of ``batch`` frames into ``rx``, all counted there: ns/frame."""
    from cni_netkit.kernel import bpf  # noqa: PLC0415

    _, mean = bpf.xdp_test_run_timed(prog, FRAME, ifindex=ifindex, rx_queue=QUEUE,
                                     repeat=batch, live=True)
    arrived = rx.drain()
    if arrived != batch:
        raise FramesLost(f"{side}: {arrived} of {batch} live frames reached the RX ring; "
                         f"socket stats {rx.stats()}")
    return float(mean)


def live_block(prog: int, ifindex: int, rx: Receiver, samples: int, *, batch: int,
               side: str) -> list[float]:
    """One warm-up and ``samples`` live-frame runs of ``batch`` frames into ``rx``: ns/frame."""
    got = [live_sample(prog, ifindex, rx, batch=batch, side=side) for _ in range(samples + 1)]
    return got[1:]


class Setup:
    """The VM's NIC, program, pod netns and plugin config the two sides share."""

    def __init__(self, dev_id: int, queues: int = 4, *, parent: Setup | None = None) -> None:
        """``parent``: another master on the same node (its bpffs root and state dir)."""
        from cni_netkit.kernel import xsk  # noqa: PLC0415

        self.dev_id = dev_id
        self.parent = parent
        self.master, self.ifindex = make_nic(dev_id, queues)
        if parent is None:
            self.work = Path(tempfile.mkdtemp(prefix="bench-proxy-", dir="/run"))
            self.root = Path(tempfile.mkdtemp(prefix="bench-proxy-", dir="/sys/fs/bpf"))
        else:
            self.work, self.root = parent.work, parent.root
        os.environ[xsk.ROOT_ENV] = str(self.root)
        # Closed by default: the admin declares the queue the pod may lease.
        declared = f"{self.master}={QUEUE}"
        os.environ["CNI_NETKIT_MASTERS"] = (
            declared if parent is None else f"{parent.env['CNI_NETKIT_MASTERS']};{declared}")
        if parent is not None:
            parent.env["CNI_NETKIT_MASTERS"] = os.environ["CNI_NETKIT_MASTERS"]
        os.environ["CNI_NETKIT_STATE_DIRS"] = str(self.work / "state")
        self.pod = f"benchproxy{dev_id}"
        subprocess.run(["ip", "netns", "add", self.pod], check=True)  # noqa: S607
        # No IPv6 on the pod's netkit: its DAD and router-solicitation timers would fire
        # in the leased side's samples only (a pod's background, not a per-frame cost).
        subprocess.run(["ip", "netns", "exec", self.pod, "sh", "-c",  # noqa: S607
                        "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6"], check=True)
        self.env: dict[str, str] = {
            "CNI_COMMAND": "ADD", "CNI_NETNS": f"/run/netns/{self.pod}",
            "CNI_IFNAME": "net1", "CNI_PATH": "/nonexistent", "PATH": os.environ["PATH"],
            "CNI_ARGS": "K8S_POD_NAMESPACE=bench;K8S_POD_NAME=proxy",
            "CNI_NETKIT_MASTERS": os.environ["CNI_NETKIT_MASTERS"],
            "CNI_NETKIT_STATE_DIRS": os.environ["CNI_NETKIT_STATE_DIRS"]}
        self.conf = json.dumps({"cniVersion": "1.1.0", "name": "proxy", "type": "netkit",
                                "master": self.master, "queues": str(QUEUE),
                                "stateDir": str(self.work / "state")}).encode()
        self.added: list[str] = []

    def _run(self, command: str, cid: str) -> Any:
        """``command`` for container ``cid`` through the plugin, in this process."""
        from cni_netkit.config import parse_invocation  # noqa: PLC0415
        from cni_netkit.kernel import Kernel  # noqa: PLC0415
        from cni_netkit.plugin import commands  # noqa: PLC0415

        env = {**self.env, "CNI_COMMAND": command, "CNI_CONTAINERID": cid}
        with Kernel() as kernel:
            result = commands.run(parse_invocation(env, self.conf), kernel)
            links = kernel.links(netns=env["CNI_NETNS"]) if command == "ADD" else []
        return result, links

    def wait_queue_free(self, *, unbound_only: bool = False, timeout: float = 10.0) -> None:
        """Until the master's queue 0 is neither leased nor bound (``unbound_only``: not
        bound by AF_XDP, a lease may stay). A closed AF_XDP socket leaves its queue from
        deferred work (``xp_release_deferred``), not at close."""
        from cni_netkit.kernel import Kernel  # noqa: PLC0415

        deadline = time.monotonic() + timeout
        with Kernel() as kernel:
            while True:
                (q,) = [q for q in kernel.queues(self.ifindex) if q.type == "rx" and q.id == QUEUE]
                if not (q.xsk if unbound_only else q.in_use):
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"queue {QUEUE} of {self.master} (netdevsim{self.dev_id}) "
                                       f"still in use {timeout} s after its socket was closed: "
                                       f"{q}")
                time.sleep(0.01)

    def add(self, cid: str) -> dict[str, Any]:
        """ADD ``cid``: the result's netkit section, with the netkit's ifindex in the pod."""
        self.added.append(cid)
        result, links = self._run("ADD", cid)
        if result is None:
            raise RuntimeError("ADD returned no result")
        nk: dict[str, Any] = result.encode("1.1.0")["netkit"]
        (link,) = [lk for lk in links if lk.name == "net1"]
        nk["ifindex"] = link.index
        return nk

    def delete(self, cid: str) -> None:
        self._run("DEL", cid)
        self.added.remove(cid)

    def leased_receiver(self, nk: dict[str, Any]) -> Receiver:
        """A socket in the pod netns on the netkit's leased queue, in the attachment's map."""
        from cni_netkit.kernel import netns, xsk  # noqa: PLC0415

        (q,) = nk["queues"]
        if q["masterQueue"] != QUEUE:
            raise RuntimeError(f"ADD leased physical queue {q['masterQueue']}, not {QUEUE}")
        nsfd = netns.open_netns(self.env["CNI_NETNS"])
        try:
            sock = netns.socket_in(nsfd, AF_XDP, socket.SOCK_RAW, 0)
        finally:
            os.close(nsfd)
        rx = Receiver(sock, nk["ifindex"], q["id"])
        xsk.insert_socket(nk["mapPath"], nk["mapStartIndex"], rx.sock.fileno())
        return rx

    def direct_receiver(self, xsk_map: Any) -> Receiver:
        """A socket in the host netns on the master's queue 0, its map wired to the queue."""
        from cni_netkit.kernel import xsk  # noqa: PLC0415

        xsk.wire(self.master, xsk_map, [xsk.XskSlot(QUEUE, SLOT)], root=self.root)
        rx = Receiver(socket.socket(AF_XDP, socket.SOCK_RAW, 0), self.ifindex, QUEUE)
        xsk.insert_socket(xsk_map.path, SLOT, rx.sock.fileno())
        return rx

    def close(self) -> None:
        from cni_netkit.kernel import xsk  # noqa: PLC0415

        for cid in list(self.added):
            with contextlib.suppress(Exception):
                self.delete(cid)
        subprocess.run(["ip", "netns", "del", self.pod], check=False)  # noqa: S607
        with contextlib.suppress(Exception):
            xsk.remove_program(self.master, root=self.root)
        if self.parent is None:  # a child closes first, its parent's directories last
            subprocess.run(["rm", "-rf", str(self.root), str(self.work)],  # noqa: S607
                           check=False)
        Path("/sys/bus/netdevsim/del_device").write_text(str(self.dev_id))


def interleaved(rounds: int, per_block: int,
                sides: dict[str, Callable[[int], list[float]]]) -> dict[str, list[float]]:
    """``rounds`` x (each side's block of ``per_block`` samples); the sides' order is
    reversed every other round (A B, B A, ...), so neither always follows the other."""
    got: dict[str, list[float]] = {k: [] for k in sides}
    for rnd in range(rounds):
        order = list(sides.items())
        for name, block in order[::-1] if rnd % 2 else order:
            values = block(rnd)
            if len(values) != per_block:
                raise RuntimeError(f"{name}: {len(values)} samples, expected {per_block}")
            got[name] += values
    return got


def measure(samples: int, batch: int, rounds: int, dev_id: int = 41) -> dict[str, Any]:
    from cni_netkit import logs  # noqa: PLC0415
    from cni_netkit.kernel import bpf, xsk  # noqa: PLC0415

    if batch > RING:
        raise SystemExit(f"--batch must be <= {RING} (the ring holds a batch)")
    logs.configure()  # the plugin's log lines to stderr: stdout is this module's JSON
    per_block = math.ceil(samples / rounds)
    started = time.monotonic()
    s = Setup(dev_id)
    try:
        change = xsk.ensure_program(s.master, str(PROGRAM), root=s.root)
        direct_map = xsk.create_map(s.root / "direct")
        stats: dict[str, dict[str, int]] = {}
        with contextlib.closing(_Fd(bpf.prog_fd_by_id(change.program.prog_id or 0))) as prog:

            def leased(rnd: int) -> list[float]:
                cid = f"proxy{rnd}"
                s.wait_queue_free()
                nk = s.add(cid)
                rx = s.leased_receiver(nk)
                try:
                    got = live_block(prog.fd, s.ifindex, rx, per_block, batch=batch,
                                     side="leased")
                    stats["leased"] = rx.stats()
                finally:
                    rx.close()
                # The pod's socket off the queue before its netkit goes, as a pod's DEL
                # finds it (the workload has exited).
                s.wait_queue_free(unbound_only=True)
                s.delete(cid)
                return got

            def direct(_rnd: int) -> list[float]:
                s.wait_queue_free()
                rx = s.direct_receiver(direct_map)
                try:
                    got = live_block(prog.fd, s.ifindex, rx, per_block, batch=batch,
                                     side="direct")
                    stats["direct"] = rx.stats()
                finally:
                    rx.close()
                    xsk.unwire(s.master, [QUEUE], direct_map.map_id, root=s.root)
                return got

            ns = interleaved(rounds, per_block, {"leased": leased, "direct": direct})
    finally:
        s.close()
    per = {k: summary10(v) for k, v in ns.items()}
    rate = {k: {q: round(1e9 / v[q]) for q in ("p50", "p90")} for k, v in per.items()}
    n = len(ns["leased"])
    return {
        "master": {"driver": "netdevsim", "xdp_mode": change.program.mode},
        "batch": batch, "samples": n, "rounds": rounds, "per_block": per_block,
        "order": "interleaved blocks: (ADD, leased samples, DEL, direct samples) x rounds, "
                 "the two in reverse order every other round, one warm-up sample per block "
                 "not counted",
        "queue": QUEUE, "mode": "copy (XDP_COPY)",
        "frames_delivered": {k: batch * (rounds * (per_block + 1)) for k in ns},
        "frames_lost": dict.fromkeys(ns, 0),  # any loss fails the run (FramesLost)
        "ns_per_frame": per,
        "frames_per_s_at": rate,  # 1e9 / ns-per-frame at p50 and p90
        "socket_stats_last_block": stats,
        # receive rate ratio, leased / direct = direct ns / leased ns
        "rate_ratio_leased_vs_direct": {
            q: round(per["direct"][q] / per["leased"][q], 3)
            for q in ("p50", "p90", "p10", "min")},
        "paired_rate_ratio": summary([d / x for d, x in zip(ns["direct"], ns["leased"],
                                                             strict=True)]),
        "wall_s": round(time.monotonic() - started, 1),
    }


class _Fd:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)


def _wait_detached(ifindex: int, timeout: float = 10.0) -> None:
    """A released XDP link detaches from deferred work: wait until the device runs none."""
    from cni_netkit.kernel import bpf  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    while bpf.xdp_query(ifindex).prog_id:
        if time.monotonic() > deadline:
            raise RuntimeError(f"ifindex {ifindex} still runs an XDP program after {timeout} s")
        time.sleep(0.01)


SOL_PACKET, PACKET_VERSION, PACKET_TX_RING, TPACKET_V2 = 263, 10, 13, 1
TP_STATUS_SEND_REQUEST = 1
TPACKET2_DATA = 32  # TPACKET_ALIGN(sizeof(struct tpacket2_hdr)): where a TX frame's data goes
TX_FRAME = 2048  # bytes per TX ring frame (two per 4 KiB block)


def _steer_tx(name: str, queues: int, rx_queue: int) -> None:
    """Make what this CPU sends on ``name`` come back (netdevsim loopback) on ``rx_queue``.

    netdevsim hands a frame sent on TX queue t to its RX queue t with the
    skb's queue mapping unchanged, and XDP reads the RX queue as the mapping
    minus one (``netif_get_rxqueue``): the program sees t - 1. XPS picks t
    (the VM has one CPU).
    """
    for tx in range(queues):
        Path(f"/sys/class/net/{name}/queues/tx-{tx}/xps_cpus").write_text(
            "1" if tx == rx_queue + 1 else "0")


def _loopback_on(name: str) -> None:
    """netdevsim ``name`` receives what it sends, on RX queue 0 as XDP sees it."""
    # No IPv6 on the master: its router solicitations would loop back into the ring.
    Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1")
    subprocess.run(["ethtool", "-K", name, "loopback", "on"],  # noqa: S607
                   check=True, capture_output=True)
    _steer_tx(name, 4, QUEUE)


class Sender:
    """An AF_PACKET socket with a ``TPACKET_V2`` TX ring: ``frames`` copies of FRAME go out
    with one ``send`` (the kernel's ``tpacket_snd`` loop), so the sender costs little
    next to the receive path under test."""

    def __init__(self, name: str, frames: int) -> None:
        self.frames = frames
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self.sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
        block = mmap.PAGESIZE
        per_block = block // TX_FRAME
        blocks = math.ceil(frames / per_block)
        self.sock.setsockopt(SOL_PACKET, PACKET_TX_RING,
                             struct.pack("IIII", block, blocks, TX_FRAME, blocks * per_block))
        self.ring = mmap.mmap(self.sock.fileno(), block * blocks)
        self.sock.bind((name, 0))
        for i in range(frames):
            base = i * TX_FRAME
            self.ring[base + TPACKET2_DATA:base + TPACKET2_DATA + len(FRAME)] = FRAME
            struct.pack_into("I", self.ring, base + 4, len(FRAME))  # tp_len

    def arm(self) -> None:
        """Hand every frame of the ring to the kernel (outside the timed part)."""
        for i in range(self.frames):
            base = i * TX_FRAME
            (status,) = struct.unpack_from("I", self.ring, base)
            if status:
                raise RuntimeError(f"TX ring frame {i} still owned by the kernel ({status:#x})")
            struct.pack_into("I", self.ring, base, TP_STATUS_SEND_REQUEST)

    def send(self) -> int:
        """Send the armed frames: bytes the kernel reports sent."""
        return self.sock.send(b"")

    def close(self) -> None:
        self.ring.close()
        self.sock.close()


def loopback_block(tx: Sender, rx: Receiver, samples: int) -> list[float]:
    """One warm-up and ``samples`` sends of the TX ring, each frame counted in the RX ring.

    Per sample: ns per frame from the ``send`` to the last frame counted in
    the RX ring (on this one-CPU VM netdevsim's NAPI mostly runs inside the
    ``send``, when the sender re-enables bottom halves: receive path, program
    and copy into the socket's UMEM).
    """
    got: list[float] = []
    for i in range(samples + 1):
        tx.arm()
        t0 = time.perf_counter_ns()
        sent = tx.send()
        arrived = rx.drain(FRAME[:12])
        deadline = time.monotonic() + 5
        while arrived < tx.frames and time.monotonic() < deadline:
            arrived += rx.drain(FRAME[:12])
        t1 = time.perf_counter_ns()
        if arrived != tx.frames:
            raise FramesLost(f"loopback: {arrived} of {tx.frames} frames reached the RX ring "
                             f"(sample {i}, {sent} bytes sent); socket stats {rx.stats()}")
        if i:
            got.append((t1 - t0) / tx.frames)
    return got


def measure_two_masters(samples: int, batch: int, dev_ids: tuple[int, int] = (43, 44)
                        ) -> dict[str, Any]:
    """Leased vs direct alternating every sample: two identical netdevsim masters.

    The cross-check of :func:`measure`, without an ADD and a DEL between
    the two sides: master A's queue 0 leased to a pod's netkit (a real ADD)
    while master B's queue 0 is bound directly, each master running our
    program; samples alternate A B, B A, ... with both sockets open. Halfway
    the roles swap (DEL, then B's queue 0 leased and A's bound), so neither
    device is always one side. What differs from :func:`measure`: the two
    sides use two devices' queue 0, not one queue.
    """
    from cni_netkit.kernel import bpf, xsk  # noqa: PLC0415

    started = time.monotonic()
    a = Setup(dev_ids[0])
    try:
        b = Setup(dev_ids[1], parent=a)
    except BaseException:
        a.close()
        raise
    ns: dict[str, list[float]] = {"leased": [], "direct": []}
    fds: list[int] = []
    try:
        progs, maps = {}, {}
        for st in (a, b):
            change = xsk.ensure_program(st.master, str(PROGRAM), root=st.root)
            progs[st.dev_id] = bpf.prog_fd_by_id(change.program.prog_id or 0)
            fds.append(progs[st.dev_id])
            maps[st.dev_id] = xsk.create_map(st.root / f"direct{st.dev_id}")
        half = math.ceil(samples / 2)
        for phase, (lessor, plain) in enumerate(((a, b), (b, a))):
            lessor.wait_queue_free()
            plain.wait_queue_free()
            cid = f"two{phase}"
            rxs = []
            try:
                rxs.append(("leased", lessor, lessor.leased_receiver(lessor.add(cid))))
                rxs.append(("direct", plain, plain.direct_receiver(maps[plain.dev_id])))
                for i in range(half + 1):  # sample 0 of each side: warm-up
                    for side, st, rx in rxs[::-1] if i % 2 else rxs:
                        v = live_sample(progs[st.dev_id], st.ifindex, rx, batch=batch, side=side)
                        if i:
                            ns[side].append(v)
            finally:
                for _, _, rx in rxs:
                    rx.close()
                if cid in lessor.added:
                    lessor.wait_queue_free(unbound_only=True)
                    lessor.delete(cid)
                xsk.unwire(plain.master, [QUEUE], maps[plain.dev_id].map_id, root=plain.root)
    finally:
        for fd in fds:
            os.close(fd)
        b.close()
        a.close()
    per = {k: summary10(v) for k, v in ns.items()}
    return {
        "masters": "two netdevsim masters, our program native on both",
        "batch": batch, "samples": len(ns["leased"]),
        "order": "both sockets open, samples alternating leased/direct (reversed every other "
                 "sample); roles of the two masters swapped halfway; one warm-up per phase",
        "frames_delivered": {k: batch * 2 * (half + 1) for k in ns},
        "frames_lost": dict.fromkeys(ns, 0),  # any loss fails the run (FramesLost)
        "ns_per_frame": per,
        "frames_per_s_at": {k: {q: round(1e9 / v[q]) for q in ("p50", "p90")}
                            for k, v in per.items()},
        "rate_ratio_leased_vs_direct": {
            q: round(per["direct"][q] / per["leased"][q], 3)
            for q in ("p50", "p90", "p10", "min")},
        "paired_rate_ratio": summary([d / x for d, x in zip(ns["direct"], ns["leased"],
                                                             strict=True)]),
        "wall_s": round(time.monotonic() - started, 1),
    }


LOOPBACK_SIDES = ("native direct", "generic direct", "native leased")


def measure_loopback(samples: int, frames: int, rounds: int, dev_id: int = 42
                     ) -> dict[str, Any]:
    """The real receive path: native vs generic XDP on the master, and leased vs direct.

    A netdevsim master with loopback on: frames sent on it (an AF_PACKET TX
    ring, :class:`Sender`) come back on its RX queue 0, run our program
    (attached by the real ``ensure_program``: native, or generic once
    netdevsim's debugfs ``bpf_xdpdrv_accept`` refuses native) and are
    redirected to a copy-mode socket, where every frame is counted. Sides,
    in interleaved blocks (``rounds`` of each, the program attached afresh per
    block): ``native direct`` and ``generic direct`` (the socket on the
    master's queue 0), ``native leased`` (the socket on the pod's netkit,
    leasing queue 0 through a real ADD). Same sender, same frames.

    What it can tell: netdevsim's "native" XDP is not a driver fast path.
    Its NAPI poll (``nsim_rcv``, drivers/net/netdevsim/netdev.c) runs the
    program with ``do_xdp_generic`` on the skb, the function generic XDP
    calls from ``__netif_receive_skb_core``: both modes run the same skb-based
    code, from two call sites (before GRO, after it). A real NIC's native path
    (an ``xdp_buff`` on the driver's page, no skb) cannot be measured here.
    """
    from cni_netkit.kernel import xsk  # noqa: PLC0415

    if frames > RING:
        raise SystemExit(f"--loopback-frames must be <= {RING} (the ring holds a run)")
    started = time.monotonic()
    per_block = math.ceil(samples / rounds)
    s = Setup(dev_id)
    knob = NSIM_DEBUGFS / f"netdevsim{dev_id}" / "ports" / "0" / "bpf_xdpdrv_accept"
    tx: Sender | None = None
    try:
        _loopback_on(s.master)
        sender = tx = Sender(s.master, frames)
        direct_map = xsk.create_map(s.root / "direct")
        foreign = dict.fromkeys(LOOPBACK_SIDES, 0)
        refused: dict[str, str | None] = {}

        def block(side: str) -> Callable[[int], list[float]]:
            mode, binding = side.split()

            def run(rnd: int) -> list[float]:
                knob.write_text("1" if mode == "native" else "0")
                change = xsk.ensure_program(s.master, str(PROGRAM), root=s.root)
                if change.program.mode != mode:
                    raise RuntimeError(f"asked for {mode} XDP, got {change.program.mode}")
                refused[mode] = change.native_refused
                s.wait_queue_free()
                cid = f"loopback{rnd}"
                rx = (s.leased_receiver(s.add(cid)) if binding == "leased"
                      else s.direct_receiver(direct_map))
                try:
                    return loopback_block(sender, rx, per_block)
                finally:
                    foreign[side] += rx.foreign
                    rx.close()
                    if binding == "leased":
                        s.wait_queue_free(unbound_only=True)
                        s.delete(cid)
                    else:
                        xsk.unwire(s.master, [QUEUE], direct_map.map_id, root=s.root)
                    xsk.remove_program(s.master, root=s.root)
                    _wait_detached(s.ifindex)
            return run

        ns = interleaved(rounds, per_block, {side: block(side) for side in LOOPBACK_SIDES})
    finally:
        if tx is not None:
            tx.close()
        with contextlib.suppress(OSError):
            knob.write_text("1")
        s.close()
    per = {k: summary(v) for k, v in ns.items()}

    def ratio(a: str, b: str) -> dict[str, Any]:
        """Receive rate of side a / side b (= b's ns / a's ns), p50 and p90, and paired."""
        return {**{q: round(per[b][q] / per[a][q], 3) for q in ("p50", "p90", "min")},
                "paired": summary([y / x for x, y in zip(ns[a], ns[b], strict=True)])}

    return {
        "master": "netdevsim, ethtool loopback on; an AF_PACKET TX ring sends on TX queue 1, "
                  "the program sees RX queue 0",
        "frames_per_sample": frames, "samples": len(ns[LOOPBACK_SIDES[0]]), "rounds": rounds,
        "order": "interleaved blocks: (" + ", ".join(LOOPBACK_SIDES) + ") x rounds, in "
                 "reverse order every other round, the program attached afresh per block, "
                 "one warm-up sample per block not counted",
        "frames_delivered": {k: frames * rounds * (per_block + 1) for k in ns},
        "frames_lost": dict.fromkeys(ns, 0),  # any loss fails the run (FramesLost)
        "foreign_frames": foreign,  # not ours (the kernel's own): not counted
        "native_refused_when_generic": refused.get("generic"),
        "ns_per_frame": per,  # the send to the last frame in the ring, per frame
        "frames_per_s_at": {k: {q: round(1e9 / v[q]) for q in ("p50", "p90")}
                            for k, v in per.items()},
        "rate_ratio_native_vs_generic": ratio("native direct", "generic direct"),
        "rate_ratio_leased_vs_direct": ratio("native leased", "native direct"),
        "wall_s": round(time.monotonic() - started, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.proxy")
    parser.add_argument("--samples", type=int, default=30, help="samples per side")
    parser.add_argument("--batch", type=int, default=2048, help="live frames per sample")
    parser.add_argument("--rounds", type=int, default=None,
                        help="blocks per side, interleaved (default: one per sample)")
    parser.add_argument("--cross-samples", type=int, default=150,
                        help="samples per side of the two-master cross-check (cheap: no ADD "
                             "between samples)")
    parser.add_argument("--loopback-frames", type=int, default=2048,
                        help="frames per loopback sample (0: no loopback part)")
    parser.add_argument("--loopback-rounds", type=int, default=10,
                        help="loopback blocks per side, interleaved")
    args = parser.parse_args()
    out = measure(args.samples, args.batch, args.rounds or args.samples)
    out["two_masters"] = measure_two_masters(args.cross_samples, args.batch)
    if args.loopback_frames:
        out["loopback"] = measure_loopback(args.samples, args.loopback_frames,
                                           args.loopback_rounds)
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
