"""The request: network config from stdin and the CNI_* environment, decoded and validated once.

``parse_invocation`` is our ``loadConf``: everything the plugin layer reads has
passed through here, so the layers above work with typed, checked values and
every rejection carries its CNI code and names the key or variable at fault.
Order of checks: the command, the stdin JSON (6), ``cniVersion`` (1), the
environment (4), ``CNI_ARGS`` (4/2), then the config itself (7).
"""


import json
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import Annotated, Any, Final, Literal, cast

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from cni_netkit import errors
from cni_netkit.errors import SUPPORTED_VERSIONS

Command = Literal["ADD", "DEL", "CHECK", "STATUS", "GC"]
COMMANDS: Final[tuple[str, ...]] = ("ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION")

MAX_STDIN: Final = 1 << 20  # a network config is a few KiB; more is not one
MAX_QUEUE_ID: Final = 65535  # the netdev family's queue ids are u16 in practice
MAX_POOL: Final = 4096  # far beyond any NIC's queue count: a typo, not a pool
IFNAMSIZ: Final = 16  # kernel limit including the NUL
MAX_CONTAINER_ID: Final = 255
DEFAULT_STATE_DIR: Final = "/var/lib/cni/netkit"

# Where a network config may make the plugin (root) keep state and write files.
# The config is not the node admin's alone: through a Multus
# NetworkAttachmentDefinition any user who may create one in a namespace
# writes it.  The environment is the runtime's, set by the node's admin, so
# the allowed places come from there (docs/security.md).  Colon-separated.
STATE_DIRS_ENV: Final = "CNI_NETKIT_STATE_DIRS"  # stateDir must be one of these
LOG_DIRS_ENV: Final = "CNI_NETKIT_LOG_DIRS"  # logFile must be inside one of these
DEVICE_INFO_DIRS_ENV: Final = "CNI_NETKIT_DEVICE_INFO_DIRS"  # CNIDeviceInfoFile inside one
KUBELET_ROOTS_ENV: Final = "CNI_NETKIT_KUBELET_ROOTS"  # kubeletRoot must be one of these
# The masters and queues a config may lease: "eth1=8-15;eth2=0-3,6" (queue lists as in
# "queues").  With the agent's pools it narrows them; with neither, ADD leases
# nothing (plugin.allowlist, docs/security.md).
MASTERS_ENV: Final = "CNI_NETKIT_MASTERS"
DEFAULT_STATE_DIRS: Final = (DEFAULT_STATE_DIR,)
DEFAULT_LOG_DIRS: Final = ("/var/log/cni-netkit",)
DEFAULT_KUBELET_ROOT: Final = "/var/lib/kubelet"
DEFAULT_XSK_MAP_MOUNT_PATH: Final = "/run/netkit"
# Multus writes device-info files under <base>/devinfo/cni (nadutils); /var/run is /run.
DEFAULT_DEVICE_INFO_DIRS: Final = (
    "/run/k8s.cni.cncf.io/devinfo",
    "/var/run/k8s.cni.cncf.io/devinfo",
)

# What each command needs beyond CNI_COMMAND (the spec's table; DEL's netns may be gone).
_REQUIRED_ENV: Final[dict[str, tuple[str, ...]]] = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "STATUS": (),
    "GC": (),
}
# Commands that do not exist in older spec versions (libcni's skel refuses them too).
_SINCE: Final[dict[str, str]] = {"CHECK": "0.4.0", "STATUS": "1.1.0", "GC": "1.1.0"}

KNOWN_CNI_ARGS: Final = frozenset(
    {
        "IgnoreUnknown",
        "K8S_POD_NAMESPACE",
        "K8S_POD_NAME",
        "K8S_POD_INFRA_CONTAINER_ID",
        "K8S_POD_UID",
        "MAC",
    }
)
# Well-known plugin-config keys (spec section 1) that we accept and do not use.
_IGNORED_KEYS: Final = frozenset({"dns", "ipMasq"})

