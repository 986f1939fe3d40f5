//! Upgrading from the previous chart (issue 11 item 16): Helm never upgrades the CRDs in a chart's `crds/`, so a
//! plain `helm upgrade` leaves the old schema in place. This test installs the previous chart (from git history)
//! with its CRDs, gets an abort in flight (the pod deleted, its force-delete timer running from
//! `status.abort.podDeletedAt`), and then shows both sides:
//!
//! - `helm upgrade` alone: the CRDs stay old, a new field a user patches in is silently pruned, a new validation is
//!   not in force, and a chart value using a new field fails the upgrade;
//! - the README's path (*Upgrading*: `helm show crds` piped to `kubectl apply --server-side --force-conflicts`, then
//!   `helm upgrade`): the installed CRDs are exactly the chart's, the new fields stay and the new rules hold, the
//!   in-flight abort's status is untouched and the restarted operator finishes it on the recorded timer.
//!
//! CRDs are cluster-scoped and every other test installs the current ones at any moment, so this runs on a control
//! plane of its own (`hack/cluster.sh up` with its own `FLJOB_CLUSTER_DIR`, one kwok node), taken down at the end.

mod common;

use anyhow::{Context as _, Result, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The previous chart: the last commit before the API's "Changes in this version" (README), whose CRDs lack the
/// fields added since (FLSite `spec.podPolicy`, `defaults.workerModule`; FLJob `spec.pendingTimeoutSeconds`,
/// `workspaceOwner`, `resources.ephemeralStorage`) and the CEL rules added since. (The chart of 7fd630b differs from
/// the current one only in CEL rules, so it could not show a field being pruned.)
const PREVIOUS: &str = "795103d";
const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/fljob-operator");
const RELEASE: &str = "fljob-operator";
/// The chart's full name for RELEASE: its ServiceAccount and Deployment.
const FULLNAME: &str = "fljob-operator";
const NS: &str = "fl-site-a";
/// The in-flight job's pod: its own SIGTERM-to-SIGKILL time; the operator force-deletes it 2 s after that.
const POD_GRACE: u64 = 20;

/// The test's own control plane (`common::own`), with anyhow errors.
trait Own {
    fn ok(&self, name: &str, args: &[&str], stdin: Option<&str>) -> Result<String>;
    fn sh(&self, args: &[&str]) -> Result<()>;
}

impl Own for common::own::OwnCluster {
    fn ok(&self, name: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
        self.tool(name, args, stdin).map_err(anyhow::Error::msg)
    }
    fn sh(&self, args: &[&str]) -> Result<()> {
        self.cluster_sh(args).map_err(anyhow::Error::msg)
    }
}

/// The operator built from this tree as a local process, with the command line and environment of the chart's
/// Deployment and only the chart's ServiceAccount token (the chart runs with replicaCount=0: no image runs here).
struct Operator {
    child: Child,
    log: PathBuf,
}

impl Operator {
    async fn start(client: &Client, kubeconfig: &Path, log: PathBuf, extra: &[&str]) -> Result<Self> {
        let dep = Api::<Deployment>::namespaced(client.clone(), NS).get(FULLNAME).await?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let (mut cmd, mut args) = common::chart_operator_command(dep, NS, "fljob-operator-0", &format!("127.0.0.1:{port}"))?;
        cmd.args(extra);
        args.extend(extra.iter().map(|a| a.to_string()));
        let out = std::fs::File::create(&log)?;
        let child = cmd
            .env("KUBECONFIG", kubeconfig)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting the operator binary")?;
        eprintln!("[upgrade] operator started (log {}): {}", log.display(), args.join(" "));
        Ok(Self { child, log })
    }

    /// SIGTERM, as a Deployment rollout stops the old pod; SIGKILL if it has not exited 10 s later.
    fn stop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn api(client: &Client, kind: &str) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("fljob.dev", "v1alpha1", kind));
    Api::namespaced_with(client.clone(), NS, &ar)
}

