//! The scale benchmark (issue 12): the operator against the physical limit (the same pods created directly) and
//! against NVFlare's own launcher pattern (one poller per job), on the local cluster's API server, in one run.
//! Prints one table. `make bench` (N = 1,000, release); `cargo test --locked --bench scale` (smoke: N = 100,
//! short windows; exits non-zero when a figure is missing). `--help` lists the flags.

// The crate root is benches/scale.rs, so its modules would be looked for beside it, where cargo would take each
// for a bench of its own: they live in benches/scale/.
#[path = "scale/cluster.rs"]
mod cluster;
#[path = "scale/fixtures.rs"]
mod fixtures;
#[path = "scale/prom.rs"]
mod prom;
#[path = "scale/timeline.rs"]
mod timeline;

use anyhow::{Context as _, Result, anyhow, bail};
use cluster::{Cleanup, Counted, Identity, Operator};
use fljob_operator::api::{FLJob, FLSite};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Pod, Secret};
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use prom::Requests;
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use timeline::{Seen, Timeline};

const HELP: &str = "scale bench (issue 12): fljob-operator vs raw pods vs NVFlare's polling launcher

usage: cargo bench --locked --bench scale -- [flags]      (release; what `make bench` runs)
       cargo test --locked --bench scale -- [flags]       (debug build; smoke unless --n is given)

  --n N                 FLJobs per burst (default 1000; env FLJOB_BENCH_N)
  --smoke               N = 100 and short windows; exit 1 unless every figure was measured
  --concurrency C       the operator's --concurrency and the raw/poll clients' concurrency (default 16)
  --steady-secs S       window in which a settled cluster must see 0 writes (default 60; smoke 5)
  --queue-capacity K    capacity.jobs of the queued run's site (default max(2, N/20))
  --poll-jobs P         jobs in the polling comparison (default min(N, 100); smoke 10)
  --poll-run-secs S     how long those jobs run (default 60; smoke 5)
  --paced-jobs M        jobs created at half the burst's throughput, for latency (default max(20, N/4))
  --probes K            extra jobs per admission measurement (default 5; smoke 3)
  --skip LIST           comma list of phases to leave out: raw,burst,steady,paced,queued,admission,poll
  --operator-bin PATH   another operator binary (default: the one cargo built for this profile)
  --keep                leave the namespaces in place
";

/// Flags.
#[derive(Clone, Debug)]
struct Args {
    n: usize,
    smoke: bool,
    concurrency: usize,
    steady_secs: u64,
    queue_capacity: usize,
    poll_jobs: usize,
    poll_run_secs: u64,
    paced_jobs: usize,
    probes: usize,
    skip: HashSet<String>,
    operator_bin: PathBuf,
    keep: bool,
    mode: &'static str,
}

fn parse_args() -> Result<Args> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes --bench; `cargo test` passes nothing of its own but may forward libtest's flags.
    let bench = raw.iter().any(|a| a == "--bench");
    let mut n: Option<usize> = std::env::var("FLJOB_BENCH_N").ok().map(|v| v.parse()).transpose().context("FLJOB_BENCH_N")?;
    let mut smoke = false;
    let mut opt: BTreeMap<&str, String> = BTreeMap::new();
    let mut skip = HashSet::new();
    let mut keep = false;
    let mut it = raw.iter().peekable();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let mut value = |name: &str| -> Result<String> {
            inline.clone().or_else(|| it.next().cloned()).ok_or_else(|| anyhow!("{name} needs a value"))
        };
        match flag {
            "--bench" | "--nocapture" | "--quiet" | "-q" | "--exact" | "--show-output" => {}
            "--test-threads" | "--color" | "--format" => {
                value(flag)?;
            }
            "-h" | "--help" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            "--smoke" => smoke = true,
            "--keep" => keep = true,
            "--n" => n = Some(value(flag)?.parse().context("--n")?),
            "--skip" => skip.extend(value(flag)?.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty())),
            "--concurrency" | "--steady-secs" | "--queue-capacity" | "--poll-jobs" | "--poll-run-secs" | "--paced-jobs"
            | "--probes" | "--operator-bin" => {
                let v = value(flag)?;
                opt.insert(match flag {
                    "--concurrency" => "concurrency",
                    "--steady-secs" => "steady",
                    "--queue-capacity" => "queue",
                    "--poll-jobs" => "poll_jobs",
                    "--poll-run-secs" => "poll_secs",
                    "--paced-jobs" => "paced",
                    "--probes" => "probes",
                    _ => "bin",
                }, v);
            }
            other => bail!("unknown argument {other:?}; see --help"),
        }
    }
    // Under `cargo test` (no --bench) without an explicit size, run the smoke.
    if !bench && n.is_none() {
        smoke = true;
    }
    let n = n.unwrap_or(if smoke { 100 } else { 1000 }).max(2);
    let num = |k: &str, d: usize| -> Result<usize> { opt.get(k).map(|v| v.parse().with_context(|| k.to_string())).transpose().map(|v| v.unwrap_or(d)) };
    Ok(Args {
        n,
        smoke,
        concurrency: num("concurrency", 16)?.max(1),
        steady_secs: num("steady", if smoke { 5 } else { 60 })? as u64,
        queue_capacity: num("queue", (n / 20).max(2))?.max(1),
        poll_jobs: num("poll_jobs", if smoke { 10 } else { n.min(100) })?.max(1),
        poll_run_secs: num("poll_secs", if smoke { 5 } else { 60 })? as u64,
        paced_jobs: num("paced", (n / 4).max(20))?.max(2),
        probes: num("probes", if smoke { 3 } else { 5 })?.max(1),
        skip,
        operator_bin: opt.get("bin").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_fljob-operator"))),
        keep,
        mode: if bench { "cargo bench" } else { "cargo test" },
    })
}

/// What every phase shares.
struct Ctx {
    args: Args,
    admin: Client,
    admin_kubeconfig: PathBuf,
    /// Every request the bench itself makes with `admin`.
    counted: Counted,
    cleanup: Cleanup,
    run: String,
    home_ns: String,
    operator_id: Identity,
    dir: PathBuf,
    ticks: f64,
}

