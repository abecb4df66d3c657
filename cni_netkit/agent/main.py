"""The node agent process (``cni-netkit agent``), run by the DaemonSet on every node.

``cni-netkit agent [run] [--config FILE] [--node NAME] [--once]``:

1. installs the host artifact into the host's CNI bin dir (``agent.install``);
2. probes the kernel and each configured master (``agent.probe``) and logs it;
3. loops: one *pass* whenever the plugin's attachment records change (a
   cheap ``stat`` every ``poll`` seconds, so an ADD is published within about
   a second) and at least every ``interval`` seconds:

   - the pools declared for the plugin, which reads them on every ADD
     (``plugin.allowlist``: ADD leases nothing else, closed by default);
   - NIC preparation for every pool, and restoration for masters that no
     longer have one (``agent.nicprep``);
   - publishing: node extended resources and the per-pod leases annotation
     (``agent.publish`` decides, ``agent.k8s.KubeClient`` writes), plus the
     probe's findings as a node annotation;
   - GC of attachments whose pod is gone from this node: confirmed with a
     fresh GET of the pod, and older than ``gcGrace``, then released through
     the plugin's own DEL (``plugin.commands.delete``).

Restarts and upgrades never touch a running pod's data plane: a pass reads
the kernel and the records and only *publishes* what exists (adoption), the
install only swaps the executable, and NIC preparation is a no-op when the
NIC already is as recorded. SIGTERM ends the loop after the current pass;
nothing is torn down on exit.

``cni-netkit agent health`` is the DaemonSet's liveness probe: it checks the
status file the loop rewrites after every pass. ``cni-netkit agent
uninstall`` restores the NICs, removes the executable and our node
resources; pods still holding leases keep them (drain the node first).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import structlog

from cni_netkit import __version__, logs
from cni_netkit.agent import install, nicprep, publish, server
from cni_netkit.agent.probe import ProbeReport, probe
from cni_netkit.config import DEFAULT_STATE_DIR, STATE_DIRS_ENV
from cni_netkit.errors import NetkitError
from cni_netkit.kernel import xsk
from cni_netkit.kernel.ethtool import EthtoolAPI
from cni_netkit.kernel.types import KernelAPI
from cni_netkit.plugin import allowlist
from cni_netkit.plugin.state import Attachment, StateStore

log = structlog.get_logger("cni_netkit.agent")

PROBE_ANNOTATION = f"{publish.DOMAIN}/probe"
# GC's release (the plugin's DEL) of one attachment is tried this many times,
# with a doubling wait between passes, then left to the runtime or an operator.
MAX_RELEASE_ATTEMPTS = 5
_MAX_RELEASE_BACKOFF = 3600.0


# --- configuration -----------------------------------------------------------------------


@dataclass(frozen=True)
class AgentConfig:
    """The agent's settings: a JSON file (``--config``, camelCase keys), flags and env.

    Paths are as the agent's container sees them: the DaemonSet mounts the
    host's ``/opt/cni/bin`` at ``cniBinDir`` and the plugin's state dir at the
    same path as on the host (records name netns paths the plugin wrote).
    """

    node: str
    pools_file: Path = Path("/etc/cni-netkit/pools.json")
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    cni_bin_dir: Path = Path("/host/opt/cni/bin")
    artifact: Path | None = Path("/opt/cni-netkit/artifact")  # None: do not install
    interval: float = 30.0  # seconds between full passes
    poll: float = 1.0  # seconds between checks of the records dir
    gc_grace: float = 60.0  # an orphan's record must be this old before GC
    kube_url: str | None = None
    kubeconfig: str | None = None
    run_dir: Path | None = None  # for the status file; default: <state_dir>/agent
    # The AF_XDP steering program (docs/af_xdp.md) for every pool master; None: none
    bpf_object: Path | None = None

    @property
    def status_file(self) -> Path:
        return (self.run_dir or self.state_dir / "agent") / "agent-status.json"

    @property
    def health_max_age(self) -> float:
        """A status older than this means the loop is stuck."""
        return max(3 * self.interval, 60.0)


_KEYS = {
    "node": ("node", str),
    "poolsFile": ("pools_file", Path),
    "stateDir": ("state_dir", Path),
    "cniBinDir": ("cni_bin_dir", Path),
    "artifact": ("artifact", Path),
    "interval": ("interval", float),
    "poll": ("poll", float),
    "gcGrace": ("gc_grace", float),
    "kubeUrl": ("kube_url", str),
    "kubeconfig": ("kubeconfig", str),
    "runDir": ("run_dir", Path),
    "bpfObject": ("bpf_object", Path),
}


# Environment overrides (the DaemonSet sets these; NODE_NAME from the downward API).
_ENV = {
    "NODE_NAME": ("node", str),
    "CNI_NETKIT_POOLS": ("pools_file", Path),
    "CNI_NETKIT_STATE_DIR": ("state_dir", Path),
    "CNI_NETKIT_CNI_BIN_DIR": ("cni_bin_dir", Path),
    "CNI_NETKIT_RUN_DIR": ("run_dir", Path),
    "CNI_NETKIT_BPF_OBJECT": ("bpf_object", Path),
}


def load_config(
    path: str | None, *, node: str | None = None, environ: Mapping[str, str] = os.environ
) -> AgentConfig:
    """The config file (if any), then the ``CNI_NETKIT_*`` environment, then ``--node``."""
    values: dict[str, Any] = {}
    if path:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise NetkitError(f"agent config {path} unreadable", str(e)) from e
        if not isinstance(doc, dict):
            raise NetkitError(f"agent config {path} must be a JSON object")
        for key, raw in doc.items():
            if key not in _KEYS:
                raise NetkitError(
                    f"agent config {path}: unknown key {key!r}", f"known: {sorted(_KEYS)}"
                )
            name, kind = _KEYS[key]
            values[name] = None if raw is None else kind(raw)
    for var, (name, kind) in _ENV.items():
        if environ.get(var):
            values[name] = kind(environ[var])
    values["node"] = node or values.get("node")
    if not values["node"]:
        raise NetkitError(
            "the agent needs its node name", "--node, or NODE_NAME from the downward API"
        )
    return AgentConfig(**values)


def load_pools(cfg: AgentConfig) -> tuple[publish.Pool, ...]:
    """This node's pools from the ConfigMap file; none (and a warning) when it is absent."""
    try:
        doc = json.loads(cfg.pools_file.read_text())
    except FileNotFoundError:
        log.warning("no pool configuration: advertising nothing", file=str(cfg.pools_file))
        return ()
    except (OSError, ValueError) as e:
        raise NetkitError(f"pool configuration {cfg.pools_file} unreadable", str(e)) from e
    try:
        return publish.pools_for_node(doc, cfg.node)
    except ValueError as e:
        raise NetkitError(f"pool configuration {cfg.pools_file} invalid", str(e)) from e


