"""A small in-memory stand-in for the parts of the Kubernetes API the launcher uses.

It mimics `kubernetes.client.CustomObjectsApi` / `CoreV1Api` method signatures and returns what they return
(dicts for custom objects). Watches are served as a streaming response that the REAL `kubernetes.watch.Watch`
consumes (it blocks until an event, the server-side timeout, or close), so the watch code paths of the handle run
unmodified in unit tests.
"""

from __future__ import annotations

import base64
import copy
import json
import threading
import time
import uuid
from typing import Callable, Dict, List, Optional, Tuple

from kubernetes import client
from kubernetes.client.rest import ApiException

Key = Tuple[str, str, str]  # (kind, namespace, name)


def _merge_patch(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = _merge_patch(result.get(k), v)
    return result


def _now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class FakeCluster:
    def __init__(self):
        self.cond = threading.Condition()
        self.rv = 0
        self.objects: Dict[Key, dict] = {}
        self.events: List[Tuple[int, str, Key, dict]] = []
        self.compacted_rv = 0  # watches starting below this get 410 Gone
        self.calls: List[Tuple[str, str]] = []  # (verb, detail)
        self.patch_hooks: List[Callable[[str, dict], None]] = []
        self.fail_next: Dict[str, ApiException] = {}  # verb -> exception raised once
        self.failing: Dict[str, BaseException] = {}  # verb -> exception raised on every call while it is here
        self.untimed_calls: List[str] = []  # plain API calls made without _request_timeout (must stay empty)
        self.custom = FakeCustomObjectsApi(self)
        self.core = FakeCoreV1Api(self)

    # --- storage ---------------------------------------------------------------------------------------------

    def _record(self, etype: str, key: Key, obj: dict):
        self.events.append((self.rv, etype, key, copy.deepcopy(obj)))
        self.cond.notify_all()

    def _bump(self, obj: dict):
        self.rv += 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.rv)

    def _maybe_fail(self, verb: str):
        exc = self.fail_next.pop(verb, None) or self.failing.get(verb)
        if exc is not None:
            self.calls.append(("failed", verb))
            raise exc

    def create(self, kind: str, ns: str, body: dict) -> dict:
        with self.cond:
            self.calls.append(("create", kind))
            self._maybe_fail(f"create-{kind}")
            name = body["metadata"]["name"]
            key = (kind, ns, name)
            if key in self.objects:
                raise ApiException(status=409, reason="AlreadyExists")
            obj = copy.deepcopy(body)
            meta = obj["metadata"]
            meta["namespace"] = ns
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
            meta["generation"] = 1
            self._bump(obj)
            self.objects[key] = obj
            self._record("ADDED", key, obj)
            return copy.deepcopy(obj)

    def get(self, kind: str, ns: str, name: str) -> dict:
        with self.cond:
            self.calls.append(("get", kind))
            obj = self.objects.get((kind, ns, name))
            if obj is None:
                raise ApiException(status=404, reason="NotFound")
            return copy.deepcopy(obj)

    def replace(self, kind: str, ns: str, name: str, body: dict) -> dict:
        with self.cond:
            self.calls.append(("replace", kind))
            key = (kind, ns, name)
            old = self.objects.get(key)
            if old is None:
                raise ApiException(status=404, reason="NotFound")
            obj = copy.deepcopy(body)
            for f in ("uid", "creationTimestamp", "namespace"):
                obj["metadata"][f] = old["metadata"][f]
            self._bump(obj)
            self.objects[key] = obj
            self._record("MODIFIED", key, obj)
            return copy.deepcopy(obj)

    def patch(self, kind: str, ns: str, name: str, patch: dict, notify=True) -> dict:
        with self.cond:
            self.calls.append(("patch", kind))
            key = (kind, ns, name)
            old = self.objects.get(key)
            if old is None:
                raise ApiException(status=404, reason="NotFound")
            obj = _merge_patch(old, patch)
            if obj.get("spec") != old.get("spec"):
                obj["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
            self._bump(obj)
            self.objects[key] = obj
            self._record("MODIFIED", key, obj)
            result = copy.deepcopy(obj)
        if notify:
            for hook in list(self.patch_hooks):
                hook(name, copy.deepcopy(patch))
        return result

    def delete(self, kind: str, ns: str, name: str):
        with self.cond:
            self.calls.append(("delete", kind))
            key = (kind, ns, name)
            obj = self.objects.pop(key, None)
            if obj is None:
                raise ApiException(status=404, reason="NotFound")
            self._bump(obj)
            self._record("DELETED", key, obj)
            # garbage collection of dependents
            uid = obj["metadata"]["uid"]
            for k, o in list(self.objects.items()):
                owners = o["metadata"].get("ownerReferences") or []
                if any(ref.get("uid") == uid for ref in owners):
                    self.objects.pop(k)
                    self._bump(o)
                    self._record("DELETED", k, o)

    def list(self, kind: str, ns: str, name: Optional[str]) -> dict:
        with self.cond:
            self.calls.append(("list", kind))
            items = [
                copy.deepcopy(o)
                for (k, n, nm), o in sorted(self.objects.items())
                if k == kind and n == ns and (name is None or nm == name)
            ]
            return {"apiVersion": "v1", "kind": "List", "items": items, "metadata": {"resourceVersion": str(self.rv)}}

    # --- test helpers -----------------------------------------------------------------------------------------

    def set_status(self, name: str, status: dict, ns: Optional[str] = None, kind: str = "FLJob"):
        """What the operator does: merge `status` into the FLJob's status."""
        ns = ns or self._ns_of(kind, name)
        return self.patch(kind, ns, name, {"status": status}, notify=False)

    def _ns_of(self, kind: str, name: str) -> str:
        for k, n, nm in self.objects:
            if k == kind and nm == name:
                return n
        raise KeyError(name)

    def fljobs(self) -> List[dict]:
        with self.cond:
            return [copy.deepcopy(o) for (k, _, _), o in self.objects.items() if k == "FLJob"]

    def secret(self, ns: str, name: str) -> Optional[dict]:
        with self.cond:
            o = self.objects.get(("Secret", ns, name))
            return copy.deepcopy(o) if o else None

    def count(self, verb: str, kind: str = "FLJob") -> int:
        return sum(1 for v, k in self.calls if v == verb and k == kind)

    def timed(self, method: str, kwargs: dict):
        if kwargs.get("_request_timeout") is None:
            self.untimed_calls.append(method)

    def later(self, delay: float, fn: Callable, *args):
        t = threading.Timer(delay, fn, args)
        t.daemon = True
        t.start()
        return t


class _WatchResponse:
    """What urllib3 returns for `watch=true` with `_preload_content=False`: a stream of JSON lines."""

    status = 200

    def __init__(self, cluster: FakeCluster, kind: str, ns: str, name: Optional[str], since: int, timeout: float):
        self.cluster = cluster
        self.kind, self.ns, self.name = kind, ns, name
        self.since = since
        self.deadline = time.monotonic() + timeout
        self.closed = False

    def stream(self, amt=None, decode_content=False):
        c = self.cluster
        if self.since < c.compacted_rv:
            err = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}}
            yield (json.dumps(err) + "\n").encode()
            return
        pos = self.since
        while not self.closed:
            with c.cond:
                pending = [e for e in c.events if e[0] > pos]
                if not pending:
                    remaining = self.deadline - time.monotonic()
                    if remaining <= 0:
                        return
                    c.cond.wait(min(remaining, 0.2))
                    continue
            for rv, etype, (kind, ns, name), obj in pending:
                pos = rv
                if kind == self.kind and ns == self.ns and (self.name is None or name == self.name):
                    yield (json.dumps({"type": etype, "object": obj}) + "\n").encode()

    def close(self):
        self.closed = True
        with self.cluster.cond:
            self.cluster.cond.notify_all()

    def release_conn(self):
        pass


