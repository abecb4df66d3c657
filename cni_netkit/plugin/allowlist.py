"""Which masters and queues this node lets a network config lease: closed by default.

A network config is not the node admin's alone (with Multus anyone who may
create a NetworkAttachmentDefinition in a namespace writes it), so ADD leases
only queues the admin declared, in one of two places:

- **the agent's pools** (the ``cni-netkit-pools`` ConfigMap): the node agent
  writes them to ``<stateDir>/policy/pools.json`` (:func:`write`), with each
  master's ifindex as the kernel knew it then;
- **``CNI_NETKIT_MASTERS``** in the runtime's environment
  (``eth1=8-15;eth2=0-3``).

Either alone is a declaration; with both, a queue must be in both (the
environment narrows the agent's pools). With neither, ADD is refused (7) with
a message naming both. Only ADD asks: DEL, CHECK, GC and STATUS of an
existing attachment never depend on the list, so narrowing it never strands
a pod's DEL.

The file is read on every ADD, by the executable and by the agent serving
the warm path alike (the same code, no copy kept in memory), and trusted only
if root could have written it alone (:func:`read`, docs/security.md): the
file and every directory above it owned by root, none writable by group or
others (a root-owned sticky directory such as ``/tmp`` is accepted above the
policy directory), the file a regular file reached through no symlink.
Anything else fails closed: ADD is refused with the reason.

On top of the declaration, a queue that the NIC's default RSS table points
at carries a share of the node's own traffic and is refused
(:func:`check_rss`): the agent's NIC preparation takes a pool's queues out of
that table (``agent.nicprep``), so a declared pool queue is leasable once the
agent has done so. A NIC whose driver has no RSS table to read
(``EOPNOTSUPP``, e.g. netdevsim) has no default spread the kernel can tell us
of: the admin's declaration is then all there is, and is trusted. Any other
failure to read the table refuses the ADD.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cni_netkit.config import MASTERS_ENV, NetConf, allowed_pools, parse_queue_pool
from cni_netkit.errors import InvalidConfig, KernelError

FORMAT_VERSION: Final = 1
POLICY_DIR: Final = "policy"
POLICY_FILE: Final = "pools.json"
DIR_MODE: Final = 0o755
FILE_MODE: Final = 0o644
MAX_FILE: Final = 1 << 20
TRUSTED_UID: Final = 0  # root: the agent writes the file, the plugin runs as root
_HOW: Final = (
    "declare the master and its queues in the agent's pools (ConfigMap cni-netkit-pools, "
    f"which the agent writes to <stateDir>/{POLICY_DIR}/{POLICY_FILE}) or in the runtime's "
    f"{MASTERS_ENV} (e.g. eth1=8-15)"
)

# The default RSS context's indirection table of a master (entry -> ring), None
# when the driver has none (EOPNOTSUPP); KernelError for any other failure
# (``KernelAPI.rss_table``).
RssReader = Callable[[str], Sequence[int] | None]


@dataclass(frozen=True)
class DeclaredPool:
    """One master's leasable queues; ``ifindex`` as the kernel knew it when declared."""

    master: str
    queues: frozenset[int]
    ifindex: int | None = None


def policy_path(state_dir: str | os.PathLike[str]) -> Path:
    """Where the agent writes the node's pools for the plugin: ``<stateDir>/policy/pools.json``."""
    return Path(state_dir) / POLICY_DIR / POLICY_FILE


# --- the agent's side: writing ------------------------------------------------------


