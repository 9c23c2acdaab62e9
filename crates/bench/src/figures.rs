//! What a run measured, and how it is printed.

use super::*;

#[derive(Debug, Default, Serialize)]
pub(crate) struct Figures {
    pub(crate) database: String,
    pub(crate) queue_prefix: String,
    pub(crate) broker_ceiling: Option<fleetpatch_bus::ceiling::BrokerCeiling>,
    pub(crate) database_ceiling: Option<fleetpatch_store::ceiling::DatabaseCeiling>,
    /// The database floor of a report: the CPU of writing one row of the
    /// event table's shape in the collector's batch size, per row.
    pub(crate) database_floor: Option<CpuPerReport>,
    pub(crate) http_ceiling: Option<HttpCeiling>,
    /// The same senders and requests, signed, against the bare server
    /// verifying each request's MAC as the collector does.
    pub(crate) http_ceiling_with_mac: Option<HttpCeiling>,
    /// The collector's paced run's load against the bare server verifying
    /// MACs (`paced_http_floor`): the HTTP floor of the paced run.
    pub(crate) http_floor_paced: Option<PacedHttpFloor>,
    /// CPU µs to verify one signed request, on one thread (`mac_verify_micros`).
    pub(crate) mac_verify_micros: Option<f64>,
    pub(crate) rollout: Option<RolloutFigures>,
    pub(crate) collector: Option<CollectorFigures>,
    pub(crate) watchdogs: Option<WatchdogFigures>,
    pub(crate) create: Option<CreateFigures>,
    pub(crate) services: BTreeMap<String, ServiceFigures>,
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct RolloutFigures {
    pub(crate) targets: usize,
    pub(crate) patches: usize,
    pub(crate) concurrency: u32,
    pub(crate) seconds: f64,
    pub(crate) targets_per_second: f64,
    pub(crate) by_state: BTreeMap<String, u64>,
    pub(crate) reports_accepted: f64,
    pub(crate) reports_per_second: f64,
    pub(crate) report_latency_p50_ms: Option<f64>,
    pub(crate) report_latency_p99_ms: Option<f64>,
    pub(crate) bus_messages_published: f64,
    pub(crate) bus_messages_per_second: f64,
    pub(crate) bus_fraction_of_ceiling: Option<f64>,
    pub(crate) peak_rss_mib: BTreeMap<String, f64>,
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct CollectorFigures {
    pub(crate) targets: usize,
    pub(crate) clients: usize,
    /// Each agent's reports, and how many of them are heartbeats.
    pub(crate) reports_per_agent: usize,
    pub(crate) heartbeats_per_agent: usize,
    /// The collector as configured (batched writes).
    pub(crate) batched: CollectorRun,
    /// The same load on a collector that writes one report per transaction
    /// (`batch_max_reports = 1`, 8 writers, as the database ceiling's 8 clients).
    pub(crate) one_report_per_transaction: CollectorRun,
    /// `batched` ÷ `one_report_per_transaction`.
    pub(crate) vs_one_transaction_per_report: f64,
    pub(crate) fraction_of_batched_insert_ceiling: Option<f64>,
    /// `batched` ÷ the HTTP ceiling (one report per request in both).
    pub(crate) fraction_of_http_ceiling: Option<f64>,
    /// The paced run (`--collector-rate`), on the configured collector.
    pub(crate) paced: Option<PacedRun>,
    pub(crate) peak_rss_mib: BTreeMap<String, f64>,
}

/// The most report requests per second this machine answers through the
/// collector's HTTP stack with nothing behind it (see [`http_ceiling`]).
#[derive(Debug, Default, Serialize)]
pub(crate) struct HttpCeiling {
    pub(crate) requests: usize,
    pub(crate) clients: usize,
    /// The bare server's runtime threads (the collector's).
    pub(crate) server_threads: usize,
    pub(crate) seconds: f64,
    pub(crate) requests_per_second: f64,
    pub(crate) latency_p50_ms: f64,
    pub(crate) latency_p99_ms: f64,
    /// Per request.
    pub(crate) cpu: CpuPerReport,
}

/// The paced run's agents against the bare server (see [`paced_http_floor`]).
#[derive(Debug, Default, Serialize)]
pub(crate) struct PacedHttpFloor {
    pub(crate) reports: usize,
    pub(crate) requests: usize,
    pub(crate) reports_per_request: f64,
    pub(crate) seconds: f64,
    /// Per report.
    pub(crate) cpu: CpuPerReport,
}

impl PacedHttpFloor {
    /// The bare server's CPU µs per report and per request.
    pub(crate) fn bare_micros(&self) -> (f64, f64) {
        let per_report = self.cpu.micros("bare server");
        (per_report, per_report * self.reports_per_request)
    }
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
pub(crate) struct PacedRun {
    pub(crate) agents: usize,
    pub(crate) offered_reports_per_second: f64,
    pub(crate) requests: usize,
    pub(crate) reports_per_request: f64,
    #[serde(flatten)]
    pub(crate) run: CollectorRun,
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct CollectorRun {
    pub(crate) reports: usize,
    pub(crate) retried: usize,
    pub(crate) seconds: f64,
    pub(crate) reports_per_second: f64,
    pub(crate) latency_p50_ms: f64,
    pub(crate) latency_p99_ms: f64,
    pub(crate) latency_max_ms: f64,
    pub(crate) all_targets_succeeded: bool,
    /// Where the machine's CPU went during the run, per report.
    pub(crate) cpu: Option<CpuPerReport>,
    /// PostgreSQL's time by statement during the run, per report, most
    /// first, when the server has `pg_stat_statements` loaded.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) statements: Vec<StatementCost>,
}

/// One statement's time inside PostgreSQL during a run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StatementCost {
    /// The statement's text as PostgreSQL normalized it, shortened.
    pub(crate) query: String,
    pub(crate) calls_per_report: f64,
    pub(crate) micros_per_report: f64,
}

impl StatementCost {
    /// The statements between two readings, per report.
    pub(crate) fn per_report(
        before: &Option<StatementReadings>,
        after: &Option<StatementReadings>,
        reports: usize,
    ) -> Vec<Self> {
        let (Some(before), Some(after)) = (before, after) else { return Vec::new() };
        let reports = reports.max(1) as f64;
        fleetpatch_store::ceiling::statements_between(before, after)
            .into_iter()
            .map(|s| StatementCost {
                query: s.query.split_whitespace().collect::<Vec<_>>().join(" ").chars().take(90).collect(),
                calls_per_report: s.calls as f64 / reports,
                micros_per_report: s.milliseconds * 1e3 / reports,
            })
            .collect()
    }
}

/// `pg_stat_statements`' totals by query id.
pub(crate) type StatementReadings = std::collections::HashMap<i64, fleetpatch_store::ceiling::StatementTotals>;

impl CollectorRun {
    /// The figures of `latencies` (ms, one per report) taken over `seconds`.
    pub(crate) fn measured(mut latencies: Vec<f64>, retried: usize, seconds: f64, all_targets_succeeded: bool) -> Self {
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
            statements: Vec::new(),
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct WatchdogFigures {
    pub(crate) watchdogs: usize,
    pub(crate) timeout_seconds: u32,
    pub(crate) armed_within_seconds: f64,
    pub(crate) timed_out: usize,
    /// Negative if a target timed out before its deadline (a bug).
    pub(crate) lateness_min_ms: f64,
    pub(crate) lateness_p50_ms: f64,
    pub(crate) lateness_p99_ms: f64,
    pub(crate) lateness_max_ms: f64,
    pub(crate) peak_rss_mib: BTreeMap<String, f64>,
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct CreateFigures {
    pub(crate) targets: usize,
    pub(crate) seconds: f64,
    pub(crate) scheduler_rss_before_mib: f64,
    pub(crate) scheduler_rss_after_mib: f64,
    /// Over the create alone (sampled every 100 ms), before the abort.
    pub(crate) scheduler_peak_rss_mib: f64,
    /// The abort of those targets that follows (not part of acceptance).
    pub(crate) abort_seconds: f64,
    pub(crate) abort_peak_rss_mib: f64,
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct ServiceFigures {
    pub(crate) cpu_seconds: f64,
    pub(crate) peak_rss_mib: f64,
}

// ---------------------------------------------------------------- the run

/// The collector's CPU µs per report in the batched run, what the MAC's
/// cost is set against.
fn batched_collector_micros(f: &Figures) -> Option<f64> {
    f.collector
        .as_ref()
        .and_then(|c| c.batched.cpu.as_ref())
        .and_then(|cpu| cpu.micros_per_report.get("collector").copied())
}

pub(crate) fn print_figures(f: &Figures) {
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
    if let Some(floor) = &f.database_floor {
        println!(
            "  database floor      {:>10.1} CPU µs of PostgreSQL per row ({:.1} µs the client) in batched INSERTs of \
             the event table's shape: what a report kept as a row must cost the database at least",
            floor.micros("postgresql"),
            floor.micros("bench")
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
             server stack answering at once on {} threads, as the collector's); latency p50 {:.1} ms, p99 {:.1} ms",
            c.requests_per_second, c.requests, c.clients, c.server_threads, c.latency_p50_ms, c.latency_p99_ms
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
            let collector = batched_collector_micros(f);
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
    if let Some(micros) = f.mac_verify_micros {
        let collector = batched_collector_micros(f);
        match collector {
            Some(collector) => println!(
                "  MAC verification    {micros:>10.2} CPU µs per request on one thread (header, clock, body hash, MAC) = \
                 {:.1} % of the collector's CPU per report in the batched run ({collector:.0} µs)",
                micros / collector * 100.0
            ),
            None => println!("  MAC verification    {micros:>10.2} CPU µs per request on one thread"),
        }
    }
    if let Some(floor) = &f.http_floor_paced {
        let (bare, bare_per_request) = floor.bare_micros();
        println!(
            "  HTTP floor, paced   {} reports in {} requests ({:.2} per request) in {:.1} s, the collector's paced load \
             against the bare server checking MACs: {bare:.1} CPU µs per report, {bare_per_request:.1} per request",
            floor.reports, floor.requests, floor.reports_per_request, floor.seconds,
        );
    }
    if let Some(c) = &f.collector {
        let bare_server = f.http_ceiling.as_ref().map(|c| c.cpu.micros("bare server")).filter(|m| *m > 0.0);
        let cpu = |r: &CollectorRun, reports_per_request: f64| {
            if let Some(cpu) = &r.cpu {
                println!("                        {}", cpu.summary("report"));
                if let Some(floor) = bare_server {
                    let collector = cpu.micros("collector") * reports_per_request;
                    println!(
                        "                        collector {collector:.1} µs per request ({reports_per_request:.2} reports) \
                         = {:.2} × the bare HTTP server's {floor:.1} µs per request in the HTTP ceiling",
                        collector / floor
                    );
                }
                if let Some(floor) = f.database_floor.as_ref().filter(|floor| floor.micros("postgresql") > 0.0) {
                    let (database, least) = (cpu.micros("postgresql"), floor.micros("postgresql"));
                    println!(
                        "                        PostgreSQL {database:.1} µs per report = {:.2} × the database floor \
                         ({least:.1} µs per row)",
                        database / least
                    );
                }
                if !r.statements.is_empty() {
                    let all: f64 = r.statements.iter().map(|s| s.micros_per_report).sum();
                    println!(
                        "                        PostgreSQL's statements (pg_stat_statements: planning + execution, \
                         wall time in the server) {all:.1} µs per report, the largest:"
                    );
                    for s in r.statements.iter().take(10) {
                        println!(
                            "                          {:>6.1} µs  {:>5.2} calls  {}",
                            s.micros_per_report, s.calls_per_report, s.query
                        );
                    }
                }
                if !cpu.postgresql_by_client.is_empty() {
                    let split: Vec<String> =
                        cpu.postgresql_by_client.iter().map(|(name, micros)| format!("{name} {micros:.1}")).collect();
                    println!(
                        "                        PostgreSQL µs per report by whose connection it served (live \
                         processes): {}",
                        split.join(", ")
                    );
                }
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
            cpu(r, 1.0);
        };
        println!(
            "  collector           {} targets' agents, {} concurrent senders, one report per request; each agent \
             sends {} reports, {} of them heartbeats (--heartbeats)",
            c.targets, c.clients, c.reports_per_agent, c.heartbeats_per_agent
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
            cpu(&p.run, p.reports_per_request);
            let collector = p.run.cpu.as_ref().map(|cpu| cpu.micros("collector")).filter(|m| *m > 0.0);
            let floor = f.http_floor_paced.as_ref().map(|floor| (floor, floor.bare_micros()));
            if let (Some(collector), Some((floor, (bare, bare_per_request)))) =
                (collector, floor.filter(|(_, (bare, _))| *bare > 0.0))
            {
                let per_request = collector * p.reports_per_request;
                println!(
                    "                        against the bare server under the same paced load (MAC checked, \
                     {:.2} reports per request): collector {collector:.1} µs per report = {:.2} × its {bare:.1}; \
                     {per_request:.1} µs per request = {:.2} × its {bare_per_request:.1}",
                    floor.reports_per_request,
                    collector / bare,
                    per_request / bare_per_request
                );
            }
        }
        println!("                      peak RSS MiB: {}", peaks(&c.peak_rss_mib));
    }
    if let Some(w) = &f.watchdogs {
        println!("  watchdogs           {} armed within {:.1} s, timeout {} s: {} timed out; lateness p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms", w.watchdogs, w.armed_within_seconds, w.timeout_seconds, w.timed_out, w.lateness_p50_ms, w.lateness_p99_ms, w.lateness_max_ms);
        println!("                      peak RSS MiB: {}", peaks(&w.peak_rss_mib));
    }
    if let Some(c) = &f.create {
        println!(
            "  create              {} targets accepted in {:.2} s; scheduler RSS {:.0} → {:.0} MiB (peak {:.0} MiB); \
             then aborted in {:.2} s (scheduler peak {:.0} MiB)",
            c.targets,
            c.seconds,
            c.scheduler_rss_before_mib,
            c.scheduler_rss_after_mib,
            c.scheduler_peak_rss_mib,
            c.abort_seconds,
            c.abort_peak_rss_mib
        );
    }
    for (name, s) in &f.services {
        println!("  {name:<19} {:.1} CPU s, peak RSS {:.0} MiB", s.cpu_seconds, s.peak_rss_mib);
    }
}
