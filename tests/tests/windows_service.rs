//! `fleetpatch-agent.exe` as a real Windows service under Wine 8, reporting
//! to the sandbox's real collector.
//!
//! The service is created with the exact command line the `smb` transport
//! sends in `RCreateServiceW` (`SmbTransport::service_spec`), started with
//! `sc start`, and installs real Windows installers: an `.msi` built with
//! `wixl` (then listed under Uninstall in Wine's registry), batch files that
//! exit 0 and 1603, and an `.exe` (built with mingw) that exits 3010. A
//! second service runs an installer that never ends; `sc stop` must end it
//! and every process it started. A third downloads its installer from a
//! real relay (`fleetpatch relay` in front of the sandbox's content store)
//! instead of finding it staged. The services are deleted with `sc delete`.
//!
//! Needs: `wine`, `wine64`, `msitools`/`wixl`, `gcc-mingw-w64-x86-64`, the
//! Windows agent (`FLEETPATCH_WINDOWS_AGENT_EXE`, else built here with
//! `scripts/build-windows-agent.sh --no-install`), a prefix from
//! `scripts/wine-prefix.sh` (prepared here, cached under ~/.cache). Any of
//! them missing fails the test with what to install; it never skips.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fleetpatch_proto::plan::{DeploymentPlan, InstallerKind, PlanPatch, RebootPolicy};
use fleetpatch_proto::state::TargetState;
use fleetpatch_store::{AgentEvent, Target};
use fleetpatch_tests::wine::{agent_exe, build_msi, workspace, Wine};
use fleetpatch_tests::{behaviour, sim_rollout, Sandbox, SandboxOptions, TOKEN_KEY};
use fleetpatch_transport_smb::{SmbTransport, SmbTransportOptions};
use sha2::{Digest, Sha256};

fn sha256(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

fn compile_exit_code_exe(output: &Path) {
    let status = Command::new("x86_64-w64-mingw32-gcc")
        .args(["-O2", "-s", "-o"])
        .arg(output)
        .arg(workspace().join("scripts/windows/exit-code.c"))
        .status()
        .expect("x86_64-w64-mingw32-gcc (apt-get install gcc-mingw-w64-x86-64)");
    assert!(status.success(), "mingw could not build exit-code.c");
}

struct Staged {
    service: String,
    binary_path: String,
    folder: PathBuf,
}

/// Stage the agent, its plan and the installers where the smb transport
/// puts them, as the service's command line names them.
fn stage(
    wine: &Wine,
    target: &Target,
    collector: std::net::SocketAddr,
    installers: &[(&Path, InstallerKind, &str, Vec<i32>)],
    keep_files: bool,
    relay: Option<&str>,
) -> Staged {
    let deployment_id = format!("fp-wine-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let spec = SmbTransport::new(SmbTransportOptions::default()).unwrap().service_spec(&deployment_id, None);
    let exe = spec.binary_path.split('"').nth(1).expect("the binary path starts with the quoted agent path");
    let windows_folder = exe.rsplit_once('\\').unwrap().0;
    let folder = wine.unix_path(windows_folder);
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::copy(agent_exe(), folder.join(exe.rsplit_once('\\').unwrap().1)).unwrap();

    let patches = installers
        .iter()
        .enumerate()
        .map(|(index, (path, kind, arguments, reboot_codes))| {
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            let sha256 = sha256(path);
            // From a relay, the agent downloads it; otherwise it is staged here.
            let sources = match relay {
                Some(relay) => vec![format!("{relay}/v1/content/{sha256}")],
                None => {
                    std::fs::copy(path, folder.join(&file)).unwrap();
                    Vec::new()
                }
            };
            PlanPatch {
                index: index as u32,
                name: file.clone(),
                file,
                sha256,
                size: std::fs::metadata(path).unwrap().len(),
                sources,
                installer: *kind,
                arguments: (*arguments).to_owned(),
                success_codes: vec![0],
                reboot_codes: reboot_codes.clone(),
                timeout_seconds: 600,
            }
        })
        .collect();
    let token = fleetpatch_proto::report_auth::derive_token(
        TOKEN_KEY.as_bytes(),
        target.id,
        target.attempt,
        target.token_nonce.as_deref().expect("a running target has a token nonce"),
    );
    let plan = DeploymentPlan {
        version: 1,
        deployment_id: deployment_id.clone(),
        target_id: target.id,
        attempt: target.attempt,
        collector_url: format!("http://{collector}"),
        collector_ca_pem: None,
        token,
        heartbeat_seconds: 1,
        patches,
        // A reboot is never performed in a test; the exit code 3010 still
        // makes the final result say one is required.
        reboot: RebootPolicy::Never,
        reboot_command: None,
        keep_files,
        relay_ca_pem: None,
        download_timeout_seconds: fleetpatch_proto::plan::DEFAULT_DOWNLOAD_TIMEOUT_SECONDS,
    };
    std::fs::write(folder.join(fleetpatch_proto::plan::PLAN_FILE_NAME), serde_json::to_vec_pretty(&plan).unwrap())
        .unwrap();
    Staged { service: spec.name, binary_path: spec.binary_path, folder }
}

/// `sc create` with the transport's command line; Wine's registry must hold
/// exactly that command line.
fn create_service(wine: &Wine, staged: &Staged) {
    wine.sc(&["create", &staged.service, "binPath=", &staged.binary_path, "start=", "demand"]);
    assert_eq!(
        wine.image_path(&staged.service).as_deref(),
        Some(staged.binary_path.as_str()),
        "ImagePath is not the transport's command line"
    );
}

fn delete_service(wine: &Wine, service: &str) {
    wine.sc(&["delete", service]);
    let until = Instant::now() + Duration::from_secs(10);
    while wine.query(service).is_some() {
        assert!(Instant::now() < until, "service {service} still exists after sc delete");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Linux pids of the Wine processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline).contains(needle).then_some(pid)
        })
        .collect()
}

