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


# JobExecutor._terminate_job's max_wait in NVFlare 2.9.0: after its ABORT it waits this long, then terminate().
JOB_EXECUTOR_MAX_WAIT = 10.0


def test_abort_app_terminates_through_spec_abort(site, tmp_path):
    """Still STARTING: JobExecutor.abort_app calls terminate() at once (NVFlare kills the process there); the job
    ends without waiting out the FLJob's grace period (10 s here)."""
    grace = 10
    driver = make_driver(site, tmp_path, {"sim.fljob.dev/run-seconds": "never"}, abort_grace_period_seconds=grace)
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
    to_end = time.monotonic() - t0
    print(f"STARTING abort: abort_app -> reported {to_end:.1f} s (grace {grace} s); {fljob(site, name)['status'].get('abort')}")
    assert to_end < grace / 2, f"abort_app -> job end took {to_end:.1f} s: the FLJob's grace period was waited"
    status = fljob(site, name)["status"]
    assert status["phase"] == "Aborted" and status["exitCode"] == 9
    assert status["abort"]["method"] in ("Deleted", "Forced")


def test_abort_of_started_worker_does_not_wait_twice(site, tmp_path):
    """Issue 11 #17: a worker that checked in gets JobExecutor's ABORT and max_wait (10 s); when it has not stopped
    by then, JobExecutor calls terminate() -- and the job must end then, not after the FLJob's grace period too."""
    grace = 10
    driver = make_driver(site, tmp_path, {"sim.fljob.dev/run-seconds": "never"}, abort_grace_period_seconds=grace)
    job_id, name = new_job(driver)
    handle = driver.handle(job_id)
    wait_phase(site, handle, ("Running",))
    driver.worker_started(job_id)

    t0 = time.monotonic()
    driver.abort(job_id)  # ABORT to the job cell (the simulated worker ignores it), max_wait, then terminate()
    assert [m["topic"] for m in driver.client.cell.sent].count("abort") == 1  # NVFlare's own graceful step
    assert reported(site, driver, job_id, name) == JobReturnCode.ABORTED
    to_end = time.monotonic() - t0
    print(f"STARTED abort: abort_app -> reported {to_end:.1f} s (max_wait {JOB_EXECUTOR_MAX_WAIT} s, grace {grace} s); "
          f"{fljob(site, name)['status'].get('abort')}")
    assert to_end >= JOB_EXECUTOR_MAX_WAIT - 0.5  # JobExecutor's graceful window is kept...
    assert to_end < JOB_EXECUTOR_MAX_WAIT + grace / 2, (  # ...and not followed by a second one
        f"abort_app -> job end took {to_end:.1f} s: max_wait and then the FLJob's grace period"
    )
    status = fljob(site, name)["status"]
    assert (status["phase"], status["exitCode"]) == ("Aborted", 9)
    assert status["abort"]["method"] in ("Deleted", "Forced")
    assert driver.completed(job_id)


def test_kubernetes_abort_keeps_the_grace_period(site, tmp_path):
    """An abort started in Kubernetes (spec.abort by hand) still gets abort_grace_period_seconds: the worker stops
    by itself within it; the handle relays NVFlare's ABORT and reports ABORTED."""
    driver = make_driver(
        site,
        tmp_path,
        {"sim.fljob.dev/run-seconds": "never", "sim.fljob.dev/abort-exit-code": "0", "sim.fljob.dev/abort-delay": "3s"},
        abort_grace_period_seconds=20,
    )
    job_id, name = new_job(driver)
    handle = driver.handle(job_id)
    wait_phase(site, handle, ("Running",))
    driver.worker_started(job_id)
    site["custom"].patch_namespaced_custom_object(GROUP, VERSION, site["ns"], "fljobs", name, {"spec": {"abort": True}})
    assert reported(site, driver, job_id, name) == JobReturnCode.ABORTED
    assert any(m["topic"] == "abort" for m in driver.client.cell.sent)  # relayed to the job cell
    obj = fljob(site, name)
    assert obj["spec"]["abortGracePeriodSeconds"] == 20
    status = obj["status"]
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


# ----- issue 11 #17: a launch timeout whose abort the API server refuses --------------------------------------------

LAUNCHER_RULES_WITHOUT_PATCH = [
    # what the README asks for, less `patch` on fljobs: the API server refuses spec.abort (403)
    {"apiGroups": [GROUP], "resources": ["fljobs"], "verbs": ["get", "list", "watch", "create", "delete"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "update", "patch", "delete"]},
]


