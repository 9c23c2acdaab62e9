//! Timeouts, failures, retries and the operator's actions.

use super::*;

pub async fn the_watchdog_times_out_a_silent_target_and_fails_open_patches(db: &dyn TestDatabase) {
    let manual = ManualClock::starting_now();
    let store = &db.store().clone().with_clock(manual.clock());
    let policy = TimeoutPolicy { verify_delay: Duration::from_secs(7) };
    let id = create(store, Spec { timeout_seconds: 600, ..Spec::new(1, 2, 1) }).await;
    store.dispatch(id).await.expect("dispatch");
    let target = bring_to_running(store, &all_targets(store, id).await[0]).await.target;
    let seen = manual.advance(Duration::from_secs(30));
    store
        .report_intake()
        .apply_reports(&[
            report(&target, 1, ReportKind::Started { patch_index: 0 }),
            report(&target, 2, finished(0, 0, PatchOutcomeKind::Installed, "")),
        ])
        .await
        .expect("apply");
    let deadline = seen + chrono::Duration::seconds(600);
    assert_eq!(
        store.check_timeout(target.id, 1, policy).await.expect("check"),
        WatchOutcome::NotYet(deadline),
        "the deadline counts from the last report"
    );
    // Another attempt's timer finds nothing to do.
    assert_eq!(store.check_timeout(target.id, 2, policy).await.expect("check"), WatchOutcome::Gone);
    // A millisecond before the deadline it is still in time; at the deadline it times out.
    manual.set(deadline - chrono::Duration::milliseconds(1));
    assert_eq!(store.check_timeout(target.id, 1, policy).await.expect("check"), WatchOutcome::NotYet(deadline));
    manual.set(deadline);
    drain_outbox(store).await;
    assert_eq!(store.check_timeout(target.id, 1, policy).await.expect("check"), WatchOutcome::TimedOut);
    let timed_out = store.target(target.id).await.expect("target");
    assert_eq!(timed_out.state, TargetState::TimedOut);
    assert_eq!(timed_out.finished_at, Some(deadline), "timed out at the store's time");
    let reason = timed_out.error.expect("reason");
    assert!(reason.contains("no feedback received within 600 s"), "{reason}");
    let patches = store.target_patches(target.id).await.expect("patches");
    assert_eq!(patches[0].state, PatchState::Succeeded, "what was reported stays");
    assert_eq!((patches[1].state, patches[1].error.as_deref()), (PatchState::Failed, Some(reason.as_str())));
    // It frees the slot and schedules the verification scan.
    let messages = outbox(store).await;
    let verify: Vec<_> = messages.iter().filter(|m| m.routing_key == routing::VERIFY).collect();
    assert_eq!(verify.len(), 1);
    let job = v1::VerifyJob::decode(verify[0].payload.as_slice()).expect("a VerifyJob");
    assert_eq!((job.target_id, job.attempt, job.cleanup_after), (target.id.to_string(), 1, true));
    let due = verify[0].due_at_unix_ms.expect("delayed");
    let expected = chrono::Utc::now().timestamp_millis() + 7_000;
    assert!((due - expected).abs() < 2_000, "verify due in about 7 s: {due} vs {expected}");
    assert_eq!(messages.iter().filter(|m| m.routing_key == routing::DISPATCH).count(), 1);
    // A second timer for it finds it gone.
    assert_eq!(store.check_timeout(target.id, 1, policy).await.expect("check"), WatchOutcome::Gone);
    assert_eq!(store.check_timeout(Uuid::new_v4(), 1, policy).await.expect("check"), WatchOutcome::Gone);
}

