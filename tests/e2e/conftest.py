"""End-to-end fixtures: the real `netkit` executable, invoked as a container runtime does.

Each test gets a fresh netdevsim "NIC" (the only device with queue-management
ops that runs under QEMU) and pod netns, made with sysfs and iproute2 so the
setup does not share code with the plugin under test. Kernel state is read
back through the netdev family's queue-get on the master.

The executable runs as on a node with the agent: one agent serves the whole
session (``warm_agent``) and every invocation goes through the real
executable, which relays to it. ``runtime(..., cold=True)`` makes an
invocation run the plugin in the executable itself, as on a node without an
agent: both paths run the same code, and a cold invocation costs ~5 s in the
VM against well under one warm, which is what keeps this suite's VM time
within CI's budget.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.kernel

BIN = Path(sys.executable).parent
NETKIT = os.environ.get("CNI_NETKIT_EXE") or str(BIN / "netkit")
_ids = itertools.count(20)


def _sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


@dataclass
class Nic:
    """A netdevsim device standing in for the physical NIC."""

    dev_id: int
    name: str
    ifindex: int
    queues: int

    def remove(self) -> None:
        Path("/sys/bus/netdevsim/del_device").write_text(f"{self.dev_id}")


def make_nic(queues: int) -> Nic:
    dev_id = next(_ids)
    Path("/sys/bus/netdevsim/new_device").write_text(f"{dev_id} 1 {queues}")
    net = Path(f"/sys/bus/netdevsim/devices/netdevsim{dev_id}/net")
    for _ in range(200):
        names = list(net.iterdir()) if net.exists() else []
        if names:
            break
        time.sleep(0.01)
    name = names[0].name
    _sh("ip", "link", "set", name, "up")
    ifindex = int(Path(f"/sys/class/net/{name}/ifindex").read_text())
    return Nic(dev_id, name, ifindex, queues)


@pytest.fixture
def nic() -> Iterator[Nic]:
    n = make_nic(16)
    yield n
    if Path(f"/sys/bus/netdevsim/devices/netdevsim{n.dev_id}").exists():
        n.remove()


@pytest.fixture
def make_netns() -> Iterator[Any]:
    made: list[str] = []

    def make(name: str | None = None) -> str:
        name = name or f"pod{next(_ids)}"
        _sh("ip", "netns", "add", name)
        made.append(name)
        return f"/var/run/netns/{name}"

    yield make
    for name in made:
        if Path(f"/var/run/netns/{name}").exists():
            subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def root(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private bpffs root, for in-process calls (the environment) and the executable."""
    from cni_netkit.kernel import xsk  # noqa: PLC0415 - libbpf only in the suites that pin
    from tests.kernel.xsk_support import private_root  # noqa: PLC0415

    with private_root() as r:
        monkeypatch.setenv(xsk.ROOT_ENV, str(r))
        yield r


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout) if self.stdout.strip() else None


@dataclass
class AgentProc:
    """A node agent serving the warm path (``python -m cni_netkit.agent.server``)."""

    proc: subprocess.Popen[bytes]
    socket: Path
    log: Path

    @property
    def env(self) -> dict[str, str]:
        """What makes the executable use this agent."""
        return {"CNI_NETKIT_AGENT_SOCKET": str(self.socket)}

    def events(self) -> list[dict[str, Any]]:
        lines = self.log.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)


def start_agent(directory: Path) -> AgentProc:
    """Start an agent serving CNI requests on ``directory/agent/cni.sock``."""
    sock, log = directory / "agent" / "cni.sock", directory / "agent.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cni_netkit.agent.server", "--socket", str(sock)],
            cwd=Path(__file__).resolve().parents[2], stdout=subprocess.DEVNULL, stderr=err,
            # Test agents honour the requests' fault points (production ones never do).
            env={**os.environ, "CNI_NETKIT_TEST_FAULTS": "1"},
        )
    deadline = time.monotonic() + 300  # imports and warm-up take seconds in the VM
    while not sock.exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the agent did not start"
        time.sleep(0.1)
    return AgentProc(proc, sock, log)


@pytest.fixture(scope="session")
def warm_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProc]:
    agent = start_agent(tmp_path_factory.mktemp("warm-agent"))
    yield agent
    agent.stop()


