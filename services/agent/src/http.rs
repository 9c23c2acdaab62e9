//! A minimal blocking HTTP/1.1 client: one request per connection.
//!
//! The agent talks to the collector (one `POST` per report batch) and, when
//! the plan says so, to relays it downloads installers from (one `GET` per
//! try, the body streamed to a file: [`get_to`]). So this is a few hundred
//! lines over [`std::net::TcpStream`] instead of an HTTP crate: every
//! request has a connect timeout and read/write timeouts, sends
//! `Connection: close`, and reads a bounded response (`Content-Length`,
//! chunked, or — for the collector only — until close). `http://` by
//! default; `https://` when built with the `tls` feature (rustls with the
//! ring provider), trusting only the CA certificate(s) the plan carries
//! (`collector_ca_pem`, `relay_ca_pem`), never the system's or a bundled
//! root store.
//!
//! This module never logs; it must not see or print anything but the bytes
//! it is handed (the caller's headers carry a request signature, never the
//! token).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

mod get;
pub use get::{get_to, GetError, GetOutcome, GetRequest, Sink};

/// Largest response body read from the collector; a `ReportAck` is tiny.
const MAX_RESPONSE_BODY_BYTES: usize = 64 * 1024;
/// Largest status line or header line accepted.
const MAX_HEADER_LINE_BYTES: usize = 8 * 1024;
/// Most header lines accepted in a response.
const MAX_HEADER_LINES: usize = 100;
/// The collector's port, when its URL names none.
pub const COLLECTOR_PORT: u16 = 1072;

/// An `http[s]://` URL split into what a request needs: the collector's
/// base URL ([`CollectorUrl`]) or an installer's download source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// `https://`: the connection is TLS (see [`Connector`]).
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path without a trailing slash (often empty): the collector's base
    /// path, or a download source's whole path.
    pub base_path: String,
}

/// The collector's base URL; its port defaults to [`COLLECTOR_PORT`].
pub type CollectorUrl = HttpUrl;
/// Why a collector URL is refused.
pub type CollectorUrlError = UrlError;

impl HttpUrl {
    /// Parse the collector's `http[s]://host[:port][/base]`; the port
    /// defaults to 1072, the collector's port, not 80 or 443.
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        Self::parse_with_default_ports(url, COLLECTOR_PORT, COLLECTOR_PORT)
    }

    /// Parse a download source `http[s]://host[:port]/path` (a relay's
    /// `http://relay:1073/v1/content/{sha256}`); the port defaults to 80
    /// or 443.
    pub fn parse_source(url: &str) -> Result<Self, UrlError> {
        Self::parse_with_default_ports(url, 80, 443)
    }

    fn parse_with_default_ports(url: &str, http_port: u16, https_port: u16) -> Result<Self, UrlError> {
        let (tls, rest) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
            (Some(rest), _) => (false, rest),
            (_, Some(rest)) => (true, rest),
            _ => return Err(UrlError::Scheme { url: url.to_owned() }),
        };
        let (authority, path) = match rest.find('/') {
            Some(slash) => (&rest[..slash], &rest[slash..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(UrlError::UserInfo { url: url.to_owned() });
        }
        if path.contains(['?', '#']) || path.chars().any(|c| c.is_control() || c == ' ') {
            return Err(UrlError::Path { url: url.to_owned() });
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            // [v6 address]:port
            let end = bracketed.find(']').ok_or_else(|| UrlError::UnclosedBracket { url: url.to_owned() })?;
            let host = &bracketed[..end];
            let port = match &bracketed[end + 1..] {
                "" => None,
                tail => Some(tail.strip_prefix(':').ok_or_else(|| UrlError::AfterBracket { url: url.to_owned() })?),
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() || host.chars().any(|c| c.is_control() || c == ' ') {
            return Err(UrlError::Host { url: url.to_owned() });
        }
        let port = match port {
            None if tls => https_port,
            None => http_port,
            Some(port) => port
                .parse::<u16>()
                .ok()
                .filter(|port| *port != 0)
                .ok_or_else(|| UrlError::Port { url: url.to_owned(), port: port.to_owned() })?,
        };
        Ok(Self { tls, host: host.to_owned(), port, base_path: path.trim_end_matches('/').to_owned() })
    }

    /// Value of the `Host` header.
    fn host_header(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Why a URL is refused; each message quotes the URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("{url:?} must start with http:// or https://")]
    Scheme { url: String },
    #[error("{url:?}: credentials in the URL are not supported")]
    UserInfo { url: String },
    #[error("{url:?}: the base path must be a plain path")]
    Path { url: String },
    #[error("{url:?}: unclosed '[' in host")]
    UnclosedBracket { url: String },
    /// Something other than `:port` after `[address]`.
    #[error("{url:?}: bad port")]
    AfterBracket { url: String },
    #[error("{url:?} has no valid host")]
    Host { url: String },
    #[error("{url:?}: port {port:?} is not a number from 1 to 65535")]
    Port { url: String, port: String },
}

/// Whom a connection is for: names the plan's CA field in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// The collector (`collector_ca_pem`).
    Collector,
    /// A relay the plan downloads installers from (`relay_ca_pem`).
    Relay,
}

impl Peer {
    /// The plan's field holding this peer's CA.
    pub fn ca_field(self) -> &'static str {
        match self {
            Self::Collector => "collector_ca_pem",
            Self::Relay => "relay_ca_pem",
        }
    }

    #[cfg(feature = "tls")]
    fn worker_setting(self) -> &'static str {
        match self {
            Self::Collector => "worker.collector_ca_file",
            Self::Relay => "worker.relay_ca_file",
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Collector => "collector",
            Self::Relay => "relay",
        })
    }
}

