//! Property: whatever the order of operations, every move a target makes is
//! an edge of the state machine, its history is one unbroken chain from
//! `pending` to its current state, and no operation is ever refused as an
//! illegal transition (the guards stop every move the machine lacks before
//! it is tried).
//!
//! Random sequences of the store's operations — dispatch, claims and
//! takeovers, probes, worker steps, failures and requeues, agents' final
//! results, timeouts, offline spells and their reachability checks,
//! pause/resume/abort, retries — on small rollouts,
//! applied to arbitrary targets (most operations find them in the wrong
//! state, as duplicated or late messages do). Seeded: a failure names the
//! seed and the operations that led to it.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

/// Sequences per run and operations per sequence.
const SEQUENCES: u64 = 12;
const OPERATIONS: usize = 100;

#[derive(Debug, Clone, Copy)]
enum Op {
    Dispatch,
    Claim {
        target: usize,
        takeover: bool,
    },
    Probe {
        target: usize,
        all_installed: bool,
    },
    Installing {
        target: usize,
    },
    Running {
        target: usize,
    },
    Fail {
        target: usize,
    },
    Requeue {
        target: usize,
    },
    Offline {
        target: usize,
    },
    Check {
        target: usize,
        answered: bool,
    },
    Final {
        target: usize,
        success: bool,
        reboot: bool,
    },
    /// A check of a rebooting machine: 0 down, 1 the same boot, 2 back with
    /// every patch, 3 back with one missing.
    RebootCheck {
        target: usize,
        found: u8,
    },
    Timeout,
    Pause,
    Resume,
    Abort,
    RetryFailed,
}

fn random_op(rng: &mut StdRng, targets: usize) -> Op {
    let target = rng.random_range(0..targets);
    match rng.random_range(0..100) {
        0..=9 => Op::Dispatch,
        10..=21 => Op::Claim { target, takeover: rng.random_bool(0.3) },
        22..=33 => Op::Probe { target, all_installed: rng.random_bool(0.15) },
        34..=43 => Op::Installing { target },
        44..=53 => Op::Running { target },
        54..=56 => Op::Fail { target },
        57..=59 => Op::Requeue { target },
        60..=62 => Op::Offline { target },
        63..=64 => Op::Check { target, answered: rng.random_bool(0.4) },
        65..=66 => Op::RebootCheck { target, found: rng.random_range(0..4) },
        67..=78 => Op::Final { target, success: rng.random_bool(0.7), reboot: rng.random_bool(0.3) },
        79..=84 => Op::Timeout,
        85..=87 => Op::Pause,
        88..=92 => Op::Resume,
        // Rare: an aborted rollout ends its sequence's interesting part.
        93 if rng.random_bool(0.3) => Op::Abort,
        _ => Op::RetryFailed,
    }
}

/// The operation that moves a target in `state` on, as the pipeline would.
fn next_step(rng: &mut StdRng, target: usize, state: TargetState) -> Op {
    match state {
        TargetState::Pending => Op::Dispatch,
        TargetState::Queued => Op::Claim { target, takeover: false },
        TargetState::Probing | TargetState::Staging if rng.random_bool(0.25) => Op::Offline { target },
        TargetState::Probing => Op::Probe { target, all_installed: rng.random_bool(0.1) },
        TargetState::Staging => Op::Installing { target },
        TargetState::Installing => Op::Running { target },
        TargetState::Running if rng.random_bool(0.3) => Op::Timeout,
        TargetState::Running => Op::Final { target, success: rng.random_bool(0.7), reboot: rng.random_bool(0.3) },
        TargetState::Offline => Op::Check { target, answered: rng.random_bool(0.4) },
        TargetState::Rebooting => Op::RebootCheck { target, found: rng.random_range(0..4) },
        TargetState::Failed | TargetState::TimedOut => Op::RetryFailed,
        TargetState::Succeeded | TargetState::Cancelled | TargetState::MissedWindow => Op::Resume,
    }
}

/// Errors an operation may meet in a random order (the rollout is in the
/// wrong state for it); an illegal transition is never one of them.
fn expected(result: Result<impl Sized>, op: Op) {
    match result {
        Ok(_) | Err(Error::Conflict(_)) => {}
        Err(error) => panic!("{op:?} failed: {error}"),
    }
}

