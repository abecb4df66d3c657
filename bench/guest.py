"""The benchmark's VM half: our ADD/DEL, cold and warm, against Go reference plugins.

Run by ``scripts/bench`` inside one boot of the 7.x VM; writes ``guest.json``
into ``--out``.  Everything a scenario needs (netdevsim NICs, pod netns, the
agent) is made here, outside the timed part.

Scenarios come in comparable pairs:

- ``single``: our single netkit leasing 1 queue, no IPAM, vs Go ``macvlan``
  without IPAM (both: one device created in the pod netns, nothing else);
- ``pair+host-local``: our netkit pair with host-local IPAM vs Go
  ``macvlan`` with host-local (both also exec the Go host-local plugin).

Sequential samples are taken round-robin across scenarios (sample i of
every scenario, then sample i+1), so drift in the machine's load (other VMs
share the host) spreads over all of them alike.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    PATH,
    REPO,
    Run,
    flavours,
    importtime_by_package,
    lean_launcher,
    peak_rss_kb,
    run_many,
    run_one,
    shim_launcher,
    summary,
    write_json,
)
from cni_netkit import logs
from cni_netkit.cni import entry

NSIM = Path("/sys/bus/netdevsim")
WORK = Path("/run/bench")
SOCKET = WORK / "agent" / "cni.sock"
_ids = iter(range(10**9))
# What main() can run (--parts): the ADD/DEL scenarios against Go, the scale
# of a big NIC, the per-phase breakdown, the XDP program's per-frame cost, and
# AF_XDP delivery through a netkit's leased queue vs the physical queue.
PARTS = ("control", "scale", "phases", "steering", "proxy")
SCALE_QUEUES, SCALE_POOL = 256, "1-255"


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def make_nic(dev_id: int, queues: int) -> str:
    (NSIM / "new_device").write_text(f"{dev_id} 1 {queues}")
    net = NSIM / "devices" / f"netdevsim{dev_id}" / "net"
    for _ in range(500):
        if net.exists() and any(net.iterdir()):
            break
        time.sleep(0.01)
    name = next(net.iterdir()).name
    sh("ip", "link", "set", name, "up")
    return name


def new_netns() -> str:
    name = f"b{next(_ids)}"
    sh("ip", "netns", "add", name)
    return f"/var/run/netns/{name}"


def del_netns(path: str) -> None:
    # ip(8) from PATH, as a runtime's tooling would
    subprocess.run(["ip", "netns", "del", Path(path).name], check=False, capture_output=True)  # noqa: S607


@dataclass
class Scenario:
    """One plugin + config + way of starting it; collects its samples."""

    name: str
    pairing: str  # which comparison it belongs to: "single" or "pair+host-local"
    impl: str  # "go" or ours: "cold"/"warm" + flavour
    argv: list[str]
    conf: dict[str, Any]
    env: dict[str, str]
    add: list[float] = field(default_factory=list)
    dele: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    conc_add: list[float] = field(default_factory=list)
    conc_del: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    fallbacks: int = 0  # warm runs the executable had to run cold after all
    fallback_reasons: collections.Counter[str] = field(default_factory=collections.Counter)

    def environ(self, command: str, cid: str, netns: str) -> dict[str, str]:
        return {
            "PATH": PATH, "CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns,
            "CNI_IFNAME": "net1", "CNI_PATH": os.environ["CNI_NETKIT_CNI_PLUGINS"],
            "CNI_NETKIT_STATE_DIRS": str(WORK / "state"), **self.declared(), **self.env,
        }

    def declared(self) -> dict[str, str]:
        """The node's admin declares the scenario's NIC (ADD is closed by default)."""
        master, queues = self.conf.get("master"), self.conf.get("queues")
        if not isinstance(master, str) or not isinstance(queues, str):
            return {}
        return {"CNI_NETKIT_MASTERS": f"{master}={queues}"}

    def stdin(self) -> bytes:
        return json.dumps(self.conf).encode()

    def check(self, what: str, run: Run) -> None:
        if b"node agent not used" in run.stderr:
            self.fallbacks += 1
            self.fallback_reasons[fallback_reason(run.stderr)] += 1
        if run.status != 0:
            self.failures.append(f"{what}: exit {run.status}: {run.stdout[:300]!r} "
                                 f"{run.stderr[-300:]!r}")

    def sample(self) -> None:
        """One sequential ADD then DEL, in a fresh netns."""
        netns, cid = new_netns(), f"s{next(_ids)}"
        a = run_one(self.argv, self.environ("ADD", cid, netns), self.stdin())
        self.check("ADD", a)
        d = run_one(self.argv, self.environ("DEL", cid, netns), self.stdin())
        self.check("DEL", d)
        del_netns(netns)
        self.add.append(a.ms)
        self.dele.append(d.ms)

    def measure_rss(self, samples: int = 3) -> None:
        """Peak RSS of ADD, with time(1) (see common.peak_rss_kb), in fresh netns."""
        for _ in range(samples):
            netns, cid = new_netns(), f"m{next(_ids)}"
            kb = peak_rss_kb(self.argv, self.environ("ADD", cid, netns), self.stdin())
            run_one(self.argv, self.environ("DEL", cid, netns), self.stdin())
            del_netns(netns)
            if kb is not None:
                self.rss.append(kb)

    def concurrent(self, n: int) -> None:
        """n ADDs at once (each in its own netns), then their n DELs at once."""
        spaces = [(f"k{next(_ids)}", new_netns()) for _ in range(n)]
        adds = run_many((self.argv, self.environ("ADD", c, ns), self.stdin()) for c, ns in spaces)
        for r in adds:
            self.check("concurrent ADD", r)
        dels = run_many((self.argv, self.environ("DEL", c, ns), self.stdin()) for c, ns in spaces)
        for r in dels:
            self.check("concurrent DEL", r)
        for _, ns in spaces:
            del_netns(ns)
        self.conc_add += [r.ms for r in adds]
        self.conc_del += [r.ms for r in dels]

    def report(self) -> dict[str, Any]:
        return {
            "pairing": self.pairing, "impl": self.impl, "argv": self.argv,
            "add": summary(self.add), "del": summary(self.dele),
            "conc_add": summary(self.conc_add), "conc_del": summary(self.conc_del),
            "maxrss_kb_p50": sorted(self.rss)[len(self.rss) // 2] if self.rss else None,
            "failures": self.failures[:10], "failure_count": len(self.failures),
            "fallbacks": self.fallbacks, "fallback_reasons": dict(self.fallback_reasons),
        }


def fallback_reason(stderr: bytes) -> str:
    """The reason of the client's "node agent not used" line (JSON on stderr)."""
    for line in stderr.splitlines():
        if b"node agent not used" in line:
            try:
                return str(json.loads(line).get("reason", "?"))
            except ValueError:
                return "unparsable note"
    return "?"


