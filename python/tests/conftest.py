import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from fake_k8s import FakeCluster  # noqa: E402


@pytest.fixture
def cluster():
    c = FakeCluster()
    yield c
    # every plain Kubernetes API call the launcher and the handle make carries a _request_timeout
    assert c.untimed_calls == []


class SimOperator:
    """Reacts to spec.abort the way fljob-operator does (AbortRequested, then Aborted), on the fake cluster."""

    def __init__(self, cluster, record_after=0.2, finish_after=0.5, exit_code=9, record=True):
        self.cluster = cluster
        self.record_after = record_after
        self.finish_after = finish_after
        self.exit_code = exit_code
        self.record = record
        cluster.patch_hooks.append(self._on_patch)

    def _on_patch(self, name, patch):
        if not ((patch.get("spec") or {}).get("abort")) or not self.record:
            return
        self.cluster.later(
            self.record_after,
            self.cluster.set_status,
            name,
            {"phase": "Aborting", "abort": {"requestedAt": "2024-01-01T00:00:00Z"}},
        )
        if self.finish_after is not None:
            self.cluster.later(
                self.finish_after,
                self.cluster.set_status,
                name,
                {
                    "phase": "Aborted",
                    "clientStatus": "stopped",
                    "exitCode": self.exit_code,
                    "reason": "Aborted",
                    "abort": {"method": "Graceful", "completedAt": "2024-01-01T00:00:01Z"},
                },
            )


@pytest.fixture
def sim_operator(cluster):
    return SimOperator(cluster)
