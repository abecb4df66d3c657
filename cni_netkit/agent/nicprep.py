"""NIC preparation: keep pool queues out of the default RSS spread, steer each pod's MAC
to its leased queues, and put back exactly what we changed.

Why: a leased physical queue is drained by the pod's AF_XDP socket through
its netkit. Left in the default RSS spread it would receive a share of *all*
the host's traffic (lost to the host, leaked to the pod); and without a
steering rule the pod's own traffic would not reach it. The upstream patch
does this by hand with ``ethtool -X`` and ``ethtool --config-ntuple``.

The decisions are pure functions (:func:`indirection_table`,
:func:`plan_rss`, :func:`desired_steering`, :func:`plan_rules`);
:func:`reconcile` applies them through the ethtool seam
(``cni_netkit.kernel.ethtool``) and records, per master, in a state file
what it changed: the table it found before its first change and the rule
ids it added. With an empty pool (pool removed, or ``cni-netkit agent
uninstall``) it restores that table and deletes those rules, and nothing
else: tables and rules it did not make are never touched.

**Validated only on hardware.** netdevsim implements no RSS/ntuple ethtool
ops, so neither step runs in the VM tests; the decisions here are
unit-tested, the seam is not (see ``kernel/ethtool.py``).

Known limits: a rule added just before a crash, before its id reached the
state file, is not known to us afterwards (the ethtool API has no owner tag
for rules); a changed RX ring count (``ethtool -L``) makes the recorded
table meaningless, so we then restore the driver's default spread instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from cni_netkit.errors import KernelError, NotSupported
from cni_netkit.kernel.ethtool import EthtoolAPI, SteeringRule
from cni_netkit.plugin.state import Attachment

log = structlog.get_logger("cni_netkit.agent.nicprep")


# --- the RSS indirection table ---------------------------------------------------------


def indirection_table(
    ring_count: int, table_size: int, pool: Iterable[int], original: Sequence[int] | None = None
) -> tuple[int, ...]:
    """The default context's table with no entry pointing at a pool queue.

    Starts from ``original`` (the table we found), or from the driver default
    (entry ``i`` -> ring ``i % ring_count``, the kernel's
    ``ethtool_rxfh_indir_default``) when there is none, and only rewrites the
    entries that point at pool queues, round-robin over the remaining rings
    that table used: the equivalent of ``ethtool -X eth0 start 0 equal K``
    for a pool at the top, for any pool and any starting table.
    """
    base = (
        tuple(original)
        if original is not None
        else tuple(i % ring_count for i in range(table_size))
    )
    if len(base) != table_size:
        raise ValueError(f"table has {len(base)} entries, the NIC {table_size}")
    excluded = set(pool)
    keep = sorted({ring for ring in base if ring not in excluded and ring < ring_count})
    if not keep:
        raise ValueError(
            f"the pool {sorted(excluded)} takes every RSS ring of {ring_count}: "
            "leave at least one queue to the host"
        )
    out: list[int] = []
    k = 0
    for ring in base:
        if ring in excluded or ring >= ring_count:
            out.append(keep[k % len(keep)])
            k += 1
        else:
            out.append(ring)
    return tuple(out)


@dataclass(frozen=True)
class RssRecord:
    """What we changed in a master's default RSS table."""

    ring_count: int
    original: tuple[int, ...] | None  # the table we found; None: the driver default
    applied: tuple[int, ...]  # the table we wrote


@dataclass(frozen=True)
class RssStep:
    """The table write one reconcile makes, and the record to keep afterwards."""

    write: tuple[int, ...] | None = None  # a table to write
    reset_to_default: bool = False  # write the driver default (ETHTOOL_SRXFHINDIR size 0)
    record: RssRecord | None = None
    note: str = ""  # why, when we leave something alone


