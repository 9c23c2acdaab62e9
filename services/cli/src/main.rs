//! `fleetpatch`: runs a service (`scheduler`, `worker`, `collector`, or
//! `all` of them in one process; `relay`, a site's installer cache), migrates the database, prints the
//! effective configuration, and is the client of the scheduler API
//! (`rollout …`, `targets`, `target`, `audit`); `check` runs the preflight of
//! targets from here, the way a worker would reach them; `apikey` makes,
//! lists and revokes API keys in the database.
//!
//! `main` only builds configuration and telemetry; each service lives in its
//! own library crate with `start(options, ..., shutdown)`, and the client
//! commands live in [`commands`].

/// mimalloc 2.1 (pinned in Cargo.toml): the collector spends ~4 µs less CPU
/// per report with it than with glibc's allocator, at the same memory
/// (README, Performance); mimalloc 2.2 and later did not keep that gain.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod apikey;
mod check;
mod client;
mod commands;
mod demo;
mod exit;
mod inventory;
mod output;
mod progress;
mod rollout_file;
mod sim_fleet;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use fleetpatch_bus::rabbitmq::{RabbitBackend, RabbitOptions};
use fleetpatch_bus::Bus;
use fleetpatch_collector::CollectorOptions;
use fleetpatch_runtime::telemetry::TelemetryOptions;
use fleetpatch_runtime::{Health, Shutdown};
use fleetpatch_scheduler::SchedulerOptions;
use fleetpatch_store::{Store, StoreOptions};
use fleetpatch_transport::sim::{SimFleet, SimOptions, SimTransport};
use fleetpatch_transport::sim_remote::RemoteSimTransport;
use fleetpatch_transport::Transports;
use fleetpatch_worker::WorkerOptions;
use serde::{Deserialize, Serialize};

/// The whole configuration: defaults < `--config` file < `FLEETPATCH__SECTION__KEY`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    database: StoreOptions,
    amqp: RabbitOptions,
    scheduler: SchedulerOptions,
    worker: WorkerOptions,
    collector: CollectorOptions,
    /// `fleetpatch relay`: a site's caching content server (it needs no
    /// database, broker or token key).
    relay: fleetpatch_relay::RelayOptions,
    /// The token key workers and collectors share.
    tokens: fleetpatch_runtime::tokens::TokenOptions,
    telemetry: TelemetryOptions,
    sim: SimOptions,
    /// The `ssh` transport; workers offer it only when this section is present.
    #[serde(skip_serializing_if = "Option::is_none")]
    ssh: Option<fleetpatch_transport_ssh::SshOptions>,
    /// The `smb` transport (Windows targets); workers always offer it.
    smb: fleetpatch_transport_smb::SmbTransportOptions,
    client: commands::ClientOptions,
    /// Named credentials (`[credentials.<name>]`): a secret reference and the
    /// scope it may be used for. Workers resolve them; the scheduler only
    /// checks that a rollout names one that exists.
    credentials: fleetpatch_runtime::credentials::Credentials,
}

impl Settings {
    fn validate(&self) -> anyhow::Result<()> {
        let checks = [
            self.scheduler.validate(),
            self.worker.validate(),
            self.collector.validate(),
            self.telemetry.validate(),
            self.sim.validate().map_err(|e| e.in_section("sim")),
            self.smb.validate().map_err(|e| e.in_section("smb")),
            self.database.validate(),
            fleetpatch_runtime::credentials::validate(&self.credentials, &fleetpatch_worker::CREDENTIAL_TRANSPORTS)
                .map_err(fleetpatch_runtime::ConfigError::from),
        ];
        for check in checks {
            if let Err(error) = check {
                bail!("invalid configuration: {error}");
            }
        }
        Ok(())
    }
}

