//! The dead-letter queue from the API: `GET /v1/dead-letters` shows what
//! is in it (the work queue each message was for, why it died, its
//! headers and size; left in place) and `POST /v1/dead-letters/replay`
//! moves messages back to their work queues. The CLI's `fleetpatch
//! dead-letters list|replay` calls these; the alert `FleetpatchDeadLetters`
//! fires while the queue is not empty.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use fleetpatch_bus::DEAD_LETTER_QUEUE;
use serde::Deserialize;

use crate::api::{ApiState, Problem};

/// Most dead letters shown per request.
pub const MAX_LIST: usize = 1_000;
/// Most dead letters replayed per request.
pub const MAX_REPLAY: usize = 10_000;

#[derive(Debug, Deserialize)]
pub struct LimitParams {
    limit: Option<usize>,
}

fn broker_unavailable(error: fleetpatch_bus::Error) -> Problem {
    Problem::new(StatusCode::SERVICE_UNAVAILABLE, "Service unavailable", format!("the message broker: {error}"))
}

fn limit(params: &LimitParams, default: usize, max: usize) -> Result<usize, Problem> {
    match params.limit {
        None => Ok(default),
        Some(limit) if (1..=max).contains(&limit) => Ok(limit),
        Some(limit) => {
            Err(Problem::new(StatusCode::BAD_REQUEST, "Bad request", format!("limit {limit} is not within 1..={max}")))
        }
    }
}

/// `GET /v1/dead-letters?limit=N` (viewer): the oldest `N` (100) dead
/// letters and how many there are in all.
pub async fn list(State(state): State<ApiState>, Query(params): Query<LimitParams>) -> Result<Response, Problem> {
    let limit = limit(&params, 100, MAX_LIST)?;
    let total = state.bus.queue_depth(DEAD_LETTER_QUEUE).await.map_err(broker_unavailable)?;
    let letters = state.bus.dead_letters(limit).await.map_err(broker_unavailable)?;
    Ok(Json(serde_json::json!({ "total": total, "dead_letters": letters })).into_response())
}

/// `POST /v1/dead-letters/replay?limit=N` (operator): moves the oldest `N`
/// (all, up to 10,000) back to their work queues. Replaying is safe: every
/// consumer applies a message through a guarded transition.
pub async fn replay(State(state): State<ApiState>, Query(params): Query<LimitParams>) -> Result<Response, Problem> {
    let limit = limit(&params, MAX_REPLAY, MAX_REPLAY)?;
    let replayed = state.bus.replay_dead_letters(limit).await.map_err(broker_unavailable)?;
    let left = state.bus.queue_depth(DEAD_LETTER_QUEUE).await.map_err(broker_unavailable)?;
    tracing::info!(replayed, left, "dead letters replayed");
    Ok(Json(serde_json::json!({ "replayed": replayed, "left": left })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_default_and_out_of_range_ones_are_refused_with_the_range() {
        assert_eq!(limit(&LimitParams { limit: None }, 100, MAX_LIST).unwrap(), 100);
        assert_eq!(limit(&LimitParams { limit: Some(7) }, 100, MAX_LIST).unwrap(), 7);
        for bad in [0, MAX_LIST + 1] {
            let problem = limit(&LimitParams { limit: Some(bad) }, 100, MAX_LIST).unwrap_err();
            assert_eq!(problem.status, StatusCode::BAD_REQUEST);
            assert!(problem.detail.contains("1..=1000"), "{}", problem.detail);
        }
    }
}
