"""The ``netkit`` executable: CNI environment and stdin in, one JSON reply and an exit status out.

The only place in cni-netkit that prints.  stdout carries exactly one thing:
the ADD result, the VERSION answer, or an error object (exit status 1); DEL,
CHECK, STATUS and GC print nothing on success.  Logs and tracebacks go to the
log (``logFile`` or stderr).  ``main`` even moves file descriptor 1 onto
stderr for the duration, so a stray ``print`` in a library cannot corrupt the
reply.

Two paths, one reply.  Warm: when the node agent serves the CNI socket,
``main`` relays the request to it (``cni.client``) and prints its answer; the
agent runs this module's ``run`` on it.  Cold: without a usable agent,
``main`` runs ``run`` here.  Module imports are only what the interpreter has
loaded at start (not even ``json`` or ``typing``), so a warm invocation loads
next to nothing; the cold path imports the protocol helpers, then pydantic,
structlog and the plugin only as each is needed (VERSION needs none of them).
"""

from __future__ import annotations

import io
import os
import sys
import time

from cni_netkit.cni import client

# The idiom type checkers honour without importing typing (~50 ms in the test VM).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import IO, Any, BinaryIO, Final

    from structlog.typing import FilteringBoundLogger

    from cni_netkit import errors

# config.MAX_STDIN + 1 (config imports pydantic, so the number is repeated
# here; a test pins the two together): one byte past the limit shows an
# oversized config as such without reading an unbounded stream.
_STDIN_LIMIT = (1 << 20) + 1
# Cold path only: pydantic's plugin loader scans every installed package's
# entry points when the first model is built (~13 ms on a host, ~0.3 s in
# the VM); we use no pydantic plugin.  pydantic documents this variable.
_PYDANTIC_NO_PLUGINS = ("PYDANTIC_DISABLE_PLUGINS", "__all__")
# Set by the thin C client (shim.c) when the agent was lost after it took the
# request: the reason. This process then only answers error 11.
_LOST_ENV = "CNI_NETKIT_AGENT_LOST"


def main() -> None:
    """Console script ``netkit``: run the CNI command in the environment, exit with its status.

    Through the node agent when it takes the request (``cni.client.relay``),
    here otherwise.
    """
    reply = _take_stdout()
    try:
        stdin = _stdin()
        status = None
        if _LOST_ENV in os.environ:
            _leave(_lost_in_shim(os.environ[_LOST_ENV], stdin, reply))
        if client.enabled(os.environ):
            status, stdin = _relay(stdin, reply)
            if status is not None:
                # Relayed: nothing of ours to tear down, and the interpreter's
                # finalisation is ~15% of a warm invocation. Leave at once.
                _leave(status)
        if status is None:
            status = _run_cold(stdin, reply)
    except BrokenPipeError:
        # The runtime stopped reading our reply: nothing left to tell it. Point
        # the reply stream at /dev/null so closing it at exit cannot fail again.
        _silence(reply)
        status = 1
    raise SystemExit(status)


