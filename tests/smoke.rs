//! Smoke tests of the local control plane (hack/cluster.sh): each proves one real
//! component does its job. Run with `make test` (or `cargo test --test smoke` against a
//! cluster from `make cluster-up`, with FLJOB_TEST_KUBECONFIG and FLJOB_TOOLS_BIN set).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{namespace, namespace_with_labels, phase, sim_pod, unique_suffix, wait_for, wait_gone};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, Pod, ResourceQuota, ResourceQuotaSpec, ResourceRequirements, SeccompProfile,
    SecurityContext,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::{Api, ResourceExt};

const T: Duration = Duration::from_secs(60);

/// kube-scheduler places the pod on a kwok node; kwok's stages run it and end it with the
/// exit code from `sim.fljob.dev/exit-code`.
#[tokio::test]
async fn pod_exit_code_102_ends_failed() -> anyhow::Result<()> {
    let client = common::client().await;
    let ns = namespace(&client, "smoke-exit").await;
    let pods: Api<Pod> = ns.api();
    let pod = sim_pod("exit-102", &[("sim.fljob.dev/exit-code", "102"), ("sim.fljob.dev/run-seconds", "1")]);
    pods.create(&PostParams::default(), &pod).await?;

    let done = wait_for(&pods, "exit-102", T, |p| matches!(phase(p), "Succeeded" | "Failed")).await?;
    assert_eq!(phase(&done), "Failed");
    let node = done.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
    assert!(node.starts_with("kwok-node-"), "scheduled to {node:?}");
    let status = done.status.as_ref().unwrap();
    assert_eq!(status.host_ip.as_deref(), Some("127.0.0.1"));
    let cs = &status.container_statuses.as_ref().unwrap()[0];
    let term = cs.state.as_ref().and_then(|s| s.terminated.as_ref()).expect("container terminated");
    assert_eq!(term.exit_code, 102);
    assert_eq!(term.reason.as_deref(), Some("Error"));
    ns.cleanup().await;
    Ok(())
}

/// kube-controller-manager's garbage collector deletes a Pod whose owner is deleted.
#[tokio::test]
async fn garbage_collector_deletes_owned_pod() -> anyhow::Result<()> {
    let client = common::client().await;
    let ns = namespace(&client, "smoke-gc").await;
    let cms: Api<ConfigMap> = ns.api();
    let pods: Api<Pod> = ns.api();
    let owner = cms
        .create(
            &PostParams::default(),
            &ConfigMap { metadata: ObjectMeta { name: Some("owner".into()), ..Default::default() }, ..Default::default() },
        )
        .await?;
    let mut pod = sim_pod("owned", &[("sim.fljob.dev/run-seconds", "never")]);
    pod.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: owner.name_any(),
        uid: owner.uid().unwrap(),
        ..Default::default()
    }]);
    pods.create(&PostParams::default(), &pod).await?;
    wait_for(&pods, "owned", T, |p| phase(p) == "Running").await?;

    cms.delete("owner", &DeleteParams::background()).await?;
    wait_gone(&pods, "owned", T).await?;
    ns.cleanup().await;
    Ok(())
}

/// PodSecurity admission enforces `restricted` on a labelled namespace.
#[tokio::test]
async fn pod_security_restricted_rejects_privileged_pod() -> anyhow::Result<()> {
    let client = common::client().await;
    let ns = namespace_with_labels(
        &client,
        "smoke-psa",
        &[("pod-security.kubernetes.io/enforce", "restricted"), ("pod-security.kubernetes.io/enforce-version", "latest")],
    )
    .await;
    let pods: Api<Pod> = ns.api();

    let mut bad = sim_pod("privileged", &[]);
    bad.spec.as_mut().unwrap().containers[0].security_context =
        Some(SecurityContext { privileged: Some(true), ..Default::default() });
    match pods.create(&PostParams::default(), &bad).await {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 403, "{e:?}");
            assert!(e.message.contains("violates PodSecurity \"restricted:latest\""), "{}", e.message);
            assert!(e.message.contains("privileged"), "{}", e.message);
        }
        other => panic!("a privileged pod was not rejected: {other:?}"),
    }

    // A compliant pod is accepted, so the rejection above was PodSecurity's doing.
    let mut good = sim_pod("compliant", &[]);
    good.spec.as_mut().unwrap().containers[0].security_context = Some(SecurityContext {
        allow_privilege_escalation: Some(false),
        run_as_non_root: Some(true),
        run_as_user: Some(1000),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
        ..Default::default()
    });
    pods.create(&PostParams::default(), &good).await?;
    ns.cleanup().await;
    Ok(())
}

