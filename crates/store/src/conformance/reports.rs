//! The collector's intake: idempotency, patch and final results, deadlines.

use super::*;

/// A rollout of two targets with two patches each, both running.
async fn two_running_targets(store: &Store) -> (Target, Target) {
    let id = create(store, Spec::new(2, 2, 2)).await;
    store.dispatch(id).await.expect("dispatch");
    let targets = all_targets(store, id).await;
    let a = bring_to_running(store, &targets[0]).await.target;
    let b = bring_to_running(store, &targets[1]).await.target;
    (a, b)
}

pub async fn reports_are_idempotent_by_target_attempt_and_seq(db: &dyn TestDatabase) {
    let store = db.store();
    let (a, b) = two_running_targets(store).await;
    let batch = vec![
        report(&a, 1, ReportKind::Started { patch_index: 0 }),
        report(&a, 2, ReportKind::Heartbeat { patch_index: Some(0) }),
        report(&a, 2, ReportKind::Heartbeat { patch_index: Some(0) }),
        report(&a, 3, finished(0, 0, PatchOutcomeKind::Installed, "ok")),
        report(&a, 3, finished(0, 0, PatchOutcomeKind::Installed, "ok")),
        report(&b, 1, ReportKind::Started { patch_index: 0 }),
    ];
    use ReportResult::{Accepted, Duplicate};
    assert_eq!(
        store.report_intake().apply_reports(&batch).await.expect("apply"),
        vec![Accepted, Accepted, Duplicate, Accepted, Duplicate, Accepted]
    );
    // Replayed later (an agent's spool): all duplicates, nothing recorded twice.
    assert_eq!(store.report_intake().apply_reports(&batch[..4]).await.expect("apply"), vec![Duplicate; 4]);
    assert!(store.report_intake().apply_reports(&[]).await.expect("empty").is_empty());
    let events = store.agent_events(a.id).await.expect("events");
    assert_eq!(
        events.iter().map(|e| (e.seq, e.kind.as_str())).collect::<Vec<_>>(),
        vec![(1, "started"), (3, "finished")],
        "a heartbeat is counted in its run's summary, not kept as an event"
    );
    let beats = store.heartbeats(a.id).await.expect("heartbeats");
    assert_eq!(beats.iter().map(|h| (h.count, h.last_seq, h.patch_index)).collect::<Vec<_>>(), vec![(1, 2, Some(0))]);
    assert_eq!(events[0].patch_index, Some(0));
    assert_eq!(store.agent_events(b.id).await.expect("events").len(), 1);
    assert!(store.heartbeats(b.id).await.expect("heartbeats").is_empty());
    // Pages follow (attempt, seq, instance): the first page, then after its last event.
    let first = store.agent_events_page(a.id, None, 1).await.expect("page");
    assert_eq!(first.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1]);
    let next = store.agent_events_page(a.id, Some(EventCursor::after(&first[0])), 10).await.expect("page");
    assert_eq!(next.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3]);
    let cursor = EventCursor { attempt: first[0].attempt + 1, seq: 0, agent_instance: None };
    let later_attempt = store.agent_events_page(a.id, Some(cursor), 10).await.expect("page");
    assert!(later_attempt.is_empty());
}

/// `agent_events` has no foreign key to `targets` (migration 16): the
/// intake itself keeps out the reports of a target it does not have, of
/// every kind, and stores the rest of the batch.
pub async fn a_report_of_an_unknown_target_is_not_stored_and_holds_up_no_other(db: &dyn TestDatabase) {
    let store = db.store();
    let (a, _) = two_running_targets(store).await;
    let ghost = Target { id: Uuid::new_v4(), ..a.clone() };
    let batch = vec![
        report(&ghost, 1, ReportKind::Started { patch_index: 0 }),
        report(&a, 1, ReportKind::Started { patch_index: 0 }),
        report(&ghost, 2, ReportKind::Heartbeat { patch_index: Some(0) }),
        report(&ghost, 3, ReportKind::Final { success: true, reboot_required: false, message: "done".into() }),
        report(&a, 2, ReportKind::Heartbeat { patch_index: Some(0) }),
    ];
    use ReportResult::{Accepted, UnknownTarget};
    assert_eq!(
        store.report_intake().apply_reports(&batch).await.expect("apply"),
        vec![UnknownTarget, Accepted, UnknownTarget, UnknownTarget, Accepted]
    );
    assert!(store.agent_events(ghost.id).await.expect("events").is_empty());
    assert!(store.heartbeats(ghost.id).await.expect("heartbeats").is_empty());
    assert_eq!(store.agent_events(a.id).await.expect("events").len(), 1);
    assert_eq!(store.heartbeats(a.id).await.expect("heartbeats").len(), 1);
    assert_eq!(store.target_patches(a.id).await.expect("patches")[0].state, PatchState::Running);
}

