//! The REST API (`/v1`), its request validation, and problem+json errors.
//!
//! Every refusal names what is wrong and where: `targets[3].host must not be
//! empty`. The OpenAPI document is served at `/openapi.json`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use fleetpatch_proto::plan::{Detection, InstallerKind, RebootPolicy};
use fleetpatch_proto::state::TargetState;
use fleetpatch_store::{content, NewPatch, NewRollout, NewTarget, RolloutSettings, Store, WaveSpec};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use uuid::Uuid;

/// The transports a rollout may name.
pub const TRANSPORTS: [&str; 3] = ["sim", "ssh", "smb"];
/// Largest `POST /v1/rollouts` body: room for the largest rollout
/// `scheduler.max_targets_per_rollout` may allow (1,000,000 short targets).
pub const MAX_ROLLOUT_BODY_BYTES: usize = 256 * 1024 * 1024;
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
    fn check_credential(&self, name: &str) -> Result<(), String> {
        if self.credential_names.contains(name) {
            return Ok(());
        }
        let defined = if self.credential_names.is_empty() {
            "none".to_owned()
        } else {
            self.credential_names.iter().map(String::as_str).collect::<Vec<_>>().join(", ")
        };
        Err(if fleetpatch_runtime::credentials::is_valid_name(name) {
            format!(
                "no credential is named {name:?} (defined: {defined}); ask an administrator to define it under \
                 [credentials.{name}] where the workers run"
            )
        } else {
            // Not a name at all (perhaps a pasted secret): not repeated.
            format!(
                "must name a credential an administrator defined (defined: {defined}), never a secret or its \
                 location"
            )
        })
    }
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
    fn invalid(errors: Vec<FieldError>) -> Self {
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

// ------------------------------------------------------------------ request schema

fn default_concurrency() -> u32 {
    10
}
fn default_timeout() -> u32 {
    600
}
fn default_heartbeat() -> u32 {
    30
}
fn default_max_tries() -> u32 {
    3
}
fn default_success_codes() -> Vec<i32> {
    vec![0, 3010]
}
fn default_reboot_codes() -> Vec<i32> {
    vec![3010]
}
fn default_patch_timeout() -> u32 {
    3600
}
fn default_transport() -> String {
    "sim".into()
}
fn default_max_failure() -> f64 {
    100.0
}

/// `POST /v1/rollouts`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRollout {
    pub name: String,
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// Seconds without a report before a target is timed out.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u32,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_seconds: u32,
    #[serde(default = "default_max_tries")]
    pub max_tries: u32,
    #[serde(default)]
    pub reboot: RebootPolicy,
    #[serde(default)]
    pub keep_files: bool,
    /// The credential of every target that names none (a name defined in
    /// `[credentials]` where the workers run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    #[serde(default)]
    pub waves: Vec<WaveRequest>,
    pub patches: Vec<PatchRequest>,
    pub targets: Vec<TargetRequest>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaveRequest {
    pub name: String,
    #[serde(default)]
    pub size: Option<u32>,
    #[serde(default = "default_max_failure")]
    pub max_failure_percent: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchRequest {
    pub name: String,
    #[serde(default)]
    pub kb: Option<String>,
    pub file: String,
    pub sha256: String,
    #[serde(default)]
    pub size: u64,
    pub installer: InstallerKind,
    #[serde(default)]
    pub arguments: String,
    #[serde(default = "default_success_codes")]
    pub success_codes: Vec<i32>,
    #[serde(default = "default_reboot_codes")]
    pub reboot_codes: Vec<i32>,
    #[serde(default = "default_patch_timeout")]
    pub timeout_seconds: u32,
    #[serde(default)]
    pub detection: Option<Detection>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetRequest {
    pub host: String,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default = "default_transport")]
    pub transport: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Name of a credential an administrator defined where the workers run
    /// (`[credentials.<name>]`); the worker checks its scope against this
    /// target before it reads the secret.
    #[serde(default)]
    pub credential: Option<String>,
    /// Refused: callers name credentials, they never point at secrets. Kept
    /// in the schema only to answer with what to do instead.
    #[serde(default, skip_serializing)]
    pub credential_ref: Option<serde_json::Value>,
    /// Name of the wave; targets without one fill the waves in order.
    #[serde(default)]
    pub wave: Option<String>,
}

fn push(errors: &mut Vec<FieldError>, field: impl Into<String>, message: impl Into<String>) {
    errors.push(FieldError { field: field.into(), message: message.into() });
}

/// Checks a request and turns it into the store's rollout. Every error
/// names its field.
pub fn validate(
    request: CreateRollout,
    content_dir: &std::path::Path,
    policy: &InputPolicy,
) -> Result<NewRollout, Problem> {
    let mut errors = Vec::new();
    if request.name.trim().is_empty() {
        push(&mut errors, "name", "must not be empty");
    }
    if request.concurrency == 0 || request.concurrency > 100_000 {
        push(&mut errors, "concurrency", format!("must be between 1 and 100000, got {}", request.concurrency));
    }
    if request.timeout_seconds == 0 {
        push(&mut errors, "timeout_seconds", "must be at least 1");
    }
    if request.heartbeat_seconds == 0 || request.heartbeat_seconds >= request.timeout_seconds.max(1) {
        push(
            &mut errors,
            "heartbeat_seconds",
            format!("must be at least 1 and below timeout_seconds ({})", request.timeout_seconds),
        );
    }
    if request.max_tries == 0 {
        push(&mut errors, "max_tries", "must be at least 1");
    }
    if request.patches.is_empty() {
        push(&mut errors, "patches", "must name at least one patch");
    }
    if request.targets.is_empty() {
        push(&mut errors, "targets", "must name at least one target");
    }
    if request.targets.len() > policy.max_targets_per_rollout {
        push(
            &mut errors,
            "targets",
            format!(
                "{} targets; at most {} per rollout (scheduler.max_targets_per_rollout): split the rollout, or ask \
                 an administrator to raise the limit",
                request.targets.len(),
                policy.max_targets_per_rollout
            ),
        );
        return Err(Problem::invalid(errors));
    }
    if let Some(name) = &request.credential {
        if let Err(message) = policy.check_credential(name) {
            push(&mut errors, "credential", message);
        }
    }
    let mut wave_names = HashSet::new();
    for (i, wave) in request.waves.iter().enumerate() {
        if wave.name.trim().is_empty() {
            push(&mut errors, format!("waves[{i}].name"), "must not be empty");
        } else if !wave_names.insert(wave.name.as_str()) {
            push(&mut errors, format!("waves[{i}].name"), format!("{:?} is used by another wave", wave.name));
        }
        if !(0.0..=100.0).contains(&wave.max_failure_percent) {
            push(&mut errors, format!("waves[{i}].max_failure_percent"), "must be between 0 and 100");
        }
        if wave.size == Some(0) {
            push(&mut errors, format!("waves[{i}].size"), "must be at least 1 (or left out for \"the rest\")");
        }
    }
    let mut patch_names = HashSet::new();
    let mut needs_content = false;
    for (i, patch) in request.patches.iter().enumerate() {
        if patch.name.trim().is_empty() {
            push(&mut errors, format!("patches[{i}].name"), "must not be empty");
        } else if !patch_names.insert(patch.name.as_str()) {
            push(&mut errors, format!("patches[{i}].name"), format!("{:?} is used by another patch", patch.name));
        }
        if patch.file.is_empty() || patch.file.contains(['/', '\\']) || patch.file == ".." || patch.file == "." {
            push(&mut errors, format!("patches[{i}].file"), "must be a plain file name (no directories)");
        }
        if !content::is_sha256(&patch.sha256) {
            push(&mut errors, format!("patches[{i}].sha256"), "must be 64 lower-case hex characters");
        }
        if patch.success_codes.is_empty() {
            push(&mut errors, format!("patches[{i}].success_codes"), "must hold at least one exit code (usually 0)");
        }
        if patch.timeout_seconds == 0 {
            push(&mut errors, format!("patches[{i}].timeout_seconds"), "must be at least 1");
        }
    }
    for (i, target) in request.targets.iter().enumerate() {
        if target.host.trim().is_empty() {
            push(&mut errors, format!("targets[{i}].host"), "must not be empty");
        }
        if !TRANSPORTS.contains(&target.transport.as_str()) {
            push(
                &mut errors,
                format!("targets[{i}].transport"),
                format!("{:?} is not a transport; use one of {}", target.transport, TRANSPORTS.join(", ")),
            );
        }
        needs_content |= target.transport != "sim";
        if target.credential_ref.is_some() {
            push(
                &mut errors,
                format!("targets[{i}].credential_ref"),
                "secret references are no longer accepted from callers: ask an administrator to define a named \
                 credential ([credentials.<name>] where the workers run, with the hosts it may be used for) and \
                 name it with `credential: <name>`",
            );
        }
        if let Some(name) = &target.credential {
            if let Err(message) = policy.check_credential(name) {
                push(&mut errors, format!("targets[{i}].credential"), message);
            }
        }
        if let Some(wave) = &target.wave {
            if !wave_names.contains(wave.as_str()) {
                push(&mut errors, format!("targets[{i}].wave"), format!("no wave is named {wave:?}"));
            }
        }
        if errors.len() > 50 {
            break;
        }
    }
    if needs_content {
        for (i, patch) in request.patches.iter().enumerate() {
            if content::is_sha256(&patch.sha256) && !content::path_of(content_dir, &patch.sha256).exists() {
                push(
                    &mut errors,
                    format!("patches[{i}].sha256"),
                    format!(
                        "no installer with this sha256 in the content store; upload it first (PUT /v1/content/{})",
                        patch.sha256
                    ),
                );
            }
        }
    }
    if !errors.is_empty() {
        return Err(Problem::invalid(errors));
    }
    let waves: Vec<WaveSpec> = if request.waves.is_empty() {
        vec![WaveSpec { name: "all".into(), size: None, max_failure_percent: 100.0 }]
    } else {
        request
            .waves
            .iter()
            .map(|w| WaveSpec { name: w.name.clone(), size: w.size, max_failure_percent: w.max_failure_percent })
            .collect()
    };
    let index_of: BTreeMap<&str, u32> = waves.iter().enumerate().map(|(i, w)| (w.name.as_str(), i as u32)).collect();
    // Explicitly placed targets count against their wave's size first.
    let mut filled = vec![0u32; waves.len()];
    for target in &request.targets {
        if let Some(wave) = target.wave.as_deref().and_then(|w| index_of.get(w)) {
            filled[*wave as usize] += 1;
        }
    }
    let mut cursor = 0usize;
    let default_credential = request.credential;
    let targets = request
        .targets
        .into_iter()
        .map(|t| {
            let wave = match t.wave.as_deref().and_then(|w| index_of.get(w)) {
                Some(wave) => *wave,
                None => {
                    while cursor + 1 < waves.len() && waves[cursor].size.is_some_and(|size| filled[cursor] >= size) {
                        cursor += 1;
                    }
                    filled[cursor] += 1;
                    cursor as u32
                }
            };
            NewTarget {
                host: t.host,
                port: t.port,
                transport: t.transport,
                labels: t.labels,
                credential: t.credential.or_else(|| default_credential.clone()),
                wave,
            }
        })
        .collect();
    Ok(NewRollout {
        name: request.name,
        concurrency: request.concurrency,
        timeout_seconds: request.timeout_seconds,
        waves,
        settings: RolloutSettings {
            heartbeat_seconds: request.heartbeat_seconds,
            reboot: request.reboot,
            max_tries: request.max_tries,
            keep_files: request.keep_files,
        },
        patches: request
            .patches
            .into_iter()
            .map(|p| NewPatch {
                name: p.name,
                kb: p.kb,
                file: p.file,
                sha256: p.sha256,
                size: p.size,
                installer: p.installer,
                arguments: p.arguments,
                success_codes: p.success_codes,
                reboot_codes: p.reboot_codes,
                timeout_seconds: p.timeout_seconds,
                detection: p.detection,
            })
            .collect(),
        targets,
    })
}

// ------------------------------------------------------------------ handlers

/// The API: `/openapi.json` open, every `/v1` route behind
/// [`crate::auth::authenticate`] (a credential, a role, the audit log).
pub fn router(state: ApiState) -> Router {
    let v1 = Router::new()
        .route(
            "/v1/rollouts",
            post(create_rollout).layer(DefaultBodyLimit::max(MAX_ROLLOUT_BODY_BYTES)).get(list_rollouts),
        )
        .route("/v1/rollouts/{id}", get(show_rollout))
        .route("/v1/rollouts/{id}/targets", get(list_targets))
        .route("/v1/rollouts/{id}/pause", post(pause))
        .route("/v1/rollouts/{id}/resume", post(resume))
        .route("/v1/rollouts/{id}/abort", post(abort))
        .route("/v1/rollouts/{id}/retry-failed", post(retry_failed))
        .route("/v1/targets/{id}", get(show_target))
        .route("/v1/content/{sha256}", put(upload_content).head(has_content))
        .route("/v1/audit", get(audit))
        .route("/v1/dead-letters", get(crate::dead_letters::list))
        .route("/v1/dead-letters/replay", post(crate::dead_letters::replay))
        .route_layer(axum::middleware::from_fn_with_state(state.auth.clone(), crate::auth::authenticate))
        .with_state(state);
    Router::new().route("/openapi.json", get(openapi)).merge(v1)
}

/// The OpenAPI document.
pub const OPENAPI: &str = include_str!("../openapi.json");

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

fn parse_id(raw: &str, what: &str) -> Result<Uuid, Problem> {
    Uuid::parse_str(raw)
        .map_err(|_| Problem::new(StatusCode::BAD_REQUEST, "Bad request", format!("{what} id {raw:?} is not a UUID")))
}

/// Fields of a JSON body whose strings (or keys) hold NUL, which
/// PostgreSQL cannot store; `None` when there is none. JSON can only carry
/// NUL escaped, so a body without `\u0000` is not parsed twice.
fn nul_fields(body: &[u8]) -> Option<Vec<FieldError>> {
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

async fn create_rollout(State(state): State<ApiState>, body: Bytes) -> Result<Response, Problem> {
    if let Some(errors) = nul_fields(&body) {
        return Err(Problem::invalid(errors));
    }
    let deserializer = &mut serde_json::Deserializer::from_slice(&body);
    let request: CreateRollout = serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let field = error.path().to_string();
        let mut problem =
            Problem::new(StatusCode::BAD_REQUEST, "Malformed request", format!("{field}: {}", error.inner()));
        problem.errors.push(FieldError { field, message: error.inner().to_string() });
        problem
    })?;
    let new = validate(request, &state.content_dir, &state.input)?;
    let targets = new.targets.len();
    let id = state.store.create_rollout(new).await?;
    state.nudge.notify_one();
    tracing::info!(rollout_id = %id, targets, "rollout created");
    let rollout = state.store.rollout(id).await?;
    Ok((StatusCode::CREATED, [(header::LOCATION, format!("/v1/rollouts/{id}"))], Json(rollout)).into_response())
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

fn parse_events_cursor(raw: &str) -> Result<(u32, u64), Problem> {
    raw.split_once('.').and_then(|(attempt, seq)| Some((attempt.parse().ok()?, seq.parse().ok()?))).ok_or_else(|| {
        let message = format!("{raw:?} is not an events cursor; pass the events_next_after of the previous page");
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
        (events.len() as u64 == limit).then(|| events.last().map(|e| format!("{}.{}", e.attempt, e.seq))).flatten();
    Ok(Json(serde_json::json!({
        "target": target,
        "patches": target_patches,
        "transitions": transitions,
        "events": events,
        "events_next_after": next,
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
    let reason = body.reason.unwrap_or_else(|| "paused by an operator".into());
    if reason.contains('\0') {
        return Err(Problem::invalid(vec![FieldError {
            field: "reason".into(),
            message: "contains a NUL character (\\u0000), which cannot be stored; remove it".into(),
        }]));
    }
    Ok(Json(state.store.pause_rollout(id, &reason).await?).into_response())
}

async fn resume(State(state): State<ApiState>, Path(id): Path<String>) -> Result<Response, Problem> {
    let id = parse_id(&id, "rollout")?;
    let rollout = state.store.resume_rollout(id).await?;
    state.nudge.notify_one();
    Ok(Json(rollout).into_response())
}

async fn abort(State(state): State<ApiState>, Path(id): Path<String>) -> Result<Response, Problem> {
    let id = parse_id(&id, "rollout")?;
    Ok(Json(state.store.abort_rollout(id).await?).into_response())
}

async fn retry_failed(State(state): State<ApiState>, Path(id): Path<String>) -> Result<Response, Problem> {
    let id = parse_id(&id, "rollout")?;
    let retried = state.store.retry_failed(id).await?;
    state.nudge.notify_one();
    Ok(Json(serde_json::json!({ "retried": retried })).into_response())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: serde_json::Value) -> CreateRollout {
        serde_json::from_value(json).unwrap()
    }

    fn policy() -> InputPolicy {
        InputPolicy {
            max_targets_per_rollout: 5,
            credential_names: BTreeSet::from(["linux".to_owned(), "windows-admin".to_owned()]),
            ..InputPolicy::default()
        }
    }

    fn check(json: serde_json::Value) -> Result<NewRollout, Problem> {
        validate(request(json), std::path::Path::new("/nonexistent"), &policy())
    }

    fn minimal() -> serde_json::Value {
        serde_json::json!({
            "name": "r",
            "patches": [{"name": "KB1", "file": "kb1.msu", "sha256": "a".repeat(64), "installer": "msu"}],
            "targets": [{"host": "h1"}, {"host": "h2"}, {"host": "h3"}],
        })
    }

    #[test]
    fn targets_fill_waves_in_order_and_by_name() {
        let mut json = minimal();
        json["waves"] = serde_json::json!([{"name": "canary", "size": 1}, {"name": "rest"}]);
        json["targets"][2]["wave"] = serde_json::json!("canary");
        let rollout = check(json).unwrap();
        let waves: Vec<u32> = rollout.targets.iter().map(|t| t.wave).collect();
        assert_eq!(waves, vec![1, 1, 0], "h3 fills the canary, the others go to the rest");
    }

    #[test]
    fn every_wrong_field_is_named() {
        let mut json = minimal();
        json["targets"][1]["host"] = serde_json::json!("");
        json["targets"][2]["transport"] = serde_json::json!("telnet");
        json["targets"][0]["credential_ref"] = serde_json::json!("hunter2");
        json["targets"][1]["credential"] = serde_json::json!("nobody");
        json["patches"][0]["sha256"] = serde_json::json!("xyz");
        let problem = check(json).unwrap_err();
        let fields: Vec<&str> = problem.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "patches[0].sha256",
                "targets[0].credential_ref",
                "targets[1].host",
                "targets[1].credential",
                "targets[2].transport"
            ]
        );
        assert_eq!(problem.status, StatusCode::UNPROCESSABLE_ENTITY);
    }

    #[test]
    fn targets_name_defined_credentials_and_never_references() {
        let mut json = minimal();
        json["targets"][0]["credential"] = serde_json::json!("linux");
        let rollout = check(json).unwrap();
        assert_eq!(rollout.targets[0].credential.as_deref(), Some("linux"));
        for reference in ["file:/etc/shadow", "env:FLEETPATCH__DATABASE__URL"] {
            let mut json = minimal();
            json["targets"][1]["credential_ref"] = serde_json::json!(reference);
            let problem = check(json).unwrap_err();
            assert_eq!(problem.errors[0].field, "targets[1].credential_ref");
            assert!(problem.errors[0].message.contains("ask an administrator to define a named credential"));
        }
        let mut json = minimal();
        json["credential"] = serde_json::json!("windows-admin");
        json["targets"][0]["credential"] = serde_json::json!("linux");
        let rollout = check(json).unwrap();
        let names: Vec<Option<&str>> = rollout.targets.iter().map(|t| t.credential.as_deref()).collect();
        assert_eq!(names, vec![Some("linux"), Some("windows-admin"), Some("windows-admin")], "the default fills in");
        let mut json = minimal();
        json["credential"] = serde_json::json!("hunter2:pa55");
        let problem = check(json).unwrap_err();
        assert_eq!(problem.errors[0].field, "credential");
        assert!(!problem.detail.contains("pa55"), "a non-name is not repeated: {}", problem.detail);
        let mut json = minimal();
        json["targets"][2]["credential"] = serde_json::json!("windows");
        let problem = check(json).unwrap_err();
        assert_eq!(problem.errors[0].field, "targets[2].credential");
        assert!(problem.errors[0].message.contains("defined: linux, windows-admin"), "{}", problem.detail);
    }

    #[test]
    fn the_rollout_size_limit_names_its_key() {
        let mut json = minimal();
        json["targets"] =
            serde_json::json!((0..6).map(|i| serde_json::json!({"host": format!("h{i}")})).collect::<Vec<_>>());
        let problem = check(json).unwrap_err();
        assert_eq!(problem.errors[0].field, "targets");
        assert!(problem.detail.contains("scheduler.max_targets_per_rollout"), "{}", problem.detail);
        let mut json = minimal();
        json["targets"] =
            serde_json::json!((0..5).map(|i| serde_json::json!({"host": format!("h{i}")})).collect::<Vec<_>>());
        assert!(check(json).is_ok());
    }

    #[test]
    fn nul_characters_are_refused_with_their_field() {
        let body = br#"{"name":"r","targets":[{"host":"h\u0000x","labels":{"a\u0000":"b"}}]}"#;
        let errors = nul_fields(body).expect("NUL found");
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, vec!["targets[0].host", "targets[0].labels.a\0"]);
        assert!(nul_fields(br#"{"name":"r\\u0000"}"#).is_none(), "an escaped backslash is no NUL");
        assert!(nul_fields(br#"{"name":"plain"}"#).is_none());
    }

    #[test]
    fn real_transports_need_their_installers_uploaded() {
        let mut json = minimal();
        json["targets"][0]["transport"] = serde_json::json!("ssh");
        let problem = check(json).unwrap_err();
        assert!(problem.detail.contains("PUT /v1/content/"), "{}", problem.detail);
    }

    #[test]
    fn the_openapi_document_lists_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for path in [
            "/v1/rollouts",
            "/v1/rollouts/{id}",
            "/v1/rollouts/{id}/targets",
            "/v1/rollouts/{id}/pause",
            "/v1/rollouts/{id}/resume",
            "/v1/rollouts/{id}/abort",
            "/v1/rollouts/{id}/retry-failed",
            "/v1/targets/{id}",
            "/v1/content/{sha256}",
            "/v1/audit",
            "/v1/dead-letters",
            "/v1/dead-letters/replay",
        ] {
            assert!(paths.contains_key(path), "openapi.json misses {path}");
        }
    }
}
