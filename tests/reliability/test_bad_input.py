"""Bad input: whatever the runtime hands over, a documented CNI error and not one change.

A hypothesis fuzzer builds requests from a valid one by breaking one to
three of the things the plugin checks, each in the order it checks them
(config.py): the command (4), the stdin JSON (6), ``cniVersion`` (1), the
environment (4: missing, path-like, oversized or unicode ``CNI_CONTAINERID``
and ``CNI_IFNAME``, relative or huge ``CNI_NETNS``), ``CNI_ARGS`` (4 or 2),
the network config (7: wrong types, huge, negative, reversed and
overlapping queue ranges, unknown enum values, relative paths, ...), and in
the VM the netns itself (8: missing, a plain file, a symlink to
/etc/passwd, a directory, a FIFO, a device, another namespace type, and the
host's own netns). The expected code is that of the earliest broken check.

Every case must give: exit status 1, exactly one JSON error object on
stdout with that code, no traceback anywhere, and no change on the node:
the state dir (holding a live attachment), its device-info file, the
working directory, host links, the named netns, the live attachment's
netkit and its lease on the master.

On the host the fuzzer runs everything but the netns checks (no 7.x
kernel there); in the VM it runs everything against a real attachment, so
a broken request that slipped through would visibly touch it (a DEL would
remove it, an ADD would collide with it). A sample also goes through the
real executable.

Refusing the host netns, a decision: a netns path that resolves to the
plugin's own network namespace (``/proc/self/ns/net``, ``/proc/1/ns/net``
or a symlink to either) is a real netns, but no pod lives there. Accepting
it would put the "pod" netkit, its IPAM addresses and routes (a default
route included) into the host's own routing table, and let a confused or
malicious caller name host interfaces; the reference plugins' skel refuses
it with code 8 too. So ADD and CHECK answer 8.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cni_netkit.errors import SUPPORTED_VERSIONS
from tests.reliability.figures import Figures
from tests.reliability.harness import NETNS_DIR, Net, Reply, call, cni_env, differences, spawn

EXAMPLES = int(os.environ.get("CNI_NETKIT_FUZZ_EXAMPLES", "1000"))
EXE_SAMPLE_HOST = 10
EXE_SAMPLE_VM = 5
DEEP_EVERY = 20
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same cases every run: a failure replays
    database=None,  # the VM's root is read-only
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
CONTAINER_ID = "live-0"
IFNAME = "net1"
COMMANDS = ["ADD", "DEL", "CHECK", "STATUS", "GC"]
HUGE = "@1e400@"  # stands for the JSON number 1e400 (a float overflow) in a config

# Stages in the order the plugin checks them; a case's code is its earliest stage's.
COMMAND, DECODE, VERSION, ENV, CNI_ARGS, CONFIG, ARGS_MAC, NETNS = range(8)


@dataclass
class Request:
    env: dict[str, str]
    conf: dict[str, Any]
    stdin: bytes | None = None  # replaces the encoded conf

    def encoded(self) -> bytes:
        if self.stdin is not None:
            return self.stdin
        # json.dumps would write a float overflow as Infinity (not JSON): write the number.
        return json.dumps(self.conf).replace(f'"{HUGE}"', "1e400").encode()


@dataclass(frozen=True)
class Break:
    stage: int
    code: int
    what: str
    apply: Callable[[Request], None] = field(compare=False)


@dataclass
class Case:
    command: str
    request: Request
    breaks: list[Break]

    @property
    def expected(self) -> int:
        return min(self.breaks, key=lambda b: b.stage).code

    def __str__(self) -> str:
        return f"{self.command}: " + "; ".join(b.what for b in self.breaks)


# --- the ways to break a request ---------------------------------------------------------

# Any text an environment variable can hold: no surrogates, no NUL.
_ENV_CHARS = st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00")
_ENV_TEXT = st.text(_ENV_CHARS, max_size=40)
# libcni's ValidateContainerID (and ours): restated here, not imported from the plugin.
_VALID_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


def _set_env(name: str, value: str | None) -> Callable[[Request], None]:
    def apply(r: Request) -> None:
        if value is None:
            r.env.pop(name, None)
        else:
            r.env[name] = value
    return apply


def _set_conf(key: str, value: Any, *, delete: bool = False) -> Callable[[Request], None]:
    def apply(r: Request) -> None:
        if delete:
            r.conf.pop(key, None)
        else:
            r.conf[key] = value
    return apply


def _stdin(data: bytes) -> Callable[[Request], None]:
    def apply(r: Request) -> None:
        r.stdin = data
    return apply


def _not_a_json_object(data: bytes) -> bool:
    try:
        return not isinstance(json.loads(data.decode("utf-8")), dict)
    except (ValueError, RecursionError):
        return True


def command_breaks() -> st.SearchStrategy[Break]:
    bad = st.one_of(
        st.sampled_from(["", "add", "ADD ", " DEL", "DELETE", "Version", "STATUS\n", "INIT",
                         "\uff21\uff24\uff24", "ADD;DEL", "../../bin/sh"]),
        _ENV_TEXT.filter(lambda s: s not in (*COMMANDS, "VERSION")),
    )
    return st.one_of(
        st.just(Break(COMMAND, 4, "no CNI_COMMAND", _set_env("CNI_COMMAND", None))),
        bad.map(lambda v: Break(COMMAND, 4, f"CNI_COMMAND={v!r}", _set_env("CNI_COMMAND", v))),
    )


def decode_breaks(valid: bytes) -> st.SearchStrategy[Break]:
    deep = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    fixed = {
        "empty stdin": b"",
        "blank stdin": b" \n\t ",
        "a JSON array": b"[]",
        "JSON null": b"null",
        "a JSON number": b"1e400",
        "a JSON string": b'"{}"',
        "truncated JSON": valid[:-1],
        "NaN": valid[:-1] + b', "x": NaN}',
        "Infinity": valid[:-1] + b', "x": -Infinity}',
        "a BOM first": b"\xef\xbb\xbf" + valid,
        "UTF-16": valid.decode().encode("utf-16"),
        "Latin-1 bytes": valid[:-1] + b', "x": "\xe9"}',
        "100000-deep nesting": deep,
        "over 1 MiB": valid[:-1] + b" " * (1 << 20) + b"}",
        "a NUL byte": b"\x00" + valid,
    }
    return st.one_of(
        st.sampled_from(sorted(fixed)).map(lambda k: Break(DECODE, 6, k, _stdin(fixed[k]))),
        st.binary(max_size=64).filter(_not_a_json_object).map(
            lambda b: Break(DECODE, 6, f"stdin {b[:20]!r}", _stdin(b))),
    )


def version_breaks(command: str) -> st.SearchStrategy[Break]:
    too_old = {"CHECK": ["0.3.0", "0.3.1"],
               "STATUS": ["0.3.1", "0.4.0", "1.0.0"], "GC": ["0.4.0", "1.0.0"]}.get(command, [])
    values: st.SearchStrategy[Any] = st.one_of(
        st.sampled_from([None, 1, 1.1, "", "1.1", "2.0.0", "0.2.0", " 1.1.0", "1.1.0\n",
                         "\uff11.\uff11.\uff10", [], {}, True, *too_old]),
        _ENV_TEXT.filter(lambda s: s not in SUPPORTED_VERSIONS),
    )
    return st.one_of(
        st.just(Break(VERSION, 1, "no cniVersion", _set_conf("cniVersion", None, delete=True))),
        values.map(lambda v: Break(VERSION, 1, f"cniVersion {v!r}", _set_conf("cniVersion", v))),
    )


def env_breaks(command: str) -> st.SearchStrategy[Break]:
    bad_ids = st.one_of(
        st.sampled_from(["", ".", "..", "/", "a/b", "../../etc/passwd", "/etc/passwd", "-x",
                         "_x", ".hidden", " x", "x y", "é", "x:y", "x\ty", "a" * 256,
                         "c\u200b1", "\uff431"]),
        _ENV_TEXT.filter(lambda s: not _VALID_ID.fullmatch(s)),
    )
    bad_ifnames = st.one_of(
        st.sampled_from(["", ".", "..", "/", "a/b", "../x", "a b", "a:b", "eth0\n", "x" * 16,
                         "é" * 8, "nét-interface-0", "a\u200bb", "\u3000"]),
        st.tuples(_ENV_TEXT, st.sampled_from("/: \t\n\r\x0b\x85\u2028\u3000"), _ENV_TEXT).map(
            "".join),
        st.text(_ENV_CHARS, min_size=16, max_size=64),
    )
    netns = ["var/run/netns/x", "./x", "x", "netns", "~/ns", "/" + "a" * 5000]
    breaks = [
        st.just(Break(ENV, 4, "no CNI_CONTAINERID", _set_env("CNI_CONTAINERID", None))),
        bad_ids.map(lambda v: Break(ENV, 4, f"CNI_CONTAINERID={v[:40]!r}",
                                    _set_env("CNI_CONTAINERID", v))),
        st.just(Break(ENV, 4, "no CNI_IFNAME", _set_env("CNI_IFNAME", None))),
        bad_ifnames.map(lambda v: Break(ENV, 4, f"CNI_IFNAME={v!r}", _set_env("CNI_IFNAME", v))),
        st.sampled_from(netns).map(lambda v: Break(ENV, 4, f"CNI_NETNS={v[:40]!r}",
                                                   _set_env("CNI_NETNS", v))),
    ]
    if command != "DEL":  # DEL's netns may be gone or empty
        breaks.append(st.just(Break(ENV, 4, "no CNI_NETNS", _set_env("CNI_NETNS", None))))
    return st.one_of(*breaks)


def cni_args_breaks() -> st.SearchStrategy[Break]:
    cases = {
        "K8S_POD_NAME": 4, "=x": 4, "a=b=c": 4, "K8S_POD_NAME=a=b": 4, "IgnoreUnknown=yes": 4,
        "FOO=bar": 2, "FOO=bar;IgnoreUnknown=0": 2, "K8S_POD_NAME=p;x=1": 2, "é=1": 2,
    }
    return st.sampled_from(sorted(cases)).map(
        lambda v: Break(CNI_ARGS, cases[v], f"CNI_ARGS={v!r}", _set_env("CNI_ARGS", v)))


_CONFIG_BREAKS: dict[str, list[Any]] = {
    "name": ["", "a b", "../x", "x/y", "ñet", "-x", 5, None, [], {}],
    "type": [5, None, [], {}],
    "master": ["", "x" * 16, "a/b", "a b", "..", ".", "eth0\n", "é" * 8, 5, None, [],
               "lo", "eth9"],  # not a master the node's admin set aside

    "queues": [-1, [-1], [65536], 10**30, [10**30], "7-3", ["0-3", "2-5"], [1, 1], "1,1",
               [], "", "x", 1.5, True, [True], {"a": 1}, "0-5000", [[1]], "-1", "1--2",
               "1-", None, [1.0], "0x10", "1e3",
               "0-8", "1-9", [0], "9-12"],  # outside the admin's pool 1-8
    "queuesPerAttachment": [0, -1, 10**20, "1", 1.0, True, None, 9],
    "pairing": ["both", "", "SINGLE", 1, None],
    "mode": ["l4", "L2", "", 0, None],
    "mtu": [0, 67, 65536, "1500", 1500.5, -1, 10**30, True],
    # Outside the admin's directories (a NetworkAttachmentDefinition is a user's to write),
    # or spelled to climb out of them.
    "logFile": ["relative/log", "", 5, "/tmp/x\x00y", "/etc/cron.d/x", "/root/.bashrc",
                "/var/log/cni-netkit/../../../etc/passwd", "/var/log/cni-netkit",
                "/var/log/cni-netkit/", "//var/log/cni-netkit/x"],
    "logLevel": ["trace", 1, "", None],
    "stateDir": ["relative", "", 5, "/x\x00y", None, "/etc", "/", "/var/lib/cni/netkit/../x",
                 "/var/lib/cni/netkit/", "/var/lib/cni/netkit/sub", "/var/lib/cni"],
    "lockTimeout": [0, -1, 301, "10", 10**30, HUGE, None],
    "ipam": [{"type": "host-local"}, "host-local", 5, []],  # single pairing has no IP
    "runtimeConfig": [{"mac": "zz"}, {"mac": "01:00:5e:00:00:01"}, {"mac": "00:00:00:00:00:00"},
                      {"mac": 5}, {"CNIDeviceInfoFile": "relative.json"},
                      {"CNIDeviceInfoFile": 5}, {"CNIDeviceInfoFile": "/etc/x.json"},
                      {"CNIDeviceInfoFile": "/run/k8s.cni.cncf.io/devinfo/../../x.json"},
                      {"CNIDeviceInfoFile": "/run/k8s.cni.cncf.io/devinfo"}, "x", 5, []],
    "args": [{"cni": "x"}, {"cni": {"mac": 5}}, {"cni": {"mac": "bad"}}, 5, "x", []],
    "capabilities": [{"mac": "yes"}, [], "x"],
    "prevResult": ["x", 5, []],
    "cni.dev/valid-attachments": ["x", 5, [{"containerID": 5, "ifname": "a"}],
                                  [{"ifname": "a"}], [5]],
}
_REQUIRED = ["name", "type", "master", "queues"]


def config_breaks() -> st.SearchStrategy[Break]:
    replaced = st.sampled_from([(k, v) for k, vs in _CONFIG_BREAKS.items() for v in vs]).map(
        lambda kv: Break(CONFIG, 7, f"{kv[0]}={kv[1]!r:.60}", _set_conf(*kv)))
    removed = st.sampled_from(_REQUIRED).map(
        lambda k: Break(CONFIG, 7, f"no {k}", _set_conf(k, None, delete=True)))
    big_int = st.integers(min_value=65536, max_value=10**40).map(
        lambda n: Break(CONFIG, 7, f"queues=[{n}]", _set_conf("queues", [n])))
    negative = st.integers(max_value=-1, min_value=-(10**40)).map(
        lambda n: Break(CONFIG, 7, f"mtu={n}", _set_conf("mtu", n)))
    reversed_range = st.tuples(st.integers(1, 60000), st.integers(1, 5000)).map(
        lambda t: Break(CONFIG, 7, f"queues {t[0] + t[1]}-{t[0]}",
                        _set_conf("queues", f"{t[0] + t[1]}-{t[0]}")))
    overlapping = st.tuples(st.integers(0, 1000), st.integers(0, 100), st.integers(0, 100)).map(
        lambda t: Break(CONFIG, 7, f"queues overlap at {t[0] + t[1]}", _set_conf(
            "queues", [f"{t[0]}-{t[0] + t[1]}", f"{t[0] + t[1]}-{t[0] + t[1] + t[2]}"])))
    return st.one_of(replaced, removed, big_int, negative, reversed_range, overlapping)


def args_mac_breaks() -> st.SearchStrategy[Break]:
    return st.sampled_from(["zz", "01:00:00:00:00:01", "00:00:00:00:00:00", "02:00:00:00:00",
                            "02-00-00:00:00:01"]).map(
        lambda v: Break(ARGS_MAC, 4, f"CNI_ARGS MAC={v}", _set_env("CNI_ARGS", f"MAC={v}")))


def netns_breaks(bad_netns: dict[str, str]) -> st.SearchStrategy[Break]:
    return st.sampled_from(sorted(bad_netns)).map(
        lambda k: Break(NETNS, 8, f"CNI_NETNS {k}", _set_env("CNI_NETNS", bad_netns[k])))


def bad_requests(net: Net, netns: str, prev: dict[str, Any],
                 bad_netns: dict[str, str]) -> st.SearchStrategy[Case]:
    """Cases: a valid request of a random command, then one to three checks broken."""
    bases: dict[str, tuple[dict[str, str], bytes]] = {}
    stages: dict[str, dict[int, st.SearchStrategy[Break]]] = {}
    for command in COMMANDS:
        env, stdin = net.request(command, CONTAINER_ID, netns, IFNAME,
                                 prev=prev if command == "CHECK" else None)
        if command in ("ADD", "CHECK", "DEL"):
            env["CNI_ARGS"] = "K8S_POD_NAMESPACE=fuzz;K8S_POD_NAME=pod"
        bases[command] = env, stdin
        stages[command] = {
            COMMAND: command_breaks(),
            DECODE: decode_breaks(stdin),
            VERSION: version_breaks(command),
            CNI_ARGS: cni_args_breaks(),
            CONFIG: config_breaks(),
            ARGS_MAC: args_mac_breaks(),
        }
        if command in ("ADD", "CHECK", "DEL"):
            stages[command][ENV] = env_breaks(command)
        if command in ("ADD", "CHECK") and bad_netns:
            stages[command][NETNS] = netns_breaks(bad_netns)

    @st.composite
    def draw_case(draw: st.DrawFn) -> Case:
        command = draw(st.sampled_from(COMMANDS))
        env, stdin = bases[command]
        request = Request(dict(env), json.loads(stdin))
        chosen = draw(st.lists(st.sampled_from(sorted(stages[command])), min_size=1,
                               max_size=3, unique=True))
        breaks = [draw(stages[command][s]) for s in sorted(chosen)]
        # Latest stage first: where two set the same thing (CNI_NETNS, CNI_ARGS), the
        # earlier stage's value is the one left, and its code the one expected.
        for b in reversed(breaks):
            b.apply(request)
        return Case(command, request, breaks)

    return draw_case()


# --- what must not change -------------------------------------------------------------------


@dataclass
class World:
    """The node as a bad request must leave it: exactly as it was when the fuzzing began."""

    net: Net
    netns: str  # the live attachment's
    prev: dict[str, Any]
    sandbox: Path
    bad_netns: dict[str, str]
    kernel: Any = None  # a Kernel kept open for cheap reads (VM only)
    master_ifindex: int | None = None
    baseline: dict[str, Any] = field(default_factory=dict)
    checked: int = 0

    def begin(self) -> None:
        self.baseline = self.snapshot(deep=True)

    def changes(self, deep: bool) -> list[str]:
        """How the node differs from the baseline (netlink reads only when ``deep``)."""
        now = self.snapshot(deep)
        return [f"{key} changed: {_diff(self.baseline[key], got)}" for key, got in now.items()
                if got != self.baseline[key]]

    def snapshot(self, deep: bool) -> dict[str, Any]:
        snap: dict[str, Any] = {"files": _tree(self.sandbox)}
        if self.kernel is None:
            return snap
        # In the VM, where nothing else changes the node meanwhile.
        snap["host links"] = sorted(p.name for p in Path("/sys/class/net").iterdir())
        snap["named netns"] = sorted(p.name for p in NETNS_DIR.iterdir())
        if deep:  # ~0.15 s of netlink in the VM
            snap["pod links"] = sorted((lk.index, lk.name, lk.alias, lk.up)
                                       for lk in self.kernel.links(netns=self.netns))
            snap["host netkits"] = sorted((lk.index, lk.name, lk.alias)
                                          for lk in self.kernel.links(kind="netkit"))
            snap["leases"] = sorted(
                (q.id, q.lease.ifindex, q.lease.queue_id, q.lease.netns_id)
                for q in self.kernel.queues(self.master_ifindex)
                if q.type == "rx" and q.lease is not None)
        return snap

    def after(self, case: Case) -> list[str]:
        """The node's changes after ``case``; netlink for cases that reach the kernel layer,
        and every ``DEEP_EVERY``-th case (kernel changes persist, so none slips by)."""
        self.checked += 1
        return self.changes(deep=case.expected == 8 or self.checked % DEEP_EVERY == 0)


def _tree(root: Path) -> list[tuple[str, str]]:
    """Every path under ``root`` with a fingerprint of its content (or its link target)."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out.append((rel, f"-> {p.readlink()}"))
        elif p.is_file():
            out.append((rel, hashlib.sha256(p.read_bytes()).hexdigest()[:16]))
        else:
            out.append((rel, "dir" if p.is_dir() else "other"))
    return out


