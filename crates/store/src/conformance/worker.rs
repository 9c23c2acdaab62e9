//! The worker's guarded steps: claim, probe, stage, install, running.

use super::*;

pub async fn claim_is_guarded_and_a_takeover_keeps_the_token_nonce(db: &dyn TestDatabase) {
    let store = db.store();
    let id = create(store, Spec::new(2, 2, 2)).await;
    store.dispatch(id).await.expect("dispatch");
    let target = &all_targets(store, id).await[0];

    // A job for another attempt is skipped.
    match store.claim_deploy(target.id, 2, false, "n0").await.expect("claim") {
        Claim::Skip { state, attempt } => assert_eq!((state, attempt), (TargetState::Queued, 1)),
        Claim::Claimed(_) => panic!("a job for attempt 2 claimed attempt 1"),
    }
    let Claim::Claimed(context) = store.claim_deploy(target.id, 1, false, "first").await.expect("claim") else {
        panic!("first claim refused");
    };
    assert_eq!(context.target.state, TargetState::Probing);
    assert_eq!(context.target.token_nonce.as_deref(), Some("first"));
    assert_eq!(context.rollout.id, id);
    assert_eq!(context.patches.iter().map(|p| p.index).collect::<Vec<_>>(), vec![0, 1]);
    // A duplicate delivery is skipped.
    assert!(matches!(
        store.claim_deploy(target.id, 1, false, "dup").await.expect("claim"),
        Claim::Skip { state: TargetState::Probing, attempt: 1 }
    ));
    // A redelivery after a worker died takes over and keeps the nonce, so
    // the token the running agent holds stays valid.
    let Claim::Claimed(taken) = store.claim_deploy(target.id, 1, true, "second").await.expect("takeover") else {
        panic!("takeover refused");
    };
    assert_eq!(taken.target.token_nonce.as_deref(), Some("first"));
    let history = store.transitions(target.id).await.expect("transitions");
    assert_eq!(history.last().and_then(|t| t.detail.as_deref()), Some("taken over from probing"));
    // A final target is never taken over.
    assert!(store.fail_target(&taken.target, "gave up", false).await.expect("fail"));
    assert!(matches!(
        store.claim_deploy(target.id, 1, true, "third").await.expect("claim"),
        Claim::Skip { state: TargetState::Failed, .. }
    ));
    let error = store.claim_deploy(Uuid::new_v4(), 1, false, "x").await.expect_err("unknown target");
    assert!(matches!(error, Error::NotFound { what: "target", .. }), "{error}");
}

pub async fn probe_records_patch_rows_and_skips_installed_patches(db: &dyn TestDatabase) {
    let store = db.store();
    let id = create(store, Spec::new(1, 3, 1)).await;
    store.dispatch(id).await.expect("dispatch");
    let target = &all_targets(store, id).await[0];
    let Claim::Claimed(context) = store.claim_deploy(target.id, 1, false, "n").await.expect("claim") else {
        panic!("claim refused");
    };
    let outcome = store
        .record_probe(&context, "Ubuntu 24.04", "aarch64", serde_json::json!({"free": 1}), &[1], "token-hash")
        .await
        .expect("probe");
    assert_eq!(outcome, ProbeOutcome::Stage);
    let target = store.target(target.id).await.expect("target");
    assert_eq!(
        (target.state, target.os.as_deref(), target.arch.as_deref()),
        (TargetState::Staging, Some("Ubuntu 24.04"), Some("aarch64"))
    );
    assert_eq!(target.token_hash.as_deref(), Some("token-hash"));
    let patches = store.target_patches(target.id).await.expect("target patches");
    assert_eq!(
        patches.iter().map(|p| (p.patch_index, p.state, p.outcome.as_deref())).collect::<Vec<_>>(),
        vec![
            (0, PatchState::Pending, None),
            (1, PatchState::Skipped, Some("already_installed")),
            (2, PatchState::Pending, None)
        ]
    );
    // A second probe of the same claim finds the target moved on.
    assert_eq!(
        store.record_probe(&context, "x", "y", serde_json::json!({}), &[], "h").await.expect("probe"),
        ProbeOutcome::Lost
    );
}

pub async fn probe_with_every_patch_installed_succeeds_the_target(db: &dyn TestDatabase) {
    let store = db.store();
    let id = create(store, Spec::new(1, 2, 1)).await;
    store.dispatch(id).await.expect("dispatch");
    drain_outbox(store).await;
    let target = &all_targets(store, id).await[0];
    let Claim::Claimed(context) = store.claim_deploy(target.id, 1, false, "n").await.expect("claim") else {
        panic!("claim refused");
    };
    let outcome =
        store.record_probe(&context, "os", "x86_64", serde_json::json!({}), &[0, 1], "h").await.expect("probe");
    assert_eq!(outcome, ProbeOutcome::AllInstalled);
    let target = store.target(target.id).await.expect("target");
    assert_eq!(target.state, TargetState::Succeeded);
    assert!(target.finished_at.is_some());
    assert!(store.target_patches(target.id).await.expect("patches").iter().all(|p| p.state == PatchState::Skipped));
    let keys = outbox_keys(store).await;
    assert_eq!(count(&keys, routing::DISPATCH), 1, "{keys:?}");
    assert_eq!(count(&keys, "target.succeeded"), 1, "{keys:?}");
    let history = states(&store.transitions(target.id).await.expect("history"));
    assert_eq!(history.last(), Some(&pair(TargetState::Probing, TargetState::Succeeded)));
}

