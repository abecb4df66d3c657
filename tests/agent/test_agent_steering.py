"""The agent keeps the AF_XDP steering program on its pool masters: at start-up (where an
upgrade takes effect) and whenever a pass finds it missing; never when not configured.
``xsk.reconcile`` is recorded here; tests/kernel shows what it does to a real kernel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cni_netkit.agent.main import Agent, AgentConfig, load_config
from cni_netkit.agent.publish import Pool
from cni_netkit.errors import AlreadyExists
from cni_netkit.kernel import xsk
from tests.agent.test_nicprep import FakeEthtool
from tests.unit.fake_kernel import FakeKernel

POOLS = [Pool(master="eth1", queues=(12, 13)), Pool(master="eth0", queues=(14,)),
         Pool(master="eth0", queues=(15,))]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, bool]]:
    made: list[tuple[str, str, bool]] = []

    def reconcile(master: str, obj: str, *, startup: bool, root: Any = None) -> None:
        made.append((master, obj, startup))
        if master == "eth1":
            raise AlreadyExists("attach XDP program to ifindex 3: EEXIST",
                                "ifindex 3 already runs XDP program id 9")

    monkeypatch.setattr(xsk, "reconcile", reconcile)
    return made


def agent(tmp_path: Path, **cfg: Any) -> Agent:
    config = AgentConfig(node="n", state_dir=tmp_path / "state", artifact=None, **cfg)
    return Agent(config, kernel=FakeKernel, ethtool=FakeEthtool(), kube=None,
                 release=lambda att, kernel: None)


def test_steering_runs_per_master_and_reports_what_failed(
    tmp_path: Path, calls: list[tuple[str, str, bool]]
) -> None:
    problems = agent(tmp_path, bpf_object=Path("/o/x.bpf.o")).steer(POOLS, startup=True)

    assert calls == [("eth0", "/o/x.bpf.o", True), ("eth1", "/o/x.bpf.o", True)]
    assert problems == ["eth1: AF_XDP steering program: attach XDP program to ifindex 3: "
                        "EEXIST: ifindex 3 already runs XDP program id 9"]


def test_every_pass_checks_the_program_and_carries_its_problems(
    tmp_path: Path, calls: list[tuple[str, str, bool]]
) -> None:
    report = agent(tmp_path, bpf_object=Path("/o/x.bpf.o")).run_pass(POOLS)

    assert [(m, s) for m, _, s in calls] == [("eth0", False), ("eth1", False)]
    assert any(p.startswith("eth1: AF_XDP steering program") for p in report.problems)


def test_no_object_configured_means_no_steering(
    tmp_path: Path, calls: list[tuple[str, str, bool]]
) -> None:
    assert agent(tmp_path).steer(POOLS, startup=True) == []
    assert calls == []


def test_object_path_comes_from_the_config_file_or_the_environment(tmp_path: Path) -> None:
    conf = tmp_path / "agent.json"
    conf.write_text('{"node": "n", "bpfObject": "/a/x.bpf.o"}')
    assert load_config(str(conf), environ={}).bpf_object == Path("/a/x.bpf.o")
    env = {"CNI_NETKIT_BPF_OBJECT": "/b/x.bpf.o"}
    assert load_config(str(conf), environ=env).bpf_object == Path("/b/x.bpf.o")


def test_uninstall_detaches_the_program_of_every_pool_master(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    removed: list[str] = []
    monkeypatch.setattr(xsk, "remove_program", lambda master: removed.append(master) or True)
    a = agent(tmp_path, bpf_object=Path("/o/x.bpf.o"), cni_bin_dir=tmp_path / "bin")

    assert a.uninstall(POOLS) == []
    assert removed == ["eth0", "eth1"]
