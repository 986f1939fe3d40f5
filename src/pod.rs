//! Pure: an FLJob and its FLSite -> the worker Pod.
//!
//! The pod is what NVFlare 2.9's own Kubernetes launcher runs, with our entry point in front: an emptyDir workspace
//! that the worker fills from its client parent at start (NVFlare's workspace transfer: `local/`, the app,
//! `meta.json`) and whose results it uploads at the end, the startup kit from a Secret, credentials and the transfer
//! token from the per-job Secret, `PYTHONPATH` to the app's `custom/`, and the downward-API file the entry point
//! reads aborts from. No mount lands inside the workspace's job folder: the transfer must be able to write it.

use crate::api::{DEFAULT_PYTHON, FLJob, FLSite, Resources};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, DownwardAPIVolumeFile, DownwardAPIVolumeSource,
    EmptyDirVolumeSource, EnvVar, EnvVarSource, ObjectFieldSelector, PersistentVolumeClaimVolumeSource, Pod,
    PodSecurityContext, PodSpec, ResourceRequirements, SeccompProfile, SecretKeySelector, SecretVolumeSource,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Label every object the operator creates carries; the pod watch selects on it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "fljob-operator";
/// Label naming the FLJob of a pod.
pub const JOB_LABEL: &str = "fljob.dev/job";
/// Label naming the FLSite of a pod.
pub const SITE_LABEL: &str = "fljob.dev/site";
/// Where the downward-API volume with the pod's annotations is mounted: the worker reads aborts here.
pub const INFO_DIR: &str = "/etc/fljob";
/// The worker container's name.
pub const CONTAINER: &str = "worker";
/// The finalizer on every worker pod (the batch Job controller's `job-tracking` idea): the pod cannot vanish before
/// the operator has recorded how it ended, so a worker that finished while the operator was down is never taken for
/// one that never ran, and never started twice. The operator removes it once the job's end is in its status.
pub const TRACKING_FINALIZER: &str = "fljob.dev/pod-tracking";
/// NVFlare's worker module.
pub const WORKER_MODULE: &str = "nvflare.private.fed.app.client.worker_process";
/// The default module the container runs: fljob-launcher's entry point, which runs [`WORKER_MODULE`] in-process.
pub const ENTRY_MODULE: &str = "fljob_launcher.worker";
/// Key of the credentials Secret holding NVFlare's workspace transfer token (optional: only with a parent).
pub const TRANSFER_TOKEN_KEY: &str = "transferToken";
/// Keys of the credentials Secret and the environment variables they become.
pub const CREDENTIAL_ENV: [(&str, &str); 3] = [
    ("token", "NVFLARE_JOB_AUTH_TOKEN"),
    ("signature", "NVFLARE_JOB_TOKEN_SIGNATURE"),
    ("ssid", "NVFLARE_JOB_SSID"),
];
/// The UID the worker runs as: the restricted Pod Security profile needs a non-root user.
const WORKER_UID: i64 = 1000;

/// Why a pod could not be built from the objects as they are.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BuildError {
    /// Neither the job nor its site names an image.
    #[error("no worker image: set spec.image on the FLJob or spec.defaults.image on FLSite {0}")]
    NoImage(String),
    /// Neither the job nor its site names a credentials Secret.
    #[error("no credentials Secret: set spec.credentialsSecret on the FLJob or on FLSite {0}")]
    NoCredentials(String),
}

/// The worker pod's name: derived from the FLJob's name and uid, at most 63 characters, unique per FLJob object
/// (a re-created FLJob of the same name never collides with the old one's terminating pod).
pub fn pod_name(job: &FLJob) -> String {
    let uid = job.uid().unwrap_or_default();
    let digest = Sha256::digest(uid.as_bytes());
    let suffix: String = digest.iter().take(3).map(|b| format!("{b:02x}")).collect::<String>()[..5].to_string();
    let name = job.name_any();
    let mut prefix: String = name.chars().take(63 - 1 - suffix.len()).collect();
    while prefix.ends_with(['-', '.']) {
        prefix.pop();
    }
    format!("{prefix}-{suffix}")
}

