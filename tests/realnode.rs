//! The operator against a real node: kubelet + containerd + runc (`FLJOB_REAL_NODES=1 make cluster-up`, which
//! `make test` does), real containers from images built here (hack/images.sh). The worker is
//! hack/images/fake-worker.sh in the busybox image: a real process started with the exact NVFlare command line,
//! driven by its `--set` options. Every namespace here enforces Pod Security `restricted`, so every pod these tests
//! run was admitted by it, unchanged, and started as the non-root user the operator sets.

mod common;
mod fl;

use common::{kubectl, namespace_with_labels};
use fl::*;
use fljob_operator::api::*;
use k8s_openapi::api::core::v1::{Pod, Toleration};
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The real node's name, or None when the suite runs without one (`FLJOB_REAL_NODES=0`: the tests say so and pass
/// nothing off as checked). Anything else without a node is a setup error, not a skip.
fn real_node() -> Option<String> {
    if std::env::var("FLJOB_REAL_NODES").as_deref() == Ok("0") {
        eprintln!("FLJOB_REAL_NODES=0: real-node test not run");
        return None;
    }
    let node = std::env::var("FLJOB_REAL_NODE").unwrap_or_else(|_| {
        panic!("FLJOB_REAL_NODE is not set: run `make test` (it starts the real node), or FLJOB_REAL_NODES=0 to leave these out")
    });
    Some(node)
}

/// An image reference built and imported by hack/images.sh (exported by hack/test.sh as FLJOB_IMAGE_<NAME>).
fn image(name: &str) -> String {
    let var = format!("FLJOB_IMAGE_{}", name.to_ascii_uppercase());
    std::env::var(&var).unwrap_or_else(|_| panic!("{var} is not set: run `make test`"))
}

/// site-a with the busybox image and the fake worker as its "python".
fn real_site(capacity: Capacity) -> FLSite {
    let mut s = site(capacity);
    s.spec.defaults.image = image("busybox");
    s.spec.defaults.python_path = Some("/bin/fake-worker".into());
    s.spec.defaults.resources = Some(Resources { cpu: Some(Quantity("100m".into())), memory: Some(Quantity("64Mi".into())), gpus: None, ephemeral_storage: None });
    // One test reads a Secret key from the template's env (to get a real CreateContainerConfigError).
    s.spec.pod_policy.allow_secret_env = true;
    s
}

/// A job for the real node whose fake worker acts on `opts` (`exit_code=`, `run_seconds=`, ...).
fn real_job(name: &str, opts: &[&str]) -> FLJob {
    let mut j = job(name, &[]);
    j.spec.options = opts.iter().map(|o| o.to_string()).collect();
    let spec = j.spec.pod_template.as_mut().unwrap().spec.as_mut().unwrap();
    spec.node_selector = BTreeMap::from([("fljob.dev/real-node".to_string(), "true".to_string())]);
    spec.tolerations = vec![Toleration {
        key: Some("fljob.dev/real-node".into()),
        operator: Some("Equal".into()),
        value: Some("true".into()),
        effect: Some("NoSchedule".into()),
        ..Default::default()
    }];
    j
}

/// A namespace enforcing Pod Security `restricted`, the site, and the operator.
async fn real_env(prefix: &str, capacity: Capacity) -> Env {
    install_crds();
    let client = common::client().await;
    let ns = namespace_with_labels(&client, prefix, &[("pod-security.kubernetes.io/enforce", "restricted")]).await;
    create_site(&client, ns.name(), &real_site(capacity)).await;
    let op = Operator::start(ns.name());
    let jobs = ns.api::<FLJob>();
    Env { client, ns, op, jobs }
}

async fn pod_of(env: &Env, j: &FLJob) -> Pod {
    let pods: Api<Pod> = env.ns.api();
    let name = st(j).pod_name.clone().expect("status.podName");
    pods.get(&name).await.unwrap_or_else(|e| panic!("pod {name}: {e}"))
}