# --- the seams the agent drives ------------------------------------------------------------


class Kube(Protocol):
    """The ``KubeClient`` calls a pass makes (the real one is ``agent.k8s.KubeClient``)."""

    def get_node(self, name: str) -> Any: ...

    def patch_node_annotations(self, node: str, annotations: Mapping[str, str | None]) -> Any: ...

    def patch_node_status_capacity(self, node: str, resources: Mapping[str, int | None]) -> Any: ...

    def list_pods_on_node(self, node: str) -> Any: ...

    def get_pod(self, namespace: str, name: str) -> Any: ...

    def patch_pod_annotations(
        self, namespace: str, name: str, annotations: Mapping[str, str | None], *, uid: str | None
    ) -> bool: ...


# Releases one attachment through the plugin's DEL (see ``release``).
Release = Callable[[Attachment, KernelAPI], None]


@dataclass(frozen=True)
class PassReport:
    """What one pass did; written to the status file for ``health`` and humans."""

    started: float
    attachments: int = 0
    published: int = 0  # pod annotations written
    capacity: Mapping[str, int | None] = field(default_factory=dict)
    released: tuple[str, ...] = ()  # attachment keys GC released
    nic: tuple[nicprep.NicReport, ...] = ()
    problems: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "started": self.started,
            "attachments": self.attachments,
            "published": self.published,
            "capacity": dict(self.capacity),
            "released": list(self.released),
            "nic": [
                n.__dict__ | {"conflicts": list(n.conflicts), "errors": list(n.errors)}
                for n in self.nic
            ],
            "problems": list(self.problems),
        }


