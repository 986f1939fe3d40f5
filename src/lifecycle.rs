//! Pure: the whole decision for one FLJob. Given the job, what its site's ledger says, whether its Secrets exist and
//! what its pod shows, it returns the job's new status and the steps the reconciler must take. No I/O here.

use crate::abort::{self, AbortPod, AbortStep};
use crate::api::{
    ABORT_ANNOTATION, ABORT_TASK_ANNOTATION, AbortStatus, DEFAULT_ABORT_GRACE_SECONDS, DEFAULT_PENDING_TIMEOUT_SECONDS,
    FLJob, FLJobStatus, FLSite, Phase, Resources, TaskAbortStatus, after_secs, condition, find_condition, is_true, millis,
    set_condition, until,
};
use crate::pod::{self, BuildError};
use crate::quota;
use crate::status::{Outcome, PodState, client_status_of, code, ended_before_deletion, exit_outcome, pod_state, waiting_failure};
use crate::worker_pod::WorkerPod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use std::time::Duration;

/// Condition types of an FLJob.
pub mod cond {
    /// Its FLSite and Secrets exist and its spec can be turned into a pod.
    pub const RESOLVED: &str = "Resolved";
    /// It holds quota from its site's pool.
    pub const ADMITTED: &str = "Admitted";
    /// Its worker container was seen running.
    pub const STARTED: &str = "Started";
    /// It finished (Succeeded, Failed or Aborted).
    pub const FINISHED: &str = "Finished";
    /// An App-scope abort was requested.
    pub const ABORT_REQUESTED: &str = "AbortRequested";
    /// kstatus: the operator is still bringing the job to where it can run (resolving, queued, starting, aborting).
    pub const RECONCILING: &str = "Reconciling";
    /// kstatus: the job cannot make progress without someone acting (it failed, or it waits on a missing site or
    /// Secret, a config error).
    pub const STALLED: &str = "Stalled";
}

/// What the site's ledger says about this job.
#[derive(Debug, Clone)]
pub enum SiteView<'a> {
    /// The FLSite does not exist.
    Missing,
    /// The FLSite exists.
    Found {
        /// The site.
        site: &'a FLSite,
        /// The job's entry in the site's ledger, if it holds quota.
        allocation: Option<Resources>,
        /// Why it waits, when it does not hold quota.
        queue_note: QueueNote,
    },
}

/// Why a job that does not hold quota waits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueNote {
    /// Something on its way does not fit (it, or an earlier job ahead of it): the job is really queued (and the user
    /// is told with an Event). False when it and every job ahead of it fit: the site admits them in its next rounds.
    pub behind: bool,
    /// The condition message.
    pub message: String,
}

/// Whether the Secrets the pod needs exist (checked only before admission).
#[derive(Debug, Clone, PartialEq)]
pub enum SecretsView {
    /// Not checked in this reconcile.
    NotChecked,
    /// They exist with every key.
    Ok,
    /// What is missing, in words.
    Missing(String),
}

/// The worker pod as the reconciler found it.
#[derive(Debug, Clone, Copy)]
pub enum PodView<'a> {
    /// Not found, and the job never recorded one.
    NotFound,
    /// The job recorded a pod and the API server confirms it is gone.
    Gone,
    /// The pod.
    Present(&'a WorkerPod),
}

/// Side effects for the reconciler.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Create the worker pod (after the status with the allocation is written).
    CreatePod,
    /// Set an annotation on the pod.
    AnnotatePod {
        /// Key.
        key: &'static str,
        /// Value.
        value: String,
    },
    /// Delete the pod with its own grace period.
    DeletePod,
    /// Delete the pod with grace period 0.
    ForceDeletePod,
    /// Delete the FLJob (TTL after finish).
    DeleteJob,
    /// Remove the operator's finalizer: cleanup is complete.
    RemoveFinalizer,
    /// Remove the tracking finalizer from the worker pod: the job's end is recorded, the pod may go.
    ReleasePod,
}

/// What the reconciler must do.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The job's new status.
    pub status: FLJobStatus,
    /// Steps, in order.
    pub steps: Vec<Step>,
    /// Reconcile again after this long even if nothing changes.
    pub requeue: Option<Duration>,
}

/// Everything the decision needs.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    /// The job.
    pub job: &'a FLJob,
    /// Its site.
    pub site: SiteView<'a>,
    /// Its Secrets.
    pub secrets: SecretsView,
    /// Its pod.
    pub pod: PodView<'a>,
    /// Now.
    pub now: Time,
}

/// True when the reconciler should check the job's Secrets: before admission only.
pub fn needs_secret_check(job: &FLJob) -> bool {
    if checked_by_finalizer(job) {
        return false;
    }
    // Borrowed: this runs on every reconcile of a job.
    let Some(st) = job.status.as_ref() else { return !job.spec.abort && job.metadata.deletion_timestamp.is_none() };
    !st.phase.is_finished()
        && st.abort.is_none()
        && !job.spec.abort
        && job.metadata.deletion_timestamp.is_none()
        && st.pod_name.is_none()
        && st.allocation.is_none()
        && !is_true(&st.conditions, cond::RESOLVED)
}

