"""The agent's pass: publish what the records and the kernel hold, GC confirmed orphans through
the plugin's DEL, prepare and restore NICs, report liveness. Kernel, NIC and API are fakes of
our own seams; the attachments are made by the plugin's real ADD."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cni_netkit.agent import main as agent_main
from cni_netkit.agent.k8s import Node, Pod, PodList
from cni_netkit.agent.main import PROBE_ANNOTATION, Agent, AgentConfig, load_config
from cni_netkit.agent.publish import LEASES_ANNOTATION, Pool
from cni_netkit.config import parse_invocation
from cni_netkit.errors import NetkitError
from cni_netkit.plugin import allowlist, commands
from cni_netkit.plugin.state import Attachment, StateStore
from tests.agent.test_nicprep import FakeEthtool
from tests.unit.fake_kernel import FakeKernel

NODE = "node-a"
POOL = Pool(master="eth0", queues=(12, 13, 14, 15))


def pod(
    name: str, uid: str = "", node: str = NODE, annotations: dict[str, str] | None = None
) -> Pod:
    return Pod(
        "default", name, uid or f"uid-{name}", node, "Running", "1", annotations or {}, False
    )


@dataclass
class FakeKube:
    pods: dict[str, Pod] = field(default_factory=dict)
    node: Node = field(default_factory=lambda: Node(NODE, "n-uid", "1", {}, {}, {}))
    writes: list[tuple[str, Any]] = field(default_factory=list)
    fail: Exception | None = None

    def get_node(self, name: str) -> Node:
        if self.fail:
            raise self.fail
        return self.node

    def patch_node_annotations(self, node: str, annotations: Mapping[str, str | None]) -> Node:
        self.writes.append(("node-annotations", dict(annotations)))
        merged = {**self.node.annotations, **annotations}
        self.node = Node(
            NODE,
            "n-uid",
            "2",
            {k: v for k, v in merged.items() if v is not None},
            self.node.capacity,
            self.node.allocatable,
        )
        return self.node

    def patch_node_status_capacity(self, node: str, resources: Mapping[str, int | None]) -> Node:
        self.writes.append(("capacity", dict(resources)))
        cap = {**self.node.capacity, **{k: str(v) for k, v in resources.items() if v is not None}}
        cap = {k: v for k, v in cap.items() if resources.get(k, 0) is not None}
        self.node = Node(NODE, "n-uid", "3", self.node.annotations, cap, dict(cap))
        return self.node

    def list_pods_on_node(self, node: str) -> PodList:
        return PodList(tuple(p for p in self.pods.values() if p.node_name == node), "10")

    def get_pod(self, namespace: str, name: str) -> Pod | None:
        return self.pods.get(name)

    def patch_pod_annotations(
        self, namespace: str, name: str, annotations: Mapping[str, str | None], *, uid: str | None
    ) -> bool:
        p = self.pods.get(name)
        if p is None or (uid and p.uid != uid):
            return False
        self.writes.append((f"pod {name}", dict(annotations)))
        merged = {**p.annotations, **annotations}
        self.pods[name] = Pod(
            p.namespace,
            p.name,
            p.uid,
            p.node_name,
            p.phase,
            "2",
            {k: v for k, v in merged.items() if v is not None},
            False,
        )
        return True


@pytest.fixture
def cfg(tmp_path: Path) -> AgentConfig:
    return AgentConfig(
        node=NODE,
        state_dir=tmp_path / "state",
        cni_bin_dir=tmp_path / "bin",
        artifact=None,
        gc_grace=60.0,
    )


@pytest.fixture
def kernel() -> FakeKernel:
    return FakeKernel(master="eth0", master_queues=16)


def add(kernel: FakeKernel, cfg: AgentConfig, pod_name: str, cid: str) -> Attachment:
    """A real ADD through the plugin, for a Kubernetes pod."""
    netns = kernel.add_netns(f"/var/run/netns/{pod_name}")
    conf = {
        "cniVersion": "1.1.0",
        "name": "afxdp",
        "type": "netkit",
        "master": "eth0",
        "queues": "12-15",
        "stateDir": str(cfg.state_dir),
    }
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": cid,
        "CNI_NETNS": netns,
        "CNI_IFNAME": "net1",
        "CNI_PATH": "",
        "CNI_ARGS": f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod_name}",
        "CNI_NETKIT_STATE_DIRS": str(cfg.state_dir),
    }
    # The node's pools, declared as the agent's pass does (closed by default).
    allowlist.write(cfg.state_dir, [allowlist.DeclaredPool(
        POOL.master, frozenset(POOL.queues), kernel.master.link.index)])
    commands.add(parse_invocation(env, json.dumps(conf).encode()), kernel)
    (att,) = [a for a in StateStore(cfg.state_dir) if a.container_id == cid]
    return att


def released_via_del(cfg: AgentConfig) -> agent_main.Release:
    def release(att: Attachment, kernel: Any) -> None:
        agent_main.release(att, kernel, state_dir=cfg.state_dir, cni_path=cfg.cni_bin_dir)

    return release


def make_agent(
    cfg: AgentConfig, kernel: FakeKernel, kube: FakeKube | None, nic: FakeEthtool | None = None
) -> Agent:
    return Agent(
        cfg,
        kernel=lambda: kernel,
        ethtool=nic or FakeEthtool(),
        kube=kube,
        release=released_via_del(cfg),
    )


def age(store: StateStore, att: Attachment, seconds: float) -> None:
    p = store.path(att.owner)
    t = time.time() - seconds
    os.utime(p, (t, t))


def test_pass_publishes_leases_capacity_and_probe(cfg: AgentConfig, kernel: FakeKernel) -> None:
    att = add(kernel, cfg, "vm-1", "c1")
    kube = FakeKube(pods={"vm-1": pod("vm-1")})
    report = make_agent(cfg, kernel, kube).run_pass([POOL])

    value = json.loads(kube.pods["vm-1"].annotations[LEASES_ANNOTATION])
    assert value[0]["masterQueues"] == [q.master_queue for q in att.queues]
    assert value[0]["interface"] == "net1"
    # All four pool queues count: our own lease is subtracted by the scheduler, not by us.
    assert kube.node.capacity[POOL.resource] == "4"
    probe_doc = json.loads(kube.node.annotations[PROBE_ANNOTATION])
    assert probe_doc["masters"]["eth0"]["found"] is True
    assert report.published == 1 and report.attachments == 1


def test_a_pass_declares_the_pools_where_every_add_reads_them(
    cfg: AgentConfig, kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CNI_NETKIT_MASTERS", raising=False)
    agent = make_agent(cfg, kernel, FakeKube())
    extra = Pool(master="eth7", queues=(0, 1))  # not on this node (yet): name only
    assert agent.run_pass([POOL, extra]).problems == ()
    path = allowlist.policy_path(cfg.state_dir)
    assert allowlist.read(path) == {
        "eth0": allowlist.DeclaredPool("eth0", frozenset(POOL.queues), kernel.master.link.index),
        "eth7": allowlist.DeclaredPool("eth7", frozenset({0, 1}), None),
    }
    # Not a copy in memory: the next ADD (cold or through the agent) reads the file.
    netns = kernel.add_netns("/var/run/netns/p1")
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": netns,
           "CNI_IFNAME": "net1", "CNI_NETKIT_STATE_DIRS": str(cfg.state_dir)}
    conf = {"cniVersion": "1.1.0", "name": "n", "type": "netkit", "master": "eth0",
            "queues": "0-3", "stateDir": str(cfg.state_dir)}
    with pytest.raises(NetkitError, match="queues 0-3 of eth0 are not declared"):
        commands.add(parse_invocation(env, json.dumps(conf).encode()), kernel)
    # The pools gone from the ConfigMap: the list goes too (closed again without the env).
    agent.run_pass([])
    assert not path.exists()


def test_second_pass_writes_nothing(cfg: AgentConfig, kernel: FakeKernel) -> None:
    add(kernel, cfg, "vm-1", "c1")
    kube = FakeKube(pods={"vm-1": pod("vm-1")})
    agent = make_agent(cfg, kernel, kube)
    agent.run_pass([POOL])
    kube.writes.clear()
    agent.run_pass([POOL])
    assert kube.writes == []


def test_foreign_lease_lowers_capacity(cfg: AgentConfig, kernel: FakeKernel) -> None:
    kernel.foreign_in_use.add(15)  # someone's AF_XDP socket on the NIC's queue 15
    kube = FakeKube()
    make_agent(cfg, kernel, kube).run_pass([POOL])
    assert kube.node.capacity[POOL.resource] == "3"


def test_restart_adopts_without_touching_the_data_plane(
    cfg: AgentConfig, kernel: FakeKernel
) -> None:
    add(kernel, cfg, "vm-1", "c1")
    kube = FakeKube(pods={"vm-1": pod("vm-1")})
    make_agent(cfg, kernel, kube).run_pass([POOL])
    before = (dict(kernel.leased_master_queues()), kernel.calls[:])
    kernel.calls.clear()
    make_agent(cfg, kernel, kube).run_pass([POOL])  # a new agent process, same node
    assert kernel.leased_master_queues() == before[0]
    writes = {"create_netkit", "delete_link", "queue_create", "set_link", "move_link"}
    assert not writes & set(kernel.calls)


def test_orphan_is_released_through_del_once_confirmed_and_old(
    cfg: AgentConfig, kernel: FakeKernel
) -> None:
    att = add(kernel, cfg, "vm-gone", "c9")
    store = StateStore(cfg.state_dir)
    kube = FakeKube()  # the pod is not on the node any more
    agent = make_agent(cfg, kernel, kube)

    report = agent.run_pass([POOL])
    assert report.released == ()  # too young: an ADD may be racing the pod list
    assert kernel.leased_master_queues()

    age(store, att, 120)
    report = agent.run_pass([POOL])
    assert report.released == (att.key,)
    assert not kernel.leased_master_queues()  # the netkit is gone, and its lease with it
    assert store.load(att.owner) is None


def test_orphan_whose_pod_reappears_on_get_is_kept(cfg: AgentConfig, kernel: FakeKernel) -> None:
    att = add(kernel, cfg, "vm-1", "c1")
    age(StateStore(cfg.state_dir), att, 120)

    class StaleList(FakeKube):
        def list_pods_on_node(self, node: str) -> PodList:
            return PodList((), "1")  # a stale list misses the pod; a GET still finds it

    kube = StaleList(pods={"vm-1": pod("vm-1")})
    report = make_agent(cfg, kernel, kube).run_pass([POOL])
    assert report.released == ()
    assert kernel.leased_master_queues()


def test_api_down_still_prepares_nics_and_reports(cfg: AgentConfig, kernel: FakeKernel) -> None:
    nic = FakeEthtool()
    kube = FakeKube(fail=NetkitError("get node node-a: connection refused"))
    report = make_agent(cfg, kernel, kube, nic).run_pass([POOL])
    assert any("connection refused" in p for p in report.problems)
    assert not {12, 13, 14, 15} & set(nic.table)
    assert agent_main.health(cfg) == 0  # alive: a restart would not fix the API server


def test_master_dropped_from_the_pools_gets_its_nic_restored(
    cfg: AgentConfig, kernel: FakeKernel
) -> None:
    nic = FakeEthtool()
    original = nic.table
    agent = make_agent(cfg, kernel, FakeKube(), nic)
    agent.run_pass([POOL])
    assert nic.table != original
    agent.run_pass([])
    assert nic.table == original


def test_no_kube_client_is_a_reported_problem(cfg: AgentConfig, kernel: FakeKernel) -> None:
    report = make_agent(cfg, kernel, None).run_pass([POOL])
    assert any("nothing published" in p for p in report.problems)


def test_health_follows_the_status_file(cfg: AgentConfig, kernel: FakeKernel) -> None:
    assert agent_main.health(cfg) == 1  # no pass yet
    make_agent(cfg, kernel, FakeKube()).run_pass([POOL])
    assert agent_main.health(cfg) == 0
    assert agent_main.health(cfg, now=lambda: time.time() + cfg.health_max_age + 1) == 1


def test_loop_runs_a_pass_when_a_record_appears_and_stops_on_request(
    cfg: AgentConfig, kernel: FakeKernel
) -> None:
    cfg = AgentConfig(**{**cfg.__dict__, "poll": 0.01, "interval": 3600})
    kube = FakeKube(pods={"vm-1": pod("vm-1")})
    agent = make_agent(cfg, kernel, kube)
    stop = threading.Event()
    t = threading.Thread(target=agent_main.loop, args=(agent, [POOL], stop))
    t.start()
    try:
        deadline = time.monotonic() + 5
        while not cfg.status_file.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        add(kernel, cfg, "vm-1", "c1")  # the plugin's ADD writes a record...
        while (
            LEASES_ANNOTATION not in kube.pods["vm-1"].annotations and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        # ...and it is published long before the hour-long interval.
        assert LEASES_ANNOTATION in kube.pods["vm-1"].annotations
    finally:
        stop.set()
        t.join(5)
    assert not t.is_alive()


def test_uninstall_restores_nics_and_removes_resources(
    cfg: AgentConfig, kernel: FakeKernel
) -> None:
    nic = FakeEthtool()
    original = nic.table
    kube = FakeKube()
    agent = make_agent(cfg, kernel, kube, nic)
    agent.run_pass([POOL])
    assert allowlist.policy_path(cfg.state_dir).exists()
    assert agent.uninstall([POOL]) == []
    assert not allowlist.policy_path(cfg.state_dir).exists()  # nothing declared any more
    assert nic.table == original
    assert POOL.resource not in kube.node.capacity
    assert PROBE_ANNOTATION not in kube.node.annotations


def test_config_file_flags_and_env(tmp_path: Path) -> None:
    f = tmp_path / "agent.json"
    f.write_text(json.dumps({"stateDir": "/s", "interval": 5, "artifact": None}))
    cfg = load_config(str(f), environ={"NODE_NAME": "from-env"})
    assert (cfg.node, cfg.state_dir, cfg.interval, cfg.artifact) == (
        "from-env",
        Path("/s"),
        5.0,
        None,
    )
    assert load_config(str(f), node="flag", environ={"NODE_NAME": "env"}).node == "flag"
    # The DaemonSet's environment overrides the file.
    env = {
        "NODE_NAME": "n",
        "CNI_NETKIT_STATE_DIR": "/var/lib/cni/netkit",
        "CNI_NETKIT_CNI_BIN_DIR": "/host/opt/cni/bin",
        "CNI_NETKIT_RUN_DIR": "/run/cni-netkit",
        "CNI_NETKIT_POOLS": "/etc/cni-netkit/pools.json",
    }
    cfg = load_config(str(f), environ=env)
    assert cfg.state_dir == Path("/var/lib/cni/netkit")
    assert cfg.status_file == Path("/run/cni-netkit/agent-status.json")
    assert (cfg.cni_bin_dir, cfg.pools_file) == (
        Path("/host/opt/cni/bin"),
        Path("/etc/cni-netkit/pools.json"),
    )
    f.write_text(json.dumps({"stateDirr": "/s"}))
    with pytest.raises(NetkitError, match="unknown key"):
        load_config(str(f), node="n")
    with pytest.raises(NetkitError, match="node name"):
        load_config(None, environ={})


def test_master_down_advertises_no_capacity(cfg: AgentConfig, kernel: FakeKernel) -> None:
    m = kernel.master.link
    kernel.master.link = type(m)(**{**m.__dict__, "up": False})
    kube = FakeKube()
    make_agent(cfg, kernel, kube).run_pass([POOL])
    assert kube.node.capacity.get(POOL.resource, "0") == "0"


def test_warm_socket_is_where_the_executable_looks(tmp_path: Path) -> None:
    from cni_netkit.cni import client  # noqa: PLC0415

    default = AgentConfig(node=NODE, state_dir=tmp_path, cni_bin_dir=tmp_path, artifact=None)
    assert str(agent_main.warm_socket(default)) == client.DEFAULT_SOCKET
    moved = AgentConfig(node=NODE, state_dir=tmp_path, cni_bin_dir=tmp_path, artifact=None,
                        run_dir=tmp_path / "run")
    assert agent_main.warm_socket(moved) == tmp_path / "run" / "cni.sock"


def test_a_release_that_keeps_failing_backs_off_and_is_given_up(
    cfg: AgentConfig, kernel: FakeKernel
) -> None:
    # E.g. host-local's DEL on a read-only data dir: it fails the same way every pass.
    att = add(kernel, cfg, "vm-gone", "c9")
    age(StateStore(cfg.state_dir), att, 120)
    now = [time.time()]
    calls: list[str] = []

    def failing(a: Attachment, k: Any) -> None:
        calls.append(a.key)
        raise NetkitError("IPAM plugin host-local DEL failed", "read-only file system")

    agent = Agent(cfg, kernel=lambda: kernel, ethtool=FakeEthtool(), kube=FakeKube(),
                  release=failing, clock=lambda: now[0])
    report = agent.run_pass([POOL])
    assert calls == [att.key] and report.released == ()
    assert any("read-only file system" in p for p in report.problems)
    agent.run_pass([POOL])
    assert len(calls) == 1  # backing off: not retried on the very next pass
    for _ in range(agent_main.MAX_RELEASE_ATTEMPTS + 3):
        now[0] += agent_main._MAX_RELEASE_BACKOFF + 1
        report = agent.run_pass([POOL])
    assert len(calls) == agent_main.MAX_RELEASE_ATTEMPTS  # bounded, not forever
    assert any("given up after" in p for p in report.problems)  # and said so every pass
    assert StateStore(cfg.state_dir).load(att.owner) is not None  # kept for a DEL or operator

    # The runtime's DEL (or an operator) removes the record at last: the agent
    # forgets the failures, so its table is bounded by the records, not by history.
    StateStore(cfg.state_dir).remove(att.owner)
    agent.run_pass([POOL])
    assert agent._release_failures == {}


def test_an_unreadable_record_is_reported_by_the_pass(cfg: AgentConfig, kernel: FakeKernel) -> None:
    att = add(kernel, cfg, "vm-1", "c1")
    StateStore(cfg.state_dir).path(att.owner).write_text("{torn")
    report = make_agent(cfg, kernel, FakeKube(pods={"vm-1": pod("vm-1")})).run_pass([POOL])
    expected = f"unreadable attachment record {att.key}.json"
    assert any(p.startswith(expected) for p in report.problems)
