"""The sidecar over a real unix socket, called the way virt-launcher calls it.

The client is built from the same ``.proto`` files by protoc (``protoc.py``)
and follows kubevirt's pkg/hooks manager: list the hooks directory, ``Info``
on each socket (1 s deadline), take the newest Callbacks version both know,
``OnDefineDomain`` with the domain XML and the VMI JSON (1 min deadline).
"""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from cni_netkit.kubevirt import server
from tests.kubevirt import protoc, shapes
from tests.kubevirt.validate import assert_valid_domain

REPO = Path(__file__).resolve().parents[2]
MAC, MAC2 = "02:00:00:00:00:20", "02:00:00:00:00:21"
KNOWN_VERSIONS = ("v1alpha3", "v1alpha2")  # what a current virt-launcher knows, newest first


class Launcher:
    """virt-launcher's side of the hooks API."""

    def __init__(self, hooks_dir: str) -> None:
        self.hooks_dir = hooks_dir
        self.info_pb = protoc.module("info")

    def _call(self, socket: str, method: str, request: Any, response: Any,
              timeout: float) -> Any:
        with grpc.insecure_channel(f"unix:{socket}") as channel:
            stub = channel.unary_unary(method, request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=response.FromString)
            return stub(request, timeout=timeout)

    def collect(self) -> list[tuple[str, Any, str]]:
        """(socket, Info result, negotiated version) of every socket in the hooks dir."""
        out = []
        for path in sorted(Path(self.hooks_dir).iterdir()):
            # virt-launcher dials every entry; one that is no socket (the plugin's lease
            # file, its bpffs directory) fails to dial, counts as "not ready" and is
            # retried only until the requested sidecars answered.
            if not stat.S_ISSOCK(path.lstat().st_mode):
                continue
            socket = str(path)
            info = self._call(socket, "/kubevirt.hooks.info.Info/Info",
                              self.info_pb.InfoParams(), self.info_pb.InfoResult, timeout=1)
            version = next(v for v in KNOWN_VERSIONS if v in info.versions)
            out.append((socket, info, version))
        return out

    def on_define_domain(self, domain_xml: bytes, vmi: bytes, version: str | None = None) -> bytes:
        ((socket, _, negotiated),) = self.collect()
        version = version or negotiated
        pb = protoc.module(version)
        result = self._call(socket, f"/kubevirt.hooks.{version}.Callbacks/OnDefineDomain",
                            pb.OnDefineDomainParams(domainXML=domain_xml, vmi=vmi),
                            pb.OnDefineDomainResult, timeout=60)
        return bytes(result.domainXML)

    def shutdown(self) -> None:
        ((socket, _, _),) = self.collect()
        pb = protoc.module("v1alpha3")
        self._call(socket, "/kubevirt.hooks.v1alpha3.Callbacks/Shutdown", pb.ShutdownParams(),
                   pb.ShutdownResult, timeout=5)


@dataclass
class Sidecar:
    hooks_dir: str
    leases: Path
    hooks: server.Hooks
    launcher: Launcher

    def annotate(self, *entries: dict[str, Any]) -> None:
        self.leases.write_text(json.dumps(list(entries)))


def serve_sidecar(**settings: Any) -> Iterator[Sidecar]:
    # Short: a unix socket path must fit sun_path (108 bytes).
    root = Path(tempfile.mkdtemp(prefix="kv-"))
    hooks_dir = str(root / "hooks")
    leases_file = root / "leases"
    leases_file.write_text("")
    settings = server.Settings(network_info=str(root / "network-info"),
                               leases=str(leases_file), leases_dir=hooks_dir, wait=1.0,
                               **settings)
    grpc_server, hooks = server.serve(settings, hooks_dir)
    try:
        yield Sidecar(hooks_dir, leases_file, hooks, Launcher(hooks_dir))
    finally:
        grpc_server.stop(grace=None).wait()
        shutil.rmtree(root)


@pytest.fixture
def sidecar() -> Iterator[Sidecar]:
    yield from serve_sidecar()


@pytest.fixture
def mq_sidecar() -> Iterator[Sidecar]:
    """A sidecar started with ``--qemu-multiqueue``."""
    yield from serve_sidecar(qemu_multiqueue=True)


