"""KubeClient against the local fake API server: real HTTP, the official client.

The server enforces the ClusterRole of manifests/rbac.yaml on every request
and validates every object written against the Kubernetes schema, so each
test here also checks that the call is permitted and its write is valid.
"""

from __future__ import annotations

import http.client
import inspect
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cni_netkit.agent.k8s import (
    API_CALLS,
    MERGE_PATCH,
    KubeClient,
    KubeConflictError,
    KubeError,
    KubeForbiddenError,
    KubeNotFoundError,
    KubeUnavailableError,
    Node,
    Pod,
    WatchExpiredError,
)
from cni_netkit.agent.publish import LEASES_ANNOTATION, Pool, capacity, plan
from cni_netkit.plugin.state import Attachment, LeasedQueue

from .fake_apiserver import FakeAPIServer

RBAC = Path(__file__).resolve().parents[2] / "manifests" / "rbac.yaml"
RES = "netkit.cni.dev/eth0"


def cluster_role_rules() -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(RBAC.read_text()) if d]
    (role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    rules: list[dict[str, Any]] = role["rules"]
    return rules


@pytest.fixture
def server() -> Iterator[FakeAPIServer]:
    with FakeAPIServer(rbac_rules=cluster_role_rules()) as srv:
        srv.add_node("n1")
        srv.add_node("n2")
        yield srv
        assert srv.rejected == [], "the client wrote an object the API server would refuse"


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def kube(server: FakeAPIServer, sleeps: list[float]) -> Iterator[KubeClient]:
    with KubeClient.from_url(server.url, conflict_retries=3, sleep=sleeps.append) as client:
        yield client


def patches(server: FakeAPIServer) -> list[Any]:
    return [r for r in server.requests if r.method == "PATCH"]


def pod_annotations(server: FakeAPIServer, namespace: str, name: str) -> dict[str, str]:
    pod = server.pod(namespace, name)
    assert pod is not None
    annotations: dict[str, str] = pod["metadata"]["annotations"]
    return annotations


# --- nodes -------------------------------------------------------------------------


def test_get_node_returns_plain_values(kube: KubeClient, server: FakeAPIServer) -> None:
    node = kube.get_node("n1")
    assert isinstance(node, Node)
    assert node.name == "n1"
    assert node.uid == server.node("n1")["metadata"]["uid"]
    assert node.capacity["pods"] == "110"
    assert type(node.capacity) is dict  # plain values, no kubernetes model types


def test_get_missing_node_raises_not_found(kube: KubeClient) -> None:
    with pytest.raises(KubeNotFoundError, match="get node nope: HTTP 404") as exc:
        kube.get_node("nope")
    assert exc.value.status == 404
    assert 'nodes "nope" not found' in exc.value.details


def test_capacity_patch_sets_capacity_and_allocatable_via_status(
    kube: KubeClient, server: FakeAPIServer
) -> None:
    node = kube.patch_node_status_capacity("n1", {RES: 4})

    (req,) = patches(server)
    assert (req.path, req.content_type) == ("/api/v1/nodes/n1/status", MERGE_PATCH)
    assert req.body == {"status": {"capacity": {RES: "4"}, "allocatable": {RES: "4"}}}
    status = server.node("n1")["status"]
    assert status["capacity"][RES] == status["allocatable"][RES] == "4"
    assert status["capacity"]["cpu"] == "2"  # the kubelet's resources are left alone
    assert node.capacity[RES] == node.allocatable[RES] == "4"


def test_capacity_patch_none_removes_the_resource_and_is_idempotent(
    kube: KubeClient, server: FakeAPIServer
) -> None:
    kube.patch_node_status_capacity("n1", {RES: 2, "netkit.cni.dev/eth1": 1})
    kube.patch_node_status_capacity("n1", {RES: None})
    kube.patch_node_status_capacity("n1", {RES: None})  # already gone: still fine

    status = server.node("n1")["status"]
    assert RES not in status["capacity"] and RES not in status["allocatable"]
    assert status["capacity"]["netkit.cni.dev/eth1"] == "1"
    assert all(r.status == 200 for r in patches(server))


def test_capacity_patch_refuses_bad_names_and_counts_before_sending(
    kube: KubeClient, server: FakeAPIServer
) -> None:
    with pytest.raises(ValueError, match="not an extended resource"):
        kube.patch_node_status_capacity("n1", {"cpu": 4})
    with pytest.raises(ValueError, match="not an extended resource"):
        kube.patch_node_status_capacity("n1", {"kubernetes.io/eth0": 4})
    with pytest.raises(ValueError, match="negative"):
        kube.patch_node_status_capacity("n1", {RES: -1})
    assert patches(server) == []


def test_node_patches_retry_conflicts(
    kube: KubeClient, server: FakeAPIServer, sleeps: list[float]
) -> None:
    server.fail("PATCH", r"/nodes/n1/status$", 409, times=2)
    kube.patch_node_status_capacity("n1", {RES: 3})
    assert server.node("n1")["status"]["capacity"][RES] == "3"
    assert sleeps == [0.05, 0.1]


def test_patch_node_annotations_sets_and_removes(kube: KubeClient, server: FakeAPIServer) -> None:
    kube.patch_node_annotations(
        "n1", {"netkit.cni.dev/probe": '{"leasing":true}', "netkit.cni.dev/x": "1"}
    )
    node = kube.patch_node_annotations("n1", {"netkit.cni.dev/x": None})

    assert node.annotations == {"netkit.cni.dev/probe": '{"leasing":true}'}
    assert server.node("n1")["metadata"]["annotations"] == node.annotations
    assert {r.path for r in patches(server)} == {"/api/v1/nodes/n1"}
    assert {r.content_type for r in patches(server)} == {MERGE_PATCH}


def test_annotation_keys_are_checked_before_sending(
    kube: KubeClient, server: FakeAPIServer
) -> None:
    with pytest.raises(ValueError, match="not a valid annotation key"):
        kube.patch_node_annotations("n1", {"bad key": "v"})
    with pytest.raises(ValueError, match="not a valid annotation key"):
        kube.patch_pod_annotations("ns", "p", {"Netkit.CNI.dev/leases": "v"})
    assert patches(server) == []


# --- pods -------------------------------------------------------------------------


def test_list_pods_on_node_filters_by_node_and_follows_pages(
    kube: KubeClient, server: FakeAPIServer
) -> None:
    for i in range(5):
        server.add_pod("ns", f"p{i}", "n1")
    server.add_pod("ns", "elsewhere", "n2")

    listed = kube.list_pods_on_node("n1", page_size=2)

    assert sorted(p.name for p in listed.pods) == [f"p{i}" for i in range(5)]
    assert all(isinstance(p, Pod) and p.node_name == "n1" for p in listed.pods)
    assert listed.resource_version == server.resource_version
    lists = [r for r in server.requests if r.method == "GET"]
    assert len(lists) == 3  # 2 + 2 + 1
    assert all(r.query["fieldSelector"] == "spec.nodeName=n1" for r in lists)
    assert "continue" not in lists[0].query and "continue" in lists[1].query


def test_get_pod_returns_none_when_gone(kube: KubeClient, server: FakeAPIServer) -> None:
    server.add_pod("ns", "p", "n1", annotations={"a": "b"})
    pod = kube.get_pod("ns", "p")
    assert pod is not None and pod.annotations == {"a": "b"} and pod.phase == "Running"
    server.delete_pod("ns", "p")
    assert kube.get_pod("ns", "p") is None


def test_patch_pod_annotations_merges_and_removes(kube: KubeClient, server: FakeAPIServer) -> None:
    uid = server.add_pod("ns", "p", "n1", annotations={"keep": "me"})["metadata"]["uid"]

    assert kube.patch_pod_annotations("ns", "p", {"netkit.cni.dev/leases": "[1]"}, uid=uid)
    assert pod_annotations(server, "ns", "p") == {"keep": "me", "netkit.cni.dev/leases": "[1]"}
    assert kube.patch_pod_annotations("ns", "p", {"netkit.cni.dev/leases": None}, uid=uid)
    assert pod_annotations(server, "ns", "p") == {"keep": "me"}

    first = patches(server)[0]
    assert first.content_type == MERGE_PATCH
    assert first.body == {"metadata": {"uid": uid, "annotations": {"netkit.cni.dev/leases": "[1]"}}}


def test_patch_pod_annotations_on_a_gone_pod_is_not_an_error(
    kube: KubeClient, server: FakeAPIServer, sleeps: list[float]
) -> None:
    assert kube.patch_pod_annotations("ns", "never", {"netkit.cni.dev/leases": None}) is False
    assert [r.status for r in server.requests] == [404]
    assert sleeps == []


def test_patch_pod_annotations_retries_conflicts_with_backoff(
    kube: KubeClient, server: FakeAPIServer, sleeps: list[float]
) -> None:
    uid = server.add_pod("ns", "p", "n1")["metadata"]["uid"]
    server.fail("PATCH", r"/pods/p$", 409, times=2)

    assert kube.patch_pod_annotations("ns", "p", {"netkit.cni.dev/leases": "x"}, uid=uid)

    assert [r.status for r in patches(server)] == [409, 409, 200]
    assert sleeps == [0.05, 0.1]
    assert pod_annotations(server, "ns", "p")["netkit.cni.dev/leases"] == "x"


def test_patch_pod_annotations_gives_up_after_bounded_retries(
    kube: KubeClient, server: FakeAPIServer, sleeps: list[float]
) -> None:
    server.add_pod("ns", "p", "n1")
    server.fail("PATCH", r"/pods/p$", 409, times=100)

    with pytest.raises(KubeConflictError, match="annotate pod ns/p: HTTP 409"):
        kube.patch_pod_annotations("ns", "p", {"netkit.cni.dev/leases": "x"})

    assert len(patches(server)) == 4  # conflict_retries=3
    assert sleeps == [0.05, 0.1, 0.2]


def test_backoff_is_capped() -> None:
    slept: list[float] = []
    with FakeAPIServer() as srv:
        srv.add_pod("ns", "p", "n1")
        srv.fail("PATCH", r"/pods/p$", 409, times=100)
        client = KubeClient.from_url(srv.url, conflict_retries=8, backoff=0.5, sleep=slept.append)
        with pytest.raises(KubeConflictError):
            client.patch_pod_annotations("ns", "p", {"a": "b"})
    assert slept == [0.5, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]


def test_patch_pod_annotations_never_writes_onto_a_new_pod_of_the_same_name(
    kube: KubeClient, server: FakeAPIServer, sleeps: list[float]
) -> None:
    old_uid = server.add_pod("ns", "web-0", "n1")["metadata"]["uid"]
    server.delete_pod("ns", "web-0")
    server.add_pod("ns", "web-0", "n1")  # a StatefulSet's next pod takes the name

    assert (
        kube.patch_pod_annotations("ns", "web-0", {"netkit.cni.dev/leases": "x"}, uid=old_uid)
        is False
    )

    assert "netkit.cni.dev/leases" not in pod_annotations(server, "ns", "web-0")
    assert [r.status for r in patches(server)] == [409]  # uid precondition, then no retry
    assert sleeps == []


# --- watch ---------------------------------------------------------------------------


def test_watch_yields_this_nodes_pod_events_after_the_listed_version(
    kube: KubeClient, server: FakeAPIServer
) -> None:
    server.add_pod("ns", "before", "n1")
    rv = kube.list_pods_on_node("n1").resource_version

    def churn() -> None:
        time.sleep(0.2)
        server.add_pod("ns", "other-node", "n2")
        server.add_pod("ns", "p", "n1")
        server.edit_pod("ns", "p", lambda o: o["metadata"]["annotations"].update({"x": "y"}))
        server.delete_pod("ns", "p")

    t = threading.Thread(target=churn)
    t.start()
    start = time.monotonic()
    events = list(kube.watch_pods_on_node("n1", rv, timeout=2))
    t.join()

    assert time.monotonic() - start < 5  # ends by itself when the server closes the stream
    pods = [(e.type, e.pod.name) for e in events if e.pod is not None]
    assert pods == [("ADDED", "p"), ("MODIFIED", "p"), ("DELETED", "p")]
    assert events[1].pod is not None and events[1].pod.annotations == {"x": "y"}
    assert events[-1].type == "BOOKMARK" and events[-1].resource_version == server.resource_version
    (watch,) = [r for r in server.requests if r.query.get("watch")]
    assert watch.query["resourceVersion"] == rv
    assert watch.query["timeoutSeconds"] == "2"


def test_watch_from_a_compacted_version_raises_expired(
    kube: KubeClient, server: FakeAPIServer
) -> None:
    rv = kube.list_pods_on_node("n1").resource_version
    server.add_pod("ns", "p", "n1")
    server.compact()
    with pytest.raises(WatchExpiredError, match="HTTP 410"):
        list(kube.watch_pods_on_node("n1", rv, timeout=1))
    # The remedy works: list again, watch from there.
    rv2 = kube.list_pods_on_node("n1").resource_version
    assert [e.type for e in kube.watch_pods_on_node("n1", rv2, timeout=1)] == ["BOOKMARK"]


# --- errors and auth -------------------------------------------------------------------


def test_missing_permission_is_a_clear_forbidden_error() -> None:
    with FakeAPIServer(rbac_rules=[]) as srv:
        srv.add_node("n1")
        with pytest.raises(KubeForbiddenError, match="get node n1: HTTP 403 Forbidden") as exc:
            KubeClient.from_url(srv.url).get_node("n1")
    assert 'cannot get resource "nodes"' in exc.value.details


def test_bearer_token_is_sent() -> None:
    token = "test-token"  # noqa: S105 - a made-up token for the local fake server
    with FakeAPIServer(token=token) as srv:
        srv.add_node("n1")
        assert KubeClient.from_url(srv.url, token=token).get_node("n1").name == "n1"
        with pytest.raises(KubeForbiddenError, match="HTTP 401"):
            KubeClient.from_url(srv.url, token=token + "-wrong").get_node("n1")


def test_server_errors_and_no_answer_are_unavailable(
    kube: KubeClient, server: FakeAPIServer
) -> None:
    server.fail("GET", r"/nodes/n1$", 500)
    with pytest.raises(KubeUnavailableError, match="HTTP 500"):
        kube.get_node("n1")
    dead = KubeClient.from_url("http://127.0.0.1:1", timeout=(0.5, 0.5))
    dead._api.configuration.retries = 0  # one refused connection is enough to show the mapping
    with pytest.raises(KubeUnavailableError, match="no answer"):
        dead.get_node("n1")


def test_connect_prefers_an_explicit_url(server: FakeAPIServer) -> None:
    assert KubeClient.connect(url=server.url).get_node("n2").name == "n2"


def test_connect_reads_a_kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = "kubeconfig-token"  # noqa: S105 - a made-up token for the local fake server
    with FakeAPIServer(token=token) as srv:
        srv.add_node("n1")
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": srv.url}}],
            "users": [{"name": "agent", "user": {"token": token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "agent"}}],
            "current-context": "fake",
        }
        path = tmp_path / "kubeconfig"
        path.write_text(json.dumps(config))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        with KubeClient.connect(kubeconfig=str(path)) as kube:
            assert kube.get_node("n1").name == "n1"


