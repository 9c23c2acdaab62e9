//! The REST API (`/v1`), its request validation, and problem+json errors.
//!
//! Every refusal names what is wrong and where: `targets[3].host must not be
//! empty`. The OpenAPI document is served at `/openapi.json`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use fleetpatch_proto::plan::{Detection, InstallerKind, RebootPolicy};
use fleetpatch_proto::state::TargetState;
use fleetpatch_store::{content, EventCursor, NewPatch, NewRollout, NewTarget, RolloutSettings, Store, WaveSpec};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use uuid::Uuid;

/// The transports a rollout may name.
pub const TRANSPORTS: [&str; 3] = ["sim", "ssh", "smb"];
/// Largest `POST /v1/rollouts` body: room for the largest rollout
/// `scheduler.max_targets_per_rollout` may allow (1,000,000 short targets).
pub const MAX_ROLLOUT_BODY_BYTES: usize = 256 * 1024 * 1024;
/// Rollouts `POST /v1/rollouts` creates at once. Each spools its body (up to
/// [`MAX_ROLLOUT_BODY_BYTES`]) to the content directory while it is read, so
/// the content volume needs at most this many times that in free space; one
/// more is refused with 429 until one of them is done.
pub const MAX_CONCURRENT_CREATES: usize = 4;
/// Events of a target per page of `GET /v1/targets/{id}` unless
/// `events_limit` says otherwise, and the most a page may hold.
pub const DEFAULT_EVENTS_PAGE: u64 = 1_000;
pub const MAX_EVENTS_PAGE: u64 = 10_000;

#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    /// For the dead-letter queue (`dead_letters.rs`).
    pub bus: fleetpatch_bus::Bus,
    pub nudge: Arc<Notify>,
    pub content_dir: PathBuf,
    pub input: Arc<InputPolicy>,
    /// Checks the credential of every `/v1` request and audits its calls.
    pub auth: crate::auth::Authenticator,
    /// One permit per rollout being created ([`MAX_CONCURRENT_CREATES`]).
    pub creates: Arc<tokio::sync::Semaphore>,
}

/// What requests are checked against: the configured limits and the names
/// of the credentials an administrator defined.
#[derive(Debug, Clone)]
pub struct InputPolicy {
    /// `scheduler.max_targets_per_rollout`.
    pub max_targets_per_rollout: usize,
    /// `scheduler.max_content_bytes`.
    pub max_content_bytes: u64,
    /// The `[credentials.<name>]` names a target may name.
    pub credential_names: BTreeSet<String>,
}

impl InputPolicy {
    /// Whether a target may name `name`; the message says what to do.
    fn check_credential(&self, name: &str) -> Result<(), UnknownCredential> {
        if self.credential_names.contains(name) {
            return Ok(());
        }
        let defined = if self.credential_names.is_empty() {
            "none".to_owned()
        } else {
            self.credential_names.iter().map(String::as_str).collect::<Vec<_>>().join(", ")
        };
        Err(if fleetpatch_runtime::credentials::is_valid_name(name) {
            UnknownCredential::Undefined { name: name.to_owned(), defined }
        } else {
            UnknownCredential::NotAName { defined }
        })
    }
}

/// Why a rollout may not name a credential (the message of its field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnknownCredential {
    /// A well-formed name that no `[credentials.<name>]` defines.
    #[error(
        "no credential is named {name:?} (defined: {defined}); ask an administrator to define it under \
         [credentials.{name}] where the workers run"
    )]
    Undefined { name: String, defined: String },
    /// Not a credential name at all (perhaps a pasted secret): not repeated.
    #[error("must name a credential an administrator defined (defined: {defined}), never a secret or its location")]
    NotAName { defined: String },
}

impl Default for InputPolicy {
    fn default() -> Self {
        Self { max_targets_per_rollout: 100_000, max_content_bytes: 4 << 30, credential_names: BTreeSet::new() }
    }
}

// ------------------------------------------------------------------ errors

/// One wrong field of a request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// A problem+json error (RFC 9457).
#[derive(Debug)]
pub struct Problem {
    pub status: StatusCode,
    pub title: &'static str,
    pub detail: String,
    pub errors: Vec<FieldError>,
}