/// The operator adds its finalizer to a new job only once the job's site, policy and Secrets checked out (a check
/// that fails is written to the status first). A job that has the finalizer and no `Resolved` condition yet is
/// therefore known to be resolvable: it may be admitted without a status write of its own first (issue 12). Someone
/// else putting the finalizer on a new job only skips the pre-admission check; the pod still fails on what is
/// missing.
pub fn checked_by_finalizer(job: &FLJob) -> bool {
    job.finalizers().iter().any(|f| f == crate::controller::FINALIZER)
        && job.status.as_ref().is_none_or(|s| find_condition(&s.conditions, cond::RESOLVED).is_none() && !s.phase.is_finished())
}

/// How long a new job that fits its site may go without a status of its own once the operator checked it (its
/// finalizer added) while the site admits it (the admission then writes its first status). A job still waiting
/// after that is written as Queued. Counted from the check, not from the job's creation: in a burst a job may wait
/// long for its first reconcile, and its admission then follows the check within moments (issue 12: counted from
/// creation, most jobs of a saturated burst got a status write only to say they would be admitted).
pub const QUIET_ADMISSION_MS: i64 = 2_000;

/// When the operator last changed the FLJob itself (not its status): for a job without a status, the moment it
/// added its finalizer, i.e. checked the job. Read from the operator's own `managedFields` entry, which the cache
/// keeps (without its field set) for this.
pub fn checked_at(job: &FLJob) -> Option<Time> {
    job.metadata
        .managed_fields
        .as_ref()?
        .iter()
        .filter(|m| m.manager.as_deref() == Some(crate::api::MANAGER) && m.operation.as_deref() == Some("Update"))
        .filter(|m| m.subresource.as_deref().is_none_or(str::is_empty))
        .filter_map(|m| m.time.clone())
        .max_by_key(|t| t.0)
}

/// Whether this decision for a new, checked job that fits can be left unwritten (see [`QUIET_ADMISSION_MS`]): it
/// would only say "AwaitingAdmission", and the admission comes within moments. Returns how long it may wait. The
/// reconcile that adds the finalizer always may; later ones, for what is left of the window since the check.
pub fn quiet_admission(job: &FLJob, old: &FLJobStatus, d: &Decision, now: &Time) -> Option<Duration> {
    let unwritten = find_condition(&old.conditions, cond::RESOLVED).is_none();
    let fits = d.status.phase == Phase::Queued
        && is_true(&d.status.conditions, cond::RESOLVED)
        && find_condition(&d.status.conditions, cond::ADMITTED).is_some_and(|c| c.reason == "AwaitingAdmission");
    if !(unwritten && fits && d.steps.is_empty()) {
        return None;
    }
    if !job.finalizers().iter().any(|f| f == crate::controller::FINALIZER) {
        return Some(Duration::from_millis(QUIET_ADMISSION_MS as u64));
    }
    let since = checked_at(job).or_else(|| job.metadata.creation_timestamp.clone())?;
    let left = QUIET_ADMISSION_MS - (millis(now) - millis(&since));
    (left > 0).then(|| Duration::from_millis(left as u64))
}

/// Backoff for things only polling can notice (a Secret appearing): grows with the time the job has waited,
/// from 2 s up to 5 min, so checks happen at roughly doubling intervals with no state kept in memory.
pub fn wait_backoff(since: Option<&Time>, now: &Time) -> Duration {
    let waited = since.map(|t| ((millis(now) - millis(t)) / 1000).max(0) as u64).unwrap_or(0);
    Duration::from_secs(waited.clamp(2, 300))
}

struct Ctx<'a> {
    job: &'a FLJob,
    /// The pod as the caches show it.
    pod: PodView<'a>,
    /// The site's ledger holds this job.
    holding: bool,
    /// The job had finished before this decision.
    was_finished: bool,
    st: FLJobStatus,
    steps: Vec<Step>,
    requeue: Option<Duration>,
    now: Time,
    generation: Option<i64>,
}

