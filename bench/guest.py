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
import json
import os
import signal
import subprocess
import sys
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
    peak_rss_kb,
    run_many,
    run_one,
    summary,
    write_json,
)

NSIM = Path("/sys/bus/netdevsim")
WORK = Path("/run/bench")
SOCKET = WORK / "agent" / "cni.sock"
_ids = iter(range(10**9))


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
            "fallbacks": self.fallbacks,
        }


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
    parser.add_argument("--warm-flavours", default="",
                        help="comma-separated starts to measure warm (default: all)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    go = Path(os.environ["CNI_NETKIT_CNI_PLUGINS"])
    ours_nic, go_nic = make_nic(30, 16), make_nic(31, 1)
    starts = flavours(WORK, args.artifact)
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
    cold = [
        Scenario("netkit single cold (venv)", "single", "cold venv", starts["venv"], base,
                 cold_env),
        Scenario("netkit pair+host-local cold (venv)", "pair+host-local", "cold venv",
                 starts["venv"], pair, cold_env),
    ]
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
    agent_rss = agent.rss_kb()
    relay_only: dict[str, Any] = {}
    for s in scenarios:  # the config of the first warm scenario of each pairing
        if s.impl.startswith("warm") and s.pairing not in relay_only:
            relay_only[s.pairing] = measure_relay(args.samples, s)
    # Scale: the fastest start measured warm (the growth ratio is what counts).
    fastest = next((starts[f] for f in ("shim", "lean", "venv")
                    if f in starts and (not warm_only or f in warm_only)), starts["venv"])
    scale = {}
    timed("scale", lambda: scale.update(measure_scale(args.scale_samples, fastest, warm_env)))
    phases = {}
    timed("phases", lambda: phases.update(measure_phases(ours_nic)))
    floors = measure_floors(go)
    agent.stop()
    write_json(args.out / "guest.json", {
        "kernel": os.uname().release,
        "scenarios": {s.name: s.report() for s in [*scenarios, *cold]},
        "agent_rss_kb": agent_rss,
        "relay_only": relay_only,
        "scale": scale,
        "phases": phases,
        "floors": floors,
        "params": vars(args) | {"out": str(args.out)},
    })
    return 0


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


def measure_scale(samples: int, argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Warm ADD (and DEL) with 1 other lease vs 63 others (this ADD fills the 64-queue pool)."""
    nic = make_nic(32, 64)
    conf = {"cniVersion": "1.1.0", "name": "scale", "type": "netkit", "master": nic,
            "queues": "0-63", "stateDir": str(WORK / "state"), "lockTimeout": 300.0}
    s = Scenario("scale", "", "warm", argv, conf, env)
    held: list[tuple[str, str]] = []

    def hold(count: int) -> None:
        while len(held) < count:
            cid, ns = f"h{next(_ids)}", new_netns()
            s.check("fill ADD", run_one(argv, s.environ("ADD", cid, ns), s.stdin()))
            held.append((cid, ns))

    out: dict[str, Any] = {}
    for label, others in (("1 lease held", 1), ("63 held (pool full after ADD)", 63)):
        hold(others)
        s.add, s.dele, s.rss = [], [], []
        for _ in range(samples):
            s.sample()
        out[label] = {"add": summary(s.add), "del": summary(s.dele)}
    first, full = out["1 lease held"]["add"]["p50"], out["63 held (pool full after ADD)"]["add"]
    out["growth_ratio_add_p50"] = round(full["p50"] / first, 3)
    out["failures"] = s.failures[:10]
    for cid, ns in held:
        run_one(argv, s.environ("DEL", cid, ns), s.stdin())
        del_netns(ns)
    return out


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


def measure_floors(go: Path) -> dict[str, Any]:
    """What starting a process costs here, before any plugin work: the floors of each path."""
    floors = {}
    venv_python = str(REPO / ".venv" / "bin" / "python")
    for label, argv in (
        ("go macvlan VERSION", [str(go / "macvlan")]),
        ("python -S -c pass", [venv_python, "-S", "-c", "pass"]),
        ("python -c pass (venv site)", [venv_python, "-c", "pass"]),
    ):
        runs = [run_one(argv, {"PATH": PATH, "CNI_COMMAND": "VERSION"}, b'{"cniVersion":"1.0.0"}')
                for _ in range(10)]
        floors[label] = summary([r.ms for r in runs])
    return floors


if __name__ == "__main__":
    raise SystemExit(main())