pub async fn a_batch_of_timers_is_checked_in_one_go(db: &dyn TestDatabase) {
    let manual = ManualClock::starting_now();
    let store = &db.store().clone().with_clock(manual.clock());
    let policy = TimeoutPolicy { verify_delay: Duration::from_secs(60) };
    let silent = create(store, Spec { timeout_seconds: 1, ..Spec::new(3, 1, 3) }).await;
    let patient = create(store, Spec { timeout_seconds: 600, ..Spec::new(1, 1, 1) }).await;
    store.dispatch(silent).await.expect("dispatch");
    store.dispatch(patient).await.expect("dispatch");
    let mut running = Vec::new();
    for target in all_targets(store, silent).await.into_iter().chain(all_targets(store, patient).await) {
        running.push(bring_to_running(store, &target).await.target);
    }
    // One of the silent ones reported its final result meanwhile.
    store.report_intake().apply_reports(&[report(&running[2], 1, final_report(true))]).await.expect("apply");
    let started = manual.now();
    manual.advance(Duration::from_secs(1));
    drain_outbox(store).await;
    let timers = [
        (running[0].id, 1),
        (running[1].id, 1),
        (running[0].id, 1), // a duplicate timer in the same batch
        (running[2].id, 1), // finished
        (running[3].id, 1), // not due yet
        (running[1].id, 2), // another attempt
        (Uuid::new_v4(), 1),
    ];
    let outcomes = store.check_timeouts(&timers, policy).await.expect("check");
    assert_eq!(
        &outcomes[..4],
        &[WatchOutcome::TimedOut, WatchOutcome::TimedOut, WatchOutcome::Gone, WatchOutcome::Gone]
    );
    assert_eq!(outcomes[4], WatchOutcome::NotYet(started + chrono::Duration::seconds(600)));
    assert_eq!(&outcomes[5..], &[WatchOutcome::Gone, WatchOutcome::Gone]);
    for target in &running[..2] {
        let timed_out = store.target(target.id).await.expect("target");
        assert_eq!(timed_out.state, TargetState::TimedOut);
        assert_eq!(timed_out.error.as_deref(), Some("no feedback received within 1 s; the deployment may have failed"));
        assert_eq!(store.target_patches(target.id).await.expect("patches")[0].state, PatchState::Failed);
        let history = store.transitions(target.id).await.expect("history");
        assert_eq!(history.iter().filter(|t| t.to == "timed_out").count(), 1);
    }
    let keys = outbox_keys(store).await;
    assert_eq!(count(&keys, routing::DISPATCH), 1, "one dispatch request for the rollout: {keys:?}");
    assert_eq!(count(&keys, routing::VERIFY), 2, "a verification per timed-out target: {keys:?}");
    assert_eq!(count(&keys, "target.timed_out"), 2, "{keys:?}");
    assert!(store.check_timeouts(&[], policy).await.expect("empty").is_empty());
}

pub async fn fail_target_is_guarded_and_queues_cleanup(db: &dyn TestDatabase) {
    let store = db.store();
    let id = create(store, Spec::new(2, 1, 2)).await;
    store.dispatch(id).await.expect("dispatch");
    drain_outbox(store).await;
    let targets = all_targets(store, id).await;
    let running = bring_to_running(store, &targets[0]).await.target;
    assert!(store.fail_target(&running, "could not start the agent service", true).await.expect("fail"));
    assert!(!store.fail_target(&running, "again", true).await.expect("fail twice"), "a failed target stays failed");
    assert!(store.fail_target(&targets[1], "unreachable", false).await.expect("fail queued"));
    let failed = store.target(running.id).await.expect("target");
    assert_eq!(failed.error.as_deref(), Some("could not start the agent service"));
    assert!(failed.finished_at.is_some());
    let patches = store.target_patches(running.id).await.expect("patches");
    assert_eq!(
        (patches[0].state, patches[0].error.as_deref()),
        (PatchState::Failed, Some("could not start the agent service"))
    );
    let keys = outbox_keys(store).await;
    assert_eq!(count(&keys, routing::CLEANUP), 1, "cleanup only when asked: {keys:?}");
    assert_eq!(count(&keys, "target.failed"), 2, "{keys:?}");
    let last = store.transitions(running.id).await.expect("history").pop().expect("a transition");
    assert_eq!((last.to.as_str(), last.detail.as_deref()), ("failed", Some("could not start the agent service")));
}

