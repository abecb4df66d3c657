"""Crash at every step: a plugin SIGKILLed anywhere leaves nothing the runtime's follow-up misses.

For every fault point of ADD (``locked``, inside the kernel layer's create
``create:made``/``create:named``/``create:peer-named``, ``created``,
``leased:1``, ``leased:2``, ``ipam``, ``result``) the plugin process is SIGKILLed right
there, twice, then the runtime does what it does after a failed ADD: a DEL
with the same arguments for one, a GC whose valid list excludes it for the
other. The same for DEL and GC killed midway, followed by a repeated DEL
or GC. After the follow-up the node must hold exactly what it held before
the killed attempt (a bystander attachment, "keeper", stays intact): no
lease on the master, no netkit in the pod or host netns, no lock still held,
no state record, device-info file or IPAM address left over. Then the whole
pool must be reusable: as many ADDs as it has room for beside the keeper
succeed, one more fails with code 100, and once all are deleted the node
holds nothing of ours.

Kills go through the real ``netkit`` executable for the DEL-followed victim
in pair mode with IPAM (every ADD step, the costliest path), and for one DEL
and one GC step; the others kill a process forked from the warm test process
(same code, same fault hook, a real SIGKILL), since a cold executable costs
seconds in the TCG VM.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.figures import Case, Figures
from tests.reliability.harness import (
    Net,
    Nic,
    NodeState,
    Reply,
    add_netns,
    del_netns,
    differences,
    kill_status,
    make_nic,
    observe,
    spawn,
)

pytestmark = pytest.mark.kernel

QUEUES = 10
POOL = "1-8"  # 0 and 9 stay outside the pool: a stray lease there shows too
PER_ATTACHMENT = 2
ROOM = 4  # attachments the pool holds: the keeper and up to three victims
KEEPER = ("keeper", "net1")

ADD_STEPS = ["locked", "created", "leased:1", "leased:2", "ipam", "result"]
# Inside the kernel layer's create: the device exists before it has its owner alias.
CREATE_STEPS = {"pair+ipam": ["create:made", "create:named", "create:peer-named"],
                "single": ["create:made", "create:named"]}
# (mode, step, how the plugin is run for the victim the DEL follows up)
ADD_CASES = [
    *(("pair+ipam", s, "exe") for s in ADD_STEPS),
    *(("single", s, "fork") for s in ADD_STEPS if s != "ipam"),
    *((mode, s, "fork") for mode, steps in CREATE_STEPS.items() for s in steps),
]
DEL_CASES = [
    ("pair+ipam", "del:pod", "exe"),
    ("pair+ipam", "del:host", "fork"),
    ("pair+ipam", "del:ipam", "fork"),
    ("pair+ipam", "del:torn-down", "fork"),
    ("single", "del:pod", "fork"),
    ("single", "del:torn-down", "fork"),
]
# GC meets two stale records (victim-0, victim-1) and one orphan netkit (victim-2, record lost)
GC_CASES = [
    ("pair+ipam", "gc:devices:1", "exe"),
    ("pair+ipam", "gc:record:1", "fork"),
    ("pair+ipam", "gc:devices:2", "fork"),
    ("pair+ipam", "gc:orphan:1", "fork"),
    ("single", "gc:devices:1", "fork"),
    ("single", "gc:orphan:1", "fork"),
]
PODS = ["keeper", "victim-0", "victim-1", "victim-2", "spare"]


@dataclass
class Node:
    """One NIC, one network on it, netns to put pods in, and the keeper attachment."""

    nic: Nic
    net: Net
    netns: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)

    def pod(self) -> str:
        path = add_netns()
        self.netns.append(path)
        return path

    def add(self, container_id: str, netns: str) -> Reply:
        r = self.net.call("ADD", container_id, netns)
        if r.status == 0:
            self.results[container_id] = r.json
        return r

    def observe(self) -> NodeState:
        return observe(self.nic, self.net)


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Any]:
    made: list[Node] = []

    def make(mode: str) -> Node:
        nic = make_nic(QUEUES)
        net = Net(tmp_path, nic.name, POOL, per_attachment=PER_ATTACHMENT,
                  pairing="pair" if mode == "pair+ipam" else "single",
                  mode="l3" if mode == "pair+ipam" else "l2", ipam=mode == "pair+ipam")
        node = Node(nic, net)
        made.append(node)
        return node

    yield make
    for node in made:
        node.nic.remove()
        for ns in node.netns:
            del_netns(ns)


def _start(node: Node) -> tuple[NodeState, NodeState, dict[str, str]]:
    """Make pod netns for every attachment the case will need, then the keeper.

    Returns the empty node, the node with the keeper (the baseline every
    follow-up must return to) and the netns of each container.
    """
    pods = {name: node.pod() for name in PODS}
    empty = node.observe()
    r = node.add("keeper", pods["keeper"])
    assert r.status == 0, f"keeper ADD: {r}"
    return empty, node.observe(), pods


def _settle(case: Case, node: Node, baseline: NodeState, pods: dict[str, str],
            empty: NodeState) -> None:
    """The node equals ``baseline``, the keeper still checks out, and the pool is whole."""
    after = node.observe()
    leaked, lost = differences(baseline, after)
    assert not lost, f"the follow-up damaged what it must not touch: {lost}"
    case.leaked(leaked)
    keeper = node.net.call("CHECK", "keeper", pods["keeper"], prev=node.results["keeper"])
    assert keeper.status == 0, f"keeper CHECK: {keeper}"

    # The rest of the pool is free again: as many ADDs as it has room for beside the
    # keeper succeed, one more fails with 100. (The victims' netns are empty again.)
    refill = PODS[1:]
    for i, name in enumerate(refill):
        r = node.add(f"reuse-{i}", pods[name])
        if i < ROOM - 1:
            assert r.status == 0, f"pool not reusable: ADD {i + 1} of {ROOM - 1}: {r}"
        else:
            assert r.code == 100, f"ADD beyond the pool must be code 100: {r}"
    for i, name in enumerate(refill):
        assert node.net.call("DEL", f"reuse-{i}", pods[name]).status == 0
    assert node.net.call("DEL", "keeper", pods["keeper"]).status == 0
    leaked, lost = differences(empty, node.observe())
    case.leaked(leaked)
    assert not lost, lost


def _killed(reply: Reply, step: str) -> None:
    assert reply.status == kill_status(), f"expected SIGKILL at {step}: {reply}"
    assert reply.stdout == "", f"a killed plugin printed a reply: {reply.stdout!r}"


@pytest.mark.parametrize(("mode", "step", "via"), ADD_CASES,
                         ids=[f"{m}-{s}-{v}" for m, s, v in ADD_CASES])
def test_add_killed_then_del_or_gc(mode: str, step: str, via: str, make_node: Any,
                                   figures: Figures) -> None:
    """Two ADDs killed at ``step``: victim-0 is followed by its DEL, victim-1 by a GC.

    The GC's valid list holds the keeper and victim-0 (whose DEL is still to
    come, so GC must leave its leftovers alone) but not victim-1.
    """
    node = make_node(mode)
    with figures.suite("crash").case(f"ADD killed at {step} ({mode}) + DEL, + GC") as c:
        empty, baseline, pods = _start(node)
        for victim, how in (("victim-0", via), ("victim-1", "fork")):
            env, stdin = node.net.request("ADD", victim, pods[victim])
            _killed(spawn(env, stdin, via=how, fault=f"{step}:kill").wait(), step)
        r = node.net.call("GC", valid=[KEEPER, ("victim-0", "net1")])
        assert r.status == 0, f"GC after the kill: {r}"
        r = node.net.call("DEL", "victim-0", pods["victim-0"])
        assert r.status == 0, f"DEL after the kill: {r}"
        _settle(c, node, baseline, pods, empty)


@pytest.mark.parametrize(("mode", "step", "via"), DEL_CASES,
                         ids=[f"{m}-{s}-{v}" for m, s, v in DEL_CASES])
def test_del_killed_then_repeated(mode: str, step: str, via: str, make_node: Any,
                                  figures: Figures) -> None:
    node = make_node(mode)
    with figures.suite("crash").case(f"DEL killed at {step} ({mode}, {via}) + DEL") as c:
        empty, baseline, pods = _start(node)
        assert node.add("victim-0", pods["victim-0"]).status == 0
        env, stdin = node.net.request("DEL", "victim-0", pods["victim-0"],
                                      prev=node.results["victim-0"])
        _killed(spawn(env, stdin, via=via, fault=f"{step}:kill").wait(), step)
        r = node.net.call("DEL", "victim-0", pods["victim-0"], prev=node.results["victim-0"])
        assert r.status == 0, f"repeated DEL: {r}"
        _settle(c, node, baseline, pods, empty)


@pytest.mark.parametrize(("mode", "step", "via"), GC_CASES,
                         ids=[f"{m}-{s}-{v}" for m, s, v in GC_CASES])
def test_gc_killed_then_repeated(mode: str, step: str, via: str, make_node: Any,
                                 figures: Figures) -> None:
    node = make_node(mode)
    with figures.suite("crash").case(f"GC killed at {step} ({mode}, {via}) + GC") as c:
        empty, baseline, pods = _start(node)
        for i in range(3):
            assert node.add(f"victim-{i}", pods[f"victim-{i}"]).status == 0
        # victim-2's record is lost: only its owner alias on the device says whose it is.
        (record,) = (node.net.state_dir / "attachments").glob(f"{node.net.name}:victim-2:*")
        record.unlink()
        env, stdin = node.net.request("GC", valid=[KEEPER])
        _killed(spawn(env, stdin, via=via, fault=f"{step}:kill").wait(), step)
        r = node.net.call("GC", valid=[KEEPER])
        assert r.status == 0, f"repeated GC: {r}"
        # GC cannot know victim-2's device-info path (it was in the lost record).
        (node.net.devinfo_dir / "victim-2-net1.json").unlink(missing_ok=True)
        _settle(c, node, baseline, pods, empty)
