//! Fault injection on separate processes: the real `fleetpatch` binary as
//! a deployment runs it (scheduler, collector, two workers, and the
//! simulated fleet in a process of its own so that its agents outlive the
//! workers), on a private RabbitMQ node and a private PostgreSQL server
//! that this test starts on free ports (the shared ones are never touched).
//!
//! While a rollout of 1,000 simulated targets runs, the test injects, one
//! after the other: `kill -9` of a worker, of the collector and of the
//! scheduler (each restarted a few seconds later, as a supervisor would); a
//! RabbitMQ `stop_app`/`start_app`; a full broker stop of 30 s; a
//! PostgreSQL restart; the collector frozen (SIGSTOP) for 60 s. Then it
//! asserts that every target reached a final state, that no deployment
//! started two agents, that every report an agent sent is stored (and
//! nothing more), that every stored report was acknowledged to its agent
//! unless the cleanup stopped the agent while the answer to its final result
//! was on its way (printed), that no report was refused, that every
//! simulated agent ended, that no process exited unless the test killed it,
//! and that the dead-letter queue is empty. It prints how long each
//! fault took to heal.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleetpatch_bus::private_broker::PrivateBroker;
use fleetpatch_store::private_postgres::PrivatePostgres;

const TARGETS: usize = 1_000;
const TOKEN_KEY: &str = "chaos-test-token-key-0123456789abcdef";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// One service process, restarted only by the test.
struct Service {
    name: &'static str,
    args: Vec<String>,
    env: Vec<(String, String)>,
    ops_port: u16,
    child: Option<Child>,
    logs: PathBuf,
    starts: u32,
}

