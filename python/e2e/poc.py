"""A real NVFlare 2.9 project on 127.0.0.1 for end-to-end tests: 1 server + 1 client parent, jobs, admin API.

Everything listens on 127.0.0.1 only, on ports the caller chooses (see ``free_ports``):

* the server's fed-learn port and admin port (the server cert's CN is ``localhost``, the name the client uses);
* the client parent's *internal* listener, fixed through ``<client>/local/comm_config.json`` (the shape
  ``nvflare deploy prepare`` writes for Kubernetes), so that a worker started anywhere can reach the parent at a
  known ``-p`` URL with ``--parent_conn_sec``.

Usage::

    from e2e.poc import Project, free_ports, numpy_job
    fl, adm, par = free_ports(3)
    p = Project("/tmp/e2e", fl_port=fl, admin_port=adm, parent_port=par)
    p.provision()
    p.configure_client(launcher={"id": "l", "path": "e2e.recording_launcher.RecordingLauncher", "args": {...}})
    p.start()                                   # server + client parent, waits until the client is registered
    job_dir = numpy_job(p.base / "jobs", "hello", rounds=2)
    job_id = p.submit(job_dir)
    p.wait_job(job_id, timeout=120)             # -> "FINISHED:COMPLETED"
    p.stop()

Studies (NVFlare 2.9.0): ``Project(..., studies={"s": {"site_orgs": {"nvidia": ["site-1"]}, "admins": [ADMIN]}})``
provisions them (project.yml ``api_version: 4``; the server's ``local/study_registry.json``). A job belongs to the
study of the admin session that submits it: the server sets ``meta["study"]`` to the session's active study whatever
the job's meta.json says (``nvflare job submit --study s`` opens such a session), and only a session of that study
sees the job. So ``p.submit(job_dir, study="s")``, and ``p.wait_job(job_id, study="s")``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from nvflare.apis.job_def import DEFAULT_STUDY

HOST = "127.0.0.1"
SERVER_NAME = "localhost"  # the server's cert CN and the host clients connect to (resolves to 127.0.0.1)
ADMIN = "admin@nvidia.com"
PROJECT = "e2e"

# Extra classes the site allows (NVFlare's default class_allow_list already has the numpy ones the jobs use).
E2E_ALLOWED_CLASSES: List[str] = []


def free_ports(n: int) -> List[int]:
    """n distinct free TCP ports on 127.0.0.1 (bound once, then released)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def python_dir() -> Path:
    """python/ of the repo: put on PYTHONPATH so fljob_launcher and e2e import in every NVFlare process."""
    return Path(__file__).resolve().parent.parent


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


