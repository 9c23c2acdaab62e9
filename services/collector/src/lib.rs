//! The collector: the agents' only endpoint (port 1072 by default).
//!
//! `POST /v1/targets/{target_id}/reports` takes a protobuf `ReportBatch`.
//! Every request is signed (`fleetpatch_proto::report_auth`): the agent
//! never sends its token, it sends a MAC keyed from it over the method, the
//! path, its target and attempt, a timestamp, a fresh nonce and the body's
//! sha256. The collector derives the same token from the shared token key
//! (`[tokens]`) and the nonce stored on the target, checks that its sha256
//! is the one stored, and verifies the MAC. In order, each step cheaper than
//! the next and before any database work where it can be:
//!
//! 1. a missing or malformed `Authorization` header: 401;
//! 2. a header naming another target than the path: 403;
//! 3. a timestamp more than `collector.max_clock_skew_seconds` from the
//!    collector's clock: 408 (stale: the agent signs it again and retries;
//!    found by the chaos test, where a request that sat in a frozen
//!    collector's socket for 60 s was refused and the agent gave up);
//! 4. an unknown target, or an attempt that is not the target's current
//!    one: 401;
//! 5. a body over the limit: 413; a MAC that does not match: 401 (the same
//!    answer as 1 and 4, which tells a forger nothing);
//! 6. a (target, nonce) already seen within the clock window: 401
//!    (replayed). The cache is in memory, per collector: across replicas a
//!    replay within the window can be accepted once more, and is a no-op,
//!    because reports are idempotent by (target, attempt, seq);
//! 7. the attempt's final result already applied: 409 (late), counted as
//!    `fleetpatch_collector_reports_total{result="late"}`, logged, not
//!    stored; the agent takes it as the end of its reporting. A retry of
//!    reports that are all stored already (the answer was lost) is
//!    acknowledged as duplicates instead, as before the final result;
//! 8. a report numbered above `collector.max_events_per_attempt`: 422, so
//!    a key holder cannot fill the database.
//!
//! After a watchdog timeout the agent may still run: its reports are still
//! stored as events (evidence; they change no state, the store's updates
//! are guarded by the target's state) and counted as `after_timeout`, until
//! its own final result is stored; from then on its key is refused (7).
//!
//! Accepted reports are queued to a batcher that writes many requests in
//! one transaction (idempotent by (target, attempt, seq)); a request is
//! answered only after its batch committed, so an acknowledged report is
//! durable.
//!
//! **Architecture invariant**: only the collector writes agent events.
//! Bad input gets 400/401/403/409/413/422 with a problem+json body; a
//! failing database gets 503 so the agent retries; nothing an agent sends
//! can panic it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use chrono::Utc;
use fleetpatch_bus::Bus;
use fleetpatch_proto::limits::{MAX_REPORTS_PER_BATCH, MAX_REPORT_BODY_BYTES};
use fleetpatch_proto::report_auth::{self, AuthError, Authorization, SigningKey};
use fleetpatch_proto::state::TargetState;
use fleetpatch_proto::v1::{self, agent_report::Kind};
use fleetpatch_proto::Message;
use fleetpatch_runtime::tokens::TokenKey;
use fleetpatch_runtime::{Health, Shutdown};
use fleetpatch_store::{AgentInstance, IncomingReport, ReportIntake, ReportResult, SentReport, Store, TokenInfo};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, Notify};
use uuid::Uuid;

/// The bare HTTP server of the collector's route, for `fleetpatch bench` only
/// (feature `ceiling`).
#[cfg(feature = "ceiling")]
pub mod ceiling;
mod convert;
mod keys;
mod options;
mod replay;

