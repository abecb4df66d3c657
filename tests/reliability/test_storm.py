"""Concurrency storm: interleaved ADD, DEL, CHECK and GC on a pool of 8 never double-lease a queue.

A seeded random runtime drives pods through their lives on one master whose
pool has 8 queues, with up to ``PARALLEL`` plugin processes at once and a
random delay before each: ADD (in a fresh pod netns), CHECK, DEL (also after
every failed ADD, as runtimes do), GC with the runtime's valid list, and now
and then a pod the runtime forgets without a DEL, which only GC can clean.
As the CNI spec promises, operations on one pod never overlap, and a GC
never overlaps an ADD or a DEL (CHECKs run alongside it). Each call is
a process forked from the warm test process calling ``entry.run`` (real
processes, real flock, real kernel); a few are the real ``netkit``
executable.

Proved, for every call and after every phase:

- an ADD succeeds or fails with a documented code (100 pool exhausted, 11
  lock timeout); DEL, CHECK and GC of a live pod always succeed;
- no master queue is ever held by two live attachments (each ADD's reply is
  checked against every attachment known to be holding its queues);
- once the phase's calls have ended and one GC has run, the node holds
  exactly what the successful, undeleted ADDs imply: one netkit per live pod
  holding the queues its ADD reported (queue-get on the master agrees), a
  record and a device-info file per live pod, nothing else, no lock held.

The seed is printed in the summary; ``CNI_NETKIT_STORM_SEED`` replays its
choices (the order in which processes end is the kernel scheduler's, so a
replay is close to, not identical with, the original run).
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cni_netkit.plugin.state import Owner, attachment_key
from tests.reliability.figures import Figures, Suite
from tests.reliability.harness import (
    Child,
    Net,
    Nic,
    Reply,
    add_netns,
    del_netns,
    lease_problems,
    make_nic,
    observe,
    spawn,
)

pytestmark = pytest.mark.kernel

SEED = int(os.environ.get("CNI_NETKIT_STORM_SEED") or random.SystemRandom().randrange(1 << 32))
POOL = 8
PHASES = 4
CALLS_PER_PHASE = 17  # 68 calls in all
PARALLEL = 4
EXE_CALLS = 3
MAX_DELAY = 0.05
ADD_FAILURES = {100, 11}  # pool exhausted, lock timeout


@dataclass
class Pod:
    cid: str
    netns: str
    state: str = "new"  # new adding added checking failed deleting abandoned gone
    queues: frozenset[int] = frozenset()
    result: dict[str, Any] | None = None
    abandoned_at: int = 0  # GCs started before the runtime forgot it

    @property
    def holding(self) -> bool:
        """Certainly holds its queues now (no DEL or GC can have taken them)."""
        return self.state in ("added", "checking")


class Storm:
    def __init__(self, net: Net, nic: Nic, suite: Suite, rng: random.Random) -> None:
        self.net, self.nic, self.suite, self.rng = net, nic, suite, rng
        self.pods: list[Pod] = []
        self.running: dict[int, tuple[Child, str, Pod | None, int]] = {}
        self.gcs_started = 0
        self.gc_wanted = False
        self.gc_running = False
        self.outcomes: Counter[str] = Counter()
        self.calls = 0
        total = PHASES * CALLS_PER_PHASE
        self.exe_at = set(rng.sample(range(total), EXE_CALLS))

    # --- the runtime's choices -----------------------------------------------------

    def next_call(self) -> bool:
        """Start one call (or forget a pod); False when the runtime must wait for one to end.

        As the spec promises, GC never overlaps an ADD or a DEL: once the
        runtime wants a GC it starts no ADD or DEL until the GC has ended,
        and starts the GC once those running have ended; CHECKs go on.
        """
        idle = [p for p in self.pods if p.state in ("added", "failed")]
        if self.gc_wanted or self.gc_running:
            if self.gc_wanted and not self.adds_or_dels_running():
                self.gc_wanted = False
                self.start("GC", None)
                return True
            checks = [p for p in idle if p.state == "added"]
            if not checks or self.rng.random() < 0.6:  # mostly just wait for the GC
                return False
            self.start("CHECK", self.rng.choice(checks))
            return True
        choices: list[tuple[float, str, Pod | None]] = [(4.0, "ADD", None), (0.8, "GC", None)]
        for p in idle:
            if p.state == "failed":
                choices.append((3.0, "DEL", p))  # owed after a failed ADD
            else:
                choices += [(1.0, "DEL", p), (1.0, "CHECK", p), (0.15, "forget", p)]
        weights = [w for w, _, _ in choices]
        _, what, pod = self.rng.choices(choices, weights)[0]
        if what == "forget":
            assert pod is not None
            pod.state, pod.abandoned_at = "abandoned", self.gcs_started
        elif what == "GC":
            self.gc_wanted = True
        else:
            self.start(what, pod)
        return True

    def adds_or_dels_running(self) -> bool:
        return any(command in ("ADD", "DEL") for _, command, _, _ in self.running.values())

    def start(self, command: str, pod: Pod | None) -> None:
        if command == "ADD":
            pod = Pod(f"storm-{len(self.pods)}", add_netns())
            self.pods.append(pod)
        if command == "GC":
            env, stdin = self.net.request("GC", valid=self.valid())
            self.gcs_started += 1
            self.gc_running = True
        else:
            assert pod is not None
            prev = pod.result if command in ("CHECK", "DEL") else None
            env, stdin = self.net.request(command, pod.cid, pod.netns, prev=prev)
            pod.state = {"ADD": "adding", "CHECK": "checking", "DEL": "deleting"}[command]
        via = "exe" if self.calls in self.exe_at else "fork"
        child = spawn(env, stdin, via=via, delay=self.rng.uniform(0, MAX_DELAY),
                      label=f"{command} {pod.cid if pod else ''} ({via})")
        self.running[child.pid] = (child, command, pod, self.gcs_started)
        self.calls += 1
        self.suite.cases += 1

    def valid(self) -> list[tuple[str, str]]:
        """The runtime's valid list: every pod it still knows, whatever it is doing with it."""
        return [(p.cid, "net1") for p in self.pods if p.state not in ("abandoned", "gone", "new")]

    # --- what came back --------------------------------------------------------------

    def wait_one(self) -> None:
        pid, wait_status = os.waitpid(-1, 0)  # whichever plugin ends first
        if pid not in self.running:
            return
        child, command, pod, gc_number = self.running.pop(pid)
        reply = child.reap(wait_status)
        self.outcomes[f"{command} {reply.code or 'ok'}" + (" (exe)" if "exe" in child.label
                                                             else "")] += 1
        if command == "GC":
            self.gc_running = False
            self.expect(reply.status == 0, f"GC failed: {reply}")
            for p in self.pods:
                if p.state == "abandoned" and p.abandoned_at < gc_number:
                    p.state = "gone"  # this GC started after the runtime forgot it
            return
        assert pod is not None
        if command == "ADD":
            self.added(pod, reply)
        elif command == "CHECK":
            self.expect(reply.status == 0, f"CHECK of live {pod.cid} failed: {reply}")
            pod.state = "added"
        else:
            self.expect(reply.status == 0, f"DEL of {pod.cid} failed: {reply}")
            pod.state = "gone"
            del_netns(pod.netns)

    def added(self, pod: Pod, reply: Reply) -> None:
        if reply.status != 0:
            self.expect(reply.code in ADD_FAILURES,
                        f"ADD {pod.cid} failed with an undocumented code: {reply}")
            pod.state = "failed"
            return
        pod.result = reply.json
        pod.queues = frozenset(q["masterQueue"] for q in pod.result["netkit"]["queues"])
        pod.state = "added"
        for other in self.pods:
            if other is not pod and (other.holding or self.surely_abandoned(other)):
                clash = pod.queues & other.queues
                self.expect(not clash, f"queue(s) {sorted(clash)} leased to {pod.cid} "
                            f"while {other.cid} holds them")

    def surely_abandoned(self, pod: Pod) -> bool:
        """Forgotten by the runtime, and no GC started since: its queues are still held."""
        return pod.state == "abandoned" and pod.abandoned_at == self.gcs_started

    def expect(self, ok: bool, text: str) -> None:
        if not ok:
            self.suite.failed(text)

    # --- phases ------------------------------------------------------------------------

    def phase(self, number: int) -> None:
        started = 0
        while started < CALLS_PER_PHASE or self.running:
            while started < CALLS_PER_PHASE and len(self.running) < PARALLEL:
                before = self.calls
                if not self.next_call():
                    break
                started += self.calls - before
            if self.running:
                self.wait_one()
        self.gc_wanted = False  # the phase's own GC below serves it
        # The runtime's periodic GC, alone: everything it forgot goes.
        r = self.net.call("GC", valid=self.valid())
        self.expect(r.status == 0, f"phase {number} GC failed: {r}")
        for p in self.pods:
            if p.state == "abandoned":
                p.state = "gone"
        self.verify(f"after phase {number}")

    def verify(self, when: str) -> None:
        """The node holds exactly what the live pods imply, read back from the kernel."""
        live = [p for p in self.pods if p.state == "added"]
        found, holders = lease_problems(self.nic, live, when)
        self.expect(all(n == 1 for n in holders.values()),
                    f"{when}: queues held by two live pods: {holders}")
        state = observe(self.nic, self.net)
        want_netkits = {f"netkit net1@{Path(p.netns).name} "
                        f"alias={Owner(self.net.name, p.cid, 'net1').alias!r}" for p in live}
        want_records = {f"attachments/{attachment_key(self.net.name, p.cid, 'net1')}.json"
                        for p in live}
        want_devinfo = {f"devinfo/{p.cid}-net1.json" for p in live}
        for kind, got, want in (("netkit", state.netkits, want_netkits),
                                ("record", state.records, want_records),
                                ("device-info", state.devinfo, want_devinfo)):
            found += [f"{when}: {kind} left over: {x}" for x in sorted(got - want)]
            self.expect(want <= got, f"{when}: {kind} missing: {sorted(want - got)}")
        found += [f"{when}: {x}" for x in sorted(state.locks_held)]
        self.suite.leaks += len(found)
        for text in found:
            self.suite.note(text)


