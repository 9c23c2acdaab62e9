//! `GET`/`POST /rollouts/new`: a rollout from pasted (or uploaded, read
//! into the text box by the script) YAML. The text goes through the CLI's
//! parser ([`crate::api::rollout_file::parse`]), so a mistake is shown with
//! its line, column and field exactly as `fleetpatch rollout create` says
//! it, and then through the API's validation and creation
//! ([`crate::api::create`]).

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use maud::html;
use serde::Deserialize;

use super::actions::{authorize_post, source_of};
use super::pages::{document, may};
use super::session::{session, Session, CSRF_FIELD};
use super::{ConsoleError, ConsoleState};
use crate::api::rollout_file::{self, InputError};
use crate::api::{nul_fields, FieldError, Problem};

/// The API route whose role rule creating a rollout follows.
const API_ROUTE: &str = "/v1/rollouts";
/// The name errors give the pasted text.
const FILE_NAME: &str = "rollout.yaml";
/// Largest YAML the form takes (a rollout of some 100,000 short targets).
const MAX_FORM_BYTES: usize = 16 * 1024 * 1024;

const PLACEHOLDER: &str = "name: patch-tuesday\nconcurrency: 10\npatches:\n  - name: KB5031356\n    file: kb5031356.msu\n    sha256: \"…\"\n    installer: msu\ntargets:\n  - host: web-01\n    transport: ssh\n";

pub(crate) fn body_limit() -> DefaultBodyLimit {
    DefaultBodyLimit::max(MAX_FORM_BYTES)
}

/// What went wrong with a submitted rollout, as shown above the text box.
enum Mistake {
    /// The CLI's parser: file, line, column, field, message.
    Parse(InputError),
    /// The API's validation: one line per field.
    Invalid(Vec<FieldError>),
    /// Anything else the API refused (a conflict, the database).
    Refused(String),
}

fn form(session: &Session, yaml: &str, mistake: Option<&Mistake>) -> Response {
    let main = html! {
        main {
            p.crumbs { a href="/" { "Rollouts" } " › " }
            h1 { "New rollout" }
            p { "Paste a rollout file (the schema of " code { "fleetpatch rollout create -f" } ", see docs/rollout-file.md) or load one." }
            @if let Some(mistake) = mistake {
                div.error #mistake role="alert" {
                    @match mistake {
                        Mistake::Parse(error) => {
                            p.where {
                                @if let Some(line) = error.line { "line " span #error-line { (line) } @if let Some(column) = error.column { ", column " (column) } }
                                @if let Some(field) = &error.field { " · field " code #error-field { (field) } }
                            }
                            p { (error.to_string()) }
                        }
                        Mistake::Invalid(errors) => {
                            ul { @for error in errors { li { code.field { (error.field) } ": " (error.message) } } }
                        }
                        Mistake::Refused(detail) => { p { (detail) } }
                    }
                }
            }
            form.create method="post" action="/rollouts/new" {
                input type="hidden" name=(CSRF_FIELD) value=(session.csrf);
                label for="yaml-file" { "Load a file " }
                input #yaml-file type="file" accept=".yaml,.yml,.json,text/yaml,application/json" data-into="yaml";
                textarea #yaml name="yaml" rows="24" spellcheck="false" placeholder=(PLACEHOLDER) required { (yaml) }
                button type="submit" { "Create rollout" }
            }
        }
    };
    let status = if mistake.is_some() { StatusCode::UNPROCESSABLE_ENTITY } else { StatusCode::OK };
    (status, document("New rollout", Some(session), main)).into_response()
}

/// `GET /rollouts/new`.
pub(crate) async fn page(State(state): State<ConsoleState>, headers: HeaderMap) -> Result<Response, ConsoleError> {
    let session = session(&state, &headers, false).await?;
    if !may(&session, &Method::POST, API_ROUTE) {
        return Err(ConsoleError::forbidden(format!(
            "creating a rollout needs the operator role; {:?} has {}",
            session.identity.subject, session.identity.role
        )));
    }
    Ok(form(&session, "", None))
}

#[derive(Deserialize)]
pub(crate) struct CreateForm {
    #[serde(default)]
    csrf: Option<String>,
    #[serde(default)]
    yaml: String,
}

/// `POST /rollouts/new`: parses, validates and creates; to the new rollout's page.
pub(crate) async fn submit(
    State(state): State<ConsoleState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    Form(submitted): Form<CreateForm>,
) -> Result<Response, ConsoleError> {
    let source = source_of(peer);
    let console_route = "/rollouts/new";
    let session =
        authorize_post(&state, &headers, submitted.csrf.as_deref(), API_ROUTE, console_route, None, &source).await?;
    // Browsers send CRLF line ends from a text box; the parser counts lines either way.
    let yaml = submitted.yaml.replace("\r\n", "\n");
    let request = match rollout_file::parse(&yaml, FILE_NAME, false) {
        Ok(request) => request,
        Err(error) => return Ok(form(&session, &yaml, Some(&Mistake::Parse(error)))),
    };
    if let Some(errors) = serde_json::to_vec(&request).ok().as_deref().and_then(nul_fields) {
        return Ok(form(&session, &yaml, Some(&Mistake::Invalid(errors))));
    }
    let outcome = crate::api::create(&state.api, request).await;
    let status = match &outcome {
        Ok(_) => StatusCode::SEE_OTHER,
        Err(problem) => problem.status,
    };
    let rollout_id = outcome.as_ref().ok().map(|rollout| rollout.id);
    state.api.auth.audit(&session.identity, &Method::POST, console_route, rollout_id, source, status).await;
    match outcome {
        Ok(rollout) => Ok(Redirect::to(&format!("/rollouts/{}", rollout.id)).into_response()),
        Err(Problem { errors, .. }) if !errors.is_empty() => Ok(form(&session, &yaml, Some(&Mistake::Invalid(errors)))),
        Err(problem) if problem.status.is_client_error() => {
            Ok(form(&session, &yaml, Some(&Mistake::Refused(problem.detail))))
        }
        Err(problem) => Err(problem.into()),
    }
}
