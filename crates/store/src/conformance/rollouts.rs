//! Rollouts, dispatch and waves.

use super::*;

pub async fn create_rollout_round_trips_rollout_patches_and_targets(db: &dyn TestDatabase) {
    let store = db.store();
    let id = create(
        store,
        Spec {
            waves: vec![WaveSpec::new("canary", Some(2), 0.0), WaveSpec::new("rest", None, 25.5)],
            ..Spec::new(5, 3, 4)
        },
    )
    .await;
    let rollout = store.rollout(id).await.expect("rollout");
    assert_eq!((rollout.id, rollout.name.as_str(), rollout.state), (id, "conformance", RolloutState::Running));
    assert_eq!((rollout.concurrency, rollout.timeout_seconds, rollout.current_wave), (4, 600, 0));
    assert_eq!(rollout.waves[1], WaveSpec::new("rest", None, 25.5));
    assert_eq!(rollout.settings.reboot, RebootPolicy::IfRequired);
    assert!(rollout.settings.keep_files);
    assert_eq!(rollout.completed_at, None);

    let patches = store.patches(id).await.expect("patches");
    assert_eq!(patches.len(), 3);
    for (i, p) in patches.iter().enumerate() {
        let expected = patch(i);
        assert_eq!(p.index, i as u32);
        assert_eq!(
            (&p.name, &p.kb, &p.file, &p.sha256),
            (&expected.name, &expected.kb, &expected.file, &expected.sha256)
        );
        assert_eq!((p.size, p.installer, p.arguments.as_str()), (expected.size, InstallerKind::Msu, "/quiet"));
        assert_eq!((&p.success_codes, &p.reboot_codes, p.timeout_seconds), (&vec![0], &vec![3010], 300));
        assert_eq!(p.detection, expected.detection);
    }

    let targets = all_targets(store, id).await;
    assert_eq!(targets.iter().map(|t| t.ordinal).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
    assert_eq!(targets.iter().map(|t| t.wave).collect::<Vec<_>>(), vec![0, 0, 1, 1, 1]);
    for (i, t) in targets.iter().enumerate() {
        let expected = target(i, t.wave);
        assert_eq!((&t.host, t.port, &t.transport), (&expected.host, expected.port, &expected.transport));
        assert_eq!((&t.labels, &t.credential), (&expected.labels, &expected.credential));
        assert_eq!((t.state, t.attempt, t.tries, t.timeout_seconds), (TargetState::Pending, 1, 0, 600));
        assert_eq!(t.rollout_id, id);
    }
    assert_eq!(store.target(targets[3].id).await.expect("target"), targets[3]);

    let progress = store.progress(&rollout).await.expect("progress");
    assert_eq!(progress.total, 5);
    assert_eq!(progress.by_state.get("pending"), Some(&5));
    assert_eq!(
        progress.waves.iter().map(|w| (w.name.as_str(), w.total)).collect::<Vec<_>>(),
        [("canary", 2), ("rest", 3)]
    );

    // Paging in dispatch order.
    let page = store.targets(id, None, Some(1), 2).await.expect("page");
    assert_eq!(page.iter().map(|t| t.ordinal).collect::<Vec<_>>(), vec![2, 3]);

    // A second rollout, created a millisecond later, is listed first.
    let manual = ManualClock::new(rollout.created_at + chrono::Duration::milliseconds(1));
    let second = create(&store.clone().with_clock(manual.clock()), Spec::new(1, 0, 1)).await;
    let listed: Vec<Uuid> = store.list_rollouts(10).await.expect("list").into_iter().map(|r| r.id).collect();
    assert_eq!(listed, vec![second, id]);
    assert_eq!(store.list_rollouts(1).await.expect("list").len(), 1);
}

pub async fn a_rollout_taken_in_chunks_keeps_their_order_and_is_invisible_until_committed(db: &dyn TestDatabase) {
    let store = db.store();
    use crate::schedule::{Day, MaintenanceWindow, Schedule};
    let window = |site: Option<&str>| MaintenanceWindow {
        days: vec![Day::Sat],
        start: "22:00".into(),
        duration_minutes: 360,
        time_zone: "Europe/Paris".into(),
        labels: site.map(|s| BTreeMap::from([("site".to_owned(), s.to_owned())])).unwrap_or_default(),
    };
    let schedule = Schedule { windows: vec![window(Some("s1")), window(None)], ..Schedule::default() };
    let new = |targets: Vec<NewTarget>| NewRollout {
        name: "chunks".into(),
        concurrency: 3,
        timeout_seconds: 600,
        waves: vec![WaveSpec::new("canary", Some(2), 0.0), WaveSpec::new("rest", None, 100.0)],
        settings: RolloutSettings { schedule: schedule.clone(), ..RolloutSettings::default() },
        patches: vec![patch(0)],
        targets,
    };
    // The targets the caller had at once, then two chunks.
    let mut intake = store.begin_rollout(new(vec![target(0, 0), target(1, 0)])).await.expect("begin");
    let id = intake.id();
    intake.add_targets(&[target(2, 1), target(3, 1), target(4, 1)]).await.expect("chunk");
    intake.add_targets(&[]).await.expect("an empty chunk adds nothing");
    intake.add_targets(&[target(5, 1)]).await.expect("chunk");
    // More than one statement's worth on either backend's portable path
    // (SQLite binds at most 32,766 values in one).
    let large: Vec<NewTarget> = (6..1_206).map(|i| target(i, 1)).collect();
    intake.add_targets(&large).await.expect("a large chunk");
    assert_eq!(intake.targets(), 1_206);
    // Another connection (SQLite's store has one, held by the intake).
    let other = db.connect_another().await;
    assert!(matches!(other.rollout(id).await, Err(Error::NotFound { .. })), "nothing is visible before the commit");
    assert_eq!(intake.commit().await.expect("commit"), id);
    let targets = all_targets(store, id).await;
    assert_eq!(targets.iter().map(|t| t.ordinal).collect::<Vec<_>>(), (0..1_206).collect::<Vec<u32>>());
    assert_eq!(
        targets.iter().map(|t| t.host.as_str()).collect::<Vec<_>>(),
        (0..1_206).map(|i| format!("host-{i:04}")).collect::<Vec<_>>()
    );
    assert_eq!(targets.iter().take(6).map(|t| t.wave).collect::<Vec<_>>(), [0, 0, 1, 1, 1, 1]);
    for (i, t) in targets.iter().enumerate() {
        let expected = target(i, t.wave);
        assert_eq!((t.port, &t.labels, &t.credential), (expected.port, &expected.labels, &expected.credential));
    }
    // The sets of windows met in the chunks are kept with the rollout:
    // target 0 (site s0) has the unlabelled window, target 1 (s1) its own.
    let rollout = store.rollout(id).await.expect("rollout");
    assert_eq!(rollout.settings.schedule.groups, vec![vec![1], vec![0]]);
    assert_eq!(outbox(store).await.len(), 1, "one dispatch request");

    // Dropped before its commit: rolled back, nothing left.
    let intake = store.begin_rollout(new(vec![target(0, 0)])).await.expect("begin");
    let dropped = intake.id();
    drop(intake);
    assert!(matches!(store.rollout(dropped).await, Err(Error::NotFound { .. })));
    // A rollout without targets is refused at its commit.
    let empty = store.begin_rollout(new(vec![])).await.expect("begin");
    assert!(matches!(empty.commit().await, Err(Error::Invalid(_))));
    assert_eq!(store.list_rollouts(10).await.expect("list").len(), 1);
}

pub async fn create_rollout_announces_a_dispatch_through_the_outbox(db: &dyn TestDatabase) {
    let store = db.store();
    let id = create(store, Spec::new(3, 1, 2)).await;
    let messages = outbox(store).await;
    assert_eq!(messages.len(), 1, "one dispatch request, nothing else: {messages:?}");
    assert_eq!(messages[0].routing_key, routing::DISPATCH);
    let request = v1::DispatchRequest::decode(messages[0].payload.as_slice()).expect("a DispatchRequest");
    assert_eq!(request.rollout_id, id.to_string());
    assert_eq!(store.outbox_depth().await.expect("depth"), 1);
}

pub async fn fleet_gauges_count_rollouts_active_targets_and_the_outbox(db: &dyn TestDatabase) {
    let store = db.store();
    assert_eq!(store.fleet_gauges().await.expect("gauges"), FleetGauges::default());
    assert!(store.readiness_check()().await, "a store whose database answers is ready");
    let running = create(store, Spec::new(5, 1, 2)).await;
    let paused = create(store, Spec::new(3, 1, 3)).await;
    let done = create(store, Spec::new(1, 1, 1)).await;
    drain_outbox(store).await;
    store.dispatch(running).await.expect("dispatch");
    store.dispatch(paused).await.expect("dispatch");
    store.pause_rollout(paused, "operator").await.expect("pause");
    store.dispatch(done).await.expect("dispatch");
    for target in in_state(store, done, TargetState::Queued).await {
        assert!(store.fail_target(&target, "boom", false).await.expect("fail"));
    }
    assert_eq!(store.dispatch(done).await.expect("dispatch").state, RolloutState::Completed);

    let gauges = store.fleet_gauges().await.expect("gauges");
    let rollouts = BTreeMap::from([("completed".to_owned(), 1), ("paused".to_owned(), 1), ("running".to_owned(), 1)]);
    assert_eq!(gauges.rollouts_by_state, rollouts);
    // The completed rollout's failed target is not active; the others are.
    let targets = BTreeMap::from([("pending".to_owned(), 3), ("queued".to_owned(), 5)]);
    assert_eq!(gauges.active_targets_by_state, targets);
    assert_eq!(gauges.outbox_pending, store.outbox_depth().await.expect("depth"));
    assert!(gauges.outbox_pending > 0, "the dispatches left deploy jobs in the outbox");
}

pub async fn dispatch_fills_free_slots_in_ordinal_order(db: &dyn TestDatabase) {
    let store = db.store();
    let id = create(store, Spec::new(5, 1, 2)).await;
    drain_outbox(store).await;

    let outcome = store.dispatch(id).await.expect("dispatch");
    assert_eq!(outcome, DispatchOutcome { dispatched: 2, state: RolloutState::Running, halted: None });
    let queued = in_state(store, id, TargetState::Queued).await;
    assert_eq!(queued.iter().map(|t| t.ordinal).collect::<Vec<_>>(), vec![0, 1]);
    assert!(queued.iter().all(|t| t.queued_at.is_some()));
    let jobs: Vec<v1::DeployJob> = outbox(store)
        .await
        .into_iter()
        .filter(|m| m.routing_key == routing::DEPLOY)
        .map(|m| v1::DeployJob::decode(m.payload.as_slice()).expect("a DeployJob"))
        .collect();
    assert_eq!(jobs.len(), 2);
    assert_eq!(jobs[0].target_id, queued[0].id.to_string());
    assert_eq!((jobs[0].rollout_id.as_str(), jobs[0].attempt, jobs[0].r#try), (id.to_string().as_str(), 1, 0));

    // No free slot: nothing more.
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 0);
    // A slot frees up: the next target in order takes it.
    assert!(store.fail_target(&queued[0], "boom", false).await.expect("fail"));
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 1);
    let queued = in_state(store, id, TargetState::Queued).await;
    assert_eq!(queued.iter().map(|t| t.ordinal).collect::<Vec<_>>(), vec![1, 2]);

    // Finish everything: the rollout completes.
    for _ in 0..10 {
        for target in in_state(store, id, TargetState::Queued).await {
            assert!(store.fail_target(&target, "boom", false).await.expect("fail"));
        }
        if store.dispatch(id).await.expect("dispatch").state == RolloutState::Completed {
            break;
        }
    }
    let rollout = store.rollout(id).await.expect("rollout");
    assert_eq!(rollout.state, RolloutState::Completed);
    assert!(rollout.completed_at.is_some());
    // A completed rollout dispatches nothing.
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 0);
}

