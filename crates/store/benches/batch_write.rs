//! The collector's batch write (`ReportIntake::apply_reports`) on PostgreSQL
//! (`FLEETPATCH_TEST_DATABASE_URL`, an admin connection; a private database
//! is created and dropped) and on SQLite: reports per second and time per
//! batch for batches of 1, 100 and 1,000 reports, each report stream being
//! what real agents send (started/finished per patch, a heartbeat, the final).
//!
//!     cargo bench -p fleetpatch-store --bench batch_write
//!
//! FLEETPATCH_BENCH_TARGETS sets the targets per batch size (default 2,000).

use std::time::Instant;

use fleetpatch_store::*;
use uuid::Uuid;

mod common;

const PATCHES: u32 = 3;

/// A rollout whose targets are all running (as the workers leave them).
async fn running_targets(store: &Store, targets: usize) -> Vec<Target> {
    let id = store
        .create_rollout(NewRollout::synthetic("batch-write bench", targets, PATCHES as usize, 600))
        .await
        .expect("create");
    store.dispatch(id).await.expect("dispatch");
    let mut running = Vec::new();
    for target in store.targets(id, None, None, u64::MAX >> 1).await.expect("targets") {
        let Claim::Claimed(context) = store.claim_deploy(target.id, 1, false, "n").await.expect("claim") else {
            panic!("claim refused");
        };
        store.record_probe(&context, "os", "x86_64", serde_json::json!({}), &[], "hash").await.expect("probe");
        store.mark_installing(&context.target, "push").await.expect("installing");
        store.mark_running(&context.target).await.expect("running");
        running.push(context.target);
    }
    running
}

/// Every target's reports, interleaved across targets as many agents send them.
fn report_stream(targets: &[Target]) -> Vec<IncomingReport> {
    let mut per_target: Vec<Vec<ReportKind>> = Vec::new();
    for _ in targets {
        let mut kinds = Vec::new();
        for patch_index in 0..PATCHES {
            kinds.push(ReportKind::Started { patch_index });
            if patch_index == 0 {
                kinds.push(ReportKind::Heartbeat { patch_index: Some(0) });
            }
            kinds.push(ReportKind::Finished {
                patch_index,
                exit_code: 0,
                outcome: PatchOutcomeKind::Installed,
                output_tail: "The update was installed successfully.".into(),
            });
        }
        kinds.push(ReportKind::Final { success: true, reboot_required: false, message: "done".into() });
        per_target.push(kinds);
    }
    let mut stream = Vec::new();
    let steps = per_target[0].len();
    for step in 0..steps {
        for (target, kinds) in targets.iter().zip(&per_target) {
            stream.push(IncomingReport {
                target_id: target.id,
                attempt: target.attempt,
                agent_instance: AgentInstance(1),
                seq: step as u64 + 1,
                sent_at: Some(chrono::Utc::now()),
                kind: kinds[step].clone(),
            });
        }
    }
    stream
}

async fn bench_backend(name: &str, store: &Store, targets: usize) {
    for batch in [1usize, 100, 1_000] {
        let running = running_targets(store, targets).await;
        let stream = report_stream(&running);
        let mut per_batch = Vec::new();
        let started = Instant::now();
        for chunk in stream.chunks(batch) {
            let t = Instant::now();
            let results = store.report_intake().apply_reports(chunk).await.expect("apply_reports");
            per_batch.push(t.elapsed().as_secs_f64() * 1_000.0);
            assert!(results.iter().all(|r| *r == ReportResult::Accepted));
        }
        let seconds = started.elapsed().as_secs_f64();
        per_batch.sort_by(f64::total_cmp);
        let p = |q: f64| per_batch[((q * per_batch.len() as f64).ceil() as usize).clamp(1, per_batch.len()) - 1];
        println!(
            "{name:<10} batch {batch:>5}: {:>8.0} reports/s  per batch p50 {:>7.2} ms  p99 {:>7.2} ms  ({} reports)",
            stream.len() as f64 / seconds,
            p(0.5),
            p(0.99),
            stream.len()
        );
    }
}

#[tokio::main]
async fn main() {
    let targets: usize = std::env::var("FLEETPATCH_BENCH_TARGETS").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000);

    let (store, database) = common::private_postgres().await;
    bench_backend("postgres", &store, targets).await;
    database.drop_with(store).await;

    let dir = std::env::temp_dir().join(format!("fp-bench-sqlite-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let sqlite = Store::connect(&StoreOptions {
        url: format!("sqlite://{}?mode=rwc", dir.join("db.sqlite").display()),
        max_connections: 1,
    })
    .await
    .expect("sqlite");
    sqlite.migrate().await.expect("migrate");
    bench_backend("sqlite", &sqlite, targets).await;
    sqlite.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}