impl Ctx {
    fn ns_name(&self, what: &str) -> String {
        format!("bench-{what}-n{}-{}", self.args.n, self.run)
    }

    fn skipped(&self, phase: &str) -> bool {
        self.args.skip.contains(phase)
    }

    async fn apiserver_metrics(&self) -> Result<String> {
        cluster::raw_get(&self.admin, "/metrics").await
    }

    /// A namespace with the Secrets, the given sites, the operator's RoleBinding and the operator itself, and
    /// the bench's watches on it.
    async fn operator_ns(&self, what: &str, sites: &[FLSite]) -> Result<(String, Operator, Timeline)> {
        let ns = self.cleanup.namespace(&self.admin, &self.ns_name(what)).await?;
        fixtures::sites(&self.admin, &ns, sites).await?;
        cluster::bind_admin(&self.admin, &ns, &self.home_ns, "fljob-operator").await?;
        let tl = Timeline::start(&self.admin, &ns).await?;
        let op = Operator::start(&self.args.operator_bin, &ns, &self.operator_id.kubeconfig, self.args.concurrency, &self.dir).await?;
        Ok((ns, op, tl))
    }

    async fn finish_ns(&self, ns: &str, op: Option<&mut Operator>) {
        if let Some(op) = op {
            op.stop();
        }
        if self.args.keep {
            return;
        }
        let wait = Duration::from_secs(60 + self.args.n as u64 / 10);
        if let Err(e) = self.cleanup.delete_namespace(&self.admin, ns, wait).await {
            eprintln!("note: deleting {ns}: {e:#}");
        }
    }
}

/// Counters at one moment.
struct Snap {
    at: Instant,
    op: Requests,
    op_text: String,
    identity: Requests,
    all: Requests,
    harness: Requests,
    cpu: Option<f64>,
}

async fn snap(ctx: &Ctx, op: &Operator) -> Result<Snap> {
    let op_text = op.metrics().await?;
    let server = ctx.apiserver_metrics().await?;
    Ok(Snap {
        at: Instant::now(),
        op: prom::operator_requests(&op_text),
        identity: ctx.operator_id.requests(&prom::dispatched_by_schema(&server)),
        all: prom::apiserver_requests(&server),
        harness: ctx.counted.snapshot(),
        cpu: prom::cpu_seconds(op.pid, ctx.ticks),
        op_text,
    })
}

/// What happened between two snapshots.
#[derive(Default, Clone)]
struct Window {
    secs: f64,
    op: Requests,
    identity: Requests,
    all: Requests,
    harness: Requests,
    cpu: Option<f64>,
    /// (controller) -> (reconciles, seconds spent in them).
    reconciles: BTreeMap<String, (f64, f64)>,
    /// FLJob status writes by phase transition ("from->to"), from the operator's `fljob_status_writes_total`.
    status_writes: BTreeMap<String, f64>,
    /// Events by reason, from the operator's `fljob_events_total`.
    events: BTreeMap<String, f64>,
}

fn window(a: &Snap, b: &Snap) -> Window {
    let mut reconciles = BTreeMap::new();
    for c in ["fljob", "flsite"] {
        let (s0, n0) = prom::histogram_sum_count(&a.op_text, "fljob_reconcile_duration_seconds", "controller", c);
        let (s1, n1) = prom::histogram_sum_count(&b.op_text, "fljob_reconcile_duration_seconds", "controller", c);
        reconciles.insert(c.to_string(), (n1 - n0, s1 - s0));
    }
    let (w0, w1) = (prom::status_writes(&a.op_text), prom::status_writes(&b.op_text));
    let status_writes = w1.iter().map(|(k, v)| (k.clone(), v - w0.get(k).copied().unwrap_or_default())).filter(|(_, v)| *v > 0.0).collect();
    let (e0, e1) = (prom::events(&a.op_text), prom::events(&b.op_text));
    let events = e1.iter().map(|(k, v)| (k.clone(), v - e0.get(k).copied().unwrap_or_default())).filter(|(_, v)| *v > 0.0).collect();
    Window {
        secs: b.at.duration_since(a.at).as_secs_f64(),
        op: prom::diff(&a.op, &b.op),
        identity: prom::diff(&a.identity, &b.identity),
        all: prom::diff(&a.all, &b.all),
        harness: prom::diff(&a.harness, &b.harness),
        cpu: a.cpu.zip(b.cpu).map(|(x, y)| y - x),
        reconciles,
        status_writes,
        events,
    }
}

fn sum_where(r: &Requests, f: impl Fn(&str, &str) -> bool) -> f64 {
    r.iter().filter(|((v, res), _)| f(v, res)).map(|(_, n)| n).sum()
}

/// Waits until the operator makes no request for `quiet` (at most `limit`): the tail of a burst (ledger
/// releases, finalizers, Events) belongs to the burst.
async fn quiesce(op: &Operator, quiet: Duration, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    let mut last = prom::operator_requests(&op.metrics().await?).values().sum::<f64>();
    let mut since = Instant::now();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = prom::operator_requests(&op.metrics().await?).values().sum::<f64>();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return Ok(());
        }
    }
    eprintln!("note: the operator kept making requests for {limit:?} after the phase; measuring anyway");
    Ok(())
}

