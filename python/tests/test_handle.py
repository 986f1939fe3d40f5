import threading
import time

import pytest
from kubernetes.client.rest import ApiException
from nvflare.apis.job_launcher_spec import JobHandleSpec, JobReturnCode
from nvflare.fuel.common.exit_codes import ProcessExitCode
from nvflare.private.fed.utils.fed_utils import get_return_code

from urllib3.exceptions import MaxRetryError, ReadTimeoutError

from conftest import SimOperator
from fljob_launcher import FLJobHandle

NS = "fl-site-a"
NAME = "nvf-job-1-abc123"


@pytest.fixture
def fljob(cluster):
    return cluster.custom.create_namespaced_custom_object(
        "fljob.dev",
        "v1alpha1",
        NS,
        "fljobs",
        {"apiVersion": "fljob.dev/v1alpha1", "kind": "FLJob", "metadata": {"name": NAME}, "spec": {"jobId": "job-1"}},
        _request_timeout=5,
    )


def make_handle(cluster, **kwargs):
    return FLJobHandle(cluster.custom, NAME, NS, job_id="job-1", **kwargs)


def run_in_thread(fn):
    result = {}

    def target():
        result["started"] = time.monotonic()
        result["value"] = fn()
        result["ended"] = time.monotonic()

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, result


def test_is_job_handle_spec(cluster):
    assert isinstance(make_handle(cluster), JobHandleSpec)


class TestPoll:
    @pytest.mark.parametrize("phase", ["Pending", "Queued", "Starting", "Running", "Aborting"])
    def test_none_while_not_finished(self, cluster, fljob, phase):
        cluster.set_status(NAME, {"phase": phase, "exitCode": None})
        assert make_handle(cluster).poll() is None

    def test_no_status_yet(self, cluster, fljob):
        assert make_handle(cluster).poll() is None

    @pytest.mark.parametrize(
        "status,code",
        [
            ({"phase": "Succeeded", "exitCode": 0}, JobReturnCode.SUCCESS),
            ({"phase": "Failed", "exitCode": 102, "reason": "UnsafeComponent"}, ProcessExitCode.UNSAFE_COMPONENT),
            ({"phase": "Failed", "exitCode": 103, "reason": "ConfigError"}, ProcessExitCode.CONFIG_ERROR),
            ({"phase": "Failed", "exitCode": 104, "reason": "ImagePullFailed"}, ProcessExitCode.INFRASTRUCTURE_ERROR),
            ({"phase": "Aborted", "exitCode": 9, "reason": "Aborted"}, JobReturnCode.ABORTED),
            ({"phase": "Failed", "exitCode": 137, "reason": "OOMKilled"}, JobReturnCode.EXECUTION_ERROR),
        ],
    )
    def test_code_once_finished(self, cluster, fljob, status, code):
        handle = make_handle(cluster)
        cluster.set_status(NAME, status)
        assert handle.poll() == code
        # the result is kept: later changes or deletion don't change what NVFlare was told
        cluster.delete("FLJob", NS, NAME)
        assert handle.poll() == code

    def test_deleted_fljob_is_aborted(self, cluster):
        assert make_handle(cluster).poll() == JobReturnCode.ABORTED

    def test_api_error_is_not_a_result(self, cluster, fljob):
        handle = make_handle(cluster)
        cluster.custom.get_namespaced_custom_object = lambda *a, **k: (_ for _ in ()).throw(
            ApiException(status=500, reason="boom")
        )
        assert handle.poll() is None


