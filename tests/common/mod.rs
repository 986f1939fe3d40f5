//! Shared helpers for the integration tests that run against the local control plane
//! (`make test`, or `make cluster-up` and `export FLJOB_TEST_KUBECONFIG=$(make -s kubeconfig)`).
//!
//! Each test gets its own namespace ([`namespace`]); pods on the cluster's kwok nodes are
//! driven by `sim.fljob.dev/...` annotations (see hack/README-testing.md).
#![allow(dead_code)]

pub mod own;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, PodSpec, ServiceAccount};
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, Config, Resource, ResourceExt};
use serde::de::DeserializeOwned;

/// Env var naming the admin kubeconfig of the test cluster.
pub const KUBECONFIG_ENV: &str = "FLJOB_TEST_KUBECONFIG";
/// Env var naming the dir holding kubectl, helm, ... of the same versions as the cluster.
pub const TOOLS_BIN_ENV: &str = "FLJOB_TOOLS_BIN";
/// Label put on every namespace a test creates.
pub const TEST_LABEL: &str = "fljob.dev/test";

const HOW_TO: &str = "run `make test`, or `make cluster-up` and \
    export FLJOB_TEST_KUBECONFIG=$(make -s kubeconfig) FLJOB_TOOLS_BIN=/tmp/fljob-cluster/bin";

/// Path of the admin kubeconfig (from `FLJOB_TEST_KUBECONFIG`).
pub fn kubeconfig_path() -> PathBuf {
    match std::env::var_os(KUBECONFIG_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!("{KUBECONFIG_ENV} is not set: {HOW_TO}"),
    }
}

/// A client for the test cluster, authenticated as cluster admin.
pub async fn client() -> Client {
    client_from(&kubeconfig_path()).await
}

/// A client from any kubeconfig file (e.g. one written by `hack/cluster.sh sa-kubeconfig`).
pub async fn client_from(path: &std::path::Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(path)
        .unwrap_or_else(|e| panic!("cannot read kubeconfig {}: {e}; {HOW_TO}", path.display()));
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("bad kubeconfig {}: {e}", path.display()));
    Client::try_from(config).expect("cannot build a kube client")
}

/// Path of a tool (kubectl, helm, kwok, ...) from `FLJOB_TOOLS_BIN`.
pub fn tool(name: &str) -> PathBuf {
    let dir = match std::env::var_os(TOOLS_BIN_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!("{TOOLS_BIN_ENV} is not set: {HOW_TO}"),
    };
    let path = dir.join(name);
    assert!(path.is_file(), "{} does not exist (run `make tools`)", path.display());
    path
}

/// `kubectl` with the admin kubeconfig already set, and a discovery cache of this test process's own: the shared
/// ~/.kube/cache can hold the CRDs' names from before this run installed them (kubectl keeps it for hours).
pub fn kubectl() -> Command {
    let mut cmd = Command::new(tool("kubectl"));
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("kubectl-cache-{}", std::process::id()));
    cmd.arg("--kubeconfig").arg(kubeconfig_path()).arg("--cache-dir").arg(cache);
    cmd
}

/// A short suffix unique within this cluster's lifetime (time, pid and a counter).
pub fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut x = nanos ^ (u64::from(std::process::id()) << 32) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // base36, 8 chars
    let mut s = String::new();
    for _ in 0..8 {
        s.push(char::from_digit((x % 36) as u32, 36).unwrap());
        x /= 36;
    }
    s
}

/// A namespace created for one test. Call [`TestNs::cleanup`] at the end of the test; if
/// the test panics first, `Drop` deletes the namespace with kubectl (best effort).
pub struct TestNs {
    pub name: String,
    client: Client,
    cleaned: bool,
}

