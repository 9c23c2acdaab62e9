//! The `ssh` transport against real OpenSSH `sshd` peers on loopback.
//!
//! Each test starts its own peer(s) through `test_support` (which panics,
//! never skips, when sshd is missing). The login user is root with a key,
//! except in the password tests.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fleetpatch_proto::plan::{DeploymentPlan, Detection, InstallerKind, PlanPatch, RebootPolicy, PLAN_VERSION};
use fleetpatch_transport::{
    AgentStart, Credential, Deployment, Error, PatchProbe, PreflightContext, Secret, StagedFile, Transport,
};
use fleetpatch_transport_ssh::test_support::{KeyPair, SshFleet, SshPeer, SshPeerOptions};
use fleetpatch_transport_ssh::{HostKeyPolicy, SshOptions, SshTransport};
use sha2::{Digest, Sha256};

/// A stand-in agent: records that it ran (pid and arguments) next to its
/// plan, then stays up like an agent installing a long patch.
/// A stand-in for `fleetpatch-agent run --plan DIR/plan.json [--detach PIDFILE]`.
fn test_agent() -> String {
    format!(
        "#!/bin/sh\n{}dir=$(dirname \"$3\")\necho \"$$ $*\" > \"$dir/agent-ran\"\nsleep 300 &\nwait\n",
        fleetpatch_transport_ssh::test_support::STAND_IN_DETACH
    )
}

fn patch(index: u32, name: &str, detection: Option<Detection>) -> PatchProbe {
    PatchProbe { index, name: name.into(), detection }
}

fn dpkg(package: &str, version: Option<&str>) -> Option<Detection> {
    Some(Detection::Dpkg { package: package.into(), version: version.map(Into::into) })
}

fn local_os_release_name() -> String {
    let text = std::fs::read_to_string("/etc/os-release").expect("this machine has /etc/os-release");
    fleetpatch_transport_ssh::parse_os_release(&text).get("NAME").cloned().expect("NAME in os-release")
}

