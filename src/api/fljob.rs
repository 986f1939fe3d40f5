//! `FLJob`: one NVFlare job run at a site, reconciled into one worker Pod.
#![allow(clippy::duplicated_attributes)] // repeated key = value pairs inside kube's printcolumn(...) lists

use super::Resources;
use k8s_openapi::api::core::v1::{Affinity, EnvVar, Toleration, Volume, VolumeMount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// NVFlare's `max_wait`: how long an aborted worker gets to stop by itself.
pub const DEFAULT_ABORT_GRACE_SECONDS: i64 = 10;
/// Annotation on the FLJob that requests a task-scope abort (NVFlare ABORT_TASK); any new value relays it.
pub const ABORT_TASK_ANNOTATION: &str = "fljob.dev/abort-task";
/// Annotation on the pod that tells the worker to stop (App-scope abort).
pub const ABORT_ANNOTATION: &str = "fljob.dev/abort";

/// One NVFlare job run at this site. The operator admits it against its FLSite's quota, starts the NVFlare worker
/// as a Pod, reports its status and exit code, relays aborts and frees its quota exactly once when it ends.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "fljob.dev",
    version = "v1alpha1",
    kind = "FLJob",
    namespaced,
    status = "FLJobStatus",
    shortname = "flj",
    category = "fl",
    printcolumn(name = "Site", type_ = "string", json_path = ".spec.site", description = "FLSite the job runs at"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase", description = "Lifecycle phase"),
    printcolumn(name = "Client-Status", type_ = "string", json_path = ".status.clientStatus", description = "NVFlare client status"),
    printcolumn(name = "Exit", type_ = "integer", json_path = ".status.exitCode", description = "NVFlare return code"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.reason", description = "Why it failed or was aborted"),
    printcolumn(name = "Job-ID", type_ = "string", json_path = ".spec.jobId", priority = 1, description = "NVFlare job id"),
    printcolumn(name = "Pod", type_ = "string", json_path = ".status.podName", priority = 1, description = "Worker pod"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    // The name becomes the worker pod's `fljob.dev/job` label, and label values have at most 63 characters: a longer
    // name would be accepted here and then every pod for it refused.
    validation = Rule::new("size(self.metadata.name) <= 63").message("metadata.name of an FLJob has at most 63 characters (it becomes the worker pod's fljob.dev/job label); use a shorter name")
)]
#[serde(rename_all = "camelCase")]
pub struct FLJobSpec {
    /// NVFlare job id, passed to the worker as `-n`. Immutable.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("jobId is immutable; create a new FLJob for another job"))]
    pub job_id: String,
    /// Name of the FLSite in this namespace the job runs at (it is also the worker pod's `fljob.dev/site` label, so
    /// at most 63 characters). Immutable.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(
        validation = Rule::new("self == oldSelf").message("site is immutable; create a new FLJob for another site"),
        validation = Rule::new("size(self) <= 63 && self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')").message("site must be the name of an FLSite: lowercase letters, digits, '-' and '.', at most 63 characters, for example site-a")
    )]
    pub site: String,
    /// Worker image; the site's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    #[x_kube(validation = Rule::new("!self.matches('[\\\\p{Z}\\\\p{C}]')").message("image must be an image reference without spaces or control characters, for example nvflare/nvflare:2.9.0"))]
    pub image: Option<String>,
    /// Free-form job meta, delivered to the worker as `<workspace>/<jobId>/meta.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub meta: Option<serde_json::Value>,
    /// NVFlare options, each `key=value`, passed as `--set <options...> print_conf=True`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 256)))]
    #[x_kube(validation = Rule::new("self.all(o, o.matches('^[A-Za-z_][A-Za-z0-9_.-]*=[^\\\\p{Z}\\\\p{C}]*$'))").message("every option must be key=value without spaces or control characters, for example secure_train=true"))]
    pub options: Vec<String>,
    /// What the job needs; requests equal limits; `gpus` becomes `nvidia.com/gpu`; counted against the site's quota.
    /// The site's default resources when absent. Immutable: the site admits a job for what it asked; create a new
    /// FLJob to ask for more. A cpu or memory of 0 is refused: it would count nothing against the pool and, as a
    /// limit, mean no limit at all on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = Rule::new("self == oldSelf").message("resources are immutable (the site admitted the job for them); create a new FLJob to change them"),
        validation = Rule::new("!has(self.cpu) || !isQuantity(string(self.cpu)) || quantity(string(self.cpu)).isGreaterThan(quantity('0'))").message("resources.cpu must be more than 0 (a limit of 0 is no limit); leave it out for the site's default").field_path(".cpu"),
        validation = Rule::new("!has(self.memory) || !isQuantity(string(self.memory)) || quantity(string(self.memory)).isGreaterThan(quantity('0'))").message("resources.memory must be more than 0 (a limit of 0 is no limit); leave it out for the site's default").field_path(".memory")
    )]
    pub resources: Option<Resources>,
    /// Secret with keys `token`, `signature`, `ssid` (and `transferToken` with `workspaceOwner`) for this job only;
    /// the site's `credentialsSecret` when absent. The launcher creates one per job, so it never goes stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub credentials_secret: Option<String>,
    /// FQCN of the NVFlare client parent that holds this job's workspace (`local/`, the app, `meta.json`) and takes
    /// its results back: the worker downloads them at start and uploads at the end (NVFlare 2.9's workspace
    /// transfer, `NVFL_WORKSPACE_OWNER_FQCN`). The launcher sets it, with the transfer token in the credentials
    /// Secret (key `transferToken`). Unset: no transfer; the site's workspace volume must already hold them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._@-]*$"))]
    pub workspace_owner: Option<String>,
    /// How long the pod may take to start before the job fails (image pull, scheduling, volumes), overriding the
    /// site's `pendingTimeoutSeconds` (NVFlare's `launcher_spec[site].k8s.pending_timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub pending_timeout_seconds: Option<i64>,
    /// Set true to abort the job (NVFlare App-scope abort): the worker is told through the pod annotation
    /// `fljob.dev/abort`, gets `abortGracePeriodSeconds` to stop by itself, then its pod is deleted. Cannot be undone.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self || !oldSelf").message("an abort cannot be withdrawn"))]
    pub abort: bool,
    /// Seconds an aborted worker gets to stop by itself before its pod is deleted (default 10, NVFlare's max_wait).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub abort_grace_period_seconds: Option<i64>,
    /// Seconds the job may run, counted from its start; then it is aborted with reason DeadlineExceeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,
    /// Seconds after the job finished when the FLJob (and its pod) is deleted. Kept forever when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i64>,
    /// Additions to the worker pod. Everything the operator sets itself (command, credentials, workspace) wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template: Option<PodTemplate>,
}

