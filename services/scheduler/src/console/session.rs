//! The console's session: the login page, the cookie, its CSRF token, and
//! the identity of each request.
//!
//! The operator pastes an API key (or an OIDC access token) into the login
//! page; it is checked by the API's [`Authenticator`](crate::auth::Authenticator)
//! and kept in the cookie [`SESSION_COOKIE`] (`HttpOnly; SameSite=Strict;
//! Path=/`, plus `Secure` when the scheduler serves TLS or the request came
//! through an https proxy). Every later request is authenticated from that
//! cookie afresh, so a revoked or expired key ends the session at once.
//!
//! State-changing requests are POSTs that must carry the session's CSRF
//! token ([`csrf_token`]: HMAC-SHA256 keyed by the cookie's credential,
//! so only a page that could read the session can send it; it needs no
//! server state and holds across scheduler replicas), and whose `Origin`,
//! when the browser sends one, must be this scheduler's.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use hmac::{Hmac, Mac};
use maud::html;
use serde::Deserialize;
use sha2::Sha256;

use super::{pages, ConsoleError, ConsoleState};
use crate::auth::{ConsoleRefusal, Identity};

/// The cookie that holds the session's credential.
pub const SESSION_COOKIE: &str = "fleetpatch_session";
/// The form field that carries the CSRF token.
pub(crate) const CSRF_FIELD: &str = "csrf";
/// Longest credential the login form takes (an OIDC token with many groups
/// is a few KiB; a cookie holds at most 4 KiB).
const MAX_CREDENTIAL_BYTES: usize = 3_800;

/// The CSRF token of the session whose cookie holds `credential`.
pub fn csrf_token(credential: &str) -> String {
    hex::encode(csrf_mac(credential).finalize().into_bytes())
}

fn csrf_mac(credential: &str) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(credential.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(b"fleetpatch console csrf v1");
    mac
}

/// Whether `token` is the CSRF token of `credential` (in constant time).
fn csrf_matches(credential: &str, token: &str) -> bool {
    match hex::decode(token) {
        Ok(bytes) => csrf_mac(credential).verify_slice(&bytes).is_ok(),
        Err(_) => false,
    }
}

/// A request's session: who is calling, and the token its forms carry.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub identity: Identity,
    pub csrf: String,
    credential: String,
}