fn local_arch() -> String {
    let output = std::process::Command::new("uname").arg("-m").output().unwrap();
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

struct Fixture {
    _dir: tempfile::TempDir,
    agent: PathBuf,
    installer: Option<StagedFile>,
}

/// Writes the test agent and, when `installer_bytes > 0`, an installer of
/// that size with its sha256.
fn fixture(installer_bytes: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("agent.sh");
    std::fs::write(&agent, test_agent()).unwrap();
    let installer = (installer_bytes > 0).then(|| {
        let path = dir.path().join("big-installer.deb");
        // Not all zeros: a compressing transport would hide a broken copy.
        let data: Vec<u8> = (0..installer_bytes).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        StagedFile {
            name: "big-installer.deb".into(),
            source: path,
            sha256: hex::encode(Sha256::digest(&data)),
            size: installer_bytes as u64,
        }
    });
    Fixture { _dir: dir, agent, installer }
}

fn deployment(target_id: uuid::Uuid, attempt: u32, fixture: &Fixture) -> Deployment {
    let patches = fixture
        .installer
        .iter()
        .enumerate()
        .map(|(i, file)| PlanPatch {
            index: i as u32,
            name: file.name.clone(),
            file: file.name.clone(),
            sha256: file.sha256.clone(),
            size: 0,
            sources: Vec::new(),
            installer: InstallerKind::Deb,
            arguments: String::new(),
            success_codes: vec![0],
            reboot_codes: vec![],
            timeout_seconds: 600,
        })
        .collect();
    Deployment {
        plan: DeploymentPlan {
            version: PLAN_VERSION,
            deployment_id: fleetpatch_proto::plan::deployment_id(target_id, attempt),
            target_id,
            attempt: 1,
            collector_url: "http://127.0.0.1:1072".into(),
            collector_ca_pem: None,
            token: "secret-report-token".into(),
            heartbeat_seconds: 30,
            patches,
            reboot: RebootPolicy::Never,
            reboot_command: None,
            keep_files: false,
            relay_ca_pem: None,
            download_timeout_seconds: fleetpatch_proto::plan::DEFAULT_DOWNLOAD_TIMEOUT_SECONDS,
        },
        agent_binary: Some(fixture.agent.clone()),
        files: fixture.installer.iter().cloned().collect(),
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o7777
}

fn pid_alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped by its parent) counts as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn probe_with_a_key_reads_os_arch_rights_and_detection_rules() {
    let peer = SshPeer::start().unwrap();
    let transport = peer.transport();
    let patches = [
        patch(0, "bash present", dpkg("bash", None)),
        patch(1, "absent package", dpkg("fleetpatch-no-such-package", None)),
        patch(2, "bash old enough", dpkg("bash", Some("1.0"))),
        patch(3, "bash from the future", dpkg("bash", Some("999:1.0"))),
        patch(4, "windows hotfix", Some(Detection::Hotfix { kb: "KB5030211".into() })),
        patch(5, "no rule", None),
        patch(6, "rpm on a Debian host", Some(Detection::Rpm { package: "bash".into(), version: None })),
        patch(7, "hostile name", dpkg("bash; touch /tmp/fleetpatch-pwned", None)),
    ];
    let report = transport.probe(&peer.target(), &patches).await.unwrap();
    assert_eq!(report.os, local_os_release_name());
    assert!(!report.os_version.is_empty(), "{report:?}");
    assert_eq!(report.arch, local_arch());
    assert!(report.is_admin, "{report:?}");
    assert_eq!(report.details["admin_rights"], "root");
    assert_eq!(report.installed, vec![0, 2], "{report:?}");
    assert!(!Path::new("/tmp/fleetpatch-pwned").exists());

    let verify = transport.verify(&peer.target(), &patches).await.unwrap();
    assert_eq!(verify.installed, vec![0, 2]);
    // What a rule here can judge is installed or missing; a hotfix rule, no
    // rule, or an invalid package name cannot be judged on this host.
    assert_eq!(verify.missing, vec![1, 3, 6]);
    assert_eq!(verify.unknown, vec![4, 5, 7]);
    // The kernel's boot id: the same on every probe until a reboot.
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(report.boot_id.as_deref(), Some(boot.trim()), "the boot id of the peer's kernel");
    let again = transport.probe(&peer.target(), &[]).await.unwrap();
    assert_eq!(again.boot_id, report.boot_id);
}

#[tokio::test]
async fn password_login_works_and_a_plain_user_is_not_admin() {
    let peer = SshPeer::start_with(SshPeerOptions { password_auth: true, ..Default::default() }).unwrap();
    let transport = peer.transport();
    let target = peer.target_with(Some(peer.password_credential()));
    let report = transport.probe(&target, &[patch(0, "bash", dpkg("bash", None))]).await.unwrap();
    assert_eq!(report.installed, vec![0]);
    assert!(!report.is_admin, "{report:?}");
    assert_eq!(report.details["ssh_user"], fleetpatch_transport_ssh::test_support::PASSWORD_USER);
}

#[tokio::test]
async fn a_wrong_password_is_an_authentication_error() {
    let peer = SshPeer::start_with(SshPeerOptions { password_auth: true, ..Default::default() }).unwrap();
    let target = peer.target_with(Some(Credential::Password {
        username: fleetpatch_transport_ssh::test_support::PASSWORD_USER.into(),
        password: Secret::new("not-the-password"),
    }));
    let error = peer.transport().probe(&target, &[]).await.unwrap_err();
    assert!(matches!(error, Error::Authentication { .. }), "{error:?}");
    assert!(!error.is_transient());
    assert!(!error.to_string().contains("not-the-password"), "{error}");
}

#[tokio::test]
async fn a_key_that_is_not_authorized_is_an_authentication_error() {
    let peer = SshPeer::start().unwrap();
    let stranger = KeyPair::generate(peer.dir(), "stranger", "ed25519", "").unwrap();
    let target = peer.target_with(Some(Credential::PrivateKey {
        username: "root".into(),
        key_pem: Secret::new(stranger.private_key_pem),
        passphrase: None,
    }));
    let error = peer.transport().probe(&target, &[]).await.unwrap_err();
    match &error {
        Error::Authentication { username, reason, .. } => {
            assert_eq!(username, "root");
            assert!(reason.contains("publickey"), "{reason}");
        }
        other => panic!("expected an authentication error, got {other:?}"),
    }
    assert!(!error.is_transient());
    let garbage = peer.target_with(Some(Credential::PrivateKey {
        username: "root".into(),
        key_pem: Secret::new("-----BEGIN OPENSSH PRIVATE KEY-----\nnot a key\n-----END OPENSSH PRIVATE KEY-----\n"),
        passphrase: None,
    }));
    let error = peer.transport().probe(&garbage, &[]).await.unwrap_err();
    assert!(matches!(error, Error::Authentication { .. }), "{error:?}");
    let nothing = peer.target_with(None);
    let error = peer.transport().probe(&nothing, &[]).await.unwrap_err();
    assert!(matches!(error, Error::MissingCredential { .. }), "{error:?}");
}

#[tokio::test]
async fn an_encrypted_key_works_with_its_passphrase_only() {
    let keys_dir = tempfile::tempdir().unwrap();
    let locked = KeyPair::generate(keys_dir.path(), "id_ed25519_locked", "ed25519", "open sesame").unwrap();
    let peer = SshPeer::start_with(SshPeerOptions {
        extra_authorized_keys: vec![locked.public_key.clone()],
        ..Default::default()
    })
    .unwrap();
    let with = |passphrase: Option<&str>| {
        peer.target_with(Some(Credential::PrivateKey {
            username: "root".into(),
            key_pem: Secret::new(locked.private_key_pem.clone()),
            passphrase: passphrase.map(Secret::new),
        }))
    };
    peer.transport().probe(&with(Some("open sesame")), &[]).await.unwrap();
    let error = peer.transport().probe(&with(None), &[]).await.unwrap_err();
    match error {
        Error::Authentication { reason, .. } => assert!(reason.contains("passphrase"), "{reason}"),
        other => panic!("expected an authentication error, got {other:?}"),
    }
}

#[tokio::test]
async fn host_keys_strict_refuses_unknown_tofu_records_and_a_changed_key_is_refused() {
    let peer = SshPeer::start().unwrap();
    let fingerprint = {
        let key = peer.keys().host.public_key.split_whitespace().nth(1).unwrap().to_owned();
        let key = russh_key_fingerprint(&key);
        assert!(key.starts_with("SHA256:"), "{key}");
        key
    };
    let scratch = tempfile::tempdir().unwrap();
    let known_hosts = scratch.path().join("known_hosts");
    std::fs::write(&known_hosts, "").unwrap();
    let strict = SshTransport::new(SshOptions {
        known_hosts_file: Some(known_hosts.clone()),
        connection_reuse_seconds: 0,
        ..peer.options()
    })
    .unwrap();

    // Unknown under strict: refused, naming the host, the fingerprint and the fix.
    let error = strict.probe(&peer.target(), &[]).await.unwrap_err();
    match &error {
        Error::HostKey { address, reason } => {
            assert_eq!(address, &format!("127.0.0.1:{}", peer.port()));
            assert!(reason.contains(&fingerprint), "{reason}");
            assert!(reason.contains("ssh-keyscan"), "{reason}");
            assert!(reason.contains("trust_on_first_use"), "{reason}");
        }
        other => panic!("expected a host key error, got {other:?}"),
    }
    assert!(!error.is_transient());
    assert_eq!(std::fs::read_to_string(&known_hosts).unwrap(), "", "strict never writes known_hosts");

    // Trust on first use records it; strict trusts it from then on.
    let tofu = SshTransport::new(SshOptions {
        known_hosts_file: Some(known_hosts.clone()),
        host_key_policy: HostKeyPolicy::TrustOnFirstUse,
        // Every probe must meet the host key again: no connection reuse.
        connection_reuse_seconds: 0,
        ..peer.options()
    })
    .unwrap();
    tofu.probe(&peer.target(), &[]).await.unwrap();
    let recorded = std::fs::read_to_string(&known_hosts).unwrap();
    assert!(recorded.trim_start().starts_with(&format!("[127.0.0.1]:{} ssh-ed25519 ", peer.port())), "{recorded}");
    strict.probe(&peer.target(), &[]).await.unwrap();
    tofu.probe(&peer.target(), &[]).await.unwrap();
    assert_eq!(std::fs::read_to_string(&known_hosts).unwrap(), recorded, "a known host is not recorded twice");

    // A changed key is refused under both policies.
    let other = KeyPair::generate(scratch.path(), "other_host_key", "ed25519", "").unwrap();
    std::fs::write(&known_hosts, format!("[127.0.0.1]:{} {}\n", peer.port(), other.public_key)).unwrap();
    for transport in [&strict, &tofu] {
        match transport.probe(&peer.target(), &[]).await.unwrap_err() {
            Error::HostKey { reason, .. } => {
                assert!(reason.contains("CHANGED"), "{reason}");
                assert!(reason.contains(&fingerprint), "{reason}");
                assert!(reason.contains("ssh-keygen -R"), "{reason}");
            }
            other => panic!("expected a host key error, got {other:?}"),
        }
    }
    assert_eq!(
        std::fs::read_to_string(&known_hosts).unwrap(),
        format!("[127.0.0.1]:{} {}\n", peer.port(), other.public_key),
        "a changed key is never recorded"
    );
}

/// `SHA256:...` of a base64 public key blob, as ssh-keygen -l prints it.
fn russh_key_fingerprint(base64_blob: &str) -> String {
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("echo 'ssh-ed25519 {base64_blob}' | ssh-keygen -l -E sha256 -f -"))
        .output()
        .unwrap();
    String::from_utf8(output.stdout).unwrap().split_whitespace().nth(1).unwrap_or_default().to_owned()
}

