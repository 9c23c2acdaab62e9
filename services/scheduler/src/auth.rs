//! Who is calling the API, what they may do, and the audit of what they did.
//!
//! Every `/v1` route sits behind [`authenticate`]: it reads
//! `Authorization: Bearer <credential>`, where the credential is either a
//! fleetpatch API key (`fpk_…`, checked against the store's hash) or an
//! OIDC token (a JWT whose signature is checked against the configured
//! JWKS, with its issuer, audience and expiry). The identity it finds
//! ([`Identity`]: name or subject, kind, role) goes into the request's
//! extensions for the handlers.
//!
//! * no, malformed, unknown, expired or revoked credential → 401 with
//!   `WWW-Authenticate: Bearer`, counted in
//!   `fleetpatch_api_auth_failures_total{reason}` and never stored, so
//!   anonymous traffic cannot fill the audit log;
//! * a valid identity whose role is too low ([`required_role`]) → 403,
//!   audited;
//! * every mutating call (POST, PUT, PATCH, DELETE) that passes is audited
//!   with its result: who, kind, role, method and route template, rollout,
//!   source address, when, status.
//!
//! A malformed bearer value is refused by its shape, before any database
//! work. `/openapi.json`, `/livez`, `/readyz` and `/metrics` are outside
//! this layer: the first describes the API and holds no data.
//!
//! **Architecture invariant**: nobody acts without an identity, and no
//! mutating call by an identity escapes the audit log.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use fleetpatch_runtime::{ConfigError, Shutdown};
use fleetpatch_store::auth::MalformedKey;
use fleetpatch_store::{ActorKind, KeyCheck, NewAuditEntry, ParsedApiKey, Role, Store};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;
use uuid::Uuid;

use crate::api::Problem;

// ------------------------------------------------------------------ options

/// `[scheduler.auth]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthOptions {
    /// OIDC/JWT bearer tokens, for shops with single sign-on. API keys
    /// work whether or not this is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oidc: Option<OidcOptions>,
}

/// `[scheduler.auth.oidc]`: which tokens are accepted and how their role is read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcOptions {
    /// The `iss` every token must carry (the IdP's issuer URL).
    pub issuer: String,
    /// The `aud` every token must carry (this API's client id at the IdP).
    pub audience: String,
    /// The IdP's signing keys as a JWKS file (re-read every `refresh_seconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
    /// The IdP's JWKS URL (`…/protocol/openid-connect/certs`, `…/.well-known/jwks.json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// The claim that holds the caller's roles or groups: a string or an
    /// array of strings; a dotted path reaches into objects (`realm_access.roles`).
    #[serde(default = "default_role_claim")]
    pub role_claim: String,
    /// Which claim values grant which role; the highest granted role wins.
    #[serde(default)]
    pub roles: RoleValues,
    /// Seconds between two loads of the JWKS (a token with an unknown `kid`
    /// also triggers one, at most every 10 s).
    #[serde(default = "default_refresh_seconds")]
    pub refresh_seconds: u64,
    /// Clock skew allowed on `exp` and `nbf` (seconds).
    #[serde(default = "default_leeway_seconds")]
    pub leeway_seconds: u64,
}

fn default_role_claim() -> String {
    "roles".into()
}
fn default_refresh_seconds() -> u64 {
    300
}
fn default_leeway_seconds() -> u64 {
    30
}

/// Claim values per role (`[scheduler.auth.oidc.roles]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoleValues {
    pub viewer: Vec<String>,
    pub operator: Vec<String>,
    pub admin: Vec<String>,
}

impl Default for RoleValues {
    fn default() -> Self {
        Self {
            viewer: vec!["fleetpatch-viewer".into()],
            operator: vec!["fleetpatch-operator".into()],
            admin: vec!["fleetpatch-admin".into()],
        }
    }
}

/// The longest JWKS document read (an IdP's has a handful of keys).
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// An unknown `kid` reloads the JWKS at most this often.
const MIN_RELOAD_GAP: Duration = Duration::from_secs(10);
/// Signature algorithms accepted: asymmetric only (an HMAC "key" in a
/// public JWKS would let anyone sign).
const ALGORITHMS: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

