"""Per-frame steering cost of the master's XDP program, with BPF_PROG_TEST_RUN (VM only).

``python -m bench.steering [--samples N] [--repeat R]`` prints JSON on stdout.

The master is a netdevsim NIC with our program attached by the real
``kernel.xsk.ensure_program``; one attachment's XSK map is wired to queue 1
with a socket at its slot, as a pod's QEMU or DPDK leaves it. Each case runs
the program ``R`` times inside the kernel (one ``BPF_PROG_TEST_RUN``, the
context's ``ingress_ifindex`` = the master, ``rx_queue_index`` = the queue)
and takes the kernel's mean ns per run; ``N`` such samples per case,
interleaved (sample i of every case, then i+1) so load drift hits all alike.

Cases:

- ``ours leased``: ``xsk_redirect`` on a leased, wired queue (XDP_REDIRECT);
- ``ours unleased``: ``xsk_redirect`` on a queue nobody leased (XDP_PASS):
  what every ordinary frame of the host pays;
- ``upstream leased``: the upstream recipe (``bench/bpf/steer_baselines.bpf.c``),
  one shared XSKMAP, a socket at the queue's index (XDP_REDIRECT);
- ``upstream empty``: the same on a queue without a socket (XDP_PASS);
- ``bare pass``: ``return XDP_PASS``, the floor.

What it measures: the program's decision, with the map lookups the
redirect needs (``bpf_redirect_map`` looks the socket up and records the
target). Without ``BPF_F_TEST_XDP_LIVE_FRAMES`` the test run returns the
verdict and does not carry the redirect out; the redirect itself (copying
the frame into the socket's ring) is the same work for either program, so
it is left out here and covered by the live-frames proxy benchmark.
The figures include the test harness's per-run frame reset, which every
case pays alike: the differences (ns above ``bare pass``) are given too.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, summary

NSIM = Path("/sys/bus/netdevsim")
BASELINES = REPO / "build" / "bpf" / "bench" / "steer_baselines.bpf.o"
PROGRAM = REPO / "build" / "bpf" / "xsk_redirect.bpf.o"
FRAME = bytes.fromhex("02000000000a" "02000000000b" "0800") + bytes(50)
AF_XDP, SOL_XDP, XDP_RX_RING = 44, 283, 2
XDP_PASS, XDP_REDIRECT = 2, 4
LEASED, UNLEASED = 1, 2


def make_nic(dev_id: int, queues: int) -> tuple[str, int]:
    (NSIM / "new_device").write_text(f"{dev_id} 1 {queues}")
    net = NSIM / "devices" / f"netdevsim{dev_id}" / "net"
    for _ in range(500):
        if net.exists() and any(net.iterdir()):
            break
        time.sleep(0.01)
    name = next(net.iterdir()).name
    subprocess.run(["ip", "link", "set", name, "up"], check=True)  # noqa: S607
    return name, socket.if_nametoindex(name)


def xsk_socket() -> socket.socket:
    s = socket.socket(AF_XDP, socket.SOCK_RAW, 0)
    s.setsockopt(SOL_XDP, XDP_RX_RING, 64)
    return s


def measure(samples: int, repeat: int, dev_id: int = 40) -> dict[str, Any]:
    from cni_netkit.kernel import bpf, xsk  # noqa: PLC0415

    master, ifindex = make_nic(dev_id, 4)
    root = Path(tempfile.mkdtemp(prefix="bench-steer-", dir="/sys/fs/bpf"))
    change = xsk.ensure_program(master, str(PROGRAM), root=root)
    keep: list[socket.socket] = []
    fds: list[int] = []
    try:
        att = xsk.create_map(root / "pods" / "bench" / "afxdp:bench:net1")
        xsk.wire(master, att, [xsk.XskSlot(LEASED, 1)], root=root)
        keep.append(xsk_socket())
        xsk.insert_socket(att.path, 1, keep[-1].fileno())
        ours = bpf.prog_fd_by_id(change.program.prog_id or 0)
        fds.append(ours)
        with bpf.BpfObject(str(BASELINES)) as obj:
            obj.load()
            upstream, bare, xsks = (obj.prog_fd("upstream_xsk"), obj.prog_fd("bare_pass"),
                                    obj.map_fd("xsks"))
        fds += [upstream, bare, xsks]
        keep.append(xsk_socket())
        bpf.map_update(xsks, LEASED, keep[-1].fileno())
        cases = {
            "ours leased": (ours, LEASED, XDP_REDIRECT),
            "ours unleased": (ours, UNLEASED, XDP_PASS),
            "upstream leased": (upstream, LEASED, XDP_REDIRECT),
            "upstream empty": (upstream, UNLEASED, XDP_PASS),
            "bare pass": (bare, UNLEASED, XDP_PASS),
        }
        ns: dict[str, list[float]] = {name: [] for name in cases}
        for name, (fd, queue, want) in cases.items():  # warm-up, and the verdicts checked
            got, _ = bpf.xdp_test_run_timed(fd, FRAME, ifindex=ifindex, rx_queue=queue,
                                            repeat=1000)
            if got != want:
                raise RuntimeError(f"{name}: verdict {got}, expected {want}")
        t = time.monotonic()
        for _ in range(samples):
            for name, (fd, queue, _want) in cases.items():
                _, mean = bpf.xdp_test_run_timed(fd, FRAME, ifindex=ifindex, rx_queue=queue,
                                                 repeat=repeat)
                ns[name].append(float(mean))
        elapsed = time.monotonic() - t
    finally:
        for fd in fds:
            os.close(fd)
        for s in keep:
            s.close()
        xsk.remove_program(master, root=root)
        subprocess.run(["rm", "-rf", str(root)], check=False)  # noqa: S607
        (NSIM / "del_device").write_text(str(dev_id))
    stats = {name: summary(v) for name, v in ns.items()}

    def ratio(a: str, b: str, q: str) -> float:
        return round(stats[a][q] / stats[b][q], 3)

    def paired(a: str, b: str) -> dict[str, float]:
        """The ratio within each round (the two ran back to back), summarised."""
        return summary([x / y for x, y in zip(ns[a], ns[b], strict=True)])

    pairs = (("ours leased", "upstream leased"), ("ours unleased", "bare pass"),
             ("upstream empty", "bare pass"), ("upstream leased", "bare pass"))

    return {
        "master": {"driver": "netdevsim", "queues": 4, "xdp_mode": change.program.mode},
        "repeat": repeat, "samples": samples, "seconds": round(elapsed, 1),
        "jit": Path("/proc/sys/net/core/bpf_jit_enable").read_text().strip(),
        "ns_per_frame": stats,
        # headline: p50 over p50 (and p90 over p90) of the two cases
        "ratios": {f"{a} / {b}": {q: ratio(a, b, q) for q in ("p50", "p90")} for a, b in pairs},
        "paired_ratios": {f"{a} / {b}": paired(a, b) for a, b in pairs},
        "above_bare_ns_p50": {name: round(stats[name]["p50"] - stats["bare pass"]["p50"], 1)
                              for name in cases},
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.steering")
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=1_000_000)
    args = parser.parse_args()
    json.dump(measure(args.samples, args.repeat), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
