"""GC gives the same answer whether the node agent runs it (warm) or the executable does (cold).

The runtime cannot tell which path served its GC, so the two must remove
exactly the same things from the same node: stale recorded attachments, a
netkit of ours whose record was lost, and nothing of anyone else's. The same
node state is built twice, once per path, and what GC leaves is read back
from the kernel (netkits per netns, queue-get leases) and the state dir.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Nic, Runtime, leased_queues, netkit_links

pytestmark = pytest.mark.kernel


def _node_after_gc(
    nic: Nic, make_netns: Any, runtime: Runtime, *, cold: bool
) -> tuple[dict[str, Any], dict[str, str]]:
    """What is left after one GC (valid: "keep" only), and the pods' netns."""
    conf = runtime.conf(nic.name)
    pods = {cid: make_netns() for cid in ("keep", "stale", "lost")}
    for cid, netns in pods.items():
        added = runtime("ADD", conf, container_id=cid, netns=netns)
        assert added.code == 0, added.stdout + added.stderr
    # "lost": its record is gone (a wiped state dir): only its owner alias names it.
    (lost,) = runtime.state_dir.glob("attachments/afxdp:lost:net1.json")
    lost.unlink()
    # Someone else's netkit in the stale pod's netns must survive any GC of ours.
    foreign = runtime("ADD", runtime.conf(nic.name, name="other"), container_id="stale",
                      netns=pods["stale"], ifname="net2")
    assert foreign.code == 0, foreign.stdout + foreign.stderr
    gc_conf = {**conf, "cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "net1"}]}
    out = runtime("GC", gc_conf, cold=cold)
    assert (out.code, out.stdout) == (0, ""), out.stdout + out.stderr
    # Logged by whoever ran it: the executable's stderr cold, the agent's log warm.
    assert ("gc removed" in out.stderr) == cold, out.stderr
    left = {
        "netkits": {cid: sorted(link.name for link in netkit_links(netns))
                    for cid, netns in pods.items()},
        "leases": len(leased_queues(nic)),
        "records": sorted(p.name for p in Path(runtime.state_dir, "attachments").glob("*.json")),
    }
    return left, pods


def test_gc_removes_the_same_attachments_warm_and_cold(
    nic: Nic, make_netns: Any, runtime: Runtime, tmp_path: Path
) -> None:
    warm, pods = _node_after_gc(nic, make_netns, runtime, cold=False)
    # The same node again, on a fresh state dir, with GC run by the executable itself.
    assert runtime("DEL", runtime.conf(nic.name), container_id="keep", netns=pods["keep"]).code == 0
    assert runtime("DEL", runtime.conf(nic.name, name="other"), container_id="stale",
                   netns=pods["stale"], ifname="net2").code == 0
    assert leased_queues(nic) == {}
    again = Runtime(state_dir=tmp_path / "state-cold", cni_path=runtime.cni_path,
                    agent_env=runtime.agent_env)
    cold, _ = _node_after_gc(nic, make_netns, again, cold=True)
    assert warm == cold
    # ... and it is the right answer: the valid one and the foreign one stay, nothing else.
    assert warm["netkits"] == {"keep": ["net1"], "stale": ["net2"], "lost": []}
    assert warm["leases"] == 2
    assert warm["records"] == ["afxdp:keep:net1.json", "other:stale:net2.json"]
