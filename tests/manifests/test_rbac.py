"""The ClusterRole grants exactly what KubeClient's documented calls need.

The other direction — what a full run of the client really sends — is
checked against the same role in tests/agent/test_k8s.py, where the fake API
server enforces it.
"""

from __future__ import annotations

import re

from cni_netkit.agent import k8s

from .loader import ROOT, find


def granted() -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in find("ClusterRole")["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_cluster_role_equals_the_documented_calls() -> None:
    needed = {(c.api_group, c.resource, c.verb) for c in k8s.API_CALLS}
    assert granted() - needed == set(), "granted but never used"
    assert needed - granted() == set(), "used but not granted"


def test_no_wildcards_and_no_resource_outside_the_core_group() -> None:
    for group, resource, verb in granted():
        assert "*" not in (group, resource, verb)
        assert group == ""


def test_events_are_not_granted_because_the_agent_records_none() -> None:
    assert not hasattr(k8s.KubeClient, "record_event")
    assert not any(resource == "events" for _, resource, _ in granted())


def test_each_call_documents_its_request_in_its_docstring() -> None:
    # The docstring is what a reader checks RBAC against: keep it in step.
    for call in k8s.API_CALLS:
        doc = getattr(k8s.KubeClient, call.method).__doc__ or ""
        verb, path = call.request.split(" ", 1)
        if call.method == "patch_pod_annotations" and verb == "GET":
            continue  # the read-back after a conflict, described in prose
        stem = re.sub(r"\?.*", "", path)
        assert f"``{verb} {stem}" in doc, f"{call.method} does not document {verb} {stem}"
        assert f"{call.resource}: {call.verb}" in doc, f"{call.method} does not name its RBAC"


def test_the_docs_table_names_every_call_and_permission() -> None:
    text = (ROOT / "docs" / "kubernetes.md").read_text()
    for call in k8s.API_CALLS:
        assert f"`{call.method}`" in text, f"docs/kubernetes.md misses {call.method}"
        assert f"{call.resource}: {call.verb}" in text
