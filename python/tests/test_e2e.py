"""Issue 10, end to end on the real node: real NVFlare 2.9.0 jobs -> FLJobLauncher -> FLJob -> fljob-operator ->
worker Pod (real container, real NVFlare worker) -> FLJob status -> NVFlare; and the same job through NVFlare's
stock ClientK8sJobLauncher on the same cluster, compared.

Needs (else skipped; FAILS instead when FLJOB_REQUIRE_REAL_NODE=1):
  FLJOB_TEST_KUBECONFIG  admin kubeconfig of hack/cluster.sh (FLJOB_REAL_NODES=1)
  FLJOB_OPERATOR_BIN     the fljob-operator binary
  FLJOB_REAL_NODE        the real node's name (labelled and tainted fljob.dev/real-node=true)
  FLJOB_IMAGE_WORKER     the worker image ref, imported into the node (hack/images.sh import ... worker)
Optional: FLJOB_TOOLS_BIN (kubectl), FLJOB_E2E_DIR (work dir; default a pytest tmp dir).

Two NVFlare projects run on 127.0.0.1 (python/e2e/poc.py): "fljob" (client site-1, launcher FLJobLauncher,
namespace A, FLSite site-a, the operator running for A) and "stock" (client site-2, launcher ClientK8sJobLauncher,
namespace B). Each client parent's Kubernetes client talks as its own ServiceAccount, with the RBAC its launcher
documents / needs. Every API request a parent makes is counted by wrapping kubernetes' ApiClient.call_api
(python/e2e/apicount/sitecustomize.py); the operator's are its own fljob_api_requests_total counter.

A third project (client site-9) runs its client parent as a pod, from the Helm chart `nvflare deploy prepare` writes,
switched to FLJobLauncher by `python -m fljob_launcher.deploy` (test_e2e_parent_from_deploy_prepare_chart; it runs
first, so that `make e2e` ends with the comparison table).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from nvflare.apis.job_def import DEFAULT_STUDY

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent
PY_DIR = HERE.parent
REPO = PY_DIR.parent
if str(PY_DIR) not in sys.path:
    sys.path.insert(0, str(PY_DIR))

GROUP, VERSION = "fljob.dev", "v1alpha1"
SITE = "site-a"  # FLSite name
CLIENT = "site-1"  # NVFlare client of the FLJobLauncher project
STOCK_CLIENT = "site-2"  # NVFlare client of the stock-launcher project
REAL_LABEL = "fljob.dev/real-node"
TERMINAL = {"Succeeded", "Failed", "Aborted"}
TRAIN_MARK = "Task name: train"  # NPTrainer logs it when it gets the train task: the worker is training
RESOURCES = {"cpu": "500m", "memory": "1Gi"}
ABORT_GRACE = 30
DEADLINE_AHEAD = 5  # s: scenario "i" sets activeDeadlineSeconds to pass this long after its patch
# Scenario "k": the study of the fljob project, its dataset (a PVC) and its env var, as the site's
# local/study_runtime.yaml defines them; the job's StudyTrainer adds (the number in the dataset file) x (the env
# var) per round.
STUDY, DATASET = "e2e-k", "numbers"
SCALE_ENV, SCALE, DELTA = "E2E_STUDY_SCALE", "2", "1.5"
K_ROUNDS = 2


# ----- environment ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env():
    names = ("FLJOB_TEST_KUBECONFIG", "FLJOB_OPERATOR_BIN", "FLJOB_REAL_NODE", "FLJOB_IMAGE_WORKER")
    vals = {n: os.environ.get(n) for n in names}
    missing = [n for n, v in vals.items() if not v]
    problems = []
    if missing:
        problems.append(f"{', '.join(missing)} not set")
    elif not os.path.isfile(vals["FLJOB_TEST_KUBECONFIG"]):
        problems.append(f"FLJOB_TEST_KUBECONFIG={vals['FLJOB_TEST_KUBECONFIG']} does not exist")
    elif not os.access(vals["FLJOB_OPERATOR_BIN"], os.X_OK):
        problems.append(f"FLJOB_OPERATOR_BIN={vals['FLJOB_OPERATOR_BIN']} is not executable")
    if not problems:
        from kubernetes import client, config

        api = config.new_client_from_config(config_file=vals["FLJOB_TEST_KUBECONFIG"], persist_config=False)
        try:
            node = client.CoreV1Api(api).read_node(vals["FLJOB_REAL_NODE"], _request_timeout=10)
            ready = any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
            if not ready:
                problems.append(f"node {vals['FLJOB_REAL_NODE']} is not Ready")
        except Exception as e:  # noqa: BLE001
            problems.append(f"node {vals['FLJOB_REAL_NODE']} not readable: {e}")
    if problems:
        msg = "e2e test needs the real node (make e2e): " + "; ".join(problems)
        if os.environ.get("FLJOB_REQUIRE_REAL_NODE") == "1":
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    kubectl = shutil.which("kubectl", path=os.environ.get("FLJOB_TOOLS_BIN") or None) or shutil.which("kubectl")
    assert kubectl, "kubectl not found (FLJOB_TOOLS_BIN)"
    return {
        "kubeconfig": vals["FLJOB_TEST_KUBECONFIG"],
        "operator": vals["FLJOB_OPERATOR_BIN"],
        "node": vals["FLJOB_REAL_NODE"],
        "image": vals["FLJOB_IMAGE_WORKER"],
        "kubectl": kubectl,
        "api": api,
    }


def log(msg):
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def wait_for(pred, timeout, what, interval=0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"{what}: not after {timeout} s (last: {last!r})")


# ----- Kubernetes helpers -----------------------------------------------------------------------------------------


def kubectl(env, *args, check=True):
    r = subprocess.run(
        [env["kubectl"], "--kubeconfig", env["kubeconfig"], *args], capture_output=True, text=True, timeout=60
    )
    if check and r.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def ensure_crds(env):
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    ext = client.ApiextensionsV1Api(env["api"])
    for path in sorted((REPO / "crds").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            try:
                ext.read_custom_resource_definition(doc["metadata"]["name"])
            except ApiException as e:
                if e.status != 404:
                    raise
                ext.create_custom_resource_definition(doc)
    kubectl(env, "wait", "--for=condition=Established", "--timeout=60s", "crd/fljobs.fljob.dev",
            "crd/flsites.fljob.dev")


def make_namespace(env, name):
    from kubernetes import client

    core = client.CoreV1Api(env["api"])
    core.create_namespace(
        client.V1Namespace(
            metadata=client.V1ObjectMeta(
                name=name,
                labels={"fljob.dev/test": "true", "pod-security.kubernetes.io/enforce": "restricted"},
            )
        )
    )
    wait_for(
        lambda: any(sa.metadata.name == "default" for sa in core.list_namespaced_service_account(name).items),
        30, f"default ServiceAccount in {name}",
    )


def sa_kubeconfig(env, ns, sa, rules, path: Path) -> Path:
    """A ServiceAccount with a Role of exactly `rules`, and a kubeconfig that talks as it (a bound token)."""
    from kubernetes import client

    core = client.CoreV1Api(env["api"])
    rbac = client.RbacAuthorizationV1Api(env["api"])
    core.create_namespaced_service_account(ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=sa)))
    rbac.create_namespaced_role(ns, {"metadata": {"name": sa}, "rules": rules})
    rbac.create_namespaced_role_binding(
        ns,
        {
            "metadata": {"name": sa},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sa},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}],
        },
    )
    token = kubectl(env, "-n", ns, "create", "token", sa, "--duration=2h").strip()
    admin = yaml.safe_load(Path(env["kubeconfig"]).read_text())
    cluster = admin["clusters"][0]
    kc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": sa, "context": {"cluster": cluster["name"], "user": sa, "namespace": ns}}],
        "current-context": sa,
    }
    path.write_text(yaml.safe_dump(kc))
    path.chmod(0o600)
    return path


def node_placement(env):
    return {
        "nodeSelector": {REAL_LABEL: "true"},
        "tolerations": [{"key": REAL_LABEL, "operator": "Equal", "value": "true", "effect": "NoSchedule"}],
    }


def real_node_pod_policy(name, ns, pull_if_not_present=False, object_labels=None):
    """A MutatingAdmissionPolicy (and its binding) that sends the pods of namespace `ns` (and, with
    `object_labels`, only those carrying them) to the real node, with the container securityContext Pod Security
    `restricted` wants; `pull_if_not_present` also sets imagePullPolicy (there is no registry). Test cluster only.
    The patch list is joined from short lists with `+`: one list literal holding the nodeSelector, the tolerations
    list and the securityContext patches made kube-apiserver 1.34.12 panic in cel-go's ConvertToNative (seen)."""
    pull = ("JSONPatch{op: 'replace', path: '/spec/containers/0/imagePullPolicy', value: 'IfNotPresent'}, "
            if pull_if_not_present else "")
    mutate = (
        "[JSONPatch{op: 'add', path: '/spec/nodeSelector', value: {'fljob.dev/real-node': 'true'}}] + "
        "(has(object.spec.tolerations) ? "
        "[JSONPatch{op: 'add', path: '/spec/tolerations/-', value: Object.spec.tolerations{key: "
        "'fljob.dev/real-node', operator: 'Equal', value: 'true', effect: 'NoSchedule'}}] : "
        "[JSONPatch{op: 'add', path: '/spec/tolerations', value: [Object.spec.tolerations{key: "
        "'fljob.dev/real-node', operator: 'Equal', value: 'true', effect: 'NoSchedule'}]}]) + ["
        + pull +
        "JSONPatch{op: 'add', path: '/spec/containers/0/securityContext', value: "
        "Object.spec.containers.securityContext{allowPrivilegeEscalation: false, "
        "capabilities: Object.spec.containers.securityContext.capabilities{drop: ['ALL']}}}]"
    )
    objects = f"\n    objectSelector:\n      matchLabels: {json.dumps(object_labels)}" if object_labels else ""
    return f"""
apiVersion: admissionregistration.k8s.io/v1beta1
kind: MutatingAdmissionPolicy
metadata: {{name: {name}}}
spec:
  matchConstraints:
    resourceRules:
    - {{apiGroups: [""], apiVersions: ["v1"], operations: ["CREATE"], resources: ["pods"]}}
  failurePolicy: Fail
  reinvocationPolicy: Never
  mutations:
  - patchType: JSONPatch
    jsonPatch:
      expression: {json.dumps(mutate)}
---
apiVersion: admissionregistration.k8s.io/v1beta1
kind: MutatingAdmissionPolicyBinding
metadata: {{name: {name}}}
spec:
  policyName: {name}
  matchResources:
    namespaceSelector:
      matchLabels: {{kubernetes.io/metadata.name: {ns}}}{objects}
"""

