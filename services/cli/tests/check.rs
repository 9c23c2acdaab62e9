//! `fleetpatch check` and `rollout create --preflight`: the real binary
//! against a real OpenSSH `sshd` peer on loopback (`SshPeer`), with a
//! listening socket standing for the collector the targets must reach.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetpatch_tests::{credential_in_file, Sandbox, SandboxOptions};
use fleetpatch_transport_ssh::test_support::SshPeer;

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

async fn fleetpatch(config: &Path, api: &str, token: Option<&str>, args: &[&str]) -> Run {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetpatch"));
    command.arg("--config").arg(config).args(args).env("FLEETPATCH_API", api).env("NO_COLOR", "1");
    match token {
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

/// A peer, a "collector" socket, and a configuration file whose `[ssh]`
/// section trusts the peer's host key.
struct Setup {
    peer: SshPeer,
    _collector: TcpListener,
    dir: tempfile::TempDir,
    config: PathBuf,
    /// The named credential (in `config`) of the peer's key.
    credential: &'static str,
    closed_port: u16,
}

fn setup() -> Setup {
    let peer = SshPeer::start().expect("start an sshd peer");
    let collector = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fleetpatch.toml");
    std::fs::write(
        &config,
        format!(
            "[worker]\ncollector_url = \"http://{}\"\n\n[ssh]\nknown_hosts_file = \"{}\"\nstaging_root = \"{}\"\n\n\
             [credentials.fleet-key]\nsecret_ref = \"file:{}\"\nuser = \"root\"\ntransports = [\"ssh\"]\nhosts = [\"127.0.0.1\"]\n\n\
             [credentials.elsewhere]\nsecret_ref = \"file:{}\"\ntransports = [\"ssh\", \"smb\"]\nhosts = [\"10.0.0.0/8\", \"*.corp.example\"]\n",
            collector.local_addr().unwrap(),
            peer.known_hosts_file().display(),
            peer.staging_root().display(),
            peer.keys().client.private_key_path.display(),
            peer.keys().client.private_key_path.display(),
        ),
    )
    .unwrap();
    Setup { peer, _collector: collector, dir, config, credential: "fleet-key", closed_port }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_a_reachable_target_and_names_the_cause_for_a_closed_port() {
    let setup = setup();
    let port = setup.peer.port().to_string();
    let good = ["check", "--host", "127.0.0.1", "--port", &port, "--credential", setup.credential];
    let run = fleetpatch(&setup.config, "http://127.0.0.1:9", None, &good).await;
    assert_eq!(run.code, 0, "{run:?}");
    for check in ["port", "host_key", "login", "admin_rights", "free_space", "tools", "collector"] {
        assert!(run.stdout.lines().any(|l| l.contains(check) && l.contains(" ok ")), "{check}: {run:?}");
    }
    assert!(run.stdout.contains("1 target checked: 1 ready, 0 with failed checks"), "{run:?}");

    let closed = setup.closed_port.to_string();
    let bad = ["check", "--host", "127.0.0.1", "--port", &closed, "--credential", setup.credential];
    let run = fleetpatch(&setup.config, "http://127.0.0.1:9", None, &bad).await;
    assert_eq!(run.code, 8, "{run:?}");
    assert!(run.stdout.contains("FAILED"), "{run:?}");
    assert!(run.stdout.contains(&format!("127.0.0.1:{closed} port: ")), "{run:?}");
    assert!(run.stdout.contains("fix: nothing accepts connections there: start sshd"), "{run:?}");

    // A rollout file: both targets, as JSON for scripts.
    let file = setup.dir.path().join("rollout.yaml");
    std::fs::write(&file, rollout_yaml(&setup, &[setup.peer.port(), setup.closed_port], &"0".repeat(64))).unwrap();
    let run =
        fleetpatch(&setup.config, "http://127.0.0.1:9", None, &["check", "-f", file.to_str().unwrap(), "-o", "json"])
            .await;
    assert_eq!(run.code, 8, "{run:?}");
    let reports: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON");
    assert_eq!(reports[0]["ok"], true, "{reports}");
    assert_eq!(reports[1]["ok"], false, "{reports}");
    assert_eq!(reports[1]["origin"], format!("{}, targets[1]", file.display()));
    let port_check = &reports[1]["checks"][0];
    assert_eq!((port_check["name"].as_str(), port_check["ok"].as_bool()), (Some("port"), Some(false)), "{reports}");
    assert!(port_check["fix"].as_str().unwrap().contains("start sshd on the target"), "{reports}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_an_unknown_host_key_and_a_missing_ssh_section() {
    let setup = setup();
    let stranger = SshPeer::start().expect("start a second sshd peer");
    let port = stranger.port().to_string();
    let args = ["check", "--host", "127.0.0.1", "--port", &port, "--credential", setup.credential];
    let run = fleetpatch(&setup.config, "http://127.0.0.1:9", None, &args).await;
    assert_eq!(run.code, 8, "{run:?}");
    assert!(run.stdout.contains("host_key") && run.stdout.contains("add it to known_hosts"), "{run:?}");

    let bare = setup.dir.path().join("bare.toml");
    std::fs::write(&bare, "").unwrap();
    let run = fleetpatch(&bare, "http://127.0.0.1:9", None, &args).await;
    assert_eq!(run.code, 8, "{run:?}");
    assert!(run.stdout.contains("the ssh transport is not configured"), "{run:?}");
    assert!(run.stdout.contains("add an [ssh] section"), "{run:?}");
}

fn rollout_yaml(setup: &Setup, ports: &[u16], sha256: &str) -> String {
    let mut text = format!(
        "name: preflight\npatches:\n  - name: hello\n    file: hello.sh\n    sha256: \"{sha256}\"\n    size: 12\n    installer: script\ntargets:\n"
    );
    for port in ports {
        text.push_str(&format!(
            "  - host: 127.0.0.1\n    port: {port}\n    transport: ssh\n    credential: {}\n    labels: {{ ssh.staging_root: \"{}\" }}\n",
            setup.credential,
            setup.peer.staging_root().display()
        ));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_create_with_preflight_creates_nothing_when_a_target_fails_its_checks() {
    let setup = setup();
    let credentials = [(
        setup.credential.to_owned(),
        credential_in_file(&setup.peer.keys().client.private_key_path, &["ssh"], &["127.0.0.1"]),
    )];
    let sandbox =
        Sandbox::start(SandboxOptions { workers: 0, credentials: credentials.into(), ..SandboxOptions::default() })
            .await;
    let (sha256, _) = sandbox.upload_content(b"echo hello\n".to_vec()).await;
    let failing = setup.dir.path().join("failing.yaml");
    std::fs::write(&failing, rollout_yaml(&setup, &[setup.peer.port(), setup.closed_port], &sha256)).unwrap();
    let run = fleetpatch(
        &setup.config,
        &sandbox.api,
        Some(&sandbox.admin_key),
        &["rollout", "create", "--preflight", "-f", failing.to_str().unwrap()],
    )
    .await;
    assert_eq!(run.code, 8, "{run:?}");
    assert!(run.stderr.contains("preflight failed on 1 of 2 targets; no rollout was created"), "{run:?}");
    assert!(run.stderr.contains(&format!("127.0.0.1:{} port", setup.closed_port)), "{run:?}");
    assert!(sandbox.store.list_rollouts(10).await.unwrap().is_empty(), "a rollout was created");

    let passing = setup.dir.path().join("passing.yaml");
    std::fs::write(&passing, rollout_yaml(&setup, &[setup.peer.port()], &sha256)).unwrap();
    let run = fleetpatch(
        &setup.config,
        &sandbox.api,
        Some(&sandbox.admin_key),
        &["rollout", "create", "--preflight", "-f", passing.to_str().unwrap()],
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("preflight passed on all 1 targets"), "{run:?}");
    assert_eq!(sandbox.store.list_rollouts(10).await.unwrap().len(), 1);
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_covers_windows_targets_over_smb() {
    use fleetpatch_winproto::test_support::{SambaPeer, ADMIN_PASSWORD, ADMIN_USER};
    let peer = SambaPeer::start_or_panic();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fleetpatch.toml");
    let secret = dir.path().join("admin.secret");
    std::fs::write(&secret, format!("{ADMIN_USER}:{ADMIN_PASSWORD}")).unwrap();
    let wrong = dir.path().join("wrong.secret");
    std::fs::write(&wrong, format!("{ADMIN_USER}:not-it")).unwrap();
    let definition = |secret: &Path| {
        format!("secret_ref = \"file:{}\"\ntransports = [\"smb\"]\nhosts = [\"127.0.0.1\"]\n", secret.display())
    };
    std::fs::write(
        &config,
        format!(
            "[smb]\ntimeout_seconds = 10\n\n[credentials.admin]\n{}\n[credentials.wrong]\n{}",
            definition(&secret),
            definition(&wrong)
        ),
    )
    .unwrap();
    let port = peer.address().port().to_string();
    let args = |credential: &str| {
        ["check", "--host", "127.0.0.1", "--port", &port, "--transport", "smb", "--credential", credential]
            .map(str::to_owned)
    };

    let good = args("admin");
    let run = fleetpatch(&config, "http://127.0.0.1:9", None, &good.each_ref().map(String::as_str)).await;
    assert_eq!(run.code, 0, "{run:?}");
    for check in ["port", "login", "admin_share", "remote_registry", "service_manager"] {
        assert!(run.stdout.lines().any(|l| l.contains(check) && l.contains(" ok ")), "{check}: {run:?}");
    }

    let bad = args("wrong");
    let run = fleetpatch(&config, "http://127.0.0.1:9", None, &bad.each_ref().map(String::as_str)).await;
    assert_eq!(run.code, 8, "a failed check exits 8: {run:?}");
    assert!(run.stdout.contains("STATUS_LOGON_FAILURE") && run.stdout.contains("wrong credentials"), "{run:?}");
}

/// A listener that counts the connections it accepts.
struct CountingListener {
    port: u16,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

fn counting_listener() -> CountingListener {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(stream);
        }
    });
    CountingListener { port, accepted }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_a_credential_out_of_its_scope_without_connecting() {
    let setup = setup();
    for transport in ["ssh", "smb"] {
        let listener = counting_listener();
        let port = listener.port.to_string();
        let args =
            ["check", "--host", "127.0.0.1", "--port", &port, "--transport", transport, "--credential", "elsewhere"];
        let run = fleetpatch(&setup.config, "http://127.0.0.1:9", None, &args).await;
        assert_eq!(run.code, 8, "{run:?}");
        assert!(
            run.stdout.contains("credential \"elsewhere\" may not be used for host \"127.0.0.1\"")
                && run.stdout.contains("10.0.0.0/8, *.corp.example"),
            "{run:?}"
        );
        assert_eq!(
            listener.accepted.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "{transport}: a connection was made"
        );
    }
    let run = fleetpatch(
        &setup.config,
        "http://127.0.0.1:9",
        None,
        &["check", "--host", "127.0.0.1", "--credential", "nobody"],
    )
    .await;
    assert_eq!(run.code, 8, "{run:?}");
    assert!(run.stdout.contains("no credential is named \"nobody\" (defined: elsewhere, fleet-key)"), "{run:?}");
}
