//! The buttons of a rollout page: `POST /rollouts/{id}/{action}` (pause,
//! resume, approve, abort, retry-failed). Each needs a session, its CSRF
//! token and the role of the API route it mirrors; it is taken through the
//! API's own code path and written to the audit log like the API's calls.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Extension;
use axum::Form;
use serde::Deserialize;
use uuid::Uuid;

use super::session::{check_origin, session, Session};
use super::{ConsoleError, ConsoleState};
use crate::api::{parse_id, take_action, RolloutAction};

#[derive(Deserialize)]
pub(crate) struct ActionForm {
    #[serde(default)]
    csrf: Option<String>,
}

/// Checks what every console POST needs, in order: a browser's `Origin`,
/// a session, its CSRF token, and the role `api_route` needs (a refusal for
/// the role is audited, as the API's is).
pub(crate) async fn authorize_post(
    state: &ConsoleState,
    headers: &HeaderMap,
    csrf: Option<&str>,
    api_route: &str,
    console_route: &str,
    rollout_id: Option<Uuid>,
    source: &str,
) -> Result<Session, ConsoleError> {
    check_origin(headers)?;
    let session = session(state, headers, false).await?;
    session.check_csrf(csrf)?;
    let checked = state
        .api
        .auth
        .check_role(&session.identity, &Method::POST, api_route, console_route, rollout_id, source.to_owned())
        .await;
    if let Err(needed) = checked {
        return Err(ConsoleError::forbidden(format!(
            "this needs the {needed} role; {:?} has {}; ask an admin for a key or group with {needed}",
            session.identity.subject, session.identity.role
        )));
    }
    Ok(session)
}

/// `POST /rollouts/{id}/{action}`: takes the action, then back to the rollout.
pub(crate) async fn act(
    State(state): State<ConsoleState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<ActionForm>,
) -> Result<Response, ConsoleError> {
    let action = RolloutAction::from_slug(&action)
        .ok_or_else(|| ConsoleError::bad_request(format!("{action:?} is not an action on a rollout")))?;
    let id = parse_id(&id, "rollout")?;
    let console_route = format!("/rollouts/{{id}}/{}", action.slug());
    let source = source_of(peer);
    let session =
        authorize_post(&state, &headers, form.csrf.as_deref(), &action.api_route(), &console_route, Some(id), &source)
            .await?;
    let reason = format!("paused by {} in the console", session.identity.subject);
    let outcome = take_action(&state.api, id, action, (action == RolloutAction::Pause).then_some(reason)).await;
    let status = match &outcome {
        Ok(_) => StatusCode::SEE_OTHER,
        Err(problem) => problem.status,
    };
    state.api.auth.audit(&session.identity, &Method::POST, &console_route, Some(id), source, status).await;
    outcome?;
    tracing::info!(rollout_id = %id, action = action.slug(), actor = %session.identity.subject, "console action");
    Ok(Redirect::to(&format!("/rollouts/{id}")).into_response())
}

/// The caller's address for the audit log, as the API records it.
pub(crate) fn source_of(peer: Option<Extension<ConnectInfo<SocketAddr>>>) -> String {
    peer.map(|Extension(ConnectInfo(peer))| peer.to_string()).unwrap_or_else(|| "unknown".into())
}
