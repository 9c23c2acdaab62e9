//! Offline targets (`retry_offline_for`): the slot is freed, the checks are
//! numbered and delayed, a machine that answers is dispatched again (even
//! after its wave ended), one that does not fails when its time runs out and
//! only then counts against its wave; a rollout completes only when none is
//! left offline, and abort cancels them.

use super::*;

/// Claims a queued target (it moves to `probing`) and returns it as the worker holds it.
async fn claimed(store: &Store, target: &Target) -> Target {
    let Claim::Claimed(context) = store.claim_deploy(target.id, target.attempt, false, "n").await.expect("claim")
    else {
        panic!("target {} could not be claimed", target.host);
    };
    context.target
}

pub(super) fn reach_checks(messages: &[fleetpatch_bus::Outgoing]) -> Vec<(v1::ReachabilityCheck, Option<i64>)> {
    messages
        .iter()
        .filter(|m| m.routing_key == routing::REACH)
        .map(|m| (v1::ReachabilityCheck::decode(m.payload.as_slice()).expect("a check"), m.due_at_unix_ms))
        .collect()
}

/// A message delayed by about `seconds` (the bus's wait queues count real
/// time from when the message is written, whatever the store's clock says).
fn assert_delayed(due_at_unix_ms: Option<i64>, seconds: i64) {
    let due = due_at_unix_ms.expect("a delayed message");
    let expected = chrono::Utc::now().timestamp_millis() + seconds * 1_000;
    assert!((due - expected).abs() < 5_000, "due {due}, expected about {expected}");
}

async fn succeed(store: &Store, target: &Target) {
    let running = bring_to_running(store, target).await.target;
    store.report_intake().apply_reports(&[report(&running, 1, final_report(true))]).await.expect("final report");
}