/// The resource-quota controller computes usage and ResourceQuota admission refuses a pod
/// over quota.
#[tokio::test]
async fn resource_quota_blocks_pod_over_quota() -> anyhow::Result<()> {
    let client = common::client().await;
    let ns = namespace(&client, "smoke-quota").await;
    let quotas: Api<ResourceQuota> = ns.api();
    let pods: Api<Pod> = ns.api();
    let hard = BTreeMap::from([
        ("requests.cpu".to_string(), Quantity("1".into())),
        ("requests.nvidia.com/gpu".to_string(), Quantity("2".into())),
    ]);
    quotas
        .create(
            &PostParams::default(),
            &ResourceQuota {
                metadata: ObjectMeta { name: Some("quota".into()), ..Default::default() },
                spec: Some(ResourceQuotaSpec { hard: Some(hard), ..Default::default() }),
                ..Default::default()
            },
        )
        .await?;
    // The controller fills in status.hard/used; until then admission cannot judge.
    wait_for(&quotas, "quota", T, |q| q.status.as_ref().and_then(|s| s.hard.as_ref()).is_some_and(|h| h.len() == 2))
        .await?;

    let with_requests = |name: &str, cpu: &str, gpu: &str| {
        let mut p = sim_pod(name, &[("sim.fljob.dev/run-seconds", "never")]);
        p.spec.as_mut().unwrap().containers[0].resources = Some(ResourceRequirements {
            requests: Some(BTreeMap::from([("cpu".to_string(), Quantity(cpu.into()))])),
            limits: Some(BTreeMap::from([("nvidia.com/gpu".to_string(), Quantity(gpu.into()))])),
            ..Default::default()
        });
        p
    };
    match pods.create(&PostParams::default(), &with_requests("too-big", "2", "1")).await {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 403, "{e:?}");
            assert!(e.message.contains("exceeded quota: quota"), "{}", e.message);
        }
        other => panic!("a pod over quota was not rejected: {other:?}"),
    }
    pods.create(&PostParams::default(), &with_requests("fits", "500m", "2")).await?;
    match pods.create(&PostParams::default(), &with_requests("no-gpu-left", "100m", "1")).await {
        Err(kube::Error::Api(e)) => assert!(e.message.contains("requests.nvidia.com/gpu"), "{}", e.message),
        other => panic!("a pod over the gpu quota was not rejected: {other:?}"),
    }
    ns.cleanup().await;
    Ok(())
}

/// kubectl explain reads a CRD's structural schema from the apiserver's published OpenAPI.
#[tokio::test]
async fn kubectl_explain_works_for_a_crd() -> anyhow::Result<()> {
    let client = common::client().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let group = format!("smoke{}.test.fljob.dev", unique_suffix());
    let name = format!("gadgets.{group}");
    let description = "How many sprockets this smoke-test gadget turns.";
    let crd: CustomResourceDefinition = serde_json::from_value(serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": name, "labels": {"fljob.dev/test": "true"}},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "A Gadget for the smoke test.",
                    "properties": {"spec": {
                        "type": "object",
                        "description": "Desired state of the gadget.",
                        "properties": {"sprockets": {"type": "integer", "description": description}}
                    }}
                }}
            }]
        }
    }))?;
    crds.create(&PostParams::default(), &crd).await?;
    let result = async {
        wait_for(&crds, &name, T, |c| {
            c.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Established" && c.status == "True"))
        })
        .await?;
        // The OpenAPI document is republished asynchronously; retry for a while.
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let out = common::kubectl()
                .args(["explain", "gadgets.spec.sprockets", "--api-version", &format!("{group}/v1")])
                .output()?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            if out.status.success() && stdout.contains(description) {
                assert!(stdout.contains("KIND:") && stdout.contains("Gadget"), "{stdout}");
                break anyhow::Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("kubectl explain never showed the field: {stdout}{}", String::from_utf8_lossy(&out.stderr));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    .await;
    crds.delete(&name, &DeleteParams::default()).await?;
    result
}
