//! Table tests of the whole decision: observed pod (+ abort state) -> the status a user sees.

use super::*;
use crate::api::{AbortMethod, Capacity, Quantity};
use crate::testing::*;

fn site() -> FLSite {
    mk_site("site-a", Capacity { jobs: Some(4), gpus: Some(8), ..Default::default() })
}

fn admitted_job() -> FLJob {
    let mut j = mk_job("train", "site-a");
    let mut st = FLJobStatus { phase: Phase::Starting, pod_name: Some("train-abcde".into()), ..Default::default() };
    st.allocation = Some(Resources { gpus: Some(0), ..Default::default() });
    st.conditions.push(condition(cond::RESOLVED, true, "Resolved", "", Some(1), &t(0)));
    st.conditions.push(condition(cond::ADMITTED, true, "Admitted", "", Some(1), &t(0)));
    j.status = Some(st);
    j
}

fn holding(site: &FLSite) -> SiteView<'_> {
    SiteView::Found { site, allocation: Some(Resources { gpus: Some(0), ..Default::default() }), queue_note: QueueNote::default() }
}

fn decide_with(job: &FLJob, site: &FLSite, pod: PodView<'_>, now: i64) -> Decision {
    decide(Input { job, site: holding(site), secrets: SecretsView::NotChecked, pod, now: t(now) })
}

fn observe(job: &FLJob, pod: &WorkerPod) -> Decision {
    decide_with(job, &site(), PodView::Present(pod), 6000)
}

fn started_job() -> FLJob {
    let mut j = admitted_job();
    let st = j.status.as_mut().unwrap();
    st.phase = Phase::Running;
    st.start_time = Some(t(1000));
    st.conditions.push(condition(cond::STARTED, true, "Started", "", Some(1), &t(1000)));
    j
}

/// One row per line of the exit-code table in API.md.
#[test]
fn exit_code_table() {
    struct Row {
        name: &'static str,
        pod: WorkerPod,
        job: FLJob,
        phase: Phase,
        reason: Option<&'static str>,
        code: i32,
        client: &'static str,
    }
    let row = |name, pod, job, phase, reason, code, client| Row { name, pod, job, phase, reason, code, client };
    let rows = vec![
        row("exit 0", mk_pod("Succeeded", exited(0, "Completed", true)), started_job(), Phase::Succeeded, None, 0, "stopped"),
        row("exit 101", mk_pod("Failed", exited(101, "Error", true)), started_job(), Phase::Failed, Some("Exception"), 101, "exception"),
        row("exit 102", mk_pod("Failed", exited(102, "Error", true)), started_job(), Phase::Failed, Some("UnsafeComponent"), 102, "exception"),
        row("exit 103", mk_pod("Failed", exited(103, "Error", true)), started_job(), Phase::Failed, Some("ConfigError"), 103, "exception"),
        row("exit 104", mk_pod("Failed", exited(104, "Error", true)), started_job(), Phase::Failed, Some("InfrastructureError"), 104, "exception"),
        row("exit 1 after start", mk_pod("Failed", exited(1, "Error", true)), started_job(), Phase::Failed, Some("ExecutionError"), 1, "exception"),
        row("exit 1 before it ran", mk_pod("Failed", exited(1, "Error", false)), admitted_job(), Phase::Failed, Some("InfrastructureError"), 104, "exception"),
        row("OOMKilled 137", mk_pod("Failed", exited(137, "OOMKilled", true)), started_job(), Phase::Failed, Some("OOMKilled"), 137, "exception"),
        row("OOMKilled exit 0", mk_pod("Failed", exited(0, "OOMKilled", true)), started_job(), Phase::Failed, Some("OOMKilled"), 137, "exception"),
        row("evicted", evicted_pod(), started_job(), Phase::Failed, Some("Evicted"), 9, "exception"),
        row("ErrImagePull", mk_pod("Pending", waiting("ErrImagePull")), admitted_job(), Phase::Failed, Some("ImagePullFailed"), 104, "exception"),
        row("ImagePullBackOff", mk_pod("Pending", waiting("ImagePullBackOff")), admitted_job(), Phase::Failed, Some("ImagePullFailed"), 104, "exception"),
        row("InvalidImageName", mk_pod("Pending", waiting("InvalidImageName")), admitted_job(), Phase::Failed, Some("ImagePullFailed"), 104, "exception"),
        row("CreateContainerConfigError", mk_pod("Pending", waiting("CreateContainerConfigError")), admitted_job(), Phase::Failed, Some("ConfigError"), 103, "exception"),
        row("other non-zero", mk_pod("Failed", exited(3, "Error", true)), started_job(), Phase::Failed, Some("Exception"), 3, "exception"),
    ];
    for r in rows {
        let d = observe(&r.job, &r.pod);
        assert_eq!(d.status.phase, r.phase, "{}: phase", r.name);
        assert_eq!(d.status.reason.as_deref(), r.reason, "{}: reason", r.name);
        assert_eq!(d.status.exit_code, Some(r.code), "{}: exit code", r.name);
        assert_eq!(d.status.client_status.as_deref(), Some(r.client), "{}: client status", r.name);
        assert!(d.status.completion_time.is_some(), "{}: completion time", r.name);
        assert!(is_true(&d.status.conditions, cond::FINISHED), "{}: Finished condition", r.name);
        assert!(!d.steps.contains(&Step::CreatePod), "{}: never a new pod", r.name);
        let pending_failure = r.pod.status.as_ref().unwrap().phase.as_deref() == Some("Pending");
        assert_eq!(d.steps.contains(&Step::DeletePod), pending_failure, "{}: a pod that can never run is deleted", r.name);
    }
}

