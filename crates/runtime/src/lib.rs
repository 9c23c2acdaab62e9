//! What every fleetpatch service shares at run time: layered configuration,
//! telemetry (logs, metrics, traces), the shutdown signal, and the ops
//! endpoints (`/livez`, `/readyz`, `/metrics`), and the clock.
//!
//! This crate knows no service: services hand it their options and checks.

pub mod clock;
pub mod config;
pub mod credentials;
pub mod http;
pub mod ops;
pub mod redact;
pub mod secrets;
pub mod shutdown;
pub mod telemetry;
pub mod text;
pub mod tokens;

pub use clock::{Clock, ManualClock};
pub use config::ConfigError;
pub use ops::{Health, ReadinessCheck};
pub use shutdown::Shutdown;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot listen on {address}: {reason}")]
    Listen { address: String, reason: String },
    #[error("telemetry: {0}")]
    Telemetry(String),
    #[error("telemetry: {0}")]
    TelemetryOptions(#[source] ConfigError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
