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
    pub output: crate::output::OutputFormat,
    /// Keep the bench database and queues (their names are printed).
    #[arg(long)]
    pub keep: bool,
}

// ---------------------------------------------------------------- child services

/// One service process, as a deployment runs it.
struct Service {
    name: String,
    child: Child,
    pid: u32,
    /// Base URL of its HTTP listener (`/readyz`, `/metrics`).
    url: String,
    log: PathBuf,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User + system CPU seconds (`/proc/PID/stat`, in USER_HZ = 100 ticks per second).
fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_cpu_seconds(&proc_stat_fields(&stat)?.1, false)
}

/// The fields of `/proc/PID/stat` after the command name (state first), and
/// the command name (`comm`).
fn proc_stat_fields(stat: &str) -> Option<(&str, Vec<&str>)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    Some((&stat[open + 1..close], stat.get(close + 2..)?.split_whitespace().collect()))
}

/// CPU seconds (user + system) of a process, and with `children` also of
/// its children that it has waited for: where the work of a PostgreSQL
/// backend goes when it disconnects.
fn stat_cpu_seconds(fields: &[&str], children: bool) -> Option<f64> {
    let tick = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    let own = tick(11)? + tick(12)?;
    Some(if children { own + tick(13)? + tick(14)? } else { own } / 100.0)
}

/// CPU time spent, machine-wide and per group of processes, at one moment.
#[derive(Debug, Clone, Default)]
struct CpuSnapshot {
    cores: usize,
    /// Busy seconds of all CPUs together (`/proc/stat`: all but idle and iowait).
    machine: f64,
    /// All seconds of all CPUs together, idle included: the busy share is
    /// read over the same ticks, so a run shorter than a few ticks cannot
    /// come out busier than every core.
    machine_total: f64,
    groups: BTreeMap<String, f64>,
}

/// Processes counted by their command name, with the children they reaped.
const CPU_GROUPS_BY_COMMAND: [(&str, &str); 2] = [("postgres", "postgresql"), ("beam.smp", "rabbitmq")];

impl CpuSnapshot {
    /// Now: the machine, `services` (name, pid), this process (named
    /// `this_process`: what it plays in the run) and, when they run on this
    /// machine, PostgreSQL and RabbitMQ (found by command name).
    fn take(this_process: &str, services: &[(String, u32)]) -> Self {
        let (cores, machine, machine_total) =
            std::fs::read_to_string("/proc/stat").ok().map(|text| Self::machine_busy(&text)).unwrap_or((0, 0.0, 0.0));
        let mut groups = BTreeMap::new();
        for (name, pid) in
            services.iter().map(|(name, pid)| (name.as_str(), *pid)).chain([(this_process, std::process::id())])
        {
            if let Some(seconds) = proc_cpu_seconds(pid) {
                groups.insert(name.to_owned(), seconds);
            }
        }
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            if !entry.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            let Some((command, fields)) = proc_stat_fields(&stat) else { continue };
            let Some((_, group)) = CPU_GROUPS_BY_COMMAND.iter().find(|(c, _)| *c == command) else { continue };
            if let Some(seconds) = stat_cpu_seconds(&fields, true) {
                *groups.entry((*group).to_owned()).or_default() += seconds;
            }
        }
        Self { cores, machine, machine_total, groups }
    }

    /// (CPUs, busy seconds of all of them, all seconds of all of them)
    /// from `/proc/stat`'s text.
    fn machine_busy(stat: &str) -> (usize, f64, f64) {
        let cores = stat.lines().filter(|l| l.starts_with("cpu") && !l.starts_with("cpu ")).count();
        let (busy, total) = stat
            .lines()
            .find(|l| l.starts_with("cpu "))
            .map(|line| {
                let ticks: Vec<f64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
                // user nice system idle iowait irq softirq steal (guest time is inside user)
                let sum = |fields: &[usize]| fields.iter().filter_map(|&i| ticks.get(i)).sum::<f64>() / 100.0;
                (sum(&[0, 1, 2, 5, 6, 7]), sum(&[0, 1, 2, 3, 4, 5, 6, 7]))
            })
            .unwrap_or((0.0, 0.0));
        (cores, busy, total)
    }

    /// What happened between `self` and `later`, per report (or request).
    fn per_report(&self, later: &CpuSnapshot, reports: usize, seconds: f64) -> CpuPerReport {
        let reports = reports.max(1) as f64;
        let busy = (later.machine - self.machine).max(0.0);
        let total = (later.machine_total - self.machine_total).max(0.0);
        let mut micros_per_report = BTreeMap::new();
        let mut counted = 0.0;
        for (name, after) in &later.groups {
            let spent = (after - self.groups.get(name).copied().unwrap_or(0.0)).max(0.0);
            counted += spent;
            micros_per_report.insert(name.clone(), spent * 1e6 / reports);
        }
        micros_per_report.insert("other".to_owned(), (busy - counted).max(0.0) * 1e6 / reports);
        CpuPerReport {
            cores: later.cores,
            machine_busy: if total > 0.0 {
                busy / total
            } else if seconds > 0.0 && later.cores > 0 {
                (busy / (seconds * later.cores as f64)).min(1.0)
            } else {
                0.0
            },
            micros_per_report,
            machine_micros_per_report: busy * 1e6 / reports,
            machine_bound_per_second: if busy > 0.0 { later.cores as f64 * reports / busy } else { 0.0 },
        }
    }
}

