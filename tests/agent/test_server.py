"""The agent's CNI socket: private, root only, concurrent, each request isolated.

``commands.run`` is replaced by a fake here (the real one needs a 7.x kernel;
tests/e2e/test_warm_path.py runs it through the agent in the VM), so these
tests look at what the server adds: who is served, what each request sees,
what survives a request, and shutting down.
"""

from __future__ import annotations

import contextvars
import ctypes
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from cni_netkit.agent import server
from cni_netkit.cni import client
from cni_netkit.config import Invocation
from cni_netkit.plugin import commands
from cni_netkit.result import Interface, Result

REPO = Path(__file__).resolve().parents[2]
CONF = {"cniVersion": "1.1.0", "name": "net", "type": "netkit", "master": "eth0", "queues": "8-15"}
NOBODY = 65534


def env_for(i: int, **extra: str) -> dict[str, str]:
    return {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": f"c{i}",
        "CNI_NETNS": "/var/run/netns/not-there",  # the fake plugin never looks
        "CNI_IFNAME": "net1",
        "PATH": f"/path/of/request/{i}",
        **extra,
    }


def conf(**over: Any) -> bytes:
    return json.dumps({**CONF, **over}).encode()


class FakePlugin:
    """Stands in for ``commands.run``: records what each request saw, optionally waits."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.gate: Callable[[], None] = lambda: None
        self.lock = threading.Lock()

    def run(self, inv: Invocation, kernel: Any = None) -> Result | None:
        structlog.get_logger("fake").info("fake plugin ran", own=inv.container_id)
        seen = {
            "container_id": inv.container_id,
            "fault": commands.fault_spec(),
            "delegate_path": commands._delegate_env(inv, "ADD")["PATH"],
        }
        with self.lock:
            self.seen.append(seen)
        self.gate()
        return Result(interfaces=(Interface(name=str(inv.container_id)),))


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch) -> FakePlugin:
    fake = FakePlugin()
    monkeypatch.setattr(commands, "run", fake.run)
    return fake


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "cni.sock"


@pytest.fixture
def agent(sock_path: Path) -> Iterator[server.Server]:
    with server.Server(sock_path) as srv:
        yield srv


def relay(path: Path, env: dict[str, str], stdin: bytes, **kw: Any) -> tuple[str, int] | None:
    return client.relay(env, stdin, path=str(path), **kw)


# --- the socket -------------------------------------------------------------------------


def test_socket_is_root_only_in_a_private_directory(agent: server.Server) -> None:
    d, s = agent.path.parent.stat(), agent.path.stat()
    assert stat.S_IMODE(d.st_mode) == 0o700 and d.st_uid == 0
    assert stat.S_ISSOCK(s.st_mode) and stat.S_IMODE(s.st_mode) == 0o600 and s.st_uid == 0


def test_a_stale_socket_is_replaced(sock_path: Path, plugin: FakePlugin) -> None:
    sock_path.parent.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock_path))
    dead.close()
    with server.Server(sock_path):
        assert relay(sock_path, env_for(1), conf()) is not None


def test_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(PermissionError, match="writable by others"):
        server.Server(shared / "cni.sock").start()


# --- who is served ----------------------------------------------------------------------


def test_only_allowed_uids_are_served(
    sock_path: Path, plugin: FakePlugin, capfd: pytest.CaptureFixture[str]
) -> None:
    with server.Server(sock_path, allowed_uids=frozenset({12345})):
        assert relay(sock_path, env_for(1), conf()) is None
    assert plugin.seen == []
    notes = [json.loads(line) for line in capfd.readouterr().err.splitlines()]
    assert any(n.get("reason") == "agent refused: uid 0 is not served" for n in notes)


def test_a_non_root_peer_is_refused_by_its_credentials(agent: server.Server) -> None:
    # The child gets past the 0700 directory with fsuid 0 while its effective
    # uid, which SO_PEERCRED reports, is nobody's.
    verdict = _in_child(lambda: _handshake_as(NOBODY, agent.path, fsuid=0))
    assert verdict == "N:uid 65534 is not served"


def test_a_non_root_process_cannot_reach_the_socket(agent: server.Server) -> None:
    verdict = _in_child(lambda: _handshake_as(NOBODY, agent.path, fsuid=None))
    assert verdict.startswith("PermissionError")


def test_a_request_from_another_netns_view_is_refused(agent: server.Server) -> None:
    env = env_for(1, CNI_NETNS="/proc/self/ns/net")
    meta = {"netns": client.ns_id("/proc/self/ns/net"), "cni_netns": "-"}  # "gone" over there
    assert _raw_verdict(agent.path, env, meta).startswith(
        "N:CNI_NETNS /proc/self/ns/net is another namespace"
    )
    assert _raw_verdict(agent.path, env_for(1), {"netns": "1:2", "cni_netns": "-"}) == (
        "N:the executable runs in another network namespace than the agent"
    )


# --- requests ---------------------------------------------------------------------------


def test_concurrent_requests_each_see_only_their_own_environment_and_log(
    agent: server.Server, plugin: FakePlugin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(commands.FAULT_ENABLE_ENV, "1")  # an agent a test started for faults
    barrier = threading.Barrier(server.DEFAULT_WORKERS, timeout=20)
    plugin.gate = barrier.wait  # proves DEFAULT_WORKERS requests run at the same time
    n = 2 * server.DEFAULT_WORKERS
    replies: dict[int, tuple[str, int] | None] = {}

    def one(i: int) -> None:
        env = env_for(i, CNI_NETKIT_TEST_FAULT=f"never-{i}", CNI_NETKIT_LOG_DIRS=str(tmp_path))
        replies[i] = relay(agent.path, env, conf(logFile=str(tmp_path / f"c{i}.log")))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    for i in range(n):
        text, status = replies[i] or ("", -1)
        assert status == 0
        assert json.loads(text)["interfaces"] == [{"name": f"c{i}"}]
    assert sorted(plugin.seen, key=lambda s: s["container_id"]) == sorted(
        (
            {"container_id": f"c{i}", "fault": f"never-{i}",
             "delegate_path": f"/path/of/request/{i}"}
            for i in range(n)
        ),
        key=lambda s: s["container_id"],
    )
    for i in range(n):
        lines = [json.loads(x) for x in (tmp_path / f"c{i}.log").read_text().splitlines()]
        assert lines, f"c{i} logged nothing"
        assert {line["container_id"] for line in lines} == {f"c{i}"}
        assert {line["pid"] for line in lines} == {os.getpid()}  # the executable's pid
        assert any(line.get("own") == f"c{i}" for line in lines)
    assert commands.FAULT_ENV not in os.environ
    assert commands.request_environ.get(None) is None  # nothing leaked into this context


def test_a_relayed_fault_is_ignored_unless_the_agents_own_environment_enables_faults(
    agent: server.Server, plugin: FakePlugin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(commands.FAULT_ENABLE_ENV, raising=False)  # as in production
    env = env_for(1, CNI_NETKIT_TEST_FAULT="created:kill", CNI_NETKIT_TEST_FAULTS="1")
    assert relay(agent.path, env, conf()) is not None
    assert [s["fault"] for s in plugin.seen] == [None]  # the request cannot switch it on

    def in_the_agent() -> None:  # and no fault point fires for it
        commands.request_environ.set(env)
        commands.fault_point("created")

    contextvars.Context().run(in_the_agent)


def test_a_withdrawn_request_is_never_run(agent: server.Server, plugin: FakePlugin) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(agent.path))
        s.sendall(client.request(env_for(1), conf()))
        assert _answer_view(s) == "R"
    time.sleep(0.3)  # the agent reads EOF where GO would be
    assert plugin.seen == []


def test_a_path_the_agent_sees_as_other_files_is_refused(
    agent: server.Server, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(agent.path))
        s.sendall(client.request(env_for(1), conf(stateDir=str(state))))
        # An executable whose stateDir is another directory than the agent's.
        verdict = _answer_view(s, lie={str(state): f"{state}=1:2"})
    assert verdict.startswith(f"N:{state} is not the same here")


def test_a_directory_created_between_the_two_looks_is_the_same_file(
    agent: server.Server, tmp_path: Path
) -> None:
    """The executable saw the state dir missing (its answer names the parent); by the time
    the agent looks, a concurrent ADD has created it: still the same file, served warm.
    Before, the two nearest ancestors differed and the request was refused (run cold)."""
    state = tmp_path / "state"
    missing = client.path_id(str(state))
    assert missing == f"{tmp_path}={client.ns_id(str(tmp_path))}"
    state.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(agent.path))
        s.sendall(client.request(env_for(1), conf(stateDir=str(state))))
        assert _answer_view(s, lie={str(state): missing}) == "R"


def test_a_mount_of_the_agents_own_below_the_executables_probe_is_refused(
    tmp_path: Path
) -> None:
    """What exists here below the executable's probe must be on the probe's filesystem."""
    probe = f"{tmp_path}={client.ns_id(str(tmp_path))}"
    dev, ino = client.ns_id(str(tmp_path)).split(":")
    assert server._same_file(str(tmp_path / "a" / "b"), probe)  # missing here too
    (tmp_path / "a").mkdir()
    assert server._same_file(str(tmp_path / "a" / "b"), probe)  # created since
    assert not server._same_file(str(tmp_path / "a"), f"{tmp_path}={int(dev) + 1}:{ino}")
    assert not server._same_file(str(tmp_path / "a"), None)
    assert not server._same_file("/elsewhere/a", probe)
    # /proc is another filesystem than the probe's: a mount of the agent's own.
    assert not server._same_file("/proc/self", f"/={client.ns_id('/')}")


def test_view_paths_are_what_the_request_makes_the_plugin_touch() -> None:
    env = env_for(1, CNI_PATH="/opt/cni/bin:/usr/lib/cni")
    host_local = conf(
        stateDir="/var/lib/x", logFile="/var/log/netkit/n.log",
        runtimeConfig={"CNIDeviceInfoFile": "/run/devinfo/d.json"},
        ipam={"type": "host-local", "subnet": "10.0.0.0/8"},
    )
    paths = server.view_paths(env, host_local)
    assert paths == ["/var/lib/x", "/var/log/netkit", "/run/devinfo", "/var/lib/cni/networks",
                     "/sys/fs/bpf/cni-netkit"]
    other_ipam = server.view_paths(env, conf(ipam={"type": "whereabouts"}))
    assert "/proc/self/ns/mnt" in other_ipam  # unknown IPAM state: same mount namespace only
    assert server.view_paths(env, b"not json") == []
    # CNI_PATH is where IPAM is found, and nothing else: without IPAM it is not looked at.
    assert server.cni_path_dirs(env, host_local) == ["/opt/cni/bin", "/usr/lib/cni"]
    assert server.cni_path_dirs(env, conf()) == []
    assert server.cni_path_dirs(env, b"not json") == []


def test_a_cni_path_the_agent_lacks_does_not_matter_without_ipam(
    agent: server.Server, plugin: FakePlugin, tmp_path: Path
) -> None:
    # As shipped: the runtime says CNI_PATH=/opt/cni/bin, which the agent's
    # container has only at /host/opt/cni/bin. A request without IPAM runs warm.
    missing = tmp_path / "not-in-the-agent"
    env = env_for(1, CNI_PATH=str(missing))
    assert relay(agent.path, env, conf()) is not None
    assert [s["container_id"] for s in plugin.seen] == ["c1"]


def test_with_ipam_cni_path_is_translated_through_the_agents_bin_dirs(
    sock_path: Path, plugin: FakePlugin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The host's /opt/cni/bin is the agent's /host/opt/cni/bin: one directory (one
    # dev:inode, as a bind mount keeps it) that the agent does not have at the host's path.
    host_bin = tmp_path / "not-in-the-agent" / "opt" / "cni" / "bin"
    agent_bin = tmp_path / "host" / "opt" / "cni" / "bin"
    agent_bin.mkdir(parents=True)
    data = tmp_path / "ipam-data"
    seen_paths: list[tuple[str, ...]] = []
    real_run = plugin.run

    def run(inv: Invocation, kernel: Any = None) -> Result | None:
        seen_paths.append(inv.cni_path)
        return real_run(inv, kernel)

    monkeypatch.setattr(commands, "run", run)
    ipam_conf = conf(pairing="pair",
                     ipam={"type": "host-local", "subnet": "10.0.0.0/8", "dataDir": str(data)})
    with server.Server(sock_path, bin_dirs=[str(agent_bin)]):
        # The executable's view is not the agent's: only the bin dir maps, under another path.
        env = env_for(1, CNI_PATH=f"{host_bin}")
        lie = {str(host_bin): f"{host_bin}={client.ns_id(str(agent_bin))}"}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(sock_path))
            s.sendall(client.request(env, ipam_conf))
            assert _answer_view(s, lie=lie) == "R"
            s.sendall(client.GO)
            assert s.recv(1) in (client.ANSWER, client.BEAT)
        # A CNI_PATH dir the agent cannot see anywhere: cold, since IPAM may be in it.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(sock_path))
            s.sendall(client.request(env_for(2, CNI_PATH="/nowhere/bin"), ipam_conf))
            assert _answer_view(s).startswith("N:CNI_PATH directory /nowhere/bin is not")
    assert seen_paths == [(str(agent_bin),)]


def test_a_request_with_another_pin_root_than_the_agent_is_refused(
    agent: server.Server,
) -> None:
    env = env_for(1, CNI_NETKIT_BPF_ROOT="/sys/fs/bpf/elsewhere")
    meta = {"netns": client.ns_id("/proc/self/ns/net"), "cni_netns": "-"}
    assert _raw_verdict(agent.path, env, meta) == (
        "N:CNI_NETKIT_BPF_ROOT differs between the request and the agent"
    )


def test_heartbeats_carry_a_slow_request_past_the_silence_limit(
    sock_path: Path, plugin: FakePlugin
) -> None:
    plugin.gate = lambda: time.sleep(0.8)
    with server.Server(sock_path, heartbeat=0.05):
        got = relay(sock_path, env_for(1), conf(), silence_limit=0.3)
    assert got is not None and got[1] == 0


def test_past_max_connections_clients_are_refused_and_run_themselves(
    sock_path: Path, plugin: FakePlugin
) -> None:
    release = threading.Event()
    plugin.gate = lambda: release.wait(10)
    with server.Server(sock_path, max_connections=1):
        first = threading.Thread(target=relay, args=(sock_path, env_for(1), conf()))
        first.start()
        _wait_for(lambda: len(plugin.seen) == 1)
        assert relay(sock_path, env_for(2), conf()) is None
        release.set()
        first.join(10)


def test_close_removes_the_socket_and_lets_requests_in_flight_finish(
    sock_path: Path, plugin: FakePlugin
) -> None:
    release = threading.Event()
    plugin.gate = lambda: release.wait(10)
    srv = server.Server(sock_path).start()
    got: list[tuple[str, int] | None] = []
    inflight = threading.Thread(target=lambda: got.append(relay(sock_path, env_for(1), conf())))
    inflight.start()
    _wait_for(lambda: len(plugin.seen) == 1)
    closing = threading.Thread(target=srv.close)
    closing.start()
    _wait_for(lambda: not sock_path.exists())
    assert relay(sock_path, env_for(2), conf()) is None  # new requests: cold, at once
    release.set()
    inflight.join(10)
    closing.join(10)
    assert got[0] is not None and json.loads(got[0][0])["interfaces"] == [{"name": "c1"}]


def test_close_leaves_a_newer_agents_socket_alone(sock_path: Path) -> None:
    old = server.Server(sock_path).start()
    with server.Server(sock_path):  # the new agent of a rolling update takes the path over
        old.close()
        assert sock_path.exists()


def test_python_dash_m_serves_until_sigterm(sock_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cni_netkit.agent.server", "--socket", str(sock_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(sock_path.exists, timeout=60)
        got = relay(sock_path, {"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "0.4.0"}')
        assert got is not None and json.loads(got[0])["cniVersion"] == "0.4.0"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out == b""  # stdout is never ours to write
    assert not sock_path.exists()


# --- helpers ----------------------------------------------------------------------------


def _raw_verdict(path: Path, env: dict[str, str], meta: dict[str, str]) -> str:
    """Send a request with hand-made identity ``meta``; "R" or "N:<reason>"."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        s.sendall(
            client.MAGIC
            + client.frame(client.env_block(env.items()))
            + client.frame(client.env_block(meta.items()))
            + client.frame(conf())
        )
        return _verdict(s)


