//! Pure: which Kubernetes Events a status change deserves, with a reason and a message a person can act on. A job
//! that runs as it should gets two, as a batch Job does (`Admitted`, naming what it holds, and `Succeeded`); what a
//! person must look at adds one each (a job really queued for quota, a failed start, an abort, a failure). The rest
//! is in the status. Nothing when nothing changed, so a steady cluster sees no Event writes.

use crate::api::{FLJobStatus, Phase, find_condition};
use crate::lifecycle::cond;

/// An Event to publish on the FLJob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// Warning (true) or Normal.
    pub warning: bool,
    /// PascalCase reason.
    pub reason: String,
    /// The message.
    pub message: String,
}

fn note(warning: bool, reason: &str, message: impl Into<String>) -> Note {
    Note { warning, reason: reason.to_string(), message: message.into() }
}

fn cond_changed(old: &FLJobStatus, new: &FLJobStatus, type_: &str) -> Option<(bool, String, String)> {
    let n = find_condition(&new.conditions, type_)?;
    let o = find_condition(&old.conditions, type_);
    if o.is_some_and(|o| o.status == n.status && o.reason == n.reason) {
        return None;
    }
    Some((n.status == "True", n.reason.clone(), n.message.clone()))
}

/// The Events that the change from `old` to `new` deserves.
pub fn transitions(old: &FLJobStatus, new: &FLJobStatus) -> Vec<Note> {
    let mut out = Vec::new();
    if let Some((ok, reason, msg)) = cond_changed(old, new, cond::RESOLVED)
        && !ok {
            out.push(note(true, &reason, msg));
        }
    if let Some((ok, reason, msg)) = cond_changed(old, new, cond::ADMITTED) {
        match (ok, reason.as_str()) {
            (true, _) => out.push(note(false, "Admitted", msg)),
            (false, "Queued") => out.push(note(false, "Queued", msg)),
            _ => {}
        }
    }
    // The worker's start is in the status (phase Running, Started); only a start that went wrong is an Event.
    if let Some((false, reason, msg)) = cond_changed(old, new, cond::STARTED) {
        out.push(note(true, &reason, msg));
    }
    if let Some((true, reason, msg)) = cond_changed(old, new, cond::ABORT_REQUESTED) {
        out.push(note(false, "AbortRequested", format!("{msg} ({reason})")));
    }
    if old.abort.as_ref().and_then(|a| a.pod_deleted_at.as_ref()).is_none()
        && new.abort.as_ref().is_some_and(|a| a.pod_deleted_at.is_some() && a.completed_at.is_none()) {
            out.push(note(true, "AbortDeletingPod", "the worker did not stop within the abort grace period; deleting its pod"));
        }
    if new.phase.is_finished() && !old.phase.is_finished() {
        let msg = new.message.clone().unwrap_or_default();
        match new.phase {
            Phase::Succeeded => out.push(note(false, "Succeeded", msg)),
            _ => {
                let reason = new.reason.clone().unwrap_or_else(|| format!("{:?}", new.phase));
                out.push(note(true, &reason, format!("{msg} (exit code {})", new.exit_code.unwrap_or_default())));
            }
        }
    }
    if new.last_task_abort != old.last_task_abort
        && let Some(t) = &new.last_task_abort {
            out.push(note(false, "TaskAbortRelayed", format!("task abort {:?} relayed to the running worker", t.value)));
        }
    out
}
