"""manifests/: schema-valid, consistent with each other and with the code that reads them."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from cni_netkit import __version__
from cni_netkit.agent.publish import (
    LEASES_ANNOTATION,
    capacity,
    is_extended_resource_name,
    leases_value,
    pools_for_node,
    resource_name,
)
from cni_netkit.config import NetConf
from cni_netkit.kubevirt.leases import DEFAULT_BINDING, LEASES_DIR
from cni_netkit.plugin.state import Attachment, LeasedQueue

from .loader import MANIFESTS, Doc, docs, find, validate

ALL = docs()
NAD, KUBEVIRT = "examples/nad.yaml", "examples/kubevirt.yaml"
AGENT_IMAGE = "ghcr.io/cni-netkit/cni-netkit:0.1.0"


# --- schema ---------------------------------------------------------------------------


@pytest.mark.parametrize("doc", ALL, ids=lambda d: d.id)
def test_manifest_validates_against_its_schema(doc: Doc) -> None:
    validate(doc.obj)


@pytest.mark.parametrize(
    "broken",
    [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "dta": {}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {}},  # no containers
        {
            "apiVersion": "k8s.cni.cncf.io/v1",
            "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": "x"},
            "spec": {"config": {"type": "netkit"}},
        },  # config must be a string
        {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance",
            "metadata": {"name": "x"},
            "spec": {
                "domain": {"devices": {"interfaces": [{"name": "a", "bindng": {"name": "b"}}]}}
            },
        },
        {"apiVersion": "example.com/v1", "kind": "Unknown", "metadata": {"name": "x"}},
    ],
    ids=["typo", "missing-required", "nad-config-object", "vmi-typo", "unknown-kind"],
)
def test_the_validation_catches_mistakes(broken: dict[str, Any]) -> None:
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.SchemaNotFoundError)):
        validate(broken)


def test_kustomization_installs_every_manifest_but_the_examples() -> None:
    kust = find("Kustomization")
    install = {
        str(p.relative_to(MANIFESTS))
        for p in MANIFESTS.glob("*.yaml")
        if p.name != "kustomization.yaml"
    }
    assert set(kust["resources"]) == install
    assert not any(r.startswith("examples") for r in kust["resources"])


# --- the install: consistent with itself ---------------------------------------------------


def agent_container() -> dict[str, Any]:
    (container,) = find("DaemonSet")["spec"]["template"]["spec"]["containers"]
    return container


def test_install_objects_live_in_the_namespace_and_name_each_other() -> None:
    ns = find("Namespace")["metadata"]["name"]
    sa, cm, ds = find("ServiceAccount"), find("ConfigMap"), find("DaemonSet")
    assert {o["metadata"]["namespace"] for o in (sa, cm, ds)} == {ns}
    binding = find("ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": ns}
    ]
    assert binding["roleRef"]["name"] == find("ClusterRole")["metadata"]["name"]
    pod = ds["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    cm_volumes = [v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v]
    assert cm_volumes == [cm["metadata"]["name"]]


def test_namespace_admits_the_agent_under_pod_security() -> None:
    labels = find("Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"


def test_daemonset_selector_matches_its_pods() -> None:
    # An API rule the schema does not express.
    ds = find("DaemonSet")
    selector = ds["spec"]["selector"]["matchLabels"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()


def test_daemonset_scheduling_and_updates() -> None:
    spec = find("DaemonSet")["spec"]
    pod = spec["template"]["spec"]
    assert spec["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["hostNetwork"] is True and pod["hostPID"] is False
    assert pod["nodeSelector"]["kubernetes.io/os"] == "linux"
    assert {"operator": "Exists"} in pod["tolerations"]


def test_grace_period_outlasts_the_agents_wait_for_requests_in_flight() -> None:
    from cni_netkit.agent import server  # noqa: PLC0415

    pod = find("DaemonSet")["spec"]["template"]["spec"]
    # close() waits CLOSE_TIMEOUT for committed requests; the kubelet SIGKILLs at the grace.
    assert pod["terminationGracePeriodSeconds"] >= server.CLOSE_TIMEOUT + 10


def test_agent_container_runs_the_agent_with_its_node_name() -> None:
    c = agent_container()
    assert c["image"] == AGENT_IMAGE
    assert c["command"] == ["cni-netkit", "agent"]
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["exec"]["command"] == ["cni-netkit", "agent", "health"]
    assert {"cpu", "memory"} <= c["resources"]["requests"].keys()
    assert "memory" in c["resources"]["limits"]


def test_agent_has_only_the_capabilities_it_justifies() -> None:
    sc = agent_container()["securityContext"]
    assert sc["privileged"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    added = sc["capabilities"]["add"]
    # CHOWN: the plugin, run by the agent, gives xskMapOwner its attachment's pin.
    assert sorted(added) == ["BPF", "CHOWN", "NET_ADMIN", "SYS_ADMIN"]
    # The API refuses allowPrivilegeEscalation: false together with SYS_ADMIN.
    assert not ("SYS_ADMIN" in added and sc.get("allowPrivilegeEscalation") is False)
    # Each added capability has its reason in a comment right above it.
    lines = (MANIFESTS / "daemonset.yaml").read_text().splitlines()
    for cap in added:
        (i,) = [n for n, line in enumerate(lines) if line.strip() == f"- {cap}"]
        assert lines[i - 1].strip().startswith("#"), f"{cap} has no comment saying why"


def test_agent_mounts_the_host_paths_it_needs() -> None:
    c = agent_container()
    pod = find("DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts.keys() == volumes.keys()  # every volume mounted, every mount backed
    host = {v["hostPath"]["path"]: mounts[name] for name, v in volumes.items() if "hostPath" in v}
    assert {
        "/opt/cni/bin",
        "/etc/cni/net.d",
        "/var/run/netns",
        "/var/lib/cni/netkit",
        "/run/cni-netkit",
        "/sys",
        "/var/lib/cni/networks",
    } <= host.keys()
    # Paths the plugin writes into records (netns, state) are seen at the same place; so is
    # host-local's data dir, which the agent's GC releases addresses in (issue 11, item 2).
    for same in ("/var/run/netns", "/var/lib/cni/netkit", "/run/cni-netkit",
                 "/var/lib/cni/networks"):
        assert host[same]["mountPath"] == same
    # The installer (cni_netkit/agent/install.py) sees the bin dir at /host/opt/cni/bin.
    assert host["/opt/cni/bin"]["mountPath"] == "/host/opt/cni/bin"
    assert host["/var/run/netns"]["mountPropagation"] == "HostToContainer"
    assert host["/etc/cni/net.d"].get("readOnly") is True
    assert host["/sys"].get("readOnly") is True


# --- pools, NAD and the resource name ---------------------------------------------------------


def pools_document() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(find("ConfigMap")["data"]["pools.json"])
    return doc


def nad_plugin() -> dict[str, Any]:
    conf = json.loads(find("NetworkAttachmentDefinition", NAD)["spec"]["config"])
    (plugin,) = conf["plugins"]
    # What libcni hands the plugin from a conflist: name and version injected.
    return {"cniVersion": conf["cniVersion"], "name": conf["name"], **plugin}


def test_pool_config_parses_for_default_and_overridden_nodes() -> None:
    doc = pools_document()
    (default,) = pools_for_node(doc, "any-node")
    assert default.master == "ens1f0np0" and default.resource == "netkit.cni.dev/ens1f0np0"
    assert capacity(default) == 8
    for node in doc["nodes"]:
        assert pools_for_node(doc, node) != (default,)


def test_nad_config_is_one_the_plugin_accepts() -> None:
    conf = NetConf.model_validate(nad_plugin())
    assert conf.type == "netkit" and conf.pairing == "single"
    assert conf.capabilities == {"mac": True, "CNIDeviceInfoFile": True}


def test_nad_resource_name_and_pool_agree_with_the_agent_config() -> None:
    nad = find("NetworkAttachmentDefinition", NAD)
    conf = NetConf.model_validate(nad_plugin())
    (pool,) = [p for p in pools_for_node(pools_document(), "any-node") if p.master == conf.master]
    annotated = nad["metadata"]["annotations"]["k8s.v1.cni.cncf.io/resourceName"]
    assert annotated == pool.resource == resource_name(conf.master)
    assert tuple(conf.queues) == pool.queues
    assert conf.queues_per_attachment == pool.queues_per_attachment


# --- the QEMU pod: the annotation reaches QEMU ------------------------------------------------


def qemu_pod() -> dict[str, Any]:
    return find("Pod", "examples/qemu-pod.yaml")


def test_qemu_pod_requests_the_pool_and_reads_the_annotation_from_a_volume() -> None:
    pod = qemu_pod()
    (c,) = pod["spec"]["containers"]
    nad = find("NetworkAttachmentDefinition", NAD)
    resource = nad["metadata"]["annotations"]["k8s.v1.cni.cncf.io/resourceName"]
    assert is_extended_resource_name(resource)
    assert c["resources"]["limits"][resource] == "1"
    (selection,) = json.loads(pod["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"])
    assert selection["name"] == nad["metadata"]["name"]
    (dapi,) = [v["downwardAPI"] for v in pod["spec"]["volumes"] if "downwardAPI" in v]
    assert (
        dapi["items"][0]["fieldRef"]["fieldPath"] == f"metadata.annotations['{LEASES_ANNOTATION}']"
    )
    # Not an env var: that would be fixed before the agent writes the annotation.
    assert "annotations" not in json.dumps(c.get("env", []))


def run_qemu_entrypoint(tmp_path: Path, leases: str) -> subprocess.CompletedProcess[str]:
    """The pod's script, with stand-ins for qemu and sleep, on a leases file we write."""
    (c,) = qemu_pod()["spec"]["containers"]
    script = c["args"][0].replace("/etc/netkit/leases", str(tmp_path / "leases"))
    (tmp_path / "leases").write_text(leases)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (
        ("qemu-system-x86_64", 'for a in "$@"; do echo "ARG $a"; done'),
        ("sleep", ":"),
    ):
        stub = bin_dir / name
        stub.write_text(f"#!/bin/sh\n{body}\n")
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run(
        [*c["command"], script], env=env, capture_output=True, text=True, timeout=60, check=False
    )


