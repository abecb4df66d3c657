"""The thin C client (``cni_netkit/cni/shim.c``) against fake agents: every row of the decision
table in ``cni.client``, the request it sends, and the reply it relays byte for byte.

"Falling back" means exec'ing the plugin in the same process: a fake plugin
here reports its pid, environment and stdin, so each test sees what the
shim handed over.  The shim is compiled from source with short timeouts
(the production build's 2 s / 10 s would make the silent-agent rows slow);
one test builds it with ``scripts/build-shim`` as shipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cni_netkit.agent import server
from cni_netkit.cni import client
from tests.unit.fake_agent import Behaviour, FakeAgent, answer, fake_agents, ready_then

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "cni_netkit" / "cni" / "shim.c"
CONSOLE_NETKIT = Path(sys.executable).parent / "netkit"
CONF = {"cniVersion": "1.0.0", "name": "net", "type": "netkit", "master": "eth0", "queues": "8-9"}
STDIN = json.dumps(CONF).encode()
ENV = {
    "PATH": "/usr/bin:/bin",
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "c1",
    "CNI_NETNS": "/var/run/netns/gone",
    "CNI_IFNAME": "net1",
    "CNI_PATH": "/opt/cni/bin",
}
SHORT = 0.3  # the test build's READY_TIMEOUT and SILENCE_LIMIT (s)
NOTE = "node agent not used, running the command in this process"

# What the fake plugin prints: who it is and what it was given.
FAKE_PLUGIN = f"""#!{sys.executable} -S
import json, os, sys
data = sys.stdin.buffer.read()
sys.stdout.write(json.dumps({{
    "plugin": True, "pid": os.getpid(), "stdin": data.hex(),
    "no_agent": os.environ.get("CNI_NETKIT_NO_AGENT"),
    "lost": os.environ.get("CNI_NETKIT_AGENT_LOST"),
    "env": {{k: v for k, v in os.environ.items() if k.startswith("CNI_") or k == "HOME"}},
}}))
sys.exit(7)
"""


def compiler() -> str:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    pytest.fail("no C compiler: scripts/bootstrap builds the shim and needs one")


def build_shim(out: Path, *defines: str) -> Path:
    subprocess.run(
        [compiler(), "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", *defines,
         "-o", str(out), str(SOURCE)],
        check=True,
    )
    return out


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shim built with the test timeouts."""
    ms = int(SHORT * 1000)
    return build_shim(tmp_path_factory.mktemp("shim") / "netkit",
                      f"-DREADY_TIMEOUT_MS={ms}", f"-DSILENCE_LIMIT_MS={ms}")


@pytest.fixture(scope="module")
def shim_as_shipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shim with its production timeouts, for cases whose timing is the machine's, not the
    test's: a megabyte through a Python fake agent can outlast SHORT on a loaded host."""
    return build_shim(tmp_path_factory.mktemp("shim-shipped") / "netkit")


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plugin") / "fake-plugin"
    path.write_text(FAKE_PLUGIN)
    path.chmod(0o755)
    return path


@dataclass
class Ran:
    pid: int
    status: int
    stdout: bytes
    stderr: str
    seconds: float

    @property
    def fell_back(self) -> dict[str, Any]:
        """The fake plugin's report; fails unless the plugin ran, in the shim's own process."""
        assert self.status == 7, (self.stdout, self.stderr)
        got: dict[str, Any] = json.loads(self.stdout)
        assert got["plugin"] and got["pid"] == self.pid
        assert got["no_agent"] == "1"
        return got

    def notes(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stderr.splitlines()]