/// A second agent process of the same attempt numbers its reports from 1
/// again: its reports are stored as its own (never taken for duplicates of
/// the first run's), a resent report of either run stays a duplicate, and
/// the events and their pages tell the runs apart.
pub async fn a_second_agent_run_is_stored_as_such_not_as_duplicates(db: &dyn TestDatabase) {
    let store = db.store();
    let (a, _) = two_running_targets(store).await;
    let second = AgentInstance(0xb0b0b0);
    let again = |r: IncomingReport| IncomingReport { agent_instance: second, ..r };
    let first_run = [
        report(&a, 1, ReportKind::Started { patch_index: 0 }),
        report(&a, 2, ReportKind::Heartbeat { patch_index: Some(0) }),
        report(&a, 3, finished(0, 0, PatchOutcomeKind::Installed, "ok")),
    ];
    assert_eq!(store.report_intake().apply_reports(&first_run).await.expect("apply"), vec![ReportResult::Accepted; 3]);
    let second_run = first_run.clone().map(again);
    assert_eq!(
        store.report_intake().apply_reports(&second_run).await.expect("apply"),
        vec![ReportResult::Accepted; 3],
        "the second run's seq 1, 2 and 3 are not the first run's"
    );
    // Both runs resend (spool replay): duplicates, nothing stored twice.
    let resent: Vec<IncomingReport> = first_run.iter().chain(&second_run).cloned().collect();
    assert_eq!(store.report_intake().apply_reports(&resent).await.expect("apply"), vec![ReportResult::Duplicate; 6]);
    let sent = |agent_instance, seq, heartbeat| SentReport { agent_instance, seq, heartbeat };
    let keys = [
        sent(FIRST_RUN, 1, false),
        sent(second, 1, false),
        sent(second, 2, true),
        sent(second, 3, false),
        sent(AgentInstance(0xdead), 2, true),
        sent(second, 4, true),
        sent(second, 2, false),
    ];
    assert_eq!(
        store.report_intake().stored_report_count(a.id, a.attempt, &keys).await.expect("count"),
        4,
        "an unknown run's heartbeat, a heartbeat above the run's highest and an event never sent are not stored"
    );
    let beats = store.heartbeats(a.id).await.expect("heartbeats");
    assert_eq!(
        beats.iter().map(|h| (h.agent_instance, h.count, h.last_seq)).collect::<BTreeSet<_>>(),
        BTreeSet::from([(FIRST_RUN, 1, 2), (second, 1, 2)]),
        "one summary per run"
    );

    let events = store.agent_events(a.id).await.expect("events");
    assert_eq!(
        events.iter().map(|e| (e.seq, e.agent_instance, e.kind.as_str())).collect::<Vec<_>>(),
        vec![(1, FIRST_RUN, "started"), (1, second, "started"), (3, FIRST_RUN, "finished"), (3, second, "finished")]
    );
    // Paging one event at a time walks all four, none skipped or repeated.
    let mut walked = Vec::new();
    let mut after = None;
    loop {
        let page = store.agent_events_page(a.id, after, 1).await.expect("page");
        let Some(last) = page.last() else { break };
        walked.push((last.seq, last.agent_instance));
        after = Some(EventCursor::after(last));
    }
    assert_eq!(walked, events.iter().map(|e| (e.seq, e.agent_instance)).collect::<Vec<_>>());
    // The older two-part cursor skips every event at its seq.
    let old = EventCursor { attempt: a.attempt, seq: 1, agent_instance: None };
    assert_eq!(store.agent_events_page(a.id, Some(old), 10).await.expect("page").len(), 2);
    // The cursor's text form round-trips; a malformed one is refused by name.
    let cursor = EventCursor::after(&events[1]);
    assert_eq!(cursor.to_string().parse::<EventCursor>().expect("parse"), cursor);
    assert!("1.x".parse::<EventCursor>().unwrap_err().to_string().contains("\"1.x\" is not an events cursor"));
}