def qemu_args(xml: bytes) -> list[str]:
    return [v.decode() for v in re.findall(rb'<qemu:arg value="([^"]*)"', xml)]


def test_info_names_the_binding_its_versions_and_its_hook_point(sidecar: Sidecar) -> None:
    ((socket, info, version),) = sidecar.launcher.collect()
    assert socket.endswith("/netkit-afxdp.sock")
    assert info.name == "netkit-afxdp"
    assert list(info.versions) == ["v1alpha3", "v1alpha2"]
    assert [(h.name, h.priority) for h in info.hookPoints] == [("OnDefineDomain", 0)]
    assert version == "v1alpha3"


@pytest.mark.parametrize("version", ["v1alpha2", "v1alpha3"])
def test_masquerade_primary_and_our_secondary_with_one_queue(sidecar: Sidecar,
                                                             version: str) -> None:
    sidecar.annotate(shapes.lease_entry("net1", mac=MAC))
    out = sidecar.launcher.on_define_domain(
        shapes.domain_xml(), shapes.vmi_json({"fast": MAC}, pod_interfaces={"fast": "net1"}),
        version)
    assert_valid_domain(out)
    assert qemu_args(out) == [
        "-netdev", "af-xdp,id=netkit-fast," + shapes.lease_entry("net1", mac=MAC)["qemuNetdev"],
        "-device", f"virtio-net-pci,netdev=netkit-fast,id=netkit-fast-nic,mac={MAC},"
                   "bus=pcie.0,addr=0x18",
    ]
    assert b'<alias name="ua-default" />' in out  # the masquerade primary stays


@pytest.mark.parametrize("version", ["v1alpha2", "v1alpha3"])
def test_two_queues_by_the_hashed_pod_interface_name(mq_sidecar: Sidecar, version: str) -> None:
    sidecar = mq_sidecar
    pod_if = "pod115dc3606fb"  # KubeVirt's hashed name of network "fast"
    sidecar.annotate(shapes.lease_entry(pod_if, mac=MAC, queues=2))
    out = sidecar.launcher.on_define_domain(shapes.domain_xml(),
                                            shapes.vmi_json({"fast": MAC}), version)
    assert_valid_domain(out)
    netdev, device = qemu_args(out)[1], qemu_args(out)[3]
    assert netdev.startswith(f"af-xdp,id=netkit-fast,ifname={pod_if},mode=native,queues=2,")
    assert device.endswith(",mq=on,vectors=6")


@pytest.mark.parametrize("version", ["v1alpha2", "v1alpha3"])
def test_two_bound_interfaces(mq_sidecar: Sidecar, version: str) -> None:
    sidecar = mq_sidecar
    sidecar.annotate(shapes.lease_entry("net1", mac=MAC),
                     shapes.lease_entry("net2", mac=MAC2, queues=2, network="netkit-fast2",
                                        first_master_queue=20))
    vmi = shapes.vmi_json({"fast": MAC, "fast2": MAC2},
                          pod_interfaces={"fast": "net1", "fast2": "net2"})
    out = sidecar.launcher.on_define_domain(
        shapes.domain_xml(kubevirt_iface_for=("fast",)), vmi, version)
    assert_valid_domain(out)
    args = qemu_args(out)
    assert [a.split(",")[1] for a in args[1::2]] == [
        "id=netkit-fast", "netdev=netkit-fast", "id=netkit-fast2", "netdev=netkit-fast2"]
    assert ",addr=0x18" in args[3] and ",addr=0x17,mq=on,vectors=6" in args[7]
    assert b"ua-fast\"" not in out


def test_a_two_queue_lease_is_refused_without_qemu_multiqueue(sidecar: Sidecar) -> None:
    """QEMU's af-xdp netdev reads only its last queue (test_qemu_consumer): by default a
    lease of two queues is an error the VM owner sees, not a VM that loses half its frames."""
    sidecar.annotate(shapes.lease_entry("net1", mac=MAC, queues=2))
    with pytest.raises(grpc.RpcError) as err:
        sidecar.launcher.on_define_domain(
            shapes.domain_xml(), shapes.vmi_json({"fast": MAC}, pod_interfaces={"fast": "net1"}))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details().startswith(
        "cni-netkit: interface fast: its lease has 2 queues, but QEMU's af-xdp netdev reads "
        "only the last of its queues")
    assert "queuesPerAttachment: 1" in err.value.details()


