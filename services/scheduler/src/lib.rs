//! The scheduler: the rollout API, dispatch of the next targets, and the
//! watchdog that turns silence into a timeout.
//!
//! * [`api`]: REST (`/v1/...`), OpenAPI at `/openapi.json`, problem+json errors.
//! * [`console`]: the web console at `/` (server-rendered pages, same
//!   credentials and roles as the API).
//! * dispatch: consumes `dispatch` requests (sent by every final state, by
//!   create, resume and retry) and fills the rollout's free slots.
//! * watchdog: consumes `watch` timers; reads `last_seen_at` from the
//!   database and re-arms for the remainder, or times the target out. It
//!   decides by the store's clock ([`Store::clock`]), never by when the
//!   timer arrived: the bus only wakes it up.
//! * reconciler: re-arms running targets whose watch timer was lost.
//!
//! **Architecture invariant**: the scheduler never talks to targets or
//! agents; it changes state only through the store's guarded transitions.

use std::sync::Arc;
use std::time::Duration;

use fleetpatch_bus::{Bus, Delivery};
use fleetpatch_proto::routing;
use fleetpatch_proto::v1;
use fleetpatch_proto::Message;
use fleetpatch_runtime::{ConfigError, Health, Shutdown};
use fleetpatch_store::{Store, TimeoutPolicy, WatchOutcome};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::Instrument;
use uuid::Uuid;

pub mod api;
pub mod auth;
pub mod console;
pub mod dead_letters;
pub mod report;

/// Scheduler settings (`[scheduler]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerOptions {
    /// REST API and ops endpoints.
    pub listen: String,
    /// The content store (installers by sha256), shared with the workers.
    pub content_dir: std::path::PathBuf,
    /// Delay before the verification scan after a timeout (seconds).
    pub verify_delay_seconds: u64,
    /// How often the reconciler looks for lost messages: watch timers,
    /// deploy jobs, dispatch requests (seconds).
    pub reconcile_interval_seconds: u64,
    /// A target that stays queued, probing, staging or installing this
    /// long has lost its deploy job; the reconciler publishes it again.
    /// Longer than the slowest staging (a large installer over a slow link).
    pub stuck_job_seconds: u64,
    /// Dispatch messages handled at once.
    pub prefetch: u16,
    /// Most watch timers checked together in one transaction: a burst of
    /// thousands of expiring timers costs tens of transactions, not
    /// thousands.
    pub watch_batch: u16,
    /// Watch checks (transactions) at the same time. While they run, the
    /// timers that arrive wait and are checked together by the next one, so
    /// the busier the database, the larger the batches and the fewer the
    /// transactions. The watch queue's prefetch is
    /// `watch_batch × (watch_writers + 1) + WATCH_HOLD_ROOM`.
    pub watch_writers: u16,
    /// The HTTP server: timeouts, connection cap, TLS (`scheduler.http.*`).
    pub http: fleetpatch_runtime::http::ServerOptions,
    /// Most targets in one rollout (`POST /v1/rollouts` answers 422 above).
    pub max_targets_per_rollout: usize,
    /// Largest installer `PUT /v1/content/{sha256}` accepts, in bytes (413 above).
    pub max_content_bytes: u64,
    /// Names of the credentials defined in the top-level `[credentials]`
    /// table (a target may name only these); filled by the binary from that
    /// table, never read from `[scheduler]`.
    #[serde(skip)]
    pub credential_names: std::collections::BTreeSet<String>,
    /// Who may call the API: API keys always; OIDC tokens when `oidc` is set.
    pub auth: auth::AuthOptions,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            content_dir: std::path::PathBuf::from("/var/lib/fleetpatch/content"),
            verify_delay_seconds: 1800,
            reconcile_interval_seconds: 30,
            stuck_job_seconds: 900,
            prefetch: 64,
            watch_batch: 256,
            watch_writers: 2,
            http: fleetpatch_runtime::http::ServerOptions::default(),
            max_targets_per_rollout: 100_000,
            max_content_bytes: 4 << 30,
            credential_names: std::collections::BTreeSet::new(),
            auth: auth::AuthOptions::default(),
        }
    }
}

