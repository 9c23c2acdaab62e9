//! Rollouts over the real `ssh` transport, end to end: private OpenSSH
//! `sshd` peers on loopback (`SshFleet`), the workspace's `fleetpatch-agent`
//! staged over SFTP and started as a detached process (these machines have
//! no systemd as PID 1), reporting over HTTP to the real collector, with
//! the scheduler and the workers on the machine's RabbitMQ and PostgreSQL.
//! The fleet, the sandbox and the installers come from
//! [`fleetpatch_tests::ssh`].

use std::time::Duration;

use fleetpatch_proto::state::{PatchState, RolloutState, TargetState};
use fleetpatch_tests::ssh::{
    deb, installed_version, rollout, script, ssh_sandbox, ssh_sandbox_with, ssh_target, unique, FLEET_KEY,
};
use fleetpatch_tests::{credential_in_file, Sandbox};
use fleetpatch_transport_ssh::test_support::{
    KeyPair, SshPeer, SshPeerOptions, DPKG_ROOT_VAR, PEER_DIR_VAR, REBOOT_REQUEST,
};
use uuid::Uuid;

fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// Agent events of a target: (seq, kind) in order; panics on a repeated seq.
async fn events(sandbox: &Sandbox, target: Uuid) -> Vec<(u64, String, Option<u32>)> {
    let events = sandbox.store.agent_events(target).await.unwrap();
    let mut seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    seqs.dedup();
    assert_eq!(seqs.len(), events.len(), "a report was recorded twice: {events:?}");
    events.into_iter().map(|e| (e.seq, e.kind, e.patch_index)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_ssh_targets_install_a_script_and_a_deb_through_the_real_agent() {
    let (fleet, sandbox) = ssh_sandbox(5, |_| {}).await;
    let marker = "script-ran";
    // The script records the agent that runs it: the pid file exists only
    // on the detached path, and `run --detach` made the agent a session leader (setsid).
    let shell = script(
        &sandbox,
        "hello-script",
        &format!(
            "echo \"installing on $(hostname) as $(id -un)\"\n\
             echo ran > \"${DPKG_ROOT_VAR}/{marker}\"\n\
             agent=$(cat \"$(dirname \"$0\")/agent.pid\") || exit 9\n\
             stat=$(cat /proc/$agent/stat); set -- ${{stat##*) }}\n\
             echo \"$agent $4\" > \"${DPKG_ROOT_VAR}/agent-session\"\n\
             sha256sum \"$(dirname \"$0\")\"/*.deb > \"${DPKG_ROOT_VAR}/staged.sha256\"\n\
             exit 0"
        ),
    )
    .await;
    let package = unique("fp-e2e");
    let package_patch = deb(&sandbox, &package, "1.0-1").await;
    let mut request = rollout(
        "ssh-five",
        &[&shell, &package_patch],
        fleet.peers().iter().map(|p| ssh_target(p, FLEET_KEY)).collect(),
    );
    request["keep_files"] = serde_json::json!(true);
    let started = std::time::Instant::now();
    let id = sandbox.create_rollout(request).await;
    sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(120)).await;
    eprintln!("5 ssh targets x 2 patches: {:?}", started.elapsed());

    let targets = sandbox.all_targets(id).await;
    assert_eq!(targets.len(), 5);
    for target in &targets {
        let peer = fleet.peers().iter().find(|p| Some(p.port()) == target.port).expect("a peer per target");
        assert_eq!(
            target.state,
            TargetState::Succeeded,
            "{}:{} ended {}: {:?}\nsshd log:\n{}",
            target.host,
            peer.port(),
            target.state,
            target.error,
            peer.log()
        );
        let patches = sandbox.store.target_patches(target.id).await.unwrap();
        assert_eq!(patches.len(), 2);
        for patch in &patches {
            assert_eq!((patch.state, patch.exit_code), (PatchState::Succeeded, Some(0)), "{patch:?}");
        }
        let tail = patches[0].output_tail.as_deref().unwrap_or("");
        assert!(tail.contains("installing on") && tail.contains("as root"), "script output: {tail:?}");
        // The agent really ran the script and dpkg on this peer.
        assert!(peer.dpkg_root().join(marker).is_file(), "the script did not run on port {}", peer.port());
        assert_eq!(installed_version(peer, &package).as_deref(), Some("1.0-1"));
        assert!(peer.dpkg_root().join("opt").join(&package).join("installed-by-fleetpatch").is_file());
        // The agent ran detached: from its pid file, as a session leader.
        let session = std::fs::read_to_string(peer.dpkg_root().join("agent-session")).unwrap();
        let (agent_pid, session_id) = session.trim().split_once(' ').expect("pid and session id");
        assert_eq!(agent_pid, session_id, "the agent is not a setsid session leader");
        // The .deb staged beside the script is the uploaded one.
        let staged_sha = std::fs::read_to_string(peer.dpkg_root().join("staged.sha256")).unwrap();
        assert!(staged_sha.starts_with(&package_patch.sha256), "{staged_sha} vs {}", package_patch.sha256);
        // `keep_files: true`: the agent is gone after its final report (and the
        // cleanup job), the staging directory stays for inspection.
        let deployment = fleetpatch_proto::plan::deployment_id(target.id, target.attempt);
        let staged = peer.staging_dir(&deployment);
        let agent_pid: u32 = agent_pid.parse().unwrap();
        sandbox
            .wait_for("the agent to end", Duration::from_secs(30), async || (!pid_alive(agent_pid)).then_some(()))
            .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(staged.join("plan.json").is_file(), "keep_files: the staged files were removed");
        // Reports: started + finished per patch and a final result, each once.
        let events = events(&sandbox, target.id).await;
        let kinds: Vec<&str> = events.iter().map(|(_, kind, _)| kind.as_str()).collect();
        assert_eq!(kinds, ["started", "finished", "started", "finished", "final"], "{events:?}");
    }
    // The probe recorded what it found on the machine.
    let probe = sandbox.store.target(targets[0].id).await.unwrap();
    assert_eq!(probe.arch.as_deref(), Some(std::env::consts::ARCH));
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_installer_records_its_exit_code_and_output_and_the_next_patch_still_runs() {
    let (fleet, sandbox) = ssh_sandbox(1, |_| {}).await;
    let failing = script(
        &sandbox,
        "broken",
        "echo 'unpacking payload'\necho 'E: checksum of payload wrong: disk full?' >&2\nexit 42",
    )
    .await;
    let next =
        script(&sandbox, "after-broken", &format!("echo next > \"${DPKG_ROOT_VAR}/next-ran\"\necho next ok")).await;
    let id = sandbox
        .create_rollout(rollout("ssh-fail", &[&failing, &next], vec![ssh_target(&fleet.peers()[0], FLEET_KEY)]))
        .await;
    sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(90)).await;
    let target = sandbox.all_targets(id).await.remove(0);
    assert_eq!(target.state, TargetState::Failed, "{:?}", target.error);
    let patches = sandbox.store.target_patches(target.id).await.unwrap();
    assert_eq!((patches[0].state, patches[0].exit_code), (PatchState::Failed, Some(42)), "{:?}", patches[0]);
    let tail = patches[0].output_tail.as_deref().unwrap_or("");
    assert!(tail.contains("unpacking payload") && tail.contains("disk full?"), "output tail {tail:?}");
    assert_eq!((patches[1].state, patches[1].exit_code), (PatchState::Succeeded, Some(0)), "{:?}", patches[1]);
    assert!(fleet.peers()[0].dpkg_root().join("next-ran").is_file());
    sandbox.stop().await;
}

/// An installer that hangs the machine: it freezes the agent (SIGSTOP) and
/// never returns. A hanging installer alone would not do: the agent's
/// heartbeats keep a slow install alive by design, and the API refuses
/// `heartbeat_seconds >= timeout_seconds`; the watchdog is for silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_installer_that_hangs_the_target_times_out_and_the_verification_scan_tells_what_is_installed() {
    let (fleet, sandbox) = ssh_sandbox(1, |_| {}).await;
    let peer = &fleet.peers()[0];
    let package = unique("fp-e2e-before-hang");
    let installed_first = deb(&sandbox, &package, "2.0-1").await;
    let mut hang = script(
        &sandbox,
        "hang",
        &format!(
            "echo $$ > \"${DPKG_ROOT_VAR}/hang.pid\"\n\
             kill -STOP \"$(cat \"$(dirname \"$0\")/agent.pid\")\"\n\
             exec sleep 600"
        ),
    )
    .await;
    hang.detection = Some(serde_json::json!({"kind": "dpkg", "package": unique("fp-e2e-never-installed")}));
    let mut request = rollout("ssh-hang", &[&installed_first, &hang], vec![ssh_target(peer, FLEET_KEY)]);
    request["timeout_seconds"] = serde_json::json!(3);
    request["heartbeat_seconds"] = serde_json::json!(2);
    let id = sandbox.create_rollout(request).await;
    let target = sandbox.all_targets(id).await.remove(0);
    let target = sandbox.wait_for_target_state(target.id, &TargetState::FINAL, Duration::from_secs(60)).await;
    assert_eq!(target.state, TargetState::TimedOut, "{:?}", target.error);
    let reason = target.error.clone().unwrap();
    assert!(reason.contains("no feedback received within 3 s"), "{reason}");
    let silent = target.finished_at.unwrap() - target.last_seen_at.unwrap();
    assert!((3_000..=4_500).contains(&silent.num_milliseconds()), "timed out after {silent} of silence");
    let patches = sandbox.store.target_patches(target.id).await.unwrap();
    assert_eq!((patches[0].state, patches[0].exit_code), (PatchState::Succeeded, Some(0)), "{:?}", patches[0]);
    assert_eq!(patches[1].state, PatchState::Failed, "{:?}", patches[1]);
    assert!(patches[1].error.as_deref().unwrap_or("").contains("no feedback received"), "{:?}", patches[1]);
    let hang_pid: u32 = std::fs::read_to_string(peer.dpkg_root().join("hang.pid")).unwrap().trim().parse().unwrap();
    // The scan later finds the first patch installed and the hanging one not.
    let verified = sandbox
        .wait_for("the verification scan", Duration::from_secs(30), async || {
            sandbox.store.target(target.id).await.ok().filter(|t| t.verified_state.is_some())
        })
        .await;
    assert_eq!(verified.verified_state.as_deref(), Some("missing #1"));
    assert_eq!(installed_version(peer, &package).as_deref(), Some("2.0-1"));
    // Cleanup after the scan stops the frozen agent and removes the staging directory.
    let staged = peer.staging_dir(&fleetpatch_proto::plan::deployment_id(target.id, target.attempt));
    sandbox
        .wait_for("cleanup of the hung deployment", Duration::from_secs(30), async || (!staged.exists()).then_some(()))
        .await;
    // The installer runs in a process group of its own (the agent's
    // `process_group(0)`); the cleanup stops the agent's whole session, so
    // the hung installer does not outlive it.
    sandbox
        .wait_for("the hung installer to be stopped", Duration::from_secs(10), async || {
            (!pid_alive(hang_pid)).then_some(())
        })
        .await;
    sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(30)).await;
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_collector_down_the_agents_spool_and_replay_every_report_once() {
    let (fleet, mut sandbox) = ssh_sandbox(2, |_| {}).await;
    let mut patches = Vec::new();
    for i in 0..3 {
        patches.push(script(&sandbox, &format!("slow-{i}"), &format!("sleep 1\necho slow {i} done")).await);
    }
    let mut request = rollout(
        "ssh-collector-down",
        &patches.iter().collect::<Vec<_>>(),
        fleet.peers().iter().map(|p| ssh_target(p, FLEET_KEY)).collect(),
    );
    request["heartbeat_seconds"] = serde_json::json!(1);
    let id = sandbox.create_rollout(request).await;
    let targets = sandbox.all_targets(id).await;
    for target in &targets {
        sandbox.wait_for_target_state(target.id, &[TargetState::Running], Duration::from_secs(60)).await;
    }
    sandbox.stop_collector().await;
    let down_at = chrono::Utc::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    sandbox.restart_collector().await;
    let up_at = chrono::Utc::now();
    sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(90)).await;
    for target in &targets {
        let target = sandbox.store.target(target.id).await.unwrap();
        assert_eq!(target.state, TargetState::Succeeded, "{:?}", target.error);
        let recorded = sandbox.store.agent_events(target.id).await.unwrap();
        let events = events(&sandbox, target.id).await;
        // Every seq from 1 to the last arrived, nothing twice: the events and
        // the heartbeats (kept as a count per agent run) add up to the last seq.
        let heartbeats = sandbox.store.heartbeats(target.id).await.unwrap();
        assert_eq!(heartbeats.len(), 1, "one agent run: {heartbeats:?}");
        assert!(heartbeats[0].count >= 1, "{heartbeats:?}");
        let last_seq = events.iter().map(|(seq, _, _)| *seq).chain([heartbeats[0].last_seq]).max().unwrap();
        assert_eq!(events.len() as u64 + heartbeats[0].count, last_seq, "{events:?} {heartbeats:?}");
        let kinds: Vec<&str> = events.iter().map(|(_, kind, _)| kind.as_str()).collect();
        assert_eq!(kinds, ["started", "finished", "started", "finished", "started", "finished", "final"]);
        // Some reports were made during the outage and only recorded after it.
        assert!(recorded.iter().all(|e| e.received_at < down_at || e.received_at >= up_at), "{recorded:?}");
        let replayed = recorded.iter().filter(|e| e.received_at >= up_at).count();
        assert!(replayed >= 3, "only {replayed} reports after the restart: {recorded:?}");
        let patches = sandbox.store.target_patches(target.id).await.unwrap();
        assert!(patches.iter().all(|p| p.state == PatchState::Succeeded && p.exit_code == Some(0)), "{patches:?}");
    }
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_and_an_unknown_host_key_fail_their_targets_and_the_rollout_goes_on() {
    let keys_dir = tempfile::tempdir().unwrap();
    let wrong_key = KeyPair::generate(keys_dir.path(), "not_authorized", "ed25519", "").unwrap();
    let (fleet, sandbox) = ssh_sandbox(2, |options| {
        options
            .credentials
            .insert("wrong-key".into(), credential_in_file(&wrong_key.private_key_path, &["ssh"], &["127.0.0.1"]));
    })
    .await;
    // A peer whose host key is in no known_hosts file the workers use.
    let stranger = SshPeer::start().expect("start an sshd peer");
    let ok = script(&sandbox, "ok", "echo ok").await;
    let targets = vec![
        ssh_target(&fleet.peers()[0], FLEET_KEY),
        ssh_target(&fleet.peers()[1], "wrong-key"),
        ssh_target(&stranger, FLEET_KEY),
    ];
    let mut request = rollout("ssh-bad-access", &[&ok], targets);
    request["concurrency"] = serde_json::json!(1);
    let id = sandbox.create_rollout(request).await;
    sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(90)).await;
    let targets = sandbox.all_targets(id).await;
    let by_port = |port: u16| targets.iter().find(|t| t.port == Some(port)).unwrap();
    let good = by_port(fleet.peers()[0].port());
    assert_eq!(good.state, TargetState::Succeeded, "{:?}", good.error);
    let denied = by_port(fleet.peers()[1].port());
    assert_eq!(denied.state, TargetState::Failed);
    let error = denied.error.clone().unwrap();
    assert!(error.contains("login to") && error.contains("\"root\" was rejected"), "{error}");
    let unknown = by_port(stranger.port());
    assert_eq!(unknown.state, TargetState::Failed);
    let error = unknown.error.clone().unwrap();
    assert!(error.contains("host key of") && error.contains("not trusted"), "{error}");
    // Permanent errors: one try each, no backoff retries.
    for target in [denied, unknown] {
        assert_eq!(target.attempt, 1);
        let history = sandbox.store.transitions(target.id).await.unwrap();
        assert_eq!(history.iter().filter(|t| t.to == "probing").count(), 1, "{history:?}");
    }
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_whose_sshd_is_down_waits_offline_and_is_deployed_when_it_answers_again() {
    let (mut fleet, sandbox) = ssh_sandbox(1, |options| options.offline_check_seconds = vec![1]).await;
    let patch = script(&sandbox, "when-back", "echo back").await;
    let mut request = rollout("ssh-offline", &[&patch], vec![ssh_target(&fleet.peers()[0], FLEET_KEY)]);
    request["max_tries"] = serde_json::json!(1);
    request["retry_offline_for_seconds"] = serde_json::json!(600);
    fleet.peer_mut(0).stop();
    let id = sandbox.create_rollout(request).await;
    let target = sandbox.all_targets(id).await.remove(0);

    // Connection refused: offline, and the reachability checks (connects to
    // port 22's stand-in, every second here) find nothing listening.
    let offline = sandbox
        .wait_for("the target to go offline", Duration::from_secs(60), async || {
            let now = sandbox.store.target(target.id).await.unwrap();
            (now.state == TargetState::Offline).then_some(now)
        })
        .await;
    assert!(offline.error.as_deref().unwrap_or("").contains("refused"), "{:?}", offline.error);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = sandbox.store.target(target.id).await.unwrap();
    assert_eq!(still.state, TargetState::Offline);
    assert!(still.tries >= 1, "checks ran and found it silent: {still:?}");

    // The machine is back: the next check finds sshd and the target is deployed.
    fleet.peer_mut(0).start_again().expect("sshd starts again");
    sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(120)).await;
    let done = sandbox.store.target(target.id).await.unwrap();
    assert_eq!(done.state, TargetState::Succeeded, "{:?}", done.error);
    let patches = sandbox.store.target_patches(target.id).await.unwrap();
    assert_eq!((patches[0].state, patches[0].exit_code), (PatchState::Succeeded, Some(0)));
    let moves: Vec<(String, String)> =
        sandbox.store.transitions(target.id).await.unwrap().into_iter().map(|t| (t.from, t.to)).collect();
    assert!(moves.contains(&("offline".into(), "pending".into())), "{moves:?}");
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_rebooted_after_its_deployment_is_verified_on_its_new_boot_and_one_that_never_reboots_fails() {
    // Each peer shows a boot id of its own; the agents' reboot command only
    // asks the test for the reboot, which restarts the peer's sshd with a
    // new boot id.
    let peer_options = SshPeerOptions { dpkg_root: true, own_boot: true, ..SshPeerOptions::default() };
    let (mut fleet, sandbox) = ssh_sandbox_with(2, peer_options, |options| {
        options.reboot_check_seconds = vec![1];
        options.unix_reboot_command = Some(format!("touch \"${PEER_DIR_VAR}/{REBOOT_REQUEST}\""));
    })
    .await;
    let package = unique("fp-e2e-reboot");
    let patch = deb(&sandbox, &package, "1.0-1").await;
    let targets = vec![ssh_target(&fleet.peers()[0], FLEET_KEY), ssh_target(&fleet.peers()[1], FLEET_KEY)];
    let mut request = rollout("ssh-reboot", &[&patch], targets);
    request["concurrency"] = serde_json::json!(2);
    request["reboot"] = serde_json::json!("always");
    request["reboot_timeout_seconds"] = serde_json::json!(30);
    let id = sandbox.create_rollout(request).await;
    let targets = sandbox.all_targets(id).await;
    let by_port = |port: u16| targets.iter().find(|t| t.port == Some(port)).unwrap().id;
    let (first, second) = (by_port(fleet.peers()[0].port()), by_port(fleet.peers()[1].port()));

    // The first agent installed the package, reported, and asked for the reboot.
    sandbox
        .wait_for("the first agent to ask for a reboot", Duration::from_secs(90), async || {
            fleet.peers()[0].reboot_requested().then_some(())
        })
        .await;
    let rebooting = sandbox
        .wait_for("the first target to be rebooting", Duration::from_secs(30), async || {
            let now = sandbox.store.target(first).await.unwrap();
            (now.state == TargetState::Rebooting).then_some(now)
        })
        .await;
    assert_eq!(rebooting.boot_id, fleet.peers()[0].boot_id(), "the probe read the peer's boot id");
    assert_ne!(fleet.peers()[0].boot_id(), fleet.peers()[1].boot_id(), "each peer has a boot of its own");
    tokio::task::block_in_place(|| fleet.peer_mut(0).reboot(Duration::from_secs(2))).expect("reboot the first peer");

    sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(120)).await;
    let done = sandbox.store.target(first).await.unwrap();
    assert_eq!(done.state, TargetState::Succeeded, "{:?}", done.error);
    assert_eq!(done.verified_state.as_deref(), Some("all_installed"), "the scan on the new boot found the package");
    let moves: Vec<(String, String)> =
        sandbox.store.transitions(first).await.unwrap().into_iter().map(|t| (t.from, t.to)).collect();
    assert!(
        moves.ends_with(&[("running".into(), "rebooting".into()), ("rebooting".into(), "succeeded".into())]),
        "{moves:?}"
    );
    assert_eq!(installed_version(&fleet.peers()[0], &package).as_deref(), Some("1.0-1"));

    // The second asked too, but its machine never rebooted: same boot id until reboot_timeout.
    assert!(fleet.peers()[1].reboot_requested());
    let stuck = sandbox.store.target(second).await.unwrap();
    assert_eq!(stuck.state, TargetState::Failed);
    let error = stuck.error.unwrap_or_default();
    assert!(error.contains("did not come back after reboot") && error.contains("boot has not changed"), "{error}");
    sandbox.stop().await;
}
