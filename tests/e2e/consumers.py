"""The pods' AF_XDP consumers for real: programs from the sid roots, run as a pod would run them.

``scripts/vm setup`` extracts Debian sid userlands into named roots (QEMU
built from Debian's source with af-xdp, DPDK's testpmd) that the guest finds
under ``$CNI_NETKIT_ROOTS``; a program runs with its root's own dynamic
loader, so nothing of sid is installed anywhere.

``workload()`` starts a command the way virt-launcher starts QEMU in a
KubeVirt pod: in the pod's netns, as uid/gid 107 with no supplementary
groups, with CAP_NET_RAW (AF_XDP's socket) as its only capability
(effective, permitted, inheritable, ambient and bounding), no new
privileges, and the RLIMIT_MEMLOCK a container runtime gives a container.

Frames reach a leased queue as in ``test_xsk_e2e``: sent out of the
loopback netdevsim on the TX queue whose frames its RX queue receives.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from cni_netkit.kernel import xsk
from tests.e2e.conftest import Nic
from tests.kernel.xsk_support import FRAME, XDP_REDIRECT

# KubeVirt's qemu user and group, which virt-launcher runs QEMU as.
WORKLOAD_UID = WORKLOAD_GID = 107
WORKLOAD_OWNER = f"{WORKLOAD_UID}:{WORKLOAD_GID}"
# What containerd and CRI-O give a container: no rlimit of their own for
# memlock (containerd's default spec sets only RLIMIT_NOFILE), so the one
# their service inherits: systemd's DefaultLimitMEMLOCK, 8 MiB since systemd
# 253, the kernel's own default since 5.16 too.
RUNTIME_MEMLOCK = 8 << 20
CAP_NET_RAW = 13
LOADER = "usr/lib64/ld-linux-x86-64.so.2"
LIBS = "usr/lib/x86_64-linux-gnu"


def root(name: str) -> Path:
    """The sid root ``name`` (``scripts/vm setup`` makes it)."""
    base = os.environ.get("CNI_NETKIT_ROOTS")
    r = Path(base or "/nonexistent") / name
    if not (r / ".spec").exists():
        pytest.fail(f"sid root {name!r} missing under CNI_NETKIT_ROOTS={base}: "
                    "run scripts/vm setup")
    return r


def sid_program(root_name: str, program: str, *args: str) -> list[str]:
    """argv running ``program`` of a sid root with that root's loader and libraries
    (and libxdp's BPF objects, which it looks for in /usr/lib otherwise)."""
    r = root(root_name)
    return ["env", f"LIBXDP_OBJECT_PATH={r / LIBS / 'bpf'}", str(r / LOADER),
            "--library-path", str(r / LIBS), str(r / program), *args]


def workload(netns: str, argv: Sequence[str], *, memlock: int = RUNTIME_MEMLOCK,
             caps: Iterable[str] = ("net_raw",)) -> list[str]:
    """argv running ``argv`` in ``netns`` as the pod's unprivileged workload (module doc)."""
    kept = ",".join(["-all", *(f"+{c}" for c in caps)])
    return ["nsenter", f"--net={netns}", "prlimit", f"--memlock={memlock}:{memlock}",
            "setpriv", f"--reuid={WORKLOAD_UID}", f"--regid={WORKLOAD_GID}", "--clear-groups",
            f"--inh-caps={kept}", f"--ambient-caps={kept}", f"--bounding-set={kept}",
            "--no-new-privs", "--", *argv]


@dataclass(frozen=True)
class Privileges:
    """A process's credentials as /proc shows them."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    effective: int  # capability bit masks
    permitted: int
    ambient: int
    bounding: int
    no_new_privs: bool
    memlock: int  # soft RLIMIT_MEMLOCK, bytes


def privileges(pid: int) -> Privileges:
    status = dict(line.split(":\t", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    (memlock,) = [int(line.split()[3]) for line in
                  Path(f"/proc/{pid}/limits").read_text().splitlines()
                  if line.startswith("Max locked memory")]
    return Privileges(
        uid=int(status["Uid"].split()[1]), gid=int(status["Gid"].split()[1]),
        groups=tuple(int(g) for g in status["Groups"].split()),
        effective=int(status["CapEff"], 16), permitted=int(status["CapPrm"], 16),
        ambient=int(status["CapAmb"], 16), bounding=int(status["CapBnd"], 16),
        no_new_privs=status["NoNewPrivs"].strip() == "1", memlock=memlock)


def workload_dir() -> Path:
    """A directory the workload (and root) can write, for its sockets."""
    d = Path(f"/tmp/cnk-workload-{os.getpid()}-{time.monotonic_ns()}")
    d.mkdir(mode=0o700)
    os.chown(d, WORKLOAD_UID, WORKLOAD_GID)
    return d


class FrameSink:
    """A unix datagram socket a consumer forwards frames to (QEMU's ``-netdev dgram``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        os.chown(path, WORKLOAD_UID, WORKLOAD_GID)

    def tags(self, timeout: float) -> list[bytes]:
        """Our frames' tags received until ``timeout`` s pass without one (others ignored)."""
        got = []
        self.sock.settimeout(timeout)
        while True:
            try:
                frame = self.sock.recv(65536)
            except TimeoutError:
                return got
            if frame[:12] == FRAME[:12]:
                got.append(frame[14:14 + TAG_LEN])

    def close(self) -> None:
        self.sock.close()


TAG_LEN = 16


def tag(label: str, queue: int, n: int) -> bytes:
    """A frame's tag: who it is for, the physical queue it is sent on, its number."""
    t = f"{label}:q{queue:02d}#{n:05d}".encode()
    assert len(t) <= TAG_LEN
    return t.ljust(TAG_LEN, b".")


def tagged(t: bytes) -> bytes:
    return FRAME[:14] + t + FRAME[14 + len(t):]


def steer_tx_to_rx_queue(nic: Nic, rx_queue: int) -> None:
    """Make what this CPU sends on ``nic`` arrive on its RX queue ``rx_queue``.

    netdevsim delivers a frame sent on TX queue t to its own RX queue t, and
    the kernel's generic XDP reads the RX queue from the skb's queue mapping,
    which is one higher: the program sees queue t - 1. XPS picks the TX queue
    (the VM has one CPU).
    """
    for tx in range(nic.queues):
        xps = Path(f"/sys/class/net/{nic.name}/queues/tx-{tx}/xps_cpus")
        xps.write_text("1" if tx == rx_queue + 1 else "0")


def send_on_rx_queue(nic: Nic, rx_queue: int, frames: Iterable[bytes]) -> int:
    """Send ``frames`` out of the loopback netdevsim to be received on ``rx_queue``; how many."""
    steer_tx_to_rx_queue(nic, rx_queue)
    sent = 0
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((nic.name, 0))
        for frame in frames:
            s.send(frame)
            sent += 1
            if sent % 32 == 0:
                time.sleep(0.01)  # netdevsim's RX ring is small: let NAPI drain it
    return sent


def loopback(nic: Nic) -> None:
    subprocess.run(["ethtool", "-K", nic.name, "loopback", "on"], check=True)


# --- QEMU -------------------------------------------------------------------------------

QEMU = "usr/bin/qemu-system-x86_64"
# QEMU's af-xdp UMEM per queue: (2048 + 2048) * 2 frames of 4096 bytes
# (net/af-xdp.c, af_xdp_umem_create), charged to the user's locked memory.
QEMU_UMEM = 8192 * 4096


@dataclass
class Qemu:
    proc: subprocess.Popen[bytes]
    sink: FrameSink
    log: Path

    def stop(self) -> int:
        """SIGTERM (QEMU takes its sockets out of the map and exits 0); its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(60)

    def wait(self, timeout: float = 120) -> int:
        """Its exit status once it exits by itself (a refused start)."""
        try:
            return self.proc.wait(timeout)
        finally:
            self.sink.close()

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_qemu(netns: str, qemu_netdev: str, *, memlock: int, privileged: bool = False,
               view: Sequence[str] = ()) -> Qemu:
    """QEMU with ``-netdev af-xdp,id=xdp0,<qemu_netdev>`` hubbed to a dgram socket we read.

    ``view``: a command prefix that execs the rest in another mount namespace
    (``pod_view``), as the container's filesystem.

    Without a guest there is no multi-queue NIC to peer with: the hub takes
    the af-xdp netdev's first queue, and frames QEMU reads from any other
    queue have no peer to go to (QEMU warns "netdev xdp0 has no peer").
    """
    d = workload_dir()
    sink = FrameSink(d / "frames.sock")
    argv = sid_program(
        "qemu", QEMU, "-machine", "none", "-nodefaults", "-no-user-config", "-display", "none",
        "-netdev", f"af-xdp,id=xdp0,{qemu_netdev}",
        "-netdev", f"dgram,id=out,local.type=unix,local.path={d}/qemu.sock,"
                   f"remote.type=unix,remote.path={sink.path}",
        "-netdev", "hubport,id=p0,hubid=0,netdev=xdp0",
        "-netdev", "hubport,id=p1,hubid=0,netdev=out",
    )
    log = d / "qemu.log"
    with log.open("wb") as out:
        cmd = [*view, *(["nsenter", f"--net={netns}", *argv] if privileged
                        else workload(netns, argv, memlock=memlock))]
        proc = subprocess.Popen(cmd, stdout=out, stderr=out)
    return Qemu(proc, sink, log)


def pod_view(volume: Path, mount_path: str) -> list[str]:
    """A command prefix: what follows runs in a mount namespace of its own with the pod's
    volume at ``mount_path`` (bind-mounted with what is mounted in it, as the runtime
    mounts a container's volumes) and the node's bpffs unmounted: what is pinned there is
    reachable through the volume only."""
    script = (f"umount -l /sys/fs/bpf && mkdir -p {mount_path} && "
              f'mount --rbind {volume} {mount_path} && exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-ec", script, "pod-view"]


def wait_for_sockets(qemu: Qemu, master: str, queues: list[int], timeout: float = 120) -> None:
    """Until the program redirects every one of ``queues``: QEMU's sockets are in the map."""
    deadline = time.monotonic() + timeout
    while not all(xsk.verdict(master, q, FRAME) == XDP_REDIRECT for q in queues):
        assert qemu.proc.poll() is None, f"QEMU exited {qemu.proc.returncode}:\n{qemu.output}"
        assert time.monotonic() < deadline, f"QEMU's sockets never arrived:\n{qemu.output}"
        time.sleep(0.2)



# --- a consumer's AF_XDP rings, read from outside ------------------------------------

SOL_XDP, XDP_MMAP_OFFSETS = 283, 1
SYS_PIDFD_GETFD = 438


@dataclass(frozen=True)
class RxRing:
    """One AF_XDP socket's RX ring: how many frames the kernel put in (``produced``) and
    how many its owner took out (``consumed``), and the queue the socket is bound to."""
    queue: int
    produced: int
    consumed: int


def _xdp_queues(pid: int) -> dict[int, int]:
    """The queue each AF_XDP socket of ``pid`` is bound to, by socket inode (``ss --xdp``,
    the kernel's XDP_DIAG, in the process's netns)."""
    out = subprocess.run(["nsenter", f"--target={pid}", "--net", "ss", "--xdp", "-a", "-e",
                          "-p", "-O"], capture_output=True, text=True, check=True).stdout
    queues = {}
    for line in out.splitlines():
        m = re.search(r"\S+:q?(\d+)\s+\S+\s+.*\bino:(\d+)", line)
        if m and f"pid={pid}," in line:
            queues[int(m.group(2))] = int(m.group(1))
    return queues


def rx_rings(pid: int) -> list[RxRing]:
    """Every AF_XDP socket of process ``pid``: its RX ring's producer and consumer, read
    from the ring itself (the socket duplicated with pidfd_getfd, its RX ring mapped
    read-only), sorted by queue. This is what the kernel handed the consumer per queue
    and what the consumer read, without trusting the consumer's own output."""
    libc = ctypes.CDLL(None, use_errno=True)
    queues = _xdp_queues(pid)
    rings = []
    pidfd = os.pidfd_open(pid)
    try:
        for entry in os.scandir(f"/proc/{pid}/fd"):
            try:
                link = str(Path(entry.path).readlink())
            except OSError:
                continue
            ino = int(link[8:-1]) if link.startswith("socket:[") else -1
            if ino not in queues:
                continue
            fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(entry.name), 0)
            if fd < 0:
                raise OSError(ctypes.get_errno(), f"pidfd_getfd({pid}, {entry.name})")
            try:
                offsets = (ctypes.c_uint64 * 16)()
                size = ctypes.c_uint32(ctypes.sizeof(offsets))
                if libc.getsockopt(fd, SOL_XDP, XDP_MMAP_OFFSETS, offsets,
                                   ctypes.byref(size)) != 0:
                    raise OSError(ctypes.get_errno(), "XDP_MMAP_OFFSETS")
                producer, consumer = offsets[0], offsets[1]  # rx: the first ring offset
                with mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ) as ring:
                    rings.append(RxRing(queues[ino],
                                        int.from_bytes(ring[producer:producer + 4], "little"),
                                        int.from_bytes(ring[consumer:consumer + 4], "little")))
            finally:
                os.close(fd)
    finally:
        os.close(pidfd)
    return sorted(rings, key=lambda r: r.queue)

# Register a UMEM of argv[1] bytes on a fresh AF_XDP socket (what QEMU's
# xsk_umem__create does first): prints "ok" or the errno's name.
UMEM_PROBE = """
import ctypes, errno, mmap, socket, struct, sys
size = int(sys.argv[1])
s = socket.socket(44, socket.SOCK_RAW, 0)
m = mmap.mmap(-1, size)
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
try:
    s.setsockopt(283, 4, struct.pack("QQIIII", addr, size, 4096, 0, 0, 0))
    print("ok")
except OSError as e:
    print(errno.errorcode[e.errno])
"""


def umem_registration(netns: str, size: int, *, memlock: int) -> str:
    """What XDP_UMEM_REG of ``size`` bytes answers the pod's workload: "ok" or an errno name."""
    return subprocess.run(workload(netns, ["/usr/bin/python3", "-c", UMEM_PROBE, str(size)],
                                   memlock=memlock),
                          capture_output=True, text=True, check=True).stdout.strip()
