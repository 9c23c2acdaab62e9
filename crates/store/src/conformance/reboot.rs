//! Reboot and verify: after a successful final result whose rollout asks
//! for a reboot, the target is `rebooting` and keeps its slot; numbered
//! checks wait for the machine to come back on a new boot; the scan then
//! decides `succeeded` or `failed`; a machine not back in time fails.

use super::offline::reach_checks;
use super::*;

/// Claims, probes (reading boot `boot`), stages and starts `target`.
async fn running_on_boot(store: &Store, target: &Target, boot: &str) -> Target {
    let Claim::Claimed(context) = store.claim_deploy(target.id, target.attempt, false, "n").await.expect("claim")
    else {
        panic!("target {} could not be claimed", target.host);
    };
    let probe = serde_json::json!({"os": "Debian", "boot_id": boot});
    let outcome = store.record_probe(&context, "Debian", "x86_64", probe, &[], "hash").await.expect("probe");
    assert_eq!(outcome, ProbeOutcome::Stage);
    assert!(store.mark_installing(&context.target, "push").await.expect("installing"));
    assert!(store.mark_running(&context.target).await.expect("running"));
    store.target(target.id).await.expect("target")
}

fn final_with_reboot(success: bool, reboot_required: bool) -> ReportKind {
    ReportKind::Final { success, reboot_required, message: if success { "done" } else { "failed" }.into() }
}