/// Where the machine's CPU went during a run, per report (or request).
#[derive(Debug, Default, Clone, Serialize)]
struct CpuPerReport {
    cores: usize,
    /// Busy share of all cores over the run (1.0: every core busy throughout).
    machine_busy: f64,
    /// CPU µs per report of each process group; `other` is the rest of the
    /// machine's busy time (other processes, the kernel's own threads).
    micros_per_report: BTreeMap<String, f64>,
    /// The machine's busy CPU µs per report, all groups together.
    machine_micros_per_report: f64,
    /// Cores ÷ busy CPU time per report: the most reports per second this
    /// machine could take at this cost per report with every core busy.
    machine_bound_per_second: f64,
}

impl CpuPerReport {
    /// One line; `per` is what the run counts (report, request).
    fn summary(&self, per: &str) -> String {
        let groups = self
            .micros_per_report
            .iter()
            .map(|(name, micros)| format!("{name} {micros:.0}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "CPU µs per {per}: {groups}; all {:.0} → at most {:.0}/s on {} cores (busy {:.0} %)",
            self.machine_micros_per_report,
            self.machine_bound_per_second,
            self.cores,
            self.machine_busy * 100.0
        )
    }
}

impl Service {
    fn spawn(
        name: &str,
        command: &str,
        env: &[(String, String)],
        config: Option<&Path>,
        dir: &Path,
        url: String,
    ) -> anyhow::Result<Service> {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(std::env::current_exe().context("finding this executable")?);
        if let Some(config) = config {
            cmd.arg("--config").arg(config);
        }
        cmd.arg(command)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true);
        let child = cmd.spawn().with_context(|| format!("starting the {name} process"))?;
        let pid = child.id().context("the child has a pid")?;
        Ok(Service { name: name.to_owned(), child, pid, url, log })
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    async fn wait_ready(&mut self, http: &reqwest::Client) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the {} process exited ({status}) while starting:\n{}", self.name, self.log_tail());
            }
            if let Ok(response) = http.get(format!("{}/readyz", self.url)).send().await {
                if response.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the {} process was not ready within 60 s:\n{}", self.name, self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn metrics(&self, http: &reqwest::Client) -> anyhow::Result<Metrics> {
        let text = http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .with_context(|| format!("scraping the {} process", self.name))?
            .text()
            .await?;
        Ok(Metrics::parse(&text))
    }

    fn cpu_seconds(&self) -> f64 {
        proc_cpu_seconds(self.pid).unwrap_or(0.0)
    }

    fn peak_kib(&self) -> u64 {
        proc_status_kib(self.pid, "VmHWM:").unwrap_or(0)
    }

    /// SIGTERM, then waits for the drain (killed after 30 s).
    async fn stop(mut self) -> anyhow::Result<()> {
        let _ = std::process::Command::new("kill").arg("-TERM").arg(self.pid.to_string()).status();
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    eprintln!("warning: the {} process ended with {status}:\n{}", self.name, self.log_tail());
                }
            }
            Err(_) => {
                eprintln!("warning: the {} process did not drain within 30 s; killed", self.name);
                self.child.kill().await?;
            }
        }
        Ok(())
    }
}

/// Peak resident memory of each service, sampled every 100 ms, per phase.
#[derive(Clone, Default)]
struct Sampler {
    pids: Arc<Mutex<BTreeMap<String, u32>>>,
    peaks: Arc<Mutex<BTreeMap<String, u64>>>,
    current: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl Sampler {
    fn watch(&self, service: &Service) {
        self.pids.lock().expect("sampler").insert(service.name.clone(), service.pid);
    }
    fn forget(&self, name: &str) {
        self.pids.lock().expect("sampler").remove(name);
    }
    /// The services watched now, by name.
    fn pids(&self) -> BTreeMap<String, u32> {
        self.pids.lock().expect("sampler").clone()
    }
    fn sample(&self) {
        let pids = self.pids.lock().expect("sampler").clone();
        let mut peaks = self.peaks.lock().expect("sampler");
        let mut current = self.current.lock().expect("sampler");
        for (name, pid) in pids {
            if let Some(rss) = proc_status_kib(pid, "VmRSS:") {
                let peak = peaks.entry(name.clone()).or_default();
                *peak = (*peak).max(rss);
                current.insert(name, rss);
            }
        }
    }
    fn start(&self, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
        let sampler = self.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                sampler.sample();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    }
    /// The peaks since the last call, in MiB.
    fn take_peaks(&self) -> BTreeMap<String, f64> {
        self.sample();
        std::mem::take(&mut *self.peaks.lock().expect("sampler"))
            .into_iter()
            .map(|(k, v)| (k, v as f64 / 1024.0))
            .collect()
    }
    fn current_mib(&self, name: &str) -> f64 {
        self.sample();
        self.current.lock().expect("sampler").get(name).copied().unwrap_or(0) as f64 / 1024.0
    }
}

// ---------------------------------------------------------------- metrics text

/// Prometheus text exposition, as name{labels} → value.
#[derive(Debug, Default, Clone)]
struct Metrics(Vec<(String, String, f64)>);

impl Metrics {
    fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text.lines().filter(|line| !line.starts_with('#') && !line.trim().is_empty()) {
            let Some((series, value)) = line.rsplit_once(' ') else { continue };
            let Ok(value) = value.parse::<f64>() else { continue };
            let (name, labels) = match series.find('{') {
                Some(brace) => (&series[..brace], series[brace..].to_owned()),
                None => (series, String::new()),
            };
            samples.push((name.to_owned(), labels, value));
        }
        Metrics(samples)
    }