pub async fn reports_record_patch_results_and_the_final_result(db: &dyn TestDatabase) {
    let store = db.store();
    let id = create(store, Spec::new(2, 3, 2)).await;
    store.dispatch(id).await.expect("dispatch");
    drain_outbox(store).await;
    let targets = all_targets(store, id).await;
    let ok = bring_to_running(store, &targets[0]).await.target;
    let bad = bring_to_running(store, &targets[1]).await.target;
    drain_outbox(store).await;
    store
        .report_intake()
        .apply_reports(&[
            report(&ok, 1, ReportKind::Started { patch_index: 0 }),
            report(&ok, 2, finished(0, 0, PatchOutcomeKind::Installed, "ok")),
            report(&ok, 3, ReportKind::Started { patch_index: 1 }),
            report(&ok, 4, finished(1, 3010, PatchOutcomeKind::InstalledRebootRequired, "reboot me")),
            report(&ok, 5, finished(2, 0, PatchOutcomeKind::Installed, "")),
            report(&ok, 6, final_report(true)),
            report(&bad, 1, ReportKind::Started { patch_index: 0 }),
            report(&bad, 2, finished(0, 1603, PatchOutcomeKind::Failed, "fatal error during installation")),
            report(&bad, 3, final_report(false)),
        ])
        .await
        .expect("apply");
    let ok_target = store.target(ok.id).await.expect("target");
    assert_eq!(ok_target.state, TargetState::Succeeded);
    assert!(ok_target.finished_at.is_some());
    assert_eq!(ok_target.error, None);
    let patches = store.target_patches(ok.id).await.expect("patches");
    assert_eq!(
        patches.iter().map(|p| (p.state, p.exit_code, p.reboot_required)).collect::<Vec<_>>(),
        vec![
            (PatchState::Succeeded, Some(0), false),
            (PatchState::Succeeded, Some(3010), true),
            (PatchState::Succeeded, Some(0), false)
        ]
    );
    assert_eq!(patches[1].outcome.as_deref(), Some("installed_reboot_required"));
    assert_eq!(patches[1].output_tail.as_deref(), Some("reboot me"));
    assert!(patches[0].started_at.is_some() && patches[0].finished_at.is_some());

    let bad_target = store.target(bad.id).await.expect("target");
    assert_eq!(bad_target.state, TargetState::Failed);
    assert_eq!(bad_target.error.as_deref(), Some("agent: a patch failed"));
    let patches = store.target_patches(bad.id).await.expect("patches");
    assert_eq!((patches[0].state, patches[0].exit_code), (PatchState::Failed, Some(1603)));
    assert_eq!(patches[0].output_tail.as_deref(), Some("fatal error during installation"));
    // Patches it never reported are failed with a reason, not left open.
    for p in &patches[1..] {
        assert_eq!(p.state, PatchState::Failed);
        assert_eq!(p.error.as_deref(), Some("the agent finished without reporting this patch"));
    }
    // The final results free their slots (one dispatch request per rollout
    // and batch) and queue each target's cleanup.
    let keys = outbox_keys(store).await;
    assert_eq!((count(&keys, routing::DISPATCH), count(&keys, routing::CLEANUP)), (1, 2), "{keys:?}");
    assert_eq!((count(&keys, "target.succeeded"), count(&keys, "target.failed")), (1, 1), "{keys:?}");
    // A late final for a finished target changes nothing.
    store.report_intake().apply_reports(&[report(&ok, 7, final_report(false))]).await.expect("apply");
    assert_eq!(store.target(ok.id).await.expect("target").state, TargetState::Succeeded);
}

