"""ADD, DEL, CHECK, STATUS and GC: what cni-netkit does for each CNI command.

Reads top to bottom like the reference plugins: ``run`` picks the command;
each command is a short sequence of verb-named steps. ADD is a transaction:
every step pushes its undo onto an ``ExitStack`` right after it succeeds, and
``pop_all()`` keeps the work only once everything succeeded. DEL and GC treat
"already gone" as success and never touch a device whose owner alias is not
exactly theirs.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import structlog

from cni_netkit.config import Invocation, NetConf
from cni_netkit.errors import (
    CheckFailed,
    Degraded,
    InterfaceExists,
    InvalidConfig,
    InvalidNetns,
    KernelError,
    MasterNotFound,
    NetkitError,
    NotAvailable,
    NotFound,
    PoolExhausted,
    QueueBusy,
    TryAgainLater,
)
from cni_netkit.kernel.types import KernelAPI, Link, NetkitSpec, PeerSpec, Queue
from cni_netkit.plugin import afxdp, allowlist, deviceinfo, ipam
from cni_netkit.plugin.lock import master_lock
from cni_netkit.plugin.state import Attachment, CorruptRecord, LeasedQueue, Owner, StateStore
from cni_netkit.pool import choose, format_pool, free_queues
from cni_netkit.result import Interface, IPConfig, Result

log = structlog.get_logger("cni_netkit.plugin")

# The environment of the request in progress, where it is not the process's: the
# node agent (``agent.server``) serves each relayed request in a context of its
# own and sets it there. Unset, the request is this process's own (os.environ).
request_environ: ContextVar[Mapping[str, str]] = ContextVar("cni_netkit_request_environ")

# How often ADD re-reads the master and picks again when a queue it chose was
# leased by someone outside our lock (a foreign control plane) in between.
_LEASE_ATTEMPTS = 3


def run(inv: Invocation, kernel: KernelAPI | None = None) -> Result | None:
    """Execute one CNI command (VERSION is answered by the protocol layer)."""
    handlers: dict[str, Callable[[Invocation, KernelAPI], Result | None]] = {
        "ADD": add,
        "DEL": delete,
        "CHECK": check,
        "STATUS": status,
        "GC": gc,
    }
    handler = handlers[inv.command]
    if kernel is not None:
        return handler(inv, kernel)
    from cni_netkit.kernel import Kernel  # noqa: PLC0415 - netlink only once a command needs it

    with Kernel() as real:
        return handler(inv, real)


# --- ADD -----------------------------------------------------------------------


def add(inv: Invocation, kernel: KernelAPI) -> Result:
    cfg = inv.config
    netns, ifname = _require(inv.netns, "CNI_NETNS"), _require(inv.ifname, "CNI_IFNAME")
    owner = _owner(inv)
    device = _require(inv.pod_ifname, "CNI_IFNAME")  # podIfname, else CNI_IFNAME
    # Closed by default: only a master and queues the node's admin declared,
    # checked before anything is touched (plugin.allowlist).
    declared = kernel.link(cfg.master)
    allowlist.check_declared(cfg, _environ(), declared.index if declared else None)
    _check_pod_netns(kernel, netns)
    if kernel.link(device, netns=netns) is not None:
        raise InterfaceExists(f"interface {device} already exists in netns {netns}",
                              _exists_hint(cfg, device, netns))
    # The lookup the allow-list check made (one RTM_GETLINK less per ADD; ~8 ms in the VM).
    master = declared if declared is not None else _master(kernel, cfg.master)
    if not master.up:
        # A down master lists no queues: without this, ADD would call its pool exhausted.
        raise TryAgainLater(f"master {cfg.master} is down",
                            "its queues can be read and leased once it is up again")
    allowlist.check_rss(cfg, kernel.rss_table)
    store = StateStore(cfg.state_dir, check_dirs_once=True)  # this request's store
    att = Attachment(
        container_id=owner.container_id,
        ifname=ifname,
        netns=netns,
        network=cfg.name,
        master=cfg.master,
        pairing=cfg.pairing,
        mode=cfg.mode,
        mac=inv.mac,
        mtu=cfg.mtu,
        queues=(),
        host_ifname=host_ifname(owner) if cfg.pairing == "pair" else None,
        pod_ifname=cfg.pod_ifname if cfg.pod_ifname != ifname else None,
        pod_namespace=inv.pod_namespace,
        pod_name=inv.pod_name,
        device_info_file=cfg.runtime_config.cni_device_info_file,
        netconf={k: v for k, v in inv.raw.items() if k != "prevResult"},
        # The pod UID tells a pod from a later one reusing its name (the agent's annotations).
        extra={"pod_uid": inv.args["K8S_POD_UID"]} if inv.args.get("K8S_POD_UID") else {},
    )
    with ExitStack() as undo:
        with master_lock(cfg.state_dir, cfg.master, cfg.lock_timeout):
            # The intent record goes first: if we are killed past this point,
            # DEL and GC still learn which netns to clean.
            fault_point("locked")
            store.save(att)
            undo.callback(_quietly, "remove state record", store.remove, owner)
            host_nsid = kernel.ensure_netns_id(None, netns=netns)
            pod_link, host_link = _create_netkit(kernel, cfg, att)
            undo.callback(_quietly, "delete netkit", _delete_ours, kernel, att)
            fault_point("created")
            leased = _lease_queues(kernel, cfg, master, pod_link, netns=netns, host_nsid=host_nsid)
        log.info("leased", queues=[q.master_queue for q in leased], netkit_queues=[
            q.netkit_queue for q in leased])
        ipam_result = None
        if cfg.ipam is not None:
            ipam_result = _ipam_add(inv, kernel, pod_link, host_link, undo)
            fault_point("ipam")
        att = _replace(att, queues=leased, mac=pod_link.mac, netkit_ifindex=pod_link.index,
                       ipam=ipam_result)
        # its own XSK map, on masters with AF_XDP steering
        att = afxdp.wire(cfg, att, undo, kernel, master.index)
        result = _result(inv, att, pod_link, host_link, ipam_result)
        if att.device_info_file:
            deviceinfo.write(att.device_info_file, deviceinfo.device_info(result))
            undo.callback(_quietly, "remove device-info", deviceinfo.remove, att.device_info_file)
        store.save(att)
        fault_point("result")
        undo.pop_all()
    return result


def _create_netkit(kernel: KernelAPI, cfg: NetConf, att: Attachment) -> tuple[Link, Link | None]:
    """The pod-side netkit (and, in pair mode, the host-side primary)."""
    n = cfg.queues_per_attachment
    alias = att.owner.alias
    if cfg.pairing == "single":
        link = kernel.create_netkit(
            NetkitSpec(
                name=att.device,
                netns=att.netns,
                pairing="single",
                mode=cfg.mode,
                mac=att.mac,
                mtu=cfg.mtu,
                num_rx_queues=n + 1,  # queue 0 is the device's own; leases become 1..n
                alias=alias,
                # Named after its owner until it has the alias: never unattributable.
                staging_name=staging_ifname(att.owner),
                # Up in that request, not one of its own: before IPAM, as the kernel
                # refuses a route whose device is down (ENETDOWN). Leases don't mind.
                up=True,
            ),
            step=fault_point,
        )
        return link, None
    if att.host_ifname is None:
        raise ValueError("pair mode needs a host-side name")
    host = kernel.create_netkit(
        NetkitSpec(
            name=att.host_ifname,
            pairing="pair",
            mode=cfg.mode,
            mtu=cfg.mtu,
            alias=alias,
            up=True,  # both sides up in the requests that set their aliases (as single's)
            # Only the peer (non-primary) side of a pair can hold leases: it is the pod side.
            peer=PeerSpec(
                name=att.device, netns=att.netns, num_rx_queues=n + 1, mac=att.mac, mtu=cfg.mtu,
                alias=alias, up=True,
            ),
        ),
        # The host side is named after its owner from the start (host_ifname), and
        # its peer goes with it: a pair is attributable before either has an alias.
        step=fault_point,
    )
    if host.peer is None:
        raise KernelError(f"netkit peer {att.device} missing in {att.netns} right after creation")
    return host.peer, host


def _exhausted_why(e: PoolExhausted, rx: Sequence[Queue], pool: Sequence[int]) -> PoolExhausted:
    """``e`` with the pool queues that are taken without a lease named: a consumer bound
    outside any attachment, or one that just closed (the kernel lets go of a closed
    AF_XDP socket's queue a little later, so an ADD right after may see it still bound)."""
    pool_set = set(pool)
    bound = sorted(q.id for q in rx if q.id in pool_set and q.lease is None and q.in_use)
    if not bound:
        return e
    return PoolExhausted(e.msg, f"{e.details}; bound by AF_XDP or a memory provider without "
                                f"a lease: {format_pool(bound)} (a consumer outside any "
                                "attachment, or one that closed moments ago: retry)")


def _lease_queues(
    kernel: KernelAPI, cfg: NetConf, master: Link, pod_link: Link, *, netns: str, host_nsid: int
) -> tuple[LeasedQueue, ...]:
    """Lease ``queuesPerAttachment`` free pool queues of the master to the pod's netkit."""
    leased: list[LeasedQueue] = []
    refused: set[int] = set()
    for attempt in range(_LEASE_ATTEMPTS):
        rx = _rx_queues(kernel, master)
        in_use = {q.id for q in rx if q.in_use} | refused
        free = free_queues(cfg.queues, {q.id for q in rx}, in_use)
        try:
            wanted = choose(
                free, cfg.queues_per_attachment - len(leased), master=cfg.master, pool=cfg.queues
            )
        except PoolExhausted as e:
            raise _exhausted_why(e, rx, cfg.queues) from None
        for q in wanted:
            try:
                nk_id = kernel.queue_create(
                    pod_link.index,
                    lessor_ifindex=master.index,
                    lessor_queue=q,
                    netns=netns,
                    lessor_netns_id=host_nsid,
                )
            except QueueBusy as e:
                # Someone outside our lock leased it between our read and now.
                refused.add(q)
                log.warning("queue taken concurrently, choosing again", queue=q,
                            attempt=attempt, error=str(e))
                break
            leased.append(LeasedQueue(netkit_queue=nk_id, master_queue=q))
            fault_point(f"leased:{len(leased)}")
        else:
            return tuple(leased)
    raise QueueBusy(
        f"could not lease {cfg.queues_per_attachment} queue(s) of {cfg.master}",
        f"queues kept being taken by another lessor: {sorted(refused)}",
    )


def _ipam_add(
    inv: Invocation, kernel: KernelAPI, pod: Link, host: Link | None, undo: ExitStack
) -> dict[str, Any]:
    """Delegate to IPAM, then put its addresses and routes on the pod side (ptp-style)."""
    cfg = inv.config
    if cfg.ipam is None or inv.netns is None:
        raise ValueError("IPAM needs an ipam section and a netns")
    plugin = str(cfg.ipam["type"])
    env = _delegate_env(inv, "ADD")
    raw = ipam.delegate("ADD", plugin, inv.raw, env, inv.cni_path)
    if raw is None:
        raise ValueError("IPAM ADD returned no result")
    undo.callback(_quietly, "release IPAM", ipam.delegate, "DEL", plugin, inv.raw,
                  _delegate_env(inv, "DEL"), inv.cni_path)
    got = Result.from_prev(raw, cfg.cni_version, source=f"IPAM plugin {plugin} result")
    for ip in got.ips:
        kernel.add_address(pod.index, ip.address, netns=inv.netns)
        if host is not None:
            # The host reaches the pod through the primary side of the pair.
            kernel.add_route(_host_route(ip.address), oif=host.index, scope_link=True)
    for ip in got.ips:
        if ip.gateway:
            # ptp-style: the gateway is reachable on the link itself.
            kernel.add_route(_host_route(ip.gateway), oif=pod.index, netns=inv.netns,
                             scope_link=True)
    for route in got.routes:
        gw = route.gw or next((ip.gateway for ip in got.ips if ip.gateway), None)
        kernel.add_route(route.dst, oif=pod.index, gateway=gw, netns=inv.netns)
    return raw


# --- DEL -----------------------------------------------------------------------


def delete(inv: Invocation, kernel: KernelAPI) -> None:
    cfg = inv.config
    owner = _owner(inv)
    store = StateStore(cfg.state_dir)
    bad: CorruptRecord | None = None
    try:
        att = store.load(owner)
    except CorruptRecord as e:
        # Never a reason to keep the pod's DEL failing: the devices carry their
        # owner alias, IPAM is released by owner, the request names the netns.
        att, bad = None, e
        log.warning("attachment record unreadable: deleting by owner alias, then quarantining it",
                    record=str(e.path), reason=e.reason)
    netns = inv.netns or (att.netns if att else None) or (bad.salvage.get("netns") if bad else None)
    # The netkit's name as ADD gave it, from the record (podIfname may have changed since).
    salvaged = bad.salvage.get("pod_ifname") if bad else None
    device = att.device if att else salvaged or inv.pod_ifname or owner.ifname
    _teardown(inv, kernel, owner, netns, att, device=device, unknown_record=bad is not None)
    if bad is not None:
        deviceinfo.remove(bad.salvage.get("device_info_file"))
    fault_point("del:torn-down")
    if bad is not None:
        where = store.quarantine(bad)
        log.warning("attachment record quarantined", record=str(bad.path), moved_to=str(where))
    else:
        store.remove(owner)


def _teardown(
    inv: Invocation, kernel: KernelAPI, owner: Owner, netns: str | None, att: Attachment | None,
    *, device: str, unknown_record: bool = False,
) -> None:
    """Remove what ADD made for ``owner``; everything already gone is fine.

    ``unknown_record``: its record was unreadable, so a host side is looked
    for whatever the config's pairing (only a device with ``owner``'s alias
    is ever deleted).
    """
    cfg = inv.config
    # Stop steering the queues before they go back to the pool.
    afxdp.release(cfg, owner, att, pod_namespace=inv.pod_namespace, pod_name=inv.pod_name,
                  pod_uid=inv.pod_uid)
    if netns:  # without a netns the pod side died with it (or never existed)
        _delete_if_ours(kernel, owner, device, netns)
        if att is None or not att.queues:  # an ADD killed inside the netkit's creation
            _delete_if_ours(kernel, owner, staging_ifname(owner), netns)
        fault_point("del:pod")
    if cfg.pairing == "pair" or (att and att.host_ifname) or unknown_record:
        _delete_if_ours(kernel, owner, host_ifname(owner), None)
        fault_point("del:host")
    if cfg.ipam is not None:
        env = _delegate_env(inv, "DEL", owner, netns)
        ipam.delegate("DEL", str(cfg.ipam["type"]), inv.raw, env, inv.cni_path)
        fault_point("del:ipam")
    if att is not None:
        # Only the file ADD wrote, as recorded: a path on stdin is no proof of that,
        # and removing whatever it names would let the caller unlink any file as root.
        deviceinfo.remove(att.device_info_file)


def _delete_if_ours(kernel: KernelAPI, owner: Owner, name: str, netns: str | None) -> None:
    if netns is not None:
        try:
            kernel.check_netns(netns)
        except InvalidNetns:
            log.info("netns gone, nothing to delete there", netns=netns)
            return
    link = kernel.link(name, netns=netns)
    if link is None:
        return
    if not is_ours(link, owner):
        log.warning("not deleting a device we do not own", device=name, netns=netns,
                    alias=link.alias)
        return
    kernel.delete_link(link.index, netns=netns)  # its leases end with it
    log.info("deleted netkit", device=name, netns=netns)


def is_ours(link: Link, owner: Owner) -> bool:
    """``owner``'s device: its alias says so, or, before ADD could set the alias, its
    name is one only ``owner``'s ADD gives (the staging or the host-side name)."""
    if link.alias:
        return Owner.from_alias(link.alias) == owner
    return link.kind == "netkit" and link.name in (staging_ifname(owner), host_ifname(owner))


def _delete_ours(kernel: KernelAPI, att: Attachment) -> None:
    _delete_if_ours(kernel, att.owner, att.device, att.netns)
    if not att.queues:  # killed inside the netkit's creation
        _delete_if_ours(kernel, att.owner, staging_ifname(att.owner), att.netns)
    if att.host_ifname:
        _delete_if_ours(kernel, att.owner, att.host_ifname, None)


# --- CHECK ---------------------------------------------------------------------


def check(inv: Invocation, kernel: KernelAPI) -> None:
    cfg = inv.config
    netns = _require(inv.netns, "CNI_NETNS")
    ifname = _require(inv.pod_ifname, "CNI_IFNAME")  # the device's name
    owner = _owner(inv)
    if cfg.prev_result is None:
        raise InvalidConfig("CHECK needs prevResult", "the runtime passed no prevResult")
    _check_pod_netns(kernel, netns)
    link = kernel.link(ifname, netns=netns)
    if link is None:
        raise CheckFailed(f"interface {ifname} not found in netns {netns}")
    if Owner.from_alias(link.alias) != owner:
        raise CheckFailed(f"interface {ifname} in {netns} is not ours",
                          f"alias {link.alias!r}, expected {owner.alias!r}")
    nk = link.netkit
    if link.kind != "netkit" or nk is None:
        raise CheckFailed(f"interface {ifname} is of kind {link.kind}, expected netkit")
    if nk.pairing != cfg.pairing or nk.mode != cfg.mode:
        raise CheckFailed(f"interface {ifname} is a {nk.pairing} {nk.mode} netkit, "
                          f"expected {cfg.pairing} {cfg.mode}")
    want_mac = _expected_mac(inv, ifname, netns)
    if want_mac and (link.mac or "").lower() != want_mac:
        raise CheckFailed(f"interface {ifname} has MAC {link.mac}, expected {want_mac}")
    try:
        att = StateStore(cfg.state_dir).load(owner)
    except CorruptRecord as e:
        raise CheckFailed(str(e), "DEL quarantines it; a new ADD writes a good one") from e
    if att is None or not att.queues:
        raise CheckFailed(f"no lease record for {owner.container_id}/{owner.ifname}")
    if att.device != ifname:
        raise CheckFailed(f"the netkit of {owner.container_id}/{owner.ifname} is {att.device}, "
                          f"the config names {ifname}", "podIfname changed since ADD")
    master = _master(kernel, cfg.master)
    for lq in att.queues:
        _check_lease(kernel, master, lq, link, netns)
    afxdp.check(att)
    if cfg.ipam is not None:
        ipam.delegate("CHECK", str(cfg.ipam["type"]), inv.raw, _delegate_env(inv, "CHECK"),
                      inv.cni_path)


def _check_lease(kernel: KernelAPI, master: Link, lq: LeasedQueue, link: Link, netns: str) -> None:
    where = f"queue {lq.master_queue} of {master.name}"
    try:
        q = kernel.queue_get(master.index, lq.master_queue)
    except NotFound as e:
        raise CheckFailed(f"{where} not found (master down?)", str(e)) from e
    # Read after queue-get: reporting a lease may be what assigns the pod netns its nsid here.
    nsid = kernel.netns_id(netns)
    lease = q.lease
    if lease is None:
        raise CheckFailed(f"{where} is no longer leased")
    if lease.ifindex != link.index or lease.queue_id != lq.netkit_queue or lease.netns_id != nsid:
        raise CheckFailed(
            f"{where} is leased elsewhere",
            f"to ifindex {lease.ifindex} queue {lease.queue_id} netns-id {lease.netns_id}, "
            f"expected ifindex {link.index} queue {lq.netkit_queue} netns-id {nsid}",
        )


def _expected_mac(inv: Invocation, ifname: str, netns: str) -> str | None:
    if inv.mac:
        return inv.mac.lower()
    prev = inv.config.prev_result or {}
    for iface in prev.get("interfaces") or []:
        if iface.get("name") == ifname and iface.get("sandbox") == netns and iface.get("mac"):
            return str(iface["mac"]).lower()
    return None


# --- STATUS --------------------------------------------------------------------


def status(inv: Invocation, kernel: KernelAPI) -> None:
    cfg = inv.config
    support = kernel.probe()
    if not support.can_lease:
        raise NotAvailable(
            "kernel lacks netkit queue leasing (needs Linux >= 7.1)",
            f"kernel {support.release}: netkit={support.netkit} "
            f"netdev-family={support.netdev_family} queue-create={support.queue_create}",
        )
    master = kernel.link(cfg.master)
    if master is None:
        attached = [a for a in StateStore(cfg.state_dir) if a.master == cfg.master]
        cls = Degraded if attached else NotAvailable
        raise cls(f"master {cfg.master} not found",
                  f"{len(attached)} existing attachment(s) lost their queues" if attached else "")
    if not master.up:
        # Leases survive a flap, but nothing flows (and nothing can be leased) meanwhile.
        attached = [a for a in StateStore(cfg.state_dir) if a.master == cfg.master]
        cls = Degraded if attached else NotAvailable
        raise cls(f"master {cfg.master} is down",
                  f"{len(attached)} existing attachment(s) get no traffic until it is up"
                  if attached else "no queue can be leased until it is up")
    try:
        rx = _rx_queues(kernel, master)
    except NotFound as e:
        raise NotAvailable(f"master {cfg.master} reports no queues (down?)", str(e)) from e
    free = free_queues(cfg.queues, {q.id for q in rx}, {q.id for q in rx if q.in_use})
    if len(free) < cfg.queues_per_attachment:
        # Capacity, not readiness: an exhausted pool is the pool doing its job
        # (the agent's extended resource keeps the scheduler from over-committing
        # it, and ADD answers 100 to anything past it). containerd >= 2.0 turns
        # a STATUS failure of the default network's list into NetworkReady=false,
        # i.e. the node going NotReady and its pods evicted: never for this.
        log.warning("pool exhausted; STATUS still ready (docs/kubernetes.md)",
                    master=cfg.master, free=len(free), needed=cfg.queues_per_attachment,
                    pool=format_pool(cfg.queues))
    afxdp.status(cfg)


# --- GC ------------------------------------------------------------------------


def gc(inv: Invocation, kernel: KernelAPI, netns_paths: Iterable[str] | None = None) -> None:
    """Remove this network's attachments that are not in the runtime's valid list.

    First through our records, then by owner alias on every netkit we can see,
    for devices whose record never got written (killed mid-ADD) or was lost.
    ``netns_paths``: where to look (default: every netns we can name).
    Carries on past errors and reports them all at the end.
    """
    cfg = inv.config
    valid = cfg.valid_attachments
    if valid is None:
        log.info("GC without a valid-attachments list: nothing removed")
        return
    failures: list[str] = []
    store = StateStore(cfg.state_dir)
    records = [a for a in store if is_stale(a.owner, cfg.name, valid)]
    for n, att in enumerate(records, 1):
        try:
            # Unwires the XSK map under the master's lock itself (flock: taking it
            # again here would wait for ourselves); idempotent if DEL got there first.
            afxdp.release(cfg, att.owner, att)
            # Under the master's lock, as ADD leases: GC never tears down an
            # attachment in the middle of an ADD's queue choice and leasing.
            with master_lock(cfg.state_dir, att.master, cfg.lock_timeout):
                if store.load(att.owner) is None:
                    continue  # its DEL got there first
                _delete_ours(kernel, att)
            fault_point(f"gc:devices:{n}")
            _release_ipam(inv, att.owner)
            deviceinfo.remove(att.device_info_file)
            store.remove(att.owner)
            log.info("gc removed attachment", container_id=att.container_id, ifname=att.ifname)
            fault_point(f"gc:record:{n}")
        except (NetkitError, OSError, CorruptRecord) as e:  # corrupted since it was listed
            failures.append(f"{att.key}: {e}")
    tried = {a.owner for a in records}  # a failure there is reported once, not twice
    released = _gc_corrupt(inv, kernel, store, valid, failures)
    paths = _candidate_netns() if netns_paths is None else netns_paths
    orphans = 0
    for netns, link in _netkit_devices(kernel, [None, *paths], failures):
        owner = Owner.from_alias(link.alias)
        if owner is None or owner in tried or not is_stale(owner, cfg.name, valid):
            continue
        try:
            if owner not in released:  # a pair's two sides: one release
                # Before the device goes: it is the only trace of this attachment left.
                _release_ipam(inv, owner)
                released.add(owner)
            kernel.delete_link(link.index, netns=netns)
            log.info("gc removed orphan netkit", device=link.name, netns=netns)
            orphans += 1
            fault_point(f"gc:orphan:{orphans}")
        except (NetkitError, OSError) as e:
            failures.append(f"{link.name}@{netns}: {e}")
    afxdp.gc(cfg, kernel, valid, failures)
    if cfg.ipam is not None:
        try:
            env = _delegate_env(inv, "GC")
            ipam.delegate("GC", str(cfg.ipam["type"]), inv.raw, env, inv.cni_path)
        except NetkitError as e:
            failures.append(f"ipam: {e}")
    if failures:
        raise NetkitError(f"GC left {len(failures)} item(s) behind", "; ".join(failures))


def _gc_corrupt(
    inv: Invocation, kernel: KernelAPI, store: StateStore,
    valid: frozenset[tuple[str, str]], failures: list[str],
) -> set[Owner]:
    """Unreadable records: a stale one's IPAM is released, its devices deleted, the file
    quarantined; one nobody can own any more (no owner readable) is quarantined. Every
    one is logged. Returns the owners whose IPAM was released (the orphan scan that
    follows deletes their devices by alias, where the record can no longer say).
    """
    cfg = inv.config
    released: set[Owner] = set()
    for bad in store.corrupt():
        owner = bad.owner
        if owner is not None and not is_stale(owner, cfg.name, valid):
            log.warning("attachment record unreadable; kept for its DEL", record=str(bad.path),
                        reason=bad.reason)
            continue
        try:
            if owner is not None:
                _release_ipam(inv, owner)
                released.add(owner)
                netns = bad.salvage.get("netns")
                if netns:
                    device = bad.salvage.get("pod_ifname") or cfg.pod_ifname or owner.ifname
                    _delete_if_ours(kernel, owner, device, netns)
                    # An ADD killed inside the create: only its name says whose it is.
                    _delete_if_ours(kernel, owner, staging_ifname(owner), netns)
                _delete_if_ours(kernel, owner, host_ifname(owner), None)
                deviceinfo.remove(bad.salvage.get("device_info_file"))
            where = store.quarantine(bad)
        except (NetkitError, OSError) as e:
            failures.append(f"{bad.path.name}: {e}")
            continue
        log.warning("gc quarantined an unreadable attachment record", record=str(bad.path),
                    reason=bad.reason, moved_to=str(where),
                    container_id=owner.container_id if owner else None)
    return released


def _release_ipam(inv: Invocation, owner: Owner) -> None:
    """Release ``owner``'s IPAM address as its DEL would have (GC runs instead of that DEL).

    The IPAM GC at the end is not enough: host-local (reference plugins 1.9.1)
    implements no GC, so every attachment GC removed would keep its address.
    """
    cfg = inv.config
    if cfg.ipam is not None:
        env = _delegate_env(inv, "DEL", owner, "")
        ipam.delegate("DEL", str(cfg.ipam["type"]), inv.raw, env, inv.cni_path)


def is_stale(owner: Owner, network: str, valid: frozenset[tuple[str, str]]) -> bool:
    """GC's decision: this network's attachment, and the runtime no longer knows it."""
    return owner.network == network and (owner.container_id, owner.ifname) not in valid


def _netkit_devices(
    kernel: KernelAPI, netns_paths: Iterable[str | None], failures: list[str]
) -> Iterator[tuple[str | None, Link]]:
    """Our kind of devices, one netns at a time: its sockets are closed before the next
    is opened, so a node with thousands of pods costs two descriptors, not two each."""
    for netns in netns_paths:
        try:
            links = kernel.links(netns=netns, kind="netkit")
        except InvalidNetns:
            continue  # gone since we listed it: nothing of ours can be in it
        except (NetkitError, OSError) as e:
            failures.append(f"{netns}: {e}")
            continue
        try:
            for link in links:
                yield netns, link
        finally:
            if netns is not None:
                kernel.forget_netns(netns)


def _candidate_netns(netns_dir: str = "/var/run/netns") -> Iterator[str]:
    """Every distinct named network namespace (``netns_dir``), except our own.

    Only named ones, where runtimes pin pod netns (and what CNI_NETNS names):
    the node agent, without hostPID, sees exactly these too, so GC gives the
    same answer warm and cold. Process-only netns (``/proc/<pid>/ns/net``) are
    not scanned: the agent cannot see them, and a record names the netns of
    every attachment ADD got as far as creating. Deduplicated by nsfs inode,
    so each netns is opened once.
    """
    try:
        own = Path("/proc/self/ns/net").stat()
        seen = {(own.st_dev, own.st_ino)}
    except OSError:
        seen = set()
    paths = sorted(Path(netns_dir).glob("*"))
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            continue
        seen.add(key)
        yield str(p)


# --- test-only fault injection --------------------------------------------------

FAULT_ENV = "CNI_NETKIT_TEST_FAULT"
# "1" in the node agent's own process environment: it honours FAULT_ENV in
# the requests it serves. Never set in production, so no relayed request (any
# root client can send one) reaches a fault point, let alone a SIGKILL.
FAULT_ENABLE_ENV = "CNI_NETKIT_TEST_FAULTS"


class InjectedFault(NetkitError):
    """Raised at a fault point named in CNI_NETKIT_TEST_FAULT (tests only)."""

    code = 199


def fault_point(step: str) -> None:
    """Test-only: ``CNI_NETKIT_TEST_FAULT=<step>`` fails the command right after ``step``;
    ``<step>:kill`` SIGKILLs the process there instead (the crash suite).

    Steps, each named after what has just been done:

    - ADD: ``locked`` (the master's lock is held, nothing written yet),
      ``create:made`` (inside the kernel layer: the netkit exists, no alias
      yet), ``create:named`` (its final name and alias), ``create:peer-named``
      (pair: the peer's alias), ``created`` (intent record and netkit exist),
      ``leased:<n>`` (the n-th queue is leased), ``ipam`` (IPAM allocated and
      configured), ``result`` (device-info and the final record written, the
      reply not yet printed).
    - DEL: ``del:pod`` (pod-side netkit deleted), ``del:host`` (pair mode:
      host side deleted), ``del:ipam`` (IPAM released), ``del:torn-down``
      (device-info removed, the record not yet).
    - GC: ``gc:devices:<n>`` (the n-th stale record's devices deleted, its
      record not yet), ``gc:record:<n>`` (... and its record removed),
      ``gc:orphan:<n>`` (the n-th unrecorded netkit of ours deleted). GC
      carries on past errors, so a raised fault there counts as that item's
      failure; ``:kill`` is what stops GC midway.

    Unset in production, where this is one or two dictionary lookups.
    """
    spec = fault_spec()
    if not spec:
        return
    kill = spec.endswith(":kill")
    if spec.removesuffix(":kill") != step:
        return
    if kill:
        import signal  # noqa: PLC0415

        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"injected fault after {step}")