impl Problem {
    pub(crate) fn new(status: StatusCode, title: &'static str, detail: impl Into<String>) -> Self {
        Self { status, title, detail: detail.into(), errors: vec![] }
    }
    pub(crate) fn invalid(errors: Vec<FieldError>) -> Self {
        let detail = errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; ");
        Self { status: StatusCode::UNPROCESSABLE_ENTITY, title: "Invalid request", detail, errors }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({
            "type": "about:blank",
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if !self.errors.is_empty() {
            body["errors"] = serde_json::to_value(&self.errors).unwrap_or_default();
        }
        (self.status, [(header::CONTENT_TYPE, "application/problem+json")], body.to_string()).into_response()
    }
}

impl From<fleetpatch_store::Error> for Problem {
    fn from(error: fleetpatch_store::Error) -> Self {
        match error {
            fleetpatch_store::Error::NotFound { .. } => {
                Problem::new(StatusCode::NOT_FOUND, "Not found", error.to_string())
            }
            fleetpatch_store::Error::Conflict(message) => Problem::new(StatusCode::CONFLICT, "Conflict", message),
            fleetpatch_store::Error::Invalid(message) => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid request", message)
            }
            other => {
                tracing::error!(error = %other, "store error in the API");
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Service unavailable",
                    "the database is unavailable; retry",
                )
            }
        }
    }
}

#[cfg(test)]
mod content_tests;
mod evidence;
mod intake;
#[cfg(test)]
mod intake_tests;
pub mod rollout_file;
mod schema;
#[cfg(test)]
pub(crate) mod test_api;

pub use evidence::DIGEST_HEADER;
pub use schema::*;

// ------------------------------------------------------------------ handlers

/// The API: `/openapi.json` open, every `/v1` route behind
/// [`crate::auth::authenticate`] (a credential, a role, the audit log).
pub fn router(state: ApiState) -> Router {
    let v1 = Router::new()
        .route("/v1/rollouts", post(create_rollout).get(list_rollouts))
        .route("/v1/rollouts/{id}", get(show_rollout))
        .route("/v1/rollouts/{id}/targets", get(list_targets))
        .route("/v1/rollouts/{id}/pause", post(pause))
        .route("/v1/rollouts/{id}/resume", post(resume))
        .route("/v1/rollouts/{id}/approve", post(approve))
        .route("/v1/rollouts/{id}/abort", post(abort))
        .route("/v1/rollouts/{id}/retry-failed", post(retry_failed))
        .route("/v1/rollouts/{id}/report", get(evidence::report))
        .route("/v1/reports/{sha256}", get(evidence::issued))
        .route("/v1/targets/{id}", get(show_target))
        .route("/v1/content/{sha256}", put(upload_content).head(has_content).get(download_content))
        .route("/v1/audit", get(audit))
        .route("/v1/dead-letters", get(crate::dead_letters::list))
        .route("/v1/dead-letters/replay", post(crate::dead_letters::replay))
        .route_layer(axum::middleware::from_fn_with_state(state.auth.clone(), crate::auth::authenticate))
        .with_state(state);
    Router::new().route("/openapi.json", get(openapi)).merge(v1)
}

/// The OpenAPI document.
pub const OPENAPI: &str = include_str!("../../openapi.json");

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

pub(crate) fn parse_id(raw: &str, what: &str) -> Result<Uuid, Problem> {
    Uuid::parse_str(raw)
        .map_err(|_| Problem::new(StatusCode::BAD_REQUEST, "Bad request", format!("{what} id {raw:?} is not a UUID")))
}