    fn sum(&self, name: &str, label: &str) -> f64 {
        self.0.iter().filter(|(n, l, _)| n == name && l.contains(label)).map(|(_, _, v)| v).sum()
    }

    /// Cumulative bucket counts of a histogram, by upper bound.
    fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let bucket = format!("{name}_bucket");
        let mut out: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for (n, labels, value) in &self.0 {
            if *n != bucket {
                continue;
            }
            let Some(le) = labels.split("le=\"").nth(1).and_then(|rest| rest.split('"').next()) else { continue };
            let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::INFINITY) };
            let entry = out.entry(bound.to_bits()).or_insert((bound, 0.0));
            entry.1 += value;
        }
        let mut buckets: Vec<(f64, f64)> = out.into_values().collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        buckets
    }

    fn merge(mut self, other: Metrics) -> Metrics {
        self.0.extend(other.0);
        self
    }
}

/// The `q` quantile of the observations between two scrapes of a histogram,
/// interpolated linearly inside its bucket.
fn histogram_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let counts: Vec<(f64, f64)> = after
        .iter()
        .map(|(bound, count)| {
            let old = before.iter().find(|(b, _)| b == bound).map(|(_, c)| *c).unwrap_or(0.0);
            (*bound, count - old)
        })
        .collect();
    let total = counts.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for (bound, cumulative) in counts {
        if cumulative >= rank {
            if bound.is_infinite() {
                return Some(lower.0);
            }
            let share = if cumulative > lower.1 { (rank - lower.1) / (cumulative - lower.1) } else { 1.0 };
            return Some(lower.0 + (bound - lower.0) * share);
        }
        lower = (bound, cumulative);
    }
    None
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

// ---------------------------------------------------------------- the figures

#[derive(Debug, Default, Serialize)]
struct Figures {
    database: String,
    queue_prefix: String,
    broker_ceiling: Option<fleetpatch_bus::ceiling::BrokerCeiling>,
    database_ceiling: Option<fleetpatch_store::ceiling::DatabaseCeiling>,
    http_ceiling: Option<HttpCeiling>,
    /// The same senders and requests, signed, against the bare server
    /// verifying each request's MAC as the collector does.
    http_ceiling_with_mac: Option<HttpCeiling>,
    rollout: Option<RolloutFigures>,
    collector: Option<CollectorFigures>,
    watchdogs: Option<WatchdogFigures>,
    create: Option<CreateFigures>,
    services: BTreeMap<String, ServiceFigures>,
}

#[derive(Debug, Default, Serialize)]
struct RolloutFigures {
    targets: usize,
    patches: usize,
    concurrency: u32,
    seconds: f64,
    targets_per_second: f64,
    by_state: BTreeMap<String, u64>,
    reports_accepted: f64,
    reports_per_second: f64,
    report_latency_p50_ms: Option<f64>,
    report_latency_p99_ms: Option<f64>,
    bus_messages_published: f64,
    bus_messages_per_second: f64,
    bus_fraction_of_ceiling: Option<f64>,
    peak_rss_mib: BTreeMap<String, f64>,
}

#[derive(Debug, Default, Serialize)]
struct CollectorFigures {
    targets: usize,
    clients: usize,
    /// The collector as configured (batched writes).
    batched: CollectorRun,
    /// The same load on a collector that writes one report per transaction
    /// (`batch_max_reports = 1`, 8 writers, as the database ceiling's 8 clients).
    one_report_per_transaction: CollectorRun,
    /// `batched` ÷ `one_report_per_transaction`.
    vs_one_transaction_per_report: f64,
    fraction_of_batched_insert_ceiling: Option<f64>,
    /// `batched` ÷ the HTTP ceiling (one report per request in both).
    fraction_of_http_ceiling: Option<f64>,
    /// The paced run (`--collector-rate`), on the configured collector.
    paced: Option<PacedRun>,
    peak_rss_mib: BTreeMap<String, f64>,
}

/// The most report requests per second this machine answers through the
/// collector's HTTP stack with nothing behind it (see [`http_ceiling`]).
#[derive(Debug, Default, Serialize)]
struct HttpCeiling {
    requests: usize,
    clients: usize,
    seconds: f64,
    requests_per_second: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    /// Per request.
    cpu: CpuPerReport,
}

/// Agents that produce their reports on a clock (open loop) and send, one
/// request at a time each, every report that is ready: the real agent's
/// sender (`services/agent/src/reporter.rs`).
///
/// Its `seconds` run from the first report's production time to the last
/// acknowledgement; its latencies from the time a report was due to be
/// produced to its acknowledgement (a report that waits behind its agent's
/// request in flight counts that wait).
#[derive(Debug, Default, Serialize)]
struct PacedRun {
    agents: usize,
    offered_reports_per_second: f64,
    requests: usize,
    reports_per_request: f64,
    #[serde(flatten)]
    run: CollectorRun,
}

