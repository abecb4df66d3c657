"""The KubeVirt sidecar image (the Dockerfile's kubevirt-binding target), run as
virt-launcher runs a hook sidecar: its own user (107), a read-only root, no
capabilities, no network, the hooks emptyDir and the downward-API files mounted;
virt-launcher's calls come from the host through the socket in the mount."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from cni_netkit import __version__
from tests.kubevirt import shapes
from tests.kubevirt.test_server import Launcher
from tests.kubevirt.validate import assert_valid_domain

IMAGE = os.environ.get("CNI_NETKIT_KUBEVIRT_IMAGE", "")
RUN_OPTS = [o for o in os.environ.get("CNI_NETKIT_IMAGE_RUN_OPTS", "").split("\n") if o]
MAC = "02:00:00:00:00:20"


def test_the_image_is_the_package_versions_sidecar_without_the_agents_dependencies() -> None:
    assert IMAGE, "CNI_NETKIT_KUBEVIRT_IMAGE unset: scripts/test-image builds and names it"
    labels = json.loads(subprocess.run(
        ["podman", "image", "inspect", "--format", "{{json .Config}}", IMAGE],
        capture_output=True, text=True, check=True).stdout)
    assert labels["User"] == "107:107"
    assert labels["Entrypoint"] == ["cni-netkit", "kubevirt-binding"]
    assert labels["Labels"]["org.opencontainers.image.version"] == __version__
    probe = ("import importlib.util as u; print([m for m in ('kubernetes', 'pyroute2', "
             "'pydantic', 'grpc_tools') if u.find_spec(m)])")
    done = subprocess.run(["podman", "run", "--rm", *RUN_OPTS, "--network", "none",
                           "--entrypoint", "python3.11", IMAGE, "-c", probe],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_sidecar_container_serves_virt_launcher_until_shutdown() -> None:
    assert IMAGE, "CNI_NETKIT_KUBEVIRT_IMAGE unset: scripts/test-image builds and names it"
    root = Path(tempfile.mkdtemp(prefix="kv-img-"))
    name = f"kv-sidecar-{os.getpid()}"
    try:
        hooks, podinfo = root / "hooks", root / "podinfo"
        hooks.mkdir(mode=0o777)
        hooks.chmod(0o777)  # the emptyDir: writable by the sidecar's user
        podinfo.mkdir()
        leases = podinfo / "netkit-leases"
        leases.write_text(json.dumps([shapes.lease_entry("net1", mac=MAC)]))
        leases.chmod(0o644)
        subprocess.run(
            ["podman", "run", "-d", "--name", name, *RUN_OPTS, "--network", "none",
             "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
             "-v", f"{hooks}:/var/run/kubevirt-hooks", "-v", f"{podinfo}:/etc/podinfo:ro",
             IMAGE, "--leases", "/etc/podinfo/netkit-leases"],
            capture_output=True, text=True, check=True)
        deadline = time.monotonic() + 60
        while not (hooks / "netkit-afxdp.sock").exists():
            assert time.monotonic() < deadline, subprocess.run(
                ["podman", "logs", name], capture_output=True, text=True, check=False).stderr
            time.sleep(0.2)
        launcher = Launcher(str(hooks))
        ((_, info, version),) = launcher.collect()
        assert (info.name, version) == ("netkit-afxdp", "v1alpha3")
        out = launcher.on_define_domain(
            shapes.domain_xml(), shapes.vmi_json({"fast": MAC}, pod_interfaces={"fast": "net1"}))
        assert_valid_domain(out)
        assert b"af-xdp,id=netkit-fast,ifname=net1," in out
        launcher.shutdown()
        status = subprocess.run(["podman", "wait", name], capture_output=True, text=True,
                                check=True, timeout=60).stdout.strip()
        assert status == "0"
    finally:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True, check=False)
        shutil.rmtree(root)
