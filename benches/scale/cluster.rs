//! The bench's hold on the local cluster: clients whose every request is counted, namespaces it deletes again,
//! ServiceAccount identities whose requests the API server counts apart (one FlowSchema per verb and resource), and
//! the operator binary run as a child process.

use anyhow::{Context as _, Result, anyhow, bail};
use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::flowcontrol::v1::{
    FlowSchema, FlowSchemaSpec, NonResourcePolicyRule, PolicyRulesWithSubjects, PriorityLevelConfigurationReference, ResourcePolicyRule,
    ServiceAccountSubject, Subject,
};
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject as RbacSubject};
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::client::ClientBuilder;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, ResourceExt};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fljob_operator::api::FLJob;

/// Requests a client made, by (verb, resource), counted as they are sent.
#[derive(Clone, Default)]
pub struct Counted(Arc<Mutex<crate::prom::Requests>>);

impl Counted {
    /// What was counted so far.
    pub fn snapshot(&self) -> crate::prom::Requests {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn count(&self, method: &http::Method, uri: &http::Uri) {
        let key = fljob_operator::metrics::classify(method, uri);
        *self.0.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_default() += 1.0;
    }
}

/// The admin kubeconfig the tests use.
pub fn admin_kubeconfig() -> Result<PathBuf> {
    std::env::var_os("FLJOB_TEST_KUBECONFIG")
        .or_else(|| std::env::var_os("KUBECONFIG"))
        .map(PathBuf::from)
        .filter(|p| p.exists())
        .ok_or_else(|| anyhow!("no cluster: run `hack/cluster.sh up` and `source /tmp/fljob-cluster/env` (FLJOB_TEST_KUBECONFIG)"))
}

/// A client from a kubeconfig file whose requests are counted into `counted`.
pub async fn client(kubeconfig: &Path, counted: &Counted) -> Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig).with_context(|| format!("reading {}", kubeconfig.display()))?;
    let mut config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    // The bench opens many requests at once; the default 295 s watch timeout is fine, the read timeout too.
    config.read_timeout = Some(Duration::from_secs(120));
    let c = counted.clone();
    Ok(ClientBuilder::try_from(config)?
        .with_layer(&tower::util::MapRequestLayer::new(move |req: http::Request<kube::client::Body>| {
            c.count(req.method(), req.uri());
            req
        }))
        .build())
}

/// Text of a path on the API server (its /metrics).
pub async fn raw_get(client: &Client, path: &str) -> Result<String> {
    let req = http::Request::get(path).body(Vec::new())?;
    Ok(client.request_text(req).await?)
}