#[tokio::test]
async fn stage_copies_and_verifies_a_5_mib_installer() {
    let peer = SshPeer::start().unwrap();
    let transport = peer.transport();
    let fixture = fixture(5 << 20);
    let deployment = deployment(peer.target().target_id, 1, &fixture);
    let started = Instant::now();
    transport.stage(&peer.target(), &deployment).await.unwrap();
    let elapsed = started.elapsed();
    println!(
        "stage of the agent, the plan and a 5 MiB installer: {:.1} ms ({:.1} MiB/s)",
        elapsed.as_secs_f64() * 1e3,
        5.0 / elapsed.as_secs_f64()
    );

    let dir = peer.staging_dir(deployment.id());
    assert_eq!(mode(&dir), 0o700);
    let agent = dir.join("fleetpatch-agent");
    assert_eq!(mode(&agent), 0o755);
    assert_eq!(std::fs::read_to_string(&agent).unwrap(), test_agent());
    let plan = dir.join("plan.json");
    assert_eq!(mode(&plan), 0o600, "the plan holds the report token");
    let staged_plan: DeploymentPlan = serde_json::from_slice(&std::fs::read(&plan).unwrap()).unwrap();
    assert_eq!(staged_plan, deployment.plan);
    let installer = fixture.installer.as_ref().unwrap();
    let copied = std::fs::read(dir.join(&installer.name)).unwrap();
    assert_eq!(copied.len(), 5 << 20);
    assert_eq!(hex::encode(Sha256::digest(&copied)), installer.sha256);
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".part"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Staging again (a retried job) is fine and leaves the same files.
    let started = Instant::now();
    transport.stage(&peer.target(), &deployment).await.unwrap();
    println!("second stage (installer already there): {:.1} ms", started.elapsed().as_secs_f64() * 1e3);
    assert_eq!(std::fs::read(dir.join(&installer.name)).unwrap(), copied);
}