impl OidcOptions {
    /// Checks the options; the message names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        const KEY: &str = "scheduler.auth.oidc";
        let key = |name: &str| format!("{KEY}.{name}");
        if self.issuer.trim().is_empty() {
            return Err(ConfigError::invalid(key("issuer"), "must name the IdP's issuer (the `iss` of its tokens)"));
        }
        if self.audience.trim().is_empty() {
            return Err(ConfigError::invalid(
                key("audience"),
                "must name this API's audience (the `aud` of its tokens)",
            ));
        }
        match (&self.jwks_file, &self.jwks_url) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    format!("{KEY}.jwks_file and {KEY}.jwks_url"),
                    "are both set: set only one of them",
                ))
            }
            (None, None) => {
                return Err(ConfigError::invalid(
                    format!("{KEY}.jwks_file or {KEY}.jwks_url"),
                    "must say where the IdP's keys are",
                ))
            }
            (None, Some(url)) if !(url.starts_with("https://") || url.starts_with("http://")) => {
                return Err(ConfigError::invalid(
                    key("jwks_url"),
                    format!("{url:?} must be an http:// or https:// URL"),
                ))
            }
            _ => {}
        }
        if self.role_claim.trim().is_empty() {
            return Err(ConfigError::invalid(
                key("role_claim"),
                "must name the claim that holds roles or groups (e.g. roles)",
            ));
        }
        if self.roles.viewer.is_empty() && self.roles.operator.is_empty() && self.roles.admin.is_empty() {
            return Err(ConfigError::invalid(
                key("roles"),
                "must map at least one claim value to viewer, operator or admin",
            ));
        }
        if self.refresh_seconds < 10 {
            return Err(ConfigError::too_small(key("refresh_seconds"), 10));
        }
        if self.leeway_seconds > 300 {
            return Err(ConfigError::too_large(key("leeway_seconds"), 300));
        }
        Ok(())
    }
}

impl AuthOptions {
    pub fn validate(&self) -> Result<(), ConfigError> {
        match &self.oidc {
            Some(oidc) => oidc.validate(),
            None => Ok(()),
        }
    }
}

// ------------------------------------------------------------------ identity and roles

/// The caller, as the handlers see it (a request extension).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The API key's name, or the token's `sub`.
    pub subject: String,
    pub kind: ActorKind,
    pub role: Role,
}

/// The role a route needs: the audit log needs admin, reading needs
/// viewer, anything else (create, pause, resume, abort, retry, upload) operator.
pub fn required_role(method: &Method, route: &str) -> Role {
    if route == "/v1/audit" || route.starts_with("/v1/audit/") {
        return Role::Admin;
    }
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        Role::Viewer
    } else {
        Role::Operator
    }
}

fn is_mutating(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH | Method::DELETE)
}

/// The highest role the claim at `path` grants, if any.
pub fn role_from_claims(claims: &serde_json::Value, path: &str, values: &RoleValues) -> Option<Role> {
    let mut claim = claims;
    for part in path.split('.') {
        claim = claim.get(part)?;
    }
    let granted: Vec<&str> = match claim {
        serde_json::Value::String(one) => vec![one.as_str()],
        serde_json::Value::Array(many) => many.iter().filter_map(|v| v.as_str()).collect(),
        _ => return None,
    };
    granted
        .into_iter()
        .filter_map(|value| {
            let value = value.to_owned();
            if values.admin.contains(&value) {
                Some(Role::Admin)
            } else if values.operator.contains(&value) {
                Some(Role::Operator)
            } else if values.viewer.contains(&value) {
                Some(Role::Viewer)
            } else {
                None
            }
        })
        .max()
}

// ------------------------------------------------------------------ refusals

