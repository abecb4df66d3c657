"""What this node can do: the kernel's netkit queue leasing and each configured master.

Read-only, through the kernel seam (``probe``, ``link``, ``dev_get``,
``queues``) and sysfs for the driver name. What can and cannot be known
without leasing:

* **Kernel support** is exact: the ``netkit`` link kind and the netdev
  family's ``queue-create`` op either exist or not.
* **A parent bus device** is exact (``IFLA_PARENT_DEV_NAME``): without one
  (veth, bond, a VLAN) the kernel refuses every lease (EINVAL).
* **Queue-management ops** (``netdev_queue_mgmt_ops``, the other half of that
  EINVAL) are *not exposed* by any netlink attribute or sysfs file. The only
  direct evidence is a lease the kernel accepted: a queue of the master that
  reports a ``lease`` now proves them ("proven"). Otherwise the driver name
  is compared with the drivers that have them in Linux 7.2 (mlx5, bnxt, gve,
  fbnic, netdevsim: "likely"), and anything else is "unknown" rather than
  "absent": a newer driver may have gained them. Probing by leasing would
  need a netkit and a free queue; the agent does not touch the data plane
  to find out, the first ADD will.
* **Zero-copy AF_XDP** is what the driver advertises in ``xdp-features``
  (``xsk-zerocopy``; ``xdp-zc-max-segs`` > 1 for multi-buffer). A zero-copy
  bind on a netkit queue is proxied to the physical device only when it has
  ``basic``, ``redirect`` and ``xsk-zerocopy`` (netkit's
  ``netkit_xsk_supported_at_phys``, checked for ``XDP_SETUP_XSK_POOL``). A
  copy-mode bind never reaches that check: the agent's program on the master
  redirects the leased queue's frames into the attachment's XSKMAP, which needs
  only native XDP with redirect (``basic``, ``redirect``). So a master without
  zero-copy still carries AF_XDP through a netkit, in copy mode (the result's
  ``xskMode``), which the VM suite proves on netdevsim.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Protocol

from cni_netkit.errors import KernelError
from cni_netkit.kernel.types import DevInfo, KernelSupport, Link, Queue

QueueOps = Literal["proven", "likely", "unknown", "absent"]

# Drivers implementing netdev_queue_mgmt_ops in Linux 7.2 (KERNEL.md).
QUEUE_MGMT_DRIVERS = frozenset({"mlx5_core", "bnxt_en", "gve", "fbnic", "netdevsim"})
# What AF_XDP through a netkit needs of the physical device: the agent's program
# runs natively there and redirects into an XSKMAP (copy mode).  Zero-copy also
# needs "xsk-zerocopy" (netkit's NETDEV_XDP_ACT_XSK check).
XSK_VIA_NETKIT = frozenset({"basic", "redirect"})


class ProbeKernel(Protocol):
    """The read-only part of ``KernelAPI`` the probe uses (``kernel.Kernel`` has it)."""

    def probe(self) -> KernelSupport: ...

    def link(self, name_or_index: str | int, *, netns: str | None = None) -> Link | None: ...

    def dev_get(self, ifindex: int, *, netns: str | None = None) -> DevInfo: ...

    def queues(self, ifindex: int | None = None, *, netns: str | None = None) -> list[Queue]: ...


@dataclass(frozen=True)
class MasterReport:
    """One configured master and its pool, as the kernel shows them now."""

    name: str
    pool: tuple[int, ...]
    found: bool = False
    ifindex: int | None = None
    up: bool = False
    rx_queues: tuple[int, ...] = ()  # RX queue ids the master has (empty when down: ENOENT)
    parent: str | None = None  # "<bus>/<device>", None for a virtual device
    driver: str | None = None
    queue_ops: QueueOps = "unknown"
    queue_ops_reason: str = ""
    xdp_features: frozenset[str] = frozenset()
    zc_max_segs: int | None = None
    leased: tuple[int, ...] = ()  # pool queues leased now (by us or anyone)
    busy: tuple[int, ...] = ()  # pool queues held otherwise: AF_XDP on the NIC, memory providers
    problems: tuple[str, ...] = ()

    @property
    def zerocopy(self) -> bool:
        return "xsk-zerocopy" in self.xdp_features

    @property
    def af_xdp_via_netkit(self) -> bool:
        """A pod can bind AF_XDP on its netkit, at least in copy mode (see ``zerocopy``)."""
        return XSK_VIA_NETKIT.issubset(self.xdp_features)

    @property
    def missing(self) -> tuple[int, ...]:
        """Pool queue ids the master does not have (known only while it is up)."""
        if not self.rx_queues:
            return ()
        return tuple(q for q in self.pool if q not in set(self.rx_queues))

    @property
    def can_lease(self) -> bool:
        """Nothing known rules leasing out (queue ops may still be missing: "unknown")."""
        return self.found and self.queue_ops != "absent"

    def summary(self) -> str:
        if not self.found:
            return f"{self.name}: not found"
        bits = [
            f"{self.name} (ifindex {self.ifindex}, {'up' if self.up else 'DOWN'}, "
            f"driver {self.driver or '?'}, parent {self.parent or 'none'})",
            f"queue ops {self.queue_ops}"
            + (f" ({self.queue_ops_reason})" if self.queue_ops_reason else ""),
            f"zero-copy {'yes' if self.zerocopy else 'NO'}"
            + (f" (zc max segs {self.zc_max_segs})" if self.zc_max_segs else ""),
            f"AF_XDP via netkit {'yes' if self.af_xdp_via_netkit else 'NO'}",
            f"pool {len(self.pool)} queues, {len(self.leased)} leased, {len(self.busy)} busy"
            + (f", missing {list(self.missing)}" if self.missing else ""),
        ]
        text = "; ".join(bits)
        return text + "".join(f"\n  ! {p}" for p in self.problems)


@dataclass(frozen=True)
class ProbeReport:
    kernel: KernelSupport
    masters: tuple[MasterReport, ...]

    @property
    def can_lease(self) -> bool:
        return self.kernel.can_lease

    def master(self, name: str) -> MasterReport | None:
        return next((m for m in self.masters if m.name == name), None)

    def summary(self) -> str:
        k = self.kernel
        head = (
            f"kernel {k.release}: netkit {'yes' if k.netkit else 'NO'}, "
            f"netdev family {'yes' if k.netdev_family else 'NO'}, "
            f"queue-create {'yes' if k.queue_create else 'NO'}"
            + ("" if k.can_lease else " -> queue leasing unavailable (needs Linux >= 7.1)")
        )
        return "\n".join([head, *(m.summary() for m in self.masters)])


def sysfs_driver(name: str) -> str | None:
    """The driver bound to the master's parent device (``/sys/class/net/X/device/driver``)."""
    try:
        return Path(f"/sys/class/net/{name}/device/driver").resolve(strict=True).name
    except OSError:
        return None


