"""Prove that a worker started the way the operator's pod starts it runs a real NVFlare 2.9.0 job, and measure aborts.

    python/.venv/bin/python python/e2e/prove_worker.py [--base /tmp/fljob-e2e] [--only ok,unsafe,...] [--json out]

One POC project (server + client parent on 127.0.0.1, the parent's job launcher is e2e.recording_launcher). For
each scenario a job is submitted; when the parent hands it over, the worker is started as a separate process with
EXACTLY the pod's shape:

* an empty workspace W with only W/startup (a copy of the client's startup kit);
* ``python -u -m <entry> -m W -w W/startup -n JOB -c site-1 -p <parent url> -g <server> -scheme <s>
  [--parent_conn_sec X] -s fed_client.json --set <parent's options> print_conf=True`` where entry is NVFlare's
  ``nvflare.private.fed.app.client.worker_process`` or ``fljob_launcher.worker``;
* env: NVFLARE_JOB_AUTH_TOKEN / NVFLARE_JOB_TOKEN_SIGNATURE / NVFLARE_JOB_SSID, NVFL_WORKSPACE_OWNER_FQCN,
  NVFL_WORKSPACE_TRANSFER_TOKEN, PYTHONPATH=W/JOB/app_site-1/custom (and FLJOB_INFO_DIR for fljob_launcher.worker).

Scenarios (name: job, entry, what is done while it runs):
  ok            2 rounds, NVFlare worker                       -> 0, COMPLETED, results in the parent
  ok_wrapped    2 rounds, fljob_launcher.worker                -> the same
  unsafe        class outside class_allow_list                 -> 102
  bad_arg       bad component argument                         -> 103
  abort_server  long job, NVFlare worker, `abort_job` from the admin API (NVFlare's own path: JobExecutor ABORT)
  abort_parent  long job, NVFlare worker, the parent handle relays ABORT (what FLJobHandle does on status.abort)
  sigterm_plain long job, NVFlare worker, SIGTERM (today's pod deletion without the wrapper)
  sigterm       long job, fljob_launcher.worker, SIGTERM
  annotation    long job, fljob_launcher.worker, fljob.dev/abort="true" written to the annotations file
  abort_task    2 rounds, the job's AbortableTrainer (round 0's task waits up to 60 s for its abort signal),
                fljob_launcher.worker, fljob.dev/abort-task changes once while round 0 waits -> the task is
                aborted, the job goes on
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from e2e.poc import Project, abort_task_job, free_ports, numpy_job  # noqa: E402

NV_WORKER = "nvflare.private.fed.app.client.worker_process"
WRAPPER = "fljob_launcher.worker"


def pod_command(python: str, entry: str, rec: dict, ws: Path) -> list:
    """The worker command line the operator builds for the pod, from what the parent handed over."""
    a = {k: v for k, v in rec["job_args"].items()}
    cmd = [python, "-u", "-m", entry, "-m", str(ws), "-w", str(ws / "startup"), "-n", rec["job_id"],
           "-c", a["client_name"][1], "-p", a["parent_url"][1], "-g", a["target"][1], "-scheme", a["scheme"][1]]
    if "parent_conn_sec" in a:
        cmd += ["--parent_conn_sec", a["parent_conn_sec"][1]]
    opts = [o for o in rec["set"] if o != "print_conf=True"]
    cmd += ["-s", "fed_client.json", "--set", *opts, "print_conf=True"]
    return cmd


def pod_env(rec: dict, ws: Path, client: str, info_dir: Path = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NVFLARE_", "NVFL_", "PYTHONPATH", "FLJOB_"))}
    env.update(rec["credentials_env"])
    env["NVFL_WORKSPACE_OWNER_FQCN"] = rec["workspace_owner"]
    env["NVFL_WORKSPACE_TRANSFER_TOKEN"] = rec["transfer_token"]
    # the job's custom/ folder, then this tree's python/ (the image installs it; the virtualenv's editable install
    # may point at another checkout)
    env["PYTHONPATH"] = os.pathsep.join([str(ws / rec["job_id"] / f"app_{client}" / "custom"),
                                         str(Path(__file__).resolve().parent.parent)])
    if info_dir is not None:
        env["FLJOB_INFO_DIR"] = str(info_dir)
    return env


def write_annotations(info_dir: Path, ann: dict) -> None:
    """The downward API file format (key="value", Go-quoted), written atomically like the kubelet's symlink swap."""
    info_dir.mkdir(parents=True, exist_ok=True)
    tmp = info_dir / ".annotations.tmp"
    tmp.write_text("".join(f"{k}={json.dumps(v)}\n" for k, v in sorted(ann.items())))
    os.replace(tmp, info_dir / "annotations")


