"""The warm path's client: it uses the agent only when the agent takes the request, and then
prints exactly what the cold path would; otherwise it runs the command itself.

Fake agents here speak the wire protocol from a thread of the test; the real
agent (``agent.server``) serves the equality tests, in this process.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cni_netkit.agent import server
from cni_netkit.cni import client, entry
from tests.unit.fake_agent import Behaviour, FakeAgent, answer, fake_agents, ready_then

REPO = Path(__file__).resolve().parents[2]
CONF = {"cniVersion": "1.0.0", "name": "net", "type": "netkit", "master": "eth0", "queues": "8-9"}
ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "c1",
    "CNI_NETNS": "/var/run/netns/gone",
    "CNI_IFNAME": "net1",
    "CNI_PATH": "/opt/cni/bin",
}


@pytest.fixture
def fake_agent(tmp_path: Path) -> Iterator[Callable[[Behaviour], FakeAgent]]:
    yield from fake_agents(tmp_path, ENV)


def relay(env: dict[str, str], path: Path, **kw: Any) -> tuple[str, int] | None:
    return client.relay(env, json.dumps(CONF).encode(), path=str(path), **kw)


# --- falling back: the agent did not take the request ------------------------------------


def test_no_socket_means_run_here_quietly(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    assert relay(ENV, tmp_path / "absent.sock") is None
    assert capfd.readouterr().err == ""  # no agent on the node is not worth a note


def test_disabled_by_environment_never_connects(fake_agent: Any) -> None:
    agent = fake_agent(answer(b"{}\n"))
    assert relay({**ENV, client.NO_AGENT_ENV: "1"}, agent.path) is None
    assert agent.connections == 0


def test_stale_socket_of_a_dead_agent_is_refused_and_run_here(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens: ECONNREFUSED
    assert relay(ENV, path) is None
    note = json.loads(capfd.readouterr().err)
    assert "ConnectionRefusedError" in note["reason"]


def test_agent_refusal_is_run_here_with_its_reason(
    fake_agent: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    agent = fake_agent(lambda conn: conn.sendall(client.REFUSED + client.frame(b"uid 5 no")))
    assert relay(ENV, agent.path) is None
    assert json.loads(capfd.readouterr().err)["reason"] == "agent refused: uid 5 no"


def test_hung_agent_that_still_accepts_is_given_up_after_the_ready_timeout(
    tmp_path: Path,
) -> None:
    # A listening socket nobody accepts on: connect succeeds (the backlog), nothing answers.
    path = tmp_path / "hung.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(4)
    try:
        started = time.monotonic()
        assert relay(ENV, path, ready_timeout=0.3) is None
        assert time.monotonic() - started < 2
        conn, _ = s.accept()  # the request the client withdrew: no GO ever follows it
        with conn:
            server.read_request(conn)
            with contextlib.suppress(BrokenPipeError):  # the client has closed already
                conn.sendall(client.READY)
            conn.settimeout(2)
            assert conn.recv(1) == b""
    finally:
        s.close()


def test_a_slow_view_question_does_not_stretch_the_ready_timeout(fake_agent: Any) -> None:
    # The agent asks its view question late, then never gives a verdict: the client's
    # one bound covers the whole offer, not a fresh bound after the question.
    ready_timeout = 1.0

    def slow_view(conn: socket.socket) -> None:
        time.sleep(0.7 * ready_timeout)
        conn.sendall(client.VIEW + client.frame(client.env_block([("0", "/")])))
        server._recv_block(conn, client.MAX_META)
        time.sleep(3 * ready_timeout)  # no verdict

    agent = fake_agent(slow_view)
    started = time.monotonic()
    assert relay(ENV, agent.path, ready_timeout=ready_timeout) is None
    assert time.monotonic() - started < 1.5 * ready_timeout  # was 1.7 (0.7 + a whole 1.0)


# --- once committed: what a lost agent means per command ---------------------------------


@pytest.mark.parametrize(
    ("command", "redone"),
    [("ADD", False), ("DEL", True), ("GC", True), ("CHECK", True), ("STATUS", True)],
)
def test_agent_that_closes_after_commit(fake_agent: Any, command: str, redone: bool) -> None:
    agent = fake_agent(ready_then(lambda conn: None))  # dies right after taking the request
    env = {**ENV, "CNI_COMMAND": command}
    if redone:
        assert relay(env, agent.path) is None
    else:
        with pytest.raises(client.AgentLost, match="lost during ADD"):
            relay(env, agent.path)


@pytest.mark.parametrize(
    ("command", "redone"),
    [("ADD", False), ("DEL", False), ("GC", False), ("CHECK", True), ("STATUS", True)],
)
def test_agent_silent_after_commit(fake_agent: Any, command: str, redone: bool) -> None:
    release = threading.Event()
    agent = fake_agent(ready_then(lambda conn: release.wait(5)))
    env = {**ENV, "CNI_COMMAND": command}
    try:
        if redone:
            assert relay(env, agent.path, silence_limit=0.3) is None
        else:
            with pytest.raises(client.AgentLost) as lost:
                relay(env, agent.path, silence_limit=0.3)
            assert "silent for 0.3s" in lost.value.details
    finally:
        release.set()


def test_heartbeats_keep_a_slow_request_alive(fake_agent: Any) -> None:
    def slow(conn: socket.socket) -> None:
        for _ in range(6):
            time.sleep(0.1)
            conn.sendall(client.BEAT)
        conn.sendall(client.ANSWER + (3).to_bytes(4, "big") + client.frame(b"late\n"))

    agent = fake_agent(ready_then(slow))
    assert relay(ENV, agent.path, silence_limit=0.3) == ("late\n", 3)


def test_lost_add_reaches_the_runtime_as_try_again_later(fake_agent: Any) -> None:
    agent = fake_agent(ready_then(lambda conn: None))
    got = _netkit({**ENV, client.SOCKET_ENV: str(agent.path)}, json.dumps(CONF).encode())
    assert got.returncode == 1
    reply = json.loads(got.stdout)
    assert (reply["cniVersion"], reply["code"]) == ("1.0.0", 11)
    assert "node agent lost during ADD" in reply["msg"]


# --- the request on the wire ----------------------------------------------------------------


def test_request_carries_cni_env_and_path_only() -> None:
    env = {**ENV, "PATH": "/bin", "HOME": "/root", "SECRET": "x", "CNI_NETKIT_TEST_FAULT": "y"}
    conn_a, conn_b = socket.socketpair()
    with conn_a, conn_b:
        conn_a.sendall(client.request(env, b"\xffstdin"))
        environ, meta, stdin = server.read_request(conn_b)
    assert environ == {k: v for k, v in env.items() if k.startswith("CNI_") or k == "PATH"}
    assert stdin == b"\xffstdin"
    assert meta["netns"] == client.ns_id("/proc/self/ns/net")
    assert meta["cni_netns"] == "-"  # /var/run/netns/gone


def test_env_block_round_trips_bytes_the_os_gave() -> None:
    env = {"CNI_ARGS": "K8S_POD_NAME=a=b", "CNI_X": "caf\udce9"}  # not UTF-8: surrogateescape
    assert client.parse_env_block(client.env_block(env.items())) == env
    with pytest.raises(ValueError, match="malformed"):
        client.parse_env_block(b"NOEQUALS\0")


# --- same reply, warm or cold -------------------------------------------------------------

REQUESTS = [
    pytest.param({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "0.4.0"}', id="version"),
    pytest.param({"CNI_COMMAND": "VERSION"}, b"", id="version-no-stdin"),
    pytest.param({}, json.dumps(CONF).encode(), id="no-command"),
    pytest.param({**ENV, "CNI_COMMAND": "FROB"}, json.dumps(CONF).encode(), id="unknown-command"),
    pytest.param(ENV, b"\xff", id="not-utf8"),
    pytest.param(ENV, b'{"cniVersion": "1.1.0"}', id="invalid-config"),
    pytest.param({**ENV, "CNI_CONTAINERID": "bad/id"}, json.dumps(CONF).encode(), id="bad-env"),
    pytest.param(ENV, json.dumps(CONF).encode(), id="add-gone-netns"),
    pytest.param({**ENV, "CNI_COMMAND": "CHECK"}, json.dumps(CONF).encode(), id="check-no-prev"),
    pytest.param({**ENV, "CNI_COMMAND": "DEL"}, json.dumps(CONF).encode(), id="del-nothing"),
    pytest.param(
        {"CNI_COMMAND": "STATUS"}, json.dumps({**CONF, "cniVersion": "1.1.0"}).encode(),
        id="status",
    ),
]


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "agent" / "cni.sock"
    with server.Server(path, allowed_uids=frozenset({os.geteuid()})):
        yield path


@pytest.mark.parametrize(("env", "stdin"), REQUESTS)
def test_warm_stdout_and_status_equal_the_cold_paths(
    agent: Path, env: dict[str, str], stdin: bytes
) -> None:
    cold = _netkit({**env, client.NO_AGENT_ENV: "1"}, stdin)
    warm = _netkit({**env, client.SOCKET_ENV: str(agent)}, stdin)
    assert (warm.stdout, warm.returncode) == (cold.stdout, cold.returncode)
    assert '"node agent not used' not in warm.stderr  # it really was the agent's answer


def test_unreadable_stdin_is_reported_as_the_cold_path_does() -> None:
    class Broken(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            raise OSError(5, "Input/output error")

    status, stdin = entry._relay(Broken(), io.StringIO())
    assert status is None and stdin is not None
    out = io.StringIO()
    assert entry.run(ENV, stdin, out) == 1
    assert json.loads(out.getvalue())["code"] == 5


def _netkit(env: dict[str, str], stdin: bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cni_netkit.cni"],
        input=stdin.decode("latin-1"),
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        encoding="latin-1",
        timeout=60,
        check=False,
    )