def _name_from_selector(field_selector: Optional[str]) -> Optional[str]:
    if not field_selector:
        return None
    for part in field_selector.split(","):
        k, _, v = part.partition("=")
        if k.strip() == "metadata.name":
            return v.strip()
    raise ValueError(f"unsupported field selector {field_selector}")


_PLURAL_KIND = {"fljobs": "FLJob", "flsites": "FLSite"}


class FakeCustomObjectsApi:
    def __init__(self, cluster: FakeCluster):
        self.c = cluster

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kwargs) -> object:
        assert body.get("apiVersion") == f"{group}/{version}"
        self.c.timed("create_namespaced_custom_object", kwargs)
        return self.c.create(_PLURAL_KIND[plural], namespace, body)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs) -> object:
        self.c.timed("get_namespaced_custom_object", kwargs)
        return self.c.get(_PLURAL_KIND[plural], namespace, name)

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body, **kwargs) -> object:
        self.c.timed("patch_namespaced_custom_object", kwargs)
        with self.c.cond:
            self.c._maybe_fail(f"patch-{_PLURAL_KIND[plural]}")
        return self.c.patch(_PLURAL_KIND[plural], namespace, name, body)

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs) -> object:
        self.c.timed("delete_namespaced_custom_object", kwargs)
        with self.c.cond:
            self.c._maybe_fail(f"delete-{_PLURAL_KIND[plural]}")
        self.c.delete(_PLURAL_KIND[plural], namespace, name)
        return {"kind": "Status", "status": "Success"}

    def list_namespaced_custom_object(
        self,
        group,
        version,
        namespace,
        plural,
        field_selector=None,
        watch=None,
        resource_version=None,
        timeout_seconds=None,
        _preload_content=True,
        **kwargs,
    ) -> object:
        kind = _PLURAL_KIND[plural]
        name = _name_from_selector(field_selector)
        self.c.timed("list_namespaced_custom_object", kwargs)
        if watch:
            with self.c.cond:
                self.c.calls.append(("watch", kind))
                self.c._maybe_fail("watch")
                since = int(resource_version) if resource_version else self.c.rv
            return _WatchResponse(self.c, kind, namespace, name, since, timeout_seconds or 3600)
        self.c._maybe_fail("list")
        return self.c.list(kind, namespace, name)


