"""Attachment records of other schema versions, and unreadable ones: DEL and GC never stall.

Against the in-memory fake of our kernel seam (tests/unit/fake_kernel.py) and a
tiny stand-in IPAM plugin that keeps one file per allocation, like host-local:
what is claimed here is the plugin's decisions. tests/e2e/test_records_e2e.py
runs a corrupt record through DEL and GC in the VM.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from cni_netkit.config import Invocation, parse_invocation
from cni_netkit.errors import CheckFailed
from cni_netkit.plugin import commands
from cni_netkit.plugin.state import (
    SCHEMA_VERSION,
    Attachment,
    CorruptRecord,
    Owner,
    StateStore,
    attachment_key,
)
from tests.unit.fake_kernel import POD, FakeKernel

OWNER = Owner("afxdp", "c1", "net1")

# An IPAM plugin as the CNI protocol sees one: one file per container under ALLOC.
FAKE_IPAM = """#!/bin/sh
cat >/dev/null
case "$CNI_COMMAND" in
ADD) : > "ALLOC/$CNI_CONTAINERID"
     echo '{"cniVersion": "1.1.0", "ips": [{"address": "10.9.0.2/24"}]}' ;;
DEL) rm -f "ALLOC/$CNI_CONTAINERID" ;;
esac
"""


@pytest.fixture
def ipam(tmp_path: Path) -> Path:
    """The bin dir holding ``fake-ipam``; its allocations are files in ``<tmp>/alloc``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "fake-ipam"
    exe.write_text(FAKE_IPAM.replace("ALLOC", str(tmp_path / "alloc")))
    exe.chmod(0o755)
    (tmp_path / "alloc").mkdir()
    return bin_dir


def inv(command: str, state: Path, bin_dir: Path | None = None, *, cid: str = "c1",
        netns: str = POD, **conf: Any) -> Invocation:
    c: dict[str, Any] = {"cniVersion": "1.1.0", "name": "afxdp", "type": "netkit",
                         "master": "eth0", "queues": "8-15", "stateDir": str(state)}
    if bin_dir is not None:
        c.update(pairing="pair", ipam={"type": "fake-ipam"})
    c.update(conf)
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns,
           "CNI_IFNAME": "net1", "CNI_PATH": str(bin_dir or ""),
           "CNI_NETKIT_STATE_DIRS": str(state)}
    return parse_invocation(env, json.dumps(c).encode())


def allocations(bin_dir: Path) -> set[str]:
    return {p.name for p in (bin_dir.parent / "alloc").iterdir()}


def quarantined(state: Path) -> list[Path]:
    q = state / "attachments" / "quarantine"
    return sorted(q.iterdir()) if q.is_dir() else []


# --- versions ------------------------------------------------------------------------------


def test_records_carry_the_schema_version(kernel: FakeKernel, state: Path) -> None:
    commands.add(inv("ADD", state), kernel)
    data = json.loads(StateStore(state).path(OWNER).read_text())
    assert data["schema"] == SCHEMA_VERSION == 1


def test_an_older_record_without_schema_or_optional_fields_is_read() -> None:
    old = {"container_id": "c1", "ifname": "net1", "netns": POD, "network": "afxdp",
           "master": "eth0", "pairing": "single", "mode": "l2",
           "queues": [{"netkit_queue": 1, "master_queue": 8}]}
    att = Attachment.from_json(old)
    assert att.owner == OWNER and att.mac is None and att.mtu is None and att.netconf is None
    assert [q.master_queue for q in att.queues] == [8]


def test_a_newer_record_with_fields_this_version_does_not_know_is_read() -> None:
    newer = {"schema": SCHEMA_VERSION + 1, "container_id": "c1", "ifname": "net1",
             "netns": POD, "network": "afxdp", "master": "eth0", "pairing": "pair",
             "mode": "l3", "mac": None, "mtu": 1500, "host_ifname": "nkabc",
             "queues": [{"netkit_queue": 1, "master_queue": 8, "numa_node": 0}],
             "lease_generation": 7, "extra": {"pod_uid": "u1"}}
    att = Attachment.from_json(newer)
    assert att.host_ifname == "nkabc" and att.extra == {"pod_uid": "u1"}
    assert [q.netkit_queue for q in att.queues] == [1]


@pytest.mark.parametrize("text", [
    "", "{", "[]", '"x"', '{"container_id": "c1"}',
    json.dumps({"container_id": "c1", "ifname": "net1", "netns": POD, "network": "afxdp",
                "master": "eth0", "pairing": "single", "mode": "l2", "queues": "8"}),
    json.dumps({"container_id": "c1", "ifname": "net1", "netns": POD, "network": "afxdp",
                "master": "eth0", "pairing": "single", "mode": "l2", "queues": [],
                "mtu": "big"}),
    "\udcff",
])
def test_an_unreadable_record_is_a_corrupt_record_never_another_error(
    state: Path, text: str
) -> None:
    store = StateStore(state)
    store.dir.mkdir(parents=True)
    store.path(OWNER).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(CorruptRecord) as e:
        store.load(OWNER)
    assert e.value.owner == OWNER  # from the file name when the content cannot say
    assert list(store) == [] and [c.path for c in store.corrupt()] == [store.path(OWNER)]


# --- DEL -----------------------------------------------------------------------------------


