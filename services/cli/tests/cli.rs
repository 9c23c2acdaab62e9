//! The `fleetpatch` client commands end to end: the real binary against
//! the sandbox's scheduler (the whole pipeline on the machine's RabbitMQ and
//! PostgreSQL, see `fleetpatch_tests::Sandbox`).
//!
//! These tests live in the CLI crate, not in `tests/`, because only here
//! does Cargo build the binary for them (`CARGO_BIN_EXE_fleetpatch`): they
//! run what a user runs, exit statuses and output included.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetpatch_tests::{Sandbox, SandboxOptions};

/// The outcome of one run of the binary.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}\n--- stdout\n{}--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

/// Where the binary sends its requests, and the credential it sends.
#[derive(Clone)]
struct Api {
    url: String,
    token: Option<String>,
}

impl Api {
    fn of(sandbox: &Sandbox) -> Self {
        Self { url: sandbox.api.clone(), token: Some(sandbox.admin_key.clone()) }
    }
}

impl From<&str> for Api {
    fn from(url: &str) -> Self {
        Self { url: url.to_owned(), token: None }
    }
}

impl From<&String> for Api {
    fn from(url: &String) -> Self {
        Self::from(url.as_str())
    }
}

impl From<&Api> for Api {
    fn from(api: &Api) -> Self {
        api.clone()
    }
}

async fn fleetpatch(api: impl Into<Api>, args: &[&str]) -> Run {
    fleetpatch_with_env(api, args, &[]).await
}

