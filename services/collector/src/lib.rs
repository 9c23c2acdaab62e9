//! The collector: the agents' only endpoint (port 1072 by default).
//!
//! `POST /v1/targets/{target_id}/reports` takes a protobuf `ReportBatch`
//! with `Authorization: Bearer <token>`. A token is `<target id>.<secret>`;
//! only its sha256 is stored, on the target's row, so a token is useless for
//! any other target (403) and a wrong one is refused (401). Reports are
//! queued to a batcher that writes many requests in one transaction
//! (idempotent by (target, attempt, seq)); a request is answered only after
//! its batch committed, so an acknowledged report is durable.
//!
//! **Architecture invariant**: only the collector writes agent events.
//! Bad input gets 400/401/403/413 with a problem+json body; a failing
//! database gets 503 so the agent retries; nothing an agent sends can panic it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use chrono::{TimeZone, Utc};
use fleetpatch_bus::Bus;
use fleetpatch_proto::limits::{
    MAX_MESSAGE_BYTES, MAX_OUTPUT_TAIL_BYTES, MAX_REPORTS_PER_BATCH, MAX_REPORT_BODY_BYTES,
};
use fleetpatch_proto::v1::{self, agent_report::Kind};
use fleetpatch_proto::Message;
use fleetpatch_runtime::{Health, Shutdown};
use fleetpatch_store::{IncomingReport, PatchOutcomeKind, ReportKind, ReportResult, Store, TokenInfo};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, Notify};
use uuid::Uuid;

pub mod ceiling;

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
    /// Batches written at the same time (each its own transaction): while one
    /// waits for its commit, the next is collected and sent.
    pub writers: usize,
}

impl Default for CollectorOptions {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:1072".into(),
            batch_max_reports: 1_000,
            batch_wait_ms: 2,
            queue_capacity: 4_096,
            writers: 4,
        }
    }
}

impl CollectorOptions {
    pub fn validate(&self) -> Result<(), String> {
        if self.batch_max_reports == 0 {
            return Err("collector.batch_max_reports must be at least 1".into());
        }
        if self.queue_capacity == 0 {
            return Err("collector.queue_capacity must be at least 1".into());
        }
        if self.writers == 0 || self.writers > 64 {
            return Err("collector.writers must be between 1 and 64".into());
        }
        Ok(())
    }
}

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

/// The target a token claims to belong to (`<uuid>.<secret>`).
pub fn token_target(token: &str) -> Option<Uuid> {
    let (id, secret) = token.split_once('.')?;
    if secret.is_empty() {
        return None;
    }
    Uuid::parse_str(id).ok()
}

type Pending = (Vec<IncomingReport>, oneshot::Sender<Result<Vec<ReportResult>, String>>);

