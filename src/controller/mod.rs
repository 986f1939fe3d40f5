//! The controllers: shared watch caches of FLJobs, FLSites and worker Pods, the FLJob controller (pods, status,
//! aborts) and the FLSite controller (the quota ledger). Everything they know comes from the API server.

pub mod fljob;
pub mod flsite;

use crate::api::{FLJob, FLSite, Phase, Resources, is_true};
use crate::lifecycle::cond;
use crate::metrics::Metrics;
use crate::pod::{MANAGED_BY, MANAGED_BY_LABEL};
use crate::quota::JobView;
use futures::{Stream, StreamExt};
use crate::worker_pod::WorkerPod;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use std::sync::Arc;
use std::time::Duration;

/// The finalizer that keeps a deleted FLJob until its abort ran and its quota is back.
pub const FINALIZER: &str = "fljob.dev/cleanup";

/// What every reconcile shares.
pub struct Context {
    /// The API client (every request it makes is counted).
    pub client: Client,
    /// FLJobs, as last seen.
    pub jobs: Store<FLJob>,
    /// FLSites, as last seen.
    pub sites: Store<FLSite>,
    /// Worker pods, as last seen.
    pub pods: Store<WorkerPod>,
    /// Who the operator's Events say they come from. Each batch of Events gets a `Recorder` of its own
    /// (`Context::recorder`), not one shared by the process: kube-runtime 5.0's `Recorder::publish` sweeps its whole
    /// cache (every Event it published in the last 6 minutes) on each call, which made 11% of the operator's CPU
    /// at N = 10,000 (issue 12, `perf`), and keeps a copy of each of those Events in memory.
    pub reporter: Reporter,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Consecutive failed reconciles per object (`controller/namespace/name`), for the retry backoff. Only retry
    /// pacing lives here: losing it on a restart just starts the backoff over.
    pub failures: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    /// How many of the three caches have completed their first list.
    pub synced: tokio::sync::watch::Receiver<u8>,
    /// The key names of Secrets read in the last few seconds (a cache of reads, like the watch caches: a restart
    /// only reads them again).
    pub secret_keys: SecretKeys,
    /// Each site's queue, derived from the caches at most once per ledger version and [`QUEUE_INDEX_TTL`].
    pub queues: std::sync::Mutex<std::collections::HashMap<NsName, Arc<QueueIndex>>>,
    /// Each site's live jobs (the cache's own copies), kept beside the FLJob cache by the same watch.
    pub site_jobs: SiteJobs,
}

/// The FLJob cache's live jobs (not finished, or finished and being deleted) by namespace and site, kept from the
/// same watch events as the cache. A ledger decision and a site change look up a site's live jobs here instead of
/// walking every cached FLJob: with finished jobs kept for their record, that walk was O(all jobs) per ledger write
/// and per site event (issue 12, `perf` at N = 10,000: 13.7% of the operator's CPU in the FLSite reconcile). It holds
/// the cache's own `Arc`s (looked up once per event), so it costs no copy of a job. Like the cache, a re-list builds
/// a fresh index and swaps it in when the list is complete.
#[derive(Default)]
pub struct SiteJobs(std::sync::Mutex<SiteJobsInner>);

#[derive(Default)]
struct SiteJobsInner {
    current: SiteJobsMap,
    /// The index a re-list is building, swapped in at its end.
    relist: Option<SiteJobsMap>,
}

/// (namespace, name).
type NsName = (String, String);

#[derive(Default)]
struct SiteJobsMap {
    /// (namespace, site) -> its live jobs by name.
    by_site: std::collections::HashMap<NsName, std::collections::BTreeMap<String, Arc<FLJob>>>,
    /// (namespace, job) -> its site, for the jobs in `by_site`.
    site_of: std::collections::HashMap<NsName, String>,
}

impl SiteJobsMap {
    fn remove(&mut self, ns: &str, name: &str) {
        if let Some(site) = self.site_of.remove(&(ns.to_string(), name.to_string())) {
            let key = (ns.to_string(), site);
            if let Some(jobs) = self.by_site.get_mut(&key) {
                jobs.remove(name);
                if jobs.is_empty() {
                    self.by_site.remove(&key);
                }
            }
        }
    }

    fn apply(&mut self, job: Arc<FLJob>) {
        let (ns, name) = (job.namespace().unwrap_or_default(), job.name_any());
        self.remove(&ns, &name);
        if SiteJobs::is_live(&job) {
            self.site_of.insert((ns.clone(), name.clone()), job.spec.site.clone());
            self.by_site.entry((ns, job.spec.site.clone())).or_default().insert(name, job);
        }
    }
}