async fn fleetpatch_with_env(api: impl Into<Api>, args: &[&str], env: &[(&str, &str)]) -> Run {
    let api = api.into();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetpatch"));
    command.args(args).env("FLEETPATCH_API", &api.url).env_remove("FLEETPATCH_CONFIG").env("NO_COLOR", "1");
    command.envs(env.iter().copied());
    match &api.token {
        Some(token) => command.env("FLEETPATCH_TOKEN", token),
        None => command.env_remove("FLEETPATCH_TOKEN"),
    };
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .unwrap_or_else(|_| panic!("fleetpatch {args:?} ran for more than 120 s"))
        .expect("run the fleetpatch binary");
    Run {
        code: output.status.code().expect("exited"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a test file");
    path
}

const PATCHES: &str = "\
patches:
  - name: KB5031356
    kb: KB5031356
    file: kb5031356.msu
    sha256: \"1111111111111111111111111111111111111111111111111111111111111111\"
    installer: msu
  - name: KB5030211
    file: kb5030211.msu
    sha256: \"2222222222222222222222222222222222222222222222222222222222222222\"
    installer: msu
";

fn healthy_rollout() -> String {
    let mut text = String::from(
        "name: cli-healthy\nconcurrency: 3\ntimeout_seconds: 30\nheartbeat_seconds: 1\n\
         waves:\n  - name: canary\n    size: 2\n  - name: rest\n",
    );
    text.push_str(PATCHES);
    text.push_str("targets:\n");
    for i in 0..6 {
        text.push_str(&format!("  - host: cli-{i:03}\n    labels: {{ sim.behaviour: healthy }}\n"));
    }
    text
}

fn json(run: &Run) -> serde_json::Value {
    assert_eq!(run.code, 0, "{run:?}");
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {run:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_from_yaml_watch_to_completion_and_read_back_as_json() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await;
    let api = Api::of(&sandbox);
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "rollout.yaml", &healthy_rollout());
    let file = file.to_str().unwrap();

    let created = json(&fleetpatch(&api, &["rollout", "create", "-f", file, "--output", "json"]).await);
    let id = created["id"].as_str().expect("the created rollout has an id").to_owned();
    assert_eq!(created["name"], "cli-healthy");

    let watch = fleetpatch(&api, &["rollout", "watch", &id, "--interval", "0.2"]).await;
    assert_eq!(watch.code, 0, "every target succeeded: {watch:?}");
    assert!(watch.stdout.contains("rollout completed: all 6 targets succeeded"), "{watch:?}");
    assert!(watch.stdout.contains("canary") && watch.stdout.contains("rest"), "a bar per wave: {watch:?}");

    let shown = json(&fleetpatch(&api, &["rollout", "show", &id, "-o", "json"]).await);
    assert_eq!(shown["rollout"]["state"], "completed");
    assert_eq!(shown["progress"]["total"], 6);
    assert_eq!(shown["progress"]["by_state"]["succeeded"], 6);
    assert_eq!(shown["progress"]["waves"][0]["total"], 2);
    let table = fleetpatch(&api, &["rollout", "show", &id]).await;
    assert!(table.stdout.contains("targets     6/6 done: 6 ok, 0 failed, 0 timed out; 0 in flight"), "{table:?}");

    let listed = json(&fleetpatch(&api, &["rollout", "list", "-o", "json"]).await);
    assert!(listed["rollouts"].as_array().unwrap().iter().any(|r| r["id"] == id.as_str()), "{listed}");
    let listed = fleetpatch(&api, &["rollout", "list"]).await;
    assert!(listed.stdout.lines().any(|l| l.starts_with(&id) && l.contains("completed")), "{listed:?}");

    let targets = json(&fleetpatch(&api, &["targets", &id, "-o", "json"]).await);
    let targets = targets["targets"].as_array().expect("a target list");
    assert_eq!(targets.len(), 6);
    assert!(targets.iter().all(|t| t["state"] == "succeeded"), "{targets:?}");
    let table = fleetpatch(&api, &["targets", &id, "--state", "succeeded"]).await;
    assert_eq!(table.stdout.lines().count(), 7, "a header and six rows: {table:?}");
    assert!(table.stdout.starts_with("ID "), "{table:?}");
    let paged = json(&fleetpatch(&api, &["targets", &id, "--limit", "4", "-o", "json"]).await);
    assert_eq!(paged["targets"].as_array().unwrap().len(), 4);

    let target_id = targets[0]["id"].as_str().unwrap();
    let target = json(&fleetpatch(&api, &["target", target_id, "-o", "json"]).await);
    assert_eq!(target["target"]["host"], "cli-000");
    assert_eq!(target["patches"].as_array().unwrap().len(), 2);
    let target = fleetpatch(&api, &["target", target_id]).await;
    assert_eq!(target.code, 0, "{target:?}");
    assert!(target.stdout.contains("KB5031356") && target.stdout.contains("succeeded"), "{target:?}");
    assert!(
        target.stdout.contains("timeline") && target.stdout.contains("agent: finished KB5030211 (exit 0)"),
        "{target:?}"
    );
    assert!(target.stdout.contains("running → succeeded"), "{target:?}");

    // The evidence report: saved as HTML, checked against the digest the
    // API stored; one changed byte and it is no longer a report fleetpatch issued.
    let saved = dir.path().join("evidence.html");
    let run = fleetpatch(&api, &["rollout", "report", &id, "--save", saved.to_str().unwrap()]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("wrote the html report") && run.stderr.contains("sha256 "), "{run:?}");
    let html = std::fs::read_to_string(&saved).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") && html.contains("<svg") && html.contains("cli-000"), "{html}");
    let verified = fleetpatch(&api, &["rollout", "verify-report", saved.to_str().unwrap()]).await;
    assert_eq!(verified.code, 0, "{verified:?}");
    assert!(verified.stdout.contains(&format!("html report of rollout {id}")), "{verified:?}");
    std::fs::write(&saved, html.replacen("succeeded", "suceeded", 1)).unwrap();
    let tampered = fleetpatch(&api, &["rollout", "verify-report", saved.to_str().unwrap()]).await;
    assert_eq!(tampered.code, 3, "{tampered:?}");
    assert!(tampered.stderr.contains("is not a report this fleetpatch issued"), "{tampered:?}");
    let csv = fleetpatch(&api, &["rollout", "report", &id, "--format", "csv"]).await;
    assert_eq!(csv.stdout.lines().count(), 1 + 6 * 2, "a header and a row per target and patch: {csv:?}");

    // A request the API refuses: the field is named, as the user's mistake.
    let refused = write(dir.path(), "refused.yaml", &healthy_rollout().replace("size: 2", "size: 0"));
    let run = fleetpatch(&api, &["rollout", "create", "-f", refused.to_str().unwrap()]).await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.stderr.contains("the API refused the request (invalid request):"), "{run:?}");
    assert!(run.stderr.contains("waves[0].size: must be at least 1"), "{run:?}");
    let run = fleetpatch(&api, &["rollout", "show", "00000000-0000-0000-0000-000000000000"]).await;
    assert_eq!(run.code, 3, "an unknown rollout: {run:?}");
    assert!(run.stderr.contains("not found"), "{run:?}");
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_imported_from_an_inventory_and_a_csv_file() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await;
    let api = Api::of(&sandbox);
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "rollout.yaml",
        &format!("name: cli-imported\nconcurrency: 5\ntimeout_seconds: 30\nheartbeat_seconds: 1\n{PATCHES}"),
    );
    let inventory = write(
        dir.path(),
        "hosts.ini",
        "[web]\nweb[01:03].example.com sim.behaviour=healthy\n\n[db]\ndb-01.example.com:2222 sim.behaviour=healthy\n",
    );
    let csv = write(
        dir.path(),
        "hosts.csv",
        "host,port,sim.behaviour,labels\ncsv-01,22,healthy,site=paris\ncsv-02,22,fail_patch,site=lyon\n",
    );
    let args = [
        "rollout",
        "create",
        "-f",
        file.to_str().unwrap(),
        "--inventory",
        inventory.to_str().unwrap(),
        "--targets-csv",
        csv.to_str().unwrap(),
        "--transport",
        "sim",
    ];
    let dry = json(&fleetpatch(&api, &[&args[..], &["--dry-run"]].concat()).await);
    assert_eq!(dry["targets"].as_array().unwrap().len(), 6, "{dry}");

    let created = json(&fleetpatch(&api, &[&args[..], &["-o", "json"]].concat()).await);
    let id = created["id"].as_str().unwrap().to_owned();
    // JSON watch: one rollout document per line, the last one final.
    let watch = fleetpatch(&api, &["rollout", "watch", &id, "--interval", "0.2", "-o", "json"]).await;
    assert_eq!(watch.code, 5, "completed, but one target failed: {watch:?}");
    let documents: Vec<serde_json::Value> =
        watch.stdout.lines().map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))).collect();
    let last = documents.last().expect("at least one line");
    assert_eq!(last["rollout"]["state"], "completed");
    assert_eq!(last["progress"]["by_state"]["failed"], 1);

    let targets = json(&fleetpatch(&api, &["targets", &id, "-o", "json"]).await);
    let targets = targets["targets"].as_array().unwrap();
    let by_host = |host: &str| targets.iter().find(|t| t["host"] == host).unwrap_or_else(|| panic!("{host}"));
    assert_eq!(by_host("web02.example.com")["labels"]["group"], "web");
    assert_eq!(by_host("db-01.example.com")["port"], 2222);
    assert_eq!(by_host("db-01.example.com")["labels"]["group"], "db");
    assert_eq!(by_host("csv-01")["labels"]["site"], "paris");
    assert_eq!(by_host("csv-02")["state"], "failed");

    let failed = json(&fleetpatch(&api, &["targets", &id, "--state", "failed", "-o", "json"]).await);
    assert_eq!(failed["targets"].as_array().unwrap().len(), 1);
    // Watching a finished rollout again says the same, as a table.
    let watch = fleetpatch(&api, &["rollout", "watch", &id]).await;
    assert_eq!(watch.code, 5, "{watch:?}");
    assert!(watch.stdout.contains("1 of 6 targets did not succeed"), "{watch:?}");
    assert!(watch.stdout.contains("csv-02 failed"), "the failed target is named: {watch:?}");

    let retried = fleetpatch(&api, &["rollout", "retry-failed", &id]).await;
    assert_eq!(retried.code, 0, "{retried:?}");
    assert!(retried.stdout.starts_with("1 failed or timed-out target(s)"), "{retried:?}");

    // Pause, resume and abort a rollout whose only slot is held by a silent host.
    let stuck = write(
        dir.path(),
        "stuck.yaml",
        &format!(
            "name: cli-stuck\nconcurrency: 1\ntimeout_seconds: 60\nheartbeat_seconds: 1\n{PATCHES}targets:\n\
             - host: hangs\n  labels: {{ sim.behaviour: hang }}\n- host: waits\n"
        ),
    );
    let created = json(&fleetpatch(&api, &["rollout", "create", "-f", stuck.to_str().unwrap(), "-o", "json"]).await);
    let id = created["id"].as_str().unwrap().to_owned();
    let paused = fleetpatch(&api, &["rollout", "pause", &id, "--reason", "change freeze"]).await;
    assert_eq!(paused.code, 0, "{paused:?}");
    assert!(paused.stdout.contains("is paused (change freeze)"), "{paused:?}");
    let watch = fleetpatch(&api, &["rollout", "watch", &id]).await;
    assert_eq!(watch.code, 6, "{watch:?}");
    assert!(watch.stdout.contains("rollout paused: change freeze"), "{watch:?}");
    let resumed = json(&fleetpatch(&api, &["rollout", "resume", &id, "-o", "json"]).await);
    assert_eq!(resumed["state"], "running");
    let aborted = fleetpatch(&api, &["rollout", "abort", &id]).await;
    assert!(aborted.stdout.contains("is aborted"), "{aborted:?}");
    let watch = fleetpatch(&api, &["rollout", "watch", &id]).await;
    assert_eq!(watch.code, 7, "{watch:?}");
    sandbox.stop().await;
}

