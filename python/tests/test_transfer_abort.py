"""Workspace transfer registration and the Kubernetes-started abort relay of FLJobLauncher / FLJobHandle."""

import time

import pytest
from kubernetes.client.rest import ApiException
from nvflare.apis.fl_constant import AdminCommandNames
from nvflare.apis.job_launcher_spec import JobReturnCode
from nvflare.private.defs import CellChannel

from fake_k8s import secret_values
from fljob_launcher import fljob_name
from test_launcher import NS, job_meta, make_ctx, make_launcher, transfer_manager


def launch(cluster, **kwargs):
    launcher = make_launcher(cluster, **kwargs)
    fl_ctx = make_ctx(launcher)
    meta = job_meta()
    handle = launcher.launch_job(meta, fl_ctx)
    return launcher, fl_ctx, meta, handle


class TestRegistration:
    def test_token_only_in_secret(self, cluster):
        _, fl_ctx, meta, handle = launch(cluster)
        token = transfer_manager(fl_ctx).jobs[meta["job_id"]].transfer_token
        assert secret_values(cluster.secret(NS, f"{handle.name}-creds"))["transferToken"] == token
        [fljob] = cluster.fljobs()
        assert token not in repr(fljob)
        assert fljob["spec"]["workspaceOwner"] == fl_ctx.get_engine().cell.get_fqcn() == "site-1"

    def test_removed_when_the_job_finishes(self, cluster):
        _, fl_ctx, meta, handle = launch(cluster)
        manager = transfer_manager(fl_ctx)
        assert meta["job_id"] in manager.jobs
        cluster.set_status(handle.name, {"phase": "Succeeded", "exitCode": 0})
        handle.wait(timeout=5)
        assert handle.poll() == 0
        assert meta["job_id"] not in manager.jobs
        assert cluster.secret(NS, f"{handle.name}-creds") is None

    def test_kept_through_terminate(self, cluster, sim_operator):
        # a worker that stops gracefully within the grace period still uploads its results
        sim_operator.finish_after = None
        _, fl_ctx, meta, handle = launch(cluster)
        handle.terminate()
        assert meta["job_id"] in transfer_manager(fl_ctx).jobs
        cluster.set_status(handle.name, {"phase": "Aborted", "exitCode": 0})
        handle.wait(timeout=5)
        assert meta["job_id"] not in transfer_manager(fl_ctx).jobs

    def test_fljob_create_failure_deletes_secret_and_registration(self, cluster):
        launcher = make_launcher(cluster)
        fl_ctx = make_ctx(launcher)
        meta = job_meta()
        cluster.fail_next["create-FLJob"] = ApiException(status=403, reason="Forbidden")
        with pytest.raises(ApiException):
            launcher.launch_job(meta, fl_ctx)
        assert cluster.fljobs() == []
        assert cluster.secret(NS, f"{fljob_name(meta['job_id'], 'site-a')}-creds") is None
        assert meta["job_id"] not in transfer_manager(fl_ctx).jobs

    def test_secret_failure_removes_registration(self, cluster):
        launcher = make_launcher(cluster)
        fl_ctx = make_ctx(launcher)
        meta = job_meta()
        cluster.fail_next["create-Secret"] = ApiException(status=403, reason="Forbidden")
        with pytest.raises(ApiException):
            launcher.launch_job(meta, fl_ctx)
        assert cluster.fljobs() == []
        assert meta["job_id"] not in transfer_manager(fl_ctx).jobs

    def test_owner_reference_failure_is_not_fatal(self, cluster):
        cluster.fail_next["patch-Secret"] = ApiException(status=500, reason="Boom")
        _, _, _, handle = launch(cluster)
        secret = cluster.secret(NS, f"{handle.name}-creds")
        assert secret is not None and not secret["metadata"].get("ownerReferences")
        # the handle still deletes it at the end
        cluster.set_status(handle.name, {"phase": "Succeeded", "exitCode": 0})
        handle.wait(timeout=5)
        assert cluster.secret(NS, f"{handle.name}-creds") is None

    def test_secret_of_another_job_is_not_overwritten(self, cluster):
        launcher = make_launcher(cluster)
        meta = job_meta()
        launcher.launch_job(meta, make_ctx(launcher))
        name = cluster.fljobs()[0]["metadata"]["name"]
        before = cluster.secret(NS, f"{name}-creds")
        cluster.patch("FLJob", NS, name, {"spec": {"jobId": "someone-else"}}, notify=False)
        with pytest.raises(RuntimeError, match="another job"):
            launcher.launch_job(meta, make_ctx(launcher, creds=("x", "y", "z")))
        assert cluster.secret(NS, f"{name}-creds")["data"] == before["data"]

    def test_finished_run_replaced_secret_survives(self, cluster):
        # the refreshed Secret loses the old FLJob's ownerReference before that FLJob is deleted (no GC of it)
        launcher = make_launcher(cluster)
        meta = job_meta()
        h1 = launcher.launch_job(meta, make_ctx(launcher))
        cluster.set_status(h1.name, {"phase": "Failed", "exitCode": 101})
        h2 = launcher.launch_job(meta, make_ctx(launcher, creds=("t2", "s2", "d2")))
        secret = cluster.secret(NS, f"{h2.name}-creds")
        assert secret_values(secret)["token"] == "t2"
        assert secret["metadata"]["ownerReferences"][0]["uid"] == cluster.fljobs()[0]["metadata"]["uid"]

    @pytest.mark.parametrize("kwargs", [{"workspace_transfer": False}, {"per_job_credentials": False}])
    def test_off(self, cluster, kwargs):
        _, fl_ctx, meta, handle = launch(cluster, **kwargs)
        [fljob] = cluster.fljobs()
        assert "workspaceOwner" not in fljob["spec"]
        assert meta["job_id"] not in transfer_manager(fl_ctx).jobs
        secret = cluster.secret(NS, f"{handle.name}-creds")
        assert secret is None or "transferToken" not in secret_values(secret)

    def test_no_parent_cell(self, cluster):
        launcher = make_launcher(cluster)
        fl_ctx = make_ctx(launcher)
        fl_ctx.get_engine().cell = None
        with pytest.raises(RuntimeError, match="cell"):
            launcher.launch_job(job_meta(), fl_ctx)
        assert cluster.fljobs() == []


