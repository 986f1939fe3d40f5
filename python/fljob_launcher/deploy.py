"""Switch a client kit prepared by ``nvflare deploy prepare`` (Kubernetes runtime) from NVFlare's own
``ClientK8sJobLauncher`` to ``FLJobLauncher``.

NVFlare 2.9.0's ``nvflare deploy prepare <client kit> --config k8s.yaml`` writes a copy of the kit whose
``local/resources.json.default`` launches every job as a bare pod (``k8s_launcher``), and a Helm chart for the client
parent (``helm_chart/``: Deployment, ServiceAccount, Role, RoleBinding, Service). This module rewrites that output in
place, so the same chart runs the parent with jobs going through fljob-operator::

    python -m fljob_launcher.deploy <prepared kit> [--image IMAGE] [--startup-secret NAME]

What it changes:

- ``local/resources.json.default`` (and ``resources.json`` if there is one): the ``k8s_launcher`` component becomes
  ``fljob_launcher.FLJobLauncher`` with the same namespace; the PassthroughResourceManager stays (quota is the
  FLSite's).
- ``helm_chart/templates/role.yaml``: the parent may create and watch FLJobs and write the per-job credentials
  Secrets; it gets no rights on pods or events any more.
- ``helm_chart/values.yaml``: ``image`` when ``--image`` is given (the parent image needs ``fljob-launcher``).
- writes ``fljob/flsite.yaml``: the FLSite of this client, from the kit itself (client name, server target and
  scheme, the parent's internal listener as the workers' ``parentUrl``) and from the stock launcher's arguments
  (``default_python_path``, ``workspace_mount_path``, ``pending_timeout``).

Arguments of the stock launcher that have no FLSite equivalent are reported, not silently dropped. Running it twice
gives the same result.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

STOCK_LAUNCHER = "nvflare.app_opt.job_launcher.k8s_launcher.ClientK8sJobLauncher"
OUR_LAUNCHER = "fljob_launcher.FLJobLauncher"
OUR_LAUNCHER_ID = "fljob_launcher"
RESOURCE_FILES = ("resources.json.default", "resources.json")
DEFAULT_WORKSPACE = "/var/tmp/nvflare/workspace"
GROUP_VERSION = "fljob.dev/v1alpha1"

# The parent's Role: what FLJobLauncher does (python/README.md, "RBAC"). Uses the helpers the prepared chart's
# _helpers.tpl defines, so names and labels stay those of the chart.
ROLE_TEMPLATE = """\
{{- if .Values.rbac.create }}
# The client parent launches jobs as FLJobs (fljob_launcher.FLJobLauncher); fljob-operator makes the pods.
# Written by `python -m fljob_launcher.deploy`.
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: {{ include "nvflare-client.name" . }}-launcher
  labels:
    {{- include "nvflare-client.labels" . | nindent 4 }}