/// Dispatch scans from a cursor past the targets it already queued; a
/// target moved back to `pending` behind it (retry failed) is still found,
/// first, by the next dispatch.
pub async fn a_target_moved_back_behind_the_dispatch_cursor_is_dispatched_again(db: &dyn TestDatabase) {
    let store = db.store();
    let id = create(store, Spec::new(6, 0, 2)).await;
    let queued_ordinals =
        || async { in_state(store, id, TargetState::Queued).await.iter().map(|t| t.ordinal).collect::<Vec<_>>() };
    let fail_queued = || async {
        for target in in_state(store, id, TargetState::Queued).await {
            assert!(store.fail_target(&target, "installer failed", false).await.expect("fail"));
        }
    };
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 2);
    fail_queued().await;
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 2);
    assert_eq!(queued_ordinals().await, vec![2, 3], "the cursor is past 0 and 1");

    // 0 and 1 go back to pending, behind the cursor; 2 and 3 are in flight.
    assert_eq!(store.retry_failed(id).await.expect("retry"), 2);
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 0, "no free slot");
    fail_queued().await;
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 2);
    assert_eq!(queued_ordinals().await, vec![0, 1], "the targets behind the cursor go first");
    fail_queued().await;
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 2);
    assert_eq!(queued_ordinals().await, vec![4, 5], "then the cursor goes on where it was");
    fail_queued().await;
    let outcome = store.dispatch(id).await.expect("dispatch");
    assert_eq!((outcome.dispatched, outcome.state), (0, RolloutState::Completed));

    // A retry of the whole completed rollout starts from its first target again.
    assert_eq!(store.retry_failed(id).await.expect("retry"), 6);
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 2);
    assert_eq!(queued_ordinals().await, vec![0, 1]);
}