#[test]
fn unschedulable_waits_for_the_pending_timeout_then_fails() {
    let job = admitted_job();
    let pod = unschedulable_pod(t(0));
    let d = decide_with(&job, &site(), PodView::Present(&pod), 60_000);
    assert_eq!(d.status.phase, Phase::Starting);
    assert_eq!(d.requeue, Some(Duration::from_secs(60)));
    let c = find_condition(&d.status.conditions, cond::STARTED).unwrap();
    assert!(c.message.contains("Insufficient nvidia.com/gpu"), "{}", c.message);
    let d = decide_with(&job, &site(), PodView::Present(&pod), 120_000);
    assert_eq!((d.status.phase, d.status.reason.as_deref(), d.status.exit_code), (Phase::Failed, Some("Unschedulable"), Some(104)));
    assert!(d.steps.contains(&Step::DeletePod));
}

#[test]
fn site_pending_timeout_is_honoured() {
    let mut s = site();
    s.spec.pending_timeout_seconds = Some(5);
    let d = decide_with(&admitted_job(), &s, PodView::Present(&unschedulable_pod(t(0))), 5_000);
    assert_eq!(d.status.reason.as_deref(), Some("Unschedulable"));
}

#[test]
fn running_pod_sets_started_and_start_time() {
    let d = observe(&admitted_job(), &mk_pod("Running", running()));
    assert_eq!(d.status.phase, Phase::Running);
    assert_eq!(d.status.client_status.as_deref(), Some("started"));
    assert_eq!(d.status.start_time, Some(t(1000)));
    assert!(is_true(&d.status.conditions, cond::STARTED));
    assert!(d.steps.is_empty());
}

#[test]
fn pending_pod_is_starting() {
    let d = observe(&admitted_job(), &mk_pod("Pending", waiting("ContainerCreating")));
    assert_eq!((d.status.phase, d.status.client_status.as_deref()), (Phase::Starting, Some("starting")));
}

#[test]
fn pod_deleted_by_someone_else_is_pod_lost() {
    let d = decide_with(&started_job(), &site(), PodView::Gone, 6000);
    assert_eq!((d.status.phase, d.status.reason.as_deref(), d.status.exit_code), (Phase::Failed, Some("PodLost"), Some(127)));
}

#[test]
fn steady_running_job_changes_nothing() {
    let pod = mk_pod("Running", running());
    let first = observe(&admitted_job(), &pod);
    let mut job = admitted_job();
    job.status = Some(first.status.clone());
    let second = decide_with(&job, &site(), PodView::Present(&pod), 9000);
    assert_eq!(second.status, first.status, "a steady cluster needs no status write");
    assert!(second.steps.is_empty());
}

#[test]
fn finished_job_never_gets_a_new_pod() {
    let mut job = started_job();
    let d = observe(&job, &mk_pod("Succeeded", exited(0, "Completed", true)));
    job.status = Some(d.status);
    for pod in [PodView::NotFound, PodView::Gone] {
        let d = decide_with(&job, &site(), pod, 9000);
        assert_eq!(d.status.phase, Phase::Succeeded);
        assert!(d.steps.is_empty(), "{:?}", d.steps);
    }
}

#[test]
fn admission_records_allocation_then_creates_pod() {
    let mut job = mk_job("train", "site-a");
    job.status = Some(FLJobStatus {
        phase: Phase::Queued,
        conditions: vec![condition(cond::RESOLVED, true, "Resolved", "", Some(1), &t(0))],
        ..Default::default()
    });
    let s = site();
    let d = decide_with(&job, &s, PodView::NotFound, 100);
    assert_eq!(d.steps, vec![Step::CreatePod]);
    assert_eq!(d.status.phase, Phase::Starting);
    assert!(d.status.allocation.is_some());
    assert_eq!(d.status.pod_name, Some(crate::pod::pod_name(&job)), "the pod's name is recorded with the admission");
    assert!(is_true(&d.status.conditions, cond::ADMITTED));
}

#[test]
fn queued_job_says_why() {
    let job = mk_job("train", "site-a");
    let s = site();
    let view = SiteView::Found { site: &s, allocation: None, queue_note: QueueNote { behind: true, message: "waiting for quota at site site-a: short of jobs; next in line (`kubectl get flsite site-a` shows its capacity and use)".into() } };
    let d = decide(Input { job: &job, site: view, secrets: SecretsView::Ok, pod: PodView::NotFound, now: t(0) });
    assert_eq!(d.status.phase, Phase::Queued);
    assert_eq!(d.status.client_status.as_deref(), Some("not started"));
    let c = find_condition(&d.status.conditions, cond::ADMITTED).unwrap();
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Queued"));
    assert!(c.message.contains("short of jobs; next in line"));
    assert!(is_true(&d.status.conditions, cond::RESOLVED));
}

#[test]
fn missing_site_waits_with_a_condition_naming_it() {
    let job = mk_job("train", "nowhere");
    let d = decide(Input { job: &job, site: SiteView::Missing, secrets: SecretsView::NotChecked, pod: PodView::NotFound, now: t(0) });
    assert_eq!(d.status.phase, Phase::Pending);
    let c = find_condition(&d.status.conditions, cond::RESOLVED).unwrap();
    assert_eq!(c.reason, "SiteNotFound");
    assert!(c.message.contains("\"nowhere\""), "{}", c.message);
    assert!(d.steps.is_empty() && d.requeue.is_none(), "the site watch wakes it; no polling");
}

