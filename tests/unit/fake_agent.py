"""A stand-in for the node agent's socket, for the tests of both warm-path clients.

It reads each request with the agent's own ``server.read_request`` and then
lets the test's ``behave(conn)`` answer the handshake: ready, refuse, hang,
close mid-request, answer.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from cni_netkit.agent import server
from cni_netkit.cni import client

Behaviour = Callable[[socket.socket], None]


class FakeAgent:
    """Accepts on ``path``; records each request, then ``behave(conn)`` does the rest."""

    def __init__(self, path: Path, behave: Behaviour, base_env: Mapping[str, str]) -> None:
        self.path = path
        self.behave = behave
        self.base_env = dict(base_env)
        self.connections = 0
        self.requests: list[tuple[dict[str, str], dict[str, str], bytes]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                try:
                    self.requests.append(server.read_request(conn))
                    self.behave(conn)
                except (OSError, EOFError):
                    pass  # the client left: what the test looks at is on its side

    def env(self, **over: str) -> dict[str, str]:
        """The test's request environment, pointed at this socket."""
        return {**self.base_env, client.SOCKET_ENV: str(self.path), **over}

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


def fake_agents(
    tmp_path: Path, base_env: Mapping[str, str]
) -> Iterator[Callable[[Behaviour], FakeAgent]]:
    """A fixture body: yields a maker of fake agents, closes them all afterwards."""
    made: list[FakeAgent] = []

    def make(behave: Behaviour) -> FakeAgent:
        made.append(FakeAgent(tmp_path / f"fake{len(made)}.sock", behave, base_env))
        return made[-1]

    yield make
    for agent in made:
        agent.close()


def ready_then(after_go: Behaviour) -> Behaviour:
    """An agent that says ready, waits for GO, then does ``after_go``."""

    def behave(conn: socket.socket) -> None:
        conn.sendall(client.READY)
        if conn.recv(1) == client.GO:
            after_go(conn)

    return behave


def answer(text: bytes, status: int = 0) -> Behaviour:
    """An agent that takes the request and answers ``text`` with exit ``status``."""
    return ready_then(
        lambda conn: conn.sendall(client.ANSWER + status.to_bytes(4, "big") + client.frame(text))
    )
