"""`python -m fljob_launcher.deploy` on the real output of NVFlare 2.9.0's `nvflare provision` + `nvflare deploy
prepare` (runtime k8s): the launcher, the chart's RBAC and the FLSite it writes. Helm renders the switched chart
when a helm binary is at hand (FLJOB_TOOLS_BIN or PATH; `make test` has one)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from fljob_launcher import FLJobLauncher
from fljob_launcher.deploy import OUR_LAUNCHER, STOCK_LAUNCHER, DeployError, main, switch

PROJECT_YML = """api_version: 3
name: deploytest
description: fljob_launcher.deploy
participants:
  - {name: localhost, type: server, org: nvidia, fed_learn_port: 18002, admin_port: 18003}
  - {name: site_7, type: client, org: nvidia}
  - {name: admin@nvidia.com, type: admin, org: nvidia, role: project_admin}
builders:
  - path: nvflare.lighter.impl.workspace.WorkspaceBuilder
  - path: nvflare.lighter.impl.static_file.StaticFileBuilder
    args: {config_folder: config}
  - path: nvflare.lighter.impl.cert.CertBuilder
  - path: nvflare.lighter.impl.signature.SignatureBuilder
"""


def _nvflare(*args, cwd):
    return subprocess.run([sys.executable, "-m", "nvflare.cli", *args], cwd=cwd, check=True, capture_output=True,
                          text=True)


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    """A provisioned project; two prepared copies of client site_7 (plain, and with every launcher option)."""
    base = tmp_path_factory.mktemp("deploy")
    (base / "project.yml").write_text(PROJECT_YML)
    _nvflare("provision", "-p", "project.yml", "-w", "prov", cwd=base)
    prod = base / "prov" / "deploytest" / "prod_00"
    out = {}
    configs = {
        "plain": {"runtime": "k8s", "namespace": "fl-site-7",
                  "parent": {"docker_image": "registry.example/nvflare-site:2.9.0", "parent_port": 8104},
                  "job_launcher": {"pending_timeout": 300, "default_python_path": "/opt/py/bin/python3"}},
        "full": {"runtime": "k8s", "namespace": "fl-site-7",
                 "parent": {"docker_image": "registry.example/nvflare-site:2.9.0",
                            "internal_connection_security": "clear"},
                 "job_launcher": {"image_pull_secrets": ["regcred"],
                                  "job_pod_security_context": {"runAsUser": 1000}}},
    }
    for name, cfg in configs.items():
        (base / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        _nvflare("deploy", "prepare", str(prod / "site_7"), "--config", f"{name}.yaml", "--output", f"out-{name}",
                 cwd=base)
        out[name] = base / f"out-{name}"
    out["server"] = prod / "localhost"
    return out


@pytest.fixture
def kit(kits, tmp_path):
    def copy(name="plain"):
        dst = tmp_path / name
        shutil.copytree(kits[name], dst)
        return dst
    return copy


def _launcher(kit_dir):
    res = json.loads((kit_dir / "local" / "resources.json.default").read_text())
    comps = [c for c in res["components"] if c["path"] in (STOCK_LAUNCHER, OUR_LAUNCHER)]
    assert len(comps) == 1, comps
    return res, comps[0]


def test_the_stock_launcher_becomes_ours_with_its_namespace(kit):
    k = kit()
    res0, stock = _launcher(k)
    assert stock["path"] == STOCK_LAUNCHER  # what deploy prepare wrote
    r = switch(k)
    res, comp = _launcher(k)
    # site_7 is not a Kubernetes name: the FLSite (and the launcher's site) is the chart's service name
    assert comp == {"id": "fljob_launcher", "path": OUR_LAUNCHER, "args": {"namespace": "fl-site-7", "site": r.site}}
    assert r.site == yaml.safe_load((k / "helm_chart" / "values.yaml").read_text())["serviceName"] != "site_7"
    # NVFlare's launcher builds the component from these args: so does this
    FLJobLauncher(**comp["args"])
    # the rest of the site's resources (allow list, resource manager, other components) is untouched
    assert res["class_allow_list"] == res0["class_allow_list"]
    rest = [c for c in res["components"] if c is not comp]
    assert rest == [c for c in res0["components"] if c["path"] != STOCK_LAUNCHER]
    assert any(c["id"] == "resource_manager" and c["path"].endswith("PassthroughResourceManager") for c in rest)


def test_the_flsite_comes_from_the_kit_and_the_stock_launcher_args(kit):
    k = kit()
    r = switch(k, worker_image="registry.example/nvflare-worker:2.9.0")
    doc = yaml.safe_load(r.flsite_path.read_text())
    fed = json.loads((k / "startup" / "fed_client.json").read_text())["servers"][0]["service"]
    assert doc["kind"] == "FLSite" and doc["apiVersion"] == "fljob.dev/v1alpha1"
    assert doc["metadata"] == {"name": r.site, "namespace": "fl-site-7"}
    spec = doc["spec"]
    assert spec["clientName"] == "site_7"  # the NVFlare name, as the worker's -c needs it
    assert spec["server"] == {"target": fed["target"], "scheme": fed["scheme"]}
    # the parent's internal listener as deploy prepare wrote it: its Service, port 8104, mtls -> stcp
    assert spec["parentUrl"] == f"stcp://{r.site}:8104" and spec["parentConnSec"] == "mtls"
    assert spec["startupKitSecret"] == f"{r.site}-startup"
    assert spec["defaults"] == {"image": "registry.example/nvflare-worker:2.9.0", "pythonPath": "/opt/py/bin/python3"}
    assert spec["pendingTimeoutSeconds"] == 300
    assert "workspace" not in spec  # the default mount path is the FLSite's default too
    assert r.notes == []


def test_the_role_is_ours_and_helm_renders_it(kit):
    k = kit()
    switch(k, image="registry.example/site-parent:1.2")
    values = yaml.safe_load((k / "helm_chart" / "values.yaml").read_text())
    assert values["image"]["repository"] == "registry.example/site-parent" and values["image"]["tag"] == "1.2"
    helm = shutil.which("helm", path=os.pathsep.join(filter(None, [os.environ.get("FLJOB_TOOLS_BIN"),
                                                                  os.environ.get("PATH")])))
    if helm is None:
        text = (k / "helm_chart" / "templates" / "role.yaml").read_text()
        assert "fljobs" in text and '"pods"' not in text
        pytest.skip("no helm binary: the rendered chart is checked by `make test` (FLJOB_TOOLS_BIN)")
    out = subprocess.run([helm, "template", "rel", str(k / "helm_chart"), "--namespace", "fl-site-7"], check=True,
                         capture_output=True, text=True).stdout
    docs = {d["kind"]: d for d in yaml.safe_load_all(out) if d}
    rules = docs["Role"]["rules"]
    assert rules == [
        {"apiGroups": ["fljob.dev"], "resources": ["fljobs"],
         "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "update", "patch", "delete"]},
    ]
    sa = docs["ServiceAccount"]["metadata"]["name"]
    assert docs["RoleBinding"]["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": "fl-site-7"}]
    assert docs["RoleBinding"]["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    c = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "registry.example/site-parent:1.2"
    assert "nvflare.private.fed.app.client.client_train" in c["args"]


def test_running_it_twice_changes_nothing_and_keeps_an_edited_flsite(kit):
    k = kit()
    first = switch(k)
    assert first.changed
    snapshot = {p: p.read_bytes() for p in k.rglob("*") if p.is_file()}
    again = switch(k)
    assert again.changed == []
    assert {p: p.read_bytes() for p in k.rglob("*") if p.is_file()} == snapshot
    # a site edits its FLSite (capacity); a later run leaves it alone
    edited = first.flsite_path.read_text() + "  capacity: {jobs: 2}\n"
    first.flsite_path.write_text(edited)
    switch(k)
    assert first.flsite_path.read_text() == edited


def test_stock_options_without_an_equivalent_are_named(kit):
    k = kit("full")
    r = switch(k)
    spec = yaml.safe_load(r.flsite_path.read_text())["spec"]
    assert spec["parentUrl"].startswith("tcp://") and spec["parentConnSec"] == "clear"
    notes = "\n".join(r.notes)
    assert "image_pull_secrets" in notes and "default` ServiceAccount" in notes
    assert "security_context" in notes and "restricted" in notes


def test_a_kit_it_cannot_switch_is_refused_with_what_to_do(kit, kits, tmp_path, capsys):
    with pytest.raises(DeployError, match="nvflare deploy prepare"):
        switch(tmp_path)  # an empty directory
    # the un-prepared server kit has no chart either
    with pytest.raises(DeployError, match="nvflare deploy prepare"):
        switch(kits["server"])
    # a prepared kit whose launcher is neither NVFlare's nor ours (e.g. process mode put back by hand)
    k = kit()
    path = k / "local" / "resources.json.default"
    res = json.loads(path.read_text())
    res["components"] = [c for c in res["components"] if c["path"] != STOCK_LAUNCHER]
    path.write_text(json.dumps(res))
    assert main([str(k)]) == 2
    assert "runtime: k8s" in capsys.readouterr().err


def test_the_cli_says_what_it_changed_and_what_to_run_next(kit, capsys):
    k = kit()
    assert main([str(k), "--startup-secret", "s7-kit"]) == 0
    out = capsys.readouterr().out
    assert f"changed: local/resources.json.default: k8s_launcher -> {OUR_LAUNCHER}" in out
    assert f"kubectl -n fl-site-7 create secret generic s7-kit --from-file={k / 'startup'}/" in out
    assert "helm upgrade --install " in out and str(k / "helm_chart") in out
    assert main([str(k)]) == 0
    assert "nothing to change: already switched" in capsys.readouterr().out
