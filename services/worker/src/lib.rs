//! The worker: stateless, one target job at a time per slot.
//!
//! A deploy job is: claim (`queued → probing`) → probe → record the probe
//! and the token hash (`→ staging`) → stage → `→ installing` → start the
//! agent → `→ running` with the watchdog armed in the same transaction →
//! ack. The job is acked long before the install ends; the agent reports to
//! the collector from then on. Transient errors go back to `queued` with a
//! delayed retry through the bus; permanent ones fail the target with the
//! reason. Cleanup and verification jobs run the transport's steps of the
//! same names.
//!
//! **Architecture invariant**: a worker keeps nothing between jobs. A job
//! redelivered after its worker died is taken over by any worker: the
//! agent's token is derived (HMAC) from the target, attempt and a nonce
//! stored on the target, so the new worker computes the same token, and
//! the transport's agent start is idempotent per deployment id.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fleetpatch_bus::{Bus, Delivery};
use fleetpatch_proto::plan;
use fleetpatch_proto::report_auth::derive_token;
use fleetpatch_proto::routing;
use fleetpatch_proto::v1;
use fleetpatch_proto::Message;
use fleetpatch_runtime::credentials::{Credentials, ScopeTarget};
use fleetpatch_runtime::tokens::TokenKey;
use fleetpatch_runtime::{ConfigError, Health, Shutdown};
use fleetpatch_store::{Claim, DeployContext, ProbeOutcome, Store, Target};
use fleetpatch_transport::{PatchProbe, TargetSpec, Transport, Transports};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tracing::Instrument;
use uuid::Uuid;

mod credential;
mod delivery;
mod reach;
pub use credential::{parse_credential, resolve_credential, ResolveCredentialError, SecretFormatError};

/// The transports a credential's scope may name.
pub const CREDENTIAL_TRANSPORTS: [&str; 3] = ["sim", "ssh", "smb"];

/// Worker settings (`[worker]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerOptions {
    /// Deploy jobs handled at once (the deploy queue's prefetch).
    pub concurrency: u16,
    /// Ops endpoints (`/livez`, `/readyz`, `/metrics`).
    pub listen: String,
    /// The collector URL the agents report to, as seen from the targets.
    pub collector_url: String,
    /// PEM file of the CA the collector's TLS certificate chains to; its
    /// content goes into every plan so the agent can verify an `https://`
    /// `collector_url` (required then).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collector_ca_file: Option<PathBuf>,
    /// Backoff before each retry of an unreachable target (seconds).
    pub retry_backoff_seconds: Vec<u64>,
    /// Delay before each reachability check of an offline target (seconds;
    /// the last repeats), for rollouts with `retry_offline_for`.
    pub offline_check_seconds: Vec<u64>,
    /// Delay before each check of a machine that reboots after its
    /// deployment (seconds; the last repeats), until it is back on a new
    /// boot or the rollout's `reboot_timeout_seconds` runs out.
    pub reboot_check_seconds: Vec<u64>,
    /// The command the agent runs to reboot a Unix target, when the
    /// rollout's reboot policy says so (the agent's default: `shutdown -r +1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unix_reboot_command: Option<String>,
    /// The same for Windows targets (the agent's default: `shutdown /r /t 60`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub windows_reboot_command: Option<String>,
    /// Time limit of one remote step (probe, stage, start) in seconds.
    pub step_timeout_seconds: u64,
    /// Agent binary per target architecture (`x86_64`, `aarch64`, ...) for
    /// Unix targets, `windows-x86_64` ... for Windows ones ([`agent_binary_key`]).
    pub agent_binaries: BTreeMap<String, PathBuf>,
    /// The content store (installers by sha256).
    pub content_dir: PathBuf,
    /// Delay before the verification scan after a timeout (seconds).
    pub verify_delay_seconds: u64,
    /// Relays by target label (`{ match = "site=paris", url = "http://relay-paris:1073" }`),
    /// after the rollout's own `relays`: a matching target's agent downloads
    /// its installers from the relay instead of the worker pushing them.
    pub relays: Vec<fleetpatch_proto::relay::RelayRule>,
    /// PEM file of the CA an `https://` relay's certificate chains to (the
    /// worker's check and the agents trust only it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_ca_file: Option<PathBuf>,
    /// How long the worker waits for a relay's `/readyz` before it pushes
    /// the installers instead (seconds).
    pub relay_check_timeout_seconds: u64,
    /// How long an agent keeps trying to download one installer from its
    /// relay, resuming where it stopped, before that patch fails (seconds).
    pub relay_download_timeout_seconds: u32,
    /// The credentials defined in the top-level `[credentials]` table (a
    /// target names one); filled by the binary from that table, never read
    /// from `[worker]`.
    #[serde(skip)]
    pub credentials: Credentials,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            concurrency: 32,
            listen: "0.0.0.0:9102".into(),
            collector_url: "http://127.0.0.1:1072".into(),
            collector_ca_file: None,
            retry_backoff_seconds: vec![10, 60, 300],
            offline_check_seconds: vec![60, 300, 900, 1800, 3600],
            reboot_check_seconds: vec![15, 15, 30, 30, 60],
            unix_reboot_command: None,
            windows_reboot_command: None,
            step_timeout_seconds: 300,
            agent_binaries: BTreeMap::new(),
            content_dir: PathBuf::from("/var/lib/fleetpatch/content"),
            verify_delay_seconds: 1800,
            relays: Vec::new(),
            relay_ca_file: None,
            relay_check_timeout_seconds: 5,
            relay_download_timeout_seconds: plan::DEFAULT_DOWNLOAD_TIMEOUT_SECONDS,
            credentials: Credentials::new(),
        }
    }
}