/// An FLJob at site-a; `extra` adds or replaces spec fields (its podTemplate carries the kwok simulation).
fn job_json(name: &str, extra: Value) -> Result<DynamicObject> {
    let mut job = json!({
        "apiVersion": "fljob.dev/v1alpha1",
        "kind": "FLJob",
        "metadata": {"name": name},
        "spec": {"jobId": format!("{name}-0001"), "site": "site-a", "resources": {"cpu": "1", "memory": "1Gi"}},
    });
    if let (Some(spec), Some(extra)) = (job["spec"].as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    Ok(serde_json::from_value(job)?)
}

fn at<'a>(obj: &'a DynamicObject, pointer: &str) -> &'a Value {
    obj.data.pointer(pointer).unwrap_or(&Value::Null)
}

/// The installed CRD's schema property at `path` (e.g. "spec.podPolicy"), if it has one.
async fn crd_has(client: &Client, crd: &str, path: &str) -> Result<bool> {
    let crd = Api::<CustomResourceDefinition>::all(client.clone()).get(crd).await?;
    let schema = serde_json::to_value(&crd.spec.versions[0].schema)?;
    let pointer: String = path.split('.').map(|p| format!("/properties/{p}")).collect();
    Ok(schema.pointer(&format!("/openAPIV3Schema{pointer}")).is_some())
}

