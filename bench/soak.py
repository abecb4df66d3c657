"""Soak: many warm ADD/DEL cycles through the real node agent, and what they leave behind.

``scripts/soak`` runs it (``python -m bench.soak run``): prints a table and
writes ``soak.json``. Issue 13 item 4 and issue 14's memory bullet.

Where: 10 000 cycles take hours in the TCG VM (a warm ADD there costs what a
cold one costs on the host), so the long soak runs on the host, against the
fake of our kernel seam (``tests/unit/fake_kernel.py``) loaded into the REAL
agent server (``cni_netkit.agent.server.Server``, its unix socket, its
threads, ``entry.run``), driven by the real thin C client
(``build/shim/netkit``, one exec per call, as a runtime does) or by the
Python client (``cni.client.relay``). Everything above the kernel seam is the
production code: config parsing, records, locks, device-info files, the
delegated host-local IPAM (when ``scripts/vm setup`` has extracted it),
logging. What the fake cannot show (netlink sockets, netns fds, pins, real
devices) is the VM soak's (``tests/reliability/test_soak_vm.py``).

Measured in the agent process, after the first ``--baseline`` cycles and
then every ``--every`` cycles: RSS (VmRSS) and its high-water mark, open fds
(by kind), threads; on disk: records, device-info files, host-local
addresses, lock files; in the fake kernel (reported by the agent on
SIGUSR1): devices, leases, netns ids, netns it holds open. Issue 14's goal:
RSS after all cycles <= 1.05x RSS after the first 100, fds unchanged.

Also the cold path's peak RSS per invocation (issue 14): the venv's
``netkit`` with no agent, measured through a small launcher (fork, exec,
``wait4``'s ``ru_maxrss``); exec folds the launcher's own high-water mark
into the figure, so values at the launcher's floor (printed) mean "at most".

    python -m bench.soak run [--cycles N] [--client shim|python] [--baseline N]
                             [--every N] [--out DIR] [--no-ipam] [--no-cold]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHIM = REPO / "build" / "shim" / "netkit"
PLUGIN = Path(sys.executable).parent / "netkit"  # the venv's console script: the cold path
HOST_LOCAL_DIR = Path("/var/cache/cni-netkit/cni-plugins/usr/lib/cni")
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
MASTER = "eth0"
QUEUES = 16
PODS = 4  # pod "netns" files the cycles take turns with
RSS_GOAL = 1.05

# A fork + exec + wait4 launcher whose own footprint is the floor of what it can measure.
_LAUNCHER = (
    "import os,sys\n"
    "pid=os.fork()\n"
    "if pid==0:\n"
    "    os.execve(sys.argv[1],sys.argv[1:],os.environ)\n"
    "_,st,ru=os.wait4(pid,0)\n"
    "os.write(2,b'@@peak_kb=%d\\n'%ru.ru_maxrss)\n"
    "sys.exit(os.waitstatus_to_exitcode(st) & 255)\n"
)


# --- the agent under soak (a subprocess: ``python -m bench.soak agent``) ----------------


def agent_main(args: argparse.Namespace) -> int:
    """The real agent server, with the fake kernel seam in place of netlink."""
    sys.path.insert(0, str(REPO))
    import cni_netkit.kernel  # noqa: PLC0415
    from cni_netkit import logs  # noqa: PLC0415
    from cni_netkit.agent import server  # noqa: PLC0415
    from tests.unit.fake_kernel import FakeKernel  # noqa: PLC0415

    fake = FakeKernel(master=MASTER, master_queues=QUEUES)
    for pod in args.pod:
        fake.add_netns(pod)
    lock = threading.Lock()  # the fake is not thread-safe; the real kernel is

    @contextmanager
    def seam() -> Iterator[FakeKernel]:
        with lock:
            try:
                yield fake
            finally:
                fake.close()  # what the real one does: its netns sockets go
                fake.calls.clear()  # the fake's own call log (for unit tests): not the agent's

    # What commands.run opens for each request.
    cni_netkit.kernel.Kernel = seam  # type: ignore[assignment,misc]
    logs.configure("warning")  # an info line per request would be the soak's biggest cost
    report = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: report.set())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    srv = server.Server(args.socket).start()
    try:
        while not stop.is_set():
            if report.wait(0.05):
                report.clear()
                with lock:
                    state = {
                        "devices": len(fake.devices) - 1,  # not the master
                        "leases": len(fake.leased_master_queues()),
                        "netns_ids": len(fake.nsids),
                        "open_netns": len(fake.open_netns),
                    }
                tmp = Path(f"{args.report}.tmp")
                tmp.write_text(json.dumps(state))
                tmp.replace(args.report)
    finally:
        srv.close()
    return 0


# --- measuring a process -------------------------------------------------------------------


def fd_kinds(pid: int) -> Counter[str]:
    kinds: Counter[str] = Counter()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:
            continue  # closed while listed
        kinds[target.split(":", 1)[0] if ":" in target and not target.startswith("/")
              else "file"] += 1
    return kinds


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


def quiescent(pid: int, reads: int = 10) -> tuple[dict[str, int], Counter[str]]:
    """``pid``'s status and fds once the last request's thread has gone.

    A client has its answer a moment before the agent's connection thread
    closes the connection and ends: of a few reads 20 ms apart, the one with
    the fewest threads and fds (a leaked thread or fd stays in every read).
    """
    best: tuple[dict[str, int], Counter[str]] | None = None
    for _ in range(max(1, reads)):
        st, kinds = proc_status(pid), fd_kinds(pid)
        if best is None or (st["Threads"], sum(kinds.values())) < (
                best[0]["Threads"], sum(best[1].values())):
            best = st, kinds
        time.sleep(0.02)
    assert best is not None  # noqa: S101 - at least one read
    return best


def files(d: Path) -> int:
    return sum(1 for p in d.rglob("*") if p.is_file()) if d.is_dir() else 0


@dataclass
class Sample:
    cycle: int
    rss_kb: int
    hwm_kb: int
    threads: int
    fds: int
    fd_kinds: dict[str, int]
    records: int
    devinfo: int
    ipam_addresses: int
    lock_files: int
    kernel: dict[str, int]


# --- the soak ------------------------------------------------------------------------------


@dataclass
class Soak:
    root: Path
    client: str = "shim"
    ipam: bool = True
    proc: subprocess.Popen[bytes] | None = None
    samples: list[Sample] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    calls: int = 0

    @property
    def socket(self) -> Path:
        return self.root / "agent" / "cni.sock"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def pods(self) -> list[str]:
        return [str(self.root / "netns" / f"pod{i}") for i in range(PODS)]

    def env(self) -> dict[str, str]:
        return {
            "PATH": PATH,
            "CNI_NETKIT_MASTERS": f"{MASTER}=1-{QUEUES - 1}",
            "CNI_NETKIT_STATE_DIRS": str(self.state_dir),
            "CNI_NETKIT_DEVICE_INFO_DIRS": str(self.root / "devinfo"),
            "CNI_NETKIT_LOG_DIRS": str(self.root / "log"),
            "CNI_NETKIT_AGENT_SOCKET": str(self.socket),
            "CNI_NETKIT_PLUGIN_EXE": str(PLUGIN),
        }

    def start(self) -> None:
        (self.root / "netns").mkdir(parents=True, exist_ok=True)
        for p in self.pods:
            Path(p).touch()  # the same file for client and agent: ns_id agrees
        argv = [sys.executable, "-m", "bench.soak", "agent", "--socket", str(self.socket),
                "--report", str(self.root / "kernel.json")]
        for p in self.pods:
            argv += ["--pod", p]
        with (self.root / "agent.log").open("wb") as err:
            self.proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
                                         env={**os.environ, **self.env()})
        deadline = time.monotonic() + 120
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("soak agent did not start: "
                                   + (self.root / "agent.log").read_text()[-2000:])
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)

    def conf(self, n: int) -> dict[str, Any]:
        """Even cycles: a single netkit; odd ones: a pair, l3, with host-local when present."""
        c: dict[str, Any] = {
            "cniVersion": "1.1.0", "name": "soak", "type": "netkit", "master": MASTER,
            "queues": f"1-{QUEUES - 1}", "stateDir": str(self.state_dir),
            "runtimeConfig": {"CNIDeviceInfoFile": str(self.root / "devinfo" / f"c{n}.json")},
        }
        if n % 2:
            c.update(name="soak-pair", pairing="pair", mode="l3")
            if self.ipam:
                c["ipam"] = {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/24"}]],
                             "dataDir": str(self.root / "ipam")}
        return c

    def call(self, command: str, n: int, conf: Mapping[str, Any]) -> tuple[int, str, str]:
        env = {**self.env(), "CNI_COMMAND": command, "CNI_CONTAINERID": f"soak-{n}",
               "CNI_NETNS": self.pods[n % PODS], "CNI_IFNAME": "net1",
               "CNI_PATH": str(HOST_LOCAL_DIR) if self.ipam else ""}
        stdin = json.dumps(conf).encode()
        self.calls += 1
        if self.client == "python":
            from cni_netkit.cni import client  # noqa: PLC0415

            got = client.relay(env, stdin, path=str(self.socket))
            if got is None:
                return 1, "", "the agent did not take the request"
            return got[1], got[0], ""
        p = subprocess.run([str(SHIM)], input=stdin, env=env, capture_output=True, check=False,
                           timeout=60)
        return p.returncode, p.stdout.decode(), p.stderr.decode()

    def cycle(self, n: int) -> None:
        conf = self.conf(n)
        status, out, err = self.call("ADD", n, conf)
        if status != 0 or err:
            self.failures.append(f"ADD {n}: {status} {out[:300]!r} {err[-300:]!r}")
            prev = None
        else:
            prev = json.loads(out)
        status, out, err = self.call("DEL", n, {**conf, **({"prevResult": prev} if prev else {})})
        if status != 0 or out or err:
            self.failures.append(f"DEL {n}: {status} {out[:300]!r} {err[-300:]!r}")

    def kernel_state(self) -> dict[str, int]:
        if self.proc is None:
            raise RuntimeError("the soak agent is not running")
        report = self.root / "kernel.json"
        report.unlink(missing_ok=True)
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while not report.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the soak agent did not report its fake kernel")
            time.sleep(0.02)
        return dict(json.loads(report.read_text()))

    def sample(self, cycle: int) -> Sample:
        kernel = self.kernel_state()
        assert self.proc is not None  # noqa: S101 - kernel_state() checked it
        st, kinds = quiescent(self.proc.pid)
        ipam = self.root / "ipam" / "soak-pair"
        s = Sample(
            cycle=cycle, rss_kb=st["VmRSS"], hwm_kb=st["VmHWM"], threads=st["Threads"],
            fds=sum(kinds.values()), fd_kinds=dict(sorted(kinds.items())),
            records=files(self.state_dir / "attachments"), devinfo=files(self.root / "devinfo"),
            ipam_addresses=sum(1 for p in ipam.iterdir() if p.name[0].isdigit())
            if ipam.is_dir() else 0,
            lock_files=files(self.state_dir / "locks"), kernel=kernel)
        self.samples.append(s)
        return s

    def run(self, cycles: int, *, baseline: int = 100, every: int = 1000,
            progress: bool = False) -> None:
        checkpoints = {baseline, cycles, *range(every, cycles, every)}
        started = time.monotonic()
        for n in range(cycles):
            self.cycle(n)
            if n + 1 in checkpoints:
                s = self.sample(n + 1)
                if progress:
                    print(f"soak: {n + 1} cycles, {time.monotonic() - started:.0f} s, "
                          f"rss {s.rss_kb} KiB, fds {s.fds}, threads {s.threads}",
                          file=sys.stderr, flush=True)

    def leaks(self) -> list[str]:
        """Counts that must not grow from the baseline sample to the last, or must be zero."""
        if len(self.samples) < 2:
            return ["fewer than two samples"]
        first, last = self.samples[0], self.samples[-1]
        found = []
        for name in ("fds", "threads", "lock_files"):
            a, b = getattr(first, name), getattr(last, name)
            if b != a:
                found.append(f"{name}: {a} after {first.cycle} cycles, {b} after {last.cycle}")
        if last.fd_kinds != first.fd_kinds:
            found.append(f"fd kinds: {first.fd_kinds} -> {last.fd_kinds}")
        for name in ("records", "devinfo", "ipam_addresses"):
            if getattr(last, name):
                found.append(f"{name} left: {getattr(last, name)}")
        for key in ("devices", "leases", "open_netns"):
            if last.kernel.get(key):
                found.append(f"fake kernel {key} left: {last.kernel[key]}")
        if last.kernel.get("netns_ids", 0) > PODS:
            found.append(f"netns ids: {last.kernel['netns_ids']} for {PODS} pod netns")
        return found


# --- cold peak RSS -------------------------------------------------------------------------


def peak_rss_kb(argv: list[str], env: Mapping[str, str], stdin: bytes) -> tuple[int | None, int]:
    """(peak RSS in KiB of ``argv`` run through the launcher, its exit status)."""
    p = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, *argv], input=stdin, env=dict(env),
                       capture_output=True, check=False, timeout=120)
    tail = p.stderr.decode(errors="replace").rsplit("@@peak_kb=", 1)
    return (int(tail[1].split()[0]) if len(tail) == 2 else None), p.returncode


def cold_rss(root: Path, samples: int = 3) -> dict[str, Any]:
    """Peak RSS of cold invocations: VERSION, STATUS (host: no netkit, code 50), and the
    shim falling back; the launcher's own floor alongside."""
    base = {"PATH": PATH, "CNI_NETKIT_NO_AGENT": "1", "CNI_NETKIT_LOG_DIRS": str(root / "log")}
    version = ({**base, "CNI_COMMAND": "VERSION"}, b'{"cniVersion": "1.1.0"}')
    status_conf = {"cniVersion": "1.1.0", "name": "soak", "type": "netkit", "master": "lo",
                   "queues": "1-3", "stateDir": str(root / "cold-state")}
    status = ({**base, "CNI_COMMAND": "STATUS", "CNI_NETKIT_MASTERS": "lo=1-3",
               "CNI_NETKIT_STATE_DIRS": str(root / "cold-state")},
              json.dumps(status_conf).encode())
    shim_env = {**version[0], "CNI_NETKIT_AGENT_SOCKET": str(root / "none.sock"),
                "CNI_NETKIT_PLUGIN_EXE": str(PLUGIN)}
    shim_env.pop("CNI_NETKIT_NO_AGENT")
    cases = {
        "launcher floor (/bin/true)": (["/bin/true"], {"PATH": PATH}, b""),
        "cold VERSION (venv netkit)": ([str(PLUGIN)], *version),
        "cold STATUS (venv netkit)": ([str(PLUGIN)], *status),
        "thin client, no agent, VERSION (execs the venv netkit)": ([str(SHIM)], shim_env,
                                                                     version[1]),
    }
    out: dict[str, Any] = {}
    for label, (argv, env, stdin) in cases.items():
        got = [peak_rss_kb(argv, env, stdin) for _ in range(samples)]
        kbs = sorted(kb for kb, _ in got if kb is not None)
        out[label] = {"peak_kb_p50": kbs[len(kbs) // 2] if kbs else None,
                      "peak_kb_max": kbs[-1] if kbs else None,
                      "n": len(kbs), "exit": sorted({s for _, s in got})}
    return out


# --- the report ----------------------------------------------------------------------------


def table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def report(
    soak: Soak, cold: dict[str, Any] | None, seconds: float
) -> tuple[list[str], dict[str, Any]]:
    first, last = soak.samples[0], soak.samples[-1]
    ratio = last.rss_kb / first.rss_kb
    rows: list[tuple[str, ...]] = [("after cycles", "rss KiB", "hwm KiB", "fds", "threads",
                                    "records", "devinfo", "ipam", "devices", "leases",
                                    "open netns")]
    for s in soak.samples:
        rows.append((str(s.cycle), str(s.rss_kb), str(s.hwm_kb), str(s.fds), str(s.threads),
                     str(s.records), str(s.devinfo), str(s.ipam_addresses),
                     str(s.kernel.get("devices")), str(s.kernel.get("leases")),
                     str(s.kernel.get("open_netns"))))
    leaks = soak.leaks()
    lines = [f"soak: {last.cycle} warm ADD/DEL cycles ({soak.calls} calls) through the agent, "
             f"client {soak.client}, host-local {'yes' if soak.ipam else 'no'}, "
             f"fake kernel seam, {seconds:.0f} s", *table(rows),
             f"agent RSS after {last.cycle} / after {first.cycle} cycles: {ratio:.3f}x "
             f"(goal <= {RSS_GOAL}x: {'met' if ratio <= RSS_GOAL else 'MISSED'})",
             f"fds {first.fds} -> {last.fds} by kind {last.fd_kinds}; failures "
             f"{len(soak.failures)}; leaks {len(leaks)}" + (f": {leaks}" if leaks else "")]
    if cold:
        lines += ["", "cold peak RSS per invocation (host, through a fork+exec launcher):",
                  *table([("invocation", "p50 KiB", "max KiB", "n", "exit"),
                          *((k, str(v["peak_kb_p50"]), str(v["peak_kb_max"]), str(v["n"]),
                             ",".join(map(str, v["exit"]))) for k, v in cold.items())])]
    doc = {
        "cycles": last.cycle, "calls": soak.calls, "client": soak.client, "ipam": soak.ipam,
        "seconds": round(seconds, 1), "kernel": "fake kernel seam (tests/unit/fake_kernel.py)",
        "rss_ratio": round(ratio, 4), "rss_goal": RSS_GOAL, "leaks": leaks,
        "failures": soak.failures[:25], "samples": [asdict(s) for s in soak.samples],
        "cold_peak_rss": cold,
    }
    return lines, doc


def run_main(args: argparse.Namespace) -> int:
    ipam = not args.no_ipam and (HOST_LOCAL_DIR / "host-local").is_file()
    if not ipam and not args.no_ipam:
        print(f"soak: no host-local in {HOST_LOCAL_DIR} (scripts/vm setup extracts it): "
              "running without IPAM", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="cni-netkit-soak-") as tmp:
        soak = Soak(Path(tmp), client=args.client, ipam=ipam)
        started = time.monotonic()
        soak.start()
        try:
            soak.run(args.cycles, baseline=args.baseline, every=args.every, progress=True)
        finally:
            soak.stop()
        seconds = time.monotonic() - started
        cold = None if args.no_cold else cold_rss(Path(tmp))
    lines, doc = report(soak, cold, seconds)
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "soak.json").write_text(json.dumps(doc, indent=2) + "\n")
        print(f"written to {args.out / 'soak.json'}")
    return 1 if doc["leaks"] or soak.failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak")
    sub = parser.add_subparsers(dest="what", required=True)
    run = sub.add_parser("run", help="the soak (table + soak.json)")
    run.add_argument("--cycles", type=int, default=10_000)
    run.add_argument("--baseline", type=int, default=100)
    run.add_argument("--every", type=int, default=1000)
    run.add_argument("--client", choices=["shim", "python"], default="shim")
    run.add_argument("--out", type=Path)
    run.add_argument("--no-ipam", action="store_true")
    run.add_argument("--no-cold", action="store_true")
    agent = sub.add_parser("agent", help="(internal) the agent under soak")
    agent.add_argument("--socket", required=True)
    agent.add_argument("--report", required=True)
    agent.add_argument("--pod", action="append", default=[])
    args = parser.parse_args(argv)
    return agent_main(args) if args.what == "agent" else run_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