/// Installs the CRDs from crds/ unless they are there already (the tests install the same files).
pub async fn ensure_crds(client: &Client, kubectl: &Path, kubeconfig: &Path) -> Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    if crds.get_opt("fljobs.fljob.dev").await?.is_some() && crds.get_opt("flsites.fljob.dev").await?.is_some() {
        return Ok(());
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crds");
    let out = Command::new(kubectl)
        .args(["apply", "--server-side", "--force-conflicts", "--field-manager=fljob-tests", "-f"])
        .arg(&dir)
        .env("KUBECONFIG", kubeconfig)
        .output()?;
    if !out.status.success() {
        bail!("installing CRDs: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = Command::new(kubectl)
        .args(["wait", "--for=condition=Established", "--timeout=60s", "crd/fljobs.fljob.dev", "crd/flsites.fljob.dev"])
        .env("KUBECONFIG", kubeconfig)
        .output()?;
    if !out.status.success() {
        bail!("CRDs not established: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Namespaces (and cluster-scoped objects) the bench made, deleted again at the end, also after an error.
#[derive(Clone, Default)]
pub struct Cleanup {
    namespaces: Arc<Mutex<Vec<String>>>,
    flow_schemas: Arc<Mutex<Vec<String>>>,
}

impl Cleanup {
    /// Creates a namespace `bench-<what>-<run>` labelled as the bench's, once its default ServiceAccount exists.
    pub async fn namespace(&self, client: &Client, name: &str) -> Result<String> {
        let api: Api<Namespace> = Api::all(client.clone());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(BTreeMap::from([("fljob.dev/bench".to_string(), "true".to_string())])),
                ..Default::default()
            },
            ..Default::default()
        };
        api.create(&PostParams::default(), &ns).await.with_context(|| format!("creating namespace {name}"))?;
        self.namespaces.lock().unwrap_or_else(|e| e.into_inner()).push(name.into());
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
        let deadline = Instant::now() + Duration::from_secs(30);
        while sas.get_opt("default").await?.is_none() {
            if Instant::now() > deadline {
                bail!("namespace {name}: no default ServiceAccount after 30 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(name.into())
    }

    /// Records a FlowSchema to delete at the end.
    pub fn flow_schema(&self, name: &str) {
        self.flow_schemas.lock().unwrap_or_else(|e| e.into_inner()).push(name.into());
    }

    /// Deletes one namespace now: strips the finalizers the operator would have removed (it is stopped by then),
    /// then waits up to `wait` until the namespace is gone, so that its deletion does not load the next phase.
    pub async fn delete_namespace(&self, client: &Client, name: &str, wait: Duration) -> Result<()> {
        let api: Api<Namespace> = Api::all(client.clone());
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        strip_finalizers::<FLJob>(client, name).await;
        strip_finalizers::<Pod>(client, name).await;
        let deadline = Instant::now() + wait;
        loop {
            match api.get_opt(name).await {
                Ok(None) => break,
                _ if Instant::now() > deadline => {
                    eprintln!("note: namespace {name} is still being deleted after {wait:?}; going on");
                    break;
                }
                _ => {
                    // Objects created while the namespace was being deleted may carry finalizers again.
                    strip_finalizers::<FLJob>(client, name).await;
                    strip_finalizers::<Pod>(client, name).await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        self.namespaces.lock().unwrap_or_else(|e| e.into_inner()).retain(|n| n != name);
        Ok(())
    }

    /// Deletes everything still recorded.
    pub async fn all(&self, client: &Client) {
        let names = self.namespaces.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for name in names {
            if let Err(e) = self.delete_namespace(client, &name, Duration::from_secs(120)).await {
                eprintln!("note: deleting namespace {name}: {e:#}");
            }
        }
        let schemas = std::mem::take(&mut *self.flow_schemas.lock().unwrap_or_else(|e| e.into_inner()));
        let api: Api<FlowSchema> = Api::all(client.clone());
        for name in schemas {
            let _ = api.delete(&name, &DeleteParams::default()).await;
        }
    }
}

/// Removes every finalizer from the objects of one kind in a namespace (only from those that have one).
async fn strip_finalizers<K>(client: &Client, ns: &str)
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let Ok(list) = api.list(&ListParams::default()).await else { return };
    let names: Vec<String> = list.items.iter().filter(|o| !o.finalizers().is_empty()).map(|o| o.name_any()).collect();
    let patch = serde_json::json!({"metadata": {"finalizers": null}});
    futures::stream::iter(names)
        .for_each_concurrent(16, |n| {
            let (api, patch) = (api.clone(), patch.clone());
            async move {
                let _ = api.patch(&n, &PatchParams::default(), &Patch::Merge(&patch)).await;
            }
        })
        .await;
}

/// What the operator's ServiceAccount may make: one FlowSchema per (API group, resource, verb), so that the API
/// server's own `apiserver_flowcontrol_dispatched_requests_total{flow_schema}` counts its requests apart from every
/// other client, by verb and resource.
pub const OPERATOR_RESOURCES: [(&str, &str); 9] = [
    ("fljob.dev", "fljobs"),
    ("fljob.dev", "fljobs/status"),
    ("fljob.dev", "flsites"),
    ("fljob.dev", "flsites/status"),
    ("", "pods"),
    ("", "secrets"),
    ("events.k8s.io", "events"),
    ("", "events"),
    ("coordination.k8s.io", "leases"),
];
/// The verbs of [`OPERATOR_RESOURCES`].
pub const VERBS: [&str; 7] = ["get", "list", "watch", "create", "update", "patch", "delete"];

/// An identity of its own: a ServiceAccount in `home_ns`, a token for it, a kubeconfig file with that token, and
/// FlowSchemas (priority level `exempt`, as the admin's requests are) that count its requests apart.
pub struct Identity {
    /// The kubeconfig file (token auth) for the operator process.
    pub kubeconfig: PathBuf,
    /// FlowSchema name -> (verb, resource) it counts; "" -> everything else this identity did.
    pub schemas: BTreeMap<String, (String, String)>,
}

impl Identity {
    /// The API server's count of this identity's requests by (verb, resource), from a dispatched-by-schema map.
    pub fn requests(&self, dispatched: &BTreeMap<String, f64>) -> crate::prom::Requests {
        let mut out = crate::prom::Requests::new();
        for (schema, key) in &self.schemas {
            if let Some(v) = dispatched.get(schema) {
                *out.entry(key.clone()).or_default() += v;
            }
        }
        out
    }
}

/// Creates the ServiceAccount `sa` in `home_ns`, its token (4 h), its kubeconfig and its FlowSchemas (`per_verb`:
/// one per verb and resource of [`OPERATOR_RESOURCES`], else a single one for all its requests), and waits until the
/// API server routes its requests through them.
pub async fn identity(
    admin: &Client,
    admin_kubeconfig: &Path,
    cleanup: &Cleanup,
    home_ns: &str,
    sa: &str,
    per_verb: bool,
    dir: &Path,
) -> Result<Identity> {
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), home_ns);
    let account = ServiceAccount { metadata: ObjectMeta { name: Some(sa.into()), ..Default::default() }, ..Default::default() };
    sas.create(&PostParams::default(), &account).await?;
    let tr = TokenRequest {
        spec: TokenRequestSpec { audiences: vec![], expiration_seconds: Some(4 * 3600), ..Default::default() },
        ..Default::default()
    };
    let token = sas
        .create_token_request(sa, &PostParams::default(), &tr)
        .await?
        .status
        .map(|s| s.token)
        .ok_or_else(|| anyhow!("TokenRequest for {home_ns}/{sa} returned no token"))?;
    let kc = Kubeconfig::read_from(admin_kubeconfig)?;
    let cluster = kc.clusters.first().cloned().ok_or_else(|| anyhow!("{} has no cluster", admin_kubeconfig.display()))?;
    let file = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": sa, "context": {"cluster": cluster.name, "user": sa, "namespace": home_ns}}],
        "current-context": sa,
    });
    std::fs::create_dir_all(dir)?;
    let kubeconfig = dir.join(format!("{home_ns}-{sa}.kubeconfig"));
    write_private(&kubeconfig, &serde_json::to_vec_pretty(&file)?)?;

    let subject = Subject {
        kind: "ServiceAccount".into(),
        service_account: Some(ServiceAccountSubject { name: sa.into(), namespace: home_ns.into() }),
        ..Default::default()
    };
    let mut schemas = BTreeMap::new();
    let fs_api: Api<FlowSchema> = Api::all(admin.clone());
    let mk = |name: &str, rules: Option<Vec<ResourcePolicyRule>>, precedence: i32| {
        let rest_rule = rules.is_none();
        FlowSchema {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        spec: Some(FlowSchemaSpec {
            priority_level_configuration: PriorityLevelConfigurationReference { name: "exempt".into() },
            matching_precedence: Some(precedence),
            distinguisher_method: None,
            rules: Some(vec![PolicyRulesWithSubjects {
                subjects: vec![subject.clone()],
                resource_rules: Some(rules.unwrap_or_else(|| {
                    vec![ResourcePolicyRule {
                        verbs: vec!["*".into()],
                        api_groups: vec!["*".into()],
                        resources: vec!["*".into()],
                        cluster_scope: Some(true),
                        namespaces: Some(vec!["*".into()]),
                    }]
                })),
                // The catch-all also takes this identity's discovery and other non-resource requests.
                non_resource_rules: rest_rule.then(|| {
                    vec![NonResourcePolicyRule { verbs: vec!["*".into()], non_resource_urls: vec!["*".into()] }]
                }),
            }]),
        }),
        ..Default::default()
        }
    };
    let mut wanted: Vec<FlowSchema> = Vec::new();
    if per_verb {
        for (group, resource) in OPERATOR_RESOURCES {
            for verb in VERBS {
                let tag = if group.is_empty() { "core".to_string() } else { group.replace('.', "-") };
                let name = format!("{home_ns}-{sa}-{verb}-{tag}-{}", resource.replace('/', "-"));
                let rule = ResourcePolicyRule {
                    verbs: vec![verb.into()],
                    api_groups: vec![group.into()],
                    resources: vec![resource.into()],
                    cluster_scope: Some(false),
                    namespaces: Some(vec!["*".into()]),
                };
                schemas.insert(name.clone(), (verb.to_string(), resource.to_string()));
                wanted.push(mk(&name, Some(vec![rule]), 200));
            }
        }
    }
    let rest = format!("{home_ns}-{sa}-rest");
    schemas.insert(rest.clone(), ("*".into(), if per_verb { "(other)".into() } else { "*".into() }));
    wanted.push(mk(&rest, None, 201));
    for fs in &wanted {
        let name = fs.name_any();
        cleanup.flow_schema(&name);
        fs_api.create(&PostParams::default(), fs).await.with_context(|| format!("creating FlowSchema {name}"))?;
    }

    // Probe until the API server counts this identity's request under our schema (its flow-control configuration
    // follows FlowSchemas through a watch; that takes a moment).
    let me = client(&kubeconfig, &Counted::default()).await?;
    let probe_schema = if per_verb {
        format!("{home_ns}-{sa}-list-fljob-dev-fljobs")
    } else {
        rest.clone()
    };
    bind_admin(admin, home_ns, home_ns, sa).await?;
    let jobs: Api<FLJob> = Api::namespaced(me.clone(), home_ns);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let before = crate::prom::dispatched_by_schema(&raw_get(admin, "/metrics").await?).get(&probe_schema).copied().unwrap_or(0.0);
        let _ = jobs.list(&ListParams::default().limit(1)).await;
        let after = crate::prom::dispatched_by_schema(&raw_get(admin, "/metrics").await?).get(&probe_schema).copied().unwrap_or(0.0);
        if after > before {
            break;
        }
        if Instant::now() > deadline {
            bail!("the API server does not route {home_ns}/{sa} through FlowSchema {probe_schema} after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(Identity { kubeconfig, schemas })
}

/// Grants `home_ns/sa` everything within namespace `ns` (a RoleBinding to the built-in `cluster-admin` ClusterRole
/// is namespace-scoped: the operator started with `--namespace` needs nothing else).
pub async fn bind_admin(admin: &Client, ns: &str, home_ns: &str, sa: &str) -> Result<()> {
    let api: Api<RoleBinding> = Api::namespaced(admin.clone(), ns);
    let rb = RoleBinding {
        metadata: ObjectMeta { name: Some(format!("bench-{sa}")), ..Default::default() },
        role_ref: RoleRef { api_group: "rbac.authorization.k8s.io".into(), kind: "ClusterRole".into(), name: "cluster-admin".into() },
        subjects: Some(vec![RbacSubject {
            kind: "ServiceAccount".into(),
            name: sa.into(),
            namespace: Some(home_ns.into()),
            ..Default::default()
        }]),
    };
    api.create(&PostParams::default(), &rb).await?;
    Ok(())
}

fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(path)?;
    f.write_all(data)?;
    Ok(())
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The operator, as a child process watching one namespace.
pub struct Operator {
    child: Child,
    /// `perf record` attached to it (FLJOB_BENCH_PERF=<dir>).
    perf: Option<Child>,
    /// Its process id (for /proc).
    pub pid: u32,
    /// Its /metrics port on 127.0.0.1.
    pub port: u16,
    /// Its log file.
    pub log: PathBuf,
}

impl Operator {
    /// Starts `bin run --namespace ns` with the given kubeconfig and waits until /readyz says its caches are synced.
    pub async fn start(bin: &Path, ns: &str, kubeconfig: &Path, concurrency: usize, dir: &Path) -> Result<Operator> {
        let port = free_port()?;
        std::fs::create_dir_all(dir)?;
        let log = dir.join(format!("{ns}.operator.log"));
        let out = std::fs::File::create(&log)?;
        let mut cmd = Command::new(bin);
        cmd.args(["run", "--namespace", ns, "--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(["--concurrency", &concurrency.to_string()])
            .env("KUBECONFIG", kubeconfig)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        if let Ok(filter) = std::env::var("FLJOB_BENCH_OPERATOR_LOG") {
            cmd.env("RUST_LOG", filter);
        } else {
            // The operator's own default filter: what a deployment logs.
            cmd.env_remove("RUST_LOG");
        }
        let child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id();
        // With FLJOB_BENCH_PERF=<dir>, a CPU profile of the whole phase: <dir>/<ns>.perf.data (`perf report -i`).
        let perf = match std::env::var_os("FLJOB_BENCH_PERF") {
            Some(pdir) => {
                std::fs::create_dir_all(&pdir)?;
                let data = PathBuf::from(pdir).join(format!("{ns}.perf.data"));
                let p = Command::new("perf")
                    .args(["record", "-F", "199", "--call-graph", "dwarf,8192", "-p", &pid.to_string(), "-o"])
                    .arg(&data)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting perf record")?;
                Some(p)
            }
            None => None,
        };
        let mut op = Operator { child, perf, pid, port, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = op.child.try_wait() {
                bail!("the operator exited ({status}) before it was ready; log {}:\n{}", op.log.display(), op.log_tail());
            }
            if http_get(&format!("http://127.0.0.1:{port}/readyz")).await.is_ok() {
                return Ok(op);
            }
            if Instant::now() > deadline {
                bail!("the operator is not ready after 60 s; log {}:\n{}", op.log.display(), op.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Its /metrics text.
    pub async fn metrics(&self) -> Result<String> {
        http_get(&format!("http://127.0.0.1:{}/metrics", self.port)).await.map_err(|e| anyhow!("operator /metrics: {e}"))
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// True while it runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILLs it (after letting perf write its profile).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.perf.take() {
            let _ = Command::new("kill").args(["-INT", &p.id().to_string()]).status();
            let _ = p.wait();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A plain HTTP/1.1 GET over loopback (the operator's own endpoints).
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
        return Err(std::io::Error::other(head.lines().next().unwrap_or_default().to_string()));
    }
    Ok(body.to_string())
}
