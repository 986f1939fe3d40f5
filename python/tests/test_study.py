"""launcher_spec k8s settings and studies (local/study_runtime.yaml, parsed by NVFlare's own reader) -> FLJob."""

import textwrap

import pytest

from fljob_launcher.mapping import k8s_job_settings, merge_pod_templates, study_pod_settings

STUDY_RUNTIME = """\
format_version: 2
studies:
  cancer:
    container: {image: "registry.example.org/cancer:1"}
    datasets:
      scans: {type: mount, source: scans-pvc, mode: ro}
      scratch: {type: mount, source: scratch-pvc, mode: rw}
    env: {SITE_REGION: eu}
    secret_env:
      DB_PASSWORD: {source: db-creds, key: password}
    secret_mounts:
      tls: {source: study-tls, mount_path: /etc/study-tls}
    pod_template:
      metadata: {labels: {study: cancer}}
      spec:
        nodeSelector: {gpu: a100}
        tolerations: [{key: gpu, operator: Exists, effect: NoSchedule}]
        containers: [{name: worker}]
"""


def meta(**k8s):
    m = {"job_id": "j1", "study": "cancer"}
    if k8s:
        m["launcher_spec"] = {"site-1": {"k8s": k8s}}
    return m


def test_k8s_settings():
    assert k8s_job_settings(meta(ephemeral_storage="20Gi", pending_timeout=300), "site-1") == {
        "ephemeralStorage": "20Gi",
        "pendingTimeoutSeconds": 300,
    }
    assert k8s_job_settings(meta(), "site-1") == {}
    with pytest.raises(ValueError, match="ephemeral_storage"):
        k8s_job_settings(meta(ephemeral_storage=20), "site-1")
    with pytest.raises(ValueError, match="pending_timeout"):
        k8s_job_settings(meta(pending_timeout=-1), "site-1")


def test_study_runtime_maps_onto_the_fljob(tmp_path):
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "study_runtime.yaml").write_text(textwrap.dedent(STUDY_RUNTIME))
    got = study_pod_settings(meta(), str(tmp_path))
    assert got["image"] == "registry.example.org/cancer:1"
    t = got["podTemplate"]
    assert t["metadata"] == {"labels": {"study": "cancer"}}
    spec = t["spec"]
    assert spec["nodeSelector"] == {"gpu": "a100"}
    vols = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in spec["volumeMounts"]}
    assert vols["data-cancer-scans"]["persistentVolumeClaim"] == {"claimName": "scans-pvc", "readOnly": True}
    assert mounts["/data/cancer/scans"]["readOnly"] is True and mounts["/data/cancer/scratch"]["readOnly"] is False
    assert vols["secret-cancer-tls"]["secret"] == {"secretName": "study-tls"}
    assert mounts["/etc/study-tls"]["readOnly"] is True
    env = {e["name"]: e for e in spec["env"]}
    assert env["SITE_REGION"]["value"] == "eu"
    assert env["DB_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "db-creds", "key": "password"}
    # No study, another study, or no file: nothing.
    assert study_pod_settings({"job_id": "j"}, str(tmp_path)) == {}
    assert study_pod_settings({"job_id": "j", "study": "other"}, str(tmp_path)) == {}
    assert study_pod_settings(meta(), str(tmp_path / "nowhere")) == {}


def test_bad_study_runtime_is_refused(tmp_path):
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "study_runtime.yaml").write_text("format_version: 1\nstudies: {}\n")
    with pytest.raises(ValueError, match="format_version"):
        study_pod_settings(meta(), str(tmp_path))


def test_merge_pod_templates():
    base = {"spec": {"nodeSelector": {"a": "1"}, "tolerations": [{"key": "x"}]}}
    extra = {"metadata": {"labels": {"s": "c"}}, "spec": {"nodeSelector": {"b": "2"}, "tolerations": [{"key": "y"}]}}
    assert merge_pod_templates(base, extra) == {
        "spec": {"nodeSelector": {"a": "1", "b": "2"}, "tolerations": [{"key": "x"}, {"key": "y"}]},
        "metadata": {"labels": {"s": "c"}},
    }
    assert base["spec"]["nodeSelector"] == {"a": "1"}, "inputs untouched"
