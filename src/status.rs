//! Pure: what a worker Pod shows -> what it means for the job: NVFlare's exit-code taxonomy and client status words.

use crate::api::Phase;
use crate::worker_pod::{WorkerContainerStatus, WorkerPod};
use k8s_openapi::api::core::v1::ContainerStateTerminated;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// First line of the worker's termination message when NVFlare's ABORT reached the job (written by fljob-launcher's
/// worker entry point): the worker then exits 0, and only this tells an abort from a success.
pub const ABORTED_OUTCOME: &str = "fljob.dev/outcome=Aborted";

/// NVFlare's ClientStatus words.
pub mod client_status {
    /// No worker yet.
    pub const NOT_STARTED: &str = "not started";
    /// The worker is being started.
    pub const STARTING: &str = "starting";
    /// The worker runs.
    pub const STARTED: &str = "started";
    /// The worker ended normally or was aborted.
    pub const STOPPED: &str = "stopped";
    /// The worker failed.
    pub const EXCEPTION: &str = "exception";
}

/// NVFlare's process exit and job return codes.
pub mod code {
    /// The job succeeded.
    pub const SUCCESS: i32 = 0;
    /// The worker failed after it started.
    pub const EXECUTION_ERROR: i32 = 1;
    /// The job was aborted.
    pub const ABORTED: i32 = 9;
    /// An exception in the worker.
    pub const EXCEPTION: i32 = 101;
    /// A component failed the site's safety checks; the server stops the run.
    pub const UNSAFE_COMPONENT: i32 = 102;
    /// The job's configuration is wrong; not worth retrying.
    pub const CONFIG_ERROR: i32 = 103;
    /// The infrastructure failed to run the worker.
    pub const INFRASTRUCTURE_ERROR: i32 = 104;
    /// The outcome is unknown (the worker pod vanished).
    pub const UNKNOWN: i32 = 127;
    /// What the kernel's OOM kill reports.
    pub const OOM_KILLED: i32 = 137;
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Succeeded, Failed or Aborted.
    pub phase: Phase,
    /// `status.reason`; None for success.
    pub reason: Option<&'static str>,
    /// NVFlare return code.
    pub exit_code: i32,
    /// A sentence for the user.
    pub message: String,
}

impl Outcome {
    fn failed(reason: &'static str, exit_code: i32, message: impl Into<String>) -> Self {
        Outcome { phase: Phase::Failed, reason: Some(reason), exit_code, message: message.into() }
    }
}

/// What the worker pod shows right now (field names say what they hold).
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq)]
pub enum PodState {
    /// Not scheduled or the container not yet running, with the kubelet's waiting reason if any.
    Waiting { reason: Option<String>, message: Option<String> },
    /// The scheduler cannot place it.
    Unschedulable { since: Option<Time>, message: String },
    /// The worker container runs.
    Running { started_at: Option<Time> },
    /// The worker container ended.
    Exited { code: i32, oom_killed: bool, ran: bool, message: Option<String>, finished_at: Option<Time> },
    /// The kubelet evicted the pod.
    Evicted { message: String },
    /// The pod failed without a container exit (for example the node rejected it).
    Lost { reason: String, message: String },
}

/// The worker container's status, found by name: an injected sidecar (a service mesh proxy, a Vault agent) must
/// never be read as the worker.
fn worker_status(pod: &WorkerPod) -> Option<&WorkerContainerStatus> {
    pod.status.as_ref()?.container_statuses.as_ref()?.iter().find(|s| s.name == crate::pod::CONTAINER)
}

fn terminated_of(pod: &WorkerPod) -> Option<&ContainerStateTerminated> {
    worker_status(pod)?.state.as_ref()?.terminated.as_ref()
}

/// The pod condition Kubernetes sets when it disrupts a pod on purpose (drain, Eviction API, preemption, taint
/// manager, node shutdown), with its reason and message.
fn disruption_of(pod: &WorkerPod) -> Option<(String, String)> {
    let c = pod.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == "DisruptionTarget" && c.status == "True")?;
    Some((c.reason.clone().unwrap_or_else(|| "DisruptionTarget".into()), c.message.clone().unwrap_or_default()))
}

/// Whether the worker's container had ended before `at` (ms), for sure: its `finishedAt` has whole seconds, so it
/// must lie a full second before.
pub fn finished_before(state: &PodState, at: i64) -> bool {
    matches!(state, PodState::Exited { finished_at: Some(f), .. } if crate::api::millis(f) + 1000 <= at)
}

