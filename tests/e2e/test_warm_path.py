"""The warm path end to end: the real ``netkit`` executable served by the node agent's socket
on a 7.x kernel, and the executable taking over itself when the agent is gone.

The agent runs as ``python -m cni_netkit.agent.server`` on a socket of the
test's own (``CNI_NETKIT_AGENT_SOCKET``); every other e2e test runs cold.
Who ran a command shows in the logs: cold, the executable logs to its own
stderr; warm, the agent logs it (with the executable's pid) and the
executable's stderr stays empty.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cni_netkit.plugin.state import Owner, StateStore
from tests.e2e.conftest import (
    NETKIT,
    AgentProc,
    Nic,
    Runtime,
    cni_plugins_dir,
    leased_queues,
    netkit_links,
    start_agent,
)

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
PATH_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProc]:
    """An agent of this test's own, which the test may kill."""
    agent = start_agent(tmp_path)
    yield agent
    agent.stop()


def with_prev(conf: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    return {**conf, "prevResult": result}


def logged(stderr: str, event: str) -> bool:
    return any(json.loads(line).get("event") == event for line in stderr.splitlines()
               if line.startswith("{"))


def test_add_check_del_through_the_agent_then_add_after_the_agent_died(
    nic: Nic, make_netns: Any, runtime: Runtime, agent: AgentProc
) -> None:
    netns = make_netns()
    conf = runtime.conf(nic.name, queuesPerAttachment=2)
    added = runtime("ADD", conf, netns=netns, env=agent.env)
    assert added.code == 0, added.stdout + added.stderr
    assert added.stderr == ""  # the agent ran it ...
    leased = [e for e in agent.events() if e.get("event") == "leased"]
    assert [(e["container_id"], e["command"]) for e in leased] == [("c1", "ADD")]
    result = added.json
    masters = sorted(q["masterQueue"] for q in result["netkit"]["queues"])
    (link,) = netkit_links(netns)
    assert {m: lease["ifindex"] for m, lease in leased_queues(nic).items()} == {
        m: link.index for m in masters
    }

    checked = runtime("CHECK", with_prev(conf, result), netns=netns, env=agent.env)
    assert (checked.code, checked.stdout, checked.stderr) == (0, "", "")
    deleted = runtime("DEL", with_prev(conf, result), netns=netns, env=agent.env)
    assert (deleted.code, deleted.stdout, deleted.stderr) == (0, "", "")
    assert leased_queues(nic) == {}
    assert netkit_links(netns) == []

    agent.proc.send_signal(signal.SIGKILL)  # dead, and its socket file left behind
    agent.proc.wait(30)
    assert agent.socket.exists()
    netns2 = make_netns()
    again = runtime("ADD", conf, netns=netns2, container_id="c2", env=agent.env)
    assert again.code == 0, again.stdout + again.stderr
    assert logged(again.stderr, "node agent not used, running the command in this process")
    assert logged(again.stderr, "leased")  # ... and this one ran cold, in the executable
    assert len(leased_queues(nic)) == 2
    gone = runtime("DEL", conf, netns=netns2, container_id="c2", env=agent.env)
    assert gone.code == 0, gone.stderr
    assert leased_queues(nic) == {}


def test_agent_killed_mid_add_fails_it_and_the_runtimes_del_cleans_up(
    nic: Nic, make_netns: Any, runtime: Runtime, agent: AgentProc
) -> None:
    netns = make_netns()
    conf = runtime.conf(nic.name)
    # The fault point SIGKILLs the process running the ADD: here, the agent,
    # with the netkit made and its intent record written.
    out = runtime("ADD", conf, netns=netns, env={**agent.env,
                                                  "CNI_NETKIT_TEST_FAULT": "created:kill"})
    assert out.code == 1
    reply = out.json
    assert (reply["code"], reply["msg"]) == (11, "node agent lost during ADD")
    assert agent.proc.wait(30) == -signal.SIGKILL
    assert netkit_links(netns) != []  # the half-done ADD, as a killed cold plugin leaves it
    # What a runtime does after a failed ADD: DEL (cold now: the agent is dead).
    deleted = runtime("DEL", conf, netns=netns, env=agent.env)
    assert deleted.code == 0, deleted.stderr
    assert netkit_links(netns) == []
    assert leased_queues(nic) == {}
    assert StateStore(str(runtime.state_dir)).load(Owner("afxdp", "c1", "net1")) is None


def test_the_requests_environment_reaches_the_plugin_in_the_agent(
    nic: Nic, make_netns: Any, runtime: Runtime, agent: AgentProc
) -> None:
    netns = make_netns()
    conf = runtime.conf(nic.name)
    failed = runtime("ADD", conf, netns=netns, env={**agent.env,
                                                     "CNI_NETKIT_TEST_FAULT": "leased:1"})
    assert failed.json["code"] == 199, failed.stdout  # the fault point saw the request's env
    assert failed.stderr == ""  # and the agent ran it
    assert leased_queues(nic) == {} and netkit_links(netns) == []
    assert runtime("DEL", conf, netns=netns, env=agent.env).code == 0
    # The fault was the request's, not the agent's: the next ADD works.
    ok = runtime("ADD", conf, netns=netns, env=agent.env)
    assert ok.code == 0, ok.stdout
    assert runtime("DEL", conf, netns=netns, env=agent.env).code == 0


def test_pair_mode_with_host_local_through_the_agent(
    nic: Nic, make_netns: Any, runtime: Runtime, agent: AgentProc, tmp_path: Path
) -> None:
    if cni_plugins_dir() is None:
        pytest.fail("host-local missing: scripts/vm setup extracts containernetworking-plugins")
    netns = make_netns()
    ipam = {"type": "host-local", "ranges": [[{"subnet": "10.79.0.0/24"}]],
            "dataDir": str(tmp_path / "ipam")}
    conf = runtime.conf(nic.name, pairing="pair", mode="l3", ipam=ipam)
    out = runtime("ADD", conf, netns=netns, env=agent.env)
    assert out.code == 0 and out.stderr == "", out.stdout + out.stderr
    (ip,) = out.json["ips"]
    assert (tmp_path / "ipam" / "afxdp" / ip["address"].split("/")[0]).exists()
    assert runtime("DEL", with_prev(conf, out.json), netns=netns, env=agent.env).code == 0
    assert not (tmp_path / "ipam" / "afxdp" / ip["address"].split("/")[0]).exists()
    assert leased_queues(nic) == {}


def test_concurrent_adds_through_the_agent_get_distinct_queues(
    nic: Nic, make_netns: Any, runtime: Runtime, agent: AgentProc
) -> None:
    conf = runtime.conf(nic.name)
    spaces = [(f"c{i}", make_netns()) for i in range(8)]
    procs = [
        subprocess.Popen(
            [NETKIT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**PATH_ENV, **agent.env, "CNI_COMMAND": "ADD", "CNI_CONTAINERID": cid,
                 "CNI_NETNS": ns, "CNI_IFNAME": "net1", "CNI_PATH": runtime.cni_path,
                 "CNI_NETKIT_STATE_DIRS": str(runtime.state_dir)},
        )
        for cid, ns in spaces
    ]
    outs = [p.communicate(json.dumps(conf).encode(), timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs, strict=True):
        assert p.returncode == 0, stdout + stderr
        assert stderr == b""
    queues = [json.loads(o)["netkit"]["queues"][0]["masterQueue"] for o, _ in outs]
    assert len(set(queues)) == 8
    assert sorted(leased_queues(nic)) == sorted(queues)
    for cid, ns in spaces:
        assert runtime("DEL", conf, container_id=cid, netns=ns, env=agent.env).code == 0
    assert leased_queues(nic) == {}
