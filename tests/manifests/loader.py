"""Load manifests/ and validate objects: Kubernetes kinds against the pinned OpenAPI
schema (kubernetes-validate, strict), the CRD kinds we ship examples of against
the small schemas in ./schemas (written from the upstream CRDs, see each one's
description), whose ``metadata`` is the same pinned ObjectMeta.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
SCHEMA_VERSION = "1.34"  # the Kubernetes minor the manifests must satisfy

# kind -> our schema file, for what kubernetes-validate has no schema of.
CUSTOM_KINDS = {
    ("k8s.cni.cncf.io/v1", "NetworkAttachmentDefinition"): "networkattachmentdefinition.json",
    ("kubevirt.io/v1", "KubeVirt"): "kubevirt.json",
    ("kubevirt.io/v1", "VirtualMachineInstance"): "virtualmachineinstance.json",
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): "kustomization.json",
}


@dataclass(frozen=True)
class Doc:
    path: Path  # relative to manifests/
    index: int  # position in a multi-document file
    obj: dict[str, Any]

    @property
    def id(self) -> str:
        name = (self.obj.get("metadata") or {}).get("name", "")
        return f"{self.path}#{self.index}:{self.obj.get('kind')}/{name}"


def docs() -> list[Doc]:
    out: list[Doc] = []
    for path in sorted(MANIFESTS.rglob("*.yaml")):
        for i, obj in enumerate(d for d in yaml.safe_load_all(path.read_text()) if d):
            out.append(Doc(path.relative_to(MANIFESTS), i, obj))
    return out


def find(kind: str, path: str | None = None) -> dict[str, Any]:
    """The one object of ``kind`` (in ``path``, when given)."""
    found = [
        d.obj for d in docs() if d.obj["kind"] == kind and (path is None or str(d.path) == path)
    ]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@cache
def _k8s_definitions() -> Resource[Any]:
    base = resources.files(kubernetes_validate) / "kubernetes-json-schema"
    strict = base / f"v{SCHEMA_VERSION}.0-local-strict" / "_definitions.json"
    return Resource.from_contents(json.loads(strict.read_text()))


@cache
def _validator(schema_file: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / schema_file).read_text())
    registry: Registry[Any] = _k8s_definitions() @ Registry()
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate(obj: dict[str, Any]) -> None:
    """Raise if ``obj`` does not validate; every kind must have a schema."""
    custom = CUSTOM_KINDS.get((obj.get("apiVersion", ""), obj.get("kind", "")))
    if custom is not None:
        _validator(custom).validate(obj)
    else:
        kubernetes_validate.validate(obj, SCHEMA_VERSION, strict=True)
