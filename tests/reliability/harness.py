"""How the reliability suites drive the plugin and read the node back.

Three ways to run one CNI command, all through the real entry point:

- ``Net.call``: in this process, ``entry.run(environ, stdin, out)``: fast.
- ``spawn(..., via="fork")``: a child forked from this warm process (the
  plugin already imported) that calls ``entry.run`` and exits: a real,
  separate process with its own flock and netlink sockets, costing no
  interpreter start (a cold ``netkit`` takes ~8 s in the TCG VM).
- ``spawn(..., via="exe")``: the real ``netkit`` executable, fork + exec,
  told not to relay to a node agent (whose warm path is not under test).

All three can be given a fault (``CNI_NETKIT_TEST_FAULT``), though in this
process only one that raises. Children are plain pids so one
``os.waitpid(-1)`` loop can wait for whichever ends first.

``observe`` reads the node back independently of what the plugin printed:
leases with queue-get on the master, netkit devices by link dump in the
host and every named netns, files under the state, device-info and IPAM
directories, and whether any lock file is still held (a non-blocking flock).
"""

from __future__ import annotations

import errno
import fcntl
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cni_netkit.cni import entry
from cni_netkit.cni.client import NO_AGENT_ENV
from cni_netkit.errors import InvalidNetns
from cni_netkit.kernel import Kernel
from cni_netkit.plugin.commands import FAULT_ENV, request_environ

BIN = Path(sys.executable).parent
NETKIT = os.environ.get("CNI_NETKIT_EXE") or str(BIN / "netkit")
NSIM_BUS = Path("/sys/bus/netdevsim")
NETNS_DIR = Path("/var/run/netns")
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

_nsim_ids = itertools.count(os.getpid() % 1000 * 100 + 50_000)


# --- the NIC ------------------------------------------------------------------------


@dataclass
class Nic:
    """A netdevsim device with one port: the physical NIC whose queues get leased."""

    id: int
    name: str
    ifindex: int
    queues: int

    @property
    def sysfs(self) -> Path:
        return NSIM_BUS / "devices" / f"netdevsim{self.id}"

    def remove(self) -> None:
        if self.sysfs.exists():
            (NSIM_BUS / "del_device").write_text(str(self.id))


def make_nic(queues: int) -> Nic:
    """A fresh netdevsim port with ``queues`` RX queues, up (queue-get needs it up)."""
    nsim_id = next(_nsim_ids)
    (NSIM_BUS / "new_device").write_text(f"{nsim_id} 1 {queues}")
    net = NSIM_BUS / "devices" / f"netdevsim{nsim_id}" / "net"
    name = wait_for(lambda: next(iter(sorted(p.name for p in net.iterdir())), None)
                    if net.exists() else None, f"netdevsim{nsim_id}'s netdev")
    subprocess.run(["ip", "link", "set", name, "up"], check=True)
    ifindex = int(Path(f"/sys/class/net/{name}/ifindex").read_text())
    return Nic(nsim_id, name, ifindex, queues)


def wait_for(probe: Any, what: str, timeout: float = 20.0) -> Any:
    """Poll ``probe`` until it returns something other than None/False.

    Only for kernel work that finishes asynchronously with no event to wait
    on (netns cleanup runs in a workqueue; sysfs device creation).
    """
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got is not None and got is not False:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def add_netns() -> str:
    name = f"rel-{os.getpid()}-{next(_nsim_ids)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    return str(NETNS_DIR / name)


def del_netns(path: str) -> None:
    if Path(path).exists():
        subprocess.run(["ip", "netns", "del", Path(path).name], check=True)


# --- calling the plugin ---------------------------------------------------------------