class Agent:
    """One node's agent: the pieces wired together, one ``run_pass`` at a time."""

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        kernel: Callable[[], KernelAPI],
        ethtool: EthtoolAPI,
        kube: Kube | None,
        release: Release,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self._kernel = kernel
        self._ethtool = ethtool
        self._kube = kube
        self._release = release
        self._clock = clock
        self.store = StateStore(cfg.state_dir)
        self.nic_store = nicprep.NicStateStore(cfg.state_dir)
        # key -> (failed releases so far, not before this clock time): GC backs off.
        self._release_failures: dict[str, tuple[int, float]] = {}

    # -- start-up --

    def kernel(self) -> KernelAPI:
        """A kernel handle of the agent's kind; the caller closes it."""
        return self._kernel()

    def install(self) -> install.InstallResult | None:
        if self.cfg.artifact is None:
            return None
        res = install.install(self.cfg.artifact, self.cfg.cni_bin_dir, version=__version__)
        log.info(
            "CNI executable in place",
            changed=res.changed,
            target=str(res.version_dir),
            removed=[str(p) for p in res.removed],
        )
        return res

    def probe(self, pools: Sequence[publish.Pool]) -> ProbeReport:
        kernel = self._kernel()
        try:
            report = probe(kernel, [(p.master, p.queues) for p in pools])
        finally:
            kernel.close()
        for line in report.summary().splitlines():
            log.info("probe", finding=line)
        return report

    def declare(self, pools: Sequence[publish.Pool], kernel: KernelAPI) -> list[str]:
        """Write the pools where the plugin reads them on every ADD (``plugin.allowlist``).

        The node's default allow-list, with each master's ifindex as the
        kernel has it now; no pools: no list (then only the runtime's
        ``CNI_NETKIT_MASTERS`` can declare anything).
        """
        try:
            if not pools:
                if allowlist.withdraw(self.cfg.state_dir):
                    log.info("no pools: the node's pool list removed")
                return []
            declared: dict[str, allowlist.DeclaredPool] = {}
            for p in pools:
                link = kernel.link(p.master)
                prev = declared.get(p.master)
                queues = frozenset(p.queues) | (prev.queues if prev else frozenset())
                declared[p.master] = allowlist.DeclaredPool(
                    p.master, queues, link.index if link else None
                )
            allowlist.write(self.cfg.state_dir, declared.values())
        except (NetkitError, OSError) as e:
            return [f"the node's pool list for the plugin: {e}"]
        return []

    def steer(self, pools: Sequence[publish.Pool], *, startup: bool) -> list[str]:
        """Keep the AF_XDP steering program on every pool master (``xsk.reconcile``).

        Never detached here: the data plane outlives the agent.
        """
        if self.cfg.bpf_object is None:
            return []
        problems = []
        for master in sorted({p.master for p in pools}):
            try:
                change = xsk.reconcile(master, str(self.cfg.bpf_object), startup=startup)
            except NetkitError as e:
                problems.append(f"{master}: AF_XDP steering program: {e}")
                continue
            if change is not None:
                log.info("AF_XDP steering program", master=master, action=change.action,
                         mode=change.program.mode, native_refused=change.native_refused)
        return problems

    # -- one pass --

    def run_pass(self, pools: Sequence[publish.Pool]) -> PassReport:
        """NIC preparation, publishing, GC. Each stage carries on past the others' failures."""
        started = self._clock()
        problems: list[str] = []
        # Records first, pods later: a record written after the pod list was
        # taken would otherwise look orphaned (publish.plan's contract).
        attachments, unreadable = self.store.scan()
        # Forget the release failures of records that are gone (the runtime's DEL
        # or an operator removed them): the table stays as small as the records.
        live = {a.key for a in attachments}
        for key in self._release_failures.keys() - live:
            del self._release_failures[key]
        # Unreadable ones: the runtime's DEL or GC quarantines them (plugin.commands).
        problems.extend(f"unreadable attachment record {c.path.name}: {c.reason}"
                        for c in unreadable)
        kernel = self._kernel()
        try:
            problems.extend(self.declare(pools, kernel))
            problems.extend(self.steer(pools, startup=False))
            report = probe(kernel, [(p.master, p.queues) for p in pools])
            nic = self._prepare_nics(pools, attachments)
            published = 0
            capacity: Mapping[str, int | None] = {}
            orphans: tuple[Attachment, ...] = ()
            released: tuple[str, ...] = ()
            if self._kube is None:
                problems.append("no Kubernetes client: nothing published, no GC")
            else:
                try:
                    published, capacity, orphans = self._publish(
                        self._kube, pools, attachments, report
                    )
                except NetkitError as e:
                    problems.append(f"publish: {e}")
                released = self._gc(self._kube, orphans, kernel, problems)
        finally:
            kernel.close()
        for n in nic:
            problems.extend(f"{n.master}: {e}" for e in n.errors)
        result = PassReport(
            started, len(attachments), published, capacity, released, nic, tuple(problems)
        )
        self._write_status(result)
        return result

    def _prepare_nics(
        self, pools: Sequence[publish.Pool], attachments: Sequence[Attachment]
    ) -> tuple[nicprep.NicReport, ...]:
        reports = [
            nicprep.reconcile(self._ethtool, self.nic_store, p.master, p.queues, attachments)
            for p in pools
        ]
        # Masters we changed that no pool names any more: give them back.
        configured = {p.master for p in pools}
        for master in self.nic_store.masters():
            if master not in configured:
                reports.append(nicprep.reconcile(self._ethtool, self.nic_store, master, (), ()))
        return tuple(reports)

    def _publish(
        self,
        kube: Kube,
        pools: Sequence[publish.Pool],
        attachments: Sequence[Attachment],
        report: ProbeReport,
    ) -> tuple[int, Mapping[str, int | None], tuple[Attachment, ...]]:
        node = kube.get_node(self.cfg.node)
        pods = kube.list_pods_on_node(self.cfg.node).pods
        capacities = {p.resource: self._capacity(p, report, attachments) for p in pools}
        plan = publish.plan(attachments=attachments, pods=pods, node=node, capacities=capacities)
        written = 0
        for change in plan.annotations:
            if kube.patch_pod_annotations(
                change.namespace,
                change.name,
                {publish.LEASES_ANNOTATION: change.value},
                uid=change.uid,
            ):
                written += 1
        if plan.capacity:
            kube.patch_node_status_capacity(self.cfg.node, plan.capacity)
        summary = probe_annotation(report)
        if node.annotations.get(PROBE_ANNOTATION) != summary:
            kube.patch_node_annotations(self.cfg.node, {PROBE_ANNOTATION: summary})
        return written, plan.capacity, plan.orphans

    @staticmethod
    def _capacity(
        pool: publish.Pool, report: ProbeReport, attachments: Sequence[Attachment]
    ) -> int:
        m = report.master(pool.master)
        if m is None:
            return 0
        ours = {q.master_queue for a in attachments if a.master == pool.master for q in a.queues}
        # Held by someone else: leased but not by a record of ours, or bound otherwise.
        foreign = (set(m.leased) - ours) | set(m.busy)
        # A master that is down answers no queue-get, so no ADD can lease from it.
        usable = report.can_lease and m.can_lease and m.up
        return publish.capacity(pool, existing=m.rx_queues or None, foreign=foreign, usable=usable)

    def _gc(
        self, kube: Kube, orphans: Iterable[Attachment], kernel: KernelAPI, problems: list[str]
    ) -> tuple[str, ...]:
        released = []
        for att in orphans:
            failed, not_before = self._release_failures.get(att.key, (0, 0.0))
            if failed >= MAX_RELEASE_ATTEMPTS:
                problems.append(f"gc {att.key}: given up after {failed} failed releases; "
                                "the record is kept for the runtime's DEL or an operator")
                continue
            if self._clock() < not_before or not self._confirmed_orphan(kube, att, problems):
                continue
            try:
                self._release(att, kernel)
            except (NetkitError, OSError) as e:
                failed += 1
                # A failure that heals (IPAM busy, API down) is retried with a growing
                # wait; one that cannot (IPAM plugin missing, its data dir read-only)
                # stops being retried after a few passes instead of forever.
                wait = min(self.cfg.interval * 2**failed, _MAX_RELEASE_BACKOFF)
                self._release_failures[att.key] = (failed, self._clock() + wait)
                log.warning("gc could not release an attachment", key=att.key, error=str(e),
                            failures=failed, retry_in=None if failed >= MAX_RELEASE_ATTEMPTS
                            else wait)
                problems.append(f"gc {att.key}: {e}")
                continue
            self._release_failures.pop(att.key, None)
            log.info(
                "released the attachment of a pod gone from this node",
                key=att.key,
                pod=f"{att.pod_namespace}/{att.pod_name}",
                queues=[q.master_queue for q in att.queues],
            )
            released.append(att.key)
        return tuple(released)

    def _confirmed_orphan(self, kube: Kube, att: Attachment, problems: list[str]) -> bool:
        """A fresh GET agrees the pod is gone (or is another pod now), and the record is old."""
        try:
            age = self._clock() - self.store.path(att.owner).stat().st_mtime
        except FileNotFoundError:
            return False  # DEL got there first
        if age < self.cfg.gc_grace:
            return False
        if not (att.pod_namespace and att.pod_name):
            return False  # not a Kubernetes pod's: the runtime's own GC owns it
        try:
            pod = kube.get_pod(att.pod_namespace, att.pod_name)
        except NetkitError as e:
            problems.append(f"gc {att.key}: {e}")
            return False
        uid = publish.pod_uid(att)
        return pod is None or (uid is not None and pod.uid != uid) or pod.node_name != self.cfg.node

    def _write_status(self, report: PassReport) -> None:
        path = self.cfg.status_file
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        tmp = path.with_suffix(f".tmp.{os.getpid()}")
        tmp.write_text(json.dumps(report.to_json(), sort_keys=True))
        tmp.replace(path)

    # -- uninstall --

    def uninstall(self, pools: Sequence[publish.Pool]) -> list[str]:
        """Restore every NIC we changed, remove the executable and our node resources."""
        problems: list[str] = []
        for master in self.nic_store.masters():
            rep = nicprep.reconcile(self._ethtool, self.nic_store, master, (), ())
            problems.extend(f"{master}: {e}" for e in rep.errors)
        if self.cfg.bpf_object is not None:
            for master in sorted({p.master for p in pools}):
                # Pods still wired lose their AF_XDP traffic: drain the node first.
                if xsk.remove_program(master):
                    log.info("AF_XDP steering program removed", master=master)
        try:
            allowlist.withdraw(self.cfg.state_dir)  # nothing declared any more
        except OSError as e:
            problems.append(f"the node's pool list: {e}")
        removed = install.uninstall(self.cfg.cni_bin_dir)
        log.info("CNI executable removed", removed=[str(p) for p in removed])
        if self._kube is not None:
            try:
                self._kube.patch_node_status_capacity(
                    self.cfg.node, {p.resource: None for p in pools}
                )
                self._kube.patch_node_annotations(self.cfg.node, {PROBE_ANNOTATION: None})
            except NetkitError as e:
                problems.append(f"node resources: {e}")
        return problems