/// Fields of a JSON body whose strings (or keys) hold NUL, which
/// PostgreSQL cannot store; `None` when there is none. JSON can only carry
/// NUL escaped, so a body without `\u0000` is not parsed twice.
pub(crate) fn nul_fields(body: &[u8]) -> Option<Vec<FieldError>> {
    let escaped = body.windows(6).any(|w| w[0] == b'\\' && w[1] == b'u' && &w[2..] == b"0000");
    if !escaped {
        return None;
    }
    fn walk(value: &serde_json::Value, path: &str, out: &mut Vec<FieldError>) {
        let message = "contains a NUL character (\\u0000), which cannot be stored; remove it";
        match value {
            serde_json::Value::String(text) if text.contains('\0') => {
                out.push(FieldError { field: path.to_owned(), message: message.into() })
            }
            serde_json::Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk(item, &format!("{path}[{i}]"), out);
                }
            }
            serde_json::Value::Object(map) => {
                for (key, item) in map {
                    let field = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                    if key.contains('\0') {
                        out.push(FieldError { field: field.clone(), message: format!("key {message}") });
                    }
                    walk(item, &field, out);
                }
            }
            _ => {}
        }
    }
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let mut found = Vec::new();
    walk(&value, "", &mut found);
    found.truncate(50);
    (!found.is_empty()).then_some(found)
}

/// `POST /v1/rollouts`: read as it arrives, in passes (`intake.rs`), so a
/// rollout of a million targets costs the scheduler no more memory than one
/// of a thousand.
async fn create_rollout(State(state): State<ApiState>, body: Body) -> Result<Response, Problem> {
    let rollout = intake::create_streamed(&state, body).await?;
    let id = rollout.id;
    Ok((StatusCode::CREATED, [(header::LOCATION, format!("/v1/rollouts/{id}"))], Json(rollout)).into_response())
}

/// Validates a parsed request and creates its rollout: the console's create
/// page, whose requests are small (it refuses NUL characters first,
/// [`nul_fields`]). `POST /v1/rollouts` applies the same rules, the pieces
/// [`validate`] is made of, to a body it reads in passes (`intake.rs`).
pub(crate) async fn create(state: &ApiState, request: CreateRollout) -> Result<fleetpatch_store::Rollout, Problem> {
    let new = validate(request, &state.content_dir, &state.input)?;
    let targets = new.targets.len();
    let id = state.store.create_rollout(new).await?;
    state.nudge.notify_one();
    tracing::info!(rollout_id = %id, targets, "rollout created");
    Ok(state.store.rollout(id).await?)
}

/// An operator's action on a rollout, as the API and the console take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutAction {
    Pause,
    Resume,
    Approve,
    Abort,
    RetryFailed,
}

impl RolloutAction {
    pub const ALL: [RolloutAction; 5] = [Self::Pause, Self::Resume, Self::Approve, Self::Abort, Self::RetryFailed];

    /// The last segment of its route (`/v1/rollouts/{id}/retry-failed`).
    pub fn slug(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Approve => "approve",
            Self::Abort => "abort",
            Self::RetryFailed => "retry-failed",
        }
    }

    pub fn from_slug(slug: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|action| action.slug() == slug)
    }

    /// The API route that takes it, whose role rule ([`crate::auth::required_role`]) applies.
    pub fn api_route(self) -> String {
        format!("/v1/rollouts/{{id}}/{}", self.slug())
    }
}

/// What an action did: the rollout afterwards, or how many targets a retry started again.
pub(crate) enum ActionOutcome {
    Rollout(Box<fleetpatch_store::Rollout>),
    Retried(u64),
}

/// Takes `action` on rollout `id` (and wakes dispatch when it may have work).
pub(crate) async fn take_action(
    state: &ApiState,
    id: Uuid,
    action: RolloutAction,
    pause_reason: Option<String>,
) -> Result<ActionOutcome, Problem> {
    let outcome = match action {
        RolloutAction::Pause => {
            let reason = pause_reason.unwrap_or_else(|| "paused by an operator".into());
            if reason.contains('\0') {
                return Err(Problem::invalid(vec![FieldError {
                    field: "reason".into(),
                    message: "contains a NUL character (\\u0000), which cannot be stored; remove it".into(),
                }]));
            }
            return Ok(ActionOutcome::Rollout(Box::new(state.store.pause_rollout(id, &reason).await?)));
        }
        RolloutAction::Resume => ActionOutcome::Rollout(Box::new(state.store.resume_rollout(id).await?)),
        RolloutAction::Approve => ActionOutcome::Rollout(Box::new(state.store.approve_rollout(id).await?)),
        RolloutAction::Abort => return Ok(ActionOutcome::Rollout(Box::new(state.store.abort_rollout(id).await?))),
        RolloutAction::RetryFailed => ActionOutcome::Retried(state.store.retry_failed(id).await?),
    };
    state.nudge.notify_one();
    Ok(outcome)
}