impl Ctx<'_> {
    fn cond(&mut self, type_: &str, status: bool, reason: &str, message: impl Into<String>) {
        let c = condition(type_, status, reason, message, self.generation, &self.now);
        set_condition(&mut self.st.conditions, c);
    }

    fn phase(&mut self, phase: Phase) {
        self.st.phase = phase;
        let started = is_true(&self.st.conditions, cond::STARTED);
        self.st.client_status = Some(match phase {
            Phase::Aborting if !started => crate::status::client_status::STARTING.to_string(),
            p => client_status_of(p).to_string(),
        });
    }

    fn push_once(&mut self, step: Step) {
        if !self.steps.contains(&step) {
            self.steps.push(step);
        }
    }

    fn requeue_in(&mut self, d: Duration) {
        self.requeue = Some(self.requeue.map_or(d, |r| r.min(d)));
    }

    fn finish(&mut self, outcome: Outcome) {
        self.phase(outcome.phase);
        self.st.exit_code = Some(outcome.exit_code);
        self.st.reason = outcome.reason.map(str::to_string);
        self.st.message = Some(outcome.message.clone());
        self.st.completion_time = Some(self.now.clone());
        let reason = outcome.reason.unwrap_or("Succeeded");
        self.cond(cond::FINISHED, true, reason, outcome.message);
        // Said in the same write as the outcome, so a finished job costs no status write of its own for it: the
        // site's controller takes the quota back from the ledger (the one record of what is held) on seeing the end.
        if is_true(&self.st.conditions, cond::ADMITTED) {
            let site = &self.job.spec.site;
            self.cond(cond::ADMITTED, false, "Released", format!("the job finished; its quota goes back to site {site}'s pool"));
        }
    }

    fn done(mut self) -> Decision {
        self.kstatus();
        // A job that finishes in this decision is tidied in it too: the steps run only once this status is written
        // (with the resourceVersion as a precondition), so the end is on record by then, and nothing else may bring
        // the job back (its own status write does not: see `controller::fljob::not_status`).
        if !self.was_finished && self.st.phase.is_finished() {
            let (pod, holding) = (self.pod, self.holding);
            finished(&mut self, pod, holding);
        }
        Decision { status: self.st, steps: self.steps, requeue: self.requeue }
    }

    /// The two conditions kstatus (Helm 4's `--wait`, Flux, `kubectl wait`, Argo CD's generic check) reads, derived
    /// from the phase: `Reconciling` while the job is on its way to running (or being aborted), `Stalled` when it
    /// failed or waits on something only a person can fix. Running, Succeeded and Aborted jobs are neither: Current.
    /// They change only with the phase or the Resolved condition, so they add no status write of their own.
    fn kstatus(&mut self) {
        let resolved = find_condition(&self.st.conditions, cond::RESOLVED).filter(|c| c.status == "False").cloned();
        let reconciling = match self.st.phase {
            Phase::Pending if resolved.is_none() => Some("checking the job's site and Secrets"),
            Phase::Queued => Some("waiting for quota at its site"),
            Phase::Starting => Some("starting the worker pod"),
            Phase::Aborting => Some("relaying the abort to the worker"),
            _ => None,
        };
        let stalled = match (self.st.phase, &resolved) {
            (Phase::Failed, _) => Some((
                self.st.reason.clone().unwrap_or_else(|| "Failed".into()),
                self.st.message.clone().unwrap_or_default(),
            )),
            (Phase::Pending, Some(r)) => Some((r.reason.clone(), r.message.clone())),
            _ => None,
        };
        let phase = format!("{:?}", self.st.phase);
        let c = match reconciling {
            Some(why) => condition(cond::RECONCILING, true, &phase, why, self.generation, &self.now),
            None => condition(cond::RECONCILING, false, &phase, "nothing left to do until the job's state changes", self.generation, &self.now),
        };
        set_condition(&mut self.st.conditions, c);
        let c = match stalled {
            Some((reason, message)) => condition(cond::STALLED, true, &reason, message, self.generation, &self.now),
            None => condition(cond::STALLED, false, "Progressing", "nothing blocks the job", self.generation, &self.now),
        };
        set_condition(&mut self.st.conditions, c);
    }
}