impl Session {
    /// Whether a POST carries this session's token; refused (403) otherwise.
    pub(crate) fn check_csrf(&self, token: Option<&str>) -> Result<(), ConsoleError> {
        match token {
            Some(token) if csrf_matches(&self.credential, token) => Ok(()),
            _ => Err(ConsoleError::forbidden(
                "this form is missing its CSRF token or carries another session's; reload the page and try again",
            )),
        }
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// The session of a request, or why there is none.
pub(crate) async fn session(
    state: &ConsoleState,
    headers: &HeaderMap,
    fragment: bool,
) -> Result<Session, ConsoleError> {
    let credential = cookie(headers, SESSION_COOKIE).filter(|c| !c.is_empty());
    let Some(credential) = credential else {
        return Err(ConsoleError::LoginNeeded { fragment });
    };
    match state.api.auth.identify_credential(credential).await {
        Ok(identity) => Ok(Session { identity, csrf: csrf_token(credential), credential: credential.to_owned() }),
        Err(ConsoleRefusal::Unauthenticated(_)) => Err(ConsoleError::LoginNeeded { fragment }),
        Err(ConsoleRefusal::NoRole(no_role)) => Err(ConsoleError::forbidden(no_role.to_string())),
        Err(ConsoleRefusal::Unavailable(detail)) => {
            Err(ConsoleError::Page { status: StatusCode::SERVICE_UNAVAILABLE, title: "Service unavailable", detail })
        }
    }
}

/// Refuses a POST whose `Origin` (sent by browsers) is not this scheduler.
pub(crate) fn check_origin(headers: &HeaderMap) -> Result<(), ConsoleError> {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let origin_host = origin.split_once("://").map(|(_, rest)| rest).unwrap_or("");
    // This scheduler as the browser addressed it: `Host`, or the
    // `X-Forwarded-Host` of a proxy that rewrites `Host`.
    let ours = [header::HOST.as_str(), "x-forwarded-host"]
        .into_iter()
        .filter_map(|name| headers.get(name).and_then(|v| v.to_str().ok()))
        .map(|host| host.split(',').next().unwrap_or_default().trim())
        .any(|host| !host.is_empty() && origin_host.eq_ignore_ascii_case(host));
    if ours {
        Ok(())
    } else {
        Err(ConsoleError::forbidden(format!("a form of {origin:?} may not post to this console")))
    }
}

/// Whether the session cookie must be `Secure`.
fn secure(state: &ConsoleState, headers: &HeaderMap) -> bool {
    state.tls
        || headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"))
}

fn set_cookie(value: &str, secure: bool, clear: bool) -> HeaderValue {
    let mut cookie = format!("{SESSION_COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/");
    if clear {
        cookie.push_str("; Max-Age=0");
    }
    if secure {
        cookie.push_str("; Secure");
    }
    HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static("fleetpatch_session=; Max-Age=0"))
}

fn login_form(error: Option<&str>) -> Response {
    let body = html! {
        main.narrow.login {
            h1 { "fleetpatch" }
            p { "Paste an API key (" code { "fleetpatch apikey create" } ") or an OIDC access token." }
            @if let Some(error) = error {
                p.error role="alert" { (error) }
            }
            form method="post" action="/login" {
                label for="credential" { "API key or token" }
                input #credential type="password" name="credential" autocomplete="off" required autofocus;
                button type="submit" { "Log in" }
            }
        }
    };
    let status = if error.is_some() { StatusCode::UNAUTHORIZED } else { StatusCode::OK };
    (status, pages::document("Log in", None, body)).into_response()
}

/// `GET /login`.
pub(crate) async fn login_page() -> Response {
    login_form(None)
}

#[derive(Deserialize)]
pub(crate) struct LoginForm {
    credential: String,
}

/// `POST /login`: checks the credential and starts a session.
pub(crate) async fn login(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Result<Response, ConsoleError> {
    check_origin(&headers)?;
    let credential = form.credential.trim();
    if credential.is_empty() || credential.len() > MAX_CREDENTIAL_BYTES {
        return Ok(login_form(Some("paste an API key (fpk_…) or an OIDC token")));
    }
    match state.api.auth.identify_credential(credential).await {
        Ok(identity) => {
            tracing::info!(actor = %identity.subject, role = %identity.role, "console login");
            let mut response = Redirect::to("/").into_response();
            response.headers_mut().insert(header::SET_COOKIE, set_cookie(credential, secure(&state, &headers), false));
            Ok(response)
        }
        Err(ConsoleRefusal::Unauthenticated(why)) => Ok(login_form(Some(&why.detail()))),
        Err(ConsoleRefusal::NoRole(no_role)) => Ok(login_form(Some(&no_role.to_string()))),
        Err(ConsoleRefusal::Unavailable(detail)) => {
            Err(ConsoleError::Page { status: StatusCode::SERVICE_UNAVAILABLE, title: "Service unavailable", detail })
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct CsrfForm {
    #[serde(default)]
    csrf: Option<String>,
}

/// `POST /logout`: clears the cookie.
pub(crate) async fn logout(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, ConsoleError> {
    check_origin(&headers)?;
    // A session that already ended (a revoked key) may still log out.
    if let Ok(session) = session(&state, &headers, false).await {
        session.check_csrf(form.csrf.as_deref())?;
    }
    let mut response = Redirect::to("/login").into_response();
    response.headers_mut().insert(header::SET_COOKIE, set_cookie("", secure(&state, &headers), true));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_csrf_token_is_bound_to_the_session() {
        let token = csrf_token("fpk_a_b");
        assert!(csrf_matches("fpk_a_b", &token));
        assert!(!csrf_matches("fpk_a_c", &token), "another session's token is refused");
        assert!(!csrf_matches("fpk_a_b", ""), "an empty token is refused");
        assert!(!csrf_matches("fpk_a_b", "zz"), "a token that is not hex is refused");
    }

    #[test]
    fn the_cookie_is_read_among_others() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1; fleetpatch_session=fpk_x_y"));
        assert_eq!(cookie(&headers, SESSION_COOKIE), Some("fpk_x_y"));
        assert_eq!(cookie(&headers, "b"), None);
    }

    #[test]
    fn a_foreign_origin_is_refused_and_the_own_one_passes() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(check_origin(&headers).is_ok(), "no Origin: not a browser's cross-site form");
        headers.insert(header::ORIGIN, HeaderValue::from_static("http://127.0.0.1:8080"));
        assert!(check_origin(&headers).is_ok());
        headers.insert(header::ORIGIN, HeaderValue::from_static("https://evil.example"));
        assert!(check_origin(&headers).is_err());
        headers.insert(header::ORIGIN, HeaderValue::from_static("https://fleet.example.com"));
        headers.insert("x-forwarded-host", HeaderValue::from_static("fleet.example.com"));
        assert!(check_origin(&headers).is_ok(), "behind a proxy that rewrites Host");
    }

    #[test]
    fn the_cookie_is_http_only_strict_and_secure_over_https() {
        let plain = set_cookie("k", false, false);
        assert_eq!(plain.to_str().unwrap(), "fleetpatch_session=k; HttpOnly; SameSite=Strict; Path=/");
        let secure = set_cookie("k", true, false);
        assert!(secure.to_str().unwrap().ends_with("; Secure"));
        let cleared = set_cookie("", false, true);
        assert!(cleared.to_str().unwrap().contains("Max-Age=0"));
    }
}
