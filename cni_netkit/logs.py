"""Structured logs: JSON lines to the config's ``logFile`` (appended) or stderr, never stdout.

stdout belongs to the CNI result, so structlog is configured with an explicit
stream before anything logs (its default would print to stdout).  The entry
point calls ``configure()`` first (stderr, info), and again once the config
says where and how much to log.  Context bound with ``bind`` (container id,
command, ...) lands on every line, also on lines from modules that call
``structlog.get_logger()`` directly.

Where a line goes and which levels pass are per *context*
(``contextvars``), not per process: the node agent serves many CNI requests
at once in one process (``agent.server``), each in a context of its own, and
each request's config may name another ``logFile`` and ``logLevel``.  The
CNI executable has one context, so there this is the same as a global
setting.  Events below the level are dropped by the first processor, before
any rendering.

structlog is imported inside the functions so VERSION never pays for it.
"""

from __future__ import annotations

import os
import stat
import sys
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO, cast

if TYPE_CHECKING:
    from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger

LEVELS: Final = {"debug": 10, "info": 20, "warning": 30, "error": 40}
# Log method name -> level, for the filter (``exception`` logs at error).
_METHOD_LEVELS: Final = {
    **LEVELS, "warn": 30, "exception": 40, "critical": 50, "fatal": 50,
}

# Optional packages structlog imports when present, for pretty console output
# only (rich tracebacks, colours).  We render JSON, so they are never used;
# rich alone costs ~10 ms on a host and ~1.4 s in the test VM.
OPTIONAL_EXTRAS: Final = ("rich", "better_exceptions", "colorama")


@dataclass(frozen=True)
class _Destination:
    stream: TextIO
    level: int
    owned: bool  # a log file we opened, to close on reconfigure


_destination: ContextVar[_Destination | None] = ContextVar("cni_netkit_log", default=None)
# The pid ``new_context`` binds: our own, or the CNI executable's that the agent serves.
_invocation_pid: ContextVar[int | None] = ContextVar("cni_netkit_log_pid", default=None)


def skip_optional_extras() -> None:
    """Make ``import rich`` (and the other ``OPTIONAL_EXTRAS``) fail in this process.

    structlog imports them inside ``try: ... except ImportError`` and falls
    back to plain rendering (see structlog's ``dev`` and ``tracebacks``); a
    ``None`` entry in ``sys.modules`` is Python's documented way to make an
    import raise ``ImportError``.  For the CNI executable only, before
    structlog is first imported: a long-lived process (agent, tests) may want
    them for something else.  Packages already imported are left alone.
    """
    for name in OPTIONAL_EXTRAS:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # None: import fails


def configure(level: str = "info", log_file: str | None = None) -> None:
    """(Re)configure this context's logs: ``level`` and up, as JSON lines to ``log_file`` or stderr.

    A log file that cannot be opened falls back to stderr with a warning:
    logging must never be the reason a CNI command fails.  The file this
    context opened before is closed.
    """
    import structlog  # noqa: PLC0415 - keep it off the VERSION path

    close()
    stream: TextIO = sys.stderr
    owned = False
    problem = None
    if log_file:
        try:
            # Append mode, and every event is flushed: each line is one
            # write(2) at the end of the file, so concurrent plugin processes
            # (and agent requests) sharing the file interleave whole lines.
            stream = _open_log(log_file)
            owned = True
        except OSError as e:
            problem = f"{type(e).__name__}: {e}"
    _destination.set(_Destination(stream, LEVELS.get(level, LEVELS["info"]), owned))
    # The same settings every time: re-applying them is harmless to loggers in
    # use in other threads, and undoes a test's structlog.reset_defaults().
    structlog.configure(
        processors=[
            _drop_below_level,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS["debug"]),
        logger_factory=_writer,
        # Not cached: loggers must follow each context's destination.
        cache_logger_on_first_use=False,
    )
    if problem is not None:
        get_logger().warning(
            "cannot open logFile, logging to stderr", log_file=log_file, error=problem
        )


def _open_log(path: str) -> TextIO:
    """Open ``path`` to append, creating it 0600 (and its missing parents 0750).

    Never through a symlink: the plugin runs as root, and a link planted at the
    log's name would make it append to any file on the node.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    # O_NONBLOCK: opening a FIFO planted there must fail (ENXIO), not wait for a reader;
    # on a regular file it changes nothing.
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    fd = os.open(path, flags, 0o600)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device: not a log file
            raise OSError(f"{path} is not a regular file")
        return os.fdopen(fd, "a", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


def close() -> None:
    """Close the log file this context opened, if any; logs go to stderr until reconfigured."""
    dest = _destination.get()
    if dest is not None and dest.owned:
        dest.stream.close()
    if dest is not None:
        _destination.set(None)


def set_invocation_pid(pid: int) -> None:
    """The pid this context's ``new_context`` binds: the CNI executable's, when the agent serves it.

    The node agent runs requests in its own process; binding the requesting
    executable's pid keeps log lines of concurrent invocations apart as the
    executable's own pid does.
    """
    _invocation_pid.set(pid)


def new_context(**context: Any) -> None:
    """Start this invocation's log context afresh, with ``context`` and its pid bound."""
    import structlog  # noqa: PLC0415

    structlog.contextvars.clear_contextvars()
    # Concurrent plugin processes share one log file; the pid tells their lines apart.
    pid = _invocation_pid.get()
    structlog.contextvars.bind_contextvars(pid=os.getpid() if pid is None else pid, **context)


def bind(**context: Any) -> None:
    """Add ``context`` to every later log line of this invocation (e.g. master, queues)."""
    import structlog  # noqa: PLC0415

    structlog.contextvars.bind_contextvars(**context)


def get_logger() -> FilteringBoundLogger:
    """A logger carrying the bound context, writing where ``configure`` said."""
    import structlog  # noqa: PLC0415

    return cast("FilteringBoundLogger", structlog.get_logger())


def _drop_below_level(_: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """structlog processor: drop events below this context's level (info when unconfigured)."""
    dest = _destination.get()
    if _METHOD_LEVELS.get(method, 0) < (LEVELS["info"] if dest is None else dest.level):
        from structlog import DropEvent  # noqa: PLC0415 - loaded: we are one of its processors

        raise DropEvent
    return event


def _writer(*_: Any) -> _LineWriter:
    """structlog's logger factory: a writer to this context's stream (stderr when unconfigured)."""
    dest = _destination.get()
    return _LineWriter(sys.stderr if dest is None else dest.stream)


class _LineWriter:
    """structlog's output end: one rendered event per line on ``stream``.

    Write errors are dropped: a full disk or a closed stderr must not turn a
    CNI command that worked into one that failed.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        try:
            self._stream.write(message + "\n")
            self._stream.flush()
        except (OSError, ValueError):  # ValueError: the stream was closed
            pass

    # The filtering bound logger calls the method named after the level.
    debug = info = warning = error = critical = exception = msg