def judge(case: Case, reply: Reply, changes: list[str]) -> list[str]:
    """What is wrong with ``reply`` for ``case`` (and the node's ``changes``); [] if nothing."""
    problems = [] if reply.status == 1 else [f"exit status {reply.status}, expected 1"]
    lines = reply.stdout.splitlines()
    if len(lines) != 1:
        problems.append(f"{len(lines)} stdout lines, expected one JSON error")
    else:
        problems += _error_object_problems(lines[0], case.expected)
    problems += [f"traceback on {stream}" for stream, text in
                 (("stdout", reply.stdout), ("stderr", reply.stderr)) if "Traceback" in text]
    return problems + changes


def _error_object_problems(line: str, expected: int) -> list[str]:
    try:
        body = json.loads(line)
    except ValueError:
        return [f"stdout is not JSON: {line[:200]!r}"]
    if not isinstance(body, dict):
        return [f"stdout is JSON but not an object: {body!r:.100}"]
    problems = []
    if not {"cniVersion", "code", "msg"} <= set(body) <= {"cniVersion", "code", "msg", "details"}:
        problems.append(f"not a CNI error object: {sorted(body)}")
    if body.get("code") != expected:
        problems.append(f"code {body.get('code')} ({body.get('msg')!r}), expected {expected}")
    if body.get("cniVersion") not in SUPPORTED_VERSIONS:
        problems.append(f"reply cniVersion {body.get('cniVersion')!r}")
    if not isinstance(body.get("msg"), str) or not body["msg"]:
        problems.append("empty msg")
    return problems


