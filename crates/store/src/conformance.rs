//! The store conformance suite: every operation's contract, written once
//! and run against each database the store supports (feature
//! `test-support`). SQLite backs `fleetpatch demo`; PostgreSQL backs
//! production; both must behave the same through this crate's API.
//!
//! A test file implements [`TestDatabase`] (a fresh, migrated, private
//! database per test) and instantiates the suite:
//!
//! ```ignore
//! async fn make_database() -> MyTestDatabase { ... }
//! fleetpatch_store::store_conformance_suite!(make_database);
//! ```
//!
//! A test never skips: a database that cannot be reached fails it.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use fleetpatch_proto::plan::{Detection, InstallerKind, RebootPolicy};
use fleetpatch_proto::routing;
use fleetpatch_proto::state::{PatchState, RolloutState, TargetState};
use fleetpatch_proto::{v1, Message};
use fleetpatch_runtime::ManualClock;
use futures_util::FutureExt;
use uuid::Uuid;

use crate::*;

/// One private database, created for one test.
#[async_trait::async_trait]
pub trait TestDatabase: Send + Sync {
    /// The migrated store on it. Panics with a clear message when the
    /// database server cannot be reached: the suite never skips.
    fn store(&self) -> &Store;
    /// A second connection pool on the same database (another process, as
    /// far as the database can tell).
    async fn connect_another(&self) -> Store;
    /// Removes the database; runs even when the test failed.
    async fn tear_down(&self);
}

/// Generates one `#[tokio::test]` per conformance test. `$make` is an
/// async fn `() -> impl TestDatabase`.
#[macro_export]
macro_rules! store_conformance_suite {
    ($make:path) => {
        $crate::store_conformance_suite!(@tests $make;
            create_rollout_round_trips_rollout_patches_and_targets,
            create_rollout_announces_a_dispatch_through_the_outbox,
            fleet_gauges_count_rollouts_active_targets_and_the_outbox,
            dispatch_fills_free_slots_in_ordinal_order,
            concurrent_dispatches_never_exceed_the_concurrency,
            waves_open_in_order_and_a_failing_wave_halts,
            claim_is_guarded_and_a_takeover_keeps_the_token_nonce,
            probe_records_patch_rows_and_skips_installed_patches,
            probe_with_every_patch_installed_succeeds_the_target,
            a_takeover_probe_that_finds_everything_installed_closes_the_open_patches,
            worker_steps_are_guarded_and_recorded_in_the_history,
            running_arms_the_watchdog_due_at_the_timeout,
            reports_are_idempotent_by_target_attempt_and_seq,
            reports_record_patch_results_and_the_final_result,
            reports_of_an_old_attempt_change_no_patch,
            final_results_in_one_batch_count_once_per_target_and_rollout,
            patch_reports_in_one_batch_keep_the_first_result_and_every_column,
            every_fresh_report_moves_the_deadline,
            the_watchdog_times_out_a_silent_target_and_fails_open_patches,
            a_batch_of_timers_is_checked_in_one_go,
            fail_target_is_guarded_and_queues_cleanup,
            requeue_for_retry_keeps_the_slot_and_delays_the_job,
            retry_failed_starts_a_new_attempt,
            pause_resume_and_abort_follow_the_rollout_rules,
            unknown_ids_are_not_found,
            reconciler_finds_targets_whose_job_was_lost_oldest_first_and_paged,
            reconciler_finds_rollouts_with_pending_targets_by_page,
            reconciler_finds_every_overdue_running_target_across_pages,
            verification_verdicts_are_recorded_per_attempt,
            token_info_names_the_attempt,
            relay_publishes_in_commit_order_and_empties_the_outbox,
            api_keys_are_shown_once_stored_hashed_and_checked,
            expired_and_revoked_api_keys_are_refused,
            the_audit_log_pages_filters_and_refuses_rewrites,
            relay_claims_rows_with_a_lease_and_holds_no_transaction_while_publishing,
        );
    };
    (@tests $make:path; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                let database = $make().await;
                $crate::conformance::run(&database, $crate::conformance::$test(&database)).await;
            }
        )*
    };
}