SCENARIOS = {
    # name: (variant, rounds, sleep per round, entry, action)
    "ok": ("ok", 2, 0, NV_WORKER, None),
    "ok_wrapped": ("ok", 2, 0, WRAPPER, None),
    "unsafe": ("unsafe", 2, 0, NV_WORKER, None),
    "bad_arg": ("bad_arg", 2, 0, NV_WORKER, None),
    "abort_server": ("ok", 50, 2, NV_WORKER, "server"),
    "abort_parent": ("ok", 50, 2, NV_WORKER, "parent"),
    "sigterm_plain": ("ok", 50, 2, NV_WORKER, "sigterm"),
    "sigterm": ("ok", 50, 2, WRAPPER, "sigterm"),
    "annotation": ("ok", 50, 2, WRAPPER, "annotation"),
    "abort_task": ("abortable", 2, 0, WRAPPER, "abort_task"),
}


PID1 = False  # --pid1: start the worker as PID 1 of a new PID namespace (unshare -pf), as in a container


def _target_pid(proc) -> int:
    """The worker's pid: unshare's child when it runs as PID 1 of its own namespace."""
    if not PID1:
        return proc.pid
    import psutil

    for _ in range(100):
        kids = psutil.Process(proc.pid).children()
        if kids:
            return kids[0].pid
        time.sleep(0.05)
    return proc.pid


