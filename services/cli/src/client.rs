//! The HTTP client of the scheduler's REST API (`/v1`).
//!
//! It owns the translation of what went wrong into words a user can act on:
//! a connection error names the URL that could not be reached, a
//! problem+json refusal keeps every `errors[].field`. It never retries a
//! request that changes state (create, pause, abort, …): a user runs the
//! command again when the API was unreachable.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use fleetpatch_proto::state::{PatchState, RolloutState, TargetState};
use fleetpatch_scheduler::api::CreateRollout;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The API address when neither `--api`, `FLEETPATCH_API` nor the
/// configuration's `client.api_url` names one.
pub const DEFAULT_API_URL: &str = "http://127.0.0.1:8080";

/// One wrong field of a refused request (`errors[]` of a problem+json body).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// A problem+json body (RFC 9457) as the scheduler sends it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Problem {
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub detail: String,
    #[serde(default)]
    pub errors: Vec<FieldError>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No HTTP answer at all: refused, unresolvable, timed out.
    #[error("cannot reach the fleetpatch API at {url} ({reason}); is the scheduler running there? Point --api or FLEETPATCH_API at it")]
    Unreachable { url: String, reason: String },
    /// The API answered 401: no credential, or one it does not accept.
    #[error("the API at {url} refused the credential: {}; send an API key or OIDC token with --token, FLEETPATCH_TOKEN or client.token (a secret reference such as env:NAME or file:/path)", .problem.detail)]
    Unauthenticated { url: String, problem: Problem },
    /// The API answered 403: the credential is valid, its role is too low.
    #[error("the API refused the request: {}", .problem.detail)]
    Forbidden { problem: Problem },
    /// The API answered 4xx: the request (the user's input) is wrong.
    #[error("{}", refused_message(.status, .problem))]
    Refused { status: StatusCode, problem: Problem },
    /// The API answered 5xx: it is there, but cannot serve now.
    #[error("the fleetpatch API at {url} is unavailable ({status}): {detail}; retry later")]
    Unavailable { url: String, status: StatusCode, detail: String },
    /// An answer this client does not understand (another version of the API?).
    #[error("unexpected answer from {url}: {reason}")]
    Protocol { url: String, reason: String },
    #[error("invalid API URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    /// The token cannot travel in an HTTP header (never echoed: it is a secret).
    #[error("the API token contains characters an HTTP header cannot carry (a line break, a control character?); check --token, FLEETPATCH_TOKEN or client.token")]
    BadToken,
}

fn refused_message(status: &StatusCode, problem: &Problem) -> String {
    let mut message = if problem.detail.is_empty() {
        format!("the API refused the request ({status})")
    } else {
        problem.detail.clone()
    };
    if !problem.title.is_empty() && problem.errors.is_empty() {
        message = format!("{}: {message}", problem.title.to_lowercase());
    }
    message
}

/// A rollout as the API shows it (the fields this client uses).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RolloutView {
    pub id: Uuid,
    pub name: String,
    pub state: RolloutState,
    #[serde(default)]
    pub pause_reason: Option<String>,
    #[serde(default)]
    pub current_wave: u32,
    pub concurrency: u32,
    pub timeout_seconds: u32,
    #[serde(default)]
    pub waves: Vec<WaveView>,
    pub created_at: DateTime<Utc>,
    #[serde(default)]
    pub completed_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct WaveView {
    pub name: String,
    #[serde(default)]
    pub size: Option<u32>,
    pub max_failure_percent: f64,
    #[serde(default)]
    pub require_approval: bool,
    /// Automatic promotion's soak time, when the wave has one.
    #[serde(default)]
    pub promote_after_seconds: Option<u64>,
}

