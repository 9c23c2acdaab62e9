//! `fleetpatch bench`: the pipeline's throughput on the configured RabbitMQ
//! and PostgreSQL, next to the raw ceilings it depends on, measured in the
//! same run with the same client libraries and message sizes.
//!
//! The services run as they would in production: one child process per
//! scheduler, collector and worker (this same executable), each in its own
//! database (`fleetpatch_bench_<id>`, created next to the configured one)
//! and queue prefix, removed at the end. Their memory (VmRSS sampled every
//! 100 ms, and VmHWM) and CPU time are read from `/proc`.
//!
//! Phases:
//! 1. ceilings: publish-with-confirms + consume-with-ack through one quorum
//!    queue; batched and one-row INSERTs into a table shaped like
//!    `agent_events`; the collector phase's requests, senders and client
//!    against the collector's HTTP stack with nothing behind it;
//! 2. rollout: N simulated targets × K patches at concurrency C through the
//!    whole pipeline (simulated agents post real reports to the collector);
//! 3. collector: M targets' agents (this process) post their reports as fast
//!    as the collector takes them, one report per request; rate and latency
//!    per request, next to the same load on a collector that writes one
//!    report per transaction; then M more agents produce reports on a clock
//!    (`--collector-rate` in all) and each sends what is ready, as the real
//!    agent does; rate, reports per request, latency from production; for
//!    each run, the CPU time per report of the collector, the simulated
//!    agents, PostgreSQL, RabbitMQ and the rest of the machine (`/proc`), and
//!    the rate the machine's cores would bound it to at that cost;
//! 4. watchdogs: W targets brought to `running` at once and left silent;
//!    how late after its deadline each is timed out;
//! 5. create: a rollout of 100,000 targets through the API; time to accept,
//!    and the scheduler's memory before and after.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fleetpatch_bus::rabbitmq::{RabbitBackend, RabbitOptions};
use fleetpatch_proto::report_auth::{self, SignedRequest, SigningKey};
use fleetpatch_proto::state::{RolloutState, TargetState};
use fleetpatch_proto::v1::{self, agent_report::Kind};
use fleetpatch_proto::Message;
use fleetpatch_runtime::tokens::TokenKey;
use fleetpatch_store::{Claim, NewRollout, ProbeOutcome, Store, StoreOptions};
use serde::Serialize;
use tokio::process::{Child, Command};
use uuid::Uuid;

/// How the figures are printed.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// For people.
    Table,
    /// One JSON document, for scripts.
    Json,
}

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Targets of the simulated rollout.
    #[arg(long, default_value_t = 10_000)]
    pub targets: usize,
    /// Patches per target.
    #[arg(long, default_value_t = 3)]
    pub patches: usize,
    /// The rollout's concurrency (targets in flight).
    #[arg(long, default_value_t = 1_000)]
    pub concurrency: u32,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Deploy jobs in flight per worker.
    #[arg(long, default_value_t = 500)]
    pub worker_concurrency: u16,
    /// Time a simulated patch takes to install (ms).
    #[arg(long, default_value_t = 20)]
    pub patch_ms: u64,
    /// Targets whose agents load the collector in its own phase (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    pub collector_targets: usize,
    /// Heartbeats each of that phase's agents sends during its first patch
    /// (a patch that runs 6 minutes with `heartbeat_seconds: 30` sends 12).
    #[arg(long, default_value_t = 1)]
    pub heartbeats: usize,
    /// Concurrent report senders in that phase.
    #[arg(long, default_value_t = 128)]
    pub collector_clients: usize,
    /// Reports per second offered in the same phase's paced run: each agent
    /// produces its reports on a clock and sends what is ready, as the real
    /// agent does (0 skips that run).
    #[arg(long, default_value_t = 20_000)]
    pub collector_rate: u32,
    /// Watchdogs armed at once (0 skips the phase).
    #[arg(long, default_value_t = 10_000)]
    pub watchdogs: usize,
    /// Timeout of the watchdog phase's targets (seconds).
    #[arg(long, default_value_t = 10)]
    pub watchdog_timeout: u32,
    /// Targets of the large-create phase (0 skips it).
    #[arg(long, default_value_t = 100_000)]
    pub create_targets: usize,
    /// Messages of the broker ceiling.
    #[arg(long, default_value_t = 50_000)]
    pub ceiling_messages: usize,
    /// Print the figures as JSON instead of a table.
    #[arg(long, value_enum, default_value = "table")]
    pub output: Output,
    /// Keep the bench database and queues (their names are printed).
    #[arg(long)]
    pub keep: bool,
}