/// Decides the job's status and the next steps.
pub fn decide(input: Input<'_>) -> Decision {
    let job = input.job;
    let mut cx = Ctx {
        job,
        pod: input.pod,
        holding: matches!(&input.site, SiteView::Found { allocation: Some(_), .. }),
        was_finished: job.status.as_ref().is_some_and(|s| s.phase.is_finished()),
        st: job.status.clone().unwrap_or_default(),
        steps: Vec::new(),
        requeue: None,
        now: input.now.clone(),
        generation: job.metadata.generation,
    };
    // A finished job's outcome is final: a later spec change (say, an abort) changes nothing in it, but it is still
    // acknowledged (observedGeneration), or kstatus (Helm, Flux, Argo CD) would wait for it forever.
    cx.st.observed_generation = job.metadata.generation;
    if cx.st.client_status.is_none() {
        cx.phase(cx.st.phase);
    }
    let allocation = match &input.site {
        SiteView::Found { allocation, .. } => allocation.clone(),
        SiteView::Missing => None,
    };

    if cx.st.phase.is_finished() {
        let holding = cx.holding;
        finished(&mut cx, input.pod, holding);
        return cx.done();
    }

    // An abort, once recorded, runs to its end whatever else happens.
    if cx.st.abort.is_none()
        && let Some(cause) = abort_cause(&cx, &input) {
            cx.st.abort = Some(AbortStatus { requested_at: cx.now.clone(), cause: Some(cause.to_string()), pod_deleted_at: None, method: None, completed_at: None });
            let msg = match cause {
                abort::cause::DELETED => "the FLJob is being deleted; relaying the abort to the worker".to_string(),
                abort::cause::DEADLINE => format!(
                    "the job ran longer than activeDeadlineSeconds ({}s); aborting it",
                    job.spec.active_deadline_seconds.unwrap_or_default()
                ),
                _ => "spec.abort is true; relaying the abort to the worker".to_string(),
            };
            cx.cond(cond::ABORT_REQUESTED, true, cause, msg);
        }
    if cx.st.abort.is_some() {
        run_abort(&mut cx, &input);
        return cx.done();
    }

    // Observe the pod once it exists, even if its site has gone since.
    match input.pod {
        PodView::Present(p) => {
            observe_pod(&mut cx, site_of(&input.site), p);
            task_abort(&mut cx, p);
            return cx.done();
        }
        // A pod that never ran and is gone (its creation failed, or someone deleted it while it was pending):
        // create it again below. One that ran and vanished is lost.
        PodView::Gone if !is_true(&cx.st.conditions, cond::STARTED) => {}
        PodView::Gone => {
            let name = cx.st.pod_name.clone().unwrap_or_default();
            cx.finish(Outcome {
                phase: Phase::Failed,
                reason: Some("PodLost"),
                exit_code: code::UNKNOWN,
                message: format!("worker pod {name} was deleted by someone else while the job ran; its outcome is unknown"),
            });
            return cx.done();
        }
        PodView::NotFound => {}
    }

    let site = match &input.site {
        SiteView::Missing => {
            cx.phase(Phase::Pending);
            let msg = format!(
                "FLSite {:?} not found in namespace {}; create it (or fix spec.site); the job waits",
                job.spec.site,
                job.namespace().unwrap_or_default()
            );
            cx.cond(cond::RESOLVED, false, "SiteNotFound", msg);
            // The site watch wakes the job up when the site appears.
            return cx.done();
        }
        SiteView::Found { site, .. } => *site,
    };

    // The site decides what a job's pod may ask for: a job that asks for more never gets a pod.
    if let Some(violation) = pod::policy_violation(job, site) {
        cx.finish(Outcome { phase: Phase::Failed, reason: Some("PolicyViolation"), exit_code: code::CONFIG_ERROR, message: violation });
        return cx.done();
    }

    if let Some(res) = allocation {
        // Admitted: record the allocation, then create the pod.
        if find_condition(&cx.st.conditions, cond::RESOLVED).is_none() {
            // Admitted before its first status write (checked_by_finalizer): say it was resolved.
            cx.cond(cond::RESOLVED, true, "Resolved", format!("FLSite {} and the Secrets exist", site.name_any()));
        }
        if cx.st.allocation.as_ref() != Some(&res) || !is_true(&cx.st.conditions, cond::ADMITTED) {
            cx.st.allocation = Some(res.clone());
            cx.cond(cond::ADMITTED, true, "Admitted", format!("holds {} from site {}", describe(&res), site.name_any()));
        }
        // The pod's name is deterministic: recording it with the admission lets the next reconcile ask the API
        // server for it instead of creating it again while the cache lags.
        cx.st.pod_name = Some(pod::pod_name(job));
        cx.phase(Phase::Starting);
        cx.steps.push(Step::CreatePod);
        return cx.done();
    }

    // Not admitted yet: resolve references, then queue.
    if let Err(e) = pod::build_pod(job, site) {
        cx.phase(Phase::Pending);
        let reason = match e {
            BuildError::NoImage(_) => "NoImage",
            BuildError::NoCredentials(_) => "NoCredentialsSecret",
        };
        cx.cond(cond::RESOLVED, false, reason, e.to_string());
        return cx.done();
    }
    match &input.secrets {
        SecretsView::Missing(what) => {
            cx.phase(Phase::Pending);
            cx.cond(cond::RESOLVED, false, "SecretNotFound", format!("{what}; the job waits and proceeds once it exists"));
            let since = find_condition(&cx.st.conditions, cond::RESOLVED).map(|c| c.last_transition_time.clone());
            cx.requeue_in(wait_backoff(since.as_ref(), &cx.now));
            return cx.done();
        }
        SecretsView::Ok => {
            cx.cond(cond::RESOLVED, true, "Resolved", format!("FLSite {} and the Secrets exist", site.name_any()));
        }
        SecretsView::NotChecked => {}
    }
    let res = pod::effective_resources(job, site);
    match quota::demand(&res) {
        Err(msg) => {
            cx.finish(Outcome { phase: Phase::Failed, reason: Some("ConfigError"), exit_code: code::CONFIG_ERROR, message: msg });
        }
        Ok(want) => {
            // Only what the job asks beyond the site's whole pool, at the job's first admission check, fails it:
            // `capacity.jobs: 0` pauses a site, and a capacity lowered later leaves queued jobs waiting.
            let never: Vec<String> =
                quota::shortfall(&site.spec.capacity, quota::Amount::default(), want).into_iter().filter(|s| !s.starts_with("jobs:")).collect();
            let first_check = !cx.st.conditions.iter().any(|c| c.type_ == cond::ADMITTED);
            if !never.is_empty() && !first_check {
                cx.phase(Phase::Queued);
                let msg = format!(
                    "site {} has less in total than this job needs now ({}); it waits until the capacity is raised again",
                    site.name_any(),
                    never.join("; ")
                );
                cx.cond(cond::ADMITTED, false, "ExceedsCapacityNow", msg);
            } else if !never.is_empty() {
                cx.finish(Outcome {
                    phase: Phase::Failed,
                    reason: Some("ExceedsCapacity"),
                    exit_code: code::INFRASTRUCTURE_ERROR,
                    message: format!(
                        "the job asks for more than site {} has in total ({}); lower spec.resources or raise the site's capacity",
                        site.name_any(),
                        never.join("; ")
                    ),
                });
            } else {
                cx.phase(Phase::Queued);
                let note = match &input.site {
                    SiteView::Found { queue_note, .. } => queue_note.clone(),
                    SiteView::Missing => QueueNote::default(),
                };
                let reason = if note.behind { "Queued" } else { "AwaitingAdmission" };
                cx.cond(cond::ADMITTED, false, reason, note.message);
            }
        }
    }
    cx.done()
}

