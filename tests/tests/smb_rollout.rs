//! A rollout to a Windows-style target over the real `smb` transport, end to
//! end against a private Samba peer (started by the test on loopback), with
//! the scheduler, the workers and the collector on the machine's RabbitMQ
//! and PostgreSQL.
//!
//! Samba answers the remote registry and the file shares as Windows does,
//! but it does not implement service creation (`RCreateServiceW` gives the
//! DCE/RPC fault `nca_s_op_rng_error`): the probe and the staging run for
//! real, and the target then fails at the agent service with a message that
//! says the server does not implement it. The cleanup that follows removes
//! the staged files (or keeps them when the rollout says so).

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetpatch_proto::state::{PatchState, RolloutState, TargetState};
use fleetpatch_tests::{credential_in_file, Sandbox, SandboxOptions};
use fleetpatch_transport_smb::SmbTransportOptions;
use fleetpatch_winproto::test_support::{windows_registry_seed, SambaPeer, ADMIN_PASSWORD, ADMIN_USER};
use sha2::{Digest, Sha256};

fn hotfix(name: &str, kb: &str, file: &str, sha256: &str, size: u64) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "file": file,
        "sha256": sha256,
        "size": size,
        "installer": "msu",
        "detection": {"kind": "hotfix", "kb": kb},
        "timeout_seconds": 600,
    })
}

/// A sandbox whose workers reach `peer`, with the named credential
/// `samba-admin` whose secret is in `credential` (scoped to smb on 127.0.0.1).
async fn samba_sandbox(peer: &SambaPeer, credential: &Path) -> Sandbox {
    Sandbox::start(SandboxOptions {
        credentials: [("samba-admin".to_owned(), credential_in_file(credential, &["smb"], &["127.0.0.1"]))].into(),
        workers: 1,
        worker_concurrency: 4,
        verify_delay_seconds: 1,
        smb: Some(SmbTransportOptions {
            port: peer.address().port(),
            service_timeout_seconds: 5,
            ..SmbTransportOptions::default()
        }),
        ..SandboxOptions::default()
    })
    .await
}

fn credential_file(dir: &Path) -> PathBuf {
    let path = dir.join("samba-admin.secret");
    std::fs::write(&path, format!("{ADMIN_USER}:{ADMIN_PASSWORD}")).unwrap();
    path
}

fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_samba_target_is_probed_and_staged_for_real_and_fails_at_service_creation() {
    let peer = SambaPeer::start_or_panic();
    // The keys the probe reads: the architecture, one hotfix under Uninstall,
    // one as an installed CBS package (and one CBS package only staged).
    peer.import_registry(&windows_registry_seed(
        &["KB5031356"],
        &[
            ("Package_for_KB5030211~31bf3856ad364e35~amd64~~19041.3448.1.6", 0x70),
            ("Package_for_KB5034441~31bf3856ad364e35~amd64~~19041.3920.1.6", 0x20),
        ],
    ))
    .unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let credential = credential_file(secrets.path());
    let sandbox = samba_sandbox(&peer, &credential).await;

    // 3 MiB of installer: one hotfix is missing, two are installed already.
    let installer: Vec<u8> = (0..3u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let (sha256, size) = sandbox.upload_content(installer).await;
    let request = |name: &str, keep_files: bool| {
        serde_json::json!({
            "name": name,
            "concurrency": 1,
            "timeout_seconds": 60,
            "max_tries": 1,
            "keep_files": keep_files,
            "patches": [
                hotfix("2023-10 cumulative", "KB5031356", "windows10.0-kb5031356-x64.msu", &sha256, size),
                hotfix("2024-01 WinRE", "kb5034441", "windows10.0-kb5034441-x64.msu", &sha256, size),
                hotfix("2023-09 cumulative", "5030211", "windows10.0-kb5030211-x64.msu", &sha256, size),
            ],
            "targets": [{
                "host": "127.0.0.1",
                "port": peer.address().port(),
                "transport": "smb",
                "credential": "samba-admin",
            }],
        })
    };

    // keep_files: the staged folder stays after the cleanup, for inspection.
    let id = sandbox.create_rollout(request("samba-keep", true)).await;
    sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(90)).await;
    let target = sandbox.all_targets(id).await.remove(0);
    assert_eq!(target.state, TargetState::Failed, "{target:?}");
    let error = target.error.clone().unwrap_or_default();
    assert!(
        error.contains("does not implement") && error.contains("svcctl") && error.contains("nca_s_op_rng_error"),
        "the failure must say the server does not implement service creation: {error}"
    );
    // The probe ran through the registry.
    assert_eq!(target.os.as_deref(), Some("windows"));
    assert_eq!(target.arch.as_deref(), Some("x86_64"));
    let patches = sandbox.store.target_patches(target.id).await.unwrap();
    let states: Vec<PatchState> = patches.iter().map(|p| p.state).collect();
    assert_eq!(states, [PatchState::Skipped, PatchState::Failed, PatchState::Skipped], "{patches:?}");

    // The staging was real: agent, plan and the one missing installer, intact.
    let deployment = fleetpatch_proto::plan::deployment_id(target.id, target.attempt);
    let folder = peer.share_directory().join("Windows").join("Patches").join(&deployment);
    let kept_folder = folder.clone();
    let mut names: Vec<String> = std::fs::read_dir(&folder)
        .unwrap_or_else(|e| panic!("staged folder {} missing: {e}", folder.display()))
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    // (No `agent.started`: the service was never created, so a retry may try again.)
    assert_eq!(names, ["fleetpatch-agent.exe", "plan.json", "windows10.0-kb5034441-x64.msu"]);
    assert_eq!(sha256_file(&folder.join("windows10.0-kb5034441-x64.msu")), sha256);
    assert_eq!(sha256_file(&folder.join("fleetpatch-agent.exe")), sha256_file(fleetpatch_tests::agent_binary()));
    let plan: serde_json::Value = serde_json::from_slice(&std::fs::read(folder.join("plan.json")).unwrap()).unwrap();
    assert_eq!(plan["deployment_id"], deployment.as_str());
    assert_eq!(plan["patches"].as_array().map(Vec::len), Some(1), "only the missing hotfix is planned: {plan}");

    // Without keep_files, the cleanup removes the staged folder.
    let id = sandbox.create_rollout(request("samba-clean", false)).await;
    sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(90)).await;
    let target = sandbox.all_targets(id).await.remove(0);
    assert_eq!(target.state, TargetState::Failed);
    let deployment = fleetpatch_proto::plan::deployment_id(target.id, target.attempt);
    let folder = peer.share_directory().join("Windows").join("Patches").join(&deployment);
    sandbox
        .wait_for("the cleanup to remove the staged folder", Duration::from_secs(30), async || {
            (!folder.exists()).then_some(())
        })
        .await;
    // By now the first rollout's cleanup ran too (it was queued earlier):
    // with keep_files its folder is still there.
    assert!(kept_folder.join("windows10.0-kb5034441-x64.msu").is_file(), "keep_files was not honoured");
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_fails_that_target_clearly() {
    let peer = SambaPeer::start_or_panic();
    let secrets = tempfile::tempdir().unwrap();
    let credential = secrets.path().join("wrong.secret");
    std::fs::write(&credential, format!("{ADMIN_USER}:not-the-password")).unwrap();
    let sandbox = samba_sandbox(&peer, &credential).await;
    let (sha256, size) = sandbox.upload_content(b"MSCF fake cab".to_vec()).await;
    let id = sandbox
        .create_rollout(serde_json::json!({
            "name": "samba-wrong-password",
            "concurrency": 1,
            "max_tries": 1,
            "patches": [hotfix("p", "KB1", "p.msu", &sha256, size)],
            "targets": [{
                "host": "127.0.0.1",
                "port": peer.address().port(),
                "transport": "smb",
                "credential": "samba-admin",
            }],
        }))
        .await;
    sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(60)).await;
    let target = sandbox.all_targets(id).await.remove(0);
    assert_eq!(target.state, TargetState::Failed);
    let error = target.error.unwrap_or_default();
    assert!(error.contains("STATUS_LOGON_FAILURE") && error.contains("Administrator"), "{error}");
    sandbox.stop().await;
}