mod figures;
mod load;
mod pgclients;
mod proc;

use figures::*;
use load::*;
use proc::*;

struct Bench {
    args: BenchArgs,
    /// What every service process gets, and where it logs.
    env: Vec<(String, String)>,
    config: Option<PathBuf>,
    dir: PathBuf,
    http: reqwest::Client,
    store: Store,
    api: String,
    /// An admin key of the bench database, for the scheduler API.
    api_key: String,
    sampler: Sampler,
    figures: Figures,
    /// Where this process plays the workers, it also relays their outbox at once.
    relay_nudge: Arc<tokio::sync::Notify>,
    /// The token key the collector shares (the bench plays the workers).
    token_key: TokenKey,
}

fn sim_patches(patches: usize) -> Vec<serde_json::Value> {
    (0..patches)
        .map(|i| {
            serde_json::json!({
                "name": format!("KB50{i:05}"),
                "kb": format!("KB50{i:05}"),
                "file": format!("kb50{i:05}.msu"),
                "sha256": format!("{:064x}", i + 1),
                "installer": "msu",
            })
        })
        .collect()
}

fn rollout_body(name: &str, targets: usize, patches: usize, concurrency: u32) -> serde_json::Value {
    let targets: Vec<serde_json::Value> =
        (0..targets).map(|i| serde_json::json!({ "host": format!("sim-{i:06}"), "transport": "sim" })).collect();
    serde_json::json!({
        "name": name,
        "concurrency": concurrency,
        "timeout_seconds": 600,
        "heartbeat_seconds": 30,
        "patches": sim_patches(patches),
        "targets": targets,
    })
}

impl Bench {
    async fn post_rollout(&self, body: &serde_json::Value) -> anyhow::Result<Uuid> {
        let response =
            self.http.post(format!("{}/v1/rollouts", self.api)).bearer_auth(&self.api_key).json(body).send().await?;
        let status = response.status();
        let text = response.text().await?;
        if status.as_u16() != 201 {
            bail!("creating the bench rollout failed ({status}): {text}");
        }
        let value: serde_json::Value = serde_json::from_str(&text)?;
        value["id"].as_str().context("the created rollout has an id")?.parse().context("rollout id")
    }

    async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl AsyncFnMut() -> anyhow::Result<Option<String>>,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            match done().await? {
                None => {
                    eprintln!();
                    return Ok(());
                }
                Some(status) => {
                    if status != last {
                        eprint!("\r\x1b[2K  {what}: {status}");
                        last = status;
                    }
                }
            }
            if Instant::now() > deadline {
                eprintln!();
                bail!("{what} did not finish within {timeout:?} (last: {last})");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the outbox is empty (what bringing targets to running
    /// announced has been published), so that a run's CPU figures hold only
    /// its own work.
    async fn wait_for_outbox(&self) -> anyhow::Result<()> {
        self.wait_until("the outbox to be published", Duration::from_secs(120), async || {
            let depth = self.store.outbox_depth().await?;
            Ok((depth > 0).then(|| format!("{depth} messages left")))
        })
        .await
    }

    async fn counts(&self, rollout: Uuid) -> anyhow::Result<BTreeMap<String, u64>> {
        let rollout = self.store.rollout(rollout).await?;
        Ok(self.store.progress(&rollout).await?.by_state)
    }

    /// Waits until every target of `rollout` is in `state`.
    async fn wait_all(&self, rollout: Uuid, state: TargetState, total: usize, timeout: Duration) -> anyhow::Result<()> {
        self.wait_until(&format!("{total} targets to be {state}"), timeout, async || {
            let counts = self.counts(rollout).await?;
            let n = counts.get(state.as_str()).copied().unwrap_or(0) as usize;
            Ok((n < total).then(|| format!("{n}/{total}")))
        })
        .await
    }

    /// The CPU spent so far by the running services (the collector being
    /// the process `collector_pid`), this process's agents, PostgreSQL,
    /// RabbitMQ and the machine.
    fn cpu_now(&self, collector_pid: u32) -> CpuSnapshot {
        let mut pids = self.sampler.pids();
        pids.insert("collector".to_owned(), collector_pid);
        CpuSnapshot::take("bench agents", &pids.into_iter().collect::<Vec<_>>())
    }

    /// Plays the worker for every queued target: claim, probe, stage, start;
    /// each ends `running` with its token derived from the bench's token key
    /// (which the collector shares). Returns the targets' agents.
    async fn bring_to_running(&self, rollout: Uuid) -> anyhow::Result<Vec<BenchAgent>> {
        let targets = self.store.targets(rollout, Some(TargetState::Queued), None, u64::MAX >> 1).await?;
        let next = Arc::new(AtomicUsize::new(0));
        let targets = Arc::new(targets);
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let (store, next, targets, nudge, token_key) =
                (self.store.clone(), next.clone(), targets.clone(), self.relay_nudge.clone(), self.token_key.clone());
            tasks.push(tokio::spawn(async move {
                let mut tokens = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(target) = targets.get(i) else { break };
                    let nonce = Uuid::new_v4().simple().to_string();
                    let Claim::Claimed(context) = store.claim_deploy(target.id, target.attempt, false, &nonce).await?
                    else {
                        bail!("target {} could not be claimed", target.host);
                    };
                    let stored_nonce = context.target.token_nonce.clone().unwrap_or_default();
                    let token = report_auth::derive_token(
                        token_key.as_bytes(),
                        target.id,
                        context.target.attempt,
                        &stored_nonce,
                    );
                    let hash = fleetpatch_collector::token_hash(&token);
                    let probe =
                        store.record_probe(&context, "bench", "x86_64", serde_json::json!({}), &[], &hash).await?;
                    if probe != ProbeOutcome::Stage {
                        bail!("target {} did not move to staging ({probe:?})", target.host);
                    }
                    store.mark_installing(&context.target, "push").await?;
                    if !store.mark_running(&context.target).await? {
                        bail!("target {} did not move to running", target.host);
                    }
                    nudge.notify_one();
                    tokens.push(BenchAgent::new(&token_key, target.id, context.target.attempt, &stored_nonce));
                }
                anyhow::Ok(tokens)
            }));
        }
        let mut tokens = Vec::new();
        for task in tasks {
            tokens.extend(task.await??);
        }
        Ok(tokens)
    }
}