/// Why a request got no identity (401).
#[derive(Debug, Clone, PartialEq)]
pub enum Unauthenticated {
    Missing,
    NotBearer,
    MalformedKey(MalformedKey),
    Malformed,
    UnknownKey,
    ExpiredKey { name: String },
    RevokedKey { name: String },
    OidcDisabled,
    InvalidToken { reason: &'static str, detail: String },
}

impl Unauthenticated {
    /// The `reason` label of `fleetpatch_api_auth_failures_total` (low cardinality).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::NotBearer | Self::MalformedKey(_) | Self::Malformed => "malformed",
            Self::UnknownKey => "unknown_key",
            Self::ExpiredKey { .. } => "expired_key",
            Self::RevokedKey { .. } => "revoked_key",
            Self::OidcDisabled => "oidc_disabled",
            Self::InvalidToken { reason, .. } => reason,
        }
    }

    pub(crate) fn detail(&self) -> String {
        match self {
            Self::Missing => "this route needs a credential: send `Authorization: Bearer <API key or OIDC token>` \
                (the CLI: --token, FLEETPATCH_TOKEN or client.token); an admin makes API keys with \
                `fleetpatch apikey create`"
                .into(),
            Self::NotBearer => "the Authorization header must be `Bearer <API key or OIDC token>`".into(),
            Self::MalformedKey(error) => format!("the bearer value is not a fleetpatch API key: {error}"),
            Self::Malformed => "the bearer value is neither a fleetpatch API key (fpk_…) nor a JWT".into(),
            Self::UnknownKey => {
                "the API key is not valid (unknown or mistyped); ask an admin for a key (`fleetpatch apikey list`)"
                    .into()
            }
            Self::ExpiredKey { name } => {
                format!("the API key {name:?} has expired; ask an admin for a new one (`fleetpatch apikey create`)")
            }
            Self::RevokedKey { name } => {
                format!("the API key {name:?} was revoked; ask an admin for a new one (`fleetpatch apikey create`)")
            }
            Self::OidcDisabled => {
                "this scheduler accepts API keys only ([scheduler.auth.oidc] is not configured)".into()
            }
            Self::InvalidToken { detail, .. } => format!("the OIDC token is not accepted: {detail}; get a fresh one"),
        }
    }

    fn into_response(self) -> Response {
        let challenge = match self {
            Self::Missing => "Bearer realm=\"fleetpatch\"",
            _ => "Bearer realm=\"fleetpatch\", error=\"invalid_token\"",
        };
        let mut response = Problem::new(StatusCode::UNAUTHORIZED, "Unauthenticated", self.detail()).into_response();
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        response
    }
}

/// A valid OIDC token whose role claim grants no fleetpatch role (403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the token of {subject:?} grants no fleetpatch role: its claim names none of the values mapped in \
     [scheduler.auth.oidc.roles]; ask your IdP admin for a fleetpatch group"
)]
pub struct NoRole {
    /// The token's `sub`.
    pub subject: String,
}

fn forbidden(detail: String) -> Response {
    Problem::new(StatusCode::FORBIDDEN, "Forbidden", detail).into_response()
}

mod oidc;
pub use oidc::{JwksError, Oidc};

// ------------------------------------------------------------------ the middleware

/// What [`authenticate`] needs; cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    store: Store,
    oidc: Option<Arc<Oidc>>,
}

/// How a bearer value looks before anything is looked up.
enum Credential<'a> {
    ApiKey(ParsedApiKey<'a>),
    Jwt(&'a str),
}

fn looks_like_jwt(value: &str) -> bool {
    let parts: Vec<&str> = value.split('.').collect();
    parts.len() == 3
        && parts.iter().take(2).all(|p| !p.is_empty())
        && parts.iter().all(|p| p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
}

/// Reads the credential from the Authorization header by its shape alone.
fn credential(value: Option<&HeaderValue>) -> Result<Credential<'_>, Unauthenticated> {
    let value = value.ok_or(Unauthenticated::Missing)?;
    let value = value.to_str().map_err(|_| Unauthenticated::NotBearer)?;
    let (scheme, bearer) = value.split_once(' ').ok_or(Unauthenticated::NotBearer)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Unauthenticated::NotBearer);
    }
    let bearer = bearer.trim();
    if bearer.starts_with(fleetpatch_store::auth::API_KEY_PREFIX) {
        return ParsedApiKey::parse(bearer).map(Credential::ApiKey).map_err(Unauthenticated::MalformedKey);
    }
    if looks_like_jwt(bearer) {
        return Ok(Credential::Jwt(bearer));
    }
    Err(Unauthenticated::Malformed)
}

impl Authenticator {
    pub fn new(store: Store, oidc: Option<Arc<Oidc>>) -> Self {
        Self { store, oidc }
    }

    /// The identity behind the request's credential. `Ok(Err(NoRole))`: a
    /// valid token that grants no role. Every refusal is counted in
    /// `fleetpatch_api_auth_failures_total`, whichever door it came through.
    async fn identify(&self, value: Option<&HeaderValue>) -> Result<Result<Identity, NoRole>, Refusal> {
        let outcome = self.identify_uncounted(value).await;
        match &outcome {
            Ok(Err(_)) => metrics::counter!("fleetpatch_api_auth_failures_total", "reason" => "no_role").increment(1),
            Err(Refusal::Unauthenticated(why)) => {
                metrics::counter!("fleetpatch_api_auth_failures_total", "reason" => why.reason()).increment(1)
            }
            Ok(Ok(_)) | Err(Refusal::Unavailable(_)) => {}
        }
        outcome
    }

