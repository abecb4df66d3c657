"""CNI_ARGS as real runtimes send them reach the delegated IPAM plugin untouched.

Pair mode with Debian's host-local (scripts/vm setup's containernetworking-plugins),
called with the CNI_ARGS containerd's CRI sends for a kubelet pod and podman's
``IP=`` for ``--ip``: host-local must see ``IgnoreUnknown=1`` (else it answers
"999 ARGS: unknown args" and every ADD and DEL of the sandbox fails) and must
hand out the requested address.  Warm (through the agent) and cold (in the
executable).  The address is read back from the pod netns with iproute2.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Nic, Runtime, cni_plugins_dir, leased_queues

pytestmark = pytest.mark.kernel

CID = "5d1f0c0a9e3b4c2d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d"
CONTAINERD = ("IgnoreUnknown=1;K8S_POD_NAMESPACE=rtns;K8S_POD_NAME=p1;"
              f"K8S_POD_INFRA_CONTAINER_ID={CID};K8S_POD_UID=uid-p1")


def pod_addresses(netns: str, ifname: str) -> list[str]:
    out = subprocess.run(
        ["ip", "-j", "-n", Path(netns).name, "addr", "show", "dev", ifname],
        check=True, capture_output=True, text=True,
    ).stdout
    return [f"{a['local']}/{a['prefixlen']}" for link in json.loads(out)
            for a in link["addr_info"] if a["family"] == "inet"]


@pytest.mark.parametrize(
    "case", [(CONTAINERD + ";IP=10.88.9.50", False), (CONTAINERD, True)],
    ids=["containerd+IP-warm", "containerd-cold"],
)
def test_host_local_gets_the_runtimes_cni_args(
    case: tuple[str, bool], nic: Nic, make_netns: Any, runtime: Runtime, tmp_path: Path
) -> None:
    cni_args, cold = case
    if cni_plugins_dir() is None:
        pytest.fail("host-local missing: scripts/vm setup extracts containernetworking-plugins")
    netns = make_netns()
    data = tmp_path / "ipam"
    ipam = {"type": "host-local", "ranges": [[{"subnet": "10.88.9.0/24"}]], "dataDir": str(data)}
    conf = runtime.conf(nic.name, cniVersion="1.0.0", pairing="pair", mode="l3", ipam=ipam)
    env = {"CNI_ARGS": cni_args}

    out = runtime("ADD", conf, container_id=CID, netns=netns, ifname="eth0", env=env, cold=cold)
    assert out.code == 0, out.stdout + out.stderr
    (ip,) = out.json["ips"]
    want = "10.88.9.50/24" if "IP=" in cni_args else ip["address"]
    assert ip["address"] == want and want.startswith("10.88.9.")
    assert pod_addresses(netns, "eth0") == [want]
    addr = want.split("/")[0]
    assert (data / "afxdp" / addr).read_text().startswith(CID)  # host-local's own record
    assert len(leased_queues(nic)) == 1

    out = runtime("DEL", {**conf, "prevResult": out.json}, container_id=CID, netns=netns,
                  ifname="eth0", env=env, cold=cold)
    assert out.code == 0, out.stdout + out.stderr
    assert not (data / "afxdp" / addr).exists()
    assert leased_queues(nic) == {}