/// Runs `test`, then tears the database down, then reports the test's panic if any.
pub async fn run(database: &dyn TestDatabase, test: impl Future<Output = ()>) {
    let outcome = AssertUnwindSafe(test).catch_unwind().await;
    database.tear_down().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

// ---------------------------------------------------------------- fixtures

fn patch(index: usize) -> NewPatch {
    NewPatch {
        name: format!("KB50{index:05}"),
        kb: Some(format!("KB50{index:05}")),
        file: format!("kb50{index:05}.msu"),
        sha256: format!("{:064x}", index + 1),
        size: 1_000 + index as u64,
        installer: InstallerKind::Msu,
        arguments: "/quiet".into(),
        success_codes: vec![0],
        reboot_codes: vec![3010],
        timeout_seconds: 300,
        detection: Some(Detection::Hotfix { kb: format!("KB50{index:05}") }),
    }
}

fn target(index: usize, wave: u32) -> NewTarget {
    NewTarget {
        host: format!("host-{index:04}"),
        port: index.is_multiple_of(2).then_some(2200 + index as u16),
        transport: "sim".into(),
        labels: BTreeMap::from([("site".to_owned(), format!("s{}", index % 3))]),
        credential: Some("fleet-ssh".into()),
        wave,
    }
}

struct Spec {
    targets: usize,
    patches: usize,
    concurrency: u32,
    timeout_seconds: u32,
    waves: Vec<WaveSpec>,
}

impl Spec {
    fn new(targets: usize, patches: usize, concurrency: u32) -> Self {
        Self { targets, patches, concurrency, timeout_seconds: 600, waves: vec![] }
    }
}

async fn create(store: &Store, spec: Spec) -> Uuid {
    let waves = if spec.waves.is_empty() {
        vec![WaveSpec { name: "all".into(), size: None, max_failure_percent: 100.0 }]
    } else {
        spec.waves.clone()
    };
    // Targets fill the waves in order; the last one takes the rest.
    let mut targets = Vec::new();
    let mut wave = 0usize;
    let mut in_wave = 0u32;
    for index in 0..spec.targets {
        while wave + 1 < waves.len() && waves[wave].size.is_some_and(|size| in_wave >= size) {
            wave += 1;
            in_wave = 0;
        }
        targets.push(target(index, wave as u32));
        in_wave += 1;
    }
    store
        .create_rollout(NewRollout {
            name: "conformance".into(),
            concurrency: spec.concurrency,
            timeout_seconds: spec.timeout_seconds,
            waves,
            settings: RolloutSettings {
                heartbeat_seconds: 5,
                reboot: RebootPolicy::IfRequired,
                max_tries: 2,
                keep_files: true,
            },
            patches: (0..spec.patches).map(patch).collect(),
            targets,
        })
        .await
        .expect("create_rollout")
}

async fn all_targets(store: &Store, rollout: Uuid) -> Vec<Target> {
    store.targets(rollout, None, None, 100_000).await.expect("targets")
}

async fn in_state(store: &Store, rollout: Uuid, state: TargetState) -> Vec<Target> {
    store.targets(rollout, Some(state), None, 100_000).await.expect("targets by state")
}

/// Claims, probes (nothing installed), stages and starts `target`: it ends `running`.
async fn bring_to_running(store: &Store, target: &Target) -> DeployContext {
    let Claim::Claimed(context) = store.claim_deploy(target.id, target.attempt, false, "nonce").await.expect("claim")
    else {
        panic!("target {} could not be claimed", target.host);
    };
    let outcome = store
        .record_probe(&context, "Windows Server 2022", "x86_64", serde_json::json!({"probe": 1}), &[], "hash")
        .await
        .expect("record_probe");
    assert_eq!(outcome, ProbeOutcome::Stage);
    let context = *context;
    assert!(store.mark_installing(&context.target).await.expect("mark_installing"));
    assert!(store.mark_running(&context.target).await.expect("mark_running"));
    DeployContext { target: store.target(target.id).await.expect("target"), ..context }
}

fn report(target: &Target, seq: u64, kind: ReportKind) -> IncomingReport {
    IncomingReport { target_id: target.id, attempt: target.attempt, seq, sent_at: Some(chrono::Utc::now()), kind }
}

fn finished(patch_index: u32, exit_code: i32, outcome: PatchOutcomeKind, tail: &str) -> ReportKind {
    ReportKind::Finished { patch_index, exit_code, outcome, output_tail: tail.into() }
}

fn final_report(success: bool) -> ReportKind {
    ReportKind::Final {
        success,
        reboot_required: false,
        message: if success { "done" } else { "a patch failed" }.into(),
    }
}

async fn outbox(store: &Store) -> Vec<fleetpatch_bus::Outgoing> {
    store.outbox_peek(100_000).await.expect("outbox_peek")
}

async fn outbox_keys(store: &Store) -> Vec<String> {
    outbox(store).await.into_iter().map(|m| m.routing_key).collect()
}

fn count(keys: &[String], key: &str) -> usize {
    keys.iter().filter(|k| k.as_str() == key).count()
}

/// Empties the outbox (as the relay would), so a test sees only what follows.
async fn drain_outbox(store: &Store) {
    let bus = fleetpatch_bus::Bus::new(std::sync::Arc::new(fleetpatch_bus::memory::MemoryBackend::new(
        &routing::WORK_QUEUES,
        5,
    )));
    while store.relay_outbox(&bus, 10_000).await.expect("relay") > 0 {}
}

fn states(transitions: &[Transition]) -> Vec<(String, String)> {
    transitions.iter().map(|t| (t.from.clone(), t.to.clone())).collect()
}

fn pair(from: TargetState, to: TargetState) -> (String, String) {
    (from.as_str().to_owned(), to.as_str().to_owned())
}

// ---------------------------------------------------------------- rollouts

pub async fn create_rollout_round_trips_rollout_patches_and_targets(db: &dyn TestDatabase) {
    let store = db.store();
    let id = create(
        store,
        Spec {
            waves: vec![
                WaveSpec { name: "canary".into(), size: Some(2), max_failure_percent: 0.0 },
                WaveSpec { name: "rest".into(), size: None, max_failure_percent: 25.5 },
            ],
            ..Spec::new(5, 3, 4)
        },
    )
    .await;
    let rollout = store.rollout(id).await.expect("rollout");
    assert_eq!((rollout.id, rollout.name.as_str(), rollout.state), (id, "conformance", RolloutState::Running));
    assert_eq!((rollout.concurrency, rollout.timeout_seconds, rollout.current_wave), (4, 600, 0));
    assert_eq!(rollout.waves[1], WaveSpec { name: "rest".into(), size: None, max_failure_percent: 25.5 });
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
            waves: vec![
                WaveSpec { name: "canary".into(), size: Some(2), max_failure_percent: 0.0 },
                WaveSpec { name: "rest".into(), size: None, max_failure_percent: 100.0 },
            ],
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

// ---------------------------------------------------------------- worker steps

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
    assert!(store.mark_installing(&first.target).await.expect("installing"));
    // The agent runs and reports while its worker dies.
    let installing = store.target(target.id).await.expect("target");
    store
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
    assert!(!store.mark_installing(&target).await.expect("mark_installing"));
    assert!(!store.mark_running(&target).await.expect("mark_running"));
    let context = bring_to_running(store, &target).await;
    assert_eq!(context.target.state, TargetState::Running);
    assert!(context.target.running_at.is_some() && context.target.last_seen_at.is_some());
    // Repeating a step changes nothing.
    assert!(!store.mark_installing(&context.target).await.expect("again"));
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

// ---------------------------------------------------------------- reports

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
        report(&b, 1, ReportKind::Started { patch_index: 0 }),
    ];
    assert_eq!(
        store.apply_reports(&batch).await.expect("apply"),
        vec![ReportResult::Accepted, ReportResult::Accepted, ReportResult::Duplicate, ReportResult::Accepted]
    );
    // Replayed later (an agent's spool): all duplicates, nothing recorded twice.
    assert_eq!(store.apply_reports(&batch[..2]).await.expect("apply"), vec![ReportResult::Duplicate; 2]);
    assert!(store.apply_reports(&[]).await.expect("empty").is_empty());
    let events = store.agent_events(a.id).await.expect("events");
    assert_eq!(
        events.iter().map(|e| (e.seq, e.kind.as_str())).collect::<Vec<_>>(),
        vec![(1, "started"), (2, "heartbeat")]
    );
    assert_eq!(events[0].patch_index, Some(0));
    assert_eq!(store.agent_events(b.id).await.expect("events").len(), 1);
    // Pages follow (attempt, seq): the first page, then after its last event.
    let first = store.agent_events_page(a.id, None, 1).await.expect("page");
    assert_eq!(first.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1]);
    let next = store.agent_events_page(a.id, Some((first[0].attempt, first[0].seq)), 10).await.expect("page");
    assert_eq!(next.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2]);
    let later_attempt = store.agent_events_page(a.id, Some((first[0].attempt + 1, 0)), 10).await.expect("page");
    assert!(later_attempt.is_empty());
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
    store.apply_reports(&[report(&ok, 7, final_report(false))]).await.expect("apply");
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
    let results = store
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
    // Once the target left flight, late results change no patch.
    assert!(store.fail_target(&b, "operator gave up", false).await.expect("fail"));
    let before = store.target_patches(b.id).await.expect("patches");
    store
        .apply_reports(&[
            report(&b, 2, finished(0, 0, PatchOutcomeKind::Installed, "late")),
            report(&b, 3, ReportKind::Started { patch_index: 1 }),
        ])
        .await
        .expect("apply");
    assert_eq!(store.target_patches(b.id).await.expect("patches"), before);
}

