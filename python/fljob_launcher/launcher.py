"""FLJobLauncher: an NVFlare job launcher that creates fljob.dev FLJobs instead of processes or bare pods."""

from __future__ import annotations

import logging
import time
from typing import Dict, Optional

from kubernetes.client.rest import ApiException
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, JobConstants
from nvflare.apis.fl_context import FLContext
from nvflare.apis.job_launcher_spec import JobHandleSpec, JobLauncherSpec, JobReturnCode, add_launcher

from .handle import (
    _REQUEST_TIMEOUT,
    DEFAULT_TERMINATE_GRACE_PERIOD_SECONDS,
    DEFAULT_TERMINATE_TIMEOUT,
    DEFAULT_WATCH_TIMEOUT_SECONDS,
    FLJobHandle,
)
from .mapping import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    credentials_from_job_args,
    credentials_secret_name,
    fljob_name,
    is_terminal,
    job_image_for_site,
    json_safe,
    k8s_job_settings,
    merge_pod_templates,
    study_pod_settings,
    label_value,
    options_from_context,
    resources_for_site,
)
from .transfer import register_workspace_transfer

MANAGED_BY = "fljob-launcher"
LABEL_JOB_ID = "fljob.dev/nvflare-job-id"
LABEL_SITE = "fljob.dev/site"
ANNOTATION_JOB_ID = "fljob.dev/nvflare-job-id"
# Key of the per-job credentials Secret that carries the workspace transfer token (env NVFL_WORKSPACE_TRANSFER_TOKEN
# in the pod, through a secretKeyRef the operator writes).
TRANSFER_TOKEN_KEY = "transferToken"