# Go's utils.ValidateContainerID: also keeps the id a safe single file-name component.
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_MAC = re.compile(r"[0-9a-fA-F]{2}([:-])[0-9a-fA-F]{2}(?:\1[0-9a-fA-F]{2}){4}")
_QUEUE_SPAN = re.compile(r"(\d{1,10})(?:\s*-\s*(\d{1,10}))?")


# --- value checks shared by the model and the environment ---------------------


def ifname_problem(name: str) -> str | None:
    """Why ``name`` is not a valid Linux interface name (kernel ``dev_valid_name``), or None."""
    if not name:
        return "is empty"
    if len(name.encode("utf-8", "surrogateescape")) >= IFNAMSIZ:
        return f"is longer than {IFNAMSIZ - 1} bytes: {_short(name)}"
    if name in (".", ".."):
        return f"cannot be {_short(name)}"
    # The kernel forbids '/', ':' and whitespace; we also refuse the unprintable,
    # since the name ends up in logs, file names and our owner alias.
    if any(c in "/:" or c.isspace() or not c.isprintable() for c in name):
        return f"contains '/', ':', whitespace or unprintable characters: {_short(name)}"
    return None


def container_id_problem(value: str) -> str | None:
    """Why ``value`` is not a valid CNI_CONTAINERID (libcni's rule, bounded), or None."""
    if len(value) > MAX_CONTAINER_ID:
        return f"is longer than {MAX_CONTAINER_ID} characters"
    if not _CONTAINER_ID.fullmatch(value):
        return f"must match [A-Za-z0-9][A-Za-z0-9_.-]*, got {_short(value)}"
    return None


def normalize_mac(value: str) -> str:
    """A unicast Ethernet MAC (``aa:bb:..`` or ``aa-bb-..``) in lowercase colon form.

    Raises ValueError saying why not: a multicast or all-zero address cannot be
    a device's own address (the kernel's ``is_valid_ether_addr``).
    """
    if not _MAC.fullmatch(value):
        raise ValueError(f"not a MAC address like 02:00:00:00:00:01: {_short(value)}")
    mac = value.lower().replace("-", ":")
    if int(mac[:2], 16) & 1:
        raise ValueError(f"{mac} is a multicast address; a device needs a unicast one")
    if mac == "00:00:00:00:00:00":
        raise ValueError("the all-zero MAC is not a valid device address")
    return mac


def _valid_ifname(name: str) -> str:
    problem = ifname_problem(name)
    if problem:
        raise ValueError(f"interface name {problem}")
    return name


def _absolute_path(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"must be an absolute path, got {_short(path)}")
    if "\0" in path:
        raise ValueError("must not contain a NUL byte")
    # "a/../b", "a/./b", "a//b", "a/": one spelling per place, so that the
    # containment checks below compare names, not guesses about them.
    if path.startswith("//") or posixpath.normpath(path) != path:
        raise ValueError(f"must be a normalized path (no '.', '..', '//' or trailing '/'), "
                         f"got {_short(path)}")
    return path


def _uid_gid(value: str) -> str:
    # Numeric only: the node's names mean nothing inside the pod (KubeVirt's qemu is 107).
    uid, sep, gid = value.partition(":")
    if not (sep and uid.isdecimal() and gid.isdecimal() and uid.isascii() and gid.isascii()):
        raise ValueError(f'must be "<uid>:<gid>" in numbers, got {_short(value)}')
    if max(int(uid), int(gid)) >= 2**32 - 1:  # (u32)-1 means "no change" to chown
        raise ValueError(f"uid and gid must be below {2**32 - 1}, got {_short(value)}")
    return value


def _supported_version(version: str) -> str:
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"{version!r} is not one of {', '.join(SUPPORTED_VERSIONS)}")
    return version


