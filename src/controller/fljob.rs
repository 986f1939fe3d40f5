//! The FLJob controller: fetch (caches, plus a Secret check before admission) -> decide (`lifecycle::decide`, pure)
//! -> apply (pod steps and one status write, only when it changed) -> publish Events for the transitions.

use super::{Context, FINALIZER, SiteChange, Trigger, allocation_resources};
use crate::api::{FLJob, FLJobStatus, FLSite, MANAGER, millis, now};
use crate::events::{Note, transitions};
use crate::lifecycle::{self, Decision, Input, PodView, SecretsView, SiteView, Step, decide};
use crate::metrics::AbortLabels;
use crate::pod::{self, CREDENTIAL_ENV};
use crate::worker_pod::WorkerPod;
use crate::{Error, Result, kube_err};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::{Action, Config, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use std::sync::Arc;
use tracing::{info, instrument, warn};

/// Builds the FLJob controller on the shared caches.
pub fn controller(
    ctx: Arc<Context>,
    jobs: Trigger<FLJob>,
    sites: Trigger<FLSite>,
    pods: Trigger<WorkerPod>,
    concurrency: u16,
) -> impl std::future::Future<Output = ()> {
    let job_store = ctx.jobs.clone();
    let mapper_ctx = ctx.clone();
    // The operator is the only writer of an FLJob's status, and every decision that must be taken again later asks
    // for it (a requeue) or waits for something that has its own event (the pod, the site, the finalizer). So a change
    // of the status alone, its own write, brings the job back for nothing: only what people and NVFlare change (the
    // spec, annotations, labels, finalizers, deletion) does. That was a third of a burst's reconciles (issue 12).
    let jobs = jobs.map(Ok::<_, kube::runtime::watcher::Error>).predicate_filter(not_status, Default::default());
    Controller::for_stream(jobs, job_store)
        .owns_stream(pods.map(Ok))
        .watches_stream(sites.map(Ok), move |site: FLSite| {
            // Only the site's live jobs can be concerned (`SiteChange::affects` is false for a finished job not
            // being deleted): looked up by site, not found by walking every cached job.
            let change = SiteChange::new(&site);
            mapper_ctx
                .site_jobs
                .jobs(&site.namespace().unwrap_or_default(), &site.name_any())
                .into_iter()
                .filter(|j| change.affects(j))
                .map(|j| ObjectRef::from_obj(&*j))
                .collect::<Vec<_>>()
        })
        .with_config(Config::default().concurrency(concurrency))
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
}


/// The hash of everything of an FLJob but its status (generation stands for the spec).
fn not_status(job: &FLJob) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let m = &job.metadata;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (m.uid.as_deref(), m.generation, m.deletion_timestamp.as_ref().map(|t| t.0.as_millisecond())).hash(&mut h);
    (&m.finalizers, &m.annotations, &m.labels).hash(&mut h);
    Some(h.finish())
}

/// Reconciles one FLJob.
#[instrument(skip(job, ctx), fields(fljob = %job.name_any(), namespace = job.namespace().unwrap_or_default(), site = %job.spec.site))]
pub async fn reconcile(job: Arc<FLJob>, ctx: Arc<Context>) -> Result<Action> {
    let key = format!("{}/{}", job.namespace().unwrap_or_default(), job.name_any());
    let result = ctx.measured("fljob", &key, reconcile_inner(&job, &ctx)).await;
    if let Err(e) = &result
        && !matches!(e, Error::Conflict(_))
    {
        report_unresolved(&ctx, &job, e).await;
    }
    result
}

