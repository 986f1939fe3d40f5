"""fljob_launcher.worker: downward-API parsing and the SIGTERM / annotation abort relay (without a real job)."""

import os
import signal
import subprocess
import sys
import threading
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


# ----- ABORT_TASK on a real nvflare 2.9.0 ClientRunner ------------------------------------------------------------
#
# The runner, its TaskRouter, _do_task, NVFlare's CommandAgent and AbortTaskCommand are NVFlare's own; the stand-ins
# are the engine (the worker's ClientEngine needs a connected client) and the job cell (a real cell needs CellNet).

from nvflare.apis.executor import Executor  # noqa: E402
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode  # noqa: E402
from nvflare.apis.fl_context import FLContext, FLContextManager  # noqa: E402
from nvflare.apis.shareable import Shareable, make_reply  # noqa: E402
from nvflare.fuel.f3.cellnet.core_cell import CoreCell  # noqa: E402
from nvflare.fuel.f3.cellnet.defs import MessageHeaderKey  # noqa: E402
from nvflare.fuel.f3.cellnet.defs import ReturnCode as CellReturnCode  # noqa: E402
from nvflare.fuel.f3.cellnet.registry import Registry  # noqa: E402
from nvflare.private.defs import CellChannel, new_cell_message  # noqa: E402
from nvflare.private.fed.client.client_engine_executor_spec import TaskAssignment  # noqa: E402
from nvflare.private.fed.client.client_runner import ClientRunner, ClientRunnerConfig, TaskRouter  # noqa: E402
from nvflare.private.fed.client.command_agent import CommandAgent  # noqa: E402

from fljob_launcher.worker import JobCommands, TaskAborts  # noqa: E402

JOB = "job-7"


class WaitsForAbort(Executor):
    """A trainer that works until its abort signal triggers (at most `limit` s)."""

    def __init__(self, limit=30.0):
        super().__init__()
        self.limit = limit
        self.started = threading.Event()

    def execute(self, task_name, shareable, fl_ctx, abort_signal):
        self.started.set()
        deadline = time.monotonic() + self.limit
        while time.monotonic() < deadline:
            if abort_signal.triggered:
                return make_reply(ReturnCode.TASK_ABORTED)
            time.sleep(0.01)
        return make_reply(ReturnCode.OK)


class Engine:
    def __init__(self):
        self.mgr = FLContextManager(engine=self, identity_name="site-1", job_id=JOB, public_stickers={},
                                    private_stickers={})

    def new_context(self):
        return self.mgr.new_context()

    def register_aux_message_handler(self, topic, message_handle_func):
        pass

    def fire_event(self, event_type, fl_ctx):
        pass


class Job:
    """A ClientRunner (class wrapped by TaskAborts, as the worker does) with a CommandAgent on a job cell."""

    def __init__(self, runner_class, limit=30.0):
        self.executor = WaitsForAbort(limit)
        router = TaskRouter()
        router.add_executor(["train"], self.executor)
        self.engine = Engine()
        self.runner = runner_class({}, ClientRunnerConfig(router, {}, {}), JOB, self.engine)
        with self.engine.new_context() as ctx:  # as ClientRunner.init_run makes itself known to every context
            ctx.set_prop(FLContextKey.RUNNER, self.runner, private=True, sticky=True)
        self.agent = CommandAgent(federated_client=None)
        self.agent.engine = self.engine
        self.replies = {}

    def start_task(self, task_id):
        def run():
            ctx = self.engine.new_context()
            peer = FLContext()
            peer.set_prop(ReservedKey.RUN_NUM, JOB, private=False)
            ctx.set_peer_context(peer)
            self.replies[task_id] = self.runner._process_task(TaskAssignment("train", task_id, Shareable()), ctx)

        self.executor.started.clear()
        t = threading.Thread(target=run, daemon=True)
        t.start()
        assert self.executor.started.wait(5)
        return t

    def command(self, topic):
        """The job cell's CLIENT_COMMAND callback gets `topic`, as JobExecutor.abort_task sends it."""
        msg = new_cell_message({MessageHeaderKey.TOPIC: topic},
                               {"command": topic, "data": {}})
        return self.agent.execute_command(msg)


@pytest.fixture
def wrapped():
    class Runner(ClientRunner):  # a subclass: the wrapping stays in this test
        pass

    aborts = TaskAborts()
    assert aborts.install(Runner)
    return Runner, aborts


def no_return_code(reply):
    """NVFlare's AbortTaskCommand returns nothing: the job cell's reply has no payload and no return code, which
    CellNet sends as OK (core_cell adds RETURN_CODE OK to a reply without one)."""
    return reply.payload is None and reply.get_header(MessageHeaderKey.RETURN_CODE) is None


