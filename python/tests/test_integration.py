"""End to end: NVFlare's real JobExecutor -> FLJobLauncher -> FLJob -> fljob-operator -> (kwok) Pod -> status -> NVFlare.

Needs the local control plane (hack/cluster.sh) and the operator binary:
  FLJOB_TEST_KUBECONFIG  admin kubeconfig of the cluster
  FLJOB_OPERATOR_BIN     the fljob-operator binary (run here as `run --namespace <ns> --metrics-addr 127.0.0.1:0`)
Without them the tests are skipped, or FAIL when CI or FLJOB_REQUIRE_CLUSTER is set.

The pods are simulated by kwok; their outcome is steered by pod annotations (hack/README-testing.md), which the
launcher passes through FLJob spec.podTemplate.metadata.annotations (its `pod_annotations` argument).
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import time
import uuid

import pytest
import yaml
from nvflare.apis.job_launcher_spec import JobReturnCode
from nvflare.fuel.common.exit_codes import ProcessExitCode

from executor_harness import ExecutorDriver
from fljob_launcher import FLJobHandle, FLJobLauncher, fljob_name

pytestmark = pytest.mark.integration

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
GROUP, VERSION = "fljob.dev", "v1alpha1"
SITE = "site-a"
CLIENT = "site-1"
JOB_TIMEOUT = 90  # seconds for one simulated job to end (kwok runs them in 1-3 s)


def _require(msg: str):
    if os.environ.get("CI") or os.environ.get("FLJOB_REQUIRE_CLUSTER"):
        pytest.fail(f"integration test cannot run: {msg}", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def env():
    kubeconfig = os.environ.get("FLJOB_TEST_KUBECONFIG")
    operator = os.environ.get("FLJOB_OPERATOR_BIN")
    missing = [n for n, v in (("FLJOB_TEST_KUBECONFIG", kubeconfig), ("FLJOB_OPERATOR_BIN", operator)) if not v]
    if missing:
        _require(f"{' and '.join(missing)} not set (admin kubeconfig of hack/cluster.sh, the operator binary)")
    if not os.path.isfile(kubeconfig):
        _require(f"FLJOB_TEST_KUBECONFIG={kubeconfig} does not exist")
    if not (os.path.isfile(operator) and os.access(operator, os.X_OK)):
        _require(f"FLJOB_OPERATOR_BIN={operator} is not an executable file")
    from kubernetes import client, config

    api_client = config.new_client_from_config(config_file=kubeconfig, persist_config=False)
    try:
        client.VersionApi(api_client).get_code(_request_timeout=10)
    except Exception as e:  # noqa: BLE001
        _require(f"the cluster of {kubeconfig} does not answer: {e}")
    return {"kubeconfig": kubeconfig, "operator": operator, "api": api_client}


def _ensure_crds(api_client):
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    ext = client.ApiextensionsV1Api(api_client)
    for path in sorted(glob.glob(os.path.join(REPO, "crds", "*.yaml"))):
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if not doc or doc.get("kind") != "CustomResourceDefinition":
                    continue
                try:
                    ext.read_custom_resource_definition(doc["metadata"]["name"])
                except ApiException as e:
                    if e.status != 404:
                        raise
                    ext.create_custom_resource_definition(doc)
    for name in ("fljobs.fljob.dev", "flsites.fljob.dev"):
        deadline = time.monotonic() + 30
        while True:
            crd = ext.read_custom_resource_definition(name)
            conds = {c.type: c.status for c in (crd.status.conditions or [])}
            if conds.get("Established") == "True":
                break
            assert time.monotonic() < deadline, f"CRD {name} not Established"
            time.sleep(0.5)


def _delete_fljobs(custom, ns, operator_running: bool, timeout: float = 60):
    """Delete the namespace's FLJobs while the operator still runs (it owns their cleanup finalizer), so the
    namespace can go afterwards; finalizers left after `timeout` (or with no operator) are removed by hand."""
    try:
        custom.delete_collection_namespaced_custom_object(GROUP, VERSION, ns, "fljobs")
        deadline = time.monotonic() + (timeout if operator_running else 0)
        while True:
            items = custom.list_namespaced_custom_object(GROUP, VERSION, ns, "fljobs").get("items") or []
            if not items:
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for item in items:
            custom.patch_namespaced_custom_object(
                GROUP, VERSION, ns, "fljobs", item["metadata"]["name"], {"metadata": {"finalizers": None}}
            )
    except Exception as e:  # noqa: BLE001 - best-effort cleanup
        print(f"cleanup of FLJobs in {ns} failed: {e}")


@pytest.fixture(scope="module")
def site(env, tmp_path_factory):
    """A namespace with the site's Secrets, its FLSite, and the operator running for that namespace."""
    from kubernetes import client

    api = env["api"]
    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)
    _ensure_crds(api)
    ns = f"fljob-py-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns, labels={"fljob.dev/test": "true"})))
    deadline = time.monotonic() + 30
    while not any(sa.metadata.name == "default" for sa in core.list_namespaced_service_account(ns).items):
        assert time.monotonic() < deadline, f"no default ServiceAccount in {ns} (pods would be refused)"
        time.sleep(0.2)
    core.create_namespaced_secret(
        ns,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="site-a-startup"),
            string_data={"fed_client.json": '{"format_version": 2}'},
        ),
    )
    core.create_namespaced_secret(
        ns,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="site-a-job-creds"),
            string_data={"token": "site-token", "signature": "site-sig", "ssid": "site-ssid"},
        ),
    )
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        ns,
        "flsites",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "FLSite",
            "metadata": {"name": SITE},
            "spec": {
                "clientName": CLIENT,
                "server": {"target": "fl-server.example.org:8002", "scheme": "grpc"},
                "parentUrl": "tcp://site-a-cp:8004",
                "credentialsSecret": "site-a-job-creds",
                "startupKitSecret": "site-a-startup",
                "defaults": {"image": "nvflare/nvflare:2.9.0", "resources": {"cpu": "1", "memory": "1Gi"}},
                "capacity": {"jobs": 8, "gpus": 8},
            },
        },
    )

    log_path = tmp_path_factory.mktemp("operator") / "operator.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [env["operator"], "run", "--namespace", ns, "--metrics-addr", "127.0.0.1:0"],
        env={**os.environ, "KUBECONFIG": env["kubeconfig"], "RUST_LOG": os.environ.get("RUST_LOG", "info")},
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )

    def operator_log(tail=60):
        log.flush()
        with open(log_path, "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
        return "\n".join(lines[-tail:])

    info = {"ns": ns, "core": core, "custom": custom, "proc": proc, "operator_log": operator_log, **env}
    try:
        deadline = time.monotonic() + 60
        while True:  # the operator is up once it has reconciled the FLSite
            if proc.poll() is not None:
                pytest.fail(f"the operator exited with {proc.returncode}:\n{operator_log()}", pytrace=False)
            flsite = custom.get_namespaced_custom_object(GROUP, VERSION, ns, "flsites", SITE)
            if flsite.get("status"):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the operator did not reconcile FLSite {SITE} in 60 s:\n{operator_log()}", pytrace=False)
            time.sleep(0.5)
        yield info
    finally:
        _delete_fljobs(custom, ns, operator_running=proc.poll() is None)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        log.close()
        try:
            core.delete_namespace(ns)
        except Exception:  # noqa: BLE001
            pass


def make_driver(site, tmp_path, annotations, **launcher_args) -> ExecutorDriver:
    launcher = FLJobLauncher(
        namespace=site["ns"],
        site=SITE,
        kubeconfig=site["kubeconfig"],
        pod_annotations=annotations,
        watch_timeout_seconds=20,
        **launcher_args,
    )
    return ExecutorDriver(
        launcher,
        str(tmp_path / "ws"),
        client_name=CLIENT,
        token=f"tok-{uuid.uuid4().hex[:6]}",
        token_signature="sig-it",
        ssid="ssid-it",
        set_options=["secure_train=true"],
    )


def new_job(driver: ExecutorDriver, **meta):
    job_id = str(uuid.uuid4())
    job_meta = {"job_id": job_id, "name": "it", "deploy_map": {"app": ["@ALL"]}}
    job_meta.update(meta)
    driver.start(job_id, job_meta)
    return job_id, fljob_name(job_id, SITE)


def fljob(site, name) -> dict:
    return site["custom"].get_namespaced_custom_object(GROUP, VERSION, site["ns"], "fljobs", name)


def wait_phase(site, handle: FLJobHandle, phases, timeout=JOB_TIMEOUT) -> dict:
    """Poll the handle the way a caller would while the job runs; return the FLJob once in one of `phases`."""
    deadline = time.monotonic() + timeout
    while True:
        obj = fljob(site, handle.name)
        phase = (obj.get("status") or {}).get("phase")
        if phase in phases:
            return obj
        if phase not in ("Succeeded", "Failed", "Aborted"):
            assert handle.poll() is None, f"poll() must be None while {phase}"
        if time.monotonic() > deadline:
            pytest.fail(
                f"FLJob {handle.name} still {phase} (want {phases}):\n{pod_summary(site, handle.name)}\n"
                f"{site['operator_log']()}",
                pytrace=False,
            )
        time.sleep(0.3)


def pod_summary(site, name) -> str:
    """Phase and container states of the FLJob's pods (for failure messages)."""
    try:
        pods = site["core"].list_namespaced_pod(site["ns"]).items
    except Exception as e:  # noqa: BLE001
        return f"pods: {e}"
    out = []
    for pod in pods:
        if not pod.metadata.name.startswith(name):
            continue
        states = [
            (c.name, c.state.to_dict() if c.state else None) for c in (pod.status.container_statuses or [])
        ]
        out.append(f"pod {pod.metadata.name}: phase={pod.status.phase} deleting={bool(pod.metadata.deletion_timestamp)} "
                   f"containers={states}")
    return "\n".join(out) or "no pod"


def reported(site, driver, job_id, name):
    code = driver.wait_reported(job_id, JOB_TIMEOUT)
    if code is None:
        pytest.fail(
            f"JobExecutor reported nothing for {name}: {fljob(site, name).get('status')}\n"
            f"{pod_summary(site, name)}\n{site['operator_log']()}",
            pytrace=False,
        )
    return code


def test_success_poll_while_running(site, tmp_path):
    driver = make_driver(
        site,
        tmp_path,
        {"sim.fljob.dev/exit-code": "0", "sim.fljob.dev/run-seconds": "4"},
        abort_grace_period_seconds=5,
    )
    job_id, name = new_job(driver, resource_spec={CLIENT: {"num_of_gpus": 1}})
    handle = driver.handle(job_id)
    assert isinstance(handle, FLJobHandle) and handle.name == name
    assert driver.status(job_id) == "starting"

    obj = wait_phase(site, handle, ("Running",))
    assert handle.poll() is None
    spec = obj["spec"]
    assert spec["jobId"] == job_id and spec["site"] == SITE
    assert spec["options"] == ["secure_train=true"]
    assert spec["resources"] == {"gpus": 1}
    assert spec["credentialsSecret"] == f"{name}-creds"

    # the per-job Secret holds the client's credentials and is owned by the FLJob
    secret = site["core"].read_namespaced_secret(f"{name}-creds", site["ns"])
    import base64

    values = {k: base64.b64decode(v).decode() for k, v in secret.data.items()}
    # + the workspace transfer token (NVFL_WORKSPACE_TRANSFER_TOKEN in the pod); the owner FQCN is in the spec
    assert values.pop("transferToken")
    assert values == {"token": driver.client.token, "signature": "sig-it", "ssid": "ssid-it"}
    assert spec.get("workspaceOwner") == driver.client.cell.get_fqcn()
    [owner] = secret.metadata.owner_references
    assert (owner.kind, owner.name, owner.uid) == ("FLJob", name, obj["metadata"]["uid"])

    # the worker pod takes its credentials from that Secret and carries our annotations
    pod = site["core"].read_namespaced_pod(obj["status"]["podName"], site["ns"])
    assert pod.metadata.annotations.get("sim.fljob.dev/run-seconds") == "4"
    refs = {
        e.name: e.value_from.secret_key_ref.name
        for c in pod.spec.containers
        for e in (c.env or [])
        if e.value_from and e.value_from.secret_key_ref
    }
    assert refs.get("NVFLARE_JOB_AUTH_TOKEN") == f"{name}-creds", refs

    assert reported(site, driver, job_id, name) == JobReturnCode.SUCCESS
    assert handle.poll() == JobReturnCode.SUCCESS
    assert driver.completed(job_id)
    # the client's token does not outlive the job (the finished FLJob is kept)
    from kubernetes.client.rest import ApiException

    with pytest.raises(ApiException) as e:
        site["core"].read_namespaced_secret(f"{name}-creds", site["ns"])
    assert e.value.status == 404
    assert fljob(site, name)["status"]["phase"] == "Succeeded"


def test_abort_app_terminates_through_spec_abort(site, tmp_path):
    driver = make_driver(site, tmp_path, {"sim.fljob.dev/run-seconds": "never"}, abort_grace_period_seconds=2)
    job_id, name = new_job(driver)
    handle = driver.handle(job_id)
    wait_phase(site, handle, ("Running",))
    assert handle.poll() is None

    t0 = time.monotonic()
    driver.abort(job_id)  # JobExecutor.abort_app: job still STARTING -> job_handle.terminate()
    took = time.monotonic() - t0
    obj = fljob(site, name)
    assert obj["spec"]["abort"] is True
    assert (obj["status"].get("abort") or {}).get("requestedAt"), obj["status"]
    assert took < 30

    assert reported(site, driver, job_id, name) == JobReturnCode.ABORTED
    status = fljob(site, name)["status"]
    assert status["phase"] == "Aborted" and status["exitCode"] == 9
    assert status["abort"]["method"] in ("Deleted", "Forced")


def test_abort_worker_exits_by_itself_in_grace_period(site, tmp_path):
    driver = make_driver(
        site,
        tmp_path,
        {"sim.fljob.dev/run-seconds": "never", "sim.fljob.dev/abort-exit-code": "0", "sim.fljob.dev/abort-delay": "1s"},
        abort_grace_period_seconds=20,
    )
    job_id, name = new_job(driver)
    handle = driver.handle(job_id)
    wait_phase(site, handle, ("Running",))
    driver.abort(job_id)
    assert reported(site, driver, job_id, name) == JobReturnCode.SUCCESS  # the worker's own code
    status = fljob(site, name)["status"]
    assert status["phase"] == "Aborted" and status["abort"]["method"] == "Graceful"


@pytest.mark.parametrize(
    "exit_code,expected,reason",
    [
        ("102", ProcessExitCode.UNSAFE_COMPONENT, "UnsafeComponent"),
        ("103", ProcessExitCode.CONFIG_ERROR, "ConfigError"),
    ],
)
def test_failures_reported_with_nvflare_codes(site, tmp_path, exit_code, expected, reason):
    driver = make_driver(site, tmp_path, {"sim.fljob.dev/exit-code": exit_code, "sim.fljob.dev/run-seconds": "2"})
    job_id, name = new_job(driver)
    handle = driver.handle(job_id)
    wait_phase(site, handle, ("Running", "Failed"))
    assert reported(site, driver, job_id, name) == expected
    assert handle.poll() == expected
    status = fljob(site, name)["status"]
    assert (status["phase"], status["exitCode"], status["reason"]) == ("Failed", int(exit_code), reason)


def test_exit_1_of_started_worker_is_exception(site, tmp_path):
    driver = make_driver(site, tmp_path, {"sim.fljob.dev/exit-code": "1", "sim.fljob.dev/run-seconds": "3"})
    job_id, name = new_job(driver)
    wait_phase(site, driver.handle(job_id), ("Running",))
    driver.worker_started(job_id)  # the worker's check-in with the parent
    assert reported(site, driver, job_id, name) == ProcessExitCode.EXCEPTION


def test_deleting_the_fljob_aborts(site, tmp_path):
    driver = make_driver(site, tmp_path, {"sim.fljob.dev/run-seconds": "never"}, abort_grace_period_seconds=1)
    job_id, name = new_job(driver)
    wait_phase(site, driver.handle(job_id), ("Running",))
    site["custom"].delete_namespaced_custom_object(GROUP, VERSION, site["ns"], "fljobs", name)
    assert reported(site, driver, job_id, name) == JobReturnCode.ABORTED
