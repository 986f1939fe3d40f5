"""Drive NVFlare's REAL client JobExecutor (nvflare.private.fed.client.client_executor) with our launcher.

Only what surrounds the executor is stood in for: the FL client object (name, token, signature, ssid, its cell) and
the client engine (event dispatch, FLContext creation). Everything the executor does itself runs for real:
writing the meta file, choosing the launcher through BEFORE_JOB_LAUNCH + add_launcher + get_job_launcher,
building JOB_PROCESS_ARGS (credentials included), launch_job, the waiter thread (wait -> get_return_code -> the
code reclassification -> REPORT_JOB_FAILURE to the server -> JOB_COMPLETED), check_status and abort_app.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from typing import Dict, List, Optional

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey, RunProcessKey
from nvflare.apis.fl_context import FLContext, FLContextManager
from nvflare.apis.workspace import Workspace
from nvflare.fuel.f3.cellnet.defs import MessageHeaderKey, ReturnCode
from nvflare.fuel.f3.message import Message
from nvflare.private.defs import CellChannelTopic, JobFailureMsgKey
from nvflare.private.event import fire_event
from nvflare.private.fed.client.client_executor import JobExecutor
from nvflare.private.fed.client.client_status import ClientStatus


class FakeCell:
    def __init__(self, fqcn: str):
        self.fqcn = fqcn
        self.sent: List[dict] = []
        self.request_cbs: Dict[tuple, object] = {}

    def get_internal_listener_url(self):
        return "tcp://localhost:8004"

    def get_internal_listener_params(self):
        return {}

    def get_fqcn(self):
        return self.fqcn

    def register_request_cb(self, channel, topic, cb, *args, **kwargs):
        # what WorkspaceTransferManager registers on the parent's cell
        self.request_cbs[(channel, topic)] = cb

    def fire_and_forget(self, **kwargs):
        self.sent.append({"topic": kwargs.get("topic"), "targets": kwargs.get("targets"), "channel": kwargs.get("channel")})

    def send_request(self, **kwargs):
        return Message(headers={MessageHeaderKey.RETURN_CODE: ReturnCode.OK}, payload={})


class FakeEngine:
    def __init__(self, client_name: str, components: list, cell: Optional[FakeCell] = None):
        self.components = list(components)
        self.cell = cell or FakeCell(client_name)  # ClientEngine.cell: the parent's cell (workspace transfer)
        self.ctx_mgr = FLContextManager(engine=self, identity_name=client_name)

    def new_context(self) -> FLContext:
        return self.ctx_mgr.new_context()

    def fire_event(self, event_type: str, fl_ctx: FLContext):
        fire_event(event=event_type, handlers=self.components, ctx=fl_ctx)


class FakeClient:
    """The FL client object JobExecutor reads: client_name, token, token_signature, ssid, cell."""

    def __init__(self, client_name: str, token: str, token_signature: str, ssid: str):
        self.client_name = client_name
        self.token = token
        self.token_signature = token_signature
        self.ssid = ssid
        self.cell = FakeCell(client_name)
        self.engine = None
        self.multi_gpu = False
        self.reports: Dict[str, dict] = {}  # job id -> REPORT_JOB_FAILURE payload sent to the server
        self.reported = threading.Condition()

    def send_request_before_shutdown(self, target, channel, topic, request, timeout, optional=False):
        if topic == CellChannelTopic.REPORT_JOB_FAILURE:
            with self.reported:
                self.reports[request.payload[JobFailureMsgKey.JOB_ID]] = dict(request.payload)
                self.reported.notify_all()
        return Message(headers={MessageHeaderKey.RETURN_CODE: ReturnCode.OK}, payload={})


class EventRecorder(FLComponent):
    def __init__(self):
        super().__init__()
        self.events: List[tuple] = []

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type in (EventType.BEFORE_JOB_LAUNCH, EventType.AFTER_JOB_LAUNCH, EventType.JOB_COMPLETED):
            self.events.append((event_type, fl_ctx.get_prop(FLContextKey.CURRENT_JOB_ID)))


class ExecutorDriver:
    def __init__(
        self,
        launcher,
        workspace_root: str,
        client_name: str = "site-1",
        token: str = "tok-123",
        token_signature: str = "sig-456",
        ssid: str = "ssid-789",
        set_options: Optional[List[str]] = None,
    ):
        for d in ("startup", "local"):
            os.makedirs(os.path.join(workspace_root, d), exist_ok=True)
        self.root = workspace_root
        self.launcher = launcher
        self.client = FakeClient(client_name, token, token_signature, ssid)
        self.recorder = EventRecorder()
        self.engine = FakeEngine(client_name, [launcher, self.recorder], cell=self.client.cell)
        self.client.engine = self.engine
        self.workspace = Workspace(workspace_root, site_name=client_name)
        self.executor = JobExecutor(self.client, os.path.join(workspace_root, "startup"))
        self.args = argparse.Namespace(workspace=workspace_root, set=list(set_options or []), job_id=None)

    def start(self, job_id: str, job_meta: dict):
        """What ClientEngine.start_app does around JobExecutor.start_app (the job was deployed first)."""
        meta_path = self.workspace.get_job_meta_path(job_id)
        os.makedirs(os.path.dirname(meta_path), exist_ok=True)
        with open(meta_path, "w") as f:
            json.dump(job_meta, f)
        fl_ctx = self.engine.new_context()
        fl_ctx.set_prop(FLContextKey.WORKSPACE_OBJECT, self.workspace, private=True, sticky=False)
        fl_ctx.set_prop(FLContextKey.ARGS, self.args, private=True, sticky=False)
        fl_ctx.set_prop(
            FLContextKey.SERVER_CONFIG,
            [{"service": {"target": "fl-server:8002", "scheme": "grpc"}}],
            private=True,
            sticky=False,
        )
        self.executor.start_app(self.client, job_id, dict(job_meta), self.args, None, None, None, fl_ctx)

    def handle(self, job_id: str):
        """Our FLJobHandle, behind the executor's _PendingJobHandle."""
        entry = self.executor.run_processes.get(job_id) or {}
        pending = entry.get(RunProcessKey.JOB_HANDLE)
        return getattr(pending, "_job_handle", None) if pending else None

    def status(self, job_id: str) -> str:
        return self.executor.check_status(job_id)

    def worker_started(self, job_id: str):
        """The worker's check-in (in NVFlare the job cell tells the parent it started)."""
        self.executor.notify_job_status(job_id, ClientStatus.STARTED)

    def abort(self, job_id: str):
        self.executor.abort_app(job_id)

    def wait_reported(self, job_id: str, timeout: float) -> Optional[int]:
        """The code the executor reported to the FL server once the job ended (None on timeout)."""
        deadline = time.monotonic() + timeout
        with self.client.reported:
            while job_id not in self.client.reports:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.client.reported.wait(remaining)
        # the waiter thread frees the job and fires JOB_COMPLETED right after reporting
        while not self.completed(job_id) and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.client.reports[job_id][JobFailureMsgKey.CODE]

    def completed(self, job_id: str) -> bool:
        return (EventType.JOB_COMPLETED, job_id) in self.recorder.events
