//! The `smb` path end to end on a Windows that runs here: Wine.
//!
//! A private Samba peer serves the Wine prefix's `C:` as `C$` (and
//! `ADMIN$`), so the worker's real probe (Samba's remote registry), its real
//! staging over SMB (the Windows agent, the plan, the installers) land where
//! Wine runs them. Samba has no `RCreateServiceW`, so the transport's own
//! service calls, with its own `ServiceSpec` (name, command line, start
//! type, account), are handed to Wine's service manager
//! (`fleetpatch_tests::wine::WineServices`). The agent then runs as a Wine
//! service, installs a real MSI and a batch file, reports to the sandbox's
//! real collector, and the rollout reaches its final state; the cleanup
//! stops and deletes the service and removes the staged files over SMB.
//!
//! What this proves live and what it does not: the SMB2 session, the share,
//! the file operations and `winreg` run against Samba; the service's
//! creation, start, query, stop and delete run against Wine's service
//! manager through the same calls, not over `svcctl` (whose requests are
//! checked byte for byte against Impacket in `crates/winproto`).

use std::time::Duration;

use fleetpatch_proto::state::{PatchState, RolloutState, TargetState};
use fleetpatch_tests::wine::{agent_exe, build_msi, Wine, WineServices};
use fleetpatch_tests::{credential_in_file, Sandbox, SandboxOptions};
use fleetpatch_transport_smb::{SmbTransport, SmbTransportOptions};
use fleetpatch_winproto::test_support::{windows_registry_seed, SambaPeer, ADMIN_PASSWORD, ADMIN_USER};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_over_smb_installs_real_installers_on_wine_and_cleans_up() {
    let wine = Wine::prepare();
    let peer = SambaPeer::start_serving_c_drive(&wine.c_drive()).unwrap_or_else(|error| {
        let in_ci = std::env::var("CI").is_ok_and(|value| value == "true");
        panic!("the Samba test peer is required{}: {error}", if in_ci { " in CI" } else { "" })
    });
    peer.import_registry(&windows_registry_seed(&[], &[])).unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let credential = secrets.path().join("samba-admin.secret");
    std::fs::write(&credential, format!("{ADMIN_USER}:{ADMIN_PASSWORD}")).unwrap();
    let services = WineServices::new(wine.clone());
    let smb = SmbTransportOptions { port: peer.address().port(), service_timeout_seconds: 30, ..Default::default() };
    let sandbox = Sandbox::start(SandboxOptions {
        credentials: [("samba-admin".to_owned(), credential_in_file(&credential, &["smb"], &["127.0.0.1"]))].into(),
        workers: 1,
        worker_concurrency: 2,
        smb: Some(smb.clone()),
        smb_service_managers: Some(std::sync::Arc::new(services.clone())),
        agent_binary: Some(agent_exe()),
        step_timeout_seconds: 120,
        ..SandboxOptions::default()
    })
    .await;

    let work = tempfile::tempdir().unwrap();
    let msi = work.path().join("product.msi");
    let product = format!("fleetpatch smb wine test {}", uuid::Uuid::new_v4().simple());
    build_msi(work.path(), &msi, &product);
    let (msi_sha256, msi_size) = sandbox.upload_content(std::fs::read(&msi).unwrap()).await;
    let (bat_sha256, bat_size) =
        sandbox.upload_content(b"@echo off\r\necho configured over smb\r\nexit /b 0\r\n".to_vec()).await;
    let id = sandbox
        .create_rollout(serde_json::json!({
            "name": "smb-on-wine",
            "concurrency": 1,
            "timeout_seconds": 300,
            "heartbeat_seconds": 5,
            "max_tries": 1,
            "keep_files": false,
            "patches": [
                {"name": "wine test product", "file": "product.msi", "sha256": msi_sha256, "size": msi_size,
                 "installer": "msi", "timeout_seconds": 240},
                {"name": "settings script", "file": "settings.bat", "sha256": bat_sha256, "size": bat_size,
                 "installer": "script", "timeout_seconds": 120},
            ],
            "targets": [{
                "host": "127.0.0.1",
                "port": peer.address().port(),
                "transport": "smb",
                "credential": "samba-admin",
            }],
        }))
        .await;
    sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(300)).await;
    let target = sandbox.all_targets(id).await.remove(0);
    assert_eq!(target.state, TargetState::Succeeded, "{target:?}");
    // The probe read Samba's registry.
    assert_eq!((target.os.as_deref(), target.arch.as_deref()), (Some("windows"), Some("x86_64")));

    // The service was the transport's own, with its command line, and the
    // agent's run is in the store: both patches, then the final result.
    let deployment = fleetpatch_proto::plan::deployment_id(target.id, target.attempt);
    let expected = SmbTransport::new(smb).unwrap().service_spec(&deployment, None);
    let created = services.created.lock().unwrap().clone();
    assert_eq!(created, vec![expected.clone()], "one service, the transport's own spec");
    let events = sandbox.store.agent_events(target.id).await.unwrap();
    let kinds: Vec<(&str, Option<u32>, Option<i32>)> =
        events.iter().map(|e| (e.kind.as_str(), e.patch_index, e.exit_code)).collect();
    assert_eq!(
        kinds,
        vec![
            ("started", Some(0), None),
            ("finished", Some(0), Some(0)),
            ("started", Some(1), None),
            ("finished", Some(1), Some(0)),
            ("final", None, None),
        ],
        "{events:#?}"
    );
    let patches = sandbox.store.target_patches(target.id).await.unwrap();
    assert!(patches.iter().all(|p| p.state == PatchState::Succeeded), "{patches:?}");
    assert!(patches[1].output_tail.as_deref().unwrap_or("").contains("configured over smb"), "{patches:?}");
    // msiexec installed the product in Wine.
    let uninstall = wine.uninstall_entries();
    assert!(uninstall.contains(&product), "{product} is not under Uninstall:\n{uninstall}");

    // The cleanup: the service is gone from Wine's service manager and the
    // staged folder from the share.
    let folder = wine.unix_path(&format!("C:\\Windows\\Patches\\{deployment}"));
    sandbox
        .wait_for("the cleanup to delete the service and the staged folder", Duration::from_secs(60), async || {
            (wine.query(&expected.name).is_none() && !folder.exists()).then_some(())
        })
        .await;
    sandbox.stop().await;
}
