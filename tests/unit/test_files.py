"""The plugin's own files: private, and never reached through something planted in their place."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from cni_netkit.errors import IOFailure
from cni_netkit.plugin.files import private_dir
from cni_netkit.plugin.lock import master_lock
from cni_netkit.plugin.state import Attachment, CorruptRecord, Owner, StateStore


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def attachment(owner: Owner) -> Attachment:
    return Attachment(container_id=owner.container_id, ifname=owner.ifname,
                      netns="/var/run/netns/p", network=owner.network, master="eth0",
                      pairing="single", mode="l2", mac=None, mtu=None, queues=())


def test_state_lock_and_record_are_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    os.umask(0o022)
    with master_lock(str(state), "eth0", 1.0):
        pass
    store = StateStore(state)
    owner = Owner("afxdp", "c1", "net1")
    store.save(attachment(owner))
    assert (mode(state), mode(state / "locks"), mode(state / "attachments")) == (0o700,) * 3
    assert mode(state / "locks" / "eth0.lock") == 0o600
    assert mode(store.path(owner)) == 0o600
    assert [p.name for p in (state / "attachments").iterdir()] == [store.path(owner).name]


@pytest.mark.parametrize("how", ["symlink", "group-writable", "world-writable", "other-owner",
                                 "a file"])
def test_a_state_dir_others_could_change_is_refused(tmp_path: Path, how: str) -> None:
    state = tmp_path / "state"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if how == "symlink":
        state.symlink_to(elsewhere)
    elif how == "a file":
        state.write_text("")
    else:
        state.mkdir(mode=0o700)
        if how == "group-writable":
            state.chmod(0o770)
        elif how == "world-writable":
            state.chmod(0o1777)
        else:
            os.chown(state, 4242, 4242)
    with pytest.raises((IOFailure, FileExistsError)), master_lock(str(state), "eth0", 1.0):
        pass
    with pytest.raises((IOFailure, FileExistsError)):
        StateStore(state).save(attachment(Owner("afxdp", "c1", "net1")))
    assert list(elsewhere.iterdir()) == []  # nothing written through the link


def test_private_dir_names_the_problem(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir(mode=0o700)
    d.chmod(0o777)
    with pytest.raises(IOFailure, match=r"writable by group or others \(mode 0777\)"):
        private_dir(d)


def test_a_symlink_planted_as_the_lock_file_is_not_followed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "locks").mkdir(parents=True, mode=0o700)
    state.chmod(0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (state / "locks" / "eth0.lock").symlink_to(victim)
    with (pytest.raises(OSError, match="Too many levels of symbolic links"),
          master_lock(str(state), "eth0", 1.0)):
        pass
    assert victim.read_text() == "precious"


def test_records_are_written_and_read_never_through_a_symlink(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    owner = Owner("afxdp", "c1", "net1")
    store.save(attachment(owner))
    victim = tmp_path / "victim"
    victim.write_text(json.dumps(attachment(Owner("afxdp", "forged", "net1")).to_json()))
    # A symlink at the temporary name (our pid and thread) is replaced, not written through.
    tmp = store.path(owner).with_suffix(f".tmp.{os.getpid()}.{threading.get_native_id()}")
    tmp.symlink_to(victim)
    before = victim.read_text()
    store.save(attachment(owner))
    assert victim.read_text() == before
    assert not tmp.exists() and not tmp.is_symlink()
    # A record replaced by a symlink is neither loaded nor listed: it is a corrupt one.
    store.path(owner).unlink()
    store.path(owner).symlink_to(victim)
    with pytest.raises(CorruptRecord, match="Too many levels of symbolic links"):
        store.load(owner)
    assert list(store) == []
    assert [c.path for c in store.corrupt()] == [store.path(owner)]


@pytest.mark.parametrize("once", [False, True])
def test_a_store_rechecks_its_dirs_on_each_save_unless_it_serves_one_request(
    tmp_path: Path, once: bool
) -> None:
    state = tmp_path / "state"
    store = StateStore(state, check_dirs_once=once)
    store.save(attachment(Owner("afxdp", "c1", "net1")))
    (state / "attachments").chmod(0o777)  # after the first save: the request already checked

    if once:
        store.save(attachment(Owner("afxdp", "c1", "net1")))
    else:
        with pytest.raises(IOFailure, match="writable by group or others"):
            store.save(attachment(Owner("afxdp", "c1", "net1")))
    # a new store (the next request) checks again
    with pytest.raises(IOFailure, match="writable by group or others"):
        StateStore(state, check_dirs_once=True).save(attachment(Owner("afxdp", "c2", "net1")))


def test_two_threads_saving_one_owners_record_never_remove_each_others_temp_file(
    tmp_path: Path,
) -> None:
    # The agent serves requests from threads of one process: two for one owner at once.
    store = StateStore(tmp_path / "state")
    owner = Owner("afxdp", "c1", "net1")
    store.save(attachment(owner))
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def saver() -> None:
        start.wait()
        for _ in range(300):
            try:
                store.save(attachment(owner))
            except OSError as e:
                errors.append(e)

    threads = [threading.Thread(target=saver) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert store.load(owner) == attachment(owner)
