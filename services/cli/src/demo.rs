//! `fleetpatch demo`: the whole pipeline in one process on the embedded
//! default — SQLite through sea-orm (the same migrations) and the in-process
//! bus (the same contract as RabbitMQ) — against a simulated fleet. It needs
//! nothing but this binary: no PostgreSQL, no RabbitMQ.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use fleetpatch_bus::memory::MemoryBackend;
use fleetpatch_bus::Bus;
use fleetpatch_proto::state::{RolloutState, TargetState};
use fleetpatch_runtime::{Health, Shutdown};
use fleetpatch_store::{Store, StoreOptions};
use fleetpatch_transport::sim::{SimFleet, SimOptions, SimTransport};
use fleetpatch_transport::Transports;

use crate::output::{self, Terminal};

/// Options of `fleetpatch demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Simulated targets.
    #[arg(long, default_value_t = 500)]
    pub targets: usize,
    /// Patches per target.
    #[arg(long, default_value_t = 3)]
    pub patches: usize,
    /// Share of hosts whose first patch fails (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Share of hosts whose agent falls silent (they time out).
    #[arg(long, default_value_t = 0.0)]
    pub hang_rate: f64,
    /// Seed of the simulated fleet.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Targets in flight at once.
    #[arg(long, default_value_t = 50)]
    pub concurrency: u32,
    /// Seconds without a report before a target times out.
    #[arg(long, default_value_t = 5)]
    pub timeout_seconds: u32,
    /// Show a maintenance window: the fleet wave may only go in a one-minute
    /// window that opens at the next full minute (UTC; the one after when
    /// that is less than 20 s away), and the rollout's
    /// deadline is that window's end; what has not started by then ends as
    /// missed_window.
    #[arg(long)]
    pub window: bool,
}

