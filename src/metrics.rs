//! Prometheus metrics (prometheus-client): reconciles, errors, API requests, jobs by phase, quota, aborts.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicI64;

/// Labels naming a controller.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// fljob or flsite.
    pub controller: String,
}

/// Labels of a failed reconcile.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// fljob or flsite.
    pub controller: String,
    /// `Error::metric_label`.
    pub error: String,
}

/// Labels of an API request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// get, list, watch, create, update, patch, delete.
    pub verb: String,
    /// Resource, with subresource (`fljobs/status`).
    pub resource: String,
}

/// Labels of a job count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// Namespace.
    pub namespace: String,
    /// Phase.
    pub phase: String,
}

/// Labels of a site's quota figure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteLabels {
    /// Namespace.
    pub namespace: String,
    /// FLSite.
    pub site: String,
    /// jobs, gpus, cpu (cores) or memory (bytes).
    pub resource: String,
}

/// Labels of a queue length.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    /// Namespace.
    pub namespace: String,
    /// FLSite.
    pub site: String,
}

/// Labels of an abort.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AbortLabels {
    /// Graceful, Deleted or Forced.
    pub method: String,
}

/// Labels of an FLJob status write: the phase it moved from and to (equal when only conditions or times changed).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusWriteLabels {
    /// The phase before (`None` for a job's first status).
    pub from: String,
    /// The phase written.
    pub to: String,
}

/// Labels of an Event sent.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// The Event's reason (Admitted, Succeeded, Queued, a failure's reason, ...).
    pub reason: String,
}

/// Every metric the operator exports.
pub struct Metrics {
    /// Reconciles run.
    pub reconciles: Family<ControllerLabels, Counter>,
    /// Reconciles failed, by error.
    pub errors: Family<ErrorLabels, Counter>,
    /// Reconcile duration.
    pub duration: Family<ControllerLabels, Histogram>,
    /// Requests to the API server.
    pub api_requests: Family<RequestLabels, Counter>,
    /// FLJobs by phase.
    pub jobs: Family<PhaseLabels, Gauge>,
    /// Quota in use per site.
    pub quota_used: Family<SiteLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Quota capacity per site (absent = unlimited).
    pub quota_capacity: Family<SiteLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Jobs waiting for quota per site.
    pub queued: Family<QueueLabels, Gauge>,
    /// Time from abort request to completion.
    pub abort_duration: Family<AbortLabels, Histogram>,
    /// FLJob status writes, by phase transition: where the writes per job go.
    pub status_writes: Family<StatusWriteLabels, Counter>,
    /// Events sent, by reason.
    pub events: Family<EventLabels, Counter>,
    /// 1 while this replica leads.
    pub leader: Gauge<i64, AtomicI64>,
}

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn abort_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.25, 2.0, 12))
}

impl Metrics {
    /// Creates the metrics and registers them.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            reconciles: Family::default(),
            errors: Family::default(),
            duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            api_requests: Family::default(),
            jobs: Family::default(),
            quota_used: Family::default(),
            quota_capacity: Family::default(),
            queued: Family::default(),
            abort_duration: Family::new_with_constructor(abort_histogram as fn() -> Histogram),
            status_writes: Family::default(),
            events: Family::default(),
            leader: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("fljob");
        r.register("reconciles", "Reconciles run", m.reconciles.clone());
        r.register("reconcile_errors", "Reconciles that failed, by error", m.errors.clone());
        r.register("reconcile_duration_seconds", "Reconcile duration", m.duration.clone());
        r.register("api_requests", "Requests made to the Kubernetes API server", m.api_requests.clone());
        r.register("jobs", "FLJobs by phase", m.jobs.clone());
        r.register("site_quota_used", "Quota held by admitted jobs (cpu in cores, memory in bytes)", m.quota_used.clone());
        r.register("site_quota_capacity", "Quota capacity of a site (absent when unlimited)", m.quota_capacity.clone());
        r.register("site_queued_jobs", "Jobs waiting for quota", m.queued.clone());
        r.register("abort_duration_seconds", "Time from an abort's request to its completion, by method", m.abort_duration.clone());
        r.register("status_writes", "FLJob status writes, by the phase they moved from and to", m.status_writes.clone());
        r.register("events", "Events sent (or attempted), by reason", m.events.clone());
        r.register("leader", "1 while this replica is the leader", m.leader.clone());
        m
    }

    /// Counts one request to the API server, from its method and path.
    pub fn count_request(&self, method: &http::Method, uri: &http::Uri) {
        let (verb, resource) = classify(method, uri);
        self.api_requests.get_or_create(&RequestLabels { verb, resource }).inc();
    }
}

/// Turns a request into (verb, resource) the way the API server's audit log names them.
pub fn classify(method: &http::Method, uri: &http::Uri) -> (String, String) {
    let segs: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    // /api/v1/... or /apis/<group>/<version>/...
    let rest: &[&str] = match segs.first() {
        Some(&"api") if segs.len() >= 2 => &segs[2..],
        Some(&"apis") if segs.len() >= 3 => &segs[3..],
        _ => &segs[..],
    };
    let rest = if rest.first() == Some(&"namespaces") && rest.len() >= 3 { &rest[2..] } else { rest };
    let resource = match rest {
        [] => "other".to_string(),
        [r] | [r, _] => r.to_string(),
        [r, _, sub, ..] => format!("{r}/{sub}"),
    };
    let named = rest.len() >= 2;
    let watch = uri.query().is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let verb = match *method {
        http::Method::GET if watch => "watch",
        http::Method::GET if named => "get",
        http::Method::GET => "list",
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE => "delete",
        _ => "other",
    };
    (verb.to_string(), resource)
}

#[cfg(test)]
mod tests {
    use super::classify;

    #[test]
    fn requests_are_named_like_the_audit_log() {
        let c = |m: &str, u: &str| {
            let (v, r) = classify(&m.parse().unwrap(), &u.parse().unwrap());
            format!("{v} {r}")
        };
        assert_eq!(c("GET", "/api/v1/namespaces/a/pods/p"), "get pods");
        assert_eq!(c("GET", "/api/v1/namespaces/a/pods?labelSelector=x"), "list pods");
        assert_eq!(c("GET", "/apis/fljob.dev/v1alpha1/fljobs?watch=true&resourceVersion=1"), "watch fljobs");
        assert_eq!(c("PATCH", "/apis/fljob.dev/v1alpha1/namespaces/a/fljobs/j/status?fieldManager=x"), "patch fljobs/status");
        assert_eq!(c("PUT", "/apis/fljob.dev/v1alpha1/namespaces/a/flsites/s/status"), "update flsites/status");
        assert_eq!(c("POST", "/apis/events.k8s.io/v1/namespaces/a/events"), "create events");
        assert_eq!(c("DELETE", "/api/v1/namespaces/a/pods/p"), "delete pods");
    }
}