def _leave(status: int) -> None:
    """Exit now, skipping interpreter finalisation; stdout and stderr are flushed first."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os._exit(status)


def run(environ: Mapping[str, str], stdin: BinaryIO | None, out: IO[str]) -> int:
    """Handle one invocation: its reply, if any, as one JSON line on ``out``; the exit status."""
    reply, status = _handle(environ, stdin)
    _write(out, reply)
    return status


def _relay(stdin: BinaryIO | None, out: IO[str]) -> tuple[int | None, BinaryIO | None]:
    """The warm path: (the exit status of the agent's run, or None to run it here; stdin).

    ``stdin`` is read first (the agent needs it), so the stdin returned for
    the cold path is a replay of the same bytes, or of the same read failure.
    """
    try:
        data = b"" if stdin is None else stdin.read(_STDIN_LIMIT)
    except OSError as e:
        return None, _Unreadable(e)
    try:
        relayed = client.relay(os.environ, data)
    except client.AgentLost as lost:
        reply, status = _lost(lost, data)
        _write(out, reply)
        return status, None
    if relayed is None:
        return None, io.BytesIO(data)
    text, status = relayed
    out.write(text)
    out.flush()
    return status, None


def _run_cold(stdin: BinaryIO | None, out: IO[str]) -> int:
    """The cold path: this process runs the command, lighter on imports than a library would be."""
    from cni_netkit import logs  # noqa: PLC0415 - not on the warm path

    logs.skip_optional_extras()
    os.environ.setdefault(*_PYDANTIC_NO_PLUGINS)
    skip_unused_imports()
    return run(os.environ, stdin, out)


# What a cold invocation imports only because a library imports it at module
# level for a feature we never use (measured with -X importtime, docs/performance.md).
# ssl: asyncio (which pyroute2's netlink core needs) imports it inside
# ``try/except ImportError`` for TLS transports; the CNI executable speaks no TLS.
_UNUSED_OPTIONAL: Final = ("ssl",)
# pydantic's plugin loader imports importlib.metadata (and with it zipfile,
# shutil, email, csv, ...) at module level, before it looks at
# PYDANTIC_DISABLE_PLUGINS; with plugins disabled its get_plugins() returns ().
_PYDANTIC_LOADER: Final = "pydantic.plugin._loader"
_PLUGINS_DISABLED: Final = ("__all__", "1", "true")  # pydantic's own test in get_plugins


def skip_unused_imports() -> None:
    """Keep this process from importing what it cannot use (cold path only).

    Both measures change what is imported, never what runs: ``ssl`` becomes an
    import that fails (the documented ``None`` entry in ``sys.modules``), which
    asyncio handles by having no TLS; pydantic's plugin loader, when plugins are
    disabled, is replaced by a module whose ``get_plugins`` answers what the
    real one answers then: no plugins.  Modules already imported are left
    alone, so a long-lived process that imported either keeps the real one.
    """
    for name in _UNUSED_OPTIONAL:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # None: import fails
    if (
        os.environ.get(_PYDANTIC_NO_PLUGINS[0]) in _PLUGINS_DISABLED
        and _PYDANTIC_LOADER not in sys.modules
    ):
        loader = type(sys)(_PYDANTIC_LOADER, "pydantic plugins are disabled (cni_netkit.cni.entry)")
        loader.get_plugins = _no_plugins  # type: ignore[attr-defined]
        sys.modules[_PYDANTIC_LOADER] = loader


def _no_plugins() -> tuple[()]:
    return ()


def _lost(lost: client.AgentLost, data: bytes) -> tuple[dict[str, Any], int]:
    """The reply when the agent took the request and was lost: try again later (11)."""
    from cni_netkit import errors, logs  # noqa: PLC0415
    from cni_netkit.result import error_json  # noqa: PLC0415

    logs.skip_optional_extras()  # logging the failure loads structlog here
    err = errors.TryAgainLater(lost.msg, lost.details)
    _log_failure(err)
    return error_json(err, _reply_version(data)), 1


def _lost_in_shim(why: str, stdin: BinaryIO | None, out: IO[str]) -> int:
    """The thin C client (``shim.c``) lost the agent after commit: reply as ``relay`` would.

    The shim cannot build the error reply without parsing JSON, so it execs
    this executable with ``CNI_NETKIT_AGENT_LOST`` set to what happened; the
    answer is the one ``client.AgentLost`` gets, and no plugin work is done.
    """
    try:
        data = b"" if stdin is None else stdin.read(_STDIN_LIMIT)
    except OSError:
        data = b""
    command = os.environ.get("CNI_COMMAND", "")
    lost = client.AgentLost(
        f"node agent lost during {command}",
        f"{why} (socket {client.socket_path(os.environ)}); not retried here because the agent "
        "may have done part of it",
    )
    reply, status = _lost(lost, data)
    _write(out, reply)
    return status


def _write(out: IO[str], reply: dict[str, Any] | None) -> None:
    if reply is not None:
        import json  # noqa: PLC0415 - json pulls in re and enum: not on the warm path

        out.write(json.dumps(reply) + "\n")
        out.flush()


class _Unreadable(io.BytesIO):
    """Replays a stdin read failure to the cold path, which reports it as it always has."""

    def __init__(self, error: OSError) -> None:
        super().__init__()
        self._error = error

    def read(self, size: int | None = -1) -> bytes:
        raise self._error


def _handle(
    environ: Mapping[str, str], stdin: BinaryIO | None
) -> tuple[dict[str, Any] | None, int]:
    """The reply object (or None) and the exit status; raises for no request's sake."""
    from cni_netkit import errors  # noqa: PLC0415 - not on the warm path
    from cni_netkit.result import error_json, version_json  # noqa: PLC0415 - stdlib only

    data = b""
    try:
        data = _read(stdin)
        if environ.get("CNI_COMMAND") == "VERSION":
            return version_json(_requested_version(data)), 0
        return _execute(environ, data)
    except errors.NetkitError as err:
        _log_failure(err)
        return error_json(err, _reply_version(data)), 1
    except KeyboardInterrupt:
        stopped = errors.NetkitError("interrupted", "the plugin received SIGINT")
        _log_failure(stopped)
        return error_json(stopped, _reply_version(data)), 130
    except Exception as exc:  # noqa: BLE001 - the one place every failure becomes a CNI error
        _log_internal(exc)
        internal = errors.NetkitError("internal error", f"{type(exc).__name__}: {exc}")
        return error_json(internal, _reply_version(data)), 1


def _read(stdin: BinaryIO | None) -> bytes:
    from cni_netkit import errors  # noqa: PLC0415

    if stdin is None:
        return b""
    try:
        return stdin.read(_STDIN_LIMIT)
    except OSError as e:
        raise errors.IOFailure("cannot read the network config from stdin", str(e)) from e


def _execute(environ: Mapping[str, str], data: bytes) -> tuple[dict[str, Any] | None, int]:
    """Parse, log, run the plugin command; errors propagate to ``_handle``."""
    from cni_netkit import logs  # noqa: PLC0415 - structlog only past VERSION

    started = time.monotonic()
    logs.configure()  # stderr until the config says otherwise
    logs.new_context(command=environ.get("CNI_COMMAND", ""))
    from cni_netkit.config import parse_invocation  # noqa: PLC0415 - pydantic only past VERSION

    inv = parse_invocation(environ, data)
    cfg = inv.config
    logs.configure(level=cfg.log_level, log_file=cfg.log_file)
    logs.bind(
        container_id=inv.container_id,
        ifname=inv.ifname,
        netns=inv.netns,
        network=cfg.name,
    )
    log = logs.get_logger()
    if cfg.unknown_keys:
        log.warning("unknown config keys ignored", keys=list(cfg.unknown_keys))

    from cni_netkit.plugin import commands  # noqa: PLC0415 - the kernel layer loads only now

    result = commands.run(inv)
    log.debug("done", ms=round((time.monotonic() - started) * 1000, 1))
    if inv.command != "ADD":
        return None, 0
    if result is None:
        raise RuntimeError("ADD returned no result")
    return result.encode(cfg.cni_version), 0


def _requested_version(data: bytes) -> str | None:
    """The request's ``cniVersion`` if it is one we speak, read leniently."""
    import json  # noqa: PLC0415

    from cni_netkit.errors import SUPPORTED_VERSIONS  # noqa: PLC0415

    if len(data) >= _STDIN_LIMIT:
        return None
    try:
        version = json.loads(data).get("cniVersion")
    except (ValueError, AttributeError, RecursionError):
        return None
    return version if version in SUPPORTED_VERSIONS else None


def _reply_version(data: bytes) -> str:
    """The version an error reply speaks: the request's, or our newest when it has none we know."""
    from cni_netkit.errors import SUPPORTED_VERSIONS  # noqa: PLC0415

    return _requested_version(data) or SUPPORTED_VERSIONS[-1]


def _log_failure(err: errors.NetkitError) -> None:
    from cni_netkit import errors  # noqa: PLC0415

    log = _logger()
    if log is not None:
        # STATUS answers "not ready" through these codes; they are replies, not failures.
        replies = (errors.NotAvailable, errors.Degraded)
        method = log.info if isinstance(err, replies) else log.error
        method("command failed", code=err.code, msg=err.msg, details=err.details)


def _log_internal(exc: BaseException) -> None:
    log = _logger()
    if log is not None:
        log.error("internal error", exc_info=exc)


def _logger() -> FilteringBoundLogger | None:
    """The logger, configured for stderr if the failure came before ``_execute`` did that."""
    try:
        import structlog  # noqa: PLC0415

        from cni_netkit import logs  # noqa: PLC0415

        if not structlog.is_configured():
            logs.configure()
        return logs.get_logger()
    except Exception:  # noqa: BLE001 - a broken logging setup must not stop the reply
        return None


def _stdin() -> BinaryIO | None:
    """Our stdin; None when there is none, or it is a terminal (a person, not a runtime)."""
    stream = sys.stdin
    if stream is None or stream.isatty():
        return None
    return stream.buffer


def _take_stdout() -> IO[str]:
    """Keep the real stdout for the reply alone; from here on fd 1 (and ``print``) go to stderr."""
    if sys.stdout is not None:
        sys.stdout.flush()
    try:
        reply_fd = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no stdout at all: nobody to reply to
        return open(os.devnull, "w", encoding="utf-8")  # noqa: PTH123 - lives until exit
    return os.fdopen(reply_fd, "w", encoding="utf-8")


def _silence(stream: IO[str]) -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
    except (OSError, ValueError):
        pass