def plan_rss(
    current: Sequence[int], ring_count: int, pool: Iterable[int], record: RssRecord | None
) -> RssStep:
    """Decide the table write for ``pool`` given the table now and what we did before.

    - Pool empty: restore the recorded original if the table is still ours
      (someone changed it since: leave theirs alone and forget ours).
    - Pool set: exclude its queues, starting from the original we recorded
      (so a shrinking pool gives queues back exactly as they were) or, on
      first contact, from the table as found. A table that already excludes
      the pool is left alone and not recorded: there is nothing to restore.
    """
    cur = tuple(current)
    pool_rings = {q for q in pool if q < ring_count}
    if record is not None and record.ring_count != ring_count:
        # The ring count changed (ethtool -L): the recorded tables describe
        # another configuration. Start over from the driver's default spread.
        record = RssRecord(ring_count, None, record.applied)
    if not pool_rings:
        if record is None:
            return RssStep()
        if cur != record.applied:
            return RssStep(note="the RSS table was changed by someone else since: left as is")
        if record.original is None:
            return RssStep(reset_to_default=True)
        return RssStep(write=record.original)
    if record is not None and cur != record.applied:
        # Someone rewrote the table after us: theirs is the new baseline.
        record = None
    original = record.original if record is not None else cur
    want = indirection_table(ring_count, len(cur), pool_rings, original)
    if want == cur:
        return RssStep(record=record)
    return RssStep(write=want, record=RssRecord(ring_count, original, want))


# --- ntuple steering ------------------------------------------------------------------


@dataclass(frozen=True)
class Steer:
    """Frames for ``mac`` must reach ``queues`` of the master."""

    mac: str
    queues: tuple[int, ...]


def desired_steering(
    attachments: Iterable[Attachment], master: str
) -> tuple[tuple[Steer, ...], tuple[str, ...]]:
    """One rule per MAC leasing queues of ``master``; and the MACs we cannot steer.

    A MAC used by two attachments cannot go to both: neither gets a rule, and
    the conflict is reported. Attachments without a MAC (L3 netkits) need none.
    """
    by_mac: dict[str, list[tuple[int, ...]]] = {}
    for att in attachments:
        if att.master != master or not att.mac or not att.queues:
            continue
        queues = tuple(sorted(q.master_queue for q in att.queues))
        by_mac.setdefault(att.mac.lower(), []).append(queues)
    steers = tuple(Steer(mac, qs[0]) for mac, qs in sorted(by_mac.items()) if len(qs) == 1)
    conflicts = tuple(mac for mac, qs in sorted(by_mac.items()) if len(qs) > 1)
    return steers, conflicts


@dataclass(frozen=True)
class RulePlan:
    add: tuple[Steer, ...] = ()
    remove: tuple[SteeringRule, ...] = ()


def plan_rules(desired: Iterable[Steer], owned: Iterable[SteeringRule]) -> RulePlan:
    """Rules to add and remove so that the ones we own are exactly ``desired``.

    A rule whose queues changed is removed and added again: ntuple rules
    cannot be edited in place.
    """
    want = {(s.mac.lower(), s.queues): s for s in desired}
    have = {(r.mac.lower(), r.queues): r for r in owned}
    return RulePlan(
        add=tuple(s for k, s in sorted(want.items()) if k not in have),
        remove=tuple(r for k, r in sorted(have.items()) if k not in want),
    )


# --- the state file -------------------------------------------------------------------