/// Counts of targets per state, for the rollout and per wave.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ProgressView {
    pub total: u64,
    #[serde(default)]
    pub by_state: BTreeMap<String, u64>,
    #[serde(default)]
    pub waves: Vec<WaveProgressView>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct WaveProgressView {
    pub index: u32,
    pub name: String,
    pub total: u64,
    #[serde(default)]
    pub by_state: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PatchView {
    pub index: u32,
    pub name: String,
    #[serde(default)]
    pub kb: Option<String>,
    pub file: String,
    pub sha256: String,
    pub installer: String,
}

/// `GET /v1/rollouts/{id}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RolloutDetail {
    pub rollout: RolloutView,
    pub progress: ProgressView,
    #[serde(default)]
    pub patches: Vec<PatchView>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TargetView {
    pub id: Uuid,
    pub rollout_id: Uuid,
    pub ordinal: u32,
    pub host: String,
    #[serde(default)]
    pub port: Option<u16>,
    pub transport: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub wave: u32,
    pub state: TargetState,
    pub attempt: u32,
    #[serde(default)]
    pub tries: u32,
    #[serde(default)]
    pub last_seen_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub os: Option<String>,
    #[serde(default)]
    pub arch: Option<String>,
    #[serde(default)]
    pub queued_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub running_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub verified_state: Option<String>,
    /// How its installers reached it (`push`, `relay http://…`, or a push after its relay did not answer).
    #[serde(default)]
    pub delivery: Option<String>,
}

/// `GET /v1/rollouts/{id}/targets`: one page.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TargetPage {
    pub targets: Vec<serde_json::Value>,
    #[serde(default)]
    pub next_after: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TargetPatchView {
    pub patch_index: u32,
    #[serde(default)]
    pub name: String,
    pub state: PatchState,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub outcome: Option<String>,
    #[serde(default)]
    pub reboot_required: bool,
    #[serde(default)]
    pub output_tail: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TransitionView {
    pub from: String,
    pub to: String,
    pub at: DateTime<Utc>,
    #[serde(default)]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AgentEventView {
    pub attempt: u32,
    /// The agent process that sent it (hex; "0000000000000000" for an agent
    /// older than the field).
    #[serde(default)]
    pub agent_instance: String,
    pub seq: u64,
    pub kind: String,
    #[serde(default)]
    pub patch_index: Option<u32>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub detail: Option<String>,
    pub received_at: DateTime<Utc>,
}

/// `GET /v1/targets/{id}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TargetDetail {
    pub target: TargetView,
    #[serde(default)]
    pub patches: Vec<TargetPatchView>,
    #[serde(default)]
    pub transitions: Vec<TransitionView>,
    #[serde(default)]
    pub events: Vec<AgentEventView>,
    /// One summary per agent run: heartbeats are counted, not kept as events.
    #[serde(default)]
    pub heartbeats: Vec<HeartbeatView>,
}

/// One agent run's heartbeats in `GET /v1/targets/{id}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct HeartbeatView {
    pub attempt: u32,
    pub agent_instance: String,
    pub count: u64,
    pub last_seq: u64,
    #[serde(default)]
    pub patch_index: Option<u32>,
    pub first_received_at: DateTime<Utc>,
    pub last_received_at: DateTime<Utc>,
}

/// The scheduler API at one base URL.
#[derive(Clone)]
pub struct ApiClient {
    base: String,
    http: reqwest::Client,
}