#[derive(Debug, Default, Serialize)]
struct CollectorRun {
    reports: usize,
    retried: usize,
    seconds: f64,
    reports_per_second: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    latency_max_ms: f64,
    all_targets_succeeded: bool,
    /// Where the machine's CPU went during the run, per report.
    cpu: Option<CpuPerReport>,
}

impl CollectorRun {
    /// The figures of `latencies` (ms, one per report) taken over `seconds`.
    fn measured(mut latencies: Vec<f64>, retried: usize, seconds: f64, all_targets_succeeded: bool) -> Self {
        latencies.sort_by(f64::total_cmp);
        Self {
            reports: latencies.len(),
            retried,
            seconds,
            reports_per_second: latencies.len() as f64 / seconds,
            latency_p50_ms: quantile(&latencies, 0.5),
            latency_p99_ms: quantile(&latencies, 0.99),
            latency_max_ms: latencies.last().copied().unwrap_or(0.0),
            all_targets_succeeded,
            cpu: None,
        }
    }
}

/// A target's agent as the bench plays it: it signs its requests with the
/// key derived from the token a worker would have staged.
#[derive(Clone)]
struct BenchAgent {
    target: Uuid,
    attempt: u32,
    key: SigningKey,
}

impl BenchAgent {
    /// The agent of `target`'s `attempt`, its token derived from `token_key` and `nonce`.
    fn new(token_key: &TokenKey, target: Uuid, attempt: u32, nonce: &str) -> Self {
        let token = report_auth::derive_token(token_key.as_bytes(), target, attempt, nonce);
        Self { target, attempt, key: SigningKey::from_token(&token) }
    }

    fn path(&self) -> String {
        format!("/v1/targets/{}/reports", self.target)
    }
}

/// One request of an agent's reports, signed now: `true` once acknowledged,
/// `false` when the collector is busy (503: send it again); any other
/// answer is an error.
async fn post_reports(http: &reqwest::Client, port: u16, agent: &BenchAgent, body: Vec<u8>) -> anyhow::Result<bool> {
    let path = agent.path();
    let url = format!("http://127.0.0.1:{port}{path}");
    let now_ms = chrono::Utc::now().timestamp_millis();
    let request = SignedRequest::new("POST", &path, agent.target, agent.attempt, now_ms, rand::random(), &body);
    let authorization = agent.key.authorization(&request);
    let response = http
        .post(&url)
        .header("authorization", authorization)
        .header("content-type", "application/x-protobuf")
        .body(body)
        .send()
        .await?;
    let status = response.status();
    let _ = response.bytes().await;
    match status.as_u16() {
        _ if status.is_success() => Ok(true),
        503 => Ok(false),
        _ => bail!("the collector refused reports at {url}: {status}"),
    }
}

#[derive(Debug, Default, Serialize)]
struct WatchdogFigures {
    watchdogs: usize,
    timeout_seconds: u32,
    armed_within_seconds: f64,
    timed_out: usize,
    /// Negative if a target timed out before its deadline (a bug).
    lateness_min_ms: f64,
    lateness_p50_ms: f64,
    lateness_p99_ms: f64,
    lateness_max_ms: f64,
    peak_rss_mib: BTreeMap<String, f64>,
}

#[derive(Debug, Default, Serialize)]
struct CreateFigures {
    targets: usize,
    seconds: f64,
    scheduler_rss_before_mib: f64,
    scheduler_rss_after_mib: f64,
    scheduler_peak_rss_mib: f64,
}

#[derive(Debug, Default, Serialize)]
struct ServiceFigures {
    cpu_seconds: f64,
    peak_rss_mib: f64,
}