class Agent:
    """The node agent's CNI server, as ``python -m cni_netkit.agent.server``."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cni_netkit.agent.server", "--socket", str(SOCKET)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=(WORK / "agent.log").open("ab"),
        )
        deadline = time.monotonic() + 300
        while not SOCKET.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent did not start: {(WORK / 'agent.log').read_text()}")
            time.sleep(0.1)

    def rss_kb(self) -> dict[str, int]:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return {k: int(v.split()[0]) for k, v in
                (line.split(":", 1) for line in status.splitlines()) if k in ("VmRSS", "VmHWM")}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def timed(label: str, fn: Callable[[], None]) -> None:
    t = time.monotonic()
    fn()
    print(f"bench: {label} ({time.monotonic() - t:.0f} s)", file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.guest")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--cold-samples", type=int, default=30)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="concurrent rounds (warm, Go)")
    parser.add_argument("--scale-samples", type=int, default=30)
    parser.add_argument("--artifact")
    parser.add_argument("--cold-baseline",
                        help="another checkout of cni-netkit: its cold ADD is measured beside "
                             "ours, interleaved (a before/after of a cold-path change)")
    parser.add_argument("--warm-flavours", default="",
                        help="comma-separated starts to measure warm (default: all)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated parts to run (default: all of {','.join(PARTS)})")
    parser.add_argument("--steer-repeat", type=int, default=1_000_000,
                        help="BPF_PROG_TEST_RUN repeat per steering sample")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    parts = {p for p in args.parts.split(",") if p}
    if parts - set(PARTS):
        raise SystemExit(f"unknown --parts: {sorted(parts - set(PARTS))}")
    WORK.mkdir(parents=True, exist_ok=True)
    go = Path(os.environ["CNI_NETKIT_CNI_PLUGINS"])
    ours_nic, go_nic = make_nic(30, 16), make_nic(31, 1)
    scale_nics: tuple[str, ...] = ()
    if "scale" in parts:
        scale_nics = (make_nic(32, SCALE_QUEUES), make_nic(33, SCALE_QUEUES))
    # Closed by default: the node admin names the masters (and pools) a config may lease.
    # The agent started below and every plugin run inherit it.
    os.environ["CNI_NETKIT_MASTERS"] = ";".join(
        [f"{ours_nic}=0-15", *(f"{nic}={SCALE_POOL}" for nic in scale_nics)])
    starts = flavours(WORK, args.artifact)
    steering: dict[str, Any] = {}
    if "steering" in parts:  # first: its figures are short runs, least disturbed by leftovers
        timed("steering", lambda: steering.update(measure_module(
            "bench.steering", args.samples, "--repeat", str(args.steer_repeat))))
    proxy: dict[str, Any] = {}
    if "proxy" in parts:
        timed("proxy", lambda: proxy.update(measure_module("bench.proxy", args.samples)))
    agent = Agent()
    warm_env = {"CNI_NETKIT_AGENT_SOCKET": str(SOCKET)}
    cold_env = {"CNI_NETKIT_NO_AGENT": "1"}
    # lockTimeout: 16 cold plugins at once on one emulated CPU hold the master's
    # lock for longer than the default 10 s (they fail with code 11 then).
    base = {"cniVersion": "1.1.0", "name": "bench", "type": "netkit", "master": ours_nic,
            "queues": "0-15", "stateDir": str(WORK / "state"), "lockTimeout": 300.0}
    pair = {**base, "name": "bench-pair", "pairing": "pair",
            "ipam": {"type": "host-local", "subnet": "10.78.0.0/16",
                     "dataDir": str(WORK / "ipam-ours")}}
    gos = {"cniVersion": "1.0.0", "name": "gobench", "type": "macvlan", "master": go_nic,
           "mode": "bridge"}
    go_ipam = {**gos, "name": "gobench-ipam",
               "ipam": {"type": "host-local", "subnet": "10.77.0.0/16",
                        "dataDir": str(WORK / "ipam-go")}}
    scenarios = [
        Scenario("go macvlan", "single", "go", [str(go / "macvlan")], gos, {}),
        Scenario("go macvlan+host-local", "pair+host-local", "go", [str(go / "macvlan")],
                 go_ipam, {}),
    ]
    warm_only = {f for f in args.warm_flavours.split(",") if f}
    for flavour, argv in starts.items():
        if warm_only and flavour not in warm_only:
            continue
        scenarios.append(Scenario(f"netkit single warm ({flavour})", "single",
                                  f"warm {flavour}", argv, base, warm_env))
        scenarios.append(Scenario(f"netkit pair+host-local warm ({flavour})", "pair+host-local",
                                  f"warm {flavour}", argv, pair, warm_env))
    cold = cold_scenarios(starts, base, pair, cold_env, args.cold_baseline)
    control: dict[str, Any] = {}
    if "control" in parts:
        control = measure_control(args, scenarios, cold, go, agent)
    # Scale: the fastest start measured warm (the growth ratio is what counts).
    fastest = next((starts[f] for f in ("shim", "lean", "venv")
                    if f in starts and (not warm_only or f in warm_only)), starts["venv"])
    scale: dict[str, Any] = {}
    if scale_nics:
        timed("scale", lambda: scale.update(
            measure_scale(args.scale_samples, fastest, warm_env, scale_nics)))
    phases: dict[str, Any] = {}
    if "phases" in parts:
        timed("phases", lambda: phases.update(measure_phases(ours_nic)))
        timed("cold imports", lambda: phases.update(
            cold_importtime=measure_cold_imports(starts["lean"], base, cold_env)))
    agent.stop()
    write_json(args.out / "guest.json", {
        "kernel": os.uname().release,
        **control,
        "scale": scale,
        "phases": phases,
        "steering": steering,
        "proxy": proxy,
        "params": vars(args) | {"out": str(args.out)},
    })
    return 0


def cold_scenarios(starts: dict[str, list[str]], base: dict[str, Any], pair: dict[str, Any],
                   cold_env: dict[str, str], baseline_tree: str | None) -> list[Scenario]:
    """The cold scenarios: ours as installed, and another checkout's beside it when asked."""
    # Cold as installed: the thin client, told not to use the agent, execs the plugin
    # beside it (netkit-plugin: here the python -S launcher); the venv's console script
    # (its .pth files load the editable finder at every start) only without the shim.
    cold_start = "shim" if "shim" in starts else "venv"
    cold = [
        Scenario(f"netkit single cold ({cold_start})", "single", f"cold {cold_start}",
                 starts[cold_start], base, cold_env),
        Scenario(f"netkit pair+host-local cold ({cold_start})", "pair+host-local",
                 f"cold {cold_start}", starts[cold_start], pair, cold_env),
    ]
    if baseline_tree is not None:
        (WORK / "baseline").mkdir(parents=True, exist_ok=True)
        baseline = shim_launcher(WORK / "baseline", lean_launcher(
            WORK, Path(baseline_tree).resolve(), "netkit-lean-baseline"))
        if baseline is not None:
            cold.append(Scenario("netkit single cold (shim, baseline tree)", "single",
                                 "cold baseline", [str(baseline)], base, cold_env))
    return cold


