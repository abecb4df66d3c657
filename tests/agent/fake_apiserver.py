"""A local stand-in for the Kubernetes API server, for the agent's client tests.

Serves Nodes and Pods of the core group on 127.0.0.1 (random port, a thread)
in the real API's shapes, so ``KubeClient`` is tested through the official
client and real HTTP rather than mocks:

* ``GET`` of one object; ``GET`` of a collection with ``fieldSelector``,
  ``limit``/``continue``; ``watch=true`` streams of ``{"type", "object"}``
  lines (chunked), with BOOKMARKs and the 410 ``Expired`` ERROR event for a
  compacted resourceVersion.
* ``PATCH`` as JSON merge patch (RFC 7386), strategic merge patch (maps only:
  lists and ``$patch`` directives are refused rather than merged wrongly) and
  JSON patch (RFC 6902). The status subresource changes only ``status``; the
  object itself never does (what the real strategies do). ``metadata.uid`` and
  ``metadata.resourceVersion`` in a patch are preconditions (409). An
  unchanged object keeps its resourceVersion and emits no event.
* Errors as ``Status`` objects (404, 401, 403, 405, 409, 410, 415, 422).
* Every object written is validated against the Kubernetes OpenAPI schema
  of :data:`SCHEMA_VERSION` (``kubernetes-validate``, strict: no unknown
  fields) plus the rules the schema cannot express (annotation keys and
  size, resource names, quantity syntax); a bad one is answered 422 and
  kept in :attr:`FakeAPIServer.rejected`.
* Every request is recorded (verb, path, query, content type, body, status)
  and, given the rules of a ClusterRole, authorized like RBAC would (403).
"""

from __future__ import annotations

import base64
import copy
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kubernetes_validate

SCHEMA_VERSION = "1.34"  # the Kubernetes minor whose OpenAPI schema objects must satisfy

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
JSONPATCH = "application/json-patch+json"

_QUANTITY_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?\d+)?$")
_NAME_RE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_STANDARD_RESOURCES = {"cpu", "memory", "pods", "ephemeral-storage", "storage"}
_POD_FIELDS = {"metadata.name", "metadata.namespace", "spec.nodeName", "status.phase"}
_NODE_FIELDS = {"metadata.name", "spec.unschedulable"}


@dataclass(frozen=True)
class Recorded:
    """One request as the server saw it."""

    method: str
    path: str
    query: Mapping[str, str]
    content_type: str
    body: Any
    status: int

    @property
    def rbac(self) -> tuple[str, str]:
        """(verb, resource) as the RBAC authorizer names this request."""
        return rbac_attributes(self.method, self.path, self.query)


