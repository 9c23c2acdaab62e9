//! The deployment pipeline end to end on RabbitMQ and PostgreSQL.

use std::collections::HashMap;
use std::time::Duration;

use fleetpatch_proto::state::{PatchState, RolloutState, TargetState};
use fleetpatch_tests::{behaviour, sim_rollout, Sandbox, SandboxOptions};
use fleetpatch_transport::sim::SimOptions;

/// The largest number of targets between `queued` and a final state at any
/// moment, replayed from the recorded transition history.
async fn max_in_flight(sandbox: &Sandbox, rollout: uuid::Uuid) -> usize {
    let transitions = sandbox.store.rollout_transitions(rollout).await.unwrap();
    let mut in_flight: HashMap<uuid::Uuid, bool> = HashMap::new();
    let mut peak = 0;
    for transition in transitions {
        let to: TargetState = transition.to.parse().unwrap();
        in_flight.insert(transition.target_id, to.is_in_flight());
        peak = peak.max(in_flight.values().filter(|v| **v).count());
    }
    peak
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_targets_succeed_and_never_exceed_the_concurrency() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await;
    let started = std::time::Instant::now();
    let id = sandbox.create_rollout(sim_rollout("fleet-300", 300, 3, 20, 30)).await;
    sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(240)).await;
    eprintln!("300 targets x 3 patches at concurrency 20: {:?}", started.elapsed());
    let targets = sandbox.all_targets(id).await;
    assert_eq!(targets.len(), 300);
    for target in &targets {
        assert_eq!(target.state, TargetState::Succeeded, "{} ended {}: {:?}", target.host, target.state, target.error);
        let patches = sandbox.store.target_patches(target.id).await.unwrap();
        assert_eq!(patches.len(), 3);
        assert!(patches.iter().all(|p| p.state == PatchState::Succeeded && p.exit_code == Some(0)), "{patches:?}");
    }
    let peak = max_in_flight(&sandbox, id).await;
    assert!(peak <= 20, "history shows {peak} targets in flight at once");
    assert_eq!(peak, 20, "the rollout should use its whole window");
    // Every agent and every staged file was cleaned up.
    sandbox
        .wait_for("cleanup of every target", Duration::from_secs(30), async || {
            (sandbox.fleet.staged_deployments() == 0).then_some(())
        })
        .await;
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_target_times_out_and_the_next_one_is_dispatched() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await;
    let mut request = sim_rollout("hang", 2, 3, 1, 2);
    request["targets"][0]["labels"] = serde_json::to_value(behaviour("hang")).unwrap();
    let id = sandbox.create_rollout(request).await;
    let targets = sandbox.all_targets(id).await;
    let (hung, next) = (&targets[0], &targets[1]);
    let hung = sandbox.wait_for_target_state(hung.id, &[TargetState::TimedOut], Duration::from_secs(30)).await;
    // Detected within timeout + 1 s of the last report.
    let last = hung.last_seen_at.unwrap();
    let detected = hung.finished_at.unwrap();
    let late = (detected - last).num_milliseconds() - 2_000;
    assert!((0..=1_000).contains(&late), "timed out {late} ms after the deadline");
    let reason = hung.error.clone().unwrap();
    assert!(reason.contains("no feedback received within 2 s; the deployment may have failed"), "{reason}");
    let patches = sandbox.store.target_patches(hung.id).await.unwrap();
    assert!(patches.iter().all(|p| p.state == PatchState::Failed), "{patches:?}");
    assert!(patches.iter().all(|p| p.error.as_deref() == Some(reason.as_str())));
    // The slot was freed and the next machine dispatched, after the timeout.
    let next = sandbox.wait_for_target_state(next.id, &[TargetState::Succeeded], Duration::from_secs(30)).await;
    assert!(next.queued_at.unwrap() >= detected);
    // The verification scan runs later and tells the truth; the hung agent is removed.
    let verified = sandbox
        .wait_for("verification of the hung target", Duration::from_secs(30), async || {
            sandbox.store.target(hung.id).await.ok().filter(|t| t.verified_state.is_some())
        })
        .await;
    assert_eq!(verified.verified_state.as_deref(), Some("none_installed"));
    sandbox
        .wait_for("cleanup of the hung agent", Duration::from_secs(30), async || {
            (sandbox.fleet.running_agents() == 0 && sandbox.fleet.staged_deployments() == 0).then_some(())
        })
        .await;
    sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(30)).await;
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_a_slow_install_alive() {
    let options = SandboxOptions {
        sim: SimOptions { slow_patch_ms: 5_000, patch_ms: 20, ..SimOptions::default() },
        ..SandboxOptions::default()
    };
    let sandbox = Sandbox::start(options).await;
    let mut request = sim_rollout("slow", 1, 2, 1, 2);
    request["targets"][0]["labels"] = serde_json::to_value(behaviour("slow_patch")).unwrap();
    let id = sandbox.create_rollout(request).await;
    let target = sandbox.all_targets(id).await.remove(0);
    let target = sandbox
        .wait_for_target_state(
            target.id,
            &[TargetState::Succeeded, TargetState::TimedOut, TargetState::Failed],
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(target.state, TargetState::Succeeded, "{:?}", target.error);
    let took = target.finished_at.unwrap() - target.running_at.unwrap();
    assert!(took.num_milliseconds() >= 5_000, "the slow patch took {took}");
    // Counted per agent run, not kept one event each; the API shows the count.
    let heartbeats: u64 = sandbox.store.heartbeats(target.id).await.unwrap().iter().map(|h| h.count).sum();
    assert!(heartbeats >= 4, "{heartbeats} heartbeats during a 5 s install");
    let events = sandbox.store.agent_events(target.id).await.unwrap();
    assert!(events.iter().all(|e| e.kind != "heartbeat"), "{events:?}");
    let detail: serde_json::Value = sandbox.get_json(&format!("/v1/targets/{}", target.id)).await;
    assert_eq!(detail["heartbeats"][0]["count"].as_u64(), Some(heartbeats), "{detail}");
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_wave_over_its_threshold_halts_the_rollout_until_resumed() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await;
    let mut request = sim_rollout("canary", 10, 2, 4, 30);
    request["waves"] = serde_json::json!([
        {"name": "canary", "size": 4, "max_failure_percent": 25},
        {"name": "rest", "max_failure_percent": 100},
    ]);
    for i in [0, 1] {
        request["targets"][i]["labels"] = serde_json::to_value(behaviour("fail_patch")).unwrap();
    }
    let id = sandbox.create_rollout(request).await;
    let rollout = sandbox.wait_for_rollout_state(id, RolloutState::Paused, Duration::from_secs(60)).await;
    let reason = rollout.pause_reason.unwrap();
    assert!(reason.contains("\"canary\"") && reason.contains("2 of 4") && reason.contains("25%"), "{reason}");
    // Nothing of the next wave was dispatched, and stays so while paused.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let targets = sandbox.all_targets(id).await;
    for target in targets.iter().filter(|t| t.wave == 1) {
        assert_eq!(target.state, TargetState::Pending, "{} of the next wave", target.host);
        assert!(target.queued_at.is_none());
    }
    let failed = targets.iter().filter(|t| t.wave == 0 && t.state == TargetState::Failed).count();
    assert_eq!(failed, 2);
    let failed_patch = sandbox.store.target_patches(targets[0].id).await.unwrap();
    assert_eq!(failed_patch[0].exit_code, Some(1603));
    // Resume continues with the next wave.
    let response = sandbox.post(&format!("/v1/rollouts/{id}/resume")).await;
    assert_eq!(response.status(), 200);
    sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(60)).await;
    let targets = sandbox.all_targets(id).await;
    assert!(targets.iter().filter(|t| t.wave == 1).all(|t| t.state == TargetState::Succeeded));
    // Retry failed gives the two failures a new attempt.
    let response = sandbox.post(&format!("/v1/rollouts/{id}/retry-failed")).await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["retried"], 2);
    // They fail again, so the canary is over its threshold again: halted once more.
    sandbox.wait_for_rollout_state(id, RolloutState::Paused, Duration::from_secs(60)).await;
    let retried = sandbox.store.target(targets[0].id).await.unwrap();
    assert_eq!((retried.attempt, retried.state), (2, TargetState::Failed), "fail_patch hosts fail again");
    assert_eq!(sandbox.post(&format!("/v1/rollouts/{id}/resume")).await.status(), 200);
    sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(60)).await;
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waves_wait_for_approval_or_promote_themselves_after_their_soak_time() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await;
    let mut request = sim_rollout("approval", 6, 1, 4, 30);
    request["waves"] = serde_json::json!([
        {"name": "canary", "size": 2, "require_approval": true},
        {"name": "pilot", "size": 2, "promote_after_seconds": 1, "min_success_percent": 100},
        {"name": "rest"},
    ]);
    let id = sandbox.create_rollout(request).await;
    let rollout = sandbox.wait_for_rollout_state(id, RolloutState::AwaitingApproval, Duration::from_secs(60)).await;
    let reason = rollout.pause_reason.unwrap();
    assert!(reason.contains("\"canary\"") && reason.contains(&format!("rollout approve {id}")), "{reason}");
    let targets = sandbox.all_targets(id).await;
    assert!(targets.iter().filter(|t| t.wave > 0).all(|t| t.state == TargetState::Pending), "{targets:?}");
    // A viewer may not approve; resume is not the way on.
    let viewer = sandbox.api_key("auditor", fleetpatch_store::Role::Viewer, None).await;
    let approve = format!("{}/v1/rollouts/{id}/approve", sandbox.api);
    let refused = fleetpatch_tests::client_with(Some(&viewer)).post(&approve).send().await.unwrap();
    assert_eq!(refused.status(), 403);
    assert_eq!(sandbox.post(&format!("/v1/rollouts/{id}/resume")).await.status(), 409);
    assert_eq!(sandbox.post(&format!("/v1/rollouts/{id}/approve")).await.status(), 200);
    // The pilot wave promotes itself (1 s soak, every target succeeded) at the reconciler's next pass.
    sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(60)).await;
    assert!(sandbox.all_targets(id).await.iter().all(|t| t.state == TargetState::Succeeded));
    let audit = sandbox
        .store
        .audit_entries(fleetpatch_store::AuditQuery { rollout_id: Some(id), before: None, limit: 100 })
        .await
        .unwrap();
    let approvals: Vec<_> = audit
        .iter()
        .filter(|e| e.route == "/v1/rollouts/{id}/approve" && e.status == 200)
        .map(|e| (e.actor_kind, e.actor.as_str()))
        .collect();
    assert_eq!(approvals.len(), 2, "one approval by an operator, one by the scheduler: {audit:#?}");
    assert_eq!(approvals[0], (fleetpatch_store::ActorKind::Scheduler, "automatic promotion"), "newest first");
    assert_eq!(approvals[1].0, fleetpatch_store::ActorKind::ApiKey);
    assert!(
        audit.iter().any(|e| e.route == "/v1/rollouts/{id}/approve" && e.status == 403),
        "the refusal is audited too"
    );
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_loses_nothing_and_the_agent_starts_once() {
    let options = SandboxOptions {
        workers: 0,
        sim: SimOptions { min_latency_ms: 700, max_latency_ms: 700, patch_ms: 300, ..SimOptions::default() },
        ..SandboxOptions::default()
    };
    let mut sandbox = Sandbox::start(options).await;
    let doomed = sandbox.spawn_worker();
    let id = sandbox.create_rollout(sim_rollout("crash", 1, 3, 1, 30)).await;
    let target = sandbox.all_targets(id).await.remove(0);
    // Kill the worker while it waits for the service manager: the agent was
    // already started on the target, the job is not acked yet.
    sandbox.wait_for_target_state(target.id, &[TargetState::Installing], Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    doomed.kill();
    let survivor = sandbox.spawn_worker();
    sandbox.workers.push(survivor);
    let target = sandbox.wait_for_target_state(target.id, &TargetState::FINAL, Duration::from_secs(60)).await;
    assert_eq!(target.state, TargetState::Succeeded, "{:?}", target.error);
    let deployment = fleetpatch_proto::plan::deployment_id(target.id, target.attempt);
    assert_eq!(sandbox.fleet.agent_starts(&deployment), 1, "the agent was started more than once");
    // Exactly one final state in the history, and it stays.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let finals = sandbox
        .store
        .transitions(target.id)
        .await
        .unwrap()
        .into_iter()
        .filter(|t| t.to.parse::<TargetState>().unwrap().is_final())
        .count();
    assert_eq!(finals, 1);
    let patches = sandbox.store.target_patches(target.id).await.unwrap();
    assert!(
        patches.iter().all(|p| p.state == PatchState::Succeeded),
        "{patches:#?}\nevents: {:#?}\nhistory: {:#?}",
        sandbox.store.agent_events(target.id).await.unwrap(),
        sandbox.store.transitions(target.id).await.unwrap()
    );
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_target_is_retried_with_backoff_then_fails_and_the_rollout_goes_on() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await;
    let mut request = sim_rollout("offline", 2, 1, 1, 30);
    request["max_tries"] = serde_json::json!(3);
    request["targets"][0]["labels"] = serde_json::to_value(behaviour("unreachable")).unwrap();
    let id = sandbox.create_rollout(request).await;
    let targets = sandbox.all_targets(id).await;
    let offline = sandbox.wait_for_target_state(targets[0].id, &[TargetState::Failed], Duration::from_secs(60)).await;
    let error = offline.error.clone().unwrap();
    assert!(error.contains("unreachable") && error.contains("gave up after 3 tries"), "{error}");
    // Two retries went back to `queued` through the delayed queue, each after its backoff (1 s).
    let history = sandbox.store.transitions(offline.id).await.unwrap();
    let requeues: Vec<_> = history.iter().filter(|t| t.to == "queued" && t.from != "pending").collect();
    assert_eq!(requeues.len(), 2, "{history:?}");
    let first_retry_claim = history.iter().filter(|t| t.to == "probing").nth(1).unwrap();
    assert!((first_retry_claim.at - requeues[0].at).num_milliseconds() >= 900, "the backoff was not honoured");
    sandbox.wait_for_target_state(targets[1].id, &[TargetState::Succeeded], Duration::from_secs(30)).await;
    sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(30)).await;
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_wait_for_their_window_and_the_deadline_marks_the_rest_missed() {
    use chrono::Datelike;
    let sandbox = Sandbox::start(SandboxOptions::default()).await;
    let now = chrono::Utc::now();
    // The start leaves the first dispatch (right after the create) time to
    // find it in the future on a loaded machine.
    let start_at = now + chrono::Duration::seconds(5);
    let deadline = now + chrono::Duration::seconds(18);
    // Targets without a label use a window that is always open; those of
    // site "closed" one that opens three days from now, after the deadline.
    let in_three_days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
        [((now.date_naive().weekday().num_days_from_monday() + 3) % 7) as usize];
    let mut request = sim_rollout("windows", 6, 1, 10, 30);
    for target in request["targets"].as_array_mut().unwrap().iter_mut().skip(4) {
        target["labels"] = serde_json::json!({"site": "closed"});
    }
    request["start_at"] = serde_json::json!(start_at.to_rfc3339());
    request["deadline"] = serde_json::json!(deadline.to_rfc3339());
    request["windows"] = serde_json::json!([
        {"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "start": "00:00", "duration_minutes": 10080,
         "time_zone": "UTC"},
        {"days": [in_three_days], "start": "00:00", "duration_minutes": 60, "time_zone": "Asia/Tokyo",
         "labels": {"site": "closed"}},
    ]);

    // Bad windows and a target no window applies to are named.
    let mut bad = request.clone();
    bad["windows"][0]["time_zone"] = serde_json::json!("Mars/Olympus_Mons");
    bad["windows"][1]["start"] = serde_json::json!("25:00");
    let mut only_labelled = request.clone();
    only_labelled["windows"].as_array_mut().unwrap().remove(0);
    for (body, fields) in [
        (bad, vec!["windows[0].time_zone", "windows[1].start"]),
        (only_labelled, vec!["targets[0].labels", "targets[1].labels", "targets[2].labels", "targets[3].labels"]),
    ] {
        let response = sandbox.http.post(format!("{}/v1/rollouts", sandbox.api)).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 422);
        let problem: serde_json::Value = response.json().await.unwrap();
        let named: Vec<&str> =
            problem["errors"].as_array().unwrap().iter().filter_map(|e| e["field"].as_str()).collect();
        assert_eq!(named, fields, "{problem}");
    }

    let id = sandbox.create_rollout(request).await;
    // Before its start: waiting, and the API says until when.
    let rollout = sandbox.wait_for_rollout_state(id, RolloutState::WaitingForWindow, Duration::from_secs(30)).await;
    assert!(rollout.pause_reason.as_deref().unwrap_or("").contains("starts at"), "{:?}", rollout.pause_reason);
    let shown: serde_json::Value =
        sandbox.http.get(format!("{}/v1/rollouts/{id}", sandbox.api)).send().await.unwrap().json().await.unwrap();
    assert_eq!(shown["rollout"]["state"], "waiting_for_window");
    let next: chrono::DateTime<chrono::Utc> = shown["rollout"]["next_window_at"].as_str().unwrap().parse().unwrap();
    assert!((next - start_at).num_milliseconds().abs() < 1_000, "{next} vs {start_at}");
    assert!(sandbox.all_targets(id).await.iter().all(|t| t.state == TargetState::Pending));

    // The reconciler wakes it at its start: the four targets whose window
    // is open go; the two others wait until the deadline and miss it.
    let rollout = sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(60)).await;
    assert!(rollout.completed_at.unwrap() >= deadline, "completed at the deadline, not before");
    let states: Vec<(String, TargetState)> =
        sandbox.all_targets(id).await.into_iter().map(|t| (t.host, t.state)).collect();
    let expected: Vec<(String, TargetState)> = (0..6)
        .map(|i| (format!("host-{i:05}"), if i < 4 { TargetState::Succeeded } else { TargetState::MissedWindow }))
        .collect();
    assert_eq!(states, expected);
    let started =
        sandbox.all_targets(id).await.into_iter().filter_map(|t| t.queued_at).min().expect("dispatched targets");
    assert!(started >= start_at, "nothing was dispatched before start_at ({started} < {start_at})");
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_machine_is_deployed_when_it_answers_and_one_that_never_does_fails_when_its_time_runs_out() {
    // A switched-off machine refuses its first two contacts (the deploy's
    // probe and the first reachability check), then answers.
    let sim = SimOptions { comes_back_after: 2, ..SandboxOptions::default().sim };
    let sandbox =
        Sandbox::start(SandboxOptions { sim, offline_check_seconds: vec![1, 2], ..SandboxOptions::default() }).await;
    let mut request = sim_rollout("offline", 3, 1, 1, 30);
    request["max_tries"] = serde_json::json!(1);
    request["retry_offline_for_seconds"] = serde_json::json!(12);
    request["targets"][0]["labels"] = serde_json::json!(behaviour("comes_back"));
    request["targets"][1]["labels"] = serde_json::json!(behaviour("unreachable"));

    let mut bad = request.clone();
    bad["retry_offline_for_seconds"] = serde_json::json!(0);
    let response = sandbox.http.post(format!("{}/v1/rollouts", sandbox.api)).json(&bad).send().await.unwrap();
    assert_eq!(response.status(), 422);
    let problem: serde_json::Value = response.json().await.unwrap();
    assert_eq!(problem["errors"][0]["field"], "retry_offline_for_seconds", "{problem}");

    let created = std::time::Instant::now();
    let id = sandbox.create_rollout(request).await;
    let rollout = sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(90)).await;
    let targets = sandbox.all_targets(id).await;
    let states: Vec<TargetState> = targets.iter().map(|t| t.state).collect();
    assert_eq!(states, [TargetState::Succeeded, TargetState::Failed, TargetState::Succeeded], "{targets:#?}");
    assert!(created.elapsed() >= Duration::from_secs(12), "completed only after the unreachable one's time ran out");
    assert!(rollout.completed_at.is_some());

    // The machine that came back went offline (freeing the one slot: the
    // third target did not wait for it), answered, and was deployed.
    let history = sandbox.store.transitions(targets[0].id).await.unwrap();
    let moves: Vec<(String, String)> = history.iter().map(|t| (t.from.clone(), t.to.clone())).collect();
    let offline_at = moves.iter().position(|m| m.1 == "offline").expect("went offline");
    assert_eq!(moves[offline_at + 1], ("offline".to_owned(), "pending".to_owned()), "{moves:?}");
    assert_eq!(moves.last().unwrap().1, "succeeded");
    // The other never answered: failed after its reachability checks, with the last reason.
    let error = targets[1].error.clone().unwrap_or_default();
    assert!(error.contains("within retry_offline_for (12 s)") && error.contains("refused"), "{error}");
    let gave_up = sandbox.store.transitions(targets[1].id).await.unwrap().pop().unwrap();
    assert_eq!((gave_up.from.as_str(), gave_up.to.as_str()), ("offline", "failed"));
    let third_queued = targets[2].queued_at.expect("dispatched");
    let back = history.iter().find(|t| t.from == "offline").expect("came back").at;
    assert!(third_queued < back, "the third target took the slot while the first was offline");
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_that_reboots_is_verified_when_it_is_back_and_one_that_never_returns_fails() {
    // A rebooting sim machine refuses two contacts, then answers on a new boot.
    let sim = SimOptions { reboot_contacts: 2, ..SandboxOptions::default().sim };
    let sandbox =
        Sandbox::start(SandboxOptions { sim, reboot_check_seconds: vec![1], ..SandboxOptions::default() }).await;
    let mut request = sim_rollout("reboot", 3, 1, 1, 30);
    request["reboot"] = serde_json::json!("if_required");
    request["reboot_timeout_seconds"] = serde_json::json!(6);
    request["targets"][0]["labels"] = serde_json::json!(behaviour("reboot_required"));
    request["targets"][1]["labels"] = serde_json::json!(behaviour("no_return"));

    let mut bad = request.clone();
    bad["reboot_timeout_seconds"] = serde_json::json!(0);
    let response = sandbox.http.post(format!("{}/v1/rollouts", sandbox.api)).json(&bad).send().await.unwrap();
    assert_eq!(response.status(), 422);
    let problem: serde_json::Value = response.json().await.unwrap();
    assert_eq!(problem["errors"][0]["field"], "reboot_timeout_seconds", "{problem}");

    let id = sandbox.create_rollout(request).await;
    sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(90)).await;
    let targets = sandbox.all_targets(id).await;
    let states: Vec<TargetState> = targets.iter().map(|t| t.state).collect();
    assert_eq!(states, [TargetState::Succeeded, TargetState::Failed, TargetState::Succeeded], "{targets:#?}");

    // The one that rebooted: running → rebooting → succeeded, its verdict
    // from the scan after the reboot. (On a loaded machine the sim agent's
    // final result can arrive before the worker moved the target on from
    // `installing`; the store takes it from there, as from `running`.)
    let store = &sandbox.store;
    let moves = |id| async move {
        store.transitions(id).await.unwrap().into_iter().map(|t| (t.from, t.to)).collect::<Vec<_>>()
    };
    let rebooted = moves(targets[0].id).await;
    let [.., (before, to_rebooting), (from_rebooting, succeeded)] = rebooted.as_slice() else { panic!("{rebooted:?}") };
    assert!(matches!(before.as_str(), "running" | "installing"), "{rebooted:?}");
    assert_eq!(
        (to_rebooting.as_str(), from_rebooting.as_str(), succeeded.as_str()),
        ("rebooting", "rebooting", "succeeded")
    );
    assert_eq!(targets[0].verified_state.as_deref(), Some("all_installed"));
    assert_eq!(targets[0].reboot_until, None);
    // The one that never came back failed when reboot_timeout ran out, with the last finding.
    let error = targets[1].error.clone().unwrap_or_default();
    assert!(error.contains("did not come back after reboot within reboot_timeout (6 s)"), "{error}");
    assert!(error.contains("refused"), "{error}");
    assert_eq!(moves(targets[1].id).await.last().unwrap(), &("rebooting".to_owned(), "failed".to_owned()));
    // A machine that needs no reboot does not wait for one; and the one
    // slot stayed taken while the second machine rebooted.
    assert!(!moves(targets[2].id).await.iter().any(|m| m.1 == "rebooting"));
    let gave_up = targets[1].finished_at.expect("finished");
    assert!(targets[2].queued_at.expect("dispatched") >= gave_up, "the rebooting target held its slot");
    sandbox.stop().await;
}
