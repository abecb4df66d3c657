"""The ``netkit`` executable: one JSON reply (or none) on stdout, the right exit status, always.

``commands.run`` is replaced by a fake of our own seam (a stand-in module),
so nothing here touches the kernel.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cni_netkit.plugin
from cni_netkit import config, errors
from cni_netkit.cni import entry
from cni_netkit.config import Invocation
from cni_netkit.result import Interface, NetkitQueue, NetkitResult, Result

REPO = Path(__file__).resolve().parents[2]
ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "0123abcd",
    "CNI_NETNS": "/var/run/netns/pod1",
    "CNI_IFNAME": "net1",
    "CNI_PATH": "/opt/cni/bin",
    "CNI_ARGS": "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=pod",
}
CONF: dict[str, Any] = {
    "cniVersion": "1.0.0",
    "name": "netkit-net",
    "type": "netkit",
    "master": "eth0",
    "queues": "8-15",
}
RESULT = Result(
    interfaces=(Interface(name="net1", mac="02:00:00:00:00:01", sandbox="/var/run/netns/pod1"),),
    netkit=NetkitResult(
        master="eth0",
        pairing="single",
        mode="l2",
        interface="net1",
        queues=(NetkitQueue(id=1, master_queue=8),),
    ),
)
ERROR_KEYS = {"cniVersion", "code", "msg", "details"}


class FakeCommands:
    """Stands in for ``cni_netkit.plugin.commands``: records calls, returns or raises as told."""

    def __init__(self) -> None:
        self.calls: list[Invocation] = []
        self.result: Result | None = RESULT
        self.raises: BaseException | None = None
        self.side_effect: Callable[[Invocation], None] = lambda inv: None

    def run(self, inv: Invocation) -> Result | None:
        self.calls.append(inv)
        self.side_effect(inv)
        if self.raises is not None:
            raise self.raises
        return self.result if inv.command == "ADD" else None


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCommands]:
    fake = FakeCommands()
    module = types.ModuleType("cni_netkit.plugin.commands")
    module.run = fake.run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cni_netkit.plugin.commands", module)
    monkeypatch.setattr(cni_netkit.plugin, "commands", module, raising=False)
    yield fake


def invoke(env: dict[str, str], stdin: bytes | None) -> tuple[int, str]:
    out = io.StringIO()
    status = entry.run(env, None if stdin is None else io.BytesIO(stdin), out)
    return status, out.getvalue()


def conf_bytes(**overrides: Any) -> bytes:
    return json.dumps({**CONF, **overrides}).encode()


def reply(out: str) -> dict[str, Any]:
    """The one JSON line on stdout."""
    assert out.endswith("\n")
    assert out.count("\n") == 1, out
    obj = json.loads(out)
    assert isinstance(obj, dict)
    return obj


# --- VERSION -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stdin", "version"),
    [(b'{"cniVersion": "0.4.0"}', "0.4.0"), (None, "1.1.0"), (b"junk", "1.1.0"), (b"[]", "1.1.0")],
)
def test_version_answers_without_a_config(
    plugin: FakeCommands, stdin: bytes | None, version: str
) -> None:
    status, out = invoke({"CNI_COMMAND": "VERSION"}, stdin)
    assert status == 0
    assert reply(out) == {
        "cniVersion": version,
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"],
    }
    assert plugin.calls == []


def test_version_imports_neither_pydantic_nor_structlog_nor_the_plugin() -> None:
    script = """
        import io, sys
        from cni_netkit.cni import entry
        entry.run({"CNI_COMMAND": "VERSION"}, io.BytesIO(b'{"cniVersion":"1.0.0"}'), sys.stderr)
        heavy = [m for m in ("pydantic", "structlog", "cni_netkit.plugin", "pyroute2")
                 if m in sys.modules]
        print(heavy)
    """
    got = _script(script, {})
    assert got.stdout.strip() == "[]"


# --- success ---------------------------------------------------------------------------------


def test_add_prints_the_result_in_the_requested_version(plugin: FakeCommands) -> None:
    status, out = invoke(ENV, conf_bytes(cniVersion="0.4.0"))
    assert status == 0
    assert reply(out) == RESULT.encode("0.4.0")


def test_add_hands_the_plugin_the_parsed_invocation(plugin: FakeCommands) -> None:
    invoke(ENV, conf_bytes())
    (inv,) = plugin.calls
    assert (inv.command, inv.container_id, inv.netns, inv.ifname) == (
        "ADD",
        "0123abcd",
        "/var/run/netns/pod1",
        "net1",
    )
    assert (inv.pod_namespace, inv.pod_name) == ("ns", "pod")
    assert inv.config.queues == tuple(range(8, 16))
    assert inv.raw == CONF


@pytest.mark.parametrize("command", ["DEL", "CHECK", "STATUS", "GC"])
def test_other_commands_print_nothing_on_success(plugin: FakeCommands, command: str) -> None:
    status, out = invoke({**ENV, "CNI_COMMAND": command}, conf_bytes(cniVersion="1.1.0"))
    assert (status, out) == (0, "")
    assert [inv.command for inv in plugin.calls] == [command]


# --- errors ------------------------------------------------------------------------------------


def test_plugin_error_becomes_the_cni_error_object(plugin: FakeCommands) -> None:
    plugin.raises = errors.PoolExhausted("no free queue on eth0", "pool 8-15: all leased")
    status, out = invoke(ENV, conf_bytes(cniVersion="0.4.0"))
    assert status == 1
    assert reply(out) == {
        "cniVersion": "0.4.0",
        "code": 100,
        "msg": "no free queue on eth0",
        "details": "pool 8-15: all leased",
    }


def test_status_not_available_is_code_50(plugin: FakeCommands) -> None:
    plugin.raises = errors.NotAvailable("no free queue in the pool of eth0")
    status, out = invoke({"CNI_COMMAND": "STATUS"}, conf_bytes(cniVersion="1.1.0"))
    assert status == 1
    assert reply(out)["code"] == 50


def test_unexpected_exception_is_code_999_and_its_traceback_goes_to_the_log(
    plugin: FakeCommands, capsys: pytest.CaptureFixture[str]
) -> None:
    plugin.raises = RuntimeError("boom")
    status, out = invoke(ENV, conf_bytes())
    assert status == 1
    assert reply(out) == {
        "cniVersion": "1.0.0",
        "code": 999,
        "msg": "internal error",
        "details": "RuntimeError: boom",
    }
    assert "Traceback" not in out
    log = capsys.readouterr().err
    assert "Traceback" in log
    assert "RuntimeError: boom" in log


def test_add_without_a_result_is_an_internal_error(plugin: FakeCommands) -> None:
    plugin.result = None
    status, out = invoke(ENV, conf_bytes())
    assert status == 1
    assert reply(out)["details"] == "RuntimeError: ADD returned no result"


def test_interrupt_is_reported_and_exits_130(plugin: FakeCommands) -> None:
    plugin.raises = KeyboardInterrupt()
    status, out = invoke(ENV, conf_bytes())
    assert status == 130
    assert reply(out)["msg"] == "interrupted"


def test_unreadable_stdin_is_code_5(plugin: FakeCommands) -> None:
    class Broken(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            raise OSError(5, "Input/output error")

    out = io.StringIO()
    assert entry.run(ENV, Broken(), out) == 1
    assert reply(out.getvalue())["code"] == 5


@pytest.mark.parametrize(
    ("env", "stdin", "code", "version"),
    [
        (ENV, b"{not json", 6, "1.1.0"),
        (ENV, conf_bytes(cniVersion="0.2.0"), 1, "1.1.0"),
        ({**ENV, "CNI_IFNAME": "a/b"}, conf_bytes(cniVersion="0.4.0"), 4, "0.4.0"),
        ({**ENV, "CNI_COMMAND": "NOPE"}, conf_bytes(cniVersion="0.3.1"), 4, "0.3.1"),
        ({}, conf_bytes(), 4, "1.0.0"),
        (ENV, conf_bytes(queues="15-8"), 7, "1.0.0"),
        ({**ENV, "CNI_ARGS": "FOO=1"}, conf_bytes(), 2, "1.0.0"),
    ],
)
def test_request_errors_reply_in_the_request_version_when_known(
    plugin: FakeCommands, env: dict[str, str], stdin: bytes, code: int, version: str
) -> None:
    status, out = invoke(env, stdin)
    assert status == 1
    got = reply(out)
    assert set(got) == ERROR_KEYS
    assert (got["code"], got["cniVersion"]) == (code, version)
    assert plugin.calls == []


def test_stdin_limit_is_the_configs_plus_one() -> None:
    assert entry._STDIN_LIMIT == config.MAX_STDIN + 1


# --- logging -------------------------------------------------------------------------------------


def test_logs_go_to_the_log_file_with_the_invocation_context(
    plugin: FakeCommands, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plugin.side_effect = lambda inv: structlog.get_logger("plugin").info("leased", queues=[8])
    log_file = tmp_path / "netkit.log"
    status, out = invoke({**ENV, "CNI_NETKIT_LOG_DIRS": str(tmp_path)},
                         conf_bytes(logFile=str(log_file), logLevel="debug"))
    assert status == 0
    assert "leased" not in out
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    leased = next(line for line in lines if line["event"] == "leased")
    assert leased["queues"] == [8]
    assert leased["level"] == "info"
    assert {k: leased[k] for k in ("command", "container_id", "ifname", "netns", "network")} == {
        "command": "ADD",
        "container_id": "0123abcd",
        "ifname": "net1",
        "netns": "/var/run/netns/pod1",
        "network": "netkit-net",
    }
    assert any(line["event"] == "done" for line in lines)  # debug level was honoured
    assert capsys.readouterr().out == ""


def test_unknown_config_keys_are_logged_as_a_warning(
    plugin: FakeCommands, capsys: pytest.CaptureFixture[str]
) -> None:
    invoke(ENV, conf_bytes(queuesPerAtachment=2))
    warnings = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert {"event": "unknown config keys ignored", "keys": ["queuesPerAtachment"]}.items() <= (
        warnings[0].items()
    )


# --- the real process: file descriptors, exit status, broken pipes ------------------------------

FAKE_MAIN = """
    import os, sys, types
    from cni_netkit.result import Interface, Result
    def run(inv):
        print("stray print")
        sys.stdout.write("stray write\\n")
        sys.stdout.flush()
        os.write(1, b"stray fd write\\n")
        if inv.command == "ADD" and os.environ.get("FAKE_FAIL"):
            raise ValueError("bad " + os.environ["FAKE_FAIL"])
        return Result(interfaces=(Interface(name=inv.ifname),)) if inv.command == "ADD" else None
    module = types.ModuleType("cni_netkit.plugin.commands")
    module.run = run
    sys.modules["cni_netkit.plugin.commands"] = module
    from cni_netkit.cni.entry import main
    main()
