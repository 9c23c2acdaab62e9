//! The upstream: the scheduler's content store or a parent relay, both at
//! `{relay.upstream_url}/v1/content/{sha256}`. A download goes into a
//! temporary file of the cache while it is hashed; it is kept only when the
//! hash is the one asked for.
//!
//! The API key (`relay.upstream_token_ref`) is sent as a bearer credential,
//! marked sensitive, and never logged or put in an error. Redirects are not
//! followed: an upstream answers for itself.

use std::path::Path;
use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::stats::{Counters, FetchResult};
use crate::{Error, RelayOptions};

/// Why content could not be had from the upstream. Every message names the
/// upstream (its configured URL, which holds no credential).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FetchFailure {
    #[error("upstream {upstream} has no content {sha256}")]
    NotFound { upstream: String, sha256: String },
    #[error(
        "upstream {upstream} sent content whose sha256 is {actual}, not the expected {expected} ({bytes} bytes); \
         nothing was cached"
    )]
    Mismatch { upstream: String, expected: String, actual: String, bytes: u64 },
    #[error("cannot reach upstream {upstream}: {reason}")]
    Unreachable { upstream: String, reason: String },
    #[error("upstream {upstream} answered {status} for {sha256}{hint}")]
    Refused { upstream: String, sha256: String, status: u16, hint: &'static str },
    #[error("upstream {upstream} stopped sending {sha256} after {bytes} bytes: {reason}")]
    Interrupted { upstream: String, sha256: String, bytes: u64, reason: String },
    #[error("relay cache directory {dir}: {reason}")]
    Cache { dir: String, reason: String },
}

impl FetchFailure {
    fn result(&self) -> FetchResult {
        match self {
            Self::NotFound { .. } => FetchResult::NotFound,
            Self::Mismatch { .. } => FetchResult::Mismatch,
            _ => FetchResult::Error,
        }
    }
}

/// An error and its sources, on one line (reqwest's own message says
/// little: "error sending request").
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text
}

pub(crate) struct Upstream {
    client: reqwest::Client,
    /// `relay.upstream_url` without its trailing slashes.
    base: String,
    /// `Bearer <key>`, marked sensitive (never printed by `Debug`).
    authorization: Option<HeaderValue>,
}

impl Upstream {
    /// The client for `options` (validated): resolves the token reference
    /// and loads the CA file.
    pub fn new(options: &RelayOptions) -> Result<Self, Error> {
        let timeout = Duration::from_secs(options.upstream_timeout_seconds);
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(timeout)
            .read_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("fleetpatch-relay/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &options.upstream_ca_file {
            let certificates =
                crate::load_ca_file(path).map_err(|source| Error::CaFile { path: path.clone(), source })?;
            builder = builder.tls_built_in_root_certs(false);
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let client = builder.build().map_err(|error| Error::Client(chain(&error)))?;
        let authorization = if options.upstream_token_ref.is_empty() {
            None
        } else {
            let token = fleetpatch_runtime::secrets::resolve(&options.upstream_token_ref)?;
            let mut value = HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                .map_err(|_| Error::BadToken { reference: options.upstream_token_ref.clone() })?;
            value.set_sensitive(true);
            Some(value)
        };
        Ok(Self { client, base: options.upstream_url.trim_end_matches('/').to_owned(), authorization })
    }

    /// The upstream's name in messages: its URL.
    pub fn name(&self) -> &str {
        &self.base
    }

    /// Downloads `sha256` into `temp` (created; removed again unless the
    /// download is whole and matches) and returns its size. `revalidate`
    /// sends `Cache-Control: no-cache`, so a parent relay hashes its own
    /// copy again first. Counts the attempt.
    pub async fn download(
        &self,
        sha256: &str,
        temp: &Path,
        revalidate: bool,
        counters: &Counters,
    ) -> Result<u64, FetchFailure> {
        let result = self.try_download(sha256, temp, revalidate, counters).await;
        counters.fetch(result.as_ref().map_or_else(FetchFailure::result, |_| FetchResult::Ok));
        if result.is_err() {
            let _ = tokio::fs::remove_file(temp).await;
        }
        result
    }

    async fn try_download(
        &self,
        sha256: &str,
        temp: &Path,
        revalidate: bool,
        counters: &Counters,
    ) -> Result<u64, FetchFailure> {
        let upstream = || self.base.clone();
        let mut request = self.client.get(format!("{}/v1/content/{sha256}", self.base));
        if let Some(authorization) = &self.authorization {
            request = request.header(header::AUTHORIZATION, authorization.clone());
        }
        if revalidate {
            request = request.header(header::CACHE_CONTROL, "no-cache");
        }
        let mut response = request
            .send()
            .await
            .map_err(|error| FetchFailure::Unreachable { upstream: upstream(), reason: chain(&error) })?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => {
                return Err(FetchFailure::NotFound { upstream: upstream(), sha256: sha256.into() })
            }
            status => {
                let hint = match status {
                    StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                        "; relay.upstream_token_ref must name an API key of the scheduler with at least the viewer role"
                    }
                    _ => "",
                };
                return Err(FetchFailure::Refused {
                    upstream: upstream(),
                    sha256: sha256.into(),
                    status: status.as_u16(),
                    hint,
                });
            }
        }
        let cache_error = |error: std::io::Error| FetchFailure::Cache {
            dir: temp.parent().unwrap_or(temp).display().to_string(),
            reason: error.to_string(),
        };
        let file = tokio::fs::File::create(temp).await.map_err(cache_error)?;
        let mut file = tokio::io::BufWriter::with_capacity(256 * 1024, file);
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        loop {
            let chunk = response.chunk().await.map_err(|error| FetchFailure::Interrupted {
                upstream: upstream(),
                sha256: sha256.into(),
                bytes,
                reason: chain(&error),
            })?;
            let Some(chunk) = chunk else { break };
            hasher.update(&chunk);
            bytes += chunk.len() as u64;
            counters.upstream_bytes(chunk.len() as u64);
            file.write_all(&chunk).await.map_err(cache_error)?;
        }
        file.flush().await.map_err(cache_error)?;
        // Whole on disk before it is renamed into place: the cache trusts
        // its files by name after a restart.
        file.get_ref().sync_all().await.map_err(cache_error)?;
        let actual = hex::encode(hasher.finalize());
        if actual != sha256 {
            return Err(FetchFailure::Mismatch { upstream: upstream(), expected: sha256.into(), actual, bytes });
        }
        Ok(bytes)
    }
}
