//! Quota pools, the abort relay, deletion, deadlines and TTL against the real local control plane: nothing leaks,
//! nothing is lost, whatever happens to the operator in between.

mod common;
mod fl;

use fl::*;
use fljob_operator::api::*;
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

fn jobs_capacity(n: i32) -> Capacity {
    Capacity { jobs: Some(n), ..Default::default() }
}

async fn abort(env: &Env, name: &str) {
    env.jobs.patch(name, &PatchParams::default(), &Patch::Merge(serde_json::json!({"spec": {"abort": true}}))).await.unwrap();
}

async fn site_status(env: &Env) -> FLSiteStatus {
    let sites: Api<FLSite> = env.ns.api();
    sites.get("site-a").await.unwrap().status.unwrap_or_default()
}

async fn wait_site(env: &Env, secs: u64, pred: impl Fn(&FLSiteStatus) -> bool + Send + 'static) -> FLSiteStatus {
    let sites: Api<FLSite> = env.ns.api();
    let s = common::wait_for(&sites, "site-a", Duration::from_secs(secs), move |s: &FLSite| pred(&s.status.clone().unwrap_or_default()))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    s.status.unwrap_or_default()
}

fn live(p: &Pod) -> bool {
    !matches!(common::phase(p), "Succeeded" | "Failed")
}

