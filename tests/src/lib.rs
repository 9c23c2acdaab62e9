//! An in-process sandbox of the whole pipeline on the machine's real
//! RabbitMQ and PostgreSQL: a scheduler, a collector and N workers (each on
//! its own thread and tokio runtime, so a test can kill one the way a crash
//! would: its tasks and its AMQP connection vanish at once), with a
//! simulated fleet whose agents post real HTTP reports.
//!
//! Every sandbox gets its own database (`CREATE DATABASE fp_test_...`) and
//! its own queue prefix, and removes both when stopped. The services are
//! found through `FLEETPATCH_TEST_DATABASE_URL` (an admin connection,
//! default `postgres://postgres@127.0.0.1:5432/postgres`) and
//! `FLEETPATCH_TEST_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//! A missing service fails the test with a message that says which; no
//! test ever passes by skipping.
//!
//! With [`SandboxOptions::ssh`] the workers also offer the real `ssh`
//! transport (with the workspace's `fleetpatch-agent`, found or built by
//! [`agent_binary`]); installers go into the scheduler's content store
//! with [`Sandbox::upload_content`], which the workers share. The collector
//! can be stopped and started again on its port
//! ([`Sandbox::stop_collector`], [`Sandbox::restart_collector`]) to test
//! the agents' spool. With [`SandboxOptions::smb`] they also offer the
//! `smb` transport (Windows targets; tested against a Samba peer).
//! [`SandboxOptions::credentials`] are the named credentials (`[credentials]`)
//! the scheduler accepts and the workers resolve.
//!
//! The API needs a credential: every sandbox makes an admin API key
//! ([`Sandbox::admin_key`]) that [`Sandbox::http`] sends by default;
//! [`Sandbox::api_key`] makes keys of other roles and [`client_with`] a
//! client that sends another credential (or none).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fleetpatch_bus::rabbitmq::{RabbitBackend, RabbitOptions};
use fleetpatch_bus::Bus;
use fleetpatch_proto::state::{RolloutState, TargetState};
use fleetpatch_runtime::credentials::{CredentialDefinition, Credentials};
use fleetpatch_runtime::{Health, Shutdown};
use fleetpatch_store::{Rollout, Store, StoreOptions, Target};
use fleetpatch_transport::sim::{SimFleet, SimOptions, SimTransport};
use fleetpatch_transport::Transports;
use fleetpatch_transport_smb::{SmbTransport, SmbTransportOptions};
use fleetpatch_transport_ssh::{SshOptions, SshTransport};
use fleetpatch_worker::WorkerOptions;
use uuid::Uuid;

pub mod ssh;
pub mod wine;

/// The token key every sandbox worker and collector shares (tests derive
/// tokens with it).
pub const TOKEN_KEY: &str = "fleetpatch-test-token-key";