# The example pod's entrypoint runs jq: its image has it, and scripts/bootstrap installs it
# here (scripts/host-packages.list), so these tests run on every machine rather than skip.
def test_qemu_pod_passes_the_published_lease_to_qemu(tmp_path: Path) -> None:
    conf = NetConf.model_validate(nad_plugin())
    key = "netkit-ens1f0np0:c1:net1"
    att = Attachment(
        container_id="c1",
        ifname="net1",
        netns="/var/run/netns/x",
        network="netkit-ens1f0np0",
        master="ens1f0np0",
        pairing="single",
        mode="l2",
        mac="02:00:00:00:00:10",
        mtu=None,
        queues=(LeasedQueue(1, 12),),
        pod_namespace="default",
        pod_name="qemu-afxdp",
        extra={
            "map_path": f"/sys/fs/bpf/cni-netkit/pods/default/qemu-afxdp/{key}",
            # What ADD records when it delivers the map into the pod's volume (afxdp._deliver).
            "pod_map_path": f"{conf.xsk_map_mount_path}/cni-netkit/{key}",
            "map_start_index": 1,
        },
    )
    other = Attachment(**{**att.__dict__, "ifname": "net2", "extra": {}})
    value = leases_value([other, att])
    assert value is not None
    done = run_qemu_entrypoint(tmp_path, value)
    assert done.returncode == 0, done.stderr
    args = [
        line.removeprefix("ARG ") for line in done.stdout.splitlines() if line.startswith("ARG ")
    ]
    netdev = args[args.index("-netdev") + 1]
    # Verbatim: the map as this pod mounts it, its emptyDir at the NAD's xskMapMountPath.
    assert netdev == (
        "af-xdp,id=net0,ifname=net1,mode=native,queues=1,start-queue=1,inhibit=on,"
        f"map-path=/var/run/kubevirt-private/cni-netkit/{key},map-start-index=1"
    )
    assert re.search(r"mac=02:00:00:00:00:10", " ".join(args))


