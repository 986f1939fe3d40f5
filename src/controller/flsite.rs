//! The FLSite controller: the single writer of a site's quota ledger. It releases what finished or vanished jobs
//! hold and admits waiting jobs in creation order, in one status write guarded by the site's resourceVersion, so two
//! decisions can never over-admit, and a release can never happen twice.

use super::{Context, Trigger};
use crate::api::{FLJob, FLSite, FLSiteStatus, condition, set_condition};
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

/// Builds the FLSite controller on the shared caches.
pub fn controller(ctx: Arc<Context>, sites: Trigger<FLSite>, jobs: Trigger<FLJob>) -> impl std::future::Future<Output = ()> {
    let store = ctx.sites.clone();
    Controller::for_stream(sites.map(Ok), store)
        .watches_stream(jobs.map(Ok), |job: FLJob| {
            let ns = job.namespace().unwrap_or_default();
            Some(ObjectRef::<FLSite>::new(&job.spec.site).within(&ns))
        })
        // Many job changes in a burst become one ledger write.
        .with_config(Config::default().debounce(Duration::from_millis(50)))
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
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
