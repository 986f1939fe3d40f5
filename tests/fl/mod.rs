//! Fixtures for the operator's integration tests: the CRDs installed once, a site with its Secrets, FLJobs whose
//! pods kwok drives through `sim.fljob.dev/*` annotations, and the operator binary run as a real process (so a
//! test can SIGKILL and restart it) watching only the test's namespace.
#![allow(dead_code)]

use crate::common::{self, TestNs, wait_for};
use fljob_operator::api::*;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::Duration;

/// Installs crds/ into the cluster once per test binary (server-side apply, then wait until Established).
pub fn install_crds() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let crds = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crds");
        let out = common::kubectl()
            .args(["apply", "--server-side", "--force-conflicts", "--field-manager=fljob-tests", "-f"])
            .arg(&crds)
            .output()
            .expect("run kubectl");
        assert!(out.status.success(), "installing CRDs failed: {}", String::from_utf8_lossy(&out.stderr));
        let out = common::kubectl()
            .args(["wait", "--for=condition=Established", "--timeout=60s", "crd/fljobs.fljob.dev", "crd/flsites.fljob.dev"])
            .output()
            .expect("run kubectl");
        assert!(out.status.success(), "CRDs not established: {}", String::from_utf8_lossy(&out.stderr));
    });
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// The operator, as a child process watching one namespace.
pub struct Operator {
    child: Option<Child>,
    pub ns: String,
    pub metrics_port: u16,
    pub log: PathBuf,
    kubeconfig: PathBuf,
    extra: Vec<String>,
}

impl Operator {
    /// Starts the operator for `ns` with the admin kubeconfig.
    pub fn start(ns: &str) -> Operator {
        Self::start_with(ns, common::kubeconfig_path(), &[])
    }

    /// Starts the operator for `ns` with a given kubeconfig and extra flags.
    pub fn start_with(ns: &str, kubeconfig: PathBuf, extra: &[&str]) -> Operator {
        let mut op = Operator {
            child: None,
            ns: ns.to_string(),
            metrics_port: 0,
            log: PathBuf::new(),
            kubeconfig,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        op.spawn();
        op
    }

    fn spawn(&mut self) {
        self.metrics_port = free_port();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("operator-logs");
        std::fs::create_dir_all(&dir).expect("log dir");
        self.log = dir.join(format!("{}.log", self.ns));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_fljob-operator"))
            .args(["run", "--namespace", &self.ns, "--metrics-addr", &format!("127.0.0.1:{}", self.metrics_port)])
            .args(&self.extra)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", std::env::var("FLJOB_OPERATOR_LOG").unwrap_or_else(|_| "info,fljob_operator=debug".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start the operator");
        self.child = Some(child);
    }

    /// SIGKILLs the operator: no cleanup, no lease release, nothing.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again after [`kill`](Self::kill).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The operator's log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The operator's /metrics text.
    pub async fn metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        for _ in 0..50 {
            if let Ok(text) = http_get(&url).await {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("no metrics at {url}; log:\n{}", self.logs());
    }

    /// Sum of a counter's samples whose labels contain every given `key="value"` pair.
    pub async fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        sum_samples(&self.metrics().await, name, labels)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sums the samples of `name` with all `labels` in a Prometheus text exposition.
pub fn sum_samples(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A plain HTTP/1.1 GET over loopback (the endpoints are ours; no client crate needed for a test).
pub async fn http_get(url: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut s = tokio::net::TcpStream::connect(host).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(head.to_string()));
    }
    Ok(body.to_string())
}

/// A Secret with the given keys (values are test placeholders, never real credentials).
pub fn secret(name: &str, keys: &[&str]) -> Secret {
    Secret {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        data: Some(keys.iter().map(|k| (k.to_string(), ByteString(format!("test-{k}").into_bytes()))).collect()),
        ..Default::default()
    }
}

/// The site every test uses: "site-a" with its startup kit and credentials Secrets.
pub fn site(capacity: Capacity) -> FLSite {
    FLSite::new(
        "site-a",
        FLSiteSpec {
            client_name: "site-a".into(),
            server: ServerSpec { target: "fl-server.example.org:8002".into(), scheme: Scheme::Grpc },
            parent_url: "tcp://site-a-cp:8004".into(),
            parent_conn_sec: None,
            credentials_secret: Some("site-a-creds".into()),
            startup_kit_secret: "site-a-startup".into(),
            workspace: WorkspaceSpec::default(),
            defaults: SiteDefaults {
                image: "nvflare/nvflare:2.9.0".into(),
                python_path: None,
                resources: Some(Resources { cpu: Some(Quantity("1".into())), memory: Some(Quantity("1Gi".into())), gpus: None, ephemeral_storage: None }),
                worker_module: None,
            },
            capacity,
            pending_timeout_seconds: None,
            pod_policy: Default::default(),
        },
    )
}

/// Creates the site's Secrets and the site itself.
pub async fn create_site(client: &Client, ns: &str, site: &FLSite) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    for s in [secret("site-a-startup", &["fed_client.json"]), secret("site-a-creds", &["token", "signature", "ssid"])] {
        secrets.create(&PostParams::default(), &s).await.expect("create secret");
    }
    let sites: Api<FLSite> = Api::namespaced(client.clone(), ns);
    sites.create(&PostParams::default(), site).await.expect("create site");
}