/// [`TOKEN_KEY`] as the services take it.
pub fn token_key() -> fleetpatch_runtime::tokens::TokenKey {
    fleetpatch_runtime::tokens::TokenKey::from_bytes(TOKEN_KEY.as_bytes().to_vec())
        .expect("the test key is long enough")
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The `Authorization` value `target`'s agent sends for `body` at
/// `timestamp_ms`, with a fresh nonce.
pub fn sign_report(target: &fleetpatch_store::Target, body: &[u8], timestamp_ms: i64) -> String {
    use fleetpatch_proto::report_auth::{SignedRequest, SigningKey};
    let path = format!("/v1/targets/{}/reports", target.id);
    let nonce = Uuid::new_v4().into_bytes();
    let request = SignedRequest::new("POST", &path, target.id, target.attempt, timestamp_ms, nonce, body);
    SigningKey::from_token(&agent_token(target)).authorization(&request)
}

/// The agent token a sandbox worker derives for `target` (its attempt and nonce as stored).
pub fn agent_token(target: &fleetpatch_store::Target) -> String {
    fleetpatch_proto::report_auth::derive_token(
        TOKEN_KEY.as_bytes(),
        target.id,
        target.attempt,
        target.token_nonce.as_deref().unwrap_or_default(),
    )
}

pub fn admin_database_url() -> String {
    std::env::var("FLEETPATCH_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn amqp_url() -> String {
    std::env::var("FLEETPATCH_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The admin connection; sandboxes create their databases next to it.
fn admin_options() -> StoreOptions {
    StoreOptions { url: admin_database_url(), max_connections: 20 }
}

/// How to build a sandbox.
#[derive(Clone)]
pub struct SandboxOptions {
    pub workers: usize,
    pub worker_concurrency: u16,
    pub sim: SimOptions,
    pub verify_delay_seconds: u64,
    pub retry_backoff_seconds: Vec<u64>,
    /// `worker.offline_check_seconds`.
    pub offline_check_seconds: Vec<u64>,
    /// `worker.reboot_check_seconds`.
    pub reboot_check_seconds: Vec<u64>,
    /// `worker.unix_reboot_command`.
    pub unix_reboot_command: Option<String>,
    /// Workers also offer the `ssh` transport with these options.
    pub ssh: Option<SshOptions>,
    /// Workers also offer the `smb` transport with these options (the
    /// agent binary is then also configured as `windows-<arch>`).
    pub smb: Option<SmbTransportOptions>,
    /// Where the `smb` transport installs the agent service: the target's
    /// `svcctl` when `None`; the Samba + Wine test hands it to Wine's.
    pub smb_service_managers: Option<Arc<dyn fleetpatch_transport_smb::ServiceManagers>>,
    /// The agent binary workers stage on ssh targets (for this machine's
    /// architecture); [`agent_binary`] when `None` and `ssh` is set.
    pub agent_binary: Option<PathBuf>,
    /// Time limit of one remote step (probe, stage, start) in seconds.
    pub step_timeout_seconds: u64,
    /// The collector's settings (its `listen` is the sandbox's).
    pub collector: fleetpatch_collector::CollectorOptions,
    /// The named credentials (`[credentials]`) of the scheduler and the workers.
    pub credentials: Credentials,
    /// `scheduler.max_content_bytes`.
    pub max_content_bytes: u64,
    /// The scheduler's `[scheduler.auth]` (OIDC); API keys always work.
    pub auth: fleetpatch_scheduler::auth::AuthOptions,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        Self {
            workers: 2,
            worker_concurrency: 16,
            sim: SimOptions { min_latency_ms: 1, max_latency_ms: 5, patch_ms: 20, ..SimOptions::default() },
            verify_delay_seconds: 1,
            retry_backoff_seconds: vec![1, 1, 1],
            offline_check_seconds: vec![1, 2],
            reboot_check_seconds: vec![1],
            unix_reboot_command: None,
            ssh: None,
            smb: None,
            smb_service_managers: None,
            agent_binary: None,
            step_timeout_seconds: 30,
            collector: fleetpatch_collector::CollectorOptions::default(),
            credentials: Credentials::new(),
            max_content_bytes: fleetpatch_scheduler::SchedulerOptions::default().max_content_bytes,
            auth: Default::default(),
        }
    }
}

/// A worker on its own thread and runtime.
pub struct WorkerProcess {
    kill: Option<tokio::sync::oneshot::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WorkerProcess {
    /// Kills it as a crash would: no drain, unacked jobs go back to the broker.
    pub fn kill(mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(true);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    /// Stops it gracefully (drain).
    pub fn stop(mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(false);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(true);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The collector, with its own shutdown so a test can stop and restart it.
struct CollectorProcess {
    shutdown: Shutdown,
    join: tokio::task::JoinHandle<()>,
}

pub struct Sandbox {
    pub store: Store,
    pub api: String,
    pub collector: SocketAddr,
    /// The scheduler's content store, shared with the workers.
    pub content_dir: PathBuf,
    pub fleet: SimFleet,
    /// Sends [`Sandbox::admin_key`] on every request.
    pub http: reqwest::Client,
    /// An admin API key (`sandbox-admin`) of this sandbox's database.
    pub admin_key: String,
    pub options: SandboxOptions,
    pub workers: Vec<WorkerProcess>,
    database: String,
    database_url: String,
    amqp: RabbitOptions,
    shutdown: Shutdown,
    joins: Vec<tokio::task::JoinHandle<()>>,
    collector_process: Option<CollectorProcess>,
    agent_binary: Option<PathBuf>,
    topology: Arc<RabbitBackend>,
}

impl Sandbox {
    /// A bus on this sandbox's queues (its prefix on the shared broker).
    pub fn queues(&self) -> fleetpatch_bus::Bus {
        fleetpatch_bus::Bus::new(self.topology.clone())
    }

    pub async fn start(options: SandboxOptions) -> Sandbox {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
            .with_test_writer()
            .try_init();
        let admin = admin_options();
        let database = format!("fp_test_{}", Uuid::new_v4().simple());
        let store_options = fleetpatch_store::create_sibling_database(&admin, &database).await.unwrap_or_else(|error| {
            panic!("PostgreSQL is required at FLEETPATCH_TEST_DATABASE_URL={}: {error} (start it: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start)", fleetpatch_store::redact_url(&admin.url))
        });
        let database_url = store_options.url.clone();
        let store = Store::connect(&store_options).await.expect("connect");
        store.migrate().await.expect("migrate");
        let admin_key = store
            .create_api_key("sandbox-admin", fleetpatch_store::Role::Admin, None)
            .await
            .expect("the sandbox's admin key")
            .expose_secret()
            .to_owned();

        let amqp = RabbitOptions {
            url: amqp_url(),
            prefix: format!("fp-test-{}", Uuid::new_v4().simple()),
            delivery_limit: 20,
        };
        let topology = Arc::new(
            RabbitBackend::connect(&amqp, &fleetpatch_proto::routing::WORK_QUEUES)
                .await
                .unwrap_or_else(|error| panic!("RabbitMQ is required at FLEETPATCH_TEST_AMQP_URL={}: {error} (start it: rabbitmq-server -detached)", amqp.url)),
        );
        let shutdown = Shutdown::new();
        let fleet = SimFleet::new(options.sim.clone());
        let content_dir = std::env::temp_dir().join(format!("{database}-content"));
        let agent_binary = match (options.ssh.is_some() || options.smb.is_some(), &options.agent_binary) {
            (_, Some(path)) => Some(path.clone()),
            (true, None) => Some(agent_binary().to_path_buf()),
            (false, None) => None,
        };

        let scheduler = fleetpatch_scheduler::start(
            fleetpatch_scheduler::SchedulerOptions {
                listen: "127.0.0.1:0".into(),
                content_dir: content_dir.clone(),
                verify_delay_seconds: options.verify_delay_seconds,
                reconcile_interval_seconds: 5,
                prefetch: 32,
                credential_names: options.credentials.keys().cloned().collect(),
                max_content_bytes: options.max_content_bytes,
                auth: options.auth.clone(),
                ..Default::default()
            },
            store.clone(),
            Self::bus(&amqp).await,
            Health::new(),
            shutdown.clone(),
        )
        .await
        .expect("scheduler starts");
        let (collector_addr, collector_process) =
            Self::start_collector(&options.collector, &store, &amqp, "127.0.0.1:0").await;
        let api = format!("http://{}", scheduler.local_addr);
        let joins = vec![tokio::spawn(async move {
            scheduler.join.await.expect("scheduler task").expect("scheduler ran");
        })];
        let mut sandbox = Sandbox {
            store,
            api,
            collector: collector_addr,
            content_dir,
            fleet,
            http: client_with(Some(&admin_key)),
            admin_key,
            options: options.clone(),
            workers: vec![],
            database,
            database_url,
            amqp,
            shutdown,
            joins,
            collector_process: Some(collector_process),
            agent_binary,
            topology,
        };
        for _ in 0..options.workers {
            let worker = sandbox.spawn_worker();
            sandbox.workers.push(worker);
        }
        sandbox
    }

    async fn start_collector(
        options: &fleetpatch_collector::CollectorOptions,
        store: &Store,
        amqp: &RabbitOptions,
        listen: &str,
    ) -> (SocketAddr, CollectorProcess) {
        let shutdown = Shutdown::new();
        let collector = fleetpatch_collector::start(
            fleetpatch_collector::CollectorOptions { listen: listen.into(), ..options.clone() },
            token_key(),
            store.clone(),
            Self::bus(amqp).await,
            Health::new(),
            shutdown.clone(),
        )
        .await
        .unwrap_or_else(|error| panic!("collector starts on {listen}: {error}"));
        let addr = collector.local_addr;
        let join = tokio::spawn(async move {
            collector.join.await.expect("collector task").expect("collector ran");
        });
        (addr, CollectorProcess { shutdown, join })
    }

    /// Stops the collector (graceful: accepted reports are written); its
    /// port refuses connections until [`Sandbox::restart_collector`].
    pub async fn stop_collector(&mut self) {
        let process = self.collector_process.take().expect("the collector is running");
        process.shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(30), process.join)
            .await
            .expect("the collector stops within 30 s")
            .expect("collector task");
    }

    /// Starts the collector again on the port it had.
    pub async fn restart_collector(&mut self) {
        assert!(self.collector_process.is_none(), "the collector is already running");
        let listen = self.collector.to_string();
        let (addr, process) = Self::start_collector(&self.options.collector, &self.store, &self.amqp, &listen).await;
        assert_eq!(addr, self.collector);
        self.collector_process = Some(process);
    }

    /// `PUT /v1/content/{sha256}`: puts an installer into the content
    /// store; returns its sha256 and size.
    pub async fn upload_content(&self, bytes: Vec<u8>) -> (String, u64) {
        use sha2::Digest;
        let sha256 = hex::encode(sha2::Sha256::digest(&bytes));
        let size = bytes.len() as u64;
        let response = self
            .http
            .put(format!("{}/v1/content/{sha256}", self.api))
            .body(bytes)
            .send()
            .await
            .expect("PUT /v1/content");
        let status = response.status();
        assert!(status.is_success(), "upload content: {status} {}", response.text().await.unwrap_or_default());
        (sha256, size)
    }

    /// The URL of this sandbox's database (for `fleetpatch apikey`).
    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    /// Makes an API key of `role` named `name` (expiring at `expires_at`); returns the key.
    pub async fn api_key(
        &self,
        name: &str,
        role: fleetpatch_store::Role,
        expires_at: Option<chrono::DateTime<chrono::Utc>>,
    ) -> String {
        self.store
            .create_api_key(name, role, expires_at)
            .await
            .unwrap_or_else(|error| panic!("API key {name}: {error}"))
            .expose_secret()
            .to_owned()
    }

    /// Options of a relay (`fleetpatch relay`) in front of this sandbox's
    /// content store: on a free loopback port, reading the store with a
    /// viewer key of its own (in a file under `dir`), its cache in
    /// `dir/<name>-cache`, and no drain time (a test may kill it mid-transfer).
    pub async fn relay_options(&self, dir: &Path, name: &str) -> fleetpatch_relay::RelayOptions {
        let key = self.api_key(&format!("relay-{name}"), fleetpatch_store::Role::Viewer, None).await;
        let key_file = dir.join(format!("relay-{name}.key"));
        std::fs::write(&key_file, key).expect("write the relay's key");
        fleetpatch_relay::RelayOptions {
            listen: "127.0.0.1:0".into(),
            upstream_url: self.api.clone(),
            upstream_token_ref: format!("file:{}", key_file.display()),
            cache_dir: dir.join(format!("{name}-cache")),
            http: fleetpatch_runtime::http::ServerOptions { drain_seconds: 0, ..Default::default() },
            ..Default::default()
        }
    }

    async fn bus(amqp: &RabbitOptions) -> Bus {
        Bus::new(Arc::new(
            RabbitBackend::connect(amqp, &fleetpatch_proto::routing::WORK_QUEUES).await.expect("connect to RabbitMQ"),
        ))
    }

    pub fn worker_options(&self) -> WorkerOptions {
        let agent_binaries = match &self.agent_binary {
            Some(path) => BTreeMap::from([
                (std::env::consts::ARCH.to_owned(), path.clone()),
                (format!("windows-{}", std::env::consts::ARCH), path.clone()),
            ]),
            None => BTreeMap::new(),
        };
        WorkerOptions {
            concurrency: self.options.worker_concurrency,
            listen: "127.0.0.1:0".into(),
            collector_url: format!("http://{}", self.collector),
            collector_ca_file: None,
            retry_backoff_seconds: self.options.retry_backoff_seconds.clone(),
            offline_check_seconds: self.options.offline_check_seconds.clone(),
            reboot_check_seconds: self.options.reboot_check_seconds.clone(),
            unix_reboot_command: self.options.unix_reboot_command.clone(),
            windows_reboot_command: None,
            step_timeout_seconds: self.options.step_timeout_seconds,
            verify_delay_seconds: self.options.verify_delay_seconds,
            agent_binaries,
            content_dir: self.content_dir.clone(),
            relays: Vec::new(),
            relay_ca_file: None,
            relay_check_timeout_seconds: 2,
            relay_download_timeout_seconds: 120,
            credentials: self.options.credentials.clone(),
        }
    }

    /// Starts one more worker on its own thread and runtime.
    pub fn spawn_worker(&self) -> WorkerProcess {
        self.spawn_worker_with(self.worker_options())
    }

    /// Starts one more worker with these options (e.g. another
    /// `collector_url`, to put a proxy between the agents and the collector).
    pub fn spawn_worker_with(&self, options: WorkerOptions) -> WorkerProcess {
        let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<bool>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let database_url = self.database_url.clone();
        let amqp = self.amqp.clone();
        let fleet = self.fleet.clone();
        let ssh = self.options.ssh.clone().map(|options| {
            Arc::new(SshTransport::new(options).unwrap_or_else(|error| panic!("sandbox ssh options: {error}")))
        });
        let smb = self.options.smb.clone().map(|options| {
            let transport = SmbTransport::new(options).unwrap_or_else(|error| panic!("sandbox smb options: {error}"));
            Arc::new(match &self.options.smb_service_managers {
                Some(services) => transport.with_service_managers(services.clone()),
                None => transport,
            })
        });
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("worker runtime");
            runtime.block_on(async move {
                let store =
                    Store::connect(&StoreOptions { url: database_url, max_connections: 10 }).await.expect("connect");
                let mut transports = Transports::default().with(Arc::new(SimTransport::new(fleet)));
                if let Some(ssh) = ssh {
                    transports = transports.with(ssh);
                }
                if let Some(smb) = smb {
                    transports = transports.with(smb);
                }
                let worker =
                    fleetpatch_worker::Worker::new(options, token_key(), store, Self::bus(&amqp).await, transports)
                        .expect("worker builds");
                let shutdown = Shutdown::new();
                let handle = worker.start(Health::new(), shutdown.clone()).await.expect("worker starts");
                ready_tx.send(()).expect("test waits");
                let crash = kill_rx.await.unwrap_or(true);
                if !crash {
                    shutdown.trigger();
                    let _ = handle.join.await;
                }
            });
            // A crash: every task of this runtime, and its connections, vanish now.
            runtime.shutdown_background();
        });
        ready_rx.recv_timeout(Duration::from_secs(60)).expect("worker started");
        WorkerProcess { kill: Some(kill_tx), thread: Some(thread) }
    }

    /// `POST /v1/rollouts`; panics with the problem body unless 201.
    pub async fn create_rollout(&self, body: serde_json::Value) -> Uuid {
        let response =
            self.http.post(format!("{}/v1/rollouts", self.api)).json(&body).send().await.expect("POST /v1/rollouts");
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert_eq!(status, 201, "create rollout: {text}");
        let value: serde_json::Value = serde_json::from_str(&text).expect("json");
        value["id"].as_str().expect("rollout id").parse().expect("uuid")
    }

    /// `GET` of an API path; panics unless 200 with JSON.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let response = self.http.get(format!("{}{path}", self.api)).send().await.expect("GET");
        assert_eq!(response.status(), 200, "GET {path}");
        response.json().await.expect("json")
    }

    pub async fn post(&self, path: &str) -> reqwest::Response {
        self.http.post(format!("{}{path}", self.api)).send().await.expect("POST")
    }

    /// Waits until `check` holds, polling; panics after `timeout` with `what`.
    pub async fn wait_for<T>(&self, what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(value) = check().await {
                return value;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out after {timeout:?} waiting for {what}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_for_rollout_state(&self, id: Uuid, state: RolloutState, timeout: Duration) -> Rollout {
        self.wait_for(&format!("rollout {id} to be {state}"), timeout, async || {
            let rollout = self.store.rollout(id).await.ok()?;
            (rollout.state == state).then_some(rollout)
        })
        .await
    }

    pub async fn all_targets(&self, rollout: Uuid) -> Vec<Target> {
        self.store.targets(rollout, None, None, 1_000_000).await.expect("targets")
    }

    pub async fn wait_for_target_state(&self, target: Uuid, states: &[TargetState], timeout: Duration) -> Target {
        self.wait_for(&format!("target {target} to reach {states:?}"), timeout, async || {
            let target = self.store.target(target).await.ok()?;
            states.contains(&target.state).then_some(target)
        })
        .await
    }

    /// Stops everything and drops the database and the queues.
    pub async fn stop(mut self) {
        for worker in self.workers.drain(..) {
            worker.stop();
        }
        self.shutdown.trigger();
        if let Some(collector) = self.collector_process.take() {
            collector.shutdown.trigger();
            let _ = tokio::time::timeout(Duration::from_secs(30), collector.join).await;
        }
        for join in self.joins.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(30), join).await;
        }
        let _ = self.topology.delete_topology().await;
        self.store.clone().close().await;
        let _ = std::fs::remove_dir_all(&self.content_dir);
        let _ = fleetpatch_store::drop_sibling_database(&admin_options(), &self.database).await;
    }
}

/// The workspace's `fleetpatch-agent` (debug build), built once per process
/// into the target directory this test binary runs from, so it is never
/// stale. Panics with cargo's output when the build fails.
///
/// It is built the way `cargo nextest run --workspace` builds it, as the
/// binary the agent's integration test `agent` runs (`cargo test --workspace
/// --no-run --test agent`), so it reuses that build's dependencies. `cargo
/// build -p fleetpatch-agent` resolved the features of the agent's
/// dependencies (serde, prost, and protox behind fleetpatch-proto's build
/// script) for that package alone and compiled them all again: over 10
/// minutes on the loaded 2-core machine here, in the first test process of
/// each run that needs the agent (`cargo build --workspace --bin
/// fleetpatch-agent`: 256 s; this: 41 s the first time, then nothing).
pub fn agent_binary() -> &'static Path {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT.get_or_init(|| {
        let target_dir = target_dir();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the tests crate is in the workspace");
        let output = std::process::Command::new(&cargo)
            .current_dir(workspace)
            .args(["test", "--quiet", "--locked", "--workspace", "--no-run", "--test", "agent"])
            .args(["--message-format", "json", "--target-dir"])
            .arg(&target_dir)
            .output()
            .unwrap_or_else(|error| panic!("cannot run {cargo:?} to build fleetpatch-agent: {error}"));
        assert!(
            output.status.success(),
            "building fleetpatch-agent failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        // The executable cargo says it built for the agent's bin target.
        let path = String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|message| {
                message["reason"] == "compiler-artifact" && message["target"]["name"] == "fleetpatch-agent"
            })
            .filter(|message| {
                message["target"]["kind"].as_array().is_some_and(|kinds| kinds.iter().any(|k| k == "bin"))
            })
            .find_map(|message| message["executable"].as_str().map(PathBuf::from))
            .expect("cargo names the fleetpatch-agent executable it built");
        assert!(path.is_file(), "cargo built fleetpatch-agent, yet {} is missing", path.display());
        path
    })
}