/// Volume types a job's `podTemplate` may use: those the restricted Pod Security profile allows.
pub const ALLOWED_VOLUME_KINDS: [&str; 8] =
    ["configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"];

/// The first thing in a job's `podTemplate` its site's `podPolicy` does not allow, as a sentence naming the field and
/// the rule that would allow it. Checked before a job is admitted: the pod never exists.
pub fn policy_violation(job: &FLJob, site: &FLSite) -> Option<String> {
    let policy = &site.spec.pod_policy;
    let tspec = job.spec.pod_template.as_ref()?.spec.as_ref()?;
    let site_name = site.name_any();
    let rule = |r: &str| format!("FLSite {site_name} spec.podPolicy.{r}");
    if let Some(sa) = &tspec.service_account_name
        && !policy.allowed_service_accounts.iter().any(|a| a == sa)
    {
        return Some(format!(
            "spec.podTemplate.spec.serviceAccountName {sa:?} is not allowed at this site; remove it, or add it to {}",
            rule("allowedServiceAccounts")
        ));
    }
    for v in &tspec.volumes {
        let name = &v.name;
        if v.secret.is_some() && !policy.allow_secret_volumes {
            return Some(format!("spec.podTemplate.spec.volumes[{name}] mounts a Secret; remove it, or set {}: true", rule("allowSecretVolumes")));
        }
        if v.host_path.is_some() && !policy.allow_host_path {
            return Some(format!("spec.podTemplate.spec.volumes[{name}] is a hostPath; remove it, or set {}: true", rule("allowHostPath")));
        }
        // Only the volume types the restricted Pod Security profile allows (and hostPath, if the site said so): an
        // nfs, iscsi, gitRepo, ... volume would reach past the pod.
        let kinds: Vec<String> = serde_json::to_value(v)
            .ok()
            .and_then(|j| j.as_object().map(|o| o.keys().filter(|k| *k != "name").cloned().collect()))
            .unwrap_or_default();
        if let Some(kind) = kinds.iter().find(|k| !(ALLOWED_VOLUME_KINDS.contains(&k.as_str()) || k.as_str() == "hostPath" && policy.allow_host_path)) {
            return Some(format!(
                "spec.podTemplate.spec.volumes[{name}] is a {kind} volume, which no site allows (the restricted Pod Security profile forbids it); use one of: {}",
                ALLOWED_VOLUME_KINDS.join(", ")
            ));
        }
        for src in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if src.secret.is_some() && !policy.allow_secret_volumes {
                return Some(format!("spec.podTemplate.spec.volumes[{name}] projects a Secret; remove it, or set {}: true", rule("allowSecretVolumes")));
            }
            if src.service_account_token.is_some() && !policy.allow_token_volumes {
                return Some(format!(
                    "spec.podTemplate.spec.volumes[{name}] projects a ServiceAccount token; remove it, or set {}: true",
                    rule("allowTokenVolumes")
                ));
            }
        }
    }
    for e in &tspec.env {
        if e.value_from.as_ref().is_some_and(|f| f.secret_key_ref.is_some()) && !policy.allow_secret_env {
            return Some(format!("spec.podTemplate.spec.env[{}] reads a Secret; remove it, or set {}: true", e.name, rule("allowSecretEnv")));
        }
    }
    None
}

/// The resources a job asks for: its own, else its site's defaults.
pub fn effective_resources(job: &FLJob, site: &FLSite) -> Resources {
    job.spec.resources.clone().or_else(|| site.spec.defaults.resources.clone()).unwrap_or_default()
}

/// The name of the credentials Secret a job uses.
pub fn credentials_secret(job: &FLJob, site: &FLSite) -> Option<String> {
    job.spec.credentials_secret.clone().or_else(|| site.spec.credentials_secret.clone())
}

/// The name of the per-job credentials Secret NVFlare's launcher (fljob_launcher) writes for an FLJob, just before
/// it creates the FLJob: `<fljob>-creds`.
pub fn per_job_secret_name(job: &FLJob) -> String {
    format!("{}-creds", job.name_any())
}