def aborts_sent(fl_ctx):
    return [m for m in fl_ctx.get_engine().cell.sent if m["channel"] == CellChannel.CLIENT_COMMAND]


class TestKubernetesAbort:
    def _wait_in_thread(self, handle):
        import threading

        t = threading.Thread(target=handle.wait, kwargs={"timeout": 10}, daemon=True)
        t.start()
        return t

    def test_status_abort_relays_nvflare_abort_once(self, cluster):
        _, fl_ctx, meta, handle = launch(cluster)
        t = self._wait_in_thread(handle)
        cluster.set_status(handle.name, {"phase": "Running"})
        cluster.set_status(handle.name, {"phase": "Aborting", "abort": {"requestedAt": "2024-01-01T00:00:00Z"}})
        cluster.set_status(handle.name, {"reason": "still aborting"})
        deadline = time.monotonic() + 5
        while not aborts_sent(fl_ctx) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        assert aborts_sent(fl_ctx) == [
            {"topic": AdminCommandNames.ABORT, "targets": f"site-1.{meta['job_id']}", "channel": "client_command"}
        ]
        # the worker stopped cleanly (0): reported as ABORTED so the server ends the run
        cluster.set_status(handle.name, {"phase": "Aborted", "exitCode": 0})
        t.join(5)
        assert handle.poll() == JobReturnCode.ABORTED

    def test_deleted_fljob_relays_nvflare_abort_and_stays_aborted(self, cluster):
        # `kubectl delete flj`: the operator's finalizer keeps the FLJob (deletionTimestamp set) while it aborts the
        # job; the handle keeps watching it, sends ABORT once, and the code stays ABORTED when the FLJob goes
        _, fl_ctx, meta, handle = launch(cluster)
        t = self._wait_in_thread(handle)
        cluster.set_status(handle.name, {"phase": "Running"})
        cluster.patch("FLJob", NS, handle.name, {"metadata": {"deletionTimestamp": "2024-01-01T00:00:00Z",
                                                              "finalizers": ["fljob.dev/cleanup"]}}, notify=False)
        cluster.set_status(handle.name, {"phase": "Aborting",
                                         "abort": {"requestedAt": "2024-01-01T00:00:00Z", "cause": "Deleted"}})
        deadline = time.monotonic() + 5
        while not aborts_sent(fl_ctx) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert aborts_sent(fl_ctx) == [
            {"topic": AdminCommandNames.ABORT, "targets": f"site-1.{meta['job_id']}", "channel": "client_command"}
        ]
        cluster.set_status(handle.name, {"phase": "Aborted", "exitCode": 0,
                                         "abort": {"cause": "Deleted", "method": "Graceful"}})
        cluster.delete("FLJob", NS, handle.name)
        t.join(5)
        assert not t.is_alive()
        assert handle.poll() == JobReturnCode.ABORTED
        assert len(aborts_sent(fl_ctx)) == 1

    def test_no_relay_when_nvflare_asked(self, cluster, sim_operator):
        # JobExecutor.abort_app sent ABORT itself, then called terminate(): no second ABORT, the code is kept
        sim_operator.exit_code = 0
        _, fl_ctx, _, handle = launch(cluster)
        t = self._wait_in_thread(handle)
        handle.terminate()
        t.join(5)
        assert aborts_sent(fl_ctx) == []
        assert handle.poll() == 0

    def test_finished_with_abort_recorded_is_aborted(self, cluster):
        _, fl_ctx, _, handle = launch(cluster)
        cluster.set_status(
            handle.name, {"phase": "Aborted", "exitCode": 0, "abort": {"requestedAt": "2024-01-01T00:00:00Z"}}
        )
        handle.wait(timeout=5)
        assert handle.poll() == JobReturnCode.ABORTED
        assert aborts_sent(fl_ctx) == []  # already over: nothing to relay

    def test_failure_code_kept(self, cluster):
        _, _, _, handle = launch(cluster)
        cluster.set_status(
            handle.name, {"phase": "Failed", "exitCode": 103, "abort": {"requestedAt": "2024-01-01T00:00:00Z"}}
        )
        handle.wait(timeout=5)
        assert handle.poll() == 103