impl IntoResponse for ActionOutcome {
    fn into_response(self) -> Response {
        match self {
            Self::Rollout(rollout) => Json(rollout).into_response(),
            Self::Retried(retried) => Json(serde_json::json!({ "retried": retried })).into_response(),
        }
    }
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    limit: Option<u64>,
}

async fn list_rollouts(State(state): State<ApiState>, Query(query): Query<ListQuery>) -> Result<Response, Problem> {
    let rollouts = state.store.list_rollouts(query.limit.unwrap_or(100).min(1_000)).await?;
    Ok(Json(serde_json::json!({ "rollouts": rollouts })).into_response())
}

async fn show_rollout(State(state): State<ApiState>, Path(id): Path<String>) -> Result<Response, Problem> {
    let id = parse_id(&id, "rollout")?;
    let rollout = state.store.rollout(id).await?;
    let progress = state.store.progress(&rollout).await?;
    let patches = state.store.patches(id).await?;
    Ok(Json(serde_json::json!({ "rollout": rollout, "progress": progress, "patches": patches })).into_response())
}

#[derive(Deserialize)]
struct TargetsQuery {
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    after: Option<u32>,
    #[serde(default)]
    limit: Option<u64>,
}

async fn list_targets(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(query): Query<TargetsQuery>,
) -> Result<Response, Problem> {
    let id = parse_id(&id, "rollout")?;
    let filter = match query.state.as_deref() {
        None | Some("") => None,
        Some(raw) => Some(raw.parse::<TargetState>().map_err(|error| {
            let mut problem = Problem::new(StatusCode::BAD_REQUEST, "Bad request", format!("state: {error}"));
            problem.errors.push(FieldError { field: "state".into(), message: error.to_string() });
            problem
        })?),
    };
    state.store.rollout(id).await?;
    let limit = query.limit.unwrap_or(1_000).clamp(1, 10_000);
    let targets = state.store.targets(id, filter, query.after, limit).await?;
    let next = (targets.len() as u64 == limit).then(|| targets.last().map(|t| t.ordinal)).flatten();
    Ok(Json(serde_json::json!({ "targets": targets, "next_after": next })).into_response())
}

#[derive(Deserialize)]
struct TargetQuery {
    /// Events per page (default [`DEFAULT_EVENTS_PAGE`], at most [`MAX_EVENTS_PAGE`]).
    #[serde(default)]
    events_limit: Option<u64>,
    /// `<attempt>.<seq>` of the last event of the previous page (its `events_next_after`).
    #[serde(default)]
    events_after: Option<String>,
}

fn parse_events_cursor(raw: &str) -> Result<EventCursor, Problem> {
    raw.parse::<EventCursor>().map_err(|error| {
        let message = error.to_string();
        let mut problem = Problem::new(StatusCode::BAD_REQUEST, "Bad request", format!("events_after: {message}"));
        problem.errors.push(FieldError { field: "events_after".into(), message });
        problem
    })
}

async fn show_target(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(query): Query<TargetQuery>,
) -> Result<Response, Problem> {
    let id = parse_id(&id, "target")?;
    let after = query.events_after.as_deref().filter(|raw| !raw.is_empty()).map(parse_events_cursor).transpose()?;
    let limit = query.events_limit.unwrap_or(DEFAULT_EVENTS_PAGE).clamp(1, MAX_EVENTS_PAGE);
    let target = state.store.target(id).await?;
    let patches = state.store.patches(target.rollout_id).await?;
    let names: BTreeMap<u32, String> = patches.iter().map(|p| (p.index, p.name.clone())).collect();
    let target_patches: Vec<serde_json::Value> = state
        .store
        .target_patches(id)
        .await?
        .into_iter()
        .map(|p| {
            let mut value = serde_json::to_value(&p).unwrap_or_default();
            value["name"] = serde_json::Value::String(names.get(&p.patch_index).cloned().unwrap_or_default());
            value
        })
        .collect();
    let transitions = state.store.transitions(id).await?;
    let events = state.store.agent_events_page(id, after, limit).await?;
    let next =
        (events.len() as u64 == limit).then(|| events.last().map(|e| EventCursor::after(e).to_string())).flatten();
    let heartbeats = state.store.heartbeats(id).await?;
    Ok(Json(serde_json::json!({
        "target": target,
        "patches": target_patches,
        "transitions": transitions,
        "events": events,
        "events_next_after": next,
        "heartbeats": heartbeats,
    }))
    .into_response())
}