class ApiError(Exception):
    """Answered as a Status object."""

    def __init__(self, code: int, reason: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict[str, Any]:
        st: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            st["details"] = self.details
        return st


def rbac_attributes(method: str, path: str, query: Mapping[str, str]) -> tuple[str, str]:
    """The (verb, resource) RBAC checks for a core-group request on this server."""
    parts = [p for p in path.split("/") if p][2:]  # drop "api", "v1"
    if parts[:1] == ["namespaces"] and len(parts) >= 3:
        parts = parts[2:]
    resource = parts[0] if parts else ""
    named = len(parts) >= 2
    if len(parts) >= 3:
        resource = f"{parts[0]}/{parts[2]}"
    if method == "GET":
        verb = "get" if named else ("watch" if query.get("watch") in ("true", "1") else "list")
    else:
        verb = {
            "PATCH": "patch",
            "PUT": "update",
            "POST": "create",
            "DELETE": "delete" if named else "deletecollection",
        }.get(method, method.lower())
    return verb, resource


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeAPIServer:
    """Nodes and Pods behind HTTP on 127.0.0.1. Use as a context manager.

    ``token``: require ``Authorization: Bearer <token>``. ``rbac_rules``: the
    ``rules`` of a ClusterRole; requests they do not allow get 403.
    ``max_watch_seconds`` bounds any watch, whatever the client asks.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        rbac_rules: Sequence[Mapping[str, Any]] | None = None,
        max_watch_seconds: float = 10.0,
    ) -> None:
        self.token = token
        self.rbac_rules = rbac_rules
        self.max_watch_seconds = max_watch_seconds
        self.requests: list[Recorded] = []
        self.rejected: list[tuple[dict[str, Any], str]] = []  # (object, why) refused with 422
        self._nodes: dict[str, dict[str, Any]] = {}
        self._pods: dict[tuple[str, str], dict[str, Any]] = {}
        self._rv = 100
        self._compacted = 0  # watches from an older resourceVersion get 410
        self._events: list[tuple[int, str, str, dict[str, Any]]] = []  # (rv, kind, type, object)
        self._faults: list[tuple[str, re.Pattern[str], int, int]] = []  # method, path, code, left
        self._raw: list[tuple[str, re.Pattern[str], int, bytes]] = []  # method, path, code, body
        self._cond = threading.Condition()
        self._closing = False
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --

    def __enter__(self) -> FakeAPIServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        handler = type("Handler", (_Handler,), {"api": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    @property
    def url(self) -> str:
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    # -- test-side state (not recorded as requests) --

    def add_node(
        self,
        name: str,
        *,
        capacity: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        cap = {"cpu": "2", "memory": "8Gi", "pods": "110", **(capacity or {})}
        obj: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"},
                "annotations": dict(annotations or {}),
            },
            "spec": {},
            "status": {"capacity": cap, "allocatable": dict(cap), "phase": "Running"},
        }
        with self._cond:
            self._create("Node", obj)
            self._nodes[name] = obj
            return copy.deepcopy(obj)

    def add_pod(
        self,
        namespace: str,
        name: str,
        node: str,
        *,
        annotations: Mapping[str, str] | None = None,
        phase: str = "Running",
    ) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "annotations": dict(annotations or {}),
            },
            "spec": {
                "nodeName": node,
                "containers": [{"name": "app", "image": "registry.test/app:1"}],
            },
            "status": {"phase": phase},
        }
        with self._cond:
            self._create("Pod", obj)
            self._pods[(namespace, name)] = obj
            return copy.deepcopy(obj)

    def delete_pod(self, namespace: str, name: str) -> None:
        with self._cond:
            obj = self._pods.pop((namespace, name))
            obj["metadata"]["resourceVersion"] = str(self._bump())
            self._emit("Pod", "DELETED", obj)

    def edit_pod(self, namespace: str, name: str, change: Callable[[dict[str, Any]], None]) -> None:
        """Someone else's write (kubelet, a user): bumps resourceVersion, emits MODIFIED."""
        with self._cond:
            obj = self._pods[(namespace, name)]
            change(obj)
            obj["metadata"]["resourceVersion"] = str(self._bump())
            self._emit("Pod", "MODIFIED", obj)

    def node(self, name: str) -> dict[str, Any]:
        with self._cond:
            return copy.deepcopy(self._nodes[name])

    def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._cond:
            obj = self._pods.get((namespace, name))
            return copy.deepcopy(obj) if obj else None

    @property
    def resource_version(self) -> str:
        with self._cond:
            return str(self._rv)

    def compact(self) -> None:
        """Forget history: watches from any version before now get 410 Expired."""
        with self._cond:
            self._compacted = self._rv
            self._events.clear()

    def fail(self, method: str, path_regex: str, code: int, times: int = 1) -> None:
        """Answer the next ``times`` matching requests with ``code`` (e.g. 409, 500)."""
        with self._cond:
            self._faults.append((method, re.compile(path_regex), code, times))

    def reply_raw(self, method: str, path_regex: str, body: bytes, code: int = 200) -> None:
        """Answer the next matching request with ``body`` as is (a proxy's page, garbage)."""
        with self._cond:
            self._raw.append((method, re.compile(path_regex), code, body))

    def rbac_used(self) -> set[tuple[str, str]]:
        """(verb, resource) of every request the server saw."""
        return {r.rbac for r in self.requests}

    # -- internals, called with self._cond held --

    def _bump(self) -> int:
        self._rv += 1
        return self._rv

    def _create(self, kind: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        meta.setdefault("uid", str(uuid.uuid4()))
        meta["creationTimestamp"] = _now()
        meta["resourceVersion"] = str(self._bump())
        problem = validate_object(obj)
        if problem:
            raise ValueError(f"test seeded an invalid {kind}: {problem}")
        self._emit(kind, "ADDED", obj)

    def _store(self, kind: str) -> dict[Any, dict[str, Any]]:
        return self._nodes if kind == "Node" else self._pods

    def _emit(self, kind: str, type_: str, obj: dict[str, Any]) -> None:
        self._events.append(
            (int(obj["metadata"]["resourceVersion"]), kind, type_, copy.deepcopy(obj))
        )
        self._cond.notify_all()

    def _injected(self, method: str, path: str) -> tuple[int, bytes] | None:
        """A raw reply or a fault (raised) set up for this request, if any."""
        for i, (m, rx, raw_code, raw) in enumerate(self._raw):
            if m == method and rx.search(path):
                del self._raw[i]
                return raw_code, raw
        code = self._take_fault(method, path)
        if code is not None:
            reason = {409: "Conflict", 500: "InternalError", 429: "TooManyRequests"}.get(
                code, "Fault"
            )
            raise ApiError(code, reason, f"injected {code} for {method} {path}")
        return None

    def _take_fault(self, method: str, path: str) -> int | None:
        for i, (m, rx, code, left) in enumerate(self._faults):
            if m == method and rx.search(path):
                if left <= 1:
                    del self._faults[i]
                else:
                    self._faults[i] = (m, rx, code, left - 1)
                return code
        return None

    def _authorize(self, method: str, path: str, query: Mapping[str, str], headers: Any) -> None:
        if self.token is not None and headers.get("Authorization") != f"Bearer {self.token}":
            raise ApiError(401, "Unauthorized", "Unauthorized")
        if self.rbac_rules is None:
            return
        verb, resource = rbac_attributes(method, path, query)
        for rule in self.rbac_rules:
            if (
                set(rule.get("apiGroups", ())) & {"", "*"}
                and set(rule.get("resources", ())) & {resource, "*"}
                and set(rule.get("verbs", ())) & {verb, "*"}
            ):
                return
        raise ApiError(
            403,
            "Forbidden",
            f'{resource} is forbidden: User "system:serviceaccount:cni-netkit:cni-netkit" '
            f'cannot {verb} resource "{resource}" in API group ""',
        )

    # -- request handling --

    def handle(
        self, method: str, path: str, query: Mapping[str, str], headers: Any, body: bytes
    ) -> Any:
        """Serve one request: a (status, object) pair, or a watch iterator of lines."""
        with self._cond:
            self._authorize(method, path, query, headers)
            injected = self._injected(method, path)
        if injected is not None:
            return injected

        return self._route(method, path, query, headers, body)

    def _route(
        self, method: str, path: str, query: Mapping[str, str], headers: Any, body: bytes
    ) -> Any:
        # (kind, namespace, name, status subresource?) of a single object
        m = re.fullmatch(r"/api/v1/nodes/([^/]+)(/status)?", path)
        one = ("Node", None, m[1], m[2] is not None) if m else None
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)(/status)?", path)
        one = ("Pod", m[1], m[2], m[3] is not None) if m else one
        if one is not None:
            kind, namespace, name, status = one
            if method == "GET" and not status:
                return 200, self._get(kind, name, namespace)
            if method == "PATCH":
                key = (name,) if namespace is None else (namespace, name)
                return 200, self._patch(kind, key, status, headers, body)
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {path}")
        m = re.fullmatch(r"/api/v1(?:/namespaces/([^/]+))?/(pods|nodes)", path)
        if not m or method != "GET":
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        kind = "Pod" if m[2] == "pods" else "Node"
        match = self._selector(kind, query.get("fieldSelector", ""), m[1])
        if query.get("watch") in ("true", "1"):
            return self._watch(kind, match, query)
        return 200, self._list(kind, match, query)

    def _get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        with self._cond:
            obj = (
                self._nodes.get(name) if kind == "Node" else self._pods.get((namespace or "", name))
            )
            if obj is None:
                raise ApiError(
                    404,
                    "NotFound",
                    f'{kind.lower()}s "{name}" not found',
                    name=name,
                    kind=f"{kind.lower()}s",
                )
            return copy.deepcopy(obj)

    def _selector(
        self, kind: str, selector: str, namespace: str | None
    ) -> Callable[[dict[str, Any]], bool]:
        allowed = _POD_FIELDS if kind == "Pod" else _NODE_FIELDS
        terms: list[tuple[str, bool, str]] = []
        for term in filter(None, selector.split(",")):
            m = re.fullmatch(r"([A-Za-z.]+)(!=|==|=)(.*)", term)
            if not m:
                raise ApiError(400, "BadRequest", f"invalid field selector: {term!r}")
            if m[1] not in allowed:
                raise ApiError(400, "BadRequest", f'field label not supported: "{m[1]}"')
            terms.append((m[1], m[2] != "!=", m[3]))

        def field(obj: dict[str, Any], dotted: str) -> str:
            cur: Any = obj
            for part in dotted.split("."):
                cur = cur.get(part, "") if isinstance(cur, dict) else ""
            return str(cur)

        def match(obj: dict[str, Any]) -> bool:
            if namespace is not None and obj["metadata"].get("namespace") != namespace:
                return False
            return all((field(obj, f) == v) == eq for f, eq, v in terms)

        return match

    def _list(
        self, kind: str, match: Callable[[dict[str, Any]], bool], query: Mapping[str, str]
    ) -> dict[str, Any]:
        with self._cond:
            store = self._store(kind)
            items = [
                copy.deepcopy(o)
                for _, o in sorted(store.items(), key=lambda kv: str(kv[0]))
                if match(o)
            ]
            rv, start = self._rv, 0
            if query.get("continue"):
                try:
                    token = json.loads(base64.urlsafe_b64decode(query["continue"]))
                    rv, start = int(token["rv"]), int(token["start"])
                except (ValueError, KeyError) as e:
                    raise ApiError(400, "BadRequest", f"invalid continue token: {e}") from e
                if rv < self._compacted:
                    raise ApiError(410, "Expired", "The provided continue parameter is too old")
        for item in items:  # list items carry no kind/apiVersion, as the real server's
            item.pop("kind", None)
            item.pop("apiVersion", None)
        limit = int(query.get("limit") or 0)
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        page = items[start:]
        if limit and len(page) > limit:
            page = page[:limit]
            token = json.dumps({"rv": rv, "start": start + limit}).encode()
            meta["continue"] = base64.urlsafe_b64encode(token).decode()
        return {"kind": f"{kind}List", "apiVersion": "v1", "metadata": meta, "items": page}

    def _watch(
        self, kind: str, match: Callable[[dict[str, Any]], bool], query: Mapping[str, str]
    ) -> Iterator[bytes]:
        timeout = min(
            float(query.get("timeoutSeconds") or self.max_watch_seconds), self.max_watch_seconds
        )
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        rv_param = query.get("resourceVersion", "")

        def line(type_: str, obj: dict[str, Any]) -> bytes:
            return json.dumps({"type": type_, "object": obj}).encode() + b"\n"

        def stream() -> Iterator[bytes]:
            deadline = time.monotonic() + timeout
            with self._cond:
                if rv_param in ("", "0"):
                    # "Any version": the current state as synthetic ADDED events first.
                    store = self._store(kind)
                    initial = [copy.deepcopy(o) for o in store.values() if match(o)]
                    since = self._rv
                else:
                    since = int(rv_param)
                    initial = []
                    if since < self._compacted:
                        gone = ApiError(
                            410, "Expired", f"too old resource version: {since} ({self._compacted})"
                        ).status()
                        yield line("ERROR", gone)
                        return
            for obj in initial:
                yield line("ADDED", obj)
            while True:
                with self._cond:
                    pending = [
                        (rv, t, o)
                        for rv, k, t, o in self._events
                        if rv > since and k == kind and match(o)
                    ]
                    if not pending:
                        left = deadline - time.monotonic()
                        if left <= 0 or self._closing:
                            end = self._rv
                            break
                        self._cond.wait(min(left, 0.2))
                        continue
                for rv, t, o in pending:
                    since = rv
                    yield line(t, o)
            if bookmarks:
                yield line(
                    "BOOKMARK",
                    {"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": str(end)}},
                )

        return stream()

    def _patch(
        self, kind: str, key: tuple[str, ...], status: bool, headers: Any, body: bytes
    ) -> dict[str, Any]:
        ctype = (headers.get("Content-Type") or "").split(";")[0].strip()
        try:
            patch = json.loads(body or b"null")
        except ValueError as e:
            raise ApiError(400, "BadRequest", f"invalid JSON in patch body: {e}") from e
        with self._cond:
            store = self._store(kind)
            k: Any = key[0] if kind == "Node" else key
            old = store.get(k)
            if old is None:
                name = key[-1]
                raise ApiError(404, "NotFound", f'{kind.lower()}s "{name}" not found', name=name)
            new = _apply(ctype, copy.deepcopy(old), patch)
            _check_preconditions(kind, key[-1], new.get("metadata") or {}, old["metadata"])
            old_meta = old["metadata"]
            # What the registry strategies do: the status subresource changes
            # status only, the object itself everything but status.
            if status:
                result = copy.deepcopy(old)
                result["status"] = new.get("status", {})
            else:
                result = new
                result["status"] = copy.deepcopy(old.get("status", {}))
                for immutable in ("name", "namespace", "uid", "creationTimestamp"):
                    if immutable in old_meta:
                        result["metadata"][immutable] = old_meta[immutable]
            problem = validate_object(result)
            if problem:
                self.rejected.append((result, problem))
                raise ApiError(422, "Invalid", f'{kind} "{key[-1]}" is invalid: {problem}')
            if result == old:
                return copy.deepcopy(old)  # a no-op write keeps its version and emits nothing
            result["metadata"]["resourceVersion"] = str(self._bump())
            store[k] = result
            self._emit(kind, "MODIFIED", result)
            return copy.deepcopy(result)