impl WorkerOptions {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.concurrency == 0 {
            return Err(ConfigError::too_small("worker.concurrency", 1));
        }
        if !(self.collector_url.starts_with("http://") || self.collector_url.starts_with("https://")) {
            return Err(ConfigError::invalid(
                "worker.collector_url",
                format!("must be an http:// or https:// URL, got {:?}", self.collector_url),
            ));
        }
        if self.collector_url.starts_with("https://") && self.collector_ca_file.is_none() {
            return Err(ConfigError::invalid(
                "worker.collector_ca_file",
                format!(
                    "must name the PEM file of the CA that signed the collector's certificate when \
                     worker.collector_url is https ({:?}); the agent trusts only that CA",
                    self.collector_url
                ),
            ));
        }
        for (key, delays) in [
            ("worker.offline_check_seconds", &self.offline_check_seconds),
            ("worker.reboot_check_seconds", &self.reboot_check_seconds),
        ] {
            if delays.is_empty() || delays.contains(&0) {
                return Err(ConfigError::invalid(
                    key,
                    format!("must be a non-empty list of delays of at least 1 s, got {delays:?}"),
                ));
            }
        }
        for (key, command) in [
            ("worker.unix_reboot_command", &self.unix_reboot_command),
            ("worker.windows_reboot_command", &self.windows_reboot_command),
        ] {
            if let Some(command) = command {
                if command.trim().is_empty() || command.contains(['\n', '\r', '\0']) || command.len() > 1_024 {
                    return Err(ConfigError::invalid(
                        key,
                        format!("must be one line of at most 1024 bytes, not empty, got {command:?}"),
                    ));
                }
            }
        }
        if self.step_timeout_seconds == 0 {
            return Err(ConfigError::too_small("worker.step_timeout_seconds", 1));
        }
        if let Err((index, error)) = fleetpatch_proto::relay::validate_rules(&self.relays) {
            return Err(ConfigError::invalid(format!("worker.relays[{index}]"), error.to_string()));
        }
        if self.relays.iter().any(|rule| rule.url.starts_with("https://")) && self.relay_ca_file.is_none() {
            return Err(ConfigError::invalid(
                "worker.relay_ca_file",
                "must name the PEM file of the CA that signed the relays' certificates when a relay is https; \
                 the agent trusts only that CA",
            ));
        }
        if !(1..=300).contains(&self.relay_check_timeout_seconds) {
            return Err(ConfigError::out_of_range("worker.relay_check_timeout_seconds", 1, 300));
        }
        if !(1..=86_400).contains(&self.relay_download_timeout_seconds) {
            return Err(ConfigError::out_of_range("worker.relay_download_timeout_seconds", 1, 86_400));
        }
        fleetpatch_runtime::credentials::validate(&self.credentials, &CREDENTIAL_TRANSPORTS)?;
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Runtime(#[from] fleetpatch_runtime::Error),
    #[error(transparent)]
    Bus(#[from] fleetpatch_bus::Error),
    #[error("worker configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("worker configuration: worker.collector_ca_file: cannot read {}: {source}", path.display())]
    CollectorCaUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "worker configuration: worker.collector_ca_file: {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        path.display()
    )]
    CollectorCaNotPem { path: PathBuf },
    #[error("worker configuration: worker.relay_ca_file: {reason}")]
    RelayCa { reason: String },
    #[error("serving HTTP: {0}")]
    Serve(#[from] std::io::Error),
}

/// Everything a worker needs; cheap to clone.
#[derive(Clone)]
pub struct Worker {
    options: Arc<WorkerOptions>,
    store: Store,
    bus: Bus,
    transports: Transports,
    token_key: TokenKey,
    /// The CA the agents verify an `https://` collector against.
    collector_ca_pem: Option<Arc<str>>,
    /// Asks a target's relay whether it serves before a pull is staged.
    relay_check: delivery::RelayCheck,
    /// Wakes this worker's outbox relay after a job committed messages
    /// (the watchdog's timer, a retry, a dispatch request).
    relay_nudge: Arc<tokio::sync::Notify>,
}

/// A running worker.
pub struct WorkerHandle {
    pub local_addr: std::net::SocketAddr,
    pub join: tokio::task::JoinHandle<Result<(), Error>>,
}

/// Why a job was not done, and so what becomes of its message.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// It can never succeed as it is (an undecodable message, an unknown
    /// queue, a target that does not exist, a credential out of scope):
    /// dead-lettered at once, with the reason in the log, for an operator
    /// to see (`fleetpatch dead-letters list`).
    #[error("{0}")]
    Permanent(String),
    /// It may succeed later (the database unreachable, no transport of its
    /// kind on this worker): returned to the queue after a short pause, and
    /// dead-lettered by the broker after `amqp.delivery_limit` deliveries.
    #[error("{0}")]
    Transient(String),
}