#[derive(Parser)]
#[command(name = "fleetpatch", version, about = "Push patches to fleets of machines and prove what happened")]
struct Cli {
    /// Configuration file (TOML); environment variables FLEETPATCH__SECTION__KEY override it.
    #[arg(long, global = true, env = "FLEETPATCH_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective configuration and exit.
    #[arg(long, global = true)]
    print_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the database migrations.
    Migrate,
    /// Run the scheduler (REST API, dispatch, watchdog).
    Scheduler,
    /// Run a worker (probe, stage, start agents; cleanup and verification).
    Worker,
    /// Run the collector (agent reports on port 1072).
    Collector,
    /// Run scheduler, worker and collector in one process.
    All(AllArgs),
    /// Run a relay: a site's cache of installers, served to the agents on port 1073.
    Relay,
    /// Run the simulated fleet in a process of its own (workers reach it through `sim.fleet_url`).
    SimFleet(sim_fleet::SimFleetArgs),
    /// The whole pipeline in one process on SQLite and the in-process bus, against a simulated fleet.
    Demo(demo::DemoArgs),
    /// Measure the pipeline on the configured RabbitMQ and PostgreSQL next to their raw ceilings.
    Bench(fleetpatch_bench::BenchArgs),
    /// Create, list, show, watch and steer rollouts (a client of the scheduler API).
    #[command(subcommand)]
    Rollout(commands::RolloutCommand),
    /// List the targets of a rollout as a table (all pages).
    Targets(commands::TargetsArgs),
    /// Show one target: its patches and its timeline.
    Target(commands::TargetArgs),
    /// The API's audit log: who changed what, from where, with what result (admin).
    Audit(commands::AuditArgs),
    /// The messages the broker gave up on: list them, or move them back to their work queues.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(commands::DeadLettersCommand),
    /// Create, list and revoke API keys (in the database of database.url).
    ///
    /// `apikey create` prints the key once on stdout; the first admin key is
    /// made this way, against the database.
    #[command(subcommand)]
    Apikey(apikey::ApiKeyCommand),
    /// Preflight: can the workers deploy to these targets? (port, host key, login, rights, space, collector)
    ///
    /// One target (--host ...) or every target of a rollout file (-f). Exit
    /// status 8 when any check fails.
    Check(check::CheckArgs),
}

#[derive(clap::Args)]
struct AllArgs {
    /// Where the admin API key of this process is kept (mode 0600; reused while it is valid).
    #[arg(long, value_name = "FILE", default_value_os_t = std::env::temp_dir().join("fleetpatch-admin.key"))]
    admin_key_file: PathBuf,
}

