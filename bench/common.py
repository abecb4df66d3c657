"""What the benchmark's host and guest halves share: launching plugins, statistics, flavours.

A plugin invocation is launched the way a runtime launches it (a fresh
process, environment, config on stdin) with ``posix_spawn``.  Latency is
spawn to reap, harness overhead included, the same for every plugin
measured.  Peak RSS is measured separately, through time(1).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VENV_NETKIT = REPO / ".venv" / "bin" / "netkit"
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
HOST_GO_PLUGINS = Path("/var/cache/cni-netkit/cni-plugins/usr/lib/cni")
TIME = "/usr/bin/time"


@dataclass
class Run:
    """One finished invocation."""

    ms: float
    status: int
    stdout: bytes
    stderr: bytes


@dataclass
class Launched:
    pid: int
    started: float
    stdout_r: int
    stderr_path: str
    label: str = ""


def launch(argv: Sequence[str], env: Mapping[str, str], stdin: bytes, label: str = "") -> Launched:
    """Start ``argv`` with ``env`` and ``stdin``; time runs from here."""
    stdin_fd = os.memfd_create("stdin")
    os.write(stdin_fd, stdin)
    os.lseek(stdin_fd, 0, os.SEEK_SET)
    out_r, out_w = os.pipe()
    err_fd, err_path = tempfile.mkstemp(prefix="bench-stderr-")
    try:
        started = time.perf_counter()
        pid = os.posix_spawn(
            argv[0],
            list(argv),
            dict(env),
            file_actions=[
                (os.POSIX_SPAWN_DUP2, stdin_fd, 0),
                (os.POSIX_SPAWN_DUP2, out_w, 1),
                (os.POSIX_SPAWN_DUP2, err_fd, 2),
            ],
        )
    finally:
        os.close(stdin_fd)
        os.close(out_w)
        os.close(err_fd)
    return Launched(pid, started, out_r, err_path, label)


def _finish(proc: Launched, wait_status: int, ended: float) -> Run:
    with os.fdopen(proc.stdout_r, "rb") as f:
        out = f.read()
    err = Path(proc.stderr_path).read_bytes()
    Path(proc.stderr_path).unlink()
    return Run(
        (ended - proc.started) * 1000,
        os.waitstatus_to_exitcode(wait_status),
        out,
        err,
    )


def run_one(argv: Sequence[str], env: Mapping[str, str], stdin: bytes) -> Run:
    """Launch and wait for one invocation."""
    proc = launch(argv, env, stdin)
    _, wait_status = os.waitpid(proc.pid, 0)
    return _finish(proc, wait_status, time.perf_counter())


def run_many(jobs: Iterable[tuple[Sequence[str], Mapping[str, str], bytes]]) -> list[Run]:
    """Launch all ``jobs`` at once; each one's latency is its own spawn to its own reap.

    Output pipes are read after reaping: replies are far below a pipe's 64 KiB.
    """
    procs = {}
    for argv, env, stdin in jobs:
        p = launch(argv, env, stdin)
        procs[p.pid] = p
    done: dict[int, Run] = {}
    while len(done) < len(procs):
        pid, wait_status = os.waitpid(-1, 0)
        ended = time.perf_counter()
        if pid in procs:
            done[pid] = _finish(procs[pid], wait_status, ended)
    return [done[pid] for pid in procs]


def peak_rss_kb(argv: Sequence[str], env: Mapping[str, str], stdin: bytes) -> int | None:
    """The invocation's peak RSS (KiB), measured by ``/usr/bin/time -f %M``.

    Not ``wait4``'s ru_maxrss of our own children: exec folds the pre-exec
    address space's high-water mark into it, and a child spawned from this
    Python process starts from our ~16 MB. time(1) is small.
    """
    if not Path(TIME).exists():
        return None
    run = run_one([TIME, "-f", "@@%M", *argv], env, stdin)
    tail = run.stderr.rsplit(b"@@", 1)
    return int(tail[1]) if len(tail) == 2 and tail[1].strip().isdigit() else None


# --- statistics ----------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1), linear between closest ranks."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values: Sequence[float]) -> dict[str, float]:
    """n, median, p90, min, max (ms)."""
    return {
        "n": len(values),
        "p50": round(statistics.median(values), 2) if values else float("nan"),
        "p90": round(pct(values, 0.9), 2),
        "min": round(min(values), 2) if values else float("nan"),
        "max": round(max(values), 2) if values else float("nan"),
    }


# --- how our executable is started ------------------------------------------------------


def lean_launcher(directory: Path, repo: Path = REPO, name: str = "netkit-lean") -> Path:
    """A ``netkit`` started with ``python -S`` and an explicit sys.path.

    What the venv's console script does minus site processing: the venv's
    .pth files load the editable install's finder and setuptools' distutils
    hack at every start (~15 ms on a host, ~0.4 s in the VM), which no
    production install has.  The cold path still finds pydantic & co.
    """
    purelib = sysconfig.get_paths()["purelib"]
    path = directory / name
    path.write_text(
        f"#!{sys.executable} -S\n"
        "import sys\n"
        f"sys.path[:0] = [{str(repo)!r}, {purelib!r}]\n"
        "from cni_netkit.cni.entry import main\n"
        "main()\n"
    )
    path.chmod(0o755)
    return path


def shim_launcher(directory: Path, plugin: Path) -> Path | None:
    """The thin C client (``scripts/build-shim``) laid out as in the artifact, or None if unbuilt.

    A copy of ``build/shim/netkit`` with ``netkit-plugin`` beside it linking to
    ``plugin`` (the lean launcher): the shim finds its fallback through
    ``/proc/self/exe`` exactly as installed, with no extra environment.
    """
    shim = REPO / "build" / "shim" / "netkit"
    if not shim.is_file():
        return None
    home = directory / "shim"
    home.mkdir(exist_ok=True)
    exe = home / "netkit"
    exe.write_bytes(shim.read_bytes())
    exe.chmod(0o755)
    link = home / "netkit-plugin"
    link.unlink(missing_ok=True)
    link.symlink_to(plugin)
    return exe


def flavours(scratch: Path, artifact: str | None) -> dict[str, list[str]]:
    """How to start our executable: name -> argv."""
    lean = lean_launcher(scratch)
    got = {"venv": [str(VENV_NETKIT)], "lean": [str(lean)]}
    shim = shim_launcher(scratch, lean)
    if shim is not None:
        got["shim"] = [str(shim)]
    if artifact:
        exe = Path(artifact) / "netkit"
        # In the VM, /tmp, /run and /var are the guest's tmpfs; the host's are under /run/host.
        if not exe.exists() and Path("/run/host", *exe.parts[1:]).exists():
            exe = Path("/run/host", *exe.parts[1:])
        got["artifact"] = [str(exe)]
    return got


def write_json(path: Path, doc: Any) -> None:
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def importtime_by_package(stderr: str) -> dict[str, float]:
    """``python -X importtime`` output as self time (ms) per top-level package, largest first."""
    totals: dict[str, float] = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = line.split("|")
        try:
            self_us = int(parts[0].split(":")[1])
        except ValueError:
            continue  # the header line
        root = parts[2].strip().split(".")[0]
        totals[root] = totals.get(root, 0.0) + self_us / 1000
    return {k: round(v, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