/// Whether a pod someone else deleted had ended by itself before the deletion. A grace period still running means
/// it was deleted while it ran (the API server deletes an ended pod at once). Without one, its deletionTimestamp is
/// the deletion's time, or the kubelet's final delete right after the container stopped: only a container that
/// ended clearly before counts as ended by itself.
pub fn ended_before_deletion(p: &WorkerPod, state: &PodState) -> bool {
    let (Some(at), Some(0)) = (&p.metadata.deletion_timestamp, p.metadata.deletion_grace_period_seconds) else { return false };
    finished_before(state, crate::api::millis(at))
}

/// Reads the worker pod's state from its phase, conditions and container statuses.
pub fn pod_state(pod: &WorkerPod) -> PodState {
    let none = Default::default();
    let status = pod.status.as_ref().unwrap_or(&none);
    let phase = status.phase.as_deref().unwrap_or("Pending");
    if status.reason.as_deref() == Some("Evicted") {
        return PodState::Evicted { message: status.message.clone().unwrap_or_else(|| "the pod was evicted".into()) };
    }
    // Drained, evicted through the Eviction API or preempted: an eviction, however the container then ended.
    if let Some((reason, message)) = disruption_of(pod)
        && (phase == "Failed" || terminated_of(pod).is_some() || pod.metadata.deletion_timestamp.is_some())
    {
        let message = if message.is_empty() { format!("the pod was disrupted ({reason})") } else { format!("{reason}: {message}") };
        return PodState::Evicted { message };
    }
    if let Some(t) = terminated_of(pod)
        && (phase == "Succeeded" || phase == "Failed" || t.finished_at.is_some()) {
            let oom = t.reason.as_deref() == Some("OOMKilled");
            // A container that never started has no startedAt; one that ran has both times.
            let ran = t.started_at.is_some() && t.reason.as_deref() != Some("StartError")
                && t.reason.as_deref() != Some("ContainerCannotRun");
            return PodState::Exited {
                code: t.exit_code,
                oom_killed: oom,
                ran,
                message: t.message.clone().filter(|m| !m.is_empty()),
                finished_at: t.finished_at.clone(),
            };
        }
    match phase {
        "Succeeded" => {
            return PodState::Exited { code: 0, oom_killed: false, ran: true, message: None, finished_at: None };
        }
        "Failed" => {
            return PodState::Lost {
                reason: status.reason.clone().unwrap_or_else(|| "Failed".into()),
                message: status.message.clone().unwrap_or_else(|| "the pod failed before its container ran".into()),
            };
        }
        _ => {}
    }
    let running = worker_status(pod).and_then(|s| s.state.as_ref()?.running.as_ref());
    if let Some(r) = running {
        return PodState::Running { started_at: r.started_at.clone() };
    }
    if let Some(c) = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable"))
    {
        return PodState::Unschedulable {
            since: c.last_transition_time.clone(),
            message: c.message.clone().unwrap_or_else(|| "no node can hold the pod".into()),
        };
    }
    let waiting = worker_status(pod).and_then(|s| s.state.as_ref()?.waiting.as_ref());
    PodState::Waiting {
        reason: waiting.and_then(|w| w.reason.clone()),
        message: waiting.and_then(|w| w.message.clone()),
    }
}

/// Waiting reasons that mean the pod will never run by itself: fail fast, as NVFlare's launcher does.
pub fn waiting_failure(reason: &str, message: Option<&str>, image: &str) -> Option<Outcome> {
    let detail = message.map(|m| format!(": {m}")).unwrap_or_default();
    match reason {
        "ErrImagePull" | "ImagePullBackOff" | "InvalidImageName" | "ErrImageNeverPull" => Some(Outcome::failed(
            "ImagePullFailed",
            code::INFRASTRUCTURE_ERROR,
            format!("image {image} cannot be pulled ({reason}{detail}); fix spec.image or the site's defaults.image, or the registry credentials"),
        )),
        "CreateContainerConfigError" | "CreateContainerError" => Some(Outcome::failed(
            "ConfigError",
            code::CONFIG_ERROR,
            format!("the worker container cannot be created ({reason}{detail}); check that the credentials and startup kit Secrets have every key"),
        )),
        "CrashLoopBackOff" | "RunContainerError" => Some(Outcome::failed(
            "InfrastructureError",
            code::INFRASTRUCTURE_ERROR,
            format!("the worker container cannot run ({reason}{detail})"),
        )),
        _ => None,
    }
}

