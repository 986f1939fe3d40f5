//! Leader election on a `coordination.k8s.io` Lease, so that of several replicas exactly one reconciles.
//! The lease is renewed well inside its duration; a replica that cannot renew in time stops (and is restarted
//! by its Deployment) rather than risk two leaders. On shutdown the lease is handed back at once.
//!
//! As in client-go, a candidate never compares the holder's `renewTime` with its own clock (the two clocks may
//! disagree by any amount): it notes, on its own monotonic clock, when it last saw the lease record change, and
//! takes the lease only when the record has not changed for a whole lease duration. Every API call of a renewal
//! has a deadline, so a hung request cannot keep a leader that can no longer prove it is one.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tracing::{info, warn};

/// The lease record as last seen, and when (on this replica's monotonic clock) it was first seen so.
#[derive(Debug)]
struct Observed {
    record: String,
    at: Instant,
}

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
    /// How long the leader keeps trying to renew before it steps down (client-go's renewDeadline); also the
    /// deadline of each attempt.
    pub renew_deadline: Duration,
    observed: Arc<Mutex<Option<Observed>>>,
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
            renew_deadline: lease_duration * 2 / 3,
            observed: Arc::default(),
        }
    }

    /// When this replica first saw the lease as it is now (a new record restarts the clock).
    fn observed_at(&self, record: String) -> Instant {
        let mut o = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        match &*o {
            Some(seen) if seen.record == record => seen.at,
            _ => {
                let now = Instant::now();
                *o = Some(Observed { record, at: now });
                now
            }
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
        let record = format!(
            "{:?}|{:?}|{:?}|{:?}",
            spec.holder_identity,
            spec.renew_time.as_ref().map(|t| t.0),
            spec.lease_transitions,
            lease.metadata.resource_version
        );
        let unheld = matches!(spec.holder_identity.as_deref(), None | Some(""));
        let expired = unheld || self.observed_at(record).elapsed() > held_for;
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

    /// One attempt within `deadline`; a request that hangs counts as a failed attempt.
    async fn attempt(&self, deadline: Duration) -> kube::Result<bool> {
        match tokio::time::timeout(deadline, self.try_acquire()).await {
            Ok(r) => r,
            Err(_) => Err(kube::Error::Service(format!("no answer within {deadline:?}").into())),
        }
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&self) {
        info!(lease = %self.name, identity = %self.identity, "waiting to become leader");
        loop {
            match self.attempt(self.renew_deadline).await {
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

    /// Renews the lease until a renewal cannot be made within the renew deadline; then returns. A standby only
    /// takes over a whole lease duration after the last renewal it saw, so the leader stops well before that.
    pub async fn hold(&self) {
        let mut last_ok = Instant::now();
        loop {
            tokio::time::sleep(self.retry_period).await;
            let left = self.renew_deadline.saturating_sub(last_ok.elapsed());
            match self.attempt(left.max(Duration::from_millis(1))).await {
                Ok(true) => last_ok = Instant::now(),
                Ok(false) => {
                    warn!(lease = %self.name, "lost the lease to another replica");
                    return;
                }
                Err(e) => warn!(error = %e, "renewing the lease failed"),
            }
            if last_ok.elapsed() + self.retry_period >= self.renew_deadline {
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