use convert::convert;
pub use options::{CollectorOptions, MAX_WORKER_THREADS};
use replay::{ReplayCache, ReplayVerdict};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Runtime(#[from] fleetpatch_runtime::Error),
    #[error("serving HTTP: {0}")]
    Serve(#[from] std::io::Error),
}

/// The sha256 (hex) under which a token is stored.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A request's reports and where its batch writer answers: each request of a
/// batch whose write failed gets the same store error (logged once).
type Pending = (Vec<IncomingReport>, oneshot::Sender<Result<Vec<ReportResult>, Arc<fleetpatch_store::Error>>>);

#[derive(Clone)]
struct AppState {
    intake: ReportIntake,
    batches: mpsc::Sender<Pending>,
    keys: Arc<Mutex<HashMap<Uuid, KeyEntry>>>,
    key_reader: keys::KeyReader,
    token_key: TokenKey,
    replays: Arc<Mutex<ReplayCache>>,
    max_skew_ms: i64,
    max_events_per_attempt: u64,
}

/// How long the collector's outbox relay waits after a batch committed
/// before it publishes: the batches of those milliseconds go out in one
/// pass (one claim, one publish, one delete) rather than one pass each. A
/// final result's next dispatch waits that much longer.
const RELAY_GATHER: Duration = Duration::from_millis(10);

/// How long a cached key's view of its target's state is trusted before it
/// is read again (a final result or a timeout applied by another process).
const KEY_STATE_TTL: Duration = Duration::from_secs(10);
/// Most targets whose signing keys are cached (the cache is cleared when full).
const MAX_CACHED_KEYS: usize = 200_000;

/// Where a target's current attempt stands for its agent's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AttemptStatus {
    /// In flight: reports are applied.
    Open,
    /// Timed out by the watchdog, no final result from the agent yet: its
    /// reports are stored as evidence and change no state.
    AfterTimeout,
    /// The attempt's final result is recorded: the key is no longer accepted.
    Closed,
}

impl AttemptStatus {
    fn of(info: &TokenInfo, final_reported: bool) -> Self {
        match info.state {
            state if state.is_in_flight() => Self::Open,
            TargetState::TimedOut if !final_reported => Self::AfterTimeout,
            _ => Self::Closed,
        }
    }
}

/// A target's signing key for its current attempt.
#[derive(Clone)]
struct KeyEntry {
    attempt: u32,
    signing_key: SigningKey,
    status: AttemptStatus,
    read_at: Instant,
}

fn now_unix_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// A running collector.
pub struct CollectorHandle {
    pub local_addr: SocketAddr,
    pub join: tokio::task::JoinHandle<Result<(), Error>>,
}

fn problem(status: StatusCode, title: &str, detail: impl Into<String>) -> Response {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": title,
        "status": status.as_u16(),
        "detail": detail.into(),
    });
    metrics::counter!("fleetpatch_collector_requests_rejected_total", "status" => status.as_u16().to_string())
        .increment(1);
    (status, [(header::CONTENT_TYPE, "application/problem+json")], body.to_string()).into_response()
}

/// Binds the listener and starts serving; drains on `shutdown`.
pub async fn start(
    options: CollectorOptions,
    token_key: TokenKey,
    store: Store,
    bus: Bus,
    health: Health,
    shutdown: Shutdown,
) -> Result<CollectorHandle, Error> {
    let listener = fleetpatch_runtime::ops::bind(&options.listen).await?;
    let local_addr = listener.local_addr()?;
    let (sender, receiver) = mpsc::channel::<Pending>(options.queue_capacity);
    let nudge = Arc::new(Notify::new());
    let relay_stop = tokio_util::sync::CancellationToken::new();
    let relay = tokio::spawn(fleetpatch_store::relay::run_relay(
        store.clone(),
        bus.clone(),
        nudge.clone(),
        Duration::from_secs(1),
        RELAY_GATHER,
        relay_stop.clone(),
    ));
    let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
    let intake = store.report_intake().with_heartbeat_events(options.heartbeat_events);
    let batchers: Vec<_> = (0..options.writers.max(1))
        .map(|_| tokio::spawn(run_batcher(intake.clone(), receiver.clone(), options.clone(), nudge.clone())))
        .collect();
    health.add_check("database", store.readiness_check());
    health.add_check("bus", bus.readiness_check());
    let key_reader = keys::KeyReader::start(intake.clone());
    let state = AppState {
        intake,
        batches: sender,
        keys: Arc::default(),
        key_reader,
        token_key,
        replays: Arc::new(Mutex::new(ReplayCache::new(options.replay_cache_entries))),
        max_skew_ms: (options.max_clock_skew_seconds * 1_000) as i64,
        max_events_per_attempt: options.max_events_per_attempt,
    };
    let app = Router::new()
        .route("/v1/targets/{target_id}/reports", post(post_reports))
        .with_state(state)
        .merge(fleetpatch_runtime::ops::router(health.clone()));
    tracing::info!(address = %local_addr, tls = options.http.tls.is_some(), "collector listening");
    let http = options.http.clone();
    let join = tokio::spawn(async move {
        let drain = {
            let shutdown = shutdown.clone();
            let health = health.clone();
            async move {
                shutdown.wait().await;
                health.start_draining();
            }
        };
        fleetpatch_runtime::http::serve(listener, app, http, drain).await?;
        // The server stopped taking requests; let the batcher finish, then the relay.
        for batcher in batchers {
            let _ = batcher.await;
        }
        relay_stop.cancel();
        let _ = relay.await;
        tracing::info!("collector drained");
        Ok(())
    });
    Ok(CollectorHandle { local_addr, join })
}