#[test]
fn missing_secret_waits_with_backoff() {
    let job = mk_job("train", "site-a");
    let s = site();
    let view = SiteView::Found { site: &s, allocation: None, queue_note: QueueNote::default() };
    let missing = SecretsView::Missing("Secret \"site-a-creds\" (spec.credentialsSecret of FLSite site-a) not found in namespace ns".into());
    let d = decide(Input { job: &job, site: view.clone(), secrets: missing.clone(), pod: PodView::NotFound, now: t(0) });
    let c = find_condition(&d.status.conditions, cond::RESOLVED).unwrap();
    assert_eq!(c.reason, "SecretNotFound");
    assert!(c.message.contains("site-a-creds"));
    assert_eq!(d.requeue, Some(Duration::from_secs(2)));
    // Later checks come at growing intervals, computed from the condition's age, not from memory.
    let mut waiting = job.clone();
    waiting.status = Some(d.status);
    let d = decide(Input { job: &waiting, site: view, secrets: missing, pod: PodView::NotFound, now: t(40_000) });
    assert_eq!(d.requeue, Some(Duration::from_secs(40)));
}

#[test]
fn job_larger_than_the_site_fails_at_once() {
    let mut job = mk_job("huge", "site-a");
    job.spec.resources = Some(Resources { gpus: Some(9), cpu: None, memory: None, ephemeral_storage: None });
    let s = site();
    let view = SiteView::Found { site: &s, allocation: None, queue_note: QueueNote::default() };
    let d = decide(Input { job: &job, site: view, secrets: SecretsView::Ok, pod: PodView::NotFound, now: t(0) });
    assert_eq!((d.status.phase, d.status.reason.as_deref()), (Phase::Failed, Some("ExceedsCapacity")));
    assert!(d.status.message.unwrap().contains("gpus: needs 9, 8 of 8 free"));
}

// ---- App-scope abort ----

fn aborting(job: &mut FLJob, requested: i64) {
    job.spec.abort = true;
    job.status.as_mut().unwrap().abort = Some(AbortStatus {
        requested_at: t(requested),
        cause: Some("Aborted".into()),
        pod_deleted_at: None,
        method: None,
        completed_at: None,
    });
}

#[test]
fn abort_signals_the_pod_and_waits_the_grace_period() {
    let mut job = started_job();
    job.spec.abort = true;
    let pod = mk_pod("Running", running());
    let d = decide_with(&job, &site(), PodView::Present(&pod), 6000);
    assert_eq!(d.steps, vec![Step::AnnotatePod { key: ABORT_ANNOTATION, value: "App".into() }]);
    assert_eq!(d.status.phase, Phase::Aborting);
    assert_eq!(d.status.abort.as_ref().unwrap().requested_at, t(6000));
    assert_eq!(d.requeue, Some(Duration::from_secs(10)), "NVFlare's max_wait by default");
    assert!(is_true(&d.status.conditions, cond::ABORT_REQUESTED));
}

#[test]
fn abort_honoured_in_the_grace_period_is_graceful_with_the_workers_code() {
    let mut job = started_job();
    aborting(&mut job, 6000);
    let mut pod = mk_pod("Succeeded", exited(0, "Completed", true));
    annotate(&mut pod, ABORT_ANNOTATION, "App");
    let d = decide_with(&job, &site(), PodView::Present(&pod), 9000);
    let a = d.status.abort.as_ref().unwrap();
    assert_eq!((d.status.phase, d.status.reason.as_deref(), d.status.exit_code), (Phase::Aborted, Some("Aborted"), Some(0)));
    assert_eq!((a.method, a.completed_at.clone()), (Some(AbortMethod::Graceful), Some(t(9000))));
    assert_eq!(d.status.client_status.as_deref(), Some("stopped"));
}

#[test]
fn abort_past_the_grace_period_deletes_then_forces() {
    let mut job = started_job();
    aborting(&mut job, 6000);
    let mut pod = mk_pod("Running", running());
    annotate(&mut pod, ABORT_ANNOTATION, "App");
    pod.spec.as_mut().unwrap().termination_grace_period_seconds = Some(3);
    let d = decide_with(&job, &site(), PodView::Present(&pod), 16_000);
    assert_eq!(d.steps, vec![Step::DeletePod]);
    assert_eq!(d.status.abort.as_ref().unwrap().pod_deleted_at, Some(t(16_000)));
    assert_eq!(d.requeue, Some(Duration::from_secs(5)), "pod grace 3 s + 2 s slack");
    // Gone within its termination grace period: Deleted, exit 9.
    job.status = Some(d.status.clone());
    let gone = decide_with(&job, &site(), PodView::Gone, 18_000);
    assert_eq!(gone.status.abort.as_ref().unwrap().method, Some(AbortMethod::Deleted));
    assert_eq!((gone.status.phase, gone.status.exit_code), (Phase::Aborted, Some(9)));
    // Still there afterwards: Forced.
    pod.metadata.deletion_timestamp = Some(t(19_000));
    let forced = decide_with(&job, &site(), PodView::Present(&pod), 21_000);
    assert_eq!(forced.steps, vec![Step::ForceDeletePod, Step::ReleasePod]);
    assert_eq!(forced.status.abort.as_ref().unwrap().method, Some(AbortMethod::Forced));
    assert_eq!(forced.status.exit_code, Some(9));
}

#[test]
fn abort_timers_resume_from_status_after_a_restart() {
    // The operator died after signalling; when it comes back 4 s later only 6 s of grace remain.
    let mut job = started_job();
    aborting(&mut job, 6000);
    let mut pod = mk_pod("Running", running());
    annotate(&mut pod, ABORT_ANNOTATION, "App");
    let d = decide_with(&job, &site(), PodView::Present(&pod), 10_000);
    assert!(d.steps.is_empty());
    assert_eq!(d.requeue, Some(Duration::from_secs(6)));
    // It died after deleting the pod but before recording it: the pod's deletionTimestamp tells.
    pod.metadata.deletion_timestamp = Some(t(46_000));
    let d = decide_with(&job, &site(), PodView::Present(&pod), 17_000);
    assert!(d.status.abort.as_ref().unwrap().pod_deleted_at.is_some());
    assert!(!d.steps.contains(&Step::DeletePod));
}