@dataclass
class Runtime:
    """Calls the plugin with env + stdin and parses stdout, as libcni does."""

    state_dir: Path
    cni_path: str = ""
    agent_env: dict[str, str] = field(default_factory=dict)  # empty: always cold
    masters: str | None = None  # CNI_NETKIT_MASTERS; None: each config's own master and queues
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def conf(self, master: str, **over: Any) -> dict[str, Any]:
        c: dict[str, Any] = {
            "cniVersion": "1.1.0",
            "name": "afxdp",
            "type": "netkit",
            "master": master,
            "queues": "0-15",
            "stateDir": str(self.state_dir),
        }
        c.update(over)
        return c

    def __call__(
        self,
        command: str,
        conf: dict[str, Any],
        *,
        container_id: str = "c1",
        netns: str = "",
        ifname: str = "net1",
        env: dict[str, str] | None = None,
        timeout: float = 600,
        cold: bool = False,
    ) -> Outcome:
        environ = {**self.environ(command, container_id, netns, ifname),
                   **self.declared(conf), **({} if cold else self.agent_env), **(env or {})}
        self.calls.append((command, conf))
        p = subprocess.run(
            [NETKIT], input=json.dumps(conf), env=environ, capture_output=True, text=True,
            timeout=timeout, check=False,
        )
        return Outcome(p.returncode, p.stdout, p.stderr)

    def environ(self, command: str, container_id: str, netns: str, ifname: str
                ) -> dict[str, str]:
        """A runtime's environment for one request; the node allows this test's stateDir."""
        return {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns,
            "CNI_IFNAME": ifname,
            "CNI_PATH": self.cni_path,
            "CNI_NETKIT_STATE_DIRS": str(self.state_dir),
        }

    def declared(self, conf: dict[str, Any]) -> dict[str, str]:
        """This test node's admin declares the test's NIC: the config's master and queues.

        Closed by default (plugin.allowlist): without a declaration ADD is refused.
        ``masters`` overrides it ("" declares nothing); a test's own ``env`` wins.
        """
        if self.masters is not None:
            return {"CNI_NETKIT_MASTERS": self.masters} if self.masters else {}
        return declared_by_admin(conf)

    def spawn(self, command: str, conf: dict[str, Any], **kw: str) -> subprocess.Popen[str]:
        """Start one cold invocation (the plugin runs in the executable) and return at once."""
        environ = {**self.environ(command, kw.get("container_id", "c1"), kw.get("netns", ""),
                                  kw.get("ifname", "net1")), **self.declared(conf)}
        p = subprocess.Popen(
            [NETKIT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=environ, text=True,
        )
        assert p.stdin is not None
        p.stdin.write(json.dumps(conf))
        p.stdin.close()
        p.stdin = None  # written and closed: communicate() must only read
        return p


def declared_by_admin(conf: dict[str, Any]) -> dict[str, str]:
    """``CNI_NETKIT_MASTERS`` declaring a config's master and queues, as a node's admin would."""
    master, queues = conf.get("master"), conf.get("queues")
    if not isinstance(master, str) or queues is None:
        return {}
    spans = queues if isinstance(queues, str) else ",".join(str(q) for q in queues)
    return {"CNI_NETKIT_MASTERS": f"{master}={spans}"}


@pytest.fixture
def runtime(tmp_path: Path, warm_agent: AgentProc) -> Runtime:
    return Runtime(
        state_dir=tmp_path / "state", cni_path=cni_plugins_dir() or "", agent_env=warm_agent.env
    )


def cni_plugins_dir() -> str | None:
    """Debian's containernetworking-plugins (host-local), extracted by scripts/vm setup."""
    d = os.environ.get("CNI_NETKIT_CNI_PLUGINS")
    return d if d and (Path(d) / "host-local").exists() else None


def leased_queues(nic: Nic) -> dict[int, dict[str, Any]]:
    """master queue id -> lease, read back with queue-get (independent of the plugin run)."""
    from cni_netkit.kernel import Kernel  # noqa: PLC0415 - after the VM check

    with Kernel() as k:
        return {
            q.id: {"ifindex": q.lease.ifindex, "queue": q.lease.queue_id,
                   "netns_id": q.lease.netns_id}
            for q in k.queues(nic.ifindex)
            if q.type == "rx" and q.lease is not None
        }


def netkit_links(netns: str | None) -> list[Any]:
    from cni_netkit.kernel import Kernel  # noqa: PLC0415

    with Kernel() as k:
        return k.links(netns=netns, kind="netkit")


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
