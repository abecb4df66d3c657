"""AF_XDP steering of one attachment: what ADD, DEL, CHECK, STATUS and GC add for it.

On a master the node agent has set up (``kernel.xsk.ensure_program`` pinned
its maps and attached the XDP program), ADD of a ``single`` netkit gives the
attachment its own XSK map, pinned on the node's bpffs (and, with
``xskMapVolume``, again on a bpffs of the pod's own in its emptyDir), and
wires every leased physical queue into the master's outer map:

    physical queue q (leased as netkit queue k)  ->  this map, index k

Index = the queue id on the pod's netkit, so an application keying its
sockets by queue id needs no arithmetic; QEMU puts queue i's socket at
``map-start-index + i`` and binds it to netkit queue ``start-queue + i``, so
``map-start-index`` is ``start-queue`` (the lowest leased netkit queue id).

A pod sees only its own map, and the program consults only the map wired
at the queue's own slot: writing any socket into any index of one pod's map
can never redirect another pod's queue.

Masters without the agent's maps (no agent, or AF_XDP steering not wanted)
get leases only, as before: the result then has no ``mapPath``. Pair mode
never gets a map: the kernel refuses AF_XDP on a netkit pair.

Pins (``kernel.bpffs.bpf_root()``, default ``/sys/fs/bpf/cni-netkit``)::

    pods/<k8s namespace>/<pod name>/<attachment key>   with K8S_POD_* args
    containers/<attachment key>                        without

The file name is the attachment's record key (network, container id,
ifname), so GC can tell whose a pin is even when the record is lost. With
``xskMapVolume`` the same name is pinned on a fresh bpffs instance that ADD
mounts on ``cni-netkit/`` of the pod's emptyDir of that name (``_deliver``):
the pod's spec names no node path, so it can reach no other pod's pin nor
the master's maps. Beside it goes the attachment's lease file
(``plugin.leasefile``); with ``xskMapSubdir`` both sit in that directory of
the volume (KubeVirt's hook sidecar N sees only ``hook-sidecar-N``).

``kernel.xsk`` (ctypes, libbpf) is imported only where a master has steering
or an attachment has a map: other requests pay one path check.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from cni_netkit.config import NetConf
from cni_netkit.errors import (
    CheckFailed,
    Degraded,
    InvalidConfig,
    IOFailure,
    NetkitError,
    NotAvailable,
)
from cni_netkit.kernel import bpffs
from cni_netkit.kernel.types import KernelAPI
from cni_netkit.plugin import leasefile
from cni_netkit.plugin.lock import master_lock
from cni_netkit.plugin.state import Attachment, LeasedQueue, Owner, StateStore, attachment_key

if TYPE_CHECKING:
    from cni_netkit.kernel import xsk

log = structlog.get_logger("cni_netkit.plugin")

# Keys of Attachment.extra (the agent publishes map_path and map_start_index).
MAP_PATH = "map_path"
MAP_START_INDEX = "map_start_index"
MAP_ID = "map_id"
XSK_MODE = "xsk_mode"
VOLUME_PIN = "volume_pin"  # the second pin, on the pod's own bpffs in its volume (host path)
POD_MAP_PATH = "pod_map_path"  # that pin as the pod's workload sees it
LEASE_FILE = "lease_file"  # the attachment's lease file beside it (host path)
POD_UID = "pod_uid"

# Kubernetes namespace and pod names (DNS-1123 subdomain): safe as path components.
_K8S_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")
# A pod's metadata.uid: a UUID (a hash for static pods); one safe path component.
_POD_UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
EMPTY_DIR = "kubernetes.io~empty-dir"  # the kubelet's directory of a pod's emptyDir volumes
# The pod's bpffs is mounted on this directory of its volume, so that the volume
# stays usable for what else the pod keeps there (virt-launcher's "private").
POD_BPFFS = "cni-netkit"


# --- pure decisions --------------------------------------------------------------------


def pin_path(
    root: Path, owner: Owner, pod_namespace: str | None, pod_name: str | None
) -> Path:
    """Where the attachment's XSK map is pinned (see the module docstring)."""
    key = attachment_key(owner.network, owner.container_id, owner.ifname)
    if _is_k8s_name(pod_namespace) and _is_k8s_name(pod_name):
        return root / "pods" / str(pod_namespace) / str(pod_name) / key
    return root / "containers" / key