def run(
    exe: Path, env: dict[str, str], stdin: bytes = STDIN, *, plugin: Path | None = None
) -> Ran:
    environ = dict(env)
    if plugin is not None:
        environ["CNI_NETKIT_PLUGIN_EXE"] = str(plugin)
    started = time.monotonic()
    p = subprocess.Popen(
        [str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=environ,
    )
    out, err = p.communicate(stdin, timeout=60)
    return Ran(p.pid, p.returncode, out, err.decode(), time.monotonic() - started)


# --- fake agents ----------------------------------------------------------------------------


@pytest.fixture
def fake_agent(tmp_path: Path) -> Iterator[Callable[[Behaviour], FakeAgent]]:
    yield from fake_agents(tmp_path, ENV)


# --- served by the agent: the reply, byte for byte --------------------------------------------


@pytest.mark.parametrize(
    ("text", "status"),
    [
        (b'{"cniVersion": "1.0.0", "interfaces": []}\n', (0, 0)),
        (b'{"code": 11, "msg": "x"}\n', (1, 1)),
        (b"", (0, 0)),  # DEL, CHECK: nothing on stdout
        (b"caf\xc3\xa9 \x00 \xff\n" * 5000, (3, 3)),  # any bytes, larger than a pipe buffer
        (b"x", (256 + 130, 130)),  # an exit status is 8 bits, as os._exit makes it
    ],
)
def test_agents_answer_is_relayed_exactly(
    shim: Path, plugin: Path, fake_agent: Any, text: bytes, status: tuple[int, int]
) -> None:
    status, exit_status = status
    agent = fake_agent(answer(text, status))
    got = run(shim, agent.env(), plugin=plugin)
    assert (got.stdout, got.status, got.stderr) == (text, exit_status, "")


def test_heartbeats_keep_a_slow_request_alive(
    shim: Path, plugin: Path, fake_agent: Any
) -> None:
    def slow(conn: socket.socket) -> None:
        for _ in range(8):
            time.sleep(SHORT / 3)
            conn.sendall(client.BEAT)
        conn.sendall(client.ANSWER + (0).to_bytes(4, "big") + client.frame(b"late\n"))

    got = run(shim, fake_agent(ready_then(slow)).env(), plugin=plugin)
    assert (got.stdout, got.status, got.stderr) == (b"late\n", 0, "")


def test_request_on_the_wire_equals_the_python_clients(
    shim: Path, plugin: Path, fake_agent: Any
) -> None:
    agent = fake_agent(answer(b"ok"))
    env = agent.env(HOME="/root", OTHER="x", CNI_NETKIT_TEST_FAULT="y", CNI_ARGS="A=b=c")
    env["CNI_NETNS"] = "/proc/self/ns/net"  # exists: a real dev:ino
    env["CNI_NETKIT_PLUGIN_EXE"] = str(plugin)
    assert run(shim, env).stdout == b"ok"
    ((environ, meta, stdin),) = agent.requests
    assert environ == {k: v for k, v in env.items() if k.startswith("CNI_") or k == "PATH"}
    assert stdin == STDIN
    assert meta == {"netns": client.ns_id("/proc/self/ns/net"),
                    "cni_netns": client.ns_id("/proc/self/ns/net")}
    wire = client.request(env, STDIN)
    conn_a, conn_b = socket.socketpair()
    with conn_a, conn_b:
        conn_a.sendall(wire)
        assert server.read_request(conn_b) == (environ, meta, stdin)


@pytest.mark.parametrize("size", [0, 200_000, client.MAX_STDIN - 1, 3 << 20])
def test_stdin_of_any_size_reaches_the_agent_up_to_the_limit(
    shim_as_shipped: Path, plugin: Path, fake_agent: Any, size: int
) -> None:
    data = bytes(i % 251 for i in range(size))
    agent = fake_agent(answer(b"ok"))
    got = run(shim_as_shipped, agent.env(), data, plugin=plugin)
    assert (got.stdout, got.status) == (b"ok", 0), got.stderr
    assert agent.requests[0][2] == data[: client.MAX_STDIN]


def test_view_paths_are_answered_with_the_python_clients_ids(
    shim: Path, plugin: Path, fake_agent: Any, tmp_path: Path
) -> None:
    (tmp_path / "state").mkdir()
    paths = ["/", str(tmp_path / "state"), str(tmp_path / "gone" / "deeper"), "/proc/self/ns/net",
             "/nonexistent-root-dir"]
    seen: list[dict[str, str]] = []

    def view(conn: socket.socket) -> None:
        conn.sendall(client.VIEW + client.frame(client.env_block(
            (str(i), p) for i, p in enumerate(paths))))
        seen.append(client.parse_env_block(server._recv_block(conn, client.MAX_META)))
        answer(b"viewed")(conn)

    got = run(shim, fake_agent(view).env(), plugin=plugin)
    assert (got.stdout, got.stderr) == (b"viewed", "")
    assert seen == [{str(i): client.path_id(p) for i, p in enumerate(paths)}]


# --- falling back before the commit -----------------------------------------------------------


def test_no_socket_runs_the_plugin_quietly_with_stdin_replayed(
    shim: Path, plugin: Path, tmp_path: Path
) -> None:
    data = b"\x00\xffconfig" * 20_000  # more than a pipe holds
    env = {**ENV, client.SOCKET_ENV: str(tmp_path / "absent.sock"), "CNI_NETKIT_AGENT_LOST": "x"}
    got = run(shim, env, data, plugin=plugin)
    report = got.fell_back
    assert bytes.fromhex(report["stdin"]) == data
    assert report["lost"] is None  # never passed through from the caller's environment
    assert got.stderr == ""


def test_no_socket_at_the_default_path_runs_the_plugin(shim: Path, plugin: Path) -> None:
    if Path(client.DEFAULT_SOCKET).exists():
        pytest.skip(f"an agent serves {client.DEFAULT_SOCKET} on this machine")
    assert run(shim, ENV, plugin=plugin).fell_back["no_agent"] == "1"


@pytest.mark.parametrize("value", ["1", "true", "YES", "True"])
def test_disabled_by_environment_never_connects(
    shim: Path, plugin: Path, fake_agent: Any, value: str
) -> None:
    agent = fake_agent(answer(b"agent"))
    got = run(shim, agent.env(CNI_NETKIT_NO_AGENT=value), plugin=plugin)
    assert got.fell_back and got.stderr == ""
    assert agent.requests == []


def test_stale_socket_of_a_dead_agent(shim: Path, plugin: Path, tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens: ECONNREFUSED
    got = run(shim, {**ENV, client.SOCKET_ENV: str(path)}, plugin=plugin)
    assert got.fell_back
    (note,) = got.notes()
    assert note["event"] == NOTE and note["socket"] == str(path) and note["pid"] == got.pid
    assert "refused" in note["reason"]


def test_agent_refusal_falls_back_with_its_reason(
    shim: Path, plugin: Path, fake_agent: Any
) -> None:
    agent = fake_agent(lambda c: c.sendall(client.REFUSED + client.frame('nö "quoted"'.encode())))
    got = run(shim, agent.env(), plugin=plugin)
    assert got.fell_back
    assert [n["reason"] for n in got.notes()] == ['agent refused: nö "quoted"']


@pytest.mark.parametrize(
    "behave",
    [
        pytest.param(lambda c: c.sendall(b"?"), id="garbage-verdict"),
        pytest.param(lambda c: None, id="closed-before-verdict"),
        pytest.param(lambda c: c.sendall(client.REFUSED + b"\xff\xff\xff\xff"), id="huge-refusal"),
        pytest.param(lambda c: c.sendall(client.VIEW + client.frame(b"noequals\0")),
                     id="malformed-view"),
        pytest.param(lambda c: c.sendall(client.VIEW + client.frame(b"0=/\0")), id="view-then-eof"),
    ],
)
def test_garbage_before_the_commit_falls_back_with_a_note(
    shim: Path, plugin: Path, fake_agent: Any, behave: Callable[[socket.socket], None]
) -> None:
    got = run(shim, fake_agent(behave).env(), plugin=plugin)
    assert got.fell_back
    (note,) = got.notes()
    assert note["event"] == NOTE and note["reason"].startswith("agent")


def test_hung_agent_that_still_accepts_is_given_up_after_the_ready_timeout(
    shim: Path, plugin: Path, tmp_path: Path
) -> None:
    path = tmp_path / "hung.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(4)  # connect succeeds into the backlog; nothing ever answers
    try:
        got = run(shim, {**ENV, client.SOCKET_ENV: str(path)}, plugin=plugin)
        assert got.fell_back
        assert [n["reason"] for n in got.notes()] == [f"agent not ready within {SHORT:g}s"]
        assert got.seconds < 5
        conn, _ = s.accept()  # the request it withdrew: no GO follows
        with conn:
            server.read_request(conn)
            with contextlib.suppress(BrokenPipeError):
                conn.sendall(client.READY)
            conn.settimeout(2)
            assert conn.recv(1) == b""
    finally:
        s.close()


# --- after the commit: what a lost agent means per command ----------------------------------


@pytest.mark.parametrize(
    ("command", "redone"),
    [("ADD", False), ("DEL", True), ("GC", True), ("CHECK", True), ("STATUS", True),
     ("VERSION", True), ("FROB", True), ("", True)],
)
def test_agent_that_closes_after_commit(
    shim: Path, plugin: Path, fake_agent: Any, command: str, redone: bool
) -> None:
    agent = fake_agent(ready_then(lambda conn: None))  # dies right after taking the request
    got = run(shim, agent.env(CNI_COMMAND=command), plugin=plugin)
    report = got.fell_back
    assert bytes.fromhex(report["stdin"]) == STDIN
    if redone:
        assert report["lost"] is None
        (note,) = got.notes()
        assert note["reason"] == (
            f"agent ended mid-request: connection closed; running {command or 'the command'} here"
        )
    else:
        assert report["lost"] == "agent ended mid-request: connection closed"
        assert got.stderr == ""


@pytest.mark.parametrize(
    ("command", "redone"),
    [("ADD", False), ("DEL", False), ("GC", False), ("CHECK", True), ("STATUS", True),
     ("VERSION", True), ("FROB", True)],
)
def test_agent_silent_after_commit(
    shim: Path, plugin: Path, fake_agent: Any, command: str, redone: bool
) -> None:
    release = threading.Event()
    agent = fake_agent(ready_then(lambda conn: release.wait(10)))
    try:
        got = run(shim, agent.env(CNI_COMMAND=command), plugin=plugin)
    finally:
        release.set()
    report = got.fell_back
    silent = f"agent silent for {SHORT:g}s mid-request"
    if redone:
        assert report["lost"] is None
        assert [n["reason"] for n in got.notes()] == [f"{silent}; running {command} here"]
    else:
        assert report["lost"] == silent


def test_stray_byte_after_commit_counts_as_a_closed_agent(
    shim: Path, plugin: Path, fake_agent: Any
) -> None:
    agent = fake_agent(ready_then(lambda conn: conn.sendall(b"Z")))
    assert run(shim, agent.env(), plugin=plugin).fell_back["lost"].startswith("agent ended")


def test_lost_add_reaches_the_runtime_as_try_again_later(shim: Path, fake_agent: Any) -> None:
    # The real plugin (the console script) answers for the shim: error 11, in the
    # request's version, and the same words as the Python client's AgentLost.
    agent = fake_agent(ready_then(lambda conn: None))
    got = run(shim, agent.env(), plugin=CONSOLE_NETKIT)
    assert got.status == 1, got.stderr
    reply = json.loads(got.stdout)
    assert (reply["cniVersion"], reply["code"], reply["msg"]) == (
        "1.0.0", 11, "node agent lost during ADD")
    assert reply["details"] == (
        f"agent ended mid-request: connection closed (socket {agent.path}); "
        "not retried here because the agent may have done part of it"
    )


# --- finding the plugin -------------------------------------------------------------------------


def test_plugin_is_found_next_to_the_executable_through_symlinks(
    shim: Path, plugin: Path, tmp_path: Path
) -> None:
    vdir = tmp_path / ".netkit-1-abc"
    vdir.mkdir()
    shutil.copy2(shim, vdir / "netkit")
    shutil.copy2(plugin, vdir / "netkit-plugin")
    link = tmp_path / "netkit"
    link.symlink_to(os.path.relpath(vdir / "netkit", tmp_path))
    env = {**ENV, client.SOCKET_ENV: str(tmp_path / "absent.sock")}
    assert run(link, env).fell_back["env"]["CNI_COMMAND"] == "ADD"


def test_missing_plugin_is_a_cni_error(shim: Path, tmp_path: Path) -> None:
    env = {**ENV, client.SOCKET_ENV: str(tmp_path / "absent.sock")}
    got = run(shim, env, plugin=tmp_path / "no-such-plugin")
    assert got.status == 1
    reply = json.loads(got.stdout)
    assert (reply["cniVersion"], reply["code"]) == ("1.1.0", 999)
    assert "no-such-plugin" in reply["details"]
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy2(shim, lone / "netkit")  # no netkit-plugin beside it
    got = run(lone / "netkit", env)
    assert got.status == 1
    assert str(lone / "netkit-plugin") in json.loads(got.stdout)["details"]


# --- the real agent: same reply as the Python client -------------------------------------------

REQUESTS = [
    pytest.param({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "0.4.0"}', id="version"),
    pytest.param({"CNI_COMMAND": "VERSION"}, b"", id="version-no-stdin"),
    pytest.param({**ENV, "CNI_COMMAND": "FROB"}, STDIN, id="unknown-command"),
    pytest.param(ENV, b"\xff", id="not-utf8"),
    pytest.param(ENV, b'{"cniVersion": "1.1.0"}', id="invalid-config"),
    pytest.param({**ENV, "CNI_COMMAND": "DEL"}, STDIN, id="del-nothing"),
]


@pytest.fixture
def real_agent(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "agent" / "cni.sock"
    with server.Server(path, allowed_uids=frozenset({os.geteuid()})):
        yield path


@pytest.mark.parametrize(("env", "stdin"), REQUESTS)
def test_shim_and_python_client_get_the_same_reply_from_the_agent(
    shim: Path, real_agent: Path, env: dict[str, str], stdin: bytes
) -> None:
    environ = {"PATH": "/usr/bin:/bin", **env, client.SOCKET_ENV: str(real_agent)}
    python = run(CONSOLE_NETKIT, environ, stdin)
    ours = run(shim, environ, stdin, plugin=CONSOLE_NETKIT)
    assert (ours.stdout, ours.status) == (python.stdout, python.status)
    assert NOTE not in ours.stderr  # the agent answered


def test_build_script_makes_a_working_shim(tmp_path: Path, plugin: Path) -> None:
    subprocess.run([str(REPO / "scripts" / "build-shim"), str(tmp_path)], check=True,
                   capture_output=True)
    exe = tmp_path / "netkit"
    first = exe.stat().st_mtime_ns
    subprocess.run([str(REPO / "scripts" / "build-shim"), str(tmp_path)], check=True)
    assert exe.stat().st_mtime_ns == first  # idempotent: nothing rebuilt
    env = {**ENV, client.SOCKET_ENV: str(tmp_path / "absent.sock")}
    assert run(exe, env, plugin=plugin).fell_back


# --- broken standard streams ---------------------------------------------------------------------


def test_a_closed_stderr_does_not_stop_the_fallback(
    shim: Path, plugin: Path, tmp_path: Path
) -> None:
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # a note is due: written into a pipe nobody reads
    err_r, err_w = os.pipe()
    os.close(err_r)
    try:
        p = subprocess.run([str(shim)], input=STDIN, stdout=subprocess.PIPE, stderr=err_w,
                           env={**ENV, client.SOCKET_ENV: str(path),
                                "CNI_NETKIT_PLUGIN_EXE": str(plugin)}, timeout=60, check=False)
    finally:
        os.close(err_w)
    assert p.returncode == 7
    assert json.loads(p.stdout)["plugin"]


def test_a_runtime_that_stops_reading_gets_exit_status_1(
    shim: Path, plugin: Path, fake_agent: Any
) -> None:
    agent = fake_agent(answer(b"x" * (1 << 20)))
    out_r, out_w = os.pipe()
    os.close(out_r)
    try:
        p = subprocess.run([str(shim)], input=STDIN, stdout=out_w, stderr=subprocess.PIPE,
                           env={**agent.env(), "CNI_NETKIT_PLUGIN_EXE": str(plugin)},
                           timeout=60, check=False)
    finally:
        os.close(out_w)
    assert p.returncode == 1  # not killed by SIGPIPE


def test_no_stdin_at_all_is_relayed_as_an_empty_one(
    shim: Path, plugin: Path, fake_agent: Any
) -> None:
    agent = fake_agent(answer(b"ok"))
    p = subprocess.run(["/bin/sh", "-c", 'exec "$0" <&-', str(shim)], stdout=subprocess.PIPE,
                       env={**agent.env(), "CNI_NETKIT_PLUGIN_EXE": str(plugin)}, timeout=60,
                       check=False)
    assert (p.returncode, p.stdout) == (0, b"ok")
    assert agent.requests[0][2] == b""


# realloc() refuses, once, to grow a buffer past LIMIT: a transient allocation failure at a
# chosen point (the allocations after it succeed, so nothing else notices it).
FAILING_REALLOC = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
/* The shim only: the plugin it falls back to (exec) allocates as usual. */
__attribute__((constructor)) static void only_here(void) { unsetenv("LD_PRELOAD"); }
void *realloc(void *p, size_t n)
{
    static void *(*real)(void *, size_t);
    if (!real)
        real = (void *(*)(void *, size_t))dlsym(RTLD_NEXT, "realloc");
    static int failed;
    if (n > LIMIT && !failed) {
        failed = 1;
        errno = ENOMEM;
        return NULL;
    }
    return real(p, n);
}
"""


def test_a_failed_allocation_for_a_frame_header_falls_back_never_sends_a_torn_request(
    shim: Path, plugin: Path, fake_agent: Any, tmp_path: Path
) -> None:
    limit = 8192
    lib = tmp_path / "failing-realloc.so"
    src = tmp_path / "failing-realloc.c"
    src.write_text(FAILING_REALLOC)
    subprocess.run([compiler(), "-shared", "-fPIC", f"-DLIMIT={limit}", "-o", str(lib),
                    str(src), "-ldl"], check=True)
    agent = fake_agent(answer(b"{}\n"))
    env = {**agent.env(), "CNI_NETKIT_PLUGIN_EXE": str(plugin), "CNI_PAD": ""}
    # Pad the env block so that it ends exactly at the buffer's 8 KiB: the next
    # frame's 4-byte header is the allocation that fails.
    block = 8 + sum(len(k) + len(v) + 2 for k, v in env.items()
                    if k.startswith("CNI_") or k == "PATH")
    env["CNI_PAD"] = "x" * (limit - block)
    got = run(shim, {**env, "LD_PRELOAD": str(lib)})
    assert got.fell_back  # the plugin ran here, as for any agent it cannot use
    (note,) = got.notes()
    assert note["reason"] == "agent unusable: out of memory"
    assert agent.requests == []  # nothing half-built went out
