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
use sha2::Digest;

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
    /// Show relays: the targets are in two sites (paris, lyon), each with a
    /// relay of its own; the agents download the installers (real bytes)
    /// from their site's relay, and the summary shows what left the
    /// scheduler against what pushing would have sent.
    #[arg(long)]
    pub relays: bool,
}

/// Size of each demo installer with `--relays`.
const DEMO_INSTALLER_BYTES: usize = 256 * 1024;

/// The demo's relays: one per site, upstream the demo's scheduler.
struct DemoRelays {
    sites: Vec<(&'static str, fleetpatch_relay::RelayHandle)>,
}

impl DemoRelays {
    async fn start(dir: &std::path::Path, api: &str, store: &Store, shutdown: &Shutdown) -> anyhow::Result<DemoRelays> {
        // The relays read the content store with a viewer key of their own.
        let key = store.create_api_key("demo-relay", fleetpatch_store::Role::Viewer, None).await?;
        let key_file = dir.join("relay.key");
        crate::apikey::write_secret_file(&key_file, key.expose_secret())?;
        let mut sites = Vec::new();
        for site in ["paris", "lyon"] {
            let options = fleetpatch_relay::RelayOptions {
                listen: "127.0.0.1:0".into(),
                upstream_url: api.to_owned(),
                upstream_token_ref: format!("file:{}", key_file.display()),
                cache_dir: dir.join(format!("relay-{site}")),
                ..Default::default()
            };
            let handle = fleetpatch_relay::start(options, Health::new(), shutdown.clone())
                .await
                .with_context(|| format!("starting the {site} relay"))?;
            sites.push((site, handle));
        }
        Ok(DemoRelays { sites })
    }

    fn rules(&self) -> serde_json::Value {
        self.sites
            .iter()
            .map(|(site, handle)| serde_json::json!({"match": format!("site={site}"), "url": format!("http://{}", handle.local_addr)}))
            .collect()
    }

    fn site_of(&self, index: usize) -> &'static str {
        self.sites[index % self.sites.len()].0
    }

    /// What each relay did, and what left the scheduler against a push to every target.
    fn summary(&self, targets: usize, installer_bytes: u64) -> String {
        let mib = |bytes: u64| format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20));
        let mut table =
            output::Table::new(&["relay", "requests", "from the scheduler", "served"]).right(1).right(2).right(3);
        let mut upstream = 0;
        for (site, handle) in &self.sites {
            let stats = handle.stats();
            upstream += stats.upstream_bytes;
            table.push(vec![
                format!("{site} http://{}", handle.local_addr),
                (stats.hits + stats.misses).to_string(),
                format!("{} ({} fetches)", mib(stats.upstream_bytes), stats.upstream_fetches),
                mib(stats.served_bytes),
            ]);
        }
        format!(
            "\nrelays:\n{}left the scheduler: {} (pushing to every target: {})\n",
            table.render(true, &table.widths()),
            mib(upstream),
            mib(installer_bytes * targets as u64)
        )
    }
}

/// A demo installer with `--relays`: bytes of its own, so its sha256 is real.
fn demo_installer(index: usize) -> Vec<u8> {
    let line = format!("fleetpatch demo installer {index}\n");
    line.repeat(DEMO_INSTALLER_BYTES / line.len() + 1).into_bytes()[..DEMO_INSTALLER_BYTES].to_vec()
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
    let backend = MemoryBackend::new(&fleetpatch_proto::routing::WORK_QUEUES, 10);
    // Each service its own connection to the one in-process broker, as on
    // RabbitMQ: a service that stops closes only its own.
    let worker_bus = Bus::new(Arc::new(backend.connect_another()));
    let collector_bus = Bus::new(Arc::new(backend.connect_another()));
    let bus = Bus::new(Arc::new(backend));
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
        collector_bus,
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
        worker_bus,
        Transports::default().with(Arc::new(SimTransport::new(SimFleet::new(sim)))),
    )?;
    let worker = worker.start(Health::new(), shutdown.clone()).await?;

    let api = format!("http://{}", scheduler.local_addr);
    let http = reqwest::Client::new();
    let relays = match args.relays {
        true => Some(DemoRelays::start(&dir, &api, &store, &shutdown).await?),
        false => None,
    };
    let mut patches = Vec::new();
    let mut installer_bytes = 0;
    for i in 0..args.patches {
        let mut patch = serde_json::json!({"name": format!("KB50{i:05}"), "kb": format!("KB50{i:05}"),
            "file": format!("kb50{i:05}.msu"), "sha256": format!("{:064x}", i + 1), "installer": "msu"});
        if relays.is_some() {
            // Real bytes in the content store, so the relays serve and count them.
            let bytes = demo_installer(i);
            let sha256 = hex::encode(sha2::Sha256::digest(&bytes));
            patch["sha256"] = serde_json::json!(sha256);
            patch["size"] = serde_json::json!(bytes.len());
            installer_bytes += bytes.len() as u64;
            let response =
                http.put(format!("{api}/v1/content/{sha256}")).bearer_auth(admin_key.trim()).body(bytes).send().await?;
            anyhow::ensure!(response.status().is_success(), "uploading a demo installer: {}", response.status());
        }
        patches.push(patch);
    }
    let canary = (args.targets / 20).clamp(1, 50) as u32;
    let targets: Vec<serde_json::Value> = (0..args.targets)
        .map(|i| {
            let mut target = serde_json::json!({"host": format!("sim-{i:05}"), "transport": "sim", "labels": {}});
            if args.window && i >= canary as usize {
                target["labels"]["window"] = serde_json::json!("night");
            }
            if let Some(relays) = &relays {
                target["labels"]["site"] = serde_json::json!(relays.site_of(i));
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
    if let Some(relays) = &relays {
        request["relays"] = relays.rules();
    }
    let started = Instant::now();
    let response = http.post(format!("{api}/v1/rollouts")).bearer_auth(admin_key.trim()).json(&request).send().await?;
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
    if let Some(relays) = &relays {
        print!("{}", relays.summary(args.targets, installer_bytes));
    }
    // Drain before the directory goes: the worker finishes its last jobs
    // (cleanups) and acks them while the bus is still open.
    shutdown.trigger();
    let _ = worker.join.await;
    let _ = collector.join.await;
    let _ = scheduler.join.await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
