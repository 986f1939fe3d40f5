"""Worker pod entry point: NVFlare's client worker_process, in-process, with graceful SIGTERM and pod-annotation aborts.

    python -u -m fljob_launcher.worker <the exact arguments of nvflare.private.fed.app.client.worker_process>

It runs ``nvflare.private.fed.app.client.worker_process`` as ``__main__`` in this process (so the exit code, the
workspace transfer and everything else are NVFlare's own, unmodified) and adds what a pod needs:

* **SIGTERM** (pod deletion, node drain, the operator's abort after the grace period starts): instead of dying
  (143, no results) or, as PID 1, ignoring the signal until SIGKILL, the job is aborted the way NVFlare's ABORT
  command does it -- the job cell's own CLIENT_COMMAND/ABORT handler runs ``ClientRunner.abort()``. The worker then
  ends cleanly: it uploads its results to the parent and the server records the job aborted. A second SIGTERM/SIGINT
  exits at once (128 + signal).
* **Downward-API annotations** ``$FLJOB_INFO_DIR/annotations`` (default ``/etc/fljob/annotations``; lines
  ``key="value"``, Go-quoted values), re-read every ``FLJOB_WATCH_INTERVAL`` seconds (default 0.5):
  ``fljob.dev/abort`` (any value; the operator writes ``App``) -> ABORT (as above); a new value of
  ``fljob.dev/abort-task`` -> ABORT_TASK: the running task is aborted and the job keeps running. The value present
  at start is the baseline, not a request.
* **ABORT_TASK that works on nvflare 2.9.0** (``TaskAborts``): 2.9.0's handler calls ``ClientRunner.abort_task()``,
  which does not exist (AttributeError, whoever sends it: this relay or the parent's ``JobExecutor.abort_task``
  over CellNet), so the task ran on. In this process, and only while NVFlare lacks that method, ``_do_task`` is
  wrapped to know each running task's abort signal and ``ClientRunner.abort_task`` is supplied: it triggers them
  and logs ``ABORT_TASK: aborted task <name> (id <task id>)`` per task (or that no task was running). The executor
  sees its ``abort_signal`` (one that never looks at it runs to its end first), NVFlare replies TASK_ABORTED and
  the runner fetches the next task. What the job does with that reply is its workflow's choice: ScatterAndGather
  with ``ignore_result_error=True`` logs "Ignore the result", aggregates the round without it and goes on (measured,
  tests/test_e2e.py scenario j); by its code its default (dynamic) would end a 1-client job whose client failed.
  NVFlare's reply to the sender is its own (no payload; CellNet sends it as OK). The time from annotation to aborted task (the kubelet's downward-API
  refresh plus this relay's poll) is measured in README.md "Task scope".
  No user can send ABORT_TASK to a job through NVFlare 2.9.0 itself: the parent handles ``train.abort_task``
  (``AbortTaskProcessor`` -> ``ClientEngine.abort_task`` -> ``JobExecutor.abort_task``) but no server or admin
  command sends it; the annotation is the way in. The parent path works the same once something calls it (the
  e2e test drives ``ClientEngine.abort_task`` from a component in the client parent).

An abort that arrives before the job cell accepts commands (workspace download, configuration) is delivered as soon as
it does.

PID 1: NVFlare's worker watches its parent (``os.getppid()``) and aborts the job when that process is gone. As a
container's PID 1 its parent id is 0, which ``psutil.pid_exists`` reports as gone: the job only survives because the
watcher's first check usually runs before the runner exists. A pod has no parent process to watch (Kubernetes owns
its lifetime), so when the parent does not exist the worker is shown its own pid as the parent.
"""

from __future__ import annotations

import atexit
import functools
import os
import runpy
import signal
import sys
import threading
import time
from typing import Dict, List, Optional

WORKER_MODULE = "nvflare.private.fed.app.client.worker_process"
ENV_INFO_DIR = "FLJOB_INFO_DIR"
DEFAULT_INFO_DIR = "/etc/fljob"
ENV_WATCH_INTERVAL = "FLJOB_WATCH_INTERVAL"
ANNOTATION_ABORT = "fljob.dev/abort"
ANNOTATION_ABORT_TASK = "fljob.dev/abort-task"
ENV_TERMINATION_LOG = "FLJOB_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
# The first line of the termination message when the job was aborted through NVFlare's ABORT, from whoever sent it
# (the FL server, an admin's `abort_job`, the client's JobExecutor, or this entry point): the operator reads it, so
# a worker that stopped cleanly after an abort is reported Aborted, not Succeeded.
ABORTED_OUTCOME = "fljob.dev/outcome=Aborted"