impl SiteJobs {
    /// Whether a site still has anything to do with `job`: it is not finished, or it is being deleted (its
    /// finalizer waits for the ledger's release).
    pub fn is_live(job: &FLJob) -> bool {
        !job.status.as_ref().is_some_and(|s| s.phase.is_finished()) || job.metadata.deletion_timestamp.is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SiteJobsInner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Follows one event of the FLJob watch, after `cache` took it in (a reflector updates its store before it
    /// passes the event on). The cache's copy is what the index keeps; during a re-list the cache answers with
    /// the old objects, so the listed ones are kept as given and exchanged for the cache's at the end.
    pub fn observe(&self, event: &watcher::Event<FLJob>, cache: &Store<FLJob>) {
        let cached = |j: &FLJob| cache.get(&ObjectRef::from_obj(j)).unwrap_or_else(|| Arc::new(j.clone()));
        let mut inner = self.lock();
        match event {
            watcher::Event::Apply(j) => {
                let j = cached(j);
                if let Some(r) = inner.relist.as_mut() {
                    r.apply(j.clone());
                }
                inner.current.apply(j);
            }
            watcher::Event::Delete(j) => {
                let (ns, name) = (j.namespace().unwrap_or_default(), j.name_any());
                inner.current.remove(&ns, &name);
                if let Some(r) = inner.relist.as_mut() {
                    r.remove(&ns, &name);
                }
            }
            watcher::Event::Init => inner.relist = Some(SiteJobsMap::default()),
            watcher::Event::InitApply(j) => inner.relist.get_or_insert_with(Default::default).apply(Arc::new(j.clone())),
            watcher::Event::InitDone => {
                if let Some(mut r) = inner.relist.take() {
                    for jobs in r.by_site.values_mut() {
                        for j in jobs.values_mut() {
                            if let Some(c) = cache.get(&ObjectRef::from_obj(&**j)) {
                                *j = c;
                            }
                        }
                    }
                    inner.current = r;
                }
            }
        }
    }

    /// The live jobs of `site` in `namespace`, by name.
    pub fn jobs(&self, namespace: &str, site: &str) -> Vec<Arc<FLJob>> {
        let inner = self.lock();
        inner.current.by_site.get(&(namespace.to_string(), site.to_string())).map(|m| m.values().cloned().collect()).unwrap_or_default()
    }
}

/// How long a site's [`QueueIndex`] answers while the site's ledger is unchanged. Within it, a job that stopped
/// waiting without holding quota (aborted, deleted) may still count as ahead of others: their notes can be
/// pessimistic for that long, never their admission (the FLSite controller plans from the caches themselves).
pub const QUEUE_INDEX_TTL: Duration = Duration::from_secs(1);

/// A site's queue as of one version of its ledger: the waiting jobs' places in admission order and, for each place,
/// what the jobs before it leave ([`crate::lifecycle::Ahead`]). Built in one walk over the site's jobs, it answers
/// each queued job's note by a binary search, where each note walked the site's jobs before (issue 12: raising a
/// capacity with 999 jobs queued cost 3.2 s of CPU, O(queue) per job).
pub struct QueueIndex {
    site_version: Option<String>,
    built: std::time::Instant,
    /// (creation time, name) of the waiting jobs, in admission order.
    keys: Vec<(Option<k8s_openapi::jiff::Timestamp>, String)>,
    /// `ahead[i]`: what the first `i` waiting jobs leave; one more entry than `keys`.
    ahead: Vec<crate::lifecycle::Ahead>,
}

impl QueueIndex {
    /// Indexes `waiting` (in admission order) at `site`.
    pub fn new(site: &FLSite, waiting: &[&JobView]) -> Self {
        let mut ahead = Vec::with_capacity(waiting.len() + 1);
        let mut a = crate::lifecycle::Ahead::start(site);
        ahead.push(a);
        for v in waiting {
            a = a.then(site, &v.resources);
            ahead.push(a);
        }
        QueueIndex {
            site_version: site.metadata.resource_version.clone(),
            built: std::time::Instant::now(),
            keys: waiting.iter().map(|v| (v.created.as_ref().map(|t| t.0), v.name.clone())).collect(),
            ahead,
        }
    }

    /// What the waiting jobs ahead of `job` leave for it (`job` itself, if indexed, is not ahead of itself).
    pub fn ahead_of(&self, job: &FLJob) -> crate::lifecycle::Ahead {
        let key = (job.metadata.creation_timestamp.as_ref().map(|t| t.0), job.name_any());
        self.ahead[self.keys.partition_point(|k| *k < key)]
    }
}

/// How long a Secret's key names, once read, answer the pre-admission check of further jobs. A burst of jobs at one
/// site checks its two Secrets once per interval instead of twice per job; a Secret deleted meanwhile is still caught
/// by the kubelet (the pod fails with reason ConfigError). Absent Secrets are never remembered: the first check after
/// one is created sees it.
pub const SECRET_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// Key names of recently read Secrets, by namespace and name.
#[derive(Default)]
pub struct SecretKeys(std::sync::Mutex<std::collections::HashMap<NsName, (std::time::Instant, Vec<String>)>>);

impl SecretKeys {
    /// The key names of `ns/name` if read less than `SECRET_CACHE_TTL` ago.
    pub fn get(&self, ns: &str, name: &str) -> Option<Vec<String>> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&(ns.to_string(), name.to_string())).filter(|(at, _)| at.elapsed() < SECRET_CACHE_TTL).map(|(_, k)| k.clone())
    }

