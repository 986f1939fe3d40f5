//! The FLSite controller: the single writer of a site's quota ledger. It releases what finished or vanished jobs
//! hold and admits waiting jobs in creation order, in one status write guarded by the site's resourceVersion, so two
//! decisions can never over-admit, and a release can never happen twice.

use super::{Context, Trigger};
use crate::api::{FLSite, FLSiteStatus, condition, set_condition};
use crate::metrics::{QueueLabels, SiteLabels};
use crate::quota;
use crate::{Error, Result, kube_err};
use futures::StreamExt;
use kube::api::PostParams;
use kube::runtime::controller::{Action, Config, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, instrument, warn};

/// How long job changes are gathered before their site's ledger is looked at: many job changes in a burst become
/// one ledger write.
pub const LEDGER_PACE: Duration = Duration::from_millis(50);

/// Builds the FLSite controller on the shared caches.
/// `jobs` are the sites of the jobs that changed, one per change.
pub fn controller(ctx: Arc<Context>, sites: Trigger<FLSite>, jobs: Trigger<ObjectRef<FLSite>>) -> impl std::future::Future<Output = ()> {
    let store = ctx.sites.clone();
    Controller::for_stream(sites.map(Ok), store)
        .reconcile_on(paced_sites(jobs, LEDGER_PACE))
        .with_config(Config::default())
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
}

/// The sites of changed jobs (`jobs`, one per change), each at most once per `pace` and never later than `pace` after
/// the first change it gathers. The controller's own debounce (which this replaces) restarts its wait at every new request: in a
/// burst, job changes come faster than any quiet period, and the ledger waited for a lull while the jobs it should
/// admit waited for it (issue 12: half the jobs of a 10,000-job burst were written as Queued for that wait). A
/// change that comes while the site's reconcile runs is kept by the controller and runs once after it.
pub fn paced_sites(jobs: impl futures::Stream<Item = ObjectRef<FLSite>> + Send + 'static, pace: Duration) -> impl futures::Stream<Item = ObjectRef<FLSite>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut jobs = std::pin::pin!(jobs);
        let mut touched = std::collections::HashSet::new();
        while let Some(site) = jobs.next().await {
            touched.insert(site);
            let until = tokio::time::Instant::now() + pace;
            let mut open = true;
            while open {
                tokio::select! {
                    next = jobs.next() => match next {
                        Some(site) => { touched.insert(site); }
                        None => open = false,
                    },
                    _ = tokio::time::sleep_until(until) => break,
                }
            }
            for site in touched.drain() {
                if tx.send(site).is_err() {
                    return;
                }
            }
            if !open {
                return;
            }
        }
    });
    tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
}

/// Reconciles one site's ledger.
#[instrument(skip(site, ctx), fields(site = %site.name_any(), namespace = site.namespace().unwrap_or_default()))]
pub async fn reconcile(site: Arc<FLSite>, ctx: Arc<Context>) -> Result<Action> {
    let key = format!("{}/{}", site.namespace().unwrap_or_default(), site.name_any());
    ctx.measured("flsite", &key, reconcile_inner(&site, &ctx)).await
}

async fn reconcile_inner(site: &FLSite, ctx: &Context) -> Result<Action> {
    let ns = site.namespace().unwrap_or_default();
    let name = site.name_any();
    let now = crate::api::now();
    let views = ctx.job_views(&ns, site);
    let old = site.status.clone().unwrap_or_default();
    let plan = quota::plan(&site.spec.capacity, &old.allocations, &views, &now);
    let mut new = FLSiteStatus {
        used: quota::usage(&plan.allocations),
        allocations: plan.allocations.clone(),
        queued: plan.queued,
        observed_generation: site.metadata.generation,
        conditions: old.conditions.clone(),
    };
    let ready = condition("Ready", true, "Ready", "the site admits jobs against its capacity", site.metadata.generation, &now);
    set_condition(&mut new.conditions, ready);
    export(ctx, &ns, &name, site, &new);
    if new == old && site.status.is_some() {
        return Ok(Action::await_change());
    }
    let api: Api<FLSite> = Api::namespaced(ctx.client.clone(), &ns);
    let mut updated = site.clone();
    updated.status = Some(new);
    match api.replace_status(&name, &PostParams::default(), &updated).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => return Err(Error::Conflict(format!("FLSite {name}"))),
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(Action::await_change()),
        Err(e) => return Err(kube_err("write flsite status")(e)),
    }
    if !plan.restored.is_empty() {
        warn!(restored = ?plan.restored, "the ledger had lost running jobs; put them back from their own status");
    }
    if !plan.admitted.is_empty() || !plan.released.is_empty() {
        info!(admitted = ?plan.admitted, released = ?plan.released, queued = plan.queued, "ledger updated");
    }
    Ok(Action::await_change())
}