pub async fn concurrent_dispatches_never_exceed_the_concurrency(db: &dyn TestDatabase) {
    let store = db.store();
    let other = db.connect_another().await;
    let id = create(store, Spec::new(40, 0, 7)).await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = if i % 2 == 0 { store.clone() } else { other.clone() };
        tasks.push(tokio::spawn(async move { store.dispatch(id).await.expect("dispatch").dispatched }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("dispatch task");
    }
    assert_eq!(total, 7, "eight racing dispatches filled exactly the 7 slots");
    assert_eq!(in_state(store, id, TargetState::Queued).await.len(), 7);
    other.close().await;
}

pub async fn waves_open_in_order_and_a_failing_wave_halts(db: &dyn TestDatabase) {
    let store = db.store();
    let id = create(
        store,
        Spec {
            waves: vec![WaveSpec::new("canary", Some(2), 0.0), WaveSpec::new("rest", None, 100.0)],
            ..Spec::new(5, 0, 10)
        },
    )
    .await;
    // Only the canary wave is dispatched, although slots are free.
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 2);
    let canary = in_state(store, id, TargetState::Queued).await;
    assert!(canary.iter().all(|t| t.wave == 0));
    assert!(store.fail_target(&canary[0], "installer failed", false).await.expect("fail"));
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 0, "the wave is still open");
    // The canary wave ends 1 of 2 failed: over its 0 % threshold.
    assert!(store.fail_target(&canary[1], "installer failed", false).await.expect("fail"));
    let outcome = store.dispatch(id).await.expect("dispatch");
    assert_eq!((outcome.dispatched, outcome.state), (0, RolloutState::Paused));
    let reason = outcome.halted.expect("halted");
    assert!(reason.contains("\"canary\"") && reason.contains("2 of 2"), "{reason}");
    let rollout = store.rollout(id).await.expect("rollout");
    assert_eq!((rollout.state, rollout.current_wave), (RolloutState::Paused, 1));
    assert_eq!(rollout.pause_reason.as_deref(), Some(reason.as_str()));
    assert_eq!(in_state(store, id, TargetState::Pending).await.len(), 3, "the next wave is untouched");
    // A paused rollout dispatches nothing; resuming dispatches the next wave.
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 0);
    store.resume_rollout(id).await.expect("resume");
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 3);
    assert!(in_state(store, id, TargetState::Queued).await.iter().all(|t| t.wave == 1));
}

