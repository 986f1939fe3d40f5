//! The operator against the real local control plane (kube-apiserver, etcd, controller-manager, scheduler, kwok):
//! one test per row of the exit-code table, the missing-site and missing-Secret paths, a restart in the middle of a
//! run, CRD validation, printer columns, the examples, and "a steady cluster sees no writes".

mod common;
mod fl;

use fl::*;
use fljob_operator::api::*;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use std::time::Duration;

/// Runs one job with the given pod simulation and returns it once finished.
async fn run_row(prefix: &str, sim: &[(&str, &str)], tweak: impl FnOnce(&mut FLJob)) -> (Env, FLJob) {
    let env = Env::new(prefix, Capacity::default()).await;
    let mut j = job("row", sim);
    tweak(&mut j);
    env.create(&j).await;
    let done = wait_job(&env.jobs, "row", 90, finished).await;
    (env, done)
}

fn expect(j: &FLJob, phase: Phase, reason: Option<&str>, code: i32) {
    let s = st(j);
    assert_eq!((s.phase, s.reason.as_deref(), s.exit_code), (phase, reason, Some(code)), "status: {s:#?}");
    assert!(s.completion_time.is_some());
    assert!(s.message.is_some());
}

async fn pod_of(env: &Env, j: &FLJob) -> Option<Pod> {
    let pods: Api<Pod> = env.ns.api();
    pods.get_opt(st(j).pod_name.as_deref().expect("podName")).await.expect("get pod")
}

macro_rules! row {
    ($name:ident, $sim:expr, $phase:expr, $reason:expr, $code:expr) => {
        row!($name, $sim, |_j: &mut FLJob| {}, $phase, $reason, $code);
    };
    ($name:ident, $sim:expr, $tweak:expr, $phase:expr, $reason:expr, $code:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let (env, j) = run_row(stringify!($name), $sim, $tweak).await;
            expect(&j, $phase, $reason, $code);
            let s = st(&j);
            let client = match s.phase {
                Phase::Succeeded | Phase::Aborted => "stopped",
                _ => "exception",
            };
            assert_eq!(s.client_status.as_deref(), Some(client));
            let want = $reason.unwrap_or("Succeeded");
            env.wait_event("row", &format!("{want}:")).await;
            env.done().await;
        }
    };
}

row!(exit_0_succeeds, &[("sim.fljob.dev/exit-code", "0")], Phase::Succeeded, None, 0);
row!(exit_101_is_exception, &[("sim.fljob.dev/exit-code", "101")], Phase::Failed, Some("Exception"), 101);
row!(exit_102_is_unsafe_component, &[("sim.fljob.dev/exit-code", "102")], Phase::Failed, Some("UnsafeComponent"), 102);
row!(exit_103_is_config_error, &[("sim.fljob.dev/exit-code", "103")], Phase::Failed, Some("ConfigError"), 103);
row!(exit_104_is_infrastructure_error, &[("sim.fljob.dev/exit-code", "104")], Phase::Failed, Some("InfrastructureError"), 104);
row!(exit_1_after_start_is_execution_error, &[("sim.fljob.dev/exit-code", "1"), ("sim.fljob.dev/run-seconds", "2")], Phase::Failed, Some("ExecutionError"), 1);
row!(exit_1_before_start_is_infrastructure_error, &[("sim.fljob.dev/start-failure-exit-code", "1")], Phase::Failed, Some("InfrastructureError"), 104);
row!(oom_killed, &[("sim.fljob.dev/oom-killed", "true")], Phase::Failed, Some("OOMKilled"), 137);
row!(evicted, &[("sim.fljob.dev/evicted", "true")], Phase::Failed, Some("Evicted"), 9);
row!(other_nonzero_exit_is_exception, &[("sim.fljob.dev/exit-code", "3")], Phase::Failed, Some("Exception"), 3);
row!(
    stuck_container_creating_times_out,
    &[("sim.fljob.dev/waiting-reason", "ContainerCreating")],
    |j: &mut FLJob| j.spec.pending_timeout_seconds = Some(2),
    Phase::Failed,
    Some("StartTimeout"),
    104
);
row!(
    deadline_exceeded,
    &[("sim.fljob.dev/run-seconds", "never")],
    |j: &mut FLJob| {
        j.spec.active_deadline_seconds = Some(2);
        j.spec.abort_grace_period_seconds = Some(1);
    },
    Phase::Aborted,
    Some("DeadlineExceeded"),
    9
);