/// A job the operator cannot get past its first checks (say, the Secret GET is forbidden) must not stay
/// undecided: admission keeps room for undecided jobs created earlier, so it would hold its share of the site. Record
/// why it cannot proceed (Resolved=False, an Event), which lets later jobs go ahead; it is retried with backoff, and
/// the first reconcile that gets through resolves it.
async fn report_unresolved(ctx: &Context, job: &FLJob, error: &Error) {
    let old = job.status.clone().unwrap_or_default();
    if old.phase.is_finished() || crate::api::find_condition(&old.conditions, lifecycle::cond::RESOLVED).is_some() {
        return;
    }
    let mut st = old.clone();
    let msg = format!("the operator cannot check this job yet: {error}; it retries with a growing delay");
    let c = crate::api::condition(lifecycle::cond::RESOLVED, false, "ReconcileError", msg.clone(), job.metadata.generation, &now());
    crate::api::set_condition(&mut st.conditions, c);
    if st.client_status.is_none() {
        st.client_status = Some(crate::status::client_status::NOT_STARTED.into());
    }
    let jobs: Api<FLJob> = Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    if let Err(e) = write_status(ctx, &jobs, job, &old, &st).await {
        warn!(error = %e, "could not record the reconcile error in the status");
        return;
    }
    publish(ctx, job, &Note { warning: true, reason: "ReconcileError".into(), message: msg }).await;
}

async fn reconcile_inner(job: &FLJob, ctx: &Context) -> Result<Action> {
    let ns = job.namespace().unwrap_or_default();
    let has_finalizer = job.finalizers().iter().any(|f| f == FINALIZER);
    if job.metadata.deletion_timestamp.is_some() && !has_finalizer {
        return Ok(Action::await_change());
    }
    // A job without the finalizer is checked first and gets it after (`lifecycle::checked_by_finalizer`).

    let site = ctx.site_of(job);
    let site_view = match &site {
        None => SiteView::Missing,
        Some(site) => {
            let uid = job.uid().unwrap_or_default();
            let allocations = site.status.as_ref().map(|s| s.allocations.as_slice()).unwrap_or_default();
            let allocation = allocations.iter().find(|a| a.uid == uid).map(allocation_resources);
            // The note walks every job of the site: only a job that may still queue needs it (not one that holds
            // quota, has finished, or is being aborted or deleted), else the cost per reconcile grows with the site.
            let may_queue = allocation.is_none()
                && !job.status.as_ref().is_some_and(|s| s.phase.is_finished() || s.abort.is_some())
                && !job.spec.abort
                && job.metadata.deletion_timestamp.is_none();
            let queue_note = if may_queue { queue_note(ctx, &ns, site, job) } else { Default::default() };
            SiteView::Found { site, allocation, queue_note }
        }
    };
    let pods: Api<WorkerPod> = Api::namespaced(ctx.client.clone(), &ns);
    let pod_name = pod::pod_name(job);
    let cached = ctx.pods.get(&ObjectRef::new(&pod_name).within(&ns));
    let recorded = job.status.as_ref().and_then(|s| s.pod_name.clone());
    let finished = job.status.as_ref().is_some_and(|s| s.phase.is_finished());
    if cached.is_none() && recorded.is_some() && !finished && just_admitted(job) {
        // The pod was created a moment ago and its watch event is on its way: that event brings this job back, and
        // a GET now would mostly find what the cache is about to show. Look again shortly; asking the API server is
        // for a pod still missing after that (a lost create, a restart between the status write and the create).
        return Ok(Action::requeue(std::time::Duration::from_secs(1)));
    }
    let fetched: Option<WorkerPod> = match (&cached, &recorded) {
        // The cache may lag a pod we just created; only the API server can say it is gone. A finished job needs
        // no answer: its pod is never looked at again unless it is still there.
        (None, Some(name)) if !finished => pods.get_opt(name).await.map_err(kube_err("get pod"))?,
        _ => None,
    };
    let pod_view = match (&cached, &fetched, &recorded) {
        (Some(p), _, _) => PodView::Present(p),
        (None, Some(p), _) => PodView::Present(p),
        (None, None, Some(_)) => PodView::Gone,
        (None, None, None) => PodView::NotFound,
    };
    let secrets = match &site {
        Some(site) if lifecycle::needs_secret_check(job) => check_secrets(ctx, &ns, job, site).await?,
        Some(_) if lifecycle::checked_by_finalizer(job) => SecretsView::Ok,
        _ => SecretsView::NotChecked,
    };
    let decision = decide(Input { job, site: site_view, secrets, pod: pod_view, now: now() });
    apply(ctx, job, site.as_deref(), &pod_name, decision).await
}

/// How long after its admission a job trusts that its missing pod is only not in the cache yet.
const POD_CACHE_LAG: i64 = 3_000;