"""


class Ran:
    """A finished child process, its output decoded."""

    def __init__(self, proc: subprocess.CompletedProcess[bytes]) -> None:
        self.returncode = proc.returncode
        self.stdout = proc.stdout.decode("utf-8", "replace")
        self.stderr = proc.stderr.decode("utf-8", "replace")


def _python(argv: list[str], env: dict[str, str], stdin: bytes = b"") -> Ran:
    return Ran(
        subprocess.run(
            [sys.executable, *argv],
            input=stdin,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
            cwd=REPO,
            capture_output=True,
            timeout=60,
            check=False,
        )
    )


def _script(script: str, env: dict[str, str], stdin: bytes = b"") -> Ran:
    return _python(["-c", textwrap.dedent(script)], env, stdin)


def test_main_keeps_everything_but_the_reply_off_stdout() -> None:
    got = _script(FAKE_MAIN, ENV, conf_bytes())
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "net1"}],
        "dns": {},
    }
    assert got.stdout.count("\n") == 1
    for stray in ("stray print", "stray write", "stray fd write"):
        assert stray in got.stderr


def test_main_internal_error_exits_1_with_error_json_and_no_traceback_on_stdout() -> None:
    got = _script(FAKE_MAIN, {**ENV, "FAKE_FAIL": "thing"}, conf_bytes())
    assert got.returncode == 1
    assert json.loads(got.stdout) == {
        "cniVersion": "1.0.0",
        "code": 999,
        "msg": "internal error",
        "details": "ValueError: bad thing",
    }
    assert "Traceback" not in got.stdout
    assert "Traceback" in got.stderr  # in the log, as a JSON field


def test_main_del_prints_nothing() -> None:
    got = _script(FAKE_MAIN, {**ENV, "CNI_COMMAND": "DEL"}, conf_bytes())
    assert (got.returncode, got.stdout) == (0, "")


def test_python_dash_m_answers_version_and_errors() -> None:
    got = _python(["-m", "cni_netkit.cni"], {"CNI_COMMAND": "VERSION"}, b'{"cniVersion":"1.0.0"}')
    assert got.returncode == 0
    assert json.loads(got.stdout)["cniVersion"] == "1.0.0"
    got = _python(["-m", "cni_netkit.cni"], {"CNI_COMMAND": "ADD"}, b"\xff")
    assert got.returncode == 1
    assert json.loads(got.stdout)["code"] == 6


def test_main_survives_a_runtime_that_stopped_reading() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read the reply: writing it raises EPIPE
    try:
        got = subprocess.run(
            [sys.executable, "-m", "cni_netkit.cni"],
            input=b'{"cniVersion":"1.0.0"}',
            stdout=write_end,
            stderr=subprocess.PIPE,
            env={"PATH": os.environ.get("PATH", ""), "CNI_COMMAND": "VERSION"},
            cwd=REPO,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert got.returncode == 1
    assert b"Traceback" not in got.stderr
    assert b"Exception ignored" not in got.stderr


# --- property: whatever comes in, stdout holds a valid reply or nothing --------------------------

COMMANDS = ["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION"]
CONFIG_KEYS = [
    "cniVersion",
    "name",
    "type",
    "master",
    "queues",
    "queuesPerAttachment",
    "pairing",
    "mode",
    "mtu",
    "ipam",
    "runtimeConfig",
    "prevResult",
    "args",
    "capabilities",
    "lockTimeout",
    "logLevel",
    "cni.dev/valid-attachments",
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
# Junk around a valid config reaches deep into validation; logFile stays out so nothing is written.
configs = st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values, max_size=6).map(
    lambda over: {**CONF, "cniVersion": "1.1.0", **over}
)
stdins = st.one_of(
    st.sampled_from(errors.SUPPORTED_VERSIONS).map(lambda v: conf_bytes(cniVersion=v)),
    configs.map(lambda c: json.dumps(c).encode()),
    st.binary(max_size=300),
    st.text(max_size=100).map(str.encode),
    json_values.map(lambda v: json.dumps(v).encode()),
)
env_values = {
    "CNI_COMMAND": st.sampled_from([*COMMANDS, "", "add", "NOPE"]),
    "CNI_CONTAINERID": st.sampled_from(["0123abcd", "", "../x"]) | st.text(max_size=12),
    "CNI_NETNS": st.sampled_from(["/var/run/netns/p", ""]) | st.text(max_size=12),
    "CNI_IFNAME": st.sampled_from(["net1", "", "a" * 16]) | st.text(max_size=18),
    "CNI_ARGS": st.sampled_from(["", "K8S_POD_NAME=p", "IgnoreUnknown=1;X=1"])
    | st.text(max_size=24),
    "CNI_PATH": st.text(max_size=24),
}
# Half the time a valid environment for some command, so configs get past the env checks.
envs = st.one_of(
    st.builds(
        lambda command, junk: {**ENV, "CNI_COMMAND": command, **junk},
        st.sampled_from(COMMANDS),
        st.fixed_dictionaries({}, optional={"CNI_ARGS": env_values["CNI_ARGS"]}),
    ),
    st.fixed_dictionaries({}, optional=env_values),
)
outcomes = st.sampled_from(["ok", "netkit-error", "crash"])


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(env=envs, stdin=stdins, outcome=outcomes)
def test_any_input_yields_one_valid_reply_or_nothing(
    plugin: FakeCommands, env: dict[str, str], stdin: bytes, outcome: str
) -> None:
    plugin.raises = {
        "ok": None,
        "netkit-error": errors.CheckFailed("differs"),
        "crash": ZeroDivisionError("x"),
    }[outcome]
    status, out = invoke(env, stdin)
    assert "Traceback" not in out
    if out == "":
        # Only a successful DEL/CHECK/STATUS/GC may stay silent.
        assert status == 0
        assert env.get("CNI_COMMAND") in ("DEL", "CHECK", "STATUS", "GC")
        return
    got = reply(out)
    assert got["cniVersion"] in errors.SUPPORTED_VERSIONS
    if status == 0:
        assert env.get("CNI_COMMAND") in ("ADD", "VERSION")
        assert "supportedVersions" in got or got == RESULT.encode(got["cniVersion"])
    else:
        assert status == 1
        assert set(got) == ERROR_KEYS
        assert isinstance(got["code"], int)
        assert isinstance(got["msg"], str)
        assert got["msg"]
        assert isinstance(got["details"], str)


# --- what a cold invocation leaves unimported ---------------------------------------------------

COLD_IMPORTS = """
    import io, json, os, sys
    from cni_netkit.cni import entry
    from cni_netkit import logs
    logs.skip_optional_extras()
    os.environ.setdefault(*entry._PYDANTIC_NO_PLUGINS)
    if os.environ.get("SKIP") == "1":
        entry.skip_unused_imports()
    # Everything a cold ADD loads: the config models, structlog, the plugin and
    # kernel layers with pyroute2 (whose netlink core imports asyncio), the way
    # the kernel layer loads it (without pyroute2's package __init__).
    from cni_netkit.config import parse_invocation
    from cni_netkit.plugin import commands, afxdp, deviceinfo, leasefile
    from cni_netkit.kernel import Kernel
    import cni_netkit.kernel.api, cni_netkit.kernel.netdev, cni_netkit.kernel.netkit
    import pyroute2.netlink.nlsocket, asyncio
    with Kernel() as k:  # the sockets a command opens
        pass
    inv = parse_invocation(json.loads(os.environ["ENVIRON"]), os.environ["CONF"].encode())
    logs.configure(); logs.get_logger().info("hello")
    print(json.dumps({
        "loaded": [m for m in ("ssl", "importlib.metadata", "zipfile", "email")
                   if sys.modules.get(m)],
        "config": inv.config.model_dump(mode="json"),
        "tls": asyncio.base_events.ssl is not None,
    }))
