//! No Secret value ever leaves its Secret (issue 13, item 4): a full operator run against the local control plane
//! with a known, distinctive token in every credentials Secret (the site's, two per-job ones, one lacking a key) and
//! in the startup kit, the operator logging everything at trace (RUST_LOG=trace: kube, hyper, rustls too). Jobs
//! succeed, fail, wait for a Secret key and are aborted (gracefully and by deleting the pod); then the token, raw,
//! base64-encoded (as a Secret's `data` is) and as a byte list (as `Debug` prints a `ByteString`), is searched for
//! in the operator's log, every Event of the namespace, every FLJob and FLSite (status included), every version of
//! every pod the watch saw (command, args, env values, annotations, the whole object) and /metrics.

mod common;
mod fl;

use fl::*;
use fljob_operator::api::*;
use fljob_operator::pod::{CREDENTIAL_ENV, TRANSFER_TOKEN_KEY};
use futures::TryStreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The marker every secret value carries: nothing the operator writes or prints may contain it.
const MARKER: &str = "S3cr3tM4rker";

fn value(key: &str, owner: &str) -> String {
    format!("{MARKER}-{owner}-{key}-c0ffee9d2b")
}

/// Every form in which a secret value could leak: raw, base64 (a Secret's `data`), and `Debug` of its bytes.
fn forms(values: &[String]) -> Vec<String> {
    let mut out = vec![MARKER.to_string()];
    for v in values {
        let b64 = serde_json::to_string(&ByteString(v.clone().into_bytes())).expect("base64");
        out.push(b64.trim_matches('"').to_string());
        let bytes = format!("{:?}", v.as_bytes());
        out.push(bytes[1..bytes.len() / 2].to_string()); // the first half of the list is distinctive enough
    }
    out
}

fn leaks<'a>(text: &str, forms: &'a [String]) -> Vec<&'a str> {
    forms.iter().filter(|f| text.contains(f.as_str())).map(String::as_str).collect()
}

fn secret_with(name: &str, keys: &[&str], owner: &str, values: &mut Vec<String>) -> Secret {
    let data = keys
        .iter()
        .map(|k| {
            let v = value(k, owner);
            values.push(v.clone());
            (k.to_string(), ByteString(v.into_bytes()))
        })
        .collect();
    Secret { metadata: ObjectMeta { name: Some(name.into()), ..Default::default() }, data: Some(data), ..Default::default() }
}

fn own_creds(mut j: FLJob, secret: &str) -> FLJob {
    j.spec.credentials_secret = Some(secret.into());
    j.spec.workspace_owner = Some("site-a".into());
    j
}

#[test]
fn no_secret_value_reaches_logs_events_status_pods_or_metrics() {
    // Before any thread exists: the operator runs with this filter (fl::Operator reads it), everything at trace.
    // SAFETY: this is the only test of this binary and no other thread runs yet.
    unsafe { std::env::set_var("FLJOB_OPERATOR_LOG", "trace") };
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().expect("runtime").block_on(run());
}