/// Runs every queued target of the rollout to a final result: success for
/// the first `succeed` of them, failure for the rest.
async fn finish_queued(store: &Store, id: Uuid, succeed: usize) {
    for (i, target) in in_state(store, id, TargetState::Queued).await.iter().enumerate() {
        let running = bring_to_running(store, target).await.target;
        store
            .report_intake()
            .apply_reports(&[report(&running, 1, final_report(i < succeed))])
            .await
            .expect("final result");
    }
}

pub async fn a_wave_that_requires_approval_waits_for_it_and_promotion_waits_for_its_soak_and_rate(
    db: &dyn TestDatabase,
) {
    let manual = ManualClock::starting_now();
    let store = &db.store().clone().with_clock(manual.clock());
    let gated = |name: &str, size| WaveSpec { require_approval: true, ..WaveSpec::new(name, Some(size), 50.0) };
    let promoted = |name: &str, size, min| WaveSpec {
        promote_after_seconds: Some(600),
        min_success_percent: Some(min),
        ..WaveSpec::new(name, Some(size), 100.0)
    };
    let id = create(
        store,
        Spec {
            waves: vec![
                gated("canary", 2),
                promoted("pilot", 2, 100.0),
                promoted("early", 2, 50.0),
                WaveSpec::new("rest", None, 100.0),
            ],
            ..Spec::new(8, 1, 10)
        },
    )
    .await;
    // The canary wave ends within its threshold (1 of 2 failed, 50 %):
    // the rollout waits for approval, and dispatch does nothing meanwhile.
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 2);
    finish_queued(store, id, 1).await;
    let outcome = store.dispatch(id).await.expect("dispatch");
    assert_eq!((outcome.dispatched, outcome.state), (0, RolloutState::AwaitingApproval));
    let reason = outcome.halted.expect("a reason");
    assert!(reason.contains("\"canary\"") && reason.contains("\"pilot\"") && reason.contains("approve"), "{reason}");
    let rollout = store.rollout(id).await.expect("rollout");
    assert_eq!((rollout.state, rollout.current_wave), (RolloutState::AwaitingApproval, 1));
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 0, "nothing starts before the approval");
    // No automatic promotion for a wave that only requires approval, however long it waits.
    manual.advance(Duration::from_secs(86_400));
    assert_eq!(store.promote_due_rollouts().await.expect("promote"), vec![]);
    // Resume is for paused rollouts; approve is the way on.
    assert!(matches!(store.resume_rollout(id).await, Err(Error::Conflict(_))));
    let approved = store.approve_rollout(id).await.expect("approve");
    assert_eq!((approved.state, approved.pause_reason), (RolloutState::Running, None));
    assert!(matches!(store.approve_rollout(id).await, Err(Error::Conflict(_))), "approving twice is a conflict");
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 2);
    assert!(in_state(store, id, TargetState::Queued).await.iter().all(|t| t.wave == 1));

    // The pilot wave: 1 of 2 succeeded (50 %), below its 100 %: waits after
    // its soak time too, for an operator.
    finish_queued(store, id, 1).await;
    let outcome = store.dispatch(id).await.expect("dispatch");
    assert_eq!(outcome.state, RolloutState::AwaitingApproval);
    assert!(outcome.halted.expect("a reason").contains("600 s"));
    manual.advance(Duration::from_secs(601));
    assert_eq!(store.promote_due_rollouts().await.expect("promote"), vec![], "below its success rate");
    store.approve_rollout(id).await.expect("approve");
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 2);

    // The early wave: 1 of 2 succeeded meets its 50 %: promoted by itself
    // once its soak time is over, not before.
    finish_queued(store, id, 1).await;
    assert_eq!(store.dispatch(id).await.expect("dispatch").state, RolloutState::AwaitingApproval);
    manual.advance(Duration::from_secs(599));
    assert_eq!(store.promote_due_rollouts().await.expect("promote"), vec![], "the soak time is not over");
    manual.advance(Duration::from_secs(2));
    assert_eq!(store.promote_due_rollouts().await.expect("promote"), vec![(id, 50.0)]);
    assert_eq!(store.rollout(id).await.expect("rollout").state, RolloutState::Running);
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 2);
    assert!(in_state(store, id, TargetState::Queued).await.iter().all(|t| t.wave == 3));

    // An aborted rollout that was waiting is not promoted.
    let other = create(
        store,
        Spec { waves: vec![promoted("first", 1, 0.0), WaveSpec::new("rest", None, 100.0)], ..Spec::new(2, 1, 10) },
    )
    .await;
    store.dispatch(other).await.expect("dispatch");
    finish_queued(store, other, 0).await;
    assert_eq!(store.dispatch(other).await.expect("dispatch").state, RolloutState::AwaitingApproval);
    store.abort_rollout(other).await.expect("abort a waiting rollout");
    manual.advance(Duration::from_secs(601));
    assert_eq!(store.promote_due_rollouts().await.expect("promote"), vec![]);
}

