//! One shutdown signal for a process: SIGINT or SIGTERM starts a drain, a
//! second signal exits at once. A component that cannot go on (not an
//! outage it can wait out: those it rides out) calls [`Shutdown::fail`], so
//! the process drains and then exits with a failure status a supervisor
//! restarts, never with status 0.

use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// Cancelled when the process should drain. Cheap to clone.
#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    failure: Arc<Mutex<Option<String>>>,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Listens for SIGINT/SIGTERM: the first starts the drain, the second exits.
    pub fn on_signals() -> Self {
        let shutdown = Self::new();
        let token = shutdown.token.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown signal received; draining (send it again to exit at once)");
            token.cancel();
            wait_for_signal().await;
            tracing::warn!("second shutdown signal; exiting now");
            std::process::exit(130);
        });
        shutdown
    }

    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Starts the drain because a component cannot go on; the process is
    /// to exit with a failure naming `reason` (the first one is kept).
    pub fn fail(&self, reason: impl Into<String>) {
        let reason = reason.into();
        tracing::error!(reason = %reason, "a component cannot go on; draining to exit with a failure");
        self.failure.lock().expect("shutdown lock").get_or_insert(reason);
        self.token.cancel();
    }

    /// Why the process is stopping with a failure, if it is.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().expect("shutdown lock").clone()
    }

    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    pub async fn wait(&self) {
        self.token.cancelled().await
    }

    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_drains_and_is_remembered_a_trigger_is_not_one() {
        let asked = Shutdown::new();
        asked.trigger();
        assert!(asked.is_triggered());
        assert_eq!(asked.failure(), None, "a requested stop is not a failure");

        let failed = Shutdown::new();
        let clone = failed.clone();
        clone.fail("the bus closed the consumer");
        clone.fail("a second reason");
        assert!(failed.is_triggered());
        assert_eq!(failed.failure().as_deref(), Some("the bus closed the consumer"));
    }
}
