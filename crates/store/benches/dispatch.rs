//! Dispatch as a large rollout progresses (issue 18, part 7): one rollout of
//! N targets (default 1,000,000) with concurrency C (default 10,000) on
//! PostgreSQL (a private database, created and dropped), dispatched C at a
//! time. After each dispatch its targets end at once
//! (`Store::bench_finish_queued`: the bulk move `queued → failed`, with
//! history) and the outbox is emptied (the relay's work, not measured), so
//! every dispatch finds a free window of C and the pending targets behind
//! those already done.
//!
//! After each dispatch the same run times its floor
//! (`ceiling::DispatchFloor`): the database work of one dispatch of C
//! targets on scratch tables that start empty each time, whose cost does not
//! depend on the rollout's progress. This machine's speed varies 2–5× from
//! hour to hour, and a minute's drift moved the plain last/first ratio
//! between ×0.78 and ×1.36 over six runs; the ratio of each dispatch to the
//! floor beside it takes the machine's drift out and leaves what the
//! rollout's progress costs.
//!
//! Prints, by tenth of the targets, the median time per dispatch, the median
//! floor and the median of their ratios, then the last tenth against the
//! first for each, and the trend of the least-squares line through every
//! dispatch's ratio to its floor: dispatch must not slow down as the
//! rollout progresses.
//!
//!     cargo bench -p fleetpatch-store --bench dispatch
//!
//! FLEETPATCH_BENCH_TARGETS and FLEETPATCH_BENCH_CONCURRENCY set N and C;
//! FLEETPATCH_BENCH_VACUUM_EVERY=K runs `VACUUM (ANALYZE) targets` every K
//! dispatches (autovacuum is off on this machine's PostgreSQL).

use std::time::Instant;

use fleetpatch_store::ceiling::DispatchFloor;
use fleetpatch_store::*;

mod common;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One dispatch: how many targets it queued, its seconds, and the seconds of
/// the floor timed right after it.
struct Round {
    dispatched: u32,
    seconds: f64,
    floor: f64,
}

/// The rounds whose targets fall in `[from, to)` of the rollout (by the
/// count dispatched before them).
fn rounds_in(rounds: &[Round], from: usize, to: usize) -> Vec<&Round> {
    let mut done = 0usize;
    let mut picked = Vec::new();
    for round in rounds {
        if done >= from && done < to {
            picked.push(round);
        }
        done += round.dispatched as usize;
    }
    picked
}

/// The least-squares line through each round's dispatch/floor ratio
/// against how far the rollout was when it ran (0 to 1): its value at the
/// end over its value at the start. Every round counts, not only the first
/// and the last tenth; 1.00 is no trend.
fn fitted_trend(rounds: &[Round]) -> f64 {
    let total: usize = rounds.iter().map(|r| r.dispatched as usize).sum();
    let mut done = 0usize;
    let points: Vec<(f64, f64)> = rounds
        .iter()
        .map(|r| {
            let x = done as f64 / total.max(1) as f64;
            done += r.dispatched as usize;
            (x, r.seconds / r.floor)
        })
        .collect();
    let n = points.len() as f64;
    let (mean_x, mean_y) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let covariance: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    let variance: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let slope = covariance / variance;
    let start = mean_y - slope * mean_x;
    (start + slope) / start
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Medians over the rounds of one tenth of the targets.
#[derive(Clone, Copy)]
struct Tenth {
    dispatch_ms: f64,
    floor_ms: f64,
    /// The median of each round's dispatch / floor.
    ratio: f64,
    rounds: usize,
}

/// The [`Tenth`] of the rounds in `[from, to)`.
fn tenth(rounds: &[Round], from: usize, to: usize) -> Tenth {
    let picked = rounds_in(rounds, from, to);
    Tenth {
        dispatch_ms: median(picked.iter().map(|r| r.seconds * 1_000.0).collect()),
        floor_ms: median(picked.iter().map(|r| r.floor * 1_000.0).collect()),
        ratio: median(picked.iter().map(|r| r.seconds / r.floor).collect()),
        rounds: picked.len(),
    }
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

    let floor = DispatchFloor::create(&store, concurrency).await.expect("floor tables");
    let mut rounds: Vec<Round> = Vec::new();
    let started = Instant::now();
    loop {
        let t = Instant::now();
        let outcome = store.dispatch(id).await.expect("dispatch");
        let seconds = t.elapsed().as_secs_f64();
        if outcome.dispatched == 0 {
            break;
        }
        store.bench_finish_queued(id).await.expect("finish");
        store.bench_discard_outbox().await.expect("outbox");
        let floor_seconds = floor.run(&store).await.expect("floor").as_secs_f64();
        rounds.push(Round { dispatched: outcome.dispatched, seconds, floor: floor_seconds });
        if vacuum_every > 0 && rounds.len().is_multiple_of(vacuum_every) {
            store.bench_vacuum_targets().await.expect("vacuum");
        }
    }
    floor.drop_tables(&store).await.expect("drop the floor tables");
    let dispatched: usize = rounds.iter().map(|r| r.dispatched as usize).sum();
    assert_eq!(dispatched, targets, "every target was dispatched once");
    println!(
        "dispatched {dispatched} targets in {} dispatches of up to {concurrency} ({:.1} s in all, ending them and \
         the floors included)",
        rounds.len(),
        started.elapsed().as_secs_f64()
    );
    let tenths: Vec<_> = (0..10).map(|d| tenth(&rounds, targets * d / 10, targets * (d + 1) / 10)).collect();
    let row = |pick: fn(&Tenth) -> f64, digits: usize| {
        tenths.iter().map(|t| format!("{:.*}", digits, pick(t))).collect::<Vec<_>>().join(" ")
    };
    println!("by tenth of the targets, medians:");
    println!("  per dispatch (ms)        {}", row(|t| t.dispatch_ms, 0));
    println!("  floor beside it (ms)     {}", row(|t| t.floor_ms, 0));
    println!("  dispatch / floor         {}", row(|t| t.ratio, 2));
    let (first, last) = (tenths[0], tenths[9]);
    println!(
        "last 10 % / first 10 % ({} and {} dispatches): dispatch x{:.2}, floor x{:.2}, dispatch / floor x{:.2} \
         (the rollout's own slowdown; 1.00 = none)",
        last.rounds,
        first.rounds,
        last.dispatch_ms / first.dispatch_ms,
        last.floor_ms / first.floor_ms,
        last.ratio / first.ratio
    );
    println!(
        "dispatch / floor, least-squares line over all {} dispatches: x{:.2} from the first to the last",
        rounds.len(),
        fitted_trend(&rounds)
    );
    database.drop_with(store).await;
}
