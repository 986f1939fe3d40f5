"""Counts every Kubernetes API request a process makes through the official Python client (e2e measurements).

Active only when FLJOB_E2E_API_LOG names a file: then `kubernetes.client.ApiClient.call_api` is wrapped at
interpreter start-up (this directory is put on the PYTHONPATH of the NVFlare client parent), and each request
appends one JSON line {"t", "method", "path", "name", "watch"} to that file. A watch is one request, as it is for
the API server. Nothing else changes: the call goes through unmodified.
"""

import json
import os
import threading
import time

_LOG = os.environ.get("FLJOB_E2E_API_LOG")


def _install(log_path):
    from kubernetes.client import api_client

    original = api_client.ApiClient.call_api
    if getattr(original, "_fljob_e2e_counted", False):
        return
    lock = threading.Lock()

    def call_api(self, resource_path, method, path_params=None, query_params=None, *args, **kwargs):
        params = dict(path_params or {})
        query = dict(query_params or []) if query_params else {}
        rec = {
            "t": time.time(),
            "method": method,
            "path": resource_path,
            "name": params.get("name"),
            "watch": bool(query.get("watch")),
        }
        with lock:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        return original(self, resource_path, method, path_params, query_params, *args, **kwargs)

    call_api._fljob_e2e_counted = True
    api_client.ApiClient.call_api = call_api


if _LOG:
    try:
        _install(_LOG)
    except Exception as e:  # never break the process being measured
        print(f"[apicount] not counting Kubernetes API requests: {e}")
