//! The HTTP server every fleetpatch service with an endpoint runs (the
//! collector and the scheduler): an axum [`Router`] served over HTTP/1.1
//! with the limits a server facing a network needs, and optional TLS.
//!
//! * **header read timeout**: a client must send a request's whole head
//!   (and finish the TLS handshake) within `header_read_timeout_seconds`,
//!   or the connection is closed (slowloris);
//! * **idle timeout**: a connection that moved no byte for
//!   `idle_timeout_seconds` is closed once no request is in flight on it;
//! * **connection cap**: at most `max_connections` connections are served;
//!   further ones wait in the listener's backlog until one closes;
//! * **graceful drain**: on shutdown the listener closes, idle connections
//!   close, in-flight requests finish (connections are told to close after
//!   them) within `drain_seconds`, then the rest are cut;
//! * every request carries the peer's address as
//!   [`ConnectInfo<SocketAddr>`](axum::extract::ConnectInfo);
//! * **TLS** (rustls, `ring` provider) when `tls.cert_file` and
//!   `tls.key_file` are set: PEM certificate chain and private key, read
//!   again when either file changes (checked every
//!   `tls.reload_check_seconds`); a replaced pair that does not load is
//!   logged and the previous one kept.
//!
//! [`parse_range`] reads a `Range` header for the servers of content by
//! sha256 (the scheduler's content store, the relay).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::ConfigError;

mod range;
pub use range::{parse_range, ByteRange};

/// Server settings, a section of each service's configuration
/// (`collector.http`, `scheduler.http`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerOptions {
    /// Longest time to receive a request's head (and the TLS handshake).
    pub header_read_timeout_seconds: u64,
    /// A connection without traffic for this long is closed (between requests).
    pub idle_timeout_seconds: u64,
    /// Most connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// On shutdown, how long in-flight requests may take to finish.
    pub drain_seconds: u64,
    /// Serve HTTPS with this certificate and key (PEM files).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsOptions>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            header_read_timeout_seconds: 10,
            idle_timeout_seconds: 60,
            max_connections: 16_384,
            drain_seconds: 30,
            tls: None,
        }
    }
}

/// The server's certificate (`…http.tls`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsOptions {
    /// PEM certificate chain, the server's certificate first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// How often the files are checked for a change (seconds).
    #[serde(default = "default_reload_check_seconds")]
    pub reload_check_seconds: u64,
}

fn default_reload_check_seconds() -> u64 {
    10
}

impl ServerOptions {
    /// Checks the values; `section` (`collector.http`) prefixes the key named.
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        if self.header_read_timeout_seconds == 0 {
            return Err(ConfigError::too_small(format!("{section}.header_read_timeout_seconds"), 1));
        }
        if self.idle_timeout_seconds == 0 {
            return Err(ConfigError::too_small(format!("{section}.idle_timeout_seconds"), 1));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::too_small(format!("{section}.max_connections"), 1));
        }
        if let Some(tls) = &self.tls {
            if tls.reload_check_seconds == 0 {
                return Err(ConfigError::too_small(format!("{section}.tls.reload_check_seconds"), 1));
            }
            load_certified_key(tls)
                .map_err(|source| ConfigError::Tls { section: section.to_owned(), source: Box::new(source) })?;
        }
        Ok(())
    }
}

/// Why a TLS certificate chain and key cannot be served. The message
/// starts with the key of the file at fault (`cert_file: …`).
#[derive(Debug, thiserror::Error)]
pub enum TlsKeyError {
    #[error("cert_file: cannot read a PEM certificate chain from {}: {source}", path.display())]
    ReadCertificates {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("cert_file: {} holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("key_file: cannot read a PEM private key from {}: {source}", path.display())]
    ReadKey {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("key_file: {} is not a usable private key: {source}", path.display())]
    UnusableKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("key_file: {} does not belong to the certificate in {}: {source}", key_path.display(), cert_path.display())]
    KeyMismatch {
        key_path: PathBuf,
        cert_path: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

impl TlsKeyError {
    /// The key (under `…http.tls`) of the file at fault: `cert_file` or `key_file`.
    pub fn field(&self) -> &'static str {
        match self {
            Self::ReadCertificates { .. } | Self::NoCertificate { .. } => "cert_file",
            Self::ReadKey { .. } | Self::UnusableKey { .. } | Self::KeyMismatch { .. } => "key_file",
        }
    }
}

/// Reads the certificate chain and key.
fn load_certified_key(tls: &TlsOptions) -> Result<CertifiedKey, TlsKeyError> {
    let certs = CertificateDer::pem_file_iter(&tls.cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsKeyError::ReadCertificates { path: tls.cert_file.clone(), source })?;
    if certs.is_empty() {
        return Err(TlsKeyError::NoCertificate { path: tls.cert_file.clone() });
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key_file)
        .map_err(|source| TlsKeyError::ReadKey { path: tls.key_file.clone(), source })?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|source| TlsKeyError::UnusableKey { path: tls.key_file.clone(), source })?;
    let certified = CertifiedKey::new(certs, signing_key);
    certified.keys_match().map_err(|source| TlsKeyError::KeyMismatch {
        key_path: tls.key_file.clone(),
        cert_path: tls.cert_file.clone(),
        source,
    })?;
    Ok(certified)
}

/// Hands rustls the current certificate; [`watch_certificate`] replaces it.
#[derive(Debug)]
struct ReloadingCertificate {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ReloadingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone())
    }
}