def _diff(a: Any, b: Any) -> str:
    if isinstance(a, list) and isinstance(b, list):
        return f"gone {[x for x in a if x not in b]}, new {[x for x in b if x not in a]}"
    return f"{a!r} -> {b!r}"


def in_process(request: Request) -> Reply:
    err = StringIO()
    with redirect_stderr(err):
        reply = call(request.env, request.encoded())
    return Reply(reply.status, reply.stdout, err.getvalue())


def fuzz(world: World, figures: Figures, name: str) -> None:
    """Run the fuzzer in this process, judging every case; fails on the first bad one."""
    suite = figures.suite(name)
    strategy = bad_requests(world.net, world.netns, world.prev, world.bad_netns)

    @SETTINGS
    @given(strategy)
    def one(case: Case) -> None:
        with suite.case(str(case)) as c:
            reply = in_process(case.request)
            changes = world.after(case)
            problems = judge(case, reply, changes)
            c.leaked(changes)
            assert not problems, f"{case}: " + "; ".join(problems)

    one()
    left = world.changes(deep=True)
    assert not left, f"the node changed during the fuzzing: {left}"


def exe_sample(world: World, figures: Figures, name: str, count: int) -> None:
    """The first ``count`` fuzzer cases again, through the real executable."""
    suite = figures.suite(name)
    seen: list[Case] = []

    @settings(SETTINGS, max_examples=count)
    @given(bad_requests(world.net, world.netns, world.prev, world.bad_netns))
    def collect(case: Case) -> None:
        seen.append(case)

    collect()
    for case in seen:
        with suite.case(f"exe {case}") as c:
            reply = spawn(case.request.env, case.request.encoded(), via="exe").wait()
            changes = world.changes(deep=True)
            c.leaked(changes)
            problems = judge(case, reply, changes)
            assert not problems, f"{case}: " + "; ".join(problems)