def measure_control(args: argparse.Namespace, scenarios: list[Scenario], cold: list[Scenario],
                    go: Path, agent: Agent) -> dict[str, Any]:
    """Our ADD/DEL against Go's, sequential and concurrent, cold and warm; peak RSS; floors."""
    # One unmeasured warm-up each: page cache, first host-local run, the agent's first request.
    for s in [*scenarios, *cold]:
        s.sample()
        s.add, s.dele, s.rss = [], [], []

    def sequential() -> None:
        for i in range(max(args.samples, args.cold_samples)):
            for s in scenarios if i < args.samples else []:
                s.sample()
            for s in cold if i < args.cold_samples else []:
                s.sample()

    timed("sequential", sequential)

    def concurrent() -> None:
        for _ in range(args.rounds):
            for s in scenarios:
                s.concurrent(args.concurrency)
        for s in cold[:1]:  # 16 cold at once take minutes: one round, one flavour
            s.concurrent(args.concurrency)

    timed("concurrent", concurrent)
    def peak_rss() -> None:
        for s in [*scenarios, *cold]:
            s.measure_rss()

    timed("peak RSS", peak_rss)
    agent_rss = agent.rss_kb()  # before the relayed requests, as ever
    relay_only: dict[str, Any] = {}
    for s in scenarios:  # the config of the first warm scenario of each pairing
        if s.impl.startswith("warm") and s.pairing not in relay_only:
            relay_only[s.pairing] = measure_relay(args.samples, s)
    floors = measure_floors(go)
    return {
        "scenarios": {s.name: s.report() for s in [*scenarios, *cold]},
        "agent_rss_kb": agent_rss,
        "relay_only": relay_only,
        "floors": floors,
    }


