"""What the node agent publishes to Kubernetes: pure decisions, no I/O.

Two things leave the node:

* **Node extended resources**, one per pool (per master NIC):
  ``netkit.cni.dev/<master>`` (e.g. ``netkit.cni.dev/ens1f0np0``). One unit is
  *one attachment*, i.e. ``queuesPerAttachment`` queues of that master's pool,
  because that is what the ecosystem asks for: KubeVirt's virt-controller and
  the network-resources-injector add one unit of a NetworkAttachmentDefinition's
  ``k8s.v1.cni.cncf.io/resourceName`` per interface that uses it. Capacity is
  the number of whole attachments the pool can still serve from queues that
  exist on the master (pool ids beyond the NIC's queue count cannot be leased,
  queues held by someone else are not ours to give), 0 when the master cannot
  lease at all. The scheduler subtracts what running pods request.
* **A pod annotation**, ``netkit.cni.dev/leases``: a JSON list with one entry
  per netkit attachment of the pod (``plugin.leasefile.lease_entry``, which
  also writes the lease file of an attachment delivered into the pod's volume),
  readable inside the pod through a downward API volume.

:func:`plan` compares what should be published (from the plugin's attachment
records and the pool configuration) with what the API server shows, and says
which writes the reconciler must make. The reconciler does the I/O
(``cni_netkit.agent.k8s``) around it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cni_netkit.config import parse_queue_pool
from cni_netkit.plugin.leasefile import lease_entry
from cni_netkit.plugin.state import Attachment

if TYPE_CHECKING:
    from cni_netkit.agent.k8s import Node, Pod

DOMAIN = "netkit.cni.dev"
LEASES_ANNOTATION = f"{DOMAIN}/leases"
RESOURCE_PREFIX = f"{DOMAIN}/"

# Kubernetes' qualified-name rules (apimachinery validation.IsQualifiedName):
# "<DNS-1123 subdomain>/<name>", name <= 63 chars of [A-Za-z0-9_.-], starting
# and ending alphanumeric.
_NAME_RE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN_RE = re.compile(rf"^{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*$")


def is_qualified_name(name: str) -> bool:
    """Kubernetes' ``IsQualifiedName``: annotation keys and resource names obey it."""
    prefix, slash, local = name.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS1123_SUBDOMAIN_RE.match(prefix)):
        return False
    return 0 < len(local) <= 63 and bool(_NAME_RE.match(local))


def is_extended_resource_name(name: str) -> bool:
    """Whether the API server accepts ``name`` as an extended resource.

    Mirrors ``v1helper.IsExtendedResourceName``: domain-prefixed, not in the
    ``kubernetes.io`` namespace, not ``requests.``-prefixed, and a qualified name
    once ``requests.`` is put in front (quota needs that form to be valid too).
    """
    if "/" not in name or "kubernetes.io/" in name or name.startswith("requests."):
        return False
    return is_qualified_name(f"requests.{name}")


def resource_name(master: str) -> str:
    """The extended resource advertising ``master``'s pool: ``netkit.cni.dev/<master>``.

    Raises ValueError for an interface name Kubernetes cannot carry in a
    resource name (Linux allows e.g. ``@`` or ``:`` in ifnames; the API does
    not): give such a pool an explicit ``resourceName`` in the pool config.
    """
    name = RESOURCE_PREFIX + master
    if not is_extended_resource_name(name):
        raise ValueError(
            f"master {master!r} gives {name!r}, which is not a valid Kubernetes extended"
            " resource name; set resourceName for this pool"
        )
    return name


def is_ours(resource: str) -> bool:
    """A node resource in our domain: the agent may set and remove it."""
    return resource.startswith(RESOURCE_PREFIX)


# --- pool configuration (the ConfigMap ``cni-netkit-pools``) -------------------