#[tokio::test]
async fn an_invalid_rollout_file_names_the_line_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let text = healthy_rollout().replace("  - host: cli-001\n", "  - host: cli-001\n    port: ssh\n");
    let file = write(dir.path(), "rollout.yaml", &text);
    let file = file.to_str().unwrap();
    // No API is needed to find the mistake.
    let run = fleetpatch("http://127.0.0.1:9", &["rollout", "create", "-f", file]).await;
    assert_eq!(run.code, 3, "{run:?}");
    let expected = format!("error: {file}:23:11: targets[1].port: invalid type: string \"ssh\", expected u16");
    assert!(run.stderr.starts_with(&expected), "{run:?}");

    // A mistake in an imported file names that file and line.
    let header = healthy_rollout().split("targets:").next().unwrap().to_owned();
    let file = write(dir.path(), "no-targets.yaml", &header);
    let csv = write(dir.path(), "hosts.csv", "host,port\nh1,22\nh2,none\n");
    let args = ["rollout", "create", "-f", file.to_str().unwrap(), "--targets-csv", csv.to_str().unwrap()];
    let run = fleetpatch("http://127.0.0.1:9", &args).await;
    assert_eq!(run.code, 3, "{run:?}");
    let expected = format!("error: {}:3: port: \"none\" is not a port number (1-65535)", csv.display());
    assert!(run.stderr.starts_with(&expected), "{run:?}");
}