/// Why no connector can be made for a URL.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[cfg(not(feature = "tls"))]
    #[error(
        "an https:// {peer} needs an agent built with TLS (cargo build -p fleetpatch-agent --features tls); \
         this one speaks http:// only"
    )]
    NoTlsSupport { peer: Peer },
    #[cfg(feature = "tls")]
    #[error("an https:// {peer} needs {} in the plan (the worker's {})", peer.ca_field(), peer.worker_setting())]
    NoCa { peer: Peer },
    #[cfg(feature = "tls")]
    #[error("{} is not PEM: {source}", peer.ca_field())]
    NotPem {
        peer: Peer,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[cfg(feature = "tls")]
    #[error("{} holds an unusable certificate: {source}", peer.ca_field())]
    UnusableCertificate {
        peer: Peer,
        #[source]
        source: rustls::Error,
    },
    #[cfg(feature = "tls")]
    #[error("{} holds no certificate", peer.ca_field())]
    NoCertificate { peer: Peer },
    #[cfg(feature = "tls")]
    #[error("tls: {0}")]
    Tls(#[source] rustls::Error),
}

/// How connections to a peer are made: plain TCP, or TLS trusting only the
/// plan's CA.
#[derive(Clone)]
pub struct Connector {
    #[cfg(feature = "tls")]
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_tls() { "Connector(tls)" } else { "Connector(plain)" })
    }
}

impl Connector {
    /// The connector the collector's `url` needs; `ca_pem` is the plan's
    /// `collector_ca_pem`.
    pub fn new(url: &HttpUrl, ca_pem: Option<&str>) -> Result<Self, ConnectorError> {
        Self::for_peer(url, ca_pem, Peer::Collector)
    }

    /// The connector `url` needs; `ca_pem` is the plan's CA for `peer`
    /// (`relay_ca_pem` for a download source).
    pub fn for_peer(url: &HttpUrl, ca_pem: Option<&str>, peer: Peer) -> Result<Self, ConnectorError> {
        if !url.tls {
            return Ok(Self {
                #[cfg(feature = "tls")]
                tls: None,
            });
        }
        #[cfg(not(feature = "tls"))]
        {
            let _ = ca_pem;
            Err(ConnectorError::NoTlsSupport { peer })
        }
        #[cfg(feature = "tls")]
        {
            Ok(Self { tls: Some(std::sync::Arc::new(tls_config(ca_pem, peer)?)) })
        }
    }