/// Admitted (and its pod created) less than `POD_CACHE_LAG` ago, with no abort or deletion to act on.
fn just_admitted(job: &FLJob) -> bool {
    let Some(st) = job.status.as_ref() else { return false };
    let admitted = crate::api::find_condition(&st.conditions, lifecycle::cond::ADMITTED).filter(|c| c.status == "True");
    st.phase == crate::api::Phase::Starting
        && st.abort.is_none()
        && !job.spec.abort
        && job.metadata.deletion_timestamp.is_none()
        && admitted.is_some_and(|c| millis(&now()) - millis(&c.last_transition_time) < POD_CACHE_LAG)
}

fn queue_note(ctx: &Context, ns: &str, site: &FLSite, job: &FLJob) -> lifecycle::QueueNote {
    let ahead = ctx.queue_index(ns, site).ahead_of(job);
    lifecycle::queue_note_after(site, &ahead, &pod::effective_resources(job, site))
}

/// Checks that the Secrets the pod will read exist and have their keys. Only key names are looked at.
async fn check_secrets(ctx: &Context, ns: &str, job: &FLJob, site: &FLSite) -> Result<SecretsView> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let creds = pod::credentials_secret(job, site);
    let creds_field = if job.spec.credentials_secret.is_some() {
        "spec.credentialsSecret of this FLJob".to_string()
    } else {
        format!("spec.credentialsSecret of FLSite {}", site.name_any())
    };
    let mut wanted: Vec<(String, String, Vec<&str>)> =
        vec![(site.spec.startup_kit_secret.clone(), format!("spec.startupKitSecret of FLSite {}", site.name_any()), vec![])];
    if let Some(c) = creds.filter(|_| !pod::uses_per_job_secret(job)) {
        wanted.push((c, creds_field, CREDENTIAL_ENV.iter().map(|(k, _)| *k).collect()));
    }
    for (name, field, keys) in wanted {
        let present = match ctx.secret_keys.get(ns, &name) {
            Some(k) => Some(k),
            None => {
                let got = api.get_opt(&name).await.map_err(kube_err("get secret"))?;
                let k = got.map(|s| s.data.unwrap_or_default().into_keys().collect::<Vec<_>>());
                ctx.secret_keys.put(ns, &name, k.clone());
                k
            }
        };
        match present {
            None => {
                return Ok(SecretsView::Missing(format!("Secret {name:?} ({field}) not found in namespace {ns}")));
            }
            Some(data) => {
                let missing: Vec<&str> = keys.into_iter().filter(|k| !data.iter().any(|d| d == k)).collect();
                if !missing.is_empty() {
                    return Ok(SecretsView::Missing(format!(
                        "Secret {name:?} ({field}) lacks key(s) {}; it needs token, signature and ssid",
                        missing.join(", ")
                    )));
                }
            }
        }
    }
    Ok(SecretsView::Ok)
}

async fn add_finalizer(api: &Api<FLJob>, job: &FLJob) -> Result<()> {
    let patch = if job.metadata.finalizers.is_none() {
        serde_json::json!([{"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}])
    } else {
        serde_json::json!([
            {"op": "test", "path": "/metadata/finalizers", "value": job.finalizers()},
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER}
        ])
    };
    let patch: json_patch::Patch = serde_json::from_value(patch).map_err(|e| Error::Serialize("finalizer patch", e))?;
    // As the operator's field manager: its managedFields entry then dates the check (`lifecycle::checked_at`).
    let params = PatchParams { field_manager: Some(MANAGER.into()), ..Default::default() };
    api.patch(&job.name_any(), &params, &Patch::<()>::Json(patch))
        .await
        .map_err(kube_err("add finalizer"))?;
    Ok(())
}

/// Removes `finalizer` from `obj` (a JSON patch that tests the index first, so a concurrent change of the list is
/// refused rather than removing someone else's entry). Gone already counts as done.
pub(crate) async fn remove_finalizer<K>(api: &Api<K>, obj: &K, finalizer: &str) -> Result<()>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let Some(i) = obj.finalizers().iter().position(|f| f == finalizer) else { return Ok(()) };
    let patch = serde_json::json!([
        {"op": "test", "path": format!("/metadata/finalizers/{i}"), "value": finalizer},
        {"op": "remove", "path": format!("/metadata/finalizers/{i}")}
    ]);
    let patch: json_patch::Patch = serde_json::from_value(patch).map_err(|e| Error::Serialize("finalizer patch", e))?;
    match api.patch(&obj.name_any(), &PatchParams::default(), &Patch::<()>::Json(patch)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 422 => Err(Error::Conflict(format!("finalizers of {}", obj.name_any()))),
        Err(e) => Err(kube_err("remove finalizer")(e)),
    }
}

fn ok_if(codes: &[u16]) -> impl Fn(kube::Error) -> std::result::Result<(), kube::Error> + '_ {
    move |e| match e {
        kube::Error::Api(s) if codes.contains(&s.code) => Ok(()),
        e => Err(e),
    }
}