pub async fn offline_targets_free_their_slot_and_come_back_or_fail_when_their_time_runs_out(db: &dyn TestDatabase) {
    let t0 = chrono::DateTime::parse_from_rfc3339("2026-12-07T08:00:00Z").unwrap().with_timezone(&chrono::Utc);
    let manual = ManualClock::new(t0);
    let store = &db.store().clone().with_clock(manual.clock());
    let secs = |s: i64| chrono::Duration::seconds(s);

    // A rollout without retry_offline_for: its unreachable targets fail, never wait.
    let plain = create(store, Spec::new(1, 1, 1)).await;
    store.dispatch(plain).await.expect("dispatch");
    let target = claimed(store, &all_targets(store, plain).await[0]).await;
    let refused = store.go_offline(&target, "connection refused", Duration::from_secs(60)).await.unwrap_err();
    assert!(matches!(refused, Error::Invalid(_)) && refused.to_string().contains("retry_offline_for"), "{refused}");
    assert_eq!(store.target(target.id).await.expect("target").state, TargetState::Probing, "nothing written");

    // Canary of 2 (no failure allowed), then 2 more; one slot; an hour offline at most.
    let waves = vec![WaveSpec::new("canary", Some(2), 0.0), WaveSpec::new("rest", None, 100.0)];
    let id = create(store, Spec { waves, offline_for: Some(3600), ..Spec::new(4, 1, 1) }).await;
    let targets = all_targets(store, id).await;
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 1);
    drain_outbox(store).await;
    let laptop = claimed(store, &targets[0]).await;
    assert!(store.go_offline(&laptop, "connection refused", Duration::from_secs(60)).await.expect("offline"));
    assert!(!store.go_offline(&laptop, "again", Duration::from_secs(60)).await.expect("twice"), "guarded");
    let offline = store.target(laptop.id).await.expect("target");
    assert_eq!((offline.state, offline.tries), (TargetState::Offline, 0));
    assert_eq!((offline.offline_until, offline.next_check_at), (Some(t0 + secs(3600)), Some(t0 + secs(60))));
    assert_eq!(offline.error.as_deref(), Some("connection refused"));
    let messages = outbox(store).await;
    let checks = reach_checks(&messages);
    assert_eq!(checks.len(), 1, "{messages:?}");
    assert_eq!((checks[0].0.check, checks[0].0.attempt), (1, 1));
    assert_delayed(checks[0].1, 60);
    let keys = outbox_keys(store).await;
    assert_eq!((count(&keys, routing::DISPATCH), count(&keys, "target.offline")), (1, 1), "{keys:?}");
    drain_outbox(store).await;

    // It holds no slot: the next target goes.
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 1);
    let printer = store.target(targets[1].id).await.expect("target");
    assert_eq!(printer.state, TargetState::Queued);

    // Checks are numbered: a wrong or repeated number changes nothing.
    manual.advance(Duration::from_secs(60));
    let silent = Reachability::Silent("connection refused".into());
    let five_min = Duration::from_secs(300);
    assert_eq!(
        store.record_reachability(laptop.id, 1, 2, &silent, five_min).await.expect("check"),
        CheckOutcome::Stale
    );
    assert_eq!(
        store.record_reachability(laptop.id, 1, 1, &silent, five_min).await.expect("check"),
        CheckOutcome::StillOffline { check: 2, next_check_at: t0 + secs(360) }
    );
    assert_eq!(
        store.record_reachability(laptop.id, 1, 1, &silent, five_min).await.expect("check"),
        CheckOutcome::Stale,
        "a duplicate"
    );
    assert_eq!(
        store.record_reachability(laptop.id, 2, 2, &silent, five_min).await.expect("check"),
        CheckOutcome::Stale,
        "another attempt"
    );
    let checks = reach_checks(&outbox(store).await);
    assert_eq!(checks.len(), 1);
    assert_eq!(checks[0].0.check, 2);
    assert_delayed(checks[0].1, 300);
    drain_outbox(store).await;

    // The reconciler finds a check that is overdue (its message lost), not one that is only due.
    assert!(store.overdue_reachability_checks(Duration::from_secs(30), 10).await.expect("overdue").is_empty());
    manual.advance(Duration::from_secs(340));
    let lost = store.overdue_reachability_checks(Duration::from_secs(30), 10).await.expect("overdue");
    assert_eq!(
        reach_checks(&lost).into_iter().map(|(c, _)| (c.target_id, c.check)).collect::<Vec<_>>(),
        [(laptop.id.to_string(), 2)]
    );

    // The canary ends without waiting for its offline target, and counts no failure.
    succeed(store, &printer).await;
    let outcome = store.dispatch(id).await.expect("dispatch");
    assert_eq!((outcome.dispatched, outcome.state), (1, RolloutState::Running));
    assert_eq!(store.rollout(id).await.expect("rollout").current_wave, 1, "the next wave started");
    let third = store.target(targets[2].id).await.expect("target");
    assert_eq!(third.state, TargetState::Queued);

    // The laptop answers: back to pending, dispatched (before the current
    // wave's own targets) when a slot frees.
    assert_eq!(
        store.record_reachability(laptop.id, 1, 2, &Reachability::Answered, five_min).await.expect("check"),
        CheckOutcome::BackOnline
    );
    let back = store.target(laptop.id).await.expect("target");
    assert_eq!((back.state, back.tries, back.offline_until, back.next_check_at), (TargetState::Pending, 0, None, None));
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 0, "the one slot is taken");
    succeed(store, &third).await;
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 1);
    assert_eq!(store.target(laptop.id).await.expect("target").state, TargetState::Queued, "the laptop goes first");
    assert_eq!(store.target(targets[3].id).await.expect("target").state, TargetState::Pending);

    // Unreachable again, and this time it never answers: failed when the
    // hour runs out, and the canary (which allowed no failure) pauses the rollout.
    let laptop = claimed(store, &laptop).await;
    assert!(store.go_offline(&laptop, "no route to host", Duration::from_secs(60)).await.expect("offline"));
    let until = store.target(laptop.id).await.expect("target").offline_until.expect("until");
    manual.advance(Duration::from_secs(3600));
    assert_eq!(manual.clock().now(), until);
    assert_eq!(
        store.record_reachability(laptop.id, 1, 1, &silent, five_min).await.expect("check"),
        CheckOutcome::GaveUp
    );
    let failed = store.target(laptop.id).await.expect("target");
    assert_eq!((failed.state, failed.offline_until, failed.next_check_at), (TargetState::Failed, None, None));
    let error = failed.error.unwrap_or_default();
    assert!(error.contains("did not answer 1 reachability check within retry_offline_for (1 h)"), "{error}");
    assert!(error.contains("connection refused"), "the last reason: {error}");
    let patches = store.target_patches(laptop.id).await.expect("patches");
    assert!(patches.iter().all(|p| p.state == PatchState::Failed), "{patches:?}");
    let rollout = store.rollout(id).await.expect("rollout");
    assert_eq!(rollout.state, RolloutState::Paused);
    let reason = rollout.pause_reason.unwrap_or_default();
    assert!(reason.contains("\"canary\"") && reason.contains(&laptop.host), "{reason}");
    let history = states(&store.transitions(laptop.id).await.expect("history"));
    assert!(history.contains(&pair(TargetState::Offline, TargetState::Pending)), "{history:?}");
    assert_eq!(history.last(), Some(&pair(TargetState::Offline, TargetState::Failed)));
}

pub async fn an_offline_target_holds_the_rollout_open_until_it_ends_and_abort_cancels_it(db: &dyn TestDatabase) {
    let store = db.store();
    let id = create(store, Spec { offline_for: Some(86_400), ..Spec::new(2, 1, 2) }).await;
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 2);
    let targets = all_targets(store, id).await;
    let away = claimed(store, &targets[0]).await;
    assert!(store.go_offline(&away, "connection timed out", Duration::from_secs(60)).await.expect("offline"));
    succeed(store, &targets[1]).await;
    let outcome = store.dispatch(id).await.expect("dispatch");
    assert_eq!(outcome.state, RolloutState::Running, "not complete while a target is offline");
    assert_eq!(store.rollout(id).await.expect("rollout").completed_at, None);
    let progress = store.progress(&store.rollout(id).await.expect("rollout")).await.expect("progress");
    assert_eq!(progress.by_state.get("offline"), Some(&1), "{progress:?}");

    let aborted = store.abort_rollout(id).await.expect("abort");
    assert_eq!(aborted.state, RolloutState::Aborted);
    let cancelled = store.target(away.id).await.expect("target");
    assert_eq!(
        (cancelled.state, cancelled.offline_until, cancelled.next_check_at),
        (TargetState::Cancelled, None, None)
    );
    assert!(store.overdue_reachability_checks(Duration::ZERO, 10).await.expect("overdue").is_empty());
    let silent = Reachability::Silent("x".into());
    assert_eq!(
        store.record_reachability(away.id, 1, 1, &silent, Duration::from_secs(1)).await.expect("check"),
        CheckOutcome::Stale,
        "a check after the abort changes nothing"
    );
}
