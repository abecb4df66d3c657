"""Install the host artifact into the node's CNI bin dir, atomically and idempotently.

The artifact (``scripts/build-artifact``) is a directory: the ``netkit``
executable (the thin C client, ``cni/shim.c``) next to ``netkit-plugin``
(the PyInstaller-built plugin it execs when the node agent does not serve a
request) and ``_internal/``. In the bin dir it lives as::

    .netkit-<version>-<hash12>/netkit        (+ netkit-plugin, _internal/)
    netkit -> .netkit-<version>-<hash12>/netkit

Both the thin client (for ``netkit-plugin``) and the PyInstaller bootloader
(for ``_internal``) find their neighbours through ``/proc/self/exe``, so
running it through the symlink works (``tests/unit/test_artifact.py``
checks). The whole directory is one unit: hashed, copied and verified
together, so the client never execs a plugin of another version. The symlink
is relative because the agent sees the host's bin dir under another mount
point (``/host/opt/cni/bin``) than the host does.

Atomicity: the versioned directory is written under a temp name, every file
and directory fsynced, verified against the artifact's content hash, then
renamed into place; only then is ``netkit`` switched, by renaming a temp
symlink over it. A runtime calling ``netkit`` at any moment sees the old
complete version or the new complete one, never a half-written binary, and a
crash anywhere leaves at most a ``*.tmp-*`` entry the next install removes.

Idempotence: the version dir is named after the content hash, so installing
the same artifact again finds it in place and changes nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("cni_netkit.agent.install")

_CHUNK = 1 << 20
# Replaced versions kept besides the current one. A cold invocation resolved
# the link when it started and runs the plugin of that version for as long as
# it takes (IPAM alone may take a minute); the agent (no hostPID) cannot see
# it. Two kept: a plugin started at N-2 survives two upgrades in a row.
KEEP_OLD_VERSIONS = 2


@dataclass(frozen=True)
class InstallResult:
    """What one ``install`` did."""

    link: Path  # bin_dir/name, the path kubelet executes
    version_dir: Path  # the directory the link now points into
    changed: bool  # False: the same content was already installed
    removed: tuple[Path, ...] = ()  # old version dirs and leftovers cleaned up


def tree_hash(root: Path) -> str:
    """SHA-256 over a directory's relative paths, executable bits, link targets and contents."""
    h = hashlib.sha256()
    for path in sorted(_walk(root)):
        rel = path.relative_to(root).as_posix()
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            h.update(f"L {rel} {path.readlink()}\n".encode())
        elif stat.S_ISDIR(st.st_mode):
            h.update(f"D {rel}\n".encode())
        else:
            h.update(f"F {rel} {'x' if st.st_mode & 0o111 else '-'} {st.st_size}\n".encode())
            with path.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
    return h.hexdigest()


def install(artifact: Path, bin_dir: Path, *, version: str, name: str = "netkit") -> InstallResult:
    """Make ``bin_dir/name`` run the artifact in directory ``artifact``.

    ``artifact`` must hold an executable called ``name``. Old version dirs are
    removed except the ``KEEP_OLD_VERSIONS`` most recently replaced (a runtime
    may be executing them right now) and any whose executable a visible
    process is running.
    """
    if not (artifact / name).is_file():
        raise FileNotFoundError(f"{artifact / name}: not an artifact (no {name} executable)")
    digest = tree_hash(artifact)
    vdir = bin_dir / f".{name}-{version}-{digest[:12]}"
    link = bin_dir / name
    target = f"{vdir.name}/{name}"
    with _locked(bin_dir, name):
        removed = _remove_leftovers(bin_dir, name)
        previous = _link_target(link)
        if previous == target and vdir.is_dir() and tree_hash(vdir) == digest:
            return InstallResult(link, vdir, changed=False, removed=removed)
        if not (vdir.is_dir() and tree_hash(vdir) == digest):
            _install_dir(artifact, vdir, digest)
        _swap_link(link, target)
        log.info("installed CNI executable", link=str(link), target=target, previous=previous)
        if previous is not None:
            # Its retirement time: old versions are kept newest-retired first.
            with contextlib.suppress(OSError):
                os.utime(bin_dir / previous.split("/", 1)[0])
        removed += _remove_old_versions(bin_dir, name, {vdir.name}, retired=KEEP_OLD_VERSIONS)
        return InstallResult(link, vdir, changed=True, removed=removed)