rules:
- apiGroups: ["fljob.dev"]
  resources: ["fljobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create", "update", "patch", "delete"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: {{ include "nvflare-client.name" . }}-launcher
  labels:
    {{- include "nvflare-client.labels" . | nindent 4 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: {{ include "nvflare-client.name" . }}-launcher
subjects:
- kind: ServiceAccount
  name: {{ include "nvflare-client.name" . }}
  namespace: {{ .Release.Namespace }}
{{- end }}
"""

# Stock launcher arguments -> what becomes of them.
_NOTES = {
    "security_context": "the operator gives every worker pod its own Pod Security `restricted` securityContext",
    "image_pull_secrets": "FLSite has no imagePullSecrets: add them to the namespace's `default` ServiceAccount "
    "(`kubectl patch serviceaccount default -p '{\"imagePullSecrets\": [{\"name\": \"...\"}]}'`), which the worker "
    "pods use",
    "study_data_pvc_file_path": "legacy study_data.yaml is not read: move its mounts to local/study_runtime.yaml",
    "config_file_path": "the parent uses its ServiceAccount (in-cluster config)",
    "timeout": "FLJobLauncher's own `timeout` argument is off by default: a job may wait in the site's queue",
}
_CARRIED = {"namespace", "default_python_path", "workspace_mount_path", "pending_timeout"}


class DeployError(Exception):
    """The directory is not something this tool can switch; the message says why and what to do."""


@dataclass
class Result:
    kit: Path  # as given (the printed commands use it)
    site: str
    namespace: str
    flsite_path: Path
    release: str
    changed: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def next_steps(self, startup_secret: str) -> List[str]:
        ns, kit = self.namespace, self.kit
        return [
            f"kubectl -n {ns} create secret generic {startup_secret} --from-file={kit / 'startup'}/",
            f"kubectl apply -f {kit / 'fljob' / 'flsite.yaml'}",
            f"helm upgrade --install {self.release} {kit / 'helm_chart'} --namespace {ns}",
        ]


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DeployError(f"cannot read {path}: {e}") from e


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=4) + "\n", encoding="utf-8")


def _launcher_component(components: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    for c in components:
        if c.get("path") in (STOCK_LAUNCHER, OUR_LAUNCHER):
            return c
    return None


def switch(
    kit: Path,
    image: Optional[str] = None,
    startup_secret: Optional[str] = None,
    worker_image: Optional[str] = None,
) -> Result:
    """Rewrite the prepared kit `kit` in place; see the module docstring."""
    shown = Path(kit)
    kit = shown.resolve()
    chart = kit / "helm_chart"
    values_path = chart / "values.yaml"
    if not values_path.is_file() or not (kit / "local").is_dir():
        raise DeployError(
            f"{kit} is not a kit prepared for Kubernetes (no helm_chart/values.yaml or local/): run "
            "`nvflare deploy prepare <client kit> --config <k8s config>` first and pass its output directory"
        )
    values = yaml.safe_load(values_path.read_text(encoding="utf-8")) or {}
    if "siteName" not in values:
        raise DeployError(f"{values_path} has no siteName: this tool switches a client kit, not a server kit")
    client_name = str(values["siteName"])
    site = str(values.get("serviceName") or values.get("name") or client_name)
    helpers = chart / "templates" / "_helpers.tpl"
    if 'define "nvflare-client.name"' not in (helpers.read_text(encoding="utf-8") if helpers.is_file() else ""):
        raise DeployError(f"{helpers} does not define nvflare-client.name: not a chart of `nvflare deploy prepare`")

    # --- local/resources.json(.default): the launcher ------------------------------------------------------------
    changed: List[str] = []
    notes: List[str] = []
    stock_args: Optional[Dict[str, Any]] = None
    namespace: Optional[str] = None
    found = False
    for name in RESOURCE_FILES:
        path = kit / "local" / name
        if not path.is_file():
            continue
        res = _read_json(path)
        comps = res.get("components") or []
        comp = _launcher_component(comps)
        if comp is None:
            raise DeployError(
                f"{path} has neither {STOCK_LAUNCHER} nor {OUR_LAUNCHER}: was the kit prepared with `runtime: k8s`?"
            )
        found = True
        args = dict(comp.get("args") or {})
        if comp.get("path") == STOCK_LAUNCHER:
            stock_args = stock_args or args
            ns = args.get("namespace") or "default"
            comp.clear()
            comp.update({"id": OUR_LAUNCHER_ID, "path": OUR_LAUNCHER, "args": {"namespace": ns, "site": site}})
            _write_json(path, res)
            changed.append(f"{path.relative_to(kit)}: k8s_launcher -> {OUR_LAUNCHER}")
            namespace = namespace or ns
        else:
            namespace = namespace or args.get("namespace") or "default"
    if not found:
        raise DeployError(f"{kit / 'local'} has no resources.json.default: not a prepared client kit")

    # --- the chart: RBAC and image -----------------------------------------------------------------------------
    role = chart / "templates" / "role.yaml"
    if not role.is_file() or role.read_text(encoding="utf-8") != ROLE_TEMPLATE:
        role.write_text(ROLE_TEMPLATE, encoding="utf-8")
        changed.append(f"{role.relative_to(kit)}: fljobs and secrets, no pods or events")
    if image:
        repo, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
        new = dict(values.get("image") or {})
        new.update({"repository": repo, "tag": tag})
        if new != values.get("image"):
            values["image"] = new
            values_path.write_text(yaml.safe_dump(values, default_flow_style=False, sort_keys=False), encoding="utf-8")
            changed.append(f"{values_path.relative_to(kit)}: image {image}")
    img = values.get("image") or {}
    parent_image = f"{img.get('repository')}:{img['tag']}" if img.get("tag") else str(img.get("repository"))

    # --- the FLSite --------------------------------------------------------------------------------------------
    fed_client = _read_json(kit / "startup" / "fed_client.json")
    try:
        service = fed_client["servers"][0]["service"]
        target = service["target"]
    except (KeyError, IndexError, TypeError) as e:
        raise DeployError(f"{kit / 'startup' / 'fed_client.json'} has no servers[0].service.target") from e
    comm = _read_json(kit / "local" / "comm_config.json") if (kit / "local" / "comm_config.json").is_file() else {}
    internal = ((comm.get("internal") or {}).get("resources")) or {}
    conn_sec = str(internal.get("connection_security") or "clear")
    host = internal.get("host") or site
    port = internal.get("port") or values.get("port") or 8102
    spec: Dict[str, Any] = {
        "clientName": client_name,
        "server": {"target": target, "scheme": service.get("scheme") or "grpc"},
        "parentUrl": f"{'stcp' if conn_sec == 'mtls' else 'tcp'}://{host}:{port}",
        "parentConnSec": conn_sec,
        "startupKitSecret": startup_secret or f"{site}-startup",
        "defaults": {"image": worker_image or parent_image},
    }
    args = stock_args or {}
    if args.get("default_python_path"):
        spec["defaults"]["pythonPath"] = args["default_python_path"]
    if args.get("workspace_mount_path") and args["workspace_mount_path"] != DEFAULT_WORKSPACE:
        spec["workspace"] = {"mountPath": args["workspace_mount_path"]}
    if args.get("pending_timeout") is not None:
        spec["pendingTimeoutSeconds"] = int(args["pending_timeout"])
    for key, value in sorted(args.items()):
        if key in _CARRIED or value in (None, [], {}):
            continue
        notes.append(f"k8s_launcher arg {key}: not carried: {_NOTES.get(key, 'FLJobLauncher has no equivalent')}")
    flsite = {
        "apiVersion": GROUP_VERSION,
        "kind": "FLSite",
        "metadata": {"name": site, "namespace": namespace},
        "spec": spec,
    }
    out = kit / "fljob" / "flsite.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = (
        "# The FLSite of this client parent (python -m fljob_launcher.deploy). Add spec.capacity (the site's quota)\n"
        "# and spec.defaults.resources; spec.defaults.image is the worker image: it needs nvflare and fljob-launcher.\n"
        + yaml.safe_dump(flsite, default_flow_style=False, sort_keys=False)
    )
    # Written when the launcher is switched now (from the stock launcher's arguments), or when missing; a kit
    # switched before keeps its FLSite as it is (it may have been edited since).
    if stock_args is not None or not out.is_file():
        if not out.is_file() or out.read_text(encoding="utf-8") != text:
            out.write_text(text, encoding="utf-8")
            changed.append(f"{out.relative_to(kit)}: FLSite {site}")
    return Result(kit=shown, site=site, namespace=namespace or "default", flsite_path=out, release=site,
                  changed=changed, notes=notes)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m fljob_launcher.deploy",
        description="Switch a client kit prepared by `nvflare deploy prepare` (runtime: k8s) from NVFlare's "
        "ClientK8sJobLauncher to fljob_launcher.FLJobLauncher, in place, and write its FLSite.",
    )
    ap.add_argument("kit", type=Path, help="the prepared kit (the --output of nvflare deploy prepare)")
    ap.add_argument("--image", help="the client parent's image (needs nvflare and fljob-launcher)")
    ap.add_argument("--worker-image", help="the FLSite's default worker image (default: the parent's image)")
    ap.add_argument("--startup-secret", help="the Secret made from startup/ (default: <site>-startup)")
    a = ap.parse_args(argv)
    try:
        r = switch(a.kit, image=a.image, startup_secret=a.startup_secret, worker_image=a.worker_image)
    except DeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in r.changed or ["nothing to change: already switched"]:
        print(f"changed: {line}")
    for line in r.notes:
        print(f"note: {line}")
    print("then:")
    for line in r.next_steps(a.startup_secret or f"{r.site}-startup"):
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