fn free_form_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "description": "Free-form job meta, delivered to the worker as <workspace>/<jobId>/meta.json.",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

fn opaque_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

fn opaque_volumes(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "maxLength": 63}},
            "x-kubernetes-preserve-unknown-fields": true
        },
        "maxItems": 32
    })
}

fn env_list(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "maxItems": 64,
        "items": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "maxLength": 253},
                "value": {"type": "string"}
            },
            "x-kubernetes-preserve-unknown-fields": true
        }
    })
}

/// What a user may add to the worker pod.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplate {
    /// Labels and annotations added to the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<PodTemplateMetadata>,
    /// Scheduling and environment additions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<PodTemplateSpec>,
}

/// Labels and annotations added to the worker pod.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplateMetadata {
    /// Labels added to the pod; the operator's own labels win.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations added to the pod; `fljob.dev/*` keys are the operator's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    #[x_kube(validation = Rule::new("self.all(k, !k.startsWith('fljob.dev/'))").message("fljob.dev/ annotations are set by the operator; use spec.abort or the FLJob's fljob.dev/abort-task annotation"))]
    pub annotations: BTreeMap<String, String>,
}

/// Scheduling and environment additions to the worker pod.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplateSpec {
    /// Node labels the pod must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Affinity rules of the pod (a core/v1 Affinity; the API server validates it when the pod is created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "opaque_object")]
    pub affinity: Option<Affinity>,
    /// PriorityClass of the pod; not one of the cluster's own `system-*` classes, which preempt everything else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("!self.startsWith('system-')").message("priorityClassName system-node-critical and system-cluster-critical are for the cluster's own components; use a PriorityClass of the site's"))]
    pub priority_class_name: Option<String>,
    /// Seconds between the SIGTERM and the SIGKILL when the pod is deleted (the Kubernetes default, 30, when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub termination_grace_period_seconds: Option<i64>,
    /// ServiceAccount the worker runs as (its token is not mounted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Extra environment of the worker. The NVFLARE_JOB_* credential variables come from the credentials Secret only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "env_list")]
    #[x_kube(validation = Rule::new("self.all(e, !e.name.startsWith('NVFLARE_JOB_') && !e.name.startsWith('NVFL_WORKSPACE_'))").message("NVFLARE_JOB_* and NVFL_WORKSPACE_* variables are the operator's: set spec.credentialsSecret and spec.workspaceOwner instead"))]
    pub env: Vec<EnvVar>,
    /// Extra volumes of the pod (core/v1 Volumes, validated by the API server when the pod is created).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "opaque_volumes")]
    #[x_kube(validation = Rule::new("self.all(v, !(v.name in ['workspace', 'startup-kit', 'fljob-info']))").message("volume names workspace, startup-kit and fljob-info are the operator's"))]
    pub volumes: Vec<Volume>,
    /// Extra volume mounts of the worker container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
}

