"""Warm-path storm: the thin C client against a node agent that is killed and replaced under load.

A seeded runtime drives pods of two networks on one master (pool of 6
queues, shared): ``single`` (one netkit in the pod) and ``pair`` (a pair,
l3, with host-local IPAM). Every call is the real thin client
(``build/shim/netkit``) relaying to a node agent (``python -m
cni_netkit.agent.server``), up to ``PARALLEL`` at once: ADD in a fresh pod
netns, CHECK, DEL (also after every failed ADD, as runtimes do). During the
storm the agent

- dies by a request's fault point (``created:kill``: SIGKILL inside an ADD
  it committed to, the netkit made and the intent record written; the ADD
  goes to an idle agent, then other calls follow it in) and is restarted;
- is SIGKILLed from outside with calls in flight, and restarted;
- is rolled out once as a DaemonSet does by default (``maxUnavailable``
  1): SIGTERM with calls in flight, the old agent finishes what it committed
  to and exits 0, a *new version* starts. "New version" here is a new agent
  process importing a separate copy of the ``cni_netkit`` package (another
  ``__version__``, other files on disk), as the agent's install swaps the
  executable; it is not an older release's code, so it proves the handover,
  not compatibility across record formats.

While no agent answers, the client runs the command itself (the cold
fallback: seconds per call in the VM, so the runtime starts only
``DOWN_CALLS`` calls per outage); after it said go, a lost agent turns an
ADD into error 11 and never into a second, cold execution (``cni/shim.c``'s
decision table), while DEL and CHECK are re-run cold.

Proved:

- every call is answered exactly once: one exit status and one JSON
  document (or nothing, for DEL/CHECK); ADD succeeds or fails with 100 (pool
  exhausted) or 11 (agent lost, lock timeout); a failed ADD that was not
  lost has left nothing (no netkit, no record) before its DEL; DEL and CHECK
  always succeed;
- no ADD is executed twice: each ADD has its own container id, and the
  ``leased`` log lines of all agents and all cold runs name it at most once
  (exactly once for a successful one);
- no queue is ever held by two attachments: each successful ADD's queues
  against every pod known to hold queues, and, after the storm, queue-get on
  the master names exactly the netkit of the one pod each queue belongs to;
- every restarted agent adopts every surviving attachment: once it listens
  (observed with nothing else in flight), a CHECK of each live pod is served
  by it (the client's stderr stays empty: any fallback says so there) and
  succeeds;
- the agents end as told: -9 for the SIGKILLs, 0 for the rollout's SIGTERM;
- afterwards the runtime's DELs, and one GC for a pod it forgot, leave
  nothing: no lease, netkit (host or pod side), record, device-info file,
  host-local address or held lock. (No AF_XDP steering program here, so no
  XSK pins: the soak suite, test_soak_vm.py, counts those.)

The seed, the outcomes (with who served each call: warm, cold, lost), the
kill points and each agent's start time are printed in the summary;
``CNI_NETKIT_AGENT_STORM_SEED`` replays the choices (the timing is the
scheduler's, so a replay is close to, not identical with, the original).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cni_netkit.kernel import Kernel
from cni_netkit.plugin.commands import FAULT_ENABLE_ENV, FAULT_ENV
from cni_netkit.plugin.state import Owner, attachment_key
from tests.reliability.figures import Figures, Suite
from tests.reliability.harness import (
    NETKIT,
    PATH,
    Net,
    Nic,
    add_netns,
    del_netns,
    lease_problems,
    make_nic,
    observe,
)

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
SHIM = REPO / "build" / "shim" / "netkit"
SEED = int(os.environ.get("CNI_NETKIT_AGENT_STORM_SEED")
           or random.SystemRandom().randrange(1 << 32))
POOL = 6
CALLS = 24
PARALLEL = 4
ADD_FAILURES = {100, 11}  # pool exhausted; agent lost during ADD or lock timeout
FALLBACK_NOTE = "node agent not used, running the command in this process"
# The agent's events, in the order the storm meets them (each at a call number the seed picks).
EVENTS = ("fault-kill", "sigkill", "rollout")
DOWN_CALLS = 1  # calls the runtime starts while no agent answers (each runs cold: seconds)
IN_FLIGHT = 2  # calls in flight when the agent is SIGKILLed or told to go


@dataclass
class Pod:
    cid: str
    net: Net
    netns: str
    state: str = "adding"  # adding added checking failed deleting gone
    queues: frozenset[int] = frozenset()
    result: dict[str, Any] | None = None

    @property
    def holding(self) -> bool:
        return self.state in ("added", "checking")


@dataclass
class Call:
    proc: subprocess.Popen[bytes]
    command: str
    pod: Pod
    out: Any
    err: Any
    adoption: bool = False
    fault: str = ""

    def reply(self) -> tuple[int, str, str]:
        self.out.seek(0)
        self.err.seek(0)
        out, err = self.out.read().decode(), self.err.read().decode()
        self.out.close()
        self.err.close()
        return self.proc.returncode, out, err


@dataclass
class AgentRun:
    """One agent process (one incarnation), its log and how it ended."""

    number: int
    proc: subprocess.Popen[bytes]
    log: Path
    version: str
    ready: bool = False
    adopted: bool = False
    ended: str = ""
    expect: int | None = None  # the exit status its end must have (None: not told to end)
    started: float = field(default_factory=time.monotonic)
    start_seconds: float | None = None  # from exec to listening

    def events(self) -> list[dict[str, Any]]:
        lines = self.log.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]


@dataclass
class AgentStorm:
    root: Path
    nic: Nic
    nets: tuple[Net, ...]
    suite: Suite
    rng: random.Random
    socket: Path = field(init=False)
    agents: list[AgentRun] = field(default_factory=list)
    pods: list[Pod] = field(default_factory=list)
    running: list[Call] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    kills: list[str] = field(default_factory=list)
    cold_logs: list[str] = field(default_factory=list)  # the stderr of every cold run
    calls: int = 0
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.socket = self.root / "agent" / "cni.sock"
        self.events_at = sorted(self.rng.sample(range(3, CALLS - 3), len(EVENTS)))
        self.next_event = 0
        self.fault_pending = False  # the next ADD, to an idle agent, carries the fault
        self.fault_armed = False  # an ADD with the fault is in flight
        self.down_calls = 0  # calls started during the current downtime
        self.new_version = self._new_version()

    # --- the agents ------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The node admin's environment: the master declared, the test's directories allowed."""
        places = {k: v for n in self.nets for k, v in n.places.items()}
        places["CNI_NETKIT_MASTERS"] = f"{self.nic.name}=1-{POOL}"
        return places

    def _new_version(self) -> Path:
        """A copy of the package with another version: what the rolled-out agent imports."""
        where = self.root / "v2"
        shutil.copytree(REPO / "cni_netkit", where / "cni_netkit",
                        ignore=shutil.ignore_patterns("__pycache__", "*.c", "*.h"))
        init = where / "cni_netkit" / "__init__.py"
        text = init.read_text()
        assert "__version__ = " in text
        init.write_text(text.replace("__version__ = ", "__version__ = '2.0.0-rollout'  # ", 1))
        seen = subprocess.run(
            [sys.executable, "-c", "import cni_netkit; print(cni_netkit.__version__)"],
            cwd=self.root, env={**os.environ, "PYTHONPATH": str(where)}, capture_output=True,
            text=True, check=True)
        assert seen.stdout.strip() == "2.0.0-rollout", seen
        return where

    def start_agent(self, *, new_version: bool = False) -> AgentRun:
        number = len(self.agents) + 1
        log = self.root / f"agent-{number}.log"
        env = {**os.environ, **self.env(), FAULT_ENABLE_ENV: "1"}
        env.pop(FAULT_ENV, None)
        if new_version:
            env["PYTHONPATH"] = str(self.new_version)
        with log.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cni_netkit.agent.server", "--socket", str(self.socket)],
                cwd=self.root if new_version else REPO, stdout=subprocess.DEVNULL, stderr=err,
                env=env)
        run = AgentRun(number, proc, log, "new" if new_version else "current")
        self.agents.append(run)
        return run

    @property
    def agent(self) -> AgentRun:
        return self.agents[-1]

    def listening(self, run: AgentRun) -> bool:
        """``run`` has bound the socket (it renames its socket into place when ready)."""
        if run.proc.poll() is not None:
            return False
        pid_tmp = self.socket.parent / f".{self.socket.name}.{run.proc.pid}"
        return self.socket.exists() and not pid_tmp.exists() and any(
            e.get("event") == "serving CNI requests" for e in run.events())

    def kill_point(self, what: str) -> None:
        flight = ", ".join(f"{c.command} {c.pod.cid}" for c in self.running) or "nothing"
        self.kills.append(f"{what} at call {self.calls} (t={time.monotonic() - self.started:.1f}s,"
                          f" in flight: {flight})")

    def settled(self) -> bool:
        """The current agent listens, has adopted what survives, and no adoption CHECK runs."""
        run = self.agent
        return (run.ready and run.adopted and run.proc.poll() is None
                and not any(c.adoption for c in self.running))

    def event(self) -> None:
        """The next agent event, once its call number is reached and the agent has settled."""
        if (self.next_event >= len(EVENTS) or self.calls < self.events_at[self.next_event]
                or self.fault_pending or not self.settled()):
            return
        what = EVENTS[self.next_event]
        if what in ("sigkill", "rollout") and len(self.running) != IN_FLIGHT:
            return  # with IN_FLIGHT calls in flight (may_start holds the others back)
        self.next_event += 1
        old = self.agent
        if what == "fault-kill":
            self.fault_pending = True  # the next ADD carries it; its agent dies inside it
            return
        if what == "sigkill":
            time.sleep(self.rng.uniform(0, 0.2))
            old.proc.send_signal(signal.SIGKILL)
            self.kill_point(f"SIGKILL of agent {old.number}")
            old.expect = -signal.SIGKILL
        else:
            # A rollout (maxUnavailable 1, the DaemonSet default): SIGTERM, the old agent
            # finishes what it committed to within its grace, the new version starts.
            old.proc.send_signal(signal.SIGTERM)
            self.kill_point(f"SIGTERM of agent {old.number} (rollout)")
            old.expect = 0
        self.start_agent(new_version=what == "rollout")

    def settle(self) -> None:
        """Agents that ended, ended as they had to; a new one that listens adopts."""
        for run in self.agents:
            if run.ended or run.proc.poll() is None:
                continue
            status = run.proc.returncode
            run.ended = f"exit {status}"
            if run.expect is None:  # it died on its own: only a request's fault point may
                self.expect(run is self.agent and status == -signal.SIGKILL and
                            self.fault_armed, f"agent {run.number} ended with {status}: "
                            f"{run.log.read_text()[-1500:]}")
                self.fault_armed = False
                run.ended += " (fault point)"
                self.start_agent()
            else:
                self.expect(status == run.expect, f"agent {run.number} ended with {status}, "
                            f"not {run.expect}: {run.log.read_text()[-1500:]}")
        run = self.agent
        if not run.ready and self.listening(run):
            run.ready, self.down_calls = True, 0
            run.start_seconds = time.monotonic() - run.started
        if run.ready and not run.adopted and not self.running:
            # Observed with nothing else running: a CHECK of every pod holding an
            # attachment, each served by this agent.
            for pod in [p for p in self.pods if p.state == "added"]:
                self.start("CHECK", pod, adoption=True)
            run.adopted = True

    def may_start(self) -> bool:
        """Whether the runtime starts another call now."""
        done = self.calls >= CALLS and (self.next_event >= len(EVENTS) or self.calls >= 2 * CALLS)
        if (done or len(self.running) >= PARALLEL or any(c.adoption for c in self.running)
                or (self.agent.ready and not self.agent.adopted)):
            return False  # (past CALLS only while an event waits for calls; adoption first)
        if not self.agent.ready:
            # While no agent answers, calls run cold (seconds each in the VM): a few only.
            return self.down_calls < DOWN_CALLS
        if self.fault_pending:
            return not self.running  # the fault ADD goes to an idle agent
        if self.fault_armed:
            return False  # nothing else into the agent the fault point is about to kill
        due = self.next_event < len(EVENTS) and self.calls >= self.events_at[self.next_event]
        return not (due and len(self.running) >= IN_FLIGHT)

    # --- the runtime -------------------------------------------------------------------

    def start(self, command: str, pod: Pod | None = None, *, adoption: bool = False) -> None:
        fault = ""
        if command == "ADD":
            net = self.rng.choice(self.nets)
            pod = Pod(f"ws-{len(self.pods)}-{net.name}", net, add_netns())
            self.pods.append(pod)
            if self.fault_pending and self.settled() and not self.running:
                fault, self.fault_pending, self.fault_armed = "created:kill", False, True
                self.kill_point(f"fault point created:kill in agent {self.agent.number} "
                                f"(ADD {pod.cid})")
        assert pod is not None
        prev = pod.result if command in ("CHECK", "DEL") else None
        env, stdin = pod.net.request(command, pod.cid, pod.netns, prev=prev)
        env.update(self.env())
        env.update({"PATH": PATH, "CNI_NETKIT_AGENT_SOCKET": str(self.socket),
                    "CNI_NETKIT_PLUGIN_EXE": NETKIT})
        if fault:
            env[FAULT_ENV] = fault
        if command != "ADD":
            pod.state = {"CHECK": "checking", "DEL": "deleting"}[command]
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()  # noqa: SIM115
        proc = subprocess.Popen([str(SHIM)], stdin=subprocess.PIPE, stdout=out,
                                stderr=err, env=env)
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        proc.stdin.close()
        self.running.append(Call(proc, command, pod, out, err, adoption, fault))
        if not adoption:
            self.calls += 1
            if not self.agent.ready:
                self.down_calls += 1
        self.suite.cases += 1

    def next_call(self) -> None:
        idle = [p for p in self.pods if p.state in ("added", "failed")]
        if self.fault_pending:
            self.start("ADD")  # the one that carries the fault
            return
        choices: list[tuple[float, str, Pod | None]] = [(4.0, "ADD", None)]
        for p in idle:
            if p.state == "failed":
                choices.append((3.0, "DEL", p))  # owed after a failed ADD
            else:
                choices += [(1.0, "DEL", p), (0.7, "CHECK", p)]
        _, what, pod = self.rng.choices(choices, [w for w, _, _ in choices])[0]
        self.start(what, pod)

    def reap(self, *, block: bool) -> None:
        while True:
            done = [c for c in self.running if c.proc.poll() is not None]
            if done or not block or not self.running:
                break
            time.sleep(0.02)
        for call in done:
            self.running.remove(call)
            self.answered(call, *call.reply())

    def answered(self, call: Call, status: int, out: str, err: str) -> None:
        pod, command = call.pod, call.command
        lost = "node agent lost during" in out
        cold = bool(err.strip()) and not lost  # warm: the agent answered, nothing on stderr
        if err.strip():
            self.cold_logs.append(err)
        served = "lost" if lost else "cold" if cold else "warm"
        self.outcomes[f"{command} {self.code(status, out) or 'ok'} ({served})"
                      + (" (adoption)" if call.adoption else "")
                      + (" (fault)" if call.fault else "")] += 1
        body = self.one_document(call, status, out, cold)
        if call.fault and cold:
            # The agent did not answer its handshake in time (READY_TIMEOUT, a loaded VM):
            # the client ran the ADD itself and the fault point killed that process. Not
            # this suite's case (the crash suite's): the runtime DELs it, a later ADD retries.
            self.kill_point(f"(fault ADD {pod.cid} ran cold, handshake timed out: re-armed)")
            self.fault_pending, self.fault_armed = True, False
            pod.state = "failed"
            return
        if call.adoption:
            self.expect(status == 0 and not cold,
                        f"adoption CHECK of {pod.cid} not served by the new agent: "
                        f"status {status}, {out!r}, stderr {err[-600:]!r}")
        if command == "ADD":
            if status != 0:
                code = body.get("code") if isinstance(body, dict) else None
                self.expect(code in ADD_FAILURES, f"ADD {pod.cid}: {status} {out!r} {err[-600:]!r}")
                if call.fault:
                    self.expect(code == 11, f"fault-killed ADD {pod.cid} answered {out!r}")
                if code != 11:  # the plugin undid it itself; only a lost ADD waits for its DEL
                    self.undone(pod)
                pod.state = "failed"
                return
            self.expect(not call.fault, f"fault-killed ADD {pod.cid} succeeded: {out!r}")
            pod.result = body
            pod.queues = frozenset(q["masterQueue"] for q in body["netkit"]["queues"])
            pod.state = "added"
            for other in self.pods:
                if other is not pod and other.holding:
                    clash = pod.queues & other.queues
                    self.expect(not clash, f"queue(s) {sorted(clash)} leased to {pod.cid} "
                                f"while {other.cid} holds them")
        elif command == "CHECK":
            self.expect(status == 0 and out == "", f"CHECK of live {pod.cid}: {status} {out!r} "
                        f"{err[-600:]!r}")
            pod.state = "added"
        else:
            self.expect(status == 0 and out == "", f"DEL of {pod.cid}: {status} {out!r} "
                        f"{err[-600:]!r}")
            pod.state = "gone"
            del_netns(pod.netns)

    def undone(self, pod: Pod) -> None:
        """Nothing of a failed ADD left before its DEL: no netkit in its netns, no record."""
        with Kernel() as k:
            link = k.link("net1", netns=pod.netns)
        record = (pod.net.state_dir / "attachments"
                  / f"{attachment_key(pod.net.name, pod.cid, 'net1')}.json")
        self.expect(link is None and not record.exists(),
                    f"failed ADD {pod.cid} left {link} / record {record.exists()}")

    def one_document(self, call: Call, status: int, out: str, cold: bool) -> Any:
        """The runtime's view: an exit status and exactly one JSON document (ADD or error)."""
        if status < 0 and call.fault and cold:
            return None  # the fault point killed a cold run: see answered()
        if status < 0:
            self.expect(False, f"{call.command} {call.pod.cid} killed by signal {-status}")
            return None
        if not out.strip():
            self.expect(status == 0 and call.command != "ADD",
                        f"{call.command} {call.pod.cid}: status {status} and no answer")
            return None
        try:
            return json.loads(out)  # one document, nothing before or after it
        except ValueError:
            self.expect(False, f"{call.command} {call.pod.cid}: not one JSON document: {out!r}")
            return None

    @staticmethod
    def code(status: int, out: str) -> int | None:
        if status == 0:
            return None
        try:
            body = json.loads(out)
        except ValueError:
            return status
        return body.get("code", status) if isinstance(body, dict) else status

    def expect(self, ok: bool, text: str) -> None:
        if not ok:
            self.suite.failed(text)

    # --- the storm -------------------------------------------------------------------

    def run(self) -> None:
        first = self.start_agent()
        while not self.listening(first):
            assert first.proc.poll() is None, first.log.read_text()[-2000:]
            time.sleep(0.05)
        first.start_seconds = time.monotonic() - first.started
        first.ready = first.adopted = True  # nothing to adopt yet
        while self.may_start() or self.running or not self.settled():
            self.settle()
            while self.may_start():
                self.event()
                if not self.may_start():
                    break
                self.next_call()
            self.event()
            if self.running:
                self.reap(block=False)
            time.sleep(0.02)

    def executed_once(self) -> None:
        """Each ADD's container id appears in at most one ``leased`` line, across every process."""
        leased: Counter[str] = Counter()
        for run in self.agents:
            for e in run.events():
                if e.get("event") == "leased":
                    leased[e.get("container_id", "?")] += 1
        for text in self.cold_logs:
            for line in text.splitlines():
                if line.startswith("{"):
                    e = json.loads(line)
                    if e.get("event") == "leased":
                        leased[e.get("container_id", "?")] += 1
        twice = {cid: n for cid, n in leased.items() if n > 1}
        self.expect(not twice, f"ADDs executed more than once: {twice}")
        for p in self.pods:
            if p.result is not None:
                self.expect(leased[p.cid] == 1, f"successful ADD {p.cid} leased {leased[p.cid]}x")

    def verify(self, when: str) -> None:
        """The node holds exactly what the live pods imply, read back from the kernel."""
        live = [p for p in self.pods if p.state == "added"]
        found, holders = lease_problems(self.nic, live, when)
        self.expect(all(n == 1 for n in holders.values()),
                    f"{when}: queues held by two live pods: {holders}")
        # One state, device-info and IPAM root for both networks (as on a node).
        state = observe(self.nic, self.nets[0])
        want_records = {f"attachments/{attachment_key(p.net.name, p.cid, 'net1')}.json"
                        for p in live}
        want_devinfo = {f"devinfo/{p.cid}-net1.json" for p in live}
        found += [f"{when}: record left over: {x}" for x in sorted(state.records - want_records)]
        found += [f"{when}: device-info left over: {x}"
                  for x in sorted(state.devinfo - want_devinfo)]
        found += [f"{when}: {x}" for x in sorted(state.locks_held)]
        self.expect(want_records <= state.records,
                    f"{when}: records missing: {sorted(want_records - state.records)}")
        aliases = {Owner(p.net.name, p.cid, "net1").alias for p in live}
        found += [f"{when}: netkit left over: {x}" for x in sorted(state.netkits)
                  if not any(f"alias={a!r}" in x for a in aliases)]
        for net in self.nets:
            if net.ipam:
                ips = {f"ip {p.result['ips'][0]['address'].split('/')[0]}" for p in live
                       if p.net is net and p.result}
                got = observe(None, net).ipam
                found += [f"{when}: {net.name} host-local address left over: {x}"
                          for x in sorted(got - ips)]
                self.expect(ips <= got, f"{when}: addresses missing: {sorted(ips - got)}")
        self.suite.leaks += len(found)
        for text in found:
            self.suite.note(text)


