"""The hook sidecar's gRPC server, as virt-launcher calls it (kubevirt pkg/hooks).

virt-launcher lists ``/var/run/kubevirt-hooks/``, calls ``Info`` on every
socket there (1 s deadline), picks the newest Callbacks version both sides
know, and then, before it defines the domain, calls ``OnDefineDomain`` with
the domain XML and the VMI as JSON (1 min deadline) and defines the XML we
return. v1alpha3 adds ``Shutdown``, sent when the VMI's domain is gone: the
server stops and ``cni-netkit kubevirt-binding`` exits 0, so the sidecar
container ends with the VM.

A failure is a gRPC error whose message says what the VM owner must fix:
virt-launcher logs it and fails the domain sync, which the VMI's
``Synchronized`` condition then shows.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from cni_netkit import logs
from cni_netkit.kubevirt import api, domain, leases

HOOKS_DIR = leases.LEASES_DIR  # where virt-launcher finds our socket, and the lease files


@dataclass(frozen=True)
class Settings:
    """What the sidecar serves and where it reads leases (``cni-netkit kubevirt-binding``)."""

    binding: str = leases.DEFAULT_BINDING
    network_info: str | None = leases.NETWORK_INFO
    leases: str | None = None
    leases_dir: str | None = HOOKS_DIR
    wait: float = 40.0  # below virt-launcher's 1 min deadline, so our message is the one seen
    map_dir: str | None = None
    # Hand a multi-queue lease to QEMU as one ``queues=N`` netdev: only for a QEMU whose
    # af-xdp netdev reads every queue (see define_domain).
    qemu_multiqueue: bool = False

    def socket_path(self, hooks_dir: str) -> str:
        return str(Path(hooks_dir) / f"{self.binding}.sock")


class Hooks:
    """The RPC handlers: pure request -> response, plus the shutdown event."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.shutdown = threading.Event()

    def info(self, _: Any, __: grpc.ServicerContext) -> Any:
        result = api.message("info", "InfoResult")(name=self.settings.binding,
                                                   versions=list(api.VERSIONS))
        result.hookPoints.add(name=api.ON_DEFINE_DOMAIN, priority=0)
        return result

    def on_define_domain(self, version: str) -> Callable[[Any, grpc.ServicerContext], Any]:
        result_class = api.message(version, "OnDefineDomainResult")

        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            log = logs.get_logger().bind(hook=api.ON_DEFINE_DOMAIN, version=version)
            try:
                xml = define_domain(request.domainXML, request.vmi, self.settings)
            except (leases.LeaseError, domain.DomainError) as e:
                log.error("cannot add the netkit NICs", error=str(e))
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cni-netkit: {e}")
            log.info("domain rewritten", bytes_in=len(request.domainXML), bytes_out=len(xml))
            return result_class(domainXML=xml)

        return handle

    def on_shutdown(self, _: Any, __: grpc.ServicerContext) -> Any:
        logs.get_logger().info("Shutdown received: exiting")
        self.shutdown.set()
        return api.message("v1alpha3", "ShutdownResult")()


def define_domain(domain_xml: bytes, vmi_json: bytes, settings: Settings) -> bytes:
    """The OnDefineDomain decision: the domain with every bound interface's NIC."""
    try:
        vmi = json.loads(vmi_json)
    except ValueError as e:
        raise leases.LeaseError(f"the VMI JSON does not parse: {e}") from e
    ifaces = leases.bound_interfaces(vmi, settings.binding)
    if not ifaces:
        return domain_xml  # a VMI without our binding: nothing to do
    nics = leases.wait_for_leases(ifaces, network_info=settings.network_info,
                                  leases=settings.leases, leases_dir=settings.leases_dir,
                                  timeout=settings.wait)
    multi = [nic for nic in nics if nic.queues > 1]
    if multi and not settings.qemu_multiqueue:
        # QEMU's af-xdp netdev (10.2, net/af-xdp.c) turns its read handler on once, after
        # its per-queue loop, for the last queue (with inhibit=on), and nothing turns the
        # others' on: the guest would get only the last leased queue's frames, silently.
        # Measured in tests/e2e/test_qemu_consumer.py. Refuse rather than start such a VM.
        raise leases.LeaseError(
            f"interface {multi[0].name}: its lease has {multi[0].queues} queues, but QEMU's "
            "af-xdp netdev reads only the last of its queues (the others' frames would "
            "never reach the VM); lease one queue per attachment (queuesPerAttachment: 1) "
            "or, with a QEMU that reads every queue, start the sidecar with "
            "--qemu-multiqueue")
    if settings.map_dir:
        nics = [domain.with_map_dir(nic, settings.map_dir) for nic in nics]
    return domain.rewrite(domain_xml, nics)


def _unary(handler: Callable[[Any, grpc.ServicerContext], Any], key: str,
           request: str) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        handler,
        request_deserializer=api.message(key, request).FromString,
        response_serializer=lambda m: m.SerializeToString(),
    )


def serve(settings: Settings, hooks_dir: str = HOOKS_DIR) -> tuple[grpc.Server, Hooks]:
    """Start serving Info and the Callbacks versions on ``<hooks_dir>/<binding>.sock``."""
    hooks = Hooks(settings)
    handlers = [
        grpc.method_handlers_generic_handler(api.service_name("info"), {
            "Info": _unary(hooks.info, "info", "InfoParams")}),
    ]
    for version in api.VERSIONS:
        methods = {"OnDefineDomain": _unary(hooks.on_define_domain(version), version,
                                            "OnDefineDomainParams")}
        if version == "v1alpha3":
            methods["Shutdown"] = _unary(hooks.on_shutdown, version, "ShutdownParams")
        handlers.append(grpc.method_handlers_generic_handler(api.service_name(version),
                                                             methods))
    path = settings.socket_path(hooks_dir)
    Path(hooks_dir).mkdir(parents=True, exist_ok=True)
    Path(path).unlink(missing_ok=True)  # our own socket from a previous start of the container
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=handlers)
    if server.add_insecure_port(f"unix:{path}") == 0:
        raise OSError(f"cannot listen on {path}")
    server.start()
    # virt-launcher runs as qemu (107) in the compute container and must connect.
    Path(path).chmod(0o777)  # a socket in the pod's own emptyDir, no one else's
    logs.get_logger().info("serving KubeVirt hooks", socket=path, binding=settings.binding,
                           versions=list(api.VERSIONS))
    return server, hooks
