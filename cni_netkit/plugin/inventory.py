"""Who holds which queue: the kernel's leases joined with our attachment records.

The kernel (``queue-get`` on each master) says which queues are leased and to
which netkit; our records say whose attachment that is. A lease with no
matching record is reported as foreign: never ours to touch or hand out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cni_netkit.kernel.types import KernelAPI, Queue
from cni_netkit.plugin.state import Attachment, StateStore


@dataclass(frozen=True)
class LeaseRow:
    master: str
    master_queue: int
    netkit_ifindex: int
    netkit_queue: int
    netns_id: int | None
    attachment: Attachment | None  # None: a lease cni-netkit did not make

    @property
    def owner(self) -> str:
        a = self.attachment
        if a is None:
            return "(foreign)"
        pod = f" pod={a.pod_namespace}/{a.pod_name}" if a.pod_name else ""
        return f"{a.network}/{a.container_id[:12]}/{a.ifname}{pod}"


def masters_of(store: StateStore, extra: Iterable[str] = ()) -> list[str]:
    """Masters named in our records plus any the caller adds, in order, once each."""
    names = dict.fromkeys([*extra, *(a.master for a in store)])
    return list(names)


def queues_of(kernel: KernelAPI, master: str) -> list[Queue]:
    """The master's RX queues as the kernel reports them now."""
    link = kernel.link(master)
    if link is None:
        return []
    return [q for q in kernel.queues(link.index) if q.type == "rx"]


def leases(kernel: KernelAPI, store: StateStore, masters: Iterable[str]) -> list[LeaseRow]:
    """Every leased RX queue of ``masters``, with the attachment that holds it if it is ours."""
    by_queue = {(a.master, q.master_queue): a for a in store for q in a.queues}
    rows = []
    for master in masters:
        for q in queues_of(kernel, master):
            if q.lease is None:
                continue
            att = by_queue.get((master, q.id))
            # A record is only the holder if the kernel agrees on the device and its queue.
            if att is not None and (
                att.netkit_ifindex != q.lease.ifindex
                or (q.id, q.lease.queue_id)
                not in {(lq.master_queue, lq.netkit_queue) for lq in att.queues}
            ):
                att = None
            rows.append(
                LeaseRow(master, q.id, q.lease.ifindex, q.lease.queue_id, q.lease.netns_id, att)
            )
    return rows
