"""Logs: JSON lines to the log file or stderr, the bound context on each, never stdout."""

from __future__ import annotations

import io
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from cni_netkit import logs


@pytest.fixture(autouse=True)
def fresh_logging() -> Iterator[None]:
    yield
    logs.configure()  # closes a test's log file, back to stderr
    structlog.contextvars.clear_contextvars()


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_events_are_appended_to_the_log_file_as_json_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "netkit.log"
    path.write_text('{"event": "earlier"}\n')
    logs.configure("info", str(path))
    logs.new_context(command="ADD", container_id="c1")
    logs.bind(master="eth0")
    logs.get_logger().info("leased", queues=[8, 9])
    structlog.get_logger("elsewhere").warning("slow", ms=12)
    got = lines(path)
    assert got[0] == {"event": "earlier"}
    assert {k: got[1][k] for k in ("event", "queues", "command", "container_id", "master")} == {
        "event": "leased",
        "queues": [8, 9],
        "command": "ADD",
        "container_id": "c1",
        "master": "eth0",
    }
    assert got[1]["level"] == "info"
    assert isinstance(got[1]["pid"], int)
    assert got[1]["timestamp"].endswith("Z")
    assert got[2]["event"] == "slow"
    assert got[2]["container_id"] == "c1"  # context reaches loggers made elsewhere
    assert capsys.readouterr() == ("", "")


def test_events_below_the_level_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "netkit.log"
    logs.configure("warning", str(path))
    log = logs.get_logger()
    log.debug("no")
    log.info("no")
    log.warning("yes")
    log.error("yes")
    assert [e["event"] for e in lines(path)] == ["yes", "yes"]


def test_default_is_info_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure()
    logs.get_logger().debug("hidden")
    logs.get_logger().info("shown")
    out, err = capsys.readouterr()
    assert out == ""
    assert [json.loads(line)["event"] for line in err.splitlines()] == ["shown"]


def test_an_unusable_log_file_falls_back_to_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("")
    logs.configure("info", str(tmp_path / "a-file" / "netkit.log"))
    logs.get_logger().info("still logged")
    out, err = capsys.readouterr()
    assert out == ""
    events = [json.loads(line) for line in err.splitlines()]
    assert events[0]["event"] == "cannot open logFile, logging to stderr"
    assert "FileExistsError" in events[0]["error"]  # mkdir of its parent
    assert events[1]["event"] == "still logged"


def test_the_log_file_is_private_and_its_missing_directories_are_made(tmp_path: Path) -> None:
    path = tmp_path / "cni-netkit" / "netkit.log"
    logs.configure("info", str(path))
    logs.get_logger().info("first")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o027 == 0
    logs.configure("info", str(path))  # appended to, never truncated
    logs.get_logger().info("second")
    assert [e["event"] for e in lines(path)] == ["first", "second"]


@pytest.mark.parametrize("planted", ["symlink", "fifo"])
def test_the_log_file_is_never_a_planted_link_or_fifo(
    tmp_path: Path, planted: str, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = tmp_path / "netkit.log"
    if planted == "symlink":
        path.symlink_to(victim)
    else:
        os.mkfifo(path)  # with no reader: opening it must not hang the plugin
    logs.configure("info", str(path))
    logs.get_logger().info("logged")
    assert victim.read_text() == "precious\n"
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert events[0]["event"] == "cannot open logFile, logging to stderr"
    assert events[1]["event"] == "logged"


def test_exceptions_are_logged_with_their_traceback(tmp_path: Path) -> None:
    path = tmp_path / "netkit.log"
    logs.configure("info", str(path))
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logs.get_logger().exception("failed")
    (event,) = lines(path)
    assert event["level"] == "error"
    assert "Traceback" in event["exception"]
    assert "RuntimeError: boom" in event["exception"]


def test_new_context_forgets_the_previous_invocation(tmp_path: Path) -> None:
    path = tmp_path / "netkit.log"
    logs.configure("info", str(path))
    logs.new_context(container_id="c1")
    logs.new_context(container_id="c2")
    logs.get_logger().info("x")
    (event,) = lines(path)
    assert event["container_id"] == "c2"


def test_a_failing_log_stream_never_fails_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = io.StringIO()
    broken.close()
    monkeypatch.setattr("sys.stderr", broken)
    logs.configure()
    logs.get_logger().error("lost, quietly")