# --- patch semantics -----------------------------------------------------------------


def _apply(ctype: str, target: dict[str, Any], patch: Any) -> dict[str, Any]:
    if ctype == MERGE:
        new = merge_patch(target, patch)
    elif ctype == STRATEGIC:
        new = strategic_merge_patch(target, patch)
    elif ctype == JSONPATCH:
        new = json_patch(target, patch)
    else:
        raise ApiError(
            415,
            "UnsupportedMediaType",
            f'the body of the request was in an unknown format: "{ctype}"',
        )
    if not isinstance(new, dict):
        raise ApiError(422, "Invalid", "patch replaced the whole object")
    return new


def _check_preconditions(
    kind: str, name: str, meta: Mapping[str, Any], old_meta: Mapping[str, Any]
) -> None:
    """uid and resourceVersion left in the patched object must be the stored ones."""
    if meta.get("uid") != old_meta["uid"]:
        raise ApiError(
            409,
            "Conflict",
            f"Precondition failed: UID in precondition: {meta.get('uid')}, "
            f"UID in object meta: {old_meta['uid']}",
        )
    if meta.get("resourceVersion") != old_meta["resourceVersion"]:
        raise ApiError(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {kind.lower()}s "{name}": the object has been'
            " modified; please apply your changes to the latest version and try again",
        )


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, ``null`` removes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if not isinstance(target, dict):
        target = {}
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = merge_patch(target.get(key), value)
    return target


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Strategic merge for what the agent could send: maps behave as in a merge patch.

    Lists (merged by per-field keys in the real server) and ``$patch``-style
    directives are refused, so a client relying on them fails here loudly
    instead of passing against a wrong imitation.
    """

    def refuse_lists(p: Any) -> None:
        if isinstance(p, list):
            raise ApiError(
                400, "BadRequest", "fake API server: strategic merge of lists is not implemented"
            )
        if isinstance(p, dict):
            for k, v in p.items():
                if k.startswith("$"):
                    raise ApiError(
                        400, "BadRequest", f"fake API server: directive {k} not implemented"
                    )
                refuse_lists(v)

    if not isinstance(patch, dict):
        raise ApiError(400, "BadRequest", "strategic merge patch must be a JSON object")
    refuse_lists(patch)
    return merge_patch(target, patch)


def json_patch(target: Any, ops: Any) -> Any:
    """RFC 6902 add/remove/replace/test on object members, with ``~1``/``~0`` unescaping."""
    if not isinstance(ops, list):
        raise ApiError(
            400, "BadRequest", "json: cannot unmarshal object into Go value of type jsonpatch.Patch"
        )
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise ApiError(400, "BadRequest", f"invalid JSON patch operation: {op!r}")
        parent, last = _parent_of(target, op["path"])
        kind, value = op["op"], copy.deepcopy(op.get("value"))
        if kind not in ("add", "remove", "replace", "test"):
            raise ApiError(422, "Invalid", f"unsupported JSON patch operation {kind!r}")
        if kind in ("remove", "replace") and last not in parent:
            raise ApiError(422, "Invalid", f"doc is missing key: {op['path']}: missing value")
        if kind == "test" and parent.get(last) != value:
            raise ApiError(422, "Invalid", f"testing value {op['path']} failed: test failed")
        if kind == "remove":
            del parent[last]
        elif kind in ("add", "replace"):
            parent[last] = value
    return target


def _parent_of(target: Any, pointer: str) -> tuple[dict[str, Any], str]:
    """The object holding the member a JSON pointer names, and the member's key."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
    if not parts:
        raise ApiError(422, "Invalid", "JSON patch on the whole document is not supported")
    parent: Any = target
    for part in parts[:-1]:
        parent = parent.get(part) if isinstance(parent, dict) else None
        if parent is None:
            raise ApiError(422, "Invalid", f"doc is missing path: {pointer}")
    if not isinstance(parent, dict):
        raise ApiError(422, "Invalid", f"fake API server: list paths not implemented: {pointer}")
    return parent, parts[-1]


