//! The reporter thread: sends spooled reports to the collector in order.
//!
//! The installer loop only ever calls [`Reporter::report`], which numbers
//! the report and appends it to the [`Spool`] (local disk, never the
//! network) and wakes this thread. The thread takes the oldest pending
//! reports as one batch, `POST`s them, and removes them from the spool once
//! the collector answers 200 with a `ReportAck`. So spooled reports from an
//! earlier run go out before newer ones, and a report leaves the spool only
//! once it was acknowledged.
//!
//! Answers and what they mean:
//! * 2xx: accepted (duplicates included; the collector is idempotent by seq).
//! * 401, 403: the request's signature is refused (a wrong key, an attempt
//!   that is no longer current); no
//!   batch will ever pass, so the thread stops sending and the reports stay
//!   in the spool (logged as an error).
//! * 409: the attempt already has its final result (for example the
//!   watchdog gave up on it and the agent's own final result came in
//!   meanwhile): nothing more will be accepted for it, so the thread stops,
//!   the pending reports are dropped from the spool and later ones are not
//!   spooled (logged as an error).
//!
//! Every request is signed ([`fleetpatch_proto::report_auth`]): the token
//! never leaves the target; each request carries a MAC keyed from it over
//! the method, the path, the target, the attempt, the time, a fresh random
//! nonce and the body's sha256.
//! * 400, 413, 422: this batch is refused; it is split in halves until the
//!   refused report is alone, then that one report is dropped (logged).
//! * connection errors, timeouts, 408 (among them a timestamp outside the
//!   collector's clock window: the request waited too long, or this clock is
//!   off; every try is signed afresh), 429, 5xx and anything unexpected:
//!   retried with capped exponential backoff and jitter.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fleetpatch_proto::limits::MAX_REPORTS_PER_BATCH;
use fleetpatch_proto::report_auth::{SignedRequest, SigningKey};
use fleetpatch_proto::v1::{agent_report::Kind, AgentReport, ReportAck, ReportBatch};
use prost::Message;

use crate::http::{self, CollectorUrl, Connector, Timeouts};
use crate::spool::{Spool, SpoolState};
use crate::{error, info, warn};

/// How to reach the collector and how patiently.
#[derive(Debug, Clone)]
pub struct ReporterOptions {
    pub url: CollectorUrl,
    pub connector: Connector,
    pub target_id: uuid::Uuid,
    pub attempt: u32,
    /// Derived from the plan's token; signs every request. Never sent, never logged.
    pub signing_key: SigningKey,
    pub timeouts: Timeouts,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

/// How waiting for the spool to drain ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every report was acknowledged.
    Drained,
    /// The collector refused the token; the reports stay in the spool.
    Refused(String),
    /// The collector has the attempt's final result and takes nothing more;
    /// the unsent reports were dropped.
    AttemptClosed(String),
    /// The deadline passed with reports still unacknowledged.
    DeadlineExpired { pending: usize },
}

struct Queue {
    spool: Spool,
    /// No more reports will come: exit once the spool is empty.
    closing: bool,
    /// The collector refused the token (why).
    refused: Option<String>,
    /// The collector answered that the attempt is over (why).
    closed: Option<String>,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when a report is added or removed, or the state changes.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Handle to the reporter thread.
pub struct Reporter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Reporter {
    /// Start the thread; it begins with whatever the spool already holds.
    pub fn start(spool: Spool, options: ReporterOptions) -> Self {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue { spool, closing: false, refused: None, closed: None }),
            changed: Condvar::new(),
        });
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("reporter".into())
            .spawn(move || send_loop(&thread_shared, &options))
            .expect("the reporter thread starts");
        Self { shared, thread: Some(thread) }
    }

    /// Queue a report; returns its seq. Never waits for the network. Once
    /// the collector said the attempt is over, reports are not kept (0).
    pub fn report(&self, kind: Kind) -> u64 {
        let mut queue = self.shared.lock();
        if queue.closed.is_some() {
            return 0;
        }
        let seq = queue.spool.append(kind);
        drop(queue);
        self.shared.changed.notify_all();
        seq
    }

    /// What earlier runs and this one have recorded.
    pub fn state(&self) -> SpoolState {
        self.shared.lock().spool.state().clone()
    }

    /// Reports not yet acknowledged.
    pub fn pending_count(&self) -> usize {
        self.shared.lock().spool.pending().len()
    }

    /// Announce that no more reports come, and wait at most `deadline` for
    /// every report to be acknowledged.
    pub fn drain(&mut self, deadline: Duration) -> DrainOutcome {
        let until = Instant::now() + deadline;
        let mut queue = self.shared.lock();
        queue.closing = true;
        self.shared.changed.notify_all();
        let outcome = loop {
            if let Some(reason) = &queue.refused {
                break DrainOutcome::Refused(reason.clone());
            }
            if let Some(reason) = &queue.closed {
                break DrainOutcome::AttemptClosed(reason.clone());
            }
            if queue.spool.pending().is_empty() {
                break DrainOutcome::Drained;
            }
            let now = Instant::now();
            if now >= until {
                break DrainOutcome::DeadlineExpired { pending: queue.spool.pending().len() };
            }
            queue = self.shared.changed.wait_timeout(queue, until - now).unwrap_or_else(PoisonError::into_inner).0;
        };
        drop(queue);
        if matches!(outcome, DrainOutcome::Drained | DrainOutcome::AttemptClosed(_)) {
            // The thread exits by itself once closing and empty, or closed.
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
        outcome
    }

    /// Remove the spool's files; call only after [`DrainOutcome::Drained`].
    pub fn remove_spool_files(&self) -> Result<(), crate::Error> {
        self.shared.lock().spool.remove_files()
    }
}

