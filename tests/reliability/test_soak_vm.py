"""A short warm soak on the real 7.x kernel: what the host soak's fake kernel cannot show.

``bench/soak.py`` (``scripts/soak``) runs 10 000 warm cycles on the host,
against the fake of our kernel seam. This runs ``CNI_NETKIT_SOAK_CYCLES``
(default 16; ``scripts/soak --vm-cycles N`` asks for more) ADD/DEL cycles
through the real agent (``python -m cni_netkit.agent.server``) and the real
thin C client on the real kernel, alternating a ``single`` attachment on a
master with the AF_XDP steering program (so each ADD creates and pins an XSK
map, each DEL unpins it) and a ``pair``, l3, with host-local IPAM, in two pod
netns that the cycles take turns with.

Counts, compared between the sample after the first fifth of the cycles and
the last: the agent's open fds by kind (``net`` is a netns handle,
``socket`` a netlink or unix socket, ``anon_inode`` a BPF map or link) and
its threads, unchanged; on the node: no lease (queue-get), no netkit in the
host or either netns, no record, device-info file, host-local address, XSK
map pin, or held lock left. RSS is reported (figures), not asserted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bench.soak import peak_rss_kb, quiescent
from cni_netkit.cni.client import NO_AGENT_ENV
from cni_netkit.kernel import xsk
from cni_netkit.plugin.commands import FAULT_ENV
from tests.kernel.xsk_support import bpf_object, private_root
from tests.reliability.figures import Figures, Suite
from tests.reliability.harness import (
    NETKIT,
    PATH,
    Net,
    Nic,
    add_netns,
    del_netns,
    make_nic,
    observe,
)

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
SHIM = REPO / "build" / "shim" / "netkit"
CYCLES = int(os.environ.get("CNI_NETKIT_SOAK_CYCLES") or 16)
BASELINE = max(4, CYCLES // 5)
# scripts/soak also asks for the cold path's peak RSS per ADD (a benchmark figure, seconds
# per sample in the VM: never in the test suite's default run).
COLD_RSS_SAMPLES = int(os.environ.get("CNI_NETKIT_SOAK_COLD_RSS") or 0)


def pins(root: Path, master: str) -> frozenset[str]:
    """Pinned files under ``root`` other than the master's own (program link, its maps)."""
    own = root / "masters" / master
    return frozenset(str(p.relative_to(root)) for p in root.rglob("*")
                     if not p.is_dir() and own not in p.parents)


@dataclass
class VmSoak:
    """The agent under soak, the client's environment, and the samples taken."""

    nic: Nic
    nets: tuple[Net, ...]
    root: Path
    agent: subprocess.Popen[bytes]
    env: dict[str, str]
    suite: Suite
    samples: list[Sample] = field(default_factory=list)

    def call(self, command: str, net: Net, cid: str, netns: str,
             prev: dict[str, Any] | None = None) -> tuple[int, str, str]:
        e, stdin = net.request(command, cid, netns, prev=prev)
        p = subprocess.run([str(SHIM)], input=stdin, env={**e, **self.env},
                           capture_output=True, check=False, timeout=600)
        self.suite.cases += 1
        return p.returncode, p.stdout.decode(), p.stderr.decode()

    def cycle(self, n: int, netns: str) -> None:
        net, cid = self.nets[n % 2], f"soak-{n}"
        status, out, err = self.call("ADD", net, cid, netns)
        if status != 0 or err:
            self.suite.failed(f"ADD {cid}: {status} {out[:300]!r} {err[-300:]!r}")
        elif net.pairing == "single" and not pins(self.root, self.nic.name):
            self.suite.failed(f"ADD {cid}: a steered single attachment pinned no XSK map")
        status, out2, err = self.call("DEL", net, cid, netns,
                                      prev=json.loads(out) if status == 0 else None)
        if status != 0 or out2 or err:
            self.suite.failed(f"DEL {cid}: {status} {out2[:300]!r} {err[-300:]!r}")

    def sample(self, cycle: int) -> None:
        st, kinds = quiescent(self.agent.pid)
        node = observe(self.nic, self.nets[0])
        left = [*node.leases, *node.netkits, *node.records, *node.devinfo,
                *observe(None, self.nets[1]).ipam, *node.locks_held,
                *(f"pin {p}" for p in pins(self.root, self.nic.name))]
        self.samples.append(Sample(cycle, st["VmRSS"], st["Threads"], dict(sorted(kinds.items())),
                                   sorted(left)))

    def cold_rss(self, samples: int, netns: str) -> list[int]:
        """Peak RSS (KiB) of cold ADDs: the venv's ``netkit`` with no agent (bench.soak)."""
        peaks = []
        for n in range(samples):
            net, cid = self.nets[0], f"cold-{n}"
            e, stdin = net.request("ADD", cid, netns)
            kb, status = peak_rss_kb([NETKIT], {**e, **self.env, NO_AGENT_ENV: "1"}, stdin)
            if status != 0 or kb is None:
                self.suite.failed(f"cold ADD {cid}: status {status}, peak {kb}")
            else:
                peaks.append(kb)
            status, out, err = self.call("DEL", net, cid, netns)
            if status != 0:
                self.suite.failed(f"DEL {cid}: {status} {out!r} {err[-300:]!r}")
        return peaks

    def leaks(self) -> list[str]:
        first, last = self.samples[0], self.samples[-1]
        found = [f"{k}: {getattr(first, k)} after {first.cycle} cycles, {getattr(last, k)} "
                 f"after {last.cycle}" for k in ("fds", "threads")
                 if getattr(first, k) != getattr(last, k)]
        return found + [f"left after {last.cycle} cycles: {x}" for x in last.left]


