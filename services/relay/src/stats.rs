//! What one relay did: per-instance counters (atomics) behind
//! [`RelayStats`], and the process-wide Prometheus metrics
//! (`fleetpatch_relay_*`). Both are kept because a process may run several
//! relays (the tests do), and the global recorder adds them up.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of one relay's counters (`RelayHandle::stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Requests served from the cache as it was.
    pub hits: u64,
    /// Requests that found no usable cached copy and waited for an upstream
    /// fetch (their own or one already running); counted when they start
    /// waiting, so a miss whose fetch fails is also in `not_found` or
    /// `upstream_errors`.
    pub misses: u64,
    /// Requests answered 404 (the upstream has no such content).
    pub not_found: u64,
    /// Requests refused with 400 (not a sha256).
    pub bad_requests: u64,
    /// Requests answered 502 or 503 (upstream unreachable, refused, or sent
    /// content that does not match), or 503 for a failing cache directory.
    pub upstream_errors: u64,
    /// Requests sent to the upstream (each attempt of a fetch).
    pub upstream_fetches: u64,
    /// Upstream answers whose content did not match its sha256.
    pub upstream_mismatches: u64,
    /// Bytes received from the upstream.
    pub upstream_bytes: u64,
    /// Bytes of response bodies handed to clients.
    pub served_bytes: u64,
    /// Objects removed from the cache to make room.
    pub evictions: u64,
    /// Cached copies hashed again because a client sent `Cache-Control: no-cache`.
    pub revalidations: u64,
    /// Of those, copies that no longer matched their sha256 (dropped and
    /// fetched again).
    pub revalidations_corrupt: u64,
    /// Bytes of the objects in the cache (at most `relay.cache_max_bytes`).
    pub cache_bytes: u64,
    /// Objects in the cache.
    pub cache_objects: u64,
}

/// The live counters behind [`RelayStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub not_found: AtomicU64,
    pub bad_requests: AtomicU64,
    pub upstream_errors: AtomicU64,
    pub upstream_fetches: AtomicU64,
    pub upstream_mismatches: AtomicU64,
    pub upstream_bytes: AtomicU64,
    pub served_bytes: AtomicU64,
    pub evictions: AtomicU64,
    pub revalidations: AtomicU64,
    pub revalidations_corrupt: AtomicU64,
    pub cache_bytes: AtomicU64,
    pub cache_objects: AtomicU64,
}

/// How a request ended (the `result` label of `fleetpatch_relay_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestResult {
    Hit,
    Miss,
    NotFound,
    BadRequest,
    UpstreamError,
}

/// How one upstream request ended (the `result` label of
/// `fleetpatch_relay_upstream_fetches_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FetchResult {
    Ok,
    Mismatch,
    NotFound,
    Error,
}

fn add(counter: &AtomicU64, value: u64) {
    counter.fetch_add(value, Ordering::Relaxed);
}

impl Counters {
    pub fn snapshot(&self) -> RelayStats {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        RelayStats {
            hits: get(&self.hits),
            misses: get(&self.misses),
            not_found: get(&self.not_found),
            bad_requests: get(&self.bad_requests),
            upstream_errors: get(&self.upstream_errors),
            upstream_fetches: get(&self.upstream_fetches),
            upstream_mismatches: get(&self.upstream_mismatches),
            upstream_bytes: get(&self.upstream_bytes),
            served_bytes: get(&self.served_bytes),
            evictions: get(&self.evictions),
            revalidations: get(&self.revalidations),
            revalidations_corrupt: get(&self.revalidations_corrupt),
            cache_bytes: get(&self.cache_bytes),
            cache_objects: get(&self.cache_objects),
        }
    }

    /// A request that starts waiting for an upstream fetch.
    pub fn waiting_for_upstream(&self) {
        add(&self.misses, 1);
    }

    /// A request's end, in the metric; hits, bad requests and failures
    /// also in this relay's counters (misses are counted when they start
    /// waiting).
    pub fn request(&self, result: RequestResult) {
        let label = match result {
            RequestResult::Hit => {
                add(&self.hits, 1);
                "hit"
            }
            RequestResult::Miss => "miss",
            RequestResult::NotFound => {
                add(&self.not_found, 1);
                "not_found"
            }
            RequestResult::BadRequest => {
                add(&self.bad_requests, 1);
                "bad_request"
            }
            RequestResult::UpstreamError => {
                add(&self.upstream_errors, 1);
                "upstream_error"
            }
        };
        metrics::counter!("fleetpatch_relay_requests_total", "result" => label).increment(1);
    }

    pub fn fetch(&self, result: FetchResult) {
        add(&self.upstream_fetches, 1);
        let label = match result {
            FetchResult::Ok => "ok",
            FetchResult::Mismatch => {
                add(&self.upstream_mismatches, 1);
                "mismatch"
            }
            FetchResult::NotFound => "not_found",
            FetchResult::Error => "error",
        };
        metrics::counter!("fleetpatch_relay_upstream_fetches_total", "result" => label).increment(1);
    }

    pub fn upstream_bytes(&self, bytes: u64) {
        add(&self.upstream_bytes, bytes);
        metrics::counter!("fleetpatch_relay_upstream_bytes_total").increment(bytes);
    }

    pub fn served_bytes(&self, bytes: u64) {
        add(&self.served_bytes, bytes);
        metrics::counter!("fleetpatch_relay_served_bytes_total").increment(bytes);
    }

    pub fn eviction(&self) {
        add(&self.evictions, 1);
        metrics::counter!("fleetpatch_relay_evictions_total").increment(1);
    }

    /// A cached copy hashed again; `intact` whether it still matched.
    pub fn revalidation(&self, intact: bool) {
        add(&self.revalidations, 1);
        if !intact {
            add(&self.revalidations_corrupt, 1);
        }
        let label = if intact { "ok" } else { "corrupt" };
        metrics::counter!("fleetpatch_relay_revalidations_total", "result" => label).increment(1);
    }

    /// The cache's size after a change.
    pub fn cache_size(&self, bytes: u64, objects: u64) {
        self.cache_bytes.store(bytes, Ordering::Relaxed);
        self.cache_objects.store(objects, Ordering::Relaxed);
        metrics::gauge!("fleetpatch_relay_cache_bytes").set(bytes as f64);
    }
}