def _verdict(s: socket.socket) -> str:
    s.settimeout(10)
    kind = s.recv(1)
    if kind != client.REFUSED:
        return kind.decode()
    size = int.from_bytes(s.recv(4), "big")
    return "N:" + s.recv(size).decode()


def _answer_view(s: socket.socket, lie: dict[str, str] | None = None) -> str:
    """Answer the agent's view question as the real client does (or with ``lie`` for some
    paths); then its verdict."""
    s.settimeout(10)
    kind = s.recv(1)
    if kind != client.VIEW:
        raise AssertionError(f"expected the view question, got {kind!r}")
    size = int.from_bytes(s.recv(4), "big")
    paths = client.parse_env_block(s.recv(size))
    ids = [(k, (lie or {}).get(p) or client.path_id(p)) for k, p in paths.items()]
    s.sendall(client.frame(client.env_block(ids)))
    return _verdict(s)


def _handshake_as(uid: int, path: Path, *, fsuid: int | None) -> str:
    """In a child: become ``uid`` (keeping 0 as saved uid for ``fsuid``), then handshake."""
    os.setresuid(uid, uid, 0)
    if fsuid is not None:
        ctypes.CDLL(None, use_errno=True).setfsuid(fsuid)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError as e:
            return type(e).__name__
        s.sendall(client.request(env_for(1), conf()))
        return _verdict(s)


def _in_child(fn: Callable[[], str]) -> str:
    """Run ``fn`` in a forked child (its uid changes must not touch pytest); its result."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write_fd, fn().encode())
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            os.write(write_fd, f"child failed: {e!r}".encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        result = f.read().decode()
    os.waitpid(pid, 0)
    return result


def _wait_for(cond: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)