pub async fn maintenance_windows_gate_dispatch_and_the_deadline_ends_the_wait(db: &dyn TestDatabase) {
    use crate::schedule::{Day, MaintenanceWindow, Schedule};
    let at = |rfc3339: &str| chrono::DateTime::parse_from_rfc3339(rfc3339).unwrap().with_timezone(&chrono::Utc);
    // Thursday 2026-12-03 12:00 UTC.
    let manual = ManualClock::new(at("2026-12-03T12:00:00Z"));
    let store = &db.store().clone().with_clock(manual.clock());
    let window = |days: Vec<Day>, start: &str, zone: &str, site: Option<&str>| MaintenanceWindow {
        days,
        start: start.into(),
        duration_minutes: 120,
        time_zone: zone.into(),
        labels: site.map(|s| BTreeMap::from([("site".to_owned(), s.to_owned())])).unwrap_or_default(),
    };
    // Targets of site s0 use Saturday 22:00 Paris (21:00 UTC); the others
    // Friday 09:00 New York (14:00 UTC). Nothing before Friday 00:00 UTC;
    // the deadline is Sunday 00:00 UTC.
    let schedule = Schedule {
        start_at: Some(at("2026-12-04T00:00:00Z")),
        deadline: Some(at("2026-12-06T00:00:00Z")),
        windows: vec![
            window(vec![Day::Sat], "22:00", "Europe/Paris", Some("s0")),
            window(vec![Day::Fri], "09:00", "America/New_York", None),
        ],
        groups: vec![],
    };
    let id = create(store, Spec { schedule, ..Spec::new(6, 1, 10) }).await;
    let rollout = store.rollout(id).await.expect("rollout");
    assert_eq!(rollout.settings.schedule.groups, vec![vec![0], vec![1]], "one group per set of windows");

    // Before the start: nothing goes, the rollout waits for its start.
    let outcome = store.dispatch(id).await.expect("dispatch");
    assert_eq!((outcome.dispatched, outcome.state), (0, RolloutState::WaitingForWindow));
    let rollout = store.rollout(id).await.expect("rollout");
    assert_eq!(rollout.next_window_at, Some(at("2026-12-04T14:00:00Z")), "the first window after the start");
    assert!(rollout.pause_reason.as_deref().unwrap_or("").contains("2026-12-04T14:00:00+00:00"));
    assert_eq!(store.rollouts_due_for_window(10).await.expect("due"), Vec::<Uuid>::new(), "not due yet");

    // Friday 14:00 UTC: New York's window opens; the targets of sites s1
    // and s2 go (4 of 6), those of s0 wait.
    manual.advance(std::time::Duration::from_secs(26 * 3600));
    assert_eq!(store.rollouts_due_for_window(10).await.expect("due"), vec![id]);
    let outcome = store.dispatch(id).await.expect("dispatch");
    assert_eq!((outcome.dispatched, outcome.state), (4, RolloutState::Running));
    assert!(in_state(store, id, TargetState::Queued).await.iter().all(|t| t.labels["site"] != "s0"));
    let rollout = store.rollout(id).await.expect("rollout");
    assert_eq!((rollout.pause_reason, rollout.next_window_at), (None, None), "running again");

    // The window closes while they run: they finish; then the rollout
    // waits for Paris's Saturday window.
    manual.advance(std::time::Duration::from_secs(3 * 3600));
    assert_eq!(store.dispatch(id).await.expect("dispatch").state, RolloutState::Running, "in flight: no wait yet");
    finish_queued(store, id, 4).await;
    let outcome = store.dispatch(id).await.expect("dispatch");
    assert_eq!((outcome.dispatched, outcome.state), (0, RolloutState::WaitingForWindow));
    assert_eq!(store.rollout(id).await.expect("rollout").next_window_at, Some(at("2026-12-05T21:00:00Z")));

    // Pause and resume keep the schedule: resumed, it waits again.
    store.pause_rollout(id, "change freeze").await.expect("pause a waiting rollout");
    store.resume_rollout(id).await.expect("resume");
    assert_eq!(store.dispatch(id).await.expect("dispatch").state, RolloutState::WaitingForWindow);

    // Saturday 22:00 Paris: the two s0 targets go; one fails ...
    manual.advance(std::time::Duration::from_secs(28 * 3600));
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 2);
    finish_queued(store, id, 1).await;

    // ... and a retried failure that waits past the deadline misses it.
    assert_eq!(store.retry_failed(id).await.expect("retry"), 1);
    manual.advance(std::time::Duration::from_secs(4 * 3600));
    let outcome = store.dispatch(id).await.expect("dispatch");
    assert_eq!((outcome.dispatched, outcome.state), (0, RolloutState::Completed));
    let missed = in_state(store, id, TargetState::MissedWindow).await;
    assert_eq!(missed.len(), 1);
    assert!(missed[0].error.as_deref().unwrap_or("").contains("deadline"), "{:?}", missed[0].error);
    let history = store.transitions(missed[0].id).await.expect("history");
    assert_eq!(history.last().map(|t| t.to.as_str()), Some("missed_window"));

    // A target whose labels select no window cannot be stored.
    let only_paris =
        Schedule { windows: vec![window(vec![Day::Sat], "22:00", "Europe/Paris", Some("s0"))], ..Schedule::default() };
    let error = store
        .create_rollout(NewRollout {
            name: "no window".into(),
            concurrency: 1,
            timeout_seconds: 60,
            waves: vec![WaveSpec::new("all", None, 100.0)],
            settings: RolloutSettings { schedule: only_paris, ..RolloutSettings::default() },
            patches: vec![patch(0)],
            targets: vec![target(1, 0)],
        })
        .await
        .expect_err("no window for site s1");
    assert!(error.to_string().starts_with("targets[0]: no window applies"), "{error}");
}