#[test]
fn abort_of_a_queued_job_ends_it_at_once() {
    let mut job = mk_job("train", "site-a");
    job.spec.abort = true;
    let s = site();
    let view = SiteView::Found { site: &s, allocation: None, queue_note: QueueNote::default() };
    let d = decide(Input { job: &job, site: view, secrets: SecretsView::NotChecked, pod: PodView::NotFound, now: t(0) });
    assert_eq!((d.status.phase, d.status.exit_code), (Phase::Aborted, Some(9)));
    assert_eq!(d.status.abort.unwrap().method, Some(AbortMethod::Graceful));
    assert!(d.steps.is_empty());
}

#[test]
fn abort_of_a_pending_pod_deletes_it_without_waiting() {
    let mut job = admitted_job();
    job.spec.abort = true;
    let pod = mk_pod("Pending", waiting("ContainerCreating"));
    let d = decide_with(&job, &site(), PodView::Present(&pod), 1000);
    assert_eq!(d.steps, vec![Step::DeletePod]);
    assert_eq!(d.status.phase, Phase::Aborting);
}

#[test]
fn abort_after_completion_changes_nothing() {
    let mut job = started_job();
    let done = observe(&job, &mk_pod("Succeeded", exited(0, "Completed", true)));
    job.status = Some(done.status.clone());
    job.spec.abort = true;
    let d = decide_with(&job, &site(), PodView::Present(&mk_pod("Succeeded", exited(0, "Completed", true))), 9000);
    assert_eq!(d.status, done.status);
    assert_eq!(d.steps, vec![Step::ReleasePod], "only the tracking finalizer goes: the end is recorded");
}

#[test]
fn abort_racing_a_completion_keeps_the_real_outcome() {
    let mut job = started_job();
    job.spec.abort = true;
    let d = observe(&job, &mk_pod("Failed", exited(102, "Error", true)));
    assert_eq!((d.status.phase, d.status.exit_code), (Phase::Failed, Some(102)));
    assert!(d.status.abort.is_none());
}

#[test]
fn deadline_aborts_with_deadline_exceeded() {
    let mut job = started_job();
    job.spec.active_deadline_seconds = Some(30);
    let pod = mk_pod("Running", running());
    let d = decide_with(&job, &site(), PodView::Present(&pod), 20_000);
    assert_eq!(d.status.phase, Phase::Running);
    assert_eq!(d.requeue, Some(Duration::from_secs(11)));
    let d = decide_with(&job, &site(), PodView::Present(&pod), 31_000);
    assert_eq!(d.status.phase, Phase::Aborting);
    job.status = Some(d.status);
    let mut stopped = mk_pod("Succeeded", exited(0, "Completed", true));
    annotate(&mut stopped, ABORT_ANNOTATION, "App");
    let d = decide_with(&job, &site(), PodView::Present(&stopped), 33_000);
    assert_eq!((d.status.phase, d.status.reason.as_deref(), d.status.exit_code), (Phase::Aborted, Some("DeadlineExceeded"), Some(9)));
}

#[test]
fn deletion_runs_the_abort_then_waits_for_release_then_lets_go() {
    let mut job = started_job();
    job.metadata.deletion_timestamp = Some(t(6000));
    let d = decide_with(&job, &site(), PodView::NotFound, 6000);
    assert_eq!(d.status.phase, Phase::Aborted);
    assert_eq!(d.status.abort.as_ref().unwrap().cause.as_deref(), Some("Deleted"));
    job.status = Some(d.status);
    // Still in the ledger: wait for the site to release it.
    let d = decide_with(&job, &site(), PodView::NotFound, 7000);
    assert!(!d.steps.contains(&Step::RemoveFinalizer));
    // Released: the finalizer goes.
    let s = site();
    let released = SiteView::Found { site: &s, allocation: None, queue_note: QueueNote::default() };
    let d = decide(Input { job: &job, site: released, secrets: SecretsView::NotChecked, pod: PodView::NotFound, now: t(8000) });
    assert_eq!(d.steps, vec![Step::RemoveFinalizer]);
    assert_eq!(d.status, job.status.clone().unwrap(), "the release costs the job no status write");
}

#[test]
fn ttl_deletes_the_finished_job() {
    let mut job = started_job();
    job.spec.ttl_seconds_after_finished = Some(5);
    let d = observe(&job, &mk_pod("Succeeded", exited(0, "Completed", true)));
    job.status = Some(d.status);
    let d = decide_with(&job, &site(), PodView::NotFound, 8000);
    assert_eq!(d.requeue, Some(Duration::from_secs(3)));
    let d = decide_with(&job, &site(), PodView::NotFound, 11_000);
    assert!(d.steps.contains(&Step::DeleteJob));
}

