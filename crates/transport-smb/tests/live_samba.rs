//! The `smb` transport's steps against a real Samba `smbd` on loopback,
//! started by each test with a private configuration (`SambaPeer`).
//!
//! Samba serves the admin shares, the remote registry and the service
//! manager's open/query calls as Windows does; it does not implement service
//! creation, so `start_agent` must fail saying exactly that.

use std::collections::BTreeMap;
use std::path::Path;

use fleetpatch_proto::plan::{DeploymentPlan, Detection, InstallerKind, PlanPatch, RebootPolicy, PLAN_VERSION};
use fleetpatch_transport::{
    Credential, Deployment, Error, PatchProbe, PreflightContext, Secret, StagedFile, TargetSpec, Transport,
};
use fleetpatch_transport_smb::{SmbTransport, SmbTransportOptions, AGENT_FILE_NAME};
use fleetpatch_winproto::test_support::{windows_registry_seed, SambaPeer, ADMIN_PASSWORD, ADMIN_USER};
use sha2::{Digest, Sha256};
use uuid::Uuid;

fn transport(peer: &SambaPeer) -> SmbTransport {
    SmbTransport::new(SmbTransportOptions {
        port: peer.address().port(),
        timeout_seconds: 10,
        service_timeout_seconds: 5,
        ..SmbTransportOptions::default()
    })
    .unwrap()
}

fn target(peer: &SambaPeer, password: &str) -> TargetSpec {
    TargetSpec {
        target_id: Uuid::new_v4(),
        host: "127.0.0.1".into(),
        port: Some(peer.address().port()),
        labels: BTreeMap::new(),
        credential: Some(Credential::Password { username: ADMIN_USER.into(), password: Secret::new(password) }),
    }
}

fn hotfix(index: u32, kb: &str) -> PatchProbe {
    PatchProbe { index, name: format!("patch {kb}"), detection: Some(Detection::Hotfix { kb: kb.into() }) }
}

