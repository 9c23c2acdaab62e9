//! The collector's settings (`[collector]`) and their checks.

use fleetpatch_runtime::http::ServerOptions;
use fleetpatch_runtime::ConfigError;
use fleetpatch_store::HeartbeatEvents;
use serde::{Deserialize, Serialize};

/// Collector settings (`[collector]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CollectorOptions {
    /// Listen address; agents report to port 1072 by default.
    pub listen: String,
    /// Most reports written in one transaction.
    pub batch_max_reports: usize,
    /// How long the batcher waits to fill a batch (milliseconds).
    pub batch_wait_ms: u64,
    /// Requests waiting for the batcher before new ones get 503.
    pub queue_capacity: usize,
    /// Batches written at the same time (each its own transaction). One by
    /// default: requests queue while it writes, so the next batch takes all
    /// of them (group commit), and the database's CPU per report is what
    /// limits. Issue 20, 13 alternated pairs on a 2-core machine: with one
    /// writer PostgreSQL spent 24–29 µs per report in the paced bench against
    /// 29–35 with four (less contention on the same targets' rows and index
    /// pages), and answered the closed-loop load as fast (8,800–10,100
    /// reports/s against 7,600–10,900). Raise it where the database has cores
    /// to spare and each commit waits long (a remote disk); several replicas
    /// write at once anyway.
    pub writers: usize,
    /// Threads of the `fleetpatch collector` process's async runtime (0: one
    /// per core). One by default: every request waits for its batch's commit
    /// and is woken when it lands, and on one thread that costs no hand-over
    /// between threads (issue 20: about 15 % less of the collector's CPU per
    /// report in the paced bench than on two; a core's worth at that cost is
    /// some 27,000–33,000 reports/s). Raise it for more per replica, or with
    /// TLS and many agents connecting at once. `fleetpatch all` runs on one
    /// per core.
    pub worker_threads: usize,
    /// How far a request's timestamp may be from the collector's clock, either
    /// way (seconds); also how long nonces are remembered against replays.
    pub max_clock_skew_seconds: u64,
    /// Most (target, nonce) pairs remembered against replays; when it is full
    /// of pairs younger than the clock window, new requests get 503.
    pub replay_cache_entries: usize,
    /// Highest report number (seq) accepted per target and attempt: at most
    /// this many events are stored for one attempt.
    pub max_events_per_attempt: u64,
    /// What is kept of heartbeats: `summary` (a count, the highest seq and
    /// the first and last time per agent run) or `every` (the summary and an
    /// event row per heartbeat).
    pub heartbeat_events: HeartbeatEvents,
    /// The HTTP server: timeouts, connection cap, TLS.
    pub http: ServerOptions,
}

impl Default for CollectorOptions {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:1072".into(),
            batch_max_reports: 1_000,
            batch_wait_ms: 2,
            queue_capacity: 4_096,
            writers: 1,
            worker_threads: 1,
            max_clock_skew_seconds: 300,
            replay_cache_entries: 1_000_000,
            max_events_per_attempt: 10_000,
            heartbeat_events: HeartbeatEvents::Summary,
            http: ServerOptions::default(),
        }
    }
}

/// Most threads `collector.worker_threads` may ask for.
pub const MAX_WORKER_THREADS: usize = 1_024;

impl CollectorOptions {
    /// The runtime threads the `fleetpatch collector` process runs on, when
    /// the setting is valid (`None`: one per core, for 0, and for a value
    /// [`Self::validate`] refuses, so the refusal is what the operator sees).
    pub fn runtime_threads(&self) -> Option<usize> {
        Some(self.worker_threads).filter(|n| (1..=MAX_WORKER_THREADS).contains(n))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.batch_max_reports == 0 {
            return Err(ConfigError::too_small("collector.batch_max_reports", 1));
        }
        if self.queue_capacity == 0 {
            return Err(ConfigError::too_small("collector.queue_capacity", 1));
        }
        if self.writers == 0 || self.writers > 64 {
            return Err(ConfigError::out_of_range("collector.writers", 1, 64));
        }
        if self.worker_threads > MAX_WORKER_THREADS {
            return Err(ConfigError::out_of_range("collector.worker_threads", 0, MAX_WORKER_THREADS as u64));
        }
        if self.max_clock_skew_seconds == 0 || self.max_clock_skew_seconds > 3_600 {
            return Err(ConfigError::invalid(
                "collector.max_clock_skew_seconds",
                format!(
                    "must be between 1 and 3600, got {}; agents' clocks must be within it of the collector's",
                    self.max_clock_skew_seconds
                ),
            ));
        }
        if self.replay_cache_entries < 1_000 {
            return Err(ConfigError::invalid(
                "collector.replay_cache_entries",
                format!("must be at least 1000, got {}", self.replay_cache_entries),
            ));
        }
        if self.max_events_per_attempt == 0 {
            return Err(ConfigError::too_small("collector.max_events_per_attempt", 1));
        }
        self.http.validate("collector.http")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_writer_by_default_and_writers_bounded() {
        let options = |writers| CollectorOptions { writers, ..CollectorOptions::default() };
        assert_eq!(CollectorOptions::default().writers, 1);
        options(1).validate().expect("one is valid");
        options(64).validate().expect("the most is valid");
        for writers in [0, 65] {
            let error = options(writers).validate().expect_err("out of range");
            assert_eq!(error.to_string(), "collector.writers must be between 1 and 64");
        }
    }

    #[test]
    fn the_runtime_threads_are_one_by_default_and_bounded() {
        let options = |worker_threads| CollectorOptions { worker_threads, ..CollectorOptions::default() };
        assert_eq!(CollectorOptions::default().runtime_threads(), Some(1));
        assert_eq!(options(0).runtime_threads(), None, "0: one per core");
        assert_eq!(options(4).runtime_threads(), Some(4));
        options(0).validate().expect("0 is valid");
        options(MAX_WORKER_THREADS).validate().expect("the most is valid");
        let error = options(MAX_WORKER_THREADS + 1).validate().expect_err("too many");
        assert_eq!(error.to_string(), "collector.worker_threads must be between 0 and 1024");
        assert_eq!(options(MAX_WORKER_THREADS + 1).runtime_threads(), None, "refused by validate, not built");
    }
}