/// An FLJob at site-a whose pod carries the given simulation annotations.
pub fn job(name: &str, sim: &[(&str, &str)]) -> FLJob {
    let annotations: BTreeMap<String, String> = sim.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    FLJob::new(
        name,
        FLJobSpec {
            job_id: format!("{name}-0001"),
            site: "site-a".into(),
            image: None,
            meta: Some(serde_json::json!({"name": name})),
            options: vec!["secure_train=false".into()],
            resources: None,
            credentials_secret: None,
            workspace_owner: None,
            pending_timeout_seconds: None,
            abort: false,
            abort_grace_period_seconds: None,
            active_deadline_seconds: None,
            ttl_seconds_after_finished: None,
            pod_template: Some(PodTemplate {
                metadata: Some(PodTemplateMetadata { labels: BTreeMap::new(), annotations }),
                spec: Some(PodTemplateSpec { termination_grace_period_seconds: Some(2), ..Default::default() }),
            }),
        },
    )
}

/// Waits for a job to satisfy `pred`.
pub async fn wait_job(api: &Api<FLJob>, name: &str, secs: u64, pred: impl Fn(&FLJob) -> bool + Send + 'static) -> FLJob {
    match wait_for(api, name, Duration::from_secs(secs), pred).await {
        Ok(j) => j,
        Err(e) => panic!("{e:#}"),
    }
}

/// The job's status (empty when it has none yet).
pub fn st(j: &FLJob) -> FLJobStatus {
    j.status.clone().unwrap_or_default()
}

/// True once the job finished.
pub fn finished(j: &FLJob) -> bool {
    st(j).phase.is_finished()
}

/// A namespace with the CRDs installed, a site, and the operator running for it.
pub struct Env {
    pub client: Client,
    pub ns: TestNs,
    pub op: Operator,
    pub jobs: Api<FLJob>,
}

impl Env {
    /// Sets everything up; the site has the given capacity.
    pub async fn new(prefix: &str, capacity: Capacity) -> Env {
        Self::with_site(prefix, site(capacity)).await
    }

    /// Sets everything up with a custom site.
    pub async fn with_site(prefix: &str, site: FLSite) -> Env {
        install_crds();
        let client = common::client().await;
        let ns = common::namespace(&client, prefix).await;
        create_site(&client, ns.name(), &site).await;
        let op = Operator::start(ns.name());
        let jobs = ns.api::<FLJob>();
        Env { client, ns, op, jobs }
    }

    /// Creates a job.
    pub async fn create(&self, job: &FLJob) {
        self.jobs.create(&PostParams::default(), job).await.expect("create job");
    }

    /// Waits (up to 20 s) until an Event whose line starts with `prefix` is recorded for `name`; returns all lines.
    pub async fn wait_event(&self, name: &str, prefix: &str) -> Vec<String> {
        for _ in 0..100 {
            let lines = self.events_for(name).await;
            if lines.iter().any(|l| l.starts_with(prefix)) {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("no Event {prefix:?} for {name}: {:#?}", self.events_for(name).await);
    }

    /// The Events recorded for an object, as "Reason: note" lines.
    pub async fn events_for(&self, name: &str) -> Vec<String> {
        let api: Api<k8s_openapi::api::events::v1::Event> = self.ns.api();
        let list = api.list(&Default::default()).await.expect("list events");
        list.items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .map(|e| format!("{}: {}", e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect()
    }

    /// Cleans up: deletes the namespace while the operator still runs, so that it can let go of its FLJobs
    /// (their finalizer), then stops the operator.
    pub async fn done(mut self) {
        let jobs = self.jobs.clone();
        self.ns.cleanup().await;
        for _ in 0..100 {
            match jobs.list(&Default::default()).await {
                Ok(l) if !l.items.is_empty() => tokio::time::sleep(Duration::from_millis(200)).await,
                _ => break,
            }
        }
        self.op.kill();
    }
}

/// Every pod UID ever seen in `ns` from now on, recorded by a watch (so a pod created and removed between two
/// looks still counts): "at most one pod per job" is checked on this.
pub fn watch_pod_uids(client: &Client, ns: &str) -> std::sync::Arc<std::sync::Mutex<BTreeMap<String, String>>> {
    watch_pods(client, ns, |p| Some((p.metadata.uid.clone()?, p.metadata.name.clone()?)))
}

/// What `pick` takes from every pod seen in `ns` from now on (by a watch, so a pod removed between two looks still
/// counts); a later sighting of the same key overwrites an earlier one.
pub fn watch_pods<K: Ord + Send + 'static, V: Send + 'static>(
    client: &Client,
    ns: &str,
    pick: impl Fn(&k8s_openapi::api::core::v1::Pod) -> Option<(K, V)> + Send + 'static,
) -> std::sync::Arc<std::sync::Mutex<BTreeMap<K, V>>> {
    use futures::StreamExt;
    use kube::runtime::watcher;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    let out = seen.clone();
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), ns);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(kube::runtime::WatchStreamExt::default_backoff(watcher(pods, watcher::Config::default())));
        while let Some(ev) = stream.next().await {
            if let Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p) | watcher::Event::Delete(p)) = ev
                && let Some((k, v)) = pick(&p)
            {
                out.lock().unwrap().insert(k, v);
            }
        }
    });
    seen
}
