//! The route: `GET` and `HEAD /v1/content/{sha256}`, from the cache, or
//! from one shared upstream fetch on a miss.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use fleetpatch_runtime::http::{parse_range, ByteRange};
use futures_util::future::{BoxFuture, FutureExt, Shared};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::cache::{is_sha256, Cache, Lease};
use crate::rate::RateLimiter;
use crate::stats::{Counters, RequestResult};
use crate::upstream::{FetchFailure, Upstream};

/// Bytes read from disk at a time when no bandwidth limit is set.
const CHUNK_BYTES: usize = 64 * 1024;

/// One upstream fetch, awaited by every request that missed while it runs.
type Flight = Shared<BoxFuture<'static, Result<Arc<Lease>, FetchFailure>>>;

pub(crate) struct Relay {
    pub cache: Arc<Cache>,
    pub upstream: Upstream,
    pub limiter: Option<RateLimiter>,
    pub counters: Arc<Counters>,
    /// The fetches running, by sha256 (single flight).
    flights: Mutex<HashMap<String, Flight>>,
}

/// Where a response's content came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Cache,
    Upstream,
}

impl Relay {
    pub fn new(cache: Arc<Cache>, upstream: Upstream, limiter: Option<RateLimiter>, counters: Arc<Counters>) -> Self {
        Self { cache, upstream, limiter, counters, flights: Mutex::default() }
    }

    pub fn router(self: Arc<Self>) -> Router {
        Router::new().route("/v1/content/{sha256}", get(get_content)).with_state(self)
    }

    /// A lease on `sha256`: the cached copy (hashed again first when
    /// `revalidate`; a copy that no longer matches is dropped), or the
    /// result of the one fetch of it from upstream.
    async fn obtain(self: &Arc<Self>, sha256: &str, revalidate: bool) -> Result<(Arc<Lease>, Source), FetchFailure> {
        if revalidate {
            if let Some(lease) = self.cache.lease(sha256) {
                let checked = tokio::task::spawn_blocking(move || {
                    let intact = lease.is_intact();
                    (lease, intact)
                })
                .await;
                match checked {
                    Ok((lease, Ok(true))) => {
                        self.counters.revalidation(true);
                        return Ok((Arc::new(lease), Source::Cache));
                    }
                    Ok((lease, intact)) => {
                        self.counters.revalidation(false);
                        tracing::warn!(
                            sha256,
                            error = intact.err().map(|e| e.to_string()),
                            "cached copy no longer matches its sha256; dropped, fetching it again"
                        );
                        lease.discard();
                    }
                    Err(error) => tracing::error!(error = %error, "revalidation task failed"),
                }
            }
        }
        let flight = {
            let mut flights = self.flights.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // Checked under the flights lock: a fetch adds its object to the
            // cache before it leaves the map, so a request either finds the
            // object or joins the fetch, never starts a second one.
            if let Some(lease) = self.cache.lease(sha256) {
                return Ok((Arc::new(lease), Source::Cache));
            }
            self.counters.waiting_for_upstream();
            match flights.get(sha256) {
                Some(flight) => flight.clone(),
                None => {
                    let relay = self.clone();
                    let key = sha256.to_owned();
                    // Its own task: it finishes (and caches) even when every
                    // client that waited for it went away.
                    let task = tokio::spawn(async move {
                        // Leaves the map when the fetch ends, however it
                        // ends: after its object is in the cache.
                        let _landed = Landed { relay: relay.clone(), sha256: key.clone() };
                        relay.fetch(&key).await
                    });
                    let upstream = self.upstream.name().to_owned();
                    let flight = async move {
                        task.await.unwrap_or_else(|error| {
                            Err(FetchFailure::Unreachable {
                                upstream,
                                reason: format!("the fetch task failed: {error}"),
                            })
                        })
                    }
                    .boxed()
                    .shared();
                    flights.insert(sha256.to_owned(), flight.clone());
                    flight
                }
            }
        };
        Ok((flight.await?, Source::Upstream))
    }

    /// Downloads `sha256` and adds it to the cache. A download that does not
    /// match is tried once more with `Cache-Control: no-cache`, which makes a
    /// parent relay hash its copy again and heal it.
    async fn fetch(&self, sha256: &str) -> Result<Arc<Lease>, FetchFailure> {
        let temp = self.cache.temp_path(sha256);
        let mut downloaded = self.upstream.download(sha256, &temp, false, &self.counters).await;
        if let Err(failure @ FetchFailure::Mismatch { .. }) = &downloaded {
            tracing::warn!(error = %failure, "upstream content does not match; asking once more with no-cache");
            downloaded = self.upstream.download(sha256, &temp, true, &self.counters).await;
        }
        let size = match downloaded {
            Ok(size) => size,
            Err(failure) => {
                if matches!(failure, FetchFailure::NotFound { .. }) {
                    tracing::info!(error = %failure, "content not found upstream");
                } else {
                    tracing::warn!(error = %failure, "fetching content from upstream failed");
                }
                return Err(failure);
            }
        };
        let cache = self.cache.clone();
        let key = sha256.to_owned();
        let admitted = tokio::task::spawn_blocking(move || cache.admit(&key, temp, size)).await;
        let cache_failure = |reason: String| {
            tracing::error!(reason = %reason, sha256, "adding a fetched object to the cache failed");
            FetchFailure::Cache { dir: self.cache.dir().display().to_string(), reason }
        };
        match admitted {
            Ok(Ok(lease)) => {
                tracing::info!(
                    sha256,
                    bytes = size,
                    upstream = self.upstream.name(),
                    kept = lease.is_kept(),
                    "fetched from upstream"
                );
                Ok(Arc::new(lease))
            }
            Ok(Err(error)) => Err(cache_failure(error.to_string())),
            Err(error) => Err(cache_failure(error.to_string())),
        }
    }