pub async fn every_recorded_move_is_an_edge_of_the_state_machine(db: &dyn TestDatabase) {
    let manual = ManualClock::starting_now();
    let store = &db.store().clone().with_clock(manual.clock());
    let policy = TimeoutPolicy { verify_delay: Duration::from_secs(1) };
    let mut moves: HashMap<(String, String), u32> = HashMap::new();
    for seed in 0..SEQUENCES {
        let mut rng = StdRng::seed_from_u64(seed);
        let waves = vec![WaveSpec::new("canary", Some(2), 50.0), WaveSpec::new("rest", None, 100.0)];
        let count = rng.random_range(3..7);
        let concurrency = rng.random_range(1..4);
        let spec = Spec {
            timeout_seconds: 60,
            waves,
            offline_for: Some(120),
            reboot_timeout_seconds: 120,
            ..Spec::new(count, 2, concurrency)
        };
        let id = create(store, spec).await;
        let targets = all_targets(store, id).await;
        let mut contexts: HashMap<Uuid, DeployContext> = HashMap::new();
        let mut seqs: HashMap<Uuid, u64> = HashMap::new();
        let mut log = Vec::new();
        for _ in 0..OPERATIONS {
            // Half the time a target's natural next step, so sequences get
            // deep (running, timed out, offline and back); else anything.
            let op = if rng.random_bool(0.5) {
                let target = rng.random_range(0..targets.len());
                let state = store.target(targets[target].id).await.expect("target").state;
                next_step(&mut rng, target, state)
            } else {
                random_op(&mut rng, targets.len())
            };
            log.push(op);
            let outcome =
                std::panic::AssertUnwindSafe(apply(store, id, &targets, &mut contexts, &mut seqs, op, &policy))
                    .catch_unwind()
                    .await;
            if let Err(panic) = outcome {
                eprintln!("seed {seed}: the operations were {log:?}");
                std::panic::resume_unwind(panic);
            }
            manual.advance(Duration::from_secs(rng.random_range(0..20)));
        }
        for target in &targets {
            let history = store.transitions(target.id).await.expect("transitions");
            let current = store.target(target.id).await.expect("target").state;
            let mut at = TargetState::Pending;
            for step in &history {
                let (from, to): (TargetState, TargetState) =
                    (step.from.parse().expect("from"), step.to.parse().expect("to"));
                assert!(from.can_move_to(to), "seed {seed}: {from} -> {to} is not an edge; operations: {log:?}");
                assert_eq!(from, at, "seed {seed}: the history jumps from {at} to a move out of {from}: {log:?}");
                at = to;
            }
            assert_eq!(at, current, "seed {seed}: the history ends in {at}, the target is {current}: {log:?}");
            for step in &history {
                *moves.entry((step.from.clone(), step.to.clone())).or_default() += 1;
            }
        }
    }
    // The sequences reach the rarer edges too, or this property says little about them.
    for (from, to) in [
        ("probing", "offline"),
        ("offline", "pending"),
        ("offline", "failed"),
        ("running", "timed_out"),
        ("running", "rebooting"),
        ("rebooting", "succeeded"),
        ("rebooting", "failed"),
    ] {
        let key = (from.to_owned(), to.to_owned());
        assert!(moves.contains_key(&key), "no sequence moved {from} -> {to}: {moves:?}");
    }
}

async fn apply(
    store: &Store,
    rollout: Uuid,
    targets: &[Target],
    contexts: &mut HashMap<Uuid, DeployContext>,
    seqs: &mut HashMap<Uuid, u64>,
    op: Op,
    policy: &TimeoutPolicy,
) {
    let current = |index: usize| {
        let id = targets[index].id;
        async move { store.target(id).await.expect("target") }
    };
    match op {
        Op::Dispatch => expected(store.dispatch(rollout).await, op),
        Op::Claim { target, takeover } => {
            let now = current(target).await;
            if let Claim::Claimed(context) =
                store.claim_deploy(now.id, now.attempt, takeover, "nonce").await.expect("claim")
            {
                contexts.insert(now.id, *context);
            }
        }
        Op::Probe { target, all_installed } => {
            let Some(context) = contexts.get(&targets[target].id) else { return };
            let installed: Vec<u32> =
                if all_installed { context.patches.iter().map(|p| p.index).collect() } else { vec![] };
            let probe = serde_json::json!({});
            store.record_probe(context, "Windows", "x86_64", probe, &installed, "hash").await.expect("probe");
        }
        Op::Installing { target } => {
            // The snapshot the worker holds: maybe of an older attempt.
            let Some(context) = contexts.get(&targets[target].id) else { return };
            store.mark_installing(&context.target, "push").await.expect("installing");
        }
        Op::Running { target } => {
            let Some(context) = contexts.get(&targets[target].id) else { return };
            store.mark_running(&context.target).await.expect("running");
        }
        Op::Fail { target } => {
            let now = current(target).await;
            store.fail_target(&now, "a permanent error", true).await.expect("fail");
        }
        Op::Requeue { target } => {
            let now = current(target).await;
            store.requeue_for_retry(&now, "a transient error", 1, Duration::from_secs(5)).await.expect("requeue");
        }
        Op::Offline { target } => {
            let now = current(target).await;
            store.go_offline(&now, "unreachable", Duration::from_secs(30)).await.expect("offline");
        }
        Op::Check { target, answered } => {
            let now = current(target).await;
            let found = if answered { Reachability::Answered } else { Reachability::Silent("refused".into()) };
            let check = now.tries + 1;
            store
                .record_reachability(now.id, now.attempt, check, &found, Duration::from_secs(30))
                .await
                .expect("check");
        }
        Op::RebootCheck { target, found } => {
            let now = current(target).await;
            let found = match found {
                0 => RebootCheck::Down("refused".into()),
                1 => RebootCheck::SameBoot,
                2 => RebootCheck::Back { installed: vec![0, 1], missing: vec![], unknown: vec![] },
                _ => RebootCheck::Back { installed: vec![0], missing: vec![1], unknown: vec![] },
            };
            let check = now.tries + 1;
            store
                .record_reboot_check(now.id, now.attempt, check, &found, Duration::from_secs(30))
                .await
                .expect("reboot check");
        }
        Op::Final { target, success, reboot } => {
            let now = current(target).await;
            let seq = seqs.entry(now.id).or_default();
            *seq += 1;
            let message = if success { "all installed" } else { "a patch failed" };
            let kind = ReportKind::Final { success, reboot_required: reboot, message: message.into() };
            store.report_intake().apply_reports(&[report(&now, *seq, kind)]).await.expect("final result");
        }
        Op::Timeout => {
            let running = in_state(store, rollout, TargetState::Running).await;
            let timers: Vec<(Uuid, u32)> = running.iter().map(|t| (t.id, t.attempt)).collect();
            store.check_timeouts(&timers, *policy).await.expect("timeouts");
        }
        Op::Pause => expected(store.pause_rollout(rollout, "a look").await, op),
        Op::Resume => expected(store.resume_rollout(rollout).await, op),
        Op::Abort => expected(store.abort_rollout(rollout).await, op),
        Op::RetryFailed => expected(store.retry_failed(rollout).await, op),
    }
}