# --- the two runs ----------------------------------------------------------------------------


@pytest.fixture
def chdir_sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    sandbox = tmp_path / "sandbox"
    (sandbox / "cwd").mkdir(parents=True)
    monkeypatch.chdir(sandbox / "cwd")
    yield sandbox


def test_bad_input_on_the_host(chdir_sandbox: Path, figures: Figures) -> None:
    """Everything before the netns: config, environment, CNI_ARGS, version, stdin, command."""
    net = Net(chdir_sandbox, "eth0", "1-8")
    net.state_dir.mkdir()
    net.devinfo_dir.mkdir()
    # A record and a device-info file as a live attachment would have them.
    (net.state_dir / "attachments").mkdir()
    (net.state_dir / "attachments" / f"rel:{CONTAINER_ID}:{IFNAME}.json").write_text("{}")
    (net.devinfo_dir / f"{CONTAINER_ID}-{IFNAME}.json").write_text("{}")
    world = World(net, str(NETNS_DIR / "reliability-absent"), {"cniVersion": "1.1.0"},
                  chdir_sandbox, {})
    world.begin()
    fuzz(world, figures, "bad input (host)")
    exe_sample(world, figures, "bad input (host)", EXE_SAMPLE_HOST)


@pytest.mark.kernel
def test_bad_input_in_the_vm(chdir_sandbox: Path, figures: Figures, make_netns: Any) -> None:
    """All of it, the netns included, against a live attachment on a real kernel."""
    from cni_netkit.kernel import Kernel  # noqa: PLC0415
    from tests.reliability.harness import make_nic  # noqa: PLC0415

    nic = make_nic(10)
    try:
        net = Net(chdir_sandbox, nic.name, "1-8")
        pod = make_netns()
        live = net.call("ADD", CONTAINER_ID, pod, IFNAME)
        assert live.status == 0, str(live)
        with Kernel() as kernel:
            world = World(net, pod, live.json, chdir_sandbox, _bad_netns(chdir_sandbox),
                          kernel, nic.ifindex)
            world.begin()
            fuzz(world, figures, "bad input (VM)")
            exe_sample(world, figures, "bad input (VM)", EXE_SAMPLE_VM)
        # ... and the live attachment is still whole.
        assert net.call("CHECK", CONTAINER_ID, pod, IFNAME, prev=live.json).status == 0
        assert net.call("DEL", CONTAINER_ID, pod, IFNAME).status == 0
    finally:
        nic.remove()