    /// Remembers what a read found; forgets what it did not find, and whatever is too old.
    pub fn put(&self, ns: &str, name: &str, keys: Option<Vec<String>>) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, (at, _)| at.elapsed() < SECRET_CACHE_TTL);
        let key = (ns.to_string(), name.to_string());
        match keys {
            Some(k) => map.insert(key, (std::time::Instant::now(), k)),
            None => map.remove(&key),
        };
    }
}

impl Context {
    /// A Recorder for one batch of Events (see `reporter`): nothing of it outlives the batch.
    pub fn recorder(&self) -> Recorder {
        Recorder::new(self.client.clone(), self.reporter.clone())
    }

    /// Waits until the three caches hold a full list: decisions on a partial view could release quota
    /// of jobs that merely were not listed yet. (`Store::wait_until_ready` keeps a single waker, so it cannot
    /// be shared by concurrent reconciles; a watch channel can.)
    pub async fn ready(&self) {
        let mut rx = self.synced.clone();
        let _ = rx.wait_for(|n| *n >= 3).await;
    }

    /// Runs one reconcile once the caches are synced, counting it and timing it; a success resets the object's
    /// retry backoff.
    pub async fn measured<F>(&self, controller: &str, key: &str, reconcile: F) -> crate::Result<kube::runtime::controller::Action>
    where
        F: std::future::Future<Output = crate::Result<kube::runtime::controller::Action>>,
    {
        self.ready().await;
        let started = std::time::Instant::now();
        let labels = crate::metrics::ControllerLabels { controller: controller.into() };
        self.metrics.reconciles.get_or_create(&labels).inc();
        let result = reconcile.await;
        self.metrics.duration.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
        if result.is_ok() {
            self.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(&format!("{controller}/{key}"));
        }
        result
    }

    /// What to do after a failed reconcile: a growing delay with jitter, per object (a conflict starts lower:
    /// fresh data is already on its way), reset by the next success.
    pub fn retry(&self, controller: &str, key: &str, error: &crate::Error) -> kube::runtime::controller::Action {
        use kube::runtime::controller::Action;
        let labels = crate::metrics::ErrorLabels { controller: controller.into(), error: error.metric_label() };
        self.metrics.errors.get_or_create(&labels).inc();
        let attempt = {
            let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            let n = failures.entry(format!("{controller}/{key}")).or_insert(0);
            *n = n.saturating_add(1);
            *n
        };
        let conflict = matches!(error, crate::Error::Conflict(_));
        let delay = backoff(if conflict { Duration::from_millis(100) } else { Duration::from_millis(500) }, attempt, jitter_seed(key, attempt));
        match error {
            crate::Error::Conflict(what) => tracing::debug!(conflict = %what, attempt, ?delay, "stale data; retrying"),
            e => tracing::warn!(controller, object = key, error = %e, attempt, ?delay, "reconcile failed; retrying"),
        }
        Action::requeue(delay)
    }

    /// The cached site of a job.
    pub fn site_of(&self, job: &FLJob) -> Option<Arc<FLSite>> {
        let ns = job.namespace().unwrap_or_default();
        self.sites.get(&ObjectRef::new(&job.spec.site).within(&ns))
    }

    /// The queue index of `site` (as cached), built anew when the site's ledger changed or the index is older than
    /// [`QUEUE_INDEX_TTL`].
    pub fn queue_index(&self, namespace: &str, site: &FLSite) -> Arc<QueueIndex> {
        let key = (namespace.to_string(), site.name_any());
        let fresh = |q: &QueueIndex| q.site_version == site.metadata.resource_version && q.built.elapsed() < QUEUE_INDEX_TTL;
        if let Some(q) = self.queues.lock().unwrap_or_else(|e| e.into_inner()).get(&key).filter(|q| fresh(q)) {
            return q.clone();
        }
        let views = self.job_views(namespace, site);
        let allocations = site.status.as_ref().map(|s| s.allocations.as_slice()).unwrap_or_default();
        let index = Arc::new(QueueIndex::new(site, &crate::quota::queue(&site.spec.capacity, allocations, &views)));
        self.queues.lock().unwrap_or_else(|e| e.into_inner()).insert(key, index.clone());
        index
    }

    /// The jobs of a site the ledger must weigh: every job not finished yet. A finished job is left out (a ledger
    /// entry without a job is released all the same), so a site's cost follows its live jobs, not the finished
    /// ones kept for their record.
    pub fn job_views(&self, namespace: &str, site: &FLSite) -> Vec<JobView> {
        self.site_jobs
            .jobs(namespace, &site.name_any())
            .iter()
            .filter(|j| !j.status.as_ref().is_some_and(|s| s.phase.is_finished()))
            .map(|j| job_view(j, site))
            .collect()
    }
}