pub async fn reports_of_an_old_attempt_change_no_patch(db: &dyn TestDatabase) {
    let store = db.store();
    let id = create(store, Spec::new(1, 1, 1)).await;
    store.dispatch(id).await.expect("dispatch");
    let first = bring_to_running(store, &all_targets(store, id).await[0]).await.target;
    assert!(store.fail_target(&first, "operator gave up", false).await.expect("fail"));
    assert_eq!(store.retry_failed(id).await.expect("retry"), 1);
    store.dispatch(id).await.expect("dispatch");
    let second = bring_to_running(store, &all_targets(store, id).await[0]).await.target;
    assert_eq!(second.attempt, 2);
    // The first attempt's agent is still alive somewhere and reports.
    store
        .report_intake()
        .apply_reports(&[
            report(&first, 1, finished(0, 0, PatchOutcomeKind::Installed, "")),
            report(&first, 2, final_report(true)),
        ])
        .await
        .expect("apply");
    let target = store.target(second.id).await.expect("target");
    assert_eq!((target.state, target.attempt), (TargetState::Running, 2));
    assert_eq!(store.target_patches(second.id).await.expect("patches")[0].state, PatchState::Pending);
    // Its events are kept, under their own attempt.
    let events = store.agent_events(second.id).await.expect("events");
    assert!(events.iter().all(|e| e.attempt == 1) && events.len() == 2, "{events:?}");
}

pub async fn final_results_in_one_batch_count_once_per_target_and_rollout(db: &dyn TestDatabase) {
    let store = db.store();
    let first = create(store, Spec::new(3, 1, 3)).await;
    let second = create(store, Spec::new(1, 1, 1)).await;
    store.dispatch(first).await.expect("dispatch");
    store.dispatch(second).await.expect("dispatch");
    let mut running = Vec::new();
    for target in all_targets(store, first).await.into_iter().chain(all_targets(store, second).await) {
        running.push(bring_to_running(store, &target).await.target);
    }
    drain_outbox(store).await;
    let old_attempt = Target { attempt: 0, ..running[2].clone() };
    store
        .report_intake()
        .apply_reports(&[
            // Two different final results for one target: the first counts.
            report(&running[0], 1, final_report(false)),
            report(&running[0], 2, final_report(true)),
            report(&running[1], 1, final_report(true)),
            // A final result of another attempt is recorded but moves nothing.
            report(&old_attempt, 1, final_report(true)),
            report(&running[3], 1, final_report(true)),
        ])
        .await
        .expect("apply");
    let states: Vec<TargetState> = futures_util::future::join_all(running.iter().map(|t| store.target(t.id)))
        .await
        .into_iter()
        .map(|t| t.expect("target").state)
        .collect();
    assert_eq!(states, [TargetState::Failed, TargetState::Succeeded, TargetState::Running, TargetState::Succeeded]);
    assert_eq!(store.target(running[0].id).await.expect("target").error.as_deref(), Some("agent: a patch failed"));
    let history = store.transitions(running[0].id).await.expect("history");
    assert_eq!(history.iter().filter(|t| t.to == "failed" || t.to == "succeeded").count(), 1, "moved once");
    let keys = outbox_keys(store).await;
    assert_eq!(count(&keys, routing::DISPATCH), 2, "one dispatch request per rollout: {keys:?}");
    assert_eq!(count(&keys, routing::CLEANUP), 3, "a cleanup per finished target: {keys:?}");
    let dispatched: BTreeSet<String> = outbox(store)
        .await
        .into_iter()
        .filter(|m| m.routing_key == routing::DISPATCH)
        .map(|m| v1::DispatchRequest::decode(m.payload.as_slice()).expect("a DispatchRequest").rollout_id)
        .collect();
    assert_eq!(dispatched, BTreeSet::from([first.to_string(), second.to_string()]));
}

