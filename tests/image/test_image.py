"""The built image, taken apart the way manifests/daemonset.yaml uses it.

Every container here is started from the DaemonSet's own pod spec
(``DaemonSetPod``): its command, env, security context (user, capabilities
dropped to the three it adds, read-only root filesystem, host network) and
volume mounts, each hostPath volume a directory under ``$CNI_NETKIT_IMAGE_OUT/host``
standing for the node's path (``/sys`` is the host's own, read-only, as in
the manifest), the ConfigMap a directory, the emptyDir a tmpfs. The agent
talks to the fake API server (tests/agent/fake_apiserver.py) under the
manifests' ClusterRole, since there is no cluster: the one addition to the
DaemonSet's command is ``--config`` naming that server (``kubeUrl``), and
``--once``.

What is checked here, on the host: the agent's install step copies the
artifact (thin client ``netkit``, ``netkit-plugin``, ``_internal/``) into
the mounted ``/host/opt/cni/bin``, byte for byte; a second start changes
nothing; the DaemonSet's health probe passes; the BPF object is at the path
``CNI_NETKIT_BPF_OBJECT`` names; ``cni-netkit agent --help`` and
``cni-netkit queues`` run in the container; the agent container serves the
node's ``netkit`` through the DaemonSet's socket mount (the warm path), with
the node's paths put where a node has them. ``scripts/test-image`` then runs
the installed files' ADD/CHECK/DEL in the VM (tests/e2e/test_artifact_e2e.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cni_netkit import __version__
from cni_netkit.agent.install import tree_hash
from tests.agent.fake_apiserver import FakeAPIServer
from tests.manifests.loader import find

IMAGE = os.environ.get("CNI_NETKIT_IMAGE", "")
# How this host's podman must run containers (scripts/build-image --print-run-options).
RUN_OPTS = [o for o in os.environ.get("CNI_NETKIT_IMAGE_RUN_OPTS", "").split("\n") if o]
NODE = "image-test-node"
ARTIFACT_IN_IMAGE = "/opt/cni-netkit/artifact"  # AgentConfig.artifact's default
AGENT_CONFIG_DIR = "/etc/cni-netkit-image-test"  # the one mount the DaemonSet lacks
EM_BPF = 247


@dataclass(frozen=True)
class DaemonSetPod:
    """``podman run`` argv for the DaemonSet's agent container on a pretend node."""

    host: Path  # the node's filesystem for hostPath volumes: host/<path>
    config_dir: Path  # mounted at AGENT_CONFIG_DIR

    @property
    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = find("DaemonSet", "daemonset.yaml")["spec"]["template"]["spec"]
        return spec

    @property
    def container(self) -> dict[str, Any]:
        agents: list[dict[str, Any]] = [c for c in self.spec["containers"] if c["name"] == "agent"]
        (agent,) = agents
        return agent

    def env(self) -> dict[str, str]:
        out = {}
        for e in self.container["env"]:
            if "value" in e:
                out[e["name"]] = e["value"]
            else:
                assert e["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}, e
                out[e["name"]] = NODE
        return out

    def host_path(self, path: str) -> Path:
        """Where the node's ``path`` is in this test: the real one only for ``/sys``."""
        return Path(path) if path == "/sys" else self.host / path.lstrip("/")

    def argv(self, *args: str, entrypoint: str | None = None) -> list[str]:
        c, spec = self.container, self.spec
        sc = c["securityContext"]
        argv = ["podman", "run", "--rm", *RUN_OPTS, "--user", str(sc["runAsUser"]),
                "--cap-drop", "all", *(f"--cap-add={cap}" for cap in sc["capabilities"]["add"])]
        if spec.get("hostNetwork"):
            argv += ["--network", "host"]
        if sc.get("readOnlyRootFilesystem"):
            argv.append("--read-only")
        for name, value in self.env().items():
            argv += ["--env", f"{name}={value}"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        for m in c["volumeMounts"]:
            v = volumes[m["name"]]
            if "emptyDir" in v:
                argv += ["--tmpfs", m["mountPath"]]
                continue
            if "hostPath" in v:
                src = self.host_path(v["hostPath"]["path"])
            else:
                src = self.host / "configmaps" / v["configMap"]["name"]
            src.mkdir(parents=True, exist_ok=True)
            argv += ["--volume", f"{src}:{m['mountPath']}:{'ro' if m.get('readOnly') else 'rw'}"]
        argv += ["--volume", f"{self.config_dir}:{AGENT_CONFIG_DIR}:ro"]
        command = list(c["command"])
        argv += ["--entrypoint", entrypoint or command[0], IMAGE]
        return argv + (list(args) if entrypoint else [*command[1:], *args])

    def run(self, *args: str, entrypoint: str | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args, entrypoint=entrypoint), capture_output=True,
                              text=True, timeout=timeout, check=False)


@dataclass(frozen=True)
class Installed:
    pod: DaemonSetPod
    api: FakeAPIServer
    first: subprocess.CompletedProcess[str]

    @property
    def bin_dir(self) -> Path:
        return self.pod.host_path("/opt/cni/bin")


def agent_once(pod: DaemonSetPod) -> subprocess.CompletedProcess[str]:
    return pod.run("--config", f"{AGENT_CONFIG_DIR}/agent.json", "--once")


def log_events(stderr: str) -> list[dict[str, Any]]:
    """The agent's JSON log lines (its container log)."""
    events = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    out = os.environ.get("CNI_NETKIT_IMAGE_OUT")
    root = Path(out) if out else tmp_path_factory.mktemp("image")
    host, config_dir = root / "host", root / "agent-config"
    assert not host.exists(), f"{host} exists: the test needs an empty node"
    config_dir.mkdir(parents=True)
    pod = DaemonSetPod(host, config_dir)
    # The pools ConfigMap: no pool on this node, so nothing touches the host's NICs.
    (configmap,) = [v["configMap"]["name"] for v in pod.spec["volumes"] if "configMap" in v]
    pools = pod.host / "configmaps" / configmap
    pools.mkdir(parents=True)
    (pools / "pools.json").write_text(json.dumps({"pools": [], "nodes": {}}))
    with FakeAPIServer(rbac_rules=find("ClusterRole")["rules"]) as api:
        api.add_node(NODE)
        (config_dir / "agent.json").write_text(json.dumps({"kubeUrl": api.url}))
        yield Installed(pod, api, agent_once(pod))


def test_the_agent_installs_netkit_and_its_plugin_into_the_hosts_cni_bin_dir(
    installed: Installed,
) -> None:
    first = installed.first
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout == ""
    link = installed.bin_dir / "netkit"
    target = str(link.readlink())
    assert re.fullmatch(rf"\.netkit-{re.escape(__version__)}-[0-9a-f]{{12}}/netkit", target)
    vdir = installed.bin_dir / (link.parent / target).parent.name
    assert sorted(p.name for p in vdir.iterdir()) == ["_internal", "netkit", "netkit-plugin"]
    assert {p.name for p in installed.bin_dir.iterdir()} == {".netkit.lock", vdir.name, "netkit"}
    # Byte for byte what the image holds, hashed inside the container by the image's own code.
    in_image = installed.pod.run(
        "-c", f"from pathlib import Path; from cni_netkit.agent.install import tree_hash; "
        f"print(tree_hash(Path({ARTIFACT_IN_IMAGE!r})))", entrypoint="python3")
    assert in_image.returncode == 0, in_image.stderr
    digest = in_image.stdout.strip()
    assert tree_hash(vdir) == digest
    assert vdir.name.endswith(digest[:12])
    (event,) = [e for e in log_events(first.stderr) if e.get("event") == "CNI executable in place"]
    assert event["changed"] is True


def test_the_agents_pass_reached_the_api_server_within_the_manifests_rbac(
    installed: Installed,
) -> None:
    assert installed.first.returncode == 0, installed.first.stderr
    seen = [(r.method, r.path, r.status) for r in installed.api.requests]
    assert ("GET", f"/api/v1/nodes/{NODE}", 200) in seen
    assert all(status < 400 for _, _, status in seen), seen
    probe = json.loads(installed.api.node(NODE)["metadata"]["annotations"]["netkit.cni.dev/probe"])
    assert probe["version"] == __version__
    assert probe["kernel"]["release"] == os.uname().release  # the node's kernel, seen from inside


def test_the_installed_client_runs_on_the_host_without_python_or_agent(
    installed: Installed,
) -> None:
    assert installed.first.returncode == 0, installed.first.stderr
    p = subprocess.run([str(installed.bin_dir / "netkit")], input='{"cniVersion": "1.0.0"}',
                       env={"CNI_COMMAND": "VERSION", "CNI_NETKIT_NO_AGENT": "1"},
                       capture_output=True, text=True, timeout=120, cwd="/", check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1.0.0" in json.loads(p.stdout)["supportedVersions"]


def test_the_health_probe_passes_after_a_pass(installed: Installed) -> None:
    assert installed.first.returncode == 0, installed.first.stderr
    (probe,) = {json.dumps(installed.pod.container[p]["exec"]["command"])
                for p in ("startupProbe", "livenessProbe", "readinessProbe")}
    command = json.loads(probe)
    health = installed.pod.run(*command[1:], entrypoint=command[0])
    assert (health.returncode, health.stdout.split(":")[0]) == (0, "ok"), health.stdout


def test_a_second_start_reinstalls_nothing(installed: Installed) -> None:
    assert installed.first.returncode == 0, installed.first.stderr
    before = {p.name: p.stat().st_ino for p in installed.bin_dir.iterdir()}
    again = agent_once(installed.pod)
    assert again.returncode == 0, again.stderr
    (event,) = [e for e in log_events(again.stderr) if e.get("event") == "CNI executable in place"]
    assert event["changed"] is False
    assert {p.name: p.stat().st_ino for p in installed.bin_dir.iterdir()} == before


def test_the_bpf_object_is_at_the_path_the_daemonset_names(installed: Installed) -> None:
    path = installed.pod.env()["CNI_NETKIT_BPF_OBJECT"]
    cat = subprocess.run([*installed.pod.argv(path, entrypoint="cat")], capture_output=True,
                         timeout=120, check=False)
    assert cat.returncode == 0, cat.stderr
    obj = cat.stdout
    assert obj[:4] == b"\x7fELF" and obj[4] == 2 and obj[5] == 1  # ELF64, little-endian
    assert int.from_bytes(obj[18:20], "little") == EM_BPF
    assert "xdp" in elf_section_names(obj)


def elf_section_names(obj: bytes) -> set[str]:
    shoff = int.from_bytes(obj[40:48], "little")
    shentsize, shnum, shstrndx = (int.from_bytes(obj[o:o + 2], "little") for o in (58, 60, 62))

    def header(i: int) -> tuple[int, int, int]:  # name offset, file offset, size
        h = obj[shoff + i * shentsize:shoff + (i + 1) * shentsize]
        return (int.from_bytes(h[0:4], "little"), int.from_bytes(h[24:32], "little"),
                int.from_bytes(h[32:40], "little"))

    _, stroff, strsize = header(shstrndx)
    strtab = obj[stroff:stroff + strsize]
    return {strtab[n:strtab.index(b"\0", n)].decode() for n, _, _ in map(header, range(shnum))}


def test_agent_help_runs_in_the_container(installed: Installed) -> None:
    helped = installed.pod.run("--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: cni-netkit agent")
    assert "{run,health,uninstall}" in helped.stdout


def test_queues_runs_in_the_container_and_sees_the_nodes_nic(installed: Installed) -> None:
    nic = default_route_interface()
    shown = installed.pod.run("queues", "--json", nic, entrypoint="cni-netkit")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    rows = json.loads(shown.stdout)
    rx = sorted(int(p.name.removeprefix("rx-"))
                for p in Path(f"/sys/class/net/{nic}/queues").glob("rx-*"))
    assert sorted(r["id"] for r in rows if r["type"] == "rx") == rx
    ifindex = int(Path(f"/sys/class/net/{nic}/ifindex").read_text())
    assert {r["ifindex"] for r in rows} == {ifindex}


def default_route_interface(routes: Sequence[str] | None = None) -> str:
    lines = routes if routes is not None else Path("/proc/net/route").read_text().splitlines()[1:]
    for line in lines:
        iface, dest = line.split()[:2]
        if dest == "00000000":
            return iface
    raise AssertionError("this host has no default route: no NIC to ask for its queues")


# --- the warm path: the node's `netkit` handing requests to the agent's container ----------


@dataclass(frozen=True)
class Serving:
    pod: DaemonSetPod
    name: str  # the agent container's

    def node_call(self, command: str, **env: str) -> subprocess.CompletedProcess[str]:
        """Run the node's ``/opt/cni/bin/netkit`` as kubelet would, on the pretend node.

        In a private mount namespace where each hostPath volume's directory
        sits at its node path (tmpfs over the nearest existing ancestor of
        a path this host lacks, so the host is not touched), so the agent's
        view check compares the same files a real node would.
        """
        script = ["set -eu"]
        paths = [v["hostPath"]["path"] for v in self.pod.spec["volumes"]
                 if "hostPath" in v and v["hostPath"]["path"] != "/sys"]
        tmpfs = set()
        for path in paths:
            if not Path(path).exists():
                tmpfs.add(str(next(p for p in Path(path).parents if p.exists())))
        script += [f"mount -t tmpfs tmpfs {p}" for p in sorted(tmpfs)]
        for path in paths:
            script += [f"mkdir -p {path}", f"mount --bind {self.pod.host_path(path)} {path}"]
        script.append('exec "$@"')
        # A plugin that cannot be exec'd: only the agent can answer.
        environ = {"CNI_COMMAND": command, "CNI_NETKIT_PLUGIN_EXE": "/nonexistent", **env}
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script),
             "sh", "/opt/cni/bin/netkit"],
            input=json.dumps({"cniVersion": "1.0.0", "name": "afxdp", "type": "netkit"}),
            env=environ, capture_output=True, text=True, timeout=120, cwd="/", check=False)


