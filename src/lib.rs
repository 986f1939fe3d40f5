//! fljob-operator: NVFlare's client-side `JobExecutor` done the Kubernetes way. FLJob objects become worker Pods,
//! admitted against their FLSite's quota pool, observed through the API, aborted with NVFlare's protocol.
#![deny(missing_docs)]

pub mod abort;
pub mod api;
pub mod controller;
pub mod events;
pub mod leader;
pub mod lifecycle;
pub mod metrics;
pub mod pod;
pub mod quota;
pub mod status;
#[cfg(test)]
pub mod testing;
pub mod worker_pod;

/// Everything that can go wrong while reconciling. Each variant says which step failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed.
    #[error("{step}: {source}")]
    Kube {
        /// The step that made the call.
        step: &'static str,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The site's ledger changed under us; the reconcile is retried with fresh data.
    #[error("conflict writing {0}; retrying with fresh data")]
    Conflict(String),
    /// An object could not be serialized.
    #[error("serializing {0}: {1}")]
    Serialize(&'static str, serde_json::Error),
}

impl Error {
    /// A short label for metrics.
    pub fn metric_label(&self) -> String {
        match self {
            Error::Kube { step, .. } => format!("kube_{step}"),
            Error::Conflict(_) => "conflict".into(),
            Error::Serialize(..) => "serialize".into(),
        }
    }
}

/// Wraps a kube error with the step it came from.
pub fn kube_err(step: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Kube { step, source }
}

/// Resolves on SIGTERM (what Kubernetes sends) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