    async fn identify_uncounted(&self, value: Option<&HeaderValue>) -> Result<Result<Identity, NoRole>, Refusal> {
        match credential(value).map_err(Refusal::Unauthenticated)? {
            Credential::ApiKey(key) => match self.store.check_api_key(&key, chrono::Utc::now()).await {
                Ok(KeyCheck::Valid(key)) => {
                    Ok(Ok(Identity { subject: key.name, kind: ActorKind::ApiKey, role: key.role }))
                }
                Ok(KeyCheck::Unknown) => Err(Refusal::Unauthenticated(Unauthenticated::UnknownKey)),
                Ok(KeyCheck::Expired(key)) => {
                    Err(Refusal::Unauthenticated(Unauthenticated::ExpiredKey { name: key.name }))
                }
                Ok(KeyCheck::Revoked(key)) => {
                    Err(Refusal::Unauthenticated(Unauthenticated::RevokedKey { name: key.name }))
                }
                Err(error) => Err(Refusal::Unavailable(Problem::from(error))),
            },
            Credential::Jwt(token) => match &self.oidc {
                Some(oidc) => oidc.verify(token).await.map_err(Refusal::Unauthenticated),
                None => Err(Refusal::Unauthenticated(Unauthenticated::OidcDisabled)),
            },
        }
    }

    /// The identity behind a credential the console holds in its session
    /// cookie: the same checks, metrics and refusals as the API's bearer
    /// header (the console never checks a key itself).
    pub(crate) async fn identify_credential(&self, credential: &str) -> Result<Identity, ConsoleRefusal> {
        let header = HeaderValue::from_str(&format!("Bearer {credential}"))
            .map_err(|_| ConsoleRefusal::Unauthenticated(Unauthenticated::Malformed));
        let outcome = match header {
            Ok(header) => self.identify(Some(&header)).await,
            Err(refusal) => return Err(refusal),
        };
        match outcome {
            Ok(Ok(identity)) => Ok(identity),
            Ok(Err(no_role)) => Err(ConsoleRefusal::NoRole(no_role)),
            Err(Refusal::Unauthenticated(why)) => Err(ConsoleRefusal::Unauthenticated(why)),
            Err(Refusal::Unavailable(problem)) => Err(ConsoleRefusal::Unavailable(problem.detail)),
        }
    }

    /// Whether `identity` holds the role `method` on `api_route` needs; a
    /// refusal is counted and written to the audit log under `audit_route`
    /// (the route as the caller used it). Returns the role it lacks.
    pub(crate) async fn check_role(
        &self,
        identity: &Identity,
        method: &Method,
        api_route: &str,
        audit_route: &str,
        rollout_id: Option<Uuid>,
        source: String,
    ) -> Result<(), Role> {
        let needed = required_role(method, api_route);
        if identity.role >= needed {
            return Ok(());
        }
        metrics::counter!("fleetpatch_api_auth_failures_total", "reason" => "forbidden").increment(1);
        self.audit(identity, method, audit_route, rollout_id, source, StatusCode::FORBIDDEN).await;
        Err(needed)
    }

    pub(crate) async fn audit(
        &self,
        identity: &Identity,
        method: &Method,
        route: &str,
        rollout_id: Option<Uuid>,
        source: String,
        status: StatusCode,
    ) {
        let entry = NewAuditEntry {
            at: chrono::Utc::now(),
            actor: identity.subject.clone(),
            actor_kind: identity.kind,
            role: identity.role,
            method: method.as_str().to_owned(),
            route: route.to_owned(),
            rollout_id,
            source,
            status: status.as_u16(),
        };
        if let Err(error) = self.store.append_audit(entry).await {
            metrics::counter!("fleetpatch_api_audit_failures_total").increment(1);
            tracing::error!(error = %error, actor = %identity.subject, route, "appending to the audit log failed");
        }
    }
}

enum Refusal {
    Unauthenticated(Unauthenticated),
    Unavailable(Problem),
}

/// Why the console's session credential gives no identity.
#[derive(Debug)]
pub(crate) enum ConsoleRefusal {
    /// 401 for the API: the console sends the caller to its login page.
    Unauthenticated(Unauthenticated),
    /// A valid token that grants no role.
    NoRole(NoRole),
    /// The database could not be asked (the detail says so).
    Unavailable(String),
}