pub async fn a_rebooting_target_holds_its_slot_until_it_is_back_on_a_new_boot_and_the_scan_decides(
    db: &dyn TestDatabase,
) {
    let t0 = chrono::DateTime::parse_from_rfc3339("2026-12-08T22:00:00Z").unwrap().with_timezone(&chrono::Utc);
    let manual = ManualClock::new(t0);
    let store = &db.store().clone().with_clock(manual.clock());
    let secs = |s: i64| chrono::Duration::seconds(s);
    let id = create(store, Spec { reboot_timeout_seconds: 600, ..Spec::new(3, 2, 1) }).await;
    let targets = all_targets(store, id).await;
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 1);
    let first = running_on_boot(store, &targets[0], "boot-1").await;
    assert_eq!(first.boot_id.as_deref(), Some("boot-1"), "the probe's boot is kept");
    drain_outbox(store).await;

    // Success, and a patch asked for a reboot (if_required): rebooting, not succeeded.
    let intake = store.report_intake();
    intake.apply_reports(&[report(&first, 1, final_with_reboot(true, true))]).await.expect("final");
    let rebooting = store.target(first.id).await.expect("target");
    assert_eq!(rebooting.state, TargetState::Rebooting);
    assert_eq!((rebooting.reboot_until, rebooting.next_check_at), (Some(t0 + secs(600)), Some(t0)));
    assert_eq!((rebooting.tries, rebooting.went_down_at, rebooting.finished_at), (0, None, None));
    let messages = outbox(store).await;
    let checks = reach_checks(&messages);
    assert_eq!(checks.len(), 1, "{messages:?}");
    assert_eq!((checks[0].0.check, checks[0].0.attempt, checks[0].1), (1, 1, None), "the first check at once");
    let keys = outbox_keys(store).await;
    assert_eq!(count(&keys, routing::CLEANUP), 0, "the agent is removed once the machine is back: {keys:?}");
    assert_eq!(count(&keys, "target.rebooting"), 1, "{keys:?}");
    drain_outbox(store).await;

    // It keeps its slot: nothing else is dispatched while it reboots.
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 0);

    // Checks are numbered; a wrong or repeated number changes nothing.
    let quarter = Duration::from_secs(15);
    let same = RebootCheck::SameBoot;
    assert_eq!(store.record_reboot_check(first.id, 1, 2, &same, quarter).await.unwrap(), RebootOutcome::Stale);
    assert_eq!(
        store.record_reboot_check(first.id, 1, 1, &same, quarter).await.unwrap(),
        RebootOutcome::Waiting { check: 2, next_check_at: t0 + secs(15) },
        "still up on the old boot: shutdown waits a minute"
    );
    assert_eq!(store.record_reboot_check(first.id, 1, 1, &same, quarter).await.unwrap(), RebootOutcome::Stale);
    assert_eq!(store.record_reboot_check(first.id, 2, 2, &same, quarter).await.unwrap(), RebootOutcome::Stale);
    let checks = reach_checks(&outbox(store).await);
    assert_eq!(checks.iter().map(|c| c.0.check).collect::<Vec<_>>(), [2]);
    drain_outbox(store).await;

    manual.advance(Duration::from_secs(15));
    let down = RebootCheck::Down("connection refused".into());
    assert_eq!(
        store.record_reboot_check(first.id, 1, 2, &down, quarter).await.unwrap(),
        RebootOutcome::Waiting { check: 3, next_check_at: t0 + secs(30) }
    );
    let now = store.target(first.id).await.expect("target");
    assert_eq!((now.went_down_at, now.error.as_deref()), (Some(t0 + secs(15)), Some("connection refused")));
    drain_outbox(store).await;

    // A lost check is sent again by the reconciler.
    assert!(store.overdue_reachability_checks(Duration::from_secs(30), 10).await.unwrap().is_empty());
    manual.advance(Duration::from_secs(60));
    let overdue = reach_checks(&store.overdue_reachability_checks(Duration::from_secs(30), 10).await.unwrap());
    assert_eq!(
        overdue.iter().map(|c| (c.0.target_id.clone(), c.0.check)).collect::<Vec<_>>(),
        [(first.id.to_string(), 3)]
    );

    // Back on a new boot, every patch there: succeeded, verified, slot freed, agent removed.
    let back = RebootCheck::Back { installed: vec![0, 1], missing: vec![], unknown: vec![] };
    assert_eq!(store.record_reboot_check(first.id, 1, 3, &back, quarter).await.unwrap(), RebootOutcome::Verified);
    let done = store.target(first.id).await.expect("target");
    assert_eq!(done.state, TargetState::Succeeded);
    assert_eq!(done.verified_state.as_deref(), Some("all_installed"));
    assert_eq!((done.reboot_until, done.next_check_at, done.finished_at), (None, None, Some(t0 + secs(75))));
    let keys = outbox_keys(store).await;
    assert_eq!((count(&keys, routing::CLEANUP), count(&keys, routing::DISPATCH)), (1, 1), "{keys:?}");
    assert_eq!(count(&keys, "target.succeeded"), 1, "{keys:?}");
    let history = states(&store.transitions(first.id).await.expect("history"));
    assert!(history.ends_with(&[
        pair(TargetState::Running, TargetState::Rebooting),
        pair(TargetState::Rebooting, TargetState::Succeeded)
    ]));
    assert_eq!(store.record_reboot_check(first.id, 1, 4, &back, quarter).await.unwrap(), RebootOutcome::Stale);
    drain_outbox(store).await;

    // The next target: back, but the scan misses a patch: failed, naming it.
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 1);
    let second = running_on_boot(store, &targets[1], "boot-7").await;
    intake.apply_reports(&[report(&second, 1, final_with_reboot(true, true))]).await.expect("final");
    let partial = RebootCheck::Back { installed: vec![0], missing: vec![1], unknown: vec![] };
    assert_eq!(
        store.record_reboot_check(second.id, 1, 1, &partial, quarter).await.unwrap(),
        RebootOutcome::MissingAfterReboot
    );
    let failed = store.target(second.id).await.expect("target");
    assert_eq!(failed.state, TargetState::Failed);
    assert_eq!(failed.verified_state.as_deref(), Some("missing #1"));
    let error = failed.error.unwrap_or_default();
    assert!(error.contains("after the reboot") && error.contains("#1 missing"), "{error}");
}