#[tokio::test]
async fn an_unreachable_api_is_named() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let api = format!("http://127.0.0.1:{port}");
    let run = fleetpatch(&api, &["rollout", "list"]).await;
    assert_eq!(run.code, 4, "{run:?}");
    assert!(run.stderr.contains(&format!("cannot reach the fleetpatch API at {api}")), "{run:?}");
    let run = fleetpatch("ftp://somewhere", &["rollout", "list"]).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("must start with http://"), "{run:?}");
    // --api wins over FLEETPATCH_API.
    let run = fleetpatch("ftp://somewhere", &["rollout", "list", "--api", &api]).await;
    assert_eq!(run.code, 4, "{run:?}");
}

#[tokio::test]
async fn a_worker_or_collector_without_the_token_key_refuses_to_start_naming_it() {
    for service in ["worker", "collector"] {
        // Checked before the database is contacted: this URL is never used.
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetpatch"));
        command
            .arg(service)
            .env_remove("FLEETPATCH_CONFIG")
            .env_remove("FLEETPATCH__TOKENS__KEY_REF")
            .env("FLEETPATCH__DATABASE__URL", "postgres://nobody@127.0.0.1:1/none");
        let output = tokio::time::timeout(Duration::from_secs(60), command.output()).await.unwrap().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{service}: {stderr}");
        assert!(stderr.contains("tokens.key_ref is not set") && stderr.contains(service), "{service}: {stderr}");
    }
}

