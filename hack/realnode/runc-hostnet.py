#!/usr/bin/env python3
"""The real test node's runc: every container of a pod shares the host's network namespace.

This is the test cluster's stand-in for a pod network and kube-proxy, and nothing more. It is installed as the
`BinaryName` of containerd's runc runtime on the real node only. On `runc create` it edits the bundle's
config.json:
  - drops the network namespace, so the container uses the host's network (where everything listens on 127.0.0.1
    and nothing routes anywhere else); the pod spec keeps its shape (no hostNetwork field), so Pod Security
    `restricted` judges the pod exactly as a user's cluster would;
  - points the in-cluster API address that the kubelet puts into every container's environment
    (KUBERNETES_SERVICE_HOST/PORT = the `kubernetes` Service) at the API server's real 127.0.0.1 listener, as
    kube-proxy would route it.
Then it runs the real runc with the same arguments. Every other subcommand goes straight through.
The settings are in the environment containerd gives the shim: FLJOB_RUNC, FLJOB_APISERVER_HOST/PORT,
FLJOB_SERVICE_HOST/PORT (written into this file's copy by hack/realnode.sh).
"""
import json
import os
import sys

REAL_RUNC = "@REAL_RUNC@"
SERVICE = ("@SERVICE_HOST@", "@SERVICE_PORT@")
APISERVER = ("@APISERVER_HOST@", "@APISERVER_PORT@")


def bundle_of(argv):
    if "create" not in argv and "run" not in argv:
        return None
    for i, a in enumerate(argv):
        if a in ("--bundle", "-b") and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--bundle="):
            return a.split("=", 1)[1]
    return os.getcwd()


def rewrite(path):
    with open(path) as f:
        spec = json.load(f)
    linux = spec.get("linux") or {}
    linux["namespaces"] = [ns for ns in linux.get("namespaces") or [] if ns.get("type") != "network"]
    env = []
    for item in (spec.get("process") or {}).get("env") or []:
        key, _, value = item.partition("=")
        if key == "KUBERNETES_SERVICE_HOST" and value == SERVICE[0]:
            value = APISERVER[0]
        elif key == "KUBERNETES_SERVICE_PORT" and value == SERVICE[1]:
            value = APISERVER[1]
        env.append(f"{key}={value}")
    if "process" in spec:
        spec["process"]["env"] = env
    tmp = path + ".fljob-tmp"
    with open(tmp, "w") as f:
        json.dump(spec, f)
    os.replace(tmp, path)


def main():
    bundle = bundle_of(sys.argv[1:])
    if bundle:
        config = os.path.join(bundle, "config.json")
        if os.path.exists(config):
            rewrite(config)
    os.execv(REAL_RUNC, [REAL_RUNC] + sys.argv[1:])


if __name__ == "__main__":
    main()