pub async fn every_fresh_report_moves_the_deadline(db: &dyn TestDatabase) {
    let manual = ManualClock::starting_now();
    let store = &db.store().clone().with_clock(manual.clock());
    let id = create(store, Spec::new(1, 1, 1)).await;
    store.dispatch(id).await.expect("dispatch");
    let target = bring_to_running(store, &all_targets(store, id).await[0]).await.target;
    assert_eq!(target.last_seen_at, Some(manual.now()), "running counts as seen");
    // The last-seen time is when the report was received, by the store's clock.
    let received = manual.advance(Duration::from_millis(20));
    store.apply_reports(&[report(&target, 1, ReportKind::Heartbeat { patch_index: None })]).await.expect("apply");
    assert_eq!(store.target(target.id).await.expect("target").last_seen_at, Some(received));
    // A duplicate does not.
    manual.advance(Duration::from_millis(20));
    store.apply_reports(&[report(&target, 1, ReportKind::Heartbeat { patch_index: None })]).await.expect("apply");
    assert_eq!(store.target(target.id).await.expect("target").last_seen_at, Some(received));
}

// ---------------------------------------------------------------- watchdog and failures

pub async fn the_watchdog_times_out_a_silent_target_and_fails_open_patches(db: &dyn TestDatabase) {
    let manual = ManualClock::starting_now();
    let store = &db.store().clone().with_clock(manual.clock());
    let policy = TimeoutPolicy { verify_delay: Duration::from_secs(7) };
    let id = create(store, Spec { timeout_seconds: 600, ..Spec::new(1, 2, 1) }).await;
    store.dispatch(id).await.expect("dispatch");
    let target = bring_to_running(store, &all_targets(store, id).await[0]).await.target;
    let seen = manual.advance(Duration::from_secs(30));
    store
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
    store.apply_reports(&[report(&running[2], 1, final_report(true))]).await.expect("apply");
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
    store.apply_reports(&[report(&failed, 1, finished(0, 1, PatchOutcomeKind::Failed, "x"))]).await.expect("apply");
    assert!(store.fail_target(&failed, "installer failed", false).await.expect("fail"));
    let ok = bring_to_running(store, &targets[1]).await.target;
    store.apply_reports(&[report(&ok, 1, final_report(true))]).await.expect("apply");
    assert!(store.fail_target(&targets[2], "unreachable", false).await.expect("fail"));
    assert_eq!(store.dispatch(id).await.expect("dispatch").state, RolloutState::Completed);
    drain_outbox(store).await;

    assert_eq!(store.retry_failed(id).await.expect("retry"), 2);
    let rollout = store.rollout(id).await.expect("rollout");
    assert_eq!((rollout.state, rollout.completed_at), (RolloutState::Running, None));
    let retried = store.target(failed.id).await.expect("target");
    assert_eq!((retried.state, retried.attempt, retried.tries), (TargetState::Pending, 2, 0));
    assert_eq!((retried.error, retried.token_hash, retried.finished_at), (None, None, None));
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

    let aborted = store.abort_rollout(id).await.expect("abort");
    assert_eq!(aborted.state, RolloutState::Aborted);
    assert!(aborted.completed_at.is_some());
    let targets = all_targets(store, id).await;
    assert_eq!(
        targets.iter().filter(|t| t.state == TargetState::Cancelled).count(),
        3,
        "pending targets are cancelled"
    );
    assert_eq!(targets.iter().filter(|t| t.state == TargetState::Queued).count(), 1, "in-flight targets finish");
    let cancelled = targets.iter().find(|t| t.state == TargetState::Cancelled).expect("a cancelled target");
    let last = store.transitions(cancelled.id).await.expect("history").pop().expect("transition");
    assert_eq!((last.to.as_str(), last.detail.as_deref()), ("cancelled", Some("rollout aborted")));
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

fn deploy_job_targets(messages: &[fleetpatch_bus::Outgoing]) -> Vec<String> {
    messages.iter().map(|m| v1::DeployJob::decode(m.payload.as_slice()).expect("a DeployJob").target_id).collect()
}

pub async fn reconciler_finds_targets_whose_job_was_lost_oldest_first_and_paged(db: &dyn TestDatabase) {
    let store = db.store();
    let id = create(store, Spec::new(4, 1, 4)).await;
    store.dispatch(id).await.expect("dispatch");
    let targets = all_targets(store, id).await;
    // One target moves on to probing (a worker claimed it, then died), one runs.
    let Claim::Claimed(_) = store.claim_deploy(targets[0].id, 1, false, "nonce").await.expect("claim") else {
        panic!("claimable");
    };
    bring_to_running(store, &targets[1]).await;
    assert!(store.stuck_in_flight_targets(Duration::from_secs(60), 10).await.expect("stuck").is_empty());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stuck =
        deploy_job_targets(&store.stuck_in_flight_targets(Duration::from_millis(200), 10).await.expect("stuck"));
    let mut expected: Vec<String> = [0, 2, 3].iter().map(|i| targets[*i].id.to_string()).collect();
    expected.sort();
    let mut found = stuck.clone();
    found.sort();
    assert_eq!(found, expected, "queued and probing targets without progress; not the running one");
    let first = deploy_job_targets(&store.stuck_in_flight_targets(Duration::from_millis(200), 1).await.expect("stuck"));
    assert_eq!(first, vec![stuck[0].clone()], "the limit holds, oldest first");
    let job = v1::DeployJob::decode(
        store.stuck_in_flight_targets(Duration::from_millis(200), 10).await.expect("stuck")[0].payload.as_slice(),
    )
    .expect("a DeployJob");
    assert_eq!((job.attempt, job.rollout_id), (1, id.to_string()), "the job names the attempt and rollout");
}

pub async fn reconciler_finds_rollouts_with_pending_targets_by_page(db: &dyn TestDatabase) {
    let store = db.store();
    let mut with_pending = Vec::new();
    for _ in 0..3 {
        let id = create(store, Spec::new(2, 1, 1)).await;
        store.dispatch(id).await.expect("dispatch");
        with_pending.push(id);
    }
    // All dispatched: nothing pending.
    let full = create(store, Spec::new(1, 1, 1)).await;
    store.dispatch(full).await.expect("dispatch");
    // Paused with pending targets: not running, left alone.
    let paused = create(store, Spec::new(2, 1, 1)).await;
    store.pause_rollout(paused, "test").await.expect("pause");
    with_pending.sort();
    let all = store.rollouts_with_pending_targets(None, 100).await.expect("pending");
    assert_eq!(all.iter().filter(|id| with_pending.contains(id)).count(), 3);
    assert!(!all.contains(&full) && !all.contains(&paused), "{all:?}");
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = store.rollouts_with_pending_targets(after, 1).await.expect("page");
        let Some(last) = page.last().copied() else { break };
        assert_eq!(page.len(), 1, "the limit holds");
        paged.extend(page);
        after = Some(last);
    }
    assert_eq!(paged, all, "pages walk every rollout once, in id order");
}