pub async fn requeue_for_retry_keeps_the_slot_and_delays_the_job(db: &dyn TestDatabase) {
    let store = db.store();
    let id = create(store, Spec::new(2, 1, 1)).await;
    store.dispatch(id).await.expect("dispatch");
    drain_outbox(store).await;
    let target = all_targets(store, id).await.remove(0);
    // Only a claimed target can be requeued.
    assert!(!store.requeue_for_retry(&target, "x", 1, Duration::from_secs(1)).await.expect("requeue"));
    let Claim::Claimed(context) = store.claim_deploy(target.id, 1, false, "n").await.expect("claim") else {
        panic!("claim refused");
    };
    assert!(store
        .requeue_for_retry(&context.target, "connection refused", 1, Duration::from_secs(5))
        .await
        .expect("requeue"));
    let requeued = store.target(target.id).await.expect("target");
    assert_eq!((requeued.state, requeued.tries), (TargetState::Queued, 1));
    assert_eq!(requeued.error.as_deref(), Some("connection refused"));
    let detail = store.transitions(target.id).await.expect("history").pop().and_then(|t| t.detail);
    assert_eq!(detail.as_deref(), Some("try 1 in 5 s: connection refused"));
    let messages = outbox(store).await;
    assert_eq!(messages.len(), 1, "{messages:?}");
    let job = v1::DeployJob::decode(messages[0].payload.as_slice()).expect("a DeployJob");
    assert_eq!((job.attempt, job.r#try), (1, 1));
    let due = messages[0].due_at_unix_ms.expect("delayed");
    assert!((due - (chrono::Utc::now().timestamp_millis() + 5_000)).abs() < 2_000);
    // It keeps its slot: the other target is not dispatched.
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 0);
}

pub async fn retry_failed_starts_a_new_attempt(db: &dyn TestDatabase) {
    let store = db.store();
    let id = create(store, Spec::new(3, 1, 3)).await;
    assert_eq!(store.retry_failed(id).await.expect("nothing to retry"), 0);
    store.dispatch(id).await.expect("dispatch");
    let targets = all_targets(store, id).await;
    let failed = bring_to_running(store, &targets[0]).await.target;
    store
        .report_intake()
        .apply_reports(&[report(&failed, 1, finished(0, 1, PatchOutcomeKind::Failed, "x"))])
        .await
        .expect("apply");
    assert!(store.fail_target(&failed, "installer failed", false).await.expect("fail"));
    let ok = bring_to_running(store, &targets[1]).await.target;
    store.report_intake().apply_reports(&[report(&ok, 1, final_report(true))]).await.expect("apply");
    assert!(store.fail_target(&targets[2], "unreachable", false).await.expect("fail"));
    assert_eq!(store.dispatch(id).await.expect("dispatch").state, RolloutState::Completed);
    drain_outbox(store).await;
    assert!(store.target(failed.id).await.expect("target").last_seen_at.is_some(), "it ran and reported");
    let ok_seen = store.target(ok.id).await.expect("target").last_seen_at;
    assert!(ok_seen.is_some());

    assert_eq!(store.retry_failed(id).await.expect("retry"), 2);
    let rollout = store.rollout(id).await.expect("rollout");
    assert_eq!((rollout.state, rollout.completed_at), (RolloutState::Running, None));
    let retried = store.target(failed.id).await.expect("target");
    assert_eq!((retried.state, retried.attempt, retried.tries), (TargetState::Pending, 2, 0));
    assert_eq!((retried.error, retried.token_hash, retried.finished_at), (None, None, None));
    assert_eq!(retried.last_seen_at, None, "the new attempt has not been seen yet");
    assert_eq!(store.target(ok.id).await.expect("target").last_seen_at, ok_seen, "only the retried are reset");
    assert!(store.target_patches(failed.id).await.expect("patches").is_empty(), "the new attempt probes afresh");
    assert_eq!(store.target(ok.id).await.expect("target").state, TargetState::Succeeded, "successes stay");
    assert_eq!(outbox_keys(store).await, vec![routing::DISPATCH.to_owned()]);
    // An aborted rollout cannot be retried.
    store.abort_rollout(id).await.expect("abort");
    let error = store.retry_failed(id).await.expect_err("aborted");
    assert!(matches!(error, Error::Conflict(ref m) if m.contains("aborted")), "{error}");
}

pub async fn pause_resume_and_abort_follow_the_rollout_rules(db: &dyn TestDatabase) {
    let store = db.store();
    let id = create(store, Spec::new(4, 0, 1)).await;
    store.dispatch(id).await.expect("dispatch");
    let error = store.resume_rollout(id).await.expect_err("resume a running rollout");
    assert!(
        error.to_string().contains("is running") && error.to_string().contains("only when it is paused"),
        "{error}"
    );
    let paused = store.pause_rollout(id, "change freeze").await.expect("pause");
    assert_eq!((paused.state, paused.pause_reason.as_deref()), (RolloutState::Paused, Some("change freeze")));
    assert!(matches!(store.pause_rollout(id, "again").await, Err(Error::Conflict(_))));
    drain_outbox(store).await;
    let resumed = store.resume_rollout(id).await.expect("resume");
    assert_eq!((resumed.state, resumed.pause_reason), (RolloutState::Running, None));
    assert_eq!(outbox_keys(store).await, vec![routing::DISPATCH.to_owned()], "resuming asks for a dispatch");

    let other = create(store, Spec::new(2, 0, 1)).await;
    let aborted = store.abort_rollout(id).await.expect("abort");
    assert_eq!(aborted.state, RolloutState::Aborted);
    assert!(aborted.completed_at.is_some());
    let others = all_targets(store, other).await;
    assert!(others.iter().all(|t| t.state == TargetState::Pending), "another rollout's targets stay: {others:?}");
    assert!(store.transitions(others[0].id).await.expect("history").is_empty());
    let targets = all_targets(store, id).await;
    assert_eq!(
        targets.iter().filter(|t| t.state == TargetState::Cancelled).count(),
        3,
        "pending targets are cancelled"
    );
    assert_eq!(targets.iter().filter(|t| t.state == TargetState::Queued).count(), 1, "in-flight targets finish");
    for cancelled in targets.iter().filter(|t| t.state == TargetState::Cancelled) {
        assert_eq!(cancelled.finished_at, aborted.completed_at, "{cancelled:?}");
        let history = store.transitions(cancelled.id).await.expect("history");
        assert_eq!(history.len(), 1, "one move each: {history:?}");
        let last = &history[0];
        assert_eq!((last.from.as_str(), last.to.as_str()), ("pending", "cancelled"));
        assert_eq!((last.detail.as_deref(), Some(last.at)), (Some("rollout aborted"), aborted.completed_at));
    }
    assert!(matches!(store.abort_rollout(id).await, Err(Error::Conflict(_))));
    assert!(matches!(store.resume_rollout(id).await, Err(Error::Conflict(_))));
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 0);
}

pub async fn unknown_ids_are_not_found(db: &dyn TestDatabase) {
    let store = db.store();
    let unknown = Uuid::new_v4();
    for error in [
        store.rollout(unknown).await.expect_err("rollout"),
        store.pause_rollout(unknown, "x").await.expect_err("pause"),
        store.abort_rollout(unknown).await.expect_err("abort"),
        store.retry_failed(unknown).await.map(|_| ()).expect_err("retry"),
        store.dispatch(unknown).await.map(|_| ()).expect_err("dispatch"),
    ] {
        assert!(matches!(error, Error::NotFound { what: "rollout", .. }), "{error}");
        assert!(error.to_string().contains(&unknown.to_string()), "{error}");
    }
    let error = store.target(unknown).await.expect_err("target");
    assert!(matches!(error, Error::NotFound { what: "target", .. }), "{error}");
    assert!(store.patches(unknown).await.expect("patches").is_empty());
    assert!(store.targets(unknown, None, None, 10).await.expect("targets").is_empty());
    assert!(store.target_patches(unknown).await.expect("target patches").is_empty());
    assert!(store.agent_events(unknown).await.expect("events").is_empty());
    assert!(store.transitions(unknown).await.expect("transitions").is_empty());
}
