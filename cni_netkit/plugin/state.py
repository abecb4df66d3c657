"""Attachments: what one successful ADD made, persisted so DEL, GC and the agent can find it.

The kernel stays the source of truth for leases (``queue-get`` on the master);
these records say *whose* they are (container id, ifname, pod) and where the
netkit lives (netns path), which the kernel cannot tell us from the host side.
One JSON file per attachment, written atomically (temp file + rename).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cni_netkit.plugin.files import open_private, private_dir
from cni_netkit.result import NetkitQueue, NetkitResult

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
    def netkit(self) -> NetkitResult:
        """Our result extension (and device-info payload) for this attachment."""
        return NetkitResult(
            master=self.master,
            pairing=self.pairing,
            mode=self.mode,
            interface=self.ifname,
            queues=tuple(NetkitQueue(q.netkit_queue, q.master_queue) for q in self.queues),
            # set by plugin.afxdp when the master has AF_XDP steering
            map_path=self.extra.get("map_path"),
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
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["queues"] = [asdict(q) for q in self.queues]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Attachment:
        data = dict(data)
        data["queues"] = tuple(LeasedQueue(**q) for q in data.get("queues", ()))
        return cls(**data)


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
        tmp = final.with_suffix(f".tmp.{os.getpid()}")
        tmp.unlink(missing_ok=True)  # a killed run's leftover with our pid (never followed)
        fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(att.to_json(), f)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(final)  # rename(2) replaces a symlink at ``final``, never follows it
        finally:
            tmp.unlink(missing_ok=True)

    def load(self, owner: Owner) -> Attachment | None:
        try:
            data = json.loads(_read(self.path(owner)))
        except FileNotFoundError:
            return None
        return Attachment.from_json(data)

    def remove(self, owner: Owner) -> bool:
        try:
            self.path(owner).unlink()
        except FileNotFoundError:
            return False
        return True

    def __iter__(self) -> Iterator[Attachment]:
        if not self.dir.is_dir():
            return
        for p in sorted(self.dir.glob("*.json")):
            try:
                yield Attachment.from_json(json.loads(_read(p)))
            except (OSError, ValueError, TypeError):
                continue  # a torn or foreign file is not an attachment


def _read(path: Path) -> str:
    """A record's text; a symlink in its place is an error (ELOOP), never followed."""
    with os.fdopen(open_private(path, os.O_RDONLY), encoding="utf-8") as f:
        return f.read()
