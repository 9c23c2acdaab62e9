//! What the relay tests share: a small upstream that serves bytes by
//! sha256 and records what it was asked, relays started on port 0 with a
//! cache directory of their own, and an HTTP client.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use fleetpatch_relay::{RelayHandle, RelayOptions};
use fleetpatch_runtime::{Health, Shutdown};
use sha2::{Digest, Sha256};

pub fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// `size` bytes that differ from one `seed` to the next.
pub fn object(seed: u8, size: usize) -> Vec<u8> {
    (0..size).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// One request the upstream received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub sha256: String,
    pub authorization: Option<String>,
    pub cache_control: Option<String>,
}

#[derive(Default)]
struct UpstreamState {
    objects: Mutex<HashMap<String, Vec<u8>>>,
    seen: Mutex<Vec<Seen>>,
    /// Serve every object with its first byte changed.
    corrupt: std::sync::atomic::AtomicBool,
    /// When set, requests without exactly this `Authorization` get 401.
    required_authorization: Mutex<Option<String>>,
    /// Answers wait while this is false.
    open: Option<tokio::sync::watch::Sender<bool>>,
}

/// An upstream serving `/v1/content/{sha256}` from memory.
pub struct TestUpstream {
    pub url: String,
    state: Arc<UpstreamState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl TestUpstream {
    pub async fn start() -> Self {
        Self::start_with(UpstreamState { open: Some(tokio::sync::watch::channel(true).0), ..Default::default() }).await
    }

    async fn start_with(state: UpstreamState) -> Self {
        let state = Arc::new(state);
        let app = Router::new().route("/v1/content/{sha256}", get(serve)).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self { url, state, stop: Some(stop), server: Some(server) }
    }

    /// Adds an object; returns its sha256.
    pub fn put(&self, data: &[u8]) -> String {
        let sha256 = sha256(data);
        self.state.objects.lock().unwrap().insert(sha256.clone(), data.to_vec());
        sha256
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// How many requests asked for `sha256`.
    pub fn requests_for(&self, sha256: &str) -> usize {
        self.seen().iter().filter(|seen| seen.sha256 == sha256).count()
    }

    pub fn set_corrupt(&self, corrupt: bool) {
        self.state.corrupt.store(corrupt, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn require_authorization(&self, value: &str) {
        *self.state.required_authorization.lock().unwrap() = Some(value.to_owned());
    }

    /// Holds (`false`) or releases (`true`) every answer.
    pub fn set_open(&self, open: bool) {
        self.state.open.as_ref().expect("gate").send_replace(open);
    }

    /// Stops listening and closes its connections: the upstream is down.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap();
        }
    }
}

async fn serve(
    State(state): State<Arc<UpstreamState>>,
    UrlPath(sha256): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let authorization = text(header::AUTHORIZATION);
    state.seen.lock().unwrap().push(Seen {
        sha256: sha256.clone(),
        authorization: authorization.clone(),
        cache_control: text(header::CACHE_CONTROL),
    });
    if let Some(open) = &state.open {
        let mut open = open.subscribe();
        let _ = open.wait_for(|open| *open).await;
    }
    let required = state.required_authorization.lock().unwrap().clone();
    if required.is_some() && required != authorization {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let Some(mut data) = state.objects.lock().unwrap().get(&sha256).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if state.corrupt.load(std::sync::atomic::Ordering::SeqCst) && !data.is_empty() {
        data[0] ^= 0xff;
    }
    data.into_response()
}

/// A relay under test and what drives it.
pub struct TestRelay {
    pub handle: RelayHandle,
    pub url: String,
    pub shutdown: Shutdown,
    pub health: Health,
}

impl TestRelay {
    pub async fn start(upstream_url: &str, cache_dir: &Path, configure: impl FnOnce(&mut RelayOptions)) -> Self {
        let mut options = RelayOptions {
            listen: "127.0.0.1:0".into(),
            upstream_url: upstream_url.to_owned(),
            upstream_timeout_seconds: 5,
            cache_dir: cache_dir.to_owned(),
            ..RelayOptions::default()
        };
        configure(&mut options);
        let (shutdown, health) = (Shutdown::new(), Health::new());
        let handle = fleetpatch_relay::start(options, health.clone(), shutdown.clone()).await.expect("relay starts");
        let url = format!("http://{}", handle.local_addr);
        Self { handle, url, shutdown, health }
    }

    pub fn content_url(&self, sha256: &str) -> String {
        format!("{}/v1/content/{sha256}", self.url)
    }

    /// `GET` of `sha256` with extra headers; the status, headers and body.
    pub async fn get(&self, sha256: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, Vec<u8>) {
        let mut request = client().get(self.content_url(sha256));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("the relay answers");
        let (status, headers) = (response.status(), response.headers().clone());
        (status, headers, response.bytes().await.expect("the whole body").to_vec())
    }

    /// Triggers the drain and waits for the relay to finish it.
    pub async fn stop(self) {
        self.shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(30), self.handle.join)
            .await
            .expect("the relay drains in time")
            .expect("the relay task")
            .expect("the relay ends cleanly");
    }
}

/// A client that opens a new connection per request (so a relay's drain
/// is not held up by idle keep-alive connections).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap()
}

pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers.get(name).map(|v| v.to_str().unwrap()).unwrap_or_default()
}

/// The names of the files in `dir`, sorted.
pub fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    names
}

/// The total size of the files in `dir`.
pub fn bytes_on_disk(dir: &Path) -> u64 {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
}

/// Waits (polling, at most 10 s) until `condition` holds.
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
