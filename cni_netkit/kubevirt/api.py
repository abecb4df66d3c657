"""KubeVirt's hooks API (``info``, ``v1alpha2``, ``v1alpha3``), built at run time.

The sidecar image has protobuf and grpcio but not grpcio-tools, and no
generated ``_pb2`` modules: the message classes are made here from
descriptors written out field by field (the table below), and the services
are served through grpc's generic handlers by full method name. So there is
no generated code to regenerate or drift, and the ``.proto`` files next to
this module stay the one written spec: tests/kubevirt/test_api.py compiles
them with protoc and requires the same descriptors as :data:`FILES` builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

INFO_PACKAGE = "kubevirt.hooks.info"
# The Callbacks versions we serve, newest first (virt-launcher picks the newest it knows).
VERSIONS = ("v1alpha3", "v1alpha2")
ON_DEFINE_DOMAIN = "OnDefineDomain"

_STRING = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
_BYTES = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
_INT32 = descriptor_pb2.FieldDescriptorProto.TYPE_INT32
_MESSAGE = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
_OPTIONAL = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
_REPEATED = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED


@dataclass(frozen=True)
class Field:
    name: str
    number: int
    type: int
    repeated: bool = False
    message: str = ""  # the message type's name in the same package, for TYPE_MESSAGE


@dataclass(frozen=True)
class ProtoFile:
    """One ``.proto`` file: its package, messages (in file order) and one service."""

    name: str
    package: str
    messages: tuple[tuple[str, tuple[Field, ...]], ...]
    service: str
    methods: tuple[tuple[str, str, str], ...]  # (method, input message, output message)


_ON_DEFINE = (
    ("OnDefineDomainParams", (Field("domainXML", 1, _BYTES), Field("vmi", 2, _BYTES))),
    ("OnDefineDomainResult", (Field("domainXML", 1, _BYTES),)),
    ("PreCloudInitIsoParams", (Field("cloudInitNoCloudSource", 1, _BYTES),
                               Field("vmi", 2, _BYTES), Field("cloudInitData", 3, _BYTES))),
    ("PreCloudInitIsoResult", (Field("cloudInitNoCloudSource", 1, _BYTES),
                               Field("cloudInitData", 3, _BYTES))),
)
_CALLBACKS = (
    ("OnDefineDomain", "OnDefineDomainParams", "OnDefineDomainResult"),
    ("PreCloudInitIso", "PreCloudInitIsoParams", "PreCloudInitIsoResult"),
)

FILES: dict[str, ProtoFile] = {
    "info": ProtoFile(
        name="info.proto",
        package=INFO_PACKAGE,
        messages=(
            ("InfoParams", ()),
            ("InfoResult", (Field("name", 1, _STRING),
                            Field("hookPoints", 3, _MESSAGE, repeated=True, message="HookPoint"),
                            Field("versions", 4, _STRING, repeated=True))),
            ("HookPoint", (Field("name", 1, _STRING), Field("priority", 2, _INT32))),
        ),
        service="Info",
        methods=(("Info", "InfoParams", "InfoResult"),),
    ),
    "v1alpha2": ProtoFile(
        name="v1alpha2.proto",
        package="kubevirt.hooks.v1alpha2",
        messages=_ON_DEFINE,
        service="Callbacks",
        methods=_CALLBACKS,
    ),
    "v1alpha3": ProtoFile(
        name="v1alpha3.proto",
        package="kubevirt.hooks.v1alpha3",
        messages=(*_ON_DEFINE, ("ShutdownParams", ()), ("ShutdownResult", ())),
        service="Callbacks",
        methods=(*_CALLBACKS, ("Shutdown", "ShutdownParams", "ShutdownResult")),
    ),
}


def file_descriptor(spec: ProtoFile) -> descriptor_pb2.FileDescriptorProto:
    """The ``FileDescriptorProto`` protoc would make of ``spec``'s ``.proto`` file."""
    fd = descriptor_pb2.FileDescriptorProto(name=spec.name, package=spec.package,
                                            syntax="proto3")
    for msg_name, fields in spec.messages:
        msg = fd.message_type.add(name=msg_name)
        for f in fields:
            field = msg.field.add(name=f.name, number=f.number, type=f.type,
                                  label=_REPEATED if f.repeated else _OPTIONAL,
                                  json_name=f.name)
            if f.message:
                field.type_name = f".{spec.package}.{f.message}"
    service = fd.service.add(name=spec.service)
    for method, request, response in spec.methods:
        service.method.add(name=method, input_type=f".{spec.package}.{request}",
                           output_type=f".{spec.package}.{response}")
    return fd


@cache
def _pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()  # our own: nothing else's names can clash
    for spec in FILES.values():
        pool.Add(file_descriptor(spec))
    return pool


def message(key: str, name: str) -> Any:
    """The message class ``name`` of file ``key`` (``"info"``, ``"v1alpha2"``, ``"v1alpha3"``)."""
    spec = FILES[key]
    return message_factory.GetMessageClass(
        _pool().FindMessageTypeByName(f"{spec.package}.{name}"))


def service_name(key: str) -> str:
    """The full gRPC service name of file ``key``, e.g. ``kubevirt.hooks.v1alpha3.Callbacks``."""
    spec = FILES[key]
    return f"{spec.package}.{spec.service}"