#[test]
fn task_abort_is_relayed_once_and_the_pod_keeps_running() {
    let mut job = started_job();
    job.metadata.annotations = Some([(ABORT_TASK_ANNOTATION.to_string(), "1".to_string())].into());
    let pod = mk_pod("Running", running());
    let d = decide_with(&job, &site(), PodView::Present(&pod), 6000);
    assert_eq!(d.steps, vec![Step::AnnotatePod { key: ABORT_TASK_ANNOTATION, value: "1".into() }]);
    assert_eq!(d.status.last_task_abort.as_ref().unwrap().value, "1");
    assert_eq!(d.status.phase, Phase::Running);
    job.status = Some(d.status);
    // Recorded, but the operator died before it annotated the pod: the pod says so, and the relay is done again.
    let again = decide_with(&job, &site(), PodView::Present(&pod), 7000);
    assert_eq!(again.steps, vec![Step::AnnotatePod { key: ABORT_TASK_ANNOTATION, value: "1".into() }]);
    assert_eq!(again.status.last_task_abort.as_ref().unwrap().relayed_at, t(6000), "recorded once");
    let mut annotated = pod.clone();
    annotate(&mut annotated, ABORT_TASK_ANNOTATION, "1");
    let d = decide_with(&job, &site(), PodView::Present(&annotated), 8000);
    assert!(d.steps.is_empty(), "relayed once");
}

#[test]
fn quantities_in_a_site_default_resources_are_used() {
    let mut s = site();
    s.spec.capacity.cpu = Some(Quantity("500m".into()));
    let job = mk_job("train", "site-a");
    let view = SiteView::Found { site: &s, allocation: None, queue_note: QueueNote::default() };
    let d = decide(Input { job: &job, site: view, secrets: SecretsView::Ok, pod: PodView::NotFound, now: t(0) });
    assert_eq!(d.status.reason.as_deref(), Some("ExceedsCapacity"), "default cpu 1 > capacity 500m");
}

#[test]
fn a_running_job_keeps_running_when_its_site_is_deleted() {
    let job = started_job();
    let pod = mk_pod("Running", running());
    let d = decide(Input { job: &job, site: SiteView::Missing, secrets: SecretsView::NotChecked, pod: PodView::Present(&pod), now: t(6000) });
    assert_eq!(d.status.phase, Phase::Running);
    let done = mk_pod("Failed", exited(101, "Error", true));
    let d = decide(Input { job: &job, site: SiteView::Missing, secrets: SecretsView::NotChecked, pod: PodView::Present(&done), now: t(7000) });
    assert_eq!((d.status.phase, d.status.exit_code), (Phase::Failed, Some(101)));
}

#[test]
fn a_recorded_pod_delete_that_did_not_go_through_is_issued_again() {
    let mut job = started_job();
    aborting(&mut job, 6000);
    job.status.as_mut().unwrap().abort.as_mut().unwrap().pod_deleted_at = Some(t(16_000));
    let mut pod = mk_pod("Running", running());
    annotate(&mut pod, ABORT_ANNOTATION, "App");
    let d = decide_with(&job, &site(), PodView::Present(&pod), 17_000);
    assert_eq!(d.steps, vec![Step::DeletePod]);
    assert_eq!(d.status.abort.unwrap().pod_deleted_at, Some(t(16_000)), "the first attempt's time is kept");
}

#[test]
fn a_recorded_force_delete_is_repeated_while_the_pod_remains() {
    let mut job = started_job();
    aborting(&mut job, 6000);
    let mut pod = mk_pod("Running", running());
    annotate(&mut pod, ABORT_ANNOTATION, "App");
    pod.metadata.deletion_timestamp = Some(t(19_000));
    pod.spec.as_mut().unwrap().termination_grace_period_seconds = Some(3);
    job.status.as_mut().unwrap().abort.as_mut().unwrap().pod_deleted_at = Some(t(16_000));
    let forced = decide_with(&job, &site(), PodView::Present(&pod), 22_000);
    assert_eq!(forced.steps, vec![Step::ForceDeletePod, Step::ReleasePod]);
    job.status = Some(forced.status);
    let again = decide_with(&job, &site(), PodView::Present(&pod), 23_000);
    assert_eq!(again.steps, vec![Step::ForceDeletePod, Step::ReleasePod]);
}

#[test]
fn the_tracking_finalizer_goes_once_the_end_is_recorded() {
    let job = started_job();
    let pod = mk_pod("Succeeded", exited(0, "Completed", true));
    let first = observe(&job, &pod);
    assert_eq!(first.status.phase, Phase::Succeeded);
    // The controller runs the steps only after this status is written (resourceVersion as a precondition; a failed
    // write returns before any step): the pod lets go in the same reconcile.
    assert_eq!(first.steps, vec![Step::ReleasePod]);
    let mut recorded = job.clone();
    recorded.status = Some(first.status);
    let next = decide_with(&recorded, &site(), PodView::Present(&pod), 7000);
    assert_eq!(next.steps, vec![Step::ReleasePod]);
    let mut released = pod.clone();
    released.metadata.finalizers = None;
    assert!(decide_with(&recorded, &site(), PodView::Present(&released), 8000).steps.is_empty());
}

