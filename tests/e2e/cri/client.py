"""A small CRI client of our own: kubelet's sandbox calls to containerd over its gRPC socket.

cri-tools is not packaged in Debian, so the tests speak the CRI themselves:
``runtime_v1.proto`` (next to this file) is compiled with grpcio-tools on
first use, into a private directory, and each call is a plain unary gRPC
call on ``/runtime.v1.RuntimeService/<Method>``.  Tests only: nothing under
cni_netkit imports grpc (an import-linter contract says so).
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
from grpc_tools import protoc

PROTO = Path(__file__).with_name("runtime_v1.proto")
SERVICE = "/runtime.v1.RuntimeService/"
_compiled: ModuleType | None = None


def messages() -> ModuleType:
    """The generated message module (``runtime_v1_pb2``), compiled once per process."""
    global _compiled  # noqa: PLW0603 - one compilation per process
    if _compiled is None:
        out = Path(tempfile.mkdtemp(prefix="cri-proto-"))
        rc = protoc.main(["protoc", f"-I{PROTO.parent}", f"--python_out={out}", PROTO.name])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {PROTO} ({rc})")
        sys.path.insert(0, str(out))
        try:
            _compiled = importlib.import_module("runtime_v1_pb2")
        finally:
            sys.path.remove(str(out))
    return _compiled


class CRI:
    """The RuntimeService calls the tests make, on containerd's socket ``path``."""

    def __init__(self, path: str, timeout: float = 300) -> None:
        self.channel = grpc.insecure_channel(f"unix://{path}")
        self.timeout = timeout
        self.pb = messages()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: str, request: Any, response: str) -> Any:
        stub = self.channel.unary_unary(
            SERVICE + method,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=getattr(self.pb, response).FromString,
        )
        return stub(request, timeout=self.timeout)

    def version(self) -> Any:
        return self._call("Version", self.pb.VersionRequest(version="v1"), "VersionResponse")

    def run_pod_sandbox(self, name: str, namespace: str, uid: str) -> str:
        meta = self.pb.PodSandboxMetadata(name=name, namespace=namespace, uid=uid, attempt=0)
        config = self.pb.PodSandboxConfig(metadata=meta, hostname=name)
        req = self.pb.RunPodSandboxRequest(config=config)
        return str(self._call("RunPodSandbox", req, "RunPodSandboxResponse").pod_sandbox_id)

    def pod_sandbox_status(self, sandbox_id: str) -> Any:
        req = self.pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True)
        return self._call("PodSandboxStatus", req, "PodSandboxStatusResponse")

    def stop_pod_sandbox(self, sandbox_id: str) -> None:
        req = self.pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id)
        self._call("StopPodSandbox", req, "StopPodSandboxResponse")

    def remove_pod_sandbox(self, sandbox_id: str) -> None:
        req = self.pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id)
        self._call("RemovePodSandbox", req, "RemovePodSandboxResponse")

    def network_ready(self) -> tuple[bool, str]:
        """The runtime's NetworkReady condition (kubelet's view): (status, message)."""
        resp = self._call("Status", self.pb.StatusRequest(verbose=False), "StatusResponse")
        for cond in resp.status.conditions:
            if cond.type == "NetworkReady":
                return bool(cond.status), str(cond.message)
        raise AssertionError(f"no NetworkReady condition in {resp}")