pub async fn reconciler_finds_every_overdue_running_target_across_pages(db: &dyn TestDatabase) {
    let store = db.store();
    let id = create(store, Spec { timeout_seconds: 1, ..Spec::new(5, 1, 5) }).await;
    store.dispatch(id).await.expect("dispatch");
    let targets = all_targets(store, id).await;
    let mut running = Vec::new();
    for target in &targets {
        running.push(bring_to_running(store, target).await.target.id);
    }
    assert!(store.overdue_running_deadlines(Duration::ZERO, 2, 100).await.expect("overdue").is_empty());
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    // Pages of 2 over 5 targets: all are found, not the first page only.
    let overdue = store.overdue_running_deadlines(Duration::ZERO, 2, 100).await.expect("overdue");
    let mut found: Vec<Uuid> = overdue.iter().map(|t| t.target_id).collect();
    found.sort();
    running.sort();
    assert_eq!(found, running);
    assert!(overdue.iter().all(|t| t.attempt == 1));
    assert_eq!(store.overdue_running_deadlines(Duration::ZERO, 2, 3).await.expect("overdue").len(), 3, "limit");
    assert!(store.overdue_running_deadlines(Duration::from_secs(60), 2, 100).await.expect("overdue").is_empty());
}

pub async fn verification_verdicts_are_recorded_per_attempt(db: &dyn TestDatabase) {
    let store = db.store();
    let id = create(store, Spec::new(1, 3, 1)).await;
    let target = all_targets(store, id).await.remove(0);
    store.record_verification(target.id, 1, &[0], &[1, 2]).await.expect("verify");
    let verified = store.target(target.id).await.expect("target");
    assert_eq!(verified.verified_state.as_deref(), Some("missing #1, #2"));
    assert!(verified.verified_at.is_some());
    store.record_verification(target.id, 1, &[], &[0, 1, 2]).await.expect("verify");
    assert_eq!(store.target(target.id).await.expect("target").verified_state.as_deref(), Some("none_installed"));
    store.record_verification(target.id, 1, &[0, 1, 2], &[]).await.expect("verify");
    assert_eq!(store.target(target.id).await.expect("target").verified_state.as_deref(), Some("all_installed"));
    // A scan of another attempt does not overwrite this one's.
    store.record_verification(target.id, 9, &[], &[0, 1, 2]).await.expect("verify");
    assert_eq!(store.target(target.id).await.expect("target").verified_state.as_deref(), Some("all_installed"));
}