class Project:
    def __init__(
        self,
        base_dir,
        fl_port: int,
        admin_port: int,
        parent_port: int,
        client: str = "site-1",
        parent_conn_sec: str = "mtls",
        python: str = sys.executable,
        studies: Optional[dict] = None,
    ):
        self.base = Path(base_dir).resolve()
        self.fl_port = fl_port
        self.admin_port = admin_port
        self.parent_port = parent_port
        self.client = client
        self.parent_conn_sec = parent_conn_sec
        self.python = python
        self.studies = dict(studies or {})
        self.procs: Dict[str, subprocess.Popen] = {}
        self._sessions: Dict[str, object] = {}  # study -> admin session (a session sees its own study's jobs only)

    # ----- layout ----------------------------------------------------------------------------------------------

    @property
    def kits(self) -> Path:
        return self.base / "prov" / PROJECT / "prod_00"

    @property
    def server_ws(self) -> Path:
        return self.kits / SERVER_NAME

    @property
    def client_ws(self) -> Path:
        return self.kits / self.client

    @property
    def admin_kit(self) -> Path:
        return self.kits / ADMIN

    @property
    def parent_url(self) -> str:
        return f"tcp://{HOST}:{self.parent_port}"

    @property
    def server_target(self) -> str:
        return f"{SERVER_NAME}:{self.fl_port}"

    # ----- provisioning ----------------------------------------------------------------------------------------

    def provision(self) -> None:
        """`nvflare provision` of a 1-server / 1-client / 1-admin project, then the 127.0.0.1 patches."""
        shutil.rmtree(self.base / "prov", ignore_errors=True)
        self.base.mkdir(parents=True, exist_ok=True)
        project_yml = self.base / "project.yml"
        # `studies:` needs api_version 4 (NVFlare 2.9.0); JSON is YAML
        studies = f"studies: {json.dumps(self.studies)}\n" if self.studies else ""
        project_yml.write_text(
            f"""api_version: {4 if self.studies else 3}
name: {PROJECT}
description: fljob-operator e2e
{studies}participants:
  - name: {SERVER_NAME}
    type: server
    org: nvidia
    fed_learn_port: {self.fl_port}
    admin_port: {self.admin_port}
  - name: {self.client}
    type: client
    org: nvidia
  - name: {ADMIN}
    type: admin
    org: nvidia
    role: project_admin
builders:
  - path: nvflare.lighter.impl.workspace.WorkspaceBuilder
  - path: nvflare.lighter.impl.static_file.StaticFileBuilder
    args:
      config_folder: config
  - path: nvflare.lighter.impl.cert.CertBuilder
  - path: nvflare.lighter.impl.signature.SignatureBuilder
"""
        )
        subprocess.run(
            [self.python, "-m", "nvflare.cli", "provision", "-p", str(project_yml), "-w", str(self.base / "prov"),
             "--force"],
            check=True,
            stdout=subprocess.DEVNULL,
            cwd=self.base,
        )
        # Server: the target host "localhost" is loopback, so NVFlare binds the fed-learn listener to loopback; say
        # so for the admin listener too.
        fed_server = self.server_ws / "startup" / "fed_server.json"
        conf = json.loads(fed_server.read_text())
        conf["servers"][0]["admin_host"] = HOST
        fed_server.write_text(json.dumps(conf, indent=2))
        _write_json(self.client_ws / "local" / "comm_config.json", self.parent_comm_config())
        self.configure_client()

    def parent_comm_config(self) -> dict:
        """The client parent's internal listener: fixed host/port/security, as `nvflare deploy prepare` writes."""
        return {
            "internal": {
                "scheme": "tcp",
                "resources": {"host": HOST, "port": self.parent_port, "connection_security": self.parent_conn_sec},
            }
        }

    def configure_client(
        self,
        launcher: Optional[dict] = None,
        extra_components: Optional[List[dict]] = None,
        extra_allowed_classes: Optional[List[str]] = None,
        site_custom_files: Optional[List] = None,
    ) -> Path:
        """Write the client's local/resources.json from NVFlare's default, with `launcher` as the job launcher.

        launcher: a component entry ({"id", "path", "args"}) replacing ``process_launcher``; None keeps NVFlare's
        ClientProcessJobLauncher. The GPU resource manager / consumer are replaced by the passthrough manager
        (quota is the operator's job). Call before start() (the parent reads it once).

        site_custom_files: files copied into the site's local/custom/ (on sys.path in the parent AND in the worker:
        the worker downloads local/ and builds every component of resources.json, the launcher included).
        """
        custom = self.client_ws / "local" / "custom"
        custom.mkdir(parents=True, exist_ok=True)
        for f in site_custom_files or []:
            shutil.copy(f, custom / Path(f).name)
        default = json.loads((self.client_ws / "local" / "resources.json.default").read_text())
        allow = list(default.get("class_allow_list") or [])
        for cls in E2E_ALLOWED_CLASSES + list(extra_allowed_classes or []):
            if cls not in allow:
                allow.append(cls)
        default["class_allow_list"] = allow
        comps = [
            {
                "id": "resource_manager",
                "path": "nvflare.app_common.resource_managers.passthrough_resource_manager.PassthroughResourceManager",
                "args": {},
            }
        ]
        for c in default.get("components") or []:
            if c.get("id") in ("resource_manager", "resource_consumer"):
                continue
            if c.get("id") == "process_launcher" and launcher is not None:
                continue
            comps.append(c)
        if launcher is not None:
            comps.append(launcher)
        comps.extend(extra_components or [])
        default["components"] = comps
        path = self.client_ws / "local" / "resources.json"
        _write_json(path, default)
        return path

    # ----- processes -------------------------------------------------------------------------------------------

    def env(self, extra: Optional[dict] = None) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(python_dir())] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        env.update(extra or {})
        return env

    def _spawn(self, name: str, cmd: List[str], cwd: Path, env: dict) -> subprocess.Popen:
        log = open(self.base / f"{name}.out", "ab")
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_server(self) -> subprocess.Popen:
        ws = self.server_ws
        cmd = [self.python, "-u", "-m", "nvflare.private.fed.app.server.server_train", "-m", str(ws), "-s",
               "fed_server.json", "--set", "secure_train=true", "org=nvidia", "config_folder=config"]
        return self._spawn("server", cmd, ws, self.env())

    def start_client(self, env: Optional[dict] = None) -> subprocess.Popen:
        ws = self.client_ws
        cmd = [self.python, "-u", "-m", "nvflare.private.fed.app.client.client_train", "-m", str(ws), "-s",
               "fed_client.json", "--set", "secure_train=true", f"uid={self.client}", "org=nvidia",
               "config_folder=config"]
        return self._spawn("client", cmd, ws, self.env(env))

    def start(self, timeout: float = 90.0, client_env: Optional[dict] = None) -> None:
        self.start_server()
        self.start_client(client_env)
        self.wait_client_registered(timeout)

    def wait_client_registered(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}; see {self.base / (name + '.out')}")
            try:
                info = self.session().get_system_info()
                if any(c.name == self.client for c in info.client_info):
                    return
                last = info
            except Exception as e:  # server not up yet
                last = e
                self._sessions.pop(DEFAULT_STUDY, None)
            time.sleep(1.0)
        raise TimeoutError(f"client {self.client} not registered after {timeout} s: {last}")

    def stop(self, timeout: float = 20.0) -> None:
        for sess in self._sessions.values():
            try:
                sess.close()
            except Exception:
                pass
        self._sessions.clear()
        for name in ("client", "server"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        for name, p in list(self.procs.items()):
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
        self.procs.clear()

    # ----- admin API -------------------------------------------------------------------------------------------

    def session(self, study: str = DEFAULT_STUDY):
        """The admin session whose active study is `study` (the login fails unless the study is provisioned and
        ADMIN is one of its admins)."""
        if study not in self._sessions:
            from nvflare.fuel.flare_api.flare_api import new_secure_session

            self._sessions[study] = new_secure_session(ADMIN, str(self.admin_kit), timeout=10.0, study=study)
        return self._sessions[study]

    def submit(self, job_dir, study: str = DEFAULT_STUDY) -> str:
        return self.session(study).submit_job(str(job_dir))

    def job_meta(self, job_id: str, study: str = DEFAULT_STUDY) -> dict:
        return self.session(study).get_job_meta(job_id)

    def job_status(self, job_id: str, study: str = DEFAULT_STUDY) -> str:
        return str(self.job_meta(job_id, study).get("status"))

    def download_job_result(self, job_id: str, destination, study: str = DEFAULT_STUDY) -> str:
        """The job's stored result (meta, job and the server's workspace, unzipped) under `destination`."""
        return self.session(study).download_job_result(job_id, str(destination))

    def wait_job(self, job_id: str, timeout: float = 180.0, poll: float = 0.5, study: str = DEFAULT_STUDY) -> str:
        """Poll the server until the job is FINISHED:*; returns that status."""
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            status = self.job_status(job_id, study)
            if status.startswith("FINISHED"):
                return status
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} still {status} after {timeout} s")

    def wait_job_running(self, job_id: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.job_status(job_id) == "RUNNING":
                return
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} not RUNNING after {timeout} s")

    def abort(self, job_id: str) -> None:
        self.session().abort_job(job_id)

    # ----- files -----------------------------------------------------------------------------------------------

    def startup_kit(self) -> Path:
        return self.client_ws / "startup"

    def parent_job_dir(self, job_id: str) -> Path:
        return self.client_ws / job_id