#[tokio::test]
async fn stage_refuses_an_installer_that_does_not_match_its_checksum() {
    let peer = SshPeer::start().unwrap();
    let fixture = fixture(64 << 10);
    let mut deployment = deployment(peer.target().target_id, 1, &fixture);
    deployment.files[0].sha256 = "0".repeat(64);
    let error = peer.transport().stage(&peer.target(), &deployment).await.unwrap_err();
    match &error {
        Error::LocalFile { reason, .. } => assert!(reason.contains("does not match"), "{reason}"),
        other => panic!("expected a local file error, got {other:?}"),
    }
    let dir = peer.staging_dir(deployment.id());
    assert!(!dir.join("big-installer.deb").exists());
    assert!(!dir.join(".big-installer.deb.part").exists());

    let mut hostile = deployment.clone();
    hostile.files[0].name = "../../etc/evil".into();
    let error = peer.transport().stage(&peer.target(), &hostile).await.unwrap_err();
    assert!(matches!(error, Error::LocalFile { .. }), "{error:?}");
}

#[tokio::test]
async fn start_agent_detached_once_then_already_running_and_cleanup_stops_it() {
    let peer = SshPeer::start().unwrap();
    let transport = peer.transport();
    let target = peer.target();
    let fixture = fixture(0);
    let deployment = deployment(target.target_id, 1, &fixture);
    let dir = peer.staging_dir(deployment.id());

    let error = transport.start_agent(&target, &deployment).await.unwrap_err();
    match &error {
        Error::Remote { reason, transient: false, .. } => assert!(reason.contains("not staged"), "{reason}"),
        other => panic!("expected a permanent remote error, got {other:?}"),
    }

    transport.stage(&target, &deployment).await.unwrap();
    assert_eq!(transport.start_agent(&target, &deployment).await.unwrap(), AgentStart::Started);
    let ran = dir.join("agent-ran");
    wait_for("the agent to run", || ran.exists()).await;
    let pid: u32 = std::fs::read_to_string(dir.join("agent.pid")).unwrap().trim().parse().unwrap();
    let recorded = std::fs::read_to_string(&ran).unwrap();
    assert!(recorded.starts_with(&format!("{pid} run --plan {}", dir.join("plan.json").display())), "{recorded}");
    assert!(pid_alive(pid));

    // A worker that takes over the job calls it again: no second agent.
    assert_eq!(transport.start_agent(&target, &deployment).await.unwrap(), AgentStart::AlreadyRunning);
    assert_eq!(std::fs::read_to_string(&ran).unwrap(), recorded, "the agent was not started twice");

    transport.cleanup(&target, deployment.id(), false).await.unwrap();
    wait_for("the agent to stop", || !pid_alive(pid)).await;
    assert!(!dir.exists(), "the staging directory is removed");
    transport.cleanup(&target, deployment.id(), false).await.unwrap();
}