def test_a_vmi_without_our_binding_gets_its_domain_back_unchanged(sidecar: Sidecar) -> None:
    source = shapes.domain_xml()
    assert sidecar.launcher.on_define_domain(source, shapes.vmi_json({})) == source


def test_a_missing_lease_is_an_error_virt_launcher_shows(sidecar: Sidecar) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        sidecar.launcher.on_define_domain(
            shapes.domain_xml(), shapes.vmi_json({"fast": MAC}, pod_interfaces={"fast": "net1"}))
    assert time.monotonic() - started >= 1.0  # the bounded wait (1 s here, 40 s by default)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details().startswith(
        "cni-netkit: no netkit lease for interface fast (pod interface net1) after 1s")


def test_shutdown_stops_the_sidecar(sidecar: Sidecar) -> None:
    sidecar.launcher.shutdown()
    assert sidecar.hooks.shutdown.is_set()


def test_the_entry_point_serves_until_shutdown_and_exits_0() -> None:
    root = Path(tempfile.mkdtemp(prefix="kv-"))
    try:
        (root / "leases").write_text(json.dumps([shapes.lease_entry("net1", mac=MAC)]))
        proc = subprocess.Popen(
            [str(REPO / ".venv" / "bin" / "cni-netkit"), "kubevirt-binding",
             "--hooks-dir", str(root / "hooks"), "--network-info", "", "--leases-dir", "",
             "--leases", str(root / "leases"), "--map-dir", "/var/run/netkit/xsk"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            socket = root / "hooks" / "netkit-afxdp.sock"
            deadline = time.monotonic() + 30
            while not socket.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            launcher = Launcher(str(root / "hooks"))
            out = launcher.on_define_domain(
                shapes.domain_xml(),
                shapes.vmi_json({"fast": MAC}, pod_interfaces={"fast": "net1"}))
            assert_valid_domain(out)
            assert ",map-path=/var/run/netkit/xsk/netkit-fast:c1:net1," in qemu_args(out)[1]
            launcher.shutdown()
            stdout, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0, stderr
        assert stdout == ""  # logs are JSON lines on stderr only
        events = [json.loads(line)["event"] for line in stderr.splitlines()]
        assert events == ["serving KubeVirt hooks", "domain rewritten",
                          "Shutdown received: exiting"]
    finally:
        shutil.rmtree(root)


def test_other_subcommands_never_load_grpc() -> None:
    code = ("import sys; from cni_netkit import cli; cli.parser_for(['leases']); "
            "cli.parser_for(['agent']); "
            "assert not {m for m in sys.modules if m.split('.')[0] in ('grpc', 'google')}, "
            "sorted(m for m in sys.modules if m.startswith(('grpc', 'google')))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_the_lease_file_beside_the_socket_gives_the_nic(sidecar: Sidecar) -> None:
    # As in a launcher pod: the plugin's file sits in the sidecar's hooks directory
    # (hook-sidecar-0 of the volume), beside the sidecar's socket.
    shapes.write_plugin_lease_file(Path(sidecar.hooks_dir), "net1", mac=MAC)
    assert len(sidecar.launcher.collect()) == 1
    out = sidecar.launcher.on_define_domain(
        shapes.domain_xml(), shapes.vmi_json({"fast": MAC}, pod_interfaces={"fast": "net1"}))
    assert_valid_domain(out)
    assert ",map-path=/var/run/kubevirt-hooks/hook-sidecar-0/cni-netkit/netkit-fast:c1:net1," \
        in qemu_args(out)[1]


def test_the_leases_dir_defaults_to_the_hooks_dir_and_follows_its_env(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse  # noqa: PLC0415

    from cni_netkit.kubevirt import main  # noqa: PLC0415

    def parsed(*argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        main.add_arguments(parser)
        return parser.parse_args(list(argv))

    assert parsed().leases_dir == "/var/run/kubevirt-hooks" == server.HOOKS_DIR
    monkeypatch.setenv("CNI_NETKIT_LEASES_DIR", "/elsewhere")
    assert parsed().leases_dir == "/elsewhere"
    assert parsed("--leases-dir", "").leases_dir == ""