impl From<fleetpatch_store::Error> for JobError {
    fn from(error: fleetpatch_store::Error) -> Self {
        use fleetpatch_store::Error as E;
        match error {
            // An illegal move is a bug, not a passing condition: retrying repeats it.
            E::NotFound { .. }
            | E::Invalid(_)
            | E::Corrupt(_)
            | E::NotMigrated { .. }
            | E::IllegalTransition { .. } => JobError::Permanent(error.to_string()),
            E::Connect { .. } | E::Db(_) | E::Conflict(_) => JobError::Transient(error.to_string()),
        }
    }
}

enum StepError {
    Transport(fleetpatch_transport::Error),
    Store(fleetpatch_store::Error),
    Permanent(String),
}

impl From<fleetpatch_store::Error> for StepError {
    fn from(error: fleetpatch_store::Error) -> Self {
        StepError::Store(error)
    }
}

impl From<fleetpatch_transport::Error> for StepError {
    fn from(error: fleetpatch_transport::Error) -> Self {
        StepError::Transport(error)
    }
}

impl Worker {
    /// A worker deriving agent tokens from `token_key` (the installation's
    /// shared key, `[tokens]`).
    pub fn new(
        options: WorkerOptions,
        token_key: TokenKey,
        store: Store,
        bus: Bus,
        transports: Transports,
    ) -> Result<Self, Error> {
        options.validate()?;
        let collector_ca_pem = match &options.collector_ca_file {
            None => None,
            Some(path) => {
                let pem = std::fs::read_to_string(path)
                    .map_err(|source| Error::CollectorCaUnreadable { path: path.clone(), source })?;
                if !pem.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(Error::CollectorCaNotPem { path: path.clone() });
                }
                Some(Arc::from(pem))
            }
        };
        let relay_ca_pem = match &options.relay_ca_file {
            None => None,
            Some(path) => {
                let pem = std::fs::read_to_string(path)
                    .map_err(|source| Error::RelayCa { reason: format!("cannot read {}: {source}", path.display()) })?;
                Some(Arc::from(pem))
            }
        };
        let relay_check =
            delivery::RelayCheck::new(relay_ca_pem, Duration::from_secs(options.relay_check_timeout_seconds))?;
        Ok(Self {
            relay_check,
            options: Arc::new(options),
            store,
            bus,
            transports,
            token_key,
            collector_ca_pem,
            relay_nudge: Arc::default(),
        })
    }

    /// Binds the ops listener and consumes deploy, cleanup, verify and reachability jobs
    /// until `shutdown`; then stops consuming and finishes in-flight jobs.
    pub async fn start(self, health: Health, shutdown: Shutdown) -> Result<WorkerHandle, Error> {
        let listener = fleetpatch_runtime::ops::bind(&self.options.listen).await?;
        let local_addr = listener.local_addr()?;
        health.add_check("database", self.store.readiness_check());
        health.add_check("bus", self.bus.readiness_check());
        let deploy = self.bus.consume(routing::DEPLOY, self.options.concurrency).await?;
        let cleanup = self.bus.consume(routing::CLEANUP, 4).await?;
        let verify = self.bus.consume(routing::VERIFY, 4).await?;
        let reach = self.bus.consume(routing::REACH, 8).await?;
        let app = fleetpatch_runtime::ops::router(health.clone());
        // The worker publishes what its own transactions commit, at once
        // (the scheduler's and the collector's relays would find it later).
        let relay_stop = tokio_util::sync::CancellationToken::new();
        let relay = tokio::spawn(fleetpatch_store::relay::run_relay(
            self.store.clone(),
            self.bus.clone(),
            self.relay_nudge.clone(),
            Duration::from_secs(1),
            Duration::ZERO,
            relay_stop.clone(),
        ));
        let join = tokio::spawn(async move {
            let server_shutdown = shutdown.clone();
            let server = tokio::spawn(async move {
                axum::serve(listener, app).with_graceful_shutdown(async move { server_shutdown.wait().await }).await
            });
            let slots = Arc::new(Semaphore::new(usize::from(self.options.concurrency) + 8));
            let loops = [
                tokio::spawn(self.clone().consume_loop(deploy, slots.clone(), shutdown.clone())),
                tokio::spawn(self.clone().consume_loop(cleanup, slots.clone(), shutdown.clone())),
                tokio::spawn(self.clone().consume_loop(verify, slots.clone(), shutdown.clone())),
                tokio::spawn(self.clone().consume_loop(reach, slots.clone(), shutdown.clone())),
            ];
            shutdown.wait().await;
            health.start_draining();
            for handle in loops {
                let _ = handle.await;
            }
            // Wait for in-flight jobs (each holds a slot) within a deadline.
            let total = usize::from(self.options.concurrency) + 8;
            let drained = tokio::time::timeout(Duration::from_secs(60), slots.acquire_many(total as u32)).await;
            if drained.is_err() {
                tracing::warn!("in-flight jobs did not finish within 60 s; they will be redelivered");
            }
            relay_stop.cancel();
            let _ = relay.await;
            self.bus.close().await;
            let _ = server.await;
            tracing::info!("worker drained");
            Ok(())
        });
        Ok(WorkerHandle { local_addr, join })
    }

    async fn consume_loop(self, mut consumer: fleetpatch_bus::Consumer, slots: Arc<Semaphore>, shutdown: Shutdown) {
        loop {
            let delivery = tokio::select! {
                next = consumer.next() => next,
                _ = shutdown.wait() => {
                    consumer.cancel();
                    return;
                }
            };
            let Some(delivery) = delivery else {
                if !shutdown.is_triggered() {
                    shutdown.fail("the bus closed the worker's consumer");
                }
                return;
            };
            let Ok(permit) = slots.clone().acquire_owned().await else { return };
            let worker = self.clone();
            let parent = fleetpatch_bus::parent_context(&delivery.headers);
            let span = tracing::info_span!("job", queue = %delivery.routing_key, redelivered = delivery.redelivered);
            {
                use tracing_opentelemetry::OpenTelemetrySpanExt;
                let _ = span.set_parent(parent);
            }
            tokio::spawn(
                async move {
                    worker.handle(delivery).await;
                    drop(permit);
                }
                .instrument(span),
            );
        }
    }

    async fn handle(&self, delivery: Delivery) {
        let started = std::time::Instant::now();
        let queue = delivery.routing_key.clone();
        let result = match queue.as_str() {
            routing::DEPLOY => match v1::DeployJob::decode(delivery.payload.as_slice()) {
                Ok(job) => self.deploy(job, delivery.redelivered).await,
                Err(error) => Err(JobError::Permanent(format!("undecodable deploy job: {error}"))),
            },
            routing::CLEANUP => match v1::CleanupJob::decode(delivery.payload.as_slice()) {
                Ok(job) => self.cleanup(job).await,
                Err(error) => Err(JobError::Permanent(format!("undecodable cleanup job: {error}"))),
            },
            routing::VERIFY => match v1::VerifyJob::decode(delivery.payload.as_slice()) {
                Ok(job) => self.verify(job).await,
                Err(error) => Err(JobError::Permanent(format!("undecodable verify job: {error}"))),
            },
            routing::REACH => match v1::ReachabilityCheck::decode(delivery.payload.as_slice()) {
                Ok(check) => self.reach(check).await,
                Err(error) => Err(JobError::Permanent(format!("undecodable reachability check: {error}"))),
            },
            other => Err(JobError::Permanent(format!("no handler for routing key {other:?}"))),
        };
        metrics::histogram!("fleetpatch_worker_job_seconds", "queue" => queue.clone())
            .record(started.elapsed().as_secs_f64());
        self.relay_nudge.notify_one();
        match result {
            Ok(()) => {
                metrics::counter!("fleetpatch_worker_jobs_total", "queue" => queue, "result" => "ok").increment(1);
                if let Err(error) = delivery.ack().await {
                    tracing::warn!(error = %error, "ack failed; the job will be redelivered");
                }
            }
            Err(JobError::Permanent(reason)) => {
                metrics::counter!("fleetpatch_worker_jobs_total", "queue" => queue, "result" => "dead_letter")
                    .increment(1);
                tracing::warn!(reason = %reason, "job can never succeed; dead-lettered");
                if let Err(error) = delivery.dead_letter().await {
                    tracing::warn!(error = %error, "dead-lettering failed; the job will be redelivered");
                }
            }
            Err(JobError::Transient(reason)) => {
                metrics::counter!("fleetpatch_worker_jobs_total", "queue" => queue, "result" => "error").increment(1);
                tracing::warn!(reason = %reason, delivery_count = delivery.delivery_count, "job failed; requeued");
                tokio::time::sleep(Duration::from_millis(500)).await;
                let _ = delivery.requeue().await;
            }
        }
    }

    /// The target as its transport sees it, with its credential: the name
    /// is looked up, its scope checked against the target, and only then is
    /// the secret read. Nothing here connects anywhere.
    fn target_spec(&self, target: &Target) -> Result<TargetSpec, JobError> {
        let credential = match &target.credential {
            None => None,
            Some(name) => Some(
                resolve_credential(
                    &self.options.credentials,
                    name,
                    ScopeTarget { transport: &target.transport, host: &target.host, labels: &target.labels },
                )
                .map_err(|error| JobError::Permanent(error.to_string()))?,
            ),
        };
        Ok(TargetSpec { credential, ..spec_without_credential(target) })
    }

    async fn step<T>(
        &self,
        step: &'static str,
        address: &str,
        future: impl std::future::Future<Output = fleetpatch_transport::Result<T>>,
    ) -> Result<T, StepError> {
        let seconds = self.options.step_timeout_seconds;
        let started = std::time::Instant::now();
        let result = match tokio::time::timeout(Duration::from_secs(seconds), future).await {
            Ok(result) => result.map_err(StepError::Transport),
            Err(_) => Err(StepError::Transport(fleetpatch_transport::Error::Timeout {
                address: address.to_owned(),
                step,
                seconds,
            })),
        };
        metrics::histogram!("fleetpatch_worker_step_seconds", "step" => step).record(started.elapsed().as_secs_f64());
        result
    }

    async fn deploy(&self, job: v1::DeployJob, redelivered: bool) -> Result<(), JobError> {
        let target_id =
            Uuid::parse_str(&job.target_id).map_err(|e| JobError::Permanent(format!("deploy job target id: {e}")))?;
        let nonce = hex::encode(rand::random::<[u8; 16]>());
        let claim = self.store.claim_deploy(target_id, job.attempt, redelivered, &nonce).await?;
        let context = match claim {
            Claim::Claimed(context) => *context,
            Claim::Skip { state, attempt } => {
                tracing::debug!(target_id = %target_id, state = %state, attempt, "deploy job is stale; skipped");
                return Ok(());
            }
        };
        let mut staged = false;
        match self.deploy_steps(&context, job.r#try, &mut staged).await {
            Ok(()) => Ok(()),
            Err(StepError::Store(error)) => Err(error.into()),
            Err(StepError::Permanent(reason)) => {
                tracing::info!(target_id = %target_id, reason = %reason, "deployment refused");
                self.store.fail_target(&context.target, &reason, staged).await?;
                Ok(())
            }
            Err(StepError::Transport(error)) => {
                let reason = error.to_string();
                let next_try = job.r#try + 1;
                let max_tries = context.rollout.settings.max_tries.max(1);
                if error.is_transient() && next_try < max_tries {
                    let backoff = self
                        .options
                        .retry_backoff_seconds
                        .get(job.r#try as usize)
                        .or(self.options.retry_backoff_seconds.last())
                        .copied()
                        .unwrap_or(10);
                    tracing::info!(target_id = %target_id, error = %reason, next_try, backoff, "transient error; retrying later");
                    self.store
                        .requeue_for_retry(&context.target, &reason, next_try, Duration::from_secs(backoff))
                        .await?;
                } else if error.is_transient() && context.rollout.settings.retry_offline_for_seconds.is_some() {
                    let first_check = self.offline_check_delay(0);
                    tracing::info!(target_id = %target_id, error = %reason, tries = next_try, "unreachable; offline");
                    self.store.go_offline(&context.target, &reason, first_check).await?;
                } else {
                    let reason = if error.is_transient() {
                        format!("{reason} (gave up after {next_try} tries)")
                    } else {
                        reason
                    };
                    tracing::info!(target_id = %target_id, error = %reason, "deployment failed");
                    self.store.fail_target(&context.target, &reason, staged).await?;
                }
                Ok(())
            }
        }
    }

    async fn deploy_steps(&self, context: &DeployContext, _try: u32, staged: &mut bool) -> Result<(), StepError> {
        let target = &context.target;
        let transport: Arc<dyn Transport> = self.transports.get(&target.transport).cloned().ok_or_else(|| {
            StepError::Permanent(format!(
                "this worker has no {:?} transport (it has: {})",
                target.transport,
                self.transports.kinds().collect::<Vec<_>>().join(", ")
            ))
        })?;
        let spec = self.target_spec(target).map_err(|error| StepError::Permanent(error.to_string()))?;
        let address = spec.address();
        let probes: Vec<PatchProbe> = context
            .patches
            .iter()
            .map(|p| PatchProbe { index: p.index, name: p.name.clone(), detection: p.detection.clone() })
            .collect();
        let probe = self.step("probe", &address, transport.probe(&spec, &probes)).await?;
        if !probe.is_admin {
            return Err(StepError::Permanent(format!(
                "the account used on {address} has no administrator rights (root, sudo or local admin); use one that has"
            )));
        }
        let nonce = target.token_nonce.clone().unwrap_or_default();
        let token = derive_token(self.token_key.as_bytes(), target.id, target.attempt, &nonce);
        let token_hash = hex::encode(Sha256::digest(token.as_bytes()));
        let probe_json = serde_json::to_value(&probe).unwrap_or_default();
        match self
            .store
            .record_probe(context, &probe.os, &probe.arch, probe_json, &probe.installed, &token_hash)
            .await?
        {
            ProbeOutcome::Stage => {}
            ProbeOutcome::AllInstalled | ProbeOutcome::Lost => return Ok(()),
        }
        let delivery = self.choose_delivery(context).await?;
        let deployment = self.deployment(context, &probe, token, transport.kind(), &delivery)?;
        *staged = true;
        self.step("stage", &address, transport.stage(&spec, &deployment)).await?;
        if !self.store.mark_installing(target, &delivery.describe()).await? {
            self.enqueue_cleanup(target).await;
            return Ok(());
        }
        let start = self.step("start", &address, transport.start_agent(&spec, &deployment)).await?;
        if start == fleetpatch_transport::AgentStart::AlreadyRunning {
            tracing::info!(target_id = %target.id, "agent of this deployment already runs; taken over");
        }
        if !self.store.mark_running(target).await? {
            tracing::debug!(target_id = %target.id, "target moved on before it was marked running");
        }
        Ok(())
    }

    async fn enqueue_cleanup(&self, target: &Target) {
        let message = fleetpatch_bus::Outgoing::work(
            routing::CLEANUP,
            v1::CleanupJob { target_id: target.id.to_string(), attempt: target.attempt }.encode_to_vec(),
        );
        if let Err(error) = self.store.enqueue(vec![message]).await {
            tracing::warn!(error = %error, target_id = %target.id, "could not queue a cleanup");
        }
    }

    async fn load_for_job(&self, target_id: &str) -> Result<(Target, Arc<dyn Transport>, TargetSpec), JobError> {
        let target_id = Uuid::parse_str(target_id).map_err(|e| JobError::Permanent(format!("job target id: {e}")))?;
        let target = self.store.target(target_id).await?;
        let transport = self
            .transports
            .get(&target.transport)
            .cloned()
            .ok_or_else(|| JobError::Transient(format!("this worker has no {:?} transport", target.transport)))?;
        let spec = self.target_spec(&target)?;
        Ok((target, transport, spec))
    }

    async fn cleanup(&self, job: v1::CleanupJob) -> Result<(), JobError> {
        let (target, transport, spec) = self.load_for_job(&job.target_id).await?;
        let deployment_id = plan::deployment_id(target.id, job.attempt);
        let keep_files = self.store.rollout(target.rollout_id).await?.settings.keep_files;
        match self.step("cleanup", &spec.address(), transport.cleanup(&spec, &deployment_id, keep_files)).await {
            Ok(()) => Ok(()),
            Err(StepError::Transport(error)) if !error.is_transient() => {
                tracing::warn!(target_id = %target.id, error = %error, "cleanup failed for good");
                Ok(())
            }
            Err(StepError::Transport(error)) => {
                Err(JobError::Transient(format!("cleanup of {}: {error}", spec.address())))
            }
            Err(StepError::Store(error)) => Err(error.into()),
            Err(StepError::Permanent(reason)) => Err(JobError::Permanent(reason)),
        }
    }

    async fn verify(&self, job: v1::VerifyJob) -> Result<(), JobError> {
        let (target, transport, spec) = self.load_for_job(&job.target_id).await?;
        let patches = self.store.patches(target.rollout_id).await?;
        let probes: Vec<PatchProbe> = patches
            .iter()
            .map(|p| PatchProbe { index: p.index, name: p.name.clone(), detection: p.detection.clone() })
            .collect();
        match self.step("verify", &spec.address(), transport.verify(&spec, &probes)).await {
            Ok(report) => {
                self.store
                    .record_verification(target.id, job.attempt, &report.installed, &report.missing, &report.unknown)
                    .await?;
            }
            Err(StepError::Transport(error)) => {
                tracing::warn!(target_id = %target.id, error = %error, "verification scan failed");
            }
            Err(StepError::Store(error)) => return Err(error.into()),
            Err(StepError::Permanent(reason)) => return Err(JobError::Permanent(reason)),
        }
        if job.cleanup_after {
            self.cleanup(v1::CleanupJob { target_id: job.target_id, attempt: job.attempt }).await?;
        }
        Ok(())
    }
}

