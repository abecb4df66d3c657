"""The self-contained host artifact (no Python on the node) runs a real ADD -> CHECK -> DEL.

Installed into an empty bin dir the way the agent installs it, run with an
empty environment apart from the CNI variables, against the 7.x kernel.
Its ``netkit`` is the thin C client: without an agent it execs the
``netkit-plugin`` beside it; with one, the agent serves it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cni_netkit import __version__
from cni_netkit.agent.install import install
from tests.e2e.conftest import Nic, declared_by_admin, leased_queues, netkit_links, start_agent

pytestmark = pytest.mark.kernel

ARTIFACT = Path(os.environ.get("CNI_NETKIT_ARTIFACT", "build/artifact"))


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    if not (ARTIFACT / "netkit").is_file():
        pytest.fail(f"no artifact at {ARTIFACT}: scripts/test builds it before the VM stage")
    path = tmp_path / "bin"
    path.mkdir()
    install(ARTIFACT, path, version=__version__)
    return path


def cni(bin_dir: Path, command: str, config: dict[str, Any], netns: str, state: Path,
        **env: str) -> subprocess.CompletedProcess[str]:
    environ = {"CNI_COMMAND": command, "CNI_CONTAINERID": "art1", "CNI_NETNS": netns,
               "CNI_IFNAME": "net1", "CNI_PATH": str(bin_dir), "CNI_NETKIT_STATE_DIRS": str(state),
               # the node's admin declares the test's NIC (closed by default)
               **declared_by_admin(config), **env}
    return subprocess.run([str(bin_dir / "netkit")], input=json.dumps(config), env=environ,
                          capture_output=True, text=True, timeout=600, cwd="/", check=False)


def test_artifact_add_check_del(
    nic: Nic, make_netns: Any, tmp_path: Path, bin_dir: Path
) -> None:
    netns = make_netns()
    state = tmp_path / "state"
    conf = {"cniVersion": "1.1.0", "name": "afxdp", "type": "netkit", "master": nic.name,
            "queues": "2-5", "stateDir": str(state)}

    added = cni(bin_dir, "ADD", conf, netns, state)
    assert added.returncode == 0, added.stdout + added.stderr
    result = json.loads(added.stdout)
    assert [q["masterQueue"] for q in result["netkit"]["queues"]] == [2]
    (link,) = netkit_links(netns)
    assert leased_queues(nic)[2]["ifindex"] == link.index
    checked = cni(bin_dir, "CHECK", {**conf, "prevResult": result}, netns, state)
    assert (checked.returncode, checked.stdout) == (0, ""), checked.stderr
    deleted = cni(bin_dir, "DEL", {**conf, "prevResult": result}, netns, state)
    assert (deleted.returncode, deleted.stdout) == (0, ""), deleted.stderr
    assert leased_queues(nic) == {}


def test_artifact_served_by_the_agent_then_runs_its_plugin_once_the_agent_died(
    nic: Nic, make_netns: Any, tmp_path: Path, bin_dir: Path
) -> None:
    state = tmp_path / "state"
    conf = {"cniVersion": "1.1.0", "name": "afxdp", "type": "netkit", "master": nic.name,
            "queues": "2-5", "stateDir": str(state)}
    agent = start_agent(tmp_path)
    try:
        netns = make_netns()
        added = cni(bin_dir, "ADD", conf, netns, state, **agent.env)
        assert (added.returncode, added.stderr) == (0, ""), added.stdout + added.stderr
        assert [e["command"] for e in agent.events() if e.get("event") == "leased"] == ["ADD"]
        deleted = cni(bin_dir, "DEL", conf, netns, state, **agent.env)
        assert (deleted.returncode, deleted.stdout, deleted.stderr) == (0, "", "")
        agent.proc.send_signal(signal.SIGKILL)
        agent.proc.wait(30)
        netns2 = make_netns()
        again = cni(bin_dir, "ADD", conf, netns2, state, **agent.env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "node agent not used" in again.stderr  # the thin client's note, then the plugin
        assert [q["masterQueue"] for q in json.loads(again.stdout)["netkit"]["queues"]] == [2]
        gone = cni(bin_dir, "DEL", conf, netns2, state, **agent.env)
        assert gone.returncode == 0, gone.stderr
        assert leased_queues(nic) == {}
    finally:
        agent.stop()