def real_node_claim(core, ns, claim, pv, sc, path, size, cleanup):
    """PVC `claim` in `ns`, bound to a static PersistentVolume `pv` of its own StorageClass name `sc` whose hostPath
    `path` is a directory of the real node (node affinity to it; reserved for this claim). The pod using the claim
    has no hostPath itself, which Pod Security `restricted` forbids. The PV's deletion goes onto `cleanup`."""
    core.create_persistent_volume({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": pv, "labels": {"fljob.dev/test": "true"}},
        "spec": {
            "capacity": {"storage": size}, "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain", "storageClassName": sc,
            "hostPath": {"path": str(path), "type": "Directory"},
            "claimRef": {"namespace": ns, "name": claim},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": REAL_LABEL, "operator": "In", "values": ["true"]}]}]}},
        },
    })
    cleanup.append(lambda: core.delete_persistent_volume(pv))
    core.create_namespaced_persistent_volume_claim(ns, {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": sc, "volumeName": pv,
                 "resources": {"requests": {"storage": size}}},
    })

class Watcher(threading.Thread):
    """Watches one kind in a namespace and keeps what the test checks afterwards: every pod UID ever seen (with
    its owner), every FLJob phase ever seen, in order, and the last FLJob seen (for a deleted one: the object of its
    DELETED event, its final status)."""

    def __init__(self, env, ns, kind):
        super().__init__(daemon=True)
        self.env, self.ns, self.kind = env, ns, kind
        self.pod_uids = defaultdict(set)  # owner (FLJob name, or the pod's own name if unowned) -> {uid}
        self.phases = defaultdict(list)  # FLJob name -> [phase (Queued/<Admitted reason>), ...], changes only
        self.times = defaultdict(list)  # FLJob name -> [(monotonic time, phase), ...]
        self.created = {}  # FLJob name -> creationTimestamp
        self.last = {}  # FLJob name -> the last object seen
        self.gone = {}  # FLJob name -> monotonic time its DELETED event was seen
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()

    def run(self):
        from kubernetes import client, watch

        core = client.CoreV1Api(self.env["api"])
        custom = client.CustomObjectsApi(self.env["api"])
        rv = None
        while not self.stop_flag.is_set():
            try:
                if self.kind == "pods":
                    lst = core.list_namespaced_pod(self.ns, _request_timeout=10)
                    items = [(None, p.to_dict()) for p in lst.items]
                    rv = lst.metadata.resource_version
                    fn, kw = core.list_namespaced_pod, {}
                else:
                    lst = custom.list_namespaced_custom_object(GROUP, VERSION, self.ns, "fljobs", _request_timeout=10)
                    items = [(None, o) for o in lst.get("items") or []]
                    rv = lst["metadata"]["resourceVersion"]
                    fn, kw = custom.list_namespaced_custom_object, {"group": GROUP, "version": VERSION,
                                                                     "namespace": self.ns, "plural": "fljobs"}
                for _, o in items:
                    self._see(o)
                w = watch.Watch()
                args = (self.ns,) if self.kind == "pods" else ()
                for ev in w.stream(fn, *args, resource_version=rv, timeout_seconds=20, **kw):
                    o = ev["object"]
                    if not isinstance(o, dict):
                        o = o.to_dict()
                    self._see(o, ev.get("type"))
                    if self.stop_flag.is_set():
                        w.stop()
                        break
            except Exception as e:  # noqa: BLE001 - re-list (410 Gone, timeouts)
                if not self.stop_flag.is_set():
                    time.sleep(0.5)
                _ = e

    def _see(self, o, etype=None):
        md = o.get("metadata") or {}
        with self.lock:
            if self.kind == "pods":
                owners = md.get("owner_references") or md.get("ownerReferences") or []
                owner = owners[0]["name"] if owners else md.get("name")
                self.pod_uids[owner].add(md.get("uid"))
            else:
                name = md.get("name")
                self.created.setdefault(name, md.get("creationTimestamp"))
                self.last[name] = o
                if etype == "DELETED":
                    self.gone.setdefault(name, time.monotonic())
                st = o.get("status") or {}
                phase = st.get("phase")
                reason = next((c.get("reason") for c in st.get("conditions") or [] if c.get("type") == "Admitted"),
                              None)
                seen = f"{phase}/{reason}" if phase == "Queued" else phase
                if phase and (not self.phases[name] or self.phases[name][-1] != seen):
                    self.phases[name].append(seen)
                    self.times[name].append((time.monotonic(), seen))

    def first_time(self, name, phases, after):
        """Monotonic time the FLJob was first seen in one of `phases` at or after `after`, else None."""
        with self.lock:
            return next((t for t, p in self.times.get(name, []) if p in phases and t >= after), None)

    def last_status(self, name):
        with self.lock:
            return dict((self.last.get(name) or {}).get("status") or {})


def metrics(port):
    """fljob_api_requests_total{verb,resource} of the operator, as {(verb, resource): count}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r'^fljob_api_requests_total\{([^}]*)\}\s+([0-9.e+]+)$', line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            out[(labels.get("verb"), labels.get("resource"))] = float(m.group(2))
    return out


def metrics_delta(a, b):
    return {k: b.get(k, 0) - a.get(k, 0) for k in set(a) | set(b) if b.get(k, 0) - a.get(k, 0)}


class Operator:
    def __init__(self, env, ns, port, logdir: Path):
        self.env, self.ns, self.port, self.logdir = env, ns, port, logdir
        self.proc = None
        self.starts = 0

    def start(self):
        self.starts += 1
        logf = open(self.logdir / f"operator-{self.starts}.log", "ab")
        e = dict(os.environ, KUBECONFIG=self.env["kubeconfig"], RUST_LOG=os.environ.get("RUST_LOG", "info"))
        self.proc = subprocess.Popen(
            [self.env["operator"], "run", "--namespace", self.ns, "--metrics-addr", f"127.0.0.1:{self.port}"],
            stdout=logf, stderr=subprocess.STDOUT, env=e,
        )

        def ready():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2).status == 200
            except Exception:  # noqa: BLE001
                assert self.proc.poll() is None, f"operator exited {self.proc.returncode}; see {self.logdir}"
                return False

        wait_for(ready, 30, "operator /readyz")

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def api_log(path: Path):
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def api_summary(recs):
    """{"verb resource": n}, verbs as the API server names them (list/watch/get/create/patch/update/delete)."""
    c = Counter()
    for r in recs:
        parts = [x for x in r["path"].split("/") if x]
        if "namespaces" in parts and len(parts) > parts.index("namespaces") + 2:
            rest = parts[parts.index("namespaces") + 2:]
        else:
            rest = parts[-2:]
        resource = rest[0] + ("/" + rest[2] if len(rest) > 2 else "")
        named = len(rest) > 1
        verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(r["method"])
        if verb is None:
            verb = "watch" if r["watch"] else ("get" if named else "list")
        c[f"{verb} {resource}"] += 1
    return dict(sorted(c.items()))


# ----- NVFlare side -----------------------------------------------------------------------------------------------


def isolate_server(p, max_jobs=6):
    """Per-project job store and snapshot dirs (NVFlare's default is a shared /tmp/nvflare/...: two servers, or
    anybody else's POC, would see each other's jobs), and room for concurrent jobs."""
    local = p.server_ws / "local"
    conf = json.loads((local / "resources.json.default").read_text())
    conf["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"] = str(p.base / "snapshot-storage")
    for c in conf["components"]:
        if c["id"] == "job_manager":
            c["args"]["uri_root"] = str(p.base / "jobs-storage")
        if c["id"] == "job_scheduler":
            c["args"]["max_jobs"] = max_jobs
    (local / "resources.json").write_text(json.dumps(conf, indent=2))


class Admin:
    """The POC's admin session, shared by the scenario threads (one call at a time)."""

    def __init__(self, project):
        self.p = project
        self.lock = threading.Lock()

    def __getattr__(self, name):
        fn = getattr(self.p, name)

        def call(*a, **kw):
            with self.lock:
                return fn(*a, **kw)

        return call

    def wait_job(self, job_id, timeout, study=DEFAULT_STUDY):
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            status = self.job_status(job_id, study=study)
            if status.startswith("FINISHED"):
                return status
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {status} after {timeout} s")