/// What one attempt to deliver a batch came to.
enum Delivery {
    Accepted(ReportAck),
    TokenRefused(String),
    AttemptClosed(String),
    BatchRefused(String),
    Retry(String),
}

fn send_loop(shared: &Shared, options: &ReporterOptions) {
    let path = format!("/v1/targets/{}/reports", options.target_id);
    let mut backoff = Backoff::new(options.backoff_initial, options.backoff_max);
    let mut max_batch = MAX_REPORTS_PER_BATCH;
    let mut failures_in_a_row = 0u32;
    loop {
        let batch = {
            let mut queue = shared.lock();
            loop {
                if queue.refused.is_some() || queue.closed.is_some() {
                    return;
                }
                if !queue.spool.pending().is_empty() {
                    break queue.spool.next_batch(max_batch);
                }
                if queue.closing {
                    return;
                }
                queue = shared.changed.wait(queue).unwrap_or_else(PoisonError::into_inner);
            }
        };
        let first_seq = batch.first().map_or(0, |r| r.seq);
        let last_seq = batch.last().map_or(0, |r| r.seq);
        let batch_len = batch.len();
        match deliver(options, &path, batch) {
            Delivery::Accepted(ack) => {
                if failures_in_a_row > 0 {
                    info!("collector reachable again", failed_attempts = failures_in_a_row);
                }
                failures_in_a_row = 0;
                backoff.reset();
                max_batch = MAX_REPORTS_PER_BATCH;
                let mut queue = shared.lock();
                if let Err(e) = queue.spool.remove_through(last_seq) {
                    error!("cannot remove acknowledged reports from the spool", error = e);
                }
                let pending = queue.spool.pending().len();
                drop(queue);
                shared.changed.notify_all();
                info!(
                    "reports acknowledged",
                    first_seq = first_seq,
                    last_seq = last_seq,
                    accepted = ack.accepted,
                    duplicates = ack.duplicates,
                    collector_highest_seq = ack.highest_seq,
                    still_pending = pending
                );
            }
            Delivery::TokenRefused(reason) => {
                error!(
                    "collector refused the token; reports stay in the spool and are not sent again",
                    reason = reason
                );
                shared.lock().refused = Some(reason);
                shared.changed.notify_all();
                return;
            }
            Delivery::AttemptClosed(reason) => {
                let mut queue = shared.lock();
                let dropped = queue.spool.pending().len();
                let last = queue.spool.pending().back().map_or(last_seq, |r| r.seq);
                if let Err(e) = queue.spool.remove_through(last) {
                    error!("cannot remove the dropped reports from the spool", error = e);
                }
                error!(
                    "collector has this attempt's final result and accepts nothing more; dropping the unsent reports",
                    dropped = dropped,
                    reason = reason
                );
                queue.closed = Some(reason);
                drop(queue);
                shared.changed.notify_all();
                return;
            }
            Delivery::BatchRefused(reason) if batch_len > 1 => {
                max_batch = batch_len / 2;
                warn!(
                    "collector refused a batch; retrying it in smaller batches",
                    first_seq = first_seq,
                    last_seq = last_seq,
                    reason = reason
                );
            }
            Delivery::BatchRefused(reason) => {
                error!("collector refused a report; dropping it", seq = first_seq, reason = reason);
                let mut queue = shared.lock();
                if let Err(e) = queue.spool.remove_through(first_seq) {
                    error!("cannot remove a refused report from the spool", error = e);
                }
                drop(queue);
                shared.changed.notify_all();
            }
            Delivery::Retry(reason) => {
                failures_in_a_row += 1;
                let delay = backoff.next_delay();
                warn!(
                    "cannot deliver reports; will retry",
                    first_seq = first_seq,
                    last_seq = last_seq,
                    attempt = failures_in_a_row,
                    retry_in_ms = delay.as_millis(),
                    reason = reason
                );
                std::thread::sleep(delay);
            }
        }
    }
}

