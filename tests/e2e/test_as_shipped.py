"""The warm path and reclaim with the agent confined as manifests/daemonset.yaml confines it.

The other e2e tests run the agent in the executable's own mount namespace.
Here the agent's container is built from the DaemonSet itself (read here,
never restated): a mount namespace of its own whose root is read-only (when
``readOnlyRootFilesystem``), holding only an "image" (the VM's /usr, /lib*
and this worktree, read-only) and the manifest's volumeMounts at their
mountPaths (hostPath, emptyDir, configMap; readOnly and HostToContainer
honoured), its own PID namespace (``hostPID: false``), the host's network
namespace (``hostNetwork: true``), and only the capabilities the manifest
adds (``setpriv --bounding-set``). Not reproduced: the seccomp profile and
cgroup limits.

A hostPath the VM cannot create (its root is the host's, read-only: e.g.
``/opt/cni/bin``) is made under this test's node directory instead; the
runtime side names that directory in ``CNI_PATH``, the agent sees it at its
mountPath (``/host/opt/cni/bin``), as on a node. The other host paths are
the real ones (the VM's /var and /run are tmpfs).

The runtime side (the real executable, default socket) then runs ADD, CHECK,
DEL and GC, single and pair + host-local: every one is served warm (no
fallback note, the agent's log has the plugin's lines), host-local's files on
the host show the address released by DEL, by a relayed GC and by the
agent's own GC release run inside the container, corrupt and other-version
records are handled, and warm replies equal the cold ones.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from cni_netkit.plugin.state import Owner, StateStore
from tests.e2e.conftest import (
    AgentProc,
    Nic,
    Runtime,
    cni_plugins_dir,
    leased_queues,
    netkit_links,
)

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
SOCKET = Path("/run/cni-netkit/cni.sock")  # where the executable looks by default
NOTE = "node agent not used, running the command in this process"
# Linux capability numbers (linux/capability.h) of the names a manifest may add.
CAP_BITS = {"CHOWN": 0, "NET_ADMIN": 12, "SYS_ADMIN": 21, "BPF": 39, "NET_RAW": 13,
            "SYS_PTRACE": 19, "PERFMON": 38, "SYS_RESOURCE": 24, "IPC_LOCK": 14}


def agent_spec() -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod spec, agent container) of the shipped DaemonSet."""
    (ds,) = [d for d in yaml.safe_load_all((MANIFESTS / "daemonset.yaml").read_text()) if d]
    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def config_map_data(name: str) -> dict[str, str]:
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "ConfigMap" and doc["metadata"]["name"] == name:
                data: dict[str, str] = doc["data"]
                return data
    raise AssertionError(f"no ConfigMap {name} in manifests/")


def _creatable(path: Path) -> bool:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return os.access(probe, os.W_OK)


def host_side(path: str, node: Path) -> Path:
    """Where a hostPath is on this "node": the path itself, or under ``node`` when the
    VM's read-only root cannot hold it."""
    real = Path(path)
    if real.is_dir() or _creatable(real):
        real.mkdir(parents=True, exist_ok=True)  # DirectoryOrCreate
        return real
    moved = node / path.lstrip("/")
    moved.mkdir(parents=True, exist_ok=True)
    return moved


@dataclass
class Container:
    proc: subprocess.Popen[bytes]
    log: Path
    bin_dir: Path  # the host side of the agent's cniBinDir
    env: dict[str, str]  # the container's environment, from the manifest

    def events(self) -> list[dict[str, Any]]:
        lines = self.log.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def pid(self) -> int:
        """The agent's pid in the VM's PID namespace (unshare's child)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return int(children.split()[0])

    def run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the container, as the agent runs, and wait for it."""
        return subprocess.run(
            ["nsenter", f"--target={self.pid()}", "--mount", "--pid", "--root", "--wd", "--",
             *confine(),
             "env", "-i", *(f"{k}={v}" for k, v in self.env.items()), *argv],
            capture_output=True, text=True, timeout=600, check=False,
        )


def confine() -> list[str]:
    """setpriv: only the capabilities the manifest adds, everything else dropped."""
    _, c = agent_spec()
    caps = c["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"]
    keep = ",".join(f"+{name.lower()}" for name in caps.get("add", []))
    return ["setpriv", f"--bounding-set=-all,{keep}", "--inh-caps=-all"]


