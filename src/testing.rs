//! Builders for unit tests: small `mk_*` functions that make the objects the pure decisions take.
#![allow(missing_docs)]

use crate::api::*;
use crate::worker_pod::{WorkerContainerStatus, WorkerPod, WorkerPodSpec, WorkerPodStatus};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting, PodCondition,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use std::collections::BTreeMap;

pub fn t(ms: i64) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_millisecond(1_800_000_000_000 + ms).expect("valid time"))
}

pub fn mk_site(name: &str, capacity: Capacity) -> FLSite {
    let mut s = FLSite::new(
        name,
        FLSiteSpec {
            client_name: name.into(),
            server: ServerSpec { target: "fl-server:8002".into(), scheme: Scheme::Grpc },
            parent_url: "tcp://site-cp:8004".into(),
            parent_conn_sec: None,
            credentials_secret: Some(format!("{name}-creds")),
            startup_kit_secret: format!("{name}-startup"),
            workspace: WorkspaceSpec::default(),
            defaults: SiteDefaults {
                image: "nvflare/nvflare:2.9.0".into(),
                python_path: None,
                resources: Some(Resources { cpu: Some(Quantity("1".into())), memory: Some(Quantity("2Gi".into())), gpus: None, ephemeral_storage: None }),
                worker_module: None,
            },
            capacity,
            pending_timeout_seconds: None,
            pod_policy: Default::default(),
        },
    );
    s.metadata.namespace = Some("ns".into());
    s.metadata.uid = Some(format!("uid-site-{name}"));
    s
}

pub fn mk_job(name: &str, site: &str) -> FLJob {
    let mut j = FLJob::new(
        name,
        FLJobSpec {
            job_id: format!("{name}-id"),
            site: site.into(),
            image: None,
            meta: None,
            options: vec![],
            resources: None,
            credentials_secret: None,
            workspace_owner: None,
            pending_timeout_seconds: None,
            abort: false,
            abort_grace_period_seconds: None,
            active_deadline_seconds: None,
            ttl_seconds_after_finished: None,
            pod_template: None,
        },
    );
    j.metadata.namespace = Some("ns".into());
    j.metadata.uid = Some(format!("uid-{name}"));
    j.metadata.generation = Some(1);
    j.metadata.creation_timestamp = Some(t(0));
    j.metadata.finalizers = Some(vec!["fljob.dev/cleanup".into()]);
    j
}

pub fn mk_pod(phase: &str, state: ContainerState) -> WorkerPod {
    WorkerPod {
        metadata: ObjectMeta {
            name: Some("train-abcde".into()),
            namespace: Some("ns".into()),
            finalizers: Some(vec![crate::pod::TRACKING_FINALIZER.into()]),
            ..Default::default()
        },
        // Scheduled (a pod no node took is a case of its own: `unschedulable_pod`).
        spec: Some(WorkerPodSpec { node_name: Some("node-0".into()), ..Default::default() }),
        status: Some(WorkerPodStatus {
            phase: Some(phase.into()),
            container_statuses: Some(vec![WorkerContainerStatus { name: "worker".into(), state: Some(state) }]),
            ..Default::default()
        }),
    }
}

pub fn running() -> ContainerState {
    ContainerState { running: Some(ContainerStateRunning { started_at: Some(t(1000)) }), ..Default::default() }
}

pub fn waiting(reason: &str) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting { reason: Some(reason.into()), message: Some(format!("{reason} detail")) }),
        ..Default::default()
    }
}

pub fn exited(code: i32, reason: &str, ran: bool) -> ContainerState {
    ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: code,
            reason: Some(reason.into()),
            started_at: ran.then(|| t(1000)),
            finished_at: Some(t(5000)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn unschedulable_pod(since: Time) -> WorkerPod {
    let mut p = mk_pod("Pending", ContainerState::default());
    let st = p.status.as_mut().expect("status");
    st.container_statuses = None;
    st.conditions = Some(vec![PodCondition {
        type_: "PodScheduled".into(),
        status: "False".into(),
        reason: Some("Unschedulable".into()),
        message: Some("0/4 nodes are available: 4 Insufficient nvidia.com/gpu.".into()),
        last_transition_time: Some(since),
        ..Default::default()
    }]);
    p
}

pub fn evicted_pod() -> WorkerPod {
    let mut p = mk_pod("Failed", ContainerState::default());
    let st = p.status.as_mut().expect("status");
    st.reason = Some("Evicted".into());
    st.message = Some("The node was low on resource: memory.".into());
    p
}

pub fn annotate(p: &mut WorkerPod, k: &str, v: &str) {
    p.metadata.annotations.get_or_insert_with(BTreeMap::new).insert(k.into(), v.into());
}