#[tokio::test]
async fn an_agent_that_already_ran_is_not_started_again() {
    let peer = SshPeer::start().unwrap();
    let transport = peer.transport();
    let target = peer.target();
    let fixture = fixture(0);
    let deployment = deployment(target.target_id, 2, &fixture);
    transport.stage(&target, &deployment).await.unwrap();
    assert_eq!(transport.start_agent(&target, &deployment).await.unwrap(), AgentStart::Started);
    let dir = peer.staging_dir(deployment.id());
    wait_for("the agent to run", || dir.join("agent-ran").exists()).await;
    let pid: u32 = std::fs::read_to_string(dir.join("agent.pid")).unwrap().trim().parse().unwrap();
    // The agent finishes (here: killed) before the job is taken over.
    std::process::Command::new("kill").args(["-TERM", "--", &format!("-{pid}")]).status().unwrap();
    wait_for("the agent to end", || !pid_alive(pid)).await;
    assert_eq!(transport.start_agent(&target, &deployment).await.unwrap(), AgentStart::AlreadyRunning);
    transport.cleanup(&target, deployment.id(), false).await.unwrap();
    assert!(!dir.exists());
}

#[tokio::test]
async fn preflight_passes_on_a_ready_target() {
    let peer = SshPeer::start().unwrap();
    let collector = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let context = PreflightContext {
        collector_url: format!("http://127.0.0.1:{}", collector.local_addr().unwrap().port()),
        staging_bytes: 5 << 20,
    };
    let checks = peer.transport().preflight(&peer.target(), &context).await.unwrap();
    let names: Vec<&str> = checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["port", "host_key", "login", "admin_rights", "free_space", "tools", "collector"]);
    for check in &checks {
        assert!(check.ok, "{check:?}");
        assert!(check.fix.is_none(), "{check:?}");
    }
}