fn with_grace(mut j: FLJob, grace: i64) -> FLJob {
    j.spec.abort_grace_period_seconds = Some(grace);
    j
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_jobs_never_exceed_a_capacity_of_four() {
    let env = Env::new("quota30", jobs_capacity(4)).await;
    let max_ledger = Arc::new(AtomicUsize::new(0));
    let max_pods = Arc::new(AtomicUsize::new(0));
    let sites: Api<FLSite> = env.ns.api();
    let pods: Api<Pod> = env.ns.api();
    // Observe every change of the site's ledger and of the pods while the jobs run.
    // For each job, the number of the ledger update in which it first appeared: admission order.
    let first_seen = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<String, usize>::new()));
    // And each ledger as written, in order.
    let ledgers = Arc::new(std::sync::Mutex::new(Vec::<Vec<String>>::new()));
    let ledger_watch = {
        let max = max_ledger.clone();
        let first_seen = first_seen.clone();
        let ledgers = ledgers.clone();
        let mut updates = 0usize;
        tokio::spawn(watcher(sites, watcher::Config::default()).applied_objects().try_for_each(move |s: FLSite| {
            let st = s.status.unwrap_or_default();
            assert_eq!(st.used.jobs as usize, st.allocations.len(), "used matches the ledger");
            max.fetch_max(st.allocations.len(), Ordering::SeqCst);
            updates += 1;
            let mut seen = first_seen.lock().unwrap();
            for a in &st.allocations {
                seen.entry(a.job.clone()).or_insert(updates);
            }
            ledgers.lock().unwrap().push(st.allocations.iter().map(|a| a.job.clone()).collect::<Vec<_>>());
            async { Ok(()) }
        }))
    };
    let pod_watch = {
        let max = max_pods.clone();
        let store = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<String, bool>::new()));
        tokio::spawn(watcher(pods.clone(), watcher::Config::default()).touched_objects().try_for_each(move |p: Pod| {
            let mut m = store.lock().unwrap();
            m.insert(p.name_any(), live(&p) && p.metadata.deletion_timestamp.is_none());
            max.fetch_max(m.values().filter(|v| **v).count(), Ordering::SeqCst);
            async { Ok(()) }
        }))
    };
    for i in 0..30 {
        env.create(&job(&format!("j{i:02}"), &[("sim.fljob.dev/run-seconds", "1")])).await;
    }
    // Queued jobs say why.
    let queued = wait_job(&env.jobs, "j29", 60, |j| st(j).phase == Phase::Queued || finished(j)).await;
    if st(&queued).phase == Phase::Queued {
        let c = find_condition(&st(&queued).conditions, "Admitted").unwrap().clone();
        assert!(c.message.starts_with("waiting for quota at site site-a"), "{}", c.message);
        let why = ["short of jobs;", "ahead in the queue", "next in line"];
        assert!(why.iter().any(|w| c.message.contains(w)), "{}", c.message);
    }
    for i in 0..30 {
        let j = wait_job(&env.jobs, &format!("j{i:02}"), 240, finished).await;
        assert_eq!(st(&j).phase, Phase::Succeeded, "j{i:02}: {:#?}", st(&j));
    }
    let s = wait_site(&env, 30, |s| s.allocations.is_empty()).await;
    assert_eq!((s.used.jobs, s.queued), (0, 0));
    ledger_watch.abort();
    pod_watch.abort();
    let (ledger, pods_max) = (max_ledger.load(Ordering::SeqCst), max_pods.load(Ordering::SeqCst));
    println!("largest ledger observed: {ledger} jobs admitted at once; largest number of live pods observed: {pods_max}");
    assert!(ledger <= 4 && pods_max <= 4, "over-admitted: ledger {ledger}, live pods {pods_max}");
    assert_eq!(ledger, 4, "the pool was used to its capacity");
    // Admission followed creation order: a job admitted before one created earlier did so only beside the room the
    // earlier one keeps (a job not checked yet keeps its room, README *Quota*), never in its place. In each ledger as
    // written, the jobs in it plus the earlier jobs still waiting never exceed the capacity.
    let seen = first_seen.lock().unwrap().clone();
    let order: Vec<usize> = (0..30).map(|i| seen.get(&format!("j{i:02}")).copied().unwrap_or(usize::MAX)).collect();
    for (u, ledger) in ledgers.lock().unwrap().iter().enumerate() {
        let update = u + 1;
        let last = ledger.iter().filter_map(|n| n[1..].parse::<usize>().ok()).max().unwrap_or(0);
        let waiting_earlier = (0..last).filter(|&i| order[i] > update).count();
        assert!(
            ledger.len() + waiting_earlier <= 4,
            "update {update}: {ledger:?} took the place of {waiting_earlier} earlier jobs still waiting (first admitted at: {order:?})"
        );
    }
    let inversions = order.windows(2).filter(|w| w[0] > w[1]).count();
    println!("admission updates per job, in creation order: {order:?} ({inversions} admitted beside an earlier job's kept room)");
    let m = env.op.metrics().await;
    let per_job = |verb: &str| sum_samples(&m, "fljob_api_requests_total", &[("verb", verb)]) / 30.0;
    println!(
        "API requests per job: get {:.2}, create {:.2}, patch {:.2}, update {:.2}, delete {:.2}; list+watch in all {}",
        per_job("get"),
        per_job("create"),
        per_job("patch"),
        per_job("update"),
        per_job("delete"),
        sum_samples(&m, "fljob_api_requests_total", &[("verb", "list")]) + sum_samples(&m, "fljob_api_requests_total", &[("verb", "watch")])
    );
    for line in m.lines().filter(|l| l.starts_with("fljob_api_requests_total{")) {
        println!("  {line}");
    }
    let pods_now = pods.list(&ListParams::default()).await.unwrap().items.len();
    assert_eq!(pods_now, 30, "one pod per job, never a second");
    env.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_past_the_grace_period_deletes_the_pod() {
    let env = Env::new("abort-del", Capacity::default()).await;
    env.create(&with_grace(job("j", &[("sim.fljob.dev/run-seconds", "never")]), 2)).await;
    let j = wait_job(&env.jobs, "j", 60, |j| st(j).phase == Phase::Running).await;
    let pod = st(&j).pod_name.unwrap();
    abort(&env, "j").await;
    let j = wait_job(&env.jobs, "j", 60, |j| st(j).phase == Phase::Aborting).await;
    assert!(st(&j).abort.unwrap().requested_at.0.as_second() > 0);
    let j = wait_job(&env.jobs, "j", 60, finished).await;
    let s = st(&j);
    let a = s.abort.clone().unwrap();
    assert_eq!((s.phase, s.reason.as_deref(), s.exit_code, a.method), (Phase::Aborted, Some("Aborted"), Some(9), Some(AbortMethod::Deleted)));
    let waited = a.pod_deleted_at.unwrap().0.as_millisecond() - a.requested_at.0.as_millisecond();
    assert!(waited >= 2000, "the worker got its grace period: {waited} ms");
    let pods: Api<Pod> = env.ns.api();
    common::wait_gone(&pods, &pod, Duration::from_secs(10)).await.unwrap();
    wait_site(&env, 30, |s| s.allocations.is_empty()).await;
    env.wait_event("j", "AbortDeletingPod:").await;
    env.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_ignoring_sigterm_is_deleted_after_its_termination_grace() {
    let env = Env::new("abort-sigterm", Capacity::default()).await;
    env.create(&with_grace(job("j", &[("sim.fljob.dev/run-seconds", "never"), ("sim.fljob.dev/ignore-sigterm", "true")]), 1)).await;
    wait_job(&env.jobs, "j", 60, |j| st(j).phase == Phase::Running).await;
    abort(&env, "j").await;
    let j = wait_job(&env.jobs, "j", 60, finished).await;
    assert_eq!(st(&j).abort.unwrap().method, Some(AbortMethod::Deleted), "{:#?}", st(&j));
    env.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_pod_is_force_deleted() {
    let env = Env::new("abort-force", Capacity::default()).await;
    env.create(&with_grace(job("j", &[("sim.fljob.dev/run-seconds", "never"), ("sim.fljob.dev/stuck-terminating", "true")]), 1)).await;
    let j = wait_job(&env.jobs, "j", 60, |j| st(j).phase == Phase::Running).await;
    let pod = st(&j).pod_name.unwrap();
    abort(&env, "j").await;
    let j = wait_job(&env.jobs, "j", 60, finished).await;
    let s = st(&j);
    assert_eq!((s.phase, s.exit_code, s.abort.unwrap().method), (Phase::Aborted, Some(9), Some(AbortMethod::Forced)));
    let pods: Api<Pod> = env.ns.api();
    common::wait_gone(&pods, &pod, Duration::from_secs(10)).await.unwrap();
    wait_site(&env, 30, |s| s.allocations.is_empty()).await;
    env.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_while_queued_ends_at_once_without_a_pod() {
    let env = Env::new("abort-queued", jobs_capacity(1)).await;
    env.create(&job("first", &[("sim.fljob.dev/run-seconds", "never")])).await;
    wait_job(&env.jobs, "first", 60, |j| st(j).phase == Phase::Running).await;
    env.create(&job("second", &[])).await;
    wait_job(&env.jobs, "second", 60, |j| st(j).phase == Phase::Queued).await;
    wait_site(&env, 30, |s| s.queued == 1).await;
    abort(&env, "second").await;
    let j = wait_job(&env.jobs, "second", 30, finished).await;
    let s = st(&j);
    assert_eq!((s.phase, s.exit_code, s.abort.unwrap().method), (Phase::Aborted, Some(9), Some(AbortMethod::Graceful)));
    assert!(s.pod_name.is_none() && s.allocation.is_none());
    let site = wait_site(&env, 30, |s| s.queued == 0).await;
    assert_eq!(site.allocations.len(), 1, "the first job keeps its quota");
    env.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_while_pending_deletes_the_pod_at_once() {
    let env = Env::new("abort-pending", Capacity::default()).await;
    env.create(&job("j", &[("sim.fljob.dev/start-delay", "1h")])).await;
    let j = wait_job(&env.jobs, "j", 60, |j| st(j).phase == Phase::Starting && st(j).pod_name.is_some()).await;
    assert_eq!(st(&j).client_status.as_deref(), Some("starting"));
    abort(&env, "j").await;
    let j = wait_job(&env.jobs, "j", 30, finished).await;
    let s = st(&j);
    assert_eq!((s.phase, s.exit_code), (Phase::Aborted, Some(9)));
    let a = s.abort.unwrap();
    let took = a.completed_at.unwrap().0.as_millisecond() - a.requested_at.0.as_millisecond();
    assert!(took < 5000, "no grace period for a worker that never ran: {took} ms");
    wait_site(&env, 30, |s| s.allocations.is_empty()).await;
    env.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_completion_changes_nothing() {
    let env = Env::new("abort-late", Capacity::default()).await;
    env.create(&job("j", &[])).await;
    let before = wait_job(&env.jobs, "j", 60, finished).await;
    wait_site(&env, 30, |s| s.allocations.is_empty()).await;
    abort(&env, "j").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = env.jobs.get("j").await.unwrap();
    // The outcome never changes; the spec change is only acknowledged (observedGeneration, for kstatus).
    let outcome = |s: FLJobStatus| (s.phase, s.client_status, s.exit_code, s.reason, s.message, s.completion_time, s.abort, s.allocation);
    assert_eq!(outcome(st(&after)), outcome(st(&before)), "a finished job's outcome never changes");
    assert_eq!(st(&after).phase, Phase::Succeeded);
    assert_eq!(st(&after).observed_generation, after.metadata.generation, "the abort is acknowledged");
    env.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_racing_a_completion_ends_exactly_once() {
    let env = Env::new("abort-race", jobs_capacity(1)).await;
    for i in 0..3 {
        let name = format!("race{i}");
        env.create(&job(&name, &[("sim.fljob.dev/run-seconds", "2")])).await;
        let j = wait_job(&env.jobs, &name, 60, |j| st(j).phase == Phase::Running).await;
        let started = st(&j).start_time.unwrap().0.as_millisecond();
        let now = k8s_openapi::jiff::Timestamp::now().as_millisecond();
        // Aim the abort at the moment the worker exits.
        let wait = (started + 2000 - now - 100 * i).max(0) as u64;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        abort(&env, &name).await;
        let j = wait_job(&env.jobs, &name, 60, finished).await;
        let s = st(&j);
        assert!(matches!(s.phase, Phase::Succeeded | Phase::Aborted), "{s:#?}");
        assert!(s.exit_code.is_some());
        let site = wait_site(&env, 30, |s| s.allocations.is_empty()).await;
        assert_eq!(site.used.jobs, 0);
    }
    let pods: Api<Pod> = env.ns.api();
    assert_eq!(pods.list(&ListParams::default()).await.unwrap().items.len(), 3, "one pod per job");
    env.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_running_job_aborts_it_and_leaves_nothing_behind() {
    let env = Env::new("delete", jobs_capacity(1)).await;
    env.create(&job("j", &[("sim.fljob.dev/run-seconds", "never"), ("sim.fljob.dev/abort-exit-code", "0")])).await;
    let j = wait_job(&env.jobs, "j", 60, |j| st(j).phase == Phase::Running).await;
    let pod = st(&j).pod_name.unwrap();
    env.create(&job("next", &[])).await;
    env.jobs.delete("j", &DeleteParams::default()).await.unwrap();
    common::wait_gone(&env.jobs, "j", Duration::from_secs(60)).await.unwrap();
    let pods: Api<Pod> = env.ns.api();
    common::wait_gone(&pods, &pod, Duration::from_secs(30)).await.unwrap();
    // Its quota went back to the pool: the queued job runs.
    let next = wait_job(&env.jobs, "next", 60, finished).await;
    assert_eq!(st(&next).phase, Phase::Succeeded);
    env.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_deletes_the_finished_job_and_its_pod() {
    let env = Env::new("ttl", Capacity::default()).await;
    let mut j = job("j", &[]);
    j.spec.ttl_seconds_after_finished = Some(2);
    env.create(&j).await;
    let j = wait_job(&env.jobs, "j", 60, finished).await;
    let pod = st(&j).pod_name.unwrap();
    common::wait_gone(&env.jobs, "j", Duration::from_secs(30)).await.unwrap();
    let pods: Api<Pod> = env.ns.api();
    common::wait_gone(&pods, &pod, Duration::from_secs(30)).await.unwrap();
    assert!(site_status(&env).await.allocations.is_empty());
    env.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_killed_mid_abort_completes_it_after_restart() {
    let mut env = Env::new("abort-kill", jobs_capacity(1)).await;
    env.create(&with_grace(job("j", &[("sim.fljob.dev/run-seconds", "never")]), 4)).await;
    wait_job(&env.jobs, "j", 60, |j| st(j).phase == Phase::Running).await;
    abort(&env, "j").await;
    let j = wait_job(&env.jobs, "j", 30, |j| st(j).phase == Phase::Aborting).await;
    let requested = st(&j).abort.unwrap().requested_at;
    env.op.kill();
    tokio::time::sleep(Duration::from_secs(6)).await; // the grace period runs out while nobody watches
    env.op.restart();
    let j = wait_job(&env.jobs, "j", 60, finished).await;
    let s = st(&j);
    let a = s.abort.clone().unwrap();
    assert_eq!(a.requested_at, requested, "the timer came from status, not from memory");
    assert_eq!((s.phase, s.exit_code, a.method), (Phase::Aborted, Some(9), Some(AbortMethod::Deleted)));
    let site = wait_site(&env, 30, |s| s.allocations.is_empty()).await;
    assert_eq!(site.used.jobs, 0);
    let admitted = find_condition(&s.conditions, "Admitted").expect("Admitted condition");
    assert_eq!((admitted.status.as_str(), admitted.reason.as_str()), ("False", "Released"), "{s:#?}");
    assert!(s.allocation.is_some(), "what it was admitted with stays on record: {s:#?}");
    env.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_of_a_job_deleted_while_the_operator_was_down_is_reclaimed() {
    let mut env = Env::new("reclaim", jobs_capacity(1)).await;
    env.create(&job("gone", &[("sim.fljob.dev/run-seconds", "never")])).await;
    wait_job(&env.jobs, "gone", 60, |j| st(j).phase == Phase::Running).await;
    assert_eq!(site_status(&env).await.allocations.len(), 1);
    env.op.kill();
    // Someone removes the finalizer and deletes the FLJob while the operator is down.
    env.jobs.patch("gone", &PatchParams::default(), &Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}}))).await.unwrap();
    env.jobs.delete("gone", &DeleteParams::default()).await.unwrap();
    common::wait_gone(&env.jobs, "gone", Duration::from_secs(30)).await.unwrap();
    env.create(&job("next", &[])).await;
    env.op.restart();
    wait_site(&env, 60, |s| s.allocations.iter().all(|a| a.job != "gone")).await;
    let next = wait_job(&env.jobs, "next", 60, finished).await;
    assert_eq!(st(&next).phase, Phase::Succeeded);
    env.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowering_capacity_evicts_nothing_and_a_job_too_big_fails_at_once() {
    let env = Env::new("lower", Capacity { jobs: Some(2), gpus: Some(2), ..Default::default() }).await;
    for n in ["a", "b"] {
        env.create(&job(n, &[("sim.fljob.dev/run-seconds", "never")])).await;
        wait_job(&env.jobs, n, 60, |j| st(j).phase == Phase::Running).await;
    }
    let sites: Api<FLSite> = env.ns.api();
    sites.patch("site-a", &PatchParams::default(), &Patch::Merge(serde_json::json!({"spec": {"capacity": {"jobs": 1}}}))).await.unwrap();
    env.create(&job("c", &[])).await;
    wait_job(&env.jobs, "c", 30, |j| st(j).phase == Phase::Queued).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for n in ["a", "b"] {
        assert_eq!(st(&env.jobs.get(n).await.unwrap()).phase, Phase::Running, "{n} keeps running");
    }
    let mut big = job("big", &[]);
    big.spec.resources = Some(Resources { gpus: Some(3), cpu: None, memory: None, ephemeral_storage: None });
    env.create(&big).await;
    let j = wait_job(&env.jobs, "big", 30, finished).await;
    assert_eq!((st(&j).phase, st(&j).reason.as_deref()), (Phase::Failed, Some("ExceedsCapacity")));
    assert!(st(&j).message.unwrap().contains("gpus: needs 3"));
    env.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_abort_reaches_the_running_worker_which_keeps_running() {
    let env = Env::new("task-abort", Capacity::default()).await;
    env.create(&job("j", &[("sim.fljob.dev/run-seconds", "never")])).await;
    let j = wait_job(&env.jobs, "j", 60, |j| st(j).phase == Phase::Running).await;
    let pod = st(&j).pod_name.unwrap();
    let patch = serde_json::json!({"metadata": {"annotations": {"fljob.dev/abort-task": "round-3"}}});
    env.jobs.patch("j", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    let j = wait_job(&env.jobs, "j", 30, |j| st(j).last_task_abort.is_some()).await;
    assert_eq!(st(&j).last_task_abort.unwrap().value, "round-3");
    let pods: Api<Pod> = env.ns.api();
    // The status is recorded first, then the pod annotated.
    let p = common::wait_for(&pods, &pod, Duration::from_secs(30), |p: &Pod| p.annotations().contains_key("fljob.dev/abort-task")).await.unwrap();
    assert_eq!(p.annotations().get("fljob.dev/abort-task").map(String::as_str), Some("round-3"));
    assert!(!p.annotations().contains_key("fljob.dev/abort"), "not an App abort");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(st(&env.jobs.get("j").await.unwrap()).phase, Phase::Running);
    assert!(pods.get(&pod).await.unwrap().metadata.deletion_timestamp.is_none());
    env.wait_event("j", "TaskAbortRelayed:").await;
    env.done().await;
}


#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_site_still_counts_the_jobs_that_run() {
    let env = Env::new("site-recreate", jobs_capacity(1)).await;
    env.create(&job("running", &[("sim.fljob.dev/run-seconds", "never")])).await;
    wait_job(&env.jobs, "running", 60, |j| st(j).phase == Phase::Running).await;
    let sites: Api<FLSite> = env.ns.api();
    sites.delete("site-a", &DeleteParams::default()).await.unwrap();
    common::wait_gone(&sites, "site-a", Duration::from_secs(30)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(st(&env.jobs.get("running").await.unwrap()).phase, Phase::Running, "the job outlives its site object");
    sites.create(&kube::api::PostParams::default(), &site(jobs_capacity(1))).await.unwrap();
    let s = wait_site(&env, 30, |s| s.allocations.iter().any(|a| a.job == "running")).await;
    assert_eq!(s.used.jobs, 1);
    env.create(&job("next", &[])).await;
    wait_job(&env.jobs, "next", 30, |j| st(j).phase == Phase::Queued).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(st(&env.jobs.get("next").await.unwrap()).phase, Phase::Queued, "no over-admission");
    abort(&env, "running").await;
    let next = wait_job(&env.jobs, "next", 60, finished).await;
    assert_eq!(st(&next).phase, Phase::Succeeded);
    env.done().await;
}

/// Pausing a site (`capacity.jobs: 0`) or shrinking its pool below what queued jobs need never fails them: they wait,
/// saying why, and run once the capacity is back. Jobs created while it is paused queue too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_a_site_keeps_its_queue_and_resuming_runs_it() {
    let env = Env::new("pause", Capacity { jobs: Some(1), gpus: Some(2), ..Default::default() }).await;
    env.create(&job("running", &[("sim.fljob.dev/run-seconds", "never")])).await;
    wait_job(&env.jobs, "running", 60, |j| st(j).phase == Phase::Running).await;
    let mut gpu = job("gpu-queued", &[]);
    gpu.spec.resources = Some(Resources { gpus: Some(2), ..Default::default() });
    env.create(&gpu).await;
    wait_job(&env.jobs, "gpu-queued", 30, |j| st(j).phase == Phase::Queued).await;
    let sites: Api<FLSite> = env.ns.api();
    let set = |cap: serde_json::Value| {
        let sites = sites.clone();
        async move { sites.patch("site-a", &PatchParams::default(), &Patch::Merge(serde_json::json!({"spec": {"capacity": cap}}))).await.unwrap() }
    };
    set(serde_json::json!({"jobs": 0, "gpus": 1})).await;
    env.create(&job("while-paused", &[])).await;
    wait_job(&env.jobs, "while-paused", 30, |j| st(j).phase == Phase::Queued).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let q = env.jobs.get("gpu-queued").await.unwrap();
    assert_eq!(st(&q).phase, Phase::Queued, "a queued job is never failed by a smaller pool: {:#?}", st(&q));
    let admitted = st(&q).conditions.into_iter().find(|c| c.type_ == "Admitted").unwrap();
    assert_eq!(admitted.reason, "ExceedsCapacityNow", "{admitted:?}");
    assert!(admitted.message.contains("gpus: needs 2"), "{admitted:?}");
    assert_eq!(st(&env.jobs.get("running").await.unwrap()).phase, Phase::Running, "pausing evicts nothing");
    // Resume: abort the long one and raise the capacity; the queue drains in order.
    env.jobs.patch("running", &PatchParams::default(), &Patch::Merge(serde_json::json!({"spec": {"abort": true}}))).await.unwrap();
    set(serde_json::json!({"jobs": 1, "gpus": 2})).await;
    for n in ["gpu-queued", "while-paused"] {
        let j = wait_job(&env.jobs, n, 90, finished).await;
        assert_eq!(st(&j).phase, Phase::Succeeded, "{n}: {:#?}", st(&j));
    }
    env.done().await;
}

/// The namespace refuses the pod: a used-up ResourceQuota is temporary (condition + Event with the API server's
/// message, retried with backoff, and the job runs once the quota allows), a LimitRange breach is permanent (the job
/// fails with the message). Other jobs are not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_refused_by_the_namespace_is_reported_and_retried_or_failed() {
    let env = Env::new("refused", Capacity::default()).await;
    let quotas: Api<k8s_openapi::api::core::v1::ResourceQuota> = env.ns.api();
    let rq = |pods: &str| serde_json::from_value::<k8s_openapi::api::core::v1::ResourceQuota>(serde_json::json!(
        {"metadata": {"name": "pods"}, "spec": {"hard": {"pods": pods}}})).unwrap();
    quotas.create(&kube::api::PostParams::default(), &rq("0")).await.unwrap();
    env.create(&job("waits", &[])).await;
    let j = wait_job(&env.jobs, "waits", 60, |j| {
        st(j).conditions.iter().any(|c| c.type_ == "Started" && c.reason == "PodRefused")
    })
    .await;
    let c = st(&j).conditions.into_iter().find(|c| c.type_ == "Started").unwrap();
    assert!(c.message.contains("exceeded quota"), "{c:?}");
    assert!(!finished(&j), "a used-up quota does not fail the job: {:#?}", st(&j));
    env.wait_event("waits", "PodRefused:").await;
    // Free the quota: the retry (with backoff) creates the pod and the job runs.
    quotas.replace("pods", &kube::api::PostParams::default(), &{
        let mut q = quotas.get("pods").await.unwrap();
        q.spec = rq("10").spec;
        q
    }).await.unwrap();
    let j = wait_job(&env.jobs, "waits", 90, finished).await;
    assert_eq!(st(&j).phase, Phase::Succeeded, "{:#?}", st(&j));

    let limits: Api<k8s_openapi::api::core::v1::LimitRange> = env.ns.api();
    limits.create(&kube::api::PostParams::default(), &serde_json::from_value(serde_json::json!(
        {"metadata": {"name": "max"}, "spec": {"limits": [{"type": "Container", "max": {"cpu": "500m"}}]}})).unwrap()).await.unwrap();
    env.create(&job("too-big", &[])).await;
    let j = wait_job(&env.jobs, "too-big", 60, finished).await;
    let s = st(&j);
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Failed, Some("ConfigError")), "{s:#?}");
    assert!(s.message.as_deref().unwrap_or("").contains("maximum cpu usage"), "{s:#?}");
    let sites: Api<FLSite> = env.ns.api();
    let drained = |s: &FLSite| s.status.as_ref().is_some_and(|st| st.allocations.is_empty());
    common::wait_for(&sites, "site-a", Duration::from_secs(30), drained).await.expect("its quota is released");
    env.done().await;
}
