"""The warm path's client: hand one CNI request to the node agent, or say "do it yourself".

The node agent keeps the plugin loaded and serves requests on a unix socket
(``agent.server``); the ``netkit`` executable then only starts an interpreter,
relays its environment and stdin and prints the agent's reply, instead of
importing the plugin (seconds in a slow VM).  Standard library only, and only
modules the interpreter has loaded at start or that cost next to nothing
(the C ``_socket``): this module's import is all a warm invocation pays for.

**A dead agent never blocks pod networking.**  ``relay`` returns None ("run
it in this process") whenever the agent did not take the request: no socket
(no agent: the normal case without one), refused connection (a stale socket
of a dead agent), no "ready" within ``READY_TIMEOUT`` (a hung agent whose
socket still accepts), or a refusal from the agent itself (peer not root,
another network namespace, a path the request uses that the agent sees as
other files than we do, shutting down).  The agent never acts on a request
before the client commits to it, so falling back up to that point never runs
a command twice.

Once committed, a lost agent is handled by what the command allows:

====================  ==========================  ==============================
command               agent closed the connection  agent silent past SILENCE_LIMIT
====================  ==========================  ==============================
ADD                   ``AgentLost`` (error 11)     ``AgentLost`` (error 11)
DEL, GC               run here (idempotent; the    ``AgentLost`` (a stuck agent
                      agent's work on it ended)    may still act; runtime retries)
CHECK/STATUS/VERSION  run here (no side effects)   run here
====================  ==========================  ==============================

ADD is never run twice: an agent that dies mid-ADD may have left a netkit,
a lease or a record behind, and a second ADD would fail on them (or, worse,
race a half-finished one).  The error (11, "try again later") makes the
runtime do what it does after every failed ADD: DEL (which the intent
record makes complete), then a new ADD later.  The agent sends a heartbeat
byte every ``HEARTBEAT_INTERVAL`` while it works, so "silent" means the agent
process is stuck, not that the command is slow.

Wire format (the spec: docs/wire-protocol.md; all lengths u32 big-endian; env
blocks are ``KEY=VALUE\\0``...). The constants below are the one source: the
C client's ``wire.h`` is generated from them (``c_header``) and a test keeps it so::

    client: MAGIC, len+env, len+meta, len+stdin
    agent:  VIEW, len+paths  (optional: paths whose view must match)
    client: len+ids          (``path_id`` of each)
    agent:  READY  |  REFUSED, len+reason (then closes)
    client: GO     (the commit point; closing instead withdraws the request)
    agent:  BEAT*, ANSWER, status, len+stdout text (exactly what the cold path prints)
"""

from __future__ import annotations

# _socket: the C module under ``socket``, the same socket objects and calls
# without the wrapper's enum/selectors imports (~4 ms on a host, ~0.1 s in the VM).
import _socket
import os
import time

# The typing module costs ~2 ms on a host (~50 ms in the test VM); this is the
# idiom type checkers honour without importing it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

NO_AGENT_ENV = "CNI_NETKIT_NO_AGENT"  # "1"/"true"/"yes": always run in this process
SOCKET_ENV = "CNI_NETKIT_AGENT_SOCKET"  # another socket path (tests, benchmarks)
DEFAULT_SOCKET = "/run/cni-netkit/cni.sock"

# Connect + send + "ready": a live agent answers in about a millisecond on a
# host. The bound is what a hung agent costs each invocation before it runs
# cold; too tight a bound turns a burst on a starved CPU into a storm of cold
# runs (16 pods at once in the test VM saw some answers take over 1 s).
READY_TIMEOUT = 2.0
# After commit: no byte for this long and the agent is taken for stuck.
SILENCE_LIMIT = 10.0
# How often the agent proves it is alive while a request runs (agent.server).
HEARTBEAT_INTERVAL = 1.0

MAGIC = b"NKR1"
READY, REFUSED, VIEW, GO, BEAT, ANSWER = b"R", b"N", b"V", b"G", b".", b"A"
MAX_ENV = 64 << 10
MAX_META = 4 << 10
MAX_STDIN = (1 << 20) + 1  # what the entry point reads: config.MAX_STDIN + 1 (a test checks)
MAX_REFUSAL = 4096
MAX_REPLY = 16 << 20
# The environment the plugin reads besides CNI_*: PATH, for delegated IPAM plugins.
_EXTRA_ENV = ("PATH",)
# Commands that may be run again here once the agent had taken them (table above).
_REDO_IF_CLOSED = frozenset({"DEL", "GC", "CHECK", "STATUS", "VERSION"})
_REDO_IF_SILENT = frozenset({"CHECK", "STATUS", "VERSION"})


class AgentLost(Exception):
    """The agent took the request and was lost before answering; running it here is not safe."""

    def __init__(self, msg: str, details: str) -> None:
        super().__init__(msg)
        self.msg = msg
        self.details = details


class _Fallback(Exception):
    """Internal: give up on the agent, run the command in this process (``reason`` is logged)."""