#[tokio::test]
async fn preflight_names_the_cause_and_the_fix_of_failed_checks() {
    let peer = SshPeer::start().unwrap();
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let context =
        PreflightContext { collector_url: format!("http://127.0.0.1:{closed_port}"), staging_bytes: u64::MAX / 4 };
    let checks = peer.transport().preflight(&peer.target(), &context).await.unwrap();
    let by_name = |name: &str| checks.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("{name}: {checks:?}"));
    assert!(by_name("login").ok);
    let space = by_name("free_space");
    assert!(!space.ok, "{space:?}");
    assert!(space.detail.contains("MiB free"), "{space:?}");
    assert!(space.fix.as_deref().unwrap().contains("staging_root"), "{space:?}");
    let collector = by_name("collector");
    assert!(!collector.ok, "{collector:?}");
    assert!(collector.detail.contains(&format!("127.0.0.1:{closed_port}")), "{collector:?}");
    assert!(collector.fix.as_deref().unwrap().contains("firewall"), "{collector:?}");

    // Unknown host key: port passes, host_key fails with the fingerprint.
    let scratch = tempfile::tempdir().unwrap();
    let empty = scratch.path().join("known_hosts");
    std::fs::write(&empty, "").unwrap();
    let strict = SshTransport::new(SshOptions { known_hosts_file: Some(empty), ..peer.options() }).unwrap();
    let checks = strict.preflight(&peer.target(), &context).await.unwrap();
    assert_eq!(checks.len(), 2, "{checks:?}");
    assert!(checks[0].ok && checks[0].name == "port", "{checks:?}");
    assert!(!checks[1].ok && checks[1].name == "host_key", "{checks:?}");
    assert!(checks[1].detail.contains("SHA256:"), "{checks:?}");
    assert!(checks[1].fix.is_some());

    // Nothing listening: the port check fails and says what to do.
    let mut gone = peer.target();
    gone.port = Some(closed_port);
    let checks = peer.transport().preflight(&gone, &context).await.unwrap();
    assert_eq!(checks.len(), 1, "{checks:?}");
    assert!(!checks[0].ok && checks[0].name == "port", "{checks:?}");
    assert!(checks[0].fix.as_deref().unwrap().contains("sshd"), "{checks:?}");

    // No credential: the port and the host key are still really checked.
    let mut nothing = peer.target_with(None);
    let checks = peer.transport().preflight(&nothing, &context).await.unwrap();
    let names: Vec<(&str, bool)> = checks.iter().map(|c| (c.name.as_str(), c.ok)).collect();
    assert_eq!(names, [("port", true), ("host_key", true), ("login", false)], "{checks:?}");
    nothing.port = Some(closed_port);
    let checks = peer.transport().preflight(&nothing, &context).await.unwrap();
    let names: Vec<(&str, bool)> = checks.iter().map(|c| (c.name.as_str(), c.ok)).collect();
    assert_eq!(names, [("port", false)], "a closed port is not reported as open: {checks:?}");
}

