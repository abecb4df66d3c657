"""Kernel and host events: the node changes under live attachments; answers stay clear.

Each test makes attachments, then has the host do something to them that
no CNI call asked for: the NIC (netdevsim) disappears, the master flaps, a
pod netns is deleted before its DEL, a foreign control plane leases a pool
queue to its own netkit, the admin shrinks the pool. Each time CHECK and
STATUS must say what happened (codes and messages asserted), DEL must
succeed, GC must converge (a second GC changes nothing) and the node must
end holding nothing of ours, with what is foreign left exactly as it was.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from cni_netkit.kernel import Kernel, NetkitSpec
from tests.reliability.figures import Case, Figures
from tests.reliability.harness import (
    Net,
    Nic,
    NodeState,
    Reply,
    differences,
    make_nic,
    observe,
    wait_for,
)

pytestmark = pytest.mark.kernel


@pytest.fixture
def nic() -> Iterator[Nic]:
    n = make_nic(10)
    yield n
    n.remove()


def _net(tmp_path: Path, nic: Nic, **kw: Any) -> Net:
    kw.setdefault("per_attachment", 2)
    return Net(tmp_path, nic.name, "1-8", **kw)


def _answer(reply: Reply, code: int, *words: str) -> None:
    """``reply`` is error ``code`` and its msg/details say ``words`` (case-insensitive)."""
    body = reply.json or {}
    text = f"{body.get('msg', '')} {body.get('details', '')}".lower()
    assert reply.code == code and all(w.lower() in text for w in words), (
        f"expected code {code} saying {words}, got {reply}")


def _ok(reply: Reply, what: str) -> None:
    assert reply.status == 0, f"{what}: {reply}"


def _gc_converges(case: Case, net: Net, nic: Nic | None, clean: NodeState,
                  valid: list[tuple[str, str]] | None = None) -> None:
    """GC succeeds, a second GC changes nothing, and the node is back to ``clean``."""
    _ok(net.call("GC", valid=valid or []), "GC")
    first = observe(nic, net)
    _ok(net.call("GC", valid=valid or []), "second GC")
    second = observe(nic, net)
    assert first == second, f"the second GC changed the node: {differences(first, second)}"
    leaked, lost = differences(clean, second)
    assert not lost, f"something foreign was touched: {lost}"
    case.leaked(leaked)


def test_nic_removed_while_leased(tmp_path: Path, nic: Nic, make_netns: Any,
                                  figures: Figures) -> None:
    """The kernel deletes the netkits leasing from a vanished NIC; we report it, then clean."""
    net = _net(tmp_path, nic)
    pods = [make_netns() for _ in range(3)]
    clean = observe(None, net)
    with figures.suite("kernel events").case("NIC removed while leased") as c:
        results = [net.call("ADD", f"c{i}", pods[i]) for i in range(2)]
        for r in results:
            _ok(r, "ADD")
        nic.remove()
        wait_for(lambda: not observe(None, net).netkits, "the kernel to delete the netkits")
        _answer(net.call("CHECK", "c0", pods[0], prev=results[0].json), 102, "net1", "not found")
        _answer(net.call("STATUS"), 51, f"master {nic.name} not found",
                "2 existing attachment(s) lost their queues")
        _answer(net.call("ADD", "c2", pods[2]), 104, f"master {nic.name} not found")
        for i in range(2):
            _ok(net.call("DEL", f"c{i}", pods[i], prev=results[i].json), "DEL")
        _answer(net.call("STATUS"), 50, f"master {nic.name} not found")
        _gc_converges(c, net, None, clean)


def test_master_flaps(tmp_path: Path, nic: Nic, make_netns: Any, figures: Figures) -> None:
    """While the master is down: clear answers, no ADD; once up: the leases are all there."""
    net = _net(tmp_path, nic)
    pods = [make_netns() for _ in range(2)]
    clean = observe(nic, net)
    with figures.suite("kernel events").case("master link flaps") as c:
        a = net.call("ADD", "a", pods[0])
        _ok(a, "ADD")
        leased = observe(nic, net).leases
        subprocess.run(["ip", "link", "set", nic.name, "down"], check=True)
        _answer(net.call("CHECK", "a", pods[0], prev=a.json), 102, "master down")
        _answer(net.call("STATUS"), 51, f"master {nic.name} is down",
                "1 existing attachment(s) get no traffic")
        _answer(net.call("ADD", "b", pods[1]), 11, f"master {nic.name} is down")
        subprocess.run(["ip", "link", "set", nic.name, "up"], check=True)
        assert observe(nic, net).leases == leased, "a lease did not survive the flap"
        _ok(net.call("CHECK", "a", pods[0], prev=a.json), "CHECK after the flap")
        _ok(net.call("STATUS"), "STATUS after the flap")
        b = net.call("ADD", "b", pods[1])
        _ok(b, "ADD after the flap")
        for cid, pod, r in (("a", pods[0], a), ("b", pods[1], b)):
            _ok(net.call("DEL", cid, pod, prev=r.json), "DEL")
        _gc_converges(c, net, nic, clean)


@pytest.mark.parametrize("follow_up", ["DEL", "GC"])
@pytest.mark.parametrize("mode", ["single", "pair+ipam"])
def test_pod_netns_deleted_before_del(mode: str, follow_up: str, *, tmp_path: Path, nic: Nic,
                                      make_netns: Any, figures: Figures) -> None:
    """The netns goes first (a crashed runtime): its lease ends with it; DEL or GC finish up,
    without recreating the netns path and without touching another pod."""
    pair = mode == "pair+ipam"
    net = _net(tmp_path, nic, pairing="pair" if pair else "single",
               mode="l3" if pair else "l2", ipam=pair)
    keeper_ns, pod = make_netns(), make_netns()
    clean = observe(nic, net)
    with figures.suite("kernel events").case(f"pod netns deleted ({mode}) + {follow_up}") as c:
        a = net.call("ADD", "a", pod)
        _ok(a, "ADD")
        subprocess.run(["ip", "netns", "del", Path(pod).name], check=True)
        # The kernel dismantles a netns in a workqueue: poll for the lease to end.
        wait_for(lambda: not observe(nic, net).leases, "the lease to end with the netns")
        _answer(net.call("CHECK", "a", pod, prev=a.json), 8, pod, "not usable")
        _ok(net.call("STATUS"), "STATUS")
        keeper = net.call("ADD", "keeper", keeper_ns)
        _ok(keeper, "ADD of another pod")
        if follow_up == "DEL":
            _ok(net.call("DEL", "a", pod, prev=a.json), "DEL")
            _ok(net.call("DEL", "a", pod, prev=a.json), "repeated DEL")
        else:
            _ok(net.call("GC", valid=[("keeper", "net1")]), "GC")
        _ok(net.call("CHECK", "keeper", keeper_ns, prev=keeper.json), "the other pod's CHECK")
        _ok(net.call("DEL", "keeper", keeper_ns), "DEL of the other pod")
        assert not Path(pod).exists(), "the deleted netns path was made again"
        _gc_converges(c, net, nic, replace(clean, netns=clean.netns - {Path(pod).name}))


def test_foreign_netkit_and_lease_are_never_touched(tmp_path: Path, nic: Nic, make_netns: Any,
                                                    figures: Figures) -> None:
    """A lease of a pool queue we did not make: never handed out, never released, never deleted.

    Made directly with the kernel layer, as another control plane would: a
    netkit in its own netns leasing pool queue 1, one in the host netns with
    no alias, and one carrying the owner alias of another network.
    """
    net = _net(tmp_path, nic)
    foreign_ns = make_netns()
    pods = [make_netns() for _ in range(4)]
    with Kernel() as k:
        nk = k.create_netkit(NetkitSpec(name="foreign0", netns=foreign_ns, num_rx_queues=2))
        host_nsid = k.ensure_netns_id(None, netns=foreign_ns)
        k.queue_create(nk.index, lessor_ifindex=nic.ifindex, lessor_queue=1, netns=foreign_ns,
                       lessor_netns_id=host_nsid)
        k.create_netkit(NetkitSpec(name="foreign1"))
        k.create_netkit(NetkitSpec(name="foreign2", alias="cni-netkit other a net1"))
    try:
        foreign = observe(nic, net)
        assert len(foreign.leases) == 1 and len(foreign.netkits) == 3, foreign
        with figures.suite("kernel events").case("foreign netkit and lease on a pool queue") as c:
            results = [net.call("ADD", f"c{i}", pods[i]) for i in range(4)]
            for r in results[:3]:
                _ok(r, "ADD")
            handed = sorted(q["masterQueue"] for r in results[:3]
                            for q in r.json["netkit"]["queues"])
            assert 1 not in handed, f"the foreign lease's queue was handed out: {handed}"
            # 1 foreign + 6 ours of 8: one queue free, two needed.
            _answer(results[3], 100, "exhausted", "1 free")
            _ok(net.call("STATUS"), "STATUS with the pool exhausted (capacity, not readiness)")
            _ok(net.call("CHECK", "c0", pods[0], prev=results[0].json), "CHECK")
            for i in range(4):
                _ok(net.call("DEL", f"c{i}", pods[i]), "DEL")
            _gc_converges(c, net, nic, foreign)
            _ok(net.call("STATUS"), "STATUS once ours are gone")
    finally:
        with Kernel() as k:
            for name in ("foreign1", "foreign2"):
                link = k.link(name)
                if link is not None:
                    k.delete_link(link.index)


def test_pool_shrunk_while_leased(tmp_path: Path, nic: Nic, make_netns: Any,
                                  figures: Figures) -> None:
    """Shrinking ``queues`` revokes nothing: leases outside the new pool live until their DEL,
    and nothing new is leased outside it."""
    net = _net(tmp_path, nic)
    pods = [make_netns() for _ in range(4)]
    clean = observe(nic, net)
    with figures.suite("kernel events").case("pool config shrunk while leased") as c:
        results = {f"c{i}": net.call("ADD", f"c{i}", pods[i]) for i in range(3)}
        for r in results.values():
            _ok(r, "ADD")
        assert [q["masterQueue"] for q in results["c2"].json["netkit"]["queues"]] == [5, 6]
        net.queues = "1-4"  # both of its queues held by c0 and c1
        for i in range(3):  # c2's queues are outside the pool now: still a sound attachment
            _ok(net.call("CHECK", f"c{i}", pods[i], prev=results[f"c{i}"].json), "CHECK")
        _ok(net.call("STATUS"), "STATUS with the shrunk pool exhausted")
        _answer(net.call("ADD", "c3", pods[3]), 100, "exhausted", "pool 1-4")
        _ok(net.call("DEL", "c2", pods[2]), "DEL of the attachment outside the pool")
        # Queues 5 and 6 are free again but not in the pool: still nothing to lease.
        _answer(net.call("ADD", "c3", pods[3]), 100, "exhausted")
        _ok(net.call("DEL", "c3", pods[3]), "DEL after the failed ADD")
        _ok(net.call("DEL", "c0", pods[0]), "DEL")
        c3 = net.call("ADD", "c3", pods[3])
        _ok(c3, "ADD in the shrunk pool")
        assert sorted(q["masterQueue"] for q in c3.json["netkit"]["queues"]) == [1, 2]
        for i in (1, 3):
            _ok(net.call("DEL", f"c{i}", pods[i]), "DEL")
        _gc_converges(c, net, nic, clean)