pub async fn token_info_names_the_attempt(db: &dyn TestDatabase) {
    let store = db.store();
    let id = create(store, Spec::new(1, 1, 1)).await;
    let target = all_targets(store, id).await.remove(0);
    assert_eq!(store.token_info(target.id).await.expect("token info"), None, "no token before the probe");
    store.dispatch(id).await.expect("dispatch");
    bring_to_running(store, &target).await;
    let info = store.token_info(target.id).await.expect("token info").expect("a token after the probe");
    let nonce = store.target(target.id).await.expect("target").token_nonce.expect("a nonce after the claim");
    assert_eq!(
        info,
        TokenInfo {
            token_hash: "hash".into(),
            token_nonce: nonce,
            attempt: 1,
            rollout_id: id,
            state: TargetState::Running
        }
    );
    assert_eq!(store.token_info(Uuid::new_v4()).await.expect("token info"), None);
}

pub async fn relay_publishes_in_commit_order_and_empties_the_outbox(db: &dyn TestDatabase) {
    let store = db.store();
    let backend = std::sync::Arc::new(fleetpatch_bus::memory::MemoryBackend::new(&routing::WORK_QUEUES, 5));
    let bus = fleetpatch_bus::Bus::new(backend);
    let ids = [create(store, Spec::new(1, 0, 1)).await, create(store, Spec::new(1, 0, 1)).await];
    let mut consumer = bus.consume(routing::DISPATCH, 10).await.expect("consume");
    assert_eq!(store.relay_outbox(&bus, 1).await.expect("relay"), 1, "the limit holds");
    assert_eq!(store.relay_outbox(&bus, 100).await.expect("relay"), 1);
    assert_eq!(store.relay_outbox(&bus, 100).await.expect("relay"), 0);
    assert_eq!(store.outbox_depth().await.expect("depth"), 0);
    for expected in ids {
        let delivery = tokio::time::timeout(Duration::from_secs(5), consumer.next())
            .await
            .expect("a dispatch request arrives")
            .expect("consumer open");
        let request = v1::DispatchRequest::decode(delivery.payload.as_slice()).expect("a DispatchRequest");
        assert_eq!(request.rollout_id, expected.to_string(), "commit order");
        delivery.ack().await.expect("ack");
    }
    // A bus that refuses the messages leaves them in the outbox.
    bus.close().await;
    store.enqueue(vec![fleetpatch_bus::Outgoing::work(routing::DISPATCH, vec![1, 2, 3])]).await.expect("enqueue");
    assert!(store.relay_outbox(&bus, 100).await.is_err(), "publishing on a closed bus fails");
    assert_eq!(store.outbox_depth().await.expect("depth"), 1, "nothing is lost");
    assert_eq!(outbox(store).await[0].payload, vec![1, 2, 3]);
}