    fn is_tls(&self) -> bool {
        #[cfg(feature = "tls")]
        {
            self.tls.is_some()
        }
        #[cfg(not(feature = "tls"))]
        {
            false
        }
    }
}

/// A rustls client configuration trusting only the CA(s) in `ca_pem`.
#[cfg(feature = "tls")]
fn tls_config(ca_pem: Option<&str>, peer: Peer) -> Result<rustls::ClientConfig, ConnectorError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let ca_pem = ca_pem.ok_or(ConnectorError::NoCa { peer })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|source| ConnectorError::NotPem { peer, source })?;
        roots.add(cert).map_err(|source| ConnectorError::UnusableCertificate { peer, source })?;
    }
    if roots.is_empty() {
        return Err(ConnectorError::NoCertificate { peer });
    }
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(ConnectorError::Tls)
        .map(|builder| builder.with_root_certificates(roots).with_no_client_auth())
}

/// How long each step of a request may take.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub io: Duration,
}

/// A response: the status and a bounded body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Why a request got no response; always worth a retry.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot resolve {host}: {source}")]
    Resolve { host: String, source: std::io::Error },
    #[error("{host} resolved to no address")]
    NoAddress { host: String },
    #[error("cannot connect to {address}: {source}")]
    Connect { address: SocketAddr, source: std::io::Error },
    #[error("request failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed response: {0}")]
    Malformed(String),
}

/// `POST` `body` to `path` (appended to the base path) and read the answer.
/// `headers` are sent as given; they must not contain line breaks.
pub fn post(
    url: &CollectorUrl,
    connector: &Connector,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeouts: Timeouts,
) -> Result<Response, HttpError> {
    let stream = connect(url, timeouts)?;
    stream.set_read_timeout(Some(timeouts.io))?;
    stream.set_write_timeout(Some(timeouts.io))?;
    let _ = stream.set_nodelay(true);
    let request = request_bytes(url, path, headers, body);
    exchange(url, connector, stream, &request, |reader| read_response(reader))
}

/// Send `request` over `stream` (through TLS when `connector` says so) and
/// hand the answer to `read`.
fn exchange<S: Read + Write, T, E: From<HttpError> + From<std::io::Error>>(
    url: &HttpUrl,
    connector: &Connector,
    stream: S,
    request: &[u8],
    read: impl FnOnce(&mut dyn BufRead) -> Result<T, E>,
) -> Result<T, E> {
    #[cfg(feature = "tls")]
    if let Some(config) = &connector.tls {
        let name = rustls::pki_types::ServerName::try_from(url.host.clone())
            .map_err(|e| HttpError::Malformed(format!("{:?} is not a TLS server name: {e}", url.host)))?;
        let connection = rustls::ClientConnection::new(config.clone(), name)
            .map_err(|e| HttpError::Malformed(format!("tls: {e}")))?;
        let mut stream = rustls::StreamOwned::new(connection, stream);
        stream.write_all(request)?;
        stream.flush()?;
        return read(&mut BufReader::new(stream));
    }
    #[cfg(not(feature = "tls"))]
    let _ = (url, connector);
    let mut stream = stream;
    stream.write_all(request)?;
    stream.flush()?;
    read(&mut BufReader::new(stream))
}

fn request_bytes(url: &CollectorUrl, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut head = format!(
        "POST {}{} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\n\
         User-Agent: fleetpatch-agent/{}\r\n",
        url.base_path,
        path,
        url.host_header(),
        body.len(),
        env!("CARGO_PKG_VERSION"),
    );
    for (name, value) in headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    request
}

fn connect(url: &HttpUrl, timeouts: Timeouts) -> Result<TcpStream, HttpError> {
    let addresses: Vec<SocketAddr> = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .map_err(|source| HttpError::Resolve { host: url.host.clone(), source })?
        .collect();
    let mut last_error = None;
    for address in addresses {
        match TcpStream::connect_timeout(&address, timeouts.connect) {
            Ok(stream) => return Ok(stream),
            Err(source) => last_error = Some(HttpError::Connect { address, source }),
        }
    }
    Err(last_error.unwrap_or_else(|| HttpError::NoAddress { host: url.host.clone() }))
}