# ----- the test ---------------------------------------------------------------------------------------------------


DEPLOY_CLIENT = "site-9"  # NVFlare client of the project whose parent runs from the `nvflare deploy prepare` chart


def test_e2e_parent_from_deploy_prepare_chart(env, tmp_path_factory):  # noqa: C901 - one story, told in order
    """A site that runs its client parent from the Helm chart NVFlare 2.9.0's `nvflare deploy prepare` writes
    switches to fljob-operator as python/README.md says: `python -m fljob_launcher.deploy <prepared kit>`, then the
    commands it prints. The parent runs as that chart's pod on the real node, with its ServiceAccount (the chart's
    Role, as the tool rewrote it: FLJobs and Secrets, no pods); a numpy job runs through it to COMPLETED.

    What the test cluster changes and a site would not (each needed because this cluster has no pod network, no
    DNS and no registry; the product's shapes stay as they are):
      - the parent's comm_config gets `listen_host: 127.0.0.1` (pods share the host's network here: the parent must
        not listen on every interface); the advertised host stays the chart's Service name;
      - the FLSite's parentUrl is stcp://127.0.0.1:<port>, not the Service (no cluster DNS);
      - the launcher's pod_template sends the worker pods to the real node (the cluster's other nodes are kwok's);
      - the chart is installed with image.pullPolicy=IfNotPresent (no registry);
      - a MutatingAdmissionPolicy bound to the parent's pod only (objectSelector on the chart's label) sends it to
        the real node and adds the container securityContext Pod Security `restricted` needs (the chart sets none).
    """
    from kubernetes import client

    from e2e.poc import Project, free_ports, numpy_job
    from fljob_launcher import fljob_name

    t_total = time.monotonic()
    work = Path(os.environ.get("FLJOB_E2E_DIR") or tmp_path_factory.mktemp("e2e-deploy")) / "deploy"
    work.mkdir(parents=True, exist_ok=True)
    api = env["api"]
    core = client.CoreV1Api(api)
    apps = client.AppsV1Api(api)
    custom = client.CustomObjectsApi(api)
    suffix = uuid.uuid4().hex[:6]
    ns = f"fljob-e2e-deploy-{suffix}"
    helm = shutil.which("helm", path=os.environ.get("FLJOB_TOOLS_BIN") or None) or shutil.which("helm")
    assert helm, "helm not found (FLJOB_TOOLS_BIN)"
    cleanup, steps, operator, p, watcher = [], {}, None, None, None

    def timed(name, t0):
        steps[name] = round(time.monotonic() - t0, 1)
        log(f"deploy chart: {name} {steps[name]} s")

    try:
        ensure_crds(env)
        make_namespace(env, ns)
        cleanup.append(lambda: core.delete_namespace(ns))

        # --- the site's kit, as NVFlare provisions it and `nvflare deploy prepare` makes it a Kubernetes one -------
        fl_port, admin_port, parent_port, metrics_port = free_ports(4)
        p = Project(work / "project", fl_port, admin_port, parent_port, client=DEPLOY_CLIENT)
        t0 = time.monotonic()
        p.provision()
        isolate_server(p, max_jobs=2)
        pvc = "nvflws"
        deploy_cfg = {
            "runtime": "k8s",
            "namespace": ns,
            "parent": {
                "docker_image": env["image"],  # the worker image has nvflare and fljob-launcher: the parent's too
                "parent_port": parent_port,
                "workspace_pvc": pvc,
                "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
                "pod_security_context": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000,
                                         "seccompProfile": {"type": "RuntimeDefault"}},
            },
            "job_launcher": {"pending_timeout": 120},
        }
        (work / "k8s.yaml").write_text(yaml.safe_dump(deploy_cfg))
        prepared = work / "prepared"
        shutil.rmtree(prepared, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "nvflare.cli", "deploy", "prepare", str(p.client_ws), "--config",
                        str(work / "k8s.yaml"), "--output", str(prepared)], check=True, capture_output=True,
                       text=True, timeout=120)
        stock = json.loads((prepared / "local" / "resources.json.default").read_text())
        assert any(c["path"].endswith("ClientK8sJobLauncher") for c in stock["components"]), "prepare's launcher"

        # --- the switch: the tool, then exactly the commands it prints ---------------------------------------------
        r = subprocess.run([sys.executable, "-m", "fljob_launcher.deploy", str(prepared)], check=True,
                           capture_output=True, text=True, timeout=60)
        log("fljob_launcher.deploy:\n" + r.stdout)
        then = r.stdout.split("then:\n", 1)[1].split("\n")
        next_cmds = [line.strip().split() for line in then if line.strip()]
        assert [c[0] for c in next_cmds] == ["kubectl", "kubectl", "helm"], next_cmds
        flsite_doc = yaml.safe_load((prepared / "fljob" / "flsite.yaml").read_text())
        site = flsite_doc["metadata"]["name"]
        assert flsite_doc["spec"]["clientName"] == DEPLOY_CLIENT
        assert flsite_doc["spec"]["parentUrl"] == f"stcp://{site}:{parent_port}"  # the chart's Service

        # test cluster only: the worker pods go to the real node (the launcher's pod_template, as in the main e2e;
        # without it they land on a kwok node, where they "run" forever: seen)
        res_path = prepared / "local" / "resources.json.default"
        res_cfg = json.loads(res_path.read_text())
        ours = [c for c in res_cfg["components"] if c["path"] == "fljob_launcher.FLJobLauncher"]
        assert len(ours) == 1, res_cfg["components"]
        ours[0]["args"]["pod_template"] = {"spec": node_placement(env)}
        res_path.write_text(json.dumps(res_cfg, indent=2))

        # test cluster only: the parent listens on loopback (it shares the host's network here)
        comm_path = prepared / "local" / "comm_config.json"
        comm = json.loads(comm_path.read_text())
        assert comm["internal"]["resources"]["host"] == site  # deploy prepare advertises its Service
        comm["internal"]["resources"]["listen_host"] = "127.0.0.1"
        comm_path.write_text(json.dumps(comm, indent=2))

        # the parent's workspace PVC (the chart mounts it; a site makes it): a static hostPath PV on the real node,
        # holding the prepared kit's startup/ and local/, owned by the parent's uid
        ws = Path(tempfile.mkdtemp(prefix=f"fljob-e2e-{suffix}-ws-"))
        cleanup.append(lambda: shutil.rmtree(ws, ignore_errors=True))
        for d in ("startup", "local"):
            shutil.copytree(prepared / d, ws / d)
        subprocess.run(["chown", "-R", "1000:1000", str(ws)], check=True)
        ws.chmod(0o755)
        pv, sc = f"fljob-e2e-{suffix}-ws", f"fljob-e2e-{suffix}-ws"
        real_node_claim(core, ns, pvc, pv, sc, ws, "1Gi", cleanup)

        # test cluster only: the parent's pod to the real node, with the container securityContext `restricted`
        # wants (the chart sets none); bound to that pod alone, so the worker pods keep the operator's shape
        policy = f"fljob-e2e-deploy-{suffix}"
        policy_yaml = real_node_pod_policy(policy, ns, object_labels={"app.kubernetes.io/name": site})
        (work / "parent-policy.yaml").write_text(policy_yaml)
        kubectl(env, "apply", "-f", str(work / "parent-policy.yaml"))
        cleanup.append(lambda: kubectl(env, "delete", "--ignore-not-found", "-f", str(work / "parent-policy.yaml"),
                                       check=False))

        # the operator for this namespace; the FL server on 127.0.0.1
        operator = Operator(env, ns, metrics_port, work)
        operator.start()
        p.start_server()
        cleanup.append(p.stop)
        timed("kit prepared, switched, server up", t0)

        # the printed commands, as printed: Secret, FLSite, helm (plus this cluster's --kubeconfig, and for helm
        # the pull policy); the FLSite's parentUrl then pointed at loopback (no cluster DNS here)
        t0 = time.monotonic()
        for cmd in next_cmds:
            if cmd[0] == "kubectl":
                kubectl(env, *cmd[1:])
            else:
                h = subprocess.run([helm, "--kubeconfig", env["kubeconfig"], *cmd[1:], "--set",
                                    "image.pullPolicy=IfNotPresent", "--wait=false"],
                                   capture_output=True, text=True, timeout=120)
                assert h.returncode == 0, f"helm: {h.stderr}"
                cleanup.append(lambda rel=cmd[3]: subprocess.run(
                    [helm, "--kubeconfig", env["kubeconfig"], "uninstall", rel, "--namespace", ns],
                    capture_output=True, timeout=60))
        custom.patch_namespaced_custom_object(GROUP, VERSION, ns, "flsites", site, {"spec": {
            "parentUrl": f"stcp://127.0.0.1:{parent_port}", "defaults": {"resources": RESOURCES},
            "capacity": {"jobs": 1}}})
        # the chart's Role is the tool's: FLJobs and Secrets, nothing on pods
        sa = f"system:serviceaccount:{ns}:{site}"
        can = {what: kubectl(env, "auth", "can-i", "--as", sa, "-n", ns, *what.split(), check=False).strip()
               for what in ("create fljobs.fljob.dev", "watch fljobs.fljob.dev", "create secrets", "create pods",
                            "get pods", "list events")}
        log(f"deploy chart: the parent's ServiceAccount can: {can}")

        def parent_pod():
            pods = core.list_namespaced_pod(ns, label_selector=f"app.kubernetes.io/name={site}").items
            return pods[0] if pods and pods[0].status.phase == "Running" else None
        try:
            ppod = wait_for(parent_pod, 120, "the parent's pod Running")
        except TimeoutError:
            log("deploy chart: events\n" + kubectl(env, "-n", ns, "get", "events", "-o", "wide", check=False)
                + kubectl(env, "-n", ns, "get", "deploy,rs,pods,pvc", "-o", "wide", check=False))
            raise
        p.wait_client_registered(120)
        timed("helm install -> parent registered", t0)
        dep = apps.read_namespaced_deployment(site, ns)

        # --- a numpy job through the chart-run parent ------------------------------------------------------------
        watcher = Watcher(env, ns, "pods")
        watcher.start()
        t0 = time.monotonic()
        job_id = p.submit(numpy_job(work / "jobs", "deploy-numpy", rounds=2))
        status = p.wait_job(job_id, 240)
        timed("submit -> server FINISHED", t0)
        name = fljob_name(job_id, site)
        o = wait_for(lambda: (lambda x: x if x and (x.get("status") or {}).get("phase") in TERMINAL else None)(
            _get_or_none(lambda: custom.get_namespaced_custom_object(GROUP, VERSION, ns, "fljobs", name))),
            120, f"FLJob {name} terminal")
        st = o["status"]
        worker = _get_or_none(lambda: core.read_namespaced_pod(st.get("podName") or "-", ns))
        # the worker's results, uploaded to the parent's workspace: the chart's PVC
        res_file = ws / job_id / "log.txt"
        uploaded = res_file.is_file() and TRAIN_MARK in res_file.read_text(errors="replace")
        plog = core.read_namespaced_pod_log(ppod.metadata.name, ns, _request_timeout=10)
        worker_pods = len(watcher.pod_uids.get(name, set()))
        checks = {
            "ok_server": status == "FINISHED:COMPLETED",
            "ok_fljob": st.get("phase") == "Succeeded" and st.get("exitCode") == 0,
            "ok_results": uploaded,
            "ok_one_pod": worker_pods == 1,
            "ok_worker_on_real_node": worker is not None and worker.spec.node_name == env["node"],
            "ok_parent_from_chart": (ppod.spec.service_account_name == site
                                     and ppod.spec.containers[0].image == env["image"]
                                     and any(r.kind == "ReplicaSet" for r in ppod.metadata.owner_references or [])
                                     and dep.metadata.labels.get("app.kubernetes.io/managed-by") == "Helm"),
            # FLJobLauncher's own line, in the parent pod's log
            "ok_parent_launcher": f"created FLJob {ns}/{name}" in plog,
            "ok_rbac": can == {"create fljobs.fljob.dev": "yes", "watch fljobs.fljob.dev": "yes",
                               "create secrets": "yes", "create pods": "no", "get pods": "no", "list events": "no"},
        }
        res = {"job_id": job_id, "server": status, "phase": st.get("phase"), "exit": st.get("exitCode"),
               "parent_pod": ppod.metadata.name, "node": ppod.spec.node_name, **steps, **checks}
        log(f"deploy chart: {res}")
        bad = [k for k, v in checks.items() if not v]
        if bad:
            for f in sorted(work.rglob("*.out")) + sorted(work.glob("operator-*.log")):
                log(f"--- {f}\n{f.read_text(errors='replace')[-3000:]}")
            log(f"--- parent pod log\n{plog[-5000:]}")
        print(f"\n=== client parent from the `nvflare deploy prepare` chart (switched by fljob_launcher.deploy) ===\n"
              f"parent pod {ppod.metadata.name} on {ppod.spec.node_name}; job {job_id}: server {status}, FLJob "
              f"{st.get('phase')} exit {st.get('exitCode')}, results uploaded {uploaded}; steps {steps}; "
              f"total {time.monotonic() - t_total:.1f} s")
        assert not bad, f"deploy-chart e2e: {bad}: {res}"
    finally:
        if watcher:
            watcher.stop_flag.set()
        tear_down(custom, ns, operator, cleanup)