async fn apply(ctx: &Context, job: &FLJob, site: Option<&FLSite>, pod_name: &str, mut d: Decision) -> Result<Action> {
    let ns = job.namespace().unwrap_or_default();
    let jobs: Api<FLJob> = Api::namespaced(ctx.client.clone(), &ns);
    let pods: Api<WorkerPod> = Api::namespaced(ctx.client.clone(), &ns);
    let old = job.status.clone().unwrap_or_default();
    let has_finalizer = job.finalizers().iter().any(|f| f == FINALIZER);
    // A new job that checked out and fits its site: its finalizer is the mark the site admits it on, and the
    // admission writes its first status (issue 12: one status write less per job). Checked again shortly, when it
    // is written as Queued if the site has not admitted it by then.
    if let Some(wait) = lifecycle::quiet_admission(job, &old, &d, &now()) {
        if !has_finalizer {
            add_finalizer(&jobs, job).await?;
        }
        return Ok(Action::requeue(wait));
    }
    if !has_finalizer && job.metadata.deletion_timestamp.is_none() {
        // Whatever the checks found is written first, so that the finalizer never marks a job whose checks failed.
        write_status(ctx, &jobs, job, &old, &d.status).await?;
        add_finalizer(&jobs, job).await?;
        return Ok(Action::await_change()); // the patch brings the job back with its finalizer
    }
    // Record the decision first, then act: every step is idempotent and is derived again from the recorded status
    // if it fails, while acting first could destroy the evidence a failed status write needed (a pod deleted
    // because its job failed would later look like a pod lost to someone else).
    let written = write_status(ctx, &jobs, job, &old, &d.status).await?;
    // A second write in this reconcile (a refused pod) goes on top of the first: the job as just written.
    let mut current = job.clone();
    if let Some(rv) = written {
        current.metadata.resource_version = Some(rv);
        current.status = Some(d.status.clone());
    }
    let job = &current;
    for step in std::mem::take(&mut d.steps) {
        match step {
            Step::CreatePod => {
                let Some(site) = site else { continue };
                if old == d.status && job.status.is_some() {
                    // No status write went first, so nothing proved this decision was made on the job as it is now
                    // (a stale cache could still show a job whose pod already ran and went). Ask the API server.
                    ensure_current(&jobs, job).await?;
                }
                match create_pod(ctx, job, site).await? {
                    Created::Yes => {}
                    Created::Refused(rejection) => {
                        // The API server refused the pod for good (Pod Security, an invalid field, a LimitRange, a
                        // webhook's denial): the user must fix the spec.
                        let mut failed = d.status.clone();
                        fail_rejected(&mut failed, &rejection);
                        let base = d.status.clone();
                        write_status(ctx, &jobs, job, &base, &failed).await?;
                        // Nothing else brings back a job without a pod: its TTL is asked for now.
                        let ttl = job.spec.ttl_seconds_after_finished.map(|s| std::time::Duration::from_secs(s.max(0) as u64));
                        return Ok(ttl.map(Action::requeue).unwrap_or_else(Action::await_change));
                    }
                    Created::NotYet(why, source) => {
                        // Refused for now (the namespace's ResourceQuota is used up, a webhook cannot be reached, the
                        // API server is overloaded): say so, and try again with a growing delay.
                        let mut waiting = d.status.clone();
                        let msg = format!("the API server refused the worker pod for now: {why}; retrying with a growing delay");
                        let c = crate::api::condition(lifecycle::cond::STARTED, false, "PodRefused", msg.clone(), waiting.observed_generation, &now());
                        if crate::api::set_condition(&mut waiting.conditions, c) {
                            let base = d.status.clone();
                            write_status(ctx, &jobs, job, &base, &waiting).await?;
                            publish(ctx, job, &Note { warning: true, reason: "PodRefused".into(), message: msg }).await;
                        }
                        return Err(Error::Kube { step: "create pod", source });
                    }
                }
            }
            Step::AnnotatePod { key, value } => {
                let patch = serde_json::json!({"metadata": {"annotations": {key: value}}});
                pods.patch(pod_name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|_| ())
                    .or_else(ok_if(&[404]))
                    .map_err(kube_err("annotate pod"))?;
            }
            Step::DeletePod => {
                pods.delete(pod_name, &DeleteParams::default()).await.map(|_| ()).or_else(ok_if(&[404])).map_err(kube_err("delete pod"))?;
            }
            Step::ForceDeletePod => {
                let dp = DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() };
                pods.delete(pod_name, &dp).await.map(|_| ()).or_else(ok_if(&[404])).map_err(kube_err("force-delete pod"))?;
            }
            Step::DeleteJob => {
                jobs.delete(&job.name_any(), &DeleteParams::background())
                    .await
                    .map(|_| ())
                    .or_else(ok_if(&[404]))
                    .map_err(kube_err("delete fljob"))?;
                publish(ctx, job, &Note { warning: false, reason: "Expired".into(), message: "ttlSecondsAfterFinished passed; deleting the FLJob".into() }).await;
            }
            Step::RemoveFinalizer => remove_finalizer(&jobs, job, FINALIZER).await?,
            Step::ReleasePod => {
                if let Some(p) = ctx.pods.get(&ObjectRef::new(pod_name).within(&ns)) {
                    remove_finalizer(&pods, &*p, pod::TRACKING_FINALIZER).await?;
                }
            }
        }
    }
    Ok(d.requeue.map(Action::requeue).unwrap_or_else(Action::await_change))
}