def measure_relay(samples: int, s: Scenario) -> dict[str, Any]:
    """The agent's share of a warm ADD/DEL: relayed from this process, no interpreter start."""
    from cni_netkit.cni import client  # noqa: PLC0415 - the harness is a client here

    add: list[float] = []
    dele: list[float] = []
    for _ in range(samples):
        netns, cid = new_netns(), f"r{next(_ids)}"
        for command, into in (("ADD", add), ("DEL", dele)):
            t = time.perf_counter()
            got = client.relay(s.environ(command, cid, netns), s.stdin(), path=str(SOCKET))
            into.append((time.perf_counter() - t) * 1000)
            if got is None or got[1] != 0:
                s.failures.append(f"relay {command}: {got}")
        del_netns(netns)
    return {"add": summary(add), "del": summary(dele)}


def measure_scale(samples: int, argv: list[str], env: dict[str, str], nics: tuple[str, ...]
                  ) -> dict[str, Any]:
    """Warm ADD (and DEL) with 1 other lease held vs 254 others (this ADD fills pool 1-255).

    Two 256-queue netdevsim masters, both with pool 1-255 (queue 0 stays the
    host's): the first holds 1 lease, the second 254, and their samples
    alternate (one on each, then the next), so the machine's load drifts over
    both alike. The ratio is the second's ADD p50 (p90) over the first's.
    What the 254 attachments cost the node as a whole (netns, devices) is
    then in both; what they cost on their master is the difference.
    """
    full = SCALE_QUEUES - 2  # held before the ADD that takes the last queue of 1-255
    labels = ("1 lease held", f"{full} held (pool full after ADD)")
    sides = []
    for nic, others in zip(nics, (1, full), strict=True):
        conf = {"cniVersion": "1.1.0", "name": f"scale-{nic}", "type": "netkit", "master": nic,
                "queues": SCALE_POOL, "stateDir": str(WORK / "state"), "lockTimeout": 300.0}
        s = Scenario("scale", "", "warm", argv, conf, env)
        held: list[tuple[str, str]] = []
        while len(held) < others:
            cid, ns = f"h{next(_ids)}", new_netns()
            s.check("fill ADD", run_one(argv, s.environ("ADD", cid, ns), s.stdin()))
            held.append((cid, ns))
        s.sample()  # warm-up
        s.add, s.dele = [], []
        sides.append((s, held))
    for _ in range(samples):
        for s, _held in sides:
            s.sample()
    out: dict[str, Any] = {"queues": SCALE_QUEUES, "pool": SCALE_POOL, "interleaved": True}
    for label, (s, _held) in zip(labels, sides, strict=True):
        out[label] = {"add": summary(s.add), "del": summary(s.dele)}
    first, last = out[labels[0]], out[labels[1]]
    for q in ("p50", "p90"):
        out[f"growth_ratio_add_{q}"] = round(last["add"][q] / first["add"][q], 3)
        out[f"growth_ratio_del_{q}"] = round(last["del"][q] / first["del"][q], 3)
    out["paired_add_ratio"] = summary([b / a for a, b in zip(sides[0][0].add, sides[1][0].add,
                                                             strict=True)])
    out["failures"] = [f for s, _ in sides for f in s.failures][:10]
    for s, held in sides:
        for cid, ns in held:
            run_one(argv, s.environ("DEL", cid, ns), s.stdin())
            del_netns(ns)
    return out