/// The longest pause between two retries of one object.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// `base * 2^(attempt-1)`, at most [`MAX_BACKOFF`], times a jitter factor in [0.8, 1.2) from `seed`, so that objects
/// failing together (an API server outage) do not come back in lockstep.
pub fn backoff(base: Duration, attempt: u32, seed: u64) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let capped = exp.min(MAX_BACKOFF);
    let jitter = 0.8 + (seed % 1000) as f64 / 2500.0;
    capped.mul_f64(jitter)
}

fn jitter_seed(key: &str, attempt: u32) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (key, attempt, std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0)).hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod backoff_tests {
    use super::*;

    #[test]
    fn grows_caps_and_jitters() {
        let base = Duration::from_millis(500);
        let at = |n, seed| backoff(base, n, seed);
        assert_eq!(at(1, 500), Duration::from_millis(500));
        assert_eq!(at(2, 500), Duration::from_millis(1000));
        assert_eq!(at(4, 500), Duration::from_millis(4000));
        assert_eq!(at(30, 500), MAX_BACKOFF);
        assert_eq!(at(1, 0), Duration::from_millis(400));
        assert_eq!(at(1, 999), Duration::from_millis(500).mul_f64(0.8 + 999.0 / 2500.0));
        for seed in 0..2000 {
            let d = at(3, seed);
            assert!(d >= Duration::from_millis(1600) && d < Duration::from_millis(2400), "{d:?}");
        }
    }
}

/// How the ledger sees a job.
pub fn job_view(job: &FLJob, site: &FLSite) -> JobView {
    static EMPTY: std::sync::LazyLock<crate::api::FLJobStatus> = std::sync::LazyLock::new(Default::default);
    // Borrowed, not cloned: this runs for every job of a site, for every queued job's reconcile.
    let st = job.status.as_ref().unwrap_or(&EMPTY);
    let finished = st.phase.is_finished();
    let checked = crate::lifecycle::checked_by_finalizer(job);
    let wants = !finished
        && job.metadata.deletion_timestamp.is_none()
        && !job.spec.abort
        && st.abort.is_none()
        && (is_true(&st.conditions, cond::RESOLVED) || checked);
    let undecided = !finished
        && job.metadata.deletion_timestamp.is_none()
        && !job.spec.abort
        && st.abort.is_none()
        && crate::api::find_condition(&st.conditions, cond::RESOLVED).is_none()
        && !checked;
    JobView {
        name: job.name_any(),
        uid: job.uid().unwrap_or_default(),
        created: job.metadata.creation_timestamp.clone(),
        wants_quota: wants,
        undecided,
        done: finished,
        recorded: st.allocation.clone(),
        resources: crate::pod::effective_resources(job, site),
    }
}

/// A change of one FLSite, as the jobs it may concern see it: built once per site event, so deciding for each of
/// the site's N jobs is O(1) (a ledger of A entries looked up by uid), not O(A).
pub struct SiteChange<'a> {
    held: std::collections::HashSet<&'a str>,
    spec_changed: bool,
}

impl<'a> SiteChange<'a> {
    /// The change `site` (as just seen) brings.
    pub fn new(site: &'a FLSite) -> Self {
        let held = site.status.as_ref().map(|s| s.allocations.iter().map(|a| a.uid.as_str()).collect()).unwrap_or_default();
        let spec_changed = site.status.as_ref().and_then(|s| s.observed_generation) != site.metadata.generation;
        SiteChange { held, spec_changed }
    }

    /// Whether it concerns `job`: the jobs the site just admitted or released (the ledger and the job's status
    /// disagree), jobs still waiting for the site to be usable, jobs being deleted, and — only when the site's spec
    /// changed — every queued job. Waking every queued job at each admission would cost O(queue) reconciles per
    /// admission.
    pub fn affects(&self, job: &FLJob) -> bool {
        let Some(st) = job.status.as_ref() else { return true };
        if job.metadata.deletion_timestamp.is_some() {
            return true;
        }
        // A finished job keeps its `status.allocation` as a record: the ledger taking it back needs no answer from
        // it (unless it is being deleted: its finalizer waits for the release).
        if st.phase.is_finished() {
            return false;
        }
        let holding = job.metadata.uid.as_deref().is_some_and(|u| self.held.contains(u));
        holding != st.allocation.is_some()
            // Waiting for the site or its Secrets (Resolved=False). A job never looked at yet needs no wake-up: its
            // own creation event brings it.
            || crate::api::find_condition(&st.conditions, cond::RESOLVED).is_some_and(|c| c.status == "False")
            || (st.phase == Phase::Queued && self.spec_changed)
    }
}

