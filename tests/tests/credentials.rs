//! Named, scoped credentials end to end, and the API's input limits.
//!
//! * A rollout that names a credential whose scope does not cover a target
//!   fails that target with the reason, and nothing connects to the host:
//!   a fake SSH server and a fake SMB listener on loopback (plain TCP
//!   listeners that count what they accept) see no connection at all.
//! * `credential_ref` in a rollout, or an unknown credential name, is
//!   refused with 422 naming the field.
//! * The limits of `POST /v1/rollouts` and `PUT /v1/content`, NUL in a
//!   string, and the paging of a target's events; uploaded content read
//!   back by a viewer (`GET /v1/content`, whole or by range).

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleetpatch_proto::state::{RolloutState, TargetState};
use fleetpatch_runtime::credentials::CredentialDefinition;
use fleetpatch_tests::{credential_in_file, sim_rollout, Sandbox, SandboxOptions};
use fleetpatch_transport_smb::SmbTransportOptions;
use fleetpatch_transport_ssh::SshOptions;

/// A TCP listener on loopback that counts the connections it accepts (and
/// closes them at once).
struct CountingListener {
    port: u16,
    accepted: Arc<AtomicUsize>,
}

impl CountingListener {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                counter.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        Self { port, accepted }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn patch(sha256: &str, size: u64) -> serde_json::Value {
    serde_json::json!({"name": "p", "file": "p.sh", "sha256": sha256, "size": size, "installer": "script"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_out_of_its_scope_fails_the_target_and_nothing_connects() {
    let ssh_server = CountingListener::start();
    let smb_server = CountingListener::start();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("corp.secret");
    std::fs::write(&secret, "deploy:MARKER-corp-password").unwrap();
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(&known_hosts, "").unwrap();
    let mut options = SandboxOptions {
        workers: 1,
        ssh: Some(SshOptions { known_hosts_file: Some(known_hosts), ..SshOptions::default() }),
        smb: Some(SmbTransportOptions { port: smb_server.port, timeout_seconds: 5, ..SmbTransportOptions::default() }),
        // No target gets as far as staging: no agent binary is needed.
        agent_binary: Some(dir.path().join("no-agent")),
        ..SandboxOptions::default()
    };
    // In scope for *.corp.example and 10.1.0.0/16 only; the targets are 127.0.0.1.
    options
        .credentials
        .insert("corp-linux".into(), credential_in_file(&secret, &["ssh"], &["*.corp.example", "10.1.0.0/16"]));
    options.credentials.insert("corp-windows".into(), credential_in_file(&secret, &["smb"], &["10.1.0.0/16"]));
    // The right host but the wrong transport, and a secret that does not
    // exist: the scope is refused before the secret would be read.
    options.credentials.insert(
        "loopback-smb".into(),
        CredentialDefinition {
            secret_ref: format!("file:{}", dir.path().join("missing.secret").display()),
            ..credential_in_file(&secret, &["smb"], &["127.0.0.0/8"])
        },
    );
    // A host name is never resolved to match a CIDR.
    options.credentials.insert("loopback-net".into(), credential_in_file(&secret, &["ssh"], &["127.0.0.0/8"]));
    let sandbox = Sandbox::start(options).await;
    let (sha256, size) = sandbox.upload_content(b"echo hi\n".to_vec()).await;
    let id = sandbox
        .create_rollout(serde_json::json!({
            "name": "out-of-scope",
            "concurrency": 4,
            "max_tries": 1,
            "patches": [patch(&sha256, size)],
            "targets": [
                {"host": "127.0.0.1", "port": ssh_server.port, "transport": "ssh", "credential": "corp-linux"},
                {"host": "127.0.0.1", "transport": "smb", "credential": "corp-windows"},
                {"host": "127.0.0.1", "port": ssh_server.port, "transport": "ssh", "credential": "loopback-smb"},
                {"host": "localhost", "port": ssh_server.port, "transport": "ssh", "credential": "loopback-net"},
            ],
        }))
        .await;
    sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(60)).await;
    let targets = sandbox.all_targets(id).await;
    let expected = [
        "credential \"corp-linux\" may not be used for host \"127.0.0.1\": its scope allows the hosts *.corp.example, \
         10.1.0.0/16",
        "credential \"corp-windows\" may not be used for host \"127.0.0.1\": its scope allows the hosts 10.1.0.0/16",
        "credential \"loopback-smb\" may not be used for the ssh transport: its scope allows the transports smb",
        "credential \"loopback-net\" may not be used for host \"localhost\": its scope allows the hosts 127.0.0.0/8",
    ];
    for (target, expected) in targets.iter().zip(expected) {
        assert_eq!(target.state, TargetState::Failed, "{target:?}");
        let error = target.error.clone().unwrap_or_default();
        assert!(error.starts_with(expected), "{error}");
        assert!(!error.contains("MARKER"), "{error}");
        assert_eq!((target.attempt, target.tries), (1, 0), "a refused credential is not retried: {target:?}");
    }
    // The API shows the reason too, never the secret.
    let listed = sandbox.http.get(format!("{}/v1/rollouts/{id}/targets", sandbox.api)).send().await.unwrap();
    let text = listed.text().await.unwrap();
    assert!(text.contains("may not be used for host") && !text.contains("MARKER"), "{text}");
    assert_eq!(ssh_server.accepted(), 0, "the fake SSH server was connected to");
    assert_eq!(smb_server.accepted(), 0, "the fake SMB listener was connected to");
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_in_scope_reaches_the_host() {
    // The counterpart of the test above: the same listener is reached when
    // the scope covers the target, so "no connection" above is the scope's doing.
    let ssh_server = CountingListener::start();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("loopback.secret");
    std::fs::write(&secret, "deploy:MARKER-loopback-password").unwrap();
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(&known_hosts, "").unwrap();
    let mut options = SandboxOptions {
        workers: 1,
        ssh: Some(SshOptions {
            known_hosts_file: Some(known_hosts),
            connect_timeout_seconds: 2,
            ..SshOptions::default()
        }),
        agent_binary: Some(dir.path().join("no-agent")),
        ..SandboxOptions::default()
    };
    options.credentials.insert("loopback".into(), credential_in_file(&secret, &["ssh"], &["127.0.0.1"]));
    let sandbox = Sandbox::start(options).await;
    let (sha256, size) = sandbox.upload_content(b"echo hi\n".to_vec()).await;
    let id = sandbox
        .create_rollout(serde_json::json!({
            "name": "in-scope",
            "max_tries": 1,
            "patches": [patch(&sha256, size)],
            "targets": [{"host": "127.0.0.1", "port": ssh_server.port, "transport": "ssh", "credential": "loopback"}],
        }))
        .await;
    sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(60)).await;
    let target = sandbox.all_targets(id).await.remove(0);
    assert_eq!(target.state, TargetState::Failed, "the fake server speaks no SSH: {target:?}");
    assert!(!target.error.unwrap_or_default().contains("MARKER"));
    assert!(ssh_server.accepted() >= 1, "the worker never connected");
    sandbox.stop().await;
}

async fn post_rollout(sandbox: &Sandbox, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let response = sandbox.http.post(format!("{}/v1/rollouts", sandbox.api)).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| serde_json::json!({ "raw": text })))
}

fn fields(problem: &serde_json::Value) -> Vec<String> {
    problem["errors"]
        .as_array()
        .map(|errors| errors.iter().filter_map(|e| e["field"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_refuses_secret_references_unknown_credentials_nul_and_oversized_input() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("s");
    std::fs::write(&secret, "u:p").unwrap();
    let mut options = SandboxOptions { workers: 0, ..SandboxOptions::default() };
    options.credentials.insert("fleet".into(), credential_in_file(&secret, &["sim"], &["*"]));
    let sandbox = Sandbox::start(options).await;

    for reference in ["file:/etc/shadow", "file:/proc/self/environ", "env:FLEETPATCH__DATABASE__URL"] {
        let mut body = sim_rollout("ref", 2, 1, 1, 60);
        body["targets"][1]["credential_ref"] = serde_json::json!(reference);
        let (status, problem) = post_rollout(&sandbox, &body).await;
        assert_eq!(status, 422, "{problem}");
        assert_eq!(fields(&problem), ["targets[1].credential_ref"], "{problem}");
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains("ask an administrator to define a named credential"), "{detail}");
        assert!(detail.contains("`credential: <name>`"), "{detail}");
    }
    let mut body = sim_rollout("unknown", 2, 1, 1, 60);
    body["targets"][0]["credential"] = serde_json::json!("windows-admin");
    let (status, problem) = post_rollout(&sandbox, &body).await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(fields(&problem), ["targets[0].credential"], "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("no credential is named \"windows-admin\" (defined: fleet)"));

    // NUL cannot be stored: 422 naming the field, not 503.
    let mut body = sim_rollout("nul", 1, 1, 1, 60);
    body["targets"][0]["labels"] = serde_json::json!({"site": "par\u{0}is"});
    let (status, problem) = post_rollout(&sandbox, &body).await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(fields(&problem), ["targets[0].labels.site"], "{problem}");
    let mut body = sim_rollout("nul\u{0}name", 1, 1, 1, 60);
    body["targets"][0]["credential"] = serde_json::json!("fleet");
    let (status, problem) = post_rollout(&sandbox, &body).await;
    assert_eq!((status, fields(&problem)), (422, vec!["name".to_owned()]), "{problem}");

    // The default limit: 100,000 targets per rollout.
    let body = sim_rollout("big", 100_001, 1, 1, 60);
    let (status, problem) = post_rollout(&sandbox, &body).await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(fields(&problem), ["targets"], "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("scheduler.max_targets_per_rollout"), "{problem}");

    // A named credential is stored by name and shown as such.
    let mut body = sim_rollout("named", 1, 1, 1, 60);
    body["credential"] = serde_json::json!("fleet");
    let id = sandbox.create_rollout(body).await;
    let target = sandbox.all_targets(id).await.remove(0);
    assert_eq!(target.credential.as_deref(), Some("fleet"));
    sandbox.stop().await;
}

/// `PUT /v1/content/{sha256}` by hand, with a Content-Length or chunked
/// (no length: the server must count while it reads); the status and body.
async fn put_content(api: &str, key: &str, bytes: &[u8], chunked: bool) -> (u16, String, String) {
    use sha2::Digest;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sha256 = hex::encode(sha2::Sha256::digest(bytes));
    let address = api.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let mut request = format!(
        "PUT /v1/content/{sha256} HTTP/1.1\r\nhost: {address}\r\nauthorization: Bearer {key}\r\nconnection: close\r\n"
    )
    .into_bytes();
    if chunked {
        request.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
        for chunk in bytes.chunks(300) {
            request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            request.extend_from_slice(chunk);
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"0\r\n\r\n");
    } else {
        request.extend_from_slice(format!("content-length: {}\r\n\r\n", bytes.len()).as_bytes());
        request.extend_from_slice(bytes);
    }
    // The server may answer (and close) before it read everything.
    let _ = stream.write_all(&request).await;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text, sha256)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_uploads_are_bounded_by_the_configured_size() {
    let sandbox =
        Sandbox::start(SandboxOptions { workers: 0, max_content_bytes: 1_000, ..SandboxOptions::default() }).await;
    for chunked in [false, true] {
        let (status, text, sha256) =
            put_content(&sandbox.api, &sandbox.admin_key, &[chunked as u8; 1_000], chunked).await;
        assert_eq!(status, 201, "chunked {chunked}: {text}");
        assert!(fleetpatch_store::content::path_of(&sandbox.content_dir, &sha256).exists());
        let (status, text, sha256) = put_content(&sandbox.api, &sandbox.admin_key, &[9; 1_001], chunked).await;
        assert_eq!(status, 413, "chunked {chunked}: {text}");
        assert!(text.contains("at most 1000 bytes (scheduler.max_content_bytes)"), "{text}");
        assert!(!fleetpatch_store::content::path_of(&sandbox.content_dir, &sha256).exists(), "nothing is stored");
    }
    sandbox.stop().await;
}

/// What was uploaded is read back by a viewer (the role a relay's key has),
/// whole or from an offset, as a resumed download asks for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploaded_content_is_read_back_by_a_viewer_whole_or_from_an_offset() {
    let sandbox = Sandbox::start(SandboxOptions { workers: 0, ..SandboxOptions::default() }).await;
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    let (sha256, size) = sandbox.upload_content(data.clone()).await;
    let viewer = sandbox.api_key("content-reader", fleetpatch_store::Role::Viewer, None).await;
    let http = fleetpatch_tests::client_with(Some(&viewer));
    let url = format!("{}/v1/content/{sha256}", sandbox.api);
    let response = http.get(&url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-length"], size.to_string().as_str());
    assert!(response.bytes().await.unwrap() == data, "the bytes uploaded");
    let response = http.get(&url).header("range", "bytes=60000-").send().await.unwrap();
    assert_eq!(response.status(), 206);
    assert_eq!(response.headers()["content-range"], "bytes 60000-99999/100000");
    assert!(response.bytes().await.unwrap() == data[60_000..]);
    let anonymous = fleetpatch_tests::client_with(None).get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_targets_events_come_in_pages() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await;
    let id = sandbox.create_rollout(sim_rollout("events", 1, 3, 1, 60)).await;
    sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(60)).await;
    let target = sandbox.all_targets(id).await.remove(0);
    let all = sandbox.store.agent_events(target.id).await.unwrap();
    assert!(all.len() >= 4, "{all:?}");
    let get = |query: String| {
        let url = format!("{}/v1/targets/{}{query}", sandbox.api, target.id);
        let http = sandbox.http.clone();
        async move {
            let response = http.get(url).send().await.unwrap();
            (response.status().as_u16(), response.json::<serde_json::Value>().await.unwrap())
        }
    };
    let mut seen = Vec::new();
    let mut query = "?events_limit=2".to_owned();
    loop {
        let (status, page) = get(query).await;
        assert_eq!(status, 200, "{page}");
        let events = page["events"].as_array().unwrap();
        assert!(events.len() <= 2, "{page}");
        seen.extend(events.iter().map(|e| e["seq"].as_u64().unwrap()));
        match page["events_next_after"].as_str() {
            Some(next) => query = format!("?events_limit=2&events_after={next}"),
            None => break,
        }
    }
    assert_eq!(seen, all.iter().map(|e| e.seq).collect::<Vec<_>>());
    let (status, problem) = get("?events_after=nope".into()).await;
    assert_eq!(status, 400, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "events_after");
    // The default page holds everything here, and says there is no more.
    let (_, page) = get(String::new()).await;
    assert_eq!(page["events"].as_array().unwrap().len(), all.len());
    assert!(page["events_next_after"].is_null());
    sandbox.stop().await;
}
