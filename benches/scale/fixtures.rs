//! What the bench creates: sites with their Secrets, FLJobs, and the operator's own worker pod for the raw-pod and
//! polling runs. Built from JSON through the CRD types, so that a new optional field elsewhere does not break it.

use anyhow::{Context as _, Result};
use fljob_operator::api::{FLJob, FLSite};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

/// The startup kit Secret of every site.
pub const STARTUP: &str = "bench-startup";
/// The credentials Secret of every site.
pub const CREDS: &str = "bench-creds";

/// A site; `jobs` caps how many jobs it runs at once (None: unlimited). Workers ask for 50m CPU and 64Mi so that
/// the fake nodes' pod count (110 each), not their CPU, bounds how many run at once, for the operator and the raw
/// pods alike.
pub fn site(name: &str, jobs: Option<i32>) -> Result<FLSite> {
    let capacity = match jobs {
        Some(j) => serde_json::json!({"jobs": j}),
        None => serde_json::json!({}),
    };
    let v = serde_json::json!({
        "apiVersion": "fljob.dev/v1alpha1",
        "kind": "FLSite",
        "metadata": {"name": name},
        "spec": {
            "clientName": name,
            "server": {"target": "fl-server.example.org:8002", "scheme": "grpc"},
            "parentUrl": "tcp://site-cp:8004",
            "credentialsSecret": CREDS,
            "startupKitSecret": STARTUP,
            "defaults": {
                "image": "nvflare/nvflare:2.9.0",
                "resources": {"cpu": "50m", "memory": "64Mi"}
            },
            "capacity": capacity,
            // The bench measures throughput, not the start timeout: at N = 10,000 pods wait for the scheduler and
            // kwok's 4 x 110 pod slots longer than NVFlare's 120 s default, and those jobs would end StartTimeout.
            "pendingTimeoutSeconds": 3600
        }
    });
    serde_json::from_value(v).context("the FLSite fixture no longer matches the CRD type")
}

/// An FLJob at `site` whose worker runs `run_seconds` (kwok's `sim.fljob.dev/run-seconds`; None: kwok's default 1 s).
pub fn job(name: &str, site: &str, run_seconds: Option<&str>) -> Result<FLJob> {
    let annotations = match run_seconds {
        Some(s) => serde_json::json!({"sim.fljob.dev/run-seconds": s}),
        None => serde_json::json!({}),
    };
    let v = serde_json::json!({
        "apiVersion": "fljob.dev/v1alpha1",
        "kind": "FLJob",
        "metadata": {"name": name},
        "spec": {
            "jobId": format!("{name}-0001"),
            "site": site,
            "options": ["secure_train=false"],
            "podTemplate": {"metadata": {"annotations": annotations}}
        }
    });
    serde_json::from_value(v).context("the FLJob fixture no longer matches the CRD type")
}

/// The worker pod the operator would create for `job` at `site` in `ns` (its own builder), as a client without an
/// operator creates it: no owner (there is no FLJob), no tracking finalizer.
pub fn raw_pod(ns: &str, job_name: &str, site: &FLSite, run_seconds: Option<&str>) -> Result<Pod> {
    let mut j = job(job_name, &site.metadata.name.clone().unwrap_or_default(), run_seconds)?;
    j.metadata.namespace = Some(ns.into());
    j.metadata.uid = Some(format!("00000000-0000-4000-8000-{:012x}", fxhash(job_name)));
    let mut s = site.clone();
    s.metadata.namespace = Some(ns.into());
    let mut pod = fljob_operator::pod::build_pod(&j, &s).map_err(|e| anyhow::anyhow!("building the worker pod: {e}"))?;
    pod.metadata.owner_references = None;
    pod.metadata.finalizers = None;
    Ok(pod)
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3)) & 0xffff_ffff_ffff
}

/// Creates the site's two Secrets (placeholder values, never real credentials) in `ns`.
pub async fn secrets(client: &Client, ns: &str) -> Result<()> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    for (name, keys) in [(STARTUP, &["fed_client.json"][..]), (CREDS, &["token", "signature", "ssid"][..])] {
        let s = Secret {
            metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
            data: Some(keys.iter().map(|k| (k.to_string(), ByteString(format!("bench-{k}").into_bytes()))).collect()),
            ..Default::default()
        };
        api.create(&PostParams::default(), &s).await?;
    }
    Ok(())
}

/// Creates the Secrets and the given sites in `ns`.
pub async fn sites(client: &Client, ns: &str, sites: &[FLSite]) -> Result<()> {
    secrets(client, ns).await?;
    let api: Api<FLSite> = Api::namespaced(client.clone(), ns);
    for s in sites {
        api.create(&PostParams::default(), s).await?;
    }
    Ok(())
}