def fault_spec() -> str | None:
    """The fault this request asks for: a cold process's own ``FAULT_ENV``; in the
    node agent, the relayed request's only if the agent's process environment has
    ``FAULT_ENABLE_ENV=1`` (tests start it so), never otherwise.
    """
    relayed = request_environ.get(None)
    if relayed is None:
        return os.environ.get(FAULT_ENV)  # the process's own environment: its caller's say
    if os.environ.get(FAULT_ENABLE_ENV) != "1":
        return None
    return relayed.get(FAULT_ENV)


# --- shared steps --------------------------------------------------------------


def host_ifname(owner: Owner) -> str:
    """The host-side name of a pair: stable per attachment, 15 bytes like Calico's cali<hash>."""
    return "nk" + _owner_digest(owner)[:13]


def staging_ifname(owner: Owner) -> str:
    """The name a single netkit has between its creation and its alias (``nkt<hash>``)."""
    return "nkt" + _owner_digest(owner)[:12]


def _owner_digest(owner: Owner) -> str:
    key = f"{owner.network}/{owner.container_id}/{owner.ifname}"
    return hashlib.sha256(key.encode()).hexdigest()


def _exists_hint(cfg: NetConf, name: str, netns: str) -> str:
    """What to do about ``name`` being taken: chained after the plugin that made it, rename."""
    prev = cfg.prev_result or {}
    made_by_prev = any(
        isinstance(i, dict) and i.get("name") == name and i.get("sandbox") == netns
        for i in prev.get("interfaces") or []
    )
    if made_by_prev:
        return (f"an earlier plugin of this chain made {name} (it is in prevResult); "
                'give ours a name of its own with "podIfname", e.g. "net1"')
    return 'CNI_IFNAME, or the config\'s "podIfname", must name a free interface'