/// An allocation as job resources.
pub fn allocation_resources(a: &crate::api::Allocation) -> Resources {
    Resources { cpu: a.cpu.clone(), memory: a.memory.clone(), gpus: Some(a.gpus), ephemeral_storage: None }
}

/// Options of [`run`].
#[derive(Clone, Debug)]
pub struct Options {
    /// Watch one namespace; all when None.
    pub namespace: Option<String>,
    /// Reported as the Events' instance.
    pub identity: String,
    /// How many FLJobs reconcile at once.
    pub concurrency: u16,
    /// Set once all three caches (FLJobs, FLSites, pods) have completed their first list: `/readyz` reads it.
    pub ready: Arc<std::sync::atomic::AtomicBool>,
}

fn api<K>(client: &Client, ns: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// A trigger stream for one controller, fed by [`drive`].
pub type Trigger<K> = tokio_stream::wrappers::UnboundedReceiverStream<K>;

/// One sender per consumer of a watch.
struct FanOut<K>(Vec<tokio::sync::mpsc::UnboundedSender<K>>);

impl<K: Clone> FanOut<K> {
    fn new(consumers: usize) -> (Self, Vec<Trigger<K>>) {
        let (txs, rxs) = (0..consumers)
            .map(|_| {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                (tx, Trigger::new(rx))
            })
            .unzip();
        (FanOut(txs), rxs)
    }

    fn send(&self, obj: &K) {
        for tx in &self.0 {
            let _ = tx.send(obj.clone());
        }
    }
}

/// Drives one watch: keeps its cache, hands every object it sees (added, changed, deleted, listed) to each
/// consumer, and counts its first completed list into `synced`. One watch per kind serves both controllers; the
/// channels are unbounded so a busy controller never stalls the cache the other one reads.
async fn drive<K, S>(
    name: &'static str,
    stream: S,
    out: FanOut<K>,
    synced: Arc<tokio::sync::watch::Sender<u8>>,
    observe: impl Fn(&watcher::Event<K>),
) where
    K: Clone,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let mut listed = false;
    let mut stream = std::pin::pin!(stream);
    while let Some(r) = stream.next().await {
        if let Ok(e) = &r {
            observe(e);
        }
        match r {
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o) | watcher::Event::Delete(o)) => out.send(&o),
            Ok(watcher::Event::InitDone) if !listed => {
                listed = true;
                synced.send_modify(|n| *n += 1);
                tracing::debug!(watch = name, "cache synced");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(watch = name, error = %e, "watch failed; retrying with backoff"),
        }
    }
}

/// What the FLJob cache keeps of `managedFields`: the operator's own entries, without their field sets (they date
/// its checks: `lifecycle::checked_at`).
pub fn slim_job(j: &mut FLJob) {
    if let Some(m) = j.metadata.managed_fields.as_mut() {
        m.retain(|e| e.manager.as_deref() == Some(crate::api::MANAGER));
        for e in m.iter_mut() {
            e.fields_v1 = None;
        }
    }
}

/// Runs both controllers until shutdown (SIGTERM / SIGINT).
pub async fn run(client: Client, metrics: Arc<Metrics>, opts: Options) {
    let (jobs, job_writer) = reflector::store::<FLJob>();
    let (sites, site_writer) = reflector::store::<FLSite>();
    let (pods, pod_writer) = reflector::store::<WorkerPod>();
    let (job_out, mut job_triggers) = FanOut::new(1);
    // The ledger needs only which site a changed job belongs to, not a copy of the job.
    let (ledger_tx, ledger_triggers) = tokio::sync::mpsc::unbounded_channel();
    let (site_out, mut site_triggers) = FanOut::new(2);
    let (pod_out, mut pod_triggers) = FanOut::new(1);

    let pod_config = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    let job_watch = reflector::reflector(
        job_writer,
        watcher(api::<FLJob>(&client, &opts.namespace), watcher::Config::default())
            .default_backoff()
            .modify(slim_job),
    );
    let site_watch = reflector::reflector(
        site_writer,
        watcher(api::<FLSite>(&client, &opts.namespace), watcher::Config::default())
            .default_backoff()
            .modify(|s| s.managed_fields_mut().clear()),
    );
    let pod_watch = reflector::reflector(
        pod_writer,
        // The projection decodes only what decisions read, managedFields left out (`WorkerPod`).
        watcher(api::<WorkerPod>(&client, &opts.namespace), pod_config).default_backoff(),
    );

    let (synced_tx, synced) = tokio::sync::watch::channel(0u8);
    let synced_tx = Arc::new(synced_tx);
    let ready = opts.ready.clone();
    let mut watch_synced = synced.clone();
    let mark_ready = async move {
        if watch_synced.wait_for(|n| *n >= 3).await.is_ok() {
            ready.store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::info!("caches synced; ready");
        }
        std::future::pending::<()>().await
    };
    let reporter = Reporter { controller: "fljob-operator".into(), instance: Some(opts.identity.clone()) };
    let ctx = Arc::new(Context {
        client: client.clone(),
        jobs: jobs.clone(),
        sites: sites.clone(),
        pods,
        reporter,
        metrics: metrics.clone(),
        failures: Default::default(),
        synced,
        secret_keys: Default::default(),
        queues: Default::default(),
        site_jobs: Default::default(),
    });

    let (jt, st, pt) = (job_triggers.remove(0), site_triggers.remove(0), pod_triggers.remove(0));
    let job_ctl = fljob::controller(ctx.clone(), jt, st, pt, opts.concurrency);
    let site_ctl = flsite::controller(ctx.clone(), site_triggers.remove(0), Trigger::new(ledger_triggers));
    let gauges = refresh_gauges(ctx.clone());
    let orphans = release_orphans(ctx.clone());
    tokio::select! {
        _ = futures::future::join(job_ctl, site_ctl) => tracing::info!("controllers stopped"),
        _ = drive("fljobs", job_watch, job_out, synced_tx.clone(), |e| {
            ctx.site_jobs.observe(e, &ctx.jobs);
            if let watcher::Event::Apply(j) | watcher::Event::InitApply(j) | watcher::Event::Delete(j) = e {
                let _ = ledger_tx.send(ObjectRef::<FLSite>::new(&j.spec.site).within(&j.namespace().unwrap_or_default()));
            }
        }) => {},
        _ = drive("flsites", site_watch, site_out, synced_tx.clone(), |_| {}) => {},
        _ = drive("pods", pod_watch, pod_out, synced_tx, |_| {}) => {},
        _ = gauges => {},
        _ = orphans => {},
        _ = mark_ready => {},
        _ = async {
            crate::shutdown_signal().await;
            // The controllers stop by themselves once in-flight reconciles end; do not wait on a stuck one.
            tokio::time::sleep(Duration::from_secs(5)).await;
        } => tracing::warn!("controllers did not stop within 5 s of the signal; exiting"),
    }
}