async fn run() {
    let started = std::time::Instant::now();
    install_crds();
    let client = common::client().await;
    let ns = common::namespace(&client, "secleak").await;
    let secrets: Api<Secret> = ns.api();
    let mut values = Vec::new();
    let keys = ["token", "signature", "ssid", TRANSFER_TOKEN_KEY];
    for s in [
        secret_with("site-a-startup", &["fed_client.json", "client.key"], "kit", &mut values),
        secret_with("site-a-creds", &keys, "site", &mut values),
        secret_with("job-own-creds", &keys, "own", &mut values),
        secret_with("job-abort-creds", &keys, "abort", &mut values),
        // Lacks ssid: the operator says which key is missing, and must say nothing about the others' values.
        secret_with("job-half-creds", &["token", "signature"], "half", &mut values),
    ] {
        secrets.create(&PostParams::default(), &s).await.expect("create secret");
    }
    let forms = forms(&values);
    let sites: Api<FLSite> = ns.api();
    sites.create(&PostParams::default(), &site(Capacity { jobs: Some(4), ..Default::default() })).await.expect("create site");

    // Every version of every pod, as the API server served it.
    let pods: Api<Pod> = ns.api();
    let seen: Arc<Mutex<Vec<Pod>>> = Arc::default();
    let pod_watch = {
        let seen = seen.clone();
        let stream = watcher(pods.clone(), watcher::Config::default()).applied_objects();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Ok(Some(p)) = stream.try_next().await {
                seen.lock().expect("lock").push(p);
            }
        })
    };

    let op = Operator::start(ns.name());
    let jobs: Api<FLJob> = ns.api();
    let env = Env { client: client.clone(), ns, op, jobs };
    let graceful = [("sim.fljob.dev/run-seconds", "never"), ("sim.fljob.dev/abort-exit-code", "0")];
    let mut stubborn = own_creds(job("abort-deleted", &[("sim.fljob.dev/run-seconds", "never")]), "job-abort-creds");
    stubborn.spec.abort_grace_period_seconds = Some(1);
    for j in [
        job("ok-site-creds", &[("sim.fljob.dev/exit-code", "0"), ("sim.fljob.dev/run-seconds", "1")]),
        own_creds(job("ok-own-creds", &[("sim.fljob.dev/exit-code", "0"), ("sim.fljob.dev/run-seconds", "1")]), "job-own-creds"),
        job("fails-102", &[("sim.fljob.dev/exit-code", "102"), ("sim.fljob.dev/run-seconds", "1")]),
        own_creds(job("abort-graceful", &graceful), "job-abort-creds"),
        stubborn,
        own_creds(job("half-creds", &[("sim.fljob.dev/exit-code", "0")]), "job-half-creds"),
    ] {
        env.create(&j).await;
    }
    for name in ["abort-graceful", "abort-deleted"] {
        wait_job(&env.jobs, name, 60, |j| st(j).phase == Phase::Running).await;
        env.jobs.patch(name, &PatchParams::default(), &Patch::Merge(serde_json::json!({"spec": {"abort": true}}))).await.expect("abort");
    }
    let mut outcomes = Vec::new();
    for (name, phase) in [
        ("ok-site-creds", Phase::Succeeded),
        ("ok-own-creds", Phase::Succeeded),
        ("fails-102", Phase::Failed),
        ("abort-graceful", Phase::Aborted),
        ("abort-deleted", Phase::Aborted),
    ] {
        let j = wait_job(&env.jobs, name, 90, finished).await;
        assert_eq!(st(&j).phase, phase, "{name}: {:#?}", st(&j));
        outcomes.push(format!("{name}={:?}/{:?}", st(&j).phase, st(&j).abort.and_then(|a| a.method)));
    }
    let half = wait_job(&env.jobs, "half-creds", 30, |j| {
        st(j).conditions.iter().any(|c| c.type_ == "Resolved" && c.status == "False" && c.message.contains("ssid"))
    })
    .await;
    assert_eq!(st(&half).phase, Phase::Pending);
    let events = env.wait_event("half-creds", "SecretNotFound:").await;
    assert!(events.iter().any(|e| e.contains("ssid")), "the Event names the missing key: {events:#?}");
    // Let the last writes (Events, the site's ledger, pod deletions) land before reading everything back.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The search finds the token where it is: in the Secrets themselves (so an empty result below means something).
    let stored = serde_json::to_string(&secrets.list(&ListParams::default()).await.expect("list secrets").items).expect("json");
    assert!(!leaks(&stored, &forms).is_empty(), "the search must find the values in the Secrets");

    let mut report = Vec::new();
    let mut check = |place: &str, text: &str| {
        let found = leaks(text, &forms);
        report.push(format!("{place}: {} bytes, {} leaks", text.len(), found.len()));
        assert!(found.is_empty(), "a secret value ({found:?}) appears in {place}:\n{}", excerpt(text, found[0]));
    };

    let log = env.op.logs();
    assert!(log.lines().count() > 50 && log.contains("DEBUG") && log.contains("TRACE"), "the operator logged at debug and trace");
    check("the operator's log", &log);

    let events: Api<k8s_openapi::api::events::v1::Event> = env.ns.api();
    let events = events.list(&ListParams::default()).await.expect("list events").items;
    assert!(events.len() >= 6, "Events were recorded: {}", events.len());
    check("the namespace's Events", &serde_json::to_string(&events).expect("json"));

    let all_jobs = env.jobs.list(&ListParams::default()).await.expect("list jobs").items;
    assert_eq!(all_jobs.len(), 6);
    check("the FLJobs (spec and status)", &serde_json::to_string(&all_jobs).expect("json"));
    let all_sites = sites.list(&ListParams::default()).await.expect("list sites").items;
    check("the FLSite (spec and status)", &serde_json::to_string(&all_sites).expect("json"));

    let pods_seen = seen.lock().expect("lock").clone();
    let names: std::collections::BTreeSet<String> = pods_seen.iter().map(|p| p.name_any()).collect();
    assert_eq!(names.len(), 5, "one pod per admitted job: {names:?}");
    for p in &pods_seen {
        let who = format!("pod {} (resourceVersion {})", p.name_any(), p.resource_version().unwrap_or_default());
        let spec = p.spec.as_ref().expect("pod spec");
        for c in &spec.containers {
            let line = c.command.iter().flatten().chain(c.args.iter().flatten()).cloned().collect::<Vec<_>>().join(" ");
            check(&format!("{who}: command and args"), &line);
            let env = c.env.clone().unwrap_or_default();
            check(&format!("{who}: env values"), &env.iter().filter_map(|e| e.value.clone()).collect::<Vec<_>>().join("\n"));
            for var in CREDENTIAL_ENV.iter().map(|(_, v)| *v).chain(["NVFL_WORKSPACE_TRANSFER_TOKEN"]) {
                let e = env.iter().find(|e| e.name == var).unwrap_or_else(|| panic!("{who}: no {var}"));
                assert!(e.value.is_none(), "{who}: {var} has a literal value");
                assert!(e.value_from.as_ref().and_then(|f| f.secret_key_ref.as_ref()).is_some(), "{who}: {var} is not a secretKeyRef");
            }
        }
        check(&format!("{who}: annotations"), &serde_json::to_string(&p.metadata.annotations).expect("json"));
        check(&format!("{who}: the whole object"), &serde_json::to_string(p).expect("json"));
    }

    let metrics = env.op.metrics().await;
    assert!(metrics.contains("fljob_"), "metrics are served");
    check("/metrics", &metrics);

    pod_watch.abort();
    eprintln!("jobs: {}", outcomes.join(", "));
    eprintln!("pods seen: {} versions of {} pods; Events: {}", pods_seen.len(), names.len(), events.len());
    for line in &report {
        if !line.contains("resourceVersion") {
            eprintln!("searched {line}");
        }
    }
    eprintln!("searched {} pod versions (command, args, env values, annotations, whole object): no leaks", pods_seen.len());
    eprintln!("token forms searched: {}; took {:.1}s", forms.len(), started.elapsed().as_secs_f64());
    env.done().await;
}

/// A few lines around the first occurrence, for the failure message.
fn excerpt(text: &str, needle: &str) -> String {
    let at = text.find(needle).unwrap_or(0);
    let start = text[..at].char_indices().rev().nth(200).map_or(0, |(i, _)| i);
    let end = text[at..].char_indices().nth(200).map_or(text.len(), |(i, _)| at + i);
    text[start..end].to_string()
}