/// Whether the job's credentials are its own per-job Secret (named after the FLJob, as the launcher writes it).
/// The operator does not read such a Secret: its name cannot be known when the chart's Role is written, so a
/// least-privilege Role (`rbac.secretNames`) lists only the sites' Secrets; the launcher wrote it before the FLJob,
/// and if it is missing or lacks a key, the kubelet says so (CreateContainerConfigError -> ConfigError). Naming it
/// after the FLJob also means a job cannot borrow another job's credentials this way.
pub fn uses_per_job_secret(job: &FLJob) -> bool {
    job.spec.credentials_secret.as_deref() == Some(per_job_secret_name(job).as_str())
}

fn labels(job: &FLJob) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        ("app.kubernetes.io/name".to_string(), "nvflare-worker".to_string()),
        (JOB_LABEL.to_string(), job.name_any()),
        (SITE_LABEL.to_string(), job.spec.site.clone()),
    ])
}

fn owned_meta(job: &FLJob, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: job.namespace(),
        labels: Some(labels(job)),
        owner_references: job.controller_owner_ref(&()).map(|r| vec![r]),
        finalizers: Some(vec![TRACKING_FINALIZER.to_string()]),
        ..ObjectMeta::default()
    }
}

/// The exact NVFlare 2.9 worker command line (behind the site's worker module, by default our entry point, which
/// hands these arguments to NVFlare's unchanged). Credentials are never on it: they travel as environment variables.
pub fn worker_command(job: &FLJob, site: &FLSite) -> Vec<String> {
    let s = &site.spec;
    let ws = s.workspace.mount_path.trim_end_matches('/').to_string();
    let python = s.defaults.python_path.clone().unwrap_or_else(|| DEFAULT_PYTHON.to_string());
    let module = s.defaults.worker_module.clone().unwrap_or_else(|| ENTRY_MODULE.to_string());
    let mut cmd: Vec<String> = vec![python, "-u".into(), "-m".into(), module];
    let mut flag = |f: &str, v: String| {
        cmd.push(f.to_string());
        cmd.push(v);
    };
    flag("-m", ws.clone());
    flag("-w", format!("{ws}/startup"));
    flag("-n", job.spec.job_id.clone());
    flag("-c", s.client_name.clone());
    flag("-p", s.parent_url.clone());
    flag("-g", s.server.target.clone());
    flag("-scheme", s.server.scheme.as_str().to_string());
    if let Some(sec) = &s.parent_conn_sec {
        flag("--parent_conn_sec", sec.clone());
    }
    flag("-s", "fed_client.json".into());
    cmd.push("--set".into());
    cmd.extend(job.spec.options.iter().cloned());
    cmd.push("print_conf=True".into());
    cmd
}

fn requirements(res: &Resources) -> ResourceRequirements {
    let mut amounts = BTreeMap::new();
    if let Some(cpu) = &res.cpu {
        amounts.insert("cpu".to_string(), cpu.clone());
    }
    if let Some(mem) = &res.memory {
        amounts.insert("memory".to_string(), mem.clone());
    }
    if let Some(g) = res.gpus.filter(|g| *g > 0) {
        amounts.insert("nvidia.com/gpu".to_string(), Quantity(g.to_string()));
    }
    if let Some(storage) = &res.ephemeral_storage {
        amounts.insert("ephemeral-storage".to_string(), storage.clone());
    }
    ResourceRequirements { requests: Some(amounts.clone()), limits: Some(amounts), ..Default::default() }
}