def test_e2e_real_node(env, tmp_path_factory):  # noqa: C901 - one story, told in order
    from kubernetes import client

    import numpy as np

    from e2e.poc import ADMIN, Project, abort_task_job, free_ports, numpy_job, study_job
    from fljob_launcher import fljob_name

    t_total = time.monotonic()
    work = Path(os.environ.get("FLJOB_E2E_DIR") or tmp_path_factory.mktemp("e2e"))
    work.mkdir(parents=True, exist_ok=True)
    api = env["api"]
    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)
    suffix = uuid.uuid4().hex[:6]
    ns, ns_stock = f"fljob-e2e-{suffix}", f"fljob-e2e-stock-{suffix}"
    policy = f"fljob-e2e-stock-{suffix}"
    results = {}  # scenario -> dict
    failures = []
    cleanup = []
    projects = []
    watchers = []
    operator = None
    try:
        ensure_crds(env)
        make_namespace(env, ns)
        make_namespace(env, ns_stock)
        cleanup.append(lambda: core.delete_namespace(ns))
        cleanup.append(lambda: core.delete_namespace(ns_stock))

        # --- two NVFlare projects on 127.0.0.1 --------------------------------------------------------------
        ports = free_ports(7)
        # the fljob project has one study besides "default" (scenario k): site-1 is in it, the admin may use it
        p = Project(work / "fljob", ports[0], ports[1], ports[2], client=CLIENT,
                    studies={STUDY: {"site_orgs": {"nvidia": [CLIENT]}, "admins": [ADMIN]}})
        ps = Project(work / "stock", ports[3], ports[4], ports[5], client=STOCK_CLIENT)
        t0 = time.monotonic()
        th = [threading.Thread(target=x.provision) for x in (p, ps)]
        [t.start() for t in th]
        [t.join() for t in th]
        for x in (p, ps):
            isolate_server(x)
        log(f"provisioned 2 projects in {time.monotonic() - t0:.1f} s")
        fed_client = json.loads((p.startup_kit() / "fed_client.json").read_text())
        scheme = fed_client["servers"][0].get("service", {}).get("scheme", "grpc")

        # --- namespace A: startup kit Secret, FLSite, RBAC for the parent, the operator -------------------------
        kit = {f.name: f.read_text() for f in p.startup_kit().iterdir() if f.is_file()}
        core.create_namespaced_secret(
            ns, client.V1Secret(metadata=client.V1ObjectMeta(name=f"{SITE}-startup"), string_data=kit)
        )
        site_body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "FLSite",
            "metadata": {"name": SITE, "namespace": ns},
            "spec": {
                "clientName": CLIENT,
                "server": {"target": p.server_target, "scheme": scheme},
                "parentUrl": f"stcp://127.0.0.1:{p.parent_port}" if p.parent_conn_sec == "mtls" else p.parent_url,
                "parentConnSec": p.parent_conn_sec,
                "startupKitSecret": f"{SITE}-startup",
                "defaults": {"image": env["image"], "pythonPath": "/usr/local/bin/python", "resources": RESOURCES},
                "capacity": {"jobs": 6},  # phase 2 runs 6 jobs at once
            },
        }
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, "flsites", site_body)
        # The RBAC python/README.md documents for the client parent, plus `patch` on secrets: without it the
        # launcher's ownerReference on the per-job Secret is refused (403, logged as a warning; measured).
        parent_kc = sa_kubeconfig(
            env, ns, "nvflare-parent",
            [
                {"apiGroups": ["fljob.dev"], "resources": ["fljobs"],
                 "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
                {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "update", "patch", "delete"]},
            ],
            work / "parent-fljob.kubeconfig",
        )
        metrics_port = ports[6]
        operator = Operator(env, ns, metrics_port, work)
        operator.start()

        # --- namespace B: the stock launcher's RBAC, and its pods sent to the real node ---------------------------
        stock_kc = sa_kubeconfig(
            env, ns_stock, "nvflare-parent",
            [
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "create", "delete"]},
                {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]},
                {"apiGroups": [""], "resources": ["secrets"],
                 "verbs": ["get", "create", "update", "patch", "delete"]},
            ],
            work / "parent-stock.kubeconfig",
        )
        # ClientK8sJobLauncher's pod (no template without a study) has no nodeSelector/tolerations, no container
        # securityContext (Pod Security restricted wants one) and imagePullPolicy Always (there is no registry):
        # a MutatingAdmissionPolicy bound to namespace B only adds what the real node and `restricted` need.
        placement = node_placement(env)
        policy_yaml = real_node_pod_policy(policy, ns_stock, pull_if_not_present=True)
        (work / "stock-policy.yaml").write_text(policy_yaml)
        kubectl(env, "apply", "-f", str(work / "stock-policy.yaml"))
        cleanup.append(lambda: kubectl(env, "delete", "--ignore-not-found", "-f", str(work / "stock-policy.yaml"),
                                       check=False))
        time.sleep(1.5)  # the policy reaches the API server's admission chain asynchronously

        # --- the study's runtime at the site (scenario k): NVFlare 2.9.0's local/study_runtime.yaml in the client
        # parent's workspace. The launcher reads it at each launch; jobs of other studies ("default") get nothing.
        study_pvc = f"{STUDY}-{DATASET}"
        study_runtime = {"format_version": 2, "studies": {STUDY: {
            "datasets": {DATASET: {"type": "mount", "source": study_pvc, "mode": "ro"}},
            "env": {SCALE_ENV: SCALE},
        }}}
        (p.client_ws / "local" / "study_runtime.yaml").write_text(yaml.safe_dump(study_runtime))

        # --- the client parents' launchers, then start both projects ---------------------------------------
        trigger_spool = work / "abort-task-spool"
        trigger_spool.mkdir(parents=True, exist_ok=True)
        p.configure_client(
            # NVFlare 2.9.0 has no command that sends the parent's train.abort_task: this component calls the
            # parent's ClientEngine.abort_task (-> JobExecutor.abort_task) when scenario j asks
            # (e2e/abort_task_trigger.py)
            extra_components=[{"id": "abort_task_trigger", "path": "abort_task_trigger.AbortTaskTrigger",
                               "args": {"spool_dir": str(trigger_spool)}}],
            site_custom_files=[PY_DIR / "e2e" / "abort_task_trigger.py"],
            launcher={
                "id": "fljob_launcher",
                "path": "fljob_launcher.FLJobLauncher",
                "args": {"namespace": ns, "site": SITE, "kubeconfig": str(parent_kc),
                         # 4 workers at 500m on 2 shared cores stop gracefully in 9-11 s (measured), NVFlare's
                         # 10 s max_wait is too tight here
                         "abort_grace_period_seconds": ABORT_GRACE,
                         # ... and so is JobExecutor's own wait before terminate(): give the worker the same grace
                         # then, or a worker at 10.5 s would be deleted (Deleted) instead of ending Graceful
                         "terminate_grace_period_seconds": ABORT_GRACE,
                         "pod_template": {"spec": placement}},
            }
        )
        ps.configure_client(
            launcher={
                "id": "k8s_launcher",
                "path": "nvflare.app_opt.job_launcher.k8s_launcher.ClientK8sJobLauncher",
                "args": {
                    "config_file_path": str(stock_kc),
                    "namespace": ns_stock,
                    # The worker gets the parent's -m / -w paths: mount its emptyDir there.
                    "workspace_mount_path": str(ps.client_ws),
                    "security_context": {"runAsNonRoot": True, "runAsUser": 1000,
                                         "seccompProfile": {"type": "RuntimeDefault"}},
                    "ephemeral_storage": "1Gi",
                },
            }
        )
        count_dir = PY_DIR / "e2e" / "apicount"
        api_logs = {CLIENT: work / "api-fljob.jsonl", STOCK_CLIENT: work / "api-stock.jsonl"}
        for x, c in ((p, CLIENT), (ps, STOCK_CLIENT)):
            projects.append(x)
            cleanup.append(x.stop)
        t0 = time.monotonic()
        th = [
            threading.Thread(
                target=x.start,
                kwargs={"client_env": {"PYTHONPATH": f"{PY_DIR}{os.pathsep}{count_dir}",
                                       "FLJOB_E2E_API_LOG": str(api_logs[c])}},
            )
            for x, c in ((p, CLIENT), (ps, STOCK_CLIENT))
        ]
        [t.start() for t in th]
        [t.join() for t in th]
        for x in (p, ps):
            x.wait_client_registered(60)
        log(f"2 servers + 2 client parents up in {time.monotonic() - t0:.1f} s")
        adm, adm_s = Admin(p), Admin(ps)

        pods_w, flj_w, stock_w = Watcher(env, ns, "pods"), Watcher(env, ns, "fljobs"), Watcher(env, ns_stock, "pods")
        for w in (pods_w, flj_w, stock_w):
            w.start()
            watchers.append(w)

        jobs_dir = work / "jobs"

        def fljob(job_id):
            return custom.get_namespaced_custom_object(GROUP, VERSION, ns, "fljobs", fljob_name(job_id, SITE))

        def wait_fljob_terminal(job_id, timeout=120):
            def done():
                o = _get_or_none(lambda: fljob(job_id))
                return o if o and (o.get("status") or {}).get("phase") in TERMINAL else None
            return wait_for(done, timeout, f"FLJob of {job_id} terminal")

        def wait_training(job_id, timeout=90):
            """The FLJob is Running and its worker has the train task (NPTrainer's log line in the pod)."""
            def ok():
                o = _get_or_none(lambda: fljob(job_id))
                st = (o or {}).get("status") or {}
                if st.get("phase") != "Running" or not st.get("podName"):
                    return None
                try:
                    text = core.read_namespaced_pod_log(st["podName"], ns, _request_timeout=5)
                except Exception:  # noqa: BLE001
                    return None
                return TRAIN_MARK in text
            wait_for(ok, timeout, f"job {job_id} training", interval=1.0)

        def run(name, fn):
            t = time.monotonic()
            try:
                res = fn() or {}
            except Exception as e:  # noqa: BLE001
                res = {"error": f"{type(e).__name__}: {e}"}
            res["seconds"] = round(time.monotonic() - t, 1)
            results[name] = res
            bad = [k for k, v in res.items() if k.startswith("ok_") and not v]
            if "error" in res or bad:
                failures.append(f"{name}: {res}")
            log(f"{name}: {res}")

        # --- (a) + stock, concurrently: the comparison --------------------------------------------------
        def scenario_a():
            job = numpy_job(jobs_dir, "a-numpy", rounds=2)
            m0, n0 = metrics(metrics_port), len(api_log(api_logs[CLIENT]))
            t = time.monotonic()
            job_id = adm.submit(job)
            status = adm.wait_job(job_id, 180)
            wall = time.monotonic() - t
            o = wait_fljob_terminal(job_id)
            st = o["status"]
            # The handle deletes the per-job Secret once it sees the end: wait for that, so the count is whole.
            wait_for(lambda: _get_or_none(lambda: core.read_namespaced_secret(
                f"{o['metadata']['name']}-creds", ns)) is None, 30, "per-job Secret deleted")
            time.sleep(2)
            recs = api_log(api_logs[CLIENT])[n0:]
            op = metrics_delta(m0, metrics(metrics_port))
            res_file = p.parent_job_dir(job_id) / "log.txt"
            uploaded = res_file.is_file() and TRAIN_MARK in res_file.read_text(errors="replace")
            mine = [x for x in core.list_namespaced_pod(ns).items
                    if any(r.uid == o["metadata"]["uid"] for r in x.metadata.owner_references or [])]
            return {
                "job_id": job_id, "server": status, "phase": st.get("phase"), "exit": st.get("exitCode"),
                "pods_left": f"{len(mine)} (owned by the FLJob: deleted with it)",
                "wall": round(wall, 1), "parent_requests": len(recs), "parent_by": dict(api_summary(recs)),
                "operator_requests": int(sum(op.values())),
                "operator_by": {f"{v} {r}": int(n) for (v, r), n in sorted(op.items())},
                "pods": len(pods_w.pod_uids.get(o["metadata"]["name"], ())),
                "results_uploaded": uploaded,
                "ok_server": status == "FINISHED:COMPLETED",
                "ok_fljob": st.get("phase") == "Succeeded" and st.get("exitCode") == 0,
                "ok_results": uploaded,
            }

        def scenario_stock():
            job = numpy_job(jobs_dir, "stock-numpy", rounds=2)
            meta = json.loads((job / "meta.json").read_text())
            meta["launcher_spec"] = {STOCK_CLIENT: {"k8s": {"image": env["image"], **RESOURCES}}}
            (job / "meta.json").write_text(json.dumps(meta))
            n0 = len(api_log(api_logs[STOCK_CLIENT]))
            t = time.monotonic()
            job_id = adm_s.submit(job)
            status = adm_s.wait_job(job_id, 180)
            wall = time.monotonic() - t
            time.sleep(3)  # its handle stops polling within 1 s of the end
            recs = api_log(api_logs[STOCK_CLIENT])[n0:]
            pods = core.list_namespaced_pod(ns_stock).items
            pod = pods[0] if pods else None
            term = None
            if pod and pod.status.container_statuses:
                s = pod.status.container_statuses[0].state
                term = s.terminated.exit_code if s and s.terminated else None
            res_file = ps.parent_job_dir(job_id) / "log.txt"
            uploaded = res_file.is_file() and TRAIN_MARK in res_file.read_text(errors="replace")
            return {
                "job_id": job_id, "server": status, "pod_phase": pod.status.phase if pod else None, "exit": term,
                "node": pod.spec.node_name if pod else None,
                "pods_left": f"{len(pods)} ({'unowned' if pod and not pod.metadata.owner_references else 'owned'})",
                "wall": round(wall, 1), "parent_requests": len(recs), "parent_by": dict(api_summary(recs)),
                "results_uploaded": uploaded,
                "ok_server": status == "FINISHED:COMPLETED",
            }

        t_phase = time.monotonic()
        th = [threading.Thread(target=run, args=(n, f)) for n, f in (("a", scenario_a), ("stock", scenario_stock))]
        [t.start() for t in th]
        [t.join() for t in th]
        log(f"phase 1 (a + stock) {time.monotonic() - t_phase:.1f} s")

        # --- (b) (c) (d) (e) (h) (i) concurrently (capacity 6; the real node's 2 cpus hold 4 workers at 500m: the
        # last ones start when b's and c's have failed) -------------------------------------------------------------
        def scenario_fail(variant, code, reason):
            def f():
                job_id = adm.submit(numpy_job(jobs_dir, f"{variant}-job", rounds=2, variant=variant))
                o = wait_fljob_terminal(job_id)
                st = o["status"]
                status = adm.wait_job(job_id, 120)
                return {"job_id": job_id, "server": status, "phase": st.get("phase"), "exit": st.get("exitCode"),
                        "reason": st.get("reason"),
                        "ok_fljob": (st.get("phase"), st.get("exitCode"), st.get("reason")) == ("Failed", code,
                                                                                                reason)}
            return f

        def scenario_abort(how):
            def f():
                job_id = adm.submit(numpy_job(jobs_dir, f"abort-{how}", rounds=40, sleep_per_round=1))
                wait_training(job_id)
                t = time.monotonic()
                name = fljob_name(job_id, SITE)
                if how == "admin":
                    adm.abort(job_id)
                else:
                    kubectl(env, "-n", ns, "patch", "flj", name, "--type", "merge", "-p", '{"spec":{"abort":true}}')
                o = wait_fljob_terminal(job_id, 60)
                to_fljob = time.monotonic() - t
                status = adm.wait_job(job_id, 60)
                to_server = time.monotonic() - t
                st = o["status"]
                return {"job_id": job_id, "server": status, "phase": st.get("phase"), "exit": st.get("exitCode"),
                        "method": (st.get("abort") or {}).get("method"), "abort_to_fljob_end": round(to_fljob, 1),
                        "abort_to_server_end": round(to_server, 1),
                        "ok_fljob": st.get("phase") == "Aborted" and (st.get("abort") or {}).get("method") == "Graceful",
                        "ok_server": status == "FINISHED:ABORTED"}
            return f

        def scenario_delete():
            """`kubectl delete flj` while the worker trains: deleting an FLJob aborts its job (cause Deleted), the
            FLJob goes once its worker has ended and its quota is back in the site's pool, its pod after it."""
            job_id = adm.submit(numpy_job(jobs_dir, "abort-delete", rounds=40, sleep_per_round=1))
            wait_training(job_id)
            name = fljob_name(job_id, SITE)
            uid = fljob(job_id)["metadata"]["uid"]
            t = time.monotonic()
            kubectl(env, "-n", ns, "delete", "flj", name, "--wait=false")
            ended = wait_for(lambda: flj_w.first_time(name, TERMINAL, t), 60, f"FLJob {name} finished")
            to_fljob = ended - t
            status = adm.wait_job(job_id, 60)
            to_server = time.monotonic() - t
            wait_for(lambda: _get_or_none(lambda: fljob(job_id)) is None, 60, f"FLJob {name} gone")
            # The operator lets a deleted FLJob go only once the site's ledger no longer holds it: read right after.
            site_st = custom.get_namespaced_custom_object(GROUP, VERSION, ns, "flsites", SITE).get("status") or {}
            held = [a.get("job") for a in site_st.get("allocations") or [] if a.get("uid") == uid]

            def pod_gone():  # the garbage collector deletes the pod once its owner is gone
                return not [x for x in core.list_namespaced_pod(ns).items
                            if any(r.uid == uid for r in x.metadata.owner_references or [])]
            pods_gone = _true_within(pod_gone, 30)
            deleted_seen = _true_within(lambda: name in flj_w.gone, 10)
            gone_at = flj_w.gone.get(name)  # when the watcher saw it go (the GET above waited for the server too)
            st = flj_w.last_status(name)  # the FLJob's last status (its DELETED event's, if the watch saw it)
            ab = st.get("abort") or {}
            return {"job_id": job_id, "server": status, "phase": st.get("phase"), "exit": st.get("exitCode"),
                    "reason": st.get("reason"), "cause": ab.get("cause"), "method": ab.get("method"),
                    "abort_to_fljob_end": round(to_fljob, 1), "abort_to_server_end": round(to_server, 1),
                    "abort_to_fljob_gone": round(gone_at - t, 1) if gone_at else None,
                    "deleted_event_seen": deleted_seen,
                    "pod_gone": pods_gone, "ledger_holds": held,
                    "ok_fljob": (st.get("phase"), ab.get("cause"), ab.get("method")) == ("Aborted", "Deleted",
                                                                                        "Graceful"),
                    "ok_server": status == "FINISHED:ABORTED",
                    "ok_pod_gone": pods_gone, "ok_ledger": not held}

        def scenario_deadline():
            """spec.activeDeadlineSeconds set once the worker trains (the launcher's active_deadline_seconds is one
            value for every job of the site; the field may change after creation). The deadline counts from the
            worker's start (status.startTime): it is set to pass DEADLINE_AHEAD s after the patch."""
            job_id = adm.submit(numpy_job(jobs_dir, "abort-deadline", rounds=40, sleep_per_round=1))
            wait_training(job_id)
            name = fljob_name(job_id, SITE)
            started = _ts(fljob(job_id)["status"]["startTime"])
            deadline = int(time.time() - started) + DEADLINE_AHEAD
            kubectl(env, "-n", ns, "patch", "flj", name, "--type", "merge", "-p",
                    json.dumps({"spec": {"activeDeadlineSeconds": deadline}}))
            t = time.monotonic() + (started + deadline - time.time())  # when the deadline passes
            o = wait_fljob_terminal(job_id, DEADLINE_AHEAD + 60)
            to_fljob = time.monotonic() - t
            status = adm.wait_job(job_id, 60)
            to_server = time.monotonic() - t
            st = o["status"]
            ab = st.get("abort") or {}
            late = round(_ts(ab["requestedAt"]) - (started + deadline), 1) if ab.get("requestedAt") else None
            return {"job_id": job_id, "server": status, "phase": st.get("phase"), "exit": st.get("exitCode"),
                    "reason": st.get("reason"), "cause": ab.get("cause"), "method": ab.get("method"),
                    "active_deadline_seconds": deadline, "deadline_to_abort_request": late,
                    "abort_to_fljob_end": round(to_fljob, 1), "abort_to_server_end": round(to_server, 1),
                    "ok_fljob": (st.get("phase"), st.get("reason"), ab.get("cause"), ab.get("method")) == (
                        "Aborted", "DeadlineExceeded", "DeadlineExceeded", "Graceful"),
                    # requestedAt and startTime are whole seconds: not before the deadline, and soon after it
                    "ok_on_time": late is not None and 0 <= late <= 5,
                    "ok_server": status == "FINISHED:ABORTED"}

        t_phase = time.monotonic()
        th = [
            threading.Thread(target=run, args=(n, f))
            for n, f in (
                ("b", scenario_fail("unsafe", 102, "UnsafeComponent")),
                ("c", scenario_fail("bad_arg", 103, "ConfigError")),
                ("d", scenario_abort("admin")),
                ("e", scenario_abort("kubectl")),
                ("h", scenario_delete),
                ("i", scenario_deadline),
            )
        ]
        for t in th:
            t.start()
            time.sleep(0.3)  # submit in this order
        [t.join() for t in th]
        log(f"phase 2 (b c d e h i) {time.monotonic() - t_phase:.1f} s")

        # --- (f) the operator SIGKILLed while a job trains ----------------------------------------------------
        def scenario_f():
            job_id = adm.submit(numpy_job(jobs_dir, "f-kill", rounds=6, sleep_per_round=2))
            wait_training(job_id)
            operator.kill()
            killed = time.monotonic()
            time.sleep(3)
            operator.start()
            restarted = time.monotonic() - killed
            status = adm.wait_job(job_id, 180)
            o = wait_fljob_terminal(job_id)
            st = o["status"]
            name = o["metadata"]["name"]
            time.sleep(1)
            uids = pods_w.pod_uids.get(name, set())

            def ledger_empty():
                s = custom.get_namespaced_custom_object(GROUP, VERSION, ns, "flsites", SITE).get("status") or {}
                return not s.get("allocations")
            empty = _true_within(ledger_empty, 20)
            return {"job_id": job_id, "server": status, "phase": st.get("phase"), "exit": st.get("exitCode"),
                    "pods_ever": len(uids), "operator_down": round(restarted, 1), "ledger_empty": empty,
                    "ok_server": status == "FINISHED:COMPLETED",
                    "ok_fljob": st.get("phase") == "Succeeded" and st.get("exitCode") == 0,
                    "ok_one_pod": len(uids) == 1, "ok_ledger": empty}

        t_phase = time.monotonic()
        run("f", scenario_f)

        # --- (g) two jobs, capacity 1 ---------------------------------------------------------------------
        def scenario_g():
            custom.patch_namespaced_custom_object(GROUP, VERSION, ns, "flsites", SITE,
                                                  {"spec": {"capacity": {"jobs": 1}}})
            ids = [adm.submit(numpy_job(jobs_dir, f"g-{i}", rounds=2)) for i in (1, 2)]
            statuses = [adm.wait_job(j, 240) for j in ids]
            objs = [wait_fljob_terminal(j) for j in ids]
            names = sorted((o["metadata"]["creationTimestamp"], o["metadata"]["name"]) for o in objs)
            first, second = names[0][1], names[1][1]
            ph = {n: list(flj_w.phases.get(n, [])) for n in (first, second)}
            tm = {n: dict((p_, t_) for t_, p_ in reversed(flj_w.times.get(n, []))) for n in (first, second)}
            # The second waits for the site (Admitted reason Queued: short of jobs) and starts only after the first
            # has finished.
            serial = (tm[second].get("Starting") or 0) >= (tm[first].get("Succeeded") or float("inf"))
            return {"job_ids": ids, "server": statuses,
                    "phases_first": ph[first], "phases_second": ph[second],
                    "second_started_after_first_ended": serial,
                    "ok_server": all(s == "FINISHED:COMPLETED" for s in statuses),
                    "ok_fljobs": all(o["status"].get("phase") == "Succeeded" for o in objs),
                    "ok_second_queued": "Queued/Queued" in ph[second] and "Queued/Queued" not in ph[first],
                    "ok_serial": serial}

        run("g", scenario_g)
        log(f"phase 3 (f, g) {time.monotonic() - t_phase:.1f} s")

        # --- (j) task-scope aborts: the annotation, then the parent's JobExecutor.abort_task ------------------
        def pod_log(pod):
            try:
                return core.read_namespaced_pod_log(pod, ns, _request_timeout=10)
            except Exception:  # noqa: BLE001
                return ""

        def waiting_task(pod, rnd):
            """The id of round `rnd`'s train task once the job's AbortableTrainer waits on its abort signal."""
            m = re.search(rf"AbortableTrainer: round {rnd} task (\S+) waits for its abort signal", pod_log(pod))
            return m.group(1) if m else None

        def aborted_at(pod, task_id):
            """The worker's epoch time of `ABORT_TASK: aborted task train (id <task_id>)`, once it logged it."""
            m = re.search(rf"ABORT_TASK: aborted task train \(id {re.escape(task_id)}\) \(t=([0-9.]+)\)",
                          pod_log(pod))
            return float(m.group(1)) if m else None

        def scenario_j():
            """`kubectl annotate flj <job> fljob.dev/abort-task=<new value>` while round 0's task runs (it waits up
            to 60 s for its abort signal): the task is aborted, the pod stays, the job goes on. Round 1's task is
            then aborted from the client parent (ClientEngine.abort_task -> JobExecutor.abort_task over CellNet).
            Round 2 trains; the server's ScatterAndGather (ignore_result_error) ignores the aborted rounds."""
            job_id = adm.submit(abort_task_job(jobs_dir, "j-abort-task", rounds=3, wait_rounds=(0, 1),
                                               wait_seconds=60))
            name = fljob_name(job_id, SITE)
            pod = wait_for(lambda: (((_get_or_none(lambda: fljob(job_id)) or {}).get("status") or {})
                                    .get("podName")), 90, f"pod of {name}")
            # status.podName is recorded before the pod is created (the decision is written first, then acted on):
            # the pod is read once it exists
            uid = wait_for(lambda: _get_or_none(lambda: core.read_namespaced_pod(pod, ns)), 30,
                           f"pod {pod} created").metadata.uid
            task0 = wait_for(lambda: waiting_task(pod, 0), 90, "round 0's task waiting")
            value = f"e2e-{uuid.uuid4().hex[:6]}"
            t_annotate = time.time()
            t0 = time.monotonic()
            kubectl(env, "-n", ns, "annotate", "--overwrite", "flj", name, f"fljob.dev/abort-task={value}")
            at0 = wait_for(lambda: aborted_at(pod, task0), 30, f"task {task0} aborted")
            to_aborted = at0 - t_annotate
            st = fljob(job_id)["status"]
            last = st.get("lastTaskAbort") or {}
            # round 1: the parent's own path
            task1 = wait_for(lambda: waiting_task(pod, 1), 60, "round 1's task waiting")
            t_parent = time.time()
            (trigger_spool / f"{job_id}.abort-task").write_text("")
            done = wait_for(lambda: (trigger_spool / f"{job_id}.abort-task.done").is_file()
                            and (trigger_spool / f"{job_id}.abort-task.done").read_text(), 30, "parent abort_task")
            at1 = wait_for(lambda: aborted_at(pod, task1), 30, f"task {task1} aborted")
            status = adm.wait_job(job_id, 120)
            o = wait_fljob_terminal(job_id)
            wall = time.monotonic() - t0
            fst = o["status"]
            text = pod_log(pod)
            p_ = core.read_namespaced_pod(pod, ns)
            cs = (p_.status.container_statuses or [None])[0]
            term = cs.state.terminated.exit_code if cs and cs.state and cs.state.terminated else None
            uids = pods_w.pod_uids.get(name, set())
            server_log = (p.base / "server.out").read_text(errors="replace")
            ignored = [int(r) for r in re.findall(
                rf"run={job_id}, wf=scatter_and_gather, peer={CLIENT}, peer_run={job_id}, peer_rc=TASK_ABORTED, "
                rf"task_name=train, task_id=\S+\] - Ignore the result from {CLIENT} at round (\d+)\.", server_log)]
            aggregated = re.findall(rf"run={job_id}, wf=scatter_and_gather\] - aggregating (\d) update", server_log)
            return {
                "job_id": job_id, "server": status, "phase": fst.get("phase"), "exit": fst.get("exitCode"),
                "container_exit": term, "last_task_abort": last, "pod_uids": len(uids),
                "annotate_to_task_aborted": round(to_aborted, 2),
                "parent_abort_task": done.strip().split(" ", 1)[1],
                "parent_to_task_aborted": round(at1 - t_parent, 2),
                "aborted_lines": text.count("ABORT_TASK: aborted task"),
                "server_ignored_rounds": ignored, "server_aggregated_updates": aggregated,
                "annotate_to_fljob_end": round(wall, 1),
                "ok_last_task_abort": last.get("value") == value and bool(last.get("relayedAt")),
                "ok_same_pod": uids == {uid},
                "ok_task0_aborted": f"AbortableTrainer: round 0 task {task0} ABORTED" in text,
                "ok_task1_aborted": f"AbortableTrainer: round 1 task {task1} ABORTED" in text,
                "ok_once_each": text.count("ABORT_TASK: aborted task") == 2,
                "ok_not_an_app_abort": "the job received NVFlare's ABORT" not in text,
                "ok_parent_sent": done.strip().split(" ", 1)[1] == "Abort signal has been sent to the current task.",
                "ok_round2_trained": "Completed mock training for round 2/3" in text,
                "ok_server": status == "FINISHED:COMPLETED",
                "ok_server_ignored": ignored == [0, 1] and aggregated == ["0", "0", "1"],
                "ok_fljob": fst.get("phase") == "Succeeded" and fst.get("exitCode") == 0 == term,
            }

        t_phase = time.monotonic()
        run("j", scenario_j)
        log(f"phase 4 (j) {time.monotonic() - t_phase:.1f} s")

        # --- (k) a study: its dataset on a PVC (a static hostPath PV on the real node) and its env var -------------
        def scenario_k():
            """study_runtime.yaml (above) gives study STUDY the dataset DATASET, the PVC study_pvc read-only, and
            the env SCALE_ENV. The PVC is bound to a PersistentVolume of its own StorageClass name whose hostPath is
            a directory of the real node holding delta.txt (the pod has no hostPath: Pod Security `restricted`
            forbids it). A job submitted in the study (an admin session whose active study it is, as `nvflare job
            submit --study` opens) gets the mount and the env in its FLJob's spec.podTemplate; its own StudyTrainer
            reads both each round, and the server's model is what they make it."""
            nonce = f"k-{suffix}"
            data_dir = Path(tempfile.mkdtemp(prefix=f"fljob-e2e-{suffix}-"))
            cleanup.append(lambda: shutil.rmtree(data_dir, ignore_errors=True))
            data_dir.chmod(0o755)  # the worker runs as uid 1000
            (data_dir / "delta.txt").write_text(f"{DELTA} {nonce}\n")
            (data_dir / "delta.txt").chmod(0o644)
            pv, sc = f"fljob-e2e-{suffix}-{DATASET}", f"fljob-e2e-{suffix}"
            real_node_claim(core, ns, study_pvc, pv, sc, data_dir, "10Mi", cleanup)
            t_bind = time.monotonic()
            claim = wait_for(lambda: (lambda c: c if c.status.phase == "Bound" else None)(
                core.read_namespaced_persistent_volume_claim(study_pvc, ns)), 60, f"PVC {study_pvc} Bound")
            bound_in = time.monotonic() - t_bind

            data_file = f"/data/{STUDY}/{DATASET}/delta.txt"  # NVFlare's mount path: /data/<study>/<dataset>
            t = time.monotonic()
            job_id = adm.submit(study_job(jobs_dir, "k-study", data_file=data_file, scale_env=SCALE_ENV,
                                          rounds=K_ROUNDS), study=STUDY)
            status = adm.wait_job(job_id, 180, study=STUDY)
            wall = time.monotonic() - t
            o = wait_fljob_terminal(job_id)
            st = o["status"]
            meta_study = adm.job_meta(job_id, study=STUDY).get("study")
            # the FLJob, as the launcher filled it in
            vname = f"data-{STUDY}-{DATASET}"
            mount_path = f"/data/{STUDY}/{DATASET}"
            tspec = ((o["spec"].get("podTemplate") or {}).get("spec")) or {}
            vol = next((v for v in tspec.get("volumes") or [] if v.get("name") == vname), None)
            mount = next((m for m in tspec.get("volumeMounts") or [] if m.get("mountPath") == mount_path), None)
            fenv = [e for e in tspec.get("env") or [] if e.get("name") == SCALE_ENV]
            # the worker pod the operator made of it
            pod_name = st.get("podName")
            pod = core.read_namespaced_pod(pod_name, ns)
            pvol = next((v for v in pod.spec.volumes or [] if v.name == vname), None)
            pclaim = pvol.persistent_volume_claim if pvol else None
            ctr = pod.spec.containers[0]
            pmount = next((m for m in ctr.volume_mounts or [] if m.mount_path == mount_path), None)
            penv = [(e.name, e.value) for e in ctr.env or [] if e.name == SCALE_ENV]
            cs = (pod.status.container_statuses or [None])[0]
            term = cs.state.terminated.exit_code if cs and cs.state and cs.state.terminated else None
            # what the worker read, in its log (through the API)
            text = pod_log(pod_name)
            want_line = (f"StudyTrainer: read {data_file}: {f'{DELTA} {nonce}'!r}; {SCALE_ENV}={SCALE!r}; "
                         f"delta {float(DELTA) * float(SCALE)}")
            lines = [ln for ln in text.splitlines() if "StudyTrainer: read" in ln]
            # the server's final model, from the job's result as the admin downloads it
            result = adm.download_job_result(job_id, work / "k-result", study=STUDY)
            models = sorted(Path(result).rglob("server.npy")) if result else []
            final = [np.load(m).tolist() for m in models]
            # NPModelPersistor's initial model, + rounds x delta (one client: the aggregate is its update)
            expected = (np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=float)
                        + K_ROUNDS * float(DELTA) * float(SCALE)).tolist()
            return {
                "job_id": job_id, "study": meta_study, "server": status, "phase": st.get("phase"),
                "exit": st.get("exitCode"), "container_exit": term, "pod": pod_name, "node": pod.spec.node_name,
                "pvc": f"{study_pvc} -> {claim.spec.volume_name} ({sc})", "pvc_bound_s": round(bound_in, 1),
                "fljob_volume": vol, "fljob_mount": mount, "fljob_env": fenv,
                "pod_claim": (pclaim.claim_name, pclaim.read_only) if pclaim else None,
                "pod_mount": (pmount.name, pmount.mount_path, pmount.read_only) if pmount else None,
                "pod_env": penv, "log_lines": lines, "final_model": final, "submit_to_server_end": round(wall, 1),
                "ok_pvc_bound": claim.spec.volume_name == pv,
                "ok_study": meta_study == STUDY,
                "ok_fljob_volume": vol == {"name": vname,
                                           "persistentVolumeClaim": {"claimName": study_pvc, "readOnly": True}},
                "ok_fljob_mount": mount == {"name": vname, "mountPath": mount_path, "readOnly": True},
                "ok_fljob_env": fenv == [{"name": SCALE_ENV, "value": SCALE}],
                "ok_pod_claim": bool(pclaim) and (pclaim.claim_name, pclaim.read_only) == (study_pvc, True),
                "ok_pod_mount": bool(pmount) and (pmount.name, pmount.read_only) == (vname, True),
                "ok_pod_env": penv == [(SCALE_ENV, SCALE)],
                "ok_real_node": pod.spec.node_name == env["node"],
                "ok_log": len(lines) == K_ROUNDS and all(want_line in ln for ln in lines),
                "ok_result": bool(final) and all(np.allclose(f, expected) for f in final),
                "ok_server": status == "FINISHED:COMPLETED",
                "ok_fljob": st.get("phase") == "Succeeded" and st.get("exitCode") == 0 == term,
            }

        t_phase = time.monotonic()
        run("k", scenario_k)
        log(f"phase 5 (k) {time.monotonic() - t_phase:.1f} s")

        # every FLJob pod of the run: exactly one per FLJob, all on the real node
        pods_per_job = {k: len(v) for k, v in pods_w.pod_uids.items()}
        results["pods_per_fljob"] = pods_per_job
        if any(n != 1 for n in pods_per_job.values()):
            failures.append(f"an FLJob had more than one pod: {pods_per_job}")
    finally:
        for w in watchers:
            w.stop_flag.set()
        tear_down(custom, ns, operator, cleanup)
        try:
            for n in (ns,):
                for o in custom.list_namespaced_custom_object(GROUP, VERSION, n, "fljobs").get("items") or []:
                    custom.patch_namespaced_custom_object(GROUP, VERSION, n, "fljobs", o["metadata"]["name"],
                                                          {"metadata": {"finalizers": None}})
        except Exception:  # noqa: BLE001
            pass

    total = time.monotonic() - t_total
    print_report(results, total)
    assert not failures, "e2e failures:\n  " + "\n  ".join(failures)