# --- validation ---------------------------------------------------------------------------


def is_qualified_name(name: str) -> bool:
    prefix, slash, local = name.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _SUBDOMAIN_RE.match(prefix)):
        return False
    return 0 < len(local) <= 63 and bool(_NAME_RE.match(local))


def _resource_name_ok(name: str) -> bool:
    if name in _STANDARD_RESOURCES or name.startswith("hugepages-"):
        return True
    return "/" in name and is_qualified_name(name)


def validate_object(obj: Mapping[str, Any]) -> str | None:
    """Why the API server would refuse ``obj``, or None: schema plus ObjectMeta/Node rules."""
    try:
        kubernetes_validate.validate(dict(obj), SCHEMA_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path)
        return f"schema {SCHEMA_VERSION}: {where}: {e.message}"
    return _annotations_problem(obj) or _resources_problem(obj)


def _annotations_problem(obj: Mapping[str, Any]) -> str | None:
    # The schema says "map of string"; ObjectMeta validation adds keys and size.
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    size = 0
    for key, value in annotations.items():
        if not is_qualified_name(key):
            return f"metadata.annotations: Invalid value: {key!r}: not a qualified name"
        if not isinstance(value, str):
            return f"metadata.annotations[{key}]: must be a string, not {type(value).__name__}"
        size += len(key) + len(value)
    if size > 256 * 1024:
        return "metadata.annotations: Too long: must have at most 262144 bytes"
    return None


