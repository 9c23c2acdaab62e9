//! Secrets never reach a log line or an API answer: a whole pipeline run at
//! DEBUG level, with marker secrets in every credential, in the database
//! URL (the test PostgreSQL trusts local connections, so the password is
//! never checked) and in the agents' token key, then every captured log
//! line and every API answer is searched for them.
//!
//! This file holds one test: it sets the process's environment and its
//! global log subscriber.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetpatch_proto::state::{RolloutState, TargetState};
use fleetpatch_runtime::credentials::CredentialDefinition;
use fleetpatch_tests::{credential_in_file, sim_rollout, Sandbox, SandboxOptions, TOKEN_KEY};

/// Log output, kept.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const DATABASE_MARKER: &str = "MARKERdatabasepassword";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_any_log_line_or_api_answer() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();
    // The sandbox's databases are reached with a password in the URL.
    let admin = fleetpatch_tests::admin_database_url();
    let with_password = admin.replacen("postgres://postgres@", &format!("postgres://postgres:{DATABASE_MARKER}@"), 1);
    assert_ne!(with_password, admin, "FLEETPATCH_TEST_DATABASE_URL is expected as postgres://postgres@...: {admin}");
    std::env::set_var("FLEETPATCH_TEST_DATABASE_URL", &with_password);

    let dir = tempfile::tempdir().unwrap();
    let secret = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let mut options = SandboxOptions::default();
    let credentials = [
        ("password", credential_in_file(&secret("password", "deploy:MARKERpassword"), &["sim"], &["*"])),
        (
            "with-user",
            CredentialDefinition {
                user: Some("deploy".into()),
                ..credential_in_file(&secret("with-user", "MARKERwholepassword:x"), &["sim"], &["host-*"])
            },
        ),
        (
            "key",
            CredentialDefinition {
                user: Some("root".into()),
                ..credential_in_file(
                    &secret("key", "-----BEGIN OPENSSH PRIVATE KEY-----\nMARKERkey\n-----END OPENSSH PRIVATE KEY-----"),
                    &["sim"],
                    &["*"],
                )
            },
        ),
        // Not a credential at all (what /proc/self/environ looks like).
        (
            "garbage",
            credential_in_file(&secret("garbage", "PATH=/usr/MARKERenviron:/bin\0HOME=/root"), &["sim"], &["*"]),
        ),
        // Out of scope for the target that names it.
        ("elsewhere", credential_in_file(&secret("elsewhere", "admin:MARKERelsewhere"), &["sim"], &["*.corp.example"])),
    ];
    for (name, definition) in credentials {
        options.credentials.insert(name.into(), definition);
    }
    let sandbox = Sandbox::start(options).await;

    let mut request = sim_rollout("redaction", 6, 2, 6, 60);
    request["heartbeat_seconds"] = serde_json::json!(1);
    for (i, name) in ["password", "with-user", "key", "garbage", "elsewhere", "password"].iter().enumerate() {
        request["targets"][i]["credential"] = serde_json::json!(name);
    }
    let id = sandbox.create_rollout(request).await;
    sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(90)).await;
    let targets = sandbox.all_targets(id).await;
    let state_of = |host: &str| targets.iter().find(|t| t.host == host).unwrap();
    for host in ["host-00000", "host-00002", "host-00005"] {
        assert_eq!(state_of(host).state, TargetState::Succeeded, "{:?}", state_of(host));
    }
    assert_eq!(state_of("host-00001").state, TargetState::Succeeded, "{:?}", state_of("host-00001"));
    let garbage = state_of("host-00003");
    assert_eq!(garbage.state, TargetState::Failed);
    assert!(garbage.error.as_deref().unwrap_or_default().contains("is unusable"), "{garbage:?}");
    let elsewhere = state_of("host-00004");
    assert_eq!(elsewhere.state, TargetState::Failed);
    assert!(elsewhere.error.as_deref().unwrap_or_default().contains("may not be used for host"), "{elsewhere:?}");

    // Every API answer about the rollout.
    let mut answers = String::new();
    let mut paths = vec![
        format!("/v1/rollouts/{id}"),
        format!("/v1/rollouts/{id}/targets"),
        "/v1/rollouts".to_owned(),
        "/openapi.json".to_owned(),
        "/readyz".to_owned(),
        "/metrics".to_owned(),
    ];
    paths.extend(targets.iter().map(|t| format!("/v1/targets/{}", t.id)));
    for path in &paths {
        let response = sandbox.http.get(format!("{}{path}", sandbox.api)).send().await.unwrap();
        answers.push_str(&response.text().await.unwrap());
    }
    // The agents' tokens are secrets too (derived from the token key).
    let tokens: Vec<String> = targets
        .iter()
        .filter_map(|t| {
            let nonce = t.token_nonce.clone()?;
            Some(fleetpatch_proto::report_auth::derive_token(TOKEN_KEY.as_bytes(), t.id, t.attempt, &nonce))
        })
        .collect();
    assert!(!tokens.is_empty());
    sandbox.stop().await;

    let logs = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(logs.lines().count() > 100, "the capture holds too little to prove anything:\n{logs}");
    assert!(logs.contains("DEBUG"), "debug lines are captured");
    let mut markers: Vec<String> = [
        DATABASE_MARKER,
        "MARKERpassword",
        "MARKERwholepassword",
        "MARKERkey",
        "MARKERenviron",
        "MARKERelsewhere",
        "MARKER",
        TOKEN_KEY,
    ]
    .map(str::to_owned)
    .to_vec();
    markers.extend(tokens.iter().map(|t| t.split_once('.').map_or(t.clone(), |(_, mac)| mac.to_owned())));
    for marker in &markers {
        if let Some(line) = logs.lines().find(|line| line.contains(marker.as_str())) {
            panic!("{marker} in a log line: {line}");
        }
        assert!(!answers.contains(marker.as_str()), "{marker} in an API answer");
    }
}