pub async fn patch_reports_in_one_batch_keep_the_first_result_and_every_column(db: &dyn TestDatabase) {
    let store = db.store();
    let (a, b) = two_running_targets(store).await;
    let untimed = IncomingReport { sent_at: None, ..report(&a, 3, ReportKind::Heartbeat { patch_index: None }) };
    // The operator asked for every heartbeat as an event too.
    let results = store
        .report_intake()
        .with_heartbeat_events(HeartbeatEvents::Every)
        .apply_reports(&[
            // Two results for one patch in one batch: the first counts.
            report(&a, 1, finished(0, 0, PatchOutcomeKind::Installed, "first")),
            report(&a, 2, finished(0, 1603, PatchOutcomeKind::Failed, "second")),
            untimed,
            // Started and finished in one batch, in that order.
            report(&a, 4, ReportKind::Started { patch_index: 1 }),
            report(&a, 5, finished(1, -1, PatchOutcomeKind::TimedOut, "killed")),
            report(&b, 1, ReportKind::Started { patch_index: 0 }),
        ])
        .await
        .expect("apply");
    assert_eq!(results, vec![ReportResult::Accepted; 6]);
    let patches = store.target_patches(a.id).await.expect("patches");
    assert_eq!(
        (patches[0].state, patches[0].exit_code, patches[0].output_tail.as_deref()),
        (PatchState::Succeeded, Some(0), Some("first"))
    );
    assert!(patches[0].started_at.is_none() && patches[0].finished_at.is_some(), "{:?}", patches[0]);
    assert_eq!(
        (patches[1].state, patches[1].exit_code, patches[1].outcome.as_deref()),
        (PatchState::Failed, Some(-1), Some("timed_out"))
    );
    assert!(patches[1].started_at.is_some() && patches[1].finished_at.is_some(), "{:?}", patches[1]);
    let b_patches = store.target_patches(b.id).await.expect("patches");
    assert_eq!((b_patches[0].state, b_patches[1].state), (PatchState::Running, PatchState::Pending));
    assert!(b_patches[0].started_at.is_some());
    // Every event is kept as sent, optional columns empty where the report has none.
    let events = store.agent_events(a.id).await.expect("events");
    assert_eq!(
        events.iter().map(|e| (e.seq, e.kind.as_str(), e.patch_index, e.exit_code)).collect::<Vec<_>>(),
        vec![
            (1, "finished", Some(0), Some(0)),
            (2, "finished", Some(0), Some(1603)),
            (3, "heartbeat", None, None),
            (4, "started", Some(1), None),
            (5, "finished", Some(1), Some(-1)),
        ]
    );
    assert_eq!(events[1].detail.as_deref(), Some("failed"));
    assert_eq!(events[2].detail, None);
    let beats = store.heartbeats(a.id).await.expect("heartbeats");
    assert_eq!(beats.iter().map(|h| (h.count, h.last_seq, h.patch_index)).collect::<Vec<_>>(), vec![(1, 3, None)]);
    // Once the target left flight, late results change no patch.
    assert!(store.fail_target(&b, "operator gave up", false).await.expect("fail"));
    let before = store.target_patches(b.id).await.expect("patches");
    store
        .report_intake()
        .apply_reports(&[
            report(&b, 2, finished(0, 0, PatchOutcomeKind::Installed, "late")),
            report(&b, 3, ReportKind::Started { patch_index: 1 }),
        ])
        .await
        .expect("apply");
    assert_eq!(store.target_patches(b.id).await.expect("patches"), before);
}