#[derive(Clone)]
struct AppState {
    store: Store,
    batches: mpsc::Sender<Pending>,
    tokens: Arc<Mutex<HashMap<Uuid, TokenInfo>>>,
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
        relay_stop.clone(),
    ));
    let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
    let batchers: Vec<_> = (0..options.writers.max(1))
        .map(|_| tokio::spawn(run_batcher(store.clone(), receiver.clone(), options.clone(), nudge.clone())))
        .collect();
    health.add_check("database", store.readiness_check());
    health.add_check("bus", bus.readiness_check());
    let state = AppState { store, batches: sender, tokens: Arc::default() };
    let app = Router::new()
        .route("/v1/targets/{target_id}/reports", post(post_reports))
        .with_state(state)
        .merge(fleetpatch_runtime::ops::router(health.clone()));
    tracing::info!(address = %local_addr, "collector listening");
    let join = tokio::spawn(async move {
        let drain = {
            let shutdown = shutdown.clone();
            let health = health.clone();
            async move {
                shutdown.wait().await;
                health.start_draining();
            }
        };
        axum::serve(listener, app).with_graceful_shutdown(drain).await?;
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
    store: Store,
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
        let reports: Vec<IncomingReport> = pending.iter().flat_map(|(r, _)| r.iter().cloned()).collect();
        let started = Instant::now();
        // Concurrent writers can deadlock on the same rows (an agent retrying
        // while its first request is still being written); the batch is
        // idempotent, so it is tried again before the agents are told to retry.
        let mut result = store.apply_reports(&reports).await;
        for pause in [10, 50] {
            if result.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(pause)).await;
            result = store.apply_reports(&reports).await;
        }
        metrics::histogram!("fleetpatch_collector_batch_write_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("fleetpatch_collector_batch_reports").record(reports.len() as f64);
        match result {
            Ok(results) => {
                nudge.notify_one();
                let mut results = results.into_iter();
                for (reports, reply) in pending {
                    let mine: Vec<ReportResult> = results.by_ref().take(reports.len()).collect();
                    let _ = reply.send(Ok(mine));
                }
            }
            Err(error) => {
                tracing::warn!(error = %error, reports = reports.len(), "writing a batch of reports failed");
                for (_, reply) in pending {
                    let _ = reply.send(Err(error.to_string()));
                }
            }
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

fn hashes_match(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

impl AppState {
    async fn token_info(&self, target: Uuid, refresh: bool) -> Result<Option<TokenInfo>, Response> {
        if !refresh {
            if let Some(info) = self.tokens.lock().expect("token cache lock").get(&target) {
                return Ok(Some(info.clone()));
            }
        }
        let info = self.store.token_info(target).await.map_err(|error| {
            tracing::warn!(error = %error, "token lookup failed");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Service Unavailable",
                "the collector's database is unavailable; retry",
            )
        })?;
        let mut cache = self.tokens.lock().expect("token cache lock");
        if cache.len() > 200_000 {
            cache.clear();
        }
        match &info {
            Some(info) => cache.insert(target, info.clone()),
            None => cache.remove(&target),
        };
        Ok(info)
    }

    /// The attempt the token authenticates for `target`, or the refusal.
    async fn authenticate(&self, target: Uuid, token: &str) -> Result<u32, Response> {
        let hash = token_hash(token);
        for refresh in [false, true] {
            if let Some(info) = self.token_info(target, refresh).await? {
                if hashes_match(&info.token_hash, &hash) {
                    return Ok(info.attempt);
                }
            }
        }
        if let Some(owner) = token_target(token).filter(|owner| *owner != target) {
            if let Some(info) = self.token_info(owner, true).await? {
                if hashes_match(&info.token_hash, &hash) {
                    return Err(problem(
                        StatusCode::FORBIDDEN,
                        "Forbidden",
                        format!("this token belongs to another target ({owner}); an agent may report only for its own target"),
                    ));
                }
            }
        }
        Err(problem(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            format!("the bearer token is not valid for target {target}"),
        ))
    }
}

fn tail(text: String, limit: usize) -> String {
    if text.len() <= limit {
        return text;
    }
    let mut start = text.len() - limit;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}

fn convert(target_id: Uuid, attempt: u32, index: usize, report: v1::AgentReport) -> Result<IncomingReport, String> {
    if report.seq == 0 {
        return Err(format!("reports[{index}].seq must be at least 1"));
    }
    if report.seq > i64::MAX as u64 {
        return Err(format!("reports[{index}].seq {} is too large", report.seq));
    }
    let kind = match report.kind {
        None => return Err(format!("reports[{index}] has no kind (started, finished, heartbeat or final)")),
        Some(Kind::Started(started)) => ReportKind::Started { patch_index: started.patch_index },
        Some(Kind::Heartbeat(beat)) => ReportKind::Heartbeat { patch_index: beat.patch_index },
        Some(Kind::Finished(finished)) => {
            let outcome = match v1::PatchOutcome::try_from(finished.outcome) {
                Ok(v1::PatchOutcome::Installed) => PatchOutcomeKind::Installed,
                Ok(v1::PatchOutcome::InstalledRebootRequired) => PatchOutcomeKind::InstalledRebootRequired,
                Ok(v1::PatchOutcome::Failed) => PatchOutcomeKind::Failed,
                Ok(v1::PatchOutcome::TimedOut) => PatchOutcomeKind::TimedOut,
                Ok(v1::PatchOutcome::ChecksumMismatch) => PatchOutcomeKind::ChecksumMismatch,
                _ => {
                    return Err(format!(
                        "reports[{index}].finished.outcome {} is not a known outcome",
                        finished.outcome
                    ))
                }
            };
            ReportKind::Finished {
                patch_index: finished.patch_index,
                exit_code: finished.exit_code,
                outcome,
                output_tail: tail(finished.output_tail, MAX_OUTPUT_TAIL_BYTES),
            }
        }
        Some(Kind::Final(result)) => ReportKind::Final {
            success: result.success,
            reboot_required: result.reboot_required,
            message: tail(result.message, MAX_MESSAGE_BYTES),
        },
    };
    let sent_at = Utc.timestamp_millis_opt(report.sent_at_unix_ms).single();
    Ok(IncomingReport { target_id, attempt, seq: report.seq, sent_at, kind })
}

async fn post_reports(
    State(state): State<AppState>,
    Path(target): Path<String>,
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
    let Some(token) = bearer(&headers) else {
        return problem(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "missing `Authorization: Bearer <token>` header; the token is in the agent's plan",
        );
    };
    let attempt = match state.authenticate(target_id, token).await {
        Ok(attempt) => attempt,
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
    if batch.reports.is_empty() || batch.reports.len() > MAX_REPORTS_PER_BATCH {
        return problem(
            StatusCode::BAD_REQUEST,
            "Bad Request",
            format!("a batch holds 1 to {MAX_REPORTS_PER_BATCH} reports, this one {}", batch.reports.len()),
        );
    }
    let mut reports = Vec::with_capacity(batch.reports.len());
    let mut highest_seq = 0;
    for (index, report) in batch.reports.into_iter().enumerate() {
        highest_seq = highest_seq.max(report.seq);
        match convert(target_id, attempt, index, report) {
            Ok(report) => reports.push(report),
            Err(detail) => return problem(StatusCode::BAD_REQUEST, "Bad Request", detail),
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
        Ok(Ok(results)) => {
            let accepted = results.iter().filter(|r| **r == ReportResult::Accepted).count() as u64;
            let duplicates = results.len() as u64 - accepted;
            metrics::counter!("fleetpatch_collector_reports_total", "result" => "accepted").increment(accepted);
            metrics::counter!("fleetpatch_collector_reports_total", "result" => "duplicate").increment(duplicates);
            let ack = v1::ReportAck { accepted, duplicates, highest_seq };
            ([(header::CONTENT_TYPE, "application/x-protobuf")], ack.encode_to_vec()).into_response()
        }
        _ => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "Service Unavailable",
            "the collector could not store the reports; retry",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_their_target() {
        let id = Uuid::new_v4();
        assert_eq!(token_target(&format!("{}.abc", id.simple())), Some(id));
        assert_eq!(token_target("garbage"), None);
        assert_eq!(token_target(&format!("{id}.")), None);
    }

    #[test]
    fn tails_keep_the_end_on_a_char_boundary() {
        assert_eq!(tail("héllo".into(), 3), "llo");
        assert_eq!(tail("aé".into(), 2), "é");
        assert_eq!(tail("ok".into(), 10), "ok");
    }

    #[test]
    fn reports_without_a_kind_or_seq_are_refused_by_name() {
        let id = Uuid::new_v4();
        let err = convert(id, 1, 3, v1::AgentReport { seq: 0, sent_at_unix_ms: 0, kind: None }).unwrap_err();
        assert!(err.contains("reports[3].seq"), "{err}");
        let err = convert(id, 1, 0, v1::AgentReport { seq: 1, sent_at_unix_ms: 0, kind: None }).unwrap_err();
        assert!(err.contains("no kind"), "{err}");
    }
}