impl SchedulerOptions {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.prefetch == 0 {
            return Err(ConfigError::too_small("scheduler.prefetch", 1));
        }
        if self.watch_batch == 0 {
            return Err(ConfigError::too_small("scheduler.watch_batch", 1));
        }
        if self.watch_writers == 0 || self.watch_writers > 64 {
            return Err(ConfigError::out_of_range("scheduler.watch_writers", 1, 64));
        }
        if self.max_targets_per_rollout == 0 || self.max_targets_per_rollout > 1_000_000 {
            return Err(ConfigError::out_of_range("scheduler.max_targets_per_rollout", 1, 1_000_000));
        }
        if self.max_content_bytes == 0 {
            return Err(ConfigError::too_small("scheduler.max_content_bytes", 1));
        }
        if self.reconcile_interval_seconds == 0 {
            return Err(ConfigError::too_small("scheduler.reconcile_interval_seconds", 1));
        }
        if self.stuck_job_seconds < 60 {
            return Err(ConfigError::invalid(
                "scheduler.stuck_job_seconds",
                "must be at least 60 (a slow staging is not a lost job)",
            ));
        }
        self.http.validate("scheduler.http")?;
        self.auth.validate()
    }
}

/// Watch timers the consumer may hold through their last stretch (up to
/// `fleetpatch_bus::HOLD_BELOW_MS`) on top of those being checked or waiting
/// for a check: room for 2,048 timers coming due within 750 ms. More than
/// that wait in the broker's work queue until a slot frees, never longer than
/// a hold plus a check.
pub const WATCH_HOLD_ROOM: u32 = 2_048;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Runtime(#[from] fleetpatch_runtime::Error),
    #[error(transparent)]
    Bus(#[from] fleetpatch_bus::Error),
    #[error(transparent)]
    Store(#[from] fleetpatch_store::Error),
    #[error("serving HTTP: {0}")]
    Serve(#[from] std::io::Error),
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("invalid configuration: {0}")]
    Jwks(#[from] auth::JwksError),
}

/// Why a message of the scheduler's consumers (a dispatch request) was not
/// handled.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// The message came from a queue this consumer has no handler for.
    #[error("no handler for routing key {0:?}")]
    NoHandler(String),
    /// The payload is not a `DispatchRequest`.
    #[error("undecodable dispatch request: {0}")]
    Undecodable(#[source] prost::DecodeError),
    /// The request's rollout id is not a UUID.
    #[error("dispatch rollout id: {0}")]
    RolloutId(#[source] uuid::Error),
    /// The dispatch pass failed in the store.
    #[error(transparent)]
    Store(#[from] fleetpatch_store::Error),
}

impl DispatchError {
    /// Whether the same message may succeed when handled again: the
    /// database was unreachable or a transaction conflicted. A message that
    /// is malformed, or that the stored data refuses, never will.
    pub fn is_retryable(&self) -> bool {
        use fleetpatch_store::Error as E;
        match self {
            DispatchError::NoHandler(_) | DispatchError::Undecodable(_) | DispatchError::RolloutId(_) => false,
            DispatchError::Store(error) => match error {
                E::Connect { .. } | E::Db(_) | E::Conflict(_) => true,
                E::NotMigrated { .. }
                | E::NotFound { .. }
                | E::Invalid(_)
                | E::Corrupt(_)
                | E::IllegalTransition { .. } => false,
            },
        }
    }
}

/// A running scheduler.
pub struct SchedulerHandle {
    pub local_addr: std::net::SocketAddr,
    pub join: tokio::task::JoinHandle<Result<(), Error>>,
}

#[derive(Clone)]
struct Core {
    store: Store,
    bus: Bus,
    nudge: Arc<Notify>,
    policy: TimeoutPolicy,
    /// How long a target may stay in a job state before its job counts as lost.
    stuck_job_after: Duration,
    /// Rollouts with a dispatch pass running → another pass was requested meanwhile.
    dispatching: Arc<std::sync::Mutex<std::collections::HashMap<Uuid, bool>>>,
}

/// Ends a dispatch pass (also when it fails or panics): the next request starts a new one.
struct DispatchPass {
    map: Arc<std::sync::Mutex<std::collections::HashMap<Uuid, bool>>>,
    rollout_id: Uuid,
    ended: bool,
}

impl Drop for DispatchPass {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        if let Ok(mut map) = self.map.lock() {
            map.remove(&self.rollout_id);
        }
    }
}

/// Starts the API, the dispatch and watch consumers, the reconciler and the
/// outbox relay; drains on `shutdown`.
pub async fn start(
    options: SchedulerOptions,
    store: Store,
    bus: Bus,
    health: Health,
    shutdown: Shutdown,
) -> Result<SchedulerHandle, Error> {
    options.auth.validate()?;
    let oidc = match options.auth.oidc.clone() {
        Some(oidc) => Some(auth::Oidc::start(oidc).await?),
        None => None,
    };
    let listener = fleetpatch_runtime::ops::bind(&options.listen).await?;
    let local_addr = listener.local_addr()?;
    health.add_check("database", store.readiness_check());
    health.add_check("bus", bus.readiness_check());
    let nudge = Arc::new(Notify::new());
    let core = Core {
        store: store.clone(),
        bus: bus.clone(),
        nudge: nudge.clone(),
        policy: TimeoutPolicy { verify_delay: Duration::from_secs(options.verify_delay_seconds) },
        stuck_job_after: Duration::from_secs(options.stuck_job_seconds),
        dispatching: Arc::default(),
    };
    let api_state = api::ApiState {
        store: store.clone(),
        bus: bus.clone(),
        nudge: nudge.clone(),
        content_dir: options.content_dir.clone(),
        input: Arc::new(api::InputPolicy {
            max_targets_per_rollout: options.max_targets_per_rollout,
            max_content_bytes: options.max_content_bytes,
            credential_names: options.credential_names.clone(),
        }),
        auth: auth::Authenticator::new(store.clone(), oidc.clone()),
        creates: Arc::new(tokio::sync::Semaphore::new(api::MAX_CONCURRENT_CREATES)),
    };
    let console = console::ConsoleState { api: api_state.clone(), tls: options.http.tls.is_some() };
    let app =
        api::router(api_state).merge(console::router(console)).merge(fleetpatch_runtime::ops::router(health.clone()));
    let jwks_refresh = oidc.as_ref().map(|oidc| oidc.spawn_refresh(shutdown.clone()));
    let dispatch = bus.consume(routing::DISPATCH, options.prefetch).await?;
    let watch_prefetch = u32::from(options.watch_batch) * (u32::from(options.watch_writers) + 1) + WATCH_HOLD_ROOM;
    let watch = bus.consume(routing::WATCH, watch_prefetch.min(u32::from(u16::MAX)) as u16).await?;
    let watch_batch = usize::from(options.watch_batch);
    let watch_writers = usize::from(options.watch_writers);
    let relay_stop = tokio_util::sync::CancellationToken::new();
    let relay = tokio::spawn(fleetpatch_store::relay::run_relay(
        store.clone(),
        bus.clone(),
        nudge.clone(),
        Duration::from_millis(500),
        Duration::ZERO,
        relay_stop.clone(),
    ));
    tracing::info!(address = %local_addr, "scheduler listening");
    let reconcile_every = Duration::from_secs(options.reconcile_interval_seconds);
    let join = tokio::spawn(async move {
        let server_shutdown = shutdown.clone();
        let http = options.http.clone();
        let server = tokio::spawn(async move {
            fleetpatch_runtime::http::serve(listener, app, http, async move { server_shutdown.wait().await }).await
        });
        let loops = [
            tokio::spawn(core.clone().consume_loop(dispatch, shutdown.clone())),
            tokio::spawn(core.clone().watch_loop(watch, watch_batch, watch_writers, shutdown.clone())),
            tokio::spawn(core.clone().reconcile_loop(reconcile_every, shutdown.clone())),
            tokio::spawn(core.clone().gauge_loop(reconcile_every.min(Duration::from_secs(10)), shutdown.clone())),
        ];
        shutdown.wait().await;
        health.start_draining();
        for handle in loops {
            let _ = handle.await;
        }
        relay_stop.cancel();
        let _ = relay.await;
        if let Some(refresh) = jwks_refresh {
            let _ = refresh.await;
        }
        core.bus.close().await;
        let _ = server.await;
        tracing::info!("scheduler drained");
        Ok(())
    });
    Ok(SchedulerHandle { local_addr, join })
}

impl Core {
    async fn consume_loop(self, mut consumer: fleetpatch_bus::Consumer, shutdown: Shutdown) {
        let mut in_flight = tokio::task::JoinSet::new();
        loop {
            let delivery = tokio::select! {
                next = consumer.next() => next,
                _ = shutdown.wait() => {
                    consumer.cancel();
                    break;
                }
            };
            let Some(delivery) = delivery else {
                if !shutdown.is_triggered() {
                    shutdown.fail("the bus closed a scheduler consumer");
                }
                break;
            };
            let core = self.clone();
            let span = tracing::info_span!("scheduler_job", queue = %delivery.routing_key);
            {
                use tracing_opentelemetry::OpenTelemetrySpanExt;
                let _ = span.set_parent(fleetpatch_bus::parent_context(&delivery.headers));
            }
            in_flight.spawn(async move { core.handle(delivery).await }.instrument(span));
            while in_flight.try_join_next().is_some() {}
        }
        // Finish what was taken, within a deadline.
        let _ = tokio::time::timeout(Duration::from_secs(30), async { while in_flight.join_next().await.is_some() {} })
            .await;
    }

    async fn handle(&self, delivery: Delivery) {
        let result = match delivery.routing_key.as_str() {
            routing::DISPATCH => self.dispatch(&delivery.payload).await,
            other => Err(DispatchError::NoHandler(other.to_owned())),
        };
        match result {
            Ok(()) => {
                if let Err(error) = delivery.ack().await {
                    tracing::warn!(error = %error, "ack failed; the message will be redelivered");
                }
            }
            Err(reason) if reason.is_retryable() => {
                // Another delivery may succeed (the database away): requeued;
                // the broker dead-letters it after `amqp.delivery_limit` deliveries.
                tracing::warn!(reason = %reason, "scheduler job failed; requeued");
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = delivery.requeue().await;
            }
            Err(reason) => {
                // No delivery can help (undecodable, a bad rollout id, no
                // handler): dead-lettered at once, with the reason logged.
                tracing::error!(reason = %reason, "scheduler job can never succeed; dead-lettered");
                metrics::counter!("fleetpatch_scheduler_jobs_dead_lettered_total").increment(1);
                if let Err(error) = delivery.dead_letter().await {
                    tracing::warn!(error = %error, "dead-lettering failed; the message will be redelivered");
                }
            }
        }
    }

    /// Dispatch requests for one rollout are coalesced: while a pass runs,
    /// later requests only mark it dirty (and are acked), and the pass runs
    /// once more before its own request is acked. Every request is thus
    /// followed by a pass that started after it arrived, and thousands of
    /// "a slot freed up" requests cost a handful of passes, not thousands of
    /// turns on the rollout's row lock.
    async fn dispatch(&self, payload: &[u8]) -> Result<(), DispatchError> {
        let request = v1::DispatchRequest::decode(payload).map_err(DispatchError::Undecodable)?;
        let rollout_id = Uuid::parse_str(&request.rollout_id).map_err(DispatchError::RolloutId)?;
        {
            let mut running = self.dispatching.lock().expect("dispatch map lock");
            if let Some(dirty) = running.get_mut(&rollout_id) {
                *dirty = true;
                metrics::counter!("fleetpatch_scheduler_dispatch_coalesced_total").increment(1);
                return Ok(());
            }
            running.insert(rollout_id, false);
        }
        let mut pass = DispatchPass { map: self.dispatching.clone(), rollout_id, ended: false };
        loop {
            match self.store.dispatch(rollout_id).await {
                Ok(outcome) => {
                    if outcome.dispatched > 0 {
                        metrics::counter!("fleetpatch_scheduler_dispatched_total")
                            .increment(u64::from(outcome.dispatched));
                        self.nudge.notify_one();
                    }
                    if let Some(reason) = outcome.halted {
                        tracing::warn!(rollout_id = %rollout_id, reason = %reason, "rollout halted");
                    }
                }
                Err(fleetpatch_store::Error::NotFound { .. }) => return Ok(()),
                Err(error) => return Err(DispatchError::Store(error)),
            }
            // Ending the pass and checking for requests happen under one lock,
            // so no request can slip in between.
            let mut running = self.dispatching.lock().expect("dispatch map lock");
            match running.get_mut(&rollout_id) {
                Some(dirty) if *dirty => *dirty = false,
                _ => {
                    running.remove(&rollout_id);
                    pass.ended = true;
                    return Ok(());
                }
            }
        }
    }

    /// The watchdog. A reader takes the timers as they arrive (within 5 ms
    /// of the first, at most `batch` at a time; the consumer re-delays the
    /// early ones and holds the last stretch), whatever the checks are doing:
    /// a timer never waits in the broker's channel for a check to finish.
    /// The due ones are checked in one transaction per batch, at most
    /// `writers` checks at once. While every check is busy the due timers
    /// gather (the prefetch bounds them) and the next check takes up to
    /// `batch` of them: under load the batches grow instead of the
    /// transactions multiplying.
    async fn watch_loop(
        self,
        mut consumer: fleetpatch_bus::Consumer,
        batch: usize,
        writers: usize,
        shutdown: Shutdown,
    ) {
        let batch = batch.max(1);
        let (arrived, mut arrivals) = tokio::sync::mpsc::unbounded_channel::<Vec<Delivery>>();
        let reader_shutdown = shutdown.clone();
        let reader = tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = consumer.next_batch(batch, Duration::from_millis(5)) => next,
                    _ = reader_shutdown.wait() => {
                        consumer.cancel();
                        return consumer;
                    }
                };
                let Some(deliveries) = next else { return consumer };
                if !deliveries.is_empty() && arrived.send(deliveries).is_err() {
                    return consumer;
                }
            }
        });
        let writers = Arc::new(tokio::sync::Semaphore::new(writers.max(1)));
        let mut in_flight = tokio::task::JoinSet::new();
        let mut due: std::collections::VecDeque<Delivery> = std::collections::VecDeque::new();
        loop {
            let permit = tokio::select! {
                permit = writers.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                _ = shutdown.wait() => break,
            };
            if due.is_empty() {
                let next = tokio::select! {
                    next = arrivals.recv() => next,
                    _ = shutdown.wait() => break,
                };
                let Some(deliveries) = next else {
                    if !shutdown.is_triggered() {
                        shutdown.fail("the bus closed the watch consumer");
                    }
                    break;
                };
                due.extend(deliveries);
            }
            while let Ok(deliveries) = arrivals.try_recv() {
                due.extend(deliveries);
            }
            let deliveries: Vec<Delivery> = due.drain(..due.len().min(batch)).collect();
            metrics::histogram!("fleetpatch_scheduler_watch_batch_timers").record(deliveries.len() as f64);
            let core = self.clone();
            let span = tracing::info_span!("watch_batch", timers = deliveries.len());
            in_flight.spawn(
                async move {
                    core.watch_batch(deliveries).await;
                    drop(permit);
                }
                .instrument(span),
            );
            while in_flight.try_join_next().is_some() {}
        }
        // The consumer lives until the checks in flight have acked their timers.
        let consumer = reader.await;
        // Timers taken but not checked stay unacked: the broker delivers them again.
        drop(due);
        let _ = tokio::time::timeout(Duration::from_secs(30), async { while in_flight.join_next().await.is_some() {} })
            .await;
        drop(consumer);
    }

    async fn watch_batch(&self, deliveries: Vec<Delivery>) {
        let mut timers = Vec::with_capacity(deliveries.len());
        let mut pending = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            let decoded = v1::WatchTimer::decode(delivery.payload.as_slice())
                .map_err(|e| format!("undecodable watch timer: {e}"))
                .and_then(|timer| {
                    let id = Uuid::parse_str(&timer.target_id).map_err(|e| format!("watch target id: {e}"))?;
                    Ok((id, timer.attempt, timer.due_at_unix_ms))
                });
            match decoded {
                Ok((id, attempt, due)) => {
                    timers.push((id, attempt));
                    pending.push((delivery, due));
                }
                Err(reason) => {
                    // It can never be handled: straight to the dead letters, for an operator.
                    tracing::warn!(reason = %reason, "dead-lettering a watch message");
                    let _ = delivery.dead_letter().await;
                }
            }
        }
        let outcomes = match self.store.check_timeouts(&timers, self.policy).await {
            Ok(outcomes) => outcomes,
            Err(error) => {
                tracing::warn!(error = %error, timers = timers.len(), "watchdog check failed; requeued");
                tokio::time::sleep(Duration::from_millis(200)).await;
                for (delivery, _) in pending {
                    let _ = delivery.requeue().await;
                }
                return;
            }
        };
        let mut rearm = Vec::new();
        let mut timed_out = 0u64;
        for (((target_id, attempt), (_, due)), outcome) in timers.iter().zip(&pending).zip(outcomes) {
            match outcome {
                WatchOutcome::Gone => {}
                WatchOutcome::NotYet(deadline) => {
                    rearm.push(fleetpatch_store::watch_message(*target_id, *attempt, deadline));
                }
                WatchOutcome::TimedOut => {
                    let lateness = (self.store.clock().now().timestamp_millis() - due).max(0) as f64 / 1000.0;
                    metrics::histogram!("fleetpatch_scheduler_timeout_lateness_seconds").record(lateness);
                    tracing::info!(target_id = %target_id, "target timed out");
                    timed_out += 1;
                }
            }
        }
        if !rearm.is_empty() {
            if let Err(error) = self.bus.publish(rearm).await {
                // Checking again is harmless: the timed-out ones are gone by then.
                tracing::warn!(error = %error, "re-arming watch timers failed; requeued");
                for (delivery, _) in pending {
                    let _ = delivery.requeue().await;
                }
                return;
            }
        }
        if timed_out > 0 {
            metrics::counter!("fleetpatch_scheduler_timeouts_total").increment(timed_out);
            self.nudge.notify_one();
        }
        for (delivery, _) in pending {
            if let Err(error) = delivery.ack().await {
                tracing::warn!(error = %error, "ack failed; the timer will be redelivered");
            }
        }
    }

    /// Exports what Grafana and the alerts watch, from the database and the
    /// broker, every `every` (and once at start): rollouts per state
    /// (`fleetpatch_rollouts`), targets of running and paused rollouts per
    /// state (`fleetpatch_active_targets`), the relay's backlog
    /// (`fleetpatch_outbox_pending`) and each work queue's ready messages
    /// plus the dead letters (`fleetpatch_queue_depth`).
    async fn gauge_loop(self, every: Duration, shutdown: Shutdown) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait() => return,
            }
            match self.store.fleet_gauges().await {
                Ok(gauges) => {
                    for state in fleetpatch_proto::state::RolloutState::ALL {
                        let n = gauges.rollouts_by_state.get(state.as_str()).copied().unwrap_or(0);
                        metrics::gauge!("fleetpatch_rollouts", "state" => state.as_str()).set(n as f64);
                    }
                    for state in fleetpatch_proto::state::TargetState::ALL {
                        let n = gauges.active_targets_by_state.get(state.as_str()).copied().unwrap_or(0);
                        metrics::gauge!("fleetpatch_active_targets", "state" => state.as_str()).set(n as f64);
                    }
                    metrics::gauge!("fleetpatch_outbox_pending").set(gauges.outbox_pending as f64);
                }
                Err(error) => tracing::warn!(error = %error, "reading the fleet gauges failed"),
            }
            for queue in routing::WORK_QUEUES.into_iter().chain([fleetpatch_bus::DEAD_LETTER_QUEUE]) {
                match self.bus.queue_depth(queue).await {
                    Ok(depth) => metrics::gauge!("fleetpatch_queue_depth", "queue" => queue).set(depth as f64),
                    Err(error) => tracing::debug!(error = %error, queue, "queue depth unavailable"),
                }
            }
        }
    }

    async fn reconcile_loop(self, every: Duration, shutdown: Shutdown) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.wait() => return,
            }
            if let Err(error) = self.reconcile_once(every * 2).await {
                tracing::warn!(error = %error, "reconciler pass failed; trying again next pass");
            }
        }
    }

    /// One reconciler pass: re-sends what a lost message should have
    /// caused. Each kind is counted in
    /// `fleetpatch_reconciler_recovered_total{kind}`.
    async fn reconcile_once(&self, timer_grace: Duration) -> Result<(), Error> {
        const PAGE: u64 = 1_000;
        let overdue = self.store.overdue_running_deadlines(timer_grace, PAGE, 10_000).await?;
        if !overdue.is_empty() {
            tracing::warn!(count = overdue.len(), "re-arming watch timers that were lost");
            metrics::counter!("fleetpatch_reconciler_recovered_total", "kind" => "watch_timer")
                .increment(overdue.len() as u64);
            let messages = overdue
                .into_iter()
                .map(|t| fleetpatch_store::watch_message(t.target_id, t.attempt, self.store.clock().now()))
                .collect();
            self.bus.publish(messages).await?;
        }
        let stuck = self.store.stuck_in_flight_targets(self.stuck_job_after, PAGE).await?;
        if !stuck.is_empty() {
            tracing::warn!(count = stuck.len(), "re-publishing deploy jobs of targets stuck without a job");
            metrics::counter!("fleetpatch_reconciler_recovered_total", "kind" => "deploy_job")
                .increment(stuck.len() as u64);
            self.bus.publish(stuck).await?;
        }
        // Offline and rebooting targets whose check is overdue: its message was lost.
        let checks = self.store.overdue_reachability_checks(self.stuck_job_after, PAGE).await?;
        if !checks.is_empty() {
            tracing::warn!(count = checks.len(), "re-publishing lost checks of offline and rebooting targets");
            metrics::counter!("fleetpatch_reconciler_recovered_total", "kind" => "reachability_check")
                .increment(checks.len() as u64);
            self.bus.publish(checks).await?;
        }
        // Waves whose automatic promotion is due; the approval is audited
        // as the scheduler's own.
        for (rollout_id, percent) in self.store.promote_due_rollouts().await? {
            tracing::info!(
                rollout_id = %rollout_id,
                success_percent = percent,
                "next wave started by automatic promotion: the soak time is over and the success rate met"
            );
            metrics::counter!("fleetpatch_rollouts_promoted_total", "by" => "automatic").increment(1);
            self.store
                .append_audit(fleetpatch_store::NewAuditEntry {
                    at: self.store.clock().now(),
                    actor: "automatic promotion".into(),
                    actor_kind: fleetpatch_store::ActorKind::Scheduler,
                    role: fleetpatch_store::Role::Operator,
                    method: "POST".into(),
                    route: "/v1/rollouts/{id}/approve".into(),
                    rollout_id: Some(rollout_id),
                    source: "scheduler".into(),
                    status: 200,
                })
                .await?;
        }
        // Rollouts whose maintenance window (or deadline) has come.
        let due = self.store.rollouts_due_for_window(PAGE).await?;
        if !due.is_empty() {
            tracing::info!(count = due.len(), "maintenance windows opening: dispatching again");
            self.bus.publish(due.into_iter().map(fleetpatch_store::dispatch_request).collect()).await?;
        }
        // A dispatch pass per running rollout with pending targets: one
        // lost dispatch request would otherwise leave free slots unused.
        let mut after = None;
        loop {
            let rollouts = self.store.rollouts_with_pending_targets(after, PAGE).await?;
            let Some(last) = rollouts.last().copied() else { break };
            metrics::counter!("fleetpatch_reconciler_recovered_total", "kind" => "dispatch_request")
                .increment(rollouts.len() as u64);
            self.bus.publish(rollouts.into_iter().map(fleetpatch_store::dispatch_request).collect()).await?;
            after = Some(last);
        }
        Ok(())
    }
}

