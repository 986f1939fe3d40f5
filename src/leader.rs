//! Leader election on a `coordination.k8s.io` Lease, so that of several replicas exactly one reconciles.
//! The lease is renewed well inside its duration; a replica that cannot renew in time stops (and is restarted
//! by its Deployment) rather than risk two leaders. On shutdown the lease is handed back at once.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use std::time::Duration;
use tracing::{info, warn};

/// Leader election settings.
#[derive(Clone, Debug)]
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    /// How long a lease is valid without renewal.
    pub lease_duration: Duration,
    /// How often the leader renews and candidates retry.
    pub retry_period: Duration,
}

impl Elector {
    /// A candidate for the lease `name` in `namespace`.
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, lease_duration: Duration) -> Self {
        Elector {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            lease_duration,
            retry_period: lease_duration / 5,
        }
    }

    fn now() -> MicroTime {
        MicroTime(k8s_openapi::jiff::Timestamp::now())
    }

    /// One attempt to acquire or renew. Ok(true) while this replica holds the lease.
    pub async fn try_acquire(&self) -> kube::Result<bool> {
        let secs = self.lease_duration.as_secs().max(1) as i32;
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(Self::now()),
                    renew_time: Some(Self::now()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let held_for = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(secs).max(1) as u64);
        let expired = match (&spec.renew_time, spec.holder_identity.as_deref()) {
            (_, None) | (_, Some("")) => true,
            (None, _) => true,
            (Some(t), _) => {
                let age_ms = k8s_openapi::jiff::Timestamp::now().as_millisecond() - t.0.as_millisecond();
                age_ms > held_for.as_millis() as i64
            }
        };
        if !mine && !expired {
            return Ok(false);
        }
        if !mine {
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.acquire_time = Some(Self::now());
            spec.holder_identity = Some(self.identity.clone());
        }
        spec.lease_duration_seconds = Some(secs);
        spec.renew_time = Some(Self::now());
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&self) {
        info!(lease = %self.name, identity = %self.identity, "waiting to become leader");
        loop {
            match self.try_acquire().await {
                Ok(true) => {
                    info!(lease = %self.name, "became leader");
                    return;
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election attempt failed"),
            }
            tokio::time::sleep(self.retry_period).await;
        }
    }

    /// Renews the lease until a renewal cannot be made within the lease duration; then returns.
    pub async fn hold(&self) {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.retry_period).await;
            match self.try_acquire().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    warn!(lease = %self.name, "lost the lease to another replica");
                    return;
                }
                Err(e) => warn!(error = %e, "renewing the lease failed"),
            }
            // Stop before another replica may consider the lease expired.
            if last_ok.elapsed() + self.retry_period >= self.lease_duration {
                warn!(lease = %self.name, "could not renew the lease in time");
                return;
            }
        }
    }

    /// Hands the lease back so a standby replica takes over without waiting for it to expire.
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await
            && let Some(spec) = lease.spec.as_mut().filter(|s| s.holder_identity.as_deref() == Some(self.identity.as_str())) {
                spec.holder_identity = None;
                spec.renew_time = None;
                if let Err(e) = self.api.replace(&self.name, &PostParams::default(), &lease).await {
                    warn!(error = %e, "could not release the lease");
                }
            }
    }
}