def test_agent_storm(tmp_path: Path, figures: Figures) -> None:
    if not SHIM.is_file():
        pytest.fail(f"no thin client at {SHIM}: scripts/bootstrap builds it (scripts/build-shim)")
    if not os.environ.get("CNI_NETKIT_CNI_PLUGINS"):
        pytest.fail("host-local missing: scripts/vm setup extracts containernetworking-plugins")
    suite = figures.suite("agent-storm")
    suite.info.update(seed=SEED, pool=POOL, parallel=PARALLEL)
    nic = make_nic(POOL + 2)
    nets = (Net(tmp_path, nic.name, f"1-{POOL}", name="single", lock_timeout=10.0),
            Net(tmp_path, nic.name, f"1-{POOL}", name="pair", pairing="pair", mode="l3",
                ipam=True, lock_timeout=10.0))
    storm = AgentStorm(tmp_path, nic, nets, suite,
                       random.Random(SEED))  # noqa: S311 - a replayable test schedule
    started = time.monotonic()
    try:
        storm.run()
        for p in [p for p in storm.pods if p.state == "failed"]:
            storm.start("DEL", p)  # what the runtime owes every failed ADD
        while storm.running:
            storm.reap(block=True)
        storm.verify("after the storm")
        storm.executed_once()
        live = [p for p in storm.pods if p.state == "added"]
        # The runtime forgets one live pod: only its GC (through the agent) can clean it.
        forgotten = next((p for p in live if p.state == "added"), None)
        if forgotten is not None:
            live.remove(forgotten)
            valid = [(p.cid, "net1") for p in live if p.net is forgotten.net]
            env, stdin = forgotten.net.request("GC", valid=valid)
            env.update({**storm.env(), "PATH": PATH,
                        "CNI_NETKIT_AGENT_SOCKET": str(storm.socket),
                        "CNI_NETKIT_PLUGIN_EXE": NETKIT})
            gc = subprocess.run([str(SHIM)], input=stdin, env=env, capture_output=True,
                                check=False, timeout=600)
            storm.expect((gc.returncode, gc.stdout, gc.stderr) == (0, b"", b""),
                         f"GC through the agent: {gc}")
            storm.outcomes["GC ok"] += 1
            forgotten.state = "gone"
        for p in live:  # the runtime tears the rest down, through the last agent
            storm.start("DEL", p)
        while storm.running:
            storm.reap(block=True)
        storm.verify("after the final DELs and GC")
        state = observe(nic, None)
        storm.expect(not state.leases, f"leases left: {sorted(state.leases)}")
    finally:
        for call in storm.running:
            call.proc.kill()
            call.proc.wait()
        for run in storm.agents:
            if run.proc.poll() is None:
                run.proc.send_signal(signal.SIGTERM)
                run.proc.wait(120)
                run.ended = run.ended or f"SIGTERM at the end, exit {run.proc.returncode}"
        for p in storm.pods:
            del_netns(p.netns)
        nic.remove()
        suite.seconds += time.monotonic() - started
    suite.info.update(calls=storm.calls, agents=len(storm.agents),
                      outcomes=dict(sorted(storm.outcomes.items())), kill_points=storm.kills,
                      agent_ends=[f"{r.number} ({r.version}): {r.ended}" for r in storm.agents],
                      agent_start_s=[round(r.start_seconds or -1, 1) for r in storm.agents],
                      cold_runs=len(storm.cold_logs))
    assert suite.failures == 0 and suite.leaks == 0, (
        f"seed {SEED}: {suite.failures} failure(s), {suite.leaks} leak(s): {suite.notes}")
    assert storm.next_event == len(EVENTS), f"only {storm.next_event} agent events happened"
    assert storm.calls >= CALLS
