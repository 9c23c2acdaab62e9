//! The relay: a caching content server for one site (port 1073 by default).
//!
//! Agents of a site download their installers from a relay near them
//! instead of each pulling the same bytes across the WAN from the
//! scheduler. `GET /v1/content/{sha256}` (and `HEAD`) answers from a disk
//! cache; on a miss the relay fetches the object once from its upstream —
//! the scheduler's content store (`{upstream_url}/v1/content/{sha256}`, with
//! a viewer API key) or a parent relay (same path, no key: relays cascade) —
//! and every request that missed meanwhile waits for that one fetch (single
//! flight). `Range: bytes=…` (one range) lets an agent resume a download;
//! `max_rate_bytes_per_second` caps what all responses together send.
//!
//! **Security.** Content is addressed by its sha256, and the relay trusts
//! nothing it is sent: a download is written to a temporary file while it
//! is hashed, and renamed into the cache only when the hash is the one in
//! the path; otherwise it is deleted and the client gets 502 naming the
//! expected and actual hashes (a mismatch is asked for once more with
//! `Cache-Control: no-cache`, so a parent relay with a rotten copy heals
//! it). The agent verifies the sha256 again before it runs anything, so a
//! relay — or a disk under it — that turns bad can make a download fail,
//! never make an agent run other bytes. What the relay does trust: its own
//! cache directory (files named by a sha256 are taken as that content at
//! start, without hashing them; a copy that rotted is found when an agent
//! that saw a mismatch asks again with `Cache-Control: no-cache`, which
//! makes the relay hash its copy and fetch it again if it is wrong), and
//! its upstream's TLS certificate (`upstream_ca_file` when set, else the
//! built-in roots). The relay itself asks no credential of its clients:
//! installers are not secrets on a site's network, and whoever can reach
//! the relay could reach the machines being patched. Its only secret is
//! the upstream's API key (`upstream_token_ref`), sent as a bearer
//! credential and never logged; give it the viewer role, the lowest.
//! Clients name content by a sha256 only (checked: 64 lower-case hex
//! characters), never a path or a URL.
//!
//! **Availability.** `/readyz` checks that the cache directory is writable
//! and that the relay is not draining — not that the upstream answers: a
//! relay whose upstream is down still serves what it has cached (misses
//! get 503 naming the upstream), which is the point of a relay. `/livez`
//! and `/metrics` are the shared ones (`fleetpatch_runtime::ops`).
//!
//! The cache is bounded by `cache_max_bytes` with least-recently-used
//! eviction, never of a file being read (`cache.rs` says how, and what
//! happens to an object that does not fit: it is served, not kept).
//!
//! **Architecture invariant**: nothing reaches the cache directory under
//! its sha256 name unless its bytes hash to that name.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fleetpatch_runtime::http::ServerOptions;
use fleetpatch_runtime::secrets::SecretError;
use fleetpatch_runtime::{ConfigError, Health, Shutdown};
use serde::{Deserialize, Serialize};

mod cache;
mod rate;
mod serve;
mod stats;
mod upstream;

pub use cache::is_sha256;
pub use stats::RelayStats;

/// Relay settings (`[relay]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayOptions {
    /// Listen address; agents download from port 1073 by default.
    pub listen: String,
    /// Base URL of the upstream: the scheduler (`https://scheduler:8080`) or
    /// a parent relay (`http://hq-relay:1073`). Required.
    pub upstream_url: String,
    /// Secret reference (`env:NAME`, `file:/path`) to the scheduler API key
    /// (viewer role) sent as `Authorization: Bearer …`; empty for a parent
    /// relay, which asks none.
    pub upstream_token_ref: String,
    /// PEM file of the CA(s) an `https://` upstream's certificate must chain
    /// to; when set, only these are trusted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ca_file: Option<PathBuf>,
    /// Longest wait to connect to the upstream, and for each read while
    /// downloading (a stalled download fails after this long).
    pub upstream_timeout_seconds: u64,
    /// Where cached objects live (one file per sha256). Owned by this relay.
    pub cache_dir: PathBuf,
    /// Most bytes of cached objects; least recently used ones are evicted.
    pub cache_max_bytes: u64,
    /// Total bytes per second sent to clients, all responses together;
    /// unlimited when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rate_bytes_per_second: Option<u64>,
    /// The HTTP server: timeouts, connection cap, TLS.
    pub http: ServerOptions,
}