// ---------------------------------------------------------------- the run

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
                    store.mark_installing(&context.target).await?;
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
    config: Option<&Path>,
) -> anyhow::Result<()> {
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
    let outcome = run_phases(&args, &bench_db, &amqp, config, &dir, &db_name).await;
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
        crate::output::OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&figures)?),
        crate::output::OutputFormat::Table => print_figures(&figures),
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
    let http = reqwest::Client::builder().pool_max_idle_per_host(1_024).build()?;
    // The key the collector derives the agents' tokens from; the bench plays
    // the workers and the agents, so it holds it too.
    let token_key_text = format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
    let token_key = TokenKey::from_bytes(token_key_text.clone().into_bytes())?;
    if args.collector_targets > 0 {
        let ceiling = http_ceiling(&http, args.collector_targets, args.patches, args.collector_clients, None)
            .await
            .context("measuring the HTTP ceiling")?;
        figures.http_ceiling = Some(ceiling);
        let ceiling =
            http_ceiling(&http, args.collector_targets, args.patches, args.collector_clients, Some(token_key.clone()))
                .await
                .context("measuring the HTTP ceiling with MAC checking")?;
        figures.http_ceiling_with_mac = Some(ceiling);
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
        // Nothing will deploy these: stop the rollout again.
        let _ = bench
            .http
            .post(format!("{}/v1/rollouts/{rollout}/abort", bench.api))
            .bearer_auth(&bench.api_key)
            .send()
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let peaks = bench.sampler.take_peaks();
        bench.figures.create = Some(CreateFigures {
            targets: args.create_targets,
            seconds,
            scheduler_rss_before_mib: rss_before,
            scheduler_rss_after_mib: bench.sampler.current_mib("scheduler"),
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

/// What one agent sends for `patches` patches, each report in its own
/// request: started and finished for each, a heartbeat, and the final result.
fn agent_reports(patches: usize) -> Vec<Vec<u8>> {
    agent_report_list(patches)
        .into_iter()
        .map(|report| v1::ReportBatch { reports: vec![report] }.encode_to_vec())
        .collect()
}

/// The reports of [`agent_reports`], in order.
fn agent_report_list(patches: usize) -> Vec<v1::AgentReport> {
    let mut reports = Vec::new();
    let mut seq = 0;
    let mut next = |kind| {
        seq += 1;
        v1::AgentReport { seq, sent_at_unix_ms: fleetpatch_bus::now_unix_ms(), kind: Some(kind) }
    };
    for index in 0..patches as u32 {
        reports.push(next(Kind::Started(v1::PatchStarted { patch_index: index })));
        if index == 0 {
            reports.push(next(Kind::Heartbeat(v1::Heartbeat { patch_index: Some(index) })));
        }
        reports.push(next(Kind::Finished(v1::PatchFinished {
            patch_index: index,
            exit_code: 0,
            outcome: v1::PatchOutcome::Installed as i32,
            output_tail: "The update was installed successfully.".into(),
            duration_ms: 20,
        })));
    }
    reports.push(next(Kind::Final(v1::FinalResult {
        success: true,
        reboot_required: false,
        message: "all patches installed".into(),
    })));
    reports
}

/// The same agents' load, first on a collector that writes one report per
/// transaction, then on the configured one.
async fn collector_phase(bench: &mut Bench, collector_port: u16, collector_pid: u32) -> anyhow::Result<()> {
    let args = bench.args.clone();
    let naive_port = free_port()?;
    let mut env = bench.env.clone();
    env.extend([
        ("FLEETPATCH__COLLECTOR__LISTEN".to_owned(), format!("127.0.0.1:{naive_port}")),
        ("FLEETPATCH__COLLECTOR__BATCH_MAX_REPORTS".to_owned(), "1".to_owned()),
        ("FLEETPATCH__COLLECTOR__WRITERS".to_owned(), "8".to_owned()),
    ]);
    let mut naive = Service::spawn(
        "collector-one-per-transaction",
        "collector",
        &env,
        bench.config.as_deref(),
        &bench.dir,
        format!("http://127.0.0.1:{naive_port}"),
    )?;
    naive.wait_ready(&bench.http).await?;
    let one_report_per_transaction = collector_load(bench, naive_port, naive.pid).await?;
    naive.stop().await?;
    bench.sampler.take_peaks();
    let batched = collector_load(bench, collector_port, collector_pid).await?;
    let rate = batched.reports_per_second;
    bench.figures.collector = Some(CollectorFigures {
        targets: args.collector_targets,
        clients: args.collector_clients,
        vs_one_transaction_per_report: rate / one_report_per_transaction.reports_per_second.max(1e-9),
        one_report_per_transaction,
        batched,
        fraction_of_batched_insert_ceiling: bench
            .figures
            .database_ceiling
            .as_ref()
            .map(|c| rate / c.batched_rows_per_second),
        fraction_of_http_ceiling: bench.figures.http_ceiling.as_ref().map(|c| rate / c.requests_per_second),
        paced: None,
        peak_rss_mib: BTreeMap::new(),
    });
    if args.collector_rate > 0 {
        let paced = paced_collector_load(bench, collector_port, collector_pid, f64::from(args.collector_rate)).await?;
        if let Some(figures) = bench.figures.collector.as_mut() {
            figures.paced = Some(paced);
        }
    }
    if let Some(figures) = bench.figures.collector.as_mut() {
        figures.peak_rss_mib = bench.sampler.take_peaks();
    }
    Ok(())
}

/// `collector_targets` agents produce their reports on a clock, `rate`
/// reports/s in all (each agent one every `agents / rate` s, the agents
/// staggered evenly), and each sends everything ready in one request,
/// waiting for the acknowledgement before its next: what the real agent's
/// sender does. Load that the collector does not keep up with piles up in
/// the agents, so their requests grow instead of their number.
async fn paced_collector_load(
    bench: &Bench,
    collector_port: u16,
    collector_pid: u32,
    rate: f64,
) -> anyhow::Result<PacedRun> {
    let args = &bench.args;
    let agents = args.collector_targets;
    let rollout =
        bench.store.create_rollout(NewRollout::synthetic("bench-collector-paced", agents, args.patches, 600)).await?;
    bench.wait_all(rollout, TargetState::Queued, agents, Duration::from_secs(300)).await?;
    let tokens = bench.bring_to_running(rollout).await?;
    bench.wait_for_outbox().await?;
    let reports = Arc::new(agent_report_list(args.patches));
    let gap = Duration::from_secs_f64(agents as f64 / rate);
    let before = bench.cpu_now(collector_pid);
    let started = tokio::time::Instant::now() + Duration::from_millis(200);
    let mut tasks = tokio::task::JoinSet::new();
    for (index, agent) in tokens.into_iter().enumerate() {
        let (http, reports) = (bench.http.clone(), reports.clone());
        let first = started + gap.mul_f64(index as f64 / agents as f64);
        tasks.spawn(async move {
            let due = |k: usize| first + gap * k as u32;
            let (mut latencies, mut requests, mut retried) = (Vec::with_capacity(reports.len()), 0usize, 0usize);
            let mut produced = 0;
            while latencies.len() < reports.len() {
                let now = tokio::time::Instant::now();
                while produced < reports.len() && due(produced) <= now {
                    produced += 1;
                }
                let ready = latencies.len()..produced;
                if ready.is_empty() {
                    tokio::time::sleep_until(due(produced)).await;
                    continue;
                }
                let body = v1::ReportBatch { reports: reports[ready.clone()].to_vec() }.encode_to_vec();
                requests += 1;
                if post_reports(&http, collector_port, &agent, body).await? {
                    let acked = tokio::time::Instant::now();
                    latencies.extend(ready.map(|k| (acked - due(k)).as_secs_f64() * 1_000.0));
                } else {
                    retried += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            anyhow::Ok((latencies, requests, retried, tokio::time::Instant::now()))
        });
    }
    let (mut latencies, mut requests, mut retried) = (Vec::new(), 0, 0);
    let mut last_ack = started;
    while let Some(task) = tasks.join_next().await {
        let (mine, sent, again, done) = task??;
        latencies.extend(mine);
        requests += sent;
        retried += again;
        last_ack = last_ack.max(done);
    }
    let seconds = (last_ack - started).as_secs_f64();
    let cpu = before.per_report(&bench.cpu_now(collector_pid), latencies.len(), seconds);
    let succeeded = bench.counts(rollout).await?.get("succeeded").copied().unwrap_or(0) as usize;
    let reports_per_request = latencies.len() as f64 / requests.max(1) as f64;
    let mut run = CollectorRun::measured(latencies, retried, seconds, succeeded == agents);
    run.cpu = Some(cpu);
    Ok(PacedRun { agents, offered_reports_per_second: rate, requests, reports_per_request, run })
}

/// Brings `collector_targets` targets to running, then their agents post
/// every report, each in its own request, `collector_clients` at a time, to
/// the collector on `collector_port` (process `collector_pid`).
async fn collector_load(bench: &Bench, collector_port: u16, collector_pid: u32) -> anyhow::Result<CollectorRun> {
    let args = &bench.args;
    let rollout = bench
        .store
        .create_rollout(NewRollout::synthetic("bench-collector", args.collector_targets, args.patches, 600))
        .await?;
    bench.wait_all(rollout, TargetState::Queued, args.collector_targets, Duration::from_secs(300)).await?;
    let tokens = bench.bring_to_running(rollout).await?;
    bench.wait_for_outbox().await?;
    let before = bench.cpu_now(collector_pid);
    let sent =
        send_all(&bench.http, collector_port, tokens, agent_reports(args.patches), args.collector_clients).await?;
    let cpu = before.per_report(&bench.cpu_now(collector_pid), sent.latencies.len(), sent.seconds);
    let succeeded = bench.counts(rollout).await?.get("succeeded").copied().unwrap_or(0) as usize;
    let mut run =
        CollectorRun::measured(sent.latencies, sent.retried, sent.seconds, succeeded == args.collector_targets);
    run.cpu = Some(cpu);
    Ok(run)
}

/// What [`send_all`] measured.
struct Sent {
    /// Milliseconds from sending each acknowledged request to its answer.
    latencies: Vec<f64>,
    retried: usize,
    seconds: f64,
}

/// `clients` senders take the targets one after the other and post each
/// target's `requests` in order, one at a time, to port `port`; a 503 is
/// sent again after 20 ms.
async fn send_all(
    http: &reqwest::Client,
    port: u16,
    targets: Vec<BenchAgent>,
    requests: Vec<Vec<u8>>,
    clients: usize,
) -> anyhow::Result<Sent> {
    let (targets, requests) = (Arc::new(targets), Arc::new(requests));
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients.max(1) {
        let (http, targets, next, requests) = (http.clone(), targets.clone(), next.clone(), requests.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut retried = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(agent) = targets.get(i) else { break };
                for body in requests.iter() {
                    loop {
                        let sent = Instant::now();
                        if post_reports(&http, port, agent, body.clone()).await? {
                            latencies.push(sent.elapsed().as_secs_f64() * 1_000.0);
                            break;
                        }
                        retried += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            anyhow::Ok((latencies, retried))
        }));
    }
    let mut sent = Sent { latencies: Vec::new(), retried: 0, seconds: 0.0 };
    for task in tasks {
        let (mine, again) = task.await??;
        sent.latencies.extend(mine);
        sent.retried += again;
    }
    sent.seconds = started.elapsed().as_secs_f64();
    Ok(sent)
}

/// The HTTP ceiling: the same senders, requests and client as the
/// collector phase, against the collector's server stack with nothing
/// behind it ([`fleetpatch_collector::ceiling`]), served from this process.
/// With `verify_with`, the bare server also verifies every request's MAC
/// (and refuses replays) as the collector does; without, it checks nothing.
/// The senders sign their requests in both runs, so the difference between
/// the two is the server's MAC checking.
async fn http_ceiling(
    http: &reqwest::Client,
    targets: usize,
    patches: usize,
    clients: usize,
    verify_with: Option<TokenKey>,
) -> anyhow::Result<HttpCeiling> {
    let token_key = verify_with.clone().unwrap_or_else(TokenKey::random);
    let server = fleetpatch_collector::ceiling::serve_bare("127.0.0.1:0", verify_with).await?;
    let targets: Vec<BenchAgent> = (0..targets)
        .map(|_| BenchAgent::new(&token_key, Uuid::new_v4(), 1, fleetpatch_collector::ceiling::BARE_TOKEN_NONCE))
        .collect();
    let before = CpuSnapshot::take("bench agents and bare server", &[]);
    let sent = send_all(http, server.local_addr.port(), targets, agent_reports(patches), clients).await;
    let after = CpuSnapshot::take("bench agents and bare server", &[]);
    server.stop.cancel();
    server.join.await??;
    let mut sent = sent?;
    sent.latencies.sort_by(f64::total_cmp);
    Ok(HttpCeiling {
        requests: sent.latencies.len(),
        clients,
        seconds: sent.seconds,
        requests_per_second: sent.latencies.len() as f64 / sent.seconds,
        latency_p50_ms: quantile(&sent.latencies, 0.5),
        latency_p99_ms: quantile(&sent.latencies, 0.99),
        cpu: before.per_report(&after, sent.latencies.len(), sent.seconds),
    })
}

async fn watchdog_phase(bench: &mut Bench) -> anyhow::Result<()> {
    let args = bench.args.clone();
    let rollout = bench
        .store
        .create_rollout(NewRollout::synthetic("bench-watchdogs", args.watchdogs, 1, args.watchdog_timeout))
        .await?;
    bench.wait_all(rollout, TargetState::Queued, args.watchdogs, Duration::from_secs(300)).await?;
    bench.sampler.take_peaks();
    let started = Instant::now();
    bench.bring_to_running(rollout).await?;
    let armed_within = started.elapsed().as_secs_f64();
    bench
        .wait_all(
            rollout,
            TargetState::TimedOut,
            args.watchdogs,
            Duration::from_secs(u64::from(args.watchdog_timeout) + 600),
        )
        .await?;
    let targets = bench.store.targets(rollout, None, None, u64::MAX >> 1).await?;
    let timed_out_at: BTreeMap<Uuid, chrono::DateTime<chrono::Utc>> = bench
        .store
        .rollout_transitions(rollout)
        .await?
        .into_iter()
        .filter(|t| t.to == TargetState::TimedOut.as_str())
        .map(|t| (t.target_id, t.at))
        .collect();
    let mut lateness: Vec<f64> = targets
        .iter()
        .filter_map(|target| {
            let last = target.last_seen_at.into_iter().chain(target.running_at).max()?;
            let deadline = last + chrono::Duration::seconds(i64::from(target.timeout_seconds));
            let at = timed_out_at.get(&target.id)?;
            Some((*at - deadline).num_microseconds()? as f64 / 1_000.0)
        })
        .collect();
    lateness.sort_by(f64::total_cmp);
    bench.figures.watchdogs = Some(WatchdogFigures {
        watchdogs: args.watchdogs,
        timeout_seconds: args.watchdog_timeout,
        armed_within_seconds: armed_within,
        timed_out: lateness.len(),
        lateness_min_ms: lateness.first().copied().unwrap_or(0.0),
        lateness_p50_ms: quantile(&lateness, 0.5),
        lateness_p99_ms: quantile(&lateness, 0.99),
        lateness_max_ms: lateness.last().copied().unwrap_or(0.0),
        peak_rss_mib: bench.sampler.take_peaks(),
    });
    Ok(())
}

fn print_figures(f: &Figures) {
    let opt = |v: Option<f64>, unit: &str| v.map(|v| format!("{v:.1} {unit}")).unwrap_or_else(|| "-".into());
    let peaks = |p: &BTreeMap<String, f64>| p.iter().map(|(k, v)| format!("{k} {v:.0}")).collect::<Vec<_>>().join(", ");
    println!("\nfleetpatch bench (database {}, queue prefix {})", f.database, f.queue_prefix);
    if let Some(c) = &f.broker_ceiling {
        println!("  broker ceiling      {:>10.0} msg/s  ({} × {} B, publish with confirms + consume with ack, one quorum queue)", c.per_second, c.messages, c.payload_bytes);
    }
    if let Some(c) = &f.database_ceiling {
        println!(
            "  database ceiling    {:>10.0} rows/s in {}-row INSERTs; {:.0} one-row transactions/s ({} clients)",
            c.batched_rows_per_second, c.batch_rows, c.single_row_transactions_per_second, c.clients
        );
    }
    if let Some(r) = &f.rollout {
        println!(
            "  rollout             {} targets × {} patches at concurrency {}: {:.1} s, {:.0} targets/s",
            r.targets, r.patches, r.concurrency, r.seconds, r.targets_per_second
        );
        println!("                      final states {:?}", r.by_state);
        println!(
            "                      {:.0} reports accepted, {:.0} reports/s; report latency p50 {} p99 {}",
            r.reports_accepted,
            r.reports_per_second,
            opt(r.report_latency_p50_ms, "ms"),
            opt(r.report_latency_p99_ms, "ms")
        );
        println!(
            "                      bus {:.0} messages, {:.0}/s = {} of the broker ceiling",
            r.bus_messages_published,
            r.bus_messages_per_second,
            opt(r.bus_fraction_of_ceiling.map(|x| x * 100.0), "%")
        );
        println!("                      peak RSS MiB: {}", peaks(&r.peak_rss_mib));
    }
    if let Some(c) = &f.http_ceiling {
        println!(
            "  HTTP ceiling        {:>10.0} requests/s ({} one-report requests, {} concurrent senders, the collector's \
             server stack answering at once); latency p50 {:.1} ms, p99 {:.1} ms",
            c.requests_per_second, c.requests, c.clients, c.latency_p50_ms, c.latency_p99_ms
        );
        println!("                      {}", c.cpu.summary("request"));
    }
    if let Some(c) = &f.http_ceiling_with_mac {
        println!(
            "  HTTP ceiling, MAC   {:>10.0} requests/s (the same signed requests, the bare server verifying each MAC \
             and nonce as the collector does); latency p50 {:.1} ms, p99 {:.1} ms",
            c.requests_per_second, c.latency_p50_ms, c.latency_p99_ms
        );
        println!("                      {}", c.cpu.summary("request"));
        if let Some(bare) = &f.http_ceiling {
            let mac = c.cpu.machine_micros_per_report - bare.cpu.machine_micros_per_report;
            let collector = f
                .collector
                .as_ref()
                .and_then(|c| c.batched.cpu.as_ref())
                .and_then(|cpu| cpu.micros_per_report.get("collector").copied());
            match collector {
                Some(collector) => println!(
                    "                      MAC checking: {mac:+.1} CPU µs per request = {:.1} % of the collector's CPU per \
                     report in the batched run ({collector:.0} µs)",
                    mac / collector * 100.0
                ),
                None => println!("                      MAC checking: {mac:+.1} CPU µs per request"),
            }
        }
    }
    if let Some(c) = &f.collector {
        let cpu = |r: &CollectorRun| {
            if let Some(cpu) = &r.cpu {
                println!("                        {}", cpu.summary("report"));
            }
        };
        let run = |label: &str, r: &CollectorRun| {
            println!(
                "                      {label}: {} reports in {:.1} s, {:.0} reports/s; latency p50 {:.1} ms, p99 {:.1} ms, \
                 max {:.1} ms; retried {}; all targets succeeded: {}",
                r.reports,
                r.seconds,
                r.reports_per_second,
                r.latency_p50_ms,
                r.latency_p99_ms,
                r.latency_max_ms,
                r.retried,
                r.all_targets_succeeded
            );
            cpu(r);
        };
        println!(
            "  collector           {} targets' agents, {} concurrent senders, one report per request",
            c.targets, c.clients
        );
        run("batched", &c.batched);
        run("one report per transaction", &c.one_report_per_transaction);
        println!(
            "                      batched = {:.2} × one report per transaction; {} of the batched INSERT ceiling; \
             {} of the HTTP ceiling",
            c.vs_one_transaction_per_report,
            opt(c.fraction_of_batched_insert_ceiling.map(|x| x * 100.0), "%"),
            opt(c.fraction_of_http_ceiling.map(|x| x * 100.0), "%")
        );
        if let Some(p) = &c.paced {
            println!(
                "                      paced: {} agents offering {:.0} reports/s, each sending what is ready: {} reports \
                 in {:.1} s, {:.0} reports/s; {} requests ({:.2} reports per request); latency from production p50 \
                 {:.1} ms, p99 {:.1} ms, max {:.1} ms; retried {}; all targets succeeded: {}",
                p.agents,
                p.offered_reports_per_second,
                p.run.reports,
                p.run.seconds,
                p.run.reports_per_second,
                p.requests,
                p.reports_per_request,
                p.run.latency_p50_ms,
                p.run.latency_p99_ms,
                p.run.latency_max_ms,
                p.run.retried,
                p.run.all_targets_succeeded
            );
            cpu(&p.run);
        }
        println!("                      peak RSS MiB: {}", peaks(&c.peak_rss_mib));
    }
    if let Some(w) = &f.watchdogs {
        println!("  watchdogs           {} armed within {:.1} s, timeout {} s: {} timed out; lateness p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms", w.watchdogs, w.armed_within_seconds, w.timeout_seconds, w.timed_out, w.lateness_p50_ms, w.lateness_p99_ms, w.lateness_max_ms);
        println!("                      peak RSS MiB: {}", peaks(&w.peak_rss_mib));
    }
    if let Some(c) = &f.create {
        println!(
            "  create              {} targets accepted in {:.2} s; scheduler RSS {:.0} → {:.0} MiB (peak {:.0} MiB)",
            c.targets, c.seconds, c.scheduler_rss_before_mib, c.scheduler_rss_after_mib, c.scheduler_peak_rss_mib
        );
    }
    for (name, s) in &f.services {
        println!("  {name:<19} {:.1} CPU s, peak RSS {:.0} MiB", s.cpu_seconds, s.peak_rss_mib);
    }
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
        let before = CpuSnapshot {
            cores: 2,
            machine: 100.0,
            machine_total: 200.0,
            groups: group(&[("collector", 10.0), ("postgresql", 20.0)]),
        };
        let after = CpuSnapshot {
            cores: 2,
            machine: 101.5,
            machine_total: 202.0,
            groups: group(&[("collector", 10.5), ("postgresql", 21.0), ("bench agents", 0.0)]),
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
    fn an_agent_sends_started_and_finished_per_patch_a_heartbeat_and_a_final() {
        let reports = agent_reports(3);
        assert_eq!(reports.len(), 8);
        let seqs: Vec<u64> =
            reports.iter().map(|r| v1::ReportBatch::decode(r.as_slice()).unwrap().reports[0].seq).collect();
        assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
    }
}
