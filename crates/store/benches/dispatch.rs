//! Dispatch as a large rollout progresses (issue 18, part 7): one rollout of
//! N targets (default 1,000,000) with concurrency C (default 10,000) on
//! PostgreSQL (a private database, created and dropped), dispatched C at a
//! time. After each dispatch its targets end at once
//! (`Store::bench_finish_queued`: the bulk move `queued → failed`, with
//! history) and the outbox is emptied (the relay's work, not measured), so
//! every dispatch finds a free window of C and the pending targets behind
//! those already done. Prints the time per dispatch over the first and the
//! last 10 % of the targets, and their ratio: dispatch must not slow down as
//! the rollout progresses.
//!
//!     cargo bench -p fleetpatch-store --bench dispatch
//!
//! FLEETPATCH_BENCH_TARGETS and FLEETPATCH_BENCH_CONCURRENCY set N and C.

use std::time::Instant;

use fleetpatch_store::*;

mod common;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Mean milliseconds per dispatch over the rounds whose targets fall in
/// `[from, to)` of the rollout (by the count dispatched before them).
fn mean_ms(rounds: &[(u32, f64)], from: usize, to: usize) -> (f64, usize) {
    let mut done = 0usize;
    let mut picked = Vec::new();
    for (dispatched, seconds) in rounds {
        if done >= from && done < to {
            picked.push(*seconds);
        }
        done += *dispatched as usize;
    }
    (picked.iter().sum::<f64>() * 1_000.0 / picked.len().max(1) as f64, picked.len())
}

#[tokio::main]
async fn main() {
    let targets = env_or("FLEETPATCH_BENCH_TARGETS", 1_000_000);
    let concurrency = env_or("FLEETPATCH_BENCH_CONCURRENCY", 10_000);
    // Every this many dispatches, VACUUM (ANALYZE) targets (0: never), as
    // autovacuum does during a rollout that takes hours, not a minute.
    let vacuum_every = env_or("FLEETPATCH_BENCH_VACUUM_EVERY", 0);
    let (store, database) = common::private_postgres().await;

    let mut rollout = NewRollout::synthetic("dispatch bench", targets, 1, 600);
    rollout.concurrency = concurrency as u32;
    let started = Instant::now();
    let id = store.create_rollout(rollout).await.expect("create");
    store.bench_discard_outbox().await.expect("outbox");
    println!("created {targets} targets in {:.1} s", started.elapsed().as_secs_f64());

    let mut rounds: Vec<(u32, f64)> = Vec::new();
    let started = Instant::now();
    loop {
        let t = Instant::now();
        let outcome = store.dispatch(id).await.expect("dispatch");
        let seconds = t.elapsed().as_secs_f64();
        if outcome.dispatched == 0 {
            break;
        }
        rounds.push((outcome.dispatched, seconds));
        store.bench_finish_queued(id).await.expect("finish");
        store.bench_discard_outbox().await.expect("outbox");
        if vacuum_every > 0 && rounds.len().is_multiple_of(vacuum_every) {
            store.bench_vacuum_targets().await.expect("vacuum");
        }
    }
    let dispatched: usize = rounds.iter().map(|r| r.0 as usize).sum();
    assert_eq!(dispatched, targets, "every target was dispatched once");
    let (first, first_rounds) = mean_ms(&rounds, 0, targets / 10);
    let (last, last_rounds) = mean_ms(&rounds, targets - targets / 10, targets);
    println!(
        "dispatched {dispatched} targets in {} dispatches of up to {concurrency} ({:.1} s in all, ending them included)",
        rounds.len(),
        started.elapsed().as_secs_f64()
    );
    let deciles: Vec<String> =
        (0..10).map(|d| format!("{:.0}", mean_ms(&rounds, targets * d / 10, targets * (d + 1) / 10).0)).collect();
    println!("per dispatch by tenth of the targets (ms): {}", deciles.join(" "));
    println!(
        "per dispatch: first 10 % {first:.1} ms ({first_rounds} dispatches), last 10 % {last:.1} ms ({last_rounds}); \
         last / first = {:.2}",
        last / first
    );
    database.drop_with(store).await;
}
