//! `FLSite`: one NVFlare client site, its connection settings, the defaults of its jobs and its quota pool.
#![allow(clippy::duplicated_attributes)] // repeated key = value pairs inside kube's printcolumn(...) lists

use super::{Quantity, Resources};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// How long a job's pod may stay unschedulable before the job fails, unless the site says otherwise.
pub const DEFAULT_PENDING_TIMEOUT_SECONDS: i64 = 120;
/// Where the workspace is mounted unless the site says otherwise (NVFlare's launcher uses the same path).
pub const DEFAULT_WORKSPACE: &str = "/var/tmp/nvflare/workspace";
/// The Python interpreter that runs the worker unless the site says otherwise.
pub const DEFAULT_PYTHON: &str = "python";

/// One NVFlare client site: how its job workers reach the FL server and the client parent, where their
/// credentials and startup kit come from, and the quota pool every job of the site is admitted against.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "fljob.dev",
    version = "v1alpha1",
    kind = "FLSite",
    namespaced,
    status = "FLSiteStatus",
    shortname = "fls",
    category = "fl",
    printcolumn(name = "Client", type_ = "string", json_path = ".spec.clientName", description = "NVFlare client name"),
    printcolumn(name = "Jobs", type_ = "integer", json_path = ".status.used.jobs", description = "Jobs holding quota"),
    printcolumn(name = "Max-Jobs", type_ = "integer", json_path = ".spec.capacity.jobs", description = "Job capacity"),
    printcolumn(name = "GPUs", type_ = "integer", json_path = ".status.used.gpus", description = "GPUs in use"),
    printcolumn(name = "Queued", type_ = "integer", json_path = ".status.queued", description = "Jobs waiting for quota"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    // The name becomes the `fljob.dev/site` label of every worker pod (label values have at most 63 characters).
    validation = Rule::new("size(self.metadata.name) <= 63").message("metadata.name of an FLSite has at most 63 characters (it becomes its worker pods' fljob.dev/site label); use a shorter name")
)]
#[serde(rename_all = "camelCase")]
pub struct FLSiteSpec {
    /// NVFlare client name of this site, passed to the worker as `-c`.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^[^-\\\\p{Z}\\\\p{C}][^\\\\p{Z}\\\\p{C}]*$')").message("clientName must not start with '-' nor hold spaces or control characters (it follows -c on the worker's command line), for example site-a"))]
    pub client_name: String,
    /// The FL server the workers connect to.
    pub server: ServerSpec,
    /// URL of the client parent's internal listener, passed to the worker as `-p` (for example `tcp://site-a-cp:8004`).
    #[schemars(length(min = 1))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z][A-Za-z0-9+.-]*://[^\\\\p{Z}\\\\p{C}]+$')").message("parentUrl must be a URL without spaces, for example tcp://site-a-cp:8004"))]
    pub parent_url: String,
    /// Connection security of the parent listener, passed as `--parent_conn_sec` when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[^-\\\\p{Z}\\\\p{C}][^\\\\p{Z}\\\\p{C}]*$')").message("parentConnSec must not start with '-' nor hold spaces or control characters (it follows --parent_conn_sec on the worker's command line); NVFlare knows clear, tls and mtls"))]
    pub parent_conn_sec: Option<String>,
    /// Secret in this namespace with keys `token`, `signature` and `ssid`, exposed to every worker as
    /// `NVFLARE_JOB_AUTH_TOKEN`, `NVFLARE_JOB_TOKEN_SIGNATURE` and `NVFLARE_JOB_SSID`. A job may name its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub credentials_secret: Option<String>,
    /// Secret in this namespace holding the site's startup kit; mounted read-only at `<workspace>/startup` (`-w`).
    #[schemars(length(min = 1, max = 253))]
    pub startup_kit_secret: String,
    /// Where the worker's workspace lives (`-m`).
    #[serde(default)]
    pub workspace: WorkspaceSpec,
    /// Defaults for this site's jobs.
    pub defaults: SiteDefaults,
    /// The site's quota pool. Every key is optional; an absent key is unlimited. Lowering it below what is in use
    /// evicts nothing, it only stops new admissions.
    #[serde(default)]
    pub capacity: Capacity,
    /// Seconds a job's pod may stay unschedulable before the job fails with reason Unschedulable (default 120).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub pending_timeout_seconds: Option<i64>,
    /// What a job's `podTemplate` may ask for beyond the worker's own pod. Nothing by default: whoever may create an
    /// FLJob must not thereby act as another ServiceAccount or read the namespace's Secrets.
    #[serde(default)]
    pub pod_policy: PodPolicy,
}

/// A site's rules for `FLJob.spec.podTemplate`, checked by the operator before a job is admitted; a job that
/// breaks one fails with reason PolicyViolation, a condition and an Event naming the field and the rule to change.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodPolicy {
    /// ServiceAccounts a job may run as (`podTemplate.spec.serviceAccountName`). Empty: none (the worker runs as
    /// the namespace's `default` ServiceAccount, with no token mounted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 253)))]
    pub allowed_service_accounts: Vec<String>,
    /// May `podTemplate.spec.volumes` mount Secrets (`secret`, or `projected` with a `secret` source)?
    #[serde(default)]
    pub allow_secret_volumes: bool,
    /// May `podTemplate.spec.volumes` project ServiceAccount tokens (`projected.sources[].serviceAccountToken`)?
    #[serde(default)]
    pub allow_token_volumes: bool,
    /// May `podTemplate.spec.env` read Secrets (`valueFrom.secretKeyRef`)?
    #[serde(default)]
    pub allow_secret_env: bool,
    /// May `podTemplate.spec.volumes` use `hostPath`?
    #[serde(default)]
    pub allow_host_path: bool,
}