#[test]
fn a_pod_deleted_by_someone_else_is_lost_unless_it_had_ended_before() {
    let job = started_job();
    let mut pod = mk_pod("Failed", exited(143, "Error", true)); // finished at 5 s
    pod.metadata.deletion_timestamp = Some(t(34_000));
    pod.metadata.deletion_grace_period_seconds = Some(30); // asked for at 4 s, before the container ended
    let d = observe(&job, &pod);
    assert_eq!((d.status.phase, d.status.reason.as_deref(), d.status.exit_code), (Phase::Failed, Some("PodLost"), Some(127)));
    assert!(d.status.message.as_deref().unwrap_or_default().contains("exited 143"), "{:?}", d.status.message);
    let mut running = mk_pod("Running", running());
    running.metadata.deletion_timestamp = Some(t(34_000));
    assert_eq!(observe(&job, &running).status.reason.as_deref(), Some("PodLost"), "still stopping: lost all the same");
    // Ended by itself (exit 0 at 5 s), deleted afterwards: a clean exit stands, even in the same second.
    let mut done = mk_pod("Succeeded", exited(0, "Completed", true));
    done.metadata.deletion_timestamp = Some(t(5_000));
    done.metadata.deletion_grace_period_seconds = Some(0);
    assert_eq!(observe(&job, &done).status.phase, Phase::Succeeded);
    // Failed by itself (exit 101 at 5 s), deleted at 9 s while the operator was down: its own outcome.
    let mut failed = mk_pod("Failed", exited(101, "Error", true));
    failed.metadata.deletion_timestamp = Some(t(9_000));
    failed.metadata.deletion_grace_period_seconds = Some(0);
    assert_eq!(observe(&job, &failed).status.reason.as_deref(), Some("Exception"));
    // Stopped by the deletion: the kubelet's final delete (grace 0) right after it ended is no proof of anything.
    let mut killed = mk_pod("Failed", exited(143, "Error", true));
    killed.metadata.deletion_timestamp = Some(t(5_400));
    killed.metadata.deletion_grace_period_seconds = Some(0);
    assert_eq!(observe(&job, &killed).status.reason.as_deref(), Some("PodLost"));
}

#[test]
fn aborting_a_deleted_pod_no_node_took_ends_at_once() {
    let mut job = admitted_job();
    aborting(&mut job, 6000);
    let mut pod = crate::testing::unschedulable_pod(t(1000));
    pod.spec.as_mut().unwrap().node_name = None;
    pod.metadata.deletion_timestamp = Some(t(7000));
    job.status.as_mut().unwrap().abort.as_mut().unwrap().pod_deleted_at = Some(t(7000));
    let d = decide_with(&job, &site(), PodView::Present(&pod), 7500);
    assert_eq!(d.status.phase, Phase::Aborted);
    assert_eq!(d.status.abort.as_ref().and_then(|a| a.method), Some(AbortMethod::Deleted));
}

#[test]
fn queue_note_names_what_is_short_and_stays_stable_as_usage_moves() {
    let mut s = mk_site("site-a", Capacity { jobs: Some(2), gpus: Some(4), ..Default::default() });
    let alloc = |job: &str, gpus| crate::api::Allocation { job: job.into(), uid: job.into(), gpus, ..Default::default() };
    s.status = Some(crate::api::FLSiteStatus { allocations: vec![alloc("a", 3)], ..Default::default() });
    let want = Resources { gpus: Some(2), ..Default::default() };
    let one_used = queue_note(&s, &[], &want);
    assert_eq!(one_used.message, "waiting for quota at site site-a: short of gpus (needs 2); next in line (`kubectl get flsite site-a` shows its capacity and use)");
    assert!(one_used.behind);
    s.status = Some(crate::api::FLSiteStatus { allocations: vec![alloc("b", 4)], ..Default::default() });
    assert_eq!(queue_note(&s, &[], &want), one_used, "the same words while the same thing is short");
    s.spec.capacity.gpus = Some(5);
    assert_eq!(queue_note(&s, &[], &want), one_used, "the same words after a capacity change that leaves it short");
    s.spec.capacity.gpus = Some(4);
    s.status = Some(crate::api::FLSiteStatus { allocations: vec![alloc("a", 1), alloc("b", 1)], ..Default::default() });
    let three = vec![want.clone(); 3];
    assert_eq!(queue_note(&s, &three, &want).message, "waiting for quota at site site-a: short of jobs; earlier jobs are ahead in the queue (`kubectl get flsite site-a` shows its capacity and use)");
    s.status = Some(crate::api::FLSiteStatus::default());
    let fits = queue_note(&s, &[], &want);
    assert_eq!((fits.behind, fits.message.as_str()), (false, "fits at site site-a, as do the jobs ahead of it; admitted in the site's next rounds"));
}

#[test]
fn a_job_behind_others_that_all_fit_is_not_queued_but_one_behind_a_blocked_job_is() {
    // A burst on a roomy site: everything ahead fits, so the job is only waiting for the site's next round.
    let mut s = mk_site("site-a", Capacity { jobs: Some(4), gpus: Some(4), ..Default::default() });
    s.status = Some(crate::api::FLSiteStatus::default());
    let one = Resources { gpus: Some(1), ..Default::default() };
    let n = queue_note(&s, &[one.clone(), one.clone()], &one);
    assert_eq!(n, queue_note(&s, &[], &one), "the same words with or without jobs ahead");
    assert!(!n.behind);
    // The jobs ahead use up the pool: this one is really queued, though it alone would fit now.
    let n = queue_note(&s, &[one.clone(), one.clone(), Resources { gpus: Some(2), ..Default::default() }], &one);
    assert!(n.behind, "{n:?}");
    assert_eq!(n.message, "waiting for quota at site site-a; earlier jobs are ahead in the queue (`kubectl get flsite site-a` shows its capacity and use)");
    // A big job ahead that does not fit now blocks the ones behind it.
    s.status = Some(crate::api::FLSiteStatus { allocations: vec![crate::api::Allocation { job: "a".into(), uid: "a".into(), gpus: 2, ..Default::default() }], ..Default::default() });
    let n = queue_note(&s, &[Resources { gpus: Some(3), ..Default::default() }], &one);
    assert!(n.behind, "{n:?}");
}

#[test]
fn a_pod_that_never_ran_and_is_gone_is_created_again() {
    let job = admitted_job();
    let d = decide_with(&job, &site(), PodView::Gone, 6000);
    assert_eq!(d.steps, vec![Step::CreatePod]);
    assert_eq!(d.status.phase, Phase::Starting);
}