def _is_k8s_name(name: str | None) -> bool:
    return bool(name) and name not in (".", "..") and _K8S_NAME.fullmatch(str(name)) is not None


def volume_dir(kubelet_root: str, pod_uid: str | None, volume: str) -> Path:
    """Where the kubelet keeps the pod's emptyDir ``volume`` on the node; InvalidEnvironment
    without a usable ``K8S_POD_UID`` (the pod's directory is named by it)."""
    if not pod_uid or not _POD_UID.fullmatch(pod_uid):
        from cni_netkit.errors import InvalidEnvironment  # noqa: PLC0415

        raise InvalidEnvironment(
            "xskMapVolume needs the pod's K8S_POD_UID in CNI_ARGS",
            f"got {pod_uid!r}: the map is delivered into <kubeletRoot>/pods/<uid>/volumes/"
            f"{EMPTY_DIR}/{volume}")
    return kubelet_pods(kubelet_root) / pod_uid / "volumes" / EMPTY_DIR / volume


def kubelet_pods(kubelet_root: str) -> Path:
    """``<kubeletRoot>/pods`` with the root's links resolved, as /proc/self/mountinfo
    names the mounts below it (a node's /var/lib/kubelet is often a link to a data
    disk). The root is one the node's admin allows (CNI_NETKIT_KUBELET_ROOTS)."""
    return Path(os.path.realpath(kubelet_root)) / "pods"


def slots(queues: Iterable[LeasedQueue]) -> tuple[xsk.XskSlot, ...]:
    """Each leased physical queue steered to the index of its queue id on the netkit."""
    from cni_netkit.kernel import xsk  # noqa: PLC0415 - see the module docstring

    return tuple(xsk.XskSlot(q.master_queue, q.netkit_queue) for q in sorted(
        queues, key=lambda q: q.netkit_queue))


def start_index(queues: Iterable[LeasedQueue]) -> int:
    """QEMU's ``map-start-index``: its first queue's socket goes to this index."""
    return min(q.netkit_queue for q in queues)


def wiring_problems(
    queues: Iterable[LeasedQueue], map_id: int, wired: dict[int, xsk.Wiring]
) -> list[str]:
    """How the outer map differs from what ADD wired for these queues (empty: as wired)."""
    problems = []
    for q in queues:
        w = wired.get(q.master_queue)
        if w is None:
            problems.append(f"queue {q.master_queue} is not wired")
        elif w.map_id != map_id:
            problems.append(f"queue {q.master_queue} goes to map id {w.map_id}, not {map_id}")
        elif w.index != q.netkit_queue:
            problems.append(f"queue {q.master_queue} goes to index {w.index}, "
                            f"not {q.netkit_queue}")
    return problems


def owner_of_pin(path: Path) -> Owner | None:
    """The owner named by a pin's file name (a readable record key); None otherwise."""
    parts = path.name.split(":")
    if len(parts) != 3 or not all(parts):
        return None  # a hashed key (very long container id) or not ours
    return Owner(*parts)


def dead_slots(wired: Iterable[int], leased: Iterable[int]) -> list[int]:
    """Wired queues no netkit leases any more: no socket can be bound behind them."""
    return sorted(set(wired) - set(leased))


# --- ADD -------------------------------------------------------------------------------


def xsk_mode(xdp_features: Iterable[str]) -> str:
    """How the kernel binds a socket that asks for no mode (QEMU's, DPDK's) on a netkit
    queue leased from a master with these xdp-features: zero-copy needs the master's."""
    return "zerocopy" if "xsk-zerocopy" in xdp_features else "copy"