def _volume_name(name: str) -> str:
    # A pod volume's name is a DNS-1123 label: also a safe single path component.
    if not _DNS_LABEL.fullmatch(name):
        raise ValueError(f"must be a DNS-1123 label (a pod volume's name), got {_short(name)}")
    return name


_PATH_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,252}")


def _path_component(name: str) -> str:
    # One directory name inside the pod's volume: no "/", no "..", no leading dot.
    if not _PATH_COMPONENT.fullmatch(name) or ".." in name:
        raise ValueError("must be one path component of [A-Za-z0-9_.-] starting with a "
                         f"letter or digit, without '..', got {_short(name)}")
    return name


def _network_name(name: str) -> str:
    # libcni's ValidateNetworkName; the name is part of our owner alias and records.
    if not _CONTAINER_ID.fullmatch(name):
        raise ValueError(f"must match [A-Za-z0-9][A-Za-z0-9_.-]*, got {_short(name)}")
    return name


def parse_queue_pool(value: object) -> tuple[int, ...]:
    """Queue ids from ``[8, 9]``, ``"8-15"``, ``"8-11,14"`` or ``[8, "10-12"]``, sorted."""
    if isinstance(value, str):
        items: list[object] = [value] if value.strip() else []
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ValueError('expected a list of queue ids or a range string like "8-15"')
    spans: list[tuple[int, int, str]] = []  # (first, last, as written)
    total = 0
    for item in items:
        for first, last, text in _queue_spans(item):
            total += last - first + 1
            if total > MAX_POOL:
                raise ValueError(f"more than {MAX_POOL} queues; that is not a NIC's pool")
            spans.append((first, last, text))
    if not spans:
        raise ValueError("the pool is empty: list at least one queue id")
    spans.sort()
    # Sorted by first id, any overlap shows between neighbours.
    for (_, prev_last, prev_text), (first, _, text) in pairwise(spans):
        if first <= prev_last:
            raise ValueError(f"queue {first} is listed twice (in {prev_text} and in {text})")
    return tuple(q for first, last, _ in spans for q in range(first, last + 1))


def _queue_spans(item: object) -> list[tuple[int, int, str]]:
    """One pool entry as ``(first, last, text)`` spans; a string may hold a comma list."""
    if isinstance(item, bool) or not isinstance(item, int | str):
        raise ValueError(f'{_short(item)} is not a queue id or a range like "8-15"')
    if isinstance(item, int):
        _check_queue_id(item)
        return [(item, item, str(item))]
    spans = []
    for part in item.split(","):
        m = _QUEUE_SPAN.fullmatch(part.strip())
        if m is None:
            raise ValueError(f'{_short(part.strip())} is not a queue id or a range like "8-15"')
        first = int(m[1])
        last = first if m[2] is None else int(m[2])
        _check_queue_id(first)
        _check_queue_id(last)
        if last < first:
            raise ValueError(f"range {first}-{last} is reversed; write {last}-{first}")
        spans.append((first, last, part.strip()))
    return spans


def _check_queue_id(q: int) -> None:
    if q < 0:
        raise ValueError(f"queue id {q} is negative")
    if q > MAX_QUEUE_ID:
        raise ValueError(f"queue id {q} is above {MAX_QUEUE_ID}")


def _ipam_section(ipam: dict[str, Any]) -> dict[str, Any]:
    kind = ipam.get("type")
    if not isinstance(kind, str) or not kind:
        raise ValueError('needs a "type" naming the IPAM plugin, e.g. "host-local"')
    return ipam


IfName = Annotated[StrictStr, AfterValidator(_valid_ifname)]
AbsolutePath = Annotated[StrictStr, AfterValidator(_absolute_path)]
Mac = Annotated[StrictStr, AfterValidator(normalize_mac)]
QueuePool = Annotated[tuple[int, ...], BeforeValidator(parse_queue_pool)]


# --- the network config ---------------------------------------------------------