/// Whether every CRD of the chart at `chart` is installed exactly as its file says (`spec.versions`).
async fn crds_match(client: &Client, chart: &Path) -> Result<bool> {
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    for file in ["fljob.dev_fljobs.yaml", "fljob.dev_flsites.yaml"] {
        let text = std::fs::read_to_string(chart.join("crds").join(file))?;
        let want: Value = serde_saphyr::from_str(&text).with_context(|| format!("parsing {file}"))?;
        let name = want.pointer("/metadata/name").and_then(Value::as_str).context("CRD without a name")?;
        let have = serde_json::to_value(crds.get(name).await?.spec.versions)?;
        if want.pointer("/spec/versions") != Some(&have) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// What the API server answers a create of the job (a server-side dry run: nothing is created): None if it
/// accepts it, the message if it refuses it as invalid.
async fn refusal(client: &Client, job: &DynamicObject) -> Result<Option<String>> {
    match api(client, "FLJob").create(&PostParams { dry_run: true, ..Default::default() }, job).await {
        Ok(_) => Ok(None),
        Err(kube::Error::Api(e)) if e.code == 422 => Ok(Some(e.message)),
        Err(e) => Err(e.into()),
    }
}

const VALUES: &str = r#"replicaCount: 0
site:
  create: true
  spec:
    clientName: site-a
    server: {target: "fl-server.example.org:8002", scheme: grpc}
    parentUrl: "tcp://site-a-cp:8004"
    credentialsSecret: site-a-job-creds
    startupKitSecret: site-a-startup
    defaults: {image: "nvflare/nvflare:2.9.0", resources: {cpu: "1", memory: 1Gi}}
    capacity: {jobs: 4, cpu: "8", memory: 16Gi}
"#;

#[tokio::test]
async fn upgrade_from_the_previous_chart() -> Result<()> {
    let started = Instant::now();
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("chart-upgrade-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;

    // The previous chart, as a user has it installed.
    let archive = Command::new("git")
        .args(["-C", env!("CARGO_MANIFEST_DIR"), "archive", PREVIOUS, "charts/fljob-operator"])
        .output()
        .context("running git archive")?;
    ensure!(archive.status.success(), "git archive {PREVIOUS} failed (a shallow clone?): {}", String::from_utf8_lossy(&archive.stderr));
    let mut tar = Command::new("tar").args(["-x", "-C"]).arg(&work).stdin(Stdio::piped()).spawn()?;
    std::io::Write::write_all(&mut tar.stdin.take().context("tar stdin")?, &archive.stdout)?;
    ensure!(tar.wait()?.success(), "tar failed");
    let old_chart = work.join("charts/fljob-operator");
    let old_chart = old_chart.to_str().context("path")?;
    let values = work.join("values.yaml");
    std::fs::write(&values, VALUES)?;
    let values = values.to_str().context("path")?;
    // A value only the new chart's FLSite schema knows: the site lets jobs mount hostPath volumes.
    let new_values = work.join("new-values.yaml");
    std::fs::write(&new_values, "site:\n  spec:\n    podPolicy: {allowHostPath: true}\n")?;
    let new_values = new_values.to_str().context("path")?;

    let cluster = common::own::OwnCluster::up("upgrade", 1);
    let client = common::client_from(&cluster.kubeconfig()).await;
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NS}}))?;
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
    for (name, data) in [
        ("site-a-job-creds", json!({"token": "t0k3n", "signature": "s1g", "ssid": "ss1d"})),
        ("site-a-startup", json!({"fed_client.json": "{}", "client.crt": "cert", "client.key": "key", "rootCA.pem": "ca"})),
    ] {
        let secret: Secret = serde_json::from_value(json!({"metadata": {"name": name}, "stringData": data}))?;
        Api::<Secret>::namespaced(client.clone(), NS).create(&PostParams::default(), &secret).await?;
    }

    // --- the previous chart, with an abort in flight ---------------------------------------------------------------
    cluster.ok("helm", &["install", RELEASE, old_chart, "-n", NS, "-f", values, "--wait"], None)?;
    ensure!(crds_match(&client, Path::new(old_chart)).await?, "helm install did not install the previous chart's CRDs");
    ensure!(!crd_has(&client, "flsites.fljob.dev", "spec.podPolicy").await?, "the previous chart's CRD already has podPolicy");
    let sa_kubeconfig = work.join("sa.kubeconfig");
    cluster.sh(&["sa-kubeconfig", NS, FULLNAME, sa_kubeconfig.to_str().context("path")?])?;
    // This build stands in for the previous release's operator: it must be told to run on the previous CRDs.
    let mut op = Operator::start(&client, &sa_kubeconfig, work.join("operator-old-chart.log"), &["--allow-old-crds"]).await?;

    let jobs = api(&client, "FLJob");
    // A worker that ignores the abort annotation and whose pod, once deleted, only a force delete removes: after the
    // 1 s grace period the pod is deleted, and the force delete is due POD_GRACE + 2 s after status.abort.podDeletedAt.
    let inflight = job_json(
        "inflight",
        json!({"abortGracePeriodSeconds": 1, "podTemplate": {
            "metadata": {"annotations": {"sim.fljob.dev/run-seconds": "never", "sim.fljob.dev/stuck-terminating": "true"}},
            "spec": {"terminationGracePeriodSeconds": POD_GRACE}}}),
    )?;
    jobs.create(&PostParams::default(), &inflight).await?;
    let running = |j: &DynamicObject| at(j, "/status/phase") == "Running";
    common::wait_for(&jobs, "inflight", Duration::from_secs(60), running).await.context("the in-flight job never ran")?;
    jobs.patch("inflight", &PatchParams::default(), &Patch::Merge(json!({"spec": {"abort": true}}))).await?;
    let deleted = |j: &DynamicObject| !at(j, "/status/abort/podDeletedAt").is_null();
    let job = common::wait_for(&jobs, "inflight", Duration::from_secs(30), deleted).await.context("the pod was never deleted")?;
    let deleted_at = Instant::now();
    let abort_before = at(&job, "/status/abort").clone();
    ensure!(at(&job, "/status/phase") == "Aborting", "the abort is not in flight: {}", job.data["status"]);
    ensure!(abort_before["cause"] == "Aborted" && abort_before["requestedAt"].is_string(), "abort status: {abort_before}");
    ensure!(abort_before["completedAt"].is_null(), "the abort already completed: {abort_before}");
    // The upgrade replaces the operator: the old one stops here, mid-abort.
    op.stop();
    eprintln!("[upgrade] abort in flight under the previous chart: {abort_before}");

    // --- what goes wrong with `helm upgrade` alone -----------------------------------------------------------------
    // (No --wait on upgrades: the chart's Deployment has no replicas here, and helm's readiness check would wait for
    // the FLSite's observedGeneration, which only a running operator updates.)
    cluster.ok("helm", &["upgrade", RELEASE, CHART, "-n", NS, "-f", values], None)?;
    ensure!(crds_match(&client, Path::new(old_chart)).await?, "helm upgrade alone changed the CRDs");
    // A user setting the new field is told "patched (no change)" (with a warning) and loses it: the old schema
    // prunes it.
    let out = cluster.ok("kubectl", &["-n", NS, "patch", "flsite", "site-a", "--type=merge", "-p", r#"{"spec":{"podPolicy":{"allowHostPath":true}}}"#], None)?;
    let site = api(&client, "FLSite").get("site-a").await?;
    ensure!(at(&site, "/spec/podPolicy").is_null(), "the old schema kept spec.podPolicy: {}", site.data["spec"]);
    eprintln!("[upgrade] without the CRDs, a podPolicy patch answers {:?} and is pruned", out.trim());
    // A new validation is not in force: an FLJob naming no valid FLSite is accepted.
    let bad_site = job_json("bad-site", json!({"site": "Site_A"}))?;
    let refused = refusal(&client, &bad_site).await?;
    ensure!(refused.is_none(), "the old schema already refuses site Site_A: {refused:?}");
    // And the chart's own FLSite with the new field cannot be upgraded at all.
    let err = cluster.tool("helm", &["upgrade", RELEASE, CHART, "-n", NS, "-f", values, "-f", new_values], None);
    let err = err.err().context("helm upgrade set spec.podPolicy on the old schema")?;
    ensure!(err.contains("podPolicy") && err.contains("not declared in schema"), "helm upgrade failed otherwise:\n{err}");
    // And the new operator refuses to run on the old CRDs, saying what to do (it would otherwise lose fields).
    // (It retries for 30 s, as the published schema lags a CRD change by seconds, then exits non-zero; its first
    // refusal is enough here, and keeps the in-flight abort's timing below intact.)
    let mut refused_op = Operator::start(&client, &sa_kubeconfig, work.join("operator-on-old-crds.log"), &[]).await?;
    let waited = Instant::now();
    while !refused_op.log().contains("older than this operator") && waited.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = refused_op.log();
    ensure!(log.contains("older than this operator") && log.contains("--force-conflicts"), "the operator on the old CRDs:\n{log}");
    ensure!(!log.contains("caches synced"), "the operator reconciled on the old CRDs:\n{log}");
    eprintln!("[upgrade] the new operator refuses the old CRDs: {}", log.lines().find(|l| l.contains("older than")).unwrap_or_default());
    refused_op.stop();

    // --- the documented path: the chart's CRDs first, then helm upgrade ------------------------------------------
    let crds = cluster.ok("helm", &["show", "crds", CHART], None)?;
    // helm installed the CRDs and owns their fields: taking them over needs --force-conflicts.
    let conflict = cluster.tool("kubectl", &["apply", "--server-side", "-f", "-"], Some(&crds)).err();
    ensure!(conflict.as_deref().is_some_and(|e| e.contains(r#"conflicts with "helm""#)), "apply without --force-conflicts: {conflict:?}");
    cluster.ok("kubectl", &["apply", "--server-side", "--force-conflicts", "-f", "-"], Some(&crds))?;
    cluster.ok("kubectl", &["wait", "--for=condition=Established", "crd/fljobs.fljob.dev", "crd/flsites.fljob.dev"], None)?;
    cluster.ok("helm", &["upgrade", RELEASE, CHART, "-n", NS, "-f", values, "-f", new_values], None)?;
    ensure!(crds_match(&client, Path::new(CHART)).await?, "the installed CRDs are not the chart's after the documented path");
    ensure!(crd_has(&client, "fljobs.fljob.dev", "spec.pendingTimeoutSeconds").await?, "no spec.pendingTimeoutSeconds in the FLJob CRD");
    let site = api(&client, "FLSite").get("site-a").await?;
    ensure!(at(&site, "/spec/podPolicy/allowHostPath") == true, "the chart's podPolicy did not reach the FLSite: {}", site.data["spec"]);
    let refused = refusal(&client, &bad_site).await?;
    ensure!(refused.as_ref().is_some_and(|m| m.contains("must be the name of an FLSite")), "site Site_A after the upgrade: {refused:?}");
    let job = jobs.get("inflight").await?;
    ensure!(at(&job, "/status/abort") == &abort_before, "the in-flight abort changed: {} -> {}", abort_before, job.data["status"]["abort"]);
    let release = cluster.ok("helm", &["status", RELEASE, "-n", NS], None)?;
    ensure!(release.contains("STATUS: deployed"), "the release after the documented path:\n{release}");

    // --- the current operator takes over --------------------------------------------------------------------------
    // Start it well after the pod was deleted, so a force-delete timer restarted from the operator's start (instead
    // of running from the recorded podDeletedAt) would be seen.
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(deleted_at.elapsed())).await;
    let mut op = Operator::start(&client, &sa_kubeconfig, work.join("operator-new-chart.log"), &[]).await?;
    // A field only the new schema has, kept and used.
    let fresh = job_json(
        "fresh",
        json!({"pendingTimeoutSeconds": 300, "podTemplate": {"metadata": {"annotations": {"sim.fljob.dev/run-seconds": "1"}}}}),
    )?;
    let fresh = jobs.create(&PostParams::default(), &fresh).await?;
    ensure!(at(&fresh, "/spec/pendingTimeoutSeconds") == 300, "spec.pendingTimeoutSeconds was pruned: {}", fresh.data["spec"]);
    let finished = |j: &DynamicObject| matches!(at(j, "/status/phase").as_str(), Some("Succeeded" | "Failed" | "Aborted"));
    let timeout = Duration::from_secs(POD_GRACE + 40);
    let job_end = common::wait_for(&jobs, "inflight", timeout, finished).await.with_context(|| op.log())?;
    let ended_after = deleted_at.elapsed();
    let abort = at(&job_end, "/status/abort");
    let status = &job_end.data["status"];
    ensure!(status["phase"] == "Aborted" && status["exitCode"] == 9, "the in-flight job ended: {status}");
    ensure!(abort["method"] == "Forced", "the stuck pod was not force-deleted: {abort}");
    for field in ["requestedAt", "podDeletedAt", "cause"] {
        ensure!(abort[field] == abort_before[field], "status.abort.{field} changed: {abort_before} -> {abort}");
    }
    // Force-deleted when due from the recorded podDeletedAt (POD_GRACE + 2 s), not POD_GRACE + 2 s after the restart.
    // (A restarted timer would end it after 10 s + POD_GRACE + 2 s; one ignoring the pod's grace at once, at 10 s.)
    let due = Duration::from_secs(POD_GRACE + 2);
    let on_time = due - Duration::from_secs(3)..due + Duration::from_secs(7);
    ensure!(on_time.contains(&ended_after), "the force delete came {ended_after:?} after the pod's deletion, not {due:?}");
    let job = common::wait_for(&jobs, "fresh", Duration::from_secs(60), finished).await.with_context(|| op.log())?;
    ensure!(at(&job, "/status/phase") == "Succeeded", "the new-schema job ended: {}", job.data["status"]);
    // The force-deleted pod goes once the operator releases its tracking finalizer, and it was the job's only one.
    let pods = Api::<Pod>::namespaced(client.clone(), NS);
    let pod = at(&job_end, "/status/podName").as_str().context("the in-flight job names no pod")?;
    common::wait_gone(&pods, pod, Duration::from_secs(15)).await.context("the force-deleted pod stayed")?;
    let left: Vec<String> = pods.list(&ListParams::default()).await?.items.iter().map(|p| p.name_any()).collect();
    ensure!(!left.iter().any(|n| n.starts_with("inflight-")), "the in-flight job has a pod again: {left:?}");
    op.stop();
    eprintln!("[upgrade] done in {:.0?}; the in-flight abort ended {ended_after:.0?} after the pod's deletion", started.elapsed());
    drop(cluster);
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
