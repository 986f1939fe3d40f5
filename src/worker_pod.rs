//! What the operator reads of a worker Pod: a projection of `v1.Pod`, decoded straight from the watch and the GETs.
//!
//! A `k8s_openapi` Pod is ~6.5 KiB in memory even with its spec emptied (its structs hold every field of the API
//! inline: `PodSpec` alone is 2.2 KiB, each `Container` 2.1 KiB), and the pod cache was the largest part of the
//! operator's memory (issue 12). This type holds only what decisions read: the metadata, the node, the grace period,
//! each container's name and image, and of the status the phase, reason, message, conditions and the containers'
//! states. Fields it does not name are skipped while decoding. Pods are still created as full `v1.Pod`s
//! (`pod::build_pod`); this is only the read side.

use k8s_openapi::api::core::v1::{ContainerState, Pod, PodCondition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::{Deserialize, Serialize};

/// A worker pod as the operator reads it (see the module's doc).
#[derive(Resource, Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[resource(inherit = "Pod")]
pub struct WorkerPod {
    /// The pod's metadata, without its `managedFields` (skipped while decoding: they are most of a pod's metadata,
    /// and decoding their field sets was 5% of the operator's CPU in a burst), without its labels (the watch selects
    /// by label on the server; nothing reads them after), and of its annotations only the aborts the operator wrote
    /// (`READ_ANNOTATIONS`): a map holding even one entry costs ~0.5 KiB, and the two maps were 13% of the heap with
    /// 10,000 pods cached.
    #[serde(default, deserialize_with = "metadata_without_managed_fields")]
    pub metadata: ObjectMeta,
    /// What decisions read of the spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<WorkerPodSpec>,
    /// What decisions read of the status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<WorkerPodStatus>,
}

/// `v1.PodSpec`, the fields decisions read.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerPodSpec {
    /// The node the pod is bound to: none for a pod no node took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The kubelet's grace period between SIGTERM and SIGKILL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_grace_period_seconds: Option<i64>,
    /// The containers, name and image.
    #[serde(default)]
    pub containers: Vec<WorkerContainer>,
}

/// `v1.Container`, name and image.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct WorkerContainer {
    /// The container's name.
    pub name: String,
    /// Its image (named in a failed pull's message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// `v1.PodStatus`, the fields decisions read.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerPodStatus {
    /// Pending, Running, Succeeded, Failed, Unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Why the pod is in this state (`Evicted`, a node's rejection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A sentence about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// PodScheduled, DisruptionTarget, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<PodCondition>>,
    /// Each container's name and state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_statuses: Option<Vec<WorkerContainerStatus>>,
}

/// `v1.ContainerStatus`, name and state.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct WorkerContainerStatus {
    /// The container's name.
    pub name: String,
    /// Waiting, running or terminated, with the details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<ContainerState>,
}

/// The only pod annotations decisions read: the aborts the operator itself put on the pod.
pub const READ_ANNOTATIONS: [&str; 2] = [crate::api::ABORT_ANNOTATION, crate::api::ABORT_TASK_ANNOTATION];

/// Of a pod's annotations, those decisions read (`READ_ANNOTATIONS`); none is `None`, which costs no allocation.
fn read_annotations(all: Option<std::collections::BTreeMap<String, String>>) -> Option<std::collections::BTreeMap<String, String>> {
    let kept: std::collections::BTreeMap<String, String> =
        all?.into_iter().filter(|(k, _)| READ_ANNOTATIONS.contains(&k.as_str())).collect();
    (!kept.is_empty()).then_some(kept)
}

/// `ObjectMeta` but `managedFields` (which serde then skips without building them).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetadataWithoutManagedFields {
    #[serde(default)]
    annotations: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    creation_timestamp: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    #[serde(default)]
    deletion_grace_period_seconds: Option<i64>,
    #[serde(default)]
    deletion_timestamp: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    #[serde(default)]
    finalizers: Option<Vec<String>>,
    #[serde(default)]
    generate_name: Option<String>,
    #[serde(default)]
    generation: Option<i64>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    owner_references: Option<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>,
    #[serde(default)]
    resource_version: Option<String>,
    #[serde(default)]
    self_link: Option<String>,
    #[serde(default)]
    uid: Option<String>,
}

fn metadata_without_managed_fields<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = MetadataWithoutManagedFields::deserialize(d)?;
    Ok(ObjectMeta {
        annotations: read_annotations(m.annotations),
        creation_timestamp: m.creation_timestamp,
        deletion_grace_period_seconds: m.deletion_grace_period_seconds,
        deletion_timestamp: m.deletion_timestamp,
        finalizers: m.finalizers,
        generate_name: m.generate_name,
        generation: m.generation,
        labels: None,
        managed_fields: None,
        name: m.name,
        namespace: m.namespace,
        owner_references: m.owner_references,
        resource_version: m.resource_version,
        self_link: m.self_link,
        uid: m.uid,
    })
}

