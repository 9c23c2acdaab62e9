//! The load: simulated agents' reports, the collector runs, the HTTP ceiling, the watchdogs.

use super::*;

/// A target's agent as the bench plays it: it signs its requests with the
/// key derived from the token a worker would have staged.
#[derive(Clone)]
pub(crate) struct BenchAgent {
    pub(crate) target: Uuid,
    pub(crate) attempt: u32,
    pub(crate) key: SigningKey,
}

impl BenchAgent {
    /// The agent of `target`'s `attempt`, its token derived from `token_key` and `nonce`.
    pub(crate) fn new(token_key: &TokenKey, target: Uuid, attempt: u32, nonce: &str) -> Self {
        let token = report_auth::derive_token(token_key.as_bytes(), target, attempt, nonce);
        Self { target, attempt, key: SigningKey::from_token(&token) }
    }

    pub(crate) fn path(&self) -> String {
        format!("/v1/targets/{}/reports", self.target)
    }
}

/// One request of an agent's reports, signed now: `true` once acknowledged,
/// `false` when the collector is busy (503: send it again); any other
/// answer is an error.
pub(crate) async fn post_reports(
    http: &reqwest::Client,
    port: u16,
    agent: &BenchAgent,
    body: Vec<u8>,
) -> anyhow::Result<bool> {
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

/// CPU µs to verify one signed report request as the collector does —
/// parse the `Authorization` header, check the clock, hash the body, check
/// the MAC — on one thread, averaged over `requests` requests signed
/// beforehand. Compute-bound, so far steadier than the difference of two
/// HTTP ceilings, whose noise on a shared machine exceeds the MAC's cost.
pub(crate) fn mac_verify_micros(token_key: &TokenKey, requests: usize) -> f64 {
    let agents: Vec<BenchAgent> =
        (0..64).map(|_| BenchAgent::new(token_key, Uuid::new_v4(), 1, "mac-verify")).collect();
    let bodies = agent_reports(2, 1);
    let now_ms = chrono::Utc::now().timestamp_millis();
    let signed: Vec<(String, String, &[u8], &SigningKey)> = (0..requests)
        .map(|i| {
            let agent = &agents[i % agents.len()];
            let body = bodies[i % bodies.len()].as_slice();
            let path = agent.path();
            let request = SignedRequest::new("POST", &path, agent.target, agent.attempt, now_ms, rand::random(), body);
            (agent.key.authorization(&request), path, body, &agent.key)
        })
        .collect();
    let started = Instant::now();
    let mut verified = 0;
    for (header, path, body, key) in &signed {
        let authorization = report_auth::Authorization::parse(header).expect("a header the bench signed");
        let clock = report_auth::check_clock(authorization.timestamp_ms, now_ms, 300_000);
        if clock.is_ok() && key.verify(&authorization.request("POST", path, body), &authorization.mac).is_ok() {
            verified += 1;
        }
    }
    let micros = started.elapsed().as_secs_f64() * 1e6 / requests.max(1) as f64;
    assert_eq!(verified, requests, "every request the bench signed verifies");
    micros
}

/// What one agent sends for `patches` patches, each report in its own
/// request: started and finished for each, `heartbeats` heartbeats during
/// the first, and the final result.
pub(crate) fn agent_reports(patches: usize, heartbeats: usize) -> Vec<Vec<u8>> {
    agent_report_list(patches, heartbeats)
        .into_iter()
        .map(|report| v1::ReportBatch { reports: vec![report] }.encode_to_vec())
        .collect()
}

/// The reports of [`agent_reports`], in order.
pub(crate) fn agent_report_list(patches: usize, heartbeats: usize) -> Vec<v1::AgentReport> {
    let mut reports = Vec::new();
    let mut seq = 0;
    let mut next = |kind| {
        seq += 1;
        v1::AgentReport { seq, sent_at_unix_ms: fleetpatch_bus::now_unix_ms(), agent_instance: 1, kind: Some(kind) }
    };
    for index in 0..patches as u32 {
        reports.push(next(Kind::Started(v1::PatchStarted { patch_index: index })));
        if index == 0 {
            for _ in 0..heartbeats {
                reports.push(next(Kind::Heartbeat(v1::Heartbeat { patch_index: Some(index) })));
            }
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
pub(crate) async fn collector_phase(bench: &mut Bench, collector_port: u16, collector_pid: u32) -> anyhow::Result<()> {
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
        reports_per_agent: agent_report_list(args.patches, args.heartbeats).len(),
        heartbeats_per_agent: args.heartbeats,
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

/// `collector_targets` agents send their reports paced ([`send_paced`]) to
/// the collector on `collector_port` (process `collector_pid`).
pub(crate) async fn paced_collector_load(
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
    let reports = Arc::new(agent_report_list(args.patches, args.heartbeats));
    let statements_before = fleetpatch_store::ceiling::statement_totals(&bench.store).await?;
    let before = bench.cpu_now(collector_pid);
    let sent = send_paced(&bench.http, collector_port, tokens, reports, rate).await?;
    let cpu = before.per_report(&bench.cpu_now(collector_pid), sent.latencies.len(), sent.seconds);
    let statements_after = fleetpatch_store::ceiling::statement_totals(&bench.store).await?;
    let statements = StatementCost::per_report(&statements_before, &statements_after, sent.latencies.len());
    let succeeded = bench.counts(rollout).await?.get("succeeded").copied().unwrap_or(0) as usize;
    let (reports_per_request, requests) = (sent.reports_per_request(), sent.requests);
    let mut run = CollectorRun::measured(sent.latencies, sent.retried, sent.seconds, succeeded == agents);
    run.cpu = Some(cpu);
    run.statements = statements;
    Ok(PacedRun { agents, offered_reports_per_second: rate, requests, reports_per_request, run })
}

/// What [`send_paced`] measured.
pub(crate) struct PacedSent {
    /// Milliseconds from each report's production time to its acknowledgement.
    pub(crate) latencies: Vec<f64>,
    pub(crate) requests: usize,
    pub(crate) retried: usize,
    /// From the first report's production time to the last acknowledgement.
    pub(crate) seconds: f64,
}

impl PacedSent {
    pub(crate) fn reports_per_request(&self) -> f64 {
        self.latencies.len() as f64 / self.requests.max(1) as f64
    }
}

/// `agents` produce `reports` each on a clock, `rate` reports/s in all
/// (each agent one every `agents / rate` s, the agents staggered evenly),
/// and each sends everything ready in one request to port `port`, waiting
/// for the acknowledgement before its next: what the real agent's sender
/// does. Load that the server does not keep up with piles up in the
/// agents, so their requests grow instead of their number.
pub(crate) async fn send_paced(
    http: &reqwest::Client,
    port: u16,
    agents: Vec<BenchAgent>,
    reports: Arc<Vec<v1::AgentReport>>,
    rate: f64,
) -> anyhow::Result<PacedSent> {
    let count = agents.len();
    let gap = Duration::from_secs_f64(count as f64 / rate);
    let started = tokio::time::Instant::now() + Duration::from_millis(200);
    let mut tasks = tokio::task::JoinSet::new();
    for (index, agent) in agents.into_iter().enumerate() {
        let (http, reports) = (http.clone(), reports.clone());
        let first = started + gap.mul_f64(index as f64 / count as f64);
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
                if post_reports(&http, port, &agent, body).await? {
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
    let mut sent = PacedSent { latencies: Vec::new(), requests: 0, retried: 0, seconds: 0.0 };
    let mut last_ack = started;
    while let Some(task) = tasks.join_next().await {
        let (mine, requests, retried, done) = task??;
        sent.latencies.extend(mine);
        sent.requests += requests;
        sent.retried += retried;
        last_ack = last_ack.max(done);
    }
    sent.seconds = (last_ack - started).as_secs_f64();
    Ok(sent)
}

/// Brings `collector_targets` targets to running, then their agents post
/// every report, each in its own request, `collector_clients` at a time, to
/// the collector on `collector_port` (process `collector_pid`).
pub(crate) async fn collector_load(
    bench: &Bench,
    collector_port: u16,
    collector_pid: u32,
) -> anyhow::Result<CollectorRun> {
    let args = &bench.args;
    let rollout = bench
        .store
        .create_rollout(NewRollout::synthetic("bench-collector", args.collector_targets, args.patches, 600))
        .await?;
    bench.wait_all(rollout, TargetState::Queued, args.collector_targets, Duration::from_secs(300)).await?;
    let tokens = bench.bring_to_running(rollout).await?;
    bench.wait_for_outbox().await?;
    let statements_before = fleetpatch_store::ceiling::statement_totals(&bench.store).await?;
    let before = bench.cpu_now(collector_pid);
    let sent = send_all(
        &bench.http,
        collector_port,
        tokens,
        agent_reports(args.patches, args.heartbeats),
        args.collector_clients,
    )
    .await?;
    let cpu = before.per_report(&bench.cpu_now(collector_pid), sent.latencies.len(), sent.seconds);
    let statements_after = fleetpatch_store::ceiling::statement_totals(&bench.store).await?;
    let statements = StatementCost::per_report(&statements_before, &statements_after, sent.latencies.len());
    let succeeded = bench.counts(rollout).await?.get("succeeded").copied().unwrap_or(0) as usize;
    let mut run =
        CollectorRun::measured(sent.latencies, sent.retried, sent.seconds, succeeded == args.collector_targets);
    run.cpu = Some(cpu);
    run.statements = statements;
    Ok(run)
}

/// What [`send_all`] measured.
pub(crate) struct Sent {
    /// Milliseconds from sending each acknowledged request to its answer.
    pub(crate) latencies: Vec<f64>,
    pub(crate) retried: usize,
    pub(crate) seconds: f64,
}

/// `clients` senders take the targets one after the other and post each
/// target's `requests` in order, one at a time, to port `port`; a 503 is
/// sent again after 20 ms.
pub(crate) async fn send_all(
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

/// What the HTTP ceiling sends, and the threads its bare server runs on.
pub(crate) struct CeilingLoad {
    pub(crate) targets: usize,
    /// (patches, heartbeats) per agent.
    pub(crate) reports: (usize, usize),
    pub(crate) clients: usize,
    /// As many as the collector's runtime (`collector.worker_threads`).
    pub(crate) server_threads: usize,
}

/// The HTTP ceiling: the same senders, requests and client as the
/// collector phase, against the collector's server stack with nothing
/// behind it ([`fleetpatch_collector::ceiling`]), served from this process
/// on a runtime of its own with as many worker threads as the collector's
/// (`collector.worker_threads`), named [`BARE_SERVER_THREADS`]: their CPU is
/// counted apart (the group `bare server`: the HTTP floor of the
/// collector's CPU per request) from the senders' (`bench agents`).
/// With `verify_with`, the bare server also verifies every request's MAC
/// (and refuses replays) as the collector does; without, it checks nothing.
/// The senders sign their requests in both runs, so the difference between
/// the two is the server's MAC checking.
pub(crate) async fn http_ceiling(
    http: &reqwest::Client,
    load: &CeilingLoad,
    verify_with: Option<TokenKey>,
) -> anyhow::Result<HttpCeiling> {
    let bare = Bare::start(load.server_threads, verify_with).await?;
    let before = Bare::cpu();
    let (patches, heartbeats) = load.reports;
    let sent =
        send_all(http, bare.port(), bare.agents(load.targets), agent_reports(patches, heartbeats), load.clients).await;
    let after = Bare::cpu();
    bare.stop().await?;
    let mut sent = sent?;
    sent.latencies.sort_by(f64::total_cmp);
    Ok(HttpCeiling {
        requests: sent.latencies.len(),
        clients: load.clients,
        server_threads: load.server_threads,
        seconds: sent.seconds,
        requests_per_second: sent.latencies.len() as f64 / sent.seconds,
        latency_p50_ms: quantile(&sent.latencies, 0.5),
        latency_p99_ms: quantile(&sent.latencies, 0.99),
        cpu: before.per_report(&after, sent.latencies.len(), sent.seconds),
    })
}

/// The paced HTTP floor: the collector's paced run's agents and reports
/// ([`send_paced`], the same rate) against the bare server verifying every
/// MAC as the collector does, answering at once. Requests that arrive one by
/// one on idle connections cost a server more each than the closed loop's
/// back-to-back ones (a wake-up and a poll of the socket per request), so
/// this, not the HTTP ceiling, is the HTTP floor of the paced run.
pub(crate) async fn paced_http_floor(
    http: &reqwest::Client,
    load: &CeilingLoad,
    token_key: TokenKey,
    rate: f64,
) -> anyhow::Result<PacedHttpFloor> {
    let bare = Bare::start(load.server_threads, Some(token_key)).await?;
    let (patches, heartbeats) = load.reports;
    let reports = Arc::new(agent_report_list(patches, heartbeats));
    let before = Bare::cpu();
    let sent = send_paced(http, bare.port(), bare.agents(load.targets), reports, rate).await;
    let after = Bare::cpu();
    bare.stop().await?;
    let sent = sent?;
    let reports = sent.latencies.len();
    Ok(PacedHttpFloor {
        reports,
        requests: sent.requests,
        reports_per_request: sent.reports_per_request(),
        seconds: sent.seconds,
        cpu: before.per_report(&after, reports, sent.seconds),
    })
}

/// The bare server ([`fleetpatch_collector::ceiling::serve_bare`]) on a
/// runtime of its own, `threads` worker threads as the collector's, named
/// [`BARE_SERVER_THREADS`] so their CPU is counted apart from the senders'.
struct Bare {
    runtime: tokio::runtime::Runtime,
    server: fleetpatch_collector::ceiling::BareServer,
    token_key: TokenKey,
}

impl Bare {
    async fn start(threads: usize, verify_with: Option<TokenKey>) -> anyhow::Result<Self> {
        let token_key = verify_with.clone().unwrap_or_else(TokenKey::random);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name(BARE_SERVER_THREADS)
            .enable_all()
            .build()?;
        let server = runtime.spawn(fleetpatch_collector::ceiling::serve_bare("127.0.0.1:0", verify_with)).await??;
        Ok(Self { runtime, server, token_key })
    }

    fn port(&self) -> u16 {
        self.server.local_addr.port()
    }

    /// `count` agents of targets the bare server knows.
    fn agents(&self, count: usize) -> Vec<BenchAgent> {
        (0..count)
            .map(|_| {
                BenchAgent::new(&self.token_key, Uuid::new_v4(), 1, fleetpatch_collector::ceiling::BARE_TOKEN_NONCE)
            })
            .collect()
    }

    /// This process's CPU so far: the bare server's threads (`bare server`)
    /// apart from the senders' (`bench agents`).
    fn cpu() -> CpuSnapshot {
        CpuSnapshot::take("bench agents", &[]).with_own_threads("bench agents", BARE_SERVER_THREADS, "bare server")
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.server.stop.cancel();
        let served = self.server.join.await;
        self.runtime.shutdown_background();
        served??;
        Ok(())
    }
}

/// The name of the bare server's threads in [`http_ceiling`] (at most 15 bytes: Linux's limit).
const BARE_SERVER_THREADS: &str = "bare-server";

pub(crate) async fn watchdog_phase(bench: &mut Bench) -> anyhow::Result<()> {
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
