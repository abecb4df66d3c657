"""The self-contained host artifact (no Python on the node) runs a real ADD -> CHECK -> DEL.

Installed into an empty bin dir the way the agent installs it, run with an
empty environment apart from the CNI variables, against the 7.x kernel.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cni_netkit import __version__
from cni_netkit.agent.install import install
from tests.e2e.conftest import Nic, leased_queues, netkit_links

pytestmark = pytest.mark.kernel

ARTIFACT = Path(os.environ.get("CNI_NETKIT_ARTIFACT", "build/artifact"))


def test_artifact_add_check_del(nic: Nic, make_netns: Any, tmp_path: Path) -> None:
    if not (ARTIFACT / "netkit").is_file():
        pytest.fail(f"no artifact at {ARTIFACT}: scripts/test builds it before the VM stage")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    install(ARTIFACT, bin_dir, version=__version__)
    netns = make_netns()
    conf = {"cniVersion": "1.1.0", "name": "afxdp", "type": "netkit", "master": nic.name,
            "queues": "2-5", "stateDir": str(tmp_path / "state")}

    def cni(command: str, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "art1", "CNI_NETNS": netns,
               "CNI_IFNAME": "net1", "CNI_PATH": str(bin_dir),
               "CNI_NETKIT_STATE_DIRS": str(tmp_path / "state")}
        return subprocess.run([str(bin_dir / "netkit")], input=json.dumps(config), env=env,
                              capture_output=True, text=True, timeout=600, cwd="/", check=False)

    added = cni("ADD", conf)
    assert added.returncode == 0, added.stdout + added.stderr
    result = json.loads(added.stdout)
    assert [q["masterQueue"] for q in result["netkit"]["queues"]] == [2]
    (link,) = netkit_links(netns)
    assert leased_queues(nic)[2]["ifindex"] == link.index
    checked = cni("CHECK", {**conf, "prevResult": result})
    assert (checked.returncode, checked.stdout) == (0, ""), checked.stderr
    deleted = cni("DEL", {**conf, "prevResult": result})
    assert (deleted.returncode, deleted.stdout) == (0, ""), deleted.stderr
    assert leased_queues(nic) == {}