/// The file's bytes: compared whole, so a replacement is seen whatever its
/// modification time says (a file copied with its old time, a Kubernetes
/// Secret's symlink swap, coarse timestamps). Certificates and keys are a
/// few kilobytes, read once per check.
fn contents(path: &Path) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}

/// Reloads the certificate when either file changes, until `stop`.
async fn watch_certificate(tls: TlsOptions, resolver: Arc<ReloadingCertificate>, stop: CancellationToken) {
    let mut seen = (contents(&tls.cert_file), contents(&tls.key_file));
    let mut tick = tokio::time::interval(Duration::from_secs(tls.reload_check_seconds));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = (contents(&tls.cert_file), contents(&tls.key_file));
        if now == seen {
            continue;
        }
        match load_certified_key(&tls) {
            Ok(certified) => {
                seen = now;
                *resolver.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(certified);
                tracing::info!(cert_file = %tls.cert_file.display(), "tls certificate reloaded");
            }
            // Half-written files: try again at the next check, keep serving the old pair.
            Err(error) => tracing::error!(error = %error, "tls certificate not reloaded; keeping the previous one"),
        }
    }
}

/// The TLS side of a server: a rustls acceptor whose certificate reloads.
fn tls_acceptor(tls: &TlsOptions, stop: CancellationToken) -> crate::Result<tokio_rustls::TlsAcceptor> {
    let certified = load_certified_key(tls).map_err(|error| crate::Error::Config(format!("tls.{error}")))?;
    let resolver = Arc::new(ReloadingCertificate { current: RwLock::new(Arc::new(certified)) });
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|error| crate::Error::Config(format!("tls: {error}")))?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio::spawn(watch_certificate(tls.clone(), resolver, stop));
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves `app` on `listener` until `shutdown` completes, then drains.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    options: ServerOptions,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> crate::Result<()> {
    let stop = CancellationToken::new();
    let _stop_on_return = stop.clone().drop_guard();
    let tls = options.tls.as_ref().map(|tls| tls_acceptor(tls, stop.clone())).transpose()?;
    let limits = Arc::new(Limits {
        header_read_timeout: Duration::from_secs(options.header_read_timeout_seconds),
        idle_timeout: Duration::from_secs(options.idle_timeout_seconds),
    });
    let permits = Arc::new(Semaphore::new(options.max_connections));
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let (stream, remote) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let connection = Connection { app: app.clone(), remote, limits: limits.clone(), stop: stop.clone() };
        let tls = tls.clone();
        connections.spawn(async move {
            connection.serve(stream, tls).await;
            drop(permit);
        });
    }
    drop(listener);
    stop.cancel();
    let drained = tokio::time::timeout(Duration::from_secs(options.drain_seconds), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(open = connections.len(), "connections still open after the drain deadline; closing them");
        connections.shutdown().await;
    }
    Ok(())
}

struct Limits {
    header_read_timeout: Duration,
    idle_timeout: Duration,
}

struct Connection {
    app: Router,
    remote: SocketAddr,
    limits: Arc<Limits>,
    stop: CancellationToken,
}

impl Connection {
    async fn serve(self, stream: TcpStream, tls: Option<tokio_rustls::TlsAcceptor>) {
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        let stream = Tracked { inner: stream, activity: activity.clone() };
        match tls {
            None => self.serve_http(TokioIo::new(stream), activity).await,
            Some(acceptor) => {
                match tokio::time::timeout(self.limits.header_read_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => self.serve_http(TokioIo::new(stream), activity).await,
                    Ok(Err(error)) => tracing::debug!(error = %error, peer = %self.remote, "tls handshake failed"),
                    Err(_) => tracing::debug!(peer = %self.remote, "tls handshake timed out"),
                }
            }
        }
    }

    async fn serve_http<I>(self, io: I, activity: Arc<Activity>)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let Connection { app, remote, limits, stop } = self;
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(remote));
            let mut app = app.clone();
            async move { tower::Service::call(&mut app, request.map(Body::new)).await }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).keep_alive(true);
        let connection = builder.serve_connection(io, service);
        tokio::pin!(connection);
        let check_every = (limits.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut idle_check = tokio::time::interval(check_every);
        let mut closing = false;
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(error = %error, peer = %remote, "connection closed with an error");
                    }
                    return;
                }
                _ = stop.cancelled(), if !closing => {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
                _ = idle_check.tick(), if !closing => {
                    if activity.idle_for() >= limits.idle_timeout {
                        // Closes now if no request is in flight, else after it.
                        connection.as_mut().graceful_shutdown();
                        closing = true;
                    }
                }
            }
        }
    }
}

/// When a connection last moved a byte.
struct Activity {
    started: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self { started: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    fn touch(&self) {
        self.last_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }
}

/// A stream that records its traffic in an [`Activity`].
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(result, Poll::Ready(Ok(written)) if written > 0) {
            self.activity.touch();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(written)) if written > 0) {
            self.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