def build_script(node: Path) -> tuple[str, dict[str, str], Path]:
    """The shell script that builds the container and execs the agent in it."""
    pod, c = agent_spec()
    assert pod["hostNetwork"] is True  # else the test would need a netns of its own
    assert c["securityContext"]["runAsUser"] == 0
    root = node / "root"
    root.mkdir()
    lines = ["set -eu", f"R={root}", "mount -t tmpfs -o mode=0755 image $R", *image_lines(),
             *mount_lines(pod, c, node)]
    lines.append("mount -t proc proc $R/proc")  # this PID namespace's (hostPID: false)
    if c["securityContext"].get("readOnlyRootFilesystem"):
        lines.append("mount -o remount,ro $R")
    # pivot_root where the VM's root allows it (not on an initramfs), else chroot.
    lines += ["cd $R", 'if pivot_root . .old 2>/dev/null; then umount -l /.old; CH=""; '
              'else CH="chroot $R"; fi']
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    env |= {"NODE_NAME": "vm", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/tmp"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    bin_dir = next(host_side(volumes[m["name"]]["hostPath"]["path"], node)
                   for m in c["volumeMounts"] if m["mountPath"] == env["CNI_NETKIT_CNI_BIN_DIR"])
    agent = [sys.executable, "-m", "cni_netkit.agent.server", "--socket", str(SOCKET),
             "--bin-dir", env["CNI_NETKIT_CNI_BIN_DIR"]]
    caps = " ".join(confine())
    envs = " ".join(f"{k}={v}" for k, v in env.items())
    lines.append(f"exec $CH {caps} env -i {envs} sh -c 'grep ^Cap /proc/self/status >&2; "
                 f"exec {' '.join(agent)}'")
    return "\n".join(lines), env, bin_dir


def image_lines() -> list[str]:
    """The "image": the VM's system, the interpreter and this worktree (the venv and the
    package), read-only."""
    lines = []
    for d in ("usr", "bin", "sbin", "lib", "lib64"):
        src = Path("/") / d
        if src.is_symlink():
            lines.append(f"ln -s {src.readlink()} $R/{d}")
        elif src.is_dir():
            lines += [f"mkdir -p $R/{d}", f"mount --rbind /{d} $R/{d}",
                      f"mount -o remount,bind,ro $R/{d}"]
    # The interpreter the venv is made from, wherever it lives (e.g. under /root/.pyenv).
    for d in sorted({str(REPO), sys.base_prefix}):
        lines += [f"mkdir -p $R{d}", f"mount --rbind {d} $R{d}", f"mount -o remount,bind,ro $R{d}"]
    lines.append("mkdir -p $R/etc $R/proc $R/dev $R/.old")
    for f in ("passwd", "group", "nsswitch.conf", "hosts", "ld.so.cache"):
        if Path("/etc", f).exists():
            lines.append(f"cp /etc/{f} $R/etc/{f}")
    lines.append("mount --rbind /dev $R/dev")
    return lines