/// The FL server's address.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerSpec {
    /// host:port of the FL server, passed to the worker as `-g`.
    #[schemars(length(min = 1))]
    #[x_kube(validation = Rule::new("self.matches('^[^-:/\\\\p{Z}\\\\p{C}][^:/\\\\p{Z}\\\\p{C}]*:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$')").message("server.target must be host:port with a port from 1 to 65535, a host not starting with '-' and no spaces, for example fl-server.example.org:8002"))]
    pub target: String,
    /// Communication scheme, passed as `-scheme` (default grpc).
    #[serde(default)]
    pub scheme: Scheme,
}

/// NVFlare's communication schemes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    /// gRPC (NVFlare's default).
    #[default]
    Grpc,
    /// HTTP.
    Http,
    /// Plain TCP.
    Tcp,
}

impl Scheme {
    /// The word NVFlare expects on its command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Grpc => "grpc",
            Scheme::Http => "http",
            Scheme::Tcp => "tcp",
        }
    }
}

/// The worker's workspace volume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceSpec {
    /// Where the workspace is mounted in the worker (default /var/tmp/nvflare/workspace).
    #[serde(default = "default_workspace")]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("workspace.mountPath must be an absolute path"))]
    pub mount_path: String,
    /// A PersistentVolumeClaim in this namespace to use as the workspace; an emptyDir when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub persistent_volume_claim: Option<String>,
}

fn default_workspace() -> String {
    DEFAULT_WORKSPACE.to_string()
}

impl Default for WorkspaceSpec {
    fn default() -> Self {
        Self { mount_path: default_workspace(), persistent_volume_claim: None }
    }
}

/// Defaults applied to every job of the site that does not set its own.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SiteDefaults {
    /// Container image of the NVFlare worker (for example nvflare/nvflare:2.9.0).
    #[schemars(length(min = 1))]
    #[x_kube(validation = Rule::new("!self.matches('[\\\\p{Z}\\\\p{C}]')").message("defaults.image must be an image reference without spaces or control characters, for example nvflare/nvflare:2.9.0"))]
    pub image: String,
    /// Python interpreter in the image that runs the worker (default `python`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub python_path: Option<String>,
    /// Resources of a job that does not ask for its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Python module the worker container runs (default `fljob_launcher.worker`, the entry point shipped in the
    /// `fljob-launcher` package: it runs NVFlare's worker in-process and turns SIGTERM and the operator's abort
    /// annotation into NVFlare's own ABORT, so aborts are graceful). Set
    /// `nvflare.private.fed.app.client.worker_process` for an image without `fljob-launcher`; that worker ignores
    /// SIGTERM as PID 1, so every abort then ends at the grace period with a kill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[A-Za-z_][A-Za-z0-9_.]*$"))]
    pub worker_module: Option<String>,
}

/// A site's quota pool; an absent key is unlimited.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    /// How many jobs may hold quota at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub jobs: Option<i32>,
    /// GPUs available to jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub gpus: Option<i32>,
    /// CPU available to jobs (a Kubernetes quantity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isQuantity(string(self)) && quantity(string(self)).compareTo(quantity('0')) >= 0").message("capacity.cpu must be a non-negative Kubernetes quantity such as 32 or 500m"))]
    pub cpu: Option<Quantity>,
    /// Memory available to jobs (a Kubernetes quantity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isQuantity(string(self)) && quantity(string(self)).compareTo(quantity('0')) >= 0").message("capacity.memory must be a non-negative Kubernetes quantity such as 256Gi"))]
    pub memory: Option<Quantity>,
}

/// What the site's pool holds right now. The list of allocations is the ledger: a job holds quota exactly while
/// an entry with its uid is here.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct FLSiteStatus {
    /// Sum of all allocations.
    #[serde(default)]
    pub used: Usage,
    /// One entry per job holding quota.
    #[serde(default)]
    pub allocations: Vec<Allocation>,
    /// Jobs of this site waiting for quota.
    #[serde(default)]
    pub queued: i32,
    /// The generation of the spec last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready: the site's settings are usable.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Quota in use.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// Jobs holding quota.
    #[serde(default)]
    pub jobs: i32,
    /// GPUs held.
    #[serde(default)]
    pub gpus: i32,
    /// CPU held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Memory held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
}

/// What one job holds from the pool.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    /// Name of the FLJob.
    pub job: String,
    /// UID of the FLJob: an allocation belongs to exactly one object, not to a name that may be reused.
    pub uid: String,
    /// GPUs held.
    #[serde(default)]
    pub gpus: i32,
    /// CPU held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Memory held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// When the job was admitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
}