/// One batch writer: takes the requests waiting (up to `batch_max_reports`,
/// or what arrives within `batch_wait_ms` of the first), then writes them in
/// one transaction while another writer collects the next batch.
async fn run_batcher(
    intake: ReportIntake,
    receiver: Arc<tokio::sync::Mutex<mpsc::Receiver<Pending>>>,
    options: CollectorOptions,
    nudge: Arc<Notify>,
) {
    let wait = Duration::from_millis(options.batch_wait_ms);
    loop {
        let pending = {
            let mut receiver = receiver.lock().await;
            let Some(first) = receiver.recv().await else { return };
            let mut pending = vec![first];
            let mut count = pending[0].0.len();
            let deadline = tokio::time::Instant::now() + wait;
            while count < options.batch_max_reports {
                match tokio::time::timeout_at(deadline, receiver.recv()).await {
                    Ok(Some(next)) => {
                        count += next.0.len();
                        pending.push(next);
                    }
                    _ => break,
                }
            }
            pending
        };
        // The requests' reports moved into one batch; each reply remembers how
        // many of the batch's results are its own.
        let mut reports: Vec<IncomingReport> = Vec::with_capacity(pending.iter().map(|(r, _)| r.len()).sum());
        let mut replies = Vec::with_capacity(pending.len());
        for (mine, reply) in pending {
            replies.push((mine.len(), reply));
            reports.extend(mine);
        }
        let started = Instant::now();
        // Concurrent writers (`writers` above 1, or another replica) can
        // deadlock on the same rows (an agent retrying
        // while its first request is still being written); the batch is
        // idempotent, so it is tried again before the agents are told to retry.
        let mut result = intake.apply_reports(&reports).await;
        for pause in [10, 50] {
            if result.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(pause)).await;
            result = intake.apply_reports(&reports).await;
        }
        metrics::histogram!("fleetpatch_collector_batch_write_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("fleetpatch_collector_batch_reports").record(reports.len() as f64);
        match result {
            Ok(results) => {
                nudge.notify_one();
                let mut results = results.into_iter();
                for (count, reply) in replies {
                    let mine: Vec<ReportResult> = results.by_ref().take(count).collect();
                    let _ = reply.send(Ok(mine));
                }
            }
            Err(error) => {
                tracing::warn!(error = %error, reports = reports.len(), "writing a batch of reports failed");
                let error = Arc::new(error);
                for (_, reply) in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Why a signed request is refused (the metric label), and the answer.
fn refuse(reason: &'static str, response: Response) -> Response {
    metrics::counter!("fleetpatch_collector_auth_refused_total", "reason" => reason).increment(1);
    response
}

/// The one answer for every authentication failure that could help a
/// forger tell its mistakes apart (no header, a malformed one, an unknown
/// target or attempt, a wrong MAC).
fn unauthorized(reason: &'static str) -> Response {
    refuse(
        reason,
        problem(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "the request is not signed with this target's current key (FP1-HMAC-SHA256, see the agent's plan)",
        ),
    )
}

fn auth_error(error: AuthError, max_skew_ms: i64) -> Response {
    match error {
        // 408, not 401: a request that waited too long (in a frozen or
        // restarting collector's socket) is fine once signed again, so the
        // agent retries it with a fresh timestamp instead of giving up.
        AuthError::Stale => refuse(
            error.reason(),
            problem(
                StatusCode::REQUEST_TIMEOUT,
                "Request Timeout",
                format!(
                    "the request's timestamp is more than {} s from the collector's clock: it waited too long, or \
                     the target's clock is off (check it); sign it again",
                    max_skew_ms / 1_000
                ),
            ),
        ),
        AuthError::Missing | AuthError::Malformed | AuthError::BadMac => unauthorized(error.reason()),
    }
}

impl AppState {
    /// The signing key of `target`'s current attempt, from the cache or the
    /// database; `None` when the target has no token (unknown, not probed
    /// yet, or sent back to pending).
    async fn key_entry(&self, target: Uuid, refresh: bool) -> Result<Option<KeyEntry>, Response> {
        if !refresh {
            if let Some(entry) = self.keys.lock().expect("key cache lock").get(&target) {
                if entry.status == AttemptStatus::Closed || entry.read_at.elapsed() < KEY_STATE_TTL {
                    return Ok(Some(entry.clone()));
                }
            }
        }
        let unavailable = |error: &dyn std::fmt::Display| {
            tracing::warn!(error = %error, "token lookup failed");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Service Unavailable",
                "the collector's database is unavailable; retry",
            )
        };
        let Some(info) = self.key_reader.read(target).await.map_err(|error| unavailable(&error))? else {
            self.keys.lock().expect("key cache lock").remove(&target);
            return Ok(None);
        };
        let final_reported = if info.state == TargetState::TimedOut {
            self.intake.final_reported(target, info.attempt).await.map_err(|error| unavailable(&error))?
        } else {
            false
        };
        let token = report_auth::derive_token(self.token_key.as_bytes(), target, info.attempt, &info.token_nonce);
        if !hashes_match(&token_hash(&token), &info.token_hash) {
            // The worker that made this token used another key.
            tracing::error!(
                target_id = %target,
                attempt = info.attempt,
                "the target's token was not derived from this collector's token key; give workers and collectors \
                 the same tokens.key_ref"
            );
            return Ok(None);
        }
        let entry = KeyEntry {
            attempt: info.attempt,
            signing_key: SigningKey::from_token(&token),
            status: AttemptStatus::of(&info, final_reported),
            read_at: Instant::now(),
        };
        let mut cache = self.keys.lock().expect("key cache lock");
        if cache.len() >= MAX_CACHED_KEYS {
            cache.clear();
        }
        cache.insert(target, entry.clone());
        Ok(Some(entry))
    }

    /// The key of `target`'s `attempt`: a cached key of an older attempt is
    /// read again once.
    async fn key_for(&self, target: Uuid, attempt: u32) -> Result<KeyEntry, Response> {
        for refresh in [false, true] {
            match self.key_entry(target, refresh).await? {
                Some(entry) if entry.attempt == attempt => return Ok(entry),
                Some(entry) if entry.attempt > attempt => return Err(unauthorized("old_attempt")),
                _ => {}
            }
        }
        Err(unauthorized("unknown_key"))
    }

    /// The target's final result was stored: its key is no longer accepted.
    fn close_attempt(&self, target: Uuid, attempt: u32) {
        if let Some(entry) = self.keys.lock().expect("key cache lock").get_mut(&target) {
            if entry.attempt == attempt {
                entry.status = AttemptStatus::Closed;
            }
        }
    }
}

fn hashes_match(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

async fn post_reports(
    State(state): State<AppState>,
    Path(target): Path<String>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Ok(target_id) = Uuid::parse_str(&target) else {
        return problem(
            StatusCode::BAD_REQUEST,
            "Bad Request",
            format!("target id {target:?} in the path is not a UUID"),
        );
    };
    // Everything up to the key lookup is cheap and touches no database.
    let authorization = match headers.get(header::AUTHORIZATION).map(|value| value.to_str()) {
        None => return auth_error(AuthError::Missing, state.max_skew_ms),
        Some(Err(_)) => return auth_error(AuthError::Malformed, state.max_skew_ms),
        Some(Ok(value)) => match Authorization::parse(value) {
            Ok(authorization) => authorization,
            Err(error) => return auth_error(error, state.max_skew_ms),
        },
    };
    if authorization.target_id != target_id {
        return refuse(
            "other_target",
            problem(
                StatusCode::FORBIDDEN,
                "Forbidden",
                "the request is signed for another target; an agent may report only for its own target",
            ),
        );
    }
    let now_ms = now_unix_ms();
    if let Err(error) = report_auth::check_clock(authorization.timestamp_ms, now_ms, state.max_skew_ms) {
        return auth_error(error, state.max_skew_ms);
    }
    let key = match state.key_for(target_id, authorization.attempt).await {
        Ok(key) => key,
        Err(response) => return response,
    };
    let bytes = match axum::body::to_bytes(body, MAX_REPORT_BODY_BYTES).await {
        Ok(bytes) => bytes,
        Err(_) => {
            return problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Payload Too Large",
                format!("a report batch may be at most {MAX_REPORT_BODY_BYTES} bytes; send fewer reports per request"),
            )
        }
    };
    let signed = authorization.request("POST", uri.path(), &bytes);
    if let Err(error) = key.signing_key.verify(&signed, &authorization.mac) {
        return auth_error(error, state.max_skew_ms);
    }
    let forget_at_ms = authorization.timestamp_ms.saturating_add(state.max_skew_ms);
    let verdict = state.replays.lock().expect("replay cache lock").check_and_insert(
        target_id,
        authorization.nonce,
        forget_at_ms,
        now_ms,
    );
    match verdict {
        ReplayVerdict::Fresh => {}
        ReplayVerdict::Replayed => {
            return refuse(
                "replayed",
                problem(StatusCode::UNAUTHORIZED, "Unauthorized", "replayed: this request was already received"),
            )
        }
        ReplayVerdict::Full => {
            tracing::warn!(
                "the replay cache is full; raise collector.replay_cache_entries or lower max_clock_skew_seconds"
            );
            return refuse(
                "replay_cache_full",
                problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Service Unavailable",
                    "the collector is busy; retry with backoff",
                ),
            );
        }
    }
    let attempt = key.attempt;
    let batch = match v1::ReportBatch::decode(bytes) {
        Ok(batch) => batch,
        Err(error) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "Bad Request",
                format!("the body is not a protobuf fleetpatch.v1.ReportBatch: {error}"),
            )
        }
    };
    if key.status == AttemptStatus::Closed {
        // A retry of reports already stored (the answer to the request that
        // stored them was lost: a restart, a network cut) is acknowledged as
        // duplicates, as it would have been before the final result; only
        // new reports are late.
        let keys: Vec<SentReport> = batch
            .reports
            .iter()
            .map(|r| SentReport {
                agent_instance: AgentInstance(r.agent_instance),
                seq: r.seq,
                heartbeat: matches!(r.kind, Some(Kind::Heartbeat(_))),
            })
            .collect();
        let highest_seq = keys.iter().map(|r| r.seq).max().unwrap_or(0);
        match state.intake.stored_report_count(target_id, attempt, &keys).await {
            Ok(stored) if !keys.is_empty() && stored == keys.len() as u64 => {
                metrics::counter!("fleetpatch_collector_reports_total", "result" => "duplicate").increment(stored);
                return ack_response(v1::ReportAck { accepted: 0, duplicates: stored, highest_seq });
            }
            Ok(_) => {}
            Err(_) => {
                return problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Service Unavailable",
                    "the collector could not read the stored reports; retry",
                )
            }
        }
        metrics::counter!("fleetpatch_collector_reports_total", "result" => "late").increment(1);
        tracing::info!(target_id = %target_id, attempt, "late report after the attempt's final result; not applied");
        return problem(
            StatusCode::CONFLICT,
            "Conflict",
            format!(
                "attempt {attempt} of target {target_id} already has its final result; no further reports are \
                 accepted for it"
            ),
        );
    }
    if batch.reports.is_empty() || batch.reports.len() > MAX_REPORTS_PER_BATCH {
        return problem(
            StatusCode::BAD_REQUEST,
            "Bad Request",
            format!("a batch holds 1 to {MAX_REPORTS_PER_BATCH} reports, this one {}", batch.reports.len()),
        );
    }
    let mut reports = Vec::with_capacity(batch.reports.len());
    let mut highest_seq = 0;
    let mut has_final = false;
    for (index, report) in batch.reports.into_iter().enumerate() {
        highest_seq = highest_seq.max(report.seq);
        if report.seq > state.max_events_per_attempt {
            metrics::counter!("fleetpatch_collector_reports_total", "result" => "over_limit").increment(1);
            return problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Unprocessable Entity",
                format!(
                    "reports[{index}].seq {} is above collector.max_events_per_attempt ({}): this attempt has sent \
                     as many reports as it may",
                    report.seq, state.max_events_per_attempt
                ),
            );
        }
        has_final |= matches!(report.kind, Some(Kind::Final(_)));
        match convert(target_id, attempt, index, report) {
            Ok(report) => reports.push(report),
            Err(detail) => return problem(StatusCode::BAD_REQUEST, "Bad Request", detail.to_string()),
        }
    }
    let (reply, answer) = oneshot::channel();
    if state.batches.try_send((reports, reply)).is_err() {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "Service Unavailable",
            "the collector is busy; retry with backoff",
        );
    }
    match answer.await {
        Ok(Ok(results)) if results.contains(&ReportResult::UnknownTarget) => {
            // Its row was read to authenticate the request; it is gone now.
            tracing::error!(target_id = %target_id, attempt, "reports of a target the store no longer has");
            metrics::counter!("fleetpatch_collector_reports_total", "result" => "unknown_target")
                .increment(results.len() as u64);
            problem(StatusCode::NOT_FOUND, "Not Found", format!("target {target_id} is not in the store"))
        }
        Ok(Ok(results)) => {
            if has_final {
                state.close_attempt(target_id, attempt);
            }
            let accepted = results.iter().filter(|r| **r == ReportResult::Accepted).count() as u64;
            let duplicates = results.len() as u64 - accepted;
            let accepted_as = if key.status == AttemptStatus::AfterTimeout { "after_timeout" } else { "accepted" };
            metrics::counter!("fleetpatch_collector_reports_total", "result" => accepted_as).increment(accepted);
            metrics::counter!("fleetpatch_collector_reports_total", "result" => "duplicate").increment(duplicates);
            ack_response(v1::ReportAck { accepted, duplicates, highest_seq })
        }
        _ => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "Service Unavailable",
            "the collector could not store the reports; retry",
        ),
    }
}

fn ack_response(ack: v1::ReportAck) -> Response {
    ([(header::CONTENT_TYPE, "application/x-protobuf")], ack.encode_to_vec()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attempt_status_follows_the_target_state() {
        let info = |state| TokenInfo {
            token_hash: String::new(),
            token_nonce: String::new(),
            attempt: 1,
            rollout_id: Uuid::nil(),
            state,
        };
        assert_eq!(AttemptStatus::of(&info(TargetState::Running), false), AttemptStatus::Open);
        assert_eq!(AttemptStatus::of(&info(TargetState::Installing), false), AttemptStatus::Open);
        assert_eq!(AttemptStatus::of(&info(TargetState::TimedOut), false), AttemptStatus::AfterTimeout);
        assert_eq!(AttemptStatus::of(&info(TargetState::TimedOut), true), AttemptStatus::Closed);
        assert_eq!(AttemptStatus::of(&info(TargetState::Succeeded), false), AttemptStatus::Closed);
        assert_eq!(AttemptStatus::of(&info(TargetState::Failed), false), AttemptStatus::Closed);
    }
}