def test_qemu_pod_gets_its_map_through_its_own_empty_dir_without_host_paths() -> None:
    conf = NetConf.model_validate(nad_plugin())
    spec = qemu_pod()["spec"]
    (c,) = spec["containers"]
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == conf.xsk_map_mount_path]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert mount["name"] == conf.xsk_map_volume and volume == {"name": mount["name"],
                                                               "emptyDir": {}}
    assert not [v for v in spec["volumes"] if "hostPath" in v]
    assert "BPF" not in c["securityContext"]["capabilities"]["add"]
    assert conf.map_owner == (107, 107)  # KubeVirt's qemu user


def test_qemu_pod_refuses_a_lease_without_an_xsk_map(tmp_path: Path) -> None:
    att = Attachment(
        container_id="c1", ifname="net1", netns="/var/run/netns/x", network="n",
        master="ens1f0np0", pairing="single", mode="l2", mac=None, mtu=None,
        queues=(LeasedQueue(1, 12),),
    )
    done = run_qemu_entrypoint(tmp_path, leases_value([att]) or "")
    assert done.returncode == 1
    assert "net1 has no XSK map" in done.stderr
    assert "ARG" not in done.stdout


def test_qemu_pod_gives_up_clearly_without_a_lease(tmp_path: Path) -> None:
    done = run_qemu_entrypoint(tmp_path, "")  # the annotation never came
    assert done.returncode == 1
    assert "no netkit lease for net1" in done.stderr
    assert "ARG" not in done.stdout