class FLJobLauncher(JobLauncherSpec):
    """Launch each NVFlare client job as an FLJob that fljob-operator runs as a Pod.

    Enable it in the site's ``local/resources.json`` (in place of ``process_launcher`` / ``k8s_launcher``)::

        {"id": "fljob_launcher", "path": "fljob_launcher.FLJobLauncher",
         "args": {"namespace": "fl-site-a", "site": "site-a"}}

    Args:
        namespace: namespace of the FLSite and of the FLJobs.
        site: FLSite name; defaults to the NVFlare client name (``fl_ctx.get_identity_name()``).
        kubeconfig: kubeconfig file; None = in-cluster config (the client parent runs in a pod).
            ``config_file_path`` is accepted as an alias (the name NVFlare's K8sJobLauncher uses).
        context: kubeconfig context (default: the file's current context).
        image: worker image for every job, overriding the FLSite default; a job's own
            ``launcher_spec[site].k8s.image`` (as NVFlare's K8s launcher reads it) wins over this.
        abort_grace_period_seconds: FLJob spec.abortGracePeriodSeconds (operator default 10): the grace period of
            aborts started in Kubernetes (spec.abort by hand, FLJob deletion, activeDeadlineSeconds).
        terminate_grace_period_seconds: the spec.abortGracePeriodSeconds terminate() sets with spec.abort (default
            0; never more than abort_grace_period_seconds). JobExecutor calls terminate() after its own ABORT and
            max_wait (10 s), or at once for a job still STARTING: a second grace period would only add to it.
            None: leave the FLJob's grace period as it is.
        active_deadline_seconds: FLJob spec.activeDeadlineSeconds.
        ttl_seconds_after_finished: FLJob spec.ttlSecondsAfterFinished.
        timeout: if set, launch_job waits up to this many seconds for the job to be Running (like the ``timeout``
            of NVFlare's K8sJobLauncher); past it the job is aborted and reported as EXCEPTION (101). None (the
            default) returns as soon as the FLJob exists: a job may wait in the site's queue.
        terminate_timeout: bound of terminate(): retries of a failing abort request and the wait for the operator
            to record it (then the FLJob is deleted instead, or wait() keeps retrying).
        watch_timeout_seconds: server-side timeout of each watch request (it is re-established after).
        pod_template: FLJob spec.podTemplate for every job (metadata.labels/annotations; spec.nodeSelector,
            tolerations, affinity, priorityClassName, serviceAccountName, env, volumes, volumeMounts, ...).
        pod_annotations / pod_labels: extra spec.podTemplate.metadata annotations / labels for the worker pod
            (merged over pod_template's). Keys under ``fljob.dev/`` are the operator's and are refused by the CRD.
        name_prefix: prefix of FLJob names.
        per_job_credentials: create the ``<fljob>-creds`` Secret from the client's current token / signature /
            ssid (default). False = use the FLSite's credentialsSecret.
        workspace_transfer: register each job with NVFlare's WorkspaceTransferManager on the parent's cell, as
            NVFlare 2.9.0's ClientK8sJobLauncher does (default). The worker pod then downloads ``local/`` and the
            job's folder from the parent at start and uploads its results at the end: the FLJob gets
            ``spec.workspaceOwner`` (the parent cell's FQCN) and the credentials Secret the key ``transferToken``.
            Needs per-job credentials (the token is per job).
    """

    def __init__(
        self,
        namespace: str = "default",
        site: Optional[str] = None,
        kubeconfig: Optional[str] = None,
        config_file_path: Optional[str] = None,
        context: Optional[str] = None,
        image: Optional[str] = None,
        abort_grace_period_seconds: Optional[int] = None,
        active_deadline_seconds: Optional[int] = None,
        ttl_seconds_after_finished: Optional[int] = None,
        timeout: Optional[float] = None,
        terminate_timeout: float = DEFAULT_TERMINATE_TIMEOUT,
        terminate_grace_period_seconds: Optional[int] = DEFAULT_TERMINATE_GRACE_PERIOD_SECONDS,
        watch_timeout_seconds: int = DEFAULT_WATCH_TIMEOUT_SECONDS,
        pod_template: Optional[dict] = None,
        pod_annotations: Optional[Dict[str, str]] = None,
        pod_labels: Optional[Dict[str, str]] = None,
        name_prefix: str = "nvf",
        per_job_credentials: bool = True,
        workspace_transfer: bool = True,
        api_client=None,
    ):
        super().__init__()
        self.logger = logging.getLogger(self.__class__.__name__)
        if not namespace or not isinstance(namespace, str):
            raise ValueError("namespace must be a non-empty string")
        if kubeconfig and config_file_path and kubeconfig != config_file_path:
            raise ValueError("give kubeconfig or config_file_path, not both")
        for field, value in (
            ("abort_grace_period_seconds", abort_grace_period_seconds),
            ("active_deadline_seconds", active_deadline_seconds),
            ("ttl_seconds_after_finished", ttl_seconds_after_finished),
            ("terminate_grace_period_seconds", terminate_grace_period_seconds),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{field} must be a non-negative integer or None")
        if terminate_grace_period_seconds is not None and terminate_grace_period_seconds > 3600:
            raise ValueError("terminate_grace_period_seconds must be at most 3600 (the FLJob CRD's limit)")
        for field, value in (
            ("pod_template", pod_template),
            ("pod_annotations", pod_annotations),
            ("pod_labels", pod_labels),
        ):
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{field} must be a dict")
        if pod_template and not set(pod_template) <= {"metadata", "spec"}:
            raise ValueError("pod_template may only have 'metadata' and 'spec'")
        self.namespace = namespace
        self.site = site
        self.kubeconfig = kubeconfig or config_file_path
        self.context = context
        self.image = image
        self.abort_grace_period_seconds = abort_grace_period_seconds
        self.active_deadline_seconds = active_deadline_seconds
        self.ttl_seconds_after_finished = ttl_seconds_after_finished
        self.timeout = timeout
        self.terminate_timeout = terminate_timeout
        self.terminate_grace_period_seconds = terminate_grace_period_seconds
        if terminate_grace_period_seconds is not None and abort_grace_period_seconds is not None:
            self.terminate_grace_period_seconds = min(terminate_grace_period_seconds, abort_grace_period_seconds)
        self.watch_timeout_seconds = watch_timeout_seconds
        self.pod_template = json_safe(pod_template or {})
        self.pod_annotations = {str(k): str(v) for k, v in (pod_annotations or {}).items()}
        self.pod_labels = {str(k): str(v) for k, v in (pod_labels or {}).items()}
        self.name_prefix = name_prefix
        self.per_job_credentials = per_job_credentials
        self.workspace_transfer = bool(workspace_transfer)
        if self.workspace_transfer and not per_job_credentials:
            self.logger.warning("workspace_transfer needs per_job_credentials: the workspace transfer is off")
            self.workspace_transfer = False
        self._api_client = api_client
        self._custom_api = None
        self._core_api = None

    # ----- NVFlare wiring ------------------------------------------------------------------------------------

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        # Same registration as NVFlare's ProcessJobLauncher / K8sJobLauncher: JobExecutor's get_job_launcher fires
        # BEFORE_JOB_LAUNCH and takes the (single) launcher that added itself to FLContextKey.JOB_LAUNCHER.
        if event_type == EventType.BEFORE_JOB_LAUNCH:
            add_launcher(self, fl_ctx)

    # ----- Kubernetes clients --------------------------------------------------------------------------------

    def _apis(self):
        if self._custom_api is None:
            from kubernetes import client, config

            api_client = self._api_client
            if api_client is None:
                if self.kubeconfig:
                    api_client = config.new_client_from_config(
                        config_file=self.kubeconfig, context=self.context, persist_config=False
                    )
                else:
                    configuration = client.Configuration()
                    config.load_incluster_config(client_configuration=configuration)
                    api_client = client.ApiClient(configuration)
                self._api_client = api_client
            self._custom_api = client.CustomObjectsApi(api_client)
            self._core_api = client.CoreV1Api(api_client)
        return self._custom_api, self._core_api

    def use_apis(self, custom_api, core_api):
        """Use these CustomObjectsApi / CoreV1Api objects (tests, or a caller that manages its own clients)."""
        self._custom_api = custom_api
        self._core_api = core_api

    # ----- launch --------------------------------------------------------------------------------------------

    def build_fljob(self, job_meta: dict, fl_ctx: FLContext) -> dict:
        """The FLJob object launch_job creates (without credentialsSecret)."""
        job_id = job_meta.get(JobConstants.JOB_ID)
        if not job_id:
            raise RuntimeError(f"missing {JobConstants.JOB_ID} in job_meta")
        job_id = str(job_id)
        client_name = fl_ctx.get_identity_name() or self.site or ""
        site = self.site or client_name
        if not site:
            raise RuntimeError("no FLSite name: set the launcher's 'site' argument")
        name = fljob_name(job_id, site, self.name_prefix)

        spec: dict = {"jobId": job_id, "site": site, "meta": json_safe(job_meta)}
        dropped: list = []
        options = options_from_context(
            fl_ctx.get_prop(FLContextKey.ARGS), fl_ctx.get_prop(FLContextKey.JOB_PROCESS_ARGS), dropped
        )
        if dropped:
            self.logger.warning(f"job {job_id}: options not passed to the worker (not key=value): {dropped}")
        if options:
            spec["options"] = options
        resources = resources_for_site(job_meta, client_name or site)
        k8s = k8s_job_settings(job_meta, client_name or site)
        if "ephemeralStorage" in k8s:
            resources["ephemeralStorage"] = k8s["ephemeralStorage"]
        if resources:
            spec["resources"] = resources
        if "pendingTimeoutSeconds" in k8s:
            spec["pendingTimeoutSeconds"] = k8s["pendingTimeoutSeconds"]
        args = fl_ctx.get_prop(FLContextKey.ARGS)
        study = study_pod_settings(job_meta, getattr(args, "workspace", None), self.logger)
        # A job's own launcher_spec image wins, then its study's (the site's default for the study), then ours.
        image = job_image_for_site(job_meta, client_name or site) or study.get("image") or self.image
        if image:
            spec["image"] = image
        if self.abort_grace_period_seconds is not None:
            spec["abortGracePeriodSeconds"] = self.abort_grace_period_seconds
        if self.active_deadline_seconds is not None:
            spec["activeDeadlineSeconds"] = self.active_deadline_seconds
        if self.ttl_seconds_after_finished is not None:
            spec["ttlSecondsAfterFinished"] = self.ttl_seconds_after_finished
        pod_template = merge_pod_templates(json_safe(self.pod_template), study.get("podTemplate"))
        for key, extra in (("annotations", self.pod_annotations), ("labels", self.pod_labels)):
            if extra:
                metadata = pod_template.setdefault("metadata", {}) or {}
                pod_template["metadata"] = metadata
                metadata[key] = {**(metadata.get(key) or {}), **extra}
        if pod_template:
            spec["podTemplate"] = pod_template

        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": {
                    "app.kubernetes.io/managed-by": MANAGED_BY,
                    LABEL_JOB_ID: label_value(job_id),
                    LABEL_SITE: label_value(site),
                },
                "annotations": {ANNOTATION_JOB_ID: job_id},
            },
            "spec": spec,
        }

    def launch_job(self, job_meta: dict, fl_ctx: FLContext) -> JobHandleSpec:
        custom_api, core_api = self._apis()
        body = self.build_fljob(job_meta, fl_ctx)
        name = body["metadata"]["name"]
        job_id = body["spec"]["jobId"]

        creds: Dict[str, str] = {}
        if self.per_job_credentials:
            creds = credentials_from_job_args(fl_ctx.get_prop(FLContextKey.JOB_PROCESS_ARGS))
            if creds:
                missing = sorted({"token", "signature", "ssid"} - set(creds))
                if missing:
                    self.logger.warning(f"job {job_id}: the client has no {missing}; the worker will fail to start")
            else:
                self.logger.warning(f"job {job_id}: no client credentials in the FL context; using the FLSite's")

        registration = None
        if self.workspace_transfer and creds:
            # As ClientK8sJobLauncher: the worker fetches local/ and <job id>/ from this parent and sends its
            # results back; the token is a secret (Secret key transferToken), the owner FQCN is not (spec).
            registration = register_workspace_transfer(fl_ctx, job_id)
            creds[TRANSFER_TOKEN_KEY] = registration.token
            body["spec"]["workspaceOwner"] = registration.owner_fqcn
        secret_name = credentials_secret_name(name) if creds else None
        if secret_name:
            body["spec"]["credentialsSecret"] = secret_name

        try:
            # The Secret first: a pod the operator creates for the FLJob must find it. It has no owner yet; the
            # ownerReference to the FLJob is added once the FLJob (and its uid) exists.
            if creds:
                self._upsert_credentials_secret(core_api, name, creds, job_id)
            try:
                fljob, created = self._create_fljob(custom_api, body)
            except BaseException:
                # No FLJob, no owner: nothing would ever collect the Secret.
                if creds:
                    self._delete_secret(core_api, secret_name)
                raise
        except BaseException:
            if registration is not None:
                registration.release(self.logger)
            raise
        if creds:
            self._own_secret(core_api, secret_name, fljob)

        handle = FLJobHandle(
            custom_api,
            name,
            self.namespace,
            job_id=job_id,
            watch_timeout_seconds=self.watch_timeout_seconds,
            terminate_timeout=self.terminate_timeout,
            logger=self.logger,
            core_api=core_api,
            credentials_secret=secret_name,
            workspace_registration=registration,
            cell=getattr(fl_ctx.get_engine(), "cell", None),
            terminate_grace_period_seconds=self.terminate_grace_period_seconds,
        )
        self.logger.info(f"job {job_id}: {'created' if created else 'adopted'} FLJob {self.namespace}/{name}")
        if self.timeout is not None and not handle.wait_until_started(self.timeout):
            self.logger.warning(f"job {job_id}: FLJob {name} not running after {self.timeout} s; aborting it")
            handle._force_return_code(JobReturnCode.EXCEPTION)
            # Never raises: an FLJob whose abort the API refuses is deleted instead, or its abort stays pending and
            # JobExecutor's waiter thread (wait()) keeps delivering it. Raising here would leave the FLJob and its
            # Secret with nobody watching.
            handle.terminate()
        return handle

    def _create_fljob(self, custom_api, body: dict):
        """Create the FLJob; returns (object, created). An unfinished FLJob of the same job is adopted."""
        name = body["metadata"]["name"]
        for attempt in range(2):
            try:
                return (
                    custom_api.create_namespaced_custom_object(
                        GROUP, VERSION, self.namespace, PLURAL, body, _request_timeout=_REQUEST_TIMEOUT
                    ),
                    True,
                )
            except ApiException as e:
                if e.status != 409 or attempt:
                    raise
            existing = custom_api.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, _request_timeout=_REQUEST_TIMEOUT
            )
            spec = existing.get("spec") or {}
            if spec.get("jobId") != body["spec"]["jobId"] or spec.get("site") != body["spec"]["site"]:
                raise RuntimeError(f"FLJob {self.namespace}/{name} exists for another job ({spec.get('jobId')})")
            if not is_terminal(existing) and not (existing.get("metadata") or {}).get("deletionTimestamp"):
                # The same job at the same site, still going (e.g. the client parent restarted): adopt it.
                self.logger.info(f"FLJob {self.namespace}/{name} already exists and is not finished: adopting it")
                return existing, False
            # A finished (or terminating) run of the same job id: remove it so the job can run again.
            self.logger.info(f"FLJob {self.namespace}/{name} is from a finished run: replacing it")
            self._delete_fljob(custom_api, name, wait=60.0)
        raise RuntimeError("unreachable")

    def _delete_fljob(self, custom_api, name: str, wait: float = 0.0):
        try:
            custom_api.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, _request_timeout=_REQUEST_TIMEOUT
            )
        except ApiException as e:
            if e.status != 404:
                self.logger.warning(f"deleting FLJob {self.namespace}/{name} failed: {e}")
                return
        if wait > 0:
            gone = FLJobHandle(custom_api, name, self.namespace, logger=self.logger)._observe(
                lambda obj, deleted: deleted, timeout=wait
            )
            if not gone:
                raise RuntimeError(f"FLJob {self.namespace}/{name} was not deleted within {wait} s")

    def _secret_body(self, secret_name: str, creds: Dict[str, str]):
        from kubernetes import client

        return client.V1Secret(
            api_version="v1",
            kind="Secret",
            metadata=client.V1ObjectMeta(
                name=secret_name,
                namespace=self.namespace,
                labels={"app.kubernetes.io/managed-by": MANAGED_BY},
            ),
            type="Opaque",
            string_data=dict(creds),
        )

    def _upsert_credentials_secret(self, core_api, fljob_name_: str, creds: Dict[str, str], job_id: str):
        """Create (or refresh) the per-job Secret, before the FLJob exists; no ownerReference yet."""
        secret_name = credentials_secret_name(fljob_name_)
        body = self._secret_body(secret_name, creds)
        try:
            core_api.create_namespaced_secret(self.namespace, body, _request_timeout=_REQUEST_TIMEOUT)
            return
        except ApiException as e:
            if e.status != 409:
                raise
        # The Secret exists: a previous run of this job, a retried launch, or an FLJob of this name running for
        # another job (then its Secret is not ours to overwrite).
        self._check_fljob_is_ours(fljob_name_, job_id)
        for _ in range(3):
            try:
                # A replace drops the old ownerReferences too: the Secret must not be collected with a finished
                # FLJob that _create_fljob is about to delete.
                core_api.replace_namespaced_secret(
                    secret_name, self.namespace, body, _request_timeout=_REQUEST_TIMEOUT
                )
                return
            except ApiException as e:
                if e.status == 404:  # garbage-collected in between
                    try:
                        core_api.create_namespaced_secret(self.namespace, body, _request_timeout=_REQUEST_TIMEOUT)
                        return
                    except ApiException as e2:
                        if e2.status != 409:
                            raise
                elif e.status != 409:
                    raise
            time.sleep(0.2)
        raise RuntimeError(f"could not update Secret {self.namespace}/{secret_name}")

    def _check_fljob_is_ours(self, name: str, job_id: str):
        custom_api, _ = self._apis()
        try:
            existing = custom_api.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, _request_timeout=_REQUEST_TIMEOUT
            )
        except ApiException as e:
            if e.status == 404:
                return
            raise
        spec = existing.get("spec") or {}
        if spec.get("jobId") != job_id:
            raise RuntimeError(f"FLJob {self.namespace}/{name} exists for another job ({spec.get('jobId')})")

    def _own_secret(self, core_api, secret_name: str, fljob: dict):
        """ownerReference Secret -> FLJob, so Kubernetes deletes the Secret with the FLJob."""
        meta = fljob.get("metadata") or {}
        owner = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": meta.get("name"),
            "uid": meta.get("uid"),
            "controller": False,
        }
        try:
            core_api.patch_namespaced_secret(
                secret_name,
                self.namespace,
                {"metadata": {"ownerReferences": [owner]}},
                _request_timeout=_REQUEST_TIMEOUT,
            )
        except Exception as e:
            # The handle still deletes the Secret when the job ends; only a parent crash would leave it behind.
            self.logger.warning(f"setting the ownerReference of Secret {self.namespace}/{secret_name} failed: {e}")

    def _delete_secret(self, core_api, secret_name: str):
        try:
            core_api.delete_namespaced_secret(secret_name, self.namespace, _request_timeout=_REQUEST_TIMEOUT)
        except ApiException as e:
            if e.status != 404:
                self.logger.warning(f"deleting Secret {self.namespace}/{secret_name} failed: {e.status} {e.reason}")
        except Exception as e:
            self.logger.warning(f"deleting Secret {self.namespace}/{secret_name} failed: {e}")