def test_del_with_a_corrupt_record_deletes_by_alias_releases_ipam_and_quarantines(
    kernel: FakeKernel, state: Path, ipam: Path
) -> None:
    commands.add(inv("ADD", state, ipam), kernel)
    assert allocations(ipam) == {"c1"} and len(kernel.links_in(POD)) == 1
    record = StateStore(state).path(OWNER)
    record.write_text('{"container_id": "c1", "truncated')
    with capture_logs() as logs:
        commands.delete(inv("DEL", state, ipam), kernel)  # succeeds
    assert kernel.links_in(POD) == [] and kernel.leased_master_queues() == {}
    assert [x for x in kernel.links_in(None) if x.kind == "netkit"] == []  # the host side too
    assert allocations(ipam) == set()
    assert not record.exists()
    (moved,) = quarantined(state)
    assert moved.read_text() == '{"container_id": "c1", "truncated'
    assert "attachment record quarantined" in [e["event"] for e in logs]
    commands.delete(inv("DEL", state, ipam), kernel)  # and again: nothing left, still fine


def test_del_without_netns_finds_the_pod_side_in_what_a_corrupt_record_still_says(
    kernel: FakeKernel, state: Path
) -> None:
    commands.add(inv("ADD", state), kernel)
    record = StateStore(state).path(OWNER)
    data = json.loads(record.read_text())
    data["queues"] = "not a list"  # e.g. a field another version writes differently
    record.write_text(json.dumps(data))
    commands.delete(inv("DEL", state, netns=""), kernel)
    assert kernel.links_in(POD) == [] and kernel.leased_master_queues() == {}
    assert len(quarantined(state)) == 1


def test_check_reports_a_corrupt_record(kernel: FakeKernel, state: Path) -> None:
    res = commands.add(inv("ADD", state), kernel)
    StateStore(state).path(OWNER).write_text("garbage")
    with pytest.raises(CheckFailed, match="unreadable"):
        commands.check(inv("CHECK", state, prevResult=res.encode("1.1.0")), kernel)


# --- GC ------------------------------------------------------------------------------------


def test_gc_quarantines_stale_corrupt_records_releases_them_and_keeps_live_ones(
    kernel: FakeKernel, state: Path, ipam: Path
) -> None:
    for cid in ("gone", "live"):
        kernel.add_netns(f"/{cid}")
        commands.add(inv("ADD", state, ipam, cid=cid, netns=f"/{cid}"), kernel)
    store = StateStore(state)
    for cid in ("gone", "live"):
        store.path(Owner("afxdp", cid, "net1")).write_text("{torn")
    # A record nobody can own: hashed name, unreadable content.
    nobody = store.dir / f"{attachment_key('afxdp', 'x' * 250, 'net1')}.json"
    nobody.write_text("\0\0")
    valid = [{"containerID": "live", "ifname": "net1"}]
    with capture_logs() as logs:
        commands.gc(inv("GC", state, ipam, **{"cni.dev/valid-attachments": valid}), kernel,
                    kernel.netns)  # no error: handled, and logged
    assert allocations(ipam) == {"live"}
    assert kernel.links_in("/gone") == [] and len(kernel.links_in("/live")) == 1
    assert not store.path(Owner("afxdp", "gone", "net1")).exists() and not nobody.exists()
    assert store.path(Owner("afxdp", "live", "net1")).exists()  # its own DEL handles it
    assert len(quarantined(state)) == 2
    events = [e["event"] for e in logs]
    assert events.count("gc quarantined an unreadable attachment record") == 2
    assert "attachment record unreadable; kept for its DEL" in events


@pytest.mark.parametrize(("key", "value"), [("map_path", 7), ("map_start_index", "1"),
                                            ("map_id", True), ("xsk_mode", ["copy"])])
def test_an_extra_field_of_the_wrong_type_is_a_corrupt_record(key: str, value: Any) -> None:
    # plugin.afxdp would raise TypeError on it in every DEL: unreadable, not a crash.
    data = {"container_id": "c1", "ifname": "net1", "netns": POD, "network": "afxdp",
            "master": "eth0", "pairing": "single", "mode": "l2", "queues": [],
            "extra": {key: value}}
    with pytest.raises(ValueError, match=f"extra.{key}"):
        Attachment.from_json(data)


def test_gc_of_a_corrupt_record_also_finds_a_netkit_still_under_its_staging_name(
    kernel: FakeKernel, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An ADD killed right after creating the netkit (no alias, staging name), whose
    # intent record is then torn: GC must still attribute and delete the device.
    def killed(at: str) -> None:
        if at == "create:made":
            raise KeyboardInterrupt  # stands in for the SIGKILL: the undo must not run
    monkeypatch.setattr(commands, "fault_point", killed)
    monkeypatch.setattr(commands, "_quietly", lambda *_: None)  # no undo, as after a kill
    with pytest.raises(KeyboardInterrupt):
        commands.add(inv("ADD", state), kernel)
    monkeypatch.undo()
    (staged,) = [link for link in kernel.links_in(POD) if link.kind == "netkit"]
    assert staged.alias is None and staged.name == commands.staging_ifname(
        Owner("afxdp", "c1", "net1"))
    store = StateStore(state)
    store.path(Owner("afxdp", "c1", "net1")).write_text('{"container_id": "c1", "netns": "'
                                                        + POD + '", "queues": 3}')
    commands.gc(inv("GC", state, **{"cni.dev/valid-attachments": []}), kernel, kernel.netns)
    assert [link for link in kernel.links_in(POD) if link.kind == "netkit"] == []