fn describe(r: &Resources) -> String {
    let mut parts = Vec::new();
    if let Some(c) = &r.cpu {
        parts.push(format!("cpu {}", c.0));
    }
    if let Some(m) = &r.memory {
        parts.push(format!("memory {}", m.0));
    }
    parts.push(format!("gpus {}", r.gpus.unwrap_or(0)));
    parts.join(", ")
}

fn abort_cause(cx: &Ctx<'_>, input: &Input<'_>) -> Option<&'static str> {
    let job = cx.job;
    let cause = if job.metadata.deletion_timestamp.is_some() {
        abort::cause::DELETED
    } else if job.spec.abort {
        abort::cause::ABORTED
    } else {
        let deadline = job.spec.active_deadline_seconds?;
        let start = cx.st.start_time.as_ref()?;
        if millis(&cx.now) < after_secs(start, deadline) {
            return None;
        }
        abort::cause::DEADLINE
    };
    // An abort that races a completion loses: a worker that already exited ended the job by itself.
    if let PodView::Present(p) = input.pod
        && matches!(pod_state(p), PodState::Exited { .. } | PodState::Evicted { .. } | PodState::Lost { .. }) {
            return None;
        }
    Some(cause)
}

fn run_abort(cx: &mut Ctx<'_>, input: &Input<'_>) {
    let Some(mut a) = cx.st.abort.clone() else { return };
    let grace = cx.job.spec.abort_grace_period_seconds.unwrap_or(DEFAULT_ABORT_GRACE_SECONDS);
    let pod = match input.pod {
        PodView::Present(p) => AbortPod::Present(p),
        PodView::Gone => AbortPod::Gone,
        PodView::NotFound if cx.st.pod_name.is_some() => AbortPod::Gone,
        PodView::NotFound => AbortPod::NeverCreated,
    };
    if let PodView::Present(p) = input.pod {
        cx.st.pod_name = Some(p.name_any());
        // A delete that happened before a restart is recorded by the pod itself.
        if a.pod_deleted_at.is_none() && p.metadata.deletion_timestamp.is_some() {
            a.pod_deleted_at = Some(cx.now.clone());
        }
    }
    // Each step may lead straight to the next (signal then wait), so loop over the pure steps.
    let mut step = abort::next_step(&a, grace, pod, &cx.now);
    if step == AbortStep::Signal {
        cx.steps.push(Step::AnnotatePod { key: ABORT_ANNOTATION, value: "App".into() });
        // The signal is on its way: what is left of the grace period counts from the request.
        step = match until(after_secs(&a.requested_at, grace.max(0)), &cx.now) {
            Some(wait) => AbortStep::Wait(wait),
            None => AbortStep::DeletePod,
        };
    }
    match step {
        AbortStep::Signal => {}
        AbortStep::Wait(d) => {
            cx.phase(Phase::Aborting);
            cx.requeue_in(d);
        }
        AbortStep::DeletePod => {
            cx.steps.push(Step::DeletePod);
            if a.pod_deleted_at.is_none() {
                a.pod_deleted_at = Some(cx.now.clone());
            }
            cx.phase(Phase::Aborting);
            match input.pod {
                PodView::Present(p) => cx.requeue_in(abort::force_after(p)),
                _ => cx.requeue_in(Duration::from_secs(1)),
            }
        }
        AbortStep::ForceDelete => {
            cx.steps.push(Step::ForceDeletePod);
            complete_abort(cx, &mut a, crate::api::AbortMethod::Forced, code::ABORTED);
        }
        AbortStep::Done { method, exit_code } => complete_abort(cx, &mut a, method, exit_code),
    }
    cx.st.abort = Some(a);
}