class TestWait:
    def test_wait_uses_a_watch(self, cluster, fljob):
        handle = make_handle(cluster, watch_timeout_seconds=30)
        cluster.set_status(NAME, {"phase": "Running"})
        cluster.later(0.3, cluster.set_status, NAME, {"phase": "Running", "clientStatus": "started"})
        cluster.later(0.6, cluster.set_status, NAME, {"phase": "Failed", "exitCode": 103})
        t0 = time.monotonic()
        handle.wait(timeout=10)
        assert time.monotonic() - t0 < 5
        assert handle.poll() == ProcessExitCode.CONFIG_ERROR
        # one list and one watch: no polling of the object
        assert cluster.count("list") == 1
        assert cluster.count("watch") == 1
        assert cluster.count("get") == 0

    def test_credentials_secret_deleted_once_finished(self, cluster, fljob):
        cluster.core.create_namespaced_secret(
            NS, {"metadata": {"name": "creds"}, "stringData": {"token": "t"}}, _request_timeout=5
        )
        handle = make_handle(cluster, core_api=cluster.core, credentials_secret="creds")
        assert handle.poll() is None
        assert cluster.secret(NS, "creds") is not None
        cluster.later(0.2, cluster.set_status, NAME, {"phase": "Failed", "exitCode": 101})
        handle.wait(timeout=5)
        assert cluster.secret(NS, "creds") is None
        assert handle.poll() == 101  # and a second release is a no-op
        assert cluster.count("delete", "Secret") == 1

    def test_wait_returns_at_once_when_finished(self, cluster, fljob):
        cluster.set_status(NAME, {"phase": "Succeeded", "exitCode": 0})
        handle = make_handle(cluster)
        handle.wait(timeout=5)
        assert handle.poll() == 0
        assert cluster.count("watch") == 0

    def test_watch_is_reestablished_after_server_timeout(self, cluster, fljob):
        handle = make_handle(cluster, watch_timeout_seconds=1)
        cluster.later(2.5, cluster.set_status, NAME, {"phase": "Succeeded", "exitCode": 0})
        handle.wait(timeout=10)
        assert handle.poll() == 0
        assert cluster.count("watch") >= 3

    def test_watch_recovers_from_410_gone(self, cluster, fljob):
        handle = make_handle(cluster, watch_timeout_seconds=30)
        cluster.compacted_rv = 10**9  # every watch from a listed resourceVersion is "too old" ...

        def uncompact_and_finish():
            cluster.compacted_rv = 0  # ... until the server catches up
            cluster.set_status(NAME, {"phase": "Failed", "exitCode": 102})

        cluster.later(0.5, uncompact_and_finish)
        handle.wait(timeout=10)
        assert handle.poll() == ProcessExitCode.UNSAFE_COMPONENT
        assert cluster.count("watch") >= 2

    def test_watch_recovers_from_errors(self, cluster, fljob):
        handle = make_handle(cluster, watch_timeout_seconds=30)
        cluster.fail_next["watch"] = ApiException(status=500, reason="internal")
        cluster.later(0.8, cluster.set_status, NAME, {"phase": "Succeeded", "exitCode": 0})
        handle.wait(timeout=10)
        assert handle.poll() == 0

    def test_deleted_while_waiting(self, cluster, fljob):
        handle = make_handle(cluster)
        cluster.later(0.3, cluster.delete, "FLJob", NS, NAME)
        handle.wait(timeout=5)
        assert handle.poll() == JobReturnCode.ABORTED

    def test_wait_timeout(self, cluster, fljob):
        handle = make_handle(cluster)
        t0 = time.monotonic()
        handle.wait(timeout=1)
        assert 0.9 < time.monotonic() - t0 < 4
        assert handle.poll() is None

    def test_nvflare_get_return_code_after_wait(self, cluster, fljob, tmp_path):
        """JobExecutor's waiter does exactly this: wait(), then fed_utils.get_return_code(handle, ...)."""
        import logging

        handle = make_handle(cluster)
        cluster.later(0.2, cluster.set_status, NAME, {"phase": "Failed", "exitCode": 104})
        handle.wait()
        assert get_return_code(handle, "job-1", str(tmp_path), logging.getLogger()) == 104


class TestTerminate:
    def test_patches_abort_and_returns_once_recorded(self, cluster, fljob):
        SimOperator(cluster, record_after=0.4, finish_after=1.5)
        cluster.set_status(NAME, {"phase": "Running"})
        handle = make_handle(cluster)
        t0 = time.monotonic()
        handle.terminate()
        elapsed = time.monotonic() - t0
        assert 0.3 < elapsed < 1.4, elapsed  # after requestedAt, before the job finished
        obj = cluster.get("FLJob", NS, NAME)
        assert obj["spec"]["abort"] is True
        assert obj["status"]["abort"]["requestedAt"]
        assert handle.poll() is None  # still aborting
        handle.wait(timeout=5)
        assert handle.poll() == JobReturnCode.ABORTED

    def test_abort_with_workers_own_code(self, cluster, fljob):
        SimOperator(cluster, exit_code=0)
        handle = make_handle(cluster)
        handle.terminate()
        handle.wait(timeout=5)
        assert handle.poll() == 0

    def test_terminate_gives_up_after_timeout(self, cluster, fljob):
        handle = make_handle(cluster, terminate_timeout=1.0)  # no operator: nobody records the abort
        t0 = time.monotonic()
        handle.terminate()
        assert 0.9 < time.monotonic() - t0 < 4
        assert cluster.get("FLJob", NS, NAME)["spec"]["abort"] is True

    def test_terminate_after_finish_is_a_noop(self, cluster, fljob):
        cluster.set_status(NAME, {"phase": "Succeeded", "exitCode": 0})
        handle = make_handle(cluster)
        assert handle.poll() == 0
        handle.terminate()
        assert "abort" not in cluster.get("FLJob", NS, NAME)["spec"]

    def test_terminate_of_finished_job_not_yet_seen(self, cluster, fljob):
        cluster.set_status(NAME, {"phase": "Failed", "exitCode": 101})
        handle = make_handle(cluster, terminate_timeout=5)
        t0 = time.monotonic()
        handle.terminate()
        assert time.monotonic() - t0 < 1
        assert handle.poll() == 101

    def test_terminate_of_missing_fljob(self, cluster):
        handle = make_handle(cluster)
        handle.terminate()
        assert handle.poll() == JobReturnCode.ABORTED

    def test_concurrent_wait_and_terminate(self, cluster, fljob):
        """JobExecutor's waiter thread is in wait() while abort_app calls terminate() from another thread."""
        SimOperator(cluster, record_after=0.2, finish_after=0.6)
        handle = make_handle(cluster)
        t, result = run_in_thread(lambda: handle.wait(timeout=10))
        time.sleep(0.2)
        handle.terminate()
        t.join(10)
        assert not t.is_alive()
        assert handle.poll() == JobReturnCode.ABORTED

    def test_heartbeat_cleanup_entry(self, cluster, fljob):
        SimOperator(cluster)
        handle = make_handle(cluster)
        handle._terminate_for_heartbeat_cleanup()
        assert cluster.get("FLJob", NS, NAME)["spec"]["abort"] is True