/// The cargo target directory: `CARGO_TARGET_DIR`, else the one holding
/// this executable (`<target>/<profile>/deps/<binary>` or `<target>/<profile>/examples/<binary>`).
fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("path of the running test binary");
    exe.parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("{} is not inside a cargo target directory", exe.display()))
        .to_path_buf()
}

/// An HTTP client that sends `token` as `Authorization: Bearer` on every
/// request (none when `None`).
pub fn client_with(token: Option<&str>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token {
        let mut value =
            reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).expect("a token fits a header");
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    reqwest::Client::builder().default_headers(headers).build().expect("an HTTP client")
}

/// A rollout request of `targets` simulated hosts and `patches` patches.
pub fn sim_rollout(
    name: &str,
    targets: usize,
    patches: usize,
    concurrency: u32,
    timeout_seconds: u32,
) -> serde_json::Value {
    let patches: Vec<serde_json::Value> = (0..patches)
        .map(|i| {
            serde_json::json!({
                "name": format!("KB50{i:05}"),
                "kb": format!("KB50{i:05}"),
                "file": format!("kb50{i:05}.msu"),
                "sha256": format!("{:064x}", i + 1),
                "installer": "msu",
            })
        })
        .collect();
    let targets: Vec<serde_json::Value> =
        (0..targets).map(|i| serde_json::json!({ "host": format!("host-{i:05}"), "transport": "sim" })).collect();
    serde_json::json!({
        "name": name,
        "concurrency": concurrency,
        "timeout_seconds": timeout_seconds,
        "heartbeat_seconds": 1,
        "patches": patches,
        "targets": targets,
    })
}

/// A named credential for `transports` on `hosts` whose secret is in `file`.
pub fn credential_in_file(file: &Path, transports: &[&str], hosts: &[&str]) -> CredentialDefinition {
    CredentialDefinition {
        secret_ref: format!("file:{}", file.display()),
        user: None,
        transports: transports.iter().map(|t| t.to_string()).collect(),
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        labels: BTreeMap::new(),
    }
}

/// Labels that make a simulated host behave a given way.
pub fn behaviour(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("sim.behaviour".to_owned(), name.to_owned())])
}