/// The target as its transport sees it, with no credential (a
/// reachability check needs none; [`Worker::target_spec`] adds it).
fn spec_without_credential(target: &Target) -> TargetSpec {
    TargetSpec {
        target_id: target.id,
        host: target.host.clone(),
        port: target.port,
        labels: target.labels.clone(),
        credential: None,
    }
}

/// The `worker.agent_binaries` key of a target's agent: the architecture
/// (`x86_64`, `aarch64`) for Unix targets, `windows-<arch>` for Windows
/// ones (a different executable for the same processor).
pub fn agent_binary_key(os: &str, arch: &str) -> String {
    if os.eq_ignore_ascii_case("windows") {
        format!("windows-{arch}")
    } else {
        arch.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_and_reboot_check_delays_must_be_given_and_positive() {
        assert!(WorkerOptions::default().validate().is_ok());
        for bad in [vec![], vec![60, 0]] {
            let options = WorkerOptions { offline_check_seconds: bad.clone(), ..WorkerOptions::default() };
            let error = options.validate().unwrap_err().to_string();
            assert!(
                error.starts_with("worker.offline_check_seconds") && error.contains(&format!("{bad:?}")),
                "{error}"
            );
            let options = WorkerOptions { reboot_check_seconds: bad.clone(), ..WorkerOptions::default() };
            let error = options.validate().unwrap_err().to_string();
            assert!(error.starts_with("worker.reboot_check_seconds") && error.contains(&format!("{bad:?}")), "{error}");
        }
    }

    #[test]
    fn a_reboot_command_is_one_line() {
        for bad in ["", "  ", "shutdown -r now\nrm -rf /"] {
            let options = WorkerOptions { unix_reboot_command: Some(bad.into()), ..WorkerOptions::default() };
            let error = options.validate().unwrap_err().to_string();
            assert!(error.starts_with("worker.unix_reboot_command"), "{error}");
            let options = WorkerOptions { windows_reboot_command: Some(bad.into()), ..WorkerOptions::default() };
            assert!(options.validate().unwrap_err().to_string().starts_with("worker.windows_reboot_command"));
        }
        let options =
            WorkerOptions { unix_reboot_command: Some("systemctl reboot".into()), ..WorkerOptions::default() };
        assert!(options.validate().is_ok());
    }

    #[test]
    fn tokens_are_per_target_attempt_and_nonce() {
        let key = b"k".to_vec();
        let id = Uuid::new_v4();
        let token = derive_token(&key, id, 1, "n");
        assert_eq!(token, derive_token(&key, id, 1, "n"), "a worker taking over derives the same token");
        assert_ne!(token, derive_token(&key, id, 2, "n"));
        assert_ne!(token, derive_token(&key, id, 1, "m"));
        assert_ne!(token, derive_token(&key, Uuid::new_v4(), 1, "n"));
        assert_ne!(token, derive_token(b"other", id, 1, "n"));
        assert!(token.starts_with(&id.simple().to_string()));
    }

    #[test]
    fn windows_agents_have_their_own_binary_key() {
        assert_eq!(agent_binary_key("ubuntu", "x86_64"), "x86_64");
        assert_eq!(agent_binary_key("windows", "x86_64"), "windows-x86_64");
        assert_eq!(agent_binary_key("Windows", "aarch64"), "windows-aarch64");
    }
}
