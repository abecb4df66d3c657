"""Records of another version and unreadable ones, with the real executable and kernel.

tests/unit/test_records.py pins the decisions against the fake kernel; here a
pair-mode attachment with host-local is really made, its record is damaged on
disk, and DEL and GC must still remove the devices (read back with link dumps
and queue-get) and release the address (host-local's own files).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cni_netkit.plugin.state import Owner, StateStore
from tests.e2e.conftest import Nic, Runtime, cni_plugins_dir, leased_queues, netkit_links

pytestmark = pytest.mark.kernel


def test_del_and_gc_get_past_corrupt_and_other_version_records(
    nic: Nic, make_netns: Any, runtime: Runtime, tmp_path: Path
) -> None:
    if cni_plugins_dir() is None:
        pytest.fail("host-local missing: scripts/vm setup extracts containernetworking-plugins")
    ipam_dir = tmp_path / "ipam"
    conf = runtime.conf(nic.name, pairing="pair", mode="l3", ipam={
        "type": "host-local", "ranges": [[{"subnet": "10.81.0.0/24"}]], "dataDir": str(ipam_dir)})
    store = StateStore(str(runtime.state_dir))
    spaces = {cid: make_netns() for cid in ("torn", "newer", "gced")}
    for cid, netns in spaces.items():
        out = runtime("ADD", conf, container_id=cid, netns=netns)
        assert out.code == 0, out.stdout + out.stderr
    assert len(leased_queues(nic)) == 3
    assert len(addresses(ipam_dir)) == 3

    # A torn record, and one a newer version wrote (a field this one does not know).
    store.path(Owner("afxdp", "torn", "net1")).write_text('{"container_id": "torn", "ne')
    newer = store.path(Owner("afxdp", "newer", "net1"))
    data = json.loads(newer.read_text())
    newer.write_text(json.dumps({**data, "schema": 99, "lease_generation": 3}))
    for cid in ("torn", "newer"):
        deleted = runtime("DEL", conf, container_id=cid, netns=spaces[cid])
        assert deleted.code == 0, deleted.stdout + deleted.stderr
        assert netkit_links(spaces[cid]) == []
    assert len(leased_queues(nic)) == 1 and len(addresses(ipam_dir)) == 1

    # GC of a stale attachment whose record is unreadable, with no DEL ever run.
    store.path(Owner("afxdp", "gced", "net1")).write_bytes(b"\xff\xfe")
    gc = runtime("GC", {**conf, "cni.dev/valid-attachments": []})
    assert gc.code == 0, gc.stdout + gc.stderr
    assert netkit_links(spaces["gced"]) == [] and leased_queues(nic) == {}
    assert addresses(ipam_dir) == set()
    assert [link for link in netkit_links(None) if link.alias and "afxdp" in link.alias] == []
    assert list(store) == [] and store.corrupt() == []
    quarantine = store.dir / "quarantine"
    assert sorted(p.name.split(".json")[0] for p in quarantine.iterdir()) == [
        "afxdp:gced:net1", "afxdp:torn:net1"]


def addresses(ipam_dir: Path) -> set[str]:
    """host-local's allocations: one file per address (not its lock or last-reserved)."""
    d = ipam_dir / "afxdp"
    return {p.name for p in d.iterdir() if p.name[0].isdigit()} if d.is_dir() else set()
