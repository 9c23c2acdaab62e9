//! One telemetry set-up for every service: an `EnvFilter`, logs as text or
//! JSON, and OpenTelemetry traces over OTLP/HTTP when an endpoint is
//! configured. The returned guard flushes traces when dropped.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use serde::{Deserialize, Serialize};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::ConfigError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryOptions {
    /// `EnvFilter` directives, e.g. `info,fleetpatch=debug` (RUST_LOG wins when set).
    pub log_filter: String,
    /// `text` or `json`.
    pub log_format: String,
    /// OTLP/HTTP endpoint (e.g. `http://otel-collector:4318/v1/traces`); traces are off when empty.
    pub otlp_endpoint: String,
}

impl Default for TelemetryOptions {
    fn default() -> Self {
        Self { log_filter: "info".into(), log_format: "text".into(), otlp_endpoint: String::new() }
    }
}

impl TelemetryOptions {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(ConfigError::invalid(
                "telemetry.log_format",
                format!("must be \"text\" or \"json\", got {:?}", self.log_format),
            ));
        }
        EnvFilter::try_new(&self.log_filter).map_err(|error| {
            ConfigError::invalid(
                "telemetry.log_filter",
                format!("{:?} is not a valid filter: {error}", self.log_filter),
            )
        })?;
        Ok(())
    }
}

/// Flushes and shuts down the tracer provider when dropped.
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.force_flush();
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global subscriber. Call once, from `main`.
pub fn init(options: &TelemetryOptions, service: &'static str) -> crate::Result<TelemetryGuard> {
    options.validate().map_err(crate::Error::TelemetryOptions)?;
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&options.log_filter))
        .map_err(|e| crate::Error::Telemetry(e.to_string()))?;
    let fmt_layer = if options.log_format == "json" {
        tracing_subscriber::fmt::layer().json().with_current_span(false).boxed()
    } else {
        tracing_subscriber::fmt::layer().with_target(true).boxed()
    };
    let mut provider = None;
    let otel_layer = if options.otlp_endpoint.is_empty() {
        None
    } else {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(options.otlp_endpoint.clone())
            .build()
            .map_err(|e| {
                crate::Error::Telemetry(crate::redact::url(&format!(
                    "OTLP exporter for {}: {e}",
                    options.otlp_endpoint
                )))
            })?;
        let sdk = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(service).build())
            .build();
        let tracer = sdk.tracer(service);
        opentelemetry::global::set_tracer_provider(sdk.clone());
        provider = Some(sdk);
        Some(tracing_opentelemetry::layer().with_tracer(tracer))
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer)
        .with(otel_layer)
        .try_init()
        .map_err(|e| crate::Error::Telemetry(e.to_string()))?;
    Ok(TelemetryGuard { provider })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_options_name_the_key_and_the_value() {
        assert!(TelemetryOptions::default().validate().is_ok());
        let error =
            TelemetryOptions { log_format: "xml".into(), ..TelemetryOptions::default() }.validate().unwrap_err();
        assert_eq!(error.to_string(), "telemetry.log_format must be \"text\" or \"json\", got \"xml\"");
        let error = TelemetryOptions { log_filter: "fleetpatch=loud".into(), ..TelemetryOptions::default() }
            .validate()
            .unwrap_err();
        assert_eq!(error.field(), "telemetry.log_filter");
        assert!(
            error.to_string().starts_with("telemetry.log_filter \"fleetpatch=loud\" is not a valid filter"),
            "{error}"
        );
    }
}