# ----- jobs ------------------------------------------------------------------------------------------------------

_SERVER_APP = {
    "format_version": 2,
    "task_data_filters": [],
    "task_result_filters": [],
    "workflows": [
        {
            "id": "scatter_and_gather",
            "path": "nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather",
            "args": {
                "min_clients": 1,
                "num_rounds": 2,
                "start_round": 0,
                "wait_time_after_min_received": 0,
                "aggregator_id": "aggregator",
                "persistor_id": "persistor",
                "shareable_generator_id": "shareable_generator",
                "train_task_name": "train",
                "train_timeout": 0,
            },
        }
    ],
    "components": [
        {"id": "persistor", "path": "nvflare.app_common.np.np_model_persistor.NPModelPersistor", "args": {}},
        {
            "id": "shareable_generator",
            "path": "nvflare.app_common.shareablegenerators.full_model_shareable_generator.FullModelShareableGenerator",
            "args": {},
        },
        {
            "id": "aggregator",
            "path": "nvflare.app_common.aggregators.intime_accumulate_model_aggregator."
            "InTimeAccumulateWeightedAggregator",
            "args": {"expected_data_kind": "WEIGHTS"},
        },
    ],
}


def numpy_job(
    parent_dir,
    name: str,
    rounds: int = 2,
    sleep_per_round: float = 0.0,
    variant: str = "ok",
) -> Path:
    """Write a ScatterAndGather numpy job folder (1 client) and return its path.

    variant:
      "ok"        NPTrainer, `rounds` rounds; sleep_per_round > 0 makes each round take that long (for abort
                  tests: NPTrainer's sleep checks the abort signal every 0.5 s)
      "unsafe"    the client executor is an NVFlare class that is not in the site's class_allow_list
                  -> the worker exits 102 (UNSAFE_COMPONENT)
      "bad_arg"   NPTrainer with an argument it does not have -> the worker exits 103 (CONFIG_ERROR)
    """
    job = Path(parent_dir) / name
    shutil.rmtree(job, ignore_errors=True)
    app = job / "app"
    server = json.loads(json.dumps(_SERVER_APP))
    server["workflows"][0]["args"]["num_rounds"] = rounds
    executor = {"id": "Executor", "path": "nvflare.app_common.np.np_trainer.NPTrainer", "args": {}}
    if variant == "ok" and sleep_per_round > 0:
        # NPTrainer sleeps in 1 s steps and checks the abort signal between them
        executor["args"] = {"sleep_time": sleep_per_round}
    elif variant == "unsafe":
        # An NVFlare class that is not in the default class_allow_list. (A class from the job's own custom/ folder
        # would not do: such a job is BYOC, and BYOC jobs are exempt from the allow list.)
        executor = {"id": "Executor", "path": "nvflare.app_common.executors.learner_executor.LearnerExecutor",
                    "args": {"learner_id": "learner"}}
    elif variant == "bad_arg":
        executor["args"] = {"no_such_argument": 1}
    elif variant != "ok":
        raise ValueError(f"unknown variant {variant}")
    client = {
        "format_version": 2,
        "executors": [{"tasks": ["train", "submit_model"], "executor": executor}],
        "task_result_filters": [],
        "task_data_filters": [],
        "components": [],
    }
    _write_json(app / "config" / "config_fed_server.json", server)
    _write_json(app / "config" / "config_fed_client.json", client)
    # No custom/ folder: even an empty one makes the job BYOC, and BYOC jobs skip the class_allow_list check.
    _write_json(
        job / "meta.json",
        {"name": name, "resource_spec": {}, "deploy_map": {"app": ["@ALL"]}, "min_clients": 1},
    )
    return job


