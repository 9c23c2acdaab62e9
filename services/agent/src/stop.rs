//! A request to stop the run early, shared between whoever asks (the
//! Windows service control handler on `STOP` or `SHUTDOWN`) and the run
//! that honours it.
//!
//! A stopped run ends the installer that is running together with every
//! process it started, produces no `finished` report for it and no final
//! result (a restarted agent runs that patch again, as after a crash),
//! delivers what it can of the spool within [`STOP_DRAIN_DEADLINE`], and
//! leaves the staged files in place for a restart or `drain`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long a stopped run still tries to deliver its reports. Windows gives
/// a stopping service about 20 s before it counts as hung.
pub const STOP_DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// Cheap to clone; every clone sees the same request.
#[derive(Debug, Clone, Default)]
pub struct StopSignal(Arc<AtomicBool>);

impl StopSignal {
    /// A signal nobody will raise: a run until the end.
    pub fn never() -> Self {
        Self::default()
    }

    /// Ask the run to stop; safe from any thread, including a service
    /// control handler.
    pub fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_clone_sees_a_request() {
        let signal = StopSignal::never();
        let seen_by_the_run = signal.clone();
        assert!(!seen_by_the_run.is_requested());
        signal.request();
        assert!(seen_by_the_run.is_requested());
    }
}
