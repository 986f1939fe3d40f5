"""Counts every Kubernetes API request a process makes through the official Python client (e2e measurements).

Active only when FLJOB_E2E_API_LOG names a file: then `kubernetes.client.ApiClient.call_api` is wrapped at
interpreter start-up (this directory is put on the PYTHONPATH of the NVFlare client parent), and each request
appends one JSON line {"t", "method", "path", "watch"} to that file. A watch is one request, as it is for
the API server. Nothing else changes: the call goes through unmodified.
"""

import json
import os
import threading
import time
import urllib.parse

_LOG = os.environ.get("FLJOB_E2E_API_LOG")


def _install(log_path):
    from kubernetes.client import api_client

    original = api_client.ApiClient.call_api
    if getattr(original, "_fljob_e2e_counted", False):
        return
    lock = threading.Lock()

    methods = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}

    def call_api(self, *args, **kwargs):
        # kubernetes >= 31: call_api(method, url, ...) with the URL complete; older: call_api(resource_path, method,
        # path_params, query_params, ...) with a path template.
        a0, a1 = (list(args) + [None, None])[:2]
        if isinstance(a0, str) and a0.upper() in methods:
            method, url, query = a0, urllib.parse.urlsplit(a1 or ""), None
            path, query = url.path, dict(urllib.parse.parse_qsl(url.query))
        else:
            method, path = a1 or kwargs.get("method"), a0 or kwargs.get("resource_path") or ""
            for k, v in (args[2] if len(args) > 2 and args[2] else kwargs.get("path_params") or {}).items():
                path = path.replace("{" + k + "}", str(v))
            q = args[3] if len(args) > 3 else kwargs.get("query_params")
            query = dict(q or [])
        rec = {"t": time.time(), "method": str(method).upper(), "path": path,
               "watch": str(query.get("watch", "")).lower() in ("true", "1")}
        with lock:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        return original(self, *args, **kwargs)

    call_api._fljob_e2e_counted = True
    api_client.ApiClient.call_api = call_api


if _LOG:
    try:
        _install(_LOG)
    except Exception as e:  # never break the process being measured
        print(f"[apicount] not counting Kubernetes API requests: {e}")
