//! Encoding and decoding of the messages on the hot paths: the bus jobs
//! every target produces, and the report batches the collector decodes.
//!
//!     cargo bench -p fleetpatch-proto --bench messages
//!
//! A minimal harness (no dependency): each case runs in samples of a fixed
//! number of iterations after a warm-up, and the median and the slowest
//! sample's time per operation are printed.

use std::hint::black_box;
use std::time::{Duration, Instant};

use fleetpatch_proto::v1::{self, agent_report::Kind};
use fleetpatch_proto::Message;

const SAMPLES: usize = 30;

fn measure(name: &str, bytes: usize, mut op: impl FnMut()) {
    // Calibrate: enough iterations for a sample of about 10 ms.
    let mut iterations = 1u64;
    loop {
        let started = Instant::now();
        for _ in 0..iterations {
            op();
        }
        if started.elapsed() > Duration::from_millis(10) || iterations >= 1 << 24 {
            break;
        }
        iterations *= 2;
    }
    let mut per_op: Vec<f64> = (0..SAMPLES)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..iterations {
                op();
            }
            started.elapsed().as_nanos() as f64 / iterations as f64
        })
        .collect();
    per_op.sort_by(f64::total_cmp);
    let median = per_op[SAMPLES / 2];
    println!(
        "{name:<44} {median:>10.0} ns/op  (slowest sample {:>8.0} ns)  {:>8.0} MB/s  {bytes} B",
        per_op[SAMPLES - 1],
        bytes as f64 / median * 1_000.0
    );
}

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn report(seq: u64, kind: Kind) -> v1::AgentReport {
    v1::AgentReport { seq, sent_at_unix_ms: 1_795_000_000_000, agent_instance: 0x5eed, kind: Some(kind) }
}

fn finished(index: u32) -> Kind {
    Kind::Finished(v1::PatchFinished {
        patch_index: index,
        exit_code: 3010,
        outcome: v1::PatchOutcome::InstalledRebootRequired as i32,
        output_tail: "Installation of KB5034441 completed; a restart is required.\n".repeat(8),
        duration_ms: 41_234,
    })
}

fn main() {
    let job = v1::DeployJob { target_id: uuid(), rollout_id: uuid(), attempt: 1, r#try: 0 };
    let job_bytes = job.encode_to_vec();
    measure("DeployJob encode", job_bytes.len(), || {
        black_box(black_box(&job).encode_to_vec());
    });
    measure("DeployJob decode", job_bytes.len(), || {
        black_box(v1::DeployJob::decode(black_box(job_bytes.as_slice())).expect("decodes"));
    });

    let timer = v1::WatchTimer { target_id: uuid(), attempt: 1, due_at_unix_ms: 1_795_000_600_000 };
    let timer_bytes = timer.encode_to_vec();
    measure("WatchTimer encode", timer_bytes.len(), || {
        black_box(black_box(&timer).encode_to_vec());
    });
    measure("WatchTimer decode", timer_bytes.len(), || {
        black_box(v1::WatchTimer::decode(black_box(timer_bytes.as_slice())).expect("decodes"));
    });

    // What one agent sends per request (one report), and a spool replay.
    let single = v1::ReportBatch { reports: vec![report(1, Kind::Heartbeat(v1::Heartbeat { patch_index: Some(0) }))] };
    let single_bytes = single.encode_to_vec();
    measure("ReportBatch (1 heartbeat) encode", single_bytes.len(), || {
        black_box(black_box(&single).encode_to_vec());
    });
    measure("ReportBatch (1 heartbeat) decode", single_bytes.len(), || {
        black_box(v1::ReportBatch::decode(black_box(single_bytes.as_slice())).expect("decodes"));
    });
    let finished_one = v1::ReportBatch { reports: vec![report(2, finished(0))] };
    let finished_bytes = finished_one.encode_to_vec();
    measure("ReportBatch (1 finished, 0.5 KiB tail) decode", finished_bytes.len(), || {
        black_box(v1::ReportBatch::decode(black_box(finished_bytes.as_slice())).expect("decodes"));
    });
    let replay = v1::ReportBatch {
        reports: (0..100)
            .map(|i| {
                if i % 2 == 0 {
                    report(i + 1, Kind::Started(v1::PatchStarted { patch_index: i as u32 / 2 }))
                } else {
                    report(i + 1, finished(i as u32 / 2))
                }
            })
            .collect(),
    };
    let replay_bytes = replay.encode_to_vec();
    measure("ReportBatch (100-report spool replay) encode", replay_bytes.len(), || {
        black_box(black_box(&replay).encode_to_vec());
    });
    measure("ReportBatch (100-report spool replay) decode", replay_bytes.len(), || {
        black_box(v1::ReportBatch::decode(black_box(replay_bytes.as_slice())).expect("decodes"));
    });
}
