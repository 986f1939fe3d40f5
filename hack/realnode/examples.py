#!/usr/bin/env python3
"""The examples/ manifests, made to run on the local cluster's real node (make demo with FLJOB_REAL_NODES=1).

    examples.py --image BUSYBOX_REF examples/site.yaml examples/jobs.yaml | kubectl apply -f -

Reads the manifests (through `kubectl create --dry-run=client -o json`, so no YAML library is needed) and prints
one JSON List in which: the FLSite runs the busybox image's stand-in worker (/bin/fake-worker) with small
resources; each FLJob asks for small resources, selects and tolerates the real node, and carries as stand-in
worker options (`--set`) what its sim.fljob.dev/* annotations ask of kwok: run-seconds -> run_seconds ("never" ->
"forever"), exit-code -> exit_code. Everything else stays as the examples have it.
"""
import argparse
import json
import os
import subprocess

NODE_KEY = "fljob.dev/real-node"


def load(paths):
    d = os.environ.get("FLJOB_CLUSTER_DIR", "/tmp/fljob-cluster")
    kubectl = [os.path.join(d, "bin", "kubectl"), "--kubeconfig", os.path.join(d, "admin.kubeconfig")]
    items = []
    for p in paths:
        out = subprocess.run(kubectl + ["create", "--dry-run=client", "-o", "json", "-f", p], check=True,
                             capture_output=True, text=True).stdout
        # One JSON object per manifest, back to back.
        dec, i = json.JSONDecoder(), 0
        while i < len(out):
            if out[i].isspace():
                i += 1
                continue
            doc, i = dec.raw_decode(out, i)
            items.extend(doc["items"] if doc.get("kind") == "List" else [doc])
    return items


def for_real_node(obj, image):
    obj.get("metadata", {}).pop("namespace", None)  # kubectl's dry run fills in "default"; apply -n decides
    small = {"cpu": "100m", "memory": "64Mi"}
    if obj["kind"] == "FLSite":
        d = obj["spec"].setdefault("defaults", {})
        d.update({"image": image, "pythonPath": "/bin/fake-worker", "resources": small})
        obj["spec"]["capacity"] = {"jobs": obj["spec"].get("capacity", {}).get("jobs", 2)}
    elif obj["kind"] == "FLJob":
        spec = obj["spec"]
        spec["resources"] = small
        tmpl = spec.setdefault("podTemplate", {})
        ann = (tmpl.get("metadata") or {}).get("annotations") or {}
        opts = [o for o in spec.get("options", [])]
        run = ann.get("sim.fljob.dev/run-seconds")
        if run is not None:
            opts.append("run_seconds=" + ("forever" if run == "never" else run.rstrip("s")))
        if "sim.fljob.dev/exit-code" in ann:
            opts.append("exit_code=" + ann["sim.fljob.dev/exit-code"])
        spec["options"] = opts
        pspec = tmpl.setdefault("spec", {})
        pspec.setdefault("nodeSelector", {})[NODE_KEY] = "true"
        pspec.setdefault("tolerations", []).append({"key": NODE_KEY, "operator": "Equal", "value": "true", "effect": "NoSchedule"})
    return obj


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", required=True)
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    items = [for_real_node(o, a.image) for o in load(a.files)]
    print(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}, indent=1))


if __name__ == "__main__":
    main()