@dataclass(frozen=True)
class Pool:
    """One master NIC's queue pool, as the agent's ConfigMap declares it.

    Must agree with the NetworkAttachmentDefinitions that use the master
    (same ``queues`` and ``queuesPerAttachment``): the NAD's config drives
    the plugin's leasing, this drives NIC preparation and capacity.
    """

    master: str
    queues: tuple[int, ...]
    queues_per_attachment: int = 1
    resource: str = ""  # "" -> resource_name(master)

    def __post_init__(self) -> None:
        if self.queues_per_attachment < 1:
            raise ValueError(f"pool {self.master}: queuesPerAttachment must be >= 1")
        if not self.resource:
            object.__setattr__(self, "resource", resource_name(self.master))
        elif not is_extended_resource_name(self.resource):
            raise ValueError(
                f"pool {self.master}: {self.resource!r} is not an extended resource name"
            )


def pools_for_node(document: Mapping[str, Any], node: str) -> tuple[Pool, ...]:
    """The pools that apply to ``node`` from the ConfigMap's ``pools.json``.

    ``{"pools": [...], "nodes": {"<node name>": {"pools": [...]}}}``: a node
    listed under ``nodes`` gets exactly its own list (NIC names and queue
    counts differ between hardware generations), every other node the
    default ``pools``. Each pool is ``{"master", "queues", "queuesPerAttachment"?,
    "resourceName"?}``. Raises ValueError naming the bad entry.
    """
    nodes = document.get("nodes") or {}
    if not isinstance(nodes, Mapping):
        raise ValueError("'nodes' must map node names to {pools: [...]}")
    chosen = nodes.get(node, document)
    entries = chosen.get("pools", []) if isinstance(chosen, Mapping) else None
    if not isinstance(entries, list):
        raise ValueError(f"pools for node {node} must be a list")
    pools: list[Pool] = []
    for i, entry in enumerate(entries):
        where = f"pools[{i}]" + (f" of node {node}" if chosen is not document else "")
        if not isinstance(entry, Mapping) or not isinstance(entry.get("master"), str):
            raise ValueError(f"{where}: needs a 'master' interface name")
        try:
            pools.append(
                Pool(
                    master=entry["master"],
                    queues=parse_queue_pool(entry.get("queues", ())),
                    queues_per_attachment=int(entry.get("queuesPerAttachment", 1)),
                    resource=str(entry.get("resourceName", "")),
                )
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from e
    masters = [p.master for p in pools]
    if len(set(masters)) != len(masters):
        raise ValueError(f"node {node}: a master appears in two pools: {masters}")
    return tuple(pools)


def capacity(
    pool: Pool,
    *,
    existing: Collection[int] | None = None,
    foreign: Collection[int] = (),
    usable: bool = True,
) -> int:
    """Attachments the pool can serve in total: the node's extended resource count.

    ``existing``: RX queue ids the master has now (None: not known, trust the
    pool); ``foreign``: pool queues held by something that is not cni-netkit
    (another control plane's lease, an AF_XDP socket on the NIC itself);
    ``usable``: the probe found the master able to lease at all. Our own
    leases stay counted: the scheduler already subtracts the pods holding them.
    """
    if not usable:
        return 0
    queues = set(pool.queues) - set(foreign)
    if existing is not None:
        queues &= set(existing)
    return len(queues) // pool.queues_per_attachment


# --- the pod annotation ------------------------------------------------------------


def leases_value(attachments: Iterable[Attachment]) -> str | None:
    """The annotation's value for one pod's attachments; None means "no annotation".

    Canonical JSON (sorted keys, no spaces, entries ordered by network then
    interface) so an unchanged state compares equal and is never re-written.
    """
    entries = sorted(
        (lease_entry(a) for a in attachments), key=lambda e: (e["network"], e["interface"])
    )
    if not entries:
        return None
    return json.dumps(entries, sort_keys=True, separators=(",", ":"))


def pod_uid(att: Attachment) -> str | None:
    """The pod UID the plugin recorded at ADD (``K8S_POD_UID``), when it did.

    It tells a pod from a later pod of the same name (StatefulSets reuse
    names); without it only namespace and name can be matched.
    """
    uid = att.extra.get("pod_uid")
    return uid if isinstance(uid, str) and uid else None


# --- desired versus actual --------------------------------------------------------


@dataclass(frozen=True)
class AnnotationChange:
    """Set (``value``) or remove (``value is None``) the leases annotation of one pod."""

    namespace: str
    name: str
    uid: str  # precondition for the patch: never write onto a newer pod of the same name
    value: str | None


@dataclass(frozen=True)
class Plan:
    """What the reconciler must write to converge. Empty when all is in place."""

    annotations: tuple[AnnotationChange, ...] = ()
    # resource -> count to advertise (capacity and allocatable), None to remove it
    capacity: Mapping[str, int | None] = field(default_factory=dict)
    # Records whose pod is not on this node (any more): candidates for GC.
    orphans: tuple[Attachment, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.annotations or self.capacity or self.orphans)


def plan(
    *,
    attachments: Iterable[Attachment],
    pods: Iterable[Pod],
    node: Node,
    capacities: Mapping[str, int],
) -> Plan:
    """Compare desired with actual.

    ``attachments``: the plugin's records on this node; ``pods``: the pods the
    API server has on this node; ``capacities``: resource name -> count, from
    :func:`capacity` per configured pool.

    Read the attachment records *before* listing pods: a record written after
    the list was taken would otherwise look orphaned. Attachments without pod
    identity (a non-Kubernetes runtime) are neither published nor orphaned.
    An orphan is only a candidate: confirm with a fresh ``get_pod`` before
    deleting anything, the list may be stale.
    """
    by_pod: dict[tuple[str, str], list[Attachment]] = {}
    for att in attachments:
        if att.pod_namespace and att.pod_name:
            by_pod.setdefault((att.pod_namespace, att.pod_name), []).append(att)

    changes: list[AnnotationChange] = []
    orphans: list[Attachment] = []
    seen: set[tuple[str, str]] = set()
    for pod in sorted(pods, key=lambda p: (p.namespace, p.name)):
        key = (pod.namespace, pod.name)
        seen.add(key)
        mine: list[Attachment] = []
        for att in by_pod.get(key, ()):
            uid = pod_uid(att)
            (orphans if uid is not None and uid != pod.uid else mine).append(att)
        want = leases_value(mine)
        if pod.annotations.get(LEASES_ANNOTATION) != want:
            changes.append(AnnotationChange(pod.namespace, pod.name, pod.uid, want))
    for key, atts in sorted(by_pod.items()):
        if key not in seen:
            orphans.extend(atts)

    return Plan(
        annotations=tuple(changes),
        capacity=capacity_changes(node, capacities),
        orphans=tuple(sorted(orphans, key=lambda a: a.key)),
    )


def capacity_changes(node: Node, capacities: Mapping[str, int]) -> dict[str, int | None]:
    """Our extended resources to set (count) or remove (None) on ``node``.

    Both ``capacity`` and ``allocatable`` must agree: the scheduler reads
    allocatable, and the kubelet only copies capacity into it on its next
    status update. Resources of ours that no pool declares any more are
    removed; other resources are never touched.
    """
    for name in capacities:
        if not is_ours(name) and not is_extended_resource_name(name):
            raise ValueError(f"{name!r} is not an extended resource name")
    out: dict[str, int | None] = {}
    for name, count in sorted(capacities.items()):
        if count < 0:
            raise ValueError(f"{name}: negative capacity {count}")
        if _count(node.capacity.get(name)) != count or _count(node.allocatable.get(name)) != count:
            out[name] = count
    stale = {r for r in (*node.capacity, *node.allocatable) if is_ours(r) and r not in capacities}
    for name in sorted(stale):
        out[name] = None
    return out


def _count(quantity: str | None) -> int | None:
    # Our resources are plain integers; the API server keeps them as "4". Any
    # other form (someone else wrote it) is "different" and gets rewritten.
    if quantity is None or not quantity.isdigit():
        return None
    return int(quantity)
