//! `fleetpatch demo` runs on a machine with neither PostgreSQL nor RabbitMQ.

use std::process::Command;

#[test]
fn the_demo_runs_without_postgres_or_rabbitmq() {
    let output = Command::new(env!("CARGO_BIN_EXE_fleetpatch"))
        .args(["demo", "--targets", "200"])
        // Both configured services point nowhere: the demo must not need them.
        .env("FLEETPATCH__DATABASE__URL", "postgres://127.0.0.1:1/nowhere")
        .env("FLEETPATCH__AMQP__URL", "amqp://127.0.0.1:1/%2f")
        .output()
        .expect("run fleetpatch demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "exit {:?}\n{stdout}\n{stderr}", output.status);
    assert!(stdout.contains("rollout completed"), "{stdout}");
    let succeeded = stdout.lines().find(|l| l.starts_with("succeeded")).expect("a succeeded row");
    assert_eq!(succeeded.split_whitespace().nth(1), Some("200"), "{stdout}");
    assert!(stdout.contains("time per target: p50"), "{stdout}");
}
