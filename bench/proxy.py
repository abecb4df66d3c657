"""What the netkit proxy costs an AF_XDP socket: leased queue vs the physical queue (VM only).

``python -m bench.proxy [--samples N] [--batch B]`` prints JSON on stdout.

One netdevsim master with our XDP program attached (``kernel.xsk``), and two
copy-mode AF_XDP sockets, each with its own UMEM:

- ``leased``: in a pod netns, bound to queue 1 of the pod's netkit, which
  leases physical queue ``LEASED`` (a real ADD through the plugin), and put
  into the attachment's XSK map, as QEMU or DPDK do;
- ``direct``: in the host netns, bound to physical queue ``DIRECT`` of the
  master itself, in an XSK map wired to that queue the same way (same program,
  same lookups: only the socket's binding differs).

Frames are pushed with ``BPF_PROG_TEST_RUN`` in live-frames mode
(``BPF_F_TEST_XDP_LIVE_FRAMES``): each of ``B`` frames runs the master's
program as if received on the queue (``ingress_ifindex`` = master,
``rx_queue_index`` = queue), and its XDP_REDIRECT is carried out, through
the XSK map into the socket's RX ring (copy mode: the frame is copied into
the UMEM). The kernel times the loop: ns per frame from program entry to the
frame in the ring. Then the RX ring is read (frames counted: every frame must
arrive) and its buffers go back to the fill ring, outside the timed part.
``N`` rounds, the two sockets interleaved.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import mmap
import os
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import summary
from bench.steering import FRAME, PROGRAM, make_nic

AF_XDP, SOL_XDP = 44, 283
XDP_MMAP_OFFSETS, XDP_RX_RING, XDP_UMEM_REG = 1, 2, 4
XDP_UMEM_FILL_RING, XDP_UMEM_COMPLETION_RING, XDP_STATISTICS = 5, 6, 7
XDP_COPY = 1 << 1
XDP_PGOFF_RX_RING, XDP_UMEM_PGOFF_FILL_RING = 0, 0x100000000
FRAME_SIZE = 2048
RING = 4096  # entries of each ring, and frames of each UMEM
LEASED, DIRECT = 1, 2
_libc = ctypes.CDLL(None, use_errno=True)


class Receiver:
    """A copy-mode AF_XDP socket with a UMEM of ``RING`` frames, all on the fill ring."""

    def __init__(self, sock: socket.socket, ifindex: int, queue: int) -> None:
        self.sock = sock
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
            raise OSError(err, f"bind AF_XDP to ifindex {ifindex} queue {queue}: "
                               f"{os.strerror(err)}")

    def drain(self) -> int:
        """Frames in the RX ring now; their buffers go back to the fill ring."""
        (prod,) = struct.unpack_from("I", self.rx, self.rx_prod)
        (cons,) = struct.unpack_from("I", self.rx, self.rx_cons)
        (fprod,) = struct.unpack_from("I", self.fill, self.fill_prod)
        for i in range(cons, prod):
            (addr,) = struct.unpack_from("Q", self.rx, self.rx_desc + 16 * (i % RING))
            struct.pack_into("Q", self.fill, self.fill_desc + 8 * ((fprod + i - cons) % RING),
                             addr - addr % FRAME_SIZE)
        struct.pack_into("I", self.fill, self.fill_prod, (fprod + prod - cons) & 0xFFFFFFFF)
        struct.pack_into("I", self.rx, self.rx_cons, prod)
        return int((prod - cons) & 0xFFFFFFFF)

    def stats(self) -> dict[str, int]:
        raw = self.sock.getsockopt(SOL_XDP, XDP_STATISTICS, 48)
        names = ("rx_dropped", "rx_invalid_descs", "tx_invalid_descs", "rx_ring_full",
                 "rx_fill_ring_empty_descs", "tx_ring_empty_descs")
        return dict(zip(names, struct.unpack(f"{len(raw) // 8}Q", raw), strict=False))

    def close(self) -> None:
        self.sock.close()


def measure(samples: int, batch: int, dev_id: int = 41) -> dict[str, Any]:  # noqa: PLR0915
    from cni_netkit import logs  # noqa: PLC0415
    from cni_netkit.config import parse_invocation  # noqa: PLC0415
    from cni_netkit.kernel import Kernel, bpf, netns, xsk  # noqa: PLC0415
    from cni_netkit.plugin import commands  # noqa: PLC0415

    if batch > RING:
        raise SystemExit(f"--batch must be <= {RING} (the ring holds a batch)")
    logs.configure()  # the plugin's log lines to stderr: stdout is this module's JSON
    master, ifindex = make_nic(dev_id, 4)
    work = Path(tempfile.mkdtemp(prefix="bench-proxy-", dir="/run"))
    root = Path(tempfile.mkdtemp(prefix="bench-proxy-", dir="/sys/fs/bpf"))
    os.environ[xsk.ROOT_ENV] = str(root)
    os.environ["CNI_NETKIT_MASTERS"] = f"{master}={LEASED}"
    os.environ["CNI_NETKIT_STATE_DIRS"] = str(work / "state")
    change = xsk.ensure_program(master, str(PROGRAM), root=root)
    pod = "benchproxy"
    subprocess.run(["ip", "netns", "add", pod], check=True)  # noqa: S607
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "proxy", "CNI_NETNS": f"/run/netns/{pod}",
           "CNI_IFNAME": "net1", "CNI_PATH": "/nonexistent", "PATH": os.environ["PATH"],
           "CNI_ARGS": "K8S_POD_NAMESPACE=bench;K8S_POD_NAME=proxy",
           "CNI_NETKIT_MASTERS": os.environ["CNI_NETKIT_MASTERS"],
           "CNI_NETKIT_STATE_DIRS": os.environ["CNI_NETKIT_STATE_DIRS"]}
    conf = json.dumps({"cniVersion": "1.1.0", "name": "proxy", "type": "netkit",
                       "master": master, "queues": str(LEASED),
                       "stateDir": str(work / "state")}).encode()
    receivers: dict[str, Receiver] = {}
    fds: list[int] = []
    try:
        with Kernel() as kernel:
            result = commands.run(parse_invocation(env, conf), kernel)
            if result is None:
                raise RuntimeError("ADD returned no result")
            nk = result.encode("1.1.0")["netkit"]
            (link,) = [lk for lk in kernel.links(netns=env["CNI_NETNS"]) if lk.name == "net1"]
        nsfd = netns.open_netns(env["CNI_NETNS"])
        try:
            pod_sock = netns.socket_in(nsfd, AF_XDP, socket.SOCK_RAW, 0)
        finally:
            os.close(nsfd)
        receivers["leased"] = Receiver(pod_sock, link.index, nk["queues"][0]["id"])
        xsk.insert_socket(nk["mapPath"], nk["mapStartIndex"], receivers["leased"].sock.fileno())
        direct_map = xsk.create_map(root / "direct")
        xsk.wire(master, direct_map, [xsk.XskSlot(DIRECT, 1)], root=root)
        receivers["direct"] = Receiver(socket.socket(AF_XDP, socket.SOCK_RAW, 0), ifindex, DIRECT)
        xsk.insert_socket(direct_map.path, 1, receivers["direct"].sock.fileno())
        prog = bpf.prog_fd_by_id(change.program.prog_id or 0)
        fds.append(prog)
        queues = {"leased": nk["queues"][0]["masterQueue"], "direct": DIRECT}
        ns: dict[str, list[float]] = {k: [] for k in receivers}
        lost: dict[str, int] = dict.fromkeys(receivers, 0)
        for rnd in range(samples + 1):  # round 0: warm-up, not counted
            for name, rx in receivers.items():
                _, mean = bpf.xdp_test_run_timed(prog, FRAME, ifindex=ifindex,
                                                 rx_queue=queues[name], repeat=batch, live=True)
                got = rx.drain()
                if rnd:
                    ns[name].append(float(mean))
                    lost[name] += batch - got
        stats = {k: rx.stats() for k, rx in receivers.items()}
    finally:
        for fd in fds:
            os.close(fd)
        for rx in receivers.values():
            rx.close()
        with contextlib.suppress(Exception), Kernel() as kernel:
            commands.run(parse_invocation({**env, "CNI_COMMAND": "DEL"}, conf), kernel)
        subprocess.run(["ip", "netns", "del", pod], check=False)  # noqa: S607
        xsk.remove_program(master, root=root)
        subprocess.run(["rm", "-rf", str(root), str(work)], check=False)  # noqa: S607
        Path("/sys/bus/netdevsim/del_device").write_text(str(dev_id))
    per = {k: summary(v) for k, v in ns.items()}
    rate = {k: {q: round(1e9 / v[q]) for q in ("p50", "p90")} for k, v in per.items()}
    return {
        "master": {"driver": "netdevsim", "xdp_mode": change.program.mode},
        "batch": batch, "samples": samples, "mode": "copy (XDP_COPY)",
        "ns_per_frame": per,
        "frames_per_s_at": rate,  # 1e9 / ns-per-frame at p50 and p90
        "frames_lost": lost, "socket_stats": stats,
        # receive rate ratio, leased / direct = direct ns / leased ns
        "rate_ratio_leased_vs_direct": {
            q: round(per["direct"][q] / per["leased"][q], 3) for q in ("p50", "p90")},
        "paired_rate_ratio": summary([d / x for d, x in zip(ns["direct"], ns["leased"],
                                                             strict=True)]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.proxy")
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2048)
    args = parser.parse_args()
    json.dump(measure(args.samples, args.batch), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