def restricted_api_client(site, rules):
    """An ApiClient acting as a fresh ServiceAccount of the test namespace with a Role of `rules` (a real 403 for
    what they leave out). Returns (api_client, role name)."""
    from kubernetes import client, config

    ns, core = site["ns"], site["core"]
    rbac = client.RbacAuthorizationV1Api(site["api"])
    name = f"launcher-{uuid.uuid4().hex[:6]}"
    core.create_namespaced_service_account(ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name)))
    rbac.create_namespaced_role(ns, {"metadata": {"name": name}, "rules": rules})
    rbac.create_namespaced_role_binding(
        ns,
        {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
        },
    )
    token = core.create_namespaced_service_account_token(
        name, ns, client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600))
    ).status.token
    cfg = client.Configuration()
    config.load_kube_config(config_file=site["kubeconfig"], client_configuration=cfg, persist_config=False)
    cfg.cert_file = cfg.key_file = None  # not the admin's client certificate: the ServiceAccount's token
    cfg.api_key = {"authorization": f"Bearer {token}"}
    cfg.api_key_prefix = {}
    api = client.ApiClient(cfg)
    who = client.AuthenticationV1Api(api).create_self_subject_review({"apiVersion": "authentication.k8s.io/v1",
                                                                      "kind": "SelfSubjectReview"})
    assert who.status.user_info.username == f"system:serviceaccount:{ns}:{name}"
    return api, name


def allocated_jobs(site) -> list:
    """The FLJob names in the FLSite's ledger (status.allocations)."""
    flsite = site["custom"].get_namespaced_custom_object(GROUP, VERSION, site["ns"], "flsites", SITE)
    return [a.get("job") for a in (flsite.get("status") or {}).get("allocations") or []]


def gone_within(read, timeout) -> bool:
    from kubernetes.client.rest import ApiException

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            read()
        except ApiException as e:
            if e.status == 404:
                return True
            raise
        time.sleep(0.5)
    return False


def test_launch_timeout_abort_refused_deletes_the_fljob(site, tmp_path):
    """The launcher's `timeout` passes (the pod cannot be scheduled) and the API server refuses the abort patch
    (403, RBAC): terminate() retries with backoff within terminate_timeout, then deletes the FLJob (that aborts
    it); start_app does not fail, JobExecutor reports EXCEPTION (101) and frees the job; the FLJob, its Secret and
    its quota are gone -- nothing is left behind unwatched."""
    api, _ = restricted_api_client(site, LAUNCHER_RULES_WITHOUT_PATCH)
    driver = make_driver(
        site, tmp_path, {"sim.fljob.dev/unschedulable": "true"}, api_client=api, timeout=2, terminate_timeout=3
    )
    t0 = time.monotonic()
    job_id, name = new_job(driver)  # JobExecutor.start_app -> launch_job: create, wait 2 s, terminate()
    took = time.monotonic() - t0
    assert took < 2 + 3 + 30 + 5, took  # timeout + terminate_timeout + one request timeout
    assert reported(site, driver, job_id, name) == ProcessExitCode.EXCEPTION
    assert driver.completed(job_id)
    custom, core, ns = site["custom"], site["core"], site["ns"]
    assert gone_within(lambda: custom.get_namespaced_custom_object(GROUP, VERSION, ns, "fljobs", name), 60), (
        f"FLJob {name} left behind: {fljob(site, name)}"
    )
    assert gone_within(lambda: core.read_namespaced_secret(f"{name}-creds", ns), 60), "credentials Secret left behind"
    assert name not in allocated_jobs(site)  # its quota is back in the pool (the FLJob went only after that)


def test_launch_timeout_abort_retried_until_allowed(site, tmp_path):
    """The abort patch is refused (403) at first and allowed 2 s later (the Role is fixed): terminate()'s retries
    get it through, so the job is aborted through spec.abort and its FLJob is kept as a record."""
    from kubernetes import client

    api, role = restricted_api_client(site, LAUNCHER_RULES_WITHOUT_PATCH)
    rbac = client.RbacAuthorizationV1Api(site["api"])
    driver = make_driver(
        site, tmp_path, {"sim.fljob.dev/unschedulable": "true"}, api_client=api, timeout=2, terminate_timeout=20
    )

    def allow_patch():
        rules = [dict(r) for r in LAUNCHER_RULES_WITHOUT_PATCH]
        rules[0] = {**rules[0], "verbs": rules[0]["verbs"] + ["patch"]}
        rbac.patch_namespaced_role(role, site["ns"], {"rules": rules})

    import threading

    timer = threading.Timer(2 + 2, allow_patch)  # 2 s into terminate()'s retries
    timer.start()
    try:
        job_id, name = new_job(driver)
    finally:
        timer.join()
    assert reported(site, driver, job_id, name) == ProcessExitCode.EXCEPTION
    obj = fljob(site, name)
    assert obj["spec"]["abort"] is True
    assert obj["status"]["phase"] == "Aborted"
    with pytest.raises(Exception) as e:  # the handle removed the job's credentials at its end
        site["core"].read_namespaced_secret(f"{name}-creds", site["ns"])
    assert getattr(e.value, "status", None) == 404