/// Every fresh report moves its target's deadline. The target's stored
/// last-seen time is rewritten once it is a step old (1 % of the timeout:
/// 6 s of 600 s); a report within the step is stored all the same, and the
/// watchdog, before it times the target out, finds the attempt's latest
/// report, event or heartbeat, and counts the deadline from it.
pub async fn every_fresh_report_moves_the_deadline(db: &dyn TestDatabase) {
    let manual = ManualClock::starting_now();
    let store = &db.store().clone().with_clock(manual.clock());
    let policy = TimeoutPolicy { verify_delay: Duration::from_secs(1) };
    let id = create(store, Spec { timeout_seconds: 600, ..Spec::new(1, 2, 1) }).await;
    store.dispatch(id).await.expect("dispatch");
    let target = bring_to_running(store, &all_targets(store, id).await[0]).await.target;
    let running = manual.now();
    assert_eq!(target.last_seen_at, Some(running), "running counts as seen");
    let intake = store.report_intake();
    let apply = |reports: Vec<IncomingReport>| {
        let intake = intake.clone();
        async move { intake.apply_reports(&reports).await.expect("apply") }
    };
    let last_seen = || async { store.target(target.id).await.expect("target").last_seen_at };
    use ReportResult::{Accepted, Duplicate};
    // Within the step: stored, the target's row not rewritten.
    manual.advance(Duration::from_millis(20));
    assert_eq!(apply(vec![report(&target, 1, ReportKind::Heartbeat { patch_index: None })]).await, vec![Accepted]);
    assert_eq!(last_seen().await, Some(running));
    // A step after the stored time: rewritten, to when the report was
    // received by the store's clock.
    let received = running + chrono::Duration::seconds(6);
    manual.set(received);
    assert_eq!(apply(vec![report(&target, 2, ReportKind::Started { patch_index: 0 })]).await, vec![Accepted]);
    assert_eq!(last_seen().await, Some(received));
    // A duplicate does not move it, even a step later; a fresh report then does.
    manual.set(received + chrono::Duration::seconds(7));
    assert_eq!(apply(vec![report(&target, 2, ReportKind::Started { patch_index: 0 })]).await, vec![Duplicate]);
    assert_eq!(last_seen().await, Some(received));
    let stored = received + chrono::Duration::seconds(8);
    manual.set(stored);
    assert_eq!(apply(vec![report(&target, 3, ReportKind::Heartbeat { patch_index: Some(0) })]).await, vec![Accepted]);
    assert_eq!(last_seen().await, Some(stored));
    // Within the step again: an event, then a heartbeat, the latest report.
    manual.set(stored + chrono::Duration::seconds(2));
    let finished_report = report(&target, 4, finished(0, 0, PatchOutcomeKind::Installed, "ok"));
    assert_eq!(apply(vec![finished_report]).await, vec![Accepted]);
    let heartbeat = stored + chrono::Duration::seconds(3);
    manual.set(heartbeat);
    assert_eq!(apply(vec![report(&target, 5, ReportKind::Heartbeat { patch_index: None })]).await, vec![Accepted]);
    assert_eq!(last_seen().await, Some(stored));
    // The stored time's deadline: the watchdog counts from the heartbeat,
    // and writes it back.
    let timeout = chrono::Duration::seconds(600);
    manual.set(stored + timeout);
    let outcome = store.check_timeout(target.id, target.attempt, policy).await.expect("check");
    assert_eq!(outcome, WatchOutcome::NotYet(heartbeat + timeout), "the latest report sets the deadline");
    assert_eq!(last_seen().await, Some(heartbeat));
    // An event within the step of that: the watchdog counts from it.
    let started = heartbeat + chrono::Duration::seconds(1);
    manual.set(started);
    assert_eq!(apply(vec![report(&target, 6, ReportKind::Started { patch_index: 1 })]).await, vec![Accepted]);
    assert_eq!(last_seen().await, Some(heartbeat));
    manual.set(heartbeat + timeout);
    let outcome = store.check_timeout(target.id, target.attempt, policy).await.expect("check");
    assert_eq!(outcome, WatchOutcome::NotYet(started + timeout), "the latest report sets the deadline");
    // Silent from then on: timed out at the latest report's deadline, not later.
    manual.set(started + timeout - chrono::Duration::milliseconds(1));
    let outcome = store.check_timeout(target.id, target.attempt, policy).await.expect("check");
    assert_eq!(outcome, WatchOutcome::NotYet(started + timeout));
    manual.set(started + timeout);
    let outcome = store.check_timeout(target.id, target.attempt, policy).await.expect("check");
    assert_eq!(outcome, WatchOutcome::TimedOut);
}