fn complete_abort(cx: &mut Ctx<'_>, a: &mut AbortStatus, method: crate::api::AbortMethod, exit_code: i32) {
    a.method = Some(method);
    a.completed_at = Some(cx.now.clone());
    let reason = abort::final_reason(a);
    let msg = if reason == abort::cause::DEADLINE {
        format!("the job ran past activeDeadlineSeconds and was aborted ({method:?})")
    } else {
        format!("the job was aborted ({method:?}); exit code {exit_code}")
    };
    cx.finish(Outcome { phase: Phase::Aborted, reason: Some(reason), exit_code, message: msg });
}

/// Finished jobs: never a new pod; tidy a pod that still lingers, honour the TTL and
/// let a deleted FLJob go once its quota is back in the pool.
fn finished(cx: &mut Ctx<'_>, pod: PodView<'_>, holding: bool) {
    if let PodView::Present(p) = pod {
        let live = !matches!(pod_state(p), PodState::Exited { .. } | PodState::Evicted { .. } | PodState::Lost { .. });
        let forced = cx.st.abort.as_ref().is_some_and(|a| a.method == Some(crate::api::AbortMethod::Forced));
        if forced {
            cx.push_once(Step::ForceDeletePod); // the recorded force-delete may not have gone through
        } else if live && p.metadata.deletion_timestamp.is_none() {
            cx.push_once(Step::DeletePod);
        }
        // The end is recorded (in the status as read back, or by the write these steps follow), so the pod may go.
        if p.finalizers().iter().any(|f| f == pod::TRACKING_FINALIZER) {
            cx.push_once(Step::ReleasePod);
        }
    }
    if cx.job.metadata.deletion_timestamp.is_some() {
        if holding {
            return; // the site's reconciler releases it, and that wakes this job up again
        }
        cx.push_once(Step::RemoveFinalizer);
        return;
    }
    if let (Some(ttl), Some(done)) = (cx.job.spec.ttl_seconds_after_finished, cx.st.completion_time.as_ref()) {
        match until(after_secs(done, ttl), &cx.now) {
            Some(wait) => cx.requeue_in(wait),
            None => cx.push_once(Step::DeleteJob),
        }
    }
}


fn site_of<'a>(view: &SiteView<'a>) -> Option<&'a FLSite> {
    match view {
        SiteView::Found { site, .. } => Some(site),
        SiteView::Missing => None,
    }
}

/// How long a job's pod may take to start: the job's own limit, else its site's, else NVFlare's 120 s.
fn pending_timeout(job: &FLJob, site: Option<&FLSite>) -> i64 {
    job.spec
        .pending_timeout_seconds
        .or_else(|| site.and_then(|s| s.spec.pending_timeout_seconds))
        .unwrap_or(DEFAULT_PENDING_TIMEOUT_SECONDS)
}