def _resources_problem(obj: Mapping[str, Any]) -> str | None:
    # Node validation: resource names and quantity syntax the schema leaves open.
    status = obj.get("status") or {}
    for field in ("capacity", "allocatable"):
        for name, qty in (status.get(field) or {}).items():
            if not _resource_name_ok(name):
                return f"status.{field}[{name}]: Invalid value: not a valid resource name"
            if not isinstance(qty, str | int) or not _QUANTITY_RE.match(str(qty)):
                return f"status.{field}[{name}]: Invalid value: {qty!r}: not a quantity"
    return None


# --- HTTP ---------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    api: FakeAPIServer
    protocol_version = "HTTP/1.1"  # keep-alive and chunked watches, like the real server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the test output is for the tests

    def _serve(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        try:
            answer = self.api.handle(self.command, url.path, query, self.headers, raw)
        except ApiError as e:
            self._record(url.path, query, ctype, body, e.code)
            self._json(e.code, e.status())
            return
        self._record(url.path, query, ctype, body, 200)
        if isinstance(answer, tuple):
            self._json(*answer)
        else:
            self._chunked(answer)

    do_GET = do_PATCH = do_PUT = do_POST = do_DELETE = _serve  # noqa: N815 - http.server's names

    def _record(
        self, path: str, query: Mapping[str, str], ctype: str, body: Any, code: int
    ) -> None:
        with self.api._cond:
            self.api.requests.append(Recorded(self.command, path, dict(query), ctype, body, code))

    def _json(self, code: int, obj: Any) -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chunked(self, lines: Iterator[bytes]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for chunk in lines:
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away mid-watch
