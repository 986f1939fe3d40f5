"""A client-parent component for the e2e tests: calls NVFlare's own ``ClientEngine.abort_task(job_id)`` on request.

NVFlare 2.9.0 has no admin or server command that sends ``train.abort_task`` to a client, so nobody can reach the
parent's ``AbortTaskProcessor -> ClientEngine.abort_task -> JobExecutor.abort_task`` path (a CLIENT_COMMAND/
ABORT_TASK fire-and-forget to the job cell). This component stands in for that missing command: the test writes
``<spool_dir>/<job id>.abort-task``; the component removes it, calls ``engine.abort_task(job_id)`` in the parent and
writes what it returned to ``<spool_dir>/<job id>.abort-task.done``.

It goes into the site's local/resources.json and local/custom/ (the worker builds every component of
resources.json, so it must import there too). It acts only where SYSTEM_START fires: in the client parent.
"""

from __future__ import annotations

import os
import threading
import time

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_context import FLContext

SUFFIX = ".abort-task"


class AbortTaskTrigger(FLComponent):
    def __init__(self, spool_dir: str, interval: float = 0.2):
        super().__init__()
        self.spool_dir = spool_dir
        self.interval = interval
        self._engine = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.SYSTEM_START and self._engine is None:
            self._engine = fl_ctx.get_engine()
            threading.Thread(target=self._loop, name="abort-task-trigger", daemon=True).start()

    def _loop(self):
        while True:
            try:
                names = os.listdir(self.spool_dir)
            except OSError:
                names = []
            for name in names:
                if not name.endswith(SUFFIX):
                    continue
                job_id = name[: -len(SUFFIX)]
                try:
                    os.remove(os.path.join(self.spool_dir, name))
                except OSError:
                    continue
                try:
                    result = self._engine.abort_task(job_id)
                except Exception as e:  # noqa: BLE001 - report it to the test
                    result = f"{type(e).__name__}: {e}"
                self.logger.info(f"abort_task({job_id}) -> {result}")
                done = os.path.join(self.spool_dir, name + ".done")
                with open(done + ".tmp", "w") as f:
                    f.write(f"{time.time():.3f} {result}\n")
                os.replace(done + ".tmp", done)
            time.sleep(self.interval)