impl Service {
    fn start(&mut self) {
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{}.log", self.name)))
            .expect("service log");
        let child = Command::new(env!("CARGO_BIN_EXE_fleetpatch"))
            .args(&self.args)
            .env_remove("FLEETPATCH_CONFIG")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start the fleetpatch binary");
        self.child = Some(child);
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.pid().to_string()]).status().expect("kill runs");
        assert!(status.success());
    }

    /// An exit the test did not cause: status and the log's tail.
    fn unexpected_exit(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        let status = child.try_wait().expect("try_wait")?;
        let log = std::fs::read_to_string(self.logs.join(format!("{}.log", self.name))).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        Some(format!(
            "{} exited by itself ({status}); last lines:\n{}",
            self.name,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ))
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Deployment {
    services: BTreeMap<&'static str, Service>,
    http: reqwest::Client,
    api: String,
    sim: String,
    unexpected: Vec<String>,
}

/// A failed assertion must not leave the services running after the test.
impl Drop for Deployment {
    fn drop(&mut self) {
        for service in self.services.values_mut() {
            if let Some(mut child) = service.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Deployment {
    fn service(&mut self, name: &str) -> &mut Service {
        self.services.get_mut(name).expect("a service of this deployment")
    }

    fn check_exits(&mut self) {
        for service in self.services.values_mut() {
            if let Some(exit) = service.unexpected_exit() {
                eprintln!("{exit}");
                self.unexpected.push(exit);
                // Keep the run going so the rest of the test still says something.
                service.start();
            }
        }
    }

    async fn ready(&self, name: &str) -> bool {
        let port = self.services[name].ops_port;
        matches!(
            self.http.get(format!("http://127.0.0.1:{port}/readyz")).timeout(Duration::from_secs(2)).send().await,
            Ok(response) if response.status().is_success()
        )
    }

    /// Waits until every service says ready; returns how long that took.
    async fn all_ready(&mut self, limit: Duration) -> Duration {
        let started = Instant::now();
        loop {
            self.check_exits();
            let mut all = true;
            for name in ["scheduler", "collector", "worker-1", "worker-2"] {
                all &= self.ready(name).await;
            }
            if all {
                return started.elapsed();
            }
            assert!(started.elapsed() < limit, "the services were not ready again within {limit:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The service's async runtime threads, from its `/metrics`.
    async fn runtime_threads(&self, name: &str) -> usize {
        let port = self.services[name].ops_port;
        let url = format!("http://127.0.0.1:{port}/metrics");
        let text = self.http.get(&url).send().await.expect("/metrics").text().await.expect("/metrics text");
        let value = text
            .lines()
            .find_map(|line| line.strip_prefix("fleetpatch_runtime_worker_threads "))
            .unwrap_or_else(|| panic!("{name} reports its runtime threads on /metrics:\n{text}"));
        value.trim().parse().expect("a number of threads")
    }

    async fn rollout(&self, id: &str) -> serde_json::Value {
        loop {
            match self.http.get(format!("{}/v1/rollouts/{id}", self.api)).send().await {
                Ok(response) if response.status().is_success() => return response.json().await.expect("rollout JSON"),
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Targets in a final state so far.
    async fn finished(&self, id: &str) -> u64 {
        let rollout = self.rollout(id).await;
        let counts = &rollout["progress"]["by_state"];
        ["succeeded", "failed", "timed_out", "cancelled"].iter().map(|s| counts[s].as_u64().unwrap_or(0)).sum()
    }

    async fn completed(&self, id: &str) -> bool {
        self.rollout(id).await["rollout"]["state"] == "completed"
    }

    /// Runs for `duration`, watching for unexpected exits.
    async fn run_for(&mut self, duration: Duration) {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            self.check_exits();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the rollout's finished count grows past `from`; returns how long.
    async fn progress_after(&mut self, id: &str, from: u64, limit: Duration) -> Duration {
        let started = Instant::now();
        loop {
            self.check_exits();
            if self.finished(id).await > from {
                return started.elapsed();
            }
            if self.completed(id).await {
                return started.elapsed();
            }
            assert!(started.elapsed() < limit, "no progress within {limit:?} after the fault");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn blocking(f: impl FnOnce() + Send + 'static) {
    tokio::task::spawn_blocking(f).await.expect("fault injection");
}

fn rollout_body() -> serde_json::Value {
    let targets: Vec<serde_json::Value> =
        (0..TARGETS).map(|i| serde_json::json!({"host": format!("chaos-{i:04}"), "transport": "sim"})).collect();
    let patch = |n: u32| {
        serde_json::json!({"name": format!("KB50{n}"), "file": format!("kb50{n}.msu"),
            "sha256": format!("{:064x}", n), "installer": "msu"})
    };
    serde_json::json!({
        "name": "chaos",
        // 1,000 targets × 3 patches × 4 s at 75 at once: at least 160 s of
        // work, longer than the faults take, so every fault hits a running rollout.
        "concurrency": 75,
        // Longer than the longest outage the agents have to wait out (the
        // collector frozen for 60 s), so an outage times nobody out.
        "timeout_seconds": 150,
        "heartbeat_seconds": 5,
        "max_tries": 5,
        "patches": [patch(1), patch(2), patch(3)],
        "targets": targets,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_heals_itself_from_process_broker_and_database_faults() {
    let postgres = std::sync::Arc::new(PrivatePostgres::start());
    let broker = std::sync::Arc::new(PrivateBroker::start());
    let logs = tempfile::tempdir().expect("log dir").keep();
    let content = logs.join("content");
    std::fs::create_dir_all(&content).expect("content dir");
    // What the environment cannot say (a list): short retry backoffs.
    let config = logs.join("chaos.toml");
    std::fs::write(&config, "[worker]\nretry_backoff_seconds = [1, 2, 4]\n").expect("config file");
    let (api_port, collector_port, sim_port) = (free_port(), free_port(), free_port());
    let env = |extra: &[(&str, String)]| -> Vec<(String, String)> {
        let mut env = vec![
            ("FLEETPATCH__DATABASE__URL".to_owned(), postgres.url()),
            ("FLEETPATCH__AMQP__URL".to_owned(), broker.url()),
            ("FLEETPATCH__AMQP__PREFIX".to_owned(), "chaos".to_owned()),
            ("FLEETPATCH__SCHEDULER__LISTEN".to_owned(), format!("127.0.0.1:{api_port}")),
            ("FLEETPATCH__SCHEDULER__CONTENT_DIR".to_owned(), content.display().to_string()),
            ("FLEETPATCH__SCHEDULER__RECONCILE_INTERVAL_SECONDS".to_owned(), "5".to_owned()),
            ("FLEETPATCH__COLLECTOR__LISTEN".to_owned(), format!("127.0.0.1:{collector_port}")),
            ("FLEETPATCH__WORKER__CONTENT_DIR".to_owned(), content.display().to_string()),
            ("FLEETPATCH__WORKER__COLLECTOR_URL".to_owned(), format!("http://127.0.0.1:{collector_port}")),
            ("FLEETPATCH__TOKENS__KEY_REF".to_owned(), "env:FP_CHAOS_TOKEN_KEY".to_owned()),
            ("FLEETPATCH_CONFIG".to_owned(), config.display().to_string()),
            ("FP_CHAOS_TOKEN_KEY".to_owned(), TOKEN_KEY.to_owned()),
            ("FLEETPATCH__SIM__FLEET_URL".to_owned(), format!("http://127.0.0.1:{sim_port}")),
            ("FLEETPATCH__SIM__PATCH_MS".to_owned(), "4000".to_owned()),
            ("FLEETPATCH__SIM__MIN_LATENCY_MS".to_owned(), "50".to_owned()),
            ("FLEETPATCH__SIM__MAX_LATENCY_MS".to_owned(), "300".to_owned()),
            ("FLEETPATCH__TELEMETRY__LOG_FILTER".to_owned(), "info".to_owned()),
        ];
        env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        env
    };
    let migrate = Command::new(env!("CARGO_BIN_EXE_fleetpatch"))
        .arg("migrate")
        .env_remove("FLEETPATCH_CONFIG")
        .envs(env(&[]))
        .output()
        .expect("run fleetpatch migrate");
    assert!(migrate.status.success(), "migrate: {}", String::from_utf8_lossy(&migrate.stderr));
    // The API needs a bearer credential: an admin key made the way an operator makes the first one.
    let key = Command::new(env!("CARGO_BIN_EXE_fleetpatch"))
        .args(["apikey", "create", "--name", "chaos", "--role", "admin"])
        .env_remove("FLEETPATCH_CONFIG")
        .envs(env(&[]))
        .output()
        .expect("run fleetpatch apikey create");
    assert!(key.status.success(), "apikey create: {}", String::from_utf8_lossy(&key.stderr));
    let api_key = String::from_utf8(key.stdout).expect("utf-8 key").trim().to_owned();
    let mut headers = reqwest::header::HeaderMap::new();
    let mut bearer =
        reqwest::header::HeaderValue::from_str(&format!("Bearer {api_key}")).expect("a key is a valid header value");
    bearer.set_sensitive(true);
    headers.insert(reqwest::header::AUTHORIZATION, bearer);

    let service = |name: &'static str, args: &[&str], ops_port: u16, extra: &[(&str, String)]| Service {
        name,
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        env: env(extra),
        ops_port,
        child: None,
        logs: logs.clone(),
        starts: 0,
    };
    let (worker1_port, worker2_port) = (free_port(), free_port());
    let mut services = BTreeMap::new();
    services.insert(
        "sim-fleet",
        service("sim-fleet", &["sim-fleet", "--listen", &format!("127.0.0.1:{sim_port}")], sim_port, &[]),
    );
    services.insert("scheduler", service("scheduler", &["scheduler"], api_port, &[]));
    services.insert("collector", service("collector", &["collector"], collector_port, &[]));
    for (name, port) in [("worker-1", worker1_port), ("worker-2", worker2_port)] {
        services.insert(
            name,
            service(name, &["worker"], port, &[("FLEETPATCH__WORKER__LISTEN", format!("127.0.0.1:{port}"))]),
        );
    }
    let mut deployment = Deployment {
        services,
        http: reqwest::Client::builder().default_headers(headers).build().expect("HTTP client"),
        api: format!("http://127.0.0.1:{api_port}"),
        sim: format!("http://127.0.0.1:{sim_port}"),
        unexpected: Vec::new(),
    };
    for service in deployment.services.values_mut() {
        service.start();
    }
    let boot = deployment.all_ready(Duration::from_secs(60)).await;
    println!("all services ready {} ms after start", boot.as_millis());
    // The collector runs on `collector.worker_threads` (1 by default), the
    // other services on one thread per core.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (name, threads) in [("collector", 1), ("scheduler", cores), ("worker-1", cores)] {
        assert_eq!(deployment.runtime_threads(name).await, threads, "{name}'s runtime threads");
    }

    let created = deployment
        .http
        .post(format!("{}/v1/rollouts", deployment.api))
        .json(&rollout_body())
        .send()
        .await
        .expect("create the rollout");
    assert_eq!(created.status(), reqwest::StatusCode::CREATED, "{}", created.text().await.unwrap_or_default());
    let created: serde_json::Value = created.json().await.expect("rollout JSON");
    let id = created["id"].as_str().expect("rollout id").to_owned();
    let begun = Instant::now();
    let mut recoveries: Vec<(String, Duration, Duration)> = Vec::new();

    deployment.run_for(Duration::from_secs(6)).await;

    // kill -9 of a worker, restarted 5 s later.
    let before = deployment.finished(&id).await;
    deployment.service("worker-1").kill();
    deployment.run_for(Duration::from_secs(5)).await;
    deployment.service("worker-1").start();
    let ready = deployment.all_ready(Duration::from_secs(60)).await;
    let progress = deployment.progress_after(&id, before, Duration::from_secs(120)).await;
    recoveries.push(("kill -9 worker".into(), ready, progress));

    // kill -9 of the collector, restarted 5 s later.
    let before = deployment.finished(&id).await;
    deployment.service("collector").kill();
    deployment.run_for(Duration::from_secs(5)).await;
    deployment.service("collector").start();
    let ready = deployment.all_ready(Duration::from_secs(60)).await;
    let progress = deployment.progress_after(&id, before, Duration::from_secs(120)).await;
    recoveries.push(("kill -9 collector".into(), ready, progress));

    // kill -9 of the scheduler, restarted 5 s later.
    let before = deployment.finished(&id).await;
    deployment.service("scheduler").kill();
    deployment.run_for(Duration::from_secs(5)).await;
    deployment.service("scheduler").start();
    let ready = deployment.all_ready(Duration::from_secs(60)).await;
    let progress = deployment.progress_after(&id, before, Duration::from_secs(120)).await;
    recoveries.push(("kill -9 scheduler".into(), ready, progress));

    // RabbitMQ stop_app for 10 s.
    let before = deployment.finished(&id).await;
    let b = broker.clone();
    blocking(move || b.stop_app()).await;
    deployment.run_for(Duration::from_secs(10)).await;
    let b = broker.clone();
    blocking(move || b.start_app()).await;
    let ready = deployment.all_ready(Duration::from_secs(90)).await;
    let progress = deployment.progress_after(&id, before, Duration::from_secs(120)).await;
    recoveries.push(("RabbitMQ stop_app 10 s".into(), ready, progress));

    // RabbitMQ node stopped for 30 s.
    let before = deployment.finished(&id).await;
    let b = broker.clone();
    blocking(move || b.stop()).await;
    deployment.run_for(Duration::from_secs(30)).await;
    let b = broker.clone();
    blocking(move || b.start_again()).await;
    let ready = deployment.all_ready(Duration::from_secs(90)).await;
    let progress = deployment.progress_after(&id, before, Duration::from_secs(120)).await;
    recoveries.push(("RabbitMQ node down 30 s".into(), ready, progress));

    // PostgreSQL restart.
    let before = deployment.finished(&id).await;
    let p = postgres.clone();
    blocking(move || {
        p.restart();
    })
    .await;
    let ready = deployment.all_ready(Duration::from_secs(60)).await;
    let progress = deployment.progress_after(&id, before, Duration::from_secs(120)).await;
    recoveries.push(("PostgreSQL restart".into(), ready, progress));

    // The collector unreachable (frozen) for 60 s: agents keep their reports and retry.
    let before = deployment.finished(&id).await;
    assert!(
        !deployment.completed(&id).await && (before as usize) < TARGETS,
        "the rollout must still run when the last fault begins, or the test proves nothing about it"
    );
    deployment.service("collector").signal("-STOP");
    deployment.run_for(Duration::from_secs(60)).await;
    deployment.service("collector").signal("-CONT");
    let ready = deployment.all_ready(Duration::from_secs(60)).await;
    let progress = deployment.progress_after(&id, before, Duration::from_secs(120)).await;
    recoveries.push(("collector unreachable 60 s".into(), ready, progress));

    // The rollout finishes.
    let finish_limit = Duration::from_secs(420);
    let waited = Instant::now();
    loop {
        deployment.check_exits();
        if deployment.completed(&id).await {
            break;
        }
        assert!(
            waited.elapsed() < finish_limit,
            "the rollout did not complete within {finish_limit:?} after the last fault: {}",
            deployment.rollout(&id).await["progress"]
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let total = begun.elapsed();
    // Agents may still be posting their last reports; wait until the fleet is quiet.
    let http = deployment.http.clone();
    let stats_url = format!("{}/v1/sim/stats", deployment.sim);
    let mut stats = serde_json::Value::Null;
    for _ in 0..600 {
        stats = http.get(&stats_url).send().await.expect("sim stats").json().await.expect("stats JSON");
        if stats["running_agents"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stats["running_agents"], 0, "every simulated agent ended within 60 s of the rollout's end");

    let store =
        fleetpatch_store::Store::connect(&fleetpatch_store::StoreOptions { url: postgres.url(), max_connections: 4 })
            .await
            .expect("connect to the private database");
    let rollout = store.rollout(id.parse().expect("uuid")).await.expect("rollout");
    let targets = store.targets(rollout.id, None, None, 100_000).await.expect("targets");
    assert_eq!(targets.len(), TARGETS);
    let not_final: Vec<_> = targets.iter().filter(|t| !t.state.is_final()).map(|t| (&t.host, t.state)).collect();
    assert!(not_final.is_empty(), "every target reaches a final state: {not_final:?}");
    let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
    for target in &targets {
        *by_state.entry(target.state.as_str().to_owned()).or_default() += 1;
    }

    let starts = stats["agent_starts"].as_object().expect("agent_starts");
    let doubled: Vec<_> = starts.iter().filter(|(_, n)| n.as_u64() != Some(1)).collect();
    assert!(doubled.is_empty(), "no deployment starts two agents: {doubled:?}");
    let count = |field: &str, target: &fleetpatch_store::Target| {
        stats[field].get(target.id.to_string()).and_then(|n| n.as_u64()).unwrap_or(0)
    };
    let mut lost = Vec::new();
    let mut unacknowledged = Vec::new();
    let mut cut_finals = Vec::new();
    let mut total_reports = 0;
    for target in &targets {
        // Heartbeats are counted per agent run, the other reports kept one row each.
        let heartbeats: u64 = store.heartbeats(target.id).await.expect("heartbeats").iter().map(|h| h.count).sum();
        let stored = store.agent_events(target.id).await.expect("events").len() as u64 + heartbeats;
        total_reports += stored;
        let (sent, acked) = (count("reports_sent", target), count("reports_acknowledged", target));
        if stored != sent {
            lost.push((target.host.clone(), sent, stored));
        }
        let key = target.id.to_string();
        let cut: Vec<String> = stats["reports_cut_by_cleanup"]
            .get(&key)
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default();
        let refusals = stats["report_refusals"].get(&key).cloned().unwrap_or_default();
        if acked + cut.len() as u64 != stored || !refusals.is_null() {
            unacknowledged.push((target.host.clone(), acked, cut.clone(), stored, refusals));
        }
        cut_finals.extend(cut.into_iter().map(|report| (target.host.clone(), report)));
    }
    assert!(lost.is_empty(), "every report an agent sent is stored, nothing else (host, sent, stored): {lost:?}");
    // Every stored report was answered to its agent, except one whose agent
    // the cleanup stopped while the answer was on its way: only ever the
    // final result (the cleanup follows it), and no report was refused.
    assert!(
        unacknowledged.is_empty(),
        "every report is acknowledged or cut short by the cleanup (host, acked, cut, stored, refusals): \
         {unacknowledged:?}"
    );
    assert!(
        cut_finals.iter().all(|(_, report)| report.ends_with(" final")),
        "only a final result's answer may be cut short by the cleanup: {cut_finals:?}"
    );
    println!("final results whose answer the cleanup cut short (stored): {cut_finals:?}");

    let backend = fleetpatch_bus::rabbitmq::RabbitBackend::connect(
        &fleetpatch_bus::rabbitmq::RabbitOptions { url: broker.url(), prefix: "chaos".into(), delivery_limit: 10 },
        &fleetpatch_proto::routing::WORK_QUEUES,
    )
    .await
    .expect("connect to the private broker");
    let bus = fleetpatch_bus::Bus::new(std::sync::Arc::new(backend));
    let dead = bus.queue_depth(fleetpatch_bus::DEAD_LETTER_QUEUE).await.expect("dead letters");

    println!(
        "rollout of {TARGETS} targets completed in {} s: {by_state:?}; {total_reports} reports stored",
        total.as_secs()
    );
    println!("| fault | all services ready again after | targets finishing again after |");
    println!("| --- | --- | --- |");
    for (fault, ready, progress) in &recoveries {
        println!("| {fault} | {} ms | {} ms |", ready.as_millis(), progress.as_millis());
    }
    let restarts: Vec<(&str, u32)> = deployment.services.values().map(|s| (s.name, s.starts)).collect();
    println!("process starts: {restarts:?}");
    for service in deployment.services.values_mut() {
        service.stop();
    }
    assert!(
        deployment.unexpected.is_empty(),
        "no process exits unless the test stops it: {:#?}",
        deployment.unexpected
    );
    assert_eq!(dead, 0, "the dead-letter queue is empty");
    let _ = std::fs::remove_dir_all(&logs);
}