def test_in_cluster_outside_a_pod_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    with pytest.raises(KubeError, match="in-cluster configuration unusable"):
        KubeClient.in_cluster()


def test_an_answer_that_is_not_json_is_a_kube_error(
    kube: KubeClient, server: FakeAPIServer
) -> None:
    server.reply_raw("GET", r"/nodes/n1$", b"<html>502 Bad Gateway</html>")
    with pytest.raises(KubeError, match="answer is not JSON") as exc:
        kube.get_node("n1")
    assert "Bad Gateway" in exc.value.details


def test_a_malformed_watch_event_is_a_kube_error(kube: KubeClient, server: FakeAPIServer) -> None:
    server.reply_raw("GET", r"/api/v1/pods$", b'{"type": "ADDED", "object": {}}\nnot json\n')
    events = kube.watch_pods_on_node("n1", server.resource_version, timeout=1)
    assert next(events).type == "ADDED"
    with pytest.raises(KubeError, match="malformed watch event"):
        next(events)


# --- what the fake server itself must refuse (so the tests above can fail) ---------------


def raw_patch(
    server: FakeAPIServer, path: str, ctype: str, body: Any
) -> tuple[int, dict[str, Any]]:
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.request("PATCH", path, json.dumps(body), {"Content-Type": ctype})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read())
    conn.close()
    return out