@dataclass
class Reply:
    """What the runtime sees: the exit status (negative: killed by that signal) and stdout."""

    status: int
    stdout: str
    stderr: str = ""

    @property
    def json(self) -> Any:
        return json.loads(self.stdout) if self.stdout.strip() else None

    @property
    def code(self) -> int | None:
        """The CNI error code, None for success."""
        if self.status == 0:
            return None
        body = self.json
        return body.get("code") if isinstance(body, dict) else None

    def __str__(self) -> str:
        return (f"status {self.status}, stdout {self.stdout.strip()!r}, "
                f"stderr {self.stderr[-800:]!r}")


def cni_env(command: str, *, container_id: str = "", netns: str = "", ifname: str = "",
            cni_path: str = "", args: str = "", extra: Mapping[str, str] | None = None,
            ) -> dict[str, str]:
    env = {
        "PATH": PATH,
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns,
        "CNI_IFNAME": ifname,
        "CNI_PATH": cni_path,
    }
    if args:
        env["CNI_ARGS"] = args
    env.update(extra or {})
    return env


def call(env: Mapping[str, str], stdin: bytes) -> Reply:
    """One command in this process, through ``entry.run`` (never with a kill fault)."""
    if env.get(FAULT_ENV, "").endswith(":kill") or os.environ.get(FAULT_ENV):
        raise ValueError("a kill fault in the test process would kill the test")
    out = io.StringIO()
    # The request's environment is the plugin's, as the agent serves a relayed
    # one: ADD reads the node's declared masters (CNI_NETKIT_MASTERS) from it.
    token = request_environ.set(env)
    try:
        status = entry.run(env, io.BytesIO(stdin), out)
    finally:
        request_environ.reset(token)
    return Reply(status, out.getvalue())


@dataclass
class Child:
    """A running plugin process; ``reap`` turns its wait status into a Reply."""

    pid: int
    stdout_fd: int
    stderr_path: str
    label: str = ""
    started: float = field(default_factory=time.monotonic)

    def reap(self, wait_status: int) -> Reply:
        with os.fdopen(self.stdout_fd, "r", encoding="utf-8", errors="replace") as f:
            out = f.read()
        err = Path(self.stderr_path).read_text(errors="replace")
        Path(self.stderr_path).unlink(missing_ok=True)
        return Reply(_exit_status(wait_status), out, err)

    def wait(self) -> Reply:
        _, wait_status = os.waitpid(self.pid, 0)
        return self.reap(wait_status)