# The job's own trainer for abort_task_job (app/custom/abortable_trainer.py): in the rounds `wait_rounds` the train
# task works until its abort signal triggers (at most `wait_seconds`, then NPTrainer trains as usual).
_ABORTABLE_TRAINER = '''"""A numpy trainer whose train task in some rounds waits for its abort signal (fljob-operator e2e)."""

import time

from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.shareable import make_reply
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.np.np_trainer import NPTrainer


class AbortableTrainer(NPTrainer):
    def __init__(self, wait_rounds=(0,), wait_seconds=60.0):
        super().__init__()
        self.wait_rounds = list(wait_rounds)
        self.wait_seconds = wait_seconds

    def execute(self, task_name, shareable, fl_ctx, abort_signal):
        rnd = shareable.get_header(AppConstants.CURRENT_ROUND, None)
        task_id = fl_ctx.get_prop(FLContextKey.TASK_ID)
        if task_name == "train" and rnd in self.wait_rounds:
            self.log_info(fl_ctx, f"AbortableTrainer: round {rnd} task {task_id} waits for its abort signal")
            deadline = time.monotonic() + self.wait_seconds
            while time.monotonic() < deadline:
                if abort_signal.triggered:
                    self.log_info(fl_ctx, f"AbortableTrainer: round {rnd} task {task_id} ABORTED at {time.time():.3f}")
                    return make_reply(ReturnCode.TASK_ABORTED)
                time.sleep(0.05)
            self.log_info(fl_ctx, f"AbortableTrainer: round {rnd} task {task_id} was not aborted")
        return super().execute(task_name, shareable, fl_ctx, abort_signal)
'''