#[cfg(test)]
mod option_tests {
    use super::{DispatchError, SchedulerOptions};

    #[test]
    fn job_errors_name_the_fault_and_say_whether_to_retry() {
        let error = DispatchError::RolloutId(uuid::Uuid::parse_str("not-a-uuid").unwrap_err());
        assert!(error.to_string().starts_with("dispatch rollout id: "), "{error}");
        assert!(!error.is_retryable());
        let error = DispatchError::NoHandler("fleetpatch.other".into());
        assert_eq!(error.to_string(), "no handler for routing key \"fleetpatch.other\"");
        assert!(!error.is_retryable());
        let error = DispatchError::from(fleetpatch_store::Error::Conflict("rollout 1 is locked".into()));
        assert_eq!(error.to_string(), "rollout 1 is locked");
        assert!(error.is_retryable());
        assert!(!DispatchError::from(fleetpatch_store::Error::Corrupt("x".into())).is_retryable());
    }

    #[test]
    fn defaults_are_valid_and_bad_values_name_their_key() {
        assert!(SchedulerOptions::default().validate().is_ok());
        let cases = [
            (SchedulerOptions { prefetch: 0, ..Default::default() }, "scheduler.prefetch"),
            (SchedulerOptions { watch_batch: 0, ..Default::default() }, "scheduler.watch_batch"),
            (SchedulerOptions { watch_writers: 0, ..Default::default() }, "scheduler.watch_writers"),
            (SchedulerOptions { watch_writers: 65, ..Default::default() }, "scheduler.watch_writers"),
            (
                SchedulerOptions { reconcile_interval_seconds: 0, ..Default::default() },
                "scheduler.reconcile_interval_seconds",
            ),
        ];
        for (options, key) in cases {
            let error = options.validate().expect_err(key);
            assert_eq!(error.field(), key);
            assert!(error.to_string().starts_with(key), "{error:?} should name {key}");
        }
        let error = SchedulerOptions { watch_writers: 65, ..Default::default() }.validate().unwrap_err();
        assert_eq!(error.to_string(), "scheduler.watch_writers must be between 1 and 64");
    }
}

#[cfg(test)]
mod watchdog_tests;