pub async fn a_machine_that_does_not_come_back_or_never_reboots_fails_and_only_a_successful_final_reboots(
    db: &dyn TestDatabase,
) {
    let t0 = chrono::DateTime::parse_from_rfc3339("2026-12-08T22:00:00Z").unwrap().with_timezone(&chrono::Utc);
    let manual = ManualClock::new(t0);
    let store = &db.store().clone().with_clock(manual.clock());
    let intake = store.report_intake();
    let quarter = Duration::from_secs(15);
    let id =
        create(store, Spec { reboot: RebootPolicy::Always, reboot_timeout_seconds: 600, ..Spec::new(4, 1, 4) }).await;
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 4);
    let targets = all_targets(store, id).await;
    let mut running = Vec::new();
    for target in &targets {
        running.push(running_on_boot(store, target, "boot-1").await);
    }
    // `always` reboots without a patch asking; a failed deployment is failed at once.
    intake
        .apply_reports(&[
            report(&running[0], 1, final_with_reboot(true, false)),
            report(&running[1], 1, final_with_reboot(true, false)),
            report(&running[2], 1, final_with_reboot(false, true)),
        ])
        .await
        .expect("finals");
    let ids: Vec<Uuid> = running.iter().map(|t| t.id).collect();
    let state = |i: usize| {
        let id = ids[i];
        async move { store.target(id).await.expect("target") }
    };
    assert_eq!(state(0).await.state, TargetState::Rebooting);
    assert_eq!(state(1).await.state, TargetState::Rebooting);
    assert_eq!(state(2).await.state, TargetState::Failed, "a failed deployment does not wait for a reboot");
    drain_outbox(store).await;

    // Down until the deadline: failed, named, and no cleanup for a machine that is not there.
    let down = RebootCheck::Down("connection timed out".into());
    assert!(matches!(
        store.record_reboot_check(running[0].id, 1, 1, &down, quarter).await.unwrap(),
        RebootOutcome::Waiting { check: 2, .. }
    ));
    // Up on the same boot until the deadline: the reboot never happened.
    assert!(matches!(
        store.record_reboot_check(running[1].id, 1, 1, &RebootCheck::SameBoot, quarter).await.unwrap(),
        RebootOutcome::Waiting { check: 2, .. }
    ));
    drain_outbox(store).await;
    manual.advance(Duration::from_secs(600));
    assert_eq!(
        store.record_reboot_check(running[0].id, 1, 2, &down, quarter).await.unwrap(),
        RebootOutcome::DidNotComeBack
    );
    let gone = state(0).await;
    assert_eq!(gone.state, TargetState::Failed);
    let error = gone.error.unwrap_or_default();
    assert!(error.contains("did not come back after reboot") && error.contains("10 min"), "{error}");
    assert!(error.contains("connection timed out"), "the last check's finding: {error}");
    assert_eq!(count(&outbox_keys(store).await, routing::CLEANUP), 0);
    drain_outbox(store).await;
    assert_eq!(
        store.record_reboot_check(running[1].id, 1, 2, &RebootCheck::SameBoot, quarter).await.unwrap(),
        RebootOutcome::DidNotComeBack
    );
    let stuck = state(1).await;
    assert_eq!(stuck.state, TargetState::Failed);
    assert!(stuck.error.unwrap_or_default().contains("boot has not changed"));
    assert_eq!(count(&outbox_keys(store).await, routing::CLEANUP), 1, "the machine is there: clean it up");

    // `never`: a patch that asks for a reboot does not make the target wait.
    let never = create(store, Spec { reboot: RebootPolicy::Never, ..Spec::new(1, 1, 1) }).await;
    assert_eq!(store.dispatch(never).await.expect("dispatch").dispatched, 1);
    let target = running_on_boot(store, &all_targets(store, never).await[0], "boot-1").await;
    intake.apply_reports(&[report(&target, 1, final_with_reboot(true, true))]).await.expect("final");
    assert_eq!(store.target(target.id).await.expect("target").state, TargetState::Succeeded);
}