#[test]
fn a_clean_exit_after_nvflares_own_abort_is_an_abort() {
    let mut state = exited(0, "Completed", true);
    state.terminated.as_mut().unwrap().message = Some(format!("{}\nthe worker stopped cleanly", crate::status::ABORTED_OUTCOME));
    let d = observe(&started_job(), &mk_pod("Succeeded", state));
    let a = d.status.abort.clone().expect("status.abort");
    assert_eq!((d.status.phase, d.status.exit_code, a.method, a.cause.as_deref()), (Phase::Aborted, Some(0), Some(AbortMethod::Graceful), Some("NVFlare")));
    // Without the marker, exit 0 stays a success.
    let d = observe(&started_job(), &mk_pod("Succeeded", exited(0, "Completed", true)));
    assert_eq!(d.status.phase, Phase::Succeeded);
}

#[test]
fn a_worker_that_stopped_just_before_the_decided_delete_reached_it_is_graceful() {
    // The grace period ran out at 16 s and the delete was recorded; the worker had exited 0 at 15 s, so the API
    // server deleted an already ended pod (grace period 0).
    let (job, mut pod) = delete_decided_at_16s_worker_ended_at(15_000);
    pod.metadata.deletion_timestamp = Some(t(16_000));
    pod.metadata.deletion_grace_period_seconds = Some(0);
    let d = decide_with(&job, &site(), PodView::Present(&pod), 16_500);
    assert_eq!((d.status.phase, d.status.exit_code), (Phase::Aborted, Some(0)));
    assert_eq!(d.status.abort.as_ref().and_then(|a| a.method), Some(AbortMethod::Graceful));
    // Ended in the same second as the decision: no telling which came first, so the delete counts.
    ended_at(&mut pod, 16_000);
    let d = decide_with(&job, &site(), PodView::Present(&pod), 16_500);
    assert_eq!((d.status.exit_code, d.status.abort.as_ref().and_then(|a| a.method)), (Some(9), Some(AbortMethod::Deleted)));
}

#[test]
fn a_worker_that_stopped_while_the_decided_delete_kept_failing_is_graceful() {
    // The delete was decided at 16 s but the API server failed it; the worker ended by itself at 40 s.
    let (job, pod) = delete_decided_at_16s_worker_ended_at(40_000);
    let d = decide_with(&job, &site(), PodView::Present(&pod), 41_000);
    assert_eq!((d.status.exit_code, d.status.abort.as_ref().and_then(|a| a.method)), (Some(0), Some(AbortMethod::Graceful)));
}

/// A job that runs as it should, walked through every reconcile its life takes on a roomy site (one call per state
/// the caches show), counting what a user and the API server see: status writes (only where the status changed)
/// and Events. The figures the scale bench measures per job start here.
#[test]
fn a_successful_job_costs_three_status_writes_and_two_events() {
    let s = site();
    let mut job = mk_job("train", "site-a");
    job.metadata.creation_timestamp = Some(t(900));
    let writes = std::cell::Cell::new(0);
    let mut events = Vec::new();
    let mut step = |job: &mut FLJob, site: SiteView<'_>, secrets, pod: PodView<'_>, now| {
        let d = decide(Input { job, site, secrets, pod, now: t(now) });
        let old = job.status.clone().unwrap_or_default();
        if let Some(wait) = quiet_admission(job, &old, &d, &t(now)) {
            // The controller only adds its finalizer, the mark the site admits it on.
            assert!(wait <= Duration::from_millis(QUIET_ADMISSION_MS as u64));
            job.metadata.finalizers = Some(vec![crate::controller::FINALIZER.into()]);
            return d.steps;
        }
        if job.status.is_none() || old != d.status {
            writes.set(writes.get() + 1);
            events.extend(crate::events::transitions(&old, &d.status).into_iter().map(|n| n.reason));
        }
        job.status = Some(d.status);
        d.steps
    };
    let waiting = |site| SiteView::Found { site, allocation: None, queue_note: queue_note(site, &[], &Resources::default()) };
    // Checked: it fits and is next in line. Nothing is written but the finalizer; checked again, no Secret check.
    step(&mut job, waiting(&s), SecretsView::Ok, PodView::NotFound, 1000);
    assert!(checked_by_finalizer(&job) && !needs_secret_check(&job));
    step(&mut job, waiting(&s), SecretsView::Ok, PodView::NotFound, 1050);
    assert_eq!(writes.get(), 0);
    // The site admitted it: its first status says so, and the pod is created.
    let steps = step(&mut job, holding(&s), SecretsView::Ok, PodView::NotFound, 1100);
    assert_eq!(steps, vec![Step::CreatePod]);
    let st = job.status.clone().unwrap();
    assert!(is_true(&st.conditions, cond::RESOLVED) && is_true(&st.conditions, cond::ADMITTED), "{:?}", st.conditions);
    assert!(!checked_by_finalizer(&job), "written: the status speaks from now on");
    // Its pod, as the controller names it.
    let pod = |phase, state| {
        let mut p = mk_pod(phase, state); // with its tracking finalizer
        p.metadata.name = Some(crate::pod::pod_name(&job));
        p
    };
    // Scheduled and creating: nothing to write.
    let creating = pod("Pending", waiting_state());
    let run = pod("Running", running());
    let ended = pod("Succeeded", exited(0, "Completed", true));
    step(&mut job, holding(&s), SecretsView::NotChecked, PodView::Present(&creating), 1200);
    step(&mut job, holding(&s), SecretsView::NotChecked, PodView::Present(&run), 1300);
    let steps = step(&mut job, holding(&s), SecretsView::NotChecked, PodView::Present(&ended), 2300);
    assert_eq!(steps, vec![Step::ReleasePod], "once the end is written, the pod may go");
    let st = job.status.clone().unwrap();
    assert_eq!((st.phase, st.exit_code), (Phase::Succeeded, Some(0)));
    // A look before the cache shows the pod released asks again (the finalizer patch is idempotent). The site takes
    // the quota back; the job has nothing to say about that (it said Released with its outcome).
    let steps = step(&mut job, holding(&s), SecretsView::NotChecked, PodView::Present(&ended), 2400);
    assert_eq!(steps, vec![Step::ReleasePod]);
    let released = SiteView::Found { site: &s, allocation: None, queue_note: QueueNote::default() };
    let steps = step(&mut job, released, SecretsView::NotChecked, PodView::Present(&released_pod(ended.clone())), 2500);
    assert!(steps.is_empty(), "{steps:?}");
    let st = job.status.clone().unwrap();
    let admitted = find_condition(&st.conditions, cond::ADMITTED).unwrap();
    assert_eq!((admitted.status.as_str(), admitted.reason.as_str()), ("False", "Released"));
    assert!(st.allocation.is_some(), "what it was admitted with stays on record");
    assert_eq!(writes.get(), 3, "admitted, running, succeeded");
    assert_eq!(events, vec!["Admitted".to_string(), "Succeeded".to_string()]);
}