fn observe_pod(cx: &mut Ctx<'_>, site: Option<&FLSite>, p: &WorkerPod) {
    cx.st.pod_name = Some(p.name_any());
    let state = pod_state(p);
    let ended_cleanly = matches!(state, PodState::Exited { code: 0, .. });
    if p.metadata.deletion_timestamp.is_some()
        && !matches!(state, PodState::Evicted { .. })
        && !ended_cleanly
        && !ended_before_deletion(p, &state)
    {
        // Deleted by someone else (the operator deletes only pods of finished or aborting jobs) before the worker
        // ended by itself: whatever the container exits with now is the deletion's doing, not the job's.
        let how = match &state {
            PodState::Exited { code, .. } => format!("; the container then exited {code}"),
            _ => String::new(),
        };
        cx.finish(Outcome {
            phase: Phase::Failed,
            reason: Some("PodLost"),
            exit_code: code::UNKNOWN,
            message: format!("worker pod {} was deleted by someone else while the job ran{how}; its outcome is unknown", p.name_any()),
        });
        return;
    }
    let image = p
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.image.clone())
        .unwrap_or_default();
    match state {
        PodState::Waiting { reason, message } => {
            if let Some(outcome) = reason.as_deref().and_then(|r| waiting_failure(r, message.as_deref(), &image)) {
                cx.finish(outcome);
                cx.steps.push(Step::DeletePod);
            } else {
                // Every other way of not reaching Running (ContainerCreating behind a FailedMount, a stuck init
                // container, PodInitializing, a slow pull) is bounded by the same start timeout: a pod that never
                // starts must not hold its quota forever.
                let timeout = pending_timeout(cx.job, site);
                let since = p.metadata.creation_timestamp.clone().unwrap_or_else(|| cx.now.clone());
                match until(after_secs(&since, timeout), &cx.now) {
                    Some(wait) => {
                        cx.phase(Phase::Starting);
                        cx.requeue_in(wait);
                    }
                    None => {
                        let what = reason.unwrap_or_else(|| "Pending".into());
                        let detail = message.map(|m| format!(": {m}")).unwrap_or_default();
                        cx.finish(Outcome {
                            phase: Phase::Failed,
                            reason: Some("StartTimeout"),
                            exit_code: code::INFRASTRUCTURE_ERROR,
                            message: format!(
                                "the worker did not start within {timeout}s (still {what}{detail}); check the pod's Events (kubectl describe pod {}); the site's pendingTimeoutSeconds sets the limit",
                                p.name_any()
                            ),
                        });
                        cx.steps.push(Step::DeletePod);
                    }
                }
            }
        }
        PodState::Unschedulable { since, message } => {
            let timeout = pending_timeout(cx.job, site);
            let since = since.or_else(|| p.metadata.creation_timestamp.clone()).unwrap_or_else(|| cx.now.clone());
            match until(after_secs(&since, timeout), &cx.now) {
                Some(wait) => {
                    cx.phase(Phase::Starting);
                    cx.cond(cond::STARTED, false, "Unschedulable", format!("the pod cannot be scheduled yet: {message}"));
                    cx.requeue_in(wait);
                }
                None => {
                    cx.finish(Outcome {
                        phase: Phase::Failed,
                        reason: Some("Unschedulable"),
                        exit_code: code::INFRASTRUCTURE_ERROR,
                        message: format!("the pod stayed unschedulable for {timeout}s: {message}"),
                    });
                    cx.steps.push(Step::DeletePod);
                }
            }
        }
        PodState::Running { started_at } => {
            if !is_true(&cx.st.conditions, cond::STARTED) {
                cx.cond(cond::STARTED, true, "Started", format!("worker container of pod {} runs", p.name_any()));
            }
            if cx.st.start_time.is_none() {
                cx.st.start_time = Some(started_at.unwrap_or_else(|| cx.now.clone()));
            }
            cx.phase(Phase::Running);
            if let (Some(deadline), Some(start)) = (cx.job.spec.active_deadline_seconds, cx.st.start_time.as_ref()) {
                let wait = until(after_secs(start, deadline), &cx.now).unwrap_or_default();
                cx.requeue_in(wait.max(Duration::from_millis(100)));
            }
        }
        PodState::Exited { code, oom_killed: false, ran: false, message, .. } if code != 0 && !is_true(&cx.st.conditions, cond::STARTED) => {
            // The runtime could not start the process at all (StartError, ContainerCannotRun: a wrong pythonPath,
            // a missing binary): the worker never ran, so this is the infrastructure's failure, not the job's.
            let detail = message.map(|m| format!(": {m}")).unwrap_or_default();
            cx.finish(Outcome {
                phase: Phase::Failed,
                reason: Some("InfrastructureError"),
                exit_code: code::INFRASTRUCTURE_ERROR,
                message: format!("the worker container could not be started (exit {code}); check the site's image and pythonPath{detail}"),
            });
        }
        PodState::Exited { code: 0, oom_killed: false, message: Some(m), finished_at, .. } if m.starts_with(crate::status::ABORTED_OUTCOME) => {
            // NVFlare aborted the job itself and the worker stopped cleanly: an abort, not a success.
            let at = finished_at.unwrap_or_else(|| cx.now.clone());
            cx.st.abort = Some(AbortStatus {
                requested_at: at.clone(),
                cause: Some(abort::cause::NVFLARE.into()),
                pod_deleted_at: None,
                method: Some(crate::api::AbortMethod::Graceful),
                completed_at: Some(at),
            });
            cx.finish(Outcome {
                phase: Phase::Aborted,
                reason: Some("Aborted"),
                exit_code: 0,
                message: "NVFlare aborted the job (the FL server, an admin or the client); the worker stopped cleanly".into(),
            });
        }
        PodState::Exited { code, oom_killed, ran, message, .. } => {
            let started = ran || is_true(&cx.st.conditions, cond::STARTED);
            cx.finish(exit_outcome(code, oom_killed, started, message.as_deref()));
        }
        PodState::Evicted { message } => {
            cx.finish(Outcome {
                phase: Phase::Failed,
                reason: Some("Evicted"),
                exit_code: code::ABORTED,
                message: format!("the worker pod was evicted: {message}"),
            });
        }
        PodState::Lost { reason, message } => {
            cx.finish(Outcome {
                phase: Phase::Failed,
                reason: Some("InfrastructureError"),
                exit_code: code::INFRASTRUCTURE_ERROR,
                message: format!("the worker pod failed before its container ran ({reason}: {message})"),
            });
        }
    }
}

