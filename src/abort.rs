//! Pure: the App-scope abort relay, NVFlare's `abort_app` done the Kubernetes way. Tell the worker (pod annotation
//! `fljob.dev/abort: App`), give it the grace period to stop by itself, delete its pod (SIGTERM, then the pod's own
//! termination grace period), and force-delete it if it is still there after that. Every timer is computed from times
//! recorded in `status.abort`, so an operator restart in the middle resumes where it was.

use crate::api::{AbortMethod, AbortStatus, millis, until};
use crate::status::{PodState, code, pod_state};
use crate::worker_pod::WorkerPod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::time::Duration;

/// Why an abort was started.
pub mod cause {
    /// `spec.abort: true`.
    pub const ABORTED: &str = "Aborted";
    /// The FLJob was deleted.
    pub const DELETED: &str = "Deleted";
    /// `activeDeadlineSeconds` passed.
    pub const DEADLINE: &str = "DeadlineExceeded";
    /// NVFlare aborted the job itself (the FL server, an admin's `abort_job`, the client's `JobExecutor`), and the
    /// worker said so in its termination message.
    pub const NVFLARE: &str = "NVFlare";
}

/// Extra time after a deleted pod's own termination grace period before it is force-deleted.
const FORCE_SLACK: Duration = Duration::from_secs(2);
/// Termination grace period of a pod that does not set one (the Kubernetes default).
const DEFAULT_POD_GRACE: i64 = 30;

/// What to do next in the abort protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum AbortStep {
    /// Set `fljob.dev/abort: App` on the pod.
    Signal,
    /// Wait until then.
    Wait(Duration),
    /// Delete the pod (its own grace period applies).
    DeletePod,
    /// Delete the pod with grace period 0, then the abort is complete.
    ForceDelete,
    /// The abort is complete.
    Done {
        /// Which step ended it.
        method: AbortMethod,
        /// The job's exit code.
        exit_code: i32,
    },
}

/// The pod, as the abort sees it.
#[derive(Debug, Clone, Copy)]
pub enum AbortPod<'a> {
    /// No worker pod was ever created.
    NeverCreated,
    /// The pod existed and is gone now.
    Gone,
    /// The pod exists.
    Present(&'a WorkerPod),
}

fn after(t: &Time, d: Duration) -> i64 {
    millis(t).saturating_add(d.as_millis() as i64)
}

/// How long after its deletion a pod that is still there is force-deleted: its own termination grace period
/// (SIGTERM to SIGKILL) plus a little slack.
pub fn force_after(pod: &WorkerPod) -> Duration {
    let grace = pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds).unwrap_or(DEFAULT_POD_GRACE);
    Duration::from_secs(grace.max(0) as u64) + FORCE_SLACK
}

/// The next step of an abort already recorded in `abort`.
pub fn next_step(abort: &AbortStatus, grace_seconds: i64, pod: AbortPod<'_>, now: &Time) -> AbortStep {
    let deadline_cause = abort.cause.as_deref() == Some(cause::DEADLINE);
    let aborted_code = code::ABORTED;
    let pod = match pod {
        AbortPod::NeverCreated => return AbortStep::Done { method: AbortMethod::Graceful, exit_code: aborted_code },
        AbortPod::Gone => {
            let method = if abort.pod_deleted_at.is_some() { AbortMethod::Deleted } else { AbortMethod::Graceful };
            return AbortStep::Done { method, exit_code: aborted_code };
        }
        AbortPod::Present(p) => p,
    };
    let state = pod_state(pod);
    // A deleted pod no node ever took has nothing left to stop (it lingers only for the tracking finalizer).
    let never_placed = pod.metadata.deletion_timestamp.is_some() && pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_none();
    let stopped_code = match &state {
        PodState::Exited { code, .. } => Some(*code),
        PodState::Evicted { .. } | PodState::Lost { .. } => Some(aborted_code),
        _ if never_placed => Some(aborted_code),
        _ => None,
    };
    if let Some(code) = stopped_code {
        // The worker honoured the abort within the grace period (also when it stopped just before the delete the
        // operator had already decided on reached the API server): its own code tells how it ended.
        let by_itself = match &abort.pod_deleted_at {
            None => true,
            // The delete was decided but never took effect (the API server failed it; it is retried): the worker
            // stopped on its own.
            Some(_) if pod.metadata.deletion_timestamp.is_none() => true,
            // The operator's own record of when it decided to delete: the kubelet's final delete rewrites the pod's
            // deletionTimestamp, so only this time tells which came first.
            Some(deleted) => crate::status::finished_before(&state, millis(deleted)),
        };
        return if by_itself {
            AbortStep::Done { method: AbortMethod::Graceful, exit_code: if deadline_cause { aborted_code } else { code } }
        } else {
            AbortStep::Done { method: AbortMethod::Deleted, exit_code: aborted_code }
        };
    }
    let running = matches!(state, PodState::Running { .. });
    match &abort.pod_deleted_at {
        None if !running => AbortStep::DeletePod, // no worker runs that could honour the signal
        None => {
            let signalled = pod
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(crate::api::ABORT_ANNOTATION));
            if !signalled {
                return AbortStep::Signal;
            }
            match until(after(&abort.requested_at, Duration::from_secs(grace_seconds.max(0) as u64)), now) {
                Some(wait) => AbortStep::Wait(wait),
                None => AbortStep::DeletePod,
            }
        }
        // Recorded as deleted, but the delete did not go through: issue it again.
        Some(_) if pod.metadata.deletion_timestamp.is_none() => AbortStep::DeletePod,
        Some(deleted_at) => {
            let force_at = after(deleted_at, force_after(pod));
            match until(force_at, now) {
                Some(wait) => AbortStep::Wait(wait),
                None => AbortStep::ForceDelete,
            }
        }
    }
}

/// The reason recorded on a finished abort.
pub fn final_reason(abort: &AbortStatus) -> &'static str {
    match abort.cause.as_deref() {
        Some(cause::DEADLINE) => cause::DEADLINE,
        _ => "Aborted",
    }
}