#[derive(Deserialize, Default)]
struct PauseBody {
    #[serde(default)]
    reason: Option<String>,
}

async fn pause(State(state): State<ApiState>, Path(id): Path<String>, body: Bytes) -> Result<Response, Problem> {
    let id = parse_id(&id, "rollout")?;
    let body: PauseBody = if body.is_empty() {
        PauseBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "Malformed request", format!("body: {e}")))?
    };
    Ok(take_action(&state, id, RolloutAction::Pause, body.reason).await?.into_response())
}

async fn resume(State(state): State<ApiState>, Path(id): Path<String>) -> Result<Response, Problem> {
    let id = parse_id(&id, "rollout")?;
    Ok(take_action(&state, id, RolloutAction::Resume, None).await?.into_response())
}

async fn approve(State(state): State<ApiState>, Path(id): Path<String>) -> Result<Response, Problem> {
    let id = parse_id(&id, "rollout")?;
    Ok(take_action(&state, id, RolloutAction::Approve, None).await?.into_response())
}

async fn abort(State(state): State<ApiState>, Path(id): Path<String>) -> Result<Response, Problem> {
    let id = parse_id(&id, "rollout")?;
    Ok(take_action(&state, id, RolloutAction::Abort, None).await?.into_response())
}

async fn retry_failed(State(state): State<ApiState>, Path(id): Path<String>) -> Result<Response, Problem> {
    let id = parse_id(&id, "rollout")?;
    Ok(take_action(&state, id, RolloutAction::RetryFailed, None).await?.into_response())
}

fn content_too_large(limit: u64) -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "Content too large",
        format!(
            "an installer may hold at most {limit} bytes (scheduler.max_content_bytes); ask an administrator to \
             raise the limit"
        ),
    )
}

async fn upload_content(
    State(state): State<ApiState>,
    Path(sha256): Path<String>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    use futures_util::StreamExt;
    let limit = state.input.max_content_bytes;
    let announced =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|length| length > limit) {
        return Err(content_too_large(limit));
    }
    // A body without a length (chunked) is cut off at the limit.
    let exceeded = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = exceeded.clone();
    let mut received = 0u64;
    let stream = Box::pin(body.into_data_stream().map(move |chunk| {
        let chunk = chunk.map_err(|error| error.to_string())?;
        received += chunk.len() as u64;
        if received > limit {
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
            return Err(format!("more than {limit} bytes"));
        }
        Ok(chunk)
    }));
    match content::put(&state.content_dir, &sha256, stream).await {
        Ok(bytes) => {
            Ok((StatusCode::CREATED, Json(serde_json::json!({ "sha256": sha256, "bytes": bytes }))).into_response())
        }
        Err(_) if exceeded.load(std::sync::atomic::Ordering::Relaxed) => Err(content_too_large(limit)),
        Err(error @ (content::ContentError::BadHash(_) | content::ContentError::Mismatch { .. })) => {
            Err(Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "Content refused", error.to_string()))
        }
        Err(error) => {
            tracing::error!(error = %error, "content store write failed");
            Err(Problem::new(StatusCode::SERVICE_UNAVAILABLE, "Service unavailable", error.to_string()))
        }
    }
}

async fn has_content(State(state): State<ApiState>, Path(sha256): Path<String>) -> StatusCode {
    if content::is_sha256(&sha256) && content::path_of(&state.content_dir, &sha256).exists() {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    }
}

