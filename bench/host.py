"""The benchmark's host half: VERSION and STATUS latency, ours cold and warm vs Go's.

Run by ``scripts/bench``; writes ``host.json`` into ``--out``.  The host
kernel has no netkit, so our STATUS ends in its "not available" reply (code
50) after the same work a node's STATUS does (config, netlink probe); ADD
runs only in the VM (``bench.guest``).  Also here: where a cold STATUS's
import time goes (``-X importtime``, by package) and the per-phase
breakdown of STATUS (``bench.phases``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    HOST_GO_PLUGINS,
    PATH,
    REPO,
    flavours,
    importtime_by_package,
    peak_rss_kb,
    run_one,
    summary,
    write_json,
)

VERSION_IN = b'{"cniVersion": "1.0.0"}'


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.host")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--artifact")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="cni-netkit-bench-"))
    sock = scratch / "agent" / "cni.sock"
    agent = subprocess.Popen(
        [sys.executable, "-m", "cni_netkit.agent.server", "--socket", str(sock)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the agent did not start")
            time.sleep(0.05)
        doc = measure(args, scratch, sock)
    finally:
        agent.terminate()
        agent.wait(30)
        shutil.rmtree(scratch, ignore_errors=True)
    write_json(args.out / "host.json", doc)
    return 0


def measure(args: argparse.Namespace, scratch: Path, sock: Path) -> dict[str, Any]:
    status_conf = json.dumps({"cniVersion": "1.1.0", "name": "bench", "type": "netkit",
                              "master": "lo", "queues": "0-3",
                              "stateDir": str(scratch / "state")}).encode()
    go_status = json.dumps({"cniVersion": "1.1.0", "name": "gobench", "type": "macvlan",
                            "master": "lo"}).encode()
    go = [str(HOST_GO_PLUGINS / "macvlan")]
    # Go's skel wants the attachment variables even for STATUS: everyone gets them.
    attach = {"CNI_CONTAINERID": "bench", "CNI_NETNS": "/proc/self/ns/net", "CNI_IFNAME": "x0",
              "CNI_PATH": str(HOST_GO_PLUGINS), "CNI_NETKIT_STATE_DIRS": str(scratch / "state")}
    cases: dict[str, tuple[list[str], dict[str, str], bytes]] = {
        "go macvlan VERSION": (go, {"CNI_COMMAND": "VERSION"}, VERSION_IN),
        "go macvlan STATUS": (go, {**attach, "CNI_COMMAND": "STATUS"}, go_status),
    }
    for flavour, argv in flavours(scratch, args.artifact).items():
        for command, stdin in (("VERSION", VERSION_IN), ("STATUS", status_conf)):
            env = {**attach, "CNI_COMMAND": command} if command == "STATUS" else {
                "CNI_COMMAND": command}
            cases[f"netkit {command} warm ({flavour})"] = (
                argv, {**env, "CNI_NETKIT_AGENT_SOCKET": str(sock)}, stdin)
            cases[f"netkit {command} cold ({flavour})"] = (
                argv, {**env, "CNI_NETKIT_NO_AGENT": "1"}, stdin)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    rss: dict[str, list[int]] = {name: [] for name in cases}
    outcome: dict[str, str] = {}
    for i in range(args.samples + 1):  # round-robin; the first round warms caches, unrecorded
        for name, (argv, env, stdin) in cases.items():
            run = run_one(argv, {"PATH": PATH, **env}, stdin)
            outcome[name] = f"exit {run.status}: {run.stdout.decode(errors='replace')[:120]}"
            if i:
                samples[name].append(run.ms)
    for name, (argv, env, stdin) in cases.items():
        for _ in range(3):
            kb = peak_rss_kb(argv, {"PATH": PATH, **env}, stdin)
            if kb is not None:
                rss[name].append(kb)
    return {
        "latency": {
            name: {**summary(v), "maxrss_kb_p50": sorted(rss[name])[len(rss[name]) // 2]
                   if rss[name] else None, "outcome": outcome[name]}
            for name, v in samples.items()
        },
        "importtime_cold_status_ms": _importtime(status_conf),
        "phases_status": _phases(scratch),
    }


def _importtime(stdin: bytes) -> dict[str, float]:
    p = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "cni_netkit.cni"],
        input=stdin, cwd=REPO, capture_output=True, check=False,
        env={"PATH": PATH, "CNI_COMMAND": "STATUS", "CNI_NETKIT_NO_AGENT": "1"},
    )
    return importtime_by_package(p.stderr.decode(errors="replace"))


def _phases(scratch: Path) -> dict[str, Any]:
    p = subprocess.run(
        [sys.executable, "-m", "bench.phases", "--command", "STATUS", "--master", "lo",
         "--queues", "0-3", "--state-dir", str(scratch / "phases")],
        cwd=REPO, capture_output=True, check=False,
    )
    if p.returncode != 0:
        return {"error": p.stderr.decode(errors="replace")[-2000:]}
    got: dict[str, Any] = json.loads(p.stdout)
    return got


if __name__ == "__main__":
    raise SystemExit(main())
