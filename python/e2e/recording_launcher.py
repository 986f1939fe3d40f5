"""A job launcher for the e2e tests: it starts no process, it hands the job to whoever watches a spool directory.

In the client parent (configured through local/resources.json, see ``Project.configure_client``) ``launch_job``:

* registers the job with NVFlare's ``WorkspaceTransferManager`` (``fljob_launcher.transfer``, the same code
  FLJobLauncher uses, the same call NVFlare 2.9.0's ClientK8sJobLauncher makes);
* writes ``<spool>/<job id>.json`` (mode 0600): the JOB_PROCESS_ARGS JobExecutor prepared, the credentials env
  (NVFLARE_JOB_*), the owner FQCN and the transfer token -- what the operator gets from the FLJob and its Secret.

The test (``prove_worker.py``) starts the worker exactly as the pod would and writes ``<spool>/<job id>.rc``
(the exit code) when it ends. The handle's ``wait()`` / ``poll()`` read that file. ``terminate()`` (JobExecutor's
hard stop after its 10 s ``max_wait``) writes ``<job id>.terminate`` and the test then kills the worker.

``<spool>/<job id>.k8s-abort`` stands for "status.abort appeared on the FLJob": the handle then relays NVFlare's
ABORT to the job cell with ``fljob_launcher.abort.send_abort_to_job`` -- the path FLJobHandle takes in the parent.
``<job id>.k8s-abort-norelay`` is the same abort without the relay (to measure the pod-side mechanism alone). In
both cases, like FLJobHandle, a worker that then exits 0 is reported as ABORTED (9), so the server ends the run.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Optional

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, JobConstants
from nvflare.apis.fl_context import FLContext
from nvflare.apis.job_launcher_spec import JobHandleSpec, JobLauncherSpec, JobReturnCode, add_launcher
from nvflare.utils.job_launcher_utils import get_credential_env

from fljob_launcher.abort import send_abort_to_job
from fljob_launcher.transfer import register_workspace_transfer


class RecordingHandle(JobHandleSpec):
    def __init__(self, spool: str, job_id: str, registration, cell, terminate_wait: float = 15.0):
        super().__init__()
        self.spool = spool
        self.job_id = job_id
        self.registration = registration
        self.cell = cell
        self.terminate_wait = terminate_wait
        self._code: Optional[int] = None
        self._stop = threading.Event()
        threading.Thread(target=self._watch_k8s_abort, daemon=True).start()

    def _path(self, ext: str) -> str:
        return os.path.join(self.spool, f"{self.job_id}.{ext}")

    def _read_rc(self) -> Optional[int]:
        if self._code is None and os.path.exists(self._path("rc")):
            with open(self._path("rc")) as f:
                text = f.read().strip()
            if text:
                self._code = int(text)
                k8s_abort = os.path.exists(self._path("k8s-abort")) or os.path.exists(self._path("k8s-abort-norelay"))
                if self._code == JobReturnCode.SUCCESS and k8s_abort:
                    self._code = JobReturnCode.ABORTED
                self._stop.set()
                self.registration.release()
        return self._code

    def _watch_k8s_abort(self):
        while not self._stop.is_set():
            if os.path.exists(self._path("k8s-abort")):
                t0 = time.time()
                send_abort_to_job(self.cell, self.job_id)
                with open(self._path("abort-sent"), "w") as f:
                    f.write(str(t0))
                return
            self._stop.wait(0.1)

    def poll(self):
        code = self._read_rc()
        return JobReturnCode.UNKNOWN if code is None else code

    def wait(self):
        while self._read_rc() is None:
            time.sleep(0.1)

    def terminate(self):
        with open(self._path("terminate"), "w") as f:
            f.write(str(time.time()))
        deadline = time.monotonic() + self.terminate_wait
        while self._read_rc() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._code is None:
            self._code = JobReturnCode.ABORTED
            self._stop.set()
            self.registration.release()


class RecordingLauncher(JobLauncherSpec):
    def __init__(self, spool_dir: str):
        super().__init__()
        self.spool_dir = spool_dir

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.BEFORE_JOB_LAUNCH:
            add_launcher(self, fl_ctx)

    def launch_job(self, job_meta: dict, fl_ctx: FLContext) -> JobHandleSpec:
        job_id = str(job_meta[JobConstants.JOB_ID])
        os.makedirs(self.spool_dir, exist_ok=True)
        job_args = fl_ctx.get_prop(FLContextKey.JOB_PROCESS_ARGS) or {}
        registration = register_workspace_transfer(fl_ctx, job_id)
        args = fl_ctx.get_prop(FLContextKey.ARGS)
        record = {
            "job_id": job_id,
            "job_args": {k: list(v) for k, v in job_args.items()},
            "set": list(getattr(args, "set", None) or []),
            "credentials_env": get_credential_env(job_args),
            "workspace_owner": registration.owner_fqcn,
            "transfer_token": registration.token,
            "launched_at": time.time(),
        }
        path = os.path.join(self.spool_dir, f"{job_id}.json")
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2)
        os.replace(tmp, path)
        engine = fl_ctx.get_engine()
        return RecordingHandle(self.spool_dir, job_id, registration, getattr(engine, "cell", None))