/// How often the caches are swept for worker pods whose FLJob is gone.
const ORPHAN_SWEEP: Duration = Duration::from_secs(30);

/// Lets go of worker pods whose FLJob no longer exists. The FLJob's own finalizer normally releases its pod first;
/// this covers an FLJob whose finalizer someone removed by hand, whose pod the garbage collector then cannot delete.
/// It reads only the caches, and asks the API server once per suspect before it lets a pod go.
async fn release_orphans(ctx: Arc<Context>) {
    ctx.ready().await;
    loop {
        tokio::time::sleep(ORPHAN_SWEEP).await;
        for pod in ctx.pods.state() {
            if !pod.finalizers().iter().any(|f| f == crate::pod::TRACKING_FINALIZER) {
                continue;
            }
            let ns = pod.namespace().unwrap_or_default();
            let owner = pod.owner_references().iter().find(|o| o.controller == Some(true) && o.kind == "FLJob").cloned();
            if let Some(o) = &owner
                && ctx.jobs.get(&ObjectRef::new(&o.name).within(&ns)).is_some_and(|j| j.uid().as_deref() == Some(o.uid.as_str()))
            {
                continue;
            }
            let jobs: Api<FLJob> = Api::namespaced(ctx.client.clone(), &ns);
            let alive = match &owner {
                Some(o) => match jobs.get_opt(&o.name).await {
                    Ok(j) => j.is_some_and(|j| j.uid().as_deref() == Some(o.uid.as_str())),
                    Err(e) => {
                        tracing::warn!(pod = %pod.name_any(), namespace = %ns, error = %e, "cannot check the owner of a worker pod");
                        true
                    }
                },
                None => false,
            };
            if alive {
                continue;
            }
            let pods: Api<WorkerPod> = Api::namespaced(ctx.client.clone(), &ns);
            match fljob::remove_finalizer(&pods, &*pod, crate::pod::TRACKING_FINALIZER).await {
                Ok(()) => tracing::info!(pod = %pod.name_any(), namespace = %ns, "released a worker pod whose FLJob is gone"),
                Err(e) => tracing::warn!(pod = %pod.name_any(), namespace = %ns, error = %e, "could not release an orphaned worker pod"),
            }
        }
    }
}