def wire(cfg: NetConf, att: Attachment, undo: ExitStack, kernel: KernelAPI,
         master_ifindex: int) -> Attachment:
    """Create, pin and wire the attachment's XSK map; the attachment with it recorded.

    Pushes its undos onto ``undo``. Nothing happens for pair mode. On a master
    the agent has not set up there is no map; with ``xskMapVolume`` the pod
    still gets its lease file, saying why AF_XDP is unavailable (a KubeVirt
    sidecar then fails at once with that reason rather than wait for a lease).
    Records the mode the consumer's sockets will get (the master's AF_XDP
    capability, from netdev ``dev-get``).
    """
    if att.pairing != "single" or not att.queues:
        return att
    if not _steering(att.master):
        if cfg.xsk_map_volume is None:
            return att
        where, _ = _pod_dir(cfg, att.extra.get(POD_UID), undo)
        return _write_lease(where, att, undo)
    from cni_netkit.kernel import xsk  # noqa: PLC0415 - see the module docstring

    highest = max(q.netkit_queue for q in att.queues)
    if highest >= xsk.XSK_SLOTS:
        raise InvalidConfig(
            f"queuesPerAttachment {len(att.queues)} is too many for AF_XDP steering",
            f"netkit queue {highest} needs XSK map index {highest}; the maps have "
            f"{xsk.XSK_SLOTS} entries (0-{xsk.XSK_SLOTS - 1})",
        )
    root = bpffs.bpf_root()
    path = pin_path(root, att.owner, att.pod_namespace, att.pod_name)
    with master_lock(cfg.state_dir, att.master, cfg.lock_timeout):
        xsk_map = xsk.create_map(path, owner=cfg.map_owner)
        undo.callback(_quietly, "unpin XSK map", lambda: xsk.remove_map(path, prune_below=root))
        xsk.wire(att.master, xsk_map, slots(att.queues))
        undo.callback(_quietly, "unwire XSK map", _unwire, cfg, att.master,
                      [q.master_queue for q in att.queues], xsk_map.map_id)
    log.info("wired XSK map", map_path=xsk_map.path, map_id=xsk_map.map_id,
             slots=[(s.queue, s.index) for s in slots(att.queues)])
    mode = xsk_mode(kernel.dev_get(master_ifindex).xdp_features)
    extra = {**att.extra, MAP_PATH: xsk_map.path, MAP_START_INDEX: start_index(att.queues),
             MAP_ID: xsk_map.map_id, XSK_MODE: mode}
    if cfg.xsk_map_volume is None:
        return replace(att, extra=extra)
    where, seen = _pod_dir(cfg, att.extra.get(POD_UID), undo)
    extra |= _deliver(cfg, where, seen, path, undo)
    return _write_lease(where, replace(att, extra=extra), undo)


def _pod_dir(cfg: NetConf, pod_uid: str | None, undo: ExitStack) -> tuple[Path, str]:
    """The directory of the pod's emptyDir ``xskMapVolume`` that gets the pod's bpffs and
    lease file (its ``xskMapSubdir``, made if missing), on the node and as the pod sees it.

    The kubelet sets a pod's volumes up before the sandbox's CNI ADD, and
    makes a subPath directory when it starts that container, after it; it
    takes one that exists as it is.
    """
    volume = str(cfg.xsk_map_volume)
    where = volume_dir(cfg.kubelet_root, pod_uid, volume)
    seen = cfg.xsk_map_mount_path
    try:
        if cfg.xsk_map_subdir is None:
            if not where.is_dir():
                raise FileNotFoundError(where)
            return where, seen
        if leasefile.make_dir(where, cfg.xsk_map_subdir):
            undo.callback(_quietly, "remove the volume's directory",
                          leasefile.remove_dir_if_empty, where / cfg.xsk_map_subdir)
    except FileNotFoundError as e:
        raise InvalidConfig(
            f"the pod has no emptyDir volume {volume!r} for its XSK map",
            f"{where} is missing: declare volumes: [{{name: {volume}, emptyDir: {{}}}}] in the "
            f"pod spec and mount it at {cfg.xsk_map_mount_path} (xskMapVolume, "
            "xskMapMountPath; docs/af_xdp.md)") from e
    except OSError as e:  # a link or file planted at the directory's name, ...
        raise IOFailure(f"cannot make {where}/{cfg.xsk_map_subdir} for the XSK map",
                        e.strerror or str(e)) from e
    return where / cfg.xsk_map_subdir, f"{seen}/{cfg.xsk_map_subdir}"