/// The exit-code taxonomy: a container's exit -> the job's outcome. `started` says whether the worker was ever seen
/// running (NVFlare reports a worker that exits 1 while still starting as an infrastructure error).
pub fn exit_outcome(exit_code: i32, oom_killed: bool, started: bool, detail: Option<&str>) -> Outcome {
    let detail = detail.map(|d| format!(": {d}")).unwrap_or_default();
    if oom_killed {
        let c = if exit_code == 0 { code::OOM_KILLED } else { exit_code };
        return Outcome::failed("OOMKilled", c, format!("the worker ran out of memory and was killed (exit {c}); raise spec.resources.memory{detail}"));
    }
    match exit_code {
        0 => Outcome { phase: Phase::Succeeded, reason: None, exit_code: 0, message: "the worker finished successfully".into() },
        code::EXCEPTION => Outcome::failed("Exception", exit_code, format!("the worker raised an exception (exit 101){detail}")),
        code::UNSAFE_COMPONENT => Outcome::failed(
            "UnsafeComponent",
            exit_code,
            format!("the job has a component the site considers unsafe (exit 102); the server stops the run{detail}"),
        ),
        code::CONFIG_ERROR => Outcome::failed("ConfigError", exit_code, format!("the job's configuration is wrong (exit 103); fix it before retrying{detail}")),
        code::INFRASTRUCTURE_ERROR => Outcome::failed("InfrastructureError", exit_code, format!("the worker hit an infrastructure error (exit 104){detail}")),
        code::EXECUTION_ERROR if started => Outcome::failed("ExecutionError", exit_code, format!("the worker failed while running (exit 1){detail}")),
        code::EXECUTION_ERROR => Outcome::failed(
            "InfrastructureError",
            code::INFRASTRUCTURE_ERROR,
            format!("the worker exited 1 before it started running; reported as infrastructure error 104{detail}"),
        ),
        other => Outcome::failed("Exception", other, format!("the worker exited with code {other}{detail}")),
    }
}

/// NVFlare's client status word for a job in this phase.
pub fn client_status_of(phase: Phase) -> &'static str {
    match phase {
        Phase::Pending | Phase::Queued => client_status::NOT_STARTED,
        Phase::Starting => client_status::STARTING,
        Phase::Running | Phase::Aborting => client_status::STARTED,
        Phase::Succeeded | Phase::Aborted => client_status::STOPPED,
        Phase::Failed => client_status::EXCEPTION,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: serde_json::Value) -> WorkerPod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_worker_is_found_by_name_not_position() {
        // A sidecar injected before the worker: its state must not be read as the worker's.
        let p = pod(serde_json::json!({"status": {"phase": "Running", "containerStatuses": [
            {"name": "istio-proxy", "image": "x", "imageID": "", "ready": true, "restartCount": 0,
             "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}},
            {"name": "worker", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
             "state": {"waiting": {"reason": "CreateContainerConfigError", "message": "no key"}}},
        ]}}));
        assert_eq!(pod_state(&p), PodState::Waiting { reason: Some("CreateContainerConfigError".into()), message: Some("no key".into()) });
        // A sidecar that ended first does not end the job with its exit code.
        let p = pod(serde_json::json!({"status": {"phase": "Running", "containerStatuses": [
            {"name": "vault-agent", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
             "state": {"terminated": {"exitCode": 2, "startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:00:01Z"}}},
            {"name": "worker", "image": "x", "imageID": "", "ready": true, "restartCount": 0,
             "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}},
        ]}}));
        assert!(matches!(pod_state(&p), PodState::Running { .. }), "{:?}", pod_state(&p));
    }

    #[test]
    fn disruptions_are_evictions() {
        for reason in ["EvictionByEvictionAPI", "PreemptionByScheduler", "DeletionByTaintManager", "TerminationByKubelet"] {
            let p = pod(serde_json::json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:02Z"}, "status": {"phase": "Failed",
                "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": reason, "message": "drained"}],
                "containerStatuses": [{"name": "worker", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                    "state": {"terminated": {"exitCode": 143, "startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:00:01Z"}}}]}}));
            assert_eq!(pod_state(&p), PodState::Evicted { message: format!("{reason}: drained") }, "{reason}");
        }
    }

    #[test]
    fn a_container_that_never_started_did_not_run() {
        let p = pod(serde_json::json!({"status": {"phase": "Failed", "containerStatuses": [
            {"name": "worker", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
             "state": {"terminated": {"exitCode": 128, "reason": "StartError", "message": "exec: \"/nope/python\": no such file",
                 "startedAt": "1970-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:00:01Z"}}}]}}));
        assert!(matches!(pod_state(&p), PodState::Exited { code: 128, ran: false, .. }), "{:?}", pod_state(&p));
    }
}
