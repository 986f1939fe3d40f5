"""fljob_launcher.worker: downward-API parsing and the SIGTERM / annotation abort relay (without a real job)."""

import os
import signal
import subprocess
import sys
import time

import pytest
from nvflare.apis.fl_constant import AdminCommandNames

from fljob_launcher import worker
from fljob_launcher.worker import AbortRelay, go_unquote, parse_downward_api


@pytest.mark.parametrize(
    "quoted, value",
    [
        ('"true"', "true"),
        ('""', ""),
        ('"a\\"b\\\\c"', 'a"b\\c'),
        ('"line1\\nline2\\ttab"', "line1\nline2\ttab"),
        ('"caf\\u00e9 \\U0001F600"', "café \U0001F600"),
        ('"\\xc3\\xa9"', "é"),
        ('"héllo"', "héllo"),
    ],
)
def test_go_unquote(quoted, value):
    assert go_unquote(quoted) == value


def test_parse_downward_api():
    text = (
        'fljob.dev/abort="true"\n'
        'fljob.dev/abort-task="2024-01-01T00:00:00Z#3"\n'
        'kubectl.kubernetes.io/last-applied-configuration="{\\"a\\":1}\\n"\n'
        "garbage line\n"
        'bad="unterminated\n'
    )
    assert parse_downward_api(text) == {
        "fljob.dev/abort": "true",
        "fljob.dev/abort-task": "2024-01-01T00:00:00Z#3",
        "kubectl.kubernetes.io/last-applied-configuration": '{"a":1}\n',
    }


class FakeCommands:
    """The job cell's command handlers: run() is a command arriving (from this relay or from the parent)."""

    def __init__(self, ready=True):
        self.ready_flag = ready
        self.sent = []
        self.hooks = {}

    def hook(self, topic, seen):
        if not self.ready_flag:
            return False
        self.hooks[topic] = seen
        return True

    def run(self, topic, payload):
        if not self.ready_flag:
            return False
        if topic in self.hooks:
            self.hooks[topic]()
        self.sent.append(topic)
        return True


def write(path, ann):
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as f:
        for k, v in ann.items():
            f.write(f'{k}="{v}"\n')
    os.replace(tmp, path)


def wait_for(pred, timeout=3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_annotation_abort(tmp_path):
    path = tmp_path / "annotations"
    write(path, {"fljob.dev/job-id": "j"})
    cmds = FakeCommands()
    AbortRelay(cmds, str(path), interval=0.05).start()
    time.sleep(0.2)
    assert cmds.sent == []
    write(path, {"fljob.dev/abort": "App"})
    assert wait_for(lambda: cmds.sent == [AdminCommandNames.ABORT])
    time.sleep(0.2)
    assert cmds.sent == [AdminCommandNames.ABORT]  # once


def test_abort_task_on_each_change_not_at_start(tmp_path):
    path = tmp_path / "annotations"
    write(path, {"fljob.dev/abort-task": "1"})  # the value present at start is the baseline
    cmds = FakeCommands()
    AbortRelay(cmds, str(path), interval=0.05).start()
    time.sleep(0.2)
    assert cmds.sent == []
    write(path, {"fljob.dev/abort-task": "2"})
    assert wait_for(lambda: cmds.sent == [AdminCommandNames.ABORT_TASK])
    write(path, {"fljob.dev/abort-task": "3"})
    assert wait_for(lambda: cmds.sent == [AdminCommandNames.ABORT_TASK] * 2)


def test_abort_waits_for_the_job_cell(tmp_path):
    cmds = FakeCommands(ready=False)
    relay = AbortRelay(cmds, str(tmp_path / "missing"), interval=0.05)
    relay.start()
    relay.on_signal(signal.SIGTERM, None)
    time.sleep(0.2)
    assert cmds.sent == []
    cmds.ready_flag = True  # the command agent registered
    assert wait_for(lambda: cmds.sent == [AdminCommandNames.ABORT])


def test_abort_annotation_at_start(tmp_path):
    path = tmp_path / "annotations"
    write(path, {"fljob.dev/abort": "App"})
    cmds = FakeCommands()
    AbortRelay(cmds, str(path), interval=0.05).start()
    assert wait_for(lambda: cmds.sent == [AdminCommandNames.ABORT])


def test_second_signal_exits_at_once():
    # a real process: the wrapper in front of a "worker" that never ends; SIGTERM twice -> exit 128+15
    code = (
        "import sys, time, fljob_launcher.worker as w\n"
        "w.WORKER_MODULE = 'sleepy_worker'\n"
        "w.main(['-n', 'job1', '-c', 'site-1'])\n"
    )
    env = dict(os.environ, FLJOB_INFO_DIR="/nonexistent", PYTHONPATH=os.path.dirname(__file__))
    p = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"ready"  # the wrapper's handlers are installed before the worker runs
    p.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert p.poll() is None  # the first SIGTERM only requests the abort
    p.send_signal(signal.SIGTERM)
    assert p.wait(5) == 128 + signal.SIGTERM


def test_module_constants():
    assert worker.WORKER_MODULE == "nvflare.private.fed.app.client.worker_process"
    assert worker.DEFAULT_INFO_DIR == "/etc/fljob"


def test_an_abort_from_the_parent_is_told_to_the_operator(tmp_path):
    """NVFlare's ABORT arriving over CellNet (not through this relay) is noted, and the termination message says so:
    the worker's clean exit 0 is then reported Aborted, not Succeeded."""
    cmds = FakeCommands()
    relay = AbortRelay(cmds, str(tmp_path / "annotations"), interval=0.05)
    relay.start()
    assert wait_for(lambda: AdminCommandNames.ABORT in cmds.hooks)
    out = tmp_path / "termination-log"
    relay.write_outcome(str(out))
    assert not out.exists(), "no abort, no message"
    cmds.run(AdminCommandNames.ABORT, {})  # as the parent's JobExecutor.abort_app sends it
    assert relay.aborted
    relay.write_outcome(str(out))
    assert out.read_text().splitlines()[0] == "fljob.dev/outcome=Aborted"