def _check_pod_netns(kernel: KernelAPI, netns: str) -> None:
    """Raise InvalidNetns unless ``netns`` is a network namespace other than our own.

    No pod lives in the host's netns: a path leading there (``/proc/1/ns/net``,
    a symlink to ``/proc/self/ns/net``) would put the pod's netkit, addresses
    and routes into the host's own tables. The reference plugins refuse it too.
    """
    kernel.check_netns(netns)
    try:
        pod, own = Path(netns).stat(), Path("/proc/self/ns/net").stat()
    except OSError:
        return  # not a file we can stat (a test double's netns): nothing to compare
    if (pod.st_dev, pod.st_ino) == (own.st_dev, own.st_ino):
        raise InvalidNetns(f"netns {netns} is the plugin's own (the host's)",
                           "a pod's netns is never the host's; refusing to configure it")


def _master(kernel: KernelAPI, name: str) -> Link:
    master = kernel.link(name)
    if master is None:
        raise MasterNotFound(f"master {name} not found in the host netns")
    return master


def _rx_queues(kernel: KernelAPI, master: Link) -> list[Queue]:
    return [q for q in kernel.queues(master.index) if q.type == "rx"]


def _owner(inv: Invocation) -> Owner:
    return Owner(
        inv.config.name,
        _require(inv.container_id, "CNI_CONTAINERID"),
        _require(inv.ifname, "CNI_IFNAME"),
    )