def enabled(environ: Mapping[str, str]) -> bool:
    """Whether to try the agent at all (``CNI_NETKIT_NO_AGENT`` unset or false)."""
    return environ.get(NO_AGENT_ENV, "").lower() not in ("1", "true", "yes")


def socket_path(environ: Mapping[str, str]) -> str:
    """The agent's socket: ``CNI_NETKIT_AGENT_SOCKET`` or the default."""
    return environ.get(SOCKET_ENV) or DEFAULT_SOCKET


def relay(
    environ: Mapping[str, str],
    stdin: bytes,
    *,
    path: str | None = None,
    ready_timeout: float = READY_TIMEOUT,
    silence_limit: float = SILENCE_LIMIT,
) -> tuple[str, int] | None:
    """Have the agent run the request: (stdout text, exit status), or None to run it here.

    Raises ``AgentLost`` when the agent took an ADD (or a DEL/GC) and was lost
    before answering. Notes on stderr say why the agent was not used, except
    for the quiet cases: disabled, or no socket at all.
    """
    if not enabled(environ):
        return None
    path = path or socket_path(environ)
    command = environ.get("CNI_COMMAND", "")
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            _offer(sock, path, environ, stdin, ready_timeout)
        except FileNotFoundError:
            return None  # no agent on this node (or not yet): the plain case
        except _Fallback as e:
            _note(path, str(e))
            return None
        # Committed: the agent runs the command from here on.
        try:
            return _answer(sock, silence_limit)
        except _Fallback as e:
            lost = str(e)
            silent = isinstance(e.__cause__, TimeoutError)
        redo = _REDO_IF_SILENT if silent else _REDO_IF_CLOSED
        if command in redo or command not in _KNOWN_COMMANDS:
            _note(path, f"{lost}; running {command or 'the command'} here")
            return None
        raise AgentLost(
            f"node agent lost during {command}",
            f"{lost} (socket {path}); not retried here because the agent may have done part of it",
        )
    finally:
        sock.close()


_KNOWN_COMMANDS = frozenset({"ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION"})


def _offer(
    sock: _socket.socket, path: str, environ: Mapping[str, str], stdin: bytes, timeout: float
) -> None:
    """Connect, send the request, wait for "ready", commit: raises _Fallback before the commit."""
    deadline = time.monotonic() + timeout
    try:
        sock.settimeout(timeout)
        # A full listen backlog fails at once here (EAGAIN) rather than waiting.
        sock.connect(path)
        sock.settimeout(_left(deadline))
        sock.sendall(request(environ, stdin))
        sock.settimeout(_left(deadline))
        verdict = _recv_exactly(sock, 1)
        if verdict == VIEW:
            # The agent names the paths this request makes the plugin use; it
            # takes the request only if it sees the same files there as we do.
            paths = parse_env_block(_recv_block(sock, MAX_META))
            ids = [(key, path_id(p)) for key, p in paths.items()]
            sock.settimeout(_left(deadline))
            sock.sendall(frame(env_block(ids)))
            # The one bound covers the whole offer: what is left of it, not a new one.
            sock.settimeout(_left(deadline))
            verdict = _recv_exactly(sock, 1)
        if verdict == REFUSED:
            raise _Fallback(
                "agent refused: " + _recv_block(sock, MAX_REFUSAL).decode("utf-8", "replace")
            )
        if verdict != READY:
            raise _Fallback(f"agent answered {verdict!r} instead of ready")
        # The commit point: once GO is in the agent's receive queue, it will run
        # the command; if this send fails the agent never got it.
        sock.sendall(GO)
    except FileNotFoundError:
        raise
    except TimeoutError as e:
        raise _Fallback(f"agent not ready within {timeout:g}s") from e
    except (OSError, EOFError) as e:
        raise _Fallback(f"agent unusable: {_describe(e)}") from e


def _answer(sock: _socket.socket, silence_limit: float) -> tuple[str, int]:
    """Wait (through heartbeats) for the agent's answer: raises _Fallback when lost."""
    try:
        sock.settimeout(silence_limit)
        while True:
            kind = _recv_exactly(sock, 1)
            if kind == BEAT:
                continue
            if kind != ANSWER:
                raise EOFError(f"agent sent {kind!r} instead of an answer")
            status = int.from_bytes(_recv_exactly(sock, 4), "big")
            text = _recv_block(sock, MAX_REPLY).decode("utf-8")
            return text, status
    except TimeoutError as e:
        raise _Fallback(f"agent silent for {silence_limit:g}s mid-request") from e
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise _Fallback(f"agent ended mid-request: {_describe(e)}") from e


def request(environ: Mapping[str, str], stdin: bytes) -> bytes:
    """The request bytes: the environment the plugin reads, identity checks, stdin."""
    env = [(k, v) for k, v in environ.items() if k.startswith("CNI_") or k in _EXTRA_ENV]
    return b"".join(
        (MAGIC, frame(env_block(env)), frame(env_block(_identity(environ))), frame(stdin))
    )


