"""FLJobHandle: NVFlare's JobHandleSpec on top of one FLJob object."""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Callable, Optional

from kubernetes import watch as k8s_watch
from kubernetes.client.rest import ApiException
from nvflare.apis.job_launcher_spec import JobHandleSpec, JobReturnCode

from .abort import send_abort_to_job
from .mapping import GROUP, PLURAL, VERSION, is_terminal, return_code_from_status

DEFAULT_WATCH_TIMEOUT_SECONDS = 60
DEFAULT_TERMINATE_TIMEOUT = 30.0
# spec.abortGracePeriodSeconds terminate() sets: JobExecutor calls terminate() only once its own graceful window is
# over (ABORT sent, then max_wait 10 s) or when it wants the job gone at once (still STARTING), so the operator
# deletes the pod without a second grace period.
DEFAULT_TERMINATE_GRACE_PERIOD_SECONDS = 0
_HTTP_GONE = 410
_REQUEST_TIMEOUT = 30  # seconds for one plain (non-watch) API call
_HTTP_NOT_FOUND = 404
_ABORT_RETRY_FIRST = 0.5  # seconds before the first retry of a failed abort request; doubles up to _ABORT_RETRY_MAX
_ABORT_RETRY_MAX = 5.0
_PENDING_ABORT_WATCH_SECONDS = 5
_OPERATOR_ABORT_GRACE = 10  # the operator's spec.abortGracePeriodSeconds when it is not set  # watch timeout while an abort is still to be delivered: retry it this often


def _describe(e: BaseException) -> str:
    if isinstance(e, ApiException):
        return f"{e.status} {e.reason}"
    return f"{type(e).__name__}: {e}"

# done(obj, deleted) -> True when the observer should stop. obj is the FLJob dict (None when it no longer exists).
DoneFn = Callable[[Optional[dict], bool], bool]


