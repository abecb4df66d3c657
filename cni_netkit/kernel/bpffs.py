"""Where cni-netkit's BPF pins live: bpffs paths only, no BPF calls, nothing heavy to import.

Split from ``kernel.xsk`` so that the plugin tells whether a master has AF_XDP
steering with one path check, without loading ctypes or libbpf for the
masters (and the commands) that have none.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_ROOT = "/sys/fs/bpf/cni-netkit"
ROOT_ENV = "CNI_NETKIT_BPF_ROOT"
# A master's pins (kernel.xsk): the link holding the program, its two maps.
LINK_PIN = "link"
OUTER_MAP = "xsk_maps"
SLOT_MAP = "xsk_slots"


def bpf_root() -> Path:
    """Where our pins live: ``$CNI_NETKIT_BPF_ROOT`` or ``/sys/fs/bpf/cni-netkit``."""
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def master_dir(master: str, root: Path | None = None) -> Path:
    return (root or bpf_root()) / "masters" / master


def steering(master: str, root: Path | None = None) -> bool:
    """The node agent pinned this master's maps (``kernel.xsk.ensure_program``)."""
    return (master_dir(master, root) / OUTER_MAP).exists()


def pinned_files(under: Path) -> list[Path]:
    """Every file pinned below ``under``, sorted; empty if the directory is missing."""
    if not under.is_dir():
        return []
    return sorted(p for p in under.rglob("*") if p.is_file())