def _deliver(cfg: NetConf, where: Path, seen: str, pin: Path, undo: ExitStack
             ) -> dict[str, str]:
    """Pin the map a second time on a bpffs instance of the pod's own, mounted on
    ``where`` (``_pod_dir``; ``seen`` in the pod): the record's keys for it (the pin, the
    path the pod sees).

    The containers are made after the sandbox's ADD, so each bind-mounts the
    volume with our mount on it. That instance holds this pod's pins only:
    nothing in the pod names the node's bpffs, the master's maps or another
    pod's map.
    """
    from cni_netkit.kernel import xsk  # noqa: PLC0415 - see the module docstring

    try:
        mounted = bpffs.mount_instance(where, POD_BPFFS)
    except OSError as e:  # a link or file planted at our directory, no CAP_SYS_ADMIN, ...
        raise IOFailure(f"cannot mount a bpffs for the XSK map on {where}/{POD_BPFFS}",
                        e.strerror or str(e)) from e
    instance = where / POD_BPFFS
    if mounted:  # else: another attachment of this pod mounted it
        undo.callback(_quietly, "unmount the pod's bpffs", _unmount_if_empty, instance)
    at = instance / pin.name
    xsk.pin_again(pin, at, owner=cfg.map_owner)
    undo.callback(_quietly, "unpin the pod's XSK map", at.unlink, True)
    log.info("delivered XSK map into the pod", volume=str(where), map_path=str(at))
    return {VOLUME_PIN: str(at), POD_MAP_PATH: f"{seen}/{POD_BPFFS}/{pin.name}"}


def _write_lease(where: Path, att: Attachment, undo: ExitStack) -> Attachment:
    """Write the attachment's lease file into ``where``; the attachment with it recorded."""
    lease = where / leasefile.file_name(att.ifname)
    try:
        leasefile.write(where, att)
    except OSError as e:  # a directory planted at its name, a full volume, ...
        raise IOFailure(f"cannot write the lease file {lease}", e.strerror or str(e)) from e
    undo.callback(_quietly, "remove the pod's lease file", leasefile.remove, lease, att.owner)
    log.info("wrote the pod's lease file", path=str(lease))
    return replace(att, extra={**att.extra, LEASE_FILE: str(lease)})


def _undeliver(cfg: NetConf, at: Path, owner: Owner) -> None:
    """Remove ``owner``'s pin ``at`` on a pod's bpffs and its lease file beside that bpffs,
    the instance once it holds no pin, and then an emptied ``xskMapSubdir``; all of it
    already gone is fine. No pin is touched unless a bpffs is mounted there (without it
    the path is a file of the pod's own volume), no lease file unless it is ``owner``'s."""
    base = at.parent.parent
    if leasefile.remove(base / leasefile.file_name(owner.ifname), owner):
        log.info("removed the pod's lease file", path=str(base / leasefile.file_name(
            owner.ifname)))
    if bpffs.is_instance(at.parent):
        if at.exists():
            at.unlink(missing_ok=True)
            log.info("unpinned the pod's XSK map", map_path=str(at))
        _unmount_if_empty(at.parent)
    if cfg.xsk_map_subdir is not None and base.name == cfg.xsk_map_subdir:
        leasefile.remove_dir_if_empty(base)  # made by ADD or by the kubelet: empty, unused


def _unmount_if_empty(where: Path) -> None:
    if bpffs.is_instance(where) and not any(where.iterdir()):
        bpffs.unmount_instance(where)  # and its directory: the volume is as the pod left it
        log.info("unmounted the pod's bpffs", volume=str(where))


# --- DEL and GC ------------------------------------------------------------------------