/// The demo's schedule for `--window`: the canary any time; targets
/// labelled `window=night` in a one-minute window from the next full
/// minute (at least 20 s away), whose end is the deadline.
fn demo_window(now: chrono::DateTime<chrono::Utc>) -> (serde_json::Value, chrono::DateTime<chrono::Utc>) {
    use chrono::{Datelike, DurationRound, Timelike};
    let mut opens = now.duration_trunc(chrono::Duration::minutes(1)).unwrap_or(now) + chrono::Duration::minutes(1);
    // Time for the canary to finish first, so the wait shows.
    if opens - now < chrono::Duration::seconds(20) {
        opens += chrono::Duration::minutes(1);
    }
    let day = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"][opens.weekday().num_days_from_monday() as usize];
    let windows = serde_json::json!([
        {"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "start": "00:00", "duration_minutes": 10080,
         "time_zone": "UTC"},
        {"days": [day], "start": format!("{:02}:{:02}", opens.hour(), opens.minute()), "duration_minutes": 1,
         "time_zone": "UTC", "labels": {"window": "night"}},
    ]);
    (windows, opens + chrono::Duration::minutes(1))
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let sim = SimOptions {
        seed: args.seed,
        fail_rate: args.fail_rate,
        hang_rate: args.hang_rate,
        patch_ms: 30,
        ..SimOptions::default()
    };
    sim.validate().map_err(|e| anyhow::anyhow!("invalid demo option: {e}"))?;
    anyhow::ensure!(args.targets > 0, "--targets must be at least 1");
    anyhow::ensure!(args.patches > 0, "--patches must be at least 1");
    let dir = std::env::temp_dir().join(format!("fleetpatch-demo-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let url = format!("sqlite://{}?mode=rwc", dir.join("fleetpatch.db").display());
    // SQLite takes one writer at a time: one connection serializes without SQLITE_BUSY.
    let store = Store::connect(&StoreOptions { url, max_connections: 1 }).await?;
    store.migrate().await?;
    // The demo's own admin key: in a file only its owner reads, never in the output.
    let key_file = dir.join("admin.key");
    crate::apikey::ensure_admin_key_file(&store, &key_file, "demo-admin").await?;
    let admin_key = std::fs::read_to_string(&key_file).with_context(|| format!("reading {}", key_file.display()))?;
    let bus = Bus::new(Arc::new(MemoryBackend::new(&fleetpatch_proto::routing::WORK_QUEUES, 10)));
    let shutdown = Shutdown::new();
    let content_dir = dir.join("content");
    let scheduler = fleetpatch_scheduler::start(
        fleetpatch_scheduler::SchedulerOptions {
            listen: "127.0.0.1:0".into(),
            content_dir,
            verify_delay_seconds: 2,
            reconcile_interval_seconds: 5,
            prefetch: 32,
            ..Default::default()
        },
        store.clone(),
        bus.clone(),
        Health::new(),
        shutdown.clone(),
    )
    .await?;
    // Worker and collector run here and nowhere else: one random token key.
    let token_key = fleetpatch_runtime::tokens::TokenKey::random();
    let collector = fleetpatch_collector::start(
        fleetpatch_collector::CollectorOptions { listen: "127.0.0.1:0".into(), ..Default::default() },
        token_key.clone(),
        store.clone(),
        bus.clone(),
        Health::new(),
        shutdown.clone(),
    )
    .await?;
    let worker = fleetpatch_worker::Worker::new(
        fleetpatch_worker::WorkerOptions {
            listen: "127.0.0.1:0".into(),
            collector_url: format!("http://{}", collector.local_addr),
            concurrency: args.concurrency.min(256) as u16,
            retry_backoff_seconds: vec![1, 2],
            ..Default::default()
        },
        token_key,
        store.clone(),
        bus.clone(),
        Transports::default().with(Arc::new(SimTransport::new(SimFleet::new(sim)))),
    )?;
    let _worker = worker.start(Health::new(), shutdown.clone()).await?;

    let patches: Vec<serde_json::Value> = (0..args.patches)
        .map(|i| {
            serde_json::json!({"name": format!("KB50{i:05}"), "kb": format!("KB50{i:05}"),
                "file": format!("kb50{i:05}.msu"), "sha256": format!("{:064x}", i + 1), "installer": "msu"})
        })
        .collect();
    let canary = (args.targets / 20).clamp(1, 50) as u32;
    let targets: Vec<serde_json::Value> = (0..args.targets)
        .map(|i| {
            let mut target = serde_json::json!({"host": format!("sim-{i:05}"), "transport": "sim"});
            if args.window && i >= canary as usize {
                target["labels"] = serde_json::json!({"window": "night"});
            }
            target
        })
        .collect();
    let mut request = serde_json::json!({
        "name": "demo", "concurrency": args.concurrency, "timeout_seconds": args.timeout_seconds,
        "heartbeat_seconds": 1,
        "waves": [{"name": "canary", "size": canary, "max_failure_percent": 100}, {"name": "fleet", "max_failure_percent": 100}],
        "patches": patches, "targets": targets,
    });
    if args.window {
        let (windows, deadline) = demo_window(chrono::Utc::now());
        request["windows"] = windows;
        request["deadline"] = serde_json::json!(deadline.to_rfc3339());
    }
    let api = format!("http://{}", scheduler.local_addr);
    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(format!("{api}/v1/rollouts"))
        .bearer_auth(admin_key.trim())
        .json(&request)
        .send()
        .await?;
    anyhow::ensure!(response.status() == 201, "the scheduler refused the demo rollout: {}", response.text().await?);
    let id: uuid::Uuid = response.json::<serde_json::Value>().await?["id"].as_str().context("rollout id")?.parse()?;
    println!(
        "fleetpatch demo: {} simulated targets × {} patches, concurrency {}",
        args.targets, args.patches, args.concurrency
    );
    println!(
        "API {api}; its admin key is in {} (mode 0600, removed with the demo): \
         FLEETPATCH_API={api} FLEETPATCH_TOKEN=\"$(cat {})\" fleetpatch rollout list",
        key_file.display(),
        key_file.display()
    );
    let terminal = Terminal::detect();
    let mut bars = terminal.redraw.then(crate::progress::WaveBars::on_stdout);
    let mut last = String::new();
    let rollout = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let rollout = store.rollout(id).await?;
        let progress = store.progress(&rollout).await?;
        let waves: Vec<crate::progress::WaveLine> = progress
            .waves
            .iter()
            .map(|w| {
                crate::progress::WaveLine::of(
                    &w.name,
                    w.index,
                    w.total,
                    &w.by_state,
                    rollout.current_wave,
                    rollout.state,
                )
            })
            .collect();
        let waiting = (rollout.state == RolloutState::WaitingForWindow)
            .then(|| output::clean(rollout.pause_reason.as_deref().unwrap_or("waiting_for_window")));
        if let Some(bars) = bars.as_mut() {
            // On a terminal: the bars are redrawn in place, with the clock.
            let mut heading = format!("[{:>5.1}s]", started.elapsed().as_secs_f64());
            if let Some(waiting) = &waiting {
                heading.push_str(&format!(" {waiting}"));
            }
            bars.update(&heading, &waves);
        } else {
            // A pipe or a log: a new frame only when something changed.
            let mut lines: Vec<String> =
                waves.iter().map(|wave| format!("  {:<8} {}", wave.name, wave.counts.summary())).collect();
            lines.extend(waiting.map(|waiting| format!("  {waiting}")));
            let frame = lines.join("\n");
            if frame != last {
                println!("[{:>5.1}s]\n{frame}", started.elapsed().as_secs_f64());
            }
            last = frame;
        }
        std::io::Write::flush(&mut std::io::stdout())?;
        if matches!(rollout.state, RolloutState::Completed | RolloutState::Aborted | RolloutState::Paused) {
            if let Some(bars) = &bars {
                bars.finish();
            }
            break rollout;
        }
    };
    let elapsed = started.elapsed();
    let all = store.targets(id, None, None, u64::MAX >> 1).await?;
    let mut durations: Vec<f64> =
        all.iter().filter_map(|t| Some((t.finished_at? - t.queued_at?).num_milliseconds() as f64 / 1000.0)).collect();
    durations.sort_by(f64::total_cmp);
    let quantile =
        |q: f64| durations.get(((durations.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0);
    println!("\nrollout {} in {:.1}s", rollout.state, elapsed.as_secs_f64());
    let mut table = output::Table::new(&["state", "targets"]).right(1);
    for state in TargetState::ALL {
        let count = all.iter().filter(|t| t.state == state).count();
        if count > 0 {
            table.push(vec![state.to_string(), count.to_string()]);
        }
    }
    print!("{}", table.render(true, &table.widths()));
    println!("time per target: p50 {:.2}s, p95 {:.2}s", quantile(0.5), quantile(0.95));
    let failures: Vec<_> = all.iter().filter(|t| t.state.is_failure()).collect();
    if !failures.is_empty() {
        // Which patch failed, with its exit code, next to the target's reason.
        let names: Vec<String> = store.patches(id).await?.into_iter().map(|p| p.name).collect();
        let mut failed_patch = std::collections::HashMap::new();
        for (target_id, patch) in store.rollout_target_patches(id).await? {
            if patch.state == fleetpatch_proto::state::PatchState::Failed {
                let name = names.get(patch.patch_index as usize).cloned().unwrap_or_default();
                let text = match patch.exit_code {
                    Some(code) => format!("{name} (exit {code})"),
                    None => format!("{name} ({})", patch.error.as_deref().unwrap_or("no exit code")),
                };
                failed_patch.entry(target_id).or_insert(text);
            }
        }
        let mut table = output::Table::new(&["host", "state", "failed patch", "reason"]);
        for target in failures.iter().take(20) {
            table.push(vec![
                target.host.clone(),
                target.state.to_string(),
                failed_patch.get(&target.id).cloned().unwrap_or_else(|| "-".into()),
                target.error.clone().unwrap_or_default(),
            ]);
        }
        println!("\nfailures ({}):", failures.len());
        print!("{}", table.render(true, &table.widths()));
    }
    shutdown.trigger();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