def _require(value: str | None, name: str) -> str:
    if not value:
        from cni_netkit.errors import InvalidEnvironment  # noqa: PLC0415

        raise InvalidEnvironment(f"{name} is required")
    return value


def _delegate_env(
    inv: Invocation, command: str, owner: Owner | None = None, netns: str | None = None
) -> dict[str, str]:
    """The environment a delegated plugin sees: ours, rebuilt from the invocation.

    Built from the invocation (and the request's PATH) rather than os.environ,
    so the same code serves requests relayed by the node agent.  CNI_ARGS is
    the runtime's string, verbatim (libcni's delegation passes it on as is):
    rebuilt from our known keys it lost ``IgnoreUnknown=1`` (host-local then
    refuses the ``K8S_POD_*`` keys: "999 ARGS: unknown args") and ``IP=``.
    The config's ``args.cni`` never goes there: the delegate reads it from the
    config on its stdin, and a NAD author's ``"x;K=V"`` cannot add keys.
    """
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": owner.container_id if owner else (inv.container_id or ""),
        "CNI_NETNS": netns if netns is not None else (inv.netns or ""),
        "CNI_IFNAME": owner.ifname if owner else (inv.ifname or ""),
        "CNI_PATH": ":".join(inv.cni_path),
        "PATH": _environ().get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
    }
    if inv.runtime_cni_args:
        env["CNI_ARGS"] = inv.runtime_cni_args
    return env