def release(
    cfg: NetConf, owner: Owner, att: Attachment | None, *,
    pod_namespace: str | None = None, pod_name: str | None = None, pod_uid: str | None = None,
) -> None:
    """Unwire and unpin the attachment's XSK map (and its pin in the pod's volume); all
    of it already gone is fine.

    The paths come from the record, else are derived from the request as ADD
    derived them; the slots to empty are those still pointing at that map.
    """
    root = bpffs.bpf_root()
    master = att.master if att else cfg.master
    delivered = att.extra.get(VOLUME_PIN) if att else None
    # Without the final record's pin (no record, or ADD's intent record: ADD was
    # killed after delivering), the pin in the pod's volume is derived as ADD did.
    uid = pod_uid or (att.extra.get(POD_UID) if att else None)
    if delivered:
        _undeliver(cfg, Path(delivered), owner)
    elif cfg.xsk_map_volume is not None and uid:
        with contextlib.suppress(NetkitError):  # no usable uid: ADD delivered nothing
            name = pin_path(root, owner, att.pod_namespace if att else pod_namespace,
                            att.pod_name if att else pod_name).name
            base = volume_dir(cfg.kubelet_root, uid, cfg.xsk_map_volume)
            if cfg.xsk_map_subdir is not None:
                base /= cfg.xsk_map_subdir
            _undeliver(cfg, base / POD_BPFFS / name, owner)
    recorded = att.extra.get(MAP_PATH) if att else None
    if recorded:
        path = Path(recorded)
    elif att is not None:
        path = pin_path(root, owner, att.pod_namespace, att.pod_name)
    else:
        path = pin_path(root, owner, pod_namespace, pod_name)
    # Recorded by ADD: slots may point at the map even if its pin was removed under us.
    recorded_id = att.extra.get(MAP_ID) if att else None
    if not path.exists() and recorded_id is None:
        return  # never had a map, or it is gone with its wiring
    from cni_netkit.kernel import xsk  # noqa: PLC0415 - see the module docstring

    map_id = xsk.map_id(path)
    if map_id is None:
        map_id = recorded_id
    if map_id is not None and _steering(master):
        queues = [q.master_queue for q in att.queues] if att and att.queues else None
        unwired = _unwire(cfg, master, queues, int(map_id))
        if unwired:
            log.info("unwired XSK map", map_id=map_id, queues=list(unwired))
    if xsk.remove_map(path, prune_below=root):
        log.info("unpinned XSK map", map_path=str(path))


def _unwire(cfg: NetConf, master: str, queues: Iterable[int] | None, map_id: int
            ) -> tuple[int, ...]:
    """Empty the slots of ``queues`` (None: any) still pointing at ``map_id``, under the lock.

    The master lock orders this against an ADD wiring a queue that was
    released and leased again meanwhile.
    """
    from cni_netkit.kernel import xsk  # noqa: PLC0415 - see the module docstring

    with master_lock(cfg.state_dir, master, cfg.lock_timeout):
        if queues is None:
            queues = [q for q, w in xsk.wiring(master).items() if w.map_id == map_id]
        return xsk.unwire(master, queues, map_id)


def gc(cfg: NetConf, kernel: KernelAPI, valid: frozenset[tuple[str, str]],
       failures: list[str]) -> None:
    """GC's AF_XDP part beyond the records (each released like DEL does): pins of this
    network's stale owners whose record is gone, and slots of queues nobody leases.

    Carries on past errors, adding them to ``failures``.
    """
    root = bpffs.bpf_root()
    for path in bpffs.pinned_files(root / "pods") + bpffs.pinned_files(root / "containers"):
        owner = owner_of_pin(path)
        if owner is None or owner.network != cfg.name:
            continue
        if (owner.container_id, owner.ifname) not in valid:
            _try(failures, f"{path}", _release_pin, cfg, path)
    if cfg.xsk_map_volume is not None:
        shape = (POD_BPFFS, *([cfg.xsk_map_subdir] if cfg.xsk_map_subdir else []),
                 cfg.xsk_map_volume, EMPTY_DIR)
        for where in bpffs.instances_below(kubelet_pods(cfg.kubelet_root)):
            if tuple(p.name for p in (where, *where.parents)[:len(shape)]) != shape:
                continue
            for at in bpffs.pinned_files(where):
                owner = owner_of_pin(at)
                if (owner is not None and owner.network == cfg.name
                        and (owner.container_id, owner.ifname) not in valid):
                    _try(failures, f"{at}", _undeliver, cfg, at, owner)
    if _steering(cfg.master):
        _try(failures, f"dead XSK slots of {cfg.master}", _sweep, cfg, kernel)


def _release_pin(cfg: NetConf, path: Path) -> None:
    from cni_netkit.kernel import xsk  # noqa: PLC0415 - see the module docstring

    map_id = xsk.map_id(path)
    if map_id is not None and _steering(cfg.master):
        _unwire(cfg, cfg.master, None, map_id)
    xsk.remove_map(path, prune_below=bpffs.bpf_root())
    log.info("gc removed XSK map", map_path=str(path))


