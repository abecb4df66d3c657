"""Installing the host artifact into a CNI bin dir: atomic, idempotent, cleans up after itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from cni_netkit.agent import install as inst

SCRIPT = "#!/bin/sh\necho {version}\n"


def make_artifact(root: Path, version: str) -> Path:
    """A stand-in artifact shaped like PyInstaller's onedir output."""
    root.mkdir(parents=True)
    exe = root / "netkit"
    exe.write_text(SCRIPT.format(version=version))
    exe.chmod(0o755)
    (root / "_internal").mkdir()
    (root / "_internal" / "lib.so").write_bytes(os.urandom(4096))
    (root / "_internal" / "lib.so.1").symlink_to("lib.so")
    return root


def run(link: Path) -> str:
    return subprocess.run([str(link)], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    d = tmp_path / "opt-cni-bin"
    d.mkdir()
    return d


def entries(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()} - {".netkit.lock"}


def test_install_creates_relative_link_into_versioned_dir(tmp_path: Path, bin_dir: Path) -> None:
    art = make_artifact(tmp_path / "a1", "v1")
    res = inst.install(art, bin_dir, version="0.1.0")
    assert res.changed
    target = str((bin_dir / "netkit").readlink())
    # Relative: resolves the same from the host and from the agent's mount of the bin dir.
    assert not Path(target).is_absolute()
    assert target == f"{res.version_dir.name}/netkit"
    assert res.version_dir.name.startswith(".netkit-0.1.0-")
    assert inst.tree_hash(res.version_dir) == inst.tree_hash(art)
    assert os.access(res.version_dir / "netkit", os.X_OK)
    assert (res.version_dir / "_internal" / "lib.so.1").readlink() == Path("lib.so")
    assert run(bin_dir / "netkit") == "v1"


def test_installing_the_same_content_again_changes_nothing(tmp_path: Path, bin_dir: Path) -> None:
    art = make_artifact(tmp_path / "a1", "v1")
    first = inst.install(art, bin_dir, version="0.1.0")
    mtime = (bin_dir / "netkit").lstat().st_mtime_ns
    again = inst.install(art, bin_dir, version="0.1.0")
    assert not again.changed
    assert again.version_dir == first.version_dir
    assert (bin_dir / "netkit").lstat().st_mtime_ns == mtime  # the link was not even rewritten


def test_same_content_from_another_copy_is_still_a_noop(tmp_path: Path, bin_dir: Path) -> None:
    art = make_artifact(tmp_path / "a1", "v1")
    inst.install(art, bin_dir, version="0.1.0")
    copy = tmp_path / "copy"
    shutil.copytree(art, copy, symlinks=True)
    assert not inst.install(copy, bin_dir, version="0.1.0").changed


def test_upgrade_switches_the_link_and_keeps_the_two_previous_versions(
    tmp_path: Path, bin_dir: Path
) -> None:
    v1 = inst.install(make_artifact(tmp_path / "a1", "v1"), bin_dir, version="0.1.0")
    v2 = inst.install(make_artifact(tmp_path / "a2", "v2"), bin_dir, version="0.2.0")
    assert v2.changed and run(bin_dir / "netkit") == "v2"
    # The version just replaced stays: a runtime may be executing it right now.
    assert v1.version_dir.is_dir()
    v3 = inst.install(make_artifact(tmp_path / "a3", "v3"), bin_dir, version="0.3.0")
    assert run(bin_dir / "netkit") == "v3"
    # ... and so does the one before: a cold plugin started at N-2 may still be running.
    assert v3.removed == () and v1.version_dir.is_dir()
    v4 = inst.install(make_artifact(tmp_path / "a4", "v4"), bin_dir, version="0.4.0")
    assert v4.removed == (v1.version_dir,)
    assert entries(bin_dir) == {"netkit", v2.version_dir.name, v3.version_dir.name,
                                v4.version_dir.name}


def test_changed_content_with_the_same_version_is_installed(tmp_path: Path, bin_dir: Path) -> None:
    a = inst.install(make_artifact(tmp_path / "a1", "one"), bin_dir, version="0.1.0")
    b = inst.install(make_artifact(tmp_path / "a2", "two"), bin_dir, version="0.1.0")
    assert b.changed and a.version_dir != b.version_dir
    assert run(bin_dir / "netkit") == "two"


def test_crash_mid_copy_leaves_no_half_written_netkit(
    tmp_path: Path, bin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inst.install(make_artifact(tmp_path / "a1", "v1"), bin_dir, version="0.1.0")
    real_copy = inst.copy_file
    copied: list[Path] = []

    def dying_copy(src: Path, dst: Path) -> None:
        if copied:  # the first file made it, the second "crashes" half-way
            dst.write_bytes(src.read_bytes()[:10])
            raise KeyboardInterrupt("agent killed mid-copy")
        real_copy(src, dst)
        copied.append(dst)

    monkeypatch.setattr(inst, "copy_file", dying_copy)
    with pytest.raises(KeyboardInterrupt):
        inst.install(make_artifact(tmp_path / "a2", "v2"), bin_dir, version="0.2.0")
    # The old version is still what runs, complete.
    assert run(bin_dir / "netkit") == "v1"
    leftovers = [p for p in bin_dir.iterdir() if ".tmp-" in p.name]
    assert leftovers, "the simulated crash should have left the temp dir behind"

    monkeypatch.setattr(inst, "copy_file", real_copy)
    res = inst.install(make_artifact(tmp_path / "a2b", "v2"), bin_dir, version="0.2.0")
    assert run(bin_dir / "netkit") == "v2"
    assert set(leftovers) <= set(res.removed)
    assert not [p for p in bin_dir.iterdir() if ".tmp-" in p.name]


def test_fresh_install_that_crashes_leaves_no_netkit_at_all(
    tmp_path: Path, bin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def dying_copy(src: Path, dst: Path) -> None:
        dst.write_bytes(b"#!/bin/sh\n")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(inst, "copy_file", dying_copy)
    with pytest.raises(OSError, match="No space"):
        inst.install(make_artifact(tmp_path / "a1", "v1"), bin_dir, version="0.1.0")
    assert not (bin_dir / "netkit").exists()
    assert not (bin_dir / "netkit").is_symlink()


def test_corrupt_version_dir_is_rebuilt(tmp_path: Path, bin_dir: Path) -> None:
    art = make_artifact(tmp_path / "a1", "v1")
    res = inst.install(art, bin_dir, version="0.1.0")
    (res.version_dir / "_internal" / "lib.so").write_bytes(b"truncated")
    again = inst.install(art, bin_dir, version="0.1.0")
    assert again.changed
    assert inst.tree_hash(again.version_dir) == inst.tree_hash(art)


def test_a_plain_file_from_an_older_install_is_replaced(tmp_path: Path, bin_dir: Path) -> None:
    (bin_dir / "netkit").write_text("old single-file binary")
    inst.install(make_artifact(tmp_path / "a1", "v1"), bin_dir, version="0.1.0")
    assert (bin_dir / "netkit").is_symlink()
    assert run(bin_dir / "netkit") == "v1"


def test_other_plugins_in_the_bin_dir_are_untouched(tmp_path: Path, bin_dir: Path) -> None:
    (bin_dir / "host-local").write_text("ipam")
    (bin_dir / "netkit-other").write_text("not ours")
    inst.install(make_artifact(tmp_path / "a1", "v1"), bin_dir, version="0.1.0")
    inst.install(make_artifact(tmp_path / "a2", "v2"), bin_dir, version="0.2.0")
    inst.install(make_artifact(tmp_path / "a3", "v3"), bin_dir, version="0.3.0")
    inst.uninstall(bin_dir)
    assert entries(bin_dir) == {"host-local", "netkit-other"}


def test_an_old_version_still_executing_is_kept(tmp_path: Path, bin_dir: Path) -> None:
    v1 = inst.install(make_artifact(tmp_path / "a1", "v1"), bin_dir, version="0.1.0")
    # Make the v1 executable a long-running real binary, as an in-flight CNI call would be.
    exe = v1.version_dir / "netkit"
    exe.unlink()
    shutil.copy2(shutil.which("sleep") or "/bin/sleep", exe)
    proc = subprocess.Popen([str(exe), "30"])
    try:
        deadline = time.monotonic() + 5
        while not inst._executing(exe) and time.monotonic() < deadline:
            time.sleep(0.01)  # until the exec has happened
        inst.install(make_artifact(tmp_path / "a2", "v2"), bin_dir, version="0.2.0")
        v3 = inst.install(make_artifact(tmp_path / "a3", "v3"), bin_dir, version="0.3.0")
        assert v1.version_dir.is_dir()
        assert v1.version_dir not in v3.removed
    finally:
        proc.kill()
        proc.wait()
    v4 = inst.install(make_artifact(tmp_path / "a4", "v4"), bin_dir, version="0.4.0")
    assert v1.version_dir in v4.removed


def test_uninstall_leaves_a_foreign_netkit_alone(bin_dir: Path) -> None:
    (bin_dir / "netkit").write_text("someone else's netkit plugin")
    assert inst.uninstall(bin_dir) == ()
    assert (bin_dir / "netkit").read_text() == "someone else's netkit plugin"


def test_missing_executable_is_refused(tmp_path: Path, bin_dir: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        inst.install(tmp_path / "empty", bin_dir, version="0.1.0")
    assert entries(bin_dir) == set()


def test_uninstall_from_a_missing_bin_dir_is_a_noop(tmp_path: Path) -> None:
    assert inst.uninstall(tmp_path / "never-created") == ()
