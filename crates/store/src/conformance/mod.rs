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
            a_rollout_taken_in_chunks_keeps_their_order_and_is_invisible_until_committed,
            create_rollout_announces_a_dispatch_through_the_outbox,
            fleet_gauges_count_rollouts_active_targets_and_the_outbox,
            dispatch_fills_free_slots_in_ordinal_order,
            a_target_moved_back_behind_the_dispatch_cursor_is_dispatched_again,
            concurrent_dispatches_never_exceed_the_concurrency,
            waves_open_in_order_and_a_failing_wave_halts,
            a_wave_that_requires_approval_waits_for_it_and_promotion_waits_for_its_soak_and_rate,
            maintenance_windows_gate_dispatch_and_the_deadline_ends_the_wait,
            offline_targets_free_their_slot_and_come_back_or_fail_when_their_time_runs_out,
            an_offline_target_holds_the_rollout_open_until_it_ends_and_abort_cancels_it,
            a_rebooting_target_holds_its_slot_until_it_is_back_on_a_new_boot_and_the_scan_decides,
            a_machine_that_does_not_come_back_or_never_reboots_fails_and_only_a_successful_final_reboots,
            evidence_digests_are_kept_once_and_a_rollouts_patch_rows_read_in_bulk,
            claim_is_guarded_and_a_takeover_keeps_the_token_nonce,
            probe_records_patch_rows_and_skips_installed_patches,
            probe_with_every_patch_installed_succeeds_the_target,
            a_takeover_probe_that_finds_everything_installed_closes_the_open_patches,
            worker_steps_are_guarded_and_recorded_in_the_history,
            running_arms_the_watchdog_due_at_the_timeout,
            reports_are_idempotent_by_target_attempt_and_seq,
            a_second_agent_run_is_stored_as_such_not_as_duplicates,
            a_report_of_an_unknown_target_is_not_stored_and_holds_up_no_other,
            reports_record_patch_results_and_the_final_result,
            reports_of_an_old_attempt_change_no_patch,
            final_results_in_one_batch_count_once_per_target_and_rollout,
            patch_reports_in_one_batch_keep_the_first_result_and_every_column,
            every_fresh_report_moves_the_deadline,
            heartbeats_are_counted_per_agent_run_and_move_the_deadline,
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
            the_relay_loop_drains_what_a_nudge_announces_across_passes_and_the_rest_at_shutdown,
            api_keys_are_shown_once_stored_hashed_and_checked,
            expired_and_revoked_api_keys_are_refused,
            the_audit_log_pages_filters_and_refuses_rewrites,
            relay_claims_rows_with_a_lease_and_holds_no_transaction_while_publishing,
            every_recorded_move_is_an_edge_of_the_state_machine,
            console_reads_filter_and_page_targets_group_failures_and_page_a_timeline,
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
    schedule: crate::schedule::Schedule,
    /// `retry_offline_for_seconds`.
    offline_for: Option<u64>,
    reboot: RebootPolicy,
    reboot_timeout_seconds: u64,
}

impl Spec {
    fn new(targets: usize, patches: usize, concurrency: u32) -> Self {
        Self {
            targets,
            patches,
            concurrency,
            timeout_seconds: 600,
            waves: vec![],
            schedule: crate::schedule::Schedule::default(),
            offline_for: None,
            reboot: RebootPolicy::IfRequired,
            reboot_timeout_seconds: 1_800,
        }
    }
}

async fn create(store: &Store, spec: Spec) -> Uuid {
    let waves = if spec.waves.is_empty() { vec![WaveSpec::new("all", None, 100.0)] } else { spec.waves.clone() };
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
                reboot: spec.reboot,
                max_tries: 2,
                retry_offline_for_seconds: spec.offline_for,
                reboot_timeout_seconds: spec.reboot_timeout_seconds,
                keep_files: true,
                relays: vec![crate::RelayRule { selector: "site=paris".into(), url: "http://relay-paris:1073".into() }],
                relay_fallback: crate::RelayFallback::Fail,
                schedule: spec.schedule.clone(),
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
    assert!(store.mark_installing(&context.target, "push").await.expect("mark_installing"));
    assert!(store.mark_running(&context.target).await.expect("mark_running"));
    DeployContext { target: store.target(target.id).await.expect("target"), ..context }
}

/// The agent process the conformance reports come from (unless a test
/// means another run).
const FIRST_RUN: AgentInstance = AgentInstance(0xa11ce);

fn report(target: &Target, seq: u64, kind: ReportKind) -> IncomingReport {
    IncomingReport {
        target_id: target.id,
        attempt: target.attempt,
        agent_instance: FIRST_RUN,
        seq,
        sent_at: Some(chrono::Utc::now()),
        kind,
    }
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

mod auth;
mod console;
mod offline;
mod postgres;
mod properties;
mod reboot;
mod recovery;
mod reports;
mod rollouts;
mod watchdog;
mod worker;

pub use auth::*;
pub use console::*;
pub use offline::*;
pub use postgres::*;
pub use properties::*;
pub use reboot::*;
pub use recovery::*;
pub use reports::*;
pub use rollouts::*;
pub use watchdog::*;
pub use worker::*;
