"""Attachments: what one successful ADD made, persisted so DEL, GC and the agent can find it.

The kernel stays the source of truth for leases (``queue-get`` on the master);
these records say *whose* they are (container id, ifname, pod) and where the
netkit lives (netns path), which the kernel cannot tell us from the host side.
One JSON file per attachment, written atomically (temp file + rename).

Records carry ``schema`` (``SCHEMA_VERSION``); a record of another version
is read as far as it goes: fields this version does not know are ignored,
fields it lacks take their defaults.  A record that cannot be read at all
(torn, not JSON, a required field missing or of the wrong type) raises
``CorruptRecord`` from ``load`` and is listed by ``corrupt()``: DEL and GC
then act on what the request (and the device's owner alias) tells them and
``quarantine`` the file, so one bad file never blocks a pod's DEL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cni_netkit.plugin.files import open_private, private_dir, write_synced
from cni_netkit.result import NetkitQueue, NetkitResult

# The record format written now; older (or newer) ones are read as far as they go.
# 0: records before the field existed.
SCHEMA_VERSION = 1

# The interface alias that marks a netkit as ours; the owner is readable from
# the device itself (``ip link show`` prints it), so GC and DEL never touch a
# device someone else made.
ALIAS_PREFIX = "cni-netkit"


@dataclass(frozen=True)
class Owner:
    """Who a netkit belongs to: one (network, container id, ifname) attachment.

    The network name is part of it because GC's valid-attachment list is per
    network: a GC of network A must not remove network B's device of the same
    container.
    """

    network: str
    container_id: str
    ifname: str

    @property
    def alias(self) -> str:
        # None of the three can hold a space: CNI network names, container ids
        # and ifnames are validated before we get here.
        return f"{ALIAS_PREFIX} {self.network} {self.container_id} {self.ifname}"

    @classmethod
    def from_alias(cls, alias: str | None) -> Owner | None:
        """The owner recorded in an alias we wrote, else None (not ours)."""
        if not alias:
            return None
        parts = alias.split(" ")
        if len(parts) != 4 or parts[0] != ALIAS_PREFIX:
            return None
        return cls(parts[1], parts[2], parts[3])


@dataclass(frozen=True)
class LeasedQueue:
    netkit_queue: int  # queue id on the netkit (1, 2, ...)
    master_queue: int  # the physical RX queue it proxies


@dataclass(frozen=True)
class Attachment:
    container_id: str
    ifname: str
    netns: str
    network: str  # the CNI network name
    master: str
    pairing: str
    mode: str
    mac: str | None
    mtu: int | None
    queues: tuple[LeasedQueue, ...]
    netkit_ifindex: int | None = None  # in its netns; what queue-get's lease names
    host_ifname: str | None = None  # pair mode: the primary side in the host netns
    # The netkit's name in the pod when the config's podIfname set one other than
    # ``ifname`` (CNI_IFNAME, the record's key); None: ``ifname`` is its name.
    pod_ifname: str | None = None
    pod_namespace: str | None = None
    pod_name: str | None = None
    device_info_file: str | None = None
    ipam: dict[str, Any] | None = None  # the delegated IPAM result, to release on DEL
    # The network config ADD ran with (without prevResult): what a DEL on the
    # runtime's behalf (the agent's GC) must hand the plugin and its IPAM.
    netconf: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return attachment_key(self.network, self.container_id, self.ifname)

    @property
    def owner(self) -> Owner:
        return Owner(self.network, self.container_id, self.ifname)

    @property
    def device(self) -> str:
        """The netkit's name in the pod netns (``pod_ifname``, else ``ifname``)."""
        return self.pod_ifname or self.ifname

    @property
    def netkit(self) -> NetkitResult:
        """Our result extension (and device-info payload) for this attachment."""
        return NetkitResult(
            master=self.master,
            pairing=self.pairing,
            mode=self.mode,
            interface=self.device,
            queues=tuple(NetkitQueue(q.netkit_queue, q.master_queue) for q in self.queues),
            # set by plugin.afxdp when the master has AF_XDP steering
            # as the pod sees it when the map is delivered into its volume
            map_path=self.extra.get("pod_map_path") or self.extra.get("map_path"),
            map_start_index=self.extra.get("map_start_index"),
            xsk_mode=self.extra.get("xsk_mode"),
        )

    @property
    def qemu_netdev(self) -> str | None:
        """The QEMU ``-netdev af-xdp`` arguments for this attachment's queues (None: no map)."""
        return self.netkit.qemu_netdev

    def to_json(self) -> dict[str, Any]:
        """The record as JSON-ready data; dict fields are shared, not copied (asdict()
        deep-copies them: about a millisecond per save in the test VM).
        """
        data: dict[str, Any] = {"schema": SCHEMA_VERSION}
        data.update((f.name, getattr(self, f.name)) for f in fields(self))
        data["queues"] = [asdict(q) for q in self.queues]
        return data

    @classmethod
    def from_json(cls, data: object) -> Attachment:
        """The attachment of a record of any schema version; ValueError if it is none.

        Unknown fields (a newer version's) are ignored; missing optional ones
        (an older version's) take their defaults.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a record is a JSON object, not {type(data).__name__}")
        for name in _REQUIRED:
            if not isinstance(data.get(name), str) or not data[name]:
                raise ValueError(f"field {name!r} missing or not a string")
        known = {f.name for f in fields(cls)} - {"queues"}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("mac", None)
        values.setdefault("mtu", None)
        queues = data.get("queues", [])
        if not isinstance(queues, list):
            raise ValueError("field 'queues' is not a list")
        try:
            values["queues"] = tuple(
                LeasedQueue(int(q["netkit_queue"]), int(q["master_queue"])) for q in queues
            )
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(f"field 'queues' unreadable: {e!r}") from e
        for name, types in _OPTIONAL.items():
            if values.get(name) is not None and not isinstance(values[name], types):
                raise ValueError(f"field {name!r} is a {type(values[name]).__name__}")
        if values.get("extra") is None:
            values.pop("extra", None)
        for name, types in _EXTRA.items():
            value = values.get("extra", {}).get(name)
            if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
                raise ValueError(f"field extra.{name} is a {type(value).__name__}")
        return cls(**values)


# What a record cannot do without (every schema version has them).
_REQUIRED = ("container_id", "ifname", "netns", "network", "master", "pairing", "mode")
_OPTIONAL: dict[str, type | tuple[type, ...]] = {
    "mac": str, "mtu": int, "netkit_ifindex": int, "host_ifname": str, "pod_ifname": str,
    "pod_namespace": str, "pod_name": str, "device_info_file": str, "ipam": dict,
    "netconf": dict, "extra": dict,
}
# The keys of ``extra`` the plugin and the agent read (plugin.afxdp, agent.publish).
_EXTRA: dict[str, type] = {
    "map_path": str, "map_start_index": int, "map_id": int, "xsk_mode": str, "pod_uid": str,
    "volume_pin": str, "pod_map_path": str,
}


class CorruptRecord(Exception):
    """A record file that is no attachment: what can still be told from it."""

    def __init__(self, path: Path, reason: str, salvage: dict[str, str]) -> None:
        super().__init__(f"attachment record {path.name} unreadable: {reason}")
        self.path = path
        self.reason = reason
        self.salvage = salvage  # string fields that could still be read (netns, ...)

    @property
    def owner(self) -> Owner | None:
        """Whose record it was: from its fields if readable, else from its file name."""
        got = [self.salvage.get(k) for k in ("network", "container_id", "ifname")]
        if all(got):
            return Owner(*(str(g) for g in got))
        parts = self.path.name.removesuffix(".json").split(":")
        if len(parts) == 3 and all(parts):
            return Owner(*parts)
        return None  # a hashed (long) key: only its content could tell


def _salvage(data: object) -> dict[str, str]:
    if not isinstance(data, dict):
        return {}
    names = ("network", "container_id", "ifname", "pod_ifname", "netns", "host_ifname",
             "device_info_file")
    return {k: data[k] for k in names if isinstance(data.get(k), str) and data[k]}


# File names stay readable for people debugging a node; past this length (a
# 255-byte container id is legal) the key is hashed to fit a file name.
_MAX_READABLE_KEY = 200


def attachment_key(network: str, container_id: str, ifname: str) -> str:
    """A file-name-safe key, unique per (network, container id, ifname).

    ':' separates the parts because none of them may contain it (validated
    upstream, like '/' and '..'), so two different triples never collide.
    """
    key = f"{network}:{container_id}:{ifname}"
    if len(key.encode()) <= _MAX_READABLE_KEY:
        return key
    return "sha256-" + hashlib.sha256(key.encode()).hexdigest()


class StateStore:
    """Attachment records under ``<state_dir>/attachments``."""

    def __init__(
        self, state_dir: str | os.PathLike[str], *, check_dirs_once: bool = False
    ) -> None:
        """``check_dirs_once``: for a store that lives for one request (ADD saves
        twice): its directories are checked (and made) by its first save only.
        Otherwise every save checks them again.
        """
        self.root = Path(state_dir)
        self.dir = self.root / "attachments"
        self._check_once = check_dirs_once
        self._dirs_checked = False

    def path(self, owner: Owner) -> Path:
        return self.dir / f"{attachment_key(owner.network, owner.container_id, owner.ifname)}.json"

    def save(self, att: Attachment) -> None:
        if not self._dirs_checked:
            private_dir(self.root)
            private_dir(self.dir)
            self._dirs_checked = self._check_once
        final = self.path(att.owner)
        # Encoded whole, written with one write(2), on str paths: json.dump through
        # a text file and pathlib's calls around it cost ~3 ms a save in the test VM
        # (78 us on a host, 42 us like this; most of the difference is pathlib).
        data = json.dumps(att.to_json()).encode()
        # Unique per process and thread: the agent serves requests (two of them
        # may be for one owner) from threads of one process.
        tmp = f"{final.parent}/{final.stem}.tmp.{os.getpid()}.{threading.get_native_id()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # noqa: PTH108 - a killed run's leftover with our ids (never followed)
        fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            try:
                write_synced(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, final)  # noqa: PTH105 - rename(2) replaces a symlink, never follows it
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # noqa: PTH108
            raise

    def load(self, owner: Owner) -> Attachment | None:
        """``owner``'s record, None if there is none; CorruptRecord if it is unreadable."""
        try:
            return _parse(self.path(owner))
        except FileNotFoundError:
            return None

    def scan(self) -> tuple[list[Attachment], list[CorruptRecord]]:
        """Every record, parsed once: the attachments and the files that are none."""
        good: list[Attachment] = []
        bad: list[CorruptRecord] = []
        if not self.dir.is_dir():
            return good, bad
        for p in sorted(self.dir.glob("*.json")):
            try:
                good.append(_parse(p))
            except CorruptRecord as e:
                bad.append(e)
            except FileNotFoundError:
                continue  # gone since the listing: a DEL finished meanwhile
        return good, bad

    def corrupt(self) -> list[CorruptRecord]:
        """Every record file that is no attachment (``__iter__`` skips them)."""
        return self.scan()[1]

    def quarantine(self, bad: CorruptRecord) -> Path | None:
        """Move an unreadable record aside (``attachments/quarantine/``), for people to read.

        Returns where it went (None: already gone). Never deleted: it may
        hold what an operator needs to release by hand.
        """
        qdir = private_dir(self.dir / "quarantine")
        dest = qdir / f"{bad.path.name}.{time.time_ns()}"
        try:
            bad.path.replace(dest)
        except FileNotFoundError:
            return None
        return dest

    def remove(self, owner: Owner) -> bool:
        """Remove ``owner``'s record (True if there was one) and what a ``save`` killed
        midway left: its temporary ``<key>.tmp.<pid>.<tid>`` files (a killed agent saves
        for many owners at once; nothing else would ever remove them)."""
        final = self.path(owner)
        prefix = f"{final.stem}.tmp."
        try:
            names = [e.name for e in os.scandir(self.dir) if e.name.startswith(prefix)]
        except FileNotFoundError:
            names = []
        for name in names:
            if name[len(prefix):].replace(".", "").isdigit():
                (self.dir / name).unlink(missing_ok=True)  # never follows a symlink
        try:
            final.unlink()
        except FileNotFoundError:
            return False
        return True

    def __iter__(self) -> Iterator[Attachment]:
        return iter(self.scan()[0])


def _parse(path: Path) -> Attachment:
    """The record at ``path``; FileNotFoundError if none, CorruptRecord if unreadable."""
    try:
        text = _read(path)
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as e:
        raise CorruptRecord(path, f"{type(e).__name__}: {e}", {}) from e
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CorruptRecord(path, f"not JSON: {e}", {}) from e
    try:
        return Attachment.from_json(data)
    except (ValueError, TypeError) as e:
        raise CorruptRecord(path, str(e), _salvage(data)) from e


def _read(path: Path) -> str:
    """A record's text; a symlink in its place is an error (ELOOP), never followed."""
    with os.fdopen(open_private(path, os.O_RDONLY), encoding="utf-8") as f:
        return f.read()
