"""The node agent's CNI socket: the warm path of the ``netkit`` executable.

A cold ``netkit`` process spends almost all its time importing pyroute2,
pydantic and structlog (~0.2 s on a host, seconds in the test VM), far more
than the netlink work it does.  The agent keeps that code loaded and serves
requests that ``cni.client`` relays over a unix socket: each one runs through
the same ``entry.run`` as a cold invocation, so it replies byte for byte what
the executable would have printed.

Trust and isolation:

- The socket lives in a directory of mode 0700 and is itself 0600; each
  connection's peer is checked with ``SO_PEERCRED`` and only uid 0 (the
  runtime) is served.
- The agent acts only where the executable would have: a request whose
  executable runs in another network namespace, whose ``CNI_NETNS`` is
  another namespace here (e.g. a container without the DaemonSet's
  ``/var/run/netns`` mount), or that names a path (``view_paths``: stateDir,
  logFile, CNIDeviceInfoFile, host-local's dataDir, the bpffs pins; the mount
  namespace itself when the request mounts: another IPAM plugin than
  host-local, ``xskMapVolume``) that the agent sees as other files than the
  executable does, is refused, and the
  client runs it itself.  ``CNI_PATH`` matters only when IPAM is delegated
  (the plugin runs nothing else from it); then each of its directories must
  be the same directory here, either at the same path or at one of the
  agent's ``bin_dirs`` (the DaemonSet mounts the host's ``/opt/cni/bin`` at
  ``/host/opt/cni/bin``), and the request runs with ``CNI_PATH`` translated
  to the agent's paths.
- Every request runs in a ``contextvars.Context`` of its own: its
  environment (``commands.request_environ``: fault points, IPAM's PATH), its
  log destination, level and bound context (``logs``), its pid in log lines
  (the executable's).  Nothing else is shared between requests but the
  loaded code and the per-master flock, which serialises what it serialises
  between processes too.
- Up to ``workers`` requests run at once (a thread each); more wait their
  turn.  The handshake (read, check, "ready") is outside that limit, so a
  busy agent still answers "ready" at once and clients never fall back merely
  because the agent is busy.
- While a request waits or runs, a heartbeat byte goes to its client every
  ``client.HEARTBEAT_INTERVAL``: a client that hears nothing for
  ``client.SILENCE_LIMIT`` takes the agent for stuck (see ``cni.client`` for
  what it does then).

Start it from the agent process with ``start(path)`` (returns a ``Server``;
``close()`` it on SIGTERM), or run ``python -m cni_netkit.agent.server
--socket PATH`` (tests, benchmarks).
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import gc
import io
import json
import os
import signal
import socket
import stat
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import structlog

from cni_netkit import logs
from cni_netkit.cni import client, entry
from cni_netkit.plugin import commands

log = structlog.get_logger("cni_netkit.agent.server")

DEFAULT_SOCKET = client.DEFAULT_SOCKET
# Concurrent requests: pod starts come in bursts, and a request spends much of
# its time in syscalls, flock waits and delegated IPAM processes; more threads
# than this only contend for the GIL.
DEFAULT_WORKERS = 4
# Connections held at once (handshaking, queued or running); past this the
# agent refuses and the client runs the command itself.
MAX_CONNECTIONS = 64
# How long close() lets requests in flight finish. The DaemonSet's
# terminationGracePeriodSeconds is longer (a manifest test holds them together):
# a rollout must not SIGKILL an ADD the agent has committed to.
CLOSE_TIMEOUT = 30.0
# A connected client must deliver its request, and say go, within this.
_REQUEST_TIMEOUT = 5.0
# How long a refused client may take to hang up (it reads the refusal and closes).
_REFUSE_DRAIN_TIMEOUT = 1.0
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# Settings the plugin reads from its process environment rather than from the
# request (kernel.xsk's pin root): a request must agree with the agent's.
_PROCESS_SETTINGS = ("CNI_NETKIT_BPF_ROOT",)
_HOST_LOCAL_DIR = "/var/lib/cni/networks"  # host-local's default dataDir
_MAX_VIEW_PATHS = 32


class Server:
    """The listening socket, its accept thread, the heartbeat thread and requests in flight."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] = DEFAULT_SOCKET,
        *,
        workers: int = DEFAULT_WORKERS,
        max_connections: int = MAX_CONNECTIONS,
        allowed_uids: frozenset[int] = frozenset({0}),
        heartbeat: float = client.HEARTBEAT_INTERVAL,
        bin_dirs: Sequence[str | os.PathLike[str]] = (),
    ) -> None:
        """``bin_dirs``: where the agent sees directories the executable may name in
        ``CNI_PATH`` under another path (its mount of the host's CNI bin dir)."""
        self.path = Path(socket_path)
        self._bin_dirs = tuple(str(d) for d in bin_dirs)
        self._allowed_uids = allowed_uids
        self._max_connections = max_connections
        self._heartbeat = heartbeat
        self._slots = threading.BoundedSemaphore(workers)
        self._lock = threading.Lock()
        self._connections: set[threading.Thread] = set()
        self._waiting: dict[socket.socket, threading.Lock] = {}  # committed, for heartbeats
        self._closing = threading.Event()
        self._sock: socket.socket | None = None
        self._bound: tuple[int, int] | None = None
        self._threads: list[threading.Thread] = []
        self._netns = client.ns_id("/proc/self/ns/net")

    # -- life cycle --

    def start(self) -> Server:
        """Load the plugin's code, then listen; returns at once (threads do the serving)."""
        warm_up()
        self._sock = _listen(self.path)
        st = self.path.stat()
        self._bound = (st.st_dev, st.st_ino)
        for target, name in ((self._accept, "cni-accept"), (self._beat, "cni-heartbeat")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("serving CNI requests", socket=str(self.path))
        return self

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stop accepting, remove the socket (if still ours), let requests in flight finish.

        New invocations find no socket and run cold from here on; requests
        still running after ``timeout`` are abandoned to the process's exit.
        """
        if self._closing.is_set():
            return
        self._closing.set()
        if self._sock is not None:
            self._unlink_if_ours()
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept()
            self._sock.close()
        deadline = time.monotonic() + timeout
        for t in [*self._threads, *self._snapshot()]:
            t.join(max(0.0, deadline - time.monotonic()))
        left = [t for t in self._snapshot() if t.is_alive()]
        if left:
            log.warning("requests still running at shutdown", count=len(left))

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _snapshot(self) -> list[threading.Thread]:
        with self._lock:
            return list(self._connections)

    def _unlink_if_ours(self) -> None:
        # A newer agent may have replaced the socket already (rolling update).
        try:
            st = self.path.stat()
            if (st.st_dev, st.st_ino) == self._bound:
                self.path.unlink()
        except OSError:
            pass

    # -- threads --

    def _accept(self) -> None:
        sock = self._sock
        assert sock is not None  # noqa: S101 - start() set it before starting this thread
        while not self._closing.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                if self._closing.is_set():
                    return
                log.exception("accept failed")
                time.sleep(0.1)  # e.g. EMFILE: do not spin
                continue
            with self._lock:
                full = len(self._connections) >= self._max_connections
                if not full:
                    t = threading.Thread(
                        target=self._connection, args=(conn,), name="cni-request", daemon=True
                    )
                    self._connections.add(t)
            if full:
                # Not drained: the accept loop must not wait on one client.
                _refuse(conn, f"agent busy: {self._max_connections} connections", drain=False)
                conn.close()
                continue
            t.start()

    def _beat(self) -> None:
        while not self._closing.wait(self._heartbeat):
            with self._lock:
                waiting = list(self._waiting.items())
            for conn, lock in waiting:
                # A client that left: the request goes on, its answer will be lost.
                with lock, contextlib.suppress(OSError):
                    conn.sendall(client.BEAT)

    def _connection(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._handle(conn)
        except Exception:  # one broken connection must not end the agent
            log.exception("CNI connection failed")
        finally:
            with self._lock:
                self._connections.discard(threading.current_thread())

    def _handle(self, conn: socket.socket) -> None:
        pid, uid, _ = _PEERCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        if uid not in self._allowed_uids:
            log.warning("refused a CNI request", peer_pid=pid, peer_uid=uid, reason="uid")
            _refuse(conn, f"uid {uid} is not served")
            return
        conn.settimeout(_REQUEST_TIMEOUT)
        try:
            environ, meta, stdin = read_request(conn)
        except (OSError, EOFError, ValueError) as e:
            log.warning("unreadable CNI request", peer_pid=pid, error=str(e))
            return
        problem = self._problem(environ, meta)
        if problem is None:
            view = _other_view(conn, environ, stdin, self._bin_dirs)
            if isinstance(view, dict):
                environ = view  # CNI_PATH in the agent's own paths
            else:
                problem = view
        if problem:
            log.warning("refused a CNI request", peer_pid=pid, reason=problem)
            _refuse(conn, problem)
            return
        conn.sendall(client.READY)
        try:
            go = conn.recv(1)
        except OSError:
            go = b""
        if go != client.GO:
            return  # withdrawn (the client gave up waiting): it runs the command itself
        # Committed: from here the client relies on us.
        send_lock = threading.Lock()
        with self._lock:
            self._waiting[conn] = send_lock
        try:
            with self._slots:
                text, status = run_request(environ, stdin, pid)
        finally:
            with self._lock:
                del self._waiting[conn]
        answer = client.answer(status, text.encode())
        with send_lock:
            try:
                conn.sendall(answer)
            except OSError as e:
                log.warning(
                    "client gone before the answer",
                    peer_pid=pid,
                    command=environ.get("CNI_COMMAND"),
                    container_id=environ.get("CNI_CONTAINERID"),
                    status=status,
                    error=str(e),
                )

    def _problem(self, environ: Mapping[str, str], meta: Mapping[str, str]) -> str | None:
        """Why this agent must not run the request (the client then runs it), or None."""
        if self._closing.is_set():
            return "agent shutting down"
        if meta.get("netns") != self._netns:
            return "the executable runs in another network namespace than the agent"
        netns = environ.get("CNI_NETNS", "")
        if meta.get("cni_netns", "-") != client.ns_id(netns):
            return f"CNI_NETNS {netns} is another namespace (or none) in the agent"
        return None


def _same_file(path: str, seen: str | None) -> bool:
    """Whether ``path`` here is what the executable saw there (``seen``, its
    ``client.path_id``: ``probe=dev:ino`` of the path or its nearest existing ancestor).

    The executable and the agent look at different moments: a directory the
    executable saw missing may exist by the time the agent looks (a concurrent
    host-local creates ``/var/lib/cni/networks/<net>`` on its first ADD). So the
    agent checks the executable's probe itself, and below it only that what
    exists here now lies on the probe's filesystem (no mount of the agent's own
    there), rather than asking for the same nearest ancestor.
    """
    probe, sep, their_id = (seen or "").rpartition("=")
    if not sep or client.ns_id(probe) != their_id:
        return False
    if probe == path:
        return True
    if not path.startswith(probe.rstrip("/") + "/"):
        return False
    dev = their_id.split(":", 1)[0]
    below = path[len(probe.rstrip("/")) + 1:].split("/")
    for n in range(1, len(below) + 1):
        here = client.ns_id(probe.rstrip("/") + "/" + "/".join(below[:n]))
        if here == "-":
            return True  # the rest is missing here too
        if here.split(":", 1)[0] != dev:
            return False
    return True


def _other_view(
    conn: socket.socket, environ: Mapping[str, str], stdin: bytes, bin_dirs: Sequence[str] = ()
) -> str | dict[str, str] | None:
    """Why the agent would not act on the same files as the executable, or None.

    The agent usually runs in a container: a path the request makes the
    plugin use (``view_paths``) that is not mounted there at the same place
    would silently send records, IPAM allocations, device-info or pins into
    the container's own filesystem.  Asks the client what each path is on its
    side and compares; a request with no such path costs no round trip.
    Settings the plugin takes from its process environment must also agree.

    With delegated IPAM, each ``CNI_PATH`` directory must be a directory the
    agent sees too, at the same path or at one of ``bin_dirs``; then the
    answer is the request's environment with ``CNI_PATH`` in the agent's
    paths (a dict) instead of None.
    """
    for name in _PROCESS_SETTINGS:
        if environ.get(name) != os.environ.get(name):
            return f"{name} differs between the request and the agent"
    paths = view_paths(environ, stdin)
    search = cni_path_dirs(environ, stdin)
    asked = [*paths, *(d for d in search if d not in paths)]
    if not asked:
        return None
    conn.sendall(client.VIEW + client.frame(client.env_block((str(i), p) for i, p in
                                                          enumerate(asked))))
    theirs = client.parse_env_block(_recv_block(conn, client.MAX_META))
    for i, path in enumerate(paths):
        seen = theirs.get(str(i))
        if not _same_file(path, seen):
            return (f"{path} is not the same here ({client.path_id(path)}) as for the "
                    f"executable ({seen})")
    if not search:
        return None
    translated = []
    for d in search:
        here = _same_dir(d, theirs.get(str(asked.index(d))), bin_dirs)
        if here is None:
            return (f"CNI_PATH directory {d} is not a directory the agent sees "
                    f"(at {d} or in {', '.join(bin_dirs) or 'no bin dir'})")
        translated.append(here)
    return {**environ, "CNI_PATH": ":".join(translated)}


def _same_dir(path: str, seen: str | None, bin_dirs: Sequence[str]) -> str | None:
    """Where the agent sees the directory the executable sees at ``path``, or None.

    ``seen`` is the client's ``path_id(path)``: only a directory that exists
    there (not an ancestor's identity) can be matched.
    """
    if not seen or seen.rpartition("=")[0] != path:
        return None
    ident = seen.rpartition("=")[2]
    for here in (path, *bin_dirs):
        if client.ns_id(here) == ident:
            return here
    return None


def cni_path_dirs(environ: Mapping[str, str], stdin: bytes) -> list[str]:
    """The ``CNI_PATH`` directories the plugin searches: only when it delegates IPAM."""
    try:
        conf = json.loads(stdin)
    except (ValueError, RecursionError):
        return []
    if not isinstance(conf, dict) or not isinstance(conf.get("ipam"), dict):
        return []
    dirs = [d for d in environ.get("CNI_PATH", "").split(":") if d]
    unique = dict.fromkeys(d for d in dirs if d.startswith("/") and "\0" not in d)
    return list(unique)[:_MAX_VIEW_PATHS]


def view_paths(environ: Mapping[str, str], stdin: bytes) -> list[str]:
    """The host paths a request makes the plugin (or its IPAM plugin) use, besides CNI_NETNS
    and CNI_PATH (``cni_path_dirs``: matched, and translated, apart).

    Read leniently from the raw config: a config too broken to read here
    fails validation in the plugin before it touches any path.  An IPAM
    plugin other than host-local keeps its state where we cannot know, so it
    is served only by an agent in the executable's own mount namespace.
    """
    from cni_netkit.config import DEFAULT_STATE_DIR  # noqa: PLC0415 - loaded by warm_up
    from cni_netkit.kernel import xsk  # noqa: PLC0415

    paths: list[str] = []
    try:
        conf = json.loads(stdin)
    except (ValueError, RecursionError):
        conf = None
    if isinstance(conf, dict):
        paths.append(_text(conf.get("stateDir")) or DEFAULT_STATE_DIR)
        paths.append(_parent(conf.get("logFile")))
        runtime = conf.get("runtimeConfig")
        if isinstance(runtime, dict):
            paths.append(_parent(runtime.get("CNIDeviceInfoFile")))
        ipam = conf.get("ipam")
        if isinstance(ipam, dict):
            if ipam.get("type") == "host-local":
                paths.append(_text(ipam.get("dataDir")) or _HOST_LOCAL_DIR)
            else:
                paths.append("/proc/self/ns/mnt")  # each side's own mount namespace
        paths.append(str(xsk.bpf_root()))
        if conf.get("xskMapVolume") is not None:
            # ADD mounts a bpffs into the pod's volume, DEL unmounts it: a mount made in
            # the agent's container would never reach the host, nor the pod.
            paths.append("/proc/self/ns/mnt")
    unique = dict.fromkeys(p for p in paths if p.startswith("/") and "\0" not in p)
    return list(unique)[:_MAX_VIEW_PATHS]


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _parent(value: object) -> str:
    return _text(value).rsplit("/", 1)[0] if _text(value).startswith("/") else ""


def run_request(environ: Mapping[str, str], stdin: bytes, pid: int) -> tuple[str, int]:
    """Run one CNI request as the executable would: (stdout text, exit status).

    In a fresh ``contextvars.Context``: nothing of another request (log
    destination, bound log context, environment) is visible, and nothing of
    this one outlives it.
    """
    return contextvars.Context().run(_run_isolated, environ, stdin, pid)


def _run_isolated(environ: Mapping[str, str], stdin: bytes, pid: int) -> tuple[str, int]:
    commands.request_environ.set(environ)
    logs.set_invocation_pid(pid)
    out = io.StringIO()
    try:
        status = entry.run(environ, io.BytesIO(stdin), out)
    finally:
        logs.close()  # the request's logFile
    return out.getvalue(), status


def read_request(conn: socket.socket) -> tuple[dict[str, str], dict[str, str], bytes]:
    """The client's (environment, identity meta, stdin); ValueError/EOFError if malformed."""
    if _recv_exactly(conn, len(client.MAGIC)) != client.MAGIC:
        raise ValueError("not a cni-netkit request (bad magic)")
    environ = client.parse_env_block(_recv_block(conn, client.MAX_ENV))
    meta = client.parse_env_block(_recv_block(conn, client.MAX_META))
    stdin = _recv_block(conn, client.MAX_STDIN)
    return environ, meta, stdin


def warm_up() -> None:
    """Load everything a request needs now, so that the first pod does not pay for it."""
    from cni_netkit.config import parse_invocation  # noqa: PLC0415 - pydantic, on purpose now
    from cni_netkit.kernel import Kernel  # noqa: PLC0415 - pyroute2, on purpose now

    # A first validation builds what pydantic builds lazily.
    parse_invocation(
        {"CNI_COMMAND": "STATUS"},
        b'{"cniVersion": "1.1.0", "name": "warm-up", "type": "netkit", "master": "lo",'
        b' "queues": [0]}',
    )
    try:
        with Kernel() as kernel:
            kernel.link("lo")  # loads the link message classes
            kernel.probe()  # looks the netdev family up (cached for the process)
    except Exception as e:  # noqa: BLE001 - warming up is an optimisation, never a failure
        log.info("netlink warm-up skipped", error=str(e))
    # What start-up loaded lives as long as the process (modules, pydantic's
    # validators, pyroute2's classes): out of the cyclic collector's sight, so
    # that a full collection during a request does not walk all of it again.
    gc.collect()
    gc.freeze()


def _listen(path: Path) -> socket.socket:
    """A listening socket at ``path`` (0600, in a 0700 directory), replacing a stale one.

    Bound under a temporary name, restricted, listening, then renamed into
    place: a client never finds a socket that is not ready or not private.
    """
    directory = path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = directory.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise PermissionError(f"socket directory {directory} is not a directory of ours")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"socket directory {directory} is writable by others")
    directory.chmod(0o700)
    tmp = directory / f".{path.name}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(tmp))
        tmp.chmod(0o600)
        sock.listen(socket.SOMAXCONN)
        tmp.rename(path)
    except BaseException:
        sock.close()
        tmp.unlink(missing_ok=True)
        raise
    return sock