def uninstall(bin_dir: Path, *, name: str = "netkit") -> tuple[Path, ...]:
    """Remove the link and every version dir we installed; returns what was removed.

    A ``name`` that is not our symlink (someone else's plugin of that name) is left alone.
    """
    if not bin_dir.is_dir():
        return ()  # nothing was ever installed there
    removed: list[Path] = []
    with _locked(bin_dir, name):
        link = bin_dir / name
        target = _link_target(link)
        if target is not None and target.startswith(f".{name}-"):
            link.unlink()
            removed.append(link)
        removed += _remove_leftovers(bin_dir, name)
        removed += _remove_old_versions(bin_dir, name, keep=set())
        (bin_dir / f".{name}.lock").unlink()
        _fsync_dir(bin_dir)
    return tuple(removed)


# --- steps -------------------------------------------------------------------


def _install_dir(artifact: Path, vdir: Path, digest: str) -> None:
    """Copy ``artifact`` to ``vdir`` through a temp dir, verified and durable before the rename."""
    tmp = vdir.with_name(f"{vdir.name}.tmp-{os.getpid()}")
    _rmtree(tmp)
    copy_tree(artifact, tmp)
    got = tree_hash(tmp)
    if got != digest:  # the artifact changed under us, or the copy is bad: never publish it
        _rmtree(tmp)
        raise OSError(errno.EIO, f"copy of {artifact} hashes to {got[:12]}, expected {digest[:12]}")
    _rmtree(vdir)  # a same-named dir that failed the hash check above: corrupt, replace it
    tmp.rename(vdir)
    _fsync_dir(vdir.parent)


def copy_tree(src: Path, dst: Path) -> None:
    """Copy a tree, fsyncing every file and directory (the rename that follows must not
    be persisted before the data it names)."""
    dst.mkdir(mode=0o755)
    for entry in sorted(src.iterdir()):
        out = dst / entry.name
        if entry.is_symlink():
            out.symlink_to(entry.readlink())
        elif entry.is_dir():
            copy_tree(entry, out)
        else:
            copy_file(entry, out)
    _fsync_dir(dst)


def copy_file(src: Path, dst: Path) -> None:
    """Copy one regular file with its permission bits and fsync it."""
    mode = stat.S_IMODE(src.stat().st_mode)
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
        shutil.copyfileobj(inp, out, _CHUNK)
        out.flush()
        os.fchmod(out.fileno(), mode)  # O_CREAT's mode is filtered by the umask
        os.fsync(out.fileno())


def _swap_link(link: Path, target: str) -> None:
    if link.is_dir() and not link.is_symlink():
        raise IsADirectoryError(f"{link} is a directory; refusing to replace it")
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(target)
    tmp.replace(link)  # rename(2): atomic, also over a plain file from an older install
    _fsync_dir(link.parent)


def _remove_leftovers(bin_dir: Path, name: str) -> tuple[Path, ...]:
    """Temp entries of an install that died: under the lock, none of them is live."""
    gone = []
    for p in bin_dir.glob(f".{name}*.tmp-*"):
        _rmtree(p)
        gone.append(p)
    return tuple(gone)


def _remove_old_versions(
    bin_dir: Path, name: str, keep: set[str], *, retired: int = 0
) -> tuple[Path, ...]:
    """Remove version dirs but ``keep`` and the ``retired`` most recently replaced ones."""
    gone = []
    old = [p for p in bin_dir.glob(f".{name}-*")
           if p.name not in keep and ".tmp-" not in p.name and p.is_dir()]
    old.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for p in old[retired:]:
        # A process that fell back to the plugin runs ``<name>-plugin`` (same pid, exec'd).
        if _executing(p / name) or _executing(p / f"{name}-plugin"):
            log.info("keeping old version: a process still runs it", path=str(p))
            continue
        _rmtree(p)
        gone.append(p)
    return tuple(gone)


def _executing(exe: Path) -> bool:
    """Whether a process we can see runs ``exe``.

    Compared by device and inode, because the agent sees the bin dir under a
    different path than the host processes' ``/proc/PID/exe`` names. Only
    processes in the agent's PID namespace are visible; the kept previous
    versions (``KEEP_OLD_VERSIONS``) cover calls that are in flight elsewhere.
    """
    try:
        want = exe.stat()
    except FileNotFoundError:
        return False
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            st = (proc / "exe").stat()
        except OSError:  # gone, a kernel thread, or not ours to read
            continue
        if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
            return True
    return False


def _link_target(link: Path) -> str | None:
    try:
        return str(link.readlink())
    except OSError:  # absent, or a plain file (EINVAL)
        return None


@contextlib.contextmanager
def _locked(bin_dir: Path, name: str) -> Iterator[None]:
    """One installer at a time per bin dir (a DaemonSet rollout can briefly overlap two agents)."""
    fd = os.open(bin_dir / f".{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rmtree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for d in dirnames:
            yield base / d
        for f in filenames:
            yield base / f
