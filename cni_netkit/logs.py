"""Structured logs: JSON lines to the config's ``logFile`` (appended) or stderr, never stdout.

stdout belongs to the CNI result, so structlog is configured with an explicit
stream before anything logs (its default would print to stdout).  The entry
point calls ``configure()`` first (stderr, info), and again once the config
says where and how much to log.  Context bound with ``bind`` (container id,
command, ...) lands on every line, also on lines from modules that call
``structlog.get_logger()`` directly.  Events below the level cost one
method call: the filtering logger's methods for them are no-ops.

structlog is imported inside the functions so VERSION never pays for it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO, cast

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

LEVELS: Final = {"debug": 10, "info": 20, "warning": 30, "error": 40}

# The log file we opened (closed on reconfigure); stderr is never ours to close.
_opened: TextIO | None = None


def configure(level: str = "info", log_file: str | None = None) -> None:
    """(Re)configure structlog: ``level`` and up, as JSON lines to ``log_file`` or stderr.

    A log file that cannot be opened falls back to stderr with a warning:
    logging must never be the reason a CNI command fails.
    """
    import structlog  # noqa: PLC0415 - keep it off the VERSION path

    global _opened  # noqa: PLW0603 - one process, one log destination
    if _opened is not None:
        _opened.close()
        _opened = None
    stream: TextIO = sys.stderr
    problem = None
    if log_file:
        try:
            # Append mode, and structlog flushes after each event: every line is
            # one write(2) at the end of the file, so concurrent plugin
            # processes sharing the file interleave whole lines.
            _opened = stream = Path(log_file).open("a", encoding="utf-8")  # noqa: SIM115 - open for the process
        except OSError as e:
            problem = f"{type(e).__name__}: {e}"
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, LEVELS["info"])),
        logger_factory=lambda *_: _LineWriter(stream),
        # Not cached: module-level loggers must follow the reconfigure after config parsing.
        cache_logger_on_first_use=False,
    )
    if problem is not None:
        get_logger().warning(
            "cannot open logFile, logging to stderr", log_file=log_file, error=problem
        )


def new_context(**context: Any) -> None:
    """Start this invocation's log context afresh, with ``context`` and our pid bound."""
    import structlog  # noqa: PLC0415

    structlog.contextvars.clear_contextvars()
    # Concurrent plugin processes share one log file; the pid tells their lines apart.
    structlog.contextvars.bind_contextvars(pid=os.getpid(), **context)


def bind(**context: Any) -> None:
    """Add ``context`` to every later log line of this invocation (e.g. master, queues)."""
    import structlog  # noqa: PLC0415

    structlog.contextvars.bind_contextvars(**context)


def get_logger() -> FilteringBoundLogger:
    """A logger carrying the bound context, writing where ``configure`` said."""
    import structlog  # noqa: PLC0415

    return cast("FilteringBoundLogger", structlog.get_logger())


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
