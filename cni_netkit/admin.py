"""``cni-netkit leases | queues | status``: what an admin asks a node at 3 a.m.

All three read the kernel (the truth for leases) and our attachment records
(whose lease it is); none of them changes anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from cni_netkit.config import DEFAULT_STATE_DIR, parse_queue_pool
from cni_netkit.kernel.types import KernelAPI, Queue
from cni_netkit.plugin import inventory
from cni_netkit.plugin.state import StateStore
from cni_netkit.pool import format_pool, free_queues


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="the plugin's stateDir")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    command = parser.prog.rsplit(" ", 1)[-1]
    if command == "queues":
        parser.add_argument("master", help="the physical NIC")
    else:
        parser.add_argument(
            "--master", action="append", default=[], help="a master NIC (repeatable); "
            "default: every master named in the attachment records",
        )
    if command == "status":
        parser.add_argument("--queues", help='the pool, as in the CNI config (e.g. "8-15")')
        parser.add_argument("--per-attachment", type=int, default=1, metavar="N")


def main(args: argparse.Namespace) -> int:
    from cni_netkit.kernel import Kernel  # noqa: PLC0415 - netlink only once a command runs

    with Kernel() as kernel:
        if args.command == "leases":
            return _leases(kernel, args)
        if args.command == "queues":
            return _queues(kernel, args)
        return _status(kernel, args)


def _leases(kernel: KernelAPI, args: argparse.Namespace) -> int:
    store = StateStore(args.state_dir)
    rows = inventory.leases(kernel, store, inventory.masters_of(store, args.master))
    if args.json:
        _print_json([
            {
                "master": r.master,
                "masterQueue": r.master_queue,
                "netkitIfindex": r.netkit_ifindex,
                "netkitQueue": r.netkit_queue,
                "netnsId": r.netns_id,
                "attachment": None if r.attachment is None else r.attachment.to_json(),
            }
            for r in rows
        ])
        return 0
    _print_table(
        ["MASTER", "QUEUE", "NETKIT", "NK-QUEUE", "NSID", "NETNS", "OWNER"],
        [
            [r.master, r.master_queue, _netkit_name(r), r.netkit_queue, _dash(r.netns_id),
             r.attachment.netns if r.attachment else "-", r.owner]
            for r in rows
        ],
    )
    return 0


def _queues(kernel: KernelAPI, args: argparse.Namespace) -> int:
    queues = inventory.queues_of(kernel, args.master)
    if args.json:
        _print_json([asdict(q) for q in queues])
        return 0
    _print_table(["QUEUE", "STATE", "LEASED-TO"], [[q.id, _state(q), _lease(q)] for q in queues])
    return 0


def _status(kernel: KernelAPI, args: argparse.Namespace) -> int:
    support = kernel.probe()
    store = StateStore(args.state_dir)
    pool = parse_queue_pool(args.queues) if args.queues else None
    report: dict[str, Any] = {"kernel": {**asdict(support), "canLease": support.can_lease},
                              "masters": []}
    ready = support.can_lease
    for master in inventory.masters_of(store, args.master):
        queues = inventory.queues_of(kernel, master)
        link = kernel.link(master)
        entry: dict[str, Any] = {"master": master, "present": link is not None,
                                 "up": bool(link and link.up), "rxQueues": len(queues),
                                 "leased": sorted(q.id for q in queues if q.lease is not None)}
        if pool is not None:
            free = free_queues(pool, {q.id for q in queues}, {q.id for q in queues if q.in_use})
            entry.update(pool=format_pool(pool), free=free)
            ready = ready and len(free) >= args.per_attachment
        ready = ready and bool(link and link.up)
        report["masters"].append(entry)
    report["ready"] = ready
    if args.json:
        _print_json(report)
    else:
        k = report["kernel"]
        print(f"kernel {k['release']}: netkit={k['netkit']} netdev-family={k['netdev_family']} "
              f"queue-create={k['queue_create']}")
        for m in report["masters"]:
            pool_text = f" pool={m['pool']} free={format_pool(m['free']) or 'none'}" \
                if "pool" in m else ""
            print(f"{m['master']}: present={m['present']} up={m['up']} rx-queues={m['rxQueues']} "
                  f"leased={format_pool(m['leased']) or 'none'}{pool_text}")
        print("ready" if ready else "NOT ready")
    return 0 if ready else 1


def _netkit_name(row: inventory.LeaseRow) -> str:
    return row.attachment.device if row.attachment else f"ifindex {row.netkit_ifindex}"


def _state(q: Queue) -> str:
    if q.lease is not None:
        return "leased"
    if q.xsk:
        return "af_xdp"
    if q.dmabuf is not None or q.io_uring:
        return "mem-provider"
    return "free"


def _lease(q: Queue) -> str:
    if q.lease is None:
        return "-"
    return f"ifindex {q.lease.ifindex} queue {q.lease.queue_id} nsid {_dash(q.lease.netns_id)}"


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(map(str, header)), *([str(c) for c in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