/// Warnings only, so the demo's own output stays readable.
fn tracing_subscriber_init() -> fleetpatch_runtime::Result<fleetpatch_runtime::telemetry::TelemetryGuard> {
    let options = TelemetryOptions { log_filter: "warn".into(), ..TelemetryOptions::default() };
    fleetpatch_runtime::telemetry::init(&options, "fleetpatch-demo")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings: Settings = match fleetpatch_runtime::config::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("error: {}", fleetpatch_runtime::redact::url(&error.to_string()));
            return ExitCode::from(exit::INVALID);
        }
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = runtime_threads(cli.command.as_ref(), cli.print_config, &settings) {
        runtime.worker_threads(threads);
    }
    match runtime.enable_all().build() {
        Ok(runtime) => runtime.block_on(run(cli, settings)),
        Err(error) => {
            eprintln!("error: starting the async runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The threads of this process's async runtime when its command asks for a
/// number (`None`: one per core): `collector` runs on
/// `collector.worker_threads` (see [`CollectorOptions::worker_threads`]).
fn runtime_threads(command: Option<&Command>, print_config: bool, settings: &Settings) -> Option<usize> {
    match command {
        Some(Command::Collector) if !print_config => settings.collector.runtime_threads(),
        _ => None,
    }
}

async fn run(cli: Cli, mut settings: Settings) -> ExitCode {
    // The services see the top-level credentials through their options.
    settings.scheduler.credential_names = settings.credentials.keys().cloned().collect();
    settings.worker.credentials = settings.credentials.clone();
    if let Some(Command::Demo(args)) = cli.command {
        let _ = tracing_subscriber_init();
        return match demo::run(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Bench(args)) = cli.command {
        let _ = tracing_subscriber_init();
        return match fleetpatch_bench::run(
            args,
            &settings.database,
            &settings.amqp,
            &settings.collector,
            cli.config.as_deref(),
        )
        .await
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Relay) = cli.command {
        if cli.print_config {
            return print_config(settings).await;
        }
        return match run_relay(settings).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("Error: {error:?}");
                ExitCode::FAILURE
            }
        };
    }
    let environment = check::Environment {
        ssh: settings.ssh.clone(),
        smb: settings.smb.clone(),
        sim: settings.sim.clone(),
        collector_url: settings.worker.collector_url.clone(),
        agent_binaries: settings.worker.agent_binaries.clone(),
        credentials: settings.credentials.clone(),
    };
    if let Some(Command::Check(args)) = cli.command {
        if !cli.print_config {
            return match check::run(args, &environment).await {
                Ok(code) => ExitCode::from(code),
                Err(failure) => {
                    eprintln!("error: {}", failure.message);
                    ExitCode::from(failure.code)
                }
            };
        }
        return print_config(settings).await;
    }
    if let Some(Command::Apikey(command)) = cli.command {
        if cli.print_config {
            // The configuration it would use, as for every other command; no key is made.
            return print_config(settings).await;
        }
        if settings.database.url.is_empty() {
            eprintln!("error: invalid configuration: database.url must be set (apikey works on the database)");
            return ExitCode::from(exit::INVALID);
        }
        return match apikey::run(command, &settings.database).await {
            Ok(code) => ExitCode::from(code),
            Err(failure) => {
                eprintln!("error: {}", failure.message);
                ExitCode::from(failure.code)
            }
        };
    }
    let command = match cli.command {
        Some(Command::Rollout(command)) if !cli.print_config => Err(commands::ClientCommand::Rollout(command)),
        Some(Command::Audit(args)) if !cli.print_config => Err(commands::ClientCommand::Audit(args)),
        Some(Command::DeadLetters(command)) if !cli.print_config => Err(commands::ClientCommand::DeadLetters(command)),
        Some(Command::Targets(args)) if !cli.print_config => Err(commands::ClientCommand::Targets(args)),
        Some(Command::Target(args)) if !cli.print_config => Err(commands::ClientCommand::Target(args)),
        other => Ok(other),
    };
    let command = match command {
        Ok(service_command) => service_command,
        Err(client_command) => {
            return match commands::run(client_command, &settings.client, &environment).await {
                Ok(code) => ExitCode::from(code),
                Err(failure) => {
                    eprintln!("error: {}", failure.message);
                    ExitCode::from(failure.code)
                }
            }
        }
    };
    match run_service(cli.print_config, command, settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("Error: {error:?}");
            ExitCode::FAILURE
        }
    }
}

/// `relay`: needs only its own section and telemetry (no database, broker
/// or token key); stops and drains on SIGTERM.
async fn run_relay(settings: Settings) -> anyhow::Result<()> {
    for check in [settings.telemetry.validate(), settings.relay.validate()] {
        if let Err(error) = check {
            bail!("invalid configuration: {error}");
        }
    }
    let _telemetry = fleetpatch_runtime::telemetry::init(&settings.telemetry, "fleetpatch-relay")?;
    fleetpatch_runtime::ops::record_runtime_threads();
    let shutdown = Shutdown::on_signals();
    let handle = fleetpatch_relay::start(settings.relay, Health::new(), shutdown.clone()).await?;
    handle.join.await??;
    if let Some(reason) = shutdown.failure() {
        bail!("stopped because a component could not go on: {reason}");
    }
    Ok(())
}

/// `--print-config` with a command that would otherwise act (`check`,
/// `apikey`): the configuration it would use, and nothing done.
async fn print_config(settings: Settings) -> ExitCode {
    match run_service(true, None, settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("Error: {error:?}");
            ExitCode::FAILURE
        }
    }
}