// ---------------------------------------------------------------- API keys and audit

pub async fn api_keys_are_shown_once_stored_hashed_and_checked(db: &dyn TestDatabase) {
    use sea_orm::EntityTrait;
    let store = db.store();
    let issued = store.create_api_key("ci", Role::Operator, None).await.expect("create");
    let secret = issued.expose_secret().to_owned();
    let parsed = ParsedApiKey::parse(&secret).expect("an issued key has the documented shape");
    assert_eq!(parsed.key_id(), issued.key.key_id);
    assert!(!format!("{issued:?}").contains(&secret), "Debug never shows the secret");
    match store.check_api_key(&parsed, chrono::Utc::now()).await.expect("check") {
        KeyCheck::Valid(key) => assert_eq!((key.name.as_str(), key.role), ("ci", Role::Operator)),
        other => panic!("a fresh key is valid, got {other:?}"),
    }
    // Only a hash is stored: the secret is nowhere in the row.
    let rows = crate::entity::api_keys::Entity::find().all(store.connection()).await.expect("rows");
    assert_eq!(rows.len(), 1);
    assert_ne!(rows[0].secret_hash, secret);
    assert!(!rows[0].secret_hash.contains(&secret[secret.len() - 64..]));
    // The same id with another secret, and an unknown id, are both unknown.
    let mut forged = secret.clone();
    let last = if forged.ends_with('0') { "1" } else { "0" };
    forged.replace_range(forged.len() - 1.., last);
    let forged = ParsedApiKey::parse(&forged).expect("shape");
    assert_eq!(store.check_api_key(&forged, chrono::Utc::now()).await.expect("check"), KeyCheck::Unknown);
    let other = format!("fpk_{}_{}", "0".repeat(16), "0".repeat(64));
    let other = ParsedApiKey::parse(&other).expect("shape");
    assert_eq!(store.check_api_key(&other, chrono::Utc::now()).await.expect("check"), KeyCheck::Unknown);
    // Names are unique; a second key gets a different id and secret.
    let error = store.create_api_key("ci", Role::Viewer, None).await.expect_err("duplicate name");
    assert!(matches!(error, Error::Conflict(_)) && error.to_string().contains("\"ci\""), "{error}");
    let error = store.create_api_key("bad name", Role::Viewer, None).await.expect_err("bad name");
    assert!(matches!(error, Error::Invalid(_)), "{error}");
    let second = store.create_api_key("grafana", Role::Viewer, None).await.expect("create");
    assert_ne!(second.key.key_id, issued.key.key_id);
    assert_ne!(second.expose_secret(), secret);
    let names: Vec<(String, Role)> =
        store.list_api_keys().await.expect("list").into_iter().map(|k| (k.name, k.role)).collect();
    assert_eq!(names, vec![("ci".to_owned(), Role::Operator), ("grafana".to_owned(), Role::Viewer)]);
}