# --- KubeVirt -----------------------------------------------------------------------------


def test_kubevirt_vmi_uses_the_registered_binding_on_the_nad() -> None:
    kv, vmi = find("KubeVirt"), find("VirtualMachineInstance")
    registered = kv["spec"]["configuration"]["network"]["binding"]
    interfaces = {i["name"]: i for i in vmi["spec"]["domain"]["devices"]["interfaces"]}
    networks = {n["name"]: n for n in vmi["spec"]["networks"]}
    assert interfaces.keys() == networks.keys()
    (fast,) = [i for i in interfaces.values() if "binding" in i]
    assert fast["binding"]["name"] in registered
    nad = find("NetworkAttachmentDefinition", KUBEVIRT)
    meta = nad["metadata"]
    assert networks[fast["name"]]["multus"]["networkName"] == f"{meta['namespace']}/{meta['name']}"
    assert registered[fast["binding"]["name"]]["downwardAPI"] == "device-info"


def test_the_kubevirt_nad_delivers_map_and_lease_where_qemu_and_the_sidecar_look() -> None:
    nad = find("NetworkAttachmentDefinition", KUBEVIRT)
    conf = json.loads(nad["spec"]["config"])
    (plugin,) = conf["plugins"]
    net = NetConf.model_validate({"cniVersion": conf["cniVersion"], "name": conf["name"],
                                  **plugin})
    # The launcher pod's hooks emptyDir: whole in the compute container (QEMU) and
    # hook-sidecar-0 of it in the first hook sidecar, both at the sidecar's leases dir.
    assert (net.xsk_map_volume, net.xsk_map_subdir) == ("hook-sidecar-sockets", "hook-sidecar-0")
    assert net.xsk_map_mount_path == LEASES_DIR
    assert net.xsk_map_owner == "107:107" and net.queues_per_attachment == 1
    plain = NetConf.model_validate(nad_plugin())  # the same pool as nad.yaml's
    assert (net.master, net.queues) == (plain.master, plain.queues)
    assert (nad["metadata"]["annotations"]["k8s.v1.cni.cncf.io/resourceName"]
            == resource_name(net.master))


def test_the_documented_annotation_example_is_what_the_agent_writes() -> None:
    text = (MANIFESTS.parent / "docs" / "kubernetes.md").read_text()
    (example,) = re.findall(r"```json\n(\[\{.*?\}\])\n```", text, flags=re.S)
    att = Attachment(
        container_id="c1",
        ifname="net1",
        netns="/var/run/netns/x",
        network="netkit-ens1f0np0",
        master="ens1f0np0",
        pairing="single",
        mode="l2",
        mac="02:00:00:00:00:10",
        mtu=None,
        queues=(LeasedQueue(1, 12),),
        pod_namespace="default",
        pod_name="p",
        extra={"map_path": "/sys/fs/bpf/cni-netkit/pods/default/p/netkit-ens1f0np0:c1:net1",
               "map_start_index": 1},
    )
    assert json.loads(example) == json.loads(leases_value([att]) or "")


def test_kubevirt_binding_registers_our_sidecar_image_at_the_package_version() -> None:
    kv, vmi = find("KubeVirt"), find("VirtualMachineInstance")
    binding = kv["spec"]["configuration"]["network"]["binding"]["netkit-afxdp"]
    assert binding["sidecarImage"] == f"ghcr.io/cni-netkit/kubevirt-netkit-binding:{__version__}"
    # Not declared migratable, and a drain stops the VM rather than migrate it.
    assert "migration" not in binding
    assert vmi["spec"]["evictionStrategy"] == "None"
    # The sidecar's default binding name is the one registered.
    assert DEFAULT_BINDING in kv["spec"]["configuration"]["network"]["binding"]
    # The Dockerfile builds that image's target.
    assert "AS kubevirt-binding\n" in (MANIFESTS.parent / "Dockerfile").read_text()