/// Keeps the jobs-by-phase gauges current from the cache (no API calls).
async fn refresh_gauges(ctx: Arc<Context>) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        ctx.metrics.jobs.clear();
        for j in ctx.jobs.state() {
            let phase = j.status.as_ref().map(|s| s.phase).unwrap_or_default();
            let labels = crate::metrics::PhaseLabels { namespace: j.namespace().unwrap_or_default(), phase: format!("{phase:?}") };
            ctx.metrics.jobs.get_or_create(&labels).inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Allocation, Capacity, FLJobStatus, FLSiteStatus, condition};
    use crate::testing::{mk_job, mk_site, t};

    fn queued(name: &str) -> FLJob {
        let mut j = mk_job(name, "site-a");
        j.status = Some(FLJobStatus {
            phase: Phase::Queued,
            conditions: vec![condition(cond::RESOLVED, true, "Resolved", "", Some(1), &t(0))],
            ..Default::default()
        });
        j
    }

    #[test]
    fn secret_reads_are_remembered_briefly_and_absences_never() {
        let keys = SecretKeys::default();
        assert_eq!(keys.get("ns", "creds"), None);
        keys.put("ns", "creds", Some(vec!["token".into()]));
        assert_eq!(keys.get("ns", "creds"), Some(vec!["token".to_string()]));
        assert_eq!(keys.get("other", "creds"), None, "per namespace");
        keys.put("ns", "creds", None);
        assert_eq!(keys.get("ns", "creds"), None, "a Secret found missing is read again next time");
        let mut map = keys.0.lock().unwrap();
        map.insert(("ns".into(), "old".into()), (std::time::Instant::now() - SECRET_CACHE_TTL, vec![]));
        drop(map);
        assert_eq!(keys.get("ns", "old"), None, "too old");
    }

    #[test]
    fn the_queue_index_answers_as_the_walk_over_the_site_does() {
        use crate::lifecycle::{queue_note, queue_note_after};
        let mut site = mk_site("site-a", Capacity { jobs: Some(5), gpus: Some(6), ..Default::default() });
        let held = Allocation { job: "r".into(), uid: "uid-r".into(), gpus: 2, ..Default::default() };
        site.status = Some(FLSiteStatus { allocations: vec![held], ..Default::default() });
        site.metadata.resource_version = Some("7".into());
        // Creation times with ties (whole seconds in the API): the order is then by name.
        let jobs: Vec<FLJob> = [("a", 0, 1), ("c", 1, 3), ("b", 1, 1), ("d", 2, 2), ("e", 2, 1), ("f", 3, 1)]
            .iter()
            .map(|(name, at, gpus)| {
                let mut j = queued(name);
                j.metadata.creation_timestamp = Some(t(at * 1000));
                j.spec.resources = Some(Resources { gpus: Some(*gpus), ..Default::default() });
                j
            })
            .collect();
        let views: Vec<JobView> = jobs.iter().map(|j| job_view(j, &site)).collect();
        let waiting = crate::quota::queue(&site.spec.capacity, &site.status.as_ref().unwrap().allocations, &views);
        let index = QueueIndex::new(&site, &waiting);
        let mut behind = 0;
        for j in &jobs {
            let want = crate::pod::effective_resources(j, &site);
            let before: Vec<Resources> = waiting.iter().take_while(|v| v.name != j.name_any()).map(|v| v.resources.clone()).collect();
            let walked = queue_note(&site, &before, &want);
            assert_eq!(queue_note_after(&site, &index.ahead_of(j), &want), walked, "{}", j.name_any());
            behind += usize::from(walked.behind);
        }
        assert!(behind > 0 && behind < jobs.len(), "the setup has jobs on both sides of the cut: {behind}");
        // A job the index has not seen yet (created after it was built) queues behind everything in it.
        let mut late = queued("z");
        late.metadata.creation_timestamp = Some(t(9000));
        let all: Vec<Resources> = waiting.iter().map(|v| v.resources.clone()).collect();
        let want = crate::pod::effective_resources(&late, &site);
        assert_eq!(queue_note_after(&site, &index.ahead_of(&late), &want), queue_note(&site, &all, &want));
    }

    #[test]
    fn the_pod_cache_keeps_what_decisions_read_and_drops_the_rest() {
        let job = mk_job("train-1", "site-a");
        let site = mk_site("site-a", Capacity::default());
        let mut full = crate::pod::build_pod(&job, &site).expect("a pod");
        full.spec.as_mut().unwrap().node_name = Some("node-1".into());
        full.metadata.managed_fields = Some(vec![Default::default()]);
        let f = full.spec.as_ref().unwrap();
        assert!(f.volumes.as_ref().is_some_and(|v| !v.is_empty()) && f.containers[0].env.as_ref().is_some_and(|e| !e.is_empty()), "the built pod has volumes and env to drop");
        // what the watch decodes is what the cache keeps
        let slim: WorkerPod = serde_json::from_value(serde_json::to_value(&full).unwrap()).expect("decodes");
        let s = slim.spec.as_ref().unwrap();
        assert_eq!(s.node_name.as_deref(), Some("node-1"));
        assert_eq!(s.termination_grace_period_seconds, f.termination_grace_period_seconds);
        assert_eq!((s.containers[0].name.as_str(), s.containers[0].image.as_deref()), (f.containers[0].name.as_str(), f.containers[0].image.as_deref()));
        assert_eq!(slim.metadata.finalizers, full.metadata.finalizers);
        assert_eq!((slim.metadata.labels.clone(), slim.metadata.annotations.clone()), (None, None), "labels and annotations other than the aborts are not read");
        assert_eq!(slim.metadata.owner_references, full.metadata.owner_references);
        assert!(slim.metadata.managed_fields.as_ref().is_none_or(|m| m.is_empty()));
        let (fs, ss) = (serde_json::to_vec(&full).unwrap().len(), serde_json::to_vec(&slim).unwrap().len());
        assert!(ss * 3 < fs, "the cached pod is a fraction of the full one: {ss} of {fs} bytes");
    }

    #[test]
    fn a_site_change_wakes_only_the_jobs_it_concerns() {
        let mut site = mk_site("site-a", Capacity { jobs: Some(1), ..Default::default() });
        site.metadata.generation = Some(1);
        let admitted = Allocation { job: "a".into(), uid: "uid-a".into(), ..Default::default() };
        site.status = Some(FLSiteStatus { allocations: vec![admitted], observed_generation: Some(1), ..Default::default() });
        let affected_by_site = |job: &FLJob, site: &FLSite| SiteChange::new(site).affects(job);
        assert!(affected_by_site(&queued("a"), &site), "just admitted");
        assert!(!affected_by_site(&queued("b"), &site), "still queued, nothing new for it");
        assert!(affected_by_site(&mk_job("new", "site-a"), &site), "no status yet");
        let mut released = queued("c");
        released.status.as_mut().unwrap().phase = Phase::Succeeded;
        released.status.as_mut().unwrap().allocation = Some(Resources::default());
        assert!(!affected_by_site(&released, &site), "just released: nothing for a finished job to do");
        released.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
        assert!(affected_by_site(&released, &site), "released while being deleted: its finalizer may go");
        site.metadata.generation = Some(2); // the capacity changed: every queued job may be concerned
        assert!(affected_by_site(&queued("b"), &site));
    }
}

