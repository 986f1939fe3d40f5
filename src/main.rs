//! fljob-operator: wiring only. `run` starts the controllers (behind a Lease when asked) and the HTTP endpoints
//! /healthz, /readyz and /metrics; `crd` prints the CustomResourceDefinitions.

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use clap::{Parser, Subcommand, ValueEnum};
use fljob_operator::controller::{self, Options};
use fljob_operator::leader::Elector;
use fljob_operator::metrics::Metrics;
use kube::client::ClientBuilder;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tracing::{error, info};

#[derive(Parser)]
#[command(name = "fljob-operator", version, about = "Runs NVIDIA FLARE client jobs as Kubernetes Pods")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controllers (kubeconfig from KUBECONFIG / ~/.kube/config, or in-cluster).
    Run(RunArgs),
    /// Print the CustomResourceDefinitions as YAML (or write one file per CRD into --out-dir).
    Crd {
        /// Write crds/<group>_<plural>.yaml files into this directory instead of printing.
        #[arg(long)]
        out_dir: Option<std::path::PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Watch only this namespace (a namespace-scoped Role is enough); all namespaces when absent.
    #[arg(long, env = "FLJOB_NAMESPACE")]
    namespace: Option<String>,
    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Reconcile only while holding a coordination.k8s.io Lease (for more than one replica).
    #[arg(long)]
    leader_elect: bool,
    /// Name of the Lease.
    #[arg(long, default_value = "fljob-operator")]
    lease_name: String,
    /// Namespace of the Lease; the pod's own namespace by default.
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// How long a Lease stays valid without renewal, in seconds.
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Run even on CRDs older than this build's (which prune fields it writes): only to let an old release finish a
    /// controlled migration. Normally the operator refuses, saying how to update the CRDs.
    #[arg(long, env = "FLJOB_ALLOW_OLD_CRDS")]
    allow_old_crds: bool,
    /// How many FLJobs are reconciled at once.
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube_runtime=warn,kube_client=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

struct Http {
    registry: Registry,
    ready: Arc<AtomicBool>,
}

async fn serve_metrics(State(s): State<Arc<Http>>) -> impl IntoResponse {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &s.registry) {
        Ok(()) => (StatusCode::OK, [("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], out),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, [("content-type", "text/plain")], String::new()),
    }
}

async fn readyz(State(s): State<Arc<Http>>) -> impl IntoResponse {
    if s.ready.load(Ordering::Relaxed) { (StatusCode::OK, "ok") } else { (StatusCode::SERVICE_UNAVAILABLE, "starting") }
}

fn print_crds(out_dir: Option<std::path::PathBuf>) -> Result<(), Box<dyn std::error::Error>> {
    use std::io::Write;
    let files = fljob_operator::api::crd_files()?;
    match out_dir {
        Some(dir) => {
            for (name, yaml) in files {
                std::fs::write(dir.join(name), yaml)?;
            }
        }
        None => {
            let mut out = std::io::stdout().lock();
            for (_, yaml) in files {
                // A closed pipe (`| head`) is not an error worth a panic.
                if writeln!(out, "---\n{}", yaml.trim_end()).is_err() {
                    break;
                }
            }
        }
    }
    Ok(())
}

fn identity() -> String {
    std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()))
        .map(|h| format!("{h}-{}", std::process::id()))
        .unwrap_or_else(|| format!("fljob-operator-{}", std::process::id()))
}

async fn run(args: RunArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let config = kube::Config::infer().await?;
    let default_ns = config.default_namespace.clone();
    let counter = metrics.clone();
    let client = ClientBuilder::try_from(config)?
        .with_layer(&tower::util::MapRequestLayer::new(move |req: http::Request<kube::client::Body>| {
            counter.count_request(req.method(), req.uri());
            req
        }))
        .build();

    let ready = Arc::new(AtomicBool::new(false));
    let http = Arc::new(Http { registry, ready: ready.clone() });
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(serve_metrics))
        .with_state(http.clone());
    let listener = tokio::net::TcpListener::bind(args.metrics_addr).await?;
    info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            error!(error = %e, "HTTP server stopped");
        }
    });

    if let Err(e) = check_installed_crds(&client).await {
        if !args.allow_old_crds {
            return Err(e);
        }
        tracing::warn!(error = %e, "running on older CRDs (--allow-old-crds)");
    }

    let identity = identity();
    // Ready once the caches are synced (the controllers set it), or while standing by for the lease.
    let opts = Options { namespace: args.namespace.clone(), identity: identity.clone(), concurrency: args.concurrency, ready: ready.clone() };
    if !args.leader_elect {
        metrics.leader.set(1);
        controller::run(client, metrics, opts).await;
        return Ok(());
    }
    let lease_ns = args.lease_namespace.clone().or(args.namespace.clone()).unwrap_or(default_ns);
    let elector = Elector::new(client.clone(), &lease_ns, &args.lease_name, &identity, Duration::from_secs(args.lease_duration_seconds));
    // A standby replica is ready: it serves its endpoints and waits for the lease.
    http.ready.store(true, Ordering::Relaxed);
    tokio::select! {
        _ = elector.acquire() => {}
        _ = fljob_operator::shutdown_signal() => return Ok(()),
    }
    metrics.leader.set(1);
    // The new leader is ready again once its caches are synced.
    http.ready.store(false, Ordering::Relaxed);
    tokio::select! {
        _ = controller::run(client, metrics.clone(), opts) => {
            elector.release().await;
            Ok(())
        }
        _ = elector.hold() => {
            metrics.leader.set(0);
            Err("lost leadership; exiting so that only one replica reconciles".into())
        }
    }
}