@pytest.fixture(scope="module")
def serving(installed: Installed) -> Iterator[Serving]:
    assert installed.first.returncode == 0, installed.first.stderr
    name = f"cni-netkit-image-test-{os.getpid()}"
    argv = installed.pod.argv("--config", f"{AGENT_CONFIG_DIR}/agent.json")
    argv[2:2] = ["--detach", "--name", name]
    started = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert started.returncode == 0, started.stderr
    sock = installed.pod.host_path("/run/cni-netkit") / "cni.sock"
    try:
        deadline = time.monotonic() + 120
        while not sock.exists():
            assert time.monotonic() < deadline, container_log(name)
            time.sleep(0.2)
        yield Serving(installed.pod, name)
    finally:
        subprocess.run(["podman", "stop", "--time", "10", name], capture_output=True,
                       timeout=60, check=False)


def container_log(name: str) -> str:
    p = subprocess.run(["podman", "logs", name], capture_output=True, text=True, timeout=60,
                       check=False)
    return p.stdout + p.stderr


def test_the_agent_in_its_container_serves_the_nodes_netkit(serving: Serving) -> None:
    served = serving.node_call("VERSION")
    why = served.stderr + container_log(serving.name)
    assert (served.returncode, served.stderr) == (0, ""), why
    assert "1.0.0" in json.loads(served.stdout)["supportedVersions"]


# kubelet and containerd pass CNI_PATH=/opt/cni/bin, which the agent's container sees only at
# /host/opt/cni/bin: without delegated IPAM the agent needs no CNI_PATH, and must serve it.
def test_the_agent_in_its_container_serves_a_call_with_kubelets_cni_path(serving: Serving) -> None:
    served = serving.node_call("VERSION", CNI_PATH="/opt/cni/bin")
    assert (served.returncode, served.stderr) == (0, ""), served.stderr