def write(state_dir: str | os.PathLike[str], pools: Iterable[DeclaredPool]) -> Path:
    """Write the node's pools atomically (temp file, fsync, rename); return the path.

    The policy directory is made root's, 0755, the file 0644: readable by
    anyone, writable by root alone. The content only changes (and the
    ``generation`` only grows) when the pools do.
    """
    path = policy_path(state_dir)
    directory = path.parent
    directory.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory.mkdir(exist_ok=True, mode=DIR_MODE)
    st = directory.lstat()
    if not stat.S_ISDIR(st.st_mode):  # a symlink too: never written through
        raise InvalidConfig(f"{directory} is not a directory", "remove it; the agent makes it")
    if os.geteuid() == TRUSTED_UID and (st.st_uid, st.st_gid) != (TRUSTED_UID, 0):
        os.chown(directory, TRUSTED_UID, 0)  # ours, whoever made it
    directory.chmod(DIR_MODE)
    entries = sorted(
        ({"master": p.master, "ifindex": p.ifindex, "queues": sorted(p.queues)} for p in pools),
        key=lambda e: str(e["master"]),
    )
    previous = _previous(path)
    if previous is not None and previous.get("pools") == entries:
        return path  # unchanged: no write, no new generation
    generation = _int(previous.get("generation") if previous else None) + 1
    doc = {"version": FORMAT_VERSION, "generation": generation, "pools": entries}
    tmp = directory / f".{POLICY_FILE}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 FILE_MODE)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), FILE_MODE)  # whatever the umask
            json.dump(doc, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path


def withdraw(state_dir: str | os.PathLike[str]) -> bool:
    """Remove the agent's list (an agent without pools declares nothing); True if there was one."""
    try:
        policy_path(state_dir).unlink()
    except FileNotFoundError:
        return False
    return True


def _previous(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# --- the plugin's side: reading and deciding ---------------------------------------


def read(path: str | os.PathLike[str]) -> dict[str, DeclaredPool] | None:
    """The pools in the agent's file; None when there is no file.

    Raises InvalidConfig (7) when the file exists but cannot be trusted (see
    the module doc) or is not a policy of this version: fail closed.
    """
    p = Path(path)
    _check_trusted_dirs(p.parent)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _untrusted(p, "is a symlink") from None
        raise _untrusted(p, f"cannot be opened: {os.strerror(e.errno or errno.EIO)}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        problem = _ownership_problem(st)
        if not stat.S_ISREG(st.st_mode):
            problem = "is not a regular file"
        if problem:
            raise _untrusted(p, problem)
        data = f.read(MAX_FILE + 1)
    if len(data) > MAX_FILE:
        raise _malformed(p, f"larger than {MAX_FILE} bytes")
    return parse(data, source=str(p))


def parse(data: bytes, *, source: str) -> dict[str, DeclaredPool]:
    """The policy document's pools, master -> pool; InvalidConfig naming what is wrong."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _malformed(source, f"not JSON: {str(e)[:120]}") from None
    if not isinstance(doc, dict):
        raise _malformed(source, "not a JSON object")
    if doc.get("version") != FORMAT_VERSION:
        raise _malformed(source, f"version {doc.get('version')!r}, this plugin reads "
                                 f"{FORMAT_VERSION}")
    entries = doc.get("pools")
    if not isinstance(entries, list):
        raise _malformed(source, '"pools" must be a list')
    pools: dict[str, DeclaredPool] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("master"), str):
            raise _malformed(source, f"pools[{i}] needs a master name")
        master = entry["master"]
        ifindex = entry.get("ifindex")
        if ifindex is not None and (not isinstance(ifindex, int) or isinstance(ifindex, bool)
                                    or ifindex < 1):
            raise _malformed(source, f"pools[{i}].ifindex must be a positive integer or null")
        try:
            queues = frozenset(parse_queue_pool(entry.get("queues")))
        except ValueError as e:
            raise _malformed(source, f"pools[{i}].queues: {e}") from None
        if master in pools:
            raise _malformed(source, f"master {master} is listed twice")
        pools[master] = DeclaredPool(master, queues, ifindex)
    return pools


def declared(
    environ: Mapping[str, str], state_dir: str | os.PathLike[str]
) -> tuple[dict[str, DeclaredPool], str] | None:
    """What the admin declared: (master -> pool, where it was said), or None for nothing.

    The agent's file and ``CNI_NETKIT_MASTERS`` together: a queue in both.
    """
    path = policy_path(state_dir)
    from_file = read(path)
    from_env = allowed_pools(environ)
    if from_env is None:
        if from_file is None:
            return None
        return from_file, f"the agent's pools in {path}"
    env_pools = {m: DeclaredPool(m, q) for m, q in from_env.items()}
    if from_file is None:
        return env_pools, f"the node's {MASTERS_ENV}"
    both = {
        m: DeclaredPool(m, p.queues & env_pools[m].queues, p.ifindex)
        for m, p in from_file.items()
        if m in env_pools
    }
    return both, f"the agent's pools in {path} narrowed by the node's {MASTERS_ENV}"


def check_declared(
    cfg: NetConf, environ: Mapping[str, str], master_ifindex: int | None
) -> None:
    """InvalidConfig (7) unless the admin declared ``cfg.master`` and all of ``cfg.queues``.

    ``master_ifindex``: the master's ifindex now (None: no such device; the
    caller reports that). A master the agent declared under another ifindex
    was renamed or replaced since, and is refused until the agent rewrites
    the list.
    """
    found = declared(environ, cfg.state_dir)
    if found is None:
        raise InvalidConfig(
            "no master is declared for leasing on this node",
            f"to lease queues of {cfg.master}, {_HOW}",
        )
    pools, source = found
    pool = pools.get(cfg.master)
    if pool is None:
        raise InvalidConfig(
            f"master {cfg.master} is not a NIC this node leases queues of",
            f"declared: {', '.join(sorted(pools)) or 'none'} (by {source}); {_HOW}",
        )
    outside = sorted(set(cfg.queues) - pool.queues)
    if outside:
        raise InvalidConfig(
            f"queues {_spans(outside)} of {cfg.master} are not declared for leasing",
            f"declared on {cfg.master}: {_spans(sorted(pool.queues)) or 'none'} (by {source})",
        )
    if pool.ifindex is not None and master_ifindex is not None and (
        pool.ifindex != master_ifindex
    ):
        raise InvalidConfig(
            f"master {cfg.master} is ifindex {master_ifindex}, declared as ifindex "
            f"{pool.ifindex}",
            f"the NIC was renamed or replaced since {source} was written; "
            "the agent rewrites it on its next pass",
        )


def check_rss(cfg: NetConf, rss_table: RssReader) -> None:
    """InvalidConfig (7) when a queue of ``cfg.queues`` carries the NIC's default RSS traffic.

    See the module doc for a NIC without an RSS table (allowed) and a table
    that cannot be read (refused).
    """
    try:
        table = rss_table(cfg.master)
    except KernelError as e:
        raise InvalidConfig(
            f"cannot tell whether queues of {cfg.master} carry the node's RSS traffic",
            f"reading its RSS indirection table failed: {e}",
        ) from None
    if table is None:
        return
    hot = sorted(set(cfg.queues) & set(table))
    if hot:
        raise InvalidConfig(
            f"queues {_spans(hot)} of {cfg.master} carry the NIC's default RSS traffic",
            "the node's own flows land there; list them in the agent's pool "
            "(which takes a pool's queues out of RSS) or exclude them with ethtool -X",
        )


def _untrusted(path: str | os.PathLike[str], problem: str) -> InvalidConfig:
    return InvalidConfig(
        f"the node's pool list {path} {problem}: refusing to trust it",
        "it must be a regular file owned by root and writable by root alone, in "
        "directories owned by root that no one else can write; the agent writes it so",
    )


def _malformed(source: str | os.PathLike[str], problem: str) -> InvalidConfig:
    return InvalidConfig(
        f"the node's pool list {source} is malformed: {problem}",
        "the agent rewrites it from its ConfigMap; until then no queue is leasable",
    )


def _ownership_problem(st: os.stat_result) -> str | None:
    if st.st_uid != TRUSTED_UID:
        return f"is owned by uid {st.st_uid}, not root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _check_trusted_dirs(directory: Path) -> None:
    """The policy directory and each one above it: root's, and no one else may change them.

    Checked as named (a symlink above the policy directory is accepted when
    root's: its own directory is checked next) and as resolved. Above the
    policy directory a root-owned sticky directory (``/tmp``) is accepted:
    there no one but root can rename or remove root's entries.
    """
    if not directory.is_absolute():
        raise _untrusted(directory, "is not an absolute path")
    _check_chain(directory, links=True)
    _check_chain(Path(os.path.realpath(directory)), links=False)


def _check_chain(directory: Path, *, links: bool) -> None:
    for i, d in enumerate([directory, *directory.parents]):
        try:
            st = d.lstat()
        except FileNotFoundError:
            continue  # nothing there yet: no file below it either
        except OSError as e:
            why = os.strerror(e.errno or errno.EIO)
            raise _untrusted(d, f"cannot be examined: {why}") from None
        if st.st_uid != TRUSTED_UID:
            raise _untrusted(d, f"is owned by uid {st.st_uid}, not root")
        if stat.S_ISLNK(st.st_mode):
            if i == 0 or not links:
                raise _untrusted(d, "is a symlink")
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise _untrusted(d, "is not a directory")
        sticky = bool(st.st_mode & stat.S_ISVTX) and i > 0
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky:
            raise _untrusted(d, f"is writable by group or others "
                                f"(mode {stat.S_IMODE(st.st_mode):04o})")


def _spans(ids: Sequence[int]) -> str:
    """Sorted ``[1, 2, 3, 7]`` as ``"1-3,7"``."""
    runs: list[list[int]] = []
    for q in ids:
        if runs and q == runs[-1][1] + 1:
            runs[-1][1] = q
        else:
            runs.append([q, q])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