/// NVFlare's ABORT_TASK: relayed to a running worker only, which keeps running.
fn task_abort(cx: &mut Ctx<'_>, p: &WorkerPod) {
    if cx.st.phase != Phase::Running {
        return;
    }
    let Some(value) = cx.job.annotations().get(ABORT_TASK_ANNOTATION).cloned() else { return };
    // The pod itself says whether the relay happened: the status is written first, and an operator killed in between
    // must still annotate the pod after its restart.
    if p.annotations().get(ABORT_TASK_ANNOTATION) != Some(&value) {
        cx.steps.push(Step::AnnotatePod { key: ABORT_TASK_ANNOTATION, value: value.clone() });
    }
    if cx.st.last_task_abort.as_ref().is_none_or(|t| t.value != value) {
        cx.st.last_task_abort = Some(TaskAbortStatus { value, relayed_at: cx.now.clone() });
    }
}

/// Why a queued job waits: which resources are short (with what the job needs; not the site's capacity, nor the
/// ever-changing usage) and whether it is really held back. Stable while the situation is, so a long queue does not
/// rewrite every queued job's status at each admission, nor at a change of the site's capacity that leaves it
/// queued (issue 12: raising a capacity rewrote every queued job). `ahead` are the demands of the jobs before it in
/// the queue: if they and this job all fit, the site admits it in its next round (`behind` false, no Event: a burst
/// of jobs on a roomy site is not "queued"); if something on the way does not fit, it is really queued. The
/// controller answers from its queue index ([`queue_note_after`]); this walk is the oracle the index is tested
/// against.
#[cfg(test)]
pub fn queue_note(site: &FLSite, ahead: &[Resources], want: &Resources) -> QueueNote {
    queue_note_after(site, &Ahead::walk(site, ahead), want)
}

/// What the jobs ahead of one in its site's queue leave for it, as the site's next round would see them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ahead {
    /// How many jobs are ahead.
    pub jobs: usize,
    /// One of them does not fit in the site's next round: everything behind it waits.
    pub blocked: bool,
    /// What the site holds once the next round admitted them all (meaningful when not `blocked`).
    pub next_round: quota::Amount,
}

impl Ahead {
    /// Walks `ahead` (the demands of the jobs before one, in queue order) the way the site's next round admits:
    /// earlier jobs first, while they fit.
    #[cfg(test)]
    pub fn walk(site: &FLSite, ahead: &[Resources]) -> Self {
        let mut a = Ahead::start(site);
        for r in ahead {
            a = a.then(site, r);
        }
        a
    }

    /// Nothing ahead yet: what the site's ledger holds now.
    pub fn start(site: &FLSite) -> Self {
        let allocations = site.status.as_ref().map(|s| s.allocations.as_slice()).unwrap_or_default();
        Ahead { jobs: 0, blocked: false, next_round: quota::total(allocations) }
    }

    /// This, with one more job `r` ahead.
    pub fn then(self, site: &FLSite, r: &Resources) -> Self {
        let mut next = Ahead { jobs: self.jobs + 1, ..self };
        if !self.blocked {
            match quota::demand(r) {
                Ok(d) if quota::shortfall(&site.spec.capacity, self.next_round, d).is_empty() => next.next_round = self.next_round + d,
                _ => next.blocked = true,
            }
        }
        next
    }
}

/// [`queue_note`] for a job with `ahead` before it.
pub fn queue_note_after(site: &FLSite, ahead: &Ahead, want: &Resources) -> QueueNote {
    let allocations = site.status.as_ref().map(|s| s.allocations.as_slice()).unwrap_or_default();
    let cap = &site.spec.capacity;
    let used = quota::total(allocations);
    let short: Vec<String> = quota::demand(want)
        .map(|w| quota::shortfall(cap, used, w))
        .unwrap_or_default()
        .iter()
        .filter_map(|phrase| phrase.split(':').next())
        .map(|name| {
            let q = |v: &Option<crate::api::Quantity>| v.as_ref().map_or("0".to_string(), |q| q.0.clone());
            match name {
                "jobs" => "jobs".to_string(),
                "gpus" => format!("gpus (needs {})", want.gpus.unwrap_or(0)),
                "cpu" => format!("cpu (needs {})", q(&want.cpu)),
                other => format!("{other} (needs {})", q(&want.memory)),
            }
        })
        .collect();
    // The site's next round, simulated: earlier jobs first, in order, while they fit; then this one.
    let blocked = !short.is_empty() || ahead.then(site, want).blocked;
    let msg = if blocked {
        let mut msg = format!("waiting for quota at site {}", site.name_any());
        if !short.is_empty() {
            msg.push_str(&format!(": short of {}", short.join(", ")));
        }
        msg.push_str(if ahead.jobs == 0 { "; next in line" } else { "; earlier jobs are ahead in the queue" });
        msg.push_str(&format!(" (`kubectl get flsite {}` shows its capacity and use)", site.name_any()));
        msg
    } else {
        // The same words whether or not earlier jobs are ahead: a draining burst does not rewrite every status.
        format!("fits at site {}, as do the jobs ahead of it; admitted in the site's next rounds", site.name_any())
    };
    QueueNote { behind: blocked, message: msg }
}

#[cfg(test)]
#[path = "lifecycle_tests.rs"]
mod tests;
