"""A small threaded fake of the Kubernetes API: just what the KubeRay backend calls, fast enough for several
API processes at once.

kmock (tests/support/kube_api.py) serves the whole API shape but costs ~0.1 s a request once it holds a few dozen
RayJobs (each lookup walks every object through its filters), which starves a test where two replicas poll
dozens of jobs. This one keeps objects in a dict and serves, on a real socket on 127.0.0.1:

- create (POST, 201 or 409 AlreadyExists), get, list with `labelSelector` (equality only), merge-PATCH (also
  of the `status` subresource) and delete of namespaced objects (rayjobs, configmaps, networkpolicies, pods);
- watch (`?watch=true`): the existing objects as ADDED, then every change, chunked, until `timeoutSeconds`.

Every create request is logged with its answer (`creates`), so a test can tell "created once" from "exists
once", and `on_create` lets a test act between creating an object and answering (e.g. kill the caller). It is
no controller: a test plays the operator with `patch_status` (in process, no HTTP).
"""

from __future__ import annotations

import copy
import json
import queue
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

KINDS = {"rayjobs": "RayJob", "configmaps": "ConfigMap", "networkpolicies": "NetworkPolicy", "pods": "Pod"}
Key = tuple[str, str, str]  # (plural, namespace, name)


@dataclass(frozen=True)
class Create:
    """One create request the fake answered: 201 created the object, 409 found the name taken."""

    at: float  # time.monotonic() when answered
    plural: str
    namespace: str
    name: str
    status: int


@dataclass
class _Watch:
    plural: str
    namespace: str
    selector: dict[str, str]
    events: queue.Queue[bytes]


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _selector(text: str) -> dict[str, str]:
    out = {}
    for term in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = term.replace("==", "=").partition("=")
        if not sep or "!" in key:
            raise ValueError(f"only equality selectors are served: {term!r}")
        out[key.strip()] = value.strip()
    return out


