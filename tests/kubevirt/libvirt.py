"""libvirt's QEMU command line for a domain: ``virsh domxml-to-native qemu-argv`` through
the embedded QEMU driver (``qemu:///embed``: a private root, no daemon), as the
unprivileged driver (nobody) since the privileged one wants its libvirt-qemu user."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

NOBODY = 65534


def qemu_argv(domain_xml: bytes) -> list[str]:
    """libvirt's QEMU command line for ``domain_xml``, split into arguments."""
    assert shutil.which("virsh"), "virsh missing: scripts/host-packages install test"
    root = Path(tempfile.mkdtemp(prefix="kv-libvirt-"))
    try:
        root.chmod(0o777)
        xml = root / "domain.xml"
        xml.write_bytes(domain_xml)
        xml.chmod(0o644)
        # libvirt's unprivileged driver: as root it would need its libvirt-qemu user.
        drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] \
            if os.geteuid() == 0 else []
        done = subprocess.run(
            [*drop, "env", f"HOME={root}", f"XDG_RUNTIME_DIR={root}", "virsh", "-c",
             f"qemu:///embed?root={root}/embed", "domxml-to-native", "qemu-argv", str(xml)],
            capture_output=True, text=True, check=False, timeout=300)
    finally:
        shutil.rmtree(root)
    assert done.returncode == 0, done.stderr
    # "-flag value" per argument; virsh quotes JSON values in single quotes.
    return [a.replace(" '", " ", 1).removesuffix("'")
            for a in re.split(r" (?=-)", done.stdout.strip())]


def root_bus_slots(argv: list[str]) -> dict[int, list[str]]:
    """Root-bus slot -> the ids of the devices libvirt and we put there."""
    slots: dict[int, list[str]] = {}
    for arg in argv:
        if not arg.startswith("-device "):
            continue
        value = arg.removeprefix("-device ")
        if value.startswith("{"):
            dev = json.loads(value)
        else:
            dev = dict(p.partition("=")[::2] for p in value.split(",")[1:])
        if dev.get("bus") in ("pcie.0", "pci.0") and "addr" in dev:
            slot = int(str(dev["addr"]).split(".")[0], 16)
            slots.setdefault(slot, []).append(str(dev.get("id")))
    return slots




def start_paused(domain_xml: bytes, name: str) -> str:
    """Define and start (paused) ``domain_xml`` in libvirt; QEMU's ``info pci``, then destroy.

    One virsh process runs the four commands: the embedded driver's QEMU
    lives only as long as the process that started it. stdio_handler "file":
    no virtlogd.
    """
    root = Path(tempfile.mkdtemp(prefix="kv-libvirt-"))
    try:
        root.chmod(0o777)
        (root / "embed" / "etc").mkdir(parents=True)
        (root / "embed" / "etc" / "qemu.conf").write_text('stdio_handler = "file"\n')
        xml = root / "domain.xml"
        xml.write_bytes(domain_xml)
        drop: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(root / "embed", NOBODY, NOBODY)
            shutil.chown(root / "embed" / "etc", NOBODY, NOBODY)
            drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        xml.chmod(0o644)
        script = (f"define {xml}; start {name} --paused; "
                  f"qemu-monitor-command {name} --hmp 'info pci'; destroy {name}")
        done = subprocess.run(
            [*drop, "env", f"HOME={root}", f"XDG_RUNTIME_DIR={root}", "virsh", "-q", "-c",
             f"qemu:///embed?root={root}/embed", script],
            capture_output=True, text=True, check=False, timeout=300)
    finally:
        shutil.rmtree(root)
    assert done.returncode == 0 and "Bus  0" in done.stdout, done.stdout + done.stderr
    return done.stdout


def pci_devices(info_pci: str) -> dict[tuple[int, int, int], str]:
    """(bus, device, function) -> QEMU id, from HMP ``info pci``."""
    out: dict[tuple[int, int, int], str] = {}
    where: tuple[int, int, int] | None = None
    for line in info_pci.splitlines():
        m = re.match(r"\s*Bus\s+(\d+), device\s+(\d+), function (\d+):", line)
        if m:
            where = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
        m = re.match(r'\s*id "(.*)"', line)
        if m and where is not None:
            out[where] = m.group(1)
    return out