#[tokio::test]
async fn a_refused_connection_is_transient_unreachable() {
    let peer = SshPeer::start().unwrap();
    let mut target = peer.target();
    target.port = Some({
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    });
    let error = peer.transport().probe(&target, &[]).await.unwrap_err();
    assert!(matches!(error, Error::Unreachable { .. }), "{error:?}");
    assert!(error.is_transient());
}

#[tokio::test]
async fn a_stopped_peer_is_unreachable() {
    let mut peer = SshPeer::start().unwrap();
    peer.transport().probe(&peer.target(), &[]).await.unwrap();
    peer.stop();
    let error = peer.transport().probe(&peer.target(), &[]).await.unwrap_err();
    assert!(error.is_transient(), "{error:?}");
}

#[tokio::test]
async fn a_fleet_of_peers_starts_quickly_and_each_target_gets_its_own_files() {
    let started = Instant::now();
    let fleet = SshFleet::start(5).unwrap();
    println!("5 sshd peers started in {:.1} ms", started.elapsed().as_secs_f64() * 1e3);
    let transport = fleet.transport();
    let fixture = fixture(16 << 10);
    let mut tasks = Vec::new();
    for target in fleet.targets() {
        let transport = transport.clone();
        let deployment = deployment(target.target_id, 1, &fixture);
        tasks.push(tokio::spawn(async move {
            transport.probe(&target, &[]).await?;
            transport.stage(&target, &deployment).await?;
            Ok::<_, Error>(deployment.id().to_owned())
        }));
    }
    for (peer, task) in fleet.peers().iter().zip(tasks) {
        let id = task.await.unwrap().unwrap();
        assert!(peer.staging_dir(&id).join("big-installer.deb").exists(), "{}", peer.staging_dir(&id).display());
    }
}

/// Per-step latency against a loopback sshd (printed; the README quotes it).
#[tokio::test]
async fn step_latency_against_loopback_sshd() {
    let peer = SshPeer::start().unwrap();
    let transport = peer.transport();
    let target = peer.target();
    let patches = [patch(0, "bash", dpkg("bash", None)), patch(1, "openssl", dpkg("openssl", Some("3.0.0")))];
    let fixture = fixture(0);
    let rounds = 5u32;
    let mut totals = [Duration::ZERO; 5];
    for round in 0..rounds {
        let deployment = deployment(target.target_id, 10 + round, &fixture);
        let t = Instant::now();
        transport.probe(&target, &patches).await.unwrap();
        totals[0] += t.elapsed();
        let t = Instant::now();
        transport.stage(&target, &deployment).await.unwrap();
        totals[1] += t.elapsed();
        let t = Instant::now();
        assert_eq!(transport.start_agent(&target, &deployment).await.unwrap(), AgentStart::Started);
        totals[2] += t.elapsed();
        let t = Instant::now();
        transport.verify(&target, &patches).await.unwrap();
        totals[3] += t.elapsed();
        let t = Instant::now();
        transport.cleanup(&target, deployment.id(), false).await.unwrap();
        totals[4] += t.elapsed();
    }
    for (step, total) in ["probe", "stage (agent+plan)", "start_agent", "verify", "cleanup"].iter().zip(totals) {
        println!("{step}: {:.1} ms mean over {rounds}", total.as_secs_f64() * 1e3 / f64::from(rounds));
    }
}