def test_fake_server_refuses_what_the_real_one_refuses() -> None:
    with FakeAPIServer() as srv:
        srv.add_node("n1")
        # A dict sent as JSON patch: the generated client's default content type.
        code, st = raw_patch(
            srv, "/api/v1/nodes/n1/status", "application/json-patch+json", {"status": {}}
        )
        assert (code, st["reason"]) == (400, "BadRequest")
        # A quantity that is not one.
        body = {"status": {"capacity": {RES: "four"}}}
        code, st = raw_patch(srv, "/api/v1/nodes/n1/status", MERGE_PATCH, body)
        assert (code, st["reason"]) == (422, "Invalid")
        # An unknown field (the schema is strict).
        code, st = raw_patch(srv, "/api/v1/nodes/n1", MERGE_PATCH, {"spec": {"bogus": 1}})
        assert (code, st["reason"]) == (422, "Invalid")
        assert len(srv.rejected) == 2
        # Status sent to the object itself is dropped, as the node strategy does.
        code, node = raw_patch(
            srv, "/api/v1/nodes/n1", MERGE_PATCH, {"status": {"capacity": {RES: "1"}}}
        )
        assert code == 200 and RES not in node["status"]["capacity"]
        # JSON patch "remove" of an absent key fails; merge patch null would not.
        op = [{"op": "remove", "path": "/status/capacity/netkit.cni.dev~1eth0"}]
        code, st = raw_patch(srv, "/api/v1/nodes/n1/status", "application/json-patch+json", op)
        assert code == 422
        # A stale resourceVersion precondition conflicts.
        code, st = raw_patch(
            srv, "/api/v1/nodes/n1", MERGE_PATCH, {"metadata": {"resourceVersion": "1"}}
        )
        assert (code, st["reason"]) == (409, "Conflict")