def _identity(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """What the agent checks before taking a request: same host netns, same view of CNI_NETNS.

    nsfs (device, inode) pairs are the same in every mount namespace, so they
    tell whether the agent (in a container) reaches the same namespaces by
    these paths as the runtime does.
    """
    return [
        ("netns", ns_id("/proc/self/ns/net")),
        ("cni_netns", ns_id(environ.get("CNI_NETNS", ""))),
    ]


def ns_id(path: str) -> str:
    """``dev:inode`` of the namespace file at ``path``; ``-`` when there is none."""
    if not path:
        return "-"
    try:
        st = os.stat(path)  # noqa: PTH116 - pathlib is not loaded at start; os is
    except (OSError, ValueError):
        return "-"
    return f"{st.st_dev}:{st.st_ino}"


def path_id(path: str) -> str:
    """What ``path`` is here: ``dev:inode`` of it or of its nearest existing ancestor.

    Two processes get the same answer when they see the same file there (a
    bind mount shows the source's device and inode): a directory the agent's
    container lacks, or has as a directory of its own, answers differently.
    """
    probe = path
    while True:
        got = ns_id(probe)
        if got != "-" or probe in ("/", ""):
            return f"{probe}={got}"
        probe = probe.rsplit("/", 1)[0] or "/"


def answer(status: int, text: bytes) -> bytes:
    """The agent's reply: ANSWER, the exit status (u32), the stdout text (framed)."""
    return ANSWER + status.to_bytes(4, "big") + frame(text)


def c_header() -> str:
    """``cni/wire.h``: these constants for ``shim.c`` (regenerate with
    ``python -c 'from cni_netkit.cni import client; print(client.c_header(), end="")'
    > cni_netkit/cni/wire.h``; tests/unit/test_wire.py fails while it differs)."""
    kinds = {"READY": READY, "REFUSED": REFUSED, "VIEW": VIEW, "GO": GO, "BEAT": BEAT,
             "ANSWER": ANSWER}
    lines = [
        "/* Generated from cni_netkit/cni/client.py (c_header); the spec is",
        " * docs/wire-protocol.md. Do not edit: tests/unit/test_wire.py checks it. */",
        "#ifndef CNI_NETKIT_WIRE_H", "#define CNI_NETKIT_WIRE_H", "",
        f'#define WIRE_MAGIC "{MAGIC.decode()}"',
        f'#define WIRE_DEFAULT_SOCKET "{DEFAULT_SOCKET}"',
        *(f"#define WIRE_{name} '{kind.decode()}'" for name, kind in kinds.items()),
        *(f"#define WIRE_{name} {value}u" for name, value in (
            ("MAX_ENV", MAX_ENV), ("MAX_META", MAX_META), ("MAX_STDIN", MAX_STDIN),
            ("MAX_REFUSAL", MAX_REFUSAL), ("MAX_REPLY", MAX_REPLY))),
        f"#define WIRE_READY_TIMEOUT_MS {round(READY_TIMEOUT * 1000)}",
        f"#define WIRE_SILENCE_LIMIT_MS {round(SILENCE_LIMIT * 1000)}",
        "", "#endif", "",
    ]
    return "\n".join(lines)


def env_block(pairs: Iterable[tuple[str, str]]) -> bytes:
    """``KEY=VALUE\\0`` for each pair, bytes as the OS had them (surrogateescape)."""
    return b"".join(f"{k}={v}".encode("utf-8", "surrogateescape") + b"\0" for k, v in pairs)


def parse_env_block(block: bytes) -> dict[str, str]:
    """The inverse of ``env_block``; ValueError for a malformed block."""
    env: dict[str, str] = {}
    for item in block.split(b"\0")[:-1] if block else []:
        key, sep, value = item.decode("utf-8", "surrogateescape").partition("=")
        if not sep or not key:
            raise ValueError(f"malformed environment entry {item[:40]!r}")
        env[key] = value
    if block and not block.endswith(b"\0"):
        raise ValueError("environment block not NUL-terminated")
    return env


def frame(data: bytes) -> bytes:
    """``data`` with its u32 length in front."""
    return len(data).to_bytes(4, "big") + data


def _recv_block(sock: _socket.socket, limit: int) -> bytes:
    size = int.from_bytes(_recv_exactly(sock, 4), "big")
    if size > limit:
        raise EOFError(f"block of {size} bytes exceeds {limit}")
    return _recv_exactly(sock, size)


def _recv_exactly(sock: _socket.socket, size: int) -> bytes:
    """``size`` bytes; EOFError when the peer closes first."""
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 16))
        if not chunk:
            raise EOFError("connection closed")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _note(path: str, reason: str) -> None:
    """One JSON log line on stderr: why this invocation runs here and not in the agent."""
    import json  # noqa: PLC0415 - only on this rare path

    line = {
        "level": "warning",
        "event": "node agent not used, running the command in this process",
        "reason": reason,
        "socket": path,
        "pid": os.getpid(),
    }
    try:  # noqa: SIM105 - contextlib is not loaded at start (python -S)
        os.write(2, (json.dumps(line) + "\n").encode())
    except OSError:  # no stderr: the note is lost, the command is not
        pass