pub async fn expired_and_revoked_api_keys_are_refused(db: &dyn TestDatabase) {
    let store = db.store();
    let now = chrono::Utc::now();
    let error = store.create_api_key("old", Role::Admin, Some(now - chrono::Duration::seconds(1))).await;
    assert!(matches!(error, Err(Error::Invalid(_))), "an expiry in the past is refused");
    let expiring =
        store.create_api_key("expiring", Role::Admin, Some(now + chrono::Duration::hours(1))).await.expect("create");
    let parsed = ParsedApiKey::parse(expiring.expose_secret()).expect("shape");
    assert!(matches!(store.check_api_key(&parsed, now).await.expect("check"), KeyCheck::Valid(_)));
    let later = now + chrono::Duration::hours(2);
    assert!(matches!(store.check_api_key(&parsed, later).await.expect("check"), KeyCheck::Expired(_)));

    let revoked = store.create_api_key("leaked", Role::Operator, None).await.expect("create");
    let parsed = ParsedApiKey::parse(revoked.expose_secret()).expect("shape");
    let first = store.revoke_api_key("leaked").await.expect("revoke");
    let revoked_at = first.revoked_at.expect("revoked");
    assert!(matches!(store.check_api_key(&parsed, chrono::Utc::now()).await.expect("check"), KeyCheck::Revoked(_)));
    tokio::time::sleep(Duration::from_millis(5)).await;
    let again = store.revoke_api_key("leaked").await.expect("revoking again is harmless");
    assert_eq!(again.revoked_at, Some(revoked_at), "the first revocation time stays");
    let error = store.revoke_api_key("nobody").await.expect_err("unknown name");
    assert!(matches!(error, Error::NotFound { what: "API key", .. }), "{error}");
}