#[cfg(test)]
mod site_jobs_tests {
    use super::*;
    use crate::api::FLJobStatus;
    use crate::testing::{mk_job, t};

    fn with_phase(name: &str, site: &str, phase: Phase) -> FLJob {
        let mut j = mk_job(name, site);
        j.status = Some(FLJobStatus { phase, ..Default::default() });
        j
    }

    #[test]
    fn the_site_index_follows_the_watch_and_keeps_only_live_jobs() {
        use watcher::Event::*;
        let idx = SiteJobs::default();
        let (cache, mut writer) = reflector::store::<FLJob>();
        // As `drive` sees an event: after the reflector applied it to the cache.
        let mut feed = |e: watcher::Event<FLJob>| {
            writer.apply_watcher_event(&e);
            idx.observe(&e, &cache);
        };
        let names = |idx: &SiteJobs, site: &str| idx.jobs("ns", site).iter().map(|j| j.name_any()).collect::<Vec<_>>();
        feed(Apply(mk_job("a", "site-a")));
        feed(Apply(with_phase("b", "site-a", Phase::Running)));
        feed(Apply(with_phase("c", "site-b", Phase::Queued)));
        assert_eq!(names(&idx, "site-a"), ["a", "b"]);
        assert_eq!(names(&idx, "site-b"), ["c"]);
        assert!(idx.jobs("other-ns", "site-a").is_empty(), "per namespace");
        let from_cache = cache.get(&ObjectRef::new("b").within("ns")).unwrap();
        assert!(Arc::ptr_eq(&idx.jobs("ns", "site-a")[1], &from_cache), "the index shares the cache's copy");

        feed(Apply(with_phase("b", "site-a", Phase::Succeeded)));
        assert_eq!(names(&idx, "site-a"), ["a"], "a finished job leaves the index");
        let mut deleting = with_phase("b", "site-a", Phase::Succeeded);
        deleting.metadata.deletion_timestamp = Some(t(5));
        feed(Apply(deleting.clone()));
        assert_eq!(names(&idx, "site-a"), ["a", "b"], "a finished job being deleted waits for its release: it is live");
        assert!(idx.jobs("ns", "site-a")[1].metadata.deletion_timestamp.is_some(), "the latest version");
        feed(Delete(deleting));
        assert_eq!(names(&idx, "site-a"), ["a"]);

        // A re-list: until it completes, the old index answers; then only what the list held (the delete of `c`
        // was missed while the watch was down), as the cache holds it.
        feed(Init);
        feed(InitApply(with_phase("a", "site-a", Phase::Running)));
        feed(InitApply(mk_job("d", "site-a")));
        assert_eq!(names(&idx, "site-b"), ["c"]);
        feed(InitDone);
        assert_eq!(names(&idx, "site-a"), ["a", "d"]);
        assert!(names(&idx, "site-b").is_empty(), "what the re-list did not see is gone");
        let a = cache.get(&ObjectRef::new("a").within("ns")).unwrap();
        assert_eq!(a.status.as_ref().map(|s| s.phase), Some(Phase::Running));
        assert!(Arc::ptr_eq(&idx.jobs("ns", "site-a")[0], &a), "after the re-list, the cache's copies again");
    }
}