/// Why a request could not be signed; both are worth a retry (the
/// machine's random source or clock may recover).
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("no random bytes for the request nonce: {0}")]
    NoRandom(getrandom::Error),
    #[error("the system clock is before 1970")]
    ClockBeforeEpoch,
}

/// The `Authorization` value of one request: signed now, with a fresh nonce.
fn sign(options: &ReporterOptions, path: &str, body: &[u8]) -> Result<String, SignError> {
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).map_err(SignError::NoRandom)?;
    let timestamp_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| SignError::ClockBeforeEpoch)?
        .as_millis() as i64;
    let request = SignedRequest::new("POST", path, options.target_id, options.attempt, timestamp_ms, nonce, body);
    Ok(options.signing_key.authorization(&request))
}

fn deliver(options: &ReporterOptions, path: &str, batch: Vec<AgentReport>) -> Delivery {
    let body = ReportBatch { reports: batch }.encode_to_vec();
    let authorization = match sign(options, path, &body) {
        Ok(authorization) => authorization,
        Err(error) => return Delivery::Retry(error.to_string()),
    };
    let headers = [("Authorization", authorization.as_str()), ("Content-Type", "application/x-protobuf")];
    let response = match http::post(&options.url, &options.connector, path, &headers, &body, options.timeouts) {
        Ok(response) => response,
        Err(e) => return Delivery::Retry(e.to_string()),
    };
    let status = response.status;
    let detail = || {
        let text = String::from_utf8_lossy(&response.body);
        let mut text = text.trim().to_owned();
        crate::outcome::truncate_to(&mut text, 300);
        if text.is_empty() {
            format!("HTTP {status}")
        } else {
            format!("HTTP {status}: {text}")
        }
    };
    match status {
        200..=299 => match ReportAck::decode(response.body.as_slice()) {
            Ok(ack) => Delivery::Accepted(ack),
            Err(e) => Delivery::Retry(format!("HTTP {status} with a body that is not a ReportAck: {e}")),
        },
        401 | 403 => Delivery::TokenRefused(detail()),
        409 => Delivery::AttemptClosed(detail()),
        400 | 413 | 422 => Delivery::BatchRefused(detail()),
        408 | 429 | 500..=599 => Delivery::Retry(detail()),
        _ => {
            error!("unexpected answer from the collector; will retry", status = status);
            Delivery::Retry(detail())
        }
    }
}

/// Capped exponential backoff with jitter: each delay is drawn from
/// [base/2, base], and base doubles up to the cap.
struct Backoff {
    initial: Duration,
    max: Duration,
    base: Duration,
    random: u64,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15)
            ^ (u64::from(std::process::id()) << 32);
        Self { initial, max: max.max(initial), base: initial, random: seed | 1 }
    }

    fn reset(&mut self) {
        self.base = self.initial;
    }

    fn next_delay(&mut self) -> Duration {
        // xorshift64: plenty for spreading retries of a fleet.
        self.random ^= self.random << 13;
        self.random ^= self.random >> 7;
        self.random ^= self.random << 17;
        let base_ms = self.base.as_millis() as u64;
        let half = base_ms / 2;
        let delay = Duration::from_millis(half + self.random % (base_ms - half + 1));
        self.base = (self.base * 2).min(self.max);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_errors_say_what_failed() {
        assert_eq!(SignError::ClockBeforeEpoch.to_string(), "the system clock is before 1970");
        let error = SignError::NoRandom(getrandom::Error::UNSUPPORTED);
        assert!(error.to_string().starts_with("no random bytes for the request nonce: "), "{error}");
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let delays: Vec<u128> = (0..8).map(|_| backoff.next_delay().as_millis()).collect();
        for (delay, base) in delays.iter().zip([100, 200, 400, 800, 1000, 1000, 1000, 1000]) {
            assert!((base / 2..=base).contains(delay), "{delays:?}");
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