#[tokio::test]
async fn a_relay_needs_no_database_serves_its_probes_names_its_upstream_and_drains_on_sigterm() {
    // Without an upstream it refuses to start, naming the key.
    let run = fleetpatch_offline(&["relay"], &[]);
    assert_ne!(run.code, 0);
    assert!(run.stderr.contains("relay.upstream_url"), "{}", run.stderr);

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let upstream_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cache = tempfile::tempdir().unwrap();
    let mut relay = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetpatch"))
        .arg("relay")
        .env_remove("FLEETPATCH_CONFIG")
        // No database, broker or token key: a relay needs none of them.
        .env("FLEETPATCH__DATABASE__URL", "")
        .env("FLEETPATCH__RELAY__LISTEN", format!("127.0.0.1:{port}"))
        .env("FLEETPATCH__RELAY__UPSTREAM_URL", format!("http://127.0.0.1:{upstream_port}"))
        .env("FLEETPATCH__RELAY__CACHE_DIR", cache.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start fleetpatch relay");
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let mut ready = false;
    for _ in 0..200 {
        if let Ok(response) = http.get(format!("{base}/readyz")).send().await {
            ready = response.status() == 200;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "the relay is ready with its cache directory, whatever its upstream");
    assert_eq!(http.get(format!("{base}/livez")).send().await.unwrap().status(), 200);
    let metrics = http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    let missing = format!("{base}/v1/content/{}", "ab".repeat(32));
    let response = http.get(&missing).send().await.unwrap();
    assert_eq!(response.status(), 503, "the upstream is down");
    let body = response.text().await.unwrap();
    assert!(body.contains(&format!("127.0.0.1:{upstream_port}")), "the answer names the upstream: {body}");
    assert_eq!(http.get(format!("{base}/v1/content/nope")).send().await.unwrap().status(), 400);
    let metrics_after = http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics_after.contains("fleetpatch_relay_requests_total"), "{metrics}\n{metrics_after}");
    let pid = relay.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(30), relay.wait()).await.expect("drains").unwrap();
    assert!(status.success(), "asked to stop, the relay exits 0: {status}");
}