impl ApiClient {
    /// A client of the API at `base` that sends `token` (an API key or an
    /// OIDC token) as `Authorization: Bearer` on every request.
    pub fn new(base: &str, token: Option<&str>) -> Result<Self, ClientError> {
        let base = base.trim().trim_end_matches('/').to_owned();
        let bad = |reason: &str| ClientError::BadUrl { url: base.clone(), reason: reason.into() };
        let rest = base.strip_prefix("http://").ok_or_else(|| {
            if base.starts_with("https://") {
                bad("this build speaks plain http only; reach the API through http (e.g. a port-forward)")
            } else {
                bad("must start with http://, e.g. http://127.0.0.1:8080")
            }
        })?;
        if rest.is_empty() || rest.starts_with('/') {
            return Err(bad("names no host"));
        }
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = token {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                .map_err(|_| ClientError::BadToken)?;
            // Kept out of reqwest's Debug output.
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(300))
            .user_agent(concat!("fleetpatch-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| bad(&e.to_string()))?;
        Ok(Self { base, http })
    }

    #[cfg(test)]
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Sends one request and returns the JSON body of a 2xx answer.
    async fn request(&self, method: Method, path: &str, body: Option<&impl Serialize>) -> Result<String, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method.clone(), &url).header("accept", "application/json");
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|error| ClientError::Unreachable {
            url: self.base.clone(),
            reason: format!("{method} {path}: {}", root_cause(&error)),
        })?;
        let status = response.status();
        let text = response.text().await.map_err(|error| ClientError::Unreachable {
            url: self.base.clone(),
            reason: format!("{method} {path}: reading the answer: {}", root_cause(&error)),
        })?;
        if status.is_success() {
            return Ok(text);
        }
        let problem: Problem = serde_json::from_str(&text).unwrap_or_else(|_| Problem {
            title: status.canonical_reason().unwrap_or_default().to_owned(),
            detail: text.chars().take(300).collect::<String>().trim().to_owned(),
            errors: vec![],
        });
        if status == StatusCode::UNAUTHORIZED {
            Err(ClientError::Unauthenticated { url: self.base.clone(), problem })
        } else if status == StatusCode::FORBIDDEN {
            Err(ClientError::Forbidden { problem })
        } else if status.is_client_error() {
            Err(ClientError::Refused { status, problem })
        } else {
            Err(ClientError::Unavailable { url: self.base.clone(), status, detail: problem.detail })
        }
    }

    fn decode<T: DeserializeOwned>(&self, path: &str, text: &str) -> Result<T, ClientError> {
        let deserializer = &mut serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(deserializer).map_err(|error| ClientError::Protocol {
            url: format!("{}{path}", self.base),
            reason: format!("{}: {}", error.path(), error.inner()),
        })
    }

    async fn get_json(&self, path: &str) -> Result<serde_json::Value, ClientError> {
        let text = self.request(Method::GET, path, None::<&()>).await?;
        self.decode(path, &text)
    }

    async fn post_json(&self, path: &str, body: Option<&impl Serialize>) -> Result<serde_json::Value, ClientError> {
        let text = self.request(Method::POST, path, body).await?;
        self.decode(path, &text)
    }

    /// Turns a raw JSON answer into a typed view.
    pub fn view<T: DeserializeOwned>(&self, path: &str, value: &serde_json::Value) -> Result<T, ClientError> {
        self.decode(path, &value.to_string())
    }

    /// `POST /v1/rollouts`: the created rollout (raw JSON).
    pub async fn create_rollout(&self, request: &CreateRollout) -> Result<serde_json::Value, ClientError> {
        self.post_json("/v1/rollouts", Some(request)).await
    }

    /// `GET /v1/rollouts?limit=`: `{"rollouts": [...]}`.
    pub async fn list_rollouts(&self, limit: u64) -> Result<serde_json::Value, ClientError> {
        self.get_json(&format!("/v1/rollouts?limit={limit}")).await
    }

    /// `GET /v1/rollouts/{id}`: `{rollout, progress, patches}` (raw JSON).
    pub async fn rollout(&self, id: Uuid) -> Result<serde_json::Value, ClientError> {
        self.get_json(&format!("/v1/rollouts/{id}")).await
    }

    pub async fn rollout_detail(&self, id: Uuid) -> Result<(serde_json::Value, RolloutDetail), ClientError> {
        let raw = self.rollout(id).await?;
        let detail = self.view(&format!("/v1/rollouts/{id}"), &raw)?;
        Ok((raw, detail))
    }

    /// One page of `GET /v1/rollouts/{id}/targets`.
    pub async fn targets_page(
        &self,
        id: Uuid,
        state: Option<TargetState>,
        after: Option<u32>,
        limit: u64,
    ) -> Result<TargetPage, ClientError> {
        let mut path = format!("/v1/rollouts/{id}/targets?limit={limit}");
        if let Some(state) = state {
            path.push_str(&format!("&state={state}"));
        }
        if let Some(after) = after {
            path.push_str(&format!("&after={after}"));
        }
        let text = self.request(Method::GET, &path, None::<&()>).await?;
        self.decode(&path, &text)
    }

    /// `GET /v1/targets/{id}`: `{target, patches, transitions, events}` (raw
    /// JSON), with every page of its events (`events_next_after`) gathered.
    pub async fn target(&self, id: Uuid) -> Result<serde_json::Value, ClientError> {
        let mut detail = self.get_json(&format!("/v1/targets/{id}")).await?;
        let mut cursor = detail.get("events_next_after").and_then(|v| v.as_str()).map(str::to_owned);
        while let Some(after) = cursor.take() {
            let page = self.get_json(&format!("/v1/targets/{id}?events_limit=10000&events_after={after}")).await?;
            let events = page.get("events").and_then(|v| v.as_array()).cloned().unwrap_or_default();
            if let Some(all) = detail.get_mut("events").and_then(|v| v.as_array_mut()) {
                all.extend(events);
            }
            cursor = page.get("events_next_after").and_then(|v| v.as_str()).map(str::to_owned);
            // A server that repeats its cursor would loop forever.
            if cursor.as_deref() == Some(after.as_str()) {
                break;
            }
        }
        if let Some(next) = detail.get_mut("events_next_after") {
            *next = serde_json::Value::Null;
        }
        Ok(detail)
    }

    /// One page of `GET /v1/audit` (newest first): `{entries, next_before}`.
    pub async fn audit_page(
        &self,
        rollout: Option<Uuid>,
        before: Option<i64>,
        limit: u64,
    ) -> Result<serde_json::Value, ClientError> {
        let mut path = format!("/v1/audit?limit={limit}");
        if let Some(rollout) = rollout {
            path.push_str(&format!("&rollout={rollout}"));
        }
        if let Some(before) = before {
            path.push_str(&format!("&before={before}"));
        }
        self.get_json(&path).await
    }

    /// `GET /v1/dead-letters?limit=N`: `{total, dead_letters}`.
    pub async fn dead_letters(&self, limit: u64) -> Result<serde_json::Value, ClientError> {
        self.get_json(&format!("/v1/dead-letters?limit={limit}")).await
    }

    /// `POST /v1/dead-letters/replay[?limit=N]`: `{replayed, left}`.
    pub async fn replay_dead_letters(&self, limit: Option<u64>) -> Result<serde_json::Value, ClientError> {
        let path = match limit {
            Some(limit) => format!("/v1/dead-letters/replay?limit={limit}"),
            None => "/v1/dead-letters/replay".to_owned(),
        };
        self.post_json(&path, None::<&()>).await
    }

    /// `GET /v1/rollouts/{id}/report?format=F`: the evidence report's text.
    pub async fn report(&self, id: Uuid, format: &str) -> Result<String, ClientError> {
        self.request(Method::GET, &format!("/v1/rollouts/{id}/report?format={format}"), None::<&()>).await
    }

    /// `GET /v1/reports/{sha256}`: the record of an issued report.
    pub async fn issued_report(&self, sha256: &str) -> Result<serde_json::Value, ClientError> {
        self.get_json(&format!("/v1/reports/{sha256}")).await
    }

    /// `POST /v1/rollouts/{id}/{action}` for pause, resume, approve, abort, retry-failed.
    pub async fn rollout_action(
        &self,
        id: Uuid,
        action: RolloutAction,
        reason: Option<&str>,
    ) -> Result<serde_json::Value, ClientError> {
        let path = format!("/v1/rollouts/{id}/{}", action.slug());
        match reason {
            Some(reason) => self.post_json(&path, Some(&serde_json::json!({ "reason": reason }))).await,
            None => self.post_json(&path, None::<&()>).await,
        }
    }
}