fn patches() -> Vec<PatchProbe> {
    vec![
        hotfix(0, "KB5031356"),
        hotfix(1, "KB5034441"),
        hotfix(2, "kb5030211"),
        PatchProbe {
            index: 3,
            name: "a deb".into(),
            detection: Some(Detection::Dpkg { package: "curl".into(), version: None }),
        },
    ]
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A deployment with one installer of `bytes`, declared with `declared_sha`.
fn deployment(dir: &Path, target: &TargetSpec, bytes: &[u8], declared_sha: &str) -> Deployment {
    let agent = dir.join("agent.exe");
    std::fs::write(&agent, b"MZ not really an agent").unwrap();
    let installer = dir.join("kb5034441.msu");
    std::fs::write(&installer, bytes).unwrap();
    let deployment_id = fleetpatch_proto::plan::deployment_id(target.target_id, 1);
    Deployment {
        plan: DeploymentPlan {
            version: PLAN_VERSION,
            deployment_id,
            target_id: target.target_id,
            attempt: 1,
            collector_url: "http://127.0.0.1:1072".into(),
            collector_ca_pem: None,
            token: "token".into(),
            heartbeat_seconds: 30,
            patches: vec![PlanPatch {
                index: 1,
                name: "KB5034441".into(),
                file: "kb5034441.msu".into(),
                sha256: declared_sha.into(),
                size: 0,
                sources: Vec::new(),
                installer: InstallerKind::Msu,
                arguments: String::new(),
                success_codes: vec![0],
                reboot_codes: vec![3010],
                timeout_seconds: 600,
            }],
            reboot: RebootPolicy::Never,
            reboot_command: None,
            keep_files: false,
            relay_ca_pem: None,
            download_timeout_seconds: fleetpatch_proto::plan::DEFAULT_DOWNLOAD_TIMEOUT_SECONDS,
        },
        agent_binary: Some(agent),
        files: vec![StagedFile {
            name: "kb5034441.msu".into(),
            source: installer,
            sha256: declared_sha.into(),
            size: bytes.len() as u64,
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_reads_version_architecture_and_installed_hotfixes_from_the_registry() {
    let peer = SambaPeer::start_or_panic();
    peer.import_registry(&windows_registry_seed(
        &["KB5031356"],
        &[
            ("Package_for_KB5030211~31bf3856ad364e35~amd64~~19041.3448.1.6", 0x70),
            ("Package_for_KB5034441~31bf3856ad364e35~amd64~~19041.3920.1.6", 0x20),
        ],
    ))
    .unwrap();
    let transport = transport(&peer);
    let spec = target(&peer, ADMIN_PASSWORD);
    let report = transport.probe(&spec, &patches()).await.unwrap();
    assert_eq!(report.os, "windows");
    assert!(report.os_version.starts_with("6.1"), "Samba says CurrentVersion 6.1: {report:?}");
    assert_eq!(report.arch, "x86_64");
    assert!(report.is_admin);
    // KB5031356 under Uninstall, KB5030211 as an installed CBS package;
    // KB5034441's package is only staged (0x20), the dpkg rule does not apply.
    assert_eq!(report.installed, [0, 2]);
    assert_eq!(report.details.get("processor_architecture").map(String::as_str), Some("AMD64"));
    assert!(report.details["not_applicable"].contains("a deb"), "{:?}", report.details);
    assert!(report.details.contains_key("smb_dialect"));

    let verify = transport.verify(&spec, &patches()).await.unwrap();
    // The dpkg rule cannot be judged from a Windows registry: unknown, not missing.
    assert_eq!((verify.installed, verify.missing, verify.unknown), (vec![0, 2], vec![1], vec![3]));

    // The boot: `ShutdownTime` (a FILETIME Windows writes as it shuts down)
    // tells a machine that restarted from one that has not. None without it.
    assert_eq!(report.boot_id, None, "{report:?}");
    let shutdown_time = |bytes: &str| {
        format!(
            "Windows Registry Editor Version 5.00\n\n\
             [HKEY_LOCAL_MACHINE\\SYSTEM\\CurrentControlSet\\Control\\Windows]\n\"ShutdownTime\"=hex:{bytes}\n"
        )
    };
    peer.import_registry(&shutdown_time("00,d1,2e,7a,4c,60,db,01")).unwrap();
    let before = transport.probe(&spec, &[]).await.unwrap().boot_id;
    assert_eq!(before.as_deref(), Some("00d12e7a4c60db01"));
    peer.import_registry(&shutdown_time("80,3c,91,c5,51,60,db,01")).unwrap();
    let after = transport.probe(&spec, &[]).await.unwrap().boot_id;
    assert_eq!(after.as_deref(), Some("803c91c55160db01"), "a restart writes a new ShutdownTime");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_then_start_fails_clearly_and_cleanup_removes_everything() {
    let peer = SambaPeer::start_or_panic();
    let transport = transport(&peer);
    let spec = target(&peer, ADMIN_PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let bytes: Vec<u8> = (0..5u32 << 20).map(|i| (i % 251) as u8).collect();
    let deployment = deployment(dir.path(), &spec, &bytes, &sha256(&bytes));

    transport.stage(&spec, &deployment).await.unwrap();
    let folder = peer.share_directory().join("Windows").join("Patches").join(deployment.id());
    assert_eq!(sha256(&std::fs::read(folder.join("kb5034441.msu")).unwrap()), sha256(&bytes));
    assert_eq!(std::fs::read(folder.join(AGENT_FILE_NAME)).unwrap(), b"MZ not really an agent");
    let plan: DeploymentPlan = serde_json::from_slice(&std::fs::read(folder.join("plan.json")).unwrap()).unwrap();
    assert_eq!(plan.deployment_id, deployment.id());
    // A second stage (a retried job) overwrites in place.
    transport.stage(&spec, &deployment).await.unwrap();

    let error = transport.start_agent(&spec, &deployment).await.unwrap_err();
    assert!(matches!(error, Error::NotSupported { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("does not implement") && message.contains("nca_s_op_rng_error"), "{message}");
    assert!(!error.is_transient());
    // The service was never created, so the start marker is gone again and a
    // retried job may try once more (and fails the same way).
    assert!(!folder.join("agent.started").exists());
    let again = transport.start_agent(&spec, &deployment).await.unwrap_err();
    assert!(matches!(again, Error::NotSupported { .. }), "{again:?}");
    // A marker left by a start whose outcome is unknown (an answer lost in
    // transit) makes every later call answer AlreadyRunning: at most once.
    std::fs::write(folder.join("agent.started"), "fleetpatch-").unwrap();
    assert_eq!(
        transport.start_agent(&spec, &deployment).await.unwrap(),
        fleetpatch_transport::AgentStart::AlreadyRunning
    );

    // keep_files: the service part runs (there is no service), files stay.
    transport.cleanup(&spec, deployment.id(), true).await.unwrap();
    assert!(folder.join("kb5034441.msu").is_file());
    transport.cleanup(&spec, deployment.id(), false).await.unwrap();
    assert!(!folder.exists(), "cleanup left {}", folder.display());
    // Idempotent.
    transport.cleanup(&spec, deployment.id(), false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_installer_that_does_not_match_its_checksum_is_refused_and_removed() {
    let peer = SambaPeer::start_or_panic();
    let transport = transport(&peer);
    let spec = target(&peer, ADMIN_PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let deployment = deployment(dir.path(), &spec, b"the real bytes", &sha256(b"other bytes"));
    let error = transport.stage(&spec, &deployment).await.unwrap_err();
    assert!(matches!(error, Error::LocalFile { .. }), "{error:?}");
    assert!(error.to_string().contains("does not match"), "{error}");
    let folder = peer.share_directory().join("Windows").join("Patches").join(deployment.id());
    assert!(!folder.join("kb5034441.msu").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_passes_on_samba_and_names_the_cause_of_each_failure() {
    let peer = SambaPeer::start_or_panic();
    let transport = transport(&peer);
    let context = PreflightContext { collector_url: "http://127.0.0.1:1072".into(), staging_bytes: 1 << 20 };

    let checks = transport.preflight(&target(&peer, ADMIN_PASSWORD), &context).await.unwrap();
    let names: Vec<&str> = checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["port", "login", "admin_share", "remote_registry", "service_manager"]);
    assert!(checks.iter().all(|c| c.ok), "{checks:#?}");
    // The write test left nothing behind.
    let leftovers: Vec<_> = std::fs::read_dir(peer.share_directory())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("fleetpatch-preflight"))
        .collect();
    assert!(leftovers.is_empty());

    let checks = transport.preflight(&target(&peer, "wrong"), &context).await.unwrap();
    let login = checks.iter().find(|c| c.name == "login").unwrap();
    assert!(!login.ok);
    assert!(login.detail.contains("STATUS_LOGON_FAILURE"), "{login:?}");
    assert!(login.fix.as_deref().unwrap().contains("wrong credentials"), "{login:?}");

    // Nothing listens on a port taken and released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut spec = target(&peer, ADMIN_PASSWORD);
    spec.port = Some(closed);
    let checks = transport.preflight(&spec, &context).await.unwrap();
    assert_eq!(checks.len(), 1);
    assert!(!checks[0].ok && checks[0].name == "port");
    assert!(checks[0].fix.as_deref().unwrap().contains("445"), "{:?}", checks[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_key_or_no_credential_is_refused_before_connecting() {
    let peer = SambaPeer::start_or_panic();
    let transport = transport(&peer);
    let mut spec = target(&peer, ADMIN_PASSWORD);
    spec.credential = None;
    let error = transport.probe(&spec, &[]).await.unwrap_err();
    assert!(matches!(error, Error::MissingCredential { .. }), "{error:?}");
    spec.credential = Some(Credential::PrivateKey {
        username: "root".into(),
        key_pem: Secret::new("-----BEGIN OPENSSH PRIVATE KEY-----"),
        passphrase: None,
    });
    let error = transport.probe(&spec, &[]).await.unwrap_err();
    assert!(error.to_string().contains("user:password"), "{error}");

    let error = transport.probe(&target(&peer, "wrong"), &[]).await.unwrap_err();
    assert!(matches!(error, Error::Authentication { .. }), "{error:?}");
}
