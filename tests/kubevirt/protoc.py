"""The hooks API compiled from our ``.proto`` files by protoc (grpcio-tools), as KubeVirt's
Go stubs are made from theirs: what the tests' virt-launcher client speaks."""

from __future__ import annotations

import importlib
import sys
import tempfile
from functools import cache
from pathlib import Path
from types import ModuleType

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parents[2] / "cni_netkit" / "kubevirt" / "proto"
FILES = ("info", "v1alpha2", "v1alpha3")


@cache
def _out() -> Path:
    out = Path(tempfile.mkdtemp(prefix="kubevirt-proto-"))
    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={out}",
            f"--descriptor_set_out={out / 'all.pb'}", *(f"{f}.proto" for f in FILES)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_DIR}")
    return out


def module(name: str) -> ModuleType:
    """The generated ``<name>_pb2`` module."""
    out = _out()
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module(f"{name}_pb2")
    finally:
        sys.path.remove(str(out))


def descriptors() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """protoc's FileDescriptorProto of each file, by file name."""
    fds = descriptor_pb2.FileDescriptorSet.FromString((_out() / "all.pb").read_bytes())
    return {f.name: f for f in fds.file}