/// The state-changing actions on a rollout: the scheduler's own list, so
/// the CLI, the console and the API name the same routes.
pub use fleetpatch_scheduler::api::RolloutAction;

/// The innermost cause of a reqwest error ("Connection refused (os error
/// 111)"), which says more than reqwest's "error sending request".
fn root_cause(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        return "no answer within the timeout".into();
    }
    let mut cause: &dyn std::error::Error = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_urls_are_accepted() {
        assert!(ApiClient::new("http://127.0.0.1:8080/", None).is_ok());
        assert_eq!(ApiClient::new("http://api:8080/", None).unwrap().base_url(), "http://api:8080");
        let error = ApiClient::new("127.0.0.1:8080", None).err().unwrap().to_string();
        assert!(error.contains("must start with http://"), "{error}");
        let error = ApiClient::new("https://api", None).err().unwrap().to_string();
        assert!(error.contains("plain http"), "{error}");
        let error = ApiClient::new("http://api", Some("fpk_x\nInjected: 1")).err().unwrap().to_string();
        assert!(error.contains("token") && !error.contains("fpk_x"), "{error}");
    }

    #[tokio::test]
    async fn a_connection_error_names_the_url() {
        // A port that was just free: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let client = ApiClient::new(&format!("http://127.0.0.1:{port}"), None).unwrap();
        let error = client.list_rollouts(10).await.unwrap_err();
        assert!(matches!(error, ClientError::Unreachable { .. }), "{error:?}");
        let message = error.to_string();
        assert!(message.contains(&format!("cannot reach the fleetpatch API at http://127.0.0.1:{port}")), "{message}");
        assert!(message.contains("GET /v1/rollouts"), "{message}");
    }
}