def tear_down(custom, ns, operator, cleanup):
    """The FLJobs of `ns` go first, while the operator still runs (it owns their cleanup finalizer); then every
    cleanup step, last first, each on its own (a failing one is logged); then the operator."""
    try:
        if operator and operator.proc and operator.proc.poll() is None:
            custom.delete_collection_namespaced_custom_object(GROUP, VERSION, ns, "fljobs")
            _true_within(lambda: not custom.list_namespaced_custom_object(
                GROUP, VERSION, ns, "fljobs").get("items"), 30)
    except Exception as e:  # noqa: BLE001
        log(f"cleanup of FLJobs: {e}")
    for fn in reversed(cleanup):
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            log(f"cleanup: {e}")
    if operator:
        operator.stop()


def _get_or_none(fn):
    from kubernetes.client.rest import ApiException

    try:
        return fn()
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def _ts(s):
    """An API timestamp (RFC 3339) as epoch seconds."""
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def _true_within(pred, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.5)
    return False


def print_report(results, total):
    a, s = results.get("a") or {}, results.get("stock") or {}
    print("\n=== NVFlare 2.9.0 numpy job (2 rounds) on the real node: fljob-operator vs ClientK8sJobLauncher ===")
    rows = [
        ("", "FLJobLauncher + fljob-operator", "stock ClientK8sJobLauncher"),
        ("wall time (submit -> server FINISHED)", f"{a.get('wall')} s", f"{s.get('wall')} s"),
        ("API requests: client parent", str(a.get("parent_requests")), str(s.get("parent_requests"))),
        ("API requests: operator", str(a.get("operator_requests")), "-"),
        ("API requests: total",
         str((a.get("parent_requests") or 0) + (a.get("operator_requests") or 0)) if a else "?",
         str(s.get("parent_requests"))),
        ("server status", str(a.get("server")), str(s.get("server"))),
        ("worker outcome", f"FLJob {a.get('phase')} exit {a.get('exit')}",
         f"pod {s.get('pod_phase')} exit {s.get('exit')}"),
        ("results back in parent workspace", str(a.get("results_uploaded")), str(s.get("results_uploaded"))),
        ("pods left after the job", str(a.get("pods_left")), str(s.get("pods_left"))),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    for r in rows:
        print(f"{r[0]:<{w0}} | {r[1]:<{w1}} | {r[2]}")
    print("method: client parent = every kubernetes ApiClient.call_api in the parent process (a watch counts once),"
          " from submit until the job's cleanup; operator = its fljob_api_requests_total delta over the same window"
          " (only this job ran in its namespace)")
    print(f"  fljob parent: {a.get('parent_by')}")
    print(f"  operator:     {a.get('operator_by')}")
    print(f"  stock parent: {s.get('parent_by')}")
    print("\n=== scenarios ===")
    for k in ("a", "b", "c", "d", "e", "h", "i", "f", "g", "j", "k", "stock"):
        r = results.get(k)
        if r is None:
            print(f"{k}: not run")
            continue
        ok = all(v for kk, v in r.items() if kk.startswith("ok_")) and "error" not in r
        keep = {kk: v for kk, v in r.items() if not kk.endswith("_by") and not kk.startswith("ok_")}
        print(f"{k}: {'PASS' if ok else 'FAIL'} {r['seconds']} s {keep}")
    print(f"pods per FLJob (watched UIDs): {results.get('pods_per_fljob')}")
    print(f"total {total:.1f} s")