pub async fn the_audit_log_pages_filters_and_refuses_rewrites(db: &dyn TestDatabase) {
    use sea_orm::ConnectionTrait;
    let store = db.store();
    let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
    let entry = |i: u16, rollout_id: Option<Uuid>| NewAuditEntry {
        at: chrono::Utc::now(),
        actor: format!("actor-{i}"),
        actor_kind: if i.is_multiple_of(2) { ActorKind::ApiKey } else { ActorKind::Jwt },
        role: Role::Operator,
        method: "POST".into(),
        route: "/v1/rollouts/{id}/pause".into(),
        rollout_id,
        source: "127.0.0.1:5000".into(),
        status: 200 + i,
    };
    let mut ids = Vec::new();
    for i in 0..5u16 {
        let rollout = match i {
            0 | 2 | 4 => Some(first),
            1 => Some(second),
            _ => None,
        };
        ids.push(store.append_audit(entry(i, rollout)).await.expect("append"));
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids grow: {ids:?}");
    let all = store.audit_entries(AuditQuery { limit: 100, ..Default::default() }).await.expect("read");
    assert_eq!(all.iter().map(|e| e.status).collect::<Vec<_>>(), vec![204, 203, 202, 201, 200], "newest first");
    assert_eq!(all[4].actor, "actor-0");
    assert_eq!(all[4].actor_kind, ActorKind::ApiKey);
    assert_eq!(all[3].actor_kind, ActorKind::Jwt);
    assert_eq!(all[4].route, "/v1/rollouts/{id}/pause");
    assert_eq!(all[4].source, "127.0.0.1:5000");
    let of_first = store
        .audit_entries(AuditQuery { rollout_id: Some(first), limit: 2, ..Default::default() })
        .await
        .expect("page 1");
    assert_eq!(of_first.iter().map(|e| e.status).collect::<Vec<_>>(), vec![204, 202]);
    let next = store
        .audit_entries(AuditQuery { rollout_id: Some(first), before: Some(of_first[1].id), limit: 2 })
        .await
        .expect("page 2");
    assert_eq!(next.iter().map(|e| e.status).collect::<Vec<_>>(), vec![200]);
    // Append-only, whatever issues the statement.
    for statement in ["UPDATE audit_log SET actor = 'someone else'", "DELETE FROM audit_log"] {
        let error = store.connection().execute_unprepared(statement).await.expect_err(statement);
        assert!(error.to_string().contains("append-only"), "{statement}: {error}");
    }
    assert_eq!(store.audit_entries(AuditQuery { limit: 100, ..Default::default() }).await.expect("read"), all);
}

/// A broker that never confirms: every publish hangs.
struct HangingBroker;

#[async_trait::async_trait]
impl fleetpatch_bus::Backend for HangingBroker {
    async fn publish(&self, _: fleetpatch_bus::Route, _: Vec<fleetpatch_bus::Wire>) -> fleetpatch_bus::Result<()> {
        std::future::pending().await
    }
    async fn consume(&self, _: &str, _: u16) -> fleetpatch_bus::Result<fleetpatch_bus::BackendConsumer> {
        Err(fleetpatch_bus::Error::Closed)
    }
    async fn drain_dead_letters(&self, _: usize) -> fleetpatch_bus::Result<Vec<fleetpatch_bus::Wire>> {
        Ok(vec![])
    }
    async fn peek_dead_letters(&self, _: usize) -> fleetpatch_bus::Result<Vec<fleetpatch_bus::Wire>> {
        Ok(vec![])
    }
    async fn queue_depth(&self, _: &str) -> fleetpatch_bus::Result<u64> {
        Ok(0)
    }
    fn is_healthy(&self) -> bool {
        true
    }
    async fn close(&self) {}
}

async fn claimed_rows(store: &Store) -> i64 {
    let sql = "SELECT COUNT(*) AS n FROM outbox WHERE claimed_until_ms IS NOT NULL";
    let row = store.db.query_one(sea_orm::Statement::from_string(store.backend(), sql.to_owned())).await;
    row.expect("count claims").expect("a row").try_get::<i64>("", "n").expect("n")
}

pub async fn relay_claims_rows_with_a_lease_and_holds_no_transaction_while_publishing(db: &dyn TestDatabase) {
    use sea_orm::ConnectionTrait;
    let store = db.store();
    drain_outbox(store).await;
    store.enqueue(vec![fleetpatch_bus::Outgoing::work(routing::DISPATCH, vec![7])]).await.expect("enqueue");
    // A relay whose broker hangs (a blocked RabbitMQ) ...
    let hanging = fleetpatch_bus::Bus::new(std::sync::Arc::new(HangingBroker));
    let stuck = {
        let store = store.clone();
        tokio::spawn(async move { store.relay_outbox(&hanging, 100).await })
    };
    // ... has committed its claim before publishing: another connection sees it.
    let mut seen = 0;
    for _ in 0..200 {
        seen = claimed_rows(store).await;
        if seen == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen, 1, "the claim is committed while the publish hangs (no transaction spans the broker call)");
    // Another relay skips the claimed row, without waiting for the stuck one.
    let backend = std::sync::Arc::new(fleetpatch_bus::memory::MemoryBackend::new(&routing::WORK_QUEUES, 5));
    let bus = fleetpatch_bus::Bus::new(backend);
    let quick = tokio::time::timeout(Duration::from_secs(5), store.relay_outbox(&bus, 100)).await;
    assert_eq!(quick.expect("a second relay is not blocked").expect("relay"), 0, "a claimed row is not taken");
    // The stuck relay dies; once its lease has run out, the row is published again.
    stuck.abort();
    let expired = fleetpatch_bus::now_unix_ms() - 1;
    store
        .db
        .execute(sea_orm::Statement::from_string(
            store.backend(),
            format!("UPDATE outbox SET claimed_until_ms = {expired}"),
        ))
        .await
        .expect("expire the lease");
    let mut consumer = bus.consume(routing::DISPATCH, 10).await.expect("consume");
    assert_eq!(store.relay_outbox(&bus, 100).await.expect("relay"), 1, "an expired claim is taken again");
    let delivery = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.expect("arrives").expect("open");
    assert_eq!(delivery.payload, vec![7]);
    assert_eq!(store.outbox_depth().await.expect("depth"), 0);
    assert_eq!(claimed_rows(store).await, 0);
}
