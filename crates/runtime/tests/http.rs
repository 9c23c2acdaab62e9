//! The hardened HTTP server on real sockets: slow and idle clients are cut
//! off, connections above the cap wait, in-flight requests survive a drain,
//! the peer address reaches the handlers, and TLS serves and reloads.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::routing::get;
use axum::Router;
use fleetpatch_runtime::http::{serve, ServerOptions, TlsKeyError, TlsOptions};
use fleetpatch_runtime::ConfigError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

fn app() -> Router {
    Router::new()
        .route("/peer", get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(500)).await;
                "done"
            }),
        )
}

struct Running {
    address: SocketAddr,
    stop: CancellationToken,
    join: tokio::task::JoinHandle<fleetpatch_runtime::Result<()>>,
}

async fn start(options: ServerOptions) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let join = tokio::spawn(serve(listener, app(), options, stop.clone().cancelled_owned()));
    Running { address, stop, join }
}

/// Sends one request and reads the whole answer (the server closes after it).
async fn request(stream: &mut (impl AsyncRead + AsyncWrite + Unpin), path: &str) -> String {
    let head = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// How long until the server closes `stream` (reads until EOF or error).
async fn time_until_closed(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buffer = [0u8; 1024];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    closed.ok().map(|()| started.elapsed())
}

#[tokio::test]
async fn a_slowloris_client_is_cut_off_at_the_header_timeout() {
    let server =
        start(ServerOptions { header_read_timeout_seconds: 1, idle_timeout_seconds: 30, ..ServerOptions::default() })
            .await;
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    stream.write_all(b"GET /peer HTTP/1.1\r\n").await.unwrap();
    // One header byte every 100 ms: traffic keeps flowing, the head never ends.
    let (mut reader, mut writer) = stream.into_split();
    let trickle = tokio::spawn(async move {
        for byte in b"x-slow: ".iter().cycle().take(200) {
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let started = Instant::now();
    let mut buffer = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match reader.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the slow client still holds its connection after 5 s");
    assert!(started.elapsed() < Duration::from_millis(2_500), "closed after {:?}", started.elapsed());
    trickle.abort();
    server.stop.cancel();
    server.join.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let server =
        start(ServerOptions { header_read_timeout_seconds: 30, idle_timeout_seconds: 1, ..ServerOptions::default() })
            .await;
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    // One request with keep-alive, then silence.
    stream.write_all(b"GET /peer HTTP/1.1\r\nhost: test\r\n\r\n").await.unwrap();
    let mut buffer = [0u8; 1024];
    let read = stream.read(&mut buffer).await.unwrap();
    assert!(String::from_utf8_lossy(&buffer[..read]).starts_with("HTTP/1.1 200"));
    let closed = time_until_closed(&mut stream, Duration::from_secs(5)).await;
    let closed = closed.expect("the idle connection is closed within 5 s");
    assert!(closed < Duration::from_millis(2_500), "closed after {closed:?}");
    server.stop.cancel();
    server.join.await.unwrap().unwrap();
}

#[tokio::test]
async fn connections_above_the_cap_wait_for_a_free_one() {
    let server = start(ServerOptions { max_connections: 2, ..ServerOptions::default() }).await;
    let first = TcpStream::connect(server.address).await.unwrap();
    let second = TcpStream::connect(server.address).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(server.address).await.unwrap();
    let answer = tokio::spawn(async move { request(&mut third, "/peer").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!answer.is_finished(), "a third connection is served while two are open");
    drop(first);
    let answer = tokio::time::timeout(Duration::from_secs(5), answer).await.expect("served once one closed").unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(second);
    server.stop.cancel();
    server.join.await.unwrap().unwrap();
}

#[tokio::test]
async fn handlers_see_the_peer_address_and_a_drain_lets_requests_finish() {
    let server = start(ServerOptions::default()).await;
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    let local = stream.local_addr().unwrap();
    let answer = request(&mut stream, "/peer").await;
    assert!(answer.ends_with(&local.to_string()), "{answer}");

    let mut stream = TcpStream::connect(server.address).await.unwrap();
    let slow = tokio::spawn(async move { request(&mut stream, "/slow").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.stop.cancel();
    let answer = slow.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("done"), "{answer}");
    tokio::time::timeout(Duration::from_secs(5), server.join).await.expect("drained").unwrap().unwrap();
    assert!(TcpStream::connect(server.address).await.is_err(), "the listener is closed after the drain");
}

/// A CA and a certificate for `localhost` it signed, written as PEM files.
fn write_certificate(ca: &(rcgen::Certificate, rcgen::KeyPair), dir: &Path) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &ca.0, &ca.1).unwrap();
    // Write to the side and rename, as a Secret volume update does.
    std::fs::write(dir.join("next.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("next.key"), key.serialize_pem()).unwrap();
    std::fs::rename(dir.join("next.key"), dir.join("tls.key")).unwrap();
    std::fs::rename(dir.join("next.crt"), dir.join("tls.crt")).unwrap();
    cert.der().to_vec()
}

fn test_ca() -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, "fleetpatch test CA");
    (params.self_signed(&key).unwrap(), key)
}

/// Connects over TLS trusting only `ca`; returns the server's certificate and the answer.
async fn tls_request(address: SocketAddr, ca: &rcgen::Certificate, path: &str) -> (Vec<u8>, String) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(address).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = connector.connect(name, tcp).await.expect("the handshake succeeds against the test CA");
    let presented = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    (presented, request(&mut stream, path).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_with_the_configured_certificate_and_reloads_a_replaced_one() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca();
    let first = write_certificate(&ca, dir.path());
    let tls = TlsOptions {
        cert_file: dir.path().join("tls.crt"),
        key_file: dir.path().join("tls.key"),
        reload_check_seconds: 1,
    };
    let options = ServerOptions { tls: Some(tls), ..ServerOptions::default() };
    options.validate("collector.http").expect("a valid pair");
    let server = start(options).await;

    let (presented, answer) = tls_request(server.address, &ca.0, "/peer").await;
    assert_eq!(presented, first);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Plain HTTP on the TLS port gets no answer.
    let mut plain = TcpStream::connect(server.address).await.unwrap();
    assert!(!request(&mut plain, "/peer").await.contains("200"));

    let second = write_certificate(&ca, dir.path());
    assert_ne!(first, second);
    // Checked every second; generous for a machine busy with other tests.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (presented, answer) = tls_request(server.address, &ca.0, "/peer").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        if presented == second {
            break;
        }
        assert!(Instant::now() < deadline, "the replaced certificate was not picked up within 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.stop.cancel();
    server.join.await.unwrap().unwrap();
}

#[test]
fn bad_tls_files_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca();
    write_certificate(&ca, dir.path());
    let options = |cert: &str, key: &str| ServerOptions {
        tls: Some(TlsOptions {
            cert_file: dir.path().join(cert),
            key_file: dir.path().join(key),
            reload_check_seconds: 10,
        }),
        ..ServerOptions::default()
    };
    let error = options("missing.crt", "tls.key").validate("collector.http").unwrap_err();
    assert_eq!(error.field(), "collector.http.tls.cert_file");
    let error = error.to_string();
    assert!(error.starts_with("collector.http.tls.cert_file:"), "{error}");
    let error = options("tls.crt", "missing.key").validate("collector.http").unwrap_err().to_string();
    assert!(error.starts_with("collector.http.tls.key_file:"), "{error}");
    // A key that does not belong to the certificate.
    std::fs::write(dir.path().join("other.key"), rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let error = options("tls.crt", "other.key").validate("collector.http").unwrap_err();
    assert!(
        matches!(&error, ConfigError::Tls { source, .. } if matches!(**source, TlsKeyError::KeyMismatch { .. })),
        "{error:?}"
    );
    let error = error.to_string();
    assert!(error.starts_with("collector.http.tls.key_file:") && error.contains("does not belong"), "{error}");
    let error =
        ServerOptions { max_connections: 0, ..ServerOptions::default() }.validate("scheduler.http").unwrap_err();
    assert!(matches!(&error, ConfigError::TooSmall { min: 1, .. }), "{error:?}");
    assert_eq!(error.to_string(), "scheduler.http.max_connections must be at least 1");
}
