"""The hooks API the sidecar builds at run time is the one its .proto files define."""

from __future__ import annotations

import pytest

from cni_netkit.kubevirt import api
from tests.kubevirt import protoc


@pytest.mark.parametrize("key", sorted(api.FILES))
def test_runtime_descriptors_are_what_protoc_makes_of_the_proto_files(key: str) -> None:
    spec = api.FILES[key]
    assert api.file_descriptor(spec) == protoc.descriptors()[spec.name]


def test_the_served_packages_are_kubevirts() -> None:
    assert api.service_name("info") == "kubevirt.hooks.info.Info"
    assert api.service_name("v1alpha2") == "kubevirt.hooks.v1alpha2.Callbacks"
    assert api.service_name("v1alpha3") == "kubevirt.hooks.v1alpha3.Callbacks"
    assert api.VERSIONS == ("v1alpha3", "v1alpha2")


def test_messages_round_trip_between_ours_and_protocs() -> None:
    ours = api.message("info", "InfoResult")(name="netkit-afxdp", versions=["v1alpha3"])
    ours.hookPoints.add(name="OnDefineDomain", priority=3)
    theirs = protoc.module("info").InfoResult.FromString(ours.SerializeToString())
    assert (theirs.name, list(theirs.versions)) == ("netkit-afxdp", ["v1alpha3"])
    assert [(h.name, h.priority) for h in theirs.hookPoints] == [("OnDefineDomain", 3)]