def mount_lines(pod: dict[str, Any], c: dict[str, Any], node: Path) -> list[str]:
    """The manifest's volumeMounts, parents first (as the kubelet orders them)."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    lines = []
    for m in sorted(c["volumeMounts"], key=lambda m: m["mountPath"]):
        v, at = volumes[m["name"]], "$R" + m["mountPath"]
        lines.append(f"mkdir -p {at}")
        if "hostPath" in v:
            src = host_side(v["hostPath"]["path"], node)
            lines.append(f"mount --rbind {src} {at}")
            if m.get("readOnly"):
                lines.append(f"mount -o remount,bind,ro {at}")
            # HostToContainer: rslave (unshare made every mount a slave); else private.
            if m.get("mountPropagation") != "HostToContainer":
                lines.append(f"mount --make-rprivate {at}")
        elif "emptyDir" in v:
            size = v["emptyDir"].get("sizeLimit", "16Mi").replace("Mi", "m")
            lines.append(f"mount -t tmpfs -o size={size} empty {at}")
        elif "configMap" in v:
            src = node / "configmaps" / m["name"]
            src.mkdir(parents=True)
            for key, text in config_map_data(v["configMap"]["name"]).items():
                (src / key).write_text(text)
            lines += [f"mount --bind {src} {at}", f"mount -o remount,bind,ro {at}"]
        else:
            raise AssertionError(f"volume kind of {m['name']} not modelled: {sorted(v)}")
    return lines


@pytest.fixture
def shipped(tmp_path: Path, make_netns: Any) -> Iterator[Container]:
    pod, _ = agent_spec()
    node = tmp_path / "node"
    node.mkdir()
    make_netns()  # /run/netns is a shared mount from here on: new netns reach the container
    script, env, bin_dir = build_script(node)
    plugins = cni_plugins_dir()
    if plugins is None:
        pytest.fail("host-local missing: scripts/vm setup extracts containernetworking-plugins")
    shutil.copy2(Path(plugins) / "host-local", bin_dir / "host-local")
    ns = ["--mount", "--propagation", "slave", "--fork", "--kill-child"]
    if pod.get("hostPID") is not True:
        ns.append("--pid")
    log = tmp_path / "agent.log"
    SOCKET.unlink(missing_ok=True)
    with log.open("wb") as err:
        proc = subprocess.Popen(["unshare", *ns, "sh", "-c", script],
                                stdout=subprocess.DEVNULL, stderr=err)
    box = Container(proc, log, bin_dir, env)
    try:
        deadline = time.monotonic() + 300  # imports and warm-up take seconds in the VM
        while not SOCKET.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the agent did not start"
            time.sleep(0.1)
        yield box
    finally:
        if proc.poll() is None:
            # SIGTERM to the agent itself, the namespace's init (it handles SIGTERM: a
            # signal from outside reaches it): unshare leaves when it does.
            agent = box.pid()
            os.kill(agent, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.kill(agent, signal.SIGKILL)
                proc.wait(30)
        SOCKET.unlink(missing_ok=True)


def capabilities(log: Path) -> int:
    caps = dict(line.split(":\t") for line in log.read_text().splitlines()
                if line.startswith("Cap"))
    return int(caps["CapEff"], 16)


def addresses(network: str = "afxdp") -> set[str]:
    """host-local's allocations on the host, at its default dataDir."""
    d = Path("/var/lib/cni/networks") / network
    return {p.name for p in d.iterdir() if p.name[0].isdigit()} if d.is_dir() else set()