"""


@pytest.mark.parametrize("skip", ["0", "1"])
def test_cold_path_never_imports_tls_or_package_metadata_and_parses_the_same(skip: str) -> None:
    conf = conf_bytes().decode()
    got = _script(COLD_IMPORTS, {"SKIP": skip, "ENVIRON": json.dumps(ENV), "CONF": conf})
    assert got.returncode == 0, got.stderr
    report = json.loads(got.stdout)
    if skip == "1":
        assert report["loaded"] == []
        assert report["tls"] is False  # asyncio without TLS, by its own ImportError branch
    else:  # the control: without the cut, these are what the libraries pull in
        assert set(report["loaded"]) >= {"ssl", "importlib.metadata"}
    baseline = _script(COLD_IMPORTS, {"SKIP": "0", "ENVIRON": json.dumps(ENV), "CONF": conf})
    assert json.loads(baseline.stdout)["config"] == report["config"]


def test_pydantics_loader_answers_what_the_stand_in_answers_when_plugins_are_disabled() -> None:
    script = """
        import os, sys, json
        os.environ["PYDANTIC_DISABLE_PLUGINS"] = os.environ["VALUE"]
        from pydantic.plugin import _loader
        from pydantic.plugin import _schema_validator
        import inspect
        print(json.dumps({
            "plugins": list(_loader.get_plugins()),
            # the seam the stand-in replaces: the one name pydantic takes from it
            "seam": "from ._loader import get_plugins" in inspect.getsource(_schema_validator),
        }))
    """
    for value in entry._PLUGINS_DISABLED:
        got = _script(script, {"VALUE": value})
        assert got.returncode == 0, got.stderr
        assert json.loads(got.stdout) == {"plugins": [], "seam": True}
        assert entry._no_plugins() == ()


def test_skip_unused_imports_leaves_loaded_modules_and_enabled_plugins_alone() -> None:
    script = """
        import os, sys, json
        import ssl
        from cni_netkit.cni import entry
        os.environ["PYDANTIC_DISABLE_PLUGINS"] = "some_plugin"  # a list: the real loader decides
        entry.skip_unused_imports()
        print(json.dumps([sys.modules["ssl"] is ssl, "pydantic.plugin._loader" in sys.modules]))
    """
    got = _script(script, {})
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == [True, False]
