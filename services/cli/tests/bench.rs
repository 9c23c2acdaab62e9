//! `fleetpatch bench`, small, on the test PostgreSQL and RabbitMQ: every
//! phase runs and reports its figures in JSON, and the bench cleans up its
//! database afterwards. (The figures themselves are measured by hand on the
//! full sizes; see the README's performance section.)

use std::process::Command;

use fleetpatch_tests::{admin_database_url, amqp_url};

#[test]
fn a_small_bench_runs_every_phase_and_removes_its_database() {
    let output = Command::new(env!("CARGO_BIN_EXE_fleetpatch"))
        .args(["bench", "--targets", "40", "--patches", "2", "--concurrency", "20", "--worker-concurrency", "10"])
        .args(["--collector-targets", "30", "--collector-clients", "8", "--collector-rate", "300"])
        .args(["--watchdogs", "20", "--watchdog-timeout", "2", "--create-targets", "500"])
        .args(["--ceiling-messages", "500", "--output", "json"])
        .env_remove("FLEETPATCH_CONFIG")
        .env("FLEETPATCH__DATABASE__URL", admin_database_url())
        .env("FLEETPATCH__AMQP__URL", amqp_url())
        .output()
        .expect("run fleetpatch bench");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "fleetpatch bench failed:\n{stderr}");
    let figures: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("--output json is JSON ({e}):\n{}", String::from_utf8_lossy(&output.stdout)));

    assert!(figures["broker_ceiling"].is_object() && figures["database_ceiling"].is_object(), "{figures:#}");
    let rollout = &figures["rollout"];
    assert_eq!(rollout["by_state"]["succeeded"], 40, "{rollout:#}");
    assert!(rollout["reports_accepted"].as_f64().unwrap() >= 40.0 * 2.0, "{rollout:#}");
    assert!(rollout["seconds"].as_f64().unwrap() > 0.0);
    let collector = &figures["collector"];
    for run in ["batched", "one_report_per_transaction"] {
        assert_eq!(collector[run]["all_targets_succeeded"], true, "{collector:#}");
        assert!(collector[run]["reports_per_second"].as_f64().unwrap() > 0.0);
    }
    assert!(collector["vs_one_transaction_per_report"].as_f64().unwrap() > 0.0);
    // The HTTP ceiling: every request of the collector phase's 30 agents
    // (6 each with 2 patches: started and finished twice, a heartbeat, the final).
    let ceiling = &figures["http_ceiling"];
    assert_eq!(ceiling["requests"], 30 * 6, "{ceiling:#}");
    assert!(ceiling["requests_per_second"].as_f64().unwrap() > 0.0, "{ceiling:#}");
    assert!(collector["fraction_of_http_ceiling"].as_f64().unwrap() > 0.0, "{collector:#}");
    // Verifying a signed request, on one thread: positive and well under a millisecond.
    let mac = figures["mac_verify_micros"].as_f64().expect("mac_verify_micros");
    assert!(mac > 0.0 && mac < 1_000.0, "{mac}");
    // Where the CPU went, per report, for each run. A group's figure is in
    // 10 ms ticks, too coarse for so small a run to be asserted on (the
    // arithmetic has its unit tests); the machine as a whole was busy during
    // every run, and its figures agree with each other.
    for cpu in [&collector["batched"]["cpu"], &collector["paced"]["cpu"], &ceiling["cpu"]] {
        let cores = cpu["cores"].as_u64().unwrap();
        assert!(cores >= 1, "{cpu:#}");
        let busy = cpu["machine_busy"].as_f64().unwrap();
        assert!(busy > 0.0 && busy <= 1.05, "a share of all cores, some of it busy: {cpu:#}");
        let micros = cpu["machine_micros_per_report"].as_f64().unwrap();
        assert!(micros > 0.0, "{cpu:#}");
        // The machine's bound is its cores over the CPU time per report.
        let bound = cpu["machine_bound_per_second"].as_f64().unwrap();
        let expected = cores as f64 * 1e6 / micros;
        assert!((bound - expected).abs() <= expected * 1e-9, "bound {bound} vs {expected}: {cpu:#}");
    }
    // The local PostgreSQL (the test database is on this machine) is found
    // by its command name, the collector and scheduler by their pids.
    let batched_cpu = &collector["batched"]["cpu"]["micros_per_report"];
    for group in ["collector", "scheduler", "bench agents", "postgresql", "other"] {
        assert!(batched_cpu[group].is_number(), "{group} is missing: {batched_cpu:#}");
    }
    // The bare server's threads are counted apart from the senders', and it
    // runs on as many threads as the collector (collector.worker_threads: 1).
    for group in ["bench agents", "bare server"] {
        assert!(ceiling["cpu"]["micros_per_report"][group].is_number(), "{group} is missing: {ceiling:#}");
    }
    assert_eq!(ceiling["server_threads"], 1, "{ceiling:#}");
    // The paced HTTP floor: the paced run's 30 agents and 180 reports against
    // the bare server, every one acknowledged, its CPU counted apart.
    let floor = &figures["http_floor_paced"];
    assert_eq!(floor["reports"], 30 * 6, "{floor:#}");
    let requests = floor["requests"].as_u64().unwrap();
    assert!((30..=180).contains(&requests), "at least one request per agent, at most one per report: {floor:#}");
    assert!(floor["cpu"]["micros_per_report"]["bare server"].is_number(), "{floor:#}");
    // The paced run: 30 more agents, 6 reports each (2 patches), 300 reports/s offered.
    let paced = &collector["paced"];
    assert_eq!((paced["agents"].as_u64(), paced["reports"].as_u64()), (Some(30), Some(180)), "{paced:#}");
    assert_eq!(paced["all_targets_succeeded"], true, "{paced:#}");
    assert!(paced["requests"].as_u64().unwrap() >= 30, "{paced:#}");
    assert!(paced["reports_per_second"].as_f64().unwrap() > 0.0, "{paced:#}");
    assert!(paced["latency_p99_ms"].as_f64().unwrap() >= paced["latency_p50_ms"].as_f64().unwrap(), "{paced:#}");
    let watchdogs = &figures["watchdogs"];
    assert_eq!(
        (watchdogs["watchdogs"].as_u64(), watchdogs["timed_out"].as_u64()),
        (Some(20), Some(20)),
        "{watchdogs:#}"
    );
    // No timer fired before its deadline, and the quantiles are in order.
    let lateness = ["lateness_min_ms", "lateness_p50_ms", "lateness_p99_ms", "lateness_max_ms"]
        .map(|figure| watchdogs[figure].as_f64().unwrap_or_else(|| panic!("{figure}: {watchdogs:#}")));
    assert!(lateness[0] >= 0.0, "a target timed out before its deadline: {watchdogs:#}");
    assert!(lateness.windows(2).all(|pair| pair[0] <= pair[1]), "{watchdogs:#}");
    assert_eq!(figures["create"]["targets"], 500);
    let services = figures["services"].as_object().expect("per-service figures");
    for service in ["scheduler", "collector", "worker-0", "worker-1"] {
        assert!(services[service]["peak_rss_mib"].as_f64().unwrap() > 0.0, "{service}: {services:?}");
    }

    // The bench's own database is gone.
    let database = figures["database"].as_str().expect("the bench names its database");
    assert!(database.starts_with("fleetpatch_bench_"), "{database}");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let exists = runtime
        .block_on(fleetpatch_store::sibling_database_exists(
            &fleetpatch_store::StoreOptions { url: admin_database_url(), max_connections: 1 },
            database,
        ))
        .expect("query pg_database");
    assert!(!exists, "the bench database {database} was left behind");
}