class RuntimeConfig(BaseModel):
    """``runtimeConfig``: capability values from the runtime (we declare mac, CNIDeviceInfoFile)."""

    model_config = ConfigDict(frozen=True, extra="allow", populate_by_name=True)

    mac: Mac | None = None
    cni_device_info_file: AbsolutePath | None = Field(default=None, alias="CNIDeviceInfoFile")


class AttachmentRef(BaseModel):
    """One entry of GC's ``cni.dev/valid-attachments``."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    container_id: StrictStr = Field(alias="containerID")
    ifname: StrictStr


class NetConf(BaseModel):
    """The plugin's network config (stdin JSON), keys camelCase as in CNI configs.

    Unknown top-level keys are allowed (the spec says so) and kept in
    ``model_extra``; ``unknown_keys`` lists the ones worth a warning.
    """

    model_config = ConfigDict(
        frozen=True, extra="allow", populate_by_name=True, alias_generator=to_camel
    )

    cni_version: Annotated[StrictStr, AfterValidator(_supported_version)]
    name: Annotated[StrictStr, AfterValidator(_network_name)]
    type: StrictStr
    master: IfName
    # The netkit's name in the pod; unset, CNI_IFNAME.  Chained after a primary
    # plugin in one conflist, every plugin gets the same CNI_IFNAME (eth0), which
    # the primary's device already holds: ours needs a name of its own (net1).
    pod_ifname: IfName | None = None
    queues: QueuePool  # the master's RX queues reserved for leasing
    queues_per_attachment: Annotated[StrictInt, Field(ge=1)] = 1
    pairing: Literal["single", "pair"] = "single"
    mode: Literal["l2", "l3"] = "l2"
    mtu: Annotated[StrictInt, Field(ge=68, le=65535)] | None = None
    ipam: Annotated[dict[str, Any], AfterValidator(_ipam_section)] | None = None
    log_file: AbsolutePath | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    state_dir: AbsolutePath = DEFAULT_STATE_DIR
    lock_timeout: Annotated[StrictFloat, Field(gt=0, le=300)] = 10.0  # seconds
    # Who may open the attachment's pinned XSK map (docs/af_xdp.md): "<uid>:<gid>"
    # of the pod's AF_XDP workload; unset, root only.
    xsk_map_owner: Annotated[StrictStr, AfterValidator(_uid_gid)] | None = None
    # Delivery of that map into the pod (docs/af_xdp.md): the name of an emptyDir
    # volume of the pod, where ADD mounts a bpffs of the pod's own holding the pin
    # (unset: no delivery); that volume's mountPath in the workload's container, for
    # the result's mapPath; the kubelet's root directory (the node's KUBELET_ROOTS_ENV).
    xsk_map_volume: Annotated[StrictStr, AfterValidator(_volume_name)] | None = None
    xsk_map_mount_path: AbsolutePath = DEFAULT_XSK_MAP_MOUNT_PATH
    # A directory of that volume holding the bpffs and the lease file instead of the
    # volume itself: KubeVirt's hook sidecar N sees only "hook-sidecar-N" of its volume.
    xsk_map_subdir: Annotated[StrictStr, AfterValidator(_path_component)] | None = None
    kubelet_root: AbsolutePath = DEFAULT_KUBELET_ROOT
    runtime_config: RuntimeConfig = RuntimeConfig()
    capabilities: dict[str, StrictBool] = {}
    prev_result: dict[str, Any] | None = None  # parse with result.Result.from_prev
    args: dict[str, Any] = {}
    # GC: libcni sends both keys (the spec first named it cni.dev/attachments).
    gc_valid_attachments: tuple[AttachmentRef, ...] | None = Field(
        default=None, alias="cni.dev/valid-attachments"
    )
    gc_attachments: tuple[AttachmentRef, ...] | None = Field(
        default=None, alias="cni.dev/attachments"
    )

    @field_validator("args")
    @classmethod
    def _args_cni(cls, args: dict[str, Any]) -> dict[str, Any]:
        cni = args.get("cni")
        if cni is None:
            return args
        if not isinstance(cni, dict):
            raise ValueError('"cni" must be an object')
        mac = cni.get("mac")
        if mac is None:
            return args
        if not isinstance(mac, str):
            raise ValueError('"cni.mac" must be a string')
        try:
            return {**args, "cni": {**cni, "mac": normalize_mac(mac)}}
        except ValueError as e:
            raise ValueError(f"cni.mac: {e}") from None

    @model_validator(mode="after")
    def _consistent(self) -> "NetConf":
        if self.queues_per_attachment > len(self.queues):
            raise ValueError(
                f"queuesPerAttachment: {self.queues_per_attachment} is more than the "
                f"{len(self.queues)} queue(s) in the pool"
            )
        if self.ipam is not None and self.pairing != "pair":
            raise ValueError(
                'ipam: a "single" netkit has no peer, so it carries no IP address; '
                'use pairing "pair" or remove ipam'
            )
        if self.xsk_map_subdir is not None and self.xsk_map_volume is None:
            raise ValueError("xskMapSubdir: names a directory of the xskMapVolume volume; "
                             "set xskMapVolume too or drop xskMapSubdir")
        if self.mac is not None and self.mode != "l2":
            raise ValueError(
                f"{self._mac_source}: an l3 netkit has no MAC address; "
                'use mode "l2" or drop the MAC'
            )
        return self

    @property
    def map_owner(self) -> tuple[int, int] | None:
        """``xskMapOwner`` as (uid, gid)."""
        if self.xsk_map_owner is None:
            return None
        uid, _, gid = self.xsk_map_owner.partition(":")
        return int(uid), int(gid)

    @property
    def mac(self) -> str | None:
        """The requested MAC from the config: ``runtimeConfig.mac``, else ``args.cni.mac``."""
        if self.runtime_config.mac is not None:
            return self.runtime_config.mac
        mac = self.args.get("cni", {}).get("mac")
        return mac if isinstance(mac, str) else None

    @property
    def _mac_source(self) -> str:
        return "runtimeConfig.mac" if self.runtime_config.mac is not None else "args.cni.mac"

    @property
    def valid_attachments(self) -> frozenset[tuple[str, str]] | None:
        """GC's (containerID, ifname) pairs still in use; None when the runtime sent no list.

        A ``null`` list counts as absent: GC must not read it as "nothing is valid".
        """
        lists = [a for a in (self.gc_valid_attachments, self.gc_attachments) if a is not None]
        if not lists:
            return None
        return frozenset((a.container_id, a.ifname) for refs in lists for a in refs)

    @property
    def unknown_keys(self) -> tuple[str, ...]:
        """Top-level keys we do not know (likely typos), minus well-known and ``cni.dev/`` ones."""
        return tuple(
            sorted(
                k
                for k in self.model_extra or {}
                if k not in _IGNORED_KEYS and not k.startswith("cni.dev/")
            )
        )


# --- the invocation --------------------------------------------------------------


@dataclass(frozen=True)
class Invocation:
    """One CNI request: the command, its environment, and the validated network config.

    VERSION never makes an Invocation: it has no network config and is
    answered by the protocol layer.  ``container_id``/``ifname`` are None only
    for STATUS and GC; ``netns`` is None also for a DEL whose netns is gone.
    """

    command: Command
    container_id: str | None
    netns: str | None
    ifname: str | None
    cni_path: tuple[str, ...]
    args: Mapping[str, str]  # CNI_ARGS merged with config args.cni (string values)
    config: NetConf
    raw: dict[str, Any]  # stdin as received, for delegated (IPAM) plugins
    mac: str | None = None  # requested MAC: runtimeConfig.mac > args.cni.mac > CNI_ARGS MAC
    # CNI_ARGS exactly as the runtime sent it, for delegated plugins: they judge
    # their own keys (host-local's IP=) under the runtime's IgnoreUnknown, so
    # nothing of ours is added or dropped.  ``args`` is our reading of it.
    runtime_cni_args: str = ""

    @property
    def pod_ifname(self) -> str | None:
        """The netkit's name in the pod: the config's ``podIfname``, else ``CNI_IFNAME``.

        The attachment stays keyed by ``CNI_IFNAME`` (the spec's
        (network, container id, ifname) triple: records, owner alias, GC's
        valid-attachments); only the device is named by this.
        """
        return self.config.pod_ifname or self.ifname

    @property
    def pod_namespace(self) -> str | None:
        """``K8S_POD_NAMESPACE`` when the runtime is Kubernetes."""
        return self.args.get("K8S_POD_NAMESPACE") or None

    @property
    def pod_name(self) -> str | None:
        """``K8S_POD_NAME`` when the runtime is Kubernetes."""
        return self.args.get("K8S_POD_NAME") or None

    @property
    def pod_uid(self) -> str | None:
        """``K8S_POD_UID`` when the runtime is Kubernetes."""
        return self.args.get("K8S_POD_UID") or None


def parse_invocation(environ: Mapping[str, str], stdin: bytes) -> Invocation:
    """Decode and validate one request; raise the NetkitError the runtime should see."""
    command = parse_command(environ)
    if command == "VERSION":
        # The entry point answers VERSION itself; there is no config to validate.
        raise ValueError("VERSION has no network config; answer it with result.version_json")
    raw = decode_config(stdin)
    _check_version(raw, command)
    container_id, netns, ifname = _attachment_env(environ, command)
    cni_args = parse_cni_args(environ.get("CNI_ARGS", ""))
    try:
        config = NetConf.model_validate(raw)
    except ValidationError as e:
        raise errors.InvalidConfig("invalid network configuration", _explain(e)) from None
    _check_places(config, environ)
    env_mac = cni_args.get("MAC")
    if env_mac is not None:
        try:
            env_mac = normalize_mac(env_mac)
        except ValueError as e:
            raise errors.InvalidEnvironment("invalid CNI_ARGS MAC", str(e)) from None
        if config.mode != "l2":
            raise errors.InvalidConfig(
                "CNI_ARGS MAC given for an l3 netkit", 'an l3 netkit has no MAC; use mode "l2"'
            )
    cni = config.args.get("cni", {})
    return Invocation(
        command=command,
        container_id=container_id,
        netns=netns,
        ifname=ifname,
        cni_path=tuple(d for d in environ.get("CNI_PATH", "").split(":") if d),
        args={**cni_args, **{k: v for k, v in cni.items() if isinstance(v, str)}},
        config=config,
        raw=raw,
        mac=config.mac or env_mac,
        runtime_cni_args=environ.get("CNI_ARGS", ""),
    )


def allowed_dirs(
    environ: Mapping[str, str], name: str, default: tuple[str, ...]
) -> tuple[str, ...]:
    """The directories the node's admin allows in ``name`` (colon-separated), else ``default``.

    Entries that are not absolute, normalized paths are ignored: an admin's
    typo must not widen the policy (``""`` or ``"."`` would allow everything).
    """
    value = environ.get(name)
    if value is None:
        return default
    dirs = []
    for d in value.split(":"):
        try:
            dirs.append(_absolute_path(d))
        except ValueError:
            continue
    return tuple(dirs)


def _inside(path: str, directory: str) -> bool:
    return directory == "/" or path.startswith(directory + "/")


def _check_places(config: NetConf, environ: Mapping[str, str]) -> None:
    """stateDir, logFile and CNIDeviceInfoFile only where the node's admin allows them.

    InvalidConfig (7) otherwise, before anything is written: the plugin runs
    as root, and these names come from a config a namespace user may write.
    """
    states = allowed_dirs(environ, STATE_DIRS_ENV, DEFAULT_STATE_DIRS)
    if config.state_dir not in states:
        raise errors.InvalidConfig(
            f"stateDir {_short(config.state_dir)} is not a state directory of this node",
            f"allowed: {', '.join(states) or 'none'} (set by the node's {STATE_DIRS_ENV})",
        )
    if config.xsk_map_volume is not None:  # the plugin mounts below it: the admin's say
        roots = allowed_dirs(environ, KUBELET_ROOTS_ENV, (DEFAULT_KUBELET_ROOT,))
        if config.kubelet_root not in roots:
            raise errors.InvalidConfig(
                f"kubeletRoot {_short(config.kubelet_root)} is not a kubelet root of this node",
                f"allowed: {', '.join(roots) or 'none'} (set by the node's {KUBELET_ROOTS_ENV})",
            )
    places = (
        ("logFile", config.log_file, LOG_DIRS_ENV, DEFAULT_LOG_DIRS),
        ("runtimeConfig.CNIDeviceInfoFile", config.runtime_config.cni_device_info_file,
         DEVICE_INFO_DIRS_ENV, DEFAULT_DEVICE_INFO_DIRS),
    )
    for key, path, env, default in places:
        if path is None:
            continue
        dirs = allowed_dirs(environ, env, default)
        if not any(_inside(path, d) for d in dirs):
            raise errors.InvalidConfig(
                f"{key} {_short(path)} is outside the directories this node allows",
                f"allowed: inside {', '.join(dirs) or 'none'} (set by the node's {env})",
            )


def allowed_pools(environ: Mapping[str, str]) -> dict[str, frozenset[int]] | None:
    """The node admin's ``CNI_NETKIT_MASTERS``: master -> queues a config may lease; None: unset.

    A malformed entry allows nothing (it is skipped), so a typo narrows the
    policy instead of opening it.
    """
    value = environ.get(MASTERS_ENV)
    if value is None:
        return None
    pools: dict[str, frozenset[int]] = {}
    for entry in value.split(";"):
        master, sep, queues = entry.strip().partition("=")
        if not sep or ifname_problem(master.strip()) is not None:
            continue
        try:
            ids = frozenset(parse_queue_pool(queues))
        except ValueError:
            continue
        pools[master.strip()] = pools.get(master.strip(), frozenset()) | ids
    return pools


def parse_command(environ: Mapping[str, str]) -> Command | Literal["VERSION"]:
    """CNI_COMMAND, checked against the commands we implement."""
    command = environ.get("CNI_COMMAND", "")
    if not command:
        raise errors.InvalidEnvironment("CNI_COMMAND is missing", f"one of {', '.join(COMMANDS)}")
    if command not in COMMANDS:
        raise errors.InvalidEnvironment(
            f"unknown CNI_COMMAND {_short(command)}", f"expected one of {', '.join(COMMANDS)}"
        )
    return cast(Command | Literal["VERSION"], command)  # membership checked just above


def decode_config(stdin: bytes) -> dict[str, Any]:
    """The stdin JSON object; DecodeFailure (6) for anything else."""
    if len(stdin) > MAX_STDIN:
        raise errors.DecodeFailure(
            "network config too large", f"{len(stdin)} bytes on stdin, at most {MAX_STDIN}"
        )
    if not stdin.strip():
        raise errors.DecodeFailure("no network config on stdin")
    try:
        # Decode UTF-8 ourselves: json.loads(bytes) would also accept UTF-16/32.
        data = json.loads(stdin.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise errors.DecodeFailure("network config is not UTF-8", str(e)) from None
    except (ValueError, RecursionError) as e:
        raise errors.DecodeFailure("network config is not valid JSON", str(e)[:200]) from None
    if not isinstance(data, dict):
        raise errors.DecodeFailure(
            "network config is not a JSON object", f"got {type(data).__name__}"
        )
    return data


def parse_cni_args(text: str) -> dict[str, str]:
    """``CNI_ARGS`` (``K=V;K2=V2``) as a dict of the keys we know.

    Unknown keys are an error (2) unless ``IgnoreUnknown=1``/``true``, then dropped;
    ``IgnoreUnknown`` itself is a directive, not returned.  Empty segments (a
    trailing ``;``) are skipped.
    """
    pairs: dict[str, str] = {}
    for item in text.split(";"):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key or "=" in value:
            raise errors.InvalidEnvironment(
                "malformed CNI_ARGS",
                f"expected KEY=VALUE pairs separated by ';', got {_short(item)}",
            )
        pairs[key] = value
    ignore = pairs.pop("IgnoreUnknown", "false").lower()
    if ignore not in ("1", "true", "0", "false"):
        raise errors.InvalidEnvironment(
            "invalid CNI_ARGS IgnoreUnknown", f"expected 1, true, 0 or false, got {_short(ignore)}"
        )
    unknown = [k for k in pairs if k not in KNOWN_CNI_ARGS]
    if unknown and ignore in ("0", "false"):
        key = unknown[0]
        raise errors.UnsupportedField(
            f"unsupported CNI_ARGS key {_short(key)}",
            f"{key}={_short(pairs[key])}; known keys: {', '.join(sorted(KNOWN_CNI_ARGS))}"
            " (pass IgnoreUnknown=1 to ignore others)",
        )
    return {k: v for k, v in pairs.items() if k in KNOWN_CNI_ARGS}


def _no_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON (and Go) do not.
    raise ValueError(f"{name} is not valid JSON")


def _check_version(raw: Mapping[str, Any], command: str) -> None:
    version = raw.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise errors.IncompatibleVersion(
            "incompatible CNI version",
            f"config cniVersion is {_short(version)}; "
            f"this plugin supports {', '.join(SUPPORTED_VERSIONS)}",
        )
    since = _SINCE.get(command)
    if since is not None and _version_key(version) < _version_key(since):
        raise errors.IncompatibleVersion(
            f"{command} needs cniVersion {since} or later", f"config cniVersion is {version}"
        )


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _attachment_env(
    environ: Mapping[str, str], command: str
) -> tuple[str | None, str | None, str | None]:
    """(CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME) as the command needs them, validated."""
    required = _REQUIRED_ENV[command]
    if not required:
        return None, None, None  # STATUS and GC concern the whole network
    missing = [name for name in required if not environ.get(name)]
    if missing:
        raise errors.InvalidEnvironment(
            f"missing environment variable(s): {', '.join(missing)}",
            f"{command} needs {', '.join(required)}",
        )
    container_id = environ["CNI_CONTAINERID"]
    problem = container_id_problem(container_id)
    if problem:
        raise errors.InvalidEnvironment("invalid CNI_CONTAINERID", f"CNI_CONTAINERID {problem}")
    ifname = environ["CNI_IFNAME"]
    problem = ifname_problem(ifname)
    if problem:
        raise errors.InvalidEnvironment("invalid CNI_IFNAME", f"CNI_IFNAME {problem}")
    netns = environ.get("CNI_NETNS") or None
    if netns is not None and (not netns.startswith("/") or len(netns) >= 4096):
        # Existence is the plugin's to check (InvalidNetns, 8): DEL accepts a gone netns.
        raise errors.InvalidEnvironment(
            "invalid CNI_NETNS", f"must be an absolute path, got {_short(netns)}"
        )
    return container_id, netns, ifname


def _explain(e: ValidationError) -> str:
    """Pydantic's errors as ``path: reason`` items, short enough to read in a pod event."""
    problems = []
    for err in e.errors(include_url=False):
        path = "".join(
            f"[{part}]" if isinstance(part, int) else f".{part}" for part in err["loc"]
        ).lstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] not in ("missing", "value_error") and _is_scalar(err.get("input")):
            msg = f"{msg} (got {_short(err['input'])})"
        problems.append(f"{path}: {msg}" if path else msg)
    return "; ".join(problems)


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _short(value: object, limit: int = 60) -> str:
    """A value as JSON text, cut to ``limit`` characters, for error messages."""
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