_SIMPLE_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92, '"': 34, "'": 39}


def is_abort(annotations: Dict[str, str]) -> bool:
    """The operator's App-scope abort request: `fljob.dev/abort` set to any value (the operator writes "App")."""
    return bool(annotations.get(ANNOTATION_ABORT, "").strip())


def _log(msg: str) -> None:
    sys.stderr.write(f"[fljob-worker] {msg}\n")
    sys.stderr.flush()


def go_unquote(text: str) -> str:
    """The value of a Go double-quoted string literal (strconv.Quote output, as the downward API writes it)."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        raise ValueError(f"not a quoted string: {text!r}")
    body = text[1:-1]
    out = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out += c.encode("utf-8")
            i += 1
            continue
        if i + 1 >= len(body):
            raise ValueError("dangling backslash")
        e = body[i + 1]
        if e in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[e])
            i += 2
        elif e == "x":
            out.append(int(body[i + 2 : i + 4], 16))
            i += 4
        elif e in "uU":
            n = 4 if e == "u" else 8
            out += chr(int(body[i + 2 : i + 2 + n], 16)).encode("utf-8")
            i += 2 + n
        elif e in "01234567":
            out.append(int(body[i + 1 : i + 4], 8))
            i += 4
        else:
            raise ValueError(f"unknown escape \\{e}")
    return out.decode("utf-8", errors="replace")


def parse_downward_api(text: str) -> Dict[str, str]:
    """`key="value"` lines (the downward API's metadata.annotations / labels file) -> dict; bad lines skipped."""
    result = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep or not key:
            continue
        try:
            result[key] = go_unquote(value.strip())
        except (ValueError, IndexError):
            continue
    return result


def read_annotations(path: str) -> Optional[Dict[str, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            return parse_downward_api(f.read())
    except FileNotFoundError:
        return None
    except OSError:
        return None


def _arg_value(argv: List[str], *flags: str) -> Optional[str]:
    for i, a in enumerate(argv):
        for flag in flags:
            if a == flag and i + 1 < len(argv):
                return argv[i + 1]
            if a.startswith(flag + "="):
                return a[len(flag) + 1 :]
    return None


class JobCommands:
    """Runs NVFlare client commands (ABORT, ABORT_TASK) on this process's job cell, as if the parent sent them.

    The job cell (FQCN ``<client>.<job id>``) registers its CommandAgent for channel CLIENT_COMMAND; the parent's
    JobExecutor reaches it with ``fire_and_forget(topic=ABORT)``. Here the same registered callback is invoked with
    the same message, in this process.
    """

    def __init__(self, client_name: str, job_id: str):
        from nvflare.fuel.f3.cellnet.fqcn import FQCN

        self.fqcn = FQCN.join([client_name, job_id])

    def _callback(self, topic: str):
        from nvflare.fuel.f3.cellnet.core_cell import CoreCell
        from nvflare.private.defs import CellChannel

        cell = CoreCell.ALL_CELLS.get(self.fqcn)
        if cell is None or not getattr(cell, "running", False):
            return None
        return cell.req_reg.find(CellChannel.CLIENT_COMMAND, topic)

    def ready(self, topic: str) -> bool:
        return self._callback(topic) is not None

    def hook(self, topic: str, seen) -> bool:
        """Wraps the job cell's handler of `topic` so that `seen()` runs before it, whoever sends the command.
        True once hooked (the cell registers its handlers a moment after the worker starts)."""
        cb = self._callback(topic)
        if cb is None:
            return False
        if getattr(cb, "_fljob_hooked", False):
            return True
        original = cb.cb

        def wrapped(*args, **kwargs):
            # The CommandAgent registers one callback for every CLIENT_COMMAND topic ("*"): note only `topic`'s
            # messages, not the ABORT_TASK or CHECK_STATUS that reach the same callback.
            if _topic_of(args[0] if args else kwargs.get("request")) == topic:
                try:
                    seen()
                except Exception as e:  # noting the command must never stop it
                    _log(f"noting {topic}: {type(e).__name__}: {e}")
            return original(*args, **kwargs)

        try:
            cb.cb = wrapped
            cb._fljob_hooked = True
        except AttributeError:
            return True  # an immutable registry entry: nothing to hook, do not try again
        return True

    def run(self, topic: str, payload: dict) -> bool:
        """True once the job cell's command handler ran the command."""
        from nvflare.fuel.f3.cellnet.defs import MessageHeaderKey
        from nvflare.private.defs import CellChannel, new_cell_message

        cb = self._callback(topic)
        if cb is None:
            return False
        msg = new_cell_message(
            {
                MessageHeaderKey.CHANNEL: CellChannel.CLIENT_COMMAND,
                MessageHeaderKey.TOPIC: topic,
                MessageHeaderKey.ORIGIN: self.fqcn,
            },
            payload,
        )
        try:
            cb.cb(msg, *cb.args, **cb.kwargs)
        except Exception as e:
            # Delivered, but NVFlare's own handler failed (the same error a parent-sent command meets): do not retry.
            _log(f"NVFlare's {topic} handler failed: {type(e).__name__}: {e}")
        return True


def _topic_of(message) -> Optional[str]:
    from nvflare.fuel.f3.cellnet.defs import MessageHeaderKey

    try:
        return message.get_header(MessageHeaderKey.TOPIC)
    except AttributeError:
        return None


class TaskAborts:
    """ABORT_TASK for nvflare 2.9.0: the job cell's handler (``AbortTaskCommand``) calls ``ClientRunner.abort_task()``,
    which 2.9.0 does not have -- an AttributeError, whoever sends it (the parent's ``JobExecutor.abort_task`` over
    CellNet, or this entry point), and the task runs on. What aborting a task takes is a trigger of the task's own
    ``abort_signal``: ``ClientRunner._do_process_task`` makes it per task, passes it to ``_do_task`` (and so to
    ``executor.execute``) and keeps it nowhere else. So, in this process only and only while NVFlare lacks
    ``ClientRunner.abort_task``: ``_do_task`` is wrapped to record ``task id -> (name, abort_signal)`` for the task's
    lifetime, and ``ClientRunner.abort_task`` is supplied, triggering the signals of the runner's running tasks.
    Once the executor returns, NVFlare's ``_do_task`` sees the signal and replies TASK_ABORTED; the runner goes on to
    fetch the next task. NVFlare's own command handler then works unchanged, for every sender."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: Dict[str, tuple] = {}  # task id -> (runner, task name, abort signal)

    def install(self, runner_class=None) -> bool:
        """Wraps `runner_class` (NVFlare's ClientRunner); False (nothing done) when it has its own abort_task."""
        if runner_class is None:
            from nvflare.private.fed.client.client_runner import ClientRunner as runner_class
        if hasattr(runner_class, "abort_task"):
            return False
        do_task = runner_class._do_task
        tasks = self

        @functools.wraps(do_task)
        def _do_task(runner, task, fl_ctx, abort_signal):
            with tasks._lock:
                tasks._running[task.task_id] = (runner, task.name, abort_signal)
            try:
                return do_task(runner, task, fl_ctx, abort_signal)
            finally:
                with tasks._lock:
                    if tasks._running.get(task.task_id, (None, None, None))[2] is abort_signal:
                        del tasks._running[task.task_id]

        def abort_task(runner) -> str:
            return tasks.abort(runner)

        runner_class._do_task = _do_task
        runner_class.abort_task = abort_task
        return True

    def running(self, runner=None) -> List[tuple]:
        """(task name, task id) of the running tasks (of `runner`, or of every runner)."""
        with self._lock:
            return [(n, i) for i, (r, n, _) in self._running.items() if runner is None or r is runner]

    def abort(self, runner) -> str:
        """Triggers the abort signal of each of `runner`'s running tasks; says what it did."""
        with self._lock:
            hit = [(n, i, s) for i, (r, n, s) in self._running.items() if r is runner]
        for name, task_id, sig in hit:
            sig.trigger(True)
            _log(f"ABORT_TASK: aborted task {name} (id {task_id}) (t={time.time():.3f})")
        if not hit:
            _log("ABORT_TASK: no task is running, nothing to abort")
            return "no task is running: nothing to abort"
        return "aborted " + ", ".join(f"task {n} ({i})" for n, i, _ in hit)


class AbortRelay:
    """Turns SIGTERM and annotation changes into ABORT / ABORT_TASK on the job cell (from one daemon thread)."""

    def __init__(self, commands: JobCommands, annotations_path: Optional[str], interval: float = 0.5):
        self.commands = commands
        self.annotations_path = annotations_path
        self.interval = interval
        self._wake = threading.Event()
        self._abort_reason: Optional[str] = None
        self._abort_sent = False
        self._task_aborts = 0  # pending ABORT_TASK requests
        self._task_baseline: Optional[str] = None
        self._signals = 0
        self._lock = threading.Lock()
        self._hooked = False
        self.aborted = False  # NVFlare's ABORT reached the job (from the parent, the server or this relay)
        ann = read_annotations(annotations_path) if annotations_path else None
        if ann is not None:
            self._task_baseline = ann.get(ANNOTATION_ABORT_TASK)
            if is_abort(ann):
                self.request_abort(f"annotation {ANNOTATION_ABORT}={ann[ANNOTATION_ABORT]} at start")

    # ----- requests (any thread, signal handler included: no locks held long, no I/O but a flag) --------------

    def request_abort(self, reason: str) -> None:
        if self._abort_reason is None:
            self._abort_reason = reason
        self._wake.set()

    def on_signal(self, signum, _frame) -> None:
        self._signals += 1
        if self._signals > 1:
            os._exit(128 + signum)
        self.request_abort(f"signal {signal.Signals(signum).name}")

    # ----- the relay thread -----------------------------------------------------------------------------------

    def _poll_annotations(self) -> None:
        if not self.annotations_path:
            return
        ann = read_annotations(self.annotations_path)
        if ann is None:
            return
        if is_abort(ann):
            self.request_abort(f"annotation {ANNOTATION_ABORT}={ann[ANNOTATION_ABORT]}")
        task = ann.get(ANNOTATION_ABORT_TASK)
        if task is not None and task != self._task_baseline:
            self._task_baseline = task
            with self._lock:
                self._task_aborts += 1
            _log(f"annotation {ANNOTATION_ABORT_TASK} changed: aborting the current task")

    def _note_abort(self) -> None:
        if not self.aborted:
            self.aborted = True
            _log(f"the job received NVFlare's ABORT (t={time.time():.3f})")

    def write_outcome(self, path: str) -> None:
        """At exit: tell the operator, through the container's termination message, that the job was aborted."""
        if not self.aborted or not path:
            return
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(f"{ABORTED_OUTCOME}\nthe job was aborted through NVFlare's ABORT and the worker stopped cleanly\n")
        except OSError as e:
            _log(f"cannot write the termination message {path}: {e}")

    def _deliver(self) -> None:
        from nvflare.apis.fl_constant import AdminCommandNames

        if not self._hooked:
            self._hooked = self.commands.hook(AdminCommandNames.ABORT, self._note_abort)

        if self._abort_reason is not None and not self._abort_sent:
            if self.commands.run(AdminCommandNames.ABORT, {}):
                self._abort_sent = True
                _log(f"{self._abort_reason}: sent ABORT to the job (t={time.time():.3f})")
        with self._lock:
            pending = self._task_aborts
        if pending and not self._abort_reason:
            payload = {"command": AdminCommandNames.ABORT_TASK, "data": {}}
            if self.commands.run(AdminCommandNames.ABORT_TASK, payload):
                with self._lock:
                    self._task_aborts -= 1
                _log(f"sent ABORT_TASK to the job (t={time.time():.3f})")

    def loop(self) -> None:
        while True:
            try:
                self._poll_annotations()
                self._deliver()
            except Exception as e:  # the relay must never take the job down
                _log(f"abort relay error: {type(e).__name__}: {e}")
            self._wake.wait(self.interval)
            self._wake.clear()

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.loop, name="fljob-abort-relay", daemon=True)
        t.start()
        return t


def _no_parent_watch_in_a_pod() -> None:
    try:
        import psutil

        if psutil.pid_exists(os.getppid()):
            return
    except Exception:
        return
    own = os.getpid()
    _log(f"parent pid {os.getppid()} does not exist (PID 1 in a container): the worker watches itself instead")
    os.getppid = lambda: own


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    job_id = _arg_value(argv, "-n", "--job_id")
    client_name = _arg_value(argv, "-c", "--client_name")
    info_dir = os.environ.get(ENV_INFO_DIR, DEFAULT_INFO_DIR)
    annotations = os.path.join(info_dir, "annotations") if info_dir else None
    try:
        interval = float(os.environ.get(ENV_WATCH_INTERVAL, "0.5"))
    except ValueError:
        interval = 0.5
    if TaskAborts().install():
        _log("nvflare's ClientRunner has no abort_task (2.9.0): ABORT_TASK aborts the running tasks through their "
             "abort signals")
    if job_id and client_name:
        relay = AbortRelay(JobCommands(client_name, job_id), annotations, interval=max(0.05, interval))
        signal.signal(signal.SIGTERM, relay.on_signal)
        signal.signal(signal.SIGINT, relay.on_signal)
        relay.start()
        atexit.register(relay.write_outcome, os.environ.get(ENV_TERMINATION_LOG, DEFAULT_TERMINATION_LOG))
    else:
        _log("no -n/-c in the arguments: running the worker without the abort relay")
    _no_parent_watch_in_a_pod()
    # NVFlare's worker parses sys.argv itself and ends with sys.exit(rc).
    sys.argv = [WORKER_MODULE.replace(".", "/") + ".py"] + argv
    runpy.run_module(WORKER_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