/// Pod-level failures the kubelet reports while the pod is Pending: the job fails fast and the pod is removed.
async fn pending_failure(prefix: &str, sim: &[(&str, &str)], reason: &str, code: i32) {
    let (env, j) = run_row(prefix, sim, |_| {}).await;
    expect(&j, Phase::Failed, Some(reason), code);
    let pods: Api<Pod> = env.ns.api();
    common::wait_gone(&pods, st(&j).pod_name.as_deref().unwrap(), Duration::from_secs(30)).await.expect("pod removed");
    env.wait_event("row", &format!("{reason}:")).await;
    env.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_pull_error_is_image_pull_failed() {
    for reason in ["ErrImagePull", "ImagePullBackOff", "InvalidImageName"] {
        pending_failure(&format!("pull-{reason}"), &[("sim.fljob.dev/image-pull-error", reason)], "ImagePullFailed", 104).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_container_config_error_is_config_error() {
    pending_failure("ccce", &[("sim.fljob.dev/waiting-reason", "CreateContainerConfigError")], "ConfigError", 103).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unschedulable_past_the_pending_timeout() {
    let mut s = site(Capacity::default());
    s.spec.pending_timeout_seconds = Some(3);
    let env = Env::with_site("unsched", s).await;
    env.create(&job("row", &[("sim.fljob.dev/unschedulable", "true")])).await;
    let j = wait_job(&env.jobs, "row", 60, finished).await;
    expect(&j, Phase::Failed, Some("Unschedulable"), 104);
    assert!(st(&j).message.unwrap().contains("node"), "the scheduler's message is kept");
    env.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_honoured_by_the_worker() {
    let env = Env::new("abort-row", Capacity::default()).await;
    env.create(&job("row", &[("sim.fljob.dev/run-seconds", "never"), ("sim.fljob.dev/abort-exit-code", "0")])).await;
    wait_job(&env.jobs, "row", 60, |j| st(j).phase == Phase::Running).await;
    env.jobs.patch("row", &PatchParams::default(), &Patch::Merge(serde_json::json!({"spec": {"abort": true}}))).await.unwrap();
    let j = wait_job(&env.jobs, "row", 60, finished).await;
    expect(&j, Phase::Aborted, Some("Aborted"), 0);
    let a = st(&j).abort.unwrap();
    assert_eq!(a.method, Some(AbortMethod::Graceful));
    let pod = pod_of(&env, &j).await.expect("a gracefully stopped pod is kept for its logs");
    assert_eq!(pod.annotations().get("fljob.dev/abort").map(String::as_str), Some("App"));
    env.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_deleted_by_someone_else_is_pod_lost() {
    let env = Env::new("podlost", Capacity::default()).await;
    env.create(&job("row", &[("sim.fljob.dev/run-seconds", "never")])).await;
    let j = wait_job(&env.jobs, "row", 60, |j| st(j).phase == Phase::Running).await;
    let pods: Api<Pod> = env.ns.api();
    pods.delete(st(&j).pod_name.as_deref().unwrap(), &DeleteParams::default()).await.unwrap();
    let j = wait_job(&env.jobs, "row", 60, finished).await;
    expect(&j, Phase::Failed, Some("PodLost"), 127);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(pods.list(&ListParams::default()).await.unwrap().items.is_empty(), "no second pod");
    env.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_pod_is_what_nvflare_expects() {
    let env = Env::new("podshape", Capacity::default()).await;
    env.create(&job("row", &[("sim.fljob.dev/run-seconds", "never")])).await;
    let j = wait_job(&env.jobs, "row", 60, |j| st(j).phase == Phase::Running).await;
    assert_eq!(st(&j).client_status.as_deref(), Some("started"));
    let pod = pod_of(&env, &j).await.unwrap();
    let c = &pod.spec.as_ref().unwrap().containers[0];
    let cmd = c.command.clone().unwrap().join(" ");
    assert_eq!(
        cmd,
        "python -u -m fljob_launcher.worker -m /var/tmp/nvflare/workspace \
         -w /var/tmp/nvflare/workspace/startup -n row-0001 -c site-a -p tcp://site-a-cp:8004 \
         -g fl-server.example.org:8002 -scheme grpc -s fed_client.json --set secure_train=false print_conf=True"
    );
    assert!(!cmd.contains("test-token"), "no credential on the command line");
    let owner = &pod.owner_references()[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.controller), ("FLJob", "row", Some(true)));
    for l in ["app.kubernetes.io/managed-by", "fljob.dev/job", "fljob.dev/site"] {
        assert!(pod.labels().contains_key(l), "{l}");
    }
    // No meta ConfigMap any more (the worker gets meta.json through the workspace transfer), and no mount inside
    // the workspace but the startup kit.
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = env.ns.api();
    assert!(cms.get_opt(&format!("{}-meta", pod.name_any())).await.unwrap().is_none());
    let mounts = c.volume_mounts.clone().unwrap();
    assert!(mounts.iter().all(|m| m.mount_path == "/var/tmp/nvflare/workspace" || m.mount_path == "/var/tmp/nvflare/workspace/startup" || !m.mount_path.starts_with("/var/tmp/nvflare/workspace")), "{mounts:?}");
    // Status and events never carry Secret values.
    let text = serde_json::to_string(&j).unwrap() + &env.events_for("row").await.join("\n") + &env.op.logs();
    assert!(!text.contains("test-token") && !text.contains("test-signature"));
    env.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_pass_the_restricted_pod_security_profile() {
    fl::install_crds();
    let client = common::client().await;
    let ns = common::namespace_with_labels(&client, "restricted", &[("pod-security.kubernetes.io/enforce", "restricted")]).await;
    create_site(&client, ns.name(), &site(Capacity::default())).await;
    let op = Operator::start(ns.name());
    let jobs: Api<FLJob> = ns.api();
    jobs.create(&PostParams::default(), &job("row", &[])).await.unwrap();
    let j = wait_job(&jobs, "row", 60, finished).await;
    assert_eq!(st(&j).phase, Phase::Succeeded, "{:#?}\n{}", st(&j), op.logs());
    drop(op);
    ns.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_site_waits_then_proceeds() {
    fl::install_crds();
    let client = common::client().await;
    let ns = common::namespace(&client, "nosite").await;
    let op = Operator::start(ns.name());
    let jobs: Api<FLJob> = ns.api();
    jobs.create(&PostParams::default(), &job("row", &[])).await.unwrap();
    let j = wait_job(&jobs, "row", 60, |j| {
        find_condition(&st(j).conditions, "Resolved").is_some_and(|c| c.reason == "SiteNotFound")
    })
    .await;
    assert_eq!(st(&j).phase, Phase::Pending);
    let msg = find_condition(&st(&j).conditions, "Resolved").unwrap().message.clone();
    assert!(msg.contains("\"site-a\""), "{msg}");
    // Quiet while it waits: no retries hammering the API server.
    let before = op.counter("fljob_reconciles_total", &[("controller", "fljob")]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = op.counter("fljob_reconciles_total", &[("controller", "fljob")]).await;
    assert!(after - before <= 1.0, "hot loop: {before} -> {after} reconciles");
    create_site(&client, ns.name(), &site(Capacity::default())).await;
    let j = wait_job(&jobs, "row", 60, finished).await;
    assert_eq!(st(&j).phase, Phase::Succeeded);
    let env = Env { client, ns, op, jobs };
    let events = env.wait_event("row", "SiteNotFound:").await;
    assert!(events.iter().any(|e| e.starts_with("SiteNotFound:") && e.contains("site-a")), "{events:#?}");
    env.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_secret_key_waits_then_proceeds() {
    fl::install_crds();
    let client = common::client().await;
    let ns = common::namespace(&client, "nosecret").await;
    let sites: Api<FLSite> = ns.api();
    sites.create(&PostParams::default(), &site(Capacity::default())).await.unwrap();
    let secrets: Api<Secret> = ns.api();
    secrets.create(&PostParams::default(), &secret("site-a-startup", &["fed_client.json"])).await.unwrap();
    secrets.create(&PostParams::default(), &secret("site-a-creds", &["token", "ssid"])).await.unwrap();
    let op = Operator::start(ns.name());
    let jobs: Api<FLJob> = ns.api();
    jobs.create(&PostParams::default(), &job("row", &[])).await.unwrap();
    let j = wait_job(&jobs, "row", 60, |j| {
        find_condition(&st(j).conditions, "Resolved").is_some_and(|c| c.reason == "SecretNotFound")
    })
    .await;
    let msg = find_condition(&st(&j).conditions, "Resolved").unwrap().message.clone();
    assert!(msg.contains("site-a-creds") && msg.contains("signature"), "{msg}");
    assert!(st(&j).pod_name.is_none(), "no pod while a key is missing");
    secrets.replace("site-a-creds", &PostParams::default(), &secret("site-a-creds", &["token", "signature", "ssid"])).await.unwrap();
    let j = wait_job(&jobs, "row", 60, finished).await;
    assert_eq!(st(&j).phase, Phase::Succeeded);
    let env = Env { client, ns, op, jobs };
    let events = env.wait_event("row", "SecretNotFound:").await;
    assert!(events.iter().any(|e| e.starts_with("SecretNotFound:") && e.contains("signature")), "{events:#?}");
    env.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_restart_mid_run_continues_with_one_pod() {
    let mut env = Env::new("restart", Capacity::default()).await;
    env.create(&job("row", &[("sim.fljob.dev/run-seconds", "8"), ("sim.fljob.dev/exit-code", "101")])).await;
    let j = wait_job(&env.jobs, "row", 60, |j| st(j).phase == Phase::Running).await;
    let uid = pod_of(&env, &j).await.unwrap().uid();
    env.op.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.op.restart();
    let j = wait_job(&env.jobs, "row", 60, finished).await;
    expect(&j, Phase::Failed, Some("Exception"), 101);
    let pods: Api<Pod> = env.ns.api();
    let all = pods.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(all.len(), 1, "exactly one pod");
    assert_eq!(all[0].uid(), uid, "the same pod");
    assert!(st(&j).start_time.is_some());
    env.done().await;
}

/// Issue 11 #4: a worker that ended while the operator was down, and whose pod someone then deleted, was taken for
/// one that never ran and started a second time. The pod's tracking finalizer keeps it until its end is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_ended_while_the_operator_was_down_is_never_started_again() {
    let mut env = Env::new("ended-down", Capacity::default()).await;
    let uids = watch_pod_uids(&env.client, env.ns.name());
    env.create(&job("row", &[("sim.fljob.dev/start-delay", "3s"), ("sim.fljob.dev/run-seconds", "1")])).await;
    let j = wait_job(&env.jobs, "row", 60, |j| st(j).pod_name.is_some()).await;
    let pods: Api<Pod> = env.ns.api();
    let name = st(&j).pod_name.unwrap();
    common::wait_for(&pods, &name, Duration::from_secs(30), |_: &Pod| true).await.unwrap();
    env.op.kill(); // before the operator saw the worker start (it starts 3 s after scheduling)
    let pod = common::wait_for(&pods, &name, Duration::from_secs(60), |p: &Pod| common::phase(p) == "Succeeded").await.unwrap();
    assert_eq!(pod.finalizers(), ["fljob.dev/pod-tracking"]);
    pods.delete(&name, &DeleteParams::default()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let kept = pods.get(&name).await.expect("the pod stays until its end is recorded");
    assert!(kept.metadata.deletion_timestamp.is_some());
    env.op.restart();
    let j = wait_job(&env.jobs, "row", 60, finished).await;
    assert_eq!((st(&j).phase, st(&j).exit_code), (Phase::Succeeded, Some(0)), "its own outcome: {:#?}", st(&j));
    common::wait_gone(&pods, &name, Duration::from_secs(30)).await.expect("released once recorded");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen = uids.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "one pod ever: {seen:?}");
    env.done().await;
}

/// A worker pod whose FLJob went without the operator (someone removed the FLJob's finalizer by hand) is let go, so
/// the garbage collector can remove it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_pod_whose_fljob_is_gone_is_released() {
    let mut env = Env::new("orphan", Capacity::default()).await;
    env.create(&job("row", &[("sim.fljob.dev/run-seconds", "never")])).await;
    let j = wait_job(&env.jobs, "row", 60, |j| st(j).phase == Phase::Running).await;
    env.op.kill();
    let patch = serde_json::json!({"metadata": {"finalizers": null}});
    env.jobs.patch("row", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    env.jobs.delete("row", &DeleteParams::default()).await.unwrap();
    common::wait_gone(&env.jobs, "row", Duration::from_secs(30)).await.unwrap();
    let pods: Api<Pod> = env.ns.api();
    let name = st(&j).pod_name.unwrap();
    let p = common::wait_for(&pods, &name, Duration::from_secs(60), |p: &Pod| p.metadata.deletion_timestamp.is_some()).await.unwrap();
    assert_eq!(p.finalizers(), ["fljob.dev/pod-tracking"], "the garbage collector waits for the operator");
    env.op.restart();
    common::wait_gone(&pods, &name, Duration::from_secs(90)).await.expect("the operator lets the orphan go");
    env.done().await;
}

/// Issue 11 #15: Helm 4's `--wait` (kstatus), `kubectl wait` and GitOps tools read an FLJob's health from
/// `observedGeneration` and the kstatus conditions `Reconciling` / `Stalled`: a running job is Current, a queued one
/// is in progress, one waiting on a missing site is stalled, and a finished job still acknowledges a spec change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_wait_and_kubectl_wait_read_the_truth() {
    let env = Env::new("kstatus", Capacity { jobs: Some(1), ..Default::default() }).await;
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("kstatus-chart-{}", env.ns.name()));
    std::fs::create_dir_all(dir.join("templates")).unwrap();
    std::fs::write(dir.join("Chart.yaml"), "apiVersion: v2\nname: one-fljob\nversion: 0.1.0\n").unwrap();
    let template = r#"apiVersion: fljob.dev/v1alpha1
kind: FLJob
metadata:
  name: {{ .Release.Name }}
spec:
  jobId: {{ .Release.Name }}-0001
  site: {{ .Values.site }}
  podTemplate:
    metadata:
      annotations:
        sim.fljob.dev/run-seconds: "never"
"#;
    std::fs::write(dir.join("templates/fljob.yaml"), template).unwrap();
    let helm = |release: &str, site: &str, timeout: &str| {
        let t0 = std::time::Instant::now();
        let out = std::process::Command::new(common::tool("helm"))
            .args(["--kubeconfig"])
            .arg(common::kubeconfig_path())
            .args(["install", release])
            .arg(&dir)
            .args(["-n", env.ns.name(), "--set", &format!("site={site}"), "--wait=watcher", "--timeout", timeout])
            .output()
            .expect("run helm");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text, t0.elapsed())
    };
    // Running: Current, so `helm install --wait` returns once the worker runs.
    let (ok, out, took) = helm("runs", "site-a", "90s");
    assert!(ok, "helm --wait on a job that runs: {out}");
    let j = env.jobs.get("runs").await.unwrap();
    assert_eq!(st(&j).phase, Phase::Running, "helm returned after {took:?} with the job {:?}", st(&j).phase);
    // Queued behind it (the site holds one job): in progress, so --wait times out instead of lying.
    let (ok, out, _) = helm("queued", "site-a", "8s");
    assert!(!ok, "helm --wait must not call a queued job ready: {out}");
    let q = env.jobs.get("queued").await.unwrap();
    let reconciling = find_condition(&st(&q).conditions, "Reconciling").expect("Reconciling").clone();
    assert_eq!((st(&q).phase, reconciling.status.as_str()), (Phase::Queued, "True"), "{:#?}", st(&q).conditions);
    // A missing site: Stalled, which kubectl wait can wait for.
    let (ok, out, _) = helm("lost", "no-such-site", "8s");
    assert!(!ok, "{out}");
    let out = common::kubectl()
        .args(["wait", "-n", env.ns.name(), "--for=condition=Stalled", "fljob/lost", "--timeout=30s"])
        .output()
        .unwrap();
    assert!(out.status.success(), "kubectl wait --for=condition=Stalled: {}", String::from_utf8_lossy(&out.stderr));
    let lost = env.jobs.get("lost").await.unwrap();
    let stalled = find_condition(&st(&lost).conditions, "Stalled").unwrap().clone();
    assert!(stalled.reason == "SiteNotFound" && stalled.message.contains("no-such-site"), "{stalled:?}");
    // A finished job acknowledges a later spec change (observedGeneration), its outcome unchanged.
    env.jobs.patch("runs", &PatchParams::default(), &Patch::Merge(serde_json::json!({"spec": {"abort": true}}))).await.unwrap();
    let done = wait_job(&env.jobs, "runs", 60, finished).await;
    let generation = done.metadata.generation;
    let ttl = serde_json::json!({"spec": {"ttlSecondsAfterFinished": 3600}});
    env.jobs.patch("runs", &PatchParams::default(), &Patch::Merge(&ttl)).await.unwrap();
    let later = wait_job(&env.jobs, "runs", 30, move |j| j.metadata.generation > generation && st(j).observed_generation == j.metadata.generation).await;
    assert_eq!((st(&later).phase, st(&later).exit_code), (st(&done).phase, st(&done).exit_code));
    for c in ["Reconciling", "Stalled"] {
        assert_eq!(find_condition(&st(&later).conditions, c).map(|c| c.status.as_str()), Some("False"), "{c}: an aborted job is Current");
    }
    // The Argo CD health check shipped in examples/gitops/, run by Lua 5.1 (Argo CD's gopher-lua speaks 5.1) on the
    // live objects, and on a failed copy.
    let queued = env.jobs.get("queued").await.unwrap();
    let mut failed = serde_json::to_value(&later).unwrap();
    failed["status"]["phase"] = "Failed".into();
    failed["status"]["reason"] = "Exception".into();
    for (obj, want) in [
        (serde_json::to_value(&later).unwrap(), "Healthy"),
        (serde_json::to_value(&queued).unwrap(), "Progressing"),
        (serde_json::to_value(&lost).unwrap(), "Degraded"),
        (failed, "Degraded"),
    ] {
        let (status, message) = argocd_health(&dir, &obj);
        assert_eq!(status, want, "{}: {message}", obj["metadata"]["name"]);
        eprintln!("argocd health {} ({}): {status}: {message}", obj["metadata"]["name"], obj["status"]["phase"]);
    }
    let _ = std::fs::remove_dir_all(&dir);
    env.done().await;
}

/// Runs examples/gitops/argocd-health.lua on an object the way Argo CD does (the object as the global `obj`, the
/// chunk returns `{status, message}`), with `lua5.1` and lua-cjson (hack/test.sh installs them).
fn argocd_health(dir: &std::path::Path, obj: &serde_json::Value) -> (String, String) {
    let input = dir.join("obj.json");
    std::fs::write(&input, obj.to_string()).unwrap();
    let driver = r#"local cjson = require("cjson")
local f = assert(io.open(arg[1])); obj = cjson.decode(f:read("*a")); f:close()
local hs = assert(loadfile(arg[2]))()
io.write(hs.status, "\t", hs.message or "")"#;
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/gitops/argocd-health.lua");
    let driver_file = dir.join("driver.lua");
    std::fs::write(&driver_file, driver).unwrap();
    let out = std::process::Command::new("lua5.1")
        .arg(&driver_file)
        .arg(&input)
        .arg(&script)
        .output()
        .expect("lua5.1 (apt-get install lua5.1 lua-cjson; make test installs them)");
    assert!(out.status.success(), "lua: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, message) = text.split_once('\t').unwrap_or((&text, ""));
    (status.to_string(), message.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_cluster_sees_no_writes() {
    let env = Env::new("steady", Capacity::default()).await;
    env.create(&job("row", &[("sim.fljob.dev/run-seconds", "never")])).await;
    wait_job(&env.jobs, "row", 60, |j| st(j).phase == Phase::Running).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes = |m: &str| {
        ["create", "update", "patch", "delete"].iter().map(|v| sum_samples(m, "fljob_api_requests_total", &[("verb", v)])).sum::<f64>()
    };
    let before = writes(&env.op.metrics().await);
    assert!(before > 0.0, "the counter counts");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = writes(&env.op.metrics().await);
    assert_eq!(before, after, "writes while nothing changed");
    env.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_validates_bad_input() {
    fl::install_crds();
    let client = common::client().await;
    let ns = common::namespace(&client, "validate").await;
    let jobs: Api<FLJob> = ns.api();
    let reject = |j: FLJob, words: &'static [&'static str]| {
        let jobs = jobs.clone();
        async move {
            let err = jobs.create(&PostParams::default(), &j).await.expect_err("must be rejected").to_string();
            for w in words {
                assert!(err.contains(w), "{err} lacks {w}");
            }
        }
    };
    let mut j = job("bad-option", &[]);
    j.spec.options = vec!["no equals sign".into()];
    reject(j, &["key=value"]).await;
    let mut j = job("bad-cpu", &[]);
    j.spec.resources = Some(Resources { cpu: Some(Quantity("lots".into())), memory: None, gpus: None, ephemeral_storage: None });
    reject(j, &["cpu", "quantity"]).await;
    let mut j = job("bad-grace", &[]);
    j.spec.abort_grace_period_seconds = Some(-1);
    reject(j, &["abortGracePeriodSeconds"]).await;
    let mut j = job("bad-env", &[]);
    j.spec.pod_template.as_mut().unwrap().spec.as_mut().unwrap().env =
        vec![k8s_openapi::api::core::v1::EnvVar { name: "NVFLARE_JOB_AUTH_TOKEN".into(), value: Some("x".into()), ..Default::default() }];
    reject(j, &["credentialsSecret"]).await;
    // jobId, site and resources are immutable; an abort cannot be withdrawn.
    let mut ok = job("ok", &[]);
    ok.spec.resources = Some(Resources { cpu: Some(Quantity("1".into())), ..Default::default() });
    jobs.create(&PostParams::default(), &ok).await.unwrap();
    let e = jobs.patch("ok", &PatchParams::default(), &Patch::Merge(serde_json::json!({"spec": {"jobId": "other"}}))).await;
    assert!(e.expect_err("immutable").to_string().contains("jobId is immutable"));
    let e = jobs.patch("ok", &PatchParams::default(), &Patch::Merge(serde_json::json!({"spec": {"site": "other"}}))).await;
    assert!(e.expect_err("immutable").to_string().contains("site is immutable"));
    let e = jobs.patch("ok", &PatchParams::default(), &Patch::Merge(serde_json::json!({"spec": {"resources": {"cpu": "64"}}}))).await;
    assert!(e.expect_err("immutable").to_string().contains("resources are immutable"));
    jobs.patch("ok", &PatchParams::default(), &Patch::Merge(serde_json::json!({"spec": {"abort": true}}))).await.unwrap();
    let e = jobs.patch("ok", &PatchParams::default(), &Patch::Merge(serde_json::json!({"spec": {"abort": false}}))).await;
    assert!(e.expect_err("final").to_string().contains("cannot be withdrawn"));
    let sites: Api<FLSite> = ns.api();
    let mut s = site(Capacity { cpu: Some(Quantity("-1".into())), ..Default::default() });
    s.spec.server.target = "no-port".into();
    let err = sites.create(&PostParams::default(), &s).await.expect_err("rejected").to_string();
    assert!(err.contains("host:port") && err.contains("capacity.cpu"), "{err}");
    ns.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_shows_useful_columns_and_explains_fields() {
    let env = Env::new("columns", Capacity { jobs: Some(2), ..Default::default() }).await;
    env.create(&job("row", &[("sim.fljob.dev/exit-code", "102")])).await;
    wait_job(&env.jobs, "row", 60, finished).await;
    let out = common::kubectl().args(["get", "flj", "-n", env.ns.name()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let header: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "SITE", "PHASE", "CLIENT-STATUS", "EXIT", "REASON", "AGE"]);
    let row = text.lines().nth(1).unwrap();
    for w in ["row", "site-a", "Failed", "exception", "102", "UnsafeComponent"] {
        assert!(row.contains(w), "{row} lacks {w}");
    }
    let out = common::kubectl().args(["get", "fls", "-n", env.ns.name()]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).lines().next().unwrap().contains("MAX-JOBS"));
    // Every form a user types names one object or kind: singular, plural, short name, group-qualified; the
    // category `fl` lists both kinds.
    let ns = env.ns.name();
    for args in [
        vec!["get", "fljob", "row"], vec!["get", "fljobs", "row"], vec!["get", "flj", "row"], vec!["get", "fljob.fljob.dev", "row"],
        vec!["describe", "fljob", "row"], vec!["get", "flsite", "site-a"], vec!["describe", "flsite", "site-a"], vec!["get", "fls", "site-a"],
        vec!["get", "fl"],
    ] {
        let out = common::kubectl().args(&args).args(["-n", ns]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let want = if args[1].starts_with("fls") || args[1] == "flsite" { "site-a" } else { "row" };
        assert!(text.contains(want), "kubectl {args:?}: {text}");
    }
    let all = String::from_utf8_lossy(&common::kubectl().args(["get", "fl", "-n", ns]).output().unwrap().stdout).into_owned();
    assert!(all.contains("fljob.fljob.dev/row") && all.contains("flsite.fljob.dev/site-a"), "{all}");
    let out = common::kubectl().args(["explain", "fljob.spec.abort"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(text.contains("abort the job") && text.contains("abortGracePeriodSeconds"), "{text}");
    env.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_applies() {
    fl::install_crds();
    let client = common::client().await;
    let ns = common::namespace(&client, "examples").await;
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).map(|e| e.path()).collect();
    files.sort();
    assert!(files.iter().any(|f| f.extension().is_some_and(|x| x == "yaml")), "examples/ has manifests");
    for f in files.iter().filter(|f| f.extension().is_some_and(|x| x == "yaml")) {
        let out = common::kubectl().args(["apply", "-n", ns.name(), "-f"]).arg(f).output().unwrap();
        assert!(out.status.success(), "{}: {}", f.display(), String::from_utf8_lossy(&out.stderr));
    }
    ns.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_the_api_server_refuses_fails_the_job_with_config_error() {
    fl::install_crds();
    let client = common::client().await;
    let ns = common::namespace_with_labels(&client, "refused", &[("pod-security.kubernetes.io/enforce", "restricted")]).await;
    // The site allows hostPath (its podPolicy), the namespace's Pod Security does not: the API server refuses.
    let mut s = site(Capacity { jobs: Some(1), ..Default::default() });
    s.spec.pod_policy.allow_host_path = true;
    create_site(&client, ns.name(), &s).await;
    let op = Operator::start(ns.name());
    let jobs: Api<FLJob> = ns.api();
    let mut j = job("row", &[]);
    let volume: k8s_openapi::api::core::v1::Volume =
        serde_json::from_value(serde_json::json!({"name": "host", "hostPath": {"path": "/var/run"}})).unwrap();
    j.spec.pod_template.as_mut().unwrap().spec.as_mut().unwrap().volumes = vec![volume];
    jobs.create(&PostParams::default(), &j).await.unwrap();
    let done = wait_job(&jobs, "row", 60, finished).await;
    let s = st(&done);
    assert_eq!((s.phase, s.reason.as_deref(), s.exit_code), (Phase::Failed, Some("ConfigError"), Some(103)), "{s:#?}");
    assert!(s.message.as_deref().unwrap_or_default().contains("hostPath"), "{s:#?}");
    // The quota it held goes back: the next job runs.
    jobs.create(&PostParams::default(), &job("next", &[])).await.unwrap();
    let next = wait_job(&jobs, "next", 60, finished).await;
    assert_eq!(st(&next).phase, Phase::Succeeded);
    let env = Env { client, ns, op, jobs };
    env.done().await;
}

/// `/readyz` answers 200 only once the caches have synced: an operator whose API server cannot be reached is live
/// (`/healthz`) but never ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_synced_caches() {
    let admin = std::fs::read_to_string(common::kubeconfig_path()).unwrap();
    let server = admin.lines().find_map(|l| l.trim().strip_prefix("server: ")).unwrap().to_string();
    let closed = format!("https://127.0.0.1:{}", free_port());
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("readyz");
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("unreachable.kubeconfig");
    std::fs::write(&bad, admin.replace(&server, &closed)).unwrap();
    let op = Operator::start_with("readyz-nowhere", bad, &[]);
    let base = format!("http://127.0.0.1:{}", op.metrics_port);
    let mut live = false;
    for _ in 0..50 {
        if http_get(&format!("{base}/healthz")).await.is_ok() {
            live = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(live, "the operator serves /healthz:\n{}", op.logs());
    for _ in 0..15 {
        let r = http_get(&format!("{base}/readyz")).await;
        assert!(r.as_ref().is_err_and(|e| e.to_string().contains("503")), "ready without caches: {r:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(op);
    let env = Env::new("readyz", Capacity::default()).await;
    let url = format!("http://127.0.0.1:{}/readyz", env.op.metrics_port);
    let mut ready = false;
    for _ in 0..100 {
        if http_get(&url).await.is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "never ready:\n{}", env.op.logs());
    assert!(env.op.logs().contains("caches synced; ready"));
    env.done().await;
}

/// The site decides what a job's pod may ask for: another ServiceAccount, a token projection, a Secret volume or
/// Secret env fail the job before any pod exists (PolicyViolation, a condition and an Event naming the field and the
/// rule), without a quota leak, while a job the policy allows runs; allowing it in the FLSite lets the next one run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_pod_policy_denies_escalation_by_default() {
    let env = Env::new("policy", Capacity { jobs: Some(1), ..Default::default() }).await;
    fn tmpl(j: &mut FLJob) -> &mut PodTemplateSpec {
        j.spec.pod_template.as_mut().unwrap().spec.as_mut().unwrap()
    }
    let mut sa = job("as-admin", &[]);
    tmpl(&mut sa).service_account_name = Some("admin".into());
    let mut token: FLJob = job("token", &[]);
    tmpl(&mut token).volumes = vec![serde_json::from_value(serde_json::json!(
        {"name": "tok", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "audience": "vault"}}]}}
    )).unwrap()];
    let mut secret_env = job("secret-env", &[]);
    tmpl(&mut secret_env).env = vec![serde_json::from_value(serde_json::json!(
        {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "site-a-creds", "key": "token"}}}
    )).unwrap()];
    for j in [&sa, &token, &secret_env] {
        env.create(j).await;
    }
    env.create(&job("plain", &[])).await;
    for (name, field, rule) in [
        ("as-admin", "serviceAccountName", "allowedServiceAccounts"),
        ("token", "volumes[tok]", "allowTokenVolumes"),
        ("secret-env", "env[PW]", "allowSecretEnv"),
    ] {
        let j = wait_job(&env.jobs, name, 60, finished).await;
        let s = st(&j);
        assert_eq!((s.phase, s.reason.as_deref(), s.exit_code), (Phase::Failed, Some("PolicyViolation"), Some(103)), "{name}: {s:#?}");
        let msg = s.message.clone().unwrap_or_default();
        assert!(msg.contains(field) && msg.contains(rule), "{name}: {msg}");
        assert!(s.pod_name.is_none() && s.allocation.is_none(), "{name} never had a pod or quota: {s:#?}");
        let events = env.wait_event(name, "PolicyViolation:").await;
        assert!(events.iter().any(|e| e.contains(rule)), "{events:?}");
    }
    let plain = wait_job(&env.jobs, "plain", 60, finished).await;
    assert_eq!(st(&plain).phase, Phase::Succeeded, "the allowed job ran: {:#?}", st(&plain));
    let pods: Api<Pod> = env.ns.api();
    let names: Vec<String> = pods.list(&ListParams::default()).await.unwrap().items.iter().map(|p| p.name_any()).collect();
    assert_eq!(names.len(), 1, "only the allowed job got a pod: {names:?}");
    // The site allows that ServiceAccount: a new job asking for it runs.
    let sites: Api<FLSite> = env.ns.api();
    let patch = serde_json::json!({"spec": {"podPolicy": {"allowedServiceAccounts": ["admin"]}}});
    sites.patch("site-a", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = env.ns.api();
    sas.create(&PostParams::default(), &serde_json::from_value(serde_json::json!({"metadata": {"name": "admin"}})).unwrap()).await.unwrap();
    let mut again = job("as-admin-2", &[]);
    tmpl(&mut again).service_account_name = Some("admin".into());
    env.create(&again).await;
    let j = wait_job(&env.jobs, "as-admin-2", 60, finished).await;
    assert_eq!(st(&j).phase, Phase::Succeeded, "{:#?}", st(&j));
    let drained = |s: &FLSite| s.status.as_ref().is_some_and(|st| st.allocations.is_empty() && st.used.jobs == 0);
    common::wait_for(&sites, "site-a", Duration::from_secs(30), drained).await.expect("no quota leak");
    env.done().await;
}

/// Leader election judges a lease by what this replica saw change and when (its own monotonic clock), never by the
/// holder's `renewTime`: a live holder whose clock runs an hour behind keeps its lease, and a dead one whose clock ran
/// an hour ahead loses it after one lease duration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_election_does_not_trust_the_holders_clock() {
    use fljob_operator::leader::Elector;
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use k8s_openapi::jiff::{SignedDuration, Timestamp};
    let client = common::client().await;
    let ns = common::namespace(&client, "lease-clock").await;
    let leases: Api<Lease> = ns.api();
    let shifted = |by: i64| MicroTime(Timestamp::now().checked_add(SignedDuration::from_secs(by)).unwrap());
    let lease: Lease = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "l"},
        "spec": {"holderIdentity": "other", "leaseDurationSeconds": 3, "renewTime": shifted(-3600), "leaseTransitions": 0}
    }))
    .unwrap();
    leases.create(&PostParams::default(), &lease).await.unwrap();
    // The live holder, an hour behind: renews every 500 ms.
    let renewer = {
        let leases = leases.clone();
        tokio::spawn(async move {
            loop {
                let mut l = leases.get("l").await.unwrap();
                l.spec.as_mut().unwrap().renew_time = Some(shifted(-3600));
                let _ = leases.replace("l", &PostParams::default(), &l).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let me = Elector::new(client.clone(), ns.name(), "l", "me", Duration::from_secs(3));
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(6) {
        assert!(!me.try_acquire().await.unwrap(), "took a live holder's lease because its clock is behind");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    renewer.abort();
    // Dead now, and its last renewTime an hour in the future.
    let mut l = leases.get("l").await.unwrap();
    l.spec.as_mut().unwrap().renew_time = Some(shifted(3600));
    leases.replace("l", &PostParams::default(), &l).await.unwrap();
    let dead_at = std::time::Instant::now();
    loop {
        if me.try_acquire().await.unwrap() {
            break;
        }
        assert!(dead_at.elapsed() < Duration::from_secs(10), "never took over from a dead holder whose clock was ahead");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let took = dead_at.elapsed().as_secs_f64();
    assert!(took >= 2.9, "took over before a whole lease duration: {took}");
    assert_eq!(leases.get("l").await.unwrap().spec.unwrap().holder_identity.as_deref(), Some("me"));
    println!("lease: kept by a live holder 1h behind for 6 s; taken {took:.1}s after a holder 1h ahead stopped");
    ns.cleanup().await;
}