/// Refuses to run on CRDs older than this build's (see `api::installed`). Reads the API server's published OpenAPI
/// document, which every authenticated client may read (no ClusterRole needed); it lags a CRD change by seconds, so
/// a mismatch is retried for 30 s before it counts.
async fn check_installed_crds(client: &kube::Client) -> Result<(), Box<dyn std::error::Error>> {
    use fljob_operator::api::{FLJob, FLSite, installed};
    use kube::CustomResourceExt;
    let compiled = |crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition| {
        crd.spec.versions.first().and_then(|v| v.schema.as_ref()?.open_api_v3_schema.as_ref()).and_then(|s| serde_json::to_value(s).ok())
    };
    let wanted = [("FLJob", FLJob::crd_name(), compiled(FLJob::crd())), ("FLSite", FLSite::crd_name(), compiled(FLSite::crd()))];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let req = http::Request::get("/openapi/v3/apis/fljob.dev/v1alpha1").body(Vec::new())?;
        let problem = match client.request_text(req).await {
            Err(e) => format!("cannot read the installed CRDs' schema (/openapi/v3/apis/fljob.dev/v1alpha1): {e}; are the CRDs installed?"),
            Ok(text) => {
                let doc: serde_json::Value = serde_json::from_str(&text)?;
                let mut lacking = Vec::new();
                for (kind, name, schema) in &wanted {
                    let published = doc.pointer(&format!("/components/schemas/dev.fljob.v1alpha1.{kind}"));
                    match (schema, published) {
                        (Some(schema), Some(published)) => {
                            let missing = installed::missing(schema, published);
                            if !missing.is_empty() {
                                lacking.push(format!("{name} lacks {}", missing.join(", ")));
                            }
                        }
                        _ => lacking.push(format!("{name} is not installed")),
                    }
                }
                if lacking.is_empty() {
                    return Ok(());
                }
                format!(
                    "the installed CRDs are older than this operator ({}); apply the chart's CRDs first: \
                     helm show crds <chart> --version <version> | kubectl apply --server-side --force-conflicts -f - \
                     (README, \"Upgrading\")",
                    lacking.join("; ")
                )
            }
        };
        if std::time::Instant::now() >= deadline {
            return Err(problem.into());
        }
        tracing::warn!(%problem, "checking the installed CRDs again in 2 s");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crd { out_dir } => print_crds(out_dir),
        Command::Run(args) => {
            init_tracing(args.log_format);
            run(args).await
        }
    };
    if let Err(e) = result {
        eprintln!("fljob-operator: {e}");
        std::process::exit(1);
    }
}
