"""The node agent's one door to the Kubernetes API (the only importer of ``kubernetes``).

``KubeClient`` wraps the official client with exactly the calls the agent
makes. Each is listed in :data:`API_CALLS` with its HTTP request and the RBAC
verb and resource it needs; ``manifests/rbac.yaml`` is checked against that
table (tests/manifests) and against the requests a test run really sends
(tests/agent/test_k8s.py), both ways.

What goes in and out are plain values (:class:`Node`, :class:`Pod`,
:class:`WatchEvent`, dicts); no ``kubernetes`` type leaks out, and every API
failure becomes a :class:`KubeError` subclass naming the request.

Patches are JSON merge patches (RFC 7386), sent with an explicit
``Content-Type: application/merge-patch+json``. Left to itself the client
picks the type by version (the generator's first "json" type is
``json-patch+json``, which the API server refuses for an object body; newer
releases rewrite that to strategic merge), so we name it. A merge patch
touches only the keys it names, needs no escaping of the ``/`` in our keys
(JSON patch would need ``~1``), and removes a key given ``null`` whether or
not it is there (JSON patch ``remove`` of an absent key fails).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import kubernetes.client
import kubernetes.config
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from cni_netkit.agent.publish import is_extended_resource_name, is_qualified_name
from cni_netkit.errors import NetkitError

MERGE_PATCH = "application/merge-patch+json"
FIELD_MANAGER = "cni-netkit-agent"


# --- the calls, for RBAC ----------------------------------------------------------


@dataclass(frozen=True)
class ApiCall:
    """One kind of request a KubeClient method sends, and the permission it needs."""

    method: str  # KubeClient method
    request: str  # HTTP verb and path
    verb: str  # RBAC verb
    resource: str  # RBAC resource ("nodes/status" for a subresource)
    api_group: str = ""  # "" is the core group


API_CALLS: tuple[ApiCall, ...] = (
    ApiCall("get_node", "GET /api/v1/nodes/{name}", "get", "nodes"),
    ApiCall("patch_node_annotations", "PATCH /api/v1/nodes/{name}", "patch", "nodes"),
    ApiCall(
        "patch_node_status_capacity", "PATCH /api/v1/nodes/{name}/status", "patch", "nodes/status"
    ),
    ApiCall(
        "list_pods_on_node", "GET /api/v1/pods?fieldSelector=spec.nodeName={node}", "list", "pods"
    ),
    ApiCall(
        "watch_pods_on_node",
        "GET /api/v1/pods?watch=true&fieldSelector=spec.nodeName={node}",
        "watch",
        "pods",
    ),
    ApiCall("get_pod", "GET /api/v1/namespaces/{namespace}/pods/{name}", "get", "pods"),
    # patch_pod_annotations reads the pod back (get) after a conflict to tell
    # "someone else wrote" (retry) from "a new pod took the name" (stop).
    ApiCall(
        "patch_pod_annotations", "PATCH /api/v1/namespaces/{namespace}/pods/{name}", "patch", "pods"
    ),
    ApiCall(
        "patch_pod_annotations", "GET /api/v1/namespaces/{namespace}/pods/{name}", "get", "pods"
    ),
)


# --- errors ---------------------------------------------------------------------------


class KubeError(NetkitError):
    """An API request failed. ``status`` is the HTTP code (None: no answer at all)."""

    def __init__(
        self, msg: str, details: str = "", *, status: int | None = None, reason: str = ""
    ) -> None:
        super().__init__(msg, details)
        self.status = status
        self.reason = reason


class KubeNotFoundError(KubeError):
    """404: the object (or the API path) does not exist."""


class KubeConflictError(KubeError):
    """409: a precondition (resourceVersion, uid) failed and retries ran out."""


class KubeForbiddenError(KubeError):
    """401/403: the ServiceAccount lacks a permission (compare manifests/rbac.yaml)."""


class KubeInvalidError(KubeError):
    """400/415/422: the API server rejected what we sent; a bug on our side."""


class KubeUnavailableError(KubeError):
    """No answer, 429 or 5xx: try again later."""


class WatchExpiredError(KubeError):
    """410: the resourceVersion to watch from is too old; list again, then watch."""


_BY_STATUS: dict[int, type[KubeError]] = {
    401: KubeForbiddenError,
    403: KubeForbiddenError,
    404: KubeNotFoundError,
    409: KubeConflictError,
    410: WatchExpiredError,
    400: KubeInvalidError,
    415: KubeInvalidError,
    422: KubeInvalidError,
}


def _error(what: str, status: int | None, body: str | bytes | None, reason: str = "") -> KubeError:
    """The KubeError for an API answer, its text taken from the Status object when there is one."""
    message, details = reason, ""
    if body:
        try:
            st = json.loads(body)
        except ValueError:
            details = body[:500] if isinstance(body, str) else body[:500].decode(errors="replace")
        else:
            if isinstance(st, dict):
                message = str(st.get("message") or message)
                reason = str(st.get("reason") or reason)
    if status is None:
        cls: type[KubeError] = KubeUnavailableError
    else:
        cls = _BY_STATUS.get(
            status, KubeUnavailableError if status == 429 or status >= 500 else KubeError
        )
    code = f"HTTP {status}" if status is not None else "no answer"
    return cls(
        f"{what}: {code} {reason}".rstrip(), message or details, status=status, reason=reason
    )


# --- values -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    name: str
    uid: str
    resource_version: str
    annotations: Mapping[str, str]
    capacity: Mapping[str, str]
    allocatable: Mapping[str, str]

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Node:
        meta, status = obj.get("metadata") or {}, obj.get("status") or {}
        return cls(
            name=meta.get("name", ""),
            uid=meta.get("uid", ""),
            resource_version=meta.get("resourceVersion", ""),
            annotations=dict(meta.get("annotations") or {}),
            capacity=dict(status.get("capacity") or {}),
            allocatable=dict(status.get("allocatable") or {}),
        )


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    uid: str
    node_name: str
    phase: str
    resource_version: str
    annotations: Mapping[str, str]
    deleting: bool  # metadata.deletionTimestamp is set

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Pod:
        meta = obj.get("metadata") or {}
        return cls(
            namespace=meta.get("namespace", ""),
            name=meta.get("name", ""),
            uid=meta.get("uid", ""),
            node_name=(obj.get("spec") or {}).get("nodeName", ""),
            phase=(obj.get("status") or {}).get("phase", ""),
            resource_version=meta.get("resourceVersion", ""),
            annotations=dict(meta.get("annotations") or {}),
            deleting=meta.get("deletionTimestamp") is not None,
        )


@dataclass(frozen=True)
class PodList:
    pods: tuple[Pod, ...]
    resource_version: str  # where a watch continues from


@dataclass(frozen=True)
class WatchEvent:
    type: Literal["ADDED", "MODIFIED", "DELETED", "BOOKMARK"]
    pod: Pod | None  # None for BOOKMARK
    resource_version: str


# --- the client ---------------------------------------------------------------------------


class KubeClient:
    """The agent's API calls. Build it with :meth:`connect` (or the ``from_*`` helpers).

    ``conflict_retries``/``backoff``: a patch answered 409 is retried this
    many times, sleeping ``backoff * 2**n`` seconds (capped at 2 s) between.
    ``timeout``: (connect, read) seconds for every request but the watch, so
    a hung API server cannot stall the agent's reconcile loop.
    """

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        *,
        conflict_retries: int = 5,
        backoff: float = 0.05,
        timeout: tuple[float, float] = (5.0, 30.0),
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._api = api_client
        self._core = kubernetes.client.CoreV1Api(api_client)
        self._retries = conflict_retries
        self._backoff = backoff
        self._timeout = timeout
        self._sleep = sleep

    # -- construction --

    @classmethod
    def from_url(cls, url: str, *, token: str | None = None, **kw: Any) -> KubeClient:
        """Talk to ``url`` (tests: the local fake API server), optionally with a bearer token."""
        cfg = kubernetes.client.Configuration()
        cfg.host = url.rstrip("/")
        if token:
            cfg.api_key = {"BearerToken": token}
            cfg.api_key_prefix = {"BearerToken": "Bearer"}
        return cls(kubernetes.client.ApiClient(cfg), **kw)

    @classmethod
    def in_cluster(cls, **kw: Any) -> KubeClient:
        """The pod's ServiceAccount token and the cluster CA (the DaemonSet case)."""
        cfg = kubernetes.client.Configuration()
        try:
            # The config loaders, ApiClient.close and iter_resp_lines carry no annotations.
            kubernetes.config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        except kubernetes.config.ConfigException as e:
            raise KubeError("in-cluster configuration unusable", str(e)) from e
        return cls(kubernetes.client.ApiClient(cfg), **kw)

    @classmethod
    def from_kubeconfig(
        cls, path: str | None = None, *, context: str | None = None, **kw: Any
    ) -> KubeClient:
        """A kubeconfig file (``$KUBECONFIG`` or ``~/.kube/config`` when ``path`` is None)."""
        cfg = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=path, context=context, client_configuration=cfg
            )
        except (kubernetes.config.ConfigException, OSError) as e:
            raise KubeError(f"kubeconfig {path or '(default)'} unusable", str(e)) from e
        return cls(kubernetes.client.ApiClient(cfg), **kw)

    @classmethod
    def connect(
        cls, *, url: str | None = None, kubeconfig: str | None = None, **kw: Any
    ) -> KubeClient:
        """An explicit URL, else in-cluster when run in a pod, else a kubeconfig."""
        if url:
            return cls.from_url(url, **kw)
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            return cls.in_cluster(**kw)
        return cls.from_kubeconfig(kubeconfig, **kw)

    def close(self) -> None:
        self._api.close()  # type: ignore[no-untyped-call]

    def __enter__(self) -> KubeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- nodes --

    def get_node(self, name: str) -> Node:
        """``GET /api/v1/nodes/{name}`` (nodes: get)."""
        return Node.from_json(self._call(f"get node {name}", self._core.read_node, name))

    def patch_node_annotations(self, node: str, annotations: Mapping[str, str | None]) -> Node:
        """``PATCH /api/v1/nodes/{name}`` (nodes: patch), merge patch of metadata.annotations.

        ``None`` removes a key. Used for the probe results.
        """
        _check_annotations(annotations)
        body = {"metadata": {"annotations": dict(annotations)}}
        return Node.from_json(
            self._patch(f"annotate node {node}", self._core.patch_node, node, body)
        )

    def patch_node_status_capacity(self, node: str, resources: Mapping[str, int | None]) -> Node:
        """``PATCH /api/v1/nodes/{name}/status`` (nodes/status: patch): extended resources.

        Sets ``status.capacity`` *and* ``status.allocatable`` of each resource to
        its count (None removes it), so the scheduler sees it at once rather than
        after the kubelet's next status update copies capacity into allocatable.
        It has to be the status subresource: the API server ignores status
        changes sent to the node itself.
        """
        values: dict[str, str | None] = {}
        for name, count in resources.items():
            if not is_extended_resource_name(name):
                raise ValueError(f"{name!r} is not an extended resource name")
            if count is not None and count < 0:
                raise ValueError(f"{name}: negative count {count}")
            values[name] = None if count is None else str(count)  # quantities are strings
        body = {"status": {"capacity": values, "allocatable": dict(values)}}
        return Node.from_json(
            self._patch(
                f"set extended resources of node {node}", self._core.patch_node_status, node, body
            )
        )

    # -- pods --

    def list_pods_on_node(self, node: str, *, page_size: int = 500) -> PodList:
        """``GET /api/v1/pods?fieldSelector=spec.nodeName={node}`` (pods: list), all pages.

        The returned resourceVersion is where :meth:`watch_pods_on_node` continues.
        """
        pods: list[Pod] = []
        cont: str | None = None
        while True:
            page = self._call(
                f"list pods on node {node}",
                self._core.list_pod_for_all_namespaces,
                field_selector=f"spec.nodeName={node}",
                limit=page_size,
                _continue=cont,
            )
            pods.extend(Pod.from_json(item) for item in page.get("items") or ())
            meta = page.get("metadata") or {}
            cont = meta.get("continue") or None
            if cont is None:
                # The first page's snapshot is the list's: every page has its version.
                return PodList(tuple(pods), str(meta.get("resourceVersion", "")))

    def get_pod(self, namespace: str, name: str) -> Pod | None:
        """``GET /api/v1/namespaces/{namespace}/pods/{name}`` (pods: get); None when gone."""
        try:
            obj = self._call(
                f"get pod {namespace}/{name}", self._core.read_namespaced_pod, name, namespace
            )
        except KubeNotFoundError:
            return None
        return Pod.from_json(obj)

    def patch_pod_annotations(
        self,
        namespace: str,
        name: str,
        annotations: Mapping[str, str | None],
        *,
        uid: str | None = None,
    ) -> bool:
        """``PATCH /api/v1/namespaces/{namespace}/pods/{name}`` (pods: patch), merge patch.

        ``None`` removes a key. With ``uid`` the patch carries it as a
        precondition, so it never lands on a newer pod that took the name.
        Returns False when the pod is gone (404) or is not that pod any more:
        nothing to publish then, not an error. A 409 for another reason is
        retried with bounded backoff (``get``-ing the pod first to tell the two
        apart); when retries run out, :class:`KubeConflictError`.
        """
        _check_annotations(annotations)
        meta: dict[str, Any] = {"annotations": dict(annotations)}
        if uid:
            meta["uid"] = uid
        body = {"metadata": meta}
        what = f"annotate pod {namespace}/{name}"
        for attempt in range(self._retries + 1):
            try:
                self._call(
                    what,
                    self._core.patch_namespaced_pod,
                    name,
                    namespace,
                    body,
                    field_manager=FIELD_MANAGER,
                    _content_type=MERGE_PATCH,
                )
            except KubeNotFoundError:
                return False
            except KubeConflictError:
                if uid:
                    current = self.get_pod(namespace, name)
                    if current is None or current.uid != uid:
                        return False
                if attempt == self._retries:
                    raise
                self._pause(attempt)
            else:
                return True
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def watch_pods_on_node(
        self, node: str, resource_version: str, timeout: int = 300
    ) -> Iterator[WatchEvent]:
        """``GET /api/v1/pods?watch=true&fieldSelector=spec.nodeName={node}`` (pods: watch).

        Yields the pod events after ``resource_version`` (and BOOKMARKs, which
        only move the version on) until the server ends the stream after
        ``timeout`` seconds. Raises :class:`WatchExpiredError` when that version is
        too old: list again and watch from the list's version.
        """
        what = f"watch pods on node {node}"
        try:
            # _preload_content=False: the raw urllib3 response, read line by line.
            resp: Any = self._core.list_pod_for_all_namespaces(
                watch=True,
                field_selector=f"spec.nodeName={node}",
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=int(timeout),
                _preload_content=False,
                # The server closes the stream after timeout_seconds; the read
                # timeout only catches a server that went silent.
                _request_timeout=(self._timeout[0], timeout + self._timeout[1]),
            )
        except ApiException as e:
            raise _error(what, e.status, e.body, e.reason or "") from e
        except urllib3.exceptions.HTTPError as e:
            raise _error(what, None, None, type(e).__name__) from e
        try:
            for line in iter_resp_lines(resp):  # type: ignore[no-untyped-call]
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                    kind, obj = event.get("type"), event.get("object") or {}
                except (ValueError, AttributeError) as e:
                    raise KubeError(f"{what}: malformed watch event", line[:200]) from e
                if kind == "ERROR":
                    raise _error(what, obj.get("code"), json.dumps(obj), str(obj.get("reason", "")))
                if kind == "BOOKMARK":
                    rv = (obj.get("metadata") or {}).get("resourceVersion", "")
                    yield WatchEvent("BOOKMARK", None, rv)
                elif kind in ("ADDED", "MODIFIED", "DELETED"):
                    pod = Pod.from_json(obj)
                    yield WatchEvent(kind, pod, pod.resource_version)
        except urllib3.exceptions.HTTPError as e:
            raise _error(what, None, None, type(e).__name__) from e
        finally:
            resp.release_conn()

    # -- plumbing --

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        """One request; the JSON answer as a dict, or the KubeError for it."""
        try:
            resp = fn(*args, _preload_content=False, _request_timeout=self._timeout, **kwargs)
        except ApiException as e:
            raise _error(what, e.status, e.body, e.reason or "") from e
        except urllib3.exceptions.HTTPError as e:
            raise _error(what, None, None, type(e).__name__) from e
        try:
            data = json.loads(resp.data) if resp.data else {}
        except ValueError as e:
            # e.g. an HTML error page from a proxy in front of the API server
            raise KubeError(
                f"{what}: answer is not JSON", resp.data[:200].decode(errors="replace")
            ) from e
        if not isinstance(data, dict):
            raise KubeError(f"{what}: answer is not a JSON object", str(data)[:200])
        return data

    def _patch(
        self, what: str, fn: Callable[..., Any], name: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        """A merge patch of a node, retried on 409."""
        for attempt in range(self._retries + 1):
            try:
                return self._call(
                    what, fn, name, body, field_manager=FIELD_MANAGER, _content_type=MERGE_PATCH
                )
            except KubeConflictError:
                if attempt == self._retries:
                    raise
                self._pause(attempt)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _pause(self, attempt: int) -> None:
        self._sleep(min(2.0, self._backoff * 2**attempt))


def _check_annotations(annotations: Mapping[str, str | None]) -> None:
    # Catch a bad key here, with its name, rather than as the API server's 422.
    for key, value in annotations.items():
        if not is_qualified_name(key):
            raise ValueError(f"{key!r} is not a valid annotation key")
        if value is not None and not isinstance(value, str):
            raise ValueError(f"annotation {key}: value must be a string or None")