/// Heartbeats are one summary per agent run: how many moved the deadline,
/// the highest seq, the patch and when the first and the last arrived. A
/// resent one, or one at or below the highest (an agent sends in seq
/// order), is a duplicate: not counted, no deadline moved. (10 s apart:
/// each fresh one a step after the stored last-seen time, which it then
/// rewrites.)
pub async fn heartbeats_are_counted_per_agent_run_and_move_the_deadline(db: &dyn TestDatabase) {
    let manual = ManualClock::starting_now();
    let store = &db.store().clone().with_clock(manual.clock());
    let id = create(store, Spec::new(1, 1, 1)).await;
    store.dispatch(id).await.expect("dispatch");
    let target = bring_to_running(store, &all_targets(store, id).await[0]).await.target;
    let beat = |seq, patch_index| report(&target, seq, ReportKind::Heartbeat { patch_index });
    let intake = store.report_intake();
    let first = manual.advance(Duration::from_secs(10));
    use ReportResult::{Accepted, Duplicate};
    let results = intake.apply_reports(&[beat(2, None), beat(3, Some(0)), beat(2, None)]).await.expect("apply");
    assert_eq!(results, vec![Accepted, Accepted, Duplicate]);
    let last = manual.advance(Duration::from_secs(10));
    let results = intake.apply_reports(&[beat(3, Some(0)), beat(5, Some(0)), beat(6, None)]).await.expect("apply");
    assert_eq!(results, vec![Duplicate, Accepted, Accepted]);
    assert_eq!(store.target(target.id).await.expect("target").last_seen_at, Some(last));
    let summary = |store: &Store| {
        let store = store.clone();
        async move { store.heartbeats(target.id).await.expect("heartbeats") }
    };
    let expected = HeartbeatSummary {
        attempt: target.attempt,
        agent_instance: FIRST_RUN,
        count: 4,
        last_seq: 6,
        patch_index: None,
        first_received_at: first,
        last_received_at: last,
    };
    assert_eq!(summary(store).await, vec![expected.clone()]);
    // Below the highest seq (never sent before, or resent): a duplicate;
    // nothing counted, the deadline stays.
    manual.advance(Duration::from_secs(10));
    let results = intake.apply_reports(&[beat(4, Some(0)), beat(6, None)]).await.expect("apply");
    assert_eq!(results, vec![Duplicate, Duplicate]);
    assert_eq!(summary(store).await, vec![expected.clone()]);
    assert_eq!(store.target(target.id).await.expect("target").last_seen_at, Some(last));
    assert!(store.agent_events(target.id).await.expect("events").is_empty(), "no event row per heartbeat");
    // A heartbeat in a batch with other reports of another run.
    let other = AgentInstance(0x5ec0d);
    let later = manual.advance(Duration::from_secs(10));
    let results = intake
        .apply_reports(&[
            IncomingReport { agent_instance: other, ..beat(1, Some(0)) },
            IncomingReport { agent_instance: other, ..report(&target, 2, ReportKind::Started { patch_index: 0 }) },
            beat(7, Some(0)),
        ])
        .await
        .expect("apply");
    assert_eq!(results, vec![Accepted; 3]);
    let beats = summary(store).await;
    assert_eq!(
        beats.iter().map(|h| (h.agent_instance, h.count, h.last_seq, h.last_received_at)).collect::<Vec<_>>(),
        vec![(FIRST_RUN, 5, 7, later), (other, 1, 1, later)]
    );
    assert_eq!(store.agent_events(target.id).await.expect("events").len(), 1, "the started report");
    // Asked for every heartbeat: an event row each, and the summary still counts.
    let every = store.report_intake().with_heartbeat_events(HeartbeatEvents::Every);
    let results = every.apply_reports(&[beat(8, None), beat(8, None)]).await.expect("apply");
    assert_eq!(results, vec![Accepted, Duplicate]);
    let events = store.agent_events(target.id).await.expect("events");
    assert_eq!(events.iter().filter(|e| e.kind == "heartbeat").map(|e| e.seq).collect::<Vec<_>>(), vec![8]);
    assert_eq!(summary(store).await[0].count, 6);
}