/// Fails with a conflict unless the cached job is the API server's current one (one GET, only on the rare paths
/// that create a pod without writing the status first: a retried create, a restart between the write and the create).
async fn ensure_current(api: &Api<FLJob>, job: &FLJob) -> Result<()> {
    let fresh = api.get_opt(&job.name_any()).await.map_err(kube_err("get fljob"))?;
    match fresh {
        Some(f) if f.resource_version() == job.resource_version() => Ok(()),
        _ => Err(Error::Conflict(format!("FLJob {} changed since it was cached", job.name_any()))),
    }
}

fn fail_rejected(st: &mut FLJobStatus, message: &str) {
    st.phase = crate::api::Phase::Failed;
    st.client_status = Some(crate::status::client_status::EXCEPTION.into());
    st.exit_code = Some(crate::status::code::CONFIG_ERROR);
    st.reason = Some("ConfigError".into());
    let msg = format!("the API server rejected the worker pod: {message}; fix spec.podTemplate or the site's settings");
    st.message = Some(msg.clone());
    st.completion_time = Some(now());
    let c = crate::api::condition(lifecycle::cond::FINISHED, true, "ConfigError", msg, st.observed_generation, &now());
    crate::api::set_condition(&mut st.conditions, c);
}

/// What became of a pod creation.
enum Created {
    /// The pod exists (made now, or already).
    Yes,
    /// Refused for good, with the API server's message.
    Refused(String),
    /// Refused for now, with the API server's message.
    NotYet(String, kube::Error),
}

/// Whether a refusal of the pod may pass by itself: a used-up ResourceQuota, throttling, a webhook that could not
/// be called, a server error. Anything else (invalid, forbidden by policy, denied by a webhook) is permanent.
fn transient_refusal(s: &kube::core::Status) -> bool {
    let m = s.message.to_ascii_lowercase();
    (s.code == 403 && m.contains("exceeded quota"))
        || s.code == 429
        || s.code >= 500
        || m.contains("failed calling webhook")
}

