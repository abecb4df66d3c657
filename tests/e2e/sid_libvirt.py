"""libvirt from sid running a domain with the af-xdp QEMU, in the VM.

The ``libvirt`` root's virsh drives libvirt's embedded QEMU driver
(``qemu:///embed?root=...``: a private root, no daemon): the driver lives in
the virsh process, and so does the domain's QEMU, so one virsh reads its
commands from a pipe while the test looks at QEMU from outside.

virsh runs as the pod's workload (``consumers.workload``: uid/gid 107 in the
pod's netns, CAP_NET_RAW only, the QEMU UMEM's memlock), which makes it
libvirt's unprivileged driver: QEMU runs as virsh's own user, with what virsh
has (CAP_NET_RAW, which AF_XDP's socket needs, kept through the exec:
the test reads it back). ``stdio_handler = "file"`` in the embed root's
qemu.conf: no virtlogd. The privileged driver (virsh as root) is not used:
it wants its ``libvirt-qemu`` user and would change QEMU's credentials itself.

The emulator is found as libvirt finds one: ``qemu-system-x86_64`` in
virsh's PATH, here a directory holding only a script that execs the qemu
root's QEMU with that root's loader, and ``-L`` for SeaBIOS and iPXE's ROMs
(the root is not at the datadir QEMU was configured with). Only that
directory in PATH: libvirt probes every emulator it finds there, and the
host's bookworm QEMUs are not what the domain runs. libvirt's driver modules
come from ``LIBVIRT_DRIVER_DIR``; its data (cpu_map, schemas) has no such
variable: virsh runs in a mount namespace with the root's /usr/share/libvirt
bound over the host's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.consumers import LIBS, LOADER, QEMU, WORKLOAD_GID, WORKLOAD_UID, root, workload

VIRSH = "usr/bin/virsh"
SHARE = "usr/share/libvirt"


def version() -> str:
    """The libvirt root's version (its libvirt0 package's)."""
    debs = (root("libvirt") / ".debs").read_text().split()
    (deb,) = [d for d in debs if d.startswith("libvirt0_")]
    return deb.split("_")[1]


def emulator(directory: Path) -> Path:
    """``directory``/qemu-system-x86_64: the qemu root's QEMU with its loader and firmware."""
    q = root("qemu")
    script = directory / "qemu-system-x86_64"
    script.write_text(
        "#!/bin/sh\n"
        f"exec /usr/bin/env LIBXDP_OBJECT_PATH={q / LIBS / 'bpf'} {q / LOADER} "
        f"--library-path {q / LIBS} {q / QEMU} "
        f"-L {q / 'usr/share/seabios'} -L {q / 'usr/share/qemu'} \"$@\"\n")
    script.chmod(0o755)
    return script


@dataclass
class Virsh:
    """One virsh process (``start``), fed commands on its stdin."""

    proc: subprocess.Popen[str]
    dir: Path

    def send(self, *commands: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("".join(f"{c}\n" for c in commands))
        self.proc.stdin.flush()

    @property
    def errors(self) -> str:
        return (self.dir / "virsh.err").read_text(errors="replace")

    @property
    def output(self) -> str:
        out = (self.dir / "virsh.out").read_text(errors="replace")
        logs = "".join(f"\n--- {p.name}:\n{p.read_text(errors='replace')}"
                       for p in sorted((self.dir / "embed").rglob("*.log")))
        return f"stdout:\n{out}\nstderr:\n{self.errors}{logs}"

    def qemu_pid(self, name: str, timeout: float) -> int:
        """The pid of domain ``name``'s QEMU once it runs (``-name guest=<name>,...``)."""
        deadline = time.monotonic() + timeout
        while True:
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    argv = (proc / "cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if b"-name" in argv and any(a.startswith(f"guest={name},".encode()) for a in argv):
                    return int(proc.name)
            assert self.proc.poll() is None, f"virsh exited {self.proc.returncode}:\n{self.output}"
            assert "error:" not in self.errors, self.output
            assert time.monotonic() < deadline, f"no QEMU for {name}:\n{self.output}"
            time.sleep(0.5)

    def quit(self, timeout: float = 300) -> int:
        """``quit``, then virsh's exit status."""
        self.send("quit")
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def start(netns: str, *, memlock: int, view: Sequence[str] = ()) -> Virsh:
    """virsh on a fresh embed root, as the pod's workload in ``netns`` (module doc);
    ``view``: a command prefix giving it the compute container's mounts (``pod_view``)."""
    lv = root("libvirt")
    # Short: libvirt's sockets live under it (a unix socket path has 108 bytes).
    d = Path(tempfile.mkdtemp(prefix="lv", dir="/tmp"))
    (d / "embed" / "etc").mkdir(parents=True)
    (d / "bin").mkdir()
    (d / "embed" / "etc" / "qemu.conf").write_text(
        'stdio_handler = "file"\n')
    emulator(d / "bin")
    for path in (d, d / "embed", d / "embed" / "etc", d / "bin"):
        os.chown(path, WORKLOAD_UID, WORKLOAD_GID)
    argv = ["/usr/bin/env", "-i", f"PATH={d / 'bin'}", f"HOME={d}", f"XDG_RUNTIME_DIR={d}",
            f"LIBVIRT_DRIVER_DIR={lv / LIBS / 'libvirt/connection-driver'}",
            str(lv / LOADER), "--library-path", str(lv / LIBS), str(lv / VIRSH),
            "-c", f"qemu:///embed?root={d / 'embed'}"]
    assert Path("/", SHARE).is_dir(), f"/{SHARE} missing: scripts/host-packages install test"
    share = f"mount --bind {lv / SHARE} /{SHARE} && exec \"$@\""
    cmd = [*view, "unshare", "--mount", "--propagation", "private", "sh", "-ec", share, "virsh",
           *workload(netns, argv, memlock=memlock)]
    with (d / "virsh.out").open("w") as out, (d / "virsh.err").open("w") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, text=True)
    return Virsh(proc, d)