/// Creates `items` with at most `c` creates in flight, stamping each in the timeline; a create that fails is
/// retried (up to 5 times) so that a busy API server does not lose jobs.
async fn create_all<K>(api: &Api<K>, tl: &Timeline, items: Vec<(String, K)>, c: usize) -> Result<()>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let errors: Vec<anyhow::Error> = futures::stream::iter(items)
        .map(|(key, obj)| async move {
            tl.sent(&key);
            let mut attempt = 0;
            loop {
                match api.create(&PostParams::default(), &obj).await {
                    Ok(_) => return None,
                    Err(kube::Error::Api(s)) if s.code == 409 => return None,
                    Err(e) if attempt < 5 => {
                        attempt += 1;
                        eprintln!("note: create {key} failed ({e}); retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(e) => return Some(anyhow!("create {key}: {e}")),
                }
            }
        })
        .buffer_unordered(c)
        .filter_map(|r| async move { r })
        .collect()
        .await;
    match errors.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn phase_timeout(n: usize) -> Duration {
    Duration::from_secs(120 + n as u64 / 2)
}

fn jobs_done(names: &[String]) -> impl Fn(&Seen) -> bool + '_ {
    move |s: &Seen| names.iter().all(|n| s.jobs_done.contains_key(n))
}

fn jobs_progress(names: &[String]) -> impl Fn(&Seen) -> String + '_ {
    move |s: &Seen| {
        let done = names.iter().filter(|n| s.jobs_done.contains_key(*n)).count();
        let pods = names.iter().filter(|n| s.pod_first.contains_key(*n)).count();
        format!("{done}/{} FLJobs finished, {pods} pods seen", names.len())
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Results

#[derive(Default)]
struct Raw {
    makespan: Option<f64>,
    /// API server requests per pod by everyone but the bench (scheduler, kwok, controller-manager, ...).
    cluster_per_pod: Requests,
}

#[derive(Default)]
struct Burst {
    makespan: Option<f64>,
    outcomes: BTreeMap<String, usize>,
    create_to_pod: Vec<f64>,
    phase_to_status: Vec<f64>,
    w: Window,
    hwm_mib: Option<f64>,
    rss_mib: Option<f64>,
}

#[derive(Default)]
struct Steady {
    secs: f64,
    op_writes: Option<f64>,
    identity_writes: Option<f64>,
    op_requests: Option<f64>,
}

#[derive(Default)]
struct Paced {
    rate: f64,
    jobs: usize,
    create_to_pod: Vec<f64>,
    phase_to_status: Vec<f64>,
}

#[derive(Default)]
struct Admission {
    base_c2p: Vec<f64>,
    base: Option<Window>,
    loaded_c2p: Vec<f64>,
    loaded: Option<Window>,
    queued: Option<usize>,
    bump_latency_ms: Option<f64>,
    bump: Option<Window>,
    hwm_mib: Option<f64>,
}

#[derive(Default)]
struct Poll {
    jobs: usize,
    poller: Requests,
    poller_server: Option<f64>,
    op60: Option<Window>,
    op60_jobs: usize,
}

// ---------------------------------------------------------------------------------------------------------------
// Phases

/// The physical limit: the operator's pods, created directly at the same concurrency; time to all Succeeded.
async fn raw(ctx: &Ctx) -> Result<Raw> {
    let ns = ctx.cleanup.namespace(&ctx.admin, &ctx.ns_name("raw")).await?;
    fixtures::secrets(&ctx.admin, &ns).await?;
    let tl = Timeline::start(&ctx.admin, &ns).await?;
    let site = fixtures::site("site-a", None)?;
    let names: Vec<String> = (0..ctx.args.n).map(|i| format!("raw-{i:05}")).collect();
    let pods: Vec<(String, Pod)> =
        names.iter().map(|n| Ok((n.clone(), fixtures::raw_pod(&ns, n, &site, None)?))).collect::<Result<_>>()?;
    let before = prom::apiserver_requests(&ctx.apiserver_metrics().await?);
    let h0 = ctx.counted.snapshot();
    let api: Api<Pod> = Api::namespaced(ctx.admin.clone(), &ns);
    create_all(&api, &tl, pods, ctx.args.concurrency).await?;
    tl.until(
        phase_timeout(ctx.args.n),
        "raw pods",
        |s| names.iter().all(|n| s.pods_done.contains(n)),
        |s| format!("{}/{} pods done", names.iter().filter(|n| s.pods_done.contains(*n)).count(), names.len()),
    )
    .await?;
    let makespan = tl.with(|s| s.span(&names, true)).map(|(a, b)| b.duration_since(a).as_secs_f64());
    // Let the scheduler's and kwok's tail land before counting what the cluster itself did per pod.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = prom::apiserver_requests(&ctx.apiserver_metrics().await?);
    let harness = prom::diff(&h0, &ctx.counted.snapshot());
    let mut cluster_per_pod = prom::diff(&before, &after);
    for (k, v) in harness {
        *cluster_per_pod.entry(k).or_default() -= v;
    }
    cluster_per_pod.retain(|_, v| v.abs() > 1e-9);
    for v in cluster_per_pod.values_mut() {
        *v /= ctx.args.n as f64;
    }
    drop(tl);
    ctx.finish_ns(&ns, None).await;
    Ok(Raw { makespan, cluster_per_pod })
}

/// N FLJobs at a site in a burst, then (same namespace, same operator) the steady window and the paced run.
async fn burst(ctx: &Ctx, queued: bool) -> Result<(Burst, Option<Steady>, Option<Paced>)> {
    let (what, site) = if queued {
        ("queued", fixtures::site("site-q", Some(ctx.args.queue_capacity as i32))?)
    } else {
        ("burst", fixtures::site("site-a", None)?)
    };
    let site_name = site.name_any();
    let (ns, mut op, tl) = ctx.operator_ns(what, &[site]).await?;
    let result = async {
        let names: Vec<String> = (0..ctx.args.n).map(|i| format!("job-{i:05}")).collect();
        let jobs: Vec<(String, FLJob)> =
            names.iter().map(|n| Ok((n.clone(), fixtures::job(n, &site_name, None)?))).collect::<Result<_>>()?;
        let api: Api<FLJob> = Api::namespaced(ctx.admin.clone(), &ns);
        let s0 = snap(ctx, &op).await?;
        create_all(&api, &tl, jobs, ctx.args.concurrency).await?;
        let waves = if queued { ctx.args.n.div_ceil(ctx.args.queue_capacity) as u64 * 3 } else { 0 };
        tl.until(phase_timeout(ctx.args.n) + Duration::from_secs(waves), what, jobs_done(&names), jobs_progress(&names)).await?;
        quiesce(&op, Duration::from_secs(2), Duration::from_secs(30)).await?;
        let s1 = snap(ctx, &op).await?;
        let mut b = Burst {
            makespan: tl.with(|s| s.span(&names, false)).map(|(a, b)| b.duration_since(a).as_secs_f64()),
            create_to_pod: tl.with(|s| s.create_to_pod(&names)),
            phase_to_status: tl.with(|s| s.phase_to_status(&names)),
            w: window(&s0, &s1),
            hwm_mib: prom::status_mib(op.pid, "VmHWM"),
            rss_mib: prom::status_mib(op.pid, "VmRSS"),
            ..Default::default()
        };
        tl.with(|s| {
            for n in &names {
                if let Some(p) = s.jobs_done.get(n) {
                    *b.outcomes.entry(format!("{p:?}")).or_default() += 1;
                }
            }
        });
        if queued {
            return Ok((b, None, None));
        }

        let steady = if ctx.skipped("steady") {
            None
        } else {
            let a = snap(ctx, &op).await?;
            tokio::time::sleep(Duration::from_secs(ctx.args.steady_secs)).await;
            let z = snap(ctx, &op).await?;
            let w = window(&a, &z);
            Some(Steady {
                secs: w.secs,
                op_writes: Some(sum_where(&w.op, |v, _| prom::is_write(v))),
                identity_writes: Some(sum_where(&w.identity, |v, _| prom::is_write(v))),
                op_requests: Some(w.op.values().sum()),
            })
        };

        let paced = if ctx.skipped("paced") {
            None
        } else {
            // Half of the burst's throughput: the latency targets are "at half saturation".
            let rate = b.makespan.map(|m| ctx.args.n as f64 / m / 2.0).unwrap_or(1.0).max(0.5);
            let m = ctx.args.paced_jobs;
            let pnames: Vec<String> = (0..m).map(|i| format!("paced-{i:05}")).collect();
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            let mut handles = Vec::new();
            for n in &pnames {
                tick.tick().await;
                let job = fixtures::job(n, &site_name, None)?;
                tl.sent(n);
                let api = api.clone();
                handles.push(tokio::spawn(async move { api.create(&PostParams::default(), &job).await.map(|_| ()) }));
            }
            for h in handles {
                h.await?.context("paced create")?;
            }
            tl.until(phase_timeout(m), "paced jobs", jobs_done(&pnames), jobs_progress(&pnames)).await?;
            Some(Paced {
                rate,
                jobs: m,
                create_to_pod: tl.with(|s| s.create_to_pod(&pnames)),
                phase_to_status: tl.with(|s| s.phase_to_status(&pnames)),
            })
        };
        if !op.running() {
            bail!("the operator died; log {}:\n{}", op.log.display(), op.log_tail());
        }
        Ok((b, steady, paced))
    }
    .await;
    drop(tl);
    ctx.finish_ns(&ns, Some(&mut op)).await;
    result
}

/// The cost of one more admission while another site holds N queued jobs, and of one more slot at that site.
async fn admission(ctx: &Ctx) -> Result<Admission> {
    let hold = fixtures::site("site-hold", Some(1))?;
    let free = fixtures::site("site-free", None)?;
    let (ns, mut op, tl) = ctx.operator_ns("admission", &[hold, free]).await?;
    let result = async {
        let api: Api<FLJob> = Api::namespaced(ctx.admin.clone(), &ns);
        let mut out = Admission::default();
        // One extra job at the free site at a time, each to its end: its create -> pod latency, and the operator's
        // CPU and requests for the whole job.
        let op_ref = &op;
        let probe = |tag: &'static str| {
            let (api, tl, op) = (api.clone(), &tl, op_ref);
            async move {
                let names: Vec<String> = (0..ctx.args.probes).map(|i| format!("free-{tag}-{i}")).collect();
                let s0 = snap(ctx, op).await?;
                for n in &names {
                    tl.sent(n);
                    api.create(&PostParams::default(), &fixtures::job(n, "site-free", None)?).await?;
                    let one = [n.clone()];
                    tl.until(Duration::from_secs(60), "admission probe", jobs_done(&one), jobs_progress(&one)).await?;
                }
                quiesce(op, Duration::from_secs(2), Duration::from_secs(30)).await?;
                let s1 = snap(ctx, op).await?;
                anyhow::Ok((tl.with(|s| s.create_to_pod(&names)), window(&s0, &s1)))
            }
        };
        let (c2p, w) = probe("base").await?;
        out.base_c2p = c2p;
        out.base = Some(w);

        // N jobs at the 1-job site; the first runs for ever, the rest queue behind it.
        let n = ctx.args.n;
        let names: Vec<String> = (0..n).map(|i| format!("held-{i:05}")).collect();
        let jobs: Vec<(String, FLJob)> =
            names.iter().map(|x| Ok((x.clone(), fixtures::job(x, "site-hold", Some("never"))?))).collect::<Result<_>>()?;
        create_all(&api, &tl, jobs, ctx.args.concurrency).await?;
        let queued_all = |s: &Seen| {
            s.sites.get("site-hold").and_then(|x| x.status.as_ref()).map(|st| st.queued as usize) == Some(n - 1)
                && s.pods_per_site.get("site-hold").copied() == Some(1)
        };
        tl.until(phase_timeout(n), "queueing at site-hold", queued_all, |s| {
            let q = s.sites.get("site-hold").and_then(|x| x.status.as_ref()).map(|st| st.queued);
            format!("site-hold queued = {q:?}, pods = {:?}", s.pods_per_site.get("site-hold"))
        })
        .await?;
        quiesce(&op, Duration::from_secs(2), Duration::from_secs(60)).await?;
        out.queued = tl.with(|s| s.sites.get("site-hold").and_then(|x| x.status.as_ref()).map(|st| st.queued as usize));
        let (c2p, w) = probe("loaded").await?;
        out.loaded_c2p = c2p;
        out.loaded = Some(w);

        // One more slot at the site with N-1 queued: capacity 1 -> 2, time to the second pod.
        let s0 = snap(ctx, &op).await?;
        let sites: Api<FLSite> = Api::namespaced(ctx.admin.clone(), &ns);
        let t0 = Instant::now();
        sites.patch("site-hold", &PatchParams::default(), &Patch::Merge(serde_json::json!({"spec": {"capacity": {"jobs": 2}}}))).await?;
        tl.until(Duration::from_secs(120), "capacity +1", |s| s.pods_per_site.get("site-hold").copied() >= Some(2), |s| {
            format!("site-hold pods = {:?}", s.pods_per_site.get("site-hold"))
        })
        .await?;
        out.bump_latency_ms = Some(t0.elapsed().as_secs_f64() * 1000.0);
        quiesce(&op, Duration::from_secs(2), Duration::from_secs(120)).await?;
        out.bump = Some(window(&s0, &snap(ctx, &op).await?));
        out.hwm_mib = prom::status_mib(op.pid, "VmHWM");
        anyhow::Ok(out)
    }
    .await;
    drop(tl);
    ctx.finish_ns(&ns, Some(&mut op)).await;
    result
}

/// NVFlare 2.9.0's ClientK8sJobLauncher, as a pattern: per job a credentials Secret and the pod, then one poller
/// doing GET pod every second (and listing the pod's events while it is Pending) until the pod ends; and, at the
/// same time, the same number of equally long jobs through the operator.
async fn poll(ctx: &Ctx) -> Result<Poll> {
    let p = ctx.args.poll_jobs;
    let run = ctx.args.poll_run_secs.to_string();
    let ns = ctx.cleanup.namespace(&ctx.admin, &ctx.ns_name("poll")).await?;
    fixtures::secrets(&ctx.admin, &ns).await?;
    let parent = cluster::identity(&ctx.admin, &ctx.admin_kubeconfig, &ctx.cleanup, &ctx.home_ns, "nvflare-parent", false, &ctx.dir).await?;
    cluster::bind_admin(&ctx.admin, &ns, &ctx.home_ns, "nvflare-parent").await?;
    let counted = Counted::default();
    let client = cluster::client(&parent.kubeconfig, &counted).await?;
    let site = fixtures::site("site-a", None)?;

    let operator_side = async {
        let (ons, mut op, tl) = ctx.operator_ns("op60", &[fixtures::site("site-a", None)?]).await?;
        let r = async {
            let names: Vec<String> = (0..p).map(|i| format!("long-{i:05}")).collect();
            let jobs: Vec<(String, FLJob)> =
                names.iter().map(|n| Ok((n.clone(), fixtures::job(n, "site-a", Some(&run))?))).collect::<Result<_>>()?;
            let api: Api<FLJob> = Api::namespaced(ctx.admin.clone(), &ons);
            let s0 = snap(ctx, &op).await?;
            create_all(&api, &tl, jobs, ctx.args.concurrency).await?;
            let limit = phase_timeout(p) + Duration::from_secs(ctx.args.poll_run_secs);
            tl.until(limit, "60 s jobs via the operator", jobs_done(&names), jobs_progress(&names)).await?;
            quiesce(&op, Duration::from_secs(2), Duration::from_secs(30)).await?;
            anyhow::Ok(window(&s0, &snap(ctx, &op).await?))
        }
        .await;
        drop(tl);
        ctx.finish_ns(&ons, Some(&mut op)).await;
        r
    };

    let server0 = prom::dispatched_by_schema(&ctx.apiserver_metrics().await?);
    let sem = Arc::new(tokio::sync::Semaphore::new(ctx.args.concurrency));
    let pollers = futures::future::join_all((0..p).map(|i| {
        let (client, ns, site, run, sem) = (client.clone(), ns.clone(), site.clone(), run.clone(), sem.clone());
        async move {
            let name = format!("nvf-{i:05}");
            let pod = fixtures::raw_pod(&ns, &name, &site, Some(&run))?;
            let pod_name = pod.name_any();
            {
                let _slot = sem.acquire().await?;
                let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
                let s = Secret {
                    metadata: ObjectMeta { name: Some(format!("{name}-creds")), ..Default::default() },
                    string_data: Some(BTreeMap::from([("token".to_string(), "bench".to_string())])),
                    ..Default::default()
                };
                secrets.create(&PostParams::default(), &s).await?;
                Api::<Pod>::namespaced(client.clone(), &ns).create(&PostParams::default(), &pod).await?;
            }
            let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
            let events: Api<CoreEvent> = Api::namespaced(client.clone(), &ns);
            let deadline = Instant::now() + Duration::from_secs(ctx.args.poll_run_secs + 300);
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let phase = pods.get(&pod_name).await?.status.and_then(|s| s.phase).unwrap_or_default();
                match phase.as_str() {
                    "Succeeded" | "Failed" => return anyhow::Ok(()),
                    "Pending" | "" => {
                        events.list(&ListParams::default().fields(&format!("involvedObject.name={pod_name}"))).await?;
                    }
                    _ => {}
                }
                if Instant::now() > deadline {
                    bail!("poller {name}: pod never ended");
                }
            }
        }
    }));
    let skip_op = ctx.skipped("op60");
    let (polled, op60) = if skip_op {
        (pollers.await, None)
    } else {
        let (a, b) = tokio::join!(pollers, operator_side);
        (a, Some(b?))
    };
    for r in polled {
        r?;
    }
    let server1 = prom::dispatched_by_schema(&ctx.apiserver_metrics().await?);
    let server = parent.requests(&server1).values().sum::<f64>() - parent.requests(&server0).values().sum::<f64>();
    ctx.finish_ns(&ns, None).await;
    Ok(Poll { jobs: p, poller: counted.snapshot(), poller_server: Some(server), op60, op60_jobs: p })
}