/// Logins the peer accepted so far (sshd logs at VERBOSE).
fn logins(peer: &SshPeer) -> usize {
    peer.log().lines().filter(|line| line.contains("Accepted publickey")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_logs_in_once_when_connections_are_reused() {
    let peer = SshPeer::start_with(SshPeerOptions { password_auth: true, ..SshPeerOptions::default() }).unwrap();
    let fixture = fixture(4096);
    let target = peer.target();

    // Reuse on (the default): probe, stage, start and cleanup share one login.
    let transport = SshTransport::new(peer.options()).unwrap();
    let first = deployment(target.target_id, 1, &fixture);
    let before = logins(&peer);
    transport.probe(&target, &[]).await.unwrap();
    transport.stage(&target, &first).await.unwrap();
    assert_eq!(transport.start_agent(&target, &first).await.unwrap(), AgentStart::Started);
    transport.cleanup(&target, first.id(), false).await.unwrap();
    assert_eq!(logins(&peer) - before, 1, "sshd log:\n{}", peer.log());
    assert_eq!(transport.idle_connections().await, 1);

    // A command that ran and failed leaves a healthy connection: kept.
    let never_staged = deployment(target.target_id, 7, &fixture);
    let before = logins(&peer);
    transport.start_agent(&target, &never_staged).await.unwrap_err();
    assert_eq!((logins(&peer) - before, transport.idle_connections().await), (0, 1));

    // Another credential never gets a connection logged in with this one.
    let other = peer.target_with(Some(peer.password_credential()));
    let passwords = |peer: &SshPeer| peer.log().lines().filter(|l| l.contains("Accepted password")).count();
    let before = passwords(&peer);
    transport.probe(&other, &[]).await.unwrap();
    assert_eq!(passwords(&peer) - before, 1, "the password target logged in with its own credential");
    assert_eq!(transport.idle_connections().await, 2);

    // Reuse off: every step logs in.
    let transport = SshTransport::new(SshOptions { connection_reuse_seconds: 0, ..peer.options() }).unwrap();
    let second = deployment(target.target_id, 2, &fixture);
    let before = logins(&peer);
    transport.probe(&target, &[]).await.unwrap();
    transport.stage(&target, &second).await.unwrap();
    transport.start_agent(&target, &second).await.unwrap();
    transport.cleanup(&target, second.id(), false).await.unwrap();
    assert_eq!(logins(&peer) - before, 4, "sshd log:\n{}", peer.log());
    assert_eq!(transport.idle_connections().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_that_stopped_answering_is_replaced_by_a_fresh_login() {
    let peer = SshPeer::start().unwrap();
    let target = peer.target();
    let transport = SshTransport::new(SshOptions { connect_timeout_seconds: 2, ..peer.options() }).unwrap();
    transport.probe(&target, &[]).await.unwrap();
    assert_eq!(transport.idle_connections().await, 1);

    // The kept connection's sshd goes silent (as a rebooted host or a
    // firewall that dropped the idle flow): nothing closes the TCP stream.
    let frozen = peer.connection_pids();
    assert!(!frozen.is_empty(), "the kept connection has its sshd processes");
    assert_eq!(peer.signal_connections("STOP"), frozen.len());
    let before = logins(&peer);
    let started = Instant::now();
    let report = transport.probe(&target, &[]).await;
    let elapsed = started.elapsed();
    for pid in &frozen {
        let _ = std::process::Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
        let _ = std::process::Command::new("kill").arg("-CONT").arg(pid.to_string()).status();
    }
    report.expect("the step logs in again instead of failing on the silent connection");
    assert_eq!(logins(&peer) - before, 1, "one fresh login; sshd log:\n{}", peer.log());
    assert!(elapsed < Duration::from_secs(10), "the silent connection was given up after its keepalive: {elapsed:?}");

    // A connection whose server side is gone is replaced too.
    let before = logins(&peer);
    assert!(peer.signal_connections("KILL") > 0);
    transport.probe(&target, &[]).await.expect("a fresh login after the server closed the kept connection");
    assert_eq!(logins(&peer) - before, 1);
}