# --- RBAC: the ClusterRole covers exactly what the client does -----------------------------


def test_rbac_covers_exactly_the_requests_a_full_run_sends(server: FakeAPIServer) -> None:
    """Every KubeClient method once, against RBAC enforcement; then compare both ways."""
    kube = KubeClient.from_url(server.url, sleep=lambda _: None)
    uid = server.add_pod("ns", "p", "n1")["metadata"]["uid"]
    kube.get_node("n1")
    kube.patch_node_annotations("n1", {"netkit.cni.dev/probe": "ok"})
    kube.patch_node_status_capacity("n1", {RES: 1})
    rv = kube.list_pods_on_node("n1").resource_version
    list(kube.watch_pods_on_node("n1", rv, timeout=1))
    kube.get_pod("ns", "p")
    server.fail("PATCH", r"/pods/p$", 409)  # takes the conflict path: its get
    kube.patch_pod_annotations("ns", "p", {"netkit.cni.dev/leases": "[]"}, uid=uid)

    assert all(r.status != 403 for r in server.requests)
    granted = {
        (verb, resource)
        for rule in cluster_role_rules()
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert server.rbac_used() == granted
    assert {(c.verb, c.resource) for c in API_CALLS} == granted


def test_api_calls_table_lists_every_request_method() -> None:
    public = {
        name
        for name, fn in inspect.getmembers(KubeClient, inspect.isfunction)
        if not name.startswith("_") and name != "close"
    }
    assert {c.method for c in API_CALLS} == public


# --- publish.plan applied through the client converges ------------------------------------


def test_applying_a_plan_through_the_client_converges(
    kube: KubeClient, server: FakeAPIServer
) -> None:
    server.add_pod("ns", "vm", "n1")
    server.add_pod("ns", "was-vm", "n1", annotations={LEASES_ANNOTATION: "[]"})
    server.add_pod("ns", "plain", "n1")
    kube.patch_node_status_capacity("n1", {"netkit.cni.dev/gone": 2})
    leased = Attachment(
        container_id="c1", ifname="net1", netns="/var/run/netns/c1", network="netkit-eth0",
        master="eth0", pairing="single", mode="l2", mac="02:00:00:00:00:01", mtu=None,
        queues=(LeasedQueue(1, 14),), pod_namespace="ns", pod_name="vm",
    )  # fmt: skip
    pool = Pool("eth0", (14, 15))

    def current() -> Any:
        return plan(
            attachments=[leased],
            pods=kube.list_pods_on_node("n1").pods,
            node=kube.get_node("n1"),
            capacities={pool.resource: capacity(pool)},
        )

    todo = current()
    assert {(c.name, c.value is None) for c in todo.annotations} == {
        ("vm", False),
        ("was-vm", True),
    }
    assert todo.capacity == {RES: 2, "netkit.cni.dev/gone": None}
    for change in todo.annotations:
        kube.patch_pod_annotations(
            change.namespace, change.name, {LEASES_ANNOTATION: change.value}, uid=change.uid
        )
    kube.patch_node_status_capacity("n1", todo.capacity)

    assert current().empty
    written = json.loads(pod_annotations(server, "ns", "vm")[LEASES_ANNOTATION])
    assert written[0]["masterQueues"] == [14]
    assert LEASES_ANNOTATION not in pod_annotations(server, "ns", "was-vm")