// ---------------------------------------------------------------------------------------------------------------
// The table

struct Table {
    rows: Vec<[String; 5]>,
    missing: Vec<String>,
}

fn f(v: Option<f64>, digits: usize) -> String {
    match v {
        // + 0.0 turns a -0.0 (a difference of equal sums) into 0.
        Some(x) if x.is_finite() => format!("{:.digits$}", x + 0.0),
        _ => "MISSING".into(),
    }
}

impl Table {
    fn row(&mut self, figure: &str, ours: String, reference: String, ratio: String, target: &str) {
        for cell in [&ours, &reference, &ratio] {
            if cell.contains("MISSING") {
                self.missing.push(figure.to_string());
                break;
            }
        }
        self.rows.push([figure.into(), ours, reference, ratio, target.into()]);
    }

    fn print(&self) {
        let w: Vec<usize> = (0..5).map(|i| self.rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
        let head = ["figure", "fljob-operator", "reference", "ratio", "target"];
        let line = |r: &[&str]| {
            let cells: Vec<String> = r.iter().enumerate().map(|(i, c)| format!("{c:<width$}", width = w[i].max(head[i].len()))).collect();
            println!("| {} |", cells.join(" | "));
        };
        line(&head);
        let dashes: Vec<String> = (0..5).map(|i| "-".repeat(w[i].max(head[i].len()))).collect();
        println!("|-{}-|", dashes.join("-|-"));
        for r in &self.rows {
            line(&r.iter().map(String::as_str).collect::<Vec<_>>());
        }
    }
}

fn pq(v: &[f64]) -> String {
    format!("p50 {} / p99 {} ms", f(prom::percentile(v, 50.0), 0), f(prom::percentile(v, 99.0), 0))
}

fn per(x: f64, n: usize) -> Option<f64> {
    (n > 0).then(|| x / n as f64)
}

fn writes_excl_events(r: &Requests) -> f64 {
    sum_where(r, |v, res| prom::is_write(v) && res != "events")
}

fn events(r: &Requests) -> f64 {
    sum_where(r, |v, res| prom::is_write(v) && res == "events")
}

fn gets(r: &Requests) -> f64 {
    sum_where(r, |v, _| v == "get")
}

#[allow(clippy::too_many_arguments)]
fn report(
    ctx: &Ctx,
    raw: &Option<Raw>,
    b: &Option<Burst>,
    steady: &Option<Steady>,
    paced: &Option<Paced>,
    q: &Option<Burst>,
    adm: &Option<Admission>,
    poll: &Option<Poll>,
) -> Table {
    let n = ctx.args.n;
    let mut t = Table { rows: Vec::new(), missing: Vec::new() };
    let raw_rate = raw.as_ref().and_then(|r| r.makespan).map(|m| n as f64 / m);
    let op_rate = b.as_ref().and_then(|b| b.makespan).map(|m| n as f64 / m);
    if !ctx.skipped("raw") || !ctx.skipped("burst") {
        t.row(
            &format!("makespan, {n} in a burst (1 s runs)"),
            format!("{} s", f(b.as_ref().and_then(|b| b.makespan), 1)),
            format!("raw pods {} s", f(raw.as_ref().and_then(|r| r.makespan), 1)),
            "".into(),
            "",
        );
        t.row(
            "throughput",
            format!("{} jobs/s", f(op_rate, 1)),
            format!("raw {} pods/s", f(raw_rate, 1)),
            f(op_rate.zip(raw_rate).map(|(a, r)| a / r), 2),
            ">= 0.6",
        );
    }
    if let Some(b) = b {
        let outcomes: Vec<String> = b.outcomes.iter().map(|(k, v)| format!("{k} {v}")).collect();
        t.row("outcomes", outcomes.join(", "), "".into(), "".into(), &format!("Succeeded {n}"));
        t.row("create -> pod created (burst)", pq(&b.create_to_pod), "".into(), "".into(), "");
        t.row("pod phase -> FLJob status (burst)", pq(&b.phase_to_status), "".into(), "".into(), "");
        let total_op: f64 = b.w.op.values().sum();
        let total_id: f64 = b.w.identity.values().sum();
        t.row(
            "API requests/job: operator counter vs API server",
            f(per(total_op, n), 2),
            format!("API server (operator's identity) {}", f(per(total_id, n), 2)),
            f(Some(total_op / total_id.max(1.0)), 3),
            "1.000 (agree)",
        );
        t.row(
            "writes/job excluding Events",
            f(per(writes_excl_events(&b.w.op), n), 2),
            format!("API server {}", f(per(writes_excl_events(&b.w.identity), n), 2)),
            "".into(),
            "<= 5",
        );
        t.row(
            "Events written/job",
            f(per(events(&b.w.op), n), 2),
            format!("API server {}", f(per(events(&b.w.identity), n), 2)),
            "".into(),
            "<= 2",
        );
        t.row(
            "GETs/job",
            f(per(gets(&b.w.op), n), 2),
            format!("API server {}", f(per(gets(&b.w.identity), n), 2)),
            "".into(),
            "<= 1",
        );
        t.row(
            "operator CPU/job (burst)",
            format!("{} ms", f(b.w.cpu.and_then(|c| per(c * 1000.0, n)), 2)),
            format!("{} s in {:.0} s", f(b.w.cpu, 2), b.w.secs),
            "".into(),
            "<= 2 ms",
        );
        t.row(
            &format!("operator peak RSS ({n} FLJobs + pods kept)"),
            format!("{} MiB", f(b.hwm_mib, 1)),
            format!("RSS now {} MiB", f(b.rss_mib, 1)),
            "".into(),
            "<= 64 MiB at 10,000",
        );
        let rec = |c: &str| b.w.reconciles.get(c).copied().unwrap_or_default();
        let (jn, js) = rec("fljob");
        let (sn, ss) = rec("flsite");
        t.row(
            "reconciles/job; mean reconcile time",
            format!("fljob {} x {} ms", f(per(jn, n), 2), f(Some(js * 1000.0 / jn.max(1.0)), 2)),
            format!("flsite {} x {} ms", f(per(sn, n), 3), f(Some(ss * 1000.0 / sn.max(1.0)), 2)),
            "".into(),
            "",
        );
        let mut by_transition: Vec<_> = b.w.status_writes.iter().collect();
        by_transition.sort_by(|x, y| y.1.total_cmp(x.1));
        let shown: Vec<String> = by_transition.iter().map(|(k, v)| format!("{k} {}", f(per(**v, n), 2))).collect();
        let shown = if shown.is_empty() { "MISSING".to_string() } else { shown.join(", ") };
        t.row("status writes/job by phase transition", shown, "".into(), "".into(), "<= 3 in all");
        let mut by_reason: Vec<_> = b.w.events.iter().collect();
        by_reason.sort_by(|x, y| y.1.total_cmp(x.1));
        let shown: Vec<String> = by_reason.iter().map(|(k, v)| format!("{k} {}", f(per(**v, n), 2))).collect();
        let shown = if shown.is_empty() { "MISSING".to_string() } else { shown.join(", ") };
        t.row("Events/job by reason", shown, "".into(), "".into(), "<= 2 per success");
    }
    if let Some(s) = steady {
        t.row(
            &format!("writes in {:.0} s of a steady cluster", s.secs),
            f(s.op_writes, 0),
            format!("API server {} (all requests {})", f(s.identity_writes, 0), f(s.op_requests, 0)),
            "".into(),
            "0",
        );
    }
    if let Some(p) = paced {
        t.row(
            &format!("create -> pod at half saturation ({} jobs at {:.1}/s)", p.jobs, p.rate),
            pq(&p.create_to_pod),
            "".into(),
            "".into(),
            "p99 <= 100 ms",
        );
        t.row("pod phase -> status at half saturation", pq(&p.phase_to_status), "".into(), "".into(), "p99 <= 500 ms");
    }
    if let Some(q) = q {
        let rate = q.makespan.map(|m| n as f64 / m);
        t.row(
            &format!("queued: {n} at capacity.jobs = {}", ctx.args.queue_capacity),
            format!("{} s, {} jobs/s", f(q.makespan, 1), f(rate, 1)),
            format!("ideal {} s ({} waves of ~1 s)", n.div_ceil(ctx.args.queue_capacity), n.div_ceil(ctx.args.queue_capacity)),
            "".into(),
            "",
        );
        t.row(
            "queued: requests/job; writes/job excl. Events; Events/job",
            format!("{} ; {} ; {}", f(per(q.w.op.values().sum(), n), 2), f(per(writes_excl_events(&q.w.op), n), 2), f(per(events(&q.w.op), n), 2)),
            format!("API server {}", f(per(q.w.identity.values().sum(), n), 2)),
            "".into(),
            "",
        );
        t.row(
            "queued: operator CPU/job; peak RSS",
            format!("{} ms ; {} MiB", f(q.w.cpu.and_then(|c| per(c * 1000.0, n)), 2), f(q.hwm_mib, 1)),
            format!("reconciles/job {}", f(per(q.w.reconciles.get("fljob").map(|r| r.0).unwrap_or_default(), n), 2)),
            "".into(),
            "",
        );
    }
    if let Some(a) = adm {
        let k = ctx.args.probes;
        let cpu = |w: &Option<Window>| w.as_ref().and_then(|w| w.cpu).and_then(|c| per(c * 1000.0, k));
        let req = |w: &Option<Window>| w.as_ref().and_then(|w| per(w.op.values().sum(), k));
        t.row(
            &format!("one more job at a free site, another site holding {} queued: create -> pod", a.queued.map(|q| q.to_string()).unwrap_or("?".into())),
            pq(&a.loaded_c2p),
            format!("no queue: {}", pq(&a.base_c2p)),
            f(prom::percentile(&a.loaded_c2p, 50.0).zip(prom::percentile(&a.base_c2p, 50.0)).map(|(x, y)| x / y.max(1.0)), 2),
            "flat",
        );
        t.row(
            "  ... operator CPU per extra job (whole life)",
            format!("{} ms, {} requests", f(cpu(&a.loaded), 2), f(req(&a.loaded), 1)),
            format!("no queue: {} ms, {} requests", f(cpu(&a.base), 2), f(req(&a.base), 1)),
            f(cpu(&a.loaded).zip(cpu(&a.base)).map(|(x, y)| x / y.max(0.01)), 2),
            "flat",
        );
        let bump = a.bump.as_ref();
        t.row(
            "one more slot at the site with the queue (capacity 1 -> 2): patch -> pod",
            format!("{} ms", f(a.bump_latency_ms, 0)),
            format!(
                "CPU {} ms, {} requests, {} fljob reconciles",
                f(bump.and_then(|w| w.cpu).map(|c| c * 1000.0), 1),
                f(bump.map(|w| w.op.values().sum()), 0),
                f(bump.map(|w| w.reconciles.get("fljob").map(|r| r.0).unwrap_or_default()), 0)
            ),
            "".into(),
            "O(1) in the queue",
        );
        t.row(
            &format!("operator peak RSS, {} FLJobs held (1 pod)", n),
            format!("{} MiB", f(a.hwm_mib, 1)),
            "".into(),
            "".into(),
            "",
        );
    }
    if let Some(p) = poll {
        let poll_per = per(p.poller.values().sum(), p.jobs);
        let op_per = p.op60.as_ref().and_then(|w| per(w.op.values().sum(), p.op60_jobs));
        t.row(
            &format!("API requests/job, {} jobs running {} s", p.jobs, ctx.args.poll_run_secs),
            format!("{} (writes {})", f(op_per, 2), f(p.op60.as_ref().and_then(|w| per(sum_where(&w.op, |v, _| prom::is_write(v)), p.op60_jobs)), 2)),
            format!("NVFlare polling {} (API server {})", f(poll_per, 1), f(p.poller_server.and_then(|s| per(s, p.jobs)), 1)),
            f(op_per.zip(poll_per).map(|(a, b)| a / b), 3),
            "0 polling",
        );
        let by: Vec<String> = p.poller.iter().map(|((v, r), c)| format!("{v} {r} {:.1}", c / p.jobs as f64)).collect();
        t.row("  NVFlare pattern per job, by verb", "".into(), by.join(", "), "".into(), "");
    }
    t
}

/// Requests per job by verb and resource: the operator's counter, the API server's count of the operator's identity,
/// apiserver_request_total (every client) in the same window, and the bench's own requests in it.
fn breakdown(title: &str, w: &Window, n: usize, cluster_per_pod: Option<&Requests>) {
    let mut keys: Vec<(String, String)> = w.op.keys().chain(w.identity.keys()).cloned().collect();
    for (k, v) in &w.all {
        if ["fljobs", "fljobs/status", "flsites", "flsites/status", "pods", "pods/status", "pods/binding", "secrets", "events"].contains(&k.1.as_str())
            && *v / n as f64 >= 0.01
        {
            keys.push(k.clone());
        }
    }
    keys.sort();
    keys.dedup();
    println!("\n{title}: requests per job (N = {n})");
    println!("| verb resource | operator counter | API server, operator identity | apiserver_request_total, all clients | of which the bench | cluster components per raw pod |");
    println!("|---|---|---|---|---|---|");
    let g = |r: &Requests, k: &(String, String)| r.get(k).copied().unwrap_or(0.0) / n as f64;
    for k in keys {
        println!(
            "| {} {} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
            k.0,
            k.1,
            g(&w.op, &k),
            g(&w.identity, &k),
            g(&w.all, &k),
            g(&w.harness, &k),
            cluster_per_pod.map(|c| format!("{:.2}", c.get(&k).copied().unwrap_or(0.0))).unwrap_or_default()
        );
    }
    let total = |r: &Requests| r.values().sum::<f64>() / n as f64;
    println!("| total | {:.2} | {:.2} | {:.2} | {:.2} | |", total(&w.op), total(&w.identity), total(&w.all), total(&w.harness));
}

// ---------------------------------------------------------------------------------------------------------------

async fn setup() -> Result<Ctx> {
    let args = parse_args()?;
    let admin_kubeconfig = cluster::admin_kubeconfig()?;
    let counted = Counted::default();
    let admin = cluster::client(&admin_kubeconfig, &counted).await?;
    let tools = std::env::var_os("FLJOB_TOOLS_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp/fljob-cluster/bin"));
    cluster::ensure_crds(&admin, &tools.join("kubectl"), &admin_kubeconfig).await?;
    let run: String = {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        format!("{:06x}", (nanos ^ (std::process::id() as u128) << 20) & 0xff_ffff)
    };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench").join(&run);
    let cleanup = Cleanup::default();
    let home_ns = cleanup.namespace(&admin, &format!("bench-id-{run}")).await?;
    let operator_id = cluster::identity(&admin, &admin_kubeconfig, &cleanup, &home_ns, "fljob-operator", true, &dir).await?;
    let (ticks, _) = prom::clock_ticks();
    Ok(Ctx { args, admin, admin_kubeconfig, counted, cleanup, run, home_ns, operator_id, dir, ticks })
}