def measure_module(module: str, samples: int, *extra: str) -> dict[str, Any]:
    """``bench.steering`` or ``bench.proxy`` in a process of its own (each has its own NIC)."""
    p = subprocess.run(
        [sys.executable, "-m", module, "--samples", str(samples), *extra],
        cwd=REPO, capture_output=True, check=False,
    )
    if p.returncode != 0:
        return {"error": p.stderr.decode()[-2000:]}
    try:
        got: dict[str, Any] = json.loads(p.stdout)
    except ValueError as e:
        return {"error": f"{e}: {p.stdout.decode(errors='replace')[-1000:]}"}
    return got


def measure_cold_imports(argv: list[str], conf: dict[str, Any], env: dict[str, str],
                         runs: int = 3) -> dict[str, Any]:
    """Where a cold ADD's imports go: ``-X importtime`` self time by package (ms), min of runs.

    The lean start (``python -S``, what the installed plugin runs): the venv's
    site would add the editable finder, which no installed plugin has.
    """
    s = Scenario("cold imports", "", "cold", argv, conf, env)
    by_run: list[dict[str, float]] = []
    total: list[float] = []
    for _ in range(runs):
        netns, cid = new_netns(), f"i{next(_ids)}"
        r = run_one(argv, {**s.environ("ADD", cid, netns), "PYTHONPROFILEIMPORTTIME": "1"},
                    s.stdin())
        s.check("ADD -X importtime", r)
        run_one(argv, s.environ("DEL", cid, netns), s.stdin())
        del_netns(netns)
        by_run.append(importtime_by_package(r.stderr.decode(errors="replace")))
        total.append(r.ms)
    packages = {k for run in by_run for k in run}
    per_package = {k: min(run.get(k, 0.0) for run in by_run) for k in packages}
    return {
        "runs": runs, "add_ms_p50_with_importtime": summary(total)["p50"],
        "self_ms_by_package": dict(sorted(per_package.items(), key=lambda kv: -kv[1])),
        "failures": s.failures[:3],
    }