pub async fn evidence_digests_are_kept_once_and_a_rollouts_patch_rows_read_in_bulk(db: &dyn TestDatabase) {
    let store = db.store();
    let id = create(store, Spec::new(3, 2, 3)).await;
    store.dispatch(id).await.expect("dispatch");
    let targets = in_state(store, id, TargetState::Queued).await;
    for target in &targets[..2] {
        bring_to_running(store, target).await;
    }
    let rows = store.rollout_target_patches(id).await.expect("patch rows");
    assert_eq!(rows.len(), 4, "two patches of the two probed targets: {rows:?}");
    let mut expected: Vec<(Uuid, u32)> = targets[..2].iter().flat_map(|t| [(t.id, 0), (t.id, 1)]).collect();
    expected.sort();
    assert_eq!(rows.iter().map(|(target, r)| (*target, r.patch_index)).collect::<Vec<_>>(), expected);
    assert_eq!(store.rollout_target_patches(Uuid::new_v4()).await.expect("none"), vec![]);

    let record = EvidenceRecord {
        sha256: "ab".repeat(32),
        rollout_id: id,
        format: "html".into(),
        bytes: 1234,
        created_at: store.now(),
        created_by: "auditor".into(),
    };
    assert_eq!(store.evidence(&record.sha256).await.expect("lookup"), None);
    store.record_evidence(&record).await.expect("record");
    let stored = store.evidence(&record.sha256).await.expect("lookup").expect("recorded");
    assert_eq!(
        (stored.rollout_id, stored.format.as_str(), stored.bytes, stored.created_by.as_str()),
        (id, "html", 1234, "auditor")
    );
    // The same bytes issued again keep the first record.
    store
        .record_evidence(&EvidenceRecord { created_by: "someone else".into(), ..record.clone() })
        .await
        .expect("again");
    assert_eq!(store.evidence(&record.sha256).await.expect("lookup").expect("kept").created_by, "auditor");
    let error = store.record_evidence(&EvidenceRecord { sha256: "AB".repeat(32), ..record }).await.unwrap_err();
    assert!(error.to_string().contains("64 lower-case hex"), "{error}");
}