def _secret_dict(body) -> dict:
    if not isinstance(body, dict):
        body = client.ApiClient().sanitize_for_serialization(body)
    body = copy.deepcopy(body)
    data = dict(body.get("data") or {})
    for k, v in (body.pop("stringData", None) or {}).items():
        data[k] = base64.b64encode(str(v).encode()).decode()
    body["data"] = data
    return body


class FakeCoreV1Api:
    def __init__(self, cluster: FakeCluster):
        self.c = cluster

    def create_namespaced_secret(self, namespace, body, **kwargs):
        self.c.timed("create_namespaced_secret", kwargs)
        return self.c.create("Secret", namespace, _secret_dict(body))

    def replace_namespaced_secret(self, name, namespace, body, **kwargs):
        self.c.timed("replace_namespaced_secret", kwargs)
        return self.c.replace("Secret", namespace, name, _secret_dict(body))

    def patch_namespaced_secret(self, name, namespace, body, **kwargs):
        self.c.timed("patch_namespaced_secret", kwargs)
        self.c._maybe_fail("patch-Secret")
        if not isinstance(body, dict):
            body = client.ApiClient().sanitize_for_serialization(body)
        return self.c.patch("Secret", namespace, name, body, notify=False)

    def read_namespaced_secret(self, name, namespace, **kwargs):
        self.c.timed("read_namespaced_secret", kwargs)
        return self.c.get("Secret", namespace, name)

    def delete_namespaced_secret(self, name, namespace, **kwargs):
        self.c.timed("delete_namespaced_secret", kwargs)
        return self.c.delete("Secret", namespace, name)


def secret_values(secret: dict) -> Dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