def measure_phases(nic: str) -> dict[str, Any]:
    netns = new_netns()
    p = subprocess.run(
        [sys.executable, "-m", "bench.phases", "--master", nic, "--netns", netns,
         "--state-dir", str(WORK / "phases-state")],
        cwd=REPO, capture_output=True, check=False,
    )
    del_netns(netns)
    if p.returncode != 0:
        return {"error": p.stderr.decode()[-2000:]}
    got: dict[str, Any] = json.loads(p.stdout)
    return got


# The cold path's floor set by the chosen libraries alone: a lean process (as the
# installed plugin starts) that loads them the way a cold ADD does (the same skipped
# imports, pyroute2's message classes without its package __init__; structlog brings
# asyncio) and builds one pydantic model and one structlog logger -- none of
# cni-netkit's own models, records or kernel code.
LIBRARIES_ONLY = """
import os, sys
sys.path[:0] = [{repo!r}, {purelib!r}]
os.environ[{no_plugins[0]!r}] = {no_plugins[1]!r}
for name in {extras!r}:
    sys.modules[name] = None
from cni_netkit.cni.entry import skip_unused_imports
skip_unused_imports()
from pydantic import BaseModel
class M(BaseModel):
    x: int
M(x=1)
import structlog
structlog.get_logger().bind(x=1)
from cni_netkit.kernel import _pyroute2
_pyroute2.install()
import pyroute2.netlink.rtnl.ifinfmsg, pyroute2.netlink.rtnl.rtmsg  # what a cold ADD loads
"""


def measure_floors(go: Path) -> dict[str, Any]:
    """What starting a process costs here, before any plugin work: the floors of each path."""
    floors = {}
    venv_python = str(REPO / ".venv" / "bin" / "python")
    # The cold path's own settings (entry, logs), not copies of them.
    libraries = LIBRARIES_ONLY.format(repo=str(REPO), purelib=sysconfig.get_paths()["purelib"],
                                      no_plugins=entry._PYDANTIC_NO_PLUGINS,
                                      extras=logs.OPTIONAL_EXTRAS)
    for label, argv in (
        ("go macvlan VERSION", [str(go / "macvlan")]),
        ("python -S -c pass", [venv_python, "-S", "-c", "pass"]),
        ("python -c pass (venv site)", [venv_python, "-c", "pass"]),
        ("python -S, pydantic + structlog + pyroute2 only", [venv_python, "-S", "-c", libraries]),
    ):
        runs = [run_one(argv, {"PATH": PATH, "CNI_COMMAND": "VERSION"}, b'{"cniVersion":"1.0.0"}')
                for _ in range(10)]
        floors[label] = summary([r.ms for r in runs])
    return floors


if __name__ == "__main__":
    raise SystemExit(main())