/// The binary with only `env` and `args` (no API, no configuration file but the one named).
fn fleetpatch_offline(args: &[&str], env: &[(&str, &str)]) -> Run {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fleetpatch"))
        .args(args)
        .env_remove("FLEETPATCH_CONFIG")
        .envs(env.iter().copied())
        .output()
        .expect("run the fleetpatch binary");
    Run {
        code: output.status.code().expect("exited"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[test]
fn print_config_hides_passwords_and_keeps_references() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "fleetpatch.toml",
        "[worker]\ncollector_url = \"http://agent:MARKER-COLLECTOR@collector:1072\"\n\n\
         [tokens]\nkey_ref = \"env:FLEETPATCH_TOKEN_KEY\"\n\n\
         [credentials.windows-admin]\nsecret_ref = \"file:/run/secrets/windows-admin\"\ntransports = [\"smb\"]\n\
         hosts = [\"*.corp.example\", \"10.1.0.0/16\"]\nlabels = { site = \"paris\" }\n",
    );
    let run = fleetpatch_offline(
        &["--config", config.to_str().unwrap(), "--print-config"],
        &[
            ("FLEETPATCH__DATABASE__URL", "postgres://fp:MARKER-DATABASE@db:5432/fleetpatch?password=MARKER-QUERY"),
            ("FLEETPATCH__AMQP__URL", "amqp://fp:MARKER-AMQP@rabbitmq:5672/%2f"),
            ("FLEETPATCH_TOKEN_KEY", "MARKER-TOKEN-KEY"),
        ],
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert!(!run.stdout.contains("MARKER") && !run.stderr.contains("MARKER"), "{run:?}");
    for shown in [
        "postgres://fp:***@db:5432/fleetpatch?password=***",
        "amqp://fp:***@rabbitmq:5672/%2f",
        "key_ref = \"env:FLEETPATCH_TOKEN_KEY\"",
        "[credentials.windows-admin]",
        "secret_ref = \"file:/run/secrets/windows-admin\"",
    ] {
        assert!(run.stdout.contains(shown), "{shown}: {run:?}");
    }
}

#[test]
fn a_bad_credential_definition_stops_the_services_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    for (definition, key) in [
        ("secret_ref = \"hunter2\"\ntransports = [\"ssh\"]\nhosts = [\"*\"]\n", "credentials.linux.secret_ref"),
        ("secret_ref = \"env:X\"\ntransports = [\"ssh\"]\n", "credentials.linux.hosts"),
        ("secret_ref = \"env:X\"\ntransports = [\"ssh\"]\nhosts = [\"10.0.0.0/40\"]\n", "credentials.linux.hosts[0]"),
        ("secret_ref = \"env:X\"\ntransports = [\"rdp\"]\nhosts = [\"*\"]\n", "credentials.linux.transports[0]"),
    ] {
        let config = write(dir.path(), "bad.toml", &format!("[credentials.linux]\n{definition}"));
        for service in ["scheduler", "worker"] {
            let run = fleetpatch_offline(&["--config", config.to_str().unwrap(), service], &[]);
            assert_ne!(run.code, 0, "{run:?}");
            assert!(run.stderr.contains(&format!("invalid configuration: {key}: ")), "{key}: {run:?}");
            assert!(!run.stderr.contains("hunter2"), "{run:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_come_from_the_database_and_refusals_have_their_own_exit_codes() {
    let sandbox = Sandbox::start(SandboxOptions { workers: 0, ..SandboxOptions::default() }).await;
    let database = [("FLEETPATCH__DATABASE__URL", sandbox.database_url())];
    let url = sandbox.api.as_str();

    // `apikey create` prints the key and nothing else on stdout.
    let created = fleetpatch_with_env(
        url,
        &["apikey", "create", "--name", "ci", "--role", "viewer", "--expires", "1d"],
        &database,
    )
    .await;
    assert_eq!(created.code, 0, "{created:?}");
    let key = created.stdout.trim().to_owned();
    assert_eq!(created.stdout, format!("{key}\n"), "{created:?}");
    assert!(key.starts_with("fpk_") && key.len() == 85, "{created:?}");
    assert!(created.stderr.contains("role viewer") && !created.stderr.contains(&key), "{created:?}");
    let again = fleetpatch_with_env(url, &["apikey", "create", "--name", "ci", "--role", "admin"], &database).await;
    assert_eq!(again.code, 3, "{again:?}");
    assert!(again.stderr.contains("exists"), "{again:?}");

    // `apikey list` never shows a key.
    let listed = fleetpatch_with_env(url, &["apikey", "list", "-o", "json"], &database).await;
    let keys = json(&listed);
    let names: Vec<&str> = keys["keys"].as_array().unwrap().iter().map(|k| k["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["sandbox-admin", "ci"]);
    assert!(!listed.stdout.contains(&key[key.len() - 64..]), "{listed:?}");
    let table = fleetpatch_with_env(url, &["apikey", "list"], &database).await;
    assert!(table.stdout.contains("ci") && table.stdout.contains("active"), "{table:?}");
    // `--print-config` prints the configuration and makes no key.
    for args in [
        &["--print-config", "apikey", "create", "--name", "shown", "--role", "admin"][..],
        &["apikey", "create", "--name", "shown", "--role", "admin", "--print-config"][..],
    ] {
        let printed = fleetpatch_with_env(url, args, &database).await;
        assert_eq!(printed.code, 0, "{printed:?}");
        assert!(printed.stdout.contains("[database]") && !printed.stdout.contains("fpk_"), "{printed:?}");
    }
    let listed = fleetpatch_with_env(url, &["apikey", "list", "-o", "json"], &database).await;
    assert!(!listed.stdout.contains("shown"), "no key was made: {listed:?}");

    // No credential: 9; a role too low: 10; each says what to do.
    let anonymous = fleetpatch(url, &["rollout", "list"]).await;
    assert_eq!(anonymous.code, 9, "{anonymous:?}");
    assert!(anonymous.stderr.contains("--token, FLEETPATCH_TOKEN or client.token"), "{anonymous:?}");
    let viewer = Api { url: url.to_owned(), token: Some(key.clone()) };
    assert_eq!(fleetpatch(&viewer, &["rollout", "list"]).await.code, 0);
    let rollout = "00000000-0000-0000-0000-000000000001";
    let pause = fleetpatch(&viewer, &["rollout", "pause", rollout]).await;
    assert_eq!(pause.code, 10, "{pause:?}");
    assert!(pause.stderr.contains("needs the operator role"), "{pause:?}");

    // The key from a secret reference in the configuration file.
    let dir = tempfile::tempdir().unwrap();
    let key_file = write(dir.path(), "viewer.key", &format!("{key}\n"));
    let config = write(dir.path(), "client.toml", &format!("[client]\ntoken = \"file:{}\"\n", key_file.display()));
    let from_config = fleetpatch(url, &["--config", config.to_str().unwrap(), "rollout", "list"]).await;
    assert_eq!(from_config.code, 0, "{from_config:?}");

    // `audit` (admin) shows the viewer's refused pause.
    let audit = json(&fleetpatch(Api::of(&sandbox), &["audit", "--rollout", rollout, "-o", "json"]).await);
    let entries = audit["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{audit}");
    assert_eq!((entries[0]["actor"].as_str(), entries[0]["status"].as_u64()), (Some("ci"), Some(403)));
    let table = fleetpatch(Api::of(&sandbox), &["audit"]).await;
    assert!(table.stdout.contains("POST /v1/rollouts/{id}/pause"), "{table:?}");

    // Revoked: refused from now on.
    let revoked = fleetpatch_with_env(url, &["apikey", "revoke", "ci"], &database).await;
    assert_eq!(revoked.code, 0, "{revoked:?}");
    let refused = fleetpatch(&viewer, &["rollout", "list"]).await;
    assert_eq!(refused.code, 9, "{refused:?}");
    assert!(refused.stderr.contains("revoked"), "{refused:?}");
    sandbox.stop().await;
}

/// `dead-letters list -o json` once it counts `total` (or after ~10 s).
async fn dead_letters_once_there_are(api: &Api, total: u64) -> serde_json::Value {
    let mut listed = serde_json::Value::Null;
    for _ in 0..100 {
        listed = json(&fleetpatch(api, &["dead-letters", "list", "-o", "json"]).await);
        if listed["total"] == total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    listed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_left_in_place_and_replayed() {
    let sandbox = Sandbox::start(SandboxOptions { workers: 0, ..SandboxOptions::default() }).await;
    let api = Api::of(&sandbox);
    let run = fleetpatch(&api, &["dead-letters", "list"]).await;
    assert_eq!((run.code, run.stdout.trim()), (0, "the dead-letter queue is empty"), "{run:?}");
    // A cleanup job a worker gave up on (no workers run here: the test plays one).
    let bus = sandbox.queues();
    let queue = fleetpatch_proto::routing::CLEANUP;
    bus.publish(vec![fleetpatch_bus::Outgoing::work(queue, b"poison".to_vec())]).await.expect("publish");
    let mut consumer = bus.consume(queue, 1).await.expect("consume");
    let delivery =
        tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.expect("in time").expect("open");
    delivery.dead_letter().await.expect("dead-letter it");
    consumer.cancel();
    let listed = dead_letters_once_there_are(&api, 1).await;
    assert_eq!(listed["total"], 1, "{listed}");
    assert_eq!(listed["dead_letters"][0]["routing_key"], queue, "{listed}");
    assert_eq!(listed["dead_letters"][0]["reason"], "rejected", "{listed}");
    assert_eq!(listed["dead_letters"][0]["bytes"], 6, "{listed}");
    let table = fleetpatch(&api, &["dead-letters", "list"]).await;
    assert!(table.stdout.contains("cleanup") && table.stdout.contains("rejected"), "{table:?}");
    // Looking twice leaves it where it is; a viewer may look but not replay.
    assert_eq!(json(&fleetpatch(&api, &["dead-letters", "list", "-o", "json"]).await)["total"], 1);
    let viewer = sandbox.store.create_api_key("dl-viewer", fleetpatch_store::Role::Viewer, None).await.unwrap();
    let as_viewer = Api { url: sandbox.api.clone(), token: Some(viewer.expose_secret().to_owned()) };
    assert_eq!(fleetpatch(&as_viewer, &["dead-letters", "list"]).await.code, 0);
    let refused = fleetpatch(&as_viewer, &["dead-letters", "replay"]).await;
    assert_eq!(refused.code, 10, "a viewer may not replay: {refused:?}");
    let replayed = json(&fleetpatch(&api, &["dead-letters", "replay", "-o", "json"]).await);
    assert_eq!((replayed["replayed"].as_u64(), replayed["left"].as_u64()), (Some(1), Some(0)), "{replayed}");
    let mut consumer = bus.consume(queue, 1).await.expect("consume");
    let back = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.expect("in time").expect("open");
    assert_eq!(back.payload, b"poison", "the message is back on its work queue");
    back.ack().await.expect("ack");
    consumer.cancel();
    let out = fleetpatch(&api, &["dead-letters", "list", "--limit", "0"]).await;
    assert_ne!(out.code, 0, "a limit of 0 is refused: {out:?}");
    assert!(out.stderr.contains("limit 0 is not within 1..=1000"), "{out:?}");
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_can_never_succeed_is_dead_lettered_at_once_not_retried() {
    let sandbox = Sandbox::start(SandboxOptions { workers: 1, ..SandboxOptions::default() }).await;
    let api = Api::of(&sandbox);
    // Not a DeployJob: no retry can help it.
    let garbage = fleetpatch_bus::Outgoing::work(fleetpatch_proto::routing::DEPLOY, vec![0xff; 7]);
    sandbox.queues().publish(vec![garbage]).await.expect("publish");
    let listed = dead_letters_once_there_are(&api, 1).await;
    assert_eq!(listed["total"], 1, "{listed}");
    // Rejected by the worker on its first delivery, not dropped by the
    // broker after `amqp.delivery_limit` requeues.
    assert_eq!(listed["dead_letters"][0]["reason"], "rejected", "{listed}");
    assert_eq!(listed["dead_letters"][0]["routing_key"], fleetpatch_proto::routing::DEPLOY, "{listed}");
    // The same for the scheduler: a dispatch request that names no rollout.
    let request = fleetpatch_proto::v1::DispatchRequest { rollout_id: "not-a-uuid".into() };
    let garbage = fleetpatch_bus::Outgoing::work(
        fleetpatch_proto::routing::DISPATCH,
        fleetpatch_proto::Message::encode_to_vec(&request),
    );
    sandbox.queues().publish(vec![garbage]).await.expect("publish");
    let listed = dead_letters_once_there_are(&api, 2).await;
    let dispatch = listed["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|letter| letter["routing_key"] == fleetpatch_proto::routing::DISPATCH)
        .unwrap_or_else(|| panic!("the dispatch request is dead-lettered: {listed}"));
    assert_eq!(dispatch["reason"], "rejected", "on its first delivery: {listed}");
    sandbox.stop().await;
}
