"""The NIC-preparation seam: RSS indirection table and ntuple steering of a master NIC.

What the upstream netkit patch does by hand (``ethtool -X eth0 start 0 equal
15``, ``ethtool --config-ntuple eth0 flow-type ether dst $mac action 15``),
behind a small interface the node agent's decisions (``agent.nicprep``) use.

Two mechanisms, because neither alone does the job:

* **The RSS indirection table** through the ``SIOCETHTOOL`` ioctl
  (``ETHTOOL_GRXRINGS``, ``ETHTOOL_GRXFHINDIR``, ``ETHTOOL_SRXFHINDIR``): two
  fixed-layout structs, and it reads and writes the *exact* table, which
  restoring what we changed requires. The ``ethtool`` CLI can only write
  tables derived from ``equal``/``weight``, not an arbitrary recorded one.
* **ntuple rules and RSS contexts** through Debian's ``ethtool`` CLI (package
  ``ethtool``, 6.1 in bookworm, installed in the agent image). Its rule
  manager picks a free rule location on drivers that cannot (``RX_CLS_LOC_ANY``
  emulation) and it knows the ``ethtool_rx_flow_spec`` layout; we only parse
  the two lines it prints on success ("Added rule with ID N", "New RSS
  context is N"), never its listings, whose format changed across versions.

pyroute2 0.9.7 offers neither: its ethtool support covers features, link
modes and Wake-on-LAN, not RSS or ntuple.

**Validated only on hardware.** Nothing here runs in the project's tests:
netdevsim, the only queue-leasing device the test VM has, implements no
RSS/ntuple ethtool ops (``drivers/net/netdevsim/ethtool.c`` in 7.2 has no
``get_rxfh``/``set_rxfh``/``get_rxnfc``/``set_rxnfc``). The decisions that
drive it are unit-tested (``tests/agent/test_nicprep.py``); the ioctl
layouts follow ``include/uapi/linux/ethtool.h``; the CLI invocations are the
ones the upstream patch description shows working on mlx5.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import fcntl
import os
import re
import shutil
import socket
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cni_netkit.errors import KernelError, NotSupported, kernel_error

SIOCETHTOOL = 0x8946
ETHTOOL_GRXRINGS = 0x2D
ETHTOOL_GRXFHINDIR = 0x38
ETHTOOL_SRXFHINDIR = 0x39
_IFNAMSIZ = 16
_IFREQ_SIZE = 40  # sizeof(struct ifreq) on 64-bit Linux
# sizeof(struct ethtool_rxnfc): cmd, flow_type, u64 data, a 168-byte
# ethtool_rx_flow_spec, rule_cnt, padded to 8. The kernel copies this much.
_RXNFC_SIZE = 192
_CLI_TIMEOUT = 10.0


@dataclass(frozen=True)
class SteeringRule:
    """An ntuple rule we added: frames for ``mac`` go to ``queues`` of the master.

    One queue: the rule's action is that queue. Several: the rule points at
    RSS ``context`` (made for these queues) and RSS spreads within it.
    """

    mac: str
    queues: tuple[int, ...]
    rule_id: int
    context: int | None = None


class EthtoolAPI(Protocol):
    """What NIC preparation needs from a master. Implemented by ``Ethtool``."""

    def rx_rings(self, ifname: str) -> int:
        """The number of RX rings RSS and ntuple rules can target."""
        ...

    def rss_table(self, ifname: str) -> tuple[int, ...]:
        """The RSS indirection table of the default context (entry -> ring)."""
        ...

    def set_rss_table(self, ifname: str, table: Sequence[int] | None) -> None:
        """Write the default context's table; None restores the driver's default spread."""
        ...

    def add_steering(self, ifname: str, mac: str, queues: Sequence[int]) -> SteeringRule:
        """Steer frames with destination ``mac`` to ``queues`` (several: via a new RSS context)."""
        ...

    def remove_steering(self, ifname: str, rule: SteeringRule) -> bool:
        """Delete the rule (and its RSS context); False when it was already gone."""
        ...


class Ethtool:
    """``EthtoolAPI`` on the running kernel, in the caller's netns (the host's, for the agent)."""

    def __init__(self, cli: str | None = None) -> None:
        self._cli = cli

    # --- RSS indirection table: SIOCETHTOOL ------------------------------------

    def rx_rings(self, ifname: str) -> int:
        buf = ctypes.create_string_buffer(_RXNFC_SIZE)
        struct.pack_into("=I", buf, 0, ETHTOOL_GRXRINGS)
        self._ioctl(ifname, buf, "ETHTOOL_GRXRINGS")
        (data,) = struct.unpack_from("=Q", buf, 8)
        return int(data)

    def rss_table(self, ifname: str) -> tuple[int, ...]:
        head = ctypes.create_string_buffer(8)
        struct.pack_into("=II", head, 0, ETHTOOL_GRXFHINDIR, 0)  # size 0: ask for the size
        self._ioctl(ifname, head, "ETHTOOL_GRXFHINDIR")
        (size,) = struct.unpack_from("=I", head, 4)
        buf = ctypes.create_string_buffer(8 + 4 * size)
        struct.pack_into("=II", buf, 0, ETHTOOL_GRXFHINDIR, size)
        self._ioctl(ifname, buf, "ETHTOOL_GRXFHINDIR")
        return struct.unpack_from(f"={size}I", buf, 8)

    def set_rss_table(self, ifname: str, table: Sequence[int] | None) -> None:
        entries = tuple(table or ())
        buf = ctypes.create_string_buffer(8 + 4 * len(entries))
        # size 0 is the kernel's "reset to the driver default" request.
        struct.pack_into(f"=II{len(entries)}I", buf, 0, ETHTOOL_SRXFHINDIR, len(entries), *entries)
        self._ioctl(ifname, buf, "ETHTOOL_SRXFHINDIR")

    def _ioctl(self, ifname: str, data: ctypes.Array[ctypes.c_char], what: str) -> None:
        name = ifname.encode()
        if not name or len(name) >= _IFNAMSIZ:
            raise kernel_error(_errno.EINVAL, f"{what} on {ifname!r}", "bad interface name")
        ifreq = struct.pack(f"@{_IFNAMSIZ}sP", name, ctypes.addressof(data))  # native: P needs it
        ifreq = ifreq.ljust(_IFREQ_SIZE, b"\0")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)
            except OSError as e:
                raise kernel_error(e.errno or _errno.EIO, f"{what} on {ifname}") from e

    # --- ntuple rules and RSS contexts: the ethtool CLI -------------------------------

    def add_steering(self, ifname: str, mac: str, queues: Sequence[int]) -> SteeringRule:
        qs = tuple(queues)
        if not qs:
            raise ValueError("add_steering needs at least one queue")
        context = None
        if len(qs) == 1:
            target = ["action", str(qs[0])]
        else:
            weights = [1 if ring in qs else 0 for ring in range(self.rx_rings(ifname))]
            out = self._run(ifname, "-X", ifname, "context", "new", "weight", *map(str, weights))
            context = _parse_id(out, r"New RSS context is (\d+)", "RSS context")
            # With a context the action is an offset into its table: 0, the table holds the queues.
            target = ["context", str(context), "action", "0"]
        try:
            out = self._run(ifname, "-N", ifname, "flow-type", "ether", "dst", mac, *target)
            rule_id = _parse_id(out, r"Added rule with ID (\d+)", "ntuple rule")
        except BaseException:
            if context is not None:  # do not leak the context of a rule that never was
                self._delete_context(ifname, context)
            raise
        return SteeringRule(mac=mac, queues=qs, rule_id=rule_id, context=context)

    def remove_steering(self, ifname: str, rule: SteeringRule) -> bool:
        existed = True
        try:
            self._run(ifname, "-N", ifname, "delete", str(rule.rule_id))
        except KernelError as e:
            if e.err != _errno.ENOENT:
                raise
            existed = False
        if rule.context is not None:
            self._delete_context(ifname, rule.context)
        return existed

    def _delete_context(self, ifname: str, context: int) -> None:
        try:
            self._run(ifname, "-X", ifname, "context", str(context), "delete")
        except KernelError as e:
            if e.err != _errno.ENOENT:
                raise

    def _run(self, ifname: str, *args: str) -> str:
        cli = self._cli or shutil.which("ethtool") or "/usr/sbin/ethtool"
        if not os.access(cli, os.X_OK):
            raise NotSupported(
                f"ethtool {args[0]} on {ifname}: the ethtool CLI is not installed",
                "install Debian's ethtool package (the agent image has it)",
            )
        # C locale: the error text is matched against strerror() below.
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
        try:
            proc = subprocess.run(
                [cli, *args],
                capture_output=True,
                text=True,
                env=env,
                timeout=_CLI_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise kernel_error(_errno.ETIMEDOUT, f"ethtool {' '.join(args)}", "no answer") from e
        if proc.returncode != 0:
            text = (proc.stderr or proc.stdout).strip()
            raise kernel_error(_cli_errno(text), f"ethtool {' '.join(args)}", text)
        return proc.stdout + proc.stderr


def _cli_errno(text: str) -> int:
    """The errno whose strerror() the CLI printed ("Cannot ...: No such file or directory")."""
    for err in (
        _errno.ENOENT,
        _errno.EOPNOTSUPP,
        _errno.EINVAL,
        _errno.EBUSY,
        _errno.EPERM,
        _errno.ENOSPC,
        _errno.ENODEV,
        _errno.ERANGE,
    ):
        if os.strerror(err) in text:
            return err
    return _errno.EIO


def _parse_id(output: str, pattern: str, what: str) -> int:
    m = re.search(pattern, output)
    if not m:
        raise KernelError(f"ethtool did not report the new {what}'s id", output.strip())
    return int(m[1])