class FLJobHandle(JobHandleSpec):
    """The JobHandleSpec JobExecutor keeps for one launched job.

    - poll(): one GET of the FLJob. None while status.phase is not terminal (like ``Popen.poll`` and NVFlare's
      own ``_PendingJobHandle``), then the NVFlare return code (see ``mapping.return_code_from_status``).
    - wait(): list + watch (field selector ``metadata.name=<name>``) until the phase is terminal; the watch is
      re-established when the server closes it (timeout, 410 Gone); no status polling loop.
    - terminate(): merge-patches ``spec.abort: true`` with ``spec.abortGracePeriodSeconds:
      terminate_grace_period_seconds`` (default 0: JobExecutor has had its own graceful window already, see
      ``JobExecutor._terminate_job``) and returns once the operator has recorded ``status.abort.requestedAt`` (or the
      job finished / disappeared). Everything is bounded by ``terminate_timeout`` s (+ one request timeout). A
      refused or failing request is retried with backoff within that bound; if the patch never gets through, the
      FLJob is deleted instead (deleting an FLJob aborts it; its Secret goes with it by ownerReference); if that
      fails too, the abort stays pending and wait() -- JobExecutor's waiter thread -- keeps delivering it. It never
      raises (an exception would skip JobExecutor's bookkeeping, or, in launch_job, leave an FLJob nobody watches).

    An FLJob that disappears before it finished counts as ABORTED (9): deleting an FLJob aborts its job.

    Once the job is seen finished, the per-job credentials Secret (if the launcher made one) is deleted, as NVFlare's
    own K8s launcher does with its credential Secret: finished FLJobs may be kept for a long time, the client's
    token need not be. The Secret's ownerReference to the FLJob stays the backstop. The job's workspace transfer
    registration is removed then too -- not at terminate(): a worker that stops gracefully within the grace period
    still uploads its results.

    Aborts started in Kubernetes (spec.abort set by hand, the FLJob deleted, activeDeadlineSeconds): when wait()
    sees ``status.abort.requestedAt`` and this handle's terminate() was not called (JobExecutor.abort_app sends
    NVFlare's ABORT itself before it calls terminate()), the handle sends that same ABORT to the job cell once, so the
    worker ends cleanly, uploads its results and the server records the job aborted.
    """

    def __init__(
        self,
        custom_api,
        name: str,
        namespace: str,
        job_id: str = "",
        watch_timeout_seconds: int = DEFAULT_WATCH_TIMEOUT_SECONDS,
        terminate_timeout: float = DEFAULT_TERMINATE_TIMEOUT,
        watch_factory=None,
        logger: Optional[logging.Logger] = None,
        core_api=None,
        credentials_secret: Optional[str] = None,
        workspace_registration=None,
        cell=None,
        terminate_grace_period_seconds: Optional[int] = DEFAULT_TERMINATE_GRACE_PERIOD_SECONDS,
    ):
        super().__init__()
        self.custom_api = custom_api
        self.name = name
        self.namespace = namespace
        self.job_id = job_id
        self.watch_timeout_seconds = max(1, int(watch_timeout_seconds))
        self.terminate_timeout = terminate_timeout
        self._watch_factory = watch_factory or k8s_watch.Watch
        self.logger = logger or logging.getLogger(self.__class__.__name__)
        self._lock = threading.Lock()
        self._return_code: Optional[int] = None
        self._forced_return_code: Optional[int] = None
        self.last_status: dict = {}
        self.core_api = core_api
        self.credentials_secret = credentials_secret
        self.workspace_registration = workspace_registration
        self.cell = cell
        self._terminate_called = False
        self.abort_relayed = False
        self.terminate_grace_period_seconds = terminate_grace_period_seconds
        # terminate() could not deliver the abort: wait() retries it (next attempt not before _abort_retry_at)
        self._abort_pending = False
        self._abort_retry_at = 0.0
        self._abort_retry_backoff = _ABORT_RETRY_FIRST

    def __repr__(self):
        return f"FLJobHandle({self.namespace}/{self.name}, job_id={self.job_id})"

    # ----- results -------------------------------------------------------------------------------------------

    @property
    def return_code(self) -> Optional[int]:
        with self._lock:
            return self._return_code

    def _record(self, obj: Optional[dict], deleted: bool) -> Optional[int]:
        """Remember what an observation says; returns the final code once known."""
        with self._lock:
            if self._return_code is not None:
                return self._return_code
            if obj is not None:
                self.last_status = dict(obj.get("status") or {})
            code = None
            if is_terminal(obj):
                code = return_code_from_status(obj.get("status"))
            elif deleted:
                self.logger.warning(f"FLJob {self.namespace}/{self.name} is gone before it finished: aborted")
                code = JobReturnCode.ABORTED
            if code is not None:
                if code == JobReturnCode.SUCCESS and self._kubernetes_abort(obj):
                    # Stopped by an abort started in Kubernetes: NVFlare's server did not ask for it, so report it
                    # as ABORTED (JobExecutor sends 9 to the server, which then ends the run) instead of a success
                    # the server would only notice when it declares the client dead (measured: ~80 s, then
                    # EXECUTION_EXCEPTION).
                    code = JobReturnCode.ABORTED
                if self._forced_return_code is not None:
                    code = self._forced_return_code
                self._return_code = code
            return self._return_code

    def _kubernetes_abort(self, obj: Optional[dict]) -> bool:
        """status.abort.requestedAt is set and this handle did not ask for it: the abort was started in Kubernetes
        (spec.abort by hand, FLJob deletion, deadline), not by NVFlare (JobExecutor.abort_app -> terminate())."""
        if obj is None or self._terminate_called:
            return False
        return bool(((obj.get("status") or {}).get("abort") or {}).get("requestedAt"))

    def _relay_abort(self, obj: Optional[dict]):
        """Send NVFlare's ABORT to the job cell when Kubernetes started an abort NVFlare does not know of (once)."""
        if is_terminal(obj):
            return
        with self._lock:
            if self.abort_relayed or not self._kubernetes_abort(obj):
                return
            self.abort_relayed = True
        if self.cell is None or not self.job_id:
            return
        self.logger.info(f"FLJob {self.namespace}/{self.name}: abort requested in Kubernetes; sending ABORT to the job")
        send_abort_to_job(self.cell, self.job_id, self.logger)

    def _release(self):
        """Delete the credentials Secret and end the workspace transfer once the job is over (best effort, once)."""
        with self._lock:
            name, self.credentials_secret = self.credentials_secret, None
            registration, self.workspace_registration = self.workspace_registration, None
        if registration is not None:
            registration.release(self.logger)
        if not name or self.core_api is None:
            return
        try:
            self.core_api.delete_namespaced_secret(name, self.namespace, _request_timeout=_REQUEST_TIMEOUT)
        except ApiException as e:
            if e.status != _HTTP_NOT_FOUND:
                self.logger.warning(f"deleting Secret {self.namespace}/{name} failed: {e.status} {e.reason}")
        except Exception as e:
            self.logger.warning(f"deleting Secret {self.namespace}/{name} failed: {e}")

    def _force_return_code(self, code: int):
        with self._lock:
            self._forced_return_code = code
            if self._return_code is not None:
                self._return_code = code

    # ----- API -----------------------------------------------------------------------------------------------

    def _get(self) -> Optional[dict]:
        try:
            return self.custom_api.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, self.name, _request_timeout=_REQUEST_TIMEOUT
            )
        except ApiException as e:
            if e.status == _HTTP_NOT_FOUND:
                return None
            raise

    def _observe(self, done: DoneFn, timeout: Optional[float] = None) -> bool:
        """List, then watch the FLJob until done(obj, deleted) is True. False if `timeout` s passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        selector = f"metadata.name={self.name}"
        backoff = 0.5
        gone_in_a_row = 0
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            try:
                listing = self.custom_api.list_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, field_selector=selector, _request_timeout=_REQUEST_TIMEOUT
                )
                items = listing.get("items") or []
                obj = items[0] if items else None
                if done(obj, obj is None):
                    return True
                rv = (listing.get("metadata") or {}).get("resourceVersion")
                seconds = self.watch_timeout_seconds
                if self._abort_pending:  # come back soon to retry the abort (done() does it)
                    seconds = min(seconds, _PENDING_ABORT_WATCH_SECONDS)
                if remaining is not None:
                    seconds = max(1, min(seconds, math.ceil(remaining)))
                w = self._watch_factory()
                kwargs = dict(
                    field_selector=selector,
                    timeout_seconds=seconds,
                    allow_watch_bookmarks=True,
                    _request_timeout=seconds + 30,
                )
                if rv:
                    kwargs["resource_version"] = rv
                for event in w.stream(
                    self.custom_api.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL, **kwargs
                ):
                    etype = event.get("type")
                    obj = event.get("raw_object") or event.get("object")
                    if etype in ("ADDED", "MODIFIED", "DELETED") and isinstance(obj, dict):
                        if done(obj, etype == "DELETED"):
                            w.stop()
                            return True
                    if deadline is not None and time.monotonic() >= deadline:
                        w.stop()
                        break
                backoff = 0.5  # the watch ended normally (server timeout): list and watch again
                gone_in_a_row = 0
            except ApiException as e:
                if e.status == _HTTP_GONE:
                    # resourceVersion too old: list again (at once the first time, then with a pause)
                    gone_in_a_row += 1
                    if gone_in_a_row > 1:
                        backoff = self._pause(backoff, deadline)
                    continue
                self.logger.warning(f"watching FLJob {self.namespace}/{self.name} failed: {e.status} {e.reason}")
                backoff = self._pause(backoff, deadline)
            except Exception as e:  # connection reset, read timeout, ...
                self.logger.warning(f"watching FLJob {self.namespace}/{self.name} failed: {type(e).__name__}: {e}")
                backoff = self._pause(backoff, deadline)

    @staticmethod
    def _pause(backoff: float, deadline: Optional[float]) -> float:
        delay = backoff if deadline is None else max(0.0, min(backoff, deadline - time.monotonic()))
        time.sleep(delay)
        return min(backoff * 2, 5.0)

    # ----- JobHandleSpec -------------------------------------------------------------------------------------

    def poll(self):
        code = self.return_code
        if code is not None:
            return code
        try:
            obj = self._get()
        except Exception as e:
            self.logger.warning(f"reading FLJob {self.namespace}/{self.name} failed: {e}")
            return None
        code = self._record(obj, obj is None)
        if code is not None:
            self._release()
        return code

    def wait(self, timeout: Optional[float] = None):
        """Block until the FLJob is finished (`timeout` is for tests and tools; JobExecutor waits without one)."""
        if self.return_code is None:

            def done(obj, deleted):
                if self._record(obj, deleted) is not None:
                    return True
                self._relay_abort(obj)
                self._deliver_pending_abort(obj)
                return self.return_code is not None

            self._observe(done, timeout=timeout)
        if self.return_code is not None:
            self._release()
        return None

    def wait_until_started(self, timeout: float) -> bool:
        """True once the job is Running (or already past it); False if `timeout` s passed first."""

        def done(obj, deleted):
            if self._record(obj, deleted) is not None:
                return True
            return (obj.get("status") or {}).get("phase") in ("Running", "Aborting")

        return self._observe(done, timeout=timeout)

    def terminate(self):
        """Abort the job; never raises (see the class docstring). Returns within terminate_timeout s (+ one request
        timeout); the abort may still be in progress then: wait() reports its end."""
        with self._lock:
            self._terminate_called = True
        if self.return_code is not None:
            return None
        try:
            self._terminate()
        except Exception as e:  # a bug must not skip JobExecutor's resource release either
            self.logger.error(f"terminating FLJob {self.namespace}/{self.name} failed: {_describe(e)}")
            self._abort_pending = True
        return None

    def _abort_patch(self) -> dict:
        spec: dict = {"abort": True}
        if self.terminate_grace_period_seconds is not None:
            spec["abortGracePeriodSeconds"] = self.terminate_grace_period_seconds
        return {"spec": spec}

    def _request_abort(self, request_timeout: float):
        """One merge patch of spec.abort (+ the grace period). Returns the FLJob, None if it is gone; raises else."""
        try:
            return self.custom_api.patch_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, self.name, self._abort_patch(),
                _request_timeout=request_timeout,
            )
        except ApiException as e:
            if e.status == _HTTP_NOT_FOUND:
                return None
            raise

    def _delete_fljob(self, request_timeout: float) -> bool:
        """Delete the FLJob (the operator aborts a deleted FLJob; its Secret goes with it). True if it is gone."""
        try:
            self.custom_api.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, self.name, _request_timeout=request_timeout
            )
            return True
        except ApiException as e:
            if e.status == _HTTP_NOT_FOUND:
                return True
            self.logger.error(f"deleting FLJob {self.namespace}/{self.name} failed too: {_describe(e)}")
        except Exception as e:
            self.logger.error(f"deleting FLJob {self.namespace}/{self.name} failed too: {_describe(e)}")
        return False

    def _terminate(self):
        what = f"FLJob {self.namespace}/{self.name}"
        deadline = time.monotonic() + self.terminate_timeout
        backoff = _ABORT_RETRY_FIRST
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            try:
                obj = self._request_abort(max(1.0, min(_REQUEST_TIMEOUT, remaining)))
                break
            except Exception as e:
                remaining = deadline - time.monotonic()
                if remaining <= backoff:
                    self.logger.error(
                        f"requesting the abort of {what} failed {attempt} times within {self.terminate_timeout} s "
                        f"(last: {_describe(e)}); deleting the FLJob instead"
                    )
                    obj = False
                    break
                self.logger.warning(
                    f"requesting the abort of {what} failed ({_describe(e)}); retrying in {backoff:.1f} s"
                )
                time.sleep(backoff)
                backoff = min(backoff * 2, _ABORT_RETRY_MAX)
        if obj is None:  # already gone
            self._record(None, True)
            return
        if obj is False:
            if self._delete_fljob(_REQUEST_TIMEOUT):
                self.logger.warning(f"{what} deleted: the operator aborts it; its credentials Secret goes with it")
            else:
                self._abort_pending = True
                self.logger.error(
                    f"{what} could not be aborted: it may keep running and hold its site's quota. The handle keeps "
                    f"trying while JobExecutor waits for the job; to stop it by hand: "
                    f"kubectl -n {self.namespace} delete fljob {self.name}"
                )
            return

        def recorded(o, deleted):
            if self._record(o, deleted) is not None or deleted:
                return True
            return bool(((o.get("status") or {}).get("abort") or {}).get("requestedAt"))

        if recorded(obj, False):
            return
        if not self._observe(recorded, timeout=max(1.0, deadline - time.monotonic())):
            self.logger.warning(
                f"the operator has not recorded the abort of {what} within {self.terminate_timeout} s; "
                f"spec.abort stays set"
            )

    def _deliver_pending_abort(self, obj: Optional[dict]):
        """From wait(): retry an abort terminate() could not deliver (with backoff), until it is in the spec."""
        if not self._abort_pending or obj is None or is_terminal(obj):
            return
        spec = obj.get("spec") or {}
        grace = self.terminate_grace_period_seconds
        if spec.get("abort") and (grace is None or spec.get("abortGracePeriodSeconds", _OPERATOR_ABORT_GRACE) <= grace):
            self._abort_pending = False
            return
        now = time.monotonic()
        if now < self._abort_retry_at:
            return
        what = f"FLJob {self.namespace}/{self.name}"
        try:
            if self._request_abort(_REQUEST_TIMEOUT) is None:
                self._record(None, True)
            self._abort_pending = False
            self.logger.info(f"{what}: the pending abort is now requested")
            return
        except Exception as e:
            self.logger.warning(f"requesting the abort of {what} failed again ({_describe(e)}); deleting it")
        if self._delete_fljob(_REQUEST_TIMEOUT):
            self._abort_pending = False
            self.logger.warning(f"{what} deleted: the operator aborts it; its credentials Secret goes with it")
            return
        self._abort_retry_at = now + self._abort_retry_backoff
        self.logger.warning(f"{what}: the abort is still pending; next try in {self._abort_retry_backoff:.0f} s or more")
        self._abort_retry_backoff = min(self._abort_retry_backoff * 2, 60.0)

    def _terminate_for_heartbeat_cleanup(self):
        # JobExecutor calls this instead of terminate() when the FL server forgot the job; same thing for an FLJob.
        return self.terminate()