pub async fn a_takeover_probe_that_finds_everything_installed_closes_the_open_patches(db: &dyn TestDatabase) {
    let store = db.store();
    let id = create(store, Spec::new(1, 3, 1)).await;
    store.dispatch(id).await.expect("dispatch");
    let target = all_targets(store, id).await.remove(0);
    let Claim::Claimed(first) = store.claim_deploy(target.id, 1, false, "n").await.expect("claim") else {
        panic!("claim refused");
    };
    store.record_probe(&first, "os", "x86_64", serde_json::json!({}), &[], "hash").await.expect("probe");
    assert!(store.mark_installing(&first.target, "relay http://relay-paris:1073").await.expect("installing"));
    // The agent runs and reports while its worker dies.
    let installing = store.target(target.id).await.expect("target");
    assert_eq!(installing.delivery.as_deref(), Some("relay http://relay-paris:1073"), "the delivery is kept");
    // The rollout's relay rules come back as they were given.
    let settings = store.rollout(id).await.expect("rollout").settings;
    assert_eq!(
        (settings.relays[0].url.as_str(), settings.relay_fallback),
        ("http://relay-paris:1073", crate::RelayFallback::Fail)
    );
    store
        .report_intake()
        .apply_reports(&[
            report(&installing, 1, ReportKind::Started { patch_index: 0 }),
            report(&installing, 2, finished(0, 0, PatchOutcomeKind::Installed, "ok")),
            report(&installing, 3, ReportKind::Started { patch_index: 1 }),
        ])
        .await
        .expect("apply");
    // The worker taking over probes after the agent installed everything.
    let Claim::Claimed(second) = store.claim_deploy(target.id, 1, true, "n2").await.expect("takeover") else {
        panic!("takeover refused");
    };
    let outcome =
        store.record_probe(&second, "os", "x86_64", serde_json::json!({}), &[0, 1, 2], "hash").await.expect("probe");
    assert_eq!(outcome, ProbeOutcome::AllInstalled);
    assert_eq!(store.target(target.id).await.expect("target").state, TargetState::Succeeded);
    let patches = store.target_patches(target.id).await.expect("patches");
    assert_eq!(
        patches.iter().map(|p| (p.state, p.outcome.as_deref())).collect::<Vec<_>>(),
        vec![
            (PatchState::Succeeded, Some("installed")),
            (PatchState::Succeeded, Some("found_installed")),
            (PatchState::Succeeded, Some("found_installed")),
        ],
        "no patch stays open under a final target"
    );
}

pub async fn worker_steps_are_guarded_and_recorded_in_the_history(db: &dyn TestDatabase) {
    let store = db.store();
    let id = create(store, Spec::new(1, 1, 1)).await;
    store.dispatch(id).await.expect("dispatch");
    let target = all_targets(store, id).await.remove(0);
    // Out of order: nothing moves.
    assert!(!store.mark_installing(&target, "push").await.expect("mark_installing"));
    assert!(!store.mark_running(&target).await.expect("mark_running"));
    let context = bring_to_running(store, &target).await;
    assert_eq!(context.target.state, TargetState::Running);
    assert!(context.target.running_at.is_some() && context.target.last_seen_at.is_some());
    // Repeating a step changes nothing.
    assert!(!store.mark_installing(&context.target, "push").await.expect("again"));
    assert!(!store.mark_running(&context.target).await.expect("again"));
    let history = store.transitions(target.id).await.expect("history");
    assert_eq!(
        states(&history),
        vec![
            pair(TargetState::Pending, TargetState::Queued),
            pair(TargetState::Queued, TargetState::Probing),
            pair(TargetState::Probing, TargetState::Staging),
            pair(TargetState::Staging, TargetState::Installing),
            pair(TargetState::Installing, TargetState::Running),
        ]
    );
    assert!(history.windows(2).all(|w| w[0].at <= w[1].at));
    assert!(history.iter().all(|t| t.target_id == target.id));
    assert_eq!(store.rollout_transitions(id).await.expect("rollout history"), history);
}

pub async fn running_arms_the_watchdog_due_at_the_timeout(db: &dyn TestDatabase) {
    let store = db.store();
    let id = create(store, Spec { timeout_seconds: 90, ..Spec::new(1, 1, 1) }).await;
    store.dispatch(id).await.expect("dispatch");
    drain_outbox(store).await;
    let target = all_targets(store, id).await.remove(0);
    let context = bring_to_running(store, &target).await;
    let watches: Vec<_> = outbox(store).await.into_iter().filter(|m| m.routing_key == routing::WATCH).collect();
    assert_eq!(watches.len(), 1);
    let timer = v1::WatchTimer::decode(watches[0].payload.as_slice()).expect("a WatchTimer");
    let running_at = context.target.running_at.expect("running_at").timestamp_millis();
    assert_eq!((timer.target_id, timer.attempt), (target.id.to_string(), 1));
    assert!(
        (timer.due_at_unix_ms - (running_at + 90_000)).abs() < 1_000,
        "due {} vs running {running_at}",
        timer.due_at_unix_ms
    );
    assert_eq!(watches[0].due_at_unix_ms, Some(timer.due_at_unix_ms));
}