def read_timeout():
    """What the kubernetes client raises when a call outlives its _request_timeout."""
    return ReadTimeoutError(None, "/apis/fljob.dev/v1alpha1", "Read timed out. (read timeout=30)")


def unreachable():
    """What it raises when the API server does not answer at all."""
    return MaxRetryError(None, "/apis/fljob.dev/v1alpha1", "Connection refused")


class TestTerminateDoesNotWaitTwice:
    def test_abort_comes_with_grace_period_zero(self, cluster, fljob):
        """JobExecutor calls terminate() after its own ABORT + max_wait (or at once while STARTING): the FLJob's
        grace period must not be waited on top of that."""
        SimOperator(cluster)
        handle = make_handle(cluster)
        handle.terminate()
        spec = cluster.get("FLJob", NS, NAME)["spec"]
        assert (spec["abort"], spec["abortGracePeriodSeconds"]) == (True, 0)

    def test_configured_terminate_grace(self, cluster, fljob):
        SimOperator(cluster)
        handle = make_handle(cluster, terminate_grace_period_seconds=3)
        handle.terminate()
        assert cluster.get("FLJob", NS, NAME)["spec"]["abortGracePeriodSeconds"] == 3

    def test_none_leaves_the_grace_period(self, cluster, fljob):
        SimOperator(cluster)
        handle = make_handle(cluster, terminate_grace_period_seconds=None)
        handle.terminate()
        spec = cluster.get("FLJob", NS, NAME)["spec"]
        assert spec["abort"] is True and "abortGracePeriodSeconds" not in spec


class TestTerminateFailures:
    """terminate() when the API fails. The real cluster stages a refused patch (403, tests/test_integration.py);
    a request that times out and an API server that does not answer at all cannot be staged there without stopping
    the shared API server, so they are faked here."""

    def test_timed_out_patch_is_retried(self, cluster, fljob):
        SimOperator(cluster)
        cluster.fail_next["patch-FLJob"] = read_timeout()
        handle = make_handle(cluster, terminate_timeout=10)
        t0 = time.monotonic()
        handle.terminate()
        assert time.monotonic() - t0 < 3  # one retry after 0.5 s, then the operator records it
        assert cluster.count("failed", "patch-FLJob") == 1
        assert cluster.get("FLJob", NS, NAME)["spec"]["abort"] is True
        handle.wait(timeout=5)
        assert handle.poll() == JobReturnCode.ABORTED

    def test_refused_patch_deletes_the_fljob(self, cluster, fljob):
        cluster.failing["patch-FLJob"] = ApiException(status=403, reason="Forbidden")
        handle = make_handle(cluster, terminate_timeout=2)
        t0 = time.monotonic()
        assert handle.terminate() is None  # does not raise
        assert time.monotonic() - t0 < 2 + 1
        assert cluster.count("failed", "patch-FLJob") >= 3  # retried with backoff within terminate_timeout
        assert cluster.fljobs() == []  # deleted instead: the operator aborts a deleted FLJob
        handle.wait(timeout=5)
        assert handle.poll() == JobReturnCode.ABORTED

    def test_unreachable_api_never_raises_and_wait_delivers_the_abort(self, cluster, fljob):
        """Patch and delete both fail for longer than terminate_timeout: terminate() returns, the abort stays
        pending, and wait() (JobExecutor's waiter thread) delivers it once the API answers again."""
        cluster.set_status(NAME, {"phase": "Running"})
        cluster.failing["patch-FLJob"] = unreachable()
        cluster.failing["delete-FLJob"] = unreachable()
        handle = make_handle(cluster, terminate_timeout=1.5)
        t0 = time.monotonic()
        assert handle.terminate() is None
        assert time.monotonic() - t0 < 1.5 + 1
        assert "abort" not in cluster.get("FLJob", NS, NAME)["spec"]
        SimOperator(cluster)
        t, result = run_in_thread(lambda: handle.wait(timeout=30))
        time.sleep(1.0)
        assert t.is_alive()  # still waiting: the job has not ended
        cluster.failing.clear()  # the API server is back
        t.join(15)
        assert not t.is_alive(), "wait() did not deliver the pending abort"
        spec = cluster.get("FLJob", NS, NAME)["spec"]
        assert (spec["abort"], spec["abortGracePeriodSeconds"]) == (True, 0)
        assert handle.poll() == JobReturnCode.ABORTED

    def test_unexpected_error_does_not_escape(self, cluster, fljob):
        cluster.failing["patch-FLJob"] = RuntimeError("boom")
        cluster.failing["delete-FLJob"] = RuntimeError("boom")
        handle = make_handle(cluster, terminate_timeout=0.5)
        assert handle.terminate() is None