fn events_of(events: &[AgentEvent], kind: &str) -> Vec<(Option<u32>, Option<i32>)> {
    events.iter().filter(|e| e.kind == kind).map(|e| (e.patch_index, e.exit_code)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_runs_as_a_windows_service_installs_real_installers_and_stops_cleanly() {
    let wine = Wine::prepare();
    let sandbox = Sandbox::start(SandboxOptions::default()).await;
    // Two targets whose simulated agents hang after their first report: the
    // Windows agent reports for them with their own tokens.
    let mut request = sim_rollout("windows-service", 3, 4, 3, 900);
    for i in 0..3 {
        request["targets"][i]["labels"] = serde_json::to_value(behaviour("hang")).unwrap();
    }
    let rollout = sandbox.create_rollout(request).await;
    let mut targets = sandbox.all_targets(rollout).await;
    for target in targets.iter_mut() {
        *target = sandbox.wait_for_target_state(target.id, &[TargetState::Running], Duration::from_secs(60)).await;
    }

    let work = tempfile::tempdir().unwrap();
    let msi = work.path().join("product.msi");
    let product = format!("fleetpatch wine test {}", uuid::Uuid::new_v4().simple());
    build_msi(work.path(), &msi, &product);
    let ok_bat = work.path().join("ok.bat");
    std::fs::write(&ok_bat, "@echo off\r\necho all good\r\nexit /b 0\r\n").unwrap();
    let fail_bat = work.path().join("fail.bat");
    std::fs::write(&fail_bat, "@echo off\r\necho fatal error during installation\r\nexit /b 1603\r\n").unwrap();
    let reboot_exe = work.path().join("reboot-required.exe");
    compile_exit_code_exe(&reboot_exe);

    // One deployment of four real installers, files removed afterwards.
    let staged = stage(
        &wine,
        &targets[0],
        sandbox.collector,
        &[
            (&msi, InstallerKind::Msi, "", vec![]),
            (&ok_bat, InstallerKind::Script, "", vec![]),
            (&fail_bat, InstallerKind::Script, "", vec![]),
            (&reboot_exe, InstallerKind::Exe, "3010", vec![3010]),
        ],
        false,
        None,
    );
    create_service(&wine, &staged);
    assert_eq!(wine.query(&staged.service).unwrap().state, "STOPPED");
    wine.sc(&["start", &staged.service]);
    let status = wine.wait_for_state(&staged.service, "STOPPED", Duration::from_secs(180));
    assert_eq!(
        (status.win32_exit_code, status.service_exit_code),
        (0, 0),
        "the service ended with an error (every report should be acknowledged)"
    );

    let target = sandbox.wait_for_target_state(targets[0].id, &[TargetState::Failed], Duration::from_secs(30)).await;
    let all_events = sandbox.store.agent_events(target.id).await.unwrap();
    // Two agents reported for this deployment: the simulated one (its first
    // report, then it hangs) and the Windows service. Each run is stored as
    // its own (reports carry their agent instance), not folded into the
    // other's as duplicates of the same seq.
    let windows_run = all_events.iter().find(|e| e.kind == "final").expect("a final result").agent_instance;
    let (events, simulated): (Vec<AgentEvent>, Vec<AgentEvent>) =
        all_events.iter().cloned().partition(|e| e.agent_instance == windows_run);
    assert_eq!(
        simulated.iter().map(|e| (e.seq, e.kind.as_str(), e.patch_index)).collect::<Vec<_>>(),
        vec![(1, "started", Some(0))],
        "the simulated agent's one report, kept as its own run: {all_events:#?}"
    );
    assert_eq!(
        events_of(&events, "started"),
        vec![(Some(0), None), (Some(1), None), (Some(2), None), (Some(3), None)],
        "{events:#?}"
    );
    assert_eq!(
        events_of(&events, "finished"),
        vec![(Some(0), Some(0)), (Some(1), Some(0)), (Some(2), Some(1603)), (Some(3), Some(3010))],
        "{events:#?}"
    );
    let last = events.last().unwrap();
    assert_eq!(last.kind, "final", "{events:#?}");
    let message = last.detail.as_deref().unwrap();
    assert!(message.starts_with("failure: 3 of 4 patches installed; reboot required"), "{message}");
    assert!(message.contains("patch 2 (fail.bat): failed, exit code 1603"), "{message}");
    let patches = sandbox.store.target_patches(target.id).await.unwrap();
    let codes: Vec<_> = patches.iter().map(|p| (p.exit_code, p.reboot_required)).collect();
    assert_eq!(codes, vec![(Some(0), false), (Some(0), false), (Some(1603), false), (Some(3010), true)]);
    assert!(patches[2].output_tail.as_deref().unwrap_or("").contains("fatal error during installation"));
    // msiexec really installed the product.
    let uninstall = wine.uninstall_entries();
    assert!(uninstall.contains(&product), "{product} is not under Uninstall:\n{uninstall}");
    // keep_files = false: the staged folder goes, the running agent's own
    // .exe included (removed by a detached cmd.exe once the service exited).
    let until = Instant::now() + Duration::from_secs(20);
    while staged.folder.exists() {
        let left: Vec<_> =
            std::fs::read_dir(&staged.folder).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
        assert!(Instant::now() < until, "{} still holds {left:?}", staged.folder.display());
        std::thread::sleep(Duration::from_millis(300));
    }
    delete_service(&wine, &staged.service);

    // An installer that never ends, with a helper of its own: `sc stop` ends
    // the service cleanly and leaves none of their processes behind.
    let long_exe = work.path().join(format!("long-{}.exe", &uuid::Uuid::new_v4().simple().to_string()[..8]));
    compile_exit_code_exe(&long_exe);
    let long_name = long_exe.file_name().unwrap().to_string_lossy().into_owned();
    let long_bat = work.path().join("long.bat");
    std::fs::write(
        &long_bat,
        format!("@echo off\r\nstart /b \"\" \"{long_name}\" 0 600000\r\n\"{long_name}\" 0 600000\r\nexit /b %ERRORLEVEL%\r\n"),
    )
    .unwrap();
    let staged_long = stage(
        &wine,
        &targets[1],
        sandbox.collector,
        &[(&long_bat, InstallerKind::Script, "", vec![]), (&long_exe, InstallerKind::Exe, "0", vec![])],
        true,
        None,
    );
    create_service(&wine, &staged_long);
    wine.sc(&["start", &staged_long.service]);
    wine.wait_for_state(&staged_long.service, "RUNNING", Duration::from_secs(30));
    let until = Instant::now() + Duration::from_secs(60);
    while processes_mentioning(&long_name).len() < 2 {
        assert!(Instant::now() < until, "the long installer and its helper did not start");
        std::thread::sleep(Duration::from_millis(200));
    }
    let stop = wine.run("sc", &["stop", &staged_long.service]);
    assert!(
        stop.status.success(),
        "sc stop failed ({}): {}{}",
        stop.status,
        String::from_utf8_lossy(&stop.stdout),
        String::from_utf8_lossy(&stop.stderr)
    );
    let status = wine.wait_for_state(&staged_long.service, "STOPPED", Duration::from_secs(30));
    assert_eq!((status.win32_exit_code, status.service_exit_code), (0, 0), "a requested stop is not a failure");
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let left = processes_mentioning(&long_name);
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < until, "installer processes outlived sc stop: {left:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The interrupted patch has a start and no end, and there is no final
    // result (a restart would run it again); the files stay for that.
    let events = sandbox.store.agent_events(targets[1].id).await.unwrap();
    assert!(events_of(&events, "started").contains(&(Some(0), None)), "{events:#?}");
    assert!(events_of(&events, "finished").is_empty(), "{events:#?}");
    assert!(events.iter().all(|e| e.kind != "final"), "{events:#?}");
    assert!(staged_long.folder.join(fleetpatch_proto::plan::PLAN_FILE_NAME).is_file());
    delete_service(&wine, &staged_long.service);
    let _ = std::fs::remove_dir_all(&staged_long.folder);

    // An installer pulled from a relay (a real one, in front of the
    // sandbox's content store): the Windows agent downloads it, checks it,
    // runs it once, and leaves no partial file behind.
    let pulled_bat = work.path().join("pulled.bat");
    std::fs::write(&pulled_bat, "@echo off\r\necho pulled from the relay\r\nexit /b 0\r\n").unwrap();
    let (pulled_sha, pulled_size) = sandbox.upload_content(std::fs::read(&pulled_bat).unwrap()).await;
    let relay_shutdown = fleetpatch_runtime::Shutdown::new();
    let options = sandbox.relay_options(work.path(), "wine").await;
    let relay = fleetpatch_relay::start(options, fleetpatch_runtime::Health::new(), relay_shutdown.clone())
        .await
        .expect("start a relay");
    let relay_url = format!("http://{}", relay.local_addr);
    let staged_pulled = stage(
        &wine,
        &targets[2],
        sandbox.collector,
        &[(&pulled_bat, InstallerKind::Script, "", vec![])],
        false,
        Some(&relay_url),
    );
    assert!(!staged_pulled.folder.join("pulled.bat").exists(), "only the agent and the plan are staged");
    create_service(&wine, &staged_pulled);
    wine.sc(&["start", &staged_pulled.service]);
    let status = wine.wait_for_state(&staged_pulled.service, "STOPPED", Duration::from_secs(180));
    assert_eq!((status.win32_exit_code, status.service_exit_code), (0, 0), "the pulled deployment failed");
    let events = sandbox.store.agent_events(targets[2].id).await.unwrap();
    assert!(events_of(&events, "finished").contains(&(Some(0), Some(0))), "{events:#?}");
    let patches = sandbox.store.target_patches(targets[2].id).await.unwrap();
    let tail = patches[0].output_tail.as_deref().unwrap_or("");
    assert!(tail.contains("pulled from the relay"), "the downloaded batch file ran: {tail:?}");
    let stats = relay.stats();
    assert_eq!((stats.upstream_fetches, stats.served_bytes), (1, pulled_size), "{stats:?} ({pulled_sha})");
    let until = Instant::now() + Duration::from_secs(20);
    while staged_pulled.folder.exists() {
        assert!(Instant::now() < until, "{} was not removed (a .part left?)", staged_pulled.folder.display());
        std::thread::sleep(Duration::from_millis(300));
    }
    delete_service(&wine, &staged_pulled.service);
    relay_shutdown.trigger();
    sandbox.stop().await;
}
