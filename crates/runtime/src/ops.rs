//! The ops endpoints every service serves: `/livez` (the process is not
//! wedged: its runtime still runs a ticker task), `/readyz` (its
//! dependencies answer and it is not draining) and `/metrics` (Prometheus
//! text format). An outage of the broker or the database makes a service
//! not ready, never not live: restarting it would not bring them back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use futures_util::future::BoxFuture;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// One dependency check for `/readyz`: a name and a probe.
pub type ReadinessCheck = (&'static str, Arc<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>);

/// A service whose ticker has not run for this long is wedged (`/livez` fails).
pub const WEDGED_AFTER: Duration = Duration::from_secs(15);
const TICK: Duration = Duration::from_secs(1);

/// Readiness state of a service. Cheap to clone.
#[derive(Clone)]
pub struct Health {
    draining: Arc<AtomicBool>,
    checks: Arc<std::sync::Mutex<Vec<ReadinessCheck>>>,
    /// Milliseconds since `epoch` at the ticker's last run.
    last_tick_ms: Arc<AtomicU64>,
    epoch: Instant,
}

impl Default for Health {
    fn default() -> Self {
        Self { draining: Arc::default(), checks: Arc::default(), last_tick_ms: Arc::default(), epoch: Instant::now() }
    }
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_check(&self, name: &'static str, check: impl Fn() -> BoxFuture<'static, bool> + Send + Sync + 'static) {
        self.checks.lock().expect("health lock").push((name, Arc::new(check)));
    }

    /// Readiness goes 503 from now on: the first step of a drain.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    fn tick(&self) {
        self.last_tick_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::SeqCst);
    }

    /// How long ago the ticker last ran.
    pub fn since_last_tick(&self) -> Duration {
        let last = Duration::from_millis(self.last_tick_ms.load(Ordering::SeqCst));
        self.epoch.elapsed().saturating_sub(last)
    }

    /// Starts the ticker `/livez` watches (once per service, by [`router`]).
    fn start_ticker(&self) {
        self.tick();
        let health = self.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(TICK);
            loop {
                interval.tick().await;
                health.tick();
            }
        });
    }

    /// The names of the failing checks (empty when ready).
    pub async fn failing(&self) -> Vec<&'static str> {
        let checks: Vec<ReadinessCheck> = self.checks.lock().expect("health lock").clone();
        let mut failing = Vec::new();
        if self.is_draining() {
            failing.push("draining");
        }
        for (name, check) in checks {
            if !check().await {
                failing.push(name);
            }
        }
        failing
    }
}

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder (installed on first use).
pub fn metrics_handle() -> &'static PrometheusHandle {
    METRICS.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0])
            .expect("static buckets are valid")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (tests run services side by side).
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Puts the number of the current async runtime's worker threads on
/// `/metrics` (`fleetpatch_runtime_worker_threads`): what the process was
/// configured to run on (`collector.worker_threads`, or one per core).
pub fn record_runtime_threads() {
    metrics_handle();
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        metrics::gauge!("fleetpatch_runtime_worker_threads").set(runtime.metrics().num_workers() as f64);
    }
}

async fn livez(State(health): State<Health>) -> impl IntoResponse {
    let since = health.since_last_tick();
    if since > WEDGED_AFTER {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("wedged: no tick for {} s\n", since.as_secs()));
    }
    (StatusCode::OK, "ok\n".to_owned())
}

async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    let failing = health.failing().await;
    if failing.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", failing.join(", ")))
    }
}

async fn metrics_text() -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics_handle().render())
}

/// `/livez`, `/readyz` and `/metrics`, to merge into a service's router.
pub fn router(health: Health) -> Router {
    metrics_handle();
    health.start_ticker();
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(health)
}

/// Binds `address` (port 0 picks a free one).
pub async fn bind(address: &str) -> crate::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address)
        .await
        .map_err(|error| crate::Error::Listen { address: address.to_owned(), reason: error.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 3)]
    async fn the_runtime_threads_are_on_metrics() {
        record_runtime_threads();
        let text = metrics_handle().render();
        assert!(text.lines().any(|line| line == "fleetpatch_runtime_worker_threads 3"), "{text}");
    }

    #[tokio::test]
    async fn livez_fails_only_when_the_ticker_stopped() {
        let health = Health { epoch: Instant::now() - Duration::from_secs(60), ..Health::default() };
        let wedged = livez(State(health.clone())).await.into_response();
        assert_eq!(wedged.status(), StatusCode::SERVICE_UNAVAILABLE, "no tick for 60 s");
        health.tick();
        assert_eq!(livez(State(health.clone())).await.into_response().status(), StatusCode::OK);
        // Draining or a failing dependency is not a reason to restart the process.
        health.start_draining();
        health.add_check("database", || Box::pin(async { false }));
        assert_eq!(livez(State(health.clone())).await.into_response().status(), StatusCode::OK);
        assert_eq!(health.failing().await, vec!["draining", "database"]);
    }
}
