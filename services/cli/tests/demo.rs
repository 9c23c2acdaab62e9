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

#[test]
fn the_demo_names_the_failed_patch_and_its_exit_code() {
    let output = Command::new(env!("CARGO_BIN_EXE_fleetpatch"))
        .args(["demo", "--targets", "60", "--fail-rate", "0.3", "--seed", "7"])
        .output()
        .expect("run fleetpatch demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "exit {:?}\n{stdout}\n{stderr}", output.status);
    let table = stdout.split("\nfailures (").nth(1).expect("a failures table");
    assert!(table.lines().nth(1).is_some_and(|header| header.contains("failed patch")), "{table}");
    assert!(table.contains("KB5000000 (exit "), "the first patch fails with its exit code: {table}");
    assert!(!stderr.contains("WARN") && !stdout.contains("WARN"), "no warnings in the demo: {stderr}");
}

#[test]
fn the_demo_shows_a_maintenance_window_and_its_deadline() {
    let output = Command::new(env!("CARGO_BIN_EXE_fleetpatch"))
        .args(["demo", "--targets", "40", "--window"])
        .output()
        .expect("run fleetpatch demo --window");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "exit {:?}\n{stdout}\n{stderr}", output.status);
    assert!(stdout.contains("waiting for a maintenance window: the next one opens at"), "{stdout}");
    assert!(stdout.contains("rollout completed"), "{stdout}");
    // Every target either went in its window or missed it at the deadline.
    let count = |state: &str| {
        stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(state))
            .and_then(|l| l.split_whitespace().nth(1))
            .map_or(0, |n| n.parse::<usize>().unwrap())
    };
    assert_eq!(count("succeeded") + count("missed_window"), 40, "{stdout}");
    assert!(count("succeeded") >= 2, "the canary runs at once: {stdout}");
}

#[test]
fn the_demo_with_relays_pulls_each_installer_once_per_site() {
    let output = Command::new(env!("CARGO_BIN_EXE_fleetpatch"))
        .args(["demo", "--targets", "40", "--patches", "2", "--relays"])
        .output()
        .expect("run fleetpatch demo --relays");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "exit {:?}\n{stdout}\n{stderr}", output.status);
    let succeeded = stdout.lines().find(|l| l.starts_with("succeeded")).expect("a succeeded row");
    assert_eq!(succeeded.split_whitespace().nth(1), Some("40"), "every simulated agent got real bytes: {stdout}");
    let relays = stdout.split("\nrelays:\n").nth(1).expect("a relay table");
    // Two sites of 20 targets, 2 installers of 256 KiB: each relay fetched
    // each installer once and served it to each of its targets.
    for site in ["paris", "lyon"] {
        let row = relays.lines().find(|l| l.starts_with(site)).unwrap_or_else(|| panic!("a {site} row: {relays}"));
        assert!(row.contains(" 40 ") && row.contains("0.5 MiB (2 fetches)") && row.ends_with("10.0 MiB"), "{row}");
    }
    assert!(relays.contains("left the scheduler: 1.0 MiB (pushing to every target: 20.0 MiB)"), "{relays}");
    assert!(!stderr.contains("WARN") && !stdout.contains("WARN"), "no warnings in the demo: {stderr}");
}