async fn run(ctx: &Ctx) -> Result<bool> {
    let a = &ctx.args;
    let started = Instant::now();
    let (ticks, from_getconf) = prom::clock_ticks();
    println!(
        "fljob-operator scale bench: N = {}, concurrency {}, {} ({}), operator {}, {} CPUs, clock {} Hz{}, run {}",
        a.n,
        a.concurrency,
        if a.smoke { "smoke" } else { "full" },
        a.mode,
        a.operator_bin.display(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        ticks,
        if from_getconf { " (getconf CLK_TCK)" } else { " (assumed)" },
        ctx.run
    );
    let timed = |name: &str| {
        eprintln!("== {name} ...");
        Instant::now()
    };
    let mut errors: Vec<String> = Vec::new();
    macro_rules! phase {
        ($name:literal, $e:expr) => {
            if ctx.skipped($name) {
                None
            } else {
                let t = timed($name);
                match $e.await {
                    Ok(v) => {
                        eprintln!("== {} done in {:.0} s", $name, t.elapsed().as_secs_f64());
                        Some(v)
                    }
                    Err(e) => {
                        eprintln!("== {} FAILED: {e:#}", $name);
                        errors.push(format!("{}: {e:#}", $name));
                        None
                    }
                }
            }
        };
    }
    let raw = phase!("raw", raw(ctx));
    let burst_all = phase!("burst", burst(ctx, false));
    let (b, steady, paced) = match burst_all {
        Some((b, s, p)) => (Some(b), s, p),
        None => (None, None, None),
    };
    let q = phase!("queued", async { burst(ctx, true).await.map(|r| r.0) });
    let adm = phase!("admission", admission(ctx));
    let pl = phase!("poll", poll(ctx));

    println!();
    let t = report(ctx, &raw, &b, &steady, &paced, &q, &adm, &pl);
    t.print();
    if let Some(b) = &b {
        breakdown("burst", &b.w, a.n, raw.as_ref().map(|r| &r.cluster_per_pod));
    }
    if let Some(q) = &q {
        breakdown("queued", &q.w, a.n, None);
    }
    if let Some(w) = adm.as_ref().and_then(|x| x.bump.as_ref()) {
        breakdown("capacity 1 -> 2 at the site with the queue (per queued job)", w, a.n.saturating_sub(1).max(1), None);
    }
    for e in &errors {
        println!("\nphase failed: {e}");
    }
    println!("\nbench wall time {:.0} s", started.elapsed().as_secs_f64());
    let complete = t.missing.is_empty() && errors.is_empty();
    if !t.missing.is_empty() {
        println!("\nmissing figures: {}", t.missing.join("; "));
    }
    Ok(complete)
}

#[tokio::main]
async fn main() {
    let ctx = match setup().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("scale bench: {e:#}");
            std::process::exit(2);
        }
    };
    let outcome = run(&ctx).await;
    if !ctx.args.keep {
        ctx.cleanup.all(&ctx.admin).await;
    }
    match outcome {
        Ok(true) => {}
        Ok(false) if !ctx.args.smoke => eprintln!("scale bench: some figures are missing (see above)"),
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("scale bench: {e:#}");
            std::process::exit(1);
        }
    }
}