    /// The response for a lease: the whole file or the range asked for,
    /// streamed from disk through the bandwidth limit.
    async fn respond(self: &Arc<Self>, lease: Arc<Lease>, source: Source, headers: &HeaderMap) -> Response {
        let opened = async {
            let file = tokio::fs::File::open(lease.path()).await?;
            let length = file.metadata().await?.len();
            Ok::<_, std::io::Error>((file, length))
        }
        .await;
        let (mut file, length) = match opened {
            Ok(opened) => opened,
            Err(error) => {
                // Removed from under the cache: forget it, the next request fetches it.
                tracing::error!(error = %error, path = %lease.path().display(), "reading a cached object failed");
                lease.discard();
                self.counters.request(RequestResult::UpstreamError);
                return problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Relay cache unavailable",
                    format!("cannot read the cached copy of {}: {error}; retry", lease.sha256()),
                );
            }
        };
        self.counters.request(match source {
            Source::Cache => RequestResult::Hit,
            Source::Upstream => RequestResult::Miss,
        });
        let range = parse_range(headers.get(header::RANGE).and_then(|value| value.to_str().ok()), length);
        let mut response = Response::builder()
            .header(header::ACCEPT_RANGES, "bytes")
            .header(header::ETAG, format!("\"{}\"", lease.sha256()))
            .header("x-fleetpatch-relay-cache", if source == Source::Cache { "hit" } else { "miss" });
        if let Some(content_range) = range.content_range(length) {
            response = response.header(header::CONTENT_RANGE, content_range);
        }
        let Some((start, count)) = range.span(length) else {
            return response
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_LENGTH, 0)
                .body(Body::empty())
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
        };
        if start > 0 {
            if let Err(error) = file.seek(std::io::SeekFrom::Start(start)).await {
                return problem(StatusCode::SERVICE_UNAVAILABLE, "Relay cache unavailable", error.to_string());
            }
        }
        let status =
            if matches!(range, ByteRange::Partial { .. }) { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK };
        let chunk_bytes = self.limiter.as_ref().map_or(CHUNK_BYTES, RateLimiter::chunk_bytes);
        let relay = self.clone();
        let body = tokio_util::io::ReaderStream::with_capacity(file.take(count), chunk_bytes).then(move |chunk| {
            // The lease lives as long as the body: the file is not evicted
            // (or deleted, if not kept) while it is being sent.
            let (relay, _lease) = (relay.clone(), lease.clone());
            async move {
                let chunk = chunk?;
                if let Some(limiter) = &relay.limiter {
                    limiter.take(chunk.len()).await;
                }
                relay.counters.served_bytes(chunk.len() as u64);
                Ok::<_, std::io::Error>(chunk)
            }
        });
        response
            .status(status)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            // Set by hand: the stream's length is unknown to hyper, which
            // then sends exactly this many bytes (no chunked encoding).
            .header(header::CONTENT_LENGTH, count)
            .header(header::CACHE_CONTROL, "public, max-age=31536000, immutable")
            .body(Body::from_stream(body))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    }
}

/// Takes a fetch out of the map of running ones when dropped.
struct Landed {
    relay: Arc<Relay>,
    sha256: String,
}

impl Drop for Landed {
    fn drop(&mut self) {
        self.relay.flights.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&self.sha256);
    }
}

/// Whether the client asks for the cached copy to be checked
/// (`Cache-Control: no-cache`).
fn wants_revalidation(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|directive| directive.trim().eq_ignore_ascii_case("no-cache"))
}

/// A problem+json answer (RFC 9457).
fn problem(status: StatusCode, title: &str, detail: impl Into<String>) -> Response {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": title,
        "status": status.as_u16(),
        "detail": detail.into(),
    });
    (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"))], body.to_string())
        .into_response()
}

/// The answer for a failed fetch.
fn failure_response(failure: &FetchFailure) -> Response {
    let (status, title) = match failure {
        FetchFailure::NotFound { .. } => (StatusCode::NOT_FOUND, "Not found"),
        FetchFailure::Mismatch { .. } => (StatusCode::BAD_GATEWAY, "Upstream content mismatch"),
        FetchFailure::Refused { .. } | FetchFailure::Interrupted { .. } => {
            (StatusCode::BAD_GATEWAY, "Bad answer from upstream")
        }
        FetchFailure::Unreachable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "Upstream unavailable"),
        FetchFailure::Cache { .. } => (StatusCode::SERVICE_UNAVAILABLE, "Relay cache unavailable"),
    };
    problem(status, title, failure.to_string())
}

async fn get_content(State(relay): State<Arc<Relay>>, Path(sha256): Path<String>, headers: HeaderMap) -> Response {
    if !is_sha256(&sha256) {
        relay.counters.request(RequestResult::BadRequest);
        let shown: String = sha256.chars().take(80).collect();
        return problem(
            StatusCode::BAD_REQUEST,
            "Bad request",
            format!("{shown:?} is not a sha256: content is named by 64 lower-case hex characters"),
        );
    }
    match relay.obtain(&sha256, wants_revalidation(&headers)).await {
        Ok((lease, source)) => relay.respond(lease, source, &headers).await,
        Err(failure) => {
            relay.counters.request(match failure {
                FetchFailure::NotFound { .. } => RequestResult::NotFound,
                _ => RequestResult::UpstreamError,
            });
            failure_response(&failure)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_cache_is_found_among_the_directives() {
        let mut headers = HeaderMap::new();
        assert!(!wants_revalidation(&headers));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=0, No-Cache"));
        assert!(wants_revalidation(&headers));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        assert!(!wants_revalidation(&headers));
    }
}