/// The worker pod. Pure: the same inputs always give the same pod.
pub fn build_pod(job: &FLJob, site: &FLSite) -> Result<Pod, BuildError> {
    let site_name = site.name_any();
    let image = job.spec.image.clone().unwrap_or_else(|| site.spec.defaults.image.clone());
    if image.is_empty() {
        return Err(BuildError::NoImage(site_name));
    }
    let creds = credentials_secret(job, site).ok_or_else(|| BuildError::NoCredentials(site_name.clone()))?;
    let ws = site.spec.workspace.mount_path.trim_end_matches('/').to_string();
    let template = job.spec.pod_template.clone().unwrap_or_default();
    let tmeta = template.metadata.unwrap_or_default();
    let tspec = template.spec.unwrap_or_default();

    let mut env: Vec<EnvVar> = CREDENTIAL_ENV
        .iter()
        .map(|(key, var)| EnvVar {
            name: var.to_string(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector { name: creds.clone(), key: key.to_string(), optional: Some(false) }),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    env.push(EnvVar {
        name: "NVFL_WORKSPACE_TRANSFER_TOKEN".into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector { name: creds.clone(), key: TRANSFER_TOKEN_KEY.into(), optional: Some(true) }),
            ..Default::default()
        }),
        ..Default::default()
    });
    if let Some(owner) = &job.spec.workspace_owner {
        env.push(EnvVar { name: "NVFL_WORKSPACE_OWNER_FQCN".into(), value: Some(owner.clone()), ..Default::default() });
    }
    let custom = format!("{ws}/{}/app_{}/custom", job.spec.job_id, site.spec.client_name);
    env.push(EnvVar { name: "PYTHONPATH".into(), value: Some(custom), ..Default::default() });
    env.push(EnvVar { name: "PYTHONUNBUFFERED".into(), value: Some("1".into()), ..Default::default() });
    env.push(EnvVar { name: "FLJOB_INFO_DIR".into(), value: Some(INFO_DIR.into()), ..Default::default() });
    let reserved = |name: &str| {
        name.starts_with("NVFLARE_JOB_") || name.starts_with("NVFL_WORKSPACE_") || name == "PYTHONPATH" || name == "FLJOB_INFO_DIR"
    };
    env.extend(tspec.env.iter().filter(|e| !reserved(&e.name)).cloned());
    // What the site admitted, not what the spec says now: a later edit must not grow the pod past its allocation.
    // (Ephemeral storage is not counted in the pool: it comes from the spec.)
    let asked = effective_resources(job, site);
    let res = match job.status.as_ref().and_then(|st| st.allocation.clone()) {
        Some(admitted) => Resources { ephemeral_storage: asked.ephemeral_storage, ..admitted },
        None => asked,
    };

    let workspace_volume = match &site.spec.workspace.persistent_volume_claim {
        Some(claim) => Volume {
            name: "workspace".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource { claim_name: claim.clone(), read_only: Some(false) }),
            ..Default::default()
        },
        None => Volume {
            name: "workspace".into(),
            empty_dir: Some(EmptyDirVolumeSource { size_limit: res.ephemeral_storage.clone(), ..Default::default() }),
            ..Default::default()
        },
    };
    let mut volumes = vec![
        workspace_volume,
        Volume {
            name: "startup-kit".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(site.spec.startup_kit_secret.clone()),
                default_mode: Some(0o440),
                optional: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "fljob-info".into(),
            downward_api: Some(DownwardAPIVolumeSource {
                items: Some(vec![
                    DownwardAPIVolumeFile {
                        path: "annotations".into(),
                        field_ref: Some(ObjectFieldSelector { field_path: "metadata.annotations".into(), ..Default::default() }),
                        ..Default::default()
                    },
                    DownwardAPIVolumeFile {
                        path: "labels".into(),
                        field_ref: Some(ObjectFieldSelector { field_path: "metadata.labels".into(), ..Default::default() }),
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    volumes.extend(tspec.volumes.iter().cloned());
    let mut mounts = vec![
        VolumeMount { name: "workspace".into(), mount_path: ws.clone(), ..Default::default() },
        VolumeMount { name: "startup-kit".into(), mount_path: format!("{ws}/startup"), read_only: Some(true), ..Default::default() },
        VolumeMount { name: "fljob-info".into(), mount_path: INFO_DIR.into(), read_only: Some(true), ..Default::default() },
    ];
    mounts.extend(tspec.volume_mounts.iter().cloned());

    let mut pod_labels = tmeta.labels.clone();
    pod_labels.extend(labels(job));
    let mut annotations = tmeta.annotations.clone();
    annotations.retain(|k, _| !k.starts_with("fljob.dev/"));
    annotations.insert("fljob.dev/job-id".into(), job.spec.job_id.clone());

    let container = Container {
        name: CONTAINER.into(),
        image: Some(image),
        command: Some(worker_command(job, site)),
        working_dir: Some(ws.clone()),
        env: Some(env),
        resources: Some(requirements(&res)),
        volume_mounts: Some(mounts),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
            run_as_non_root: Some(true),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
            ..Default::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    };
    let mut metadata = owned_meta(job, pod_name(job));
    metadata.labels = Some(pod_labels);
    metadata.annotations = Some(annotations);
    Ok(Pod {
        metadata,
        spec: Some(PodSpec {
            containers: vec![container],
            restart_policy: Some("Never".into()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            service_account_name: tspec.service_account_name.clone(),
            node_selector: (!tspec.node_selector.is_empty()).then(|| tspec.node_selector.clone()),
            tolerations: (!tspec.tolerations.is_empty()).then(|| tspec.tolerations.clone()),
            affinity: tspec.affinity.clone(),
            priority_class_name: tspec.priority_class_name.clone(),
            termination_grace_period_seconds: tspec.termination_grace_period_seconds,
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(WORKER_UID),
                run_as_group: Some(WORKER_UID),
                fs_group: Some(WORKER_UID),
                seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
                ..Default::default()
            }),
            volumes: Some(volumes),
            ..Default::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Capacity, PodTemplate, PodTemplateSpec, Quantity};
    use crate::testing::{mk_job, mk_site};

    fn job_and_site() -> (FLJob, FLSite) {
        let mut job = mk_job("train-7", "site-a");
        job.spec.job_id = "3f2a9c10".into();
        job.spec.options = vec!["secure_train=true".into()];
        job.spec.resources = Some(Resources { cpu: Some(Quantity("2".into())), memory: Some(Quantity("8Gi".into())), gpus: Some(1), ..Default::default() });
        let mut site = mk_site("site-a", Capacity::default());
        site.spec.parent_conn_sec = Some("clear".into());
        site.spec.defaults.python_path = Some("/usr/local/bin/python".into());
        (job, site)
    }

    #[test]
    fn command_line_is_nvflares_exactly() {
        let (job, site) = job_and_site();
        let expected = "/usr/local/bin/python -u -m fljob_launcher.worker \
            -m /var/tmp/nvflare/workspace -w /var/tmp/nvflare/workspace/startup -n 3f2a9c10 -c site-a \
            -p tcp://site-cp:8004 -g fl-server:8002 -scheme grpc --parent_conn_sec clear -s fed_client.json \
            --set secure_train=true print_conf=True";
        assert_eq!(worker_command(&job, &site).join(" "), expected);
    }

    #[test]
    fn pod_shape() {
        let (job, site) = job_and_site();
        let pod = build_pod(&job, &site).unwrap();
        let name = pod.metadata.name.clone().unwrap();
        assert!(name.starts_with("train-7-") && name.len() <= 63);
        let labels = pod.metadata.labels.clone().unwrap();
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(labels[JOB_LABEL], "train-7");
        assert_eq!(labels[SITE_LABEL], "site-a");
        let owner = &pod.metadata.owner_references.clone().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.controller), ("FLJob", Some(true)));
        let spec = pod.spec.unwrap();
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.automount_service_account_token, Some(false));
        let c = &spec.containers[0];
        let res = c.resources.clone().unwrap();
        assert_eq!(res.requests, res.limits);
        assert_eq!(res.limits.unwrap()["nvidia.com/gpu"], Quantity("1".into()));
        // Credentials only through secretKeyRef; never a literal value.
        let env = c.env.clone().unwrap();
        for (key, var) in CREDENTIAL_ENV {
            let e = env.iter().find(|e| e.name == var).unwrap();
            assert!(e.value.is_none());
            let r = e.value_from.clone().unwrap().secret_key_ref.unwrap();
            assert_eq!((r.name.as_str(), r.key.as_str()), ("site-a-creds", key));
        }
        let mounts = c.volume_mounts.clone().unwrap();
        let at = |p: &str| mounts.iter().find(|m| m.mount_path == p).unwrap().clone();
        assert_eq!(at("/var/tmp/nvflare/workspace/startup").read_only, Some(true));
        // Nothing is mounted inside the workspace but the startup kit: the transfer writes <jobId>/ itself.
        assert!(mounts.iter().all(|m| m.mount_path == "/var/tmp/nvflare/workspace/startup" || !m.mount_path.starts_with("/var/tmp/nvflare/workspace/")), "{mounts:?}");
        let var = |n: &str| env.iter().find(|e| e.name == n).unwrap_or_else(|| panic!("no {n}")).clone();
        assert_eq!(var("PYTHONPATH").value.as_deref(), Some("/var/tmp/nvflare/workspace/3f2a9c10/app_site-a/custom"));
        let token = var("NVFL_WORKSPACE_TRANSFER_TOKEN").value_from.unwrap().secret_key_ref.unwrap();
        assert_eq!((token.key.as_str(), token.optional), (TRANSFER_TOKEN_KEY, Some(true)));
        assert!(env.iter().all(|e| e.name != "NVFL_WORKSPACE_OWNER_FQCN"), "no owner: no transfer");
        assert_eq!(at(INFO_DIR).name, "fljob-info");
        let sc = c.security_context.clone().unwrap();
        assert_eq!((sc.allow_privilege_escalation, sc.run_as_non_root), (Some(false), Some(true)));
        assert_eq!(sc.capabilities.unwrap().drop, Some(vec!["ALL".to_string()]));
    }

    #[test]
    fn names_are_deterministic_short_and_unique_per_object() {
        let (mut job, _) = job_and_site();
        job.metadata.name = Some("x".repeat(63));
        let a = pod_name(&job);
        assert_eq!(a, pod_name(&job));
        assert!(a.len() <= 63, "{a}");
        job.metadata.uid = Some("another-uid".into());
        assert_ne!(a, pod_name(&job), "a re-created FLJob never reuses the old pod's name");
    }

    #[test]
    fn template_cannot_override_credentials() {
        let (mut job, site) = job_and_site();
        job.spec.pod_template = Some(PodTemplate {
            metadata: None,
            spec: Some(PodTemplateSpec {
                env: vec![k8s_openapi::api::core::v1::EnvVar { name: "NVFLARE_JOB_AUTH_TOKEN".into(), value: Some("x".into()), ..Default::default() }],
                ..Default::default()
            }),
        });
        let pod = build_pod(&job, &site).unwrap();
        let env = pod.spec.unwrap().containers[0].env.clone().unwrap();
        assert_eq!(env.iter().filter(|e| e.name == "NVFLARE_JOB_AUTH_TOKEN").count(), 1);
        assert!(env.iter().all(|e| e.value.as_deref() != Some("x")));
    }

    #[test]
    fn missing_credentials_are_a_build_error() {
        let (job, mut site) = job_and_site();
        site.spec.credentials_secret = None;
        assert_eq!(build_pod(&job, &site), Err(BuildError::NoCredentials("site-a".into())));
    }

    #[test]
    fn workspace_owner_and_ephemeral_storage() {
        let (mut job, site) = job_and_site();
        job.spec.workspace_owner = Some("site-a".into());
        job.spec.resources.as_mut().unwrap().ephemeral_storage = Some(Quantity("20Gi".into()));
        let pod = build_pod(&job, &site).unwrap();
        let spec = pod.spec.unwrap();
        let env = spec.containers[0].env.clone().unwrap();
        let owner = env.iter().find(|e| e.name == "NVFL_WORKSPACE_OWNER_FQCN").unwrap();
        assert_eq!(owner.value.as_deref(), Some("site-a"));
        let limits = spec.containers[0].resources.clone().unwrap().limits.unwrap();
        assert_eq!(limits["ephemeral-storage"], Quantity("20Gi".into()));
        let ws = spec.volumes.unwrap().into_iter().find(|v| v.name == "workspace").unwrap();
        assert_eq!(ws.empty_dir.unwrap().size_limit, Some(Quantity("20Gi".into())));
    }

    #[test]
    fn pod_is_built_from_the_admitted_allocation_not_the_current_spec() {
        let (mut job, site) = job_and_site();
        let admitted = Resources { cpu: Some(Quantity("1".into())), memory: Some(Quantity("1Gi".into())), gpus: None, ..Default::default() };
        job.status = Some(crate::api::FLJobStatus { allocation: Some(admitted), ..Default::default() });
        // spec.resources says 2 CPUs, 8Gi, 1 GPU; the site admitted 1 CPU and 1Gi.
        let pod = build_pod(&job, &site).unwrap();
        let limits = pod.spec.unwrap().containers[0].resources.clone().unwrap().limits.unwrap();
        assert_eq!(limits.get("cpu"), Some(&Quantity("1".into())));
        assert_eq!(limits.get("memory"), Some(&Quantity("1Gi".into())));
        assert!(!limits.contains_key("nvidia.com/gpu"));
    }

    #[test]
    fn site_policy_denies_by_default_and_allows_what_it_lists() {
        use k8s_openapi::api::core::v1::{EnvVarSource, HostPathVolumeSource, ProjectedVolumeSource, ServiceAccountTokenProjection, VolumeProjection};
        let (mut job, mut site) = job_and_site();
        assert_eq!(policy_violation(&job, &site), None, "no template, nothing to check");
        fn spec(job: &mut FLJob) -> &mut crate::api::PodTemplateSpec {
            job.spec.pod_template.get_or_insert_with(Default::default).spec.get_or_insert_with(Default::default)
        }
        spec(&mut job).service_account_name = Some("cluster-admin-ish".into());
        let v = policy_violation(&job, &site).unwrap();
        assert!(v.contains("serviceAccountName") && v.contains("allowedServiceAccounts"), "{v}");
        site.spec.pod_policy.allowed_service_accounts = vec!["cluster-admin-ish".into()];
        assert_eq!(policy_violation(&job, &site), None);

        spec(&mut job).volumes = vec![Volume {
            name: "tok".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection { path: "t".into(), ..Default::default() }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }];
        assert!(policy_violation(&job, &site).unwrap().contains("allowTokenVolumes"));
        site.spec.pod_policy.allow_token_volumes = true;
        assert_eq!(policy_violation(&job, &site), None);

        spec(&mut job).volumes.push(Volume { name: "s".into(), secret: Some(SecretVolumeSource::default()), ..Default::default() });
        assert!(policy_violation(&job, &site).unwrap().contains("allowSecretVolumes"));
        site.spec.pod_policy.allow_secret_volumes = true;
        spec(&mut job).volumes.push(Volume { name: "h".into(), host_path: Some(HostPathVolumeSource { path: "/".into(), ..Default::default() }), ..Default::default() });
        assert!(policy_violation(&job, &site).unwrap().contains("allowHostPath"));
        site.spec.pod_policy.allow_host_path = true;

        spec(&mut job).env = vec![EnvVar {
            name: "PW".into(),
            value_from: Some(EnvVarSource { secret_key_ref: Some(SecretKeySelector { name: "db".into(), key: "pw".into(), optional: None }), ..Default::default() }),
            ..Default::default()
        }];
        let v = policy_violation(&job, &site).unwrap();
        assert!(v.contains("env[PW]") && v.contains("allowSecretEnv"), "{v}");
        site.spec.pod_policy.allow_secret_env = true;
        assert_eq!(policy_violation(&job, &site), None);
    }

    #[test]
    fn stock_nvflare_module_when_the_site_says_so() {
        let (job, mut site) = job_and_site();
        site.spec.defaults.worker_module = Some(WORKER_MODULE.into());
        assert_eq!(worker_command(&job, &site)[3], WORKER_MODULE);
    }
}