/// Creates the pod.
async fn create_pod(ctx: &Context, job: &FLJob, site: &FLSite) -> Result<Created> {
    let ns = job.namespace().unwrap_or_default();
    let built = match pod::build_pod(job, site) {
        Ok(p) => p,
        Err(e) => return Ok(Created::Refused(e.to_string())),
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    match pods.create(&PostParams::default(), &built).await {
        Ok(_) => {
            info!(pod = %built.name_any(), "created worker pod");
            Ok(Created::Yes)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(Created::Yes),
        Err(kube::Error::Api(s)) if transient_refusal(&s) => Ok(Created::NotYet(s.message.clone(), kube::Error::Api(s))),
        Err(kube::Error::Api(s)) if matches!(s.code, 400 | 403 | 422) => Ok(Created::Refused(s.message.clone())),
        Err(e) => Err(kube_err("create pod")(e)),
    }
}

/// Writes the status with server-side apply, only when it changed. The resourceVersion makes it a precondition:
/// a decision made on a stale cache is refused (409) and made again on fresh data.
/// Returns the new resourceVersion when it wrote.
async fn write_status(ctx: &Context, api: &Api<FLJob>, job: &FLJob, old: &FLJobStatus, new: &FLJobStatus) -> Result<Option<String>> {
    if old == new && job.status.is_some() {
        return Ok(None);
    }
    let patch = serde_json::json!({
        "apiVersion": FLJob::api_version(&()),
        "kind": FLJob::kind(&()),
        "metadata": {"resourceVersion": job.resource_version()},
        "status": new,
    });
    let rv = match api.patch_status(&job.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await {
        Ok(written) => {
            let from = job.status.as_ref().map_or("None".to_string(), |s| format!("{:?}", s.phase));
            let labels = crate::metrics::StatusWriteLabels { from, to: format!("{:?}", new.phase) };
            ctx.metrics.status_writes.get_or_create(&labels).inc();
            written.resource_version()
        }
        Err(kube::Error::Api(s)) if s.code == 409 => return Err(Error::Conflict(format!("FLJob {}", job.name_any()))),
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(None),
        Err(e) => return Err(kube_err("write fljob status")(e)),
    };
    let notes = transitions(old, new);
    if !notes.is_empty() {
        // Off the reconcile's path: the status is the record, an Event is news about it. A reconcile that waited for
        // its Event POSTs would hold a worker slot for them (issue 12: that wait was most of a burst's makespan).
        let (recorder, reference, metrics) = (ctx.recorder(), job.object_ref(&()), ctx.metrics.clone());
        tokio::spawn(async move {
            for note in notes {
                send(&recorder, &metrics, &reference, &note).await;
            }
        });
    }
    if let (Some(a), None) = (new.abort.as_ref(), old.abort.as_ref().and_then(|a| a.completed_at.as_ref()))
        && let (Some(done), Some(method)) = (&a.completed_at, a.method) {
            let secs = (millis(done) - millis(&a.requested_at)).max(0) as f64 / 1000.0;
            ctx.metrics.abort_duration.get_or_create(&AbortLabels { method: format!("{method:?}") }).observe(secs);
        }
    Ok(rv)
}

async fn publish(ctx: &Context, job: &FLJob, note: &Note) {
    send(&ctx.recorder(), &ctx.metrics, &job.object_ref(&()), note).await;
}

async fn send(
    recorder: &kube::runtime::events::Recorder,
    metrics: &crate::metrics::Metrics,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    note: &Note,
) {
    metrics.events.get_or_create(&crate::metrics::EventLabels { reason: note.reason.clone() }).inc();
    let ev = Event {
        type_: if note.warning { EventType::Warning } else { EventType::Normal },
        reason: note.reason.clone(),
        note: Some(note.message.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&ev, reference).await {
        warn!(error = %e, reason = %note.reason, "could not publish event");
    }
}

/// Retries: a conflict at once (fresh data is already on its way), anything else with a growing delay.
pub fn error_policy(job: Arc<FLJob>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.retry("fljob", &format!("{}/{}", job.namespace().unwrap_or_default(), job.name_any()), error)
}
