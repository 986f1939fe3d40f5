//! When things happened, as the bench saw them: watches on one namespace's FLJobs, Pods and FLSites, each event
//! stamped with `Instant::now()` on arrival, plus when the bench sent each create. Latencies come from these stamps.

use fljob_operator::api::{FLJob, FLSite, Phase};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the watches recorded, by job name (a pod's job is its `fljob.dev/job` label).
#[derive(Default)]
pub struct Seen {
    /// When the bench sent the create of each job (or raw pod).
    pub sent: HashMap<String, Instant>,
    /// When each job's pod first showed up.
    pub pod_first: HashMap<String, Instant>,
    /// Each job's pod phases, in order, with when each first showed up.
    pub pod_phases: HashMap<String, Vec<(String, Instant)>>,
    /// Each FLJob's phases, in order, with when each first showed up.
    pub job_phases: HashMap<String, Vec<(Phase, Instant)>>,
    /// Jobs whose pod reached Succeeded or Failed.
    pub pods_done: HashSet<String>,
    /// FLJobs in a finished phase, with that phase.
    pub jobs_done: HashMap<String, Phase>,
    /// The sites as last seen.
    pub sites: HashMap<String, FLSite>,
    /// Pods seen per site (`fljob.dev/site` label).
    pub pods_per_site: HashMap<String, usize>,
}

impl Seen {
    /// Milliseconds from each job's create to its pod's first appearance.
    pub fn create_to_pod(&self, names: &[String]) -> Vec<f64> {
        names
            .iter()
            .filter_map(|n| Some(ms(*self.pod_first.get(n)?, *self.sent.get(n)?)))
            .collect()
    }

    /// Milliseconds from a pod phase change (Running, Succeeded, Failed) to the first FLJob status showing it.
    pub fn phase_to_status(&self, names: &[String]) -> Vec<f64> {
        let mut out = Vec::new();
        for n in names {
            let (Some(pods), Some(jobs)) = (self.pod_phases.get(n), self.job_phases.get(n)) else { continue };
            for (phase, at) in pods {
                let shows = |p: &Phase| match phase.as_str() {
                    "Running" => *p != Phase::Pending && *p != Phase::Queued && *p != Phase::Starting,
                    "Succeeded" | "Failed" => p.is_finished(),
                    _ => false,
                };
                if !matches!(phase.as_str(), "Running" | "Succeeded" | "Failed") {
                    continue;
                }
                if let Some((_, t)) = jobs.iter().find(|(p, _)| shows(p)) {
                    out.push(ms(*t, *at));
                }
            }
        }
        out
    }

    /// The last finish (FLJob finished, or raw pod done when `pods`) among `names`, and the first create sent.
    pub fn span(&self, names: &[String], pods: bool) -> Option<(Instant, Instant)> {
        let first = names.iter().filter_map(|n| self.sent.get(n)).min()?;
        let last = names
            .iter()
            .map(|n| {
                if pods {
                    self.pod_phases.get(n).and_then(|v| v.iter().find(|(p, _)| p == "Succeeded" || p == "Failed").map(|(_, t)| *t))
                } else {
                    self.job_phases.get(n).and_then(|v| v.iter().find(|(p, _)| p.is_finished()).map(|(_, t)| *t))
                }
            })
            .collect::<Option<Vec<Instant>>>()?
            .into_iter()
            .max()?;
        Some((*first, last))
    }
}

/// `a - b` in milliseconds, at least 0 (two watches may deliver in either order).
fn ms(a: Instant, b: Instant) -> f64 {
    a.saturating_duration_since(b).as_secs_f64() * 1000.0
}

/// The watches on one namespace.
pub struct Timeline {
    seen: Arc<Mutex<Seen>>,
    changed: Arc<tokio::sync::Notify>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Timeline {
    /// Starts the three watches and returns once each has listed (nothing after this is missed).
    pub async fn start(client: &Client, ns: &str) -> anyhow::Result<Timeline> {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let changed = Arc::new(tokio::sync::Notify::new());
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut tasks = Vec::new();

        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let (s, c, r) = (seen.clone(), changed.clone(), ready_tx.clone());
        tasks.push(tokio::spawn(watch(pods, r, move |p: Pod| {
            let now = Instant::now();
            let labels = p.labels();
            let Some(job) = labels.get(fljob_operator::pod::JOB_LABEL).cloned() else { return };
            let site = labels.get(fljob_operator::pod::SITE_LABEL).cloned().unwrap_or_default();
            let phase = p.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_else(|| "Pending".into());
            let mut g = s.lock().unwrap_or_else(|e| e.into_inner());
            if !g.pod_first.contains_key(&job) {
                g.pod_first.insert(job.clone(), now);
                *g.pods_per_site.entry(site).or_default() += 1;
            }
            let v = g.pod_phases.entry(job.clone()).or_default();
            if v.last().map(|(p, _)| p != &phase).unwrap_or(true) {
                v.push((phase.clone(), now));
            }
            if phase == "Succeeded" || phase == "Failed" {
                g.pods_done.insert(job);
            }
            drop(g);
            c.notify_waiters();
        })));

        let jobs: Api<FLJob> = Api::namespaced(client.clone(), ns);
        let (s, c, r) = (seen.clone(), changed.clone(), ready_tx.clone());
        tasks.push(tokio::spawn(watch(jobs, r, move |j: FLJob| {
            let now = Instant::now();
            let phase = j.status.as_ref().map(|s| s.phase).unwrap_or_default();
            let name = j.name_any();
            let mut g = s.lock().unwrap_or_else(|e| e.into_inner());
            let v = g.job_phases.entry(name.clone()).or_default();
            if v.last().map(|(p, _)| *p != phase).unwrap_or(true) {
                v.push((phase, now));
            }
            if phase.is_finished() {
                g.jobs_done.insert(name, phase);
            }
            drop(g);
            c.notify_waiters();
        })));

        let sites: Api<FLSite> = Api::namespaced(client.clone(), ns);
        let (s, c, r) = (seen.clone(), changed.clone(), ready_tx);
        tasks.push(tokio::spawn(watch(sites, r, move |site: FLSite| {
            s.lock().unwrap_or_else(|e| e.into_inner()).sites.insert(site.name_any(), site);
            c.notify_waiters();
        })));

        for _ in 0..3 {
            tokio::time::timeout(Duration::from_secs(30), ready_rx.recv())
                .await
                .map_err(|_| anyhow::anyhow!("the bench's watches on {ns} did not list within 30 s"))?;
        }
        Ok(Timeline { seen, changed, tasks })
    }

    /// Records that the create of `name` is being sent now.
    pub fn sent(&self, name: &str) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).sent.insert(name.into(), Instant::now());
    }

    /// Reads the record.
    pub fn with<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.seen.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Waits until `done` holds, at most `timeout`; Err says what `progress` reports at the end.
    pub async fn until(
        &self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&Seen) -> bool,
        progress: impl Fn(&Seen) -> String,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if self.with(&done) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                anyhow::bail!("{what}: not done after {timeout:?} ({})", self.with(&progress));
            }
            // A periodic recheck as well: a notification may land between the check and the wait.
            let _ = tokio::time::timeout(left.min(Duration::from_millis(500)), notified).await;
        }
    }
}

impl Drop for Timeline {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn watch<K>(api: Api<K>, ready: tokio::sync::mpsc::UnboundedSender<()>, mut on: impl FnMut(K) + Send)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let mut stream = std::pin::pin!(watcher(api, watcher::Config::default()));
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => on(o),
            Ok(watcher::Event::InitDone) => {
                let _ = ready.send(());
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("note: bench watch error (retrying): {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