@dataclass(frozen=True)
class NicState:
    """What we changed on one master; ``<state_dir>/nicprep/<master>.json``."""

    master: str
    rss: RssRecord | None = None
    rules: tuple[SteeringRule, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NicState:
        rss = data.get("rss")
        return cls(
            master=data["master"],
            rss=RssRecord(
                ring_count=rss["ring_count"],
                original=tuple(rss["original"]) if rss["original"] is not None else None,
                applied=tuple(rss["applied"]),
            )
            if rss
            else None,
            rules=tuple(
                SteeringRule(
                    mac=r["mac"],
                    queues=tuple(r["queues"]),
                    rule_id=r["rule_id"],
                    context=r.get("context"),
                )
                for r in data.get("rules", ())
            ),
        )


class NicStateStore:
    """Per-master records under ``<state_dir>/nicprep``, written atomically."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(state_dir) / "nicprep"

    def load(self, master: str) -> NicState:
        try:
            return NicState.from_json(json.loads((self.dir / f"{master}.json").read_text()))
        except FileNotFoundError:
            return NicState(master)

    def save(self, state: NicState) -> None:
        path = self.dir / f"{state.master}.json"
        if state.rss is None and not state.rules:
            path.unlink(missing_ok=True)  # nothing of ours left on the NIC
            return
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(f".tmp.{os.getpid()}")
        with tmp.open("w") as f:
            json.dump(state.to_json(), f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)

    def masters(self) -> list[str]:
        """Masters we hold changes on (for uninstall, even if no pool names them now)."""
        return sorted(p.stem for p in self.dir.glob("*.json")) if self.dir.is_dir() else []


# --- applying it ----------------------------------------------------------------------


@dataclass(frozen=True)
class NicReport:
    """What one reconcile of one master did or could not do."""

    master: str
    rss: str  # "excluded" | "unchanged" | "restored" | "unsupported" | "failed" | "none"
    rules_added: int = 0
    rules_removed: int = 0
    steering: str = "ok"  # "ok" | "unsupported" | "failed"
    conflicts: tuple[str, ...] = ()
    errors: tuple[str, ...] = field(default_factory=tuple)


def reconcile(
    ethtool: EthtoolAPI,
    store: NicStateStore,
    master: str,
    pool: Iterable[int],
    attachments: Iterable[Attachment],
) -> NicReport:
    """Bring one master's RSS table and our steering rules in line with pool and leases.

    ``pool`` empty and no attachments restores everything we changed. The
    state is saved after every successful change, so what is on the NIC and
    what we recorded never differ by more than the step in progress.
    """
    pool_ids = frozenset(pool)
    state = store.load(master)
    errors: list[str] = []
    steers, conflicts = desired_steering(attachments, master)
    for mac in conflicts:
        errors.append(f"MAC {mac} is used by several attachments: not steered")

    # Stale rules go first (their queues may be leaving the pool), then the
    # table, and new rules last: no host flow lands on a queue as it is leased.
    state, steering, removed = _remove_rules(ethtool, store, state, steers, errors)
    state, rss = _apply_rss(ethtool, store, state, pool_ids, errors)
    added = 0
    if steering == "ok":
        state, steering, added = _add_rules(ethtool, store, state, steers, errors)
    report = NicReport(master, rss, added, removed, steering, conflicts, tuple(errors))
    log.info("nic prepared", **asdict(report))
    return report


def _apply_rss(
    ethtool: EthtoolAPI,
    store: NicStateStore,
    state: NicState,
    pool: frozenset[int],
    errors: list[str],
) -> tuple[NicState, str]:
    if not pool and state.rss is None:
        return state, "none"
    try:
        rings = ethtool.rx_rings(state.master)
        current = ethtool.rss_table(state.master)
        step = plan_rss(current, rings, pool, state.rss)
        if step.note:
            errors.append(step.note)
        if step.write is not None or step.reset_to_default:
            ethtool.set_rss_table(state.master, step.write)
    except NotSupported as e:
        errors.append(f"RSS table: {e}")
        return state, "unsupported"
    except (KernelError, ValueError) as e:
        errors.append(f"RSS table: {e}")
        return state, "failed"
    state = NicState(state.master, step.record, state.rules)
    store.save(state)
    if step.write is None and not step.reset_to_default:
        return state, "unchanged" if pool else "none"
    return state, "excluded" if pool else "restored"


def _remove_rules(
    ethtool: EthtoolAPI,
    store: NicStateStore,
    state: NicState,
    steers: Sequence[Steer],
    errors: list[str],
) -> tuple[NicState, str, int]:
    removed = 0
    try:
        for rule in plan_rules(steers, state.rules).remove:
            ethtool.remove_steering(state.master, rule)
            state = NicState(state.master, state.rss, tuple(r for r in state.rules if r != rule))
            store.save(state)
            removed += 1
    except KernelError as e:
        errors.append(f"ntuple steering: {e}")
        return state, _failure(e), removed
    return state, "ok", removed


def _add_rules(
    ethtool: EthtoolAPI,
    store: NicStateStore,
    state: NicState,
    steers: Sequence[Steer],
    errors: list[str],
) -> tuple[NicState, str, int]:
    added = 0
    try:
        for steer in plan_rules(steers, state.rules).add:
            rule = ethtool.add_steering(state.master, steer.mac, steer.queues)
            state = NicState(state.master, state.rss, (*state.rules, rule))
            store.save(state)
            added += 1
    except KernelError as e:
        errors.append(f"ntuple steering: {e}")
        return state, _failure(e), added
    return state, "ok", added


def _failure(e: KernelError) -> str:
    return "unsupported" if isinstance(e, NotSupported) else "failed"