def _bad_netns(sandbox: Path) -> dict[str, str]:
    """Paths that are not a pod's netns; made outside the fingerprinted sandbox tree."""
    d = sandbox.parent / "netns-paths"
    d.mkdir()
    (d / "passwd-link").symlink_to("/etc/passwd")
    (d / "host-netns-link").symlink_to("/proc/self/ns/net")
    (d / "init-netns-link").symlink_to("/proc/1/ns/net")
    (d / "dangling-link").symlink_to(d / "nothing")
    (d / "empty-file").write_bytes(b"")  # what a netns mount leaves once unmounted
    (d / "dir").mkdir()
    os.mkfifo(d / "fifo")
    return {
        "missing": str(d / "missing"),
        "/etc/passwd": "/etc/passwd",
        "symlink to /etc/passwd": str(d / "passwd-link"),
        "symlink to the host netns": str(d / "host-netns-link"),
        "symlink to init's netns": str(d / "init-netns-link"),
        "/proc/1/ns/net (the host's)": "/proc/1/ns/net",
        "/proc/self/ns/net (the plugin's)": "/proc/self/ns/net",
        "a dangling symlink": str(d / "dangling-link"),
        "an empty file": str(d / "empty-file"),
        "a directory": str(d / "dir"),
        "a FIFO": str(d / "fifo"),
        "/dev/null": "/dev/null",
        "a mount namespace": "/proc/self/ns/mnt",
        "a user namespace": "/proc/self/ns/user",
        "a path with ..": "/var/run/netns/../../../etc/passwd",
        "a pid's whole ns dir": "/proc/self/ns",
    }