/// A new job the site does not admit within moments is written as Queued after all.
#[test]
fn a_new_job_not_admitted_soon_is_written_as_queued() {
    let s = site();
    let mut job = mk_job("train", "site-a");
    job.metadata.creation_timestamp = Some(t(1000));
    let input = |job, now| Input { job, site: SiteView::Found { site: &s, allocation: None, queue_note: queue_note(&s, &[], &Resources::default()) }, secrets: SecretsView::Ok, pod: PodView::NotFound, now: t(now) };
    let old = FLJobStatus::default();
    let d = decide(input(&job, 1500));
    assert_eq!(quiet_admission(&job, &old, &d, &t(1500)), Some(Duration::from_millis(1500)));
    drop(d);
    let mut job = job.clone();
    job.metadata.finalizers = Some(vec![crate::controller::FINALIZER.into()]);
    let d = decide(input(&job, 3100));
    assert_eq!(quiet_admission(&job, &old, &d, &t(3100)), None, "too long without a status");
    assert_eq!(d.status.phase, Phase::Queued);
    // A job first looked at long after its creation (a burst the operator is working through): the window counts
    // from its check, the finalizer the operator added then, dated by the operator's managedFields entry.
    let mut late = mk_job("late", "site-a");
    late.metadata.creation_timestamp = Some(t(1000));
    late.metadata.finalizers = None;
    let d = decide(input(&late, 30_000));
    assert_eq!(quiet_admission(&late, &old, &d, &t(30_000)), Some(Duration::from_millis(QUIET_ADMISSION_MS as u64)), "the reconcile that adds the finalizer");
    drop(d);
    let mut late = late.clone();
    late.metadata.finalizers = Some(vec![crate::controller::FINALIZER.into()]);
    let entry = |manager: &str, subresource: Option<&str>, at| k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry {
        manager: Some(manager.into()),
        operation: Some("Update".into()),
        subresource: subresource.map(Into::into),
        time: Some(t(at)),
        ..Default::default()
    };
    late.metadata.managed_fields = Some(vec![entry("kubectl-client-side-apply", None, 1000), entry(crate::api::MANAGER, None, 30_000), entry(crate::api::MANAGER, Some("status"), 31_900)]);
    assert_eq!(checked_at(&late), Some(t(30_000)), "the operator's own change of the object, not its status, not kubectl's");
    let d = decide(input(&late, 31_500));
    assert_eq!(quiet_admission(&late, &old, &d, &t(31_500)), Some(Duration::from_millis(500)));
    drop(d);
    let d = decide(input(&late, 32_100));
    assert_eq!(quiet_admission(&late, &old, &d, &t(32_100)), None, "2 s after the check");
    // A job whose check failed is always written (and the finalizer then never marks it).
    let mut job = mk_job("bad", "site-a");
    job.metadata.creation_timestamp = Some(t(1000));
    let d = decide(Input { secrets: SecretsView::Missing("Secret \"x\" not found".into()), ..input(&job, 1100) });
    assert_eq!(quiet_admission(&job, &old, &d, &t(1100)), None);
    assert_eq!(d.status.phase, Phase::Pending);
}

/// When the worker container of `pod` exited.
fn ended_at(pod: &mut WorkerPod, ms: i64) {
    let c = &mut pod.status.as_mut().unwrap().container_statuses.as_mut().unwrap()[0];
    c.state.as_mut().unwrap().terminated.as_mut().unwrap().finished_at = Some(t(ms));
}

/// A running job aborted at 6 s whose pod delete was decided at 16 s (the grace period), and its worker pod, which
/// exited 0 at `ended` ms.
fn delete_decided_at_16s_worker_ended_at(ended: i64) -> (FLJob, WorkerPod) {
    let mut job = started_job();
    aborting(&mut job, 6000);
    job.status.as_mut().unwrap().abort.as_mut().unwrap().pod_deleted_at = Some(t(16_000));
    let mut pod = mk_pod("Succeeded", exited(0, "Completed", true));
    ended_at(&mut pod, ended);
    (job, pod)
}

fn waiting_state() -> k8s_openapi::api::core::v1::ContainerState {
    waiting("ContainerCreating")
}

fn released_pod(mut p: WorkerPod) -> WorkerPod {
    p.metadata.finalizers = None;
    p
}
