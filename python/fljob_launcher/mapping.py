"""Pure functions that turn NVFlare job data into FLJob fields and FLJob status into NVFlare codes.

Nothing here talks to Kubernetes, so all of it is unit-tested directly.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Dict, List, Optional

from nvflare.apis.job_launcher_spec import JobProcessArgs, JobProcessEnv, JobReturnCode
from nvflare.fuel.common.exit_codes import ProcessExitCode
from nvflare.utils.job_launcher_utils import (
    get_credential_env,
    get_job_launcher_spec,
    get_portable_resource_spec,
)

GROUP = "fljob.dev"
VERSION = "v1alpha1"
PLURAL = "fljobs"
KIND = "FLJob"
API_VERSION = f"{GROUP}/{VERSION}"

TERMINAL_PHASES = frozenset({"Succeeded", "Failed", "Aborted"})

# Secret keys the operator reads (API contract: token, signature, ssid) and the NVFlare env var each one becomes
# inside the worker pod.
CREDENTIAL_SECRET_KEYS = {
    JobProcessEnv.AUTH_TOKEN: "token",
    JobProcessEnv.TOKEN_SIGNATURE: "signature",
    JobProcessEnv.SSID: "ssid",
}

# Every code NVFlare's JobExecutor / FL server know by name. status.exitCode values in this set are returned as is.
KNOWN_RETURN_CODES = frozenset(
    {
        JobReturnCode.SUCCESS,  # 0
        JobReturnCode.EXECUTION_ERROR,  # 1
        JobReturnCode.ABORTED,  # 9
        ProcessExitCode.EXCEPTION,  # 101
        ProcessExitCode.UNSAFE_COMPONENT,  # 102
        ProcessExitCode.CONFIG_ERROR,  # 103
        ProcessExitCode.INFRASTRUCTURE_ERROR,  # 104
        JobReturnCode.UNKNOWN,  # 127
    }
)

_DNS_LABEL_MAX = 63
_PRINT_CONF = "print_conf=True"
# What the FLJob CRD accepts in spec.options (and what survives NVFlare's own shlex split of `--set ...`).
_OPTION_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*=\S*$")
_MAX_OPTIONS = 64


def _hash(text: str, n: int = 6) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


def _sanitize_dns(text: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", str(text).lower())
    name = re.sub(r"-{2,}", "-", name)
    return name.strip("-")


def fljob_name(job_id: str, site: str, prefix: str = "nvf") -> str:
    """Deterministic DNS-1123 label (<= 63 chars) for the FLJob of NVFlare job `job_id` at FLSite `site`.

    Shape: ``<prefix>-<job id, lowercased, [a-z0-9-] only, truncated>-<6 hex>``. The hash covers the site and the raw
    job id, so the same NVFlare job deployed to two sites that share a namespace gets two FLJobs, and two job ids
    that sanitize to the same text still differ. A UUID job id gives 4 + 36 + 7 = 47 characters.
    """
    if not job_id:
        raise ValueError("job id must not be empty")
    prefix = _sanitize_dns(prefix) or "nvf"
    suffix = _hash(f"{site}/{job_id}")
    room = _DNS_LABEL_MAX - len(prefix) - len(suffix) - 2
    body = _sanitize_dns(job_id)[:room].strip("-")
    parts = [prefix] + ([body] if body else []) + [suffix]
    return "-".join(parts)


def credentials_secret_name(fljob: str) -> str:
    return f"{fljob}-creds"


def label_value(text: str) -> str:
    """A valid label value (<= 63 chars, alphanumeric at both ends) derived from `text`."""
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text))
    if len(value) > _DNS_LABEL_MAX:
        value = value[: _DNS_LABEL_MAX - 7] + "-" + _hash(str(text))
    return value.strip("-_.")


def json_safe(value: Any) -> Any:
    """A deep copy of `value` that JSON can carry (non-JSON leaves become strings)."""
    return json.loads(json.dumps(value, default=str))


def credentials_from_job_args(job_args: Optional[dict]) -> Dict[str, str]:
    """Secret data (token / signature / ssid) from the JOB_PROCESS_ARGS JobExecutor prepared.

    JobExecutor.start_app fills JobProcessArgs.AUTH_TOKEN / TOKEN_SIGNATURE / SSID from the client's current
    `client.token`, `client.token_signature` and `client.ssid`; NVFlare's own launchers turn them into the env vars
    NVFLARE_JOB_AUTH_TOKEN / _TOKEN_SIGNATURE / _SSID with `get_credential_env`, and so do we, then rename them to the
    Secret keys the operator maps back to those env vars.
    """
    env = get_credential_env(job_args or {})
    return {CREDENTIAL_SECRET_KEYS[k]: v for k, v in env.items() if k in CREDENTIAL_SECRET_KEYS}


def options_from_context(args: Any, job_args: Optional[dict], dropped: Optional[List[str]] = None) -> List[str]:
    """The `--set` options of the job, without NVFlare's trailing print_conf=True (the operator appends it).

    Source order: `FLContextKey.ARGS.set` (a list, what NVFlare's K8s launcher uses), else the OPTIONS entry of
    JOB_PROCESS_ARGS (``("--set", " a=b c=d print_conf=True")``). Only `key=value` items without spaces are kept
    (the FLJob CRD's rule; NVFlare's process launcher splits the command line on spaces anyway); the others are
    appended to `dropped` when given.
    """
    items: List[str] = []
    set_list = getattr(args, "set", None) if args is not None else None
    if isinstance(set_list, (list, tuple)):
        items = [str(x) for x in set_list]
    elif job_args:
        entry = job_args.get(JobProcessArgs.OPTIONS)
        if entry and len(entry) == 2 and entry[1]:
            items = str(entry[1]).split()
    result = []
    for item in items:
        item = item.strip()
        if not item or item == _PRINT_CONF or item in result:
            continue
        if _OPTION_PATTERN.match(item) and len(item) <= 256 and len(result) < _MAX_OPTIONS:
            result.append(item)
        elif dropped is not None:
            dropped.append(item)
    return result


def _gpus_value(value: Any) -> Optional[int]:
    if value is None or isinstance(value, bool):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"num_of_gpus must be an integer, got {value!r}")
    if n < 0:
        raise ValueError(f"num_of_gpus must be >= 0, got {n}")
    return n


def resources_for_site(job_meta: dict, site_name: str) -> Dict[str, Any]:
    """FLJob spec.resources for the job at `site_name`, read the way NVFlare 2.9's own K8s launcher reads them.

    Sources (first that has the key wins):
      gpus   <- launcher_spec[site|default].k8s.num_of_gpus, else portable resource_spec num_of_gpus
                (resource_spec[site].num_of_gpus, merged with resource_spec["@default"])
      cpu    <- launcher_spec ... k8s.cpu, else portable num_of_cpus (as a string quantity)
      memory <- launcher_spec ... k8s.memory, else portable memory ("8Gi")
    `mem_per_gpu_in_GiB` is GPU device memory (what NVFlare's GPUResourceManager checks); Kubernetes cannot request
    it, so it is not turned into pod memory. gpus 0 is omitted.
    """
    k8s_spec = get_job_launcher_spec(job_meta, site_name, "k8s") or {}
    portable = get_portable_resource_spec(job_meta, site_name) or {}
    out: Dict[str, Any] = {}
    gpus = _gpus_value(k8s_spec.get("num_of_gpus", portable.get("num_of_gpus")))
    if gpus:
        out["gpus"] = gpus
    cpu = k8s_spec.get("cpu")
    if cpu is None and "num_of_cpus" in portable:
        cpu = portable["num_of_cpus"]
    if cpu is not None and cpu != "":
        out["cpu"] = str(cpu)
    memory = k8s_spec.get("memory", portable.get("memory"))
    if memory:
        out["memory"] = str(memory)
    return out


def job_image_for_site(job_meta: dict, site_name: str) -> Optional[str]:
    """The image a job asks for at this site (launcher_spec k8s.image, as NVFlare's K8s launcher reads it)."""
    image = (get_job_launcher_spec(job_meta, site_name, "k8s") or {}).get("image")
    return image if isinstance(image, str) and image else None


def is_terminal(fljob: Optional[dict]) -> bool:
    return bool(fljob) and (fljob.get("status") or {}).get("phase") in TERMINAL_PHASES


def return_code_from_status(status: Optional[dict]) -> Optional[int]:
    """The code NVFlare should see for an FLJob status, or None while the job is not finished.

    status.exitCode already follows NVFlare's codes (0, 1, 9, 101-104, 127) and is passed through unchanged. Other
    codes (137 for an OOM kill, 143, 2, ...) become EXECUTION_ERROR (1), like NVFlare's ProcessHandle maps unknown
    exit codes: JobExecutor then reports them as EXCEPTION (101) for a started worker or INFRASTRUCTURE_ERROR (104)
    for one still starting. A finished job without an exitCode gets SUCCESS / ABORTED / UNKNOWN from its phase.
    """
    status = status or {}
    phase = status.get("phase")
    if phase not in TERMINAL_PHASES:
        return None
    code = status.get("exitCode")
    if code is None or isinstance(code, bool):
        return {
            "Succeeded": JobReturnCode.SUCCESS,
            "Aborted": JobReturnCode.ABORTED,
        }.get(phase, JobReturnCode.UNKNOWN)
    try:
        code = int(code)
    except (TypeError, ValueError):
        return JobReturnCode.UNKNOWN
    if code in KNOWN_RETURN_CODES:
        return code
    return JobReturnCode.EXECUTION_ERROR


def k8s_job_settings(job_meta: dict, site_name: str) -> Dict[str, Any]:
    """What `launcher_spec[site].k8s` asks of the pod beyond cpu/memory/gpus and the image, as NVFlare 2.9.0's K8s
    launcher reads it: `ephemeral_storage` (-> FLJob resources.ephemeralStorage) and `pending_timeout` seconds
    (-> spec.pendingTimeoutSeconds)."""
    k8s_spec = get_job_launcher_spec(job_meta, site_name, "k8s") or {}
    out: Dict[str, Any] = {}
    storage = k8s_spec.get("ephemeral_storage")
    if storage is not None:
        if not isinstance(storage, str) or not storage:
            raise ValueError(f"launcher_spec k8s.ephemeral_storage must be a quantity string such as 20Gi, got {storage!r}")
        out["ephemeralStorage"] = storage
    timeout = k8s_spec.get("pending_timeout")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
            raise ValueError(f"launcher_spec k8s.pending_timeout must be a number of seconds >= 0, got {timeout!r}")
        out["pendingTimeoutSeconds"] = max(1, int(round(timeout)))
    return out


# The fields of a study's pod manifest template that an FLJob's spec.podTemplate carries (the operator builds the
# rest of the pod itself; containers other than the worker are not supported).
_TEMPLATE_SPEC_FIELDS = ("nodeSelector", "tolerations", "affinity", "priorityClassName", "serviceAccountName",
                         "terminationGracePeriodSeconds")


def study_pod_settings(job_meta: dict, workspace_root: Optional[str], logger=None) -> Dict[str, Any]:
    """A study's runtime from the site's `local/study_runtime.yaml` (NVFlare 2.9.0's format, read with NVFlare's
    own parser), as FLJob fields: {"image": ..., "podTemplate": {...}}. The study's image is the site default (a
    job's own launcher_spec image wins); datasets become read-only or read-write PVC mounts under
    /data/<study>/<dataset>; secret_mounts become Secret volumes; env and secret_env become the worker's env; the
    pod template's metadata and scheduling fields carry over. Empty when the job names no study or the site has
    no such file. Secret volumes and Secret env need the FLSite's podPolicy to allow them."""
    import os

    from nvflare.apis.job_def import JobMetaKey
    from nvflare.app_opt.job_launcher.study_runtime import (
        load_study_runtime_file,
        resolve_study_runtime,
        study_runtime_file_path,
    )

    study = job_meta.get(JobMetaKey.STUDY.value)
    if not study or not workspace_root:
        return {}
    path = study_runtime_file_path(workspace_root)
    if not os.path.exists(path):
        return {}
    runtime = resolve_study_runtime(load_study_runtime_file(path, launcher_mode="k8s", logger=logger), study, path, logger)
    volumes: List[dict] = []
    mounts: List[dict] = []
    env: List[dict] = []
    for d in runtime.datasets:
        name = _sanitize_dns(f"data-{d.study}-{d.dataset}")[:63].strip("-")
        volumes.append({"name": name, "persistentVolumeClaim": {"claimName": d.source, "readOnly": bool(d.read_only)}})
        mounts.append({"name": name, "mountPath": d.mount_path, "readOnly": bool(d.read_only)})
    for s in runtime.secret_mounts:
        name = _sanitize_dns(f"secret-{s.study}-{s.name}")[:63].strip("-")
        source: Dict[str, Any] = {"secretName": s.source}
        if s.items:
            source["items"] = [{"key": k, "path": p} for k, p in s.items]
        volumes.append({"name": name, "secret": source})
        mounts.append({"name": name, "mountPath": s.mount_path, "readOnly": True})
    for key, value in (runtime.env or {}).items():
        env.append({"name": key, "value": str(value)})
    for ref in runtime.secret_env:
        env.append({"name": ref.name, "valueFrom": {"secretKeyRef": {"name": ref.source, "key": ref.key or ref.name}}})
    template: Dict[str, Any] = {}
    spec: Dict[str, Any] = {}
    manifest = runtime.pod_template or {}
    meta = manifest.get("metadata") or {}
    tmeta = {k: dict(meta[k]) for k in ("labels", "annotations") if meta.get(k)}
    if tmeta:
        template["metadata"] = tmeta
    mspec = manifest.get("spec") or {}
    for key in _TEMPLATE_SPEC_FIELDS:
        if key in mspec:
            spec[key] = mspec[key]
    volumes = list(mspec.get("volumes") or []) + volumes
    ignored = sorted(set(mspec) - set(_TEMPLATE_SPEC_FIELDS) - {"volumes", "containers"})
    if ignored and logger:
        logger.warning(f"study {study}: pod template fields not carried to the FLJob: {ignored}")
    if volumes:
        spec["volumes"] = volumes
    if mounts:
        spec["volumeMounts"] = mounts
    if env:
        spec["env"] = env
    if spec:
        template["spec"] = spec
    out: Dict[str, Any] = {}
    if runtime.container_image:
        out["image"] = runtime.container_image
    if template:
        out["podTemplate"] = template
    return out


def merge_pod_templates(base: Optional[dict], extra: Optional[dict]) -> dict:
    """`extra` over `base` (maps merged, lists appended): the launcher's own pod_template, then a study's."""
    out = json.loads(json.dumps(base or {}))
    for section in ("metadata", "spec"):
        for key, value in ((extra or {}).get(section) or {}).items():
            cur = out.setdefault(section, {}).get(key)
            if isinstance(cur, dict) and isinstance(value, dict):
                out[section][key] = {**cur, **value}
            elif isinstance(cur, list) and isinstance(value, list):
                out[section][key] = cur + value
            else:
                out[section][key] = value
    return out