/// The default `relay.cache_max_bytes`: 20 GiB.
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 20 << 30;
/// The smallest `relay.max_rate_bytes_per_second`.
pub const MIN_RATE_BYTES_PER_SECOND: u64 = 1024;

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:1073".into(),
            upstream_url: String::new(),
            upstream_token_ref: String::new(),
            upstream_ca_file: None,
            upstream_timeout_seconds: 30,
            cache_dir: PathBuf::from("/var/cache/fleetpatch-relay"),
            cache_max_bytes: DEFAULT_CACHE_MAX_BYTES,
            max_rate_bytes_per_second: None,
            http: ServerOptions::default(),
        }
    }
}

/// Why `relay.upstream_ca_file` cannot be used (the message follows the file's name).
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    #[error("cannot be read: {0}")]
    Unreadable(#[source] std::io::Error),
    #[error("is not PEM certificates: {0}")]
    NotPem(#[source] reqwest::Error),
    #[error("holds no PEM certificate")]
    NoCertificate,
}

/// The certificates of a PEM file (at least one).
fn load_ca_file(path: &Path) -> Result<Vec<reqwest::Certificate>, CaFileError> {
    let pem = std::fs::read(path).map_err(CaFileError::Unreadable)?;
    let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(CaFileError::NotPem)?;
    if certificates.is_empty() {
        return Err(CaFileError::NoCertificate);
    }
    Ok(certificates)
}

impl RelayOptions {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.trim().is_empty() {
            return Err(ConfigError::invalid("relay.listen", "must be an address to listen on (0.0.0.0:1073)"));
        }
        self.validate_upstream_url()?;
        let reference = &self.upstream_token_ref;
        if !reference.is_empty() && !reference.starts_with("env:") && !reference.starts_with("file:") {
            return Err(ConfigError::invalid(
                "relay.upstream_token_ref",
                "must be a secret reference, env:NAME or file:/path, never the key itself",
            ));
        }
        if let Some(path) = &self.upstream_ca_file {
            if !self.upstream_url.starts_with("https://") {
                return Err(ConfigError::invalid(
                    "relay.upstream_ca_file",
                    "is only used for an https:// relay.upstream_url; remove it or use https",
                ));
            }
            load_ca_file(path).map_err(|reason| {
                ConfigError::invalid("relay.upstream_ca_file", format!("{} {reason}", path.display()))
            })?;
        }
        if self.upstream_timeout_seconds == 0 || self.upstream_timeout_seconds > 3_600 {
            return Err(ConfigError::out_of_range("relay.upstream_timeout_seconds", 1, 3_600));
        }
        if self.cache_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid("relay.cache_dir", "must name the cache directory"));
        }
        if self.cache_max_bytes == 0 {
            return Err(ConfigError::too_small("relay.cache_max_bytes", 1));
        }
        if let Some(rate) = self.max_rate_bytes_per_second {
            if rate < MIN_RATE_BYTES_PER_SECOND {
                return Err(ConfigError::too_small("relay.max_rate_bytes_per_second", MIN_RATE_BYTES_PER_SECOND));
            }
        }
        self.http.validate("relay.http")
    }

    fn validate_upstream_url(&self) -> Result<(), ConfigError> {
        let field = "relay.upstream_url";
        if self.upstream_url.trim().is_empty() {
            return Err(ConfigError::invalid(
                field,
                "must be set: the scheduler's URL (https://scheduler:8080) or a parent relay's (http://relay:1073)",
            ));
        }
        let url = reqwest::Url::parse(&self.upstream_url)
            .map_err(|error| ConfigError::invalid(field, format!("{:?} is not a URL: {error}", self.upstream_url)))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(ConfigError::invalid(field, format!("{:?} must be an http:// or https:// URL", url.scheme())));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(ConfigError::invalid(
                field,
                "must not hold a user or password; put the API key in relay.upstream_token_ref",
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(ConfigError::invalid(field, "must be a base URL, without a query or fragment"));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Runtime(#[from] fleetpatch_runtime::Error),
    #[error("relay.upstream_token_ref: {0}")]
    Secret(#[from] SecretError),
    #[error("relay.upstream_token_ref {reference:?}: the key holds characters an HTTP header cannot carry")]
    BadToken { reference: String },
    #[error("relay.upstream_ca_file {} {source}", path.display())]
    CaFile {
        path: PathBuf,
        #[source]
        source: CaFileError,
    },
    #[error("building the upstream HTTP client: {0}")]
    Client(String),
    #[error("relay.cache_dir {}: {source}", path.display())]
    CacheDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("serving HTTP: {0}")]
    Serve(#[from] std::io::Error),
}

/// A running relay.
pub struct RelayHandle {
    pub local_addr: SocketAddr,
    /// Ends when the relay drained after `shutdown`.
    pub join: tokio::task::JoinHandle<Result<(), Error>>,
    counters: Arc<stats::Counters>,
}

impl RelayHandle {
    /// What this relay did so far (the metrics add up every relay of the process).
    pub fn stats(&self) -> RelayStats {
        self.counters.snapshot()
    }
}

/// Opens the cache, binds the listener and starts serving; drains on
/// `shutdown` (readiness goes 503, in-flight downloads finish within
/// `http.drain_seconds`).
pub async fn start(options: RelayOptions, health: Health, shutdown: Shutdown) -> Result<RelayHandle, Error> {
    options.validate()?;
    let upstream = upstream::Upstream::new(&options)?;
    let counters = Arc::new(stats::Counters::default());
    let cache = {
        let (dir, max_bytes, counters) = (options.cache_dir.clone(), options.cache_max_bytes, counters.clone());
        tokio::task::spawn_blocking(move || cache::Cache::open(&dir, max_bytes, counters))
            .await
            .map_err(|error| Error::CacheDir { path: options.cache_dir.clone(), source: std::io::Error::other(error) })?
            .map_err(|source| Error::CacheDir { path: options.cache_dir.clone(), source })?
    };
    let listener = fleetpatch_runtime::ops::bind(&options.listen).await?;
    let local_addr = listener.local_addr()?;
    let dir = options.cache_dir.clone();
    health.add_check("cache_dir", move || Box::pin(cache::Cache::is_writable(dir.clone())));
    let limiter = options.max_rate_bytes_per_second.map(rate::RateLimiter::new);
    let relay = Arc::new(serve::Relay::new(Arc::new(cache), upstream, limiter, counters.clone()));
    tracing::info!(
        address = %local_addr,
        upstream = relay.upstream.name(),
        cache_dir = %options.cache_dir.display(),
        cache_max_bytes = options.cache_max_bytes,
        max_rate_bytes_per_second = options.max_rate_bytes_per_second,
        tls = options.http.tls.is_some(),
        "relay listening"
    );
    let app = relay.router().merge(fleetpatch_runtime::ops::router(health.clone()));
    let http = options.http.clone();
    let join = tokio::spawn(async move {
        let drain = async move {
            shutdown.wait().await;
            health.start_draining();
        };
        fleetpatch_runtime::http::serve(listener, app, http, drain).await?;
        tracing::info!("relay drained");
        Ok(())
    });
    Ok(RelayHandle { local_addr, join, counters })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_upstream() -> RelayOptions {
        RelayOptions { upstream_url: "https://scheduler.example:8080".into(), ..RelayOptions::default() }
    }

    #[test]
    fn defaults_with_an_upstream_are_valid_and_bad_values_name_their_key() {
        with_upstream().validate().expect("the defaults and an upstream are valid");
        let relay = RelayOptions { upstream_url: "http://hq-relay:1073/".into(), ..RelayOptions::default() }.validate();
        relay.expect("a parent relay over http is valid");
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "not a certificate").unwrap();
        let cases = [
            (RelayOptions::default(), "relay.upstream_url"),
            (RelayOptions { upstream_url: "scheduler:8080".into(), ..with_upstream() }, "relay.upstream_url"),
            (RelayOptions { upstream_url: "ftp://scheduler".into(), ..with_upstream() }, "relay.upstream_url"),
            (RelayOptions { upstream_url: "https://u:p@scheduler".into(), ..with_upstream() }, "relay.upstream_url"),
            (RelayOptions { upstream_url: "https://scheduler/?a=b".into(), ..with_upstream() }, "relay.upstream_url"),
            (RelayOptions { upstream_token_ref: "fpk_abc".into(), ..with_upstream() }, "relay.upstream_token_ref"),
            (RelayOptions { upstream_ca_file: Some(not_pem.clone()), ..with_upstream() }, "relay.upstream_ca_file"),
            (
                RelayOptions {
                    upstream_url: "http://scheduler".into(),
                    upstream_ca_file: Some(not_pem),
                    ..with_upstream()
                },
                "relay.upstream_ca_file",
            ),
            (RelayOptions { upstream_timeout_seconds: 0, ..with_upstream() }, "relay.upstream_timeout_seconds"),
            (RelayOptions { cache_dir: PathBuf::new(), ..with_upstream() }, "relay.cache_dir"),
            (RelayOptions { cache_max_bytes: 0, ..with_upstream() }, "relay.cache_max_bytes"),
            (
                RelayOptions { max_rate_bytes_per_second: Some(10), ..with_upstream() },
                "relay.max_rate_bytes_per_second",
            ),
            (
                RelayOptions {
                    http: ServerOptions { max_connections: 0, ..ServerOptions::default() },
                    ..with_upstream()
                },
                "relay.http.max_connections",
            ),
        ];
        for (options, key) in cases {
            let error = options.validate().expect_err(key);
            assert_eq!(error.field(), key, "{error}");
            assert!(error.to_string().starts_with(key), "{error:?} should name {key}");
        }
        let error = RelayOptions { cache_max_bytes: 0, ..with_upstream() }.validate().unwrap_err();
        assert_eq!(error.to_string(), "relay.cache_max_bytes must be at least 1");
    }

    /// Through the configuration loader the binary uses, as `[relay]`.
    #[test]
    fn the_section_loads_from_a_file_and_the_environment_and_refuses_unknown_keys() {
        #[derive(Debug, Default, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        struct Root {
            relay: RelayOptions,
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        std::fs::write(&file, "[relay]\nupstream_url = \"https://scheduler:8080\"\ncache_max_bytes = 1000\n").unwrap();
        let env = [
            ("FLEETPATCH__RELAY__UPSTREAM_TOKEN_REF".to_owned(), "env:FP_RELAY_KEY".to_owned()),
            ("FLEETPATCH__RELAY__MAX_RATE_BYTES_PER_SECOND".to_owned(), "125000".to_owned()),
        ];
        let root: Root = fleetpatch_runtime::config::load_from_env(Some(&file), env).unwrap();
        let options = root.relay;
        assert_eq!(options.listen, "0.0.0.0:1073");
        assert_eq!(options.upstream_url, "https://scheduler:8080");
        assert_eq!(options.upstream_token_ref, "env:FP_RELAY_KEY");
        assert_eq!(options.cache_max_bytes, 1000);
        assert_eq!(options.max_rate_bytes_per_second, Some(125_000));
        assert_eq!(options.upstream_timeout_seconds, 30);
        assert_eq!(options.cache_dir, PathBuf::from("/var/cache/fleetpatch-relay"));
        options.validate().unwrap();
        assert_eq!(RelayOptions::default().cache_max_bytes, 20 * 1024 * 1024 * 1024);
        std::fs::write(&file, "[relay]\nupstream = \"https://scheduler:8080\"\n").unwrap();
        let error = fleetpatch_runtime::config::load_from_env::<Root>(Some(&file), []).unwrap_err().to_string();
        assert!(error.contains("unknown field `upstream`"), "{error}");
    }
}