/// Runs the benchmark on the configured database and broker.
pub async fn run(
    args: BenchArgs,
    database: &StoreOptions,
    amqp: &RabbitOptions,
    collector: &fleetpatch_collector::CollectorOptions,
    config: Option<&Path>,
) -> anyhow::Result<()> {
    let paced_agents = if args.collector_rate > 0 { args.collector_targets } else { 0 };
    let clients = if args.collector_targets > 0 { args.collector_clients } else { 0 };
    if let Some(shortfall) = open_files_shortfall(paced_agents, clients, open_files_limit()) {
        eprintln!("warning: {shortfall}");
    }
    let id = Uuid::new_v4().simple().to_string()[..12].to_owned();
    let db_name = format!("fleetpatch_bench_{id}");
    let prefix = format!("{}-bench-{id}", amqp.prefix);
    let dir = std::env::temp_dir().join(format!("fleetpatch-bench-{id}"));
    std::fs::create_dir_all(&dir)?;
    eprintln!("fleetpatch bench: database {db_name}, queue prefix {prefix}, logs in {}", dir.display());
    let bench_db = fleetpatch_store::create_sibling_database(database, &db_name).await.with_context(|| {
        format!("creating the bench database next to {}", fleetpatch_store::redact_url(&database.url))
    })?;
    let bench_db = StoreOptions { max_connections: 40, ..bench_db };
    let amqp = RabbitOptions { prefix: prefix.clone(), ..amqp.clone() };
    // The HTTP ceiling's bare server runs on as many threads as the collector.
    let server_threads =
        collector.runtime_threads().unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let outcome = run_phases(&args, &bench_db, &amqp, config, &dir, &db_name, server_threads).await;
    if !args.keep {
        if let Ok(backend) = RabbitBackend::connect(&amqp, &fleetpatch_proto::routing::WORK_QUEUES).await {
            let _ = backend.delete_topology().await;
        }
        if let Err(error) = fleetpatch_store::drop_sibling_database(database, &db_name).await {
            eprintln!("warning: could not drop the bench database {db_name}: {error}");
        }
    }
    let figures = outcome?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&figures)?),
        Output::Table => print_figures(&figures),
    }
    if args.keep {
        eprintln!("kept: database {db_name}, queue prefix {prefix}, service logs in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

async fn run_phases(
    args: &BenchArgs,
    database: &StoreOptions,
    amqp: &RabbitOptions,
    config: Option<&Path>,
    dir: &Path,
    db_name: &str,
    server_threads: usize,
) -> anyhow::Result<Figures> {
    let store = Store::connect(database).await?;
    store.migrate().await?;
    let mut figures = Figures { database: db_name.to_owned(), queue_prefix: amqp.prefix.clone(), ..Figures::default() };

    // 1. The ceilings, before any service competes with them.
    eprintln!(
        "1/5 ceilings: broker (publish with confirms + consume with ack), database (INSERT), HTTP (the collector's \
         server stack, nothing behind it)"
    );
    let sample_job = v1::DeployJob {
        target_id: Uuid::new_v4().to_string(),
        rollout_id: Uuid::new_v4().to_string(),
        attempt: 1,
        r#try: 0,
    };
    let broker = fleetpatch_bus::ceiling::broker_ceiling(amqp, args.ceiling_messages, sample_job.encoded_len(), 1_000)
        .await
        .context("measuring the broker ceiling")?;
    figures.broker_ceiling = Some(broker);
    let db = fleetpatch_store::ceiling::database_ceiling(&store, 8, 1_000, 200_000, 20_000)
        .await
        .context("measuring the database ceiling")?;
    figures.database_ceiling = Some(db);
    // The database floor of a report, measured alone: the CPU of writing
    // 200,000 rows of the event table's shape in 1,000-row statements from
    // 8 connections (no one-row transactions this time), per row.
    let floor_rows = 200_000;
    let before = CpuSnapshot::take("bench", &[]);
    let started = Instant::now();
    fleetpatch_store::ceiling::database_ceiling(&store, 8, 1_000, floor_rows, 0)
        .await
        .context("measuring the database floor")?;
    figures.database_floor =
        Some(before.per_report(&CpuSnapshot::take("bench", &[]), floor_rows, started.elapsed().as_secs_f64()));
    let http = reqwest::Client::builder().pool_max_idle_per_host(1_024).build()?;
    // The key the collector derives the agents' tokens from; the bench plays
    // the workers and the agents, so it holds it too.
    let token_key_text = format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
    let token_key = TokenKey::from_bytes(token_key_text.clone().into_bytes())?;
    let ceiling_load = CeilingLoad {
        targets: args.collector_targets,
        reports: (args.patches, args.heartbeats),
        clients: args.collector_clients,
        server_threads,
    };
    if args.collector_targets > 0 {
        let ceiling = http_ceiling(&http, &ceiling_load, None).await.context("measuring the HTTP ceiling")?;
        figures.http_ceiling = Some(ceiling);
        let ceiling = http_ceiling(&http, &ceiling_load, Some(token_key.clone()))
            .await
            .context("measuring the HTTP ceiling with MAC checking")?;
        figures.http_ceiling_with_mac = Some(ceiling);
        figures.mac_verify_micros = Some(mac_verify_micros(&token_key, 100_000));
        if args.collector_rate > 0 {
            let floor = paced_http_floor(&http, &ceiling_load, token_key.clone(), f64::from(args.collector_rate))
                .await
                .context("measuring the paced HTTP floor")?;
            figures.http_floor_paced = Some(floor);
        }
    }

    // The services, one process each.
    let scheduler_port = free_port()?;
    let collector_port = free_port()?;
    let common: Vec<(String, String)> = vec![
        ("FLEETPATCH__DATABASE__URL".into(), database.url.clone()),
        ("FLEETPATCH__DATABASE__MAX_CONNECTIONS".into(), "20".into()),
        ("FLEETPATCH__AMQP__URL".into(), amqp.url.clone()),
        ("FLEETPATCH__AMQP__PREFIX".into(), amqp.prefix.clone()),
        ("FLEETPATCH__TELEMETRY__LOG_FILTER".into(), "warn".into()),
        ("FLEETPATCH__TELEMETRY__LOG_FORMAT".into(), "text".into()),
        ("FLEETPATCH__SCHEDULER__LISTEN".into(), format!("127.0.0.1:{scheduler_port}")),
        ("FLEETPATCH__SCHEDULER__CONTENT_DIR".into(), dir.join("content").display().to_string()),
        // The create phase may go past the default limit (100,000).
        (
            "FLEETPATCH__SCHEDULER__MAX_TARGETS_PER_ROLLOUT".into(),
            args.create_targets.max(args.targets).max(100_000).to_string(),
        ),
        ("FLEETPATCH__COLLECTOR__LISTEN".into(), format!("127.0.0.1:{collector_port}")),
        ("FLEETPATCH__WORKER__COLLECTOR_URL".into(), format!("http://127.0.0.1:{collector_port}")),
        ("FLEETPATCH__WORKER__CONCURRENCY".into(), args.worker_concurrency.to_string()),
        ("FLEETPATCH__TOKENS__KEY_REF".into(), "env:FLEETPATCH_BENCH_TOKEN_KEY".into()),
        ("FLEETPATCH__WORKER__CONTENT_DIR".into(), dir.join("content").display().to_string()),
        ("FLEETPATCH__SIM__PATCH_MS".into(), args.patch_ms.to_string()),
        ("FLEETPATCH__SIM__MIN_LATENCY_MS".into(), "1".into()),
        ("FLEETPATCH__SIM__MAX_LATENCY_MS".into(), "5".into()),
        ("FLEETPATCH_BENCH_TOKEN_KEY".into(), token_key_text),
    ];
    let sampler = Sampler::default();
    let stop_sampler = Arc::new(AtomicBool::new(false));
    let sampling = sampler.start(stop_sampler.clone());
    let mut scheduler =
        Service::spawn("scheduler", "scheduler", &common, config, dir, format!("http://127.0.0.1:{scheduler_port}"))?;
    let mut collector =
        Service::spawn("collector", "collector", &common, config, dir, format!("http://127.0.0.1:{collector_port}"))?;
    let mut workers = Vec::new();
    for n in 0..args.workers {
        let port = free_port()?;
        let mut env = common.clone();
        env.push(("FLEETPATCH__WORKER__LISTEN".into(), format!("127.0.0.1:{port}")));
        workers.push(Service::spawn(
            &format!("worker-{n}"),
            "worker",
            &env,
            config,
            dir,
            format!("http://127.0.0.1:{port}"),
        )?);
    }
    for service in std::iter::once(&mut scheduler).chain(std::iter::once(&mut collector)).chain(workers.iter_mut()) {
        service.wait_ready(&http).await?;
        sampler.watch(service);
    }
    let mut bench = Bench {
        args: args.clone(),
        env: common.clone(),
        config: config.map(Path::to_path_buf),
        dir: dir.to_path_buf(),
        http,
        store: store.clone(),
        api: scheduler.url.clone(),
        api_key: store
            .create_api_key("bench-admin", fleetpatch_store::Role::Admin, None)
            .await
            .context("making the bench's admin API key")?
            .expose_secret()
            .to_owned(),
        sampler: sampler.clone(),
        figures,
        relay_nudge: Arc::default(),
        token_key,
    };
    let relay_bus = fleetpatch_bus::Bus::new(Arc::new(
        RabbitBackend::connect(amqp, &fleetpatch_proto::routing::WORK_QUEUES)
            .await
            .context("connecting to RabbitMQ")?,
    ));
    let relay_stop = tokio_util::sync::CancellationToken::new();
    let relay = tokio::spawn(fleetpatch_store::relay::run_relay(
        store.clone(),
        relay_bus.clone(),
        bench.relay_nudge.clone(),
        Duration::from_secs(1),
        Duration::ZERO,
        relay_stop.clone(),
    ));

    // 2. The simulated rollout through the whole pipeline.
    eprintln!("2/5 rollout: {} targets × {} patches at concurrency {}", args.targets, args.patches, args.concurrency);
    let scrape = async |services: &[&Service], http: &reqwest::Client| -> anyhow::Result<Metrics> {
        let mut merged = Metrics::default();
        for service in services {
            merged = merged.merge(service.metrics(http).await?);
        }
        anyhow::Ok(merged)
    };
    if args.targets > 0 {
        let body = rollout_body("bench", args.targets, args.patches, args.concurrency);
        let before = scrape(&everyone(&scheduler, &collector, &workers), &bench.http).await?;
        bench.sampler.take_peaks();
        let started = Instant::now();
        let rollout = bench.post_rollout(&body).await?;
        let total = args.targets;
        bench
            .wait_until("rollout", Duration::from_secs(1_800), async || {
                let rollout = bench.store.rollout(rollout).await?;
                let counts = bench.store.progress(&rollout).await?.by_state;
                let finished: u64 =
                    TargetState::FINAL.iter().map(|s| counts.get(s.as_str()).copied().unwrap_or(0)).sum();
                if matches!(rollout.state, RolloutState::Completed | RolloutState::Aborted | RolloutState::Paused) {
                    return Ok(None);
                }
                Ok(Some(format!("{finished}/{total} finished, {:.0} s", started.elapsed().as_secs_f64())))
            })
            .await?;
        let seconds = started.elapsed().as_secs_f64();
        let after = scrape(&everyone(&scheduler, &collector, &workers), &bench.http).await?;
        let accepted_label = "result=\"accepted\"";
        let reports = after.sum("fleetpatch_collector_reports_total", accepted_label)
            - before.sum("fleetpatch_collector_reports_total", accepted_label);
        let published =
            after.sum("fleetpatch_outbox_published_total", "") - before.sum("fleetpatch_outbox_published_total", "");
        let latency = |q| {
            histogram_quantile(
                &before.buckets("fleetpatch_sim_report_seconds"),
                &after.buckets("fleetpatch_sim_report_seconds"),
                q,
            )
            .map(|s| s * 1_000.0)
        };
        let bus_rate = published / seconds;
        bench.figures.rollout = Some(RolloutFigures {
            targets: args.targets,
            patches: args.patches,
            concurrency: args.concurrency,
            seconds,
            targets_per_second: args.targets as f64 / seconds,
            by_state: bench.counts(rollout).await?,
            reports_accepted: reports,
            reports_per_second: reports / seconds,
            report_latency_p50_ms: latency(0.5),
            report_latency_p99_ms: latency(0.99),
            bus_messages_published: published,
            bus_messages_per_second: bus_rate,
            bus_fraction_of_ceiling: bench.figures.broker_ceiling.as_ref().map(|c| bus_rate / c.per_second),
            peak_rss_mib: bench.sampler.take_peaks(),
        });
    }
    // The workers are done: from here this process plays them.
    for worker in workers.drain(..) {
        bench.sampler.forget(&worker.name);
        let (name, cpu, peak) = (worker.name.clone(), worker.cpu_seconds(), worker.peak_kib());
        worker.stop().await?;
        bench.figures.services.insert(name, ServiceFigures { cpu_seconds: cpu, peak_rss_mib: peak as f64 / 1024.0 });
    }

    // 3. The collector at full load.
    if args.collector_targets > 0 {
        eprintln!(
            "3/5 collector: {} targets' agents, {} concurrent senders",
            args.collector_targets, args.collector_clients
        );
        collector_phase(&mut bench, collector_port, collector.pid).await?;
    }

    // 4. Watchdogs.
    if args.watchdogs > 0 {
        eprintln!("4/5 watchdogs: {} armed at once, {} s timeout", args.watchdogs, args.watchdog_timeout);
        watchdog_phase(&mut bench).await?;
    }

    // 5. A large rollout through the API.
    if args.create_targets > 0 {
        eprintln!("5/5 create: a rollout of {} targets through the API", args.create_targets);
        let body = rollout_body("bench-create", args.create_targets, args.patches, 1);
        let rss_before = bench.sampler.current_mib("scheduler");
        bench.sampler.take_peaks();
        let started = Instant::now();
        let rollout = bench.post_rollout(&body).await?;
        let seconds = started.elapsed().as_secs_f64();
        drop(body);
        let peaks = bench.sampler.take_peaks();
        let rss_after = bench.sampler.current_mib("scheduler");
        // Nothing will deploy these: stop the rollout again.
        let aborting = Instant::now();
        let aborted = bench
            .http
            .post(format!("{}/v1/rollouts/{rollout}/abort", bench.api))
            .bearer_auth(&bench.api_key)
            .send()
            .await?;
        if !aborted.status().is_success() {
            bail!("aborting the created rollout failed ({}): {}", aborted.status(), aborted.text().await?);
        }
        let abort_seconds = aborting.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let abort_peaks = bench.sampler.take_peaks();
        bench.figures.create = Some(CreateFigures {
            targets: args.create_targets,
            seconds,
            scheduler_rss_before_mib: rss_before,
            scheduler_rss_after_mib: rss_after,
            abort_seconds,
            abort_peak_rss_mib: abort_peaks.get("scheduler").copied().unwrap_or(0.0),
            scheduler_peak_rss_mib: peaks.get("scheduler").copied().unwrap_or(0.0),
        });
    }

    for service in [scheduler, collector] {
        let (name, cpu, peak) = (service.name.clone(), service.cpu_seconds(), service.peak_kib());
        service.stop().await?;
        bench.figures.services.insert(name, ServiceFigures { cpu_seconds: cpu, peak_rss_mib: peak as f64 / 1024.0 });
    }
    relay_stop.cancel();
    let _ = relay.await;
    relay_bus.close().await;
    stop_sampler.store(true, Ordering::Relaxed);
    let _ = sampling.await;
    store.close().await;
    Ok(bench.figures)
}

fn everyone<'a>(scheduler: &'a Service, collector: &'a Service, workers: &'a [Service]) -> Vec<&'a Service> {
    let mut all = vec![scheduler, collector];
    all.extend(workers.iter());
    all
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_interpolate_between_scrapes() {
        let before = vec![(0.01, 10.0), (0.05, 10.0), (f64::INFINITY, 10.0)];
        let after = vec![(0.01, 60.0), (0.05, 110.0), (f64::INFINITY, 110.0)];
        // 100 new observations: 50 under 10 ms, 50 between 10 and 50 ms.
        assert!((histogram_quantile(&before, &after, 0.5).unwrap() - 0.01).abs() < 1e-9);
        assert!((histogram_quantile(&before, &after, 0.75).unwrap() - 0.03).abs() < 1e-9);
        assert_eq!(histogram_quantile(&after, &after, 0.5), None, "no new observations");
    }

    #[test]
    fn metrics_text_is_summed_by_name_and_label() {
        let metrics = Metrics::parse(
            "# TYPE x counter\nx{result=\"accepted\"} 5\nx{result=\"duplicate\"} 2\ny 1.5\nh_bucket{le=\"0.1\"} 3\nh_bucket{le=\"+Inf\"} 4\n",
        )
        .merge(Metrics::parse("x{result=\"accepted\"} 7\nh_bucket{le=\"0.1\"} 1\n"));
        assert_eq!(metrics.sum("x", "result=\"accepted\""), 12.0);
        assert_eq!(metrics.sum("y", ""), 1.5);
        assert_eq!(metrics.buckets("h"), vec![(0.1, 4.0), (f64::INFINITY, 4.0)]);
    }

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&values, 0.5), 50.0);
        assert_eq!(quantile(&values, 0.99), 99.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }

    #[test]
    fn proc_stat_lines_give_the_command_and_cpu_seconds() {
        // A command name with a space and a parenthesis, as comm can have.
        let stat = "4242 (beam.smp (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 30 20 20 0 40 0";
        let (command, fields) = proc_stat_fields(stat).expect("parsed");
        assert_eq!(command, "beam.smp (x)");
        assert_eq!(fields[0], "S");
        assert_eq!(stat_cpu_seconds(&fields, false), Some(3.0), "utime 250 + stime 50 ticks");
        assert_eq!(stat_cpu_seconds(&fields, true), Some(3.5), "and the reaped children's 30 + 20");
        assert_eq!(stat_cpu_seconds(&fields[..12], false), None, "a short line is not read as zero");
    }

    #[test]
    fn the_machine_busy_time_leaves_out_idle_and_iowait() {
        let stat = "cpu  100 10 50 9000 40 5 15 20 0 0\ncpu0 50 5 25 4500 20 2 8 10 0 0\n\
                    cpu1 50 5 25 4500 20 3 7 10 0 0\nintr 1 2 3\nctxt 99\n";
        let (cores, busy, total) = CpuSnapshot::machine_busy(stat);
        assert_eq!(cores, 2);
        assert!((busy - 2.0).abs() < 1e-9, "user+nice+system+irq+softirq+steal = 200 ticks, not {busy}");
        assert!((total - 92.4).abs() < 1e-9, "and with idle and iowait 9240 ticks, not {total}");
    }

    #[test]
    fn cpu_per_report_splits_the_machine_and_bounds_the_rate() {
        let group = |pairs: &[(&str, f64)]| pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let backends = |rows: &[(u32, &str, f64)]| {
            rows.iter()
                .map(|(pid, owner, seconds)| (*pid, pgclients::Backend { owner: owner.to_string(), seconds: *seconds }))
                .collect()
        };
        let before = CpuSnapshot {
            cores: 2,
            machine: 100.0,
            machine_total: 200.0,
            groups: group(&[("collector", 10.0), ("postgresql", 20.0)]),
            postgres_backends: backends(&[(7, "collector", 5.0), (8, "server", 1.0)]),
        };
        let after = CpuSnapshot {
            cores: 2,
            machine: 101.5,
            machine_total: 202.0,
            groups: group(&[("collector", 10.5), ("postgresql", 21.0), ("bench agents", 0.0)]),
            postgres_backends: backends(&[(7, "collector", 5.8), (8, "server", 1.1), (9, "scheduler", 0.05)]),
        };
        // 10,000 reports in 1 s: 1.5 CPU s of 2, 150 µs per report, of which the
        // collector 50, PostgreSQL 100, and nothing left for the rest.
        let cpu = before.per_report(&after, 10_000, 1.0);
        assert_eq!(cpu.cores, 2);
        assert!((cpu.machine_busy - 0.75).abs() < 1e-9, "{cpu:?}");
        assert!((cpu.micros_per_report["collector"] - 50.0).abs() < 1e-9, "{cpu:?}");
        assert!((cpu.micros_per_report["postgresql"] - 100.0).abs() < 1e-9, "{cpu:?}");
        assert_eq!(cpu.micros_per_report["bench agents"], 0.0);
        assert!(cpu.micros_per_report["other"].abs() < 1e-9, "{cpu:?}");
        // PostgreSQL's split by client: 0.8 s for the collector's connections,
        // 0.1 s its own processes, 0.05 s a client first seen in the later one.
        assert!((cpu.postgresql_by_client["collector"] - 80.0).abs() < 1e-9, "{cpu:?}");
        assert!((cpu.postgresql_by_client["server"] - 10.0).abs() < 1e-9, "{cpu:?}");
        assert!((cpu.postgresql_by_client["scheduler"] - 5.0).abs() < 1e-9, "{cpu:?}");
        assert!((cpu.machine_micros_per_report - 150.0).abs() < 1e-9, "{cpu:?}");
        // 2 cores ÷ 150 µs = 13,333 reports/s at most.
        assert!((cpu.machine_bound_per_second - 2.0e6 / 150.0).abs() < 1e-6, "{cpu:?}");
        assert!(cpu.summary("report").contains("at most 13333/s on 2 cores"), "{}", cpu.summary("report"));
        // The busy share comes from the ticks, not the wall clock: a run of
        // 1 ms that spans a few 10 ms ticks is not "busier than every core".
        assert!((before.per_report(&after, 10, 0.001).machine_busy - 0.75).abs() < 1e-9);
        // A quiet machine bounds nothing rather than dividing by zero.
        assert_eq!(before.per_report(&before, 10, 1.0).machine_bound_per_second, 0.0);
    }

    #[test]
    fn threads_of_this_process_are_counted_apart_by_name() {
        // A thread that works ~50 ms of CPU and stays alive while the snapshots are taken.
        let (done, finish) = std::sync::mpsc::channel::<()>();
        let (worked, wait) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("fp-test-burner".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                let mut x = 0u64;
                while started.elapsed() < std::time::Duration::from_millis(50) {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
                worked.send(()).expect("send");
                let _ = finish.recv();
                x
            })
            .expect("spawn");
        wait.recv().expect("the thread worked");
        let spent = proc::own_threads_cpu_seconds("fp-test-burner");
        assert!(spent > 0.01, "the named thread's CPU is counted: {spent}");
        assert_eq!(proc::own_threads_cpu_seconds("fp-no-such-thread"), 0.0);
        let split = CpuSnapshot::take("bench", &[]).with_own_threads("bench", "fp-test-burner", "burner");
        assert!(split.groups["burner"] >= spent, "{:?}", split.groups);
        done.send(()).expect("send");
        thread.join().expect("join");
        // What is counted apart leaves the process's own group (never below 0).
        let snapshot = |bench: f64| CpuSnapshot {
            groups: [("bench".to_owned(), bench), ("postgresql".to_owned(), 9.0)].into_iter().collect(),
            ..CpuSnapshot::default()
        };
        let apart = snapshot(2.5).counted_apart("bench", "burner", 0.5);
        assert_eq!(apart.groups["bench"], 2.0);
        assert_eq!(apart.groups["burner"], 0.5);
        assert_eq!(apart.groups["postgresql"], 9.0);
        assert_eq!(snapshot(0.01).counted_apart("bench", "burner", 0.02).groups["bench"], 0.0);
    }

    #[test]
    fn an_agent_sends_started_and_finished_per_patch_a_heartbeat_and_a_final() {
        let reports = agent_reports(3, 1);
        assert_eq!(reports.len(), 8);
        let seqs: Vec<u64> =
            reports.iter().map(|r| v1::ReportBatch::decode(r.as_slice()).unwrap().reports[0].seq).collect();
        assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
        let kinds = |reports: &[v1::AgentReport]| {
            reports.iter().filter(|r| matches!(r.kind, Some(v1::agent_report::Kind::Heartbeat(_)))).count()
        };
        let busy = load::agent_report_list(3, 12);
        assert_eq!((busy.len(), kinds(&busy)), (19, 12));
        assert_eq!(busy.iter().map(|r| r.seq).collect::<Vec<_>>(), (1..=19).collect::<Vec<_>>());
        assert_eq!(kinds(&load::agent_report_list(3, 0)), 0);
    }
}
