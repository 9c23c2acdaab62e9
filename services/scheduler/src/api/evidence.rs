//! `GET /v1/rollouts/{id}/report` (the evidence report, its digest stored)
//! and `GET /v1/reports/{sha256}` (was this copy issued by fleetpatch?).

use axum::extract::{Extension, Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use fleetpatch_store::EvidenceRecord;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{parse_id, ApiState, Problem};
use crate::auth::Identity;
use crate::report::{EvidenceReport, Format};

/// The header that carries a report's sha256.
pub const DIGEST_HEADER: &str = "x-fleetpatch-report-sha256";

#[derive(Debug, Deserialize)]
pub struct ReportQuery {
    format: Option<String>,
}

pub async fn report(
    State(state): State<ApiState>,
    Extension(identity): Extension<Identity>,
    Path(id): Path<String>,
    Query(query): Query<ReportQuery>,
) -> Result<Response, Problem> {
    let id = parse_id(&id, "rollout")?;
    let raw = query.format.as_deref().unwrap_or("json");
    let format = Format::parse(raw).ok_or_else(|| {
        Problem::new(StatusCode::BAD_REQUEST, "Bad request", format!("format {raw:?} is not one of json, csv, html"))
    })?;
    let now = state.store.clock().now();
    let report =
        EvidenceReport::gather(&state.store, id, &identity.subject, now).await.map_err(|error| match error {
            crate::report::ReportError::Store(error) => Problem::from(error),
            other => {
                tracing::error!(error = %other, "rendering an evidence report");
                Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal error", other.to_string())
            }
        })?;
    let bytes = report.render(format).map_err(|error| {
        tracing::error!(error = %error, "rendering an evidence report");
        Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal error", error.to_string())
    })?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    state
        .store
        .record_evidence(&EvidenceRecord {
            sha256: sha256.clone(),
            rollout_id: id,
            format: format.as_str().to_owned(),
            bytes: bytes.len() as u64,
            created_at: now,
            created_by: identity.subject.clone(),
        })
        .await?;
    let mut response = bytes.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
    headers.insert(DIGEST_HEADER, HeaderValue::from_str(&sha256).expect("hex is a header value"));
    Ok(response)
}

pub async fn issued(State(state): State<ApiState>, Path(sha256): Path<String>) -> Result<Response, Problem> {
    if sha256.len() != 64 || !sha256.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "Bad request",
            format!("{sha256:?} is not a sha256 (64 lower-case hex digits)"),
        ));
    }
    match state.store.evidence(&sha256).await? {
        Some(record) => Ok(Json(record).into_response()),
        None => Err(Problem::new(
            StatusCode::NOT_FOUND,
            "Not found",
            format!("no report with sha256 {sha256} was issued by this fleetpatch: the copy differs from every report issued"),
        )),
    }
}
