"""The warm path's wire format (docs/wire-protocol.md) pinned in bytes, for every implementation.

Golden bytes are written out here by hand, not with the code under test: the
Python client and the C client (``shim.c``) must put exactly these on the
socket, the agent's reader must parse them, and both clients must read the
agent's golden replies. The C client's constants are generated from
``client.py`` (one source), and this test keeps ``wire.h`` in step.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

from cni_netkit import config
from cni_netkit.agent import server
from cni_netkit.cni import client
from tests.unit.test_shim import plugin, run, shim  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parents[2]
STDIN = b'{"cniVersion":"1.1.0"}'


def u32(n: int) -> bytes:
    return bytes([n >> 24 & 255, n >> 16 & 255, n >> 8 & 255, n & 255])


def golden_request(env: list[tuple[str, str]], netns_id: str) -> bytes:
    """MAGIC, then three length-prefixed blocks: env, identity, stdin."""
    block = b"".join(f"{k}={v}".encode() + b"\0" for k, v in env)
    meta = b"netns=" + netns_id.encode() + b"\0cni_netns=-\0"
    return b"NKR1" + u32(len(block)) + block + u32(len(meta)) + meta + u32(len(STDIN)) + STDIN


def test_the_golden_request_is_what_the_spec_says_in_bytes() -> None:
    assert golden_request([("CNI_COMMAND", "ADD"), ("PATH", "/bin")], "1:2") == bytes.fromhex(
        "4e4b5231" "0000001a" "434e495f434f4d4d414e443d41444400" "504154483d2f62696e00"
        "00000016" "6e65746e733d313a3200" "636e695f6e65746e733d2d00"
        "00000016") + STDIN


def test_wire_h_is_generated_from_the_python_constants() -> None:
    assert (REPO / "cni_netkit" / "cni" / "wire.h").read_text() == client.c_header()
    # The one constant the client cannot import (config loads pydantic): checked here.
    assert client.MAX_STDIN == config.MAX_STDIN + 1


def test_the_python_client_sends_the_golden_request_and_the_agent_parses_it() -> None:
    env = [("CNI_COMMAND", "ADD"), ("CNI_NETNS", ""), ("PATH", "/bin")]
    wire = client.request({**dict(env), "HOME": "/root"}, STDIN)  # HOME is never sent
    assert wire == golden_request(env, client.ns_id("/proc/self/ns/net"))
    a, b = socket.socketpair()
    with a, b:
        a.sendall(wire)
        assert server.read_request(b) == (
            dict(env), {"netns": client.ns_id("/proc/self/ns/net"), "cni_netns": "-"}, STDIN)


def test_golden_replies() -> None:
    assert client.answer(3, b"out") == b"A" + b"\0\0\0\3" + b"\0\0\0\3out"
    assert (client.READY, client.REFUSED, client.VIEW, client.GO, client.BEAT) == (
        b"R", b"N", b"V", b"G", b".")


def test_the_c_client_sends_the_golden_request_and_reads_the_golden_answer(
    shim: Path, plugin: Path, tmp_path: Path  # noqa: F811 - fixtures
) -> None:
    path = tmp_path / "raw.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    got: list[bytes] = []

    def agent() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            data = b""
            while len(data) < 4 or not _complete(data):
                data += conn.recv(65536)
            got.append(data)
            conn.sendall(b"R")
            assert conn.recv(1) == b"G"
            conn.sendall(b"." + b"A" + b"\0\0\0\0" + b"\0\0\0\x0bgolden-text")

    t = threading.Thread(target=agent)
    t.start()
    env = [("CNI_COMMAND", "ADD"), ("CNI_NETKIT_AGENT_SOCKET", str(path)),
           ("CNI_NETKIT_PLUGIN_EXE", str(plugin)), ("CNI_NETNS", ""), ("PATH", "/bin")]
    ran = run(shim, {**dict(env), "HOME": "/root"}, STDIN)
    t.join(10)
    listener.close()
    assert (ran.status, ran.stdout, ran.stderr) == (0, b"golden-text", "")
    assert got == [golden_request(env, client.ns_id("/proc/self/ns/net"))]


def _complete(data: bytes) -> bool:
    """Whether ``data`` holds MAGIC and three whole blocks."""
    at = 4
    for _ in range(3):
        if len(data) < at + 4:
            return False
        at += 4 + int.from_bytes(data[at:at + 4], "big")
    return len(data) >= at


def test_the_spec_names_every_constant() -> None:
    spec = (REPO / "docs" / "wire-protocol.md").read_text()
    for name in ("MAX_ENV", "MAX_META", "MAX_STDIN", "MAX_REFUSAL", "MAX_REPLY", "READY_TIMEOUT",
                 "SILENCE_LIMIT", "HEARTBEAT_INTERVAL"):
        assert f"`{name}`" in spec, name
    assert json.dumps(client.MAGIC.decode()) in spec