def _matches(obj: dict[str, Any], selector: dict[str, str]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code,
            "message": message, "metadata": {}}  # fmt: skip


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the listen backlog: several processes' connection pools connect at once

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A caller killed mid-request (a replica SIGKILLed) is part of the tests, not an error to print.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class FakeKubeApi:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[Key, dict[str, Any]] = {}
        self._version = 0
        self._watches: list[_Watch] = []
        self._creates: list[Create] = []
        self.requests: Counter[tuple[str, str]] = Counter()  # (method, plural or path)
        self._stopping = threading.Event()
        # Called after each create request is decided and before it is answered, with the caller's address.
        self.on_create: Callable[[Create, tuple[str, int]], None] | None = None
        self._server = _Server(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-kube", daemon=True)
        self._thread.start()
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    # -- for the test (in process) ----------------------------------------------------------------------

    def creates(self, plural: str = "rayjobs") -> list[Create]:
        with self._lock:
            return [c for c in self._creates if c.plural == plural]

    def objects(self, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [
                copy.deepcopy(obj)
                for (p, ns, _), obj in self._objects.items()
                if p == plural and namespace in (None, ns)
            ]

    def patch_status(self, plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Play the controller: merge `status` into the object's status (watchers see MODIFIED)."""
        code, body = self.patch((plural, namespace, name), {"status": status})
        assert code == 200, body

    def count(self, method: str, what: str) -> None:
        with self._lock:
            self.requests[(method, what)] += 1

    def watchers(self) -> int:
        with self._lock:
            return len(self._watches)

    # -- the API's verbs --------------------------------------------------------------------------------

    def create(
        self, plural: str, namespace: str, obj: dict[str, Any], client: tuple[str, int] = ("", 0)
    ) -> tuple[int, dict[str, Any]]:
        name = (obj.get("metadata") or {}).get("name") or ""
        with self._lock:
            key = (plural, namespace, name)
            if not name:
                code, body = 422, _status(422, "Invalid", "metadata.name is required")
            elif key in self._objects:
                code, body = 409, _status(409, "AlreadyExists", f'{plural} "{name}" already exists')
            else:
                obj = copy.deepcopy(obj)
                meta = obj.setdefault("metadata", {})
                meta.update(namespace=namespace, uid=str(uuid.uuid4()),
                            creationTimestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))  # fmt: skip
                self._store(key, obj, "ADDED")
                code, body = 201, copy.deepcopy(obj)
            record = Create(time.monotonic(), plural, namespace, name, code)
            self._creates.append(record)
        if self.on_create is not None:
            self.on_create(record, client)
        return code, body

    def get(self, key: Key) -> tuple[int, dict[str, Any]]:
        with self._lock:
            obj = self._objects.get(key)
            return (
                (200, copy.deepcopy(obj)) if obj else (404, _status(404, "NotFound", f"{key[2]} not found"))
            )

    def list(self, plural: str, namespace: str, selector: dict[str, str]) -> dict[str, Any]:
        with self._lock:
            items = [copy.deepcopy(o) for (p, ns, _), o in self._objects.items()
                     if p == plural and ns == namespace and _matches(o, selector)]  # fmt: skip
            return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": str(self._version)},
                    "items": items}  # fmt: skip

    def patch(self, key: Key, patch: Any) -> tuple[int, dict[str, Any]]:
        if not isinstance(patch, dict):
            return 415, _status(415, "UnsupportedMediaType", "only merge patches are served")
        with self._lock:
            obj = self._objects.get(key)
            if obj is None:
                return 404, _status(404, "NotFound", f"{key[2]} not found")
            patch = {k: v for k, v in patch.items() if k != "metadata"} | (
                {"metadata": {k: v for k, v in patch["metadata"].items() if k in ("labels", "annotations")}}
                if isinstance(patch.get("metadata"), dict)
                else {}
            )
            obj = merge_patch(obj, patch)
            self._store(key, obj, "MODIFIED")
            return 200, copy.deepcopy(obj)

    def delete(self, key: Key) -> tuple[int, dict[str, Any]]:
        with self._lock:
            obj = self._objects.pop(key, None)
            if obj is None:
                return 404, _status(404, "NotFound", f"{key[2]} not found")
            self._version += 1
            obj["metadata"]["resourceVersion"] = str(self._version)
            self._broadcast(key, obj, "DELETED")
            return 200, copy.deepcopy(obj)

    def watch(self, plural: str, namespace: str, selector: dict[str, str]) -> tuple[_Watch, list[bytes]]:
        """Register a watch; returns it with the ADDED events of the objects that exist now."""
        w = _Watch(plural, namespace, selector, queue.Queue())
        with self._lock:
            existing = [_event("ADDED", o) for (p, ns, _), o in self._objects.items()
                        if p == plural and ns == namespace and _matches(o, selector)]  # fmt: skip
            self._watches.append(w)
        return w, existing

    def unwatch(self, w: _Watch) -> None:
        with self._lock:
            if w in self._watches:
                self._watches.remove(w)

    # -- under the lock ---------------------------------------------------------------------------------

    def _store(self, key: Key, obj: dict[str, Any], kind: str) -> None:
        self._version += 1
        obj["metadata"]["resourceVersion"] = str(self._version)
        self._objects[key] = obj
        self._broadcast(key, obj, kind)

    def _broadcast(self, key: Key, obj: dict[str, Any], kind: str) -> None:
        event = None
        for w in self._watches:
            if (w.plural, w.namespace) == key[:2] and _matches(obj, w.selector):
                event = event or _event(kind, obj)
                w.events.put(event)


def _event(kind: str, obj: dict[str, Any]) -> bytes:
    return json.dumps({"type": kind, "object": obj}).encode() + b"\n"


def _parse_path(path: str) -> tuple[str, str, str, str] | None:
    """(plural, namespace, name, subresource) of a namespaced object or collection URL, else None."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        rest = parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        rest = parts[3:]
    else:
        return None
    if len(rest) < 3 or rest[0] != "namespaces" or rest[2] not in KINDS or len(rest) > 5:
        return None
    return rest[2], rest[1], rest[3] if len(rest) > 3 else "", rest[4] if len(rest) > 4 else ""


def _handler(api: FakeKubeApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms delayed ACKs

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length) or b"null") if length else None

        def _route(self, method: str) -> None:
            url = urlsplit(self.path)
            body = self._body() if method in ("POST", "PATCH", "PUT", "DELETE") else None
            if url.path.rstrip("/") == "/version" and method == "GET":
                api.count(method, "version")
                return self._reply(200, {"major": "1", "minor": "30", "gitVersion": "v1.30.0-fake"})
            parsed = _parse_path(url.path)
            if parsed is None:
                api.count(method, url.path)
                return self._reply(404, _status(404, "NotFound", f"{url.path} is not served"))
            plural, namespace, name, sub = parsed
            api.count(method, plural)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            key = (plural, namespace, name)
            try:
                selector = _selector(query.get("labelSelector", ""))
            except ValueError as exc:
                return self._reply(400, _status(400, "BadRequest", str(exc)))
            if method == "POST" and not name:
                return self._reply(*api.create(plural, namespace, body or {}, self.client_address))
            if method == "GET" and not name and query.get("watch") in ("true", "True", "1"):
                return self._watch(plural, namespace, selector, float(query.get("timeoutSeconds") or 1800))
            if method == "GET" and not name:
                return self._reply(200, api.list(plural, namespace, selector))
            if method == "GET" and not sub:
                return self._reply(*api.get(key))
            if method == "PATCH" and sub in ("", "status"):
                return self._reply(*api.patch(key, body))
            if method == "DELETE" and not sub:
                return self._reply(*api.delete(key))
            return self._reply(405, _status(405, "MethodNotAllowed", f"{method} {url.path} is not served"))

        def _watch(self, plural: str, namespace: str, selector: dict[str, str], timeout: float) -> None:
            w, existing = api.watch(plural, namespace, selector)
            self.close_connection = True
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.flush()
                deadline = time.monotonic() + timeout
                for event in existing:
                    self._chunk(event)
                while not api._stopping.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        event = w.events.get(timeout=min(left, 0.5))
                    except queue.Empty:
                        continue
                    self._chunk(event)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError, OSError):
                pass  # the client went away (a replica killed mid-watch)
            finally:
                api.unwatch(w)

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def do_PATCH(self) -> None:
            self._route("PATCH")

        def do_DELETE(self) -> None:
            self._route("DELETE")

    return Handler