def _refuse(conn: socket.socket, reason: str, *, drain: bool = True) -> None:
    """Send the refusal; with ``drain``, wait (bounded) for the client to hang up.

    A client may still be sending its request when an early refusal (its uid)
    is written: closing at once would fail that send with EPIPE before the
    client reads why, and it would fall back citing a broken pipe instead of
    the reason.  Reading and discarding until the client closes keeps the
    reason readable; the bounds keep a client that never hangs up from holding
    the thread.
    """
    with contextlib.suppress(OSError):  # the client left: it runs the command itself
        conn.sendall(client.REFUSED + client.frame(reason.encode()[: client.MAX_REFUSAL]))
        if not drain:
            return
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(_REFUSE_DRAIN_TIMEOUT)
        left = client.MAX_ENV + client.MAX_META + client.MAX_STDIN + 64
        while left > 0:
            chunk = conn.recv(min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)


def _recv_block(conn: socket.socket, limit: int) -> bytes:
    size = int.from_bytes(_recv_exactly(conn, 4), "big")
    if size > limit:
        raise ValueError(f"block of {size} bytes exceeds {limit}")
    return _recv_exactly(conn, size)


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = conn.recv(min(size, 1 << 16))
        if not chunk:
            raise EOFError("connection closed")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def start(
    socket_path: str | os.PathLike[str] = DEFAULT_SOCKET,
    *,
    workers: int = DEFAULT_WORKERS,
    allowed_uids: frozenset[int] = frozenset({0}),
    bin_dirs: Sequence[str | os.PathLike[str]] = (),
) -> Server:
    """Serve CNI requests on ``socket_path`` from background threads; ``close()`` the result."""
    return Server(
        socket_path, workers=workers, allowed_uids=allowed_uids, bin_dirs=bin_dirs
    ).start()


def serve(
    socket_path: str | os.PathLike[str] = DEFAULT_SOCKET,
    *,
    stop: threading.Event,
    workers: int = DEFAULT_WORKERS,
    bin_dirs: Sequence[str | os.PathLike[str]] = (),
) -> None:
    """Serve CNI requests on ``socket_path`` until ``stop`` is set, then close."""
    server = Server(socket_path, workers=workers, bin_dirs=bin_dirs).start()
    try:
        while not stop.wait(1.0):  # a timed wait: signal handlers run in between
            pass
    finally:
        server.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cni_netkit.agent.server --socket PATH``: serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m cni_netkit.agent.server")
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help="unix socket path")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument("--bin-dir", action="append", default=[], dest="bin_dirs",
                        help="where the agent sees a CNI_PATH directory of the executable's "
                             "under another path (repeatable)")
    args = parser.parse_args(argv)
    logs.configure("info")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve(args.socket, stop=stop, workers=args.workers, bin_dirs=args.bin_dirs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