fn read_line(reader: &mut (impl BufRead + ?Sized)) -> Result<String, HttpError> {
    let mut line = Vec::new();
    let read = reader.take(MAX_HEADER_LINE_BYTES as u64 + 1).read_until(b'\n', &mut line)?;
    if read == 0 {
        return Err(HttpError::Malformed("connection closed before the response was complete".into()));
    }
    if line.len() > MAX_HEADER_LINE_BYTES {
        return Err(HttpError::Malformed("header line too long".into()));
    }
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| HttpError::Malformed("header is not UTF-8".into()))
}

/// The status line and the headers this client uses.
#[derive(Debug)]
struct Head {
    status: u16,
    content_length: Option<u64>,
    chunked: bool,
    content_range: Option<String>,
}

/// Read the status line and the headers, up to the blank line.
fn read_head(reader: &mut (impl BufRead + ?Sized)) -> Result<Head, HttpError> {
    let status_line = read_line(reader)?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::Malformed(format!("unexpected status line {status_line:?}")));
    }
    let status = parts
        .next()
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| HttpError::Malformed(format!("unexpected status line {status_line:?}")))?;
    let mut head = Head { status, content_length: None, chunked: false, content_range: None };
    for _ in 0..=MAX_HEADER_LINES {
        let line = read_line(reader)?;
        if line.is_empty() {
            return Ok(head);
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(HttpError::Malformed(format!("bad header line {line:?}")));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            head.content_length =
                Some(value.parse::<u64>().map_err(|_| HttpError::Malformed(format!("bad Content-Length {value:?}")))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("content-range") {
            head.content_range = Some(value.to_owned());
        }
    }
    Err(HttpError::Malformed("too many header lines".into()))
}

/// Parse a response; exposed to the unit tests through any `BufRead`.
fn read_response(mut reader: impl BufRead) -> Result<Response, HttpError> {
    let head = read_head(&mut reader)?;
    let body = if head.chunked {
        read_chunked(&mut reader)?
    } else if let Some(length) = head.content_length {
        if length > MAX_RESPONSE_BODY_BYTES as u64 {
            return Err(HttpError::Malformed(format!("response body of {length} bytes is too large")));
        }
        let mut body = vec![0; length as usize];
        reader.read_exact(&mut body)?;
        body
    } else {
        let mut body = Vec::new();
        reader.take(MAX_RESPONSE_BODY_BYTES as u64 + 1).read_to_end(&mut body)?;
        if body.len() > MAX_RESPONSE_BODY_BYTES {
            return Err(HttpError::Malformed("response body is too large".into()));
        }
        body
    };
    Ok(Response { status: head.status, body })
}

/// The size of the next chunk (0: the last one, its trailers skipped).
fn read_chunk_size(reader: &mut (impl BufRead + ?Sized)) -> Result<u64, HttpError> {
    let size_line = read_line(reader)?;
    let size_text = size_line.split(';').next().unwrap_or_default().trim();
    let size = u64::from_str_radix(size_text, 16)
        .map_err(|_| HttpError::Malformed(format!("bad chunk size {size_text:?}")))?;
    if size == 0 {
        // Skip trailers up to the blank line.
        while !read_line(reader)?.is_empty() {}
    }
    Ok(size)
}

/// The CRLF after a chunk's data.
fn read_chunk_end(reader: &mut (impl BufRead + ?Sized)) -> Result<(), HttpError> {
    if !read_line(reader)?.is_empty() {
        return Err(HttpError::Malformed("chunk not followed by CRLF".into()));
    }
    Ok(())
}

fn read_chunked(reader: &mut impl BufRead) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    loop {
        let size = read_chunk_size(reader)?;
        if size == 0 {
            return Ok(body);
        }
        if body.len() as u64 + size > MAX_RESPONSE_BODY_BYTES as u64 {
            return Err(HttpError::Malformed("response body is too large".into()));
        }
        let start = body.len();
        body.resize(start + size as usize, 0);
        reader.read_exact(&mut body[start..])?;
        read_chunk_end(reader)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collector_urls_parse() {
        let url = CollectorUrl::parse("http://collector:8080/base/").unwrap();
        assert_eq!(url, CollectorUrl { tls: false, host: "collector".into(), port: 8080, base_path: "/base".into() });
        let url = CollectorUrl::parse("http://10.0.0.5").unwrap();
        assert_eq!((url.port, url.base_path.as_str()), (1072, ""));
        let url = CollectorUrl::parse("http://[::1]:1072").unwrap();
        assert_eq!(url.host, "::1");
        assert_eq!(url.host_header(), "[::1]:1072");
        for bad in ["ftp://c", "http://", "http://c:0", "http://c:99999", "http://u@c", "http://c/a?b"] {
            assert!(CollectorUrl::parse(bad).is_err(), "{bad}");
        }
        let error = CollectorUrl::parse("http://c:99999").unwrap_err();
        assert_eq!(error, CollectorUrlError::Port { url: "http://c:99999".into(), port: "99999".into() });
        assert_eq!(error.to_string(), "\"http://c:99999\": port \"99999\" is not a number from 1 to 65535");
        assert_eq!(
            CollectorUrl::parse("ftp://c").unwrap_err().to_string(),
            "\"ftp://c\" must start with http:// or https://"
        );
        let url = CollectorUrl::parse("https://collector.example").unwrap();
        assert_eq!((url.tls, url.port), (true, 1072));
    }

    #[test]
    fn https_needs_the_tls_build_and_the_plans_ca() {
        let plain = CollectorUrl::parse("http://c").unwrap();
        assert!(!Connector::new(&plain, None).unwrap().is_tls());
        let https = CollectorUrl::parse("https://c").unwrap();
        let error = Connector::new(&https, None).unwrap_err().to_string();
        if cfg!(feature = "tls") {
            assert!(error.contains("collector_ca_pem"), "{error}");
            let error = Connector::new(&https, Some("not a certificate")).unwrap_err().to_string();
            assert!(error.contains("collector_ca_pem holds no certificate"), "{error}");
        } else {
            assert!(error.contains("--features tls"), "{error}");
        }
    }

    #[test]
    fn responses_with_length_chunked_or_close_are_read() {
        let response = read_response(&b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX: y\r\n\r\nabcTRAILING"[..]).unwrap();
        assert_eq!((response.status, response.body.as_slice()), (200, &b"abc"[..]));
        let response = read_response(
            &b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"[..],
        )
        .unwrap();
        assert_eq!((response.status, response.body.as_slice()), (503, &b"abcde"[..]));
        let response = read_response(&b"HTTP/1.0 401 Unauthorized\r\n\r\nnope"[..]).unwrap();
        assert_eq!((response.status, response.body.as_slice()), (401, &b"nope"[..]));
    }

    #[test]
    fn malformed_responses_are_errors() {
        for bad in [
            &b""[..],
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 abc\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        ] {
            assert!(read_response(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
    #[test]
    fn source_urls_default_to_80_and_443() {
        let url = HttpUrl::parse_source("http://relay-paris:1073/v1/content/abc").unwrap();
        assert_eq!(
            url,
            HttpUrl { tls: false, host: "relay-paris".into(), port: 1073, base_path: "/v1/content/abc".into() }
        );
        assert_eq!(HttpUrl::parse_source("http://relay/x").unwrap().port, 80);
        assert_eq!(HttpUrl::parse_source("https://relay/x").unwrap().port, 443);
        assert_eq!(HttpUrl::parse("https://relay/x").unwrap().port, COLLECTOR_PORT, "the collector's default stays");
        assert!(HttpUrl::parse_source("http://relay/x?y").is_err());
    }

    #[test]
    fn an_https_relay_needs_the_relay_ca() {
        let https = HttpUrl::parse_source("https://relay/x").unwrap();
        let error = Connector::for_peer(&https, None, Peer::Relay).unwrap_err().to_string();
        if cfg!(feature = "tls") {
            assert_eq!(error, "an https:// relay needs relay_ca_pem in the plan (the worker's worker.relay_ca_file)");
        } else {
            assert!(error.starts_with("an https:// relay needs an agent built with TLS"), "{error}");
        }
    }
}
