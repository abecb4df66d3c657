"""Helpers of the AF_XDP steering tests: BPF objects, a private bpffs root, bpftool read-back.

Kernel state is read back with Debian's bpftool (installed by
scripts/build-bpf on the host, whose root the VM shares), not with the
binding under test.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
OBJECT = REPO / "build" / "bpf" / "xsk_redirect.bpf.o"
# tests/kernel/bpf/xsk_redirect_v2.bpf.c: same maps, changed code (counts frames per queue)
CHANGED_OBJECT = REPO / "build" / "bpf" / "test" / "xsk_redirect_v2.bpf.o"
BPFFS = Path("/sys/fs/bpf")
DEBUGFS_NSIM = Path("/sys/kernel/debug/netdevsim")

XDP_PASS, XDP_REDIRECT = 2, 4
# An Ethernet frame: what the program sees does not matter, only its RX queue.
FRAME = bytes.fromhex("02000000000a" "02000000000b" "0800") + bytes(50)

AF_XDP, SOL_XDP, XDP_RX_RING = 44, 283, 2
_roots = itertools.count()


def bpf_object(path: Path = OBJECT) -> str:
    if not path.exists():
        pytest.fail(f"{path} is missing: run scripts/build-bpf (scripts/bootstrap does)")
    return str(path)


@contextmanager
def private_root() -> Iterator[Path]:
    """A fresh directory on the bpffs for one test's pins, removed (unpinned) afterwards."""
    if not os.path.ismount(BPFFS):
        pytest.fail(f"no bpffs at {BPFFS} (scripts/vm-init mounts one)")
    root = BPFFS / f"cnk-test-{os.getpid()}-{next(_roots)}"
    root.mkdir()
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def bpftool(*args: str) -> Any:
    out = subprocess.run(["bpftool", "-j", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout) if out.stdout.strip() else None


def _u32(raw: list[str]) -> int:
    """bpftool's hex byte list (little-endian) as an int."""
    return int.from_bytes(bytes(int(b, 16) for b in raw), "little")


def outer_map(pin: Path) -> dict[int, int]:
    """Physical queue -> inner map id, from ``bpftool map dump`` of the pinned outer map."""
    return {_u32(e["key"]): _u32(e["value"]) if isinstance(e["value"], list)
            else int(e["value"]) for e in bpftool("map", "dump", "pinned", str(pin))
            if "value" in e}


def slot_map(pin: Path) -> dict[int, int]:
    """Physical queue -> XSK index, non-zero entries only (an ARRAY has every key)."""
    entries = {_u32(e["key"]): _u32(e["value"]) for e in bpftool("map", "dump", "pinned", str(pin))}
    return {q: i for q, i in entries.items() if i}


def xdp_on(ifname: str) -> list[dict[str, Any]]:
    """``bpftool net show dev``'s XDP entries: ``{"mode": "driver"|"generic", "id": prog}``."""
    (dev,) = bpftool("net", "show", "dev", ifname)
    return [{"mode": x["mode"], "id": x["id"]} for x in dev["xdp"]]


def nsim_debugfs(nsim_id: int, knob: str) -> Path:
    path = DEBUGFS_NSIM / f"netdevsim{nsim_id}" / "ports" / "0" / knob
    if not path.exists():
        pytest.fail(f"{path} missing (scripts/vm-init mounts debugfs)")
    return path


def xsk_socket() -> socket.socket:
    """An AF_XDP socket with an RX ring, unbound: what an XSK map accepts as a value."""
    s = socket.socket(AF_XDP, socket.SOCK_RAW, 0)
    s.setsockopt(SOL_XDP, XDP_RX_RING, 64)
    return s