def test_the_agent_confined_as_shipped_serves_warm_and_reclaims_ipam(
    nic: Nic, make_netns: Any, shipped: Container, warm_agent: AgentProc
) -> None:
    _, c = agent_spec()
    want = sum(1 << CAP_BITS[n] for n in c["securityContext"]["capabilities"]["add"])
    assert capabilities(shipped.log) == want  # only what the manifest adds
    state = Path(shipped.env["CNI_NETKIT_STATE_DIR"])
    rt = Runtime(state_dir=state, cni_path=str(shipped.bin_dir), agent_env={})
    single = rt.conf(nic.name)
    del single["stateDir"]  # the default, the DaemonSet's state mount
    pair = {**single, "pairing": "pair", "mode": "l3",
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.83.0.0/24"}]]}}
    warm = Warm(rt)
    # ADD, CHECK, DEL of both kinds: warm, and the same replies as cold.
    for kind in (single, pair):
        same_replies_warm_and_cold(kind, warm, nic, make_netns())
    records_and_gc(pair, warm, nic, make_netns, shipped)
    # The agent's log has the plugin's own lines for what it served.
    events = shipped.events()
    assert {e.get("container_id") for e in events if e.get("event") == "leased"} >= {
        "cmp", "torn", "newer", "gced", "agentgc"}
    assert not [e for e in events if e.get("event") == "refused a CNI request"]
    assert warm.served == 2 * 3 + 4 + 2 + 1  # every request above but the cold ones
    # The figure (printed, not asserted: speed is the benchmarks' business), next to the
    # session's unconfined agent (the executable's own mount namespace), interleaved so
    # that both see the same load.
    times: dict[str, list[float]] = {"confined": [], "unconfined": []}
    unconfined = {"CNI_NETKIT_AGENT_SOCKET": str(warm_agent.socket)}
    netns = make_netns()
    for i in range(10):
        for which, env in (("confined", {}), ("unconfined", unconfined)):
            cid = f"{which[0]}{i}"
            started = time.monotonic()
            assert warm("ADD", single, container_id=cid, netns=netns, ifname=cid, env=env).code == 0
            times[which].append(time.monotonic() - started)
            assert warm("DEL", single, container_id=cid, netns=netns, ifname=cid, env=env).code == 0
    figures = ", ".join(
        f"{k} median {sorted(v)[5] * 1000:.0f} ms (min {min(v) * 1000:.0f}, max "
        f"{max(v) * 1000:.0f})" for k, v in times.items())
    print(f"\nwarm single ADD, n=10 each: {figures}; one cold ADD: {warm.cold_add * 1000:.0f} ms")


@dataclass
class Warm:
    """Runs a request that must be served by the agent (no fallback note on stderr)."""

    rt: Runtime
    served: int = 0
    cold_add: float = 0.0  # seconds, the last cold ADD's

    def __call__(self, command: str, conf: dict[str, Any], **kw: Any) -> Any:
        out = self.rt(command, conf, **kw)
        assert out.stderr == "", out.stderr  # no fallback note: the agent ran it
        self.served += 1
        return out


def same_replies_warm_and_cold(kind: dict[str, Any], warm: Warm, nic: Nic, netns: str) -> None:
    replies = {}
    # A fixed MAC where there is one (l2): then only the host side's of a pair is random.
    conf = kind if kind.get("mode") == "l3" else {
        **kind, "runtimeConfig": {"mac": "02:00:00:00:83:01"}}
    for path in ("warm", "cold"):
        extra = {"CNI_NETKIT_NO_AGENT": "1"} if path == "cold" else {}
        run = warm if path == "warm" else warm.rt
        started = time.monotonic()
        added = run("ADD", conf, container_id="cmp", netns=netns, env=extra)
        if path == "cold":
            warm.cold_add = time.monotonic() - started
        assert added.code == 0, added.stdout + added.stderr
        prev = {**conf, "prevResult": added.json}
        checked = run("CHECK", prev, container_id="cmp", netns=netns, env=extra)
        deleted = run("DEL", prev, container_id="cmp", netns=netns, env=extra)
        result = added.json
        for iface in result["interfaces"]:
            if "sandbox" not in iface and "mac" in iface:
                iface["mac"] = "host side: random"
        replies[path] = (added.code, result, checked.code, checked.stdout, deleted.code,
                         deleted.stdout)
        assert netkit_links(netns) == [] and leased_queues(nic) == {}
        assert addresses() == set()  # released on the host
        last = Path("/var/lib/cni/networks/afxdp/last_reserved_ip.0")
        last.unlink(missing_ok=True)  # the cold ADD gets the same address
    assert replies["warm"] == replies["cold"]


def records_and_gc(
    pair: dict[str, Any], warm: Warm, nic: Nic, make_netns: Any, shipped: Container
) -> None:
    store = StateStore(shipped.env["CNI_NETKIT_STATE_DIR"])
    # Records: a torn one and one of another version, through the agent.
    spaces = {cid: make_netns() for cid in ("torn", "newer", "gced", "agentgc")}
    for cid, netns in spaces.items():
        assert warm("ADD", pair, container_id=cid, netns=netns).code == 0
    assert len(addresses()) == 4
    store.path(Owner("afxdp", "torn", "net1")).write_text('{"container_id": "to')
    newer = store.path(Owner("afxdp", "newer", "net1"))
    newer.write_text(json.dumps({**json.loads(newer.read_text()), "schema": 99, "x": 1}))
    for cid in ("torn", "newer"):
        assert warm("DEL", pair, container_id=cid, netns=spaces[cid]).code == 0
    assert len(addresses()) == 2 and len(list((store.dir / "quarantine").iterdir())) == 1

    # The agent's own GC: the plugin's DEL run inside the container (host-local there too).
    released = shipped.run([sys.executable, "-c", (
        "import sys; from pathlib import Path; from cni_netkit.agent import main; "
        "from cni_netkit.kernel import Kernel; from cni_netkit.plugin.state import "
        "Owner, StateStore; s = StateStore(sys.argv[1]); "
        "a = s.load(Owner('afxdp', 'agentgc', 'net1')); k = Kernel(); "
        "main.release(a, k, state_dir=Path(sys.argv[1]), cni_path=Path(sys.argv[2]))"),
        str(store.root), shipped.env["CNI_NETKIT_CNI_BIN_DIR"]])
    assert released.returncode == 0, released.stdout + released.stderr
    assert netkit_links(spaces["agentgc"]) == [] and len(addresses()) == 1

    # The runtime's GC, relayed: host-local runs in the container, the host's file goes.
    gc = warm("GC", {**pair, "cni.dev/valid-attachments": []})
    assert gc.code == 0, gc.stdout
    assert addresses() == set() and leased_queues(nic) == {}
    assert all(netkit_links(ns) == [] for ns in spaces.values())
    assert list(store) == [] and store.corrupt() == []