def probe(
    kernel: ProbeKernel,
    pools: Iterable[tuple[str, Iterable[int]]],
    *,
    driver_of: Callable[[str], str | None] = sysfs_driver,
) -> ProbeReport:
    """Probe the kernel and every ``(master, pool queue ids)``."""
    support = kernel.probe()
    masters = tuple(
        probe_master(kernel, name, tuple(sorted(set(pool))), driver_of=driver_of)
        for name, pool in pools
    )
    return ProbeReport(support, masters)


def probe_master(
    kernel: ProbeKernel,
    name: str,
    pool: tuple[int, ...],
    *,
    driver_of: Callable[[str], str | None] = sysfs_driver,
) -> MasterReport:
    link = kernel.link(name)
    if link is None:
        return MasterReport(
            name, pool, problems=(f"master {name} does not exist in the host netns",)
        )
    problems: list[str] = []
    driver = driver_of(name) if _has_parent(link) else None
    dev = DevInfo(link.index)
    try:
        dev = kernel.dev_get(link.index)
    except KernelError as e:
        problems.append(f"dev-get failed: {e}")
    rx: list[Queue] = []
    try:
        rx = [q for q in kernel.queues(link.index) if q.type == "rx"]
    except KernelError as e:
        # queue-get answers ENOENT while the device is down.
        problems.append(f"queue-get failed ({'device down' if not link.up else 'error'}): {e}")
    in_pool = {q.id: q for q in rx if q.id in set(pool)}
    leased = tuple(sorted(q for q, info in in_pool.items() if info.lease is not None))
    busy = tuple(sorted(q for q, info in in_pool.items() if info.lease is None and info.in_use))
    ops, why = _queue_ops(link, driver, any(q.lease is not None for q in rx))
    report = MasterReport(
        name=name,
        pool=pool,
        found=True,
        ifindex=link.index,
        up=link.up,
        rx_queues=tuple(sorted(q.id for q in rx)),
        parent=f"{link.parent_bus or '?'}/{link.parent_dev or '?'}" if _has_parent(link) else None,
        driver=driver,
        queue_ops=ops,
        queue_ops_reason=why,
        xdp_features=dev.xdp_features,
        zc_max_segs=dev.xdp_zc_max_segs,
        leased=leased,
        busy=busy,
    )
    if not report.zerocopy:
        problems.append(
            "no zero-copy AF_XDP: pods bind AF_XDP to their queues in copy mode only"
            if report.af_xdp_via_netkit
            else "no native XDP redirect: pods can lease queues but not receive AF_XDP on them"
        )
    if report.missing:
        problems.append(f"pool queues {list(report.missing)} do not exist on {name}")
    if ops == "absent":
        problems.append(why)
    return replace(report, problems=tuple(problems))


def _queue_ops(link: Link, driver: str | None, has_lease: bool) -> tuple[QueueOps, str]:
    if not _has_parent(link):
        return "absent", f"{link.name} has no parent bus device: the kernel refuses leases from it"
    if has_lease:
        return "proven", "a queue is leased now"
    if driver in QUEUE_MGMT_DRIVERS:
        return "likely", f"driver {driver} has them in Linux 7.2"
    return "unknown", f"driver {driver or '?'}: only a lease attempt can tell"


def _has_parent(link: Link) -> bool:
    # IFLA_PARENT_DEV_NAME and _BUS_NAME come together; either one is the evidence.
    return bool(link.parent_dev or link.parent_bus)
