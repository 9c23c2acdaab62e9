//! The ops endpoints every service serves: `/livez` (the process answers),
//! `/readyz` (its dependencies answer and it is not draining) and `/metrics`
//! (Prometheus text format).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use futures_util::future::BoxFuture;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// One dependency check for `/readyz`: a name and a probe.
pub type ReadinessCheck = (&'static str, Arc<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>);

/// Readiness state of a service. Cheap to clone.
#[derive(Clone, Default)]
pub struct Health {
    draining: Arc<AtomicBool>,
    checks: Arc<std::sync::Mutex<Vec<ReadinessCheck>>>,
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

async fn livez() -> &'static str {
    "ok\n"
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
