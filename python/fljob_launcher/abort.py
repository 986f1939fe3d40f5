"""NVFlare's own job abort messages, sent from the client parent to a job cell over CellNet.

These are the messages ``JobExecutor.abort_app`` / ``abort_task`` send (channel ``CLIENT_COMMAND``, topic
``ABORT`` / ``ABORT_TASK``, to ``<parent cell FQCN>.<job id>``). The worker's CommandAgent runs
``ClientRunner.abort()`` (the job ends cleanly: results uploaded, the server records the abort) or
``ClientRunner.abort_task()`` (the current task is dropped, the job goes on).
"""

from __future__ import annotations

import logging
from typing import Optional

from nvflare.apis.fl_constant import AdminCommandNames
from nvflare.fuel.f3.cellnet.fqcn import FQCN
from nvflare.private.defs import CellChannel, new_cell_message


def job_cell_fqcn(cell, job_id: str) -> str:
    return FQCN.join([cell.get_fqcn(), job_id])


def _send(cell, job_id: str, topic: str, payload: dict, logger: Optional[logging.Logger]) -> bool:
    if cell is None:
        (logger or logging.getLogger(__name__)).warning(f"job {job_id}: no parent cell to send {topic} with")
        return False
    try:
        cell.fire_and_forget(
            targets=job_cell_fqcn(cell, job_id),
            channel=CellChannel.CLIENT_COMMAND,
            topic=topic,
            message=new_cell_message({}, payload),
            optional=True,
        )
        return True
    except Exception as e:
        (logger or logging.getLogger(__name__)).warning(f"job {job_id}: sending {topic} to the job cell failed: {e}")
        return False


def send_abort_to_job(cell, job_id: str, logger: Optional[logging.Logger] = None) -> bool:
    """What JobExecutor.abort_app sends before it waits for the worker and calls terminate()."""
    return _send(cell, job_id, AdminCommandNames.ABORT, {}, logger)


def send_abort_task_to_job(cell, job_id: str, logger: Optional[logging.Logger] = None) -> bool:
    """What JobExecutor.abort_task sends (the job keeps running)."""
    return _send(cell, job_id, AdminCommandNames.ABORT_TASK, {"command": AdminCommandNames.ABORT_TASK, "data": {}},
                 logger)