fn export(ctx: &Context, ns: &str, name: &str, site: &FLSite, st: &FLSiteStatus) {
    let m = &ctx.metrics;
    let label = |r: &str| SiteLabels { namespace: ns.into(), site: name.into(), resource: r.into() };
    let total = quota::total(&st.allocations);
    m.quota_used.get_or_create(&label("jobs")).set(total.jobs as f64);
    m.quota_used.get_or_create(&label("gpus")).set(total.gpus as f64);
    m.quota_used.get_or_create(&label("cpu")).set(total.cpu_milli as f64 / 1000.0);
    m.quota_used.get_or_create(&label("memory")).set(total.memory_milli as f64 / 1000.0);
    let cap = &site.spec.capacity;
    let set_cap = |r: &str, v: Option<f64>| match v {
        Some(v) => {
            m.quota_capacity.get_or_create(&label(r)).set(v);
        }
        None => {
            m.quota_capacity.remove(&label(r));
        }
    };
    set_cap("jobs", cap.jobs.map(f64::from));
    set_cap("gpus", cap.gpus.map(f64::from));
    set_cap("cpu", cap.cpu.as_ref().and_then(quota::milli).map(|v| v as f64 / 1000.0));
    set_cap("memory", cap.memory.as_ref().and_then(quota::milli).map(|v| v as f64 / 1000.0));
    m.queued.get_or_create(&QueueLabels { namespace: ns.into(), site: name.into() }).set(st.queued as i64);
}

/// Retries: a conflict at once, anything else after a pause.
pub fn error_policy(site: Arc<FLSite>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.retry("flsite", &format!("{}/{}", site.namespace().unwrap_or_default(), site.name_any()), error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::mk_job;
    use futures::StreamExt;

    fn site_of(j: &crate::api::FLJob) -> ObjectRef<FLSite> {
        ObjectRef::new(&j.spec.site).within(&j.namespace().unwrap_or_default())
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_stream_of_job_changes_never_holds_the_ledger_back() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut sites = std::pin::pin!(paced_sites(tokio_stream::wrappers::UnboundedReceiverStream::new(rx), LEDGER_PACE));
        let start = tokio::time::Instant::now();
        let feeder = tokio::spawn(async move {
            // a change every 10 ms for 1 s, alternating two jobs of site-a and one of site-b: never a 50 ms lull
            for i in 0..100 {
                let job = match i % 3 { 0 => mk_job("a1", "site-a"), 1 => mk_job("a2", "site-a"), _ => mk_job("b1", "site-b") };
                tx.send(site_of(&job)).unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await; // then quiet, and the end of the stream
        });
        let mut seen = Vec::new();
        while let Some(site) = sites.next().await {
            seen.push((start.elapsed(), site.name));
        }
        feeder.await.unwrap();
        let of = |name: &str| seen.iter().filter(|(_, n)| n == name).map(|(t, _)| *t).collect::<Vec<_>>();
        for name in ["site-a", "site-b"] {
            let at = of(name);
            assert!(at[0] <= LEDGER_PACE + Duration::from_millis(10), "{name}: the first change is looked at within the pace: {at:?}");
            assert!(at.windows(2).all(|w| w[1] - w[0] >= LEDGER_PACE), "{name}: at most once per pace: {at:?}");
            assert!(at.windows(2).all(|w| w[1] - w[0] <= LEDGER_PACE + Duration::from_millis(20)), "{name}: never held back: {at:?}");
            assert!(at.len() >= 15, "{name}: a look every 50-60 ms through 1 s of changes: {at:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_change_is_looked_at_once_after_the_pace() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut sites = std::pin::pin!(paced_sites(tokio_stream::wrappers::UnboundedReceiverStream::new(rx), LEDGER_PACE));
        let start = tokio::time::Instant::now();
        tx.send(site_of(&mk_job("a1", "site-a"))).unwrap();
        tx.send(site_of(&mk_job("a2", "site-a"))).unwrap();
        let first = sites.next().await.expect("the site");
        assert_eq!((first.name.as_str(), first.namespace.as_deref()), ("site-a", Some("ns")));
        assert_eq!(start.elapsed(), LEDGER_PACE);
        drop(tx);
        assert!(sites.next().await.is_none(), "two changes, one look");
    }
}