@dataclass
class Sample:
    cycle: int
    rss_kb: int
    threads: int
    fds: dict[str, int]
    left: list[str]


def start_agent(sock: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    agent_env = {**os.environ, **env}
    agent_env.pop(FAULT_ENV, None)
    with log.open("wb") as err:
        agent = subprocess.Popen(
            [sys.executable, "-m", "cni_netkit.agent.server", "--socket", str(sock)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, env=agent_env)
    deadline = time.monotonic() + 300  # imports and warm-up take seconds in the VM
    while not sock.exists():
        assert agent.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the agent did not start"
        time.sleep(0.1)
    return agent


def test_warm_soak_on_the_real_kernel(tmp_path: Path, figures: Figures) -> None:
    if not SHIM.is_file():
        pytest.fail(f"no thin client at {SHIM}: scripts/bootstrap builds it (scripts/build-shim)")
    if not os.environ.get("CNI_NETKIT_CNI_PLUGINS"):
        pytest.fail("host-local missing: scripts/vm setup extracts containernetworking-plugins")
    suite = figures.suite("soak-vm")
    nic = make_nic(6)
    nets = (Net(tmp_path, nic.name, "1-4", name="single"),
            Net(tmp_path, nic.name, "1-4", name="pair", pairing="pair", mode="l3", ipam=True))
    pods = [add_netns(), add_netns()]
    sock, log = tmp_path / "agent" / "cni.sock", tmp_path / "agent.log"
    started = time.monotonic()
    with private_root() as root:
        xsk.ensure_program(nic.name, bpf_object(), root=root)
        env = {**nets[0].places, xsk.ROOT_ENV: str(root), "CNI_NETKIT_AGENT_SOCKET": str(sock),
               "CNI_NETKIT_PLUGIN_EXE": NETKIT, "PATH": PATH}
        soak = VmSoak(nic, nets, root, start_agent(sock, env, log), env, suite)
        try:
            for n in range(CYCLES):
                soak.cycle(n, pods[n // 2 % 2])
                if n + 1 in (BASELINE, CYCLES):
                    soak.sample(n + 1)
            if COLD_RSS_SAMPLES:
                peaks = sorted(soak.cold_rss(COLD_RSS_SAMPLES, pods[0]))
                suite.info.update(cold_add_peak_rss_kb={"p50": peaks[len(peaks) // 2],
                                                        "max": peaks[-1], "n": len(peaks)}
                                  if peaks else None)
        finally:
            soak.agent.send_signal(signal.SIGTERM)
            status = soak.agent.wait(120)
            xsk.remove_program(nic.name, root=root)
            for p in pods:
                del_netns(p)
            nic.remove()
            suite.seconds += time.monotonic() - started
    leaks = soak.leaks()
    suite.leaks += len(leaks)
    for text in leaks:
        suite.note(text)
    first, last = soak.samples[0], soak.samples[-1]
    suite.info.update(cycles=CYCLES, agent_exit=status, fds=first.fds, threads=first.threads,
                      rss_kb=f"{first.rss_kb} after {first.cycle}, {last.rss_kb} after "
                             f"{last.cycle} ({last.rss_kb / first.rss_kb:.3f}x)")
    assert status == 0, log.read_text()[-2000:]
    assert suite.failures == 0 and not leaks, f"{suite.failures} failure(s): {suite.notes}"
