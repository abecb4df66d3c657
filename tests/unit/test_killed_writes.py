"""A process killed inside an atomic write leaves its temporary file: DEL and GC remove it.

Found by the warm-path storm (tests/reliability/test_agent_storm.py): the
node agent SIGKILLed while an ADD it served was writing the device-info
file left ``.<name>.tmp.<agent pid>`` behind, after the runtime's DEL had
removed everything else. The record's ``save`` has the same window. Here
the leftovers are planted as such a kill leaves them (another pid, another
thread id), then the attachment's DEL or GC must leave the directories empty.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from cni_netkit.config import Invocation, parse_invocation
from cni_netkit.plugin import commands, deviceinfo
from cni_netkit.plugin.state import Owner, StateStore
from tests.unit.fake_kernel import POD, FakeKernel


def inv(command: str, state: Path, devinfo: Path, **conf: Any) -> Invocation:
    c: dict[str, Any] = {"cniVersion": "1.1.0", "name": "afxdp", "type": "netkit",
                         "master": "eth0", "queues": "8-15", "stateDir": str(state),
                         "runtimeConfig": {"CNIDeviceInfoFile": str(devinfo / "c1-net1.json")}}
    c.update(conf)
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c1", "CNI_NETNS": POD,
           "CNI_IFNAME": "net1", "CNI_PATH": "", "CNI_NETKIT_STATE_DIRS": str(state),
           "CNI_NETKIT_DEVICE_INFO_DIRS": str(devinfo)}
    return parse_invocation(env, json.dumps(c).encode())


def plant_leftovers(state: Path, devinfo: Path) -> list[Path]:
    """What a SIGKILL inside ``deviceinfo.write`` and ``StateStore.save`` leaves."""
    record = StateStore(state).path(Owner("afxdp", "c1", "net1"))
    left = [devinfo / ".c1-net1.json.tmp.4242",
            record.with_suffix(f".tmp.4242.{os.getpid() + 1}")]
    for p in left:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("{")  # cut short by the kill
    return left


@pytest.mark.parametrize("follow_up", ["DEL", "GC"])
def test_del_and_gc_remove_what_a_killed_write_left(
    kernel: FakeKernel, state: Path, tmp_path: Path, follow_up: str
) -> None:
    devinfo = tmp_path / "devinfo"
    commands.add(inv("ADD", state, devinfo), kernel)
    left = plant_leftovers(state, devinfo)
    assert all(p.exists() for p in left)
    if follow_up == "DEL":
        commands.delete(inv("DEL", state, devinfo), kernel)
    else:
        commands.gc(inv("GC", state, devinfo, **{"cni.dev/valid-attachments": []}), kernel, [POD])
    assert [p for p in left if p.exists()] == []
    assert list(devinfo.iterdir()) == []
    assert [p.name for p in (state / "attachments").iterdir() if not p.is_dir()] == []


def test_del_after_an_add_killed_in_its_first_save_removes_the_only_file_it_left(
    kernel: FakeKernel, state: Path, tmp_path: Path
) -> None:
    devinfo = tmp_path / "devinfo"
    # Killed inside the intent record's save: no record, no device-info file yet.
    _, record_tmp = plant_leftovers(state, devinfo)
    (devinfo / ".c1-net1.json.tmp.4242").unlink()
    commands.delete(inv("DEL", state, devinfo), kernel)
    assert not record_tmp.exists()


def test_only_temporary_names_of_that_file_are_removed(tmp_path: Path) -> None:
    final = tmp_path / "c1-net1.json"
    final.write_text("{}")
    keep = [tmp_path / n for n in (".c1-net1.json.tmp.x1", ".c1-net1.json.tmpl", "c2-net1.json",
                                    ".c2-net1.json.tmp.7", ".c1-net1.json.tmp.")]
    for p in keep:
        p.write_text("")
    (tmp_path / ".c1-net1.json.tmp.77").symlink_to("/etc/passwd")
    deviceinfo.remove(str(final))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in keep)
    assert Path("/etc/passwd").exists()
    deviceinfo.remove(str(tmp_path / "missing" / "c1-net1.json"))  # no directory: nothing to do


def test_a_records_lookalike_of_another_owner_is_kept(state: Path) -> None:
    store = StateStore(state)
    owner = Owner("afxdp", "c1", "net1")
    other = store.path(Owner("afxdp", "c1", "net1.tmp.1.2"))  # a real record, not a leftover
    other.parent.mkdir(parents=True, exist_ok=True)
    other.write_text("{}")
    assert store.remove(owner) is False
    assert other.exists()