def _sweep(cfg: NetConf, kernel: KernelAPI) -> None:
    from cni_netkit.kernel import xsk  # noqa: PLC0415 - see the module docstring

    master = kernel.link(cfg.master)
    if master is None:
        return
    with master_lock(cfg.state_dir, cfg.master, cfg.lock_timeout):
        leased = [q.id for q in kernel.queues(master.index) if q.type == "rx" and q.lease]
        wired = xsk.wiring(cfg.master)
        for q in dead_slots(wired, leased):
            if xsk.unwire(cfg.master, [q], wired[q].map_id):
                log.info("gc unwired a queue no longer leased", queue=q, map_id=wired[q].map_id)


# --- CHECK and STATUS ------------------------------------------------------------------


def check(att: Attachment) -> None:
    """Raise CheckFailed unless the attachment's map is pinned, wired as ADD left it, and
    the master's program attached. Nothing to check when ADD made no map."""
    recorded = att.extra.get(MAP_PATH)
    if not recorded:
        return
    from cni_netkit.kernel import xsk  # noqa: PLC0415 - see the module docstring

    path = Path(recorded)
    map_id = xsk.map_id(path)
    if map_id is None:
        raise CheckFailed(f"XSK map {path} is not pinned any more")
    if att.extra.get(MAP_ID) not in (None, map_id):
        raise CheckFailed(f"XSK map {path} was replaced",
                          f"map id {map_id}, ADD pinned {att.extra[MAP_ID]}")
    delivered = att.extra.get(VOLUME_PIN)
    if delivered and xsk.map_id(Path(delivered)) != map_id:
        raise CheckFailed("the pod's volume does not hold its XSK map any more",
                          f"{delivered} is not map id {map_id}")
    _check_lease_file(att)
    prog = xsk.program(att.master)
    if not prog.attached:
        raise CheckFailed(f"master {att.master} has no cni-netkit XDP program attached",
                          _program_details(prog))
    wired = xsk.wiring(att.master, [q.master_queue for q in att.queues])
    problems = wiring_problems(att.queues, map_id, wired)
    if problems:
        raise CheckFailed(f"XSK map {path} is not wired as ADD left it", "; ".join(problems))


def _check_lease_file(att: Attachment) -> None:
    """Raise CheckFailed unless the pod's lease file (when ADD wrote one) is this
    attachment's, as ADD wrote it."""
    lease = att.extra.get(LEASE_FILE)
    if not lease:
        return
    doc = leasefile.read(Path(lease))
    if doc is None or doc.get("owner") != leasefile.document(att)["owner"]:
        raise CheckFailed("the pod's volume does not hold its lease file any more",
                          f"{lease} is missing or another attachment's")
    if doc.get("lease") != leasefile.lease_entry(att):
        raise CheckFailed(f"the pod's lease file {lease} differs from the attachment",
                          "its lease entry was changed after ADD")


def status(cfg: NetConf) -> None:
    """Raise NotAvailable (Degraded with wired attachments) when the agent set the
    master up for AF_XDP steering but its XDP program is not attached."""
    if not _steering(cfg.master):
        return
    from cni_netkit.kernel import xsk  # noqa: PLC0415 - see the module docstring

    prog = xsk.program(cfg.master)
    if prog.attached or prog.ifindex is None:  # a missing master is STATUS's own finding
        return
    wired = [a for a in StateStore(cfg.state_dir)
             if a.master == cfg.master and a.extra.get(MAP_PATH)]
    cls = Degraded if wired else NotAvailable
    raise cls(f"master {cfg.master} has no cni-netkit XDP program attached",
              _program_details(prog) + (f"; {len(wired)} attachment(s) get no AF_XDP traffic"
                                        if wired else ""))


def _program_details(prog: xsk.XdpProgram) -> str:
    if prog.other_prog_id is not None:
        return f"another XDP program (id {prog.other_prog_id}) is attached instead"
    return "the node agent (re)attaches it (cni_netkit.kernel.xsk.ensure_program)"


# --- shared ----------------------------------------------------------------------------


def _steering(master: str) -> bool:
    """The agent pinned this master's maps: attachments on it get an XSK map.

    A path check only, so masters without steering never load libbpf.
    """
    return bpffs.steering(master)


def _try(failures: list[str], what: str, fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except (NetkitError, OSError) as e:
        failures.append(f"{what}: {e}")


def _quietly(what: str, fn: Any, *args: Any) -> None:
    """An undo step: its failure is logged, the other undos still run."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - an undo must never stop the other undos
        log.error("undo step failed", step=what, error=str(e))