/// `migrate`, a service, or `--print-config`.
async fn run_service(print_config: bool, command: Option<Command>, settings: Settings) -> anyhow::Result<()> {
    if print_config {
        print!("{}", fleetpatch_runtime::config::to_toml(&settings)?);
        return Ok(());
    }
    settings.validate()?;
    let Some(command) = command else {
        bail!("name a command: migrate, scheduler, worker, collector, all, relay, rollout, targets, target, audit, dead-letters, apikey or check (see --help)");
    };
    let service: &'static str = match command {
        Command::Migrate => "fleetpatch-migrate",
        Command::Scheduler => "fleetpatch-scheduler",
        Command::Worker => "fleetpatch-worker",
        Command::Collector => "fleetpatch-collector",
        Command::All(_) => "fleetpatch",
        Command::SimFleet(_) => "fleetpatch-sim-fleet",
        Command::Rollout(_)
        | Command::Targets(_)
        | Command::Target(_)
        | Command::Audit(_)
        | Command::DeadLetters(_)
        | Command::Apikey(_)
        | Command::Demo(_)
        | Command::Bench(_)
        | Command::Relay
        | Command::Check(_) => {
            unreachable!("client commands, check, the relay, the demo and the bench run above")
        }
    };
    let _telemetry = fleetpatch_runtime::telemetry::init(&settings.telemetry, service)?;
    fleetpatch_runtime::ops::record_runtime_threads();
    // Workers derive the agents' tokens from this key and collectors derive
    // them again to verify signed reports: one key per installation.
    let token_key = match command {
        Command::Worker | Command::Collector => {
            let service = if matches!(command, Command::Worker) { "worker" } else { "collector" };
            Some(fleetpatch_runtime::tokens::TokenKey::resolve(&settings.tokens, service)?)
        }
        Command::All(_) if settings.tokens.key_ref.is_empty() => {
            tracing::info!("tokens.key_ref is not set; worker and collector share a random token key of this process");
            Some(fleetpatch_runtime::tokens::TokenKey::random())
        }
        Command::All(_) => {
            Some(fleetpatch_runtime::tokens::TokenKey::resolve(&settings.tokens, "worker and collector")?)
        }
        _ => None,
    };
    if let Command::Migrate = command {
        let store = Store::connect(&settings.database).await?;
        store.migrate().await.context("applying migrations")?;
        tracing::info!("database migrated");
        return Ok(());
    }
    let shutdown = Shutdown::on_signals();
    if let Command::SimFleet(args) = command {
        return sim_fleet::run(args, settings.sim.clone(), shutdown).await;
    }
    // Started before the database or the broker (a restart of the whole
    // site, a pod scheduled first): wait for them, do not exit.
    let store = Store::connect_waiting(&settings.database, shutdown.wait()).await?;
    if let Command::All(args) = &command {
        // Out of the box: this process's own admin key, in a file only its owner reads.
        let created = apikey::ensure_admin_key_file(&store, &args.admin_key_file, "fleetpatch-all")
            .await
            .with_context(|| format!("keeping the admin API key in {}", args.admin_key_file.display()))?;
        tracing::info!(
            path = %args.admin_key_file.display(),
            created,
            "admin api key file (mode 0600): fleetpatch clients send it with FLEETPATCH_TOKEN=\"$(cat <path>)\""
        );
    }
    let bus = || async {
        let backend =
            RabbitBackend::connect_waiting(&settings.amqp, &fleetpatch_proto::routing::WORK_QUEUES, shutdown.wait())
                .await?;
        anyhow::Ok(Bus::new(Arc::new(backend)))
    };
    let token_key = || token_key.clone().expect("a token key for workers and collectors");
    let mut joins = Vec::new();
    if matches!(command, Command::Scheduler | Command::All(_)) {
        let handle = fleetpatch_scheduler::start(
            settings.scheduler.clone(),
            store.clone(),
            bus().await?,
            Health::new(),
            shutdown.clone(),
        )
        .await?;
        joins.push(tokio::spawn(async move { handle.join.await?.map_err(anyhow::Error::from) }));
    }
    if matches!(command, Command::Collector | Command::All(_)) {
        let handle = fleetpatch_collector::start(
            settings.collector.clone(),
            token_key(),
            store.clone(),
            bus().await?,
            Health::new(),
            shutdown.clone(),
        )
        .await?;
        joins.push(tokio::spawn(async move { handle.join.await?.map_err(anyhow::Error::from) }));
    }
    if matches!(command, Command::Worker | Command::All(_)) {
        let mut transports = match &settings.sim.fleet_url {
            Some(url) => Transports::default().with(Arc::new(RemoteSimTransport::new(url))),
            None => Transports::default().with(Arc::new(SimTransport::new(SimFleet::new(settings.sim.clone())))),
        };
        if let Some(ssh) = &settings.ssh {
            let transport = fleetpatch_transport_ssh::SshTransport::new(ssh.clone())
                .map_err(|error| anyhow::anyhow!("invalid configuration: ssh: {error}"))?;
            transports = transports.with(Arc::new(transport));
        }
        let smb = fleetpatch_transport_smb::SmbTransport::new(settings.smb.clone())
            .map_err(|error| anyhow::anyhow!("invalid configuration: smb: {error}"))?;
        transports = transports.with(Arc::new(smb));
        let worker = fleetpatch_worker::Worker::new(
            settings.worker.clone(),
            token_key(),
            store.clone(),
            bus().await?,
            transports,
        )?;
        let handle = worker.start(Health::new(), shutdown.clone()).await?;
        joins.push(tokio::spawn(async move { handle.join.await?.map_err(anyhow::Error::from) }));
    }
    for join in joins {
        join.await??;
    }
    store.close().await;
    if let Some(reason) = shutdown.failure() {
        // Never exit 0 unless asked to stop: a supervisor restarts failures only.
        bail!("stopped because a component could not go on: {reason}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_collector_runs_on_its_configured_threads() {
        let mut settings = Settings::default();
        assert_eq!(runtime_threads(Some(&Command::Collector), false, &settings), Some(1), "one by default");
        settings.collector.worker_threads = 3;
        assert_eq!(runtime_threads(Some(&Command::Collector), false, &settings), Some(3));
        // Scheduler, workers, everything in one process, or only printing the
        // configuration: one thread per core.
        let all = Command::All(AllArgs { admin_key_file: PathBuf::from("key") });
        for command in [Some(&Command::Scheduler), Some(&Command::Worker), Some(&all), None] {
            assert_eq!(runtime_threads(command, false, &settings), None);
        }
        assert_eq!(runtime_threads(Some(&Command::Collector), true, &settings), None);
        settings.collector.worker_threads = 0;
        assert_eq!(runtime_threads(Some(&Command::Collector), false, &settings), None, "0: one per core");
    }

    #[test]
    fn the_allocator_is_mimalloc_2_1() {
        // 2.2 and later lost the collector's gain (README, Performance): an
        // update of the crate must be measured again, not slip in.
        let version = ALLOCATOR.version();
        assert!((210..220).contains(&version), "mimalloc {version} is the global allocator; 2.1.x is pinned");
        // The process's allocations go through it: mimalloc knows the block.
        let block = Box::new([7u8; 100]);
        // SAFETY: `block` was allocated by the global allocator, `ALLOCATOR`.
        let usable = unsafe { ALLOCATOR.usable_size(block.as_ptr()) };
        assert!(usable >= 100, "mimalloc reports {usable} usable bytes for a block of 100");
    }

    #[test]
    fn the_database_settings_are_checked_with_the_rest() {
        let mut settings = Settings::default();
        settings.validate().unwrap();
        settings.database.max_connections = 0;
        let refused = settings.validate().unwrap_err().to_string();
        assert_eq!(refused, "invalid configuration: database.max_connections must be at least 1");
        settings.database.max_connections = 16;
        settings.database.url = String::new();
        let refused = settings.validate().unwrap_err().to_string();
        assert_eq!(refused, "invalid configuration: database.url must be set");
    }
}
