"""The warm path end to end: the real ``netkit`` executable served by the node agent's socket
on a 7.x kernel, and the executable taking over itself when the agent is gone.

The agent runs as ``python -m cni_netkit.agent.server`` on a socket of the
test's own (``CNI_NETKIT_AGENT_SOCKET``); every other e2e test runs cold.
Who ran a command shows in the logs: cold, the executable logs to its own
stderr; warm, the agent logs it (with the executable's pid) and the
executable's stderr stays empty.

Every test runs twice: with the Python client (the venv's ``netkit`` console
script) and with the thin C client (``build/shim/netkit``, the artifact's
``netkit``), which execs that console script (``CNI_NETKIT_PLUGIN_EXE``)
whenever it falls back.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cni_netkit.plugin.state import Owner, StateStore
from tests.e2e import conftest
from tests.e2e.conftest import (
    NETKIT,
    AgentProc,
    Nic,
    Outcome,
    Runtime,
    cni_plugins_dir,
    leased_queues,
    netkit_links,
    start_agent,
)

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
SHIM = REPO / "build" / "shim" / "netkit"
PATH_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
NOTE = "node agent not used, running the command in this process"


@dataclass
class Exe:
    """How the test starts ``netkit``: the executable, and what its environment needs."""

    path: str
    env: dict[str, str] = field(default_factory=dict)


@pytest.fixture(params=["python", "shim"])
def netkit(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Exe:
    """The executable under test; ``runtime`` calls it too (conftest's NETKIT, patched)."""
    if request.param == "python":
        return Exe(NETKIT)
    if not SHIM.is_file():
        pytest.fail(f"no thin client at {SHIM}: scripts/bootstrap builds it (scripts/build-shim)")
    monkeypatch.setattr(conftest, "NETKIT", str(SHIM))
    return Exe(str(SHIM), {"CNI_NETKIT_PLUGIN_EXE": NETKIT})


@dataclass
class Agent(AgentProc):
    """An agent whose ``env`` also carries what the executable under test needs."""

    extra: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {**super().env, **self.extra}


@pytest.fixture
def agent(tmp_path: Path, netkit: Exe) -> Iterator[Agent]:
    """An agent of this test's own, which the test may kill."""
    started = start_agent(tmp_path)
    agent = Agent(started.proc, started.socket, started.log, netkit.env)
    yield agent
    agent.stop()


def invoke(argv: list[str], env: dict[str, str], stdin: str) -> Outcome:
    """Run ``argv`` as a runtime runs the plugin (``runtime`` cannot add a prefix)."""
    p = subprocess.run(argv, input=stdin, env={**PATH_ENV, **env}, capture_output=True,
                       text=True, timeout=600, check=False)
    return Outcome(p.returncode, p.stdout, p.stderr)


def with_prev(conf: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    return {**conf, "prevResult": result}


def logged(stderr: str, event: str) -> bool:
    return any(json.loads(line).get("event") == event for line in stderr.splitlines()
               if line.startswith("{"))


def test_add_check_del_through_the_agent_then_add_after_the_agent_died(
    nic: Nic, make_netns: Any, runtime: Runtime, agent: Agent
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
    nic: Nic, make_netns: Any, runtime: Runtime, agent: Agent
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
    nic: Nic, make_netns: Any, runtime: Runtime, agent: Agent
) -> None:
    netns = make_netns()
    conf = runtime.conf(nic.name)
    failed = runtime("ADD", conf, netns=netns, env={**agent.env,
                                                     "CNI_NETKIT_TEST_FAULT": "leased:1"})
    assert failed.json["code"] == 199, failed.stdout  # the fault point saw the request's env
    assert failed.code == 1  # the agent's exit status, relayed
    assert failed.stderr == ""  # and the agent ran it
    assert leased_queues(nic) == {} and netkit_links(netns) == []
    assert runtime("DEL", conf, netns=netns, env=agent.env).code == 0
    # The fault was the request's, not the agent's: the next ADD works.
    ok = runtime("ADD", conf, netns=netns, env=agent.env)
    assert ok.code == 0, ok.stdout
    assert runtime("DEL", conf, netns=netns, env=agent.env).code == 0


def test_pair_mode_with_host_local_through_the_agent(
    nic: Nic, make_netns: Any, runtime: Runtime, agent: Agent, tmp_path: Path
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
    nic: Nic, make_netns: Any, runtime: Runtime, agent: Agent, netkit: Exe
) -> None:
    conf = runtime.conf(nic.name)
    spaces = [(f"c{i}", make_netns()) for i in range(8)]
    procs = [
        subprocess.Popen(
            [netkit.path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**PATH_ENV, **agent.env, "CNI_COMMAND": "ADD", "CNI_CONTAINERID": cid,
                 "CNI_NETNS": ns, "CNI_IFNAME": "net1", "CNI_PATH": runtime.cni_path,
                 "CNI_NETKIT_STATE_DIRS": str(runtime.state_dir), **runtime.declared(conf)},
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


def test_without_a_socket_the_executable_runs_cold_quietly_and_errors_keep_their_status(
    nic: Nic, make_netns: Any, runtime: Runtime, netkit: Exe, tmp_path: Path
) -> None:
    netns = make_netns()
    conf = runtime.conf(nic.name)
    env = {"CNI_NETKIT_AGENT_SOCKET": str(tmp_path / "no-agent.sock"), **netkit.env}
    bad = runtime("ADD", {**conf, "queues": "nonsense"}, netns=netns, env=env)
    assert bad.code == 1 and bad.json["code"] == 7, bad.stdout + bad.stderr
    assert not logged(bad.stderr, NOTE)  # no agent is the plain case: no note
    added = runtime("ADD", conf, netns=netns, env=env)
    assert added.code == 0, added.stdout + added.stderr
    assert logged(added.stderr, "leased") and not logged(added.stderr, NOTE)
    assert runtime("DEL", with_prev(conf, added.json), netns=netns, env=env).code == 0
    assert leased_queues(nic) == {}


def test_a_refusal_runs_cold(make_netns: Any, agent: Agent, netkit: Exe, tmp_path: Path) -> None:
    # The executable in another network namespace than the agent: refused.
    stdin = json.dumps({"cniVersion": "1.0.0"})
    version = {"CNI_COMMAND": "VERSION", **agent.env}
    other = invoke(["nsenter", f"--net={make_netns()}", netkit.path], version, stdin)
    assert other.code == 0, other.stderr
    assert other.json["cniVersion"] == "1.0.0"
    assert [json.loads(line)["reason"] for line in other.stderr.splitlines()] == [
        "agent refused: the executable runs in another network namespace than the agent"]
    # A path the request names is another file for the executable (a private
    # tmpfs over the state dir, in a mount namespace of its own) than for the agent.
    state = tmp_path / "state-view"
    state.mkdir()
    conf = json.dumps({"cniVersion": "1.0.0", "stateDir": str(state)})
    script = f'mount -t tmpfs none {state} && exec "$0"'
    view = invoke(["unshare", "--mount", "sh", "-c", script, netkit.path], version, conf)
    assert view.code == 0, view.stderr
    (note,) = [json.loads(line) for line in view.stderr.splitlines()]
    assert note["event"] == NOTE and str(state) in note["reason"], note
    refused = [e for e in agent.events() if e.get("event") == "refused a CNI request"]
    assert len(refused) == 2
    # ... while the same request from the executable's usual place is served.
    served = invoke([netkit.path], version, conf)
    assert (served.code, served.stderr) == (0, ""), served.stderr


def test_stdin_larger_than_a_pipe_buffer_is_relayed(
    nic: Nic, make_netns: Any, runtime: Runtime, agent: Agent
) -> None:
    netns = make_netns()
    # An unknown key is ignored (with a warning in the agent's log): ~300 KiB of config.
    conf = runtime.conf(nic.name, padding="x" * (300 << 10))
    added = runtime("ADD", conf, netns=netns, env=agent.env)
    assert (added.code, added.stderr) == (0, ""), added.stdout + added.stderr
    warned = [e for e in agent.events() if e.get("event") == "unknown config keys ignored"]
    assert warned and warned[-1]["keys"] == ["padding"]
    assert runtime("DEL", with_prev(conf, added.json), netns=netns, env=agent.env).code == 0
    assert leased_queues(nic) == {}