/// `GET /v1/content/{sha256}` (viewer): the installer, streamed from the
/// content store (never read whole into memory), with one
/// `Range: bytes=…` honoured so a relay or an agent can resume a download.
/// Counted in `fleetpatch_scheduler_content_requests_total{result}` and
/// `fleetpatch_scheduler_content_served_bytes_total`.
async fn download_content(
    State(state): State<ApiState>,
    Path(sha256): Path<String>,
    headers: axum::http::HeaderMap,
) -> Result<Response, Problem> {
    use futures_util::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let outcome =
        |result: &'static str| metrics::counter!("fleetpatch_scheduler_content_requests_total", "result" => result);
    if !content::is_sha256(&sha256) {
        outcome("bad_request").increment(1);
        let shown: String = sha256.chars().take(80).collect();
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "Bad request",
            format!("{shown:?} is not a sha256: content is named by 64 lower-case hex characters"),
        ));
    }
    let path = content::path_of(&state.content_dir, &sha256);
    let unavailable = |error: std::io::Error| {
        outcome("error").increment(1);
        tracing::error!(error = %error, path = %path.display(), "reading the content store failed");
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, "Service unavailable", "the content store cannot be read; retry")
    };
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            outcome("not_found").increment(1);
            return Err(Problem::new(
                StatusCode::NOT_FOUND,
                "Not found",
                format!("no installer with sha256 {sha256} in the content store; upload it first (PUT /v1/content/{sha256})"),
            ));
        }
        Err(error) => return Err(unavailable(error)),
    };
    let length = file.metadata().await.map_err(unavailable)?.len();
    let range =
        fleetpatch_runtime::http::parse_range(headers.get(header::RANGE).and_then(|value| value.to_str().ok()), length);
    let mut response = Response::builder().header(header::ACCEPT_RANGES, "bytes");
    if let Some(content_range) = range.content_range(length) {
        response = response.header(header::CONTENT_RANGE, content_range);
    }
    let Some((start, count)) = range.span(length) else {
        outcome("unsatisfiable").increment(1);
        return Ok(response
            .status(StatusCode::RANGE_NOT_SATISFIABLE)
            .header(header::CONTENT_LENGTH, 0)
            .body(Body::empty())
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()));
    };
    if start > 0 {
        file.seek(std::io::SeekFrom::Start(start)).await.map_err(unavailable)?;
    }
    let partial = matches!(range, fleetpatch_runtime::http::ByteRange::Partial { .. });
    outcome(if partial { "partial" } else { "ok" }).increment(1);
    let body = tokio_util::io::ReaderStream::with_capacity(file.take(count), 64 * 1024).map(|chunk| {
        if let Ok(chunk) = &chunk {
            metrics::counter!("fleetpatch_scheduler_content_served_bytes_total").increment(chunk.len() as u64);
        }
        chunk
    });
    Ok(response
        .status(if partial { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK })
        .header(header::CONTENT_TYPE, "application/octet-stream")
        // The stream's length is unknown to hyper, which then sends exactly
        // this many bytes (no chunked encoding).
        .header(header::CONTENT_LENGTH, count)
        .header(header::ETAG, format!("\"{sha256}\""))
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

#[derive(Deserialize)]
struct AuditParams {
    #[serde(default)]
    rollout: Option<String>,
    #[serde(default)]
    before: Option<i64>,
    #[serde(default)]
    limit: Option<u64>,
}

/// `GET /v1/audit` (admin): newest first, `before` pages, `rollout` filters.
async fn audit(State(state): State<ApiState>, Query(params): Query<AuditParams>) -> Result<Response, Problem> {
    let rollout_id = params.rollout.as_deref().filter(|r| !r.is_empty()).map(|r| parse_id(r, "rollout")).transpose()?;
    let limit = params.limit.unwrap_or(100).clamp(1, 1_000);
    let entries =
        state.store.audit_entries(fleetpatch_store::AuditQuery { rollout_id, before: params.before, limit }).await?;
    let next = (entries.len() as u64 == limit).then(|| entries.last().map(|e| e.id)).flatten();
    Ok(Json(serde_json::json!({ "entries": entries, "next_before": next })).into_response())
}