def _environ() -> Mapping[str, str]:
    """The request's environment: the relayed one in the node agent, else ours."""
    return request_environ.get(os.environ)


def _host_route(address: str) -> str:
    """``10.1.2.3/24`` or ``10.1.2.3`` -> ``10.1.2.3/32`` (or /128): the single address."""
    addr = address.split("/", 1)[0]
    return f"{addr}/{128 if ':' in addr else 32}"


def _result(
    inv: Invocation, att: Attachment, pod: Link, host: Link | None, ipam_raw: dict[str, Any] | None
) -> Result:
    cfg = inv.config
    interfaces: list[Interface] = []
    if host is not None:
        interfaces.append(Interface(name=host.name, mac=host.mac))
    pod_index = len(interfaces)
    interfaces.append(Interface(name=pod.name, mac=pod.mac, mtu=pod.mtu, sandbox=att.netns))
    ours = Result(interfaces=tuple(interfaces), netkit=att.netkit)
    if ipam_raw is not None:
        got = Result.from_prev(ipam_raw, cfg.cni_version, source="IPAM result")
        ours = Result(
            interfaces=ours.interfaces,
            ips=tuple(IPConfig(ip.address, ip.gateway, pod_index) for ip in got.ips),
            routes=got.routes,
            dns=got.dns,
            netkit=att.netkit,
        )
    if cfg.prev_result:
        ours = ours.merged_with(cfg.prev_result)
    return ours


def _replace(att: Attachment, **changes: Any) -> Attachment:
    from dataclasses import replace  # noqa: PLC0415

    return replace(att, **changes)


def _quietly(what: str, fn: Callable[..., object], *args: Any) -> None:
    """Run an undo step; log its failure and go on with the other undos."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - an undo must never stop the other undos
        log.error("undo step failed", step=what, error=str(e))