/// The rollout a request is about: from the path (`/v1/rollouts/{id}/…`)
/// or, for a creation, from the answer's `Location`.
fn rollout_of(route: &str, path: &str, response: Option<&Response>) -> Option<Uuid> {
    if route.starts_with("/v1/rollouts/{id}") {
        return path.split('/').nth(3).and_then(|id| Uuid::parse_str(id).ok());
    }
    if route == "/v1/rollouts" {
        let location = response?.headers().get(header::LOCATION)?.to_str().ok()?;
        return location.strip_prefix("/v1/rollouts/").and_then(|id| Uuid::parse_str(id).ok());
    }
    None
}

/// The middleware on every `/v1` route (see the module docs).
pub async fn authenticate(State(auth): State<Authenticator>, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| request.uri().path().to_owned());
    let path = request.uri().path().to_owned();
    let source = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| peer.to_string())
        .unwrap_or_else(|| "unknown".into());
    let identity = match auth.identify(request.headers().get(header::AUTHORIZATION)).await {
        Ok(Ok(identity)) => identity,
        Ok(Err(no_role)) => {
            tracing::info!(subject = %no_role.subject, route = %route, "oidc token grants no fleetpatch role");
            return forbidden(no_role.to_string());
        }
        Err(Refusal::Unauthenticated(why)) => return why.into_response(),
        Err(Refusal::Unavailable(problem)) => return problem.into_response(),
    };
    let rollout_id = rollout_of(&route, &path, None);
    if let Err(needed) = auth.check_role(&identity, &method, &route, &route, rollout_id, source.clone()).await {
        return forbidden(format!(
            "{} {route} needs the {needed} role; {:?} has {}; ask an admin for a key or group with {needed}",
            method, identity.subject, identity.role
        ));
    }
    let mut request = request;
    request.extensions_mut().insert(identity.clone());
    let response = next.run(request).await;
    if is_mutating(&method) {
        let rollout_id = rollout_of(&route, &path, Some(&response));
        auth.audit(&identity, &method, &route, rollout_id, source, response.status()).await;
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_come_from_a_string_or_an_array_and_the_highest_wins() {
        let values = RoleValues {
            viewer: vec!["readers".into()],
            operator: vec!["ops".into()],
            admin: vec!["platform-admins".into()],
        };
        let claims = serde_json::json!({
            "groups": ["readers", "unrelated", "ops"],
            "role": "platform-admins",
            "realm_access": {"roles": ["readers"]},
            "number": 3,
            "nothing": ["unrelated"],
        });
        assert_eq!(role_from_claims(&claims, "groups", &values), Some(Role::Operator));
        assert_eq!(role_from_claims(&claims, "role", &values), Some(Role::Admin));
        assert_eq!(role_from_claims(&claims, "realm_access.roles", &values), Some(Role::Viewer));
        assert_eq!(role_from_claims(&claims, "nothing", &values), None);
        assert_eq!(role_from_claims(&claims, "number", &values), None);
        assert_eq!(role_from_claims(&claims, "missing", &values), None);
    }

    #[test]
    fn reading_needs_viewer_changing_needs_operator_and_the_audit_needs_admin() {
        assert_eq!(required_role(&Method::GET, "/v1/rollouts"), Role::Viewer);
        assert_eq!(required_role(&Method::HEAD, "/v1/content/{sha256}"), Role::Viewer);
        assert_eq!(required_role(&Method::GET, "/v1/content/{sha256}"), Role::Viewer);
        assert_eq!(required_role(&Method::POST, "/v1/rollouts"), Role::Operator);
        assert_eq!(required_role(&Method::PUT, "/v1/content/{sha256}"), Role::Operator);
        assert_eq!(required_role(&Method::POST, "/v1/rollouts/{id}/abort"), Role::Operator);
        assert_eq!(required_role(&Method::GET, "/v1/audit"), Role::Admin);
    }

    #[test]
    fn credentials_are_classified_by_shape_before_any_lookup() {
        let header = |v: &str| HeaderValue::from_str(v).unwrap();
        assert_eq!(credential(None).err(), Some(Unauthenticated::Missing));
        assert_eq!(credential(Some(&header("Basic dXNlcjpwYXNz"))).err(), Some(Unauthenticated::NotBearer));
        assert_eq!(credential(Some(&header("Bearer"))).err(), Some(Unauthenticated::NotBearer));
        assert_eq!(
            credential(Some(&header("Bearer fpk_short"))).err(),
            Some(Unauthenticated::MalformedKey(MalformedKey::Length))
        );
        assert_eq!(credential(Some(&header("Bearer hunter2"))).err(), Some(Unauthenticated::Malformed));
        assert_eq!(credential(Some(&header("Bearer a.b.c!"))).err(), Some(Unauthenticated::Malformed));
        let key = format!("fpk_{}_{}", "a".repeat(16), "b".repeat(64));
        assert!(matches!(credential(Some(&header(&format!("bearer {key}")))), Ok(Credential::ApiKey(_))));
        assert!(matches!(credential(Some(&header("Bearer eyJh.eyJz.c2ln"))), Ok(Credential::Jwt(_))));
    }

    /// A malformed bearer value is refused by its shape: with the database
    /// gone, it still gets 401, while a well-formed key (which needs the
    /// database) gets 503.
    #[tokio::test]
    async fn malformed_keys_are_refused_before_any_database_work() {
        let api = crate::api::test_api::start_api(crate::api::InputPolicy {
            max_targets_per_rollout: 10,
            max_content_bytes: 1024,
            credential_names: Default::default(),
        })
        .await;
        api.store.close().await;
        let address = api.url.clone();
        let get = |bearer: String| {
            let url = format!("{address}/v1/rollouts");
            async move { reqwest::Client::new().get(url).bearer_auth(bearer).send().await.unwrap().status() }
        };
        for malformed in ["fpk_short".to_owned(), format!("fpk_{}_{}", "Z".repeat(16), "0".repeat(64)), "x".repeat(200)]
        {
            assert_eq!(get(malformed.clone()).await, StatusCode::UNAUTHORIZED, "{malformed}");
        }
        let well_formed = format!("fpk_{}_{}", "0".repeat(16), "0".repeat(64));
        assert_eq!(get(well_formed).await, StatusCode::SERVICE_UNAVAILABLE, "a well-formed key is looked up");
        api.stop.trigger();
    }

    #[test]
    fn oidc_options_name_the_wrong_key() {
        let good = OidcOptions {
            issuer: "https://idp.example".into(),
            audience: "fleetpatch".into(),
            jwks_file: Some("/etc/fleetpatch/jwks.json".into()),
            jwks_url: None,
            role_claim: "groups".into(),
            roles: RoleValues::default(),
            refresh_seconds: 300,
            leeway_seconds: 30,
        };
        assert!(good.validate().is_ok());
        let cases = [
            (OidcOptions { issuer: "".into(), ..good.clone() }, "scheduler.auth.oidc.issuer"),
            (OidcOptions { audience: " ".into(), ..good.clone() }, "scheduler.auth.oidc.audience"),
            (OidcOptions { jwks_file: None, ..good.clone() }, "scheduler.auth.oidc.jwks_file or"),
            (
                OidcOptions { jwks_url: Some("https://idp/certs".into()), ..good.clone() },
                "scheduler.auth.oidc.jwks_file and",
            ),
            (
                OidcOptions { jwks_file: None, jwks_url: Some("ftp://idp/certs".into()), ..good.clone() },
                "scheduler.auth.oidc.jwks_url",
            ),
            (OidcOptions { role_claim: "".into(), ..good.clone() }, "scheduler.auth.oidc.role_claim"),
            (OidcOptions { refresh_seconds: 1, ..good.clone() }, "scheduler.auth.oidc.refresh_seconds"),
            (
                OidcOptions { roles: RoleValues { viewer: vec![], operator: vec![], admin: vec![] }, ..good.clone() },
                "scheduler.auth.oidc.roles",
            ),
        ];
        for (options, key) in cases {
            let error = options.validate().expect_err(key).to_string();
            assert!(error.starts_with(key), "{error:?} should name {key}");
        }
        let error = OidcOptions { leeway_seconds: 301, ..good.clone() }.validate().unwrap_err();
        assert_eq!(error.to_string(), "scheduler.auth.oidc.leeway_seconds must be at most 300");
        let error = OidcOptions { jwks_file: None, jwks_url: Some("ftp://idp/certs".into()), ..good }.validate();
        assert_eq!(
            error.unwrap_err().to_string(),
            "scheduler.auth.oidc.jwks_url \"ftp://idp/certs\" must be an http:// or https:// URL"
        );
    }

    #[test]
    fn a_token_without_a_role_is_named_in_the_refusal() {
        let refusal = NoRole { subject: "alice@corp.example".into() }.to_string();
        assert!(refusal.starts_with("the token of \"alice@corp.example\" grants no fleetpatch role"), "{refusal}");
        assert!(refusal.contains("[scheduler.auth.oidc.roles]"), "{refusal}");
    }
}
