//! The web console, served by the scheduler at `/`: rollouts, a rollout
//! with its waves, counts, failures and targets (updated live), a target
//! with its patches and timeline, and a rollout created from YAML.
//!
//! * `session.rs`: the login page, the session cookie (the operator's API
//!   key or OIDC token, `HttpOnly; SameSite=Strict`), its CSRF token, and
//!   the identity of each request, found by the API's own
//!   [`Authenticator`](crate::auth::Authenticator) — the console checks no
//!   credential itself.
//! * `pages.rs`: the read-only pages and the live fragment of a rollout.
//! * `create.rs` and `actions.rs`: the state-changing POSTs (create, pause,
//!   resume, approve, abort, retry failed), each through the API's own code
//!   path and role rule ([`crate::auth::required_role`] of the API route it
//!   mirrors), audited like the API's.
//! * `assets.rs`: the stylesheet and the script, compiled into the binary.
//!
//! HTML is rendered on the server with maud, which escapes every value
//! (host names, labels, reasons, output tails are the targets' words).
//! Every response carries a strict Content-Security-Policy
//! (`default-src 'self'`, no inline script or style) and
//! `X-Frame-Options: DENY`; nothing is loaded from elsewhere, so the
//! console works offline.
//!
//! **Architecture invariant**: the console holds no state and has no
//! privileges of its own: every request acts as the identity its cookie
//! names, through the same checks as the API.

use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use maud::html;

use crate::api::{ApiState, Problem};

mod actions;
mod assets;
mod create;
mod pages;
mod session;

pub use session::{csrf_token, SESSION_COOKIE};

/// `Content-Security-Policy` of every console response.
pub const CONTENT_SECURITY_POLICY: &str =
    "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; object-src 'none'";

/// What the console's handlers share.
#[derive(Clone)]
pub struct ConsoleState {
    pub api: ApiState,
    /// Mark the session cookie `Secure`: the scheduler serves TLS itself
    /// (`scheduler.http.tls`). A request that arrived through an https
    /// proxy (`X-Forwarded-Proto: https`) gets it too.
    pub tls: bool,
}

/// The console's routes; merged beside the API's by [`crate::start`].
pub fn router(state: ConsoleState) -> Router {
    Router::new()
        .route("/", get(pages::rollouts))
        .route("/login", get(session::login_page).post(session::login))
        .route("/logout", post(session::logout))
        .route("/rollouts/new", get(create::page).post(create::submit).layer(create::body_limit()))
        .route("/rollouts/{id}", get(pages::rollout))
        .route("/rollouts/{id}/live", get(pages::live))
        .route("/rollouts/{id}/{action}", post(actions::act))
        .route("/targets/{id}", get(pages::target))
        .route("/assets/{file}", get(assets::serve))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(state)
}

/// Adds the console's security headers to every response.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    headers.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    response
}

/// What a console request may end in besides its page.
#[derive(Debug)]
pub(crate) enum ConsoleError {
    /// No valid session: to the login page (a page request) or 401 (a fragment).
    LoginNeeded { fragment: bool },
    /// An error page with this status and message.
    Page { status: StatusCode, title: &'static str, detail: String },
}

impl ConsoleError {
    pub(crate) fn forbidden(detail: impl Into<String>) -> Self {
        Self::Page { status: StatusCode::FORBIDDEN, title: "Forbidden", detail: detail.into() }
    }

    pub(crate) fn bad_request(detail: impl Into<String>) -> Self {
        Self::Page { status: StatusCode::BAD_REQUEST, title: "Bad request", detail: detail.into() }
    }
}

impl From<Problem> for ConsoleError {
    fn from(problem: Problem) -> Self {
        Self::Page { status: problem.status, title: problem.title, detail: problem.detail }
    }
}

impl From<fleetpatch_store::Error> for ConsoleError {
    fn from(error: fleetpatch_store::Error) -> Self {
        Problem::from(error).into()
    }
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        match self {
            Self::LoginNeeded { fragment: false } => Redirect::to("/login").into_response(),
            Self::LoginNeeded { fragment: true } => {
                (StatusCode::UNAUTHORIZED, "the session has ended; log in again").into_response()
            }
            Self::Page { status, title, detail } => {
                let body = html! {
                    main.narrow {
                        h1 { (title) }
                        p.error role="alert" { (detail) }
                        p { a href="/" { "Back to the rollouts" } }
                    }
                };
                (status, pages::document(title, None, body)).into_response()
            }
        }
    }
}

/// A short age (`42s`, `7m`, `3h`, `2d`).
pub(crate) fn age(seconds: i64) -> String {
    let seconds = seconds.max(0);
    match seconds {
        0..=59 => format!("{seconds}s"),
        60..=3_599 => format!("{}m", seconds / 60),
        3_600..=86_399 => format!("{}h", seconds / 3_600),
        _ => format!("{}d", seconds / 86_400),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ages_are_short() {
        assert_eq!(super::age(-3), "0s");
        assert_eq!(super::age(59), "59s");
        assert_eq!(super::age(61), "1m");
        assert_eq!(super::age(7_200), "2h");
        assert_eq!(super::age(200_000), "2d");
    }
}