/// The worker container's terminated exit code as the real kubelet reported it.
fn container_exit(pod: &Pod) -> Option<i32> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    let worker = statuses.iter().find(|c| c.name == "worker")?;
    Some(worker.state.as_ref()?.terminated.as_ref()?.exit_code)
}

fn kubectl_out(args: &[&str]) -> String {
    let out = kubectl().args(args).output().expect("run kubectl");
    assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn secs(from: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time, to: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> f64 {
    (millis(to) - millis(from)) as f64 / 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_exit_codes() {
    let Some(node) = real_node() else { return };
    let env = real_env("real-exit", Capacity::default()).await;
    type Row = (&'static str, &'static [&'static str], Phase, Option<&'static str>, i32);
    let rows: [Row; 4] = [
        ("ok", &["exit_code=0"], Phase::Succeeded, None, 0),
        ("unsafe", &["exit_code=102"], Phase::Failed, Some("UnsafeComponent"), 102),
        ("config", &["exit_code=103"], Phase::Failed, Some("ConfigError"), 103),
        ("exec-error", &["exit_code=1", "run_seconds=3"], Phase::Failed, Some("ExecutionError"), 1),
    ];
    let t0 = Instant::now();
    for (name, opts, ..) in &rows {
        env.create(&real_job(name, opts)).await;
    }
    for (name, _, phase, reason, code) in rows {
        let j = wait_job(&env.jobs, name, 120, finished).await;
        let s = st(&j);
        assert_eq!((s.phase, s.reason.as_deref(), s.exit_code), (phase, reason, Some(code)), "{name}: {s:#?}");
        let pod = pod_of(&env, &j).await;
        assert_eq!(pod.spec.as_ref().unwrap().node_name.as_deref(), Some(node.as_str()), "{name} ran on the real node");
        assert_eq!(container_exit(&pod), Some(code), "{name}: the real container's exit code");
        println!("real exit {code}: {name} -> {:?} {:?} after {:.1}s", s.phase, s.reason, t0.elapsed().as_secs_f64());
    }
    // The exit-1 job was seen running first: the operator's Started condition came from the real container state.
    let j = wait_job(&env.jobs, "exec-error", 5, finished).await;
    assert!(st(&j).conditions.iter().any(|c| c.type_ == "Started" && c.status == "True"), "{:#?}", st(&j).conditions);
    env.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_oom_killed() {
    let Some(_) = real_node() else { return };
    let env = real_env("real-oom", Capacity::default()).await;
    let mut j = real_job("oom", &["memory_mb=256", "run_seconds=30"]);
    j.spec.resources = Some(Resources { cpu: Some(Quantity("100m".into())), memory: Some(Quantity("32Mi".into())), gpus: None, ephemeral_storage: None });
    env.create(&j).await;
    let j = wait_job(&env.jobs, "oom", 120, finished).await;
    let s = st(&j);
    assert_eq!((s.phase, s.reason.as_deref(), s.exit_code), (Phase::Failed, Some("OOMKilled"), Some(137)), "{s:#?}");
    let pod = pod_of(&env, &j).await;
    let term = pod.status.unwrap().container_statuses.unwrap()[0].state.clone().unwrap().terminated.unwrap();
    assert_eq!(term.reason.as_deref(), Some("OOMKilled"), "the kernel's OOM kill, as the kubelet saw it");
    println!("real OOMKilled: exit {} under a 32Mi limit", term.exit_code);
    env.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_image_missing_secret_key_missing_and_mount_failing() {
    let Some(_) = real_node() else { return };
    let env = real_env("real-waiting", Capacity::default()).await;
    // An image that is nowhere: its registry is a closed port on loopback (no lookup leaves the machine).
    let mut missing = real_job("no-image", &[]);
    missing.spec.image = Some("127.0.0.1:1/fljob/not-there:1".into());
    env.create(&missing).await;
    // A key the credentials Secret does not have: the kubelet itself refuses to create the container.
    let mut nokey = real_job("no-key", &[]);
    nokey.spec.pod_template.as_mut().unwrap().spec.as_mut().unwrap().env = vec![k8s_openapi::api::core::v1::EnvVar {
        name: "EXTRA".into(),
        value_from: Some(k8s_openapi::api::core::v1::EnvVarSource {
            secret_key_ref: Some(k8s_openapi::api::core::v1::SecretKeySelector {
                name: "site-a-creds".into(),
                key: "no-such-key".into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }];
    env.create(&nokey).await;
    // A volume the kubelet cannot mount (its ConfigMap does not exist): the pod stays ContainerCreating with
    // FailedMount Events; the start timeout ends it.
    let mut nomount = real_job("no-mount", &[]);
    nomount.spec.pending_timeout_seconds = Some(8);
    let t = nomount.spec.pod_template.as_mut().unwrap().spec.as_mut().unwrap();
    t.volumes = vec![serde_json::from_value(serde_json::json!({"name": "cfg", "configMap": {"name": "not-there"}})).unwrap()];
    t.volume_mounts = vec![serde_json::from_value(serde_json::json!({"name": "cfg", "mountPath": "/etc/cfg"})).unwrap()];
    env.create(&nomount).await;
    let j = wait_job(&env.jobs, "no-mount", 120, finished).await;
    let s = st(&j);
    assert_eq!((s.phase, s.reason.as_deref(), s.exit_code), (Phase::Failed, Some("StartTimeout"), Some(104)), "{s:#?}");
    let sites: Api<FLSite> = env.ns.api();
    let uid = j.uid().unwrap_or_default();
    let free = move |s: &FLSite| !s.status.as_ref().is_some_and(|st| st.allocations.iter().any(|a| a.uid == uid));
    common::wait_for(&sites, &j.spec.site, Duration::from_secs(30), free).await.expect("its quota is released");
    println!("real FailedMount -> {:?}: {}", s.reason, s.message.clone().unwrap_or_default());
    let j = wait_job(&env.jobs, "no-image", 120, finished).await;
    let s = st(&j);
    assert_eq!((s.phase, s.reason.as_deref(), s.exit_code), (Phase::Failed, Some("ImagePullFailed"), Some(104)), "{s:#?}");
    assert!(s.message.as_deref().unwrap_or("").contains("ErrImagePull") || s.message.as_deref().unwrap_or("").contains("ImagePullBackOff"), "{s:#?}");
    println!("real missing image -> {:?}: {}", s.reason, s.message.unwrap_or_default());
    let j = wait_job(&env.jobs, "no-key", 120, finished).await;
    let s = st(&j);
    assert_eq!((s.phase, s.reason.as_deref(), s.exit_code), (Phase::Failed, Some("ConfigError"), Some(103)), "{s:#?}");
    assert!(s.message.as_deref().unwrap_or("").contains("CreateContainerConfigError"), "{s:#?}");
    println!("real missing Secret key -> {:?}: {}", s.reason, s.message.unwrap_or_default());
    env.done().await;
}

/// Aborts of real processes: one stops by itself on the abort annotation (Graceful), one only on SIGTERM (Deleted,
/// at the grace period), one ignores both and is SIGKILLed by the real kubelet at the end of the pod's own
/// termination grace period (Deleted, 2 s later; Forced is left for a pod that outlives even that, e.g. on a lost
/// node, which the kwok suite stages). What ended each worker is read from its container's exit code as the kubelet
/// reported it (0, 143 = SIGTERM, 137 = SIGKILL), seen on a watch: the status times have a resolution of one second
/// and the kubelet reports an end up to a few seconds late on a loaded machine, so the clock only bounds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_aborts() {
    let Some(_) = real_node() else { return };
    let env = real_env("real-abort", Capacity::default()).await;
    let cases: [(&str, &[&str], AbortMethod); 3] = [
        ("graceful", &["run_seconds=forever"], AbortMethod::Graceful),
        ("on-sigterm", &["run_seconds=forever", "on_abort=ignore"], AbortMethod::Deleted),
        ("ignores-all", &["run_seconds=forever", "on_abort=ignore", "on_term=ignore"], AbortMethod::Deleted),
    ];
    // The default abort grace period (NVFlare's 10 s); the pods' own termination grace period is 2 s.
    let exits = watch_pods(&env.client, env.ns.name(), |p| Some((p.metadata.name.clone()?, container_exit(p)?)));
    for (name, opts, _) in &cases {
        env.create(&real_job(name, opts)).await;
    }
    for (name, ..) in &cases {
        wait_job(&env.jobs, name, 120, |j| st(j).phase == Phase::Running).await;
    }
    for (name, ..) in &cases {
        env.jobs
            .patch(name, &PatchParams::default(), &Patch::Merge(serde_json::json!({"spec": {"abort": true}})))
            .await
            .expect("abort");
    }
    for (name, _, method) in cases {
        let j = wait_job(&env.jobs, name, 120, finished).await;
        let s = st(&j);
        let a = s.abort.clone().expect("status.abort");
        assert_eq!((s.phase, a.method), (Phase::Aborted, Some(method)), "{name}: {s:#?}");
        // A worker that stopped by itself reports its own code (0: it ended cleanly); one that had to be deleted is
        // NVFlare's ABORTED (9).
        let want = if method == AbortMethod::Graceful { 0 } else { 9 };
        assert_eq!(s.exit_code, Some(want), "{name}: {s:#?}");
        let took = secs(&a.requested_at, a.completed_at.as_ref().expect("completedAt"));
        let deleted_after = a.pod_deleted_at.as_ref().map(|d| secs(&a.requested_at, d));
        let pod = s.pod_name.clone().expect("status.podName");
        let container = exits.lock().unwrap().get(&pod).copied();
        println!(
            "real abort {name}: {method:?}, exit {want} (container {container:?}), pod deleted after {deleted_after:?}s, \
             {took:.1}s from spec.abort to the end (grace 10s, pod grace 2s)"
        );
        match name {
            "graceful" => {
                assert_eq!(container, Some(0), "{name}: the worker stopped by itself");
                assert_eq!(deleted_after, None, "{name}: its pod was not deleted before it stopped");
                assert!(took < 10.0, "{name} stopped by itself within the grace period: {took}");
            }
            "on-sigterm" => {
                assert_eq!(container, Some(143), "{name}: the kubelet's SIGTERM ended it");
                assert!(deleted_after.is_some_and(|d| d >= 10.0), "{name}: deleted at the grace period: {deleted_after:?}");
            }
            _ => {
                assert_eq!(container, Some(137), "{name}: the kubelet SIGKILLed it after the pod's 2 s");
                assert!(deleted_after.is_some_and(|d| d >= 10.0), "{name}: deleted at the grace period: {deleted_after:?}");
                assert!(took >= 11.0, "{name}: it outlived the SIGTERM by the pod's grace period: {took}");
            }
        }
        assert!(took < 30.0, "{name}: the abort completed: {took}");
    }
    env.done().await;
}

/// Chaos on the real node (issue 13): the operator is SIGKILLed in the middle of two real aborts — right after it
/// deleted the pod of a worker that ignores both the abort and SIGTERM (the kubelet SIGKILLs it 2 s later, while the
/// operator is down), and right after it told a second worker, which then stops by itself. The first pod stays
/// (tracking finalizer) until the restarted operator has recorded how its abort ended. One pod per job, nothing
/// left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_operator_killed_mid_abort() {
    let Some(_) = real_node() else { return };
    let mut env = real_env("real-chaos", Capacity::default()).await;
    let uids = watch_pod_uids(&env.client, env.ns.name());
    let mut told = real_job("told", &["run_seconds=forever"]);
    told.spec.abort_grace_period_seconds = Some(60);
    let mut deleted = real_job("deleted", &["run_seconds=forever", "on_abort=ignore", "on_term=ignore"]);
    deleted.spec.abort_grace_period_seconds = Some(2);
    for j in [&told, &deleted] {
        env.create(j).await;
    }
    for name in ["told", "deleted"] {
        wait_job(&env.jobs, name, 120, |j| st(j).phase == Phase::Running).await;
    }
    let abort = serde_json::json!({"spec": {"abort": true}});
    let pods: Api<Pod> = env.ns.api();
    env.jobs.patch("deleted", &PatchParams::default(), &Patch::Merge(&abort)).await.expect("abort");
    let j = wait_job(&env.jobs, "deleted", 60, |j| st(j).abort.as_ref().is_some_and(|a| a.pod_deleted_at.is_some())).await;
    let deleted_pod = st(&j).pod_name.unwrap();
    env.jobs.patch("told", &PatchParams::default(), &Patch::Merge(&abort)).await.expect("abort");
    let told_pod = st(&wait_job(&env.jobs, "told", 60, |j| st(j).phase == Phase::Aborting).await).pod_name.unwrap();
    common::wait_for(&pods, &told_pod, Duration::from_secs(30), |p: &Pod| p.annotations().contains_key("fljob.dev/abort")).await.unwrap();
    env.op.kill();
    for name in ["told", "deleted"] {
        assert_eq!(st(&env.jobs.get(name).await.unwrap()).phase, Phase::Aborting, "{name} is mid-abort when the operator dies");
    }
    // The kubelet SIGKILLs the deleted pod's worker while the operator is down; the pod is still there to be read.
    let p = common::wait_for(&pods, &deleted_pod, Duration::from_secs(60), |p: &Pod| container_exit(p).is_some()).await.unwrap();
    assert_eq!(p.finalizers(), ["fljob.dev/pod-tracking"]);
    assert!(p.metadata.deletion_timestamp.is_some());
    env.op.restart();
    let d = st(&wait_job(&env.jobs, "deleted", 90, finished).await);
    assert_eq!((d.phase, d.exit_code, d.abort.as_ref().and_then(|a| a.method)), (Phase::Aborted, Some(9), Some(AbortMethod::Deleted)), "{d:#?}");
    let t = st(&wait_job(&env.jobs, "told", 120, finished).await);
    assert_eq!((t.phase, t.exit_code, t.abort.as_ref().and_then(|a| a.method)), (Phase::Aborted, Some(0), Some(AbortMethod::Graceful)), "{t:#?}");
    common::wait_gone(&pods, &deleted_pod, Duration::from_secs(60)).await.expect("the deleted pod goes once its end is recorded");
    common::wait_for(&pods, &told_pod, Duration::from_secs(30), |p: &Pod| p.finalizers().is_empty())
        .await
        .expect("a gracefully stopped pod is kept for its logs, released");
    let seen = uids.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "one pod per job: {seen:?}");
    println!("real chaos: operator SIGKILLed mid-abort of 2 real pods; after restart: deleted -> Deleted 9, told -> Graceful 0; 2 pods ever");
    env.done().await;
}

/// Pod Security `restricted` admits the worker pod as the operator builds it, and the container really runs as the
/// non-root user with what the pod asked for; `kubectl logs` and `kubectl exec` reach it through the kubelet's
/// authenticated API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_restricted_pod_runs_non_root_with_logs_and_exec() {
    let Some(_) = real_node() else { return };
    let env = real_env("real-restricted", Capacity::default()).await;
    env.create(&real_job("runner", &["run_seconds=forever"])).await;
    let j = wait_job(&env.jobs, "runner", 120, |j| st(j).phase == Phase::Running).await;
    let pod = st(&j).pod_name.unwrap();
    let ns = env.ns.name().to_string();
    let exec = kubectl_out(&["-n", &ns, "exec", &pod, "-c", "worker", "--", "sh", "-c", "id -u; cat /etc/fljob/labels; ls /var/tmp/nvflare/workspace/startup"]);
    assert!(exec.starts_with("1000\n"), "runs as uid 1000: {exec}");
    assert!(exec.contains("fljob.dev/job=\"runner\""), "downward-API labels in the container: {exec}");
    assert!(exec.contains("fed_client.json"), "startup kit mounted: {exec}");
    env.jobs.patch("runner", &PatchParams::default(), &Patch::Merge(serde_json::json!({"spec": {"abort": true}}))).await.unwrap();
    let j = wait_job(&env.jobs, "runner", 60, finished).await;
    assert_eq!(st(&j).abort.and_then(|a| a.method), Some(AbortMethod::Graceful));
    let logs = kubectl_out(&["-n", &ns, "logs", &pod, "-c", "worker"]);
    assert!(logs.contains("fake-worker: uid=1000"), "{logs}");
    assert!(logs.contains("-u -m fljob_launcher.worker -m /var/tmp/nvflare/workspace -w /var/tmp/nvflare/workspace/startup -n runner-0001 -c site-a"), "the worker command line reached the process: {logs}");
    assert!(logs.contains("abort seen"), "{logs}");
    let labels = kubectl_out(&["get", "ns", &ns, "-o", "jsonpath={.metadata.labels}"]);
    assert!(labels.contains("\"pod-security.kubernetes.io/enforce\":\"restricted\""), "{labels}");
    let _ = env.jobs.get(&j.name_any()).await;
    env.done().await;
}

fn run_tool(name: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(common::tool(name))
        .args(args)
        .env("KUBECONFIG", common::kubeconfig_path())
        .output()
        .expect("run tool");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{name} {}:\n{text}", args.join(" "));
    text
}

/// The chart's operator pod, from the image built here, runs on the real node: it becomes Ready through its real
/// `/readyz`, wins the chart's Lease from inside the pod, and runs a job to completion as the chart's
/// ServiceAccount (the only credentials the pod has), with the job's worker a real container too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_chart_operator_pod_runs_a_job_in_cluster() {
    let Some(node) = real_node() else { return };
    install_crds();
    let client = common::client().await;
    let ns = namespace_with_labels(&client, "real-chart", &[("pod-security.kubernetes.io/enforce", "restricted")]).await;
    let name = ns.name().to_string();
    let operator = image("operator");
    let (repo, tag) = operator.rsplit_once(':').expect("image ref with a tag");
    let port = free_port();
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("real-chart-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    let values = dir.join("values.yaml");
    std::fs::write(
        &values,
        format!(
            r#"replicaCount: 1
image: {{repository: "{repo}", tag: "{tag}", pullPolicy: IfNotPresent}}
metrics: {{port: {port}}}
leaderElection: {{enabled: true}}
nodeSelector: {{fljob.dev/real-node: "true"}}
tolerations: [{{key: fljob.dev/real-node, operator: Equal, value: "true", effect: NoSchedule}}]
site:
  create: true
  spec:
    clientName: site-a
    server: {{target: "127.0.0.1:8002", scheme: grpc}}
    parentUrl: "tcp://127.0.0.1:8004"
    credentialsSecret: site-a-creds
    startupKitSecret: site-a-startup
    defaults: {{image: "{busybox}", pythonPath: /bin/fake-worker, resources: {{cpu: 100m, memory: 64Mi}}}}
    capacity: {{jobs: 2}}
"#,
            busybox = image("busybox"),
        ),
    )
    .unwrap();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = ns.api();
    for s in [secret("site-a-startup", &["fed_client.json"]), secret("site-a-creds", &["token", "signature", "ssid"])] {
        secrets.create(&Default::default(), &s).await.unwrap();
    }
    let t0 = Instant::now();
    run_tool("helm", &["install", "fljob-operator", concat!(env!("CARGO_MANIFEST_DIR"), "/charts/fljob-operator"), "-n", &name, "-f", values.to_str().unwrap(), "--wait", "--timeout", "180s"]);
    let ready = t0.elapsed().as_secs_f64();
    let pods: Api<Pod> = ns.api();
    let op_pods = pods.list(&kube::api::ListParams::default().labels("app.kubernetes.io/name=fljob-operator")).await.unwrap();
    assert_eq!(op_pods.items.len(), 1, "one operator pod");
    let op_pod = &op_pods.items[0];
    let op_name = op_pod.name_any();
    assert_eq!(op_pod.spec.as_ref().unwrap().node_name.as_deref(), Some(node.as_str()), "the operator runs on the real node");
    let ready_cond = op_pod.status.as_ref().unwrap().conditions.as_ref().unwrap().iter().any(|c| c.type_ == "Ready" && c.status == "True");
    assert!(ready_cond, "Ready through its /readyz probe: {:?}", op_pod.status);
    println!("real chart: operator pod {op_name} Ready on {node} {ready:.1}s after helm install");
    // The image as the kubelet runs it (issue 13): its process, found by its container's cgroup on this host, is not
    // root, holds no capability and sees its root filesystem read-only.
    let cid = op_pod.status.as_ref().and_then(|s| s.container_statuses.as_ref()).and_then(|c| c.first()?.container_id.clone()).expect("containerID");
    let cid = cid.rsplit("://").next().unwrap().to_string();
    let pid = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| c.contains(&cid)) && std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.contains("fljob-operator")))
        .expect("the operator container's process on the host");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| status.lines().find(|l| l.starts_with(k)).map(|l| l[k.len()..].split_whitespace().collect::<Vec<_>>()).unwrap_or_default();
    assert!(field("Uid:").iter().all(|u| *u != "0"), "runs as root: {:?}", field("Uid:"));
    for caps in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(field(caps), ["0000000000000000"], "{caps} of the operator process");
    }
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root = mounts.lines().find(|l| l.split_whitespace().nth(4) == Some("/")).expect("a root mount");
    assert!(root.split_whitespace().nth(5).is_some_and(|o| o.split(',').any(|x| x == "ro")), "root filesystem not read-only: {root}");
    println!("real chart: operator process {pid}: uid {:?}, no capabilities, read-only root", field("Uid:"));

    let mut j = real_job("in-cluster", &["exit_code=0", "run_seconds=2"]);
    j.spec.site = "site-a".into();
    env_jobs(&client, &name).create(&Default::default(), &j).await.unwrap();
    let done = wait_job(&env_jobs(&client, &name), "in-cluster", 120, finished).await;
    let s = st(&done);
    assert_eq!((s.phase, s.exit_code), (Phase::Succeeded, Some(0)), "{s:#?}");
    let worker = pods.get(s.pod_name.as_deref().unwrap()).await.unwrap();
    assert_eq!(worker.spec.as_ref().unwrap().node_name.as_deref(), Some(node.as_str()));
    // Leader election ran in the pod: the chart's Lease names it.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = ns.api();
    let lease = leases.get("fljob-operator").await.expect("the chart's Lease");
    let holder = lease.spec.and_then(|s| s.holder_identity).unwrap_or_default();
    assert!(holder.contains(&op_name), "Lease holder {holder:?} is the operator pod {op_name}");
    // It worked with the chart's ServiceAccount only: nothing was forbidden.
    let logs = run_tool("kubectl", &["-n", &name, "logs", &op_name]);
    assert!(!logs.to_lowercase().contains("forbidden"), "{logs}");
    println!("real chart: job Succeeded in {:.1}s, Lease held by {holder}", t0.elapsed().as_secs_f64() - ready);
    env_jobs(&client, &name).delete("in-cluster", &Default::default()).await.unwrap();
    common::wait_gone(&env_jobs(&client, &name), "in-cluster", std::time::Duration::from_secs(60)).await.unwrap();
    run_tool("helm", &["uninstall", "fljob-operator", "-n", &name, "--wait", "--timeout", "120s"]);
    ns.cleanup().await;
}

fn env_jobs(client: &kube::Client, ns: &str) -> Api<FLJob> {
    Api::namespaced(client.clone(), ns)
}