def test_nvflare_2_9_0_has_no_client_runner_abort_task():
    """The defect TaskAborts works around: NVFlare's ABORT_TASK handler calls a method ClientRunner lacks."""
    assert not hasattr(ClientRunner, "abort_task")
    job = Job(ClientRunner, limit=1.0)
    t = job.start_task("t1")
    with pytest.raises(AttributeError, match="abort_task"):
        job.command(AdminCommandNames.ABORT_TASK)
    t.join(5)
    assert job.replies["t1"].get_return_code() == ReturnCode.OK  # the task was not aborted


def test_abort_task_aborts_the_running_task_and_the_job_goes_on(wrapped, capfd):
    runner_class, aborts = wrapped
    job = Job(runner_class)
    t = job.start_task("t1")
    assert aborts.running() == [("train", "t1")]
    started = time.monotonic()
    reply = job.command(AdminCommandNames.ABORT_TASK)
    t.join(5)
    took = time.monotonic() - started
    assert no_return_code(reply)
    assert job.replies["t1"].get_return_code() == ReturnCode.TASK_ABORTED
    assert took < 1.0, took
    assert "ABORT_TASK: aborted task train (id t1)" in capfd.readouterr().err
    assert not job.runner.run_abort_signal.triggered  # the job was not aborted
    assert aborts.running() == []
    # the next task has a signal of its own: it runs to its end
    job.executor.limit = 0.2
    job.start_task("t2").join(5)
    assert job.replies["t2"].get_return_code() == ReturnCode.OK


def test_abort_task_with_no_running_task(wrapped, capfd):
    runner_class, aborts = wrapped
    job = Job(runner_class, limit=0.1)
    job.start_task("t1").join(5)  # ended: its signal is forgotten
    assert aborts.running() == []
    reply = job.command(AdminCommandNames.ABORT_TASK)
    assert no_return_code(reply)
    assert "ABORT_TASK: no task is running, nothing to abort" in capfd.readouterr().err
    assert job.runner.abort_task() == "no task is running: nothing to abort"
    assert not job.runner.run_abort_signal.triggered


def test_abort_task_touches_only_its_own_runner(wrapped):
    runner_class, aborts = wrapped
    a, b = Job(runner_class), Job(runner_class)
    ta, tb = a.start_task("ta"), b.start_task("tb")
    assert a.runner.abort_task() == "aborted task train (ta)"
    ta.join(5)
    assert a.replies["ta"].get_return_code() == ReturnCode.TASK_ABORTED
    assert aborts.running() == [("train", "tb")]
    b.runner.abort_task()
    tb.join(5)
    assert b.replies["tb"].get_return_code() == ReturnCode.TASK_ABORTED


def test_nvflares_own_abort_task_is_kept():
    def own(self):
        return "nvflare's"

    class Runner(ClientRunner):
        abort_task = own

    do_task = Runner._do_task
    assert not TaskAborts().install(Runner)
    assert Runner.abort_task is own and Runner._do_task is do_task


def test_install_once(wrapped):
    runner_class, _ = wrapped
    do_task = runner_class._do_task
    assert not TaskAborts().install(runner_class)  # it has abort_task now
    assert runner_class._do_task is do_task


class FakeCell:
    """Stands in for the job cell (a real one needs CellNet): NVFlare's own registry, with the CommandAgent's
    CLIENT_COMMAND callback registered the way CommandAgent.register_cell_cb does it (topic "*")."""

    def __init__(self, agent):
        self.running = True
        self.req_reg = Registry()
        self.req_reg.set(CellChannel.CLIENT_COMMAND, "*", Callback(agent.execute_command, (), {}))


from nvflare.fuel.f3.cellnet.registry import Callback  # noqa: E402


def test_the_relay_aborts_the_task_through_the_job_cell_and_does_not_count_it_as_an_abort(wrapped, tmp_path):
    """The annotation relay's ABORT_TASK goes through the job cell's command callback (the one a parent-sent
    ABORT_TASK reaches) and aborts the task; it is not NVFlare's ABORT, so the termination message stays empty."""
    runner_class, aborts = wrapped
    job = Job(runner_class)
    fqcn = f"site-1.{JOB}"
    CoreCell.ALL_CELLS[fqcn] = FakeCell(job.agent)
    try:
        path = tmp_path / "annotations"
        write(path, {"fljob.dev/abort-task": "1"})
        relay = AbortRelay(JobCommands("site-1", JOB), str(path), interval=0.05)
        relay.start()
        t = job.start_task("t1")
        time.sleep(0.3)
        assert aborts.running() == [("train", "t1")]  # the baseline value aborts nothing
        write(path, {"fljob.dev/abort-task": "2"})
        t.join(5)
        assert job.replies["t1"].get_return_code() == ReturnCode.TASK_ABORTED
        assert not relay.aborted
        out = tmp_path / "termination-log"
        relay.write_outcome(str(out))
        assert not out.exists()
        assert not job.runner.run_abort_signal.triggered
    finally:
        CoreCell.ALL_CELLS.pop(fqcn, None)