def _exit_status(wait_status: int) -> int:
    if os.WIFSIGNALED(wait_status):
        return -os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def spawn(env: Mapping[str, str], stdin: bytes, *, via: str = "fork", fault: str | None = None,
          delay: float = 0.0, label: str = "") -> Child:
    """Start one plugin process (``via`` "fork" or "exe"); ``fault`` is a fault spec.

    ``delay``: the child sleeps that long first; the storm uses it to vary timing.
    """
    env = dict(env)
    if fault:
        env[FAULT_ENV] = fault
    if via == "exe":
        env.setdefault(NO_AGENT_ENV, "1")  # the cold path: this executable does the work
    read_fd, write_fd = os.pipe()
    fd, err_path = tempfile.mkstemp(prefix="netkit-stderr-")
    os.close(fd)
    stdin_file = tempfile.TemporaryFile()  # noqa: SIM115 - handed to the child as fd 0
    stdin_file.write(stdin)
    stdin_file.seek(0)
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(read_fd)
            err = os.open(err_path, os.O_WRONLY | os.O_TRUNC)
            os.dup2(err, 2)
            os.close(err)
            if delay:
                time.sleep(delay)
            if via == "exe":
                os.dup2(stdin_file.fileno(), 0)
                os.dup2(write_fd, 1)
                os.execve(NETKIT, [NETKIT], env)  # noqa: S606 - the plugin, as a runtime runs it
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - logs of this child
            os.environ.clear()
            os.environ.update(env)  # what the executable would see, fault included
            out = open(write_fd, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
            status = entry.run(env, stdin_file, out)
            out.flush()
        except BaseException:  # noqa: BLE001 - report and leave, whatever happened
            import traceback  # noqa: PLC0415

            traceback.print_exc()
            status = 70
        finally:
            os._exit(status)
    os.close(write_fd)
    stdin_file.close()
    return Child(pid, read_fd, err_path, label)


# --- the network under test -------------------------------------------------------------


@dataclass
class Net:
    """One CNI network config on one NIC, with its own state, device-info and IPAM dirs."""

    root: Path
    master: str
    queues: str
    per_attachment: int = 1
    pairing: str = "single"
    mode: str = "l2"
    ipam: bool = False
    name: str = "rel"
    lock_timeout: float = 10.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def devinfo_dir(self) -> Path:
        return self.root / "devinfo"

    @property
    def ipam_dir(self) -> Path:
        return self.root / "ipam"

    @property
    def cni_path(self) -> str:
        return os.environ.get("CNI_NETKIT_CNI_PLUGINS", "")

    @property
    def places(self) -> dict[str, str]:
        """The node admin's environment that lets this network use its temporary dirs."""
        return {"CNI_NETKIT_MASTERS": f"{self.master}={self.queues}",
                "CNI_NETKIT_STATE_DIRS": str(self.state_dir),
                "CNI_NETKIT_DEVICE_INFO_DIRS": str(self.devinfo_dir),
                "CNI_NETKIT_LOG_DIRS": str(self.root / "log")}

    def conf(self, container_id: str | None = None, ifname: str = "net1",
             **over: Any) -> dict[str, Any]:
        c: dict[str, Any] = {
            "cniVersion": "1.1.0",
            "name": self.name,
            "type": "netkit",
            "master": self.master,
            "queues": self.queues,
            "queuesPerAttachment": self.per_attachment,
            "pairing": self.pairing,
            "mode": self.mode,
            "stateDir": str(self.state_dir),
            "lockTimeout": self.lock_timeout,
        }
        if self.ipam:
            c["ipam"] = {"type": "host-local", "ranges": [[{"subnet": "10.77.0.0/24"}]],
                         "dataDir": str(self.ipam_dir)}
        if container_id is not None:
            c["runtimeConfig"] = {
                "CNIDeviceInfoFile": str(self.devinfo_dir / f"{container_id}-{ifname}.json")}
        c.update(self.extra)
        c.update(over)
        return c

    def request(self, command: str, container_id: str = "", netns: str = "",
                ifname: str = "net1", *, valid: Iterable[tuple[str, str]] | None = None,
                prev: dict[str, Any] | None = None, **over: Any) -> tuple[dict[str, str], bytes]:
        """The environment and stdin of one command, as a runtime would send it."""
        whole = command in ("STATUS", "GC")
        conf = self.conf(None if whole else container_id, ifname, **over)
        if valid is not None:
            conf["cni.dev/valid-attachments"] = [
                {"containerID": c, "ifname": i} for c, i in sorted(valid)]
        if prev is not None:
            conf["prevResult"] = prev
        env = cni_env(command, cni_path=self.cni_path, extra=self.places) if whole else cni_env(
            command, container_id=container_id, netns=netns, ifname=ifname,
            cni_path=self.cni_path, extra=self.places)
        return env, json.dumps(conf).encode()

    def call(self, command: str, container_id: str = "", netns: str = "", ifname: str = "net1",
             **kw: Any) -> Reply:
        return call(*self.request(command, container_id, netns, ifname, **kw))


# --- reading the node back ---------------------------------------------------------------


@dataclass(frozen=True)
class NodeState:
    """What is on the node, as sets of printable items (so a difference reads as a leak)."""

    leases: frozenset[str]
    netkits: frozenset[str]
    records: frozenset[str]
    devinfo: frozenset[str]
    ipam: frozenset[str]
    locks_held: frozenset[str]
    netns: frozenset[str]

    def items(self) -> dict[str, frozenset[str]]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def observe(nic: Nic | None, net: Net | None) -> NodeState:
    """Read the node back: kernel first (a fresh Kernel, closed, so no netns stays pinned)."""
    from cni_netkit.kernel import Kernel  # noqa: PLC0415 - pyroute2 only in kernel tests

    named = sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []
    leases: set[str] = set()
    netkits: set[str] = set()
    with Kernel() as k:
        if nic is not None and nic.sysfs.exists():
            for q in k.queues(nic.ifindex):
                if q.type == "rx" and q.lease is not None:
                    leases.add(f"{nic.name} rx {q.id} -> ifindex {q.lease.ifindex} queue "
                               f"{q.lease.queue_id} nsid {q.lease.netns_id}")
        for where in [None, *(str(NETNS_DIR / n) for n in named)]:
            try:
                links = k.links(netns=where, kind="netkit")
            except InvalidNetns:  # gone since listed: it holds nothing
                links = []
            label = Path(where).name if where else "host"
            netkits.update(f"netkit {lk.name}@{label} alias={lk.alias!r}" for lk in links)
    return NodeState(
        leases=frozenset(leases),
        netkits=frozenset(netkits),
        records=_files(net.state_dir / "attachments") if net else frozenset(),
        devinfo=_files(net.devinfo_dir) if net else frozenset(),
        ipam=_ipam_allocations(net) if net else frozenset(),
        locks_held=_held_locks(net.state_dir / "locks") if net else frozenset(),
        netns=frozenset(named),
    )


def _files(d: Path) -> frozenset[str]:
    if not d.is_dir():
        return frozenset()
    return frozenset(f"{d.name}/{p.relative_to(d)}" for p in d.rglob("*") if not p.is_dir())


def _ipam_allocations(net: Net) -> frozenset[str]:
    """host-local's per-address files (not its lock or last-reserved markers)."""
    d = net.ipam_dir / net.name
    if not d.is_dir():
        return frozenset()
    return frozenset(f"ip {p.name}" for p in d.iterdir()
                     if p.name != "lock" and not p.name.startswith("last_reserved_ip"))


def _held_locks(d: Path) -> frozenset[str]:
    held = set()
    if not d.is_dir():
        return frozenset()
    for p in d.iterdir():
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            held.add(f"lock {p.name} held")
        finally:
            os.close(fd)
    return frozenset(held)


def lease_problems(nic: Nic, live: Iterable[Any], when: str) -> tuple[list[str], Counter[int]]:
    """The master's leases as the kernel reports them, against the live pods (each with
    ``cid``, ``netns`` and ``queues``; their netkit named net1): what differs (a pod's
    netkit missing, a queue not leased to it, a lease no live pod owns), and how many
    live pods claim each queue (a storm expects 1 each)."""
    found: list[str] = []
    holders: Counter[int] = Counter()
    with Kernel() as k:
        leases = {q.id: q.lease for q in k.queues(nic.ifindex)
                  if q.type == "rx" and q.lease is not None}
        for p in live:
            link = k.link("net1", netns=p.netns)
            if link is None:
                found.append(f"{when}: {p.cid}'s netkit is missing")
                continue
            nsid = k.netns_id(p.netns)
            for q in p.queues:
                lease = leases.get(q)
                if lease is None or (lease.ifindex, lease.netns_id) != (link.index, nsid):
                    found.append(f"{when}: queue {q} is not leased to {p.cid} ({lease})")
                holders[q] += 1
    found += [f"{when}: lease of queue {q} owned by no live pod"
              for q in sorted(set(leases) - set(holders))]
    return found, holders


def differences(expected: NodeState, actual: NodeState) -> tuple[list[str], list[str]]:
    """(leaked, lost): items on the node beyond ``expected``, and expected items now missing."""
    leaked, lost = [], []
    for kind, want in expected.items().items():
        got = actual.items()[kind]
        leaked += [f"{kind}: {item}" for item in sorted(got - want)]
        lost += [f"{kind}: {item}" for item in sorted(want - got)]
    return leaked, lost


def kill_status() -> int:
    return -signal.SIGKILL