def probe_annotation(report: ProbeReport) -> str:
    """The probe's findings as the node annotation's canonical JSON value."""
    k = report.kernel
    doc = {
        "version": __version__,
        "kernel": {"release": k.release, "canLease": k.can_lease},
        "masters": {
            m.name: {
                "found": m.found,
                "queueOps": m.queue_ops,
                "zeroCopy": m.zerocopy,
                "afXdpViaNetkit": m.af_xdp_via_netkit,
                "driver": m.driver,
                "problems": list(m.problems),
            }
            for m in report.masters
        },
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


# --- GC through the plugin's DEL ------------------------------------------------------------


def release(att: Attachment, kernel: KernelAPI, *, state_dir: Path, cni_path: Path) -> None:
    """Run the plugin's DEL for ``att``, as the runtime would have.

    With the network config ADD recorded, so DEL also releases the IPAM
    allocation, exactly as the runtime's own DEL would.
    """
    from cni_netkit.config import parse_invocation  # noqa: PLC0415 - pydantic only when GC runs
    from cni_netkit.plugin import commands  # noqa: PLC0415

    if att.netconf is None:
        raise ValueError(f"attachment {att.key} has no recorded network config")
    # The agent's own state dir, and none of the runtime's per-call files: this
    # DEL logs through the agent, and the record names the device-info file.
    conf = {k: v for k, v in att.netconf.items() if k != "logFile"}
    conf["stateDir"] = str(state_dir)
    runtime = conf.get("runtimeConfig")
    if isinstance(runtime, dict):
        conf["runtimeConfig"] = {k: v for k, v in runtime.items() if k != "CNIDeviceInfoFile"}
    environ = {
        "CNI_COMMAND": "DEL",
        "CNI_CONTAINERID": att.container_id,
        "CNI_IFNAME": att.ifname,
        "CNI_NETNS": att.netns,
        "CNI_PATH": str(cni_path),
        STATE_DIRS_ENV: str(state_dir),
    }
    inv = parse_invocation(environ, json.dumps(conf).encode())
    commands.delete(inv, kernel)


# --- the process ---------------------------------------------------------------------------


class _Stop:
    """SIGTERM/SIGINT: finish the pass in progress, then leave the loop."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        self.event.set()


def loop(agent: Agent, pools: Sequence[publish.Pool], stop: threading.Event) -> None:
    """Passes on record changes and every ``interval`` until ``stop`` is set."""
    last_sig: tuple[float, int] | None = None
    last_pass = 0.0
    while not stop.is_set():
        sig = _records_signature(agent.store.dir)
        now = time.monotonic()
        if sig != last_sig or now - last_pass >= agent.cfg.interval:
            try:
                report = agent.run_pass(pools)
                for p in report.problems:
                    log.warning("pass problem", problem=p)
            except Exception:  # one bad pass must not end the agent
                log.exception("pass failed")
            last_sig, last_pass = sig, now
        stop.wait(agent.cfg.poll)


def _records_signature(directory: Path) -> tuple[float, int]:
    """Changes whenever a record is written (temp file + rename) or removed."""
    try:
        st = directory.stat()
    except FileNotFoundError:
        return (0.0, 0)
    return (st.st_mtime, st.st_nlink + sum(1 for _ in directory.iterdir()))


def build(cfg: AgentConfig) -> Agent:
    """The agent with the real kernel, ethtool and Kubernetes client."""
    from cni_netkit.agent.k8s import KubeClient  # noqa: PLC0415 - kubernetes is heavy; only here
    from cni_netkit.kernel import Kernel  # noqa: PLC0415
    from cni_netkit.kernel.ethtool import Ethtool  # noqa: PLC0415

    kube = KubeClient.connect(url=cfg.kube_url, kubeconfig=cfg.kubeconfig)
    return Agent(
        cfg,
        kernel=Kernel,
        ethtool=Ethtool(),
        kube=kube,
        release=lambda att, kernel: release(
            att, kernel, state_dir=cfg.state_dir, cni_path=cfg.cni_bin_dir
        ),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``cni-netkit agent``'s arguments (the CLI registers this)."""
    parser.add_argument(
        "action",
        nargs="?",
        default="run",
        choices=["run", "health", "uninstall"],
        help="run the agent (default), check its liveness, or undo what it did",
    )
    parser.add_argument("--config", help="agent config file (JSON)")
    parser.add_argument("--node", help="this node's name (default: $NODE_NAME)")
    parser.add_argument("--once", action="store_true", help="one pass, then exit")


def main(args: argparse.Namespace) -> int:
    """``cni-netkit agent``: the exit status."""
    logs.configure("info")  # JSON lines on stderr: the container log
    try:
        cfg = load_config(args.config, node=args.node)
        if args.action == "health":
            return health(cfg)
        pools = load_pools(cfg)
        agent = build(cfg)
        if args.action == "uninstall":
            problems = agent.uninstall(pools)
            for p in problems:
                log.error("uninstall left something behind", problem=p)
            return 1 if problems else 0
        agent.install()
        agent.probe(pools)
        kernel = agent.kernel()
        try:
            for problem in agent.declare(pools, kernel):
                log.warning("start-up problem", problem=problem)
        finally:
            kernel.close()
        for problem in agent.steer(pools, startup=True):
            log.warning("start-up problem", problem=problem)
    except NetkitError as e:
        log.error("agent cannot start", error=str(e))
        return 1
    except OSError as e:
        log.error("agent cannot start", error=f"{type(e).__name__}: {e}")
        return 1
    if args.once:
        report = agent.run_pass(pools)
        return 1 if report.problems else 0
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # The warm path: the executable relays CNI requests here and runs them
    # itself whenever this socket does not answer, so the agent is never on
    # pod networking's critical path. The executable names the host's CNI bin
    # dir in CNI_PATH; the agent sees it at its cni_bin_dir (/host/opt/cni/bin).
    warm = server.start(warm_socket(cfg), bin_dirs=(cfg.cni_bin_dir,))
    log.info("agent running", node=cfg.node, pools=[p.master for p in pools],
             interval=cfg.interval, socket=str(warm.path))
    # SIGTERM starts closing at once, alongside the pass in progress: requests in
    # flight get all of close()'s wait within the pod's grace period.
    def close_on_stop() -> None:
        stop.event.wait()
        warm.close()

    closer = threading.Thread(target=close_on_stop, name="cni-close")
    closer.start()
    try:
        loop(agent, pools, stop.event)
    finally:
        stop.event.set()
        closer.join()
    return 0


def warm_socket(cfg: AgentConfig) -> Path:
    """Where the executable looks for the agent: ``<runDir>/cni.sock`` (default /run/cni-netkit)."""
    return (cfg.run_dir or Path(server.DEFAULT_SOCKET).parent) / Path(server.DEFAULT_SOCKET).name


def health(cfg: AgentConfig, *, now: Callable[[], float] = time.time) -> int:
    """0 when the loop finished a pass recently; prints why not otherwise."""
    try:
        age = now() - cfg.status_file.stat().st_mtime
    except FileNotFoundError:
        print(f"unhealthy: no status at {cfg.status_file} (no pass finished yet)")
        return 1
    if age > cfg.health_max_age:
        print(f"unhealthy: last pass {age:.0f}s ago (> {cfg.health_max_age:.0f}s)")
        return 1
    print(f"ok: last pass {age:.0f}s ago")
    return 0
