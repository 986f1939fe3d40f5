"""Workspace transfer registration, as NVFlare 2.9.0's ClientK8sJobLauncher does it.

A worker pod starts with an empty workspace (only the startup kit). When its environment has
``NVFL_WORKSPACE_OWNER_FQCN`` and ``NVFL_WORKSPACE_TRANSFER_TOKEN``, NVFlare's worker_process downloads ``local/`` and
``<job id>/`` from the parent over CellNet at start and uploads ``<job id>/`` back at the end
(``nvflare.app_opt.job_launcher.workspace_cell_transfer``). The parent side is a ``WorkspaceTransferManager`` on the
parent's cell; each job is registered with a one-time token and removed when the job is over.
"""

from __future__ import annotations

import logging
import threading
from typing import Optional

from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_opt.job_launcher.workspace_cell_transfer import (
    ENV_WORKSPACE_OWNER_FQCN,
    ENV_WORKSPACE_TRANSFER_TOKEN,
    WorkspaceTransferManager,
)

__all__ = [
    "ENV_WORKSPACE_OWNER_FQCN",
    "ENV_WORKSPACE_TRANSFER_TOKEN",
    "WorkspaceRegistration",
    "register_workspace_transfer",
]


class WorkspaceRegistration:
    """One job registered with the parent's WorkspaceTransferManager; release() removes it (once)."""

    def __init__(self, manager, job_id: str, token: str, workspace_root: str):
        self.manager = manager
        self.job_id = job_id
        self.token = token
        self.workspace_root = workspace_root
        self.owner_fqcn: str = manager.owner_fqcn
        self._lock = threading.Lock()
        self._released = False

    def release(self, logger: Optional[logging.Logger] = None) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        try:
            # The manager also removes the job itself once the results are uploaded; removing twice is harmless.
            self.manager.remove_job(self.job_id)
        except Exception as e:  # never let cleanup break JobExecutor's waiter thread
            (logger or logging.getLogger(__name__)).warning(f"job {self.job_id}: remove_job failed: {e}")

    def __repr__(self):  # never show the token
        return f"WorkspaceRegistration(job_id={self.job_id}, owner={self.owner_fqcn})"


def workspace_root_from_context(fl_ctx: FLContext) -> str:
    """The parent's workspace root: ``FLContextKey.ARGS.workspace``, what NVFlare's K8s launcher registers."""
    args = fl_ctx.get_prop(FLContextKey.ARGS)
    root = getattr(args, "workspace", None) if args is not None else None
    if not root:
        workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
        root = workspace.get_root_dir() if workspace is not None else None
    if not root:
        raise RuntimeError(f"missing {FLContextKey.ARGS}.workspace in FLContext")
    return str(root)


def register_workspace_transfer(fl_ctx: FLContext, job_id: str) -> WorkspaceRegistration:
    """``WorkspaceTransferManager.get_or_create(engine.cell).add_job(job_id, workspace_root)``.

    The owner FQCN (what the worker needs as NVFL_WORKSPACE_OWNER_FQCN) is the parent cell's FQCN, i.e. the client
    name; the token (NVFL_WORKSPACE_TRANSFER_TOKEN) is a secret and goes into the job's credentials Secret only.
    """
    engine = fl_ctx.get_engine()
    cell = getattr(engine, "cell", None) if engine is not None else None
    if cell is None:
        raise RuntimeError("missing the parent's CellNet cell (engine.cell) for the workspace transfer")
    root = workspace_root_from_context(fl_ctx)
    manager = WorkspaceTransferManager.get_or_create(cell)
    token = manager.add_job(job_id, root)
    return WorkspaceRegistration(manager, job_id, token, root)