def run_scenario(p: Project, spool: Path, name: str, log) -> dict:
    variant, rounds, sleep, entry, action = SCENARIOS[name]
    if variant == "abortable":
        job_dir = abort_task_job(p.base / "jobs", f"e2e-{name}", rounds=rounds)
    else:
        job_dir = numpy_job(p.base / "jobs", f"e2e-{name}", rounds=rounds, sleep_per_round=sleep, variant=variant)
    mark = "waits for its abort signal" if variant == "abortable" else "Task name: train"
    t_submit = time.time()
    job_id = p.submit(job_dir)
    rec_path = spool / f"{job_id}.json"
    deadline = time.monotonic() + 60
    while not rec_path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: the parent never launched job {job_id}")
        time.sleep(0.1)
    rec = json.loads(rec_path.read_text())

    ws = p.base / "pods" / job_id
    shutil.rmtree(ws, ignore_errors=True)
    ws.mkdir(parents=True)
    shutil.copytree(p.startup_kit(), ws / "startup")
    info_dir = p.base / "pods" / f"{job_id}.info"
    write_annotations(info_dir, {"fljob.dev/job-id": job_id})
    cmd = pod_command(p.python, entry, rec, ws)
    env = pod_env(rec, ws, p.client, info_dir if entry == WRAPPER else None)
    out = open(p.base / "pods" / f"{job_id}.out", "wb")
    if PID1:
        cmd = ["unshare", "-pf", "--kill-child"] + cmd
    t_start = time.time()
    proc = subprocess.Popen(cmd, cwd=ws, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    log(f"{name}: job {job_id} worker pid {proc.pid} ({entry})")

    result = {"scenario": name, "job_id": job_id, "entry": entry, "pid1": PID1,
              "handover_s": round(t_start - t_submit, 2)}
    t_signal = None
    terminate_seen = None
    if action:
        # wait until the job is really training (a round started) before acting
        p.wait_job_running(job_id, timeout=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if mark in (ws / job_id / "log.txt").read_text(errors="replace") if (
                ws / job_id / "log.txt"
            ).exists() else False:
                break
            time.sleep(0.2)
        time.sleep(1.0)
        t_signal = time.time()
        if action == "server":
            p.abort(job_id)
        elif action == "parent":
            (spool / f"{job_id}.k8s-abort").write_text(str(t_signal))
        elif action == "sigterm":
            if entry == WRAPPER:  # the operator deleting the pod of an aborted FLJob (pod-side mechanism alone)
                (spool / f"{job_id}.k8s-abort-norelay").write_text(str(t_signal))
            os.kill(_target_pid(proc), signal.SIGTERM)
        elif action == "annotation":
            (spool / f"{job_id}.k8s-abort-norelay").write_text(str(t_signal))
            write_annotations(info_dir, {"fljob.dev/job-id": job_id, "fljob.dev/abort": "true"})
        elif action == "abort_task":
            write_annotations(info_dir, {"fljob.dev/job-id": job_id, "fljob.dev/abort-task": "1"})
        log(f"{name}: {action} at +{t_signal - t_start:.2f} s")

    while proc.poll() is None:
        if terminate_seen is None and (spool / f"{job_id}.terminate").exists():
            # JobExecutor gave up waiting (max_wait) and called terminate(): what the operator does is delete the pod
            terminate_seen = time.time()
            log(f"{name}: parent called terminate() at +{terminate_seen - t_start:.2f} s -> SIGKILL")
            proc.kill()
        if time.time() - t_start > 600:
            proc.kill()
        time.sleep(0.05)
    t_exit = time.time()
    rc = proc.returncode
    (spool / f"{job_id}.rc").write_text(str(rc if rc >= 0 else 128 - rc))
    out.close()
    result.update(
        rc=rc,
        start_to_exit_s=round(t_exit - t_start, 2),
        signal_to_exit_s=round(t_exit - t_signal, 2) if t_signal else None,
        parent_terminated=terminate_seen is not None,
    )
    try:
        result["server_status"] = p.wait_job(job_id, timeout=120)
    except TimeoutError as e:
        result["server_status"] = f"timeout: {e}"
    result["server_done_s"] = round(time.time() - t_start, 2)
    parent_job = p.parent_job_dir(job_id)
    result["results_in_parent"] = sorted(
        str(x.relative_to(parent_job)) for x in parent_job.rglob("*") if x.is_file() and not x.name.startswith(".")
    ) if parent_job.exists() else []
    log_txt = parent_job / "log.txt"
    result["parent_has_worker_log"] = log_txt.exists()
    worker_out = (p.base / "pods" / f"{job_id}.out").read_text(errors="replace")
    result["upload_success"] = "upload_results SUCCESS" in worker_out
    if action == "abort_task":
        result["abort_task_delivered"] = "annotation fljob.dev/abort-task changed" in worker_out
        result["abort_task_nvflare_error"] = "abort_task handler failed" in worker_out
        result["task_aborted"] = [l for l in worker_out.splitlines() if "ABORT_TASK: aborted task" in l]
        result["trainer_saw_abort"] = [l for l in worker_out.splitlines() if "ABORTED at" in l]
    log(f"{name}: {json.dumps(result)}")
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="/tmp/fljob-e2e")
    ap.add_argument("--only", default=",".join(SCENARIOS))
    ap.add_argument("--json", default=None)
    ap.add_argument("--pid1", action="store_true", help="run each worker as PID 1 of its own PID namespace")
    args = ap.parse_args()
    global PID1
    PID1 = args.pid1
    names = [n for n in args.only.split(",") if n]
    fl, adm, par = free_ports(3)
    p = Project(args.base, fl_port=fl, admin_port=adm, parent_port=par)
    p.provision()
    spool = p.base / "spool"
    shutil.rmtree(spool, ignore_errors=True)
    p.configure_client(
        launcher={"id": "recording_launcher", "path": "recording_launcher.RecordingLauncher",
                  "args": {"spool_dir": str(spool)}},
        # The worker builds every component of the site's resources.json (it downloads local/), the launcher too:
        # ship the launcher in local/custom/, which NVFlare puts on sys.path in both processes.
        site_custom_files=[Path(__file__).resolve().parent / "recording_launcher.py"],
    )

    def log(msg):
        print(f"[prove {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    results = []
    try:
        t = time.time()
        p.start()
        log(f"server + client parent up in {time.time() - t:.1f} s (fl {fl}, admin {adm}, parent {p.parent_url})")
        for name in names:
            try:
                results.append(run_scenario(p, spool, name, log))
            except Exception as e:
                log(f"{name}: FAILED {type(e).__name__}: {e}")
                results.append({"scenario": name, "error": str(e)})
    finally:
        p.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
