#!/usr/bin/env python3
"""Splits create -> pod into its steps, seen from outside the operator (issue 12).

Watches FLJobs, FLSites and pods in every namespace through `kubectl get --watch` and stamps each change on
arrival. For every FLJob whose name starts with PREFIX, it prints the percentiles of:
  create -> checked       the operator's finalizer appears (its Secrets and site were read, the finalizer patched)
  checked -> ledger       the site's status lists the job's allocation (the ledger's pace, its plan and its write)
  ledger -> status        the job's status names its pod (its reconcile after the site's change)
  status -> pod           the worker pod appears (the pod POST)
  create -> pod           all of it

Run it beside a bench (it reads the cluster's admin kubeconfig from KUBECONFIG), stop it with Ctrl-C or
--seconds, e.g.:
  hack/admission-probe.py --prefix paced- --seconds 600 &
  cargo bench --locked --bench scale -- --n 1000 --skip raw,queued,admission,poll,steady
"""
import argparse
import json
import subprocess
import sys
import threading
import time

FINALIZER = "fljob.dev/cleanup"


def watch(kind, on_change, stop):
    cmd = ["kubectl", "get", kind, "-A", "--watch", "--output-watch-events", "-o", "json"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    dec = json.JSONDecoder()
    buf = ""
    while not stop.is_set():
        line = p.stdout.readline()
        if not line:
            break
        buf += line
        try:
            ev, end = dec.raw_decode(buf.lstrip())
        except json.JSONDecodeError:
            continue
        buf = ""
        on_change(time.monotonic(), ev.get("type"), ev.get("object") or {})
    p.terminate()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefix", default="paced-", help="which FLJobs to measure, by name prefix")
    ap.add_argument("--seconds", type=float, default=600, help="how long to watch")
    a = ap.parse_args()
    seen = {}  # (ns, job) -> {step: t}
    lock = threading.Lock()

    def stamp(ns, job, step, t):
        with lock:
            seen.setdefault((ns, job), {}).setdefault(step, t)

    def on_job(t, typ, o):
        m = o.get("metadata", {})
        name, ns = m.get("name", ""), m.get("namespace", "")
        if not name.startswith(a.prefix):
            return
        if typ == "ADDED":
            stamp(ns, name, "created", t)
        if FINALIZER in (m.get("finalizers") or []):
            stamp(ns, name, "checked", t)
        st = o.get("status") or {}
        if st.get("podName") or st.get("phase") not in (None, "", "Pending"):  # the admission's own write
            stamp(ns, name, "status", t)

    def on_site(t, typ, o):
        ns = o.get("metadata", {}).get("namespace", "")
        for al in (o.get("status") or {}).get("allocations") or []:
            job = al.get("job", "")
            if job.startswith(a.prefix):
                stamp(ns, job, "ledger", t)

    def on_pod(t, typ, o):
        m = o.get("metadata", {})
        job = (m.get("labels") or {}).get("fljob.dev/job", "")
        if job.startswith(a.prefix) and typ == "ADDED":
            stamp(m.get("namespace", ""), job, "pod", t)

    stop = threading.Event()
    for kind, fn in (("fljobs", on_job), ("flsites", on_site), ("pods", on_pod)):
        threading.Thread(target=watch, args=(kind, fn, stop), daemon=True).start()
    try:
        time.sleep(a.seconds)
    except KeyboardInterrupt:
        pass
    stop.set()

    steps = [("create -> checked", "created", "checked"), ("checked -> ledger", "checked", "ledger"),
             ("ledger -> status", "ledger", "status"), ("status -> pod", "status", "pod"),
             ("create -> pod", "created", "pod")]
    with lock:
        full = [s for s in seen.values() if all(k in s for k in ("created", "checked", "ledger", "status", "pod"))]
    print(f"{len(full)} jobs named {a.prefix}* seen through every step (of {len(seen)} seen)")
    if not full:
        sys.exit(1)
    print("| step | p50 ms | p90 ms | p99 ms | max ms |\n|---|---|---|---|---|")
    for label, a0, b0 in steps:
        d = sorted((s[b0] - s[a0]) * 1000 for s in full)
        q = lambda p: d[min(len(d) - 1, int(p * len(d)))]
        print(f"| {label} | {q(0.5):.0f} | {q(0.9):.0f} | {q(0.99):.0f} | {d[-1]:.0f} |")


if __name__ == "__main__":
    main()