def test_storm(tmp_path: Path, figures: Figures) -> None:
    suite = figures.suite("storm")
    suite.info.update(seed=SEED, pool=POOL, parallel=PARALLEL)
    nic = make_nic(POOL + 2)
    net = Net(tmp_path, nic.name, f"1-{POOL}", lock_timeout=2.0)
    storm = Storm(net, nic, suite, random.Random(SEED))  # noqa: S311 - a replayable test schedule
    started = time.monotonic()
    try:
        for number in range(1, PHASES + 1):
            storm.phase(number)
        # The runtime tears everything down; the pool is then whole again.
        for p in storm.pods:
            if p.state in ("added", "failed"):
                r = net.call("DEL", p.cid, p.netns, prev=p.result)
                storm.expect(r.status == 0, f"final DEL of {p.cid}: {r}")
                p.state = "gone"
        storm.verify("after the final DELs")
        pods = [add_netns() for _ in range(POOL + 1)]
        storm.pods += [Pod(f"refill-{i}", ns) for i, ns in enumerate(pods)]
        replies = [net.call("ADD", f"refill-{i}", ns) for i, ns in enumerate(pods)]
        storm.expect([r.status for r in replies[:POOL]] == [0] * POOL and
                     replies[POOL].code == 100,
                     f"pool not whole after the storm: {[str(r) for r in replies]}")
        for i, ns in enumerate(pods):
            net.call("DEL", f"refill-{i}", ns)
    finally:
        for child, *_ in storm.running.values():
            os.kill(child.pid, 9)
            os.waitpid(child.pid, 0)
        for p in storm.pods:
            del_netns(p.netns)
        nic.remove()
        suite.seconds += time.monotonic() - started
    suite.info.update(calls=storm.calls, outcomes=dict(sorted(storm.outcomes.items())))
    assert suite.failures == 0 and suite.leaks == 0, (
        f"seed {SEED}: {suite.failures} failure(s), {suite.leaks} leak(s): {suite.notes}")
    assert storm.calls >= 64