impl From<Pod> for WorkerPod {
    /// The projection of a full pod: what the watch would decode of it.
    fn from(p: Pod) -> Self {
        WorkerPod {
            metadata: ObjectMeta {
                managed_fields: None,
                labels: None,
                annotations: read_annotations(p.metadata.annotations),
                ..p.metadata
            },
            spec: p.spec.map(|s| WorkerPodSpec {
                node_name: s.node_name,
                termination_grace_period_seconds: s.termination_grace_period_seconds,
                containers: s.containers.into_iter().map(|c| WorkerContainer { name: c.name, image: c.image }).collect(),
            }),
            status: p.status.map(|s| WorkerPodStatus {
                phase: s.phase,
                reason: s.reason,
                message: s.message,
                conditions: s.conditions,
                container_statuses: s
                    .container_statuses
                    .map(|v| v.into_iter().map(|c| WorkerContainerStatus { name: c.name, state: c.state }).collect()),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_a_pod_keeps_what_the_full_type_has_of_the_projected_fields() {
        let job = crate::testing::mk_job("train-1", "site-a");
        let site = crate::testing::mk_site("site-a", Default::default());
        let mut full = crate::pod::build_pod(&job, &site).expect("a pod");
        full.spec.as_mut().unwrap().node_name = Some("node-1".into());
        full.metadata.managed_fields = Some(vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry {
            manager: Some("kubelet".into()),
            fields_v1: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1(serde_json::json!({"f:status": {}}))),
            ..Default::default()
        }]);
        full.status = Some(serde_json::from_value(serde_json::json!({
            "phase": "Failed", "hostIP": "127.0.0.1", "podIP": "127.0.0.1", "qosClass": "Guaranteed",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": "worker", "image": "w:1", "imageID": "sha256:0", "ready": false, "restartCount": 0,
                "containerID": "containerd://0",
                "state": {"terminated": {"exitCode": 102, "reason": "Error", "startedAt": "2026-01-01T00:00:00Z",
                                         "finishedAt": "2026-01-01T00:00:05Z"}}}],
        })).unwrap());
        let wire = serde_json::to_value(&full).unwrap();
        let decoded: WorkerPod = serde_json::from_value(wire.clone()).expect("a pod decodes as a WorkerPod");
        assert_eq!(decoded, WorkerPod::from(full.clone()), "decoding and converting agree");
        let s = decoded.spec.as_ref().unwrap();
        assert_eq!(s.node_name.as_deref(), Some("node-1"));
        assert_eq!(s.termination_grace_period_seconds, full.spec.as_ref().unwrap().termination_grace_period_seconds);
        assert_eq!(s.containers[0].image, full.spec.as_ref().unwrap().containers[0].image);
        assert_eq!(decoded.metadata.managed_fields, None, "managedFields are skipped");
        assert_eq!(
            decoded.metadata,
            ObjectMeta { managed_fields: None, labels: None, annotations: None, ..full.metadata.clone() },
            "the built pod's labels and its job-id annotation are not read, so not kept"
        );
        assert!(full.metadata.labels.is_some() && full.metadata.annotations.as_ref().is_some_and(|a| !a.is_empty()));
        assert!(decoded.metadata.owner_references.is_some() && decoded.metadata.finalizers.is_some());
        let st = decoded.status.as_ref().unwrap();
        assert_eq!(st.phase.as_deref(), Some("Failed"));
        let t = st.container_statuses.as_ref().unwrap()[0].state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!(t.exit_code, 102);
        // what is left out is most of the pod
        let slim = serde_json::to_vec(&decoded).unwrap().len();
        assert!(slim * 2 < serde_json::to_vec(&wire).unwrap().len(), "{slim} bytes of {}", wire.to_string().len());
    }

    #[test]
    fn the_abort_annotations_are_kept_and_no_other() {
        let job = crate::testing::mk_job("train-1", "site-a");
        let site = crate::testing::mk_site("site-a", Default::default());
        let mut full = crate::pod::build_pod(&job, &site).expect("a pod");
        let a = full.metadata.annotations.get_or_insert_default();
        a.insert(crate::api::ABORT_ANNOTATION.into(), "App".into());
        a.insert(crate::api::ABORT_TASK_ANNOTATION.into(), "task-7".into());
        a.insert("example.com/other".into(), "x".into());
        let decoded: WorkerPod = serde_json::from_value(serde_json::to_value(&full).unwrap()).unwrap();
        let kept = decoded.metadata.annotations.clone().expect("the aborts are kept");
        assert_eq!(kept.keys().map(String::as_str).collect::<Vec<_>>(), vec![crate::api::ABORT_ANNOTATION, crate::api::ABORT_TASK_ANNOTATION]);
        assert_eq!(kept[crate::api::ABORT_TASK_ANNOTATION], "task-7");
        assert_eq!(decoded, WorkerPod::from(full), "decoding and converting agree");
    }

    #[test]
    fn the_projection_is_a_fraction_of_a_pod_in_memory() {
        // the inline sizes the cache pays per pod, before any string or list it holds
        let full = std::mem::size_of::<Pod>() + std::mem::size_of::<k8s_openapi::api::core::v1::Container>()
            + std::mem::size_of::<k8s_openapi::api::core::v1::ContainerStatus>();
        let slim = std::mem::size_of::<WorkerPod>() + std::mem::size_of::<WorkerContainer>() + std::mem::size_of::<WorkerContainerStatus>();
        assert!(slim * 3 < full, "{slim} vs {full} bytes");
    }
}