/// Lifecycle phase of an FLJob.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Phase {
    /// Not yet admitted or waiting for its site or Secrets.
    #[default]
    Pending,
    /// Waiting for the site's quota.
    Queued,
    /// Admitted; the worker pod exists but its container has not started.
    Starting,
    /// The worker container runs.
    Running,
    /// An abort is being relayed.
    Aborting,
    /// The worker exited 0.
    Succeeded,
    /// The worker failed; see reason and exitCode.
    Failed,
    /// The job was aborted (or ran past its deadline).
    Aborted,
}

impl Phase {
    /// Succeeded, Failed and Aborted are final: the job never runs again.
    pub fn is_finished(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed | Phase::Aborted)
    }
}

/// What the operator observed of the job.
// The API server fills in `observedGeneration: 0` until the operator writes the first status: kstatus (Helm's
// --wait, Flux, Argo CD) would otherwise call a job it has not looked at yet Current.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("default" = {"observedGeneration": 0}))]
pub struct FLJobStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: Phase,
    /// NVFlare's client status words: not started, starting, started, stopped, exception.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_status: Option<String>,
    /// NVFlare return code once the job finished (0, 1, 9, 101-104, 127, or the worker's own code).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Why the job failed or was aborted (Exception, UnsafeComponent, ConfigError, InfrastructureError,
    /// ExecutionError, OOMKilled, Evicted, ImagePullFailed, Unschedulable, DeadlineExceeded, Aborted, PodLost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A sentence a person can act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The worker pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// When the worker container started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the job finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// What the site admitted the job with (its pod is built from this). Kept once the job finished, as the record
    /// of what it held; whether the site still holds it is the FLSite's `status.allocations`, the one ledger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<Resources>,
    /// The App-scope abort, once requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<AbortStatus>,
    /// The last task-scope abort relayed to the worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_task_abort: Option<TaskAbortStatus>,
    /// The generation of the spec last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Resolved, Admitted, Started, Finished, AbortRequested, and kstatus's Reconciling and Stalled (one per type).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// The App-scope abort as it progresses; all times recorded so the timers survive an operator restart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AbortStatus {
    /// When the abort was requested (spec.abort, deletion of the FLJob, or the deadline).
    pub requested_at: Time,
    /// Why: Aborted (spec.abort), Deleted (the FLJob was deleted) or DeadlineExceeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    /// When the worker's pod was deleted because it did not stop within the grace period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_deleted_at: Option<Time>,
    /// Which step ended the job: Graceful (the worker stopped by itself), Deleted (the pod was deleted) or Forced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<AbortMethod>,
    /// When the abort was complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
}

/// Which step of the abort protocol ended the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum AbortMethod {
    /// The worker stopped by itself within the grace period (or there was no worker to stop).
    Graceful,
    /// The pod was deleted after the grace period and went away within its own termination grace period.
    Deleted,
    /// The pod was still there after its termination grace period and was force-deleted.
    Forced,
}

/// A task-scope abort relayed to the running worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskAbortStatus {
    /// The value of the FLJob's `fljob.dev/abort-task` annotation that was relayed.
    pub value: String,
    /// When it reached the pod.
    pub relayed_at: Time,
}
