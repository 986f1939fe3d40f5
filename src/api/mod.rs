//! The custom resources this operator serves: `FLSite` (a site's settings and quota pool) and `FLJob` (one job run).

pub mod fljob;
pub mod flsite;
pub mod installed;

pub use fljob::*;
pub use flsite::*;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// The API group of both kinds.
pub const GROUP: &str = "fljob.dev";
/// Field manager for everything the operator writes with server-side apply.
pub const MANAGER: &str = "fljob-operator";

/// An amount of a resource: a Kubernetes quantity such as `2`, `500m` or `8Gi`.
pub use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// CPU, memory and GPUs, as asked for by a job or held from a site's pool.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// CPU, as a Kubernetes quantity (`2`, `500m`). Requests and limits of the worker container are both set to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isQuantity(string(self)) && quantity(string(self)).compareTo(quantity('0')) >= 0").message("cpu must be a non-negative Kubernetes quantity such as 2 or 500m"))]
    pub cpu: Option<Quantity>,
    /// Memory, as a Kubernetes quantity (`8Gi`, `512Mi`). Requests and limits are both set to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isQuantity(string(self)) && quantity(string(self)).compareTo(quantity('0')) >= 0").message("memory must be a non-negative Kubernetes quantity such as 8Gi or 512Mi"))]
    pub memory: Option<Quantity>,
    /// Number of GPUs, requested as `nvidia.com/gpu`. 0 or absent means none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1024))]
    pub gpus: Option<i32>,
    /// Ephemeral storage for the worker (`20Gi`): its request and limit, and the size limit of the workspace
    /// emptyDir (NVFlare's `launcher_spec[site].k8s.ephemeral_storage`). Not counted against the site's pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isQuantity(string(self)) && quantity(string(self)).compareTo(quantity('0')) >= 0").message("ephemeralStorage must be a non-negative Kubernetes quantity such as 20Gi"))]
    pub ephemeral_storage: Option<Quantity>,
}

/// The CRDs as committed under `crds/`: (file name, YAML).
pub fn crd_files() -> Result<Vec<(String, String)>, serde_saphyr::ser::Error> {
    use kube::CustomResourceExt;
    let mut out = Vec::new();
    for crd in [FLJob::crd(), FLSite::crd()] {
        let name = format!("{}_{}.yaml", crd.spec.group, crd.spec.names.plural);
        out.push((name, serde_saphyr::to_string(&crd)?));
    }
    Ok(out)
}

/// Now, as the API's time type.
pub fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Milliseconds since the epoch of an API time.
pub fn millis(t: &Time) -> i64 {
    t.0.as_millisecond()
}

/// The API time `secs` seconds after `t`.
pub fn after_secs(t: &Time, secs: i64) -> i64 {
    millis(t).saturating_add(secs.saturating_mul(1000))
}

/// How long from `now` until the instant `at_ms` (milliseconds since the epoch); None once it has passed.
pub fn until(at_ms: i64, now: &Time) -> Option<std::time::Duration> {
    let left = at_ms - millis(now);
    (left > 0).then(|| std::time::Duration::from_millis(left as u64))
}

/// Sets or replaces the condition of the same type; keeps `lastTransitionTime` when the status did not change.
/// Returns true when anything changed.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(old) => {
            if old.status == new.status && old.reason == new.reason && old.message == new.message
                && old.observed_generation == new.observed_generation
            {
                return false;
            }
            if old.status == new.status {
                new.last_transition_time = old.last_transition_time.clone();
            }
            *old = new;
            true
        }
        None => {
            conditions.push(new);
            true
        }
    }
}

/// Builds a condition; `now` is its transition time if it is new or its status changes.
pub fn condition(type_: &str, status: bool, reason: &str, message: impl Into<String>, generation: Option<i64>, now: &Time) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

/// Looks a condition up by type.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// True when the condition of this type exists with status "True".
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find_condition(conditions, type_).is_some_and(|c| c.status == "True")
}