def test_del_never_removes_a_device_info_file_it_did_not_write(
        tmp_path: Path, figures: Figures) -> None:
    """A DEL with no record names a device-info path: the plugin never wrote it, so it stays.

    The path comes from stdin (``runtimeConfig.CNIDeviceInfoFile``); a DEL
    that deleted whatever it named would let its sender unlink any file as root.
    """
    net = Net(tmp_path, "eth0", "1-8")
    victim = tmp_path / "precious"
    victim.write_text("not the plugin's")
    with figures.suite("bad input (host)").case("DEL names a file it never wrote") as c:
        # Even where the node's admin allows device-info files.
        env = cni_env("DEL", container_id="never-added", ifname=IFNAME,
                      extra={**net.places, "CNI_NETKIT_DEVICE_INFO_DIRS": str(tmp_path)})
        conf = {**net.conf(), "runtimeConfig": {"CNIDeviceInfoFile": str(victim)}}
        reply = call(env, json.dumps(conf).encode())
        assert reply.status == 0, str(reply)
        assert victim.exists(), f"DEL removed {victim}, which it never wrote"
        c.leaked([])



def test_device_info_write_never_replaces_or_follows(tmp_path: Path, figures: Figures) -> None:
    """The device-info path comes from the request: writing it must not clobber what is there,
    nor write through a symlink planted where the temporary file goes."""
    from cni_netkit.errors import IOFailure  # noqa: PLC0415
    from cni_netkit.plugin import deviceinfo  # noqa: PLC0415

    victim = tmp_path / "precious"
    victim.write_text("not the plugin's")
    with figures.suite("bad input (host)").case("device-info over an existing file") as c:
        with pytest.raises(IOFailure, match="already exists"):
            deviceinfo.write(str(victim), {"type": "netkit"})
        assert victim.read_text() == "not the plugin's"
        planted = tmp_path / f".devinfo.json.tmp.{os.getpid()}"
        planted.symlink_to(victim)
        deviceinfo.write(str(tmp_path / "devinfo.json"), {"type": "netkit"})
        assert victim.read_text() == "not the plugin's", "written through a planted symlink"
        assert json.loads((tmp_path / "devinfo.json").read_text()) == {"type": "netkit"}
        c.leaked([str(p) for p in tmp_path.iterdir()
                  if p.name not in ("precious", "devinfo.json")])


@pytest.mark.kernel
def test_add_never_overwrites_a_file_named_as_device_info(
        tmp_path: Path, figures: Figures, make_netns: Any) -> None:
    """ADD naming an existing file as its device-info file fails (5) and leaves all as it was."""
    from tests.reliability.harness import make_nic, observe  # noqa: PLC0415

    nic = make_nic(10)
    try:
        net = Net(tmp_path, nic.name, "1-8")
        pod = make_netns()
        net.devinfo_dir.mkdir()  # where the node's admin allows device-info files
        victim = net.devinfo_dir / "precious"
        victim.write_text("not the plugin's")
        before = observe(nic, net)
        with figures.suite("bad input (VM)").case("ADD with an existing device-info file") as c:
            env, _ = net.request("ADD", "c1", pod)
            conf = {**net.conf(), "runtimeConfig": {"CNIDeviceInfoFile": str(victim)}}
            reply = call(env, json.dumps(conf).encode())
            assert reply.code == 5 and "already exists" in reply.stdout, str(reply)
            assert victim.read_text() == "not the plugin's"
            after = observe(nic, net)
            leaked, lost = differences(before, after)
            assert not lost, lost
            c.leaked(leaked)
    finally:
        nic.remove()