def abort_task_job(parent_dir, name: str, rounds: int = 2, wait_rounds=(0,), wait_seconds: float = 60.0) -> Path:
    """A ScatterAndGather numpy job whose client executor is the job's own AbortableTrainer (app/custom/, so the
    job is BYOC): the train task of each round in `wait_rounds` waits for its abort signal. The workflow ignores a
    client's error result (ignore_result_error=True), so an aborted task costs the round its contribution, not the
    job."""
    job = numpy_job(parent_dir, name, rounds=rounds)
    app = job / "app"
    server = json.loads((app / "config" / "config_fed_server.json").read_text())
    server["workflows"][0]["args"]["ignore_result_error"] = True
    _write_json(app / "config" / "config_fed_server.json", server)
    client = json.loads((app / "config" / "config_fed_client.json").read_text())
    client["executors"][0]["executor"] = {
        "id": "Executor",
        "path": "abortable_trainer.AbortableTrainer",
        "args": {"wait_rounds": list(wait_rounds), "wait_seconds": wait_seconds},
    }
    _write_json(app / "config" / "config_fed_client.json", client)
    (app / "custom").mkdir(parents=True, exist_ok=True)
    (app / "custom" / "abortable_trainer.py").write_text(_ABORTABLE_TRAINER)
    return job


# The job's own trainer for study_job (app/custom/study_trainer.py): each round's update is the number in its study's
# dataset file times the number in an env var of its study, so the job's result depends on both.
_STUDY_TRAINER = '''"""A numpy trainer that reads its study's dataset file and env var (fljob-operator e2e)."""

import os

from nvflare.app_common.np.np_trainer import NPTrainer


class StudyTrainer(NPTrainer):
    def __init__(self, data_file, scale_env):
        super().__init__()
        self.data_file = data_file
        self.scale_env = scale_env

    def execute(self, task_name, shareable, fl_ctx, abort_signal):
        if task_name == "train":
            # No fallback: without the study's mount or env the task fails, and so does the job.
            with open(self.data_file) as f:
                text = f.read().strip()
            scale = os.environ[self.scale_env]
            self._delta = float(text.split()[0]) * float(scale)
            self.log_info(fl_ctx, f"StudyTrainer: read {self.data_file}: {text!r}; {self.scale_env}={scale!r}; "
                                  f"delta {self._delta}")
        return super().execute(task_name, shareable, fl_ctx, abort_signal)
'''


def study_job(parent_dir, name: str, data_file: str, scale_env: str, rounds: int = 2) -> Path:
    """A ScatterAndGather numpy job whose client executor is the job's own StudyTrainer (app/custom/, BYOC): the
    train task adds (first number in `data_file`) x (env `scale_env`) to the model. NPModelPersistor starts from
    [[1, 2, 3], [4, 5, 6], [7, 8, 9]], so with one client the server's final model is that + rounds x delta."""
    job = numpy_job(parent_dir, name, rounds=rounds)
    app = job / "app"
    client = json.loads((app / "config" / "config_fed_client.json").read_text())
    client["executors"][0]["executor"] = {
        "id": "Executor",
        "path": "study_trainer.StudyTrainer",
        "args": {"data_file": data_file, "scale_env": scale_env},
    }
    _write_json(app / "config" / "config_fed_client.json", client)
    (app / "custom").mkdir(parents=True, exist_ok=True)
    (app / "custom" / "study_trainer.py").write_text(_STUDY_TRAINER)
    return job