impl TestNs {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A namespaced `Api` in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Deletes the namespace (without waiting for it to be gone).
    pub async fn cleanup(mut self) {
        self.cleaned = true;
        let api: Api<Namespace> = Api::all(self.client.clone());
        match api.delete(&self.name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => eprintln!("warning: cannot delete namespace {}: {e}", self.name),
        }
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        // No async in Drop, and the client is tied to the test's runtime: use kubectl.
        if let (Some(bin), Some(kc)) = (std::env::var_os(TOOLS_BIN_ENV), std::env::var_os(KUBECONFIG_ENV)) {
            let _ = Command::new(PathBuf::from(bin).join("kubectl"))
                .arg("--kubeconfig")
                .arg(kc)
                .args(["delete", "namespace", &self.name, "--wait=false", "--ignore-not-found"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// Creates a uniquely named namespace `<prefix>-<suffix>` labelled `fljob.dev/test=true`
/// and waits for its default ServiceAccount (pods are refused until it exists).
pub async fn namespace(client: &Client, prefix: &str) -> TestNs {
    namespace_with_labels(client, prefix, &[]).await
}

/// Like [`namespace`], with extra labels (e.g. `pod-security.kubernetes.io/enforce`).
pub async fn namespace_with_labels(client: &Client, prefix: &str, labels: &[(&str, &str)]) -> TestNs {
    let mut clean: String = prefix
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    clean.truncate(40);
    let clean = clean.trim_matches('-');
    let name = format!("{}-{}", if clean.is_empty() { "test" } else { clean }, unique_suffix());

    let mut all_labels = BTreeMap::from([(TEST_LABEL.to_string(), "true".to_string())]);
    for (k, v) in labels {
        all_labels.insert(k.to_string(), v.to_string());
    }
    let ns = Namespace {
        metadata: ObjectMeta { name: Some(name.clone()), labels: Some(all_labels), ..Default::default() },
        ..Default::default()
    };
    let api: Api<Namespace> = Api::all(client.clone());
    api.create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("cannot create namespace {name}: {e}"));
    let test_ns = TestNs { name: name.clone(), client: client.clone(), cleaned: false };

    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
    wait_for(&sas, "default", Duration::from_secs(60), |_| true)
        .await
        .unwrap_or_else(|e| panic!("namespace {name}: no default ServiceAccount (is kube-controller-manager running?): {e:#}"));
    test_ns
}

/// Waits (with a watch) until the object `name` exists and satisfies `predicate`, and
/// returns it. On timeout the error shows the object's last state.
pub async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    predicate: impl Fn(&K) -> bool + Send + 'static,
) -> anyhow::Result<K>
where
    K: Clone + Debug + Send + Sync + DeserializeOwned + Resource + serde::Serialize + 'static,
{
    let cond = move |obj: Option<&K>| obj.is_some_and(&predicate);
    match tokio::time::timeout(timeout, await_condition(api.clone(), name, cond)).await {
        Ok(Ok(Some(obj))) => Ok(obj),
        Ok(Ok(None)) => Err(anyhow!("{name} was deleted while waiting for it")),
        Ok(Err(e)) => Err(anyhow!(e)).with_context(|| format!("watching {name}")),
        Err(_) => {
            let last = match api.get_opt(name).await {
                Ok(Some(o)) => serde_json::to_string_pretty(&o).unwrap_or_else(|_| format!("{o:?}")),
                Ok(None) => "<does not exist>".to_string(),
                Err(e) => format!("<cannot read it: {e}>"),
            };
            Err(anyhow!("timed out after {timeout:?} waiting for {name}; last state:\n{last}"))
        }
    }
}

/// Waits until the object `name` is gone (deleted, or replaced by one with another uid).
pub async fn wait_gone<K>(api: &Api<K>, name: &str, timeout: Duration) -> anyhow::Result<()>
where
    K: Clone + Debug + Send + DeserializeOwned + Resource + 'static,
{
    let Some(obj) = api.get_opt(name).await? else { return Ok(()) };
    let uid = obj.uid().unwrap_or_default();
    tokio::time::timeout(timeout, await_condition(api.clone(), name, conditions::is_deleted(&uid)))
        .await
        .map_err(|_| anyhow!("timed out after {timeout:?} waiting for {name} to be deleted"))??;
    Ok(())
}

/// A minimal Pod (restartPolicy Never, one container) with the given annotations; on the
/// test cluster its lifecycle is simulated by kwok from the `sim.fljob.dev/...` annotations.
pub fn sim_pod(name: &str, annotations: &[(&str, &str)]) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            annotations: Some(annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            termination_grace_period_seconds: Some(5),
            containers: vec![Container {
                name: "main".into(),
                image: Some("registry.example.invalid/fljob/worker:1".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The phase of a pod ("" if unset).
pub fn phase(pod: &Pod) -> &str {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("")
}

/// The operator binary built from this tree, with the command line and environment of the chart's Deployment `dep`
/// (so the chart's flags are proven to be the binary's): the metrics address moves to `metrics_addr`, and POD_NAME /
/// POD_NAMESPACE are what the downward API would give a pod named `pod_name` in `ns`. Returns the command and its
/// arguments (for logging); the caller adds the kubeconfig and where the output goes.
pub fn chart_operator_command(
    dep: k8s_openapi::api::apps::v1::Deployment,
    ns: &str,
    pod_name: &str,
    metrics_addr: &str,
) -> anyhow::Result<(Command, Vec<String>)> {
    let container = dep.spec.and_then(|s| s.template.spec).and_then(|s| s.containers.into_iter().next());
    let container = container.context("the chart's Deployment has no container")?;
    let mut args = container.args.unwrap_or_default();
    let at = args.iter().position(|a| a.starts_with("--metrics-addr")).context("the chart sets no --metrics-addr")?;
    args[at] = format!("--metrics-addr={metrics_addr}");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fljob-operator"));
    cmd.args(&args).env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for var in container.env.unwrap_or_default() {
        match (var.value, var.value_from.and_then(|f| f.field_ref).map(|f| f.field_path)) {
            (Some(value), _) => cmd.env(&var.name, value),
            (None, Some(path)) if path == "metadata.name" => cmd.env(&var.name, pod_name),
            (None, Some(path)) if path == "metadata.namespace" => cmd.env(&var.name, ns),
            (value, from) => anyhow::bail!("the chart's env {} is neither a value nor a known fieldRef: {value:?} {from:?}", var.name),
        };
    }
    Ok((cmd, args))
}
