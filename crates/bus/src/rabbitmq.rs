//! The RabbitMQ backend (lapin).
//!
//! Topology, all names under a configurable prefix (so test runs and
//! installations sharing a broker never see each other's messages):
//! * `P.work` (direct) routes to one durable **quorum** queue per work
//!   routing key (`P.deploy`, `P.watch`, ...), each with a delivery limit and
//!   at-least-once dead-lettering into `P.dlx` → `P.dead`;
//! * `P.wait.<ms>` (fanout) → queue `P.wait.<ms>` with `x-message-ttl = ms`,
//!   dead-lettering back into `P.work` with the message's own routing key;
//! * `P.events` (topic) for announcements.
//!
//! Publishing waits for publisher confirms. Each consumer has its own channel
//! with `basic.qos(prefetch)`.
//!
//! The connection heals: when the broker goes away (restart, `stop_app`, a
//! network cut), the next publish reopens the connection (with backoff and
//! jitter between attempts, so an outage costs one cheap refusal per caller,
//! not a storm of connects), re-declares the topology and carries on, and
//! every consumer re-subscribes on the new connection by itself; its
//! [`Consumer`](crate::Consumer) never ends because of an outage. The
//! deliveries handed out on the lost connection cannot be acked any more;
//! the broker returns them to their queues. Connecting, and waiting for a
//! publisher confirm, have time limits, so a blocked broker never holds a
//! caller forever. `is_healthy` (the `/readyz` check) is false while there is
//! no open connection.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::{
    Acker, Backend, BackendConsumer, Delivery, Error, Result, Route, Wire, DELAY_STEPS_MS, DELIVERY_COUNT_HEADER,
};

/// RabbitMQ settings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RabbitOptions {
    /// `amqp://user:password@host:5672/vhost`. The password is part of the URL:
    /// for real credentials, set it from the environment
    /// (`FLEETPATCH__AMQP__URL`; the Helm chart sets it from a Secret)
    /// rather than writing it into a configuration file.
    pub url: String,
    /// Prefix of every exchange and queue name.
    pub prefix: String,
    /// Deliveries of one message before it is dead-lettered.
    pub delivery_limit: u32,
}

impl Default for RabbitOptions {
    fn default() -> Self {
        Self { url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(), prefix: "fleetpatch".into(), delivery_limit: 10 }
    }
}

/// How long opening a connection (TCP, AMQP handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a publish may wait for the broker's confirms.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// First and longest pause between two attempts to reach a lost broker.
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(200);
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Growing pauses with jitter (±20 %), for reconnecting.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { next: min, min, max }
    }

    /// The pause before the next attempt; each call doubles the next one, up to the maximum.
    pub fn next_pause(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = rand::random_range(0.8..1.2);
        base.mul_f64(jitter)
    }

    /// After a success: the next failure starts from the shortest pause again.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(RECONNECT_BACKOFF_MIN, RECONNECT_BACKOFF_MAX)
    }
}

/// The broker connection, reopened on demand after it was lost.
struct Link {
    url: String,
    delivery_limit: u32,
    prefix: String,
    queues: Vec<String>,
    /// The open connection, if any; replaced after a loss.
    current: Mutex<Option<Arc<Connection>>>,
    /// The publisher channel of the current connection.
    publisher: Mutex<Option<Channel>>,
    /// One reconnect at a time; others wait for its outcome.
    reconnecting: tokio::sync::Mutex<ReconnectState>,
    /// Closed on purpose ([`Backend::close`]): no more reconnecting.
    closed: std::sync::atomic::AtomicBool,
}

struct ReconnectState {
    backoff: Backoff,
    /// No new attempt before this (set after a failed one).
    not_before: Option<Instant>,
}

/// A connection to RabbitMQ with the fleetpatch topology declared, which
/// reconnects by itself after the broker went away.
pub struct RabbitBackend {
    link: Arc<Link>,
}

/// An AMQP connection on the current tokio runtime, named `name` in the
/// broker's UI, within [`CONNECT_TIMEOUT`].
pub(crate) async fn open_connection(url: &str, name: &str) -> Result<Connection> {
    let properties = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio)
        .with_connection_name(name.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, properties)).await {
        Ok(connected) => {
            connected.map_err(|error| Error::Connect { url: redact_url(url), reason: redact_url(&error.to_string()) })
        }
        Err(_) => Err(Error::Connect {
            url: redact_url(url),
            reason: format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
        }),
    }
}

pub(crate) fn broker(action: &'static str) -> impl FnOnce(lapin::Error) -> Error {
    move |error| Error::Broker { action, reason: error.to_string() }
}

/// The URL with its password replaced, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in entries {
        table.insert(ShortString::from(*key), value.clone());
    }
    table
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

fn header_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        AMQPValue::LongInt(n) => Some(n.to_string()),
        AMQPValue::LongUInt(n) => Some(n.to_string()),
        AMQPValue::ShortInt(n) => Some(n.to_string()),
        AMQPValue::ShortUInt(n) => Some(n.to_string()),
        _ => None,
    }
}

fn headers_of(properties: &BasicProperties) -> BTreeMap<String, String> {
    properties
        .headers()
        .as_ref()
        .map(|table| {
            table
                .inner()
                .iter()
                .filter_map(|(key, value)| header_text(value).map(|v| (key.as_str().to_owned(), v)))
                .collect()
        })
        .unwrap_or_default()
}

impl Link {
    fn name(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.prefix)
    }

    fn current(&self) -> Option<Arc<Connection>> {
        self.current.lock().expect("connection lock").clone().filter(|c| c.status().connected())
    }

    /// The open connection, reopening it (and re-declaring the topology) if
    /// it was lost. After a failed attempt, callers within the backoff get
    /// the failure at once instead of another attempt.
    async fn connection(&self) -> Result<Arc<Connection>> {
        if let Some(connection) = self.current() {
            return Ok(connection);
        }
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let mut state = self.reconnecting.lock().await;
        if let Some(connection) = self.current() {
            return Ok(connection);
        }
        if let Some(not_before) = state.not_before {
            if Instant::now() < not_before {
                return Err(Error::Connect {
                    url: redact_url(&self.url),
                    reason: "the broker is unreachable; the next attempt is scheduled".into(),
                });
            }
        }
        let opened = async {
            let connection = open_connection(&self.url, "fleetpatch").await?;
            self.declare(&connection).await?;
            Ok::<_, Error>(connection)
        }
        .await;
        match opened {
            Ok(connection) => {
                let connection = Arc::new(connection);
                let was_lost = self.current.lock().expect("connection lock").replace(connection.clone()).is_some();
                self.publisher.lock().expect("publisher lock").take();
                if was_lost {
                    tracing::info!(url = %redact_url(&self.url), "reconnected to the message broker");
                    metrics::counter!("fleetpatch_bus_reconnects_total").increment(1);
                }
                state.backoff.reset();
                state.not_before = None;
                Ok(connection)
            }
            Err(error) => {
                let pause = state.backoff.next_pause();
                state.not_before = Some(Instant::now() + pause);
                tracing::warn!(error = %error, retry_in_ms = pause.as_millis() as u64, "the message broker is unreachable");
                Err(error)
            }
        }
    }

    async fn declare(&self, connection: &Connection) -> Result<()> {
        let channel = connection.create_channel().await.map_err(broker("opening a channel"))?;
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        let queue_options = QueueDeclareOptions { durable: true, ..Default::default() };
        let (work, events, dlx, dead) = (self.name("work"), self.name("events"), self.name("dlx"), self.name("dead"));
        for (exchange, kind) in
            [(&work, ExchangeKind::Direct), (&events, ExchangeKind::Topic), (&dlx, ExchangeKind::Fanout)]
        {
            channel
                .exchange_declare(exchange, kind, durable, FieldTable::default())
                .await
                .map_err(broker("declaring an exchange"))?;
        }
        channel
            .queue_declare(&dead, queue_options, table(&[("x-queue-type", text("quorum"))]))
            .await
            .map_err(broker("declaring the dead-letter queue"))?;
        channel
            .queue_bind(&dead, &dlx, "", QueueBindOptions::default(), FieldTable::default())
            .await
            .map_err(broker("binding the dead-letter queue"))?;
        for queue in &self.queues {
            let name = self.name(queue);
            let arguments = table(&[
                ("x-queue-type", text("quorum")),
                ("x-delivery-limit", AMQPValue::LongInt(self.delivery_limit as i32)),
                ("x-dead-letter-exchange", text(&dlx)),
                ("x-dead-letter-strategy", text("at-least-once")),
                ("x-overflow", text("reject-publish")),
            ]);
            channel.queue_declare(&name, queue_options, arguments).await.map_err(broker("declaring a work queue"))?;
            channel
                .queue_bind(&name, &work, queue, QueueBindOptions::default(), FieldTable::default())
                .await
                .map_err(broker("binding a work queue"))?;
        }
        for step in DELAY_STEPS_MS {
            let name = self.name(&format!("wait.{step}"));
            channel
                .exchange_declare(&name, ExchangeKind::Fanout, durable, FieldTable::default())
                .await
                .map_err(broker("declaring a wait exchange"))?;
            let arguments = table(&[
                ("x-queue-type", text("quorum")),
                ("x-message-ttl", AMQPValue::LongLongInt(step as i64)),
                ("x-dead-letter-exchange", text(&work)),
                ("x-dead-letter-strategy", text("at-least-once")),
                ("x-overflow", text("reject-publish")),
            ]);
            channel.queue_declare(&name, queue_options, arguments).await.map_err(broker("declaring a wait queue"))?;
            channel
                .queue_bind(&name, &name, "", QueueBindOptions::default(), FieldTable::default())
                .await
                .map_err(broker("binding a wait queue"))?;
        }
        let _ = channel.close(200, "declared").await;
        Ok(())
    }

    async fn publisher(&self) -> Result<Channel> {
        if let Some(channel) = self.publisher.lock().expect("publisher lock").as_ref() {
            if channel.status().connected() {
                return Ok(channel.clone());
            }
        }
        let connection = self.connection().await?;
        let channel = connection.create_channel().await.map_err(broker("opening a channel"))?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(broker("enabling publisher confirms"))?;
        *self.publisher.lock().expect("publisher lock") = Some(channel.clone());
        Ok(channel)
    }

    fn forget_publisher(&self) {
        self.publisher.lock().expect("publisher lock").take();
    }

    fn exchange_of(&self, route: Route) -> String {
        match route {
            Route::Work => self.name("work"),
            Route::Events => self.name("events"),
            Route::Wait(step) => self.name(&format!("wait.{step}")),
        }
    }

    /// A consumer's channel and subscription on the current connection.
    async fn subscribe(&self, queue: &str, prefetch: u16, tag: &str) -> Result<(Channel, lapin::Consumer)> {
        let connection = self.connection().await?;
        let channel = connection.create_channel().await.map_err(broker("opening a channel"))?;
        channel.basic_qos(prefetch, BasicQosOptions::default()).await.map_err(broker("setting prefetch"))?;
        let consumer = channel
            .basic_consume(&self.name(queue), tag, BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map_err(broker("starting a consumer"))?;
        Ok((channel, consumer))
    }
}

impl RabbitBackend {
    /// Connects and declares the topology for `queues` (work routing keys).
    /// The first connection must succeed (see [`RabbitBackend::connect_waiting`]
    /// for a service starting before its broker); after that the backend
    /// reconnects by itself.
    pub async fn connect(options: &RabbitOptions, queues: &[&str]) -> Result<Self> {
        let link = Arc::new(Link {
            url: options.url.clone(),
            delivery_limit: options.delivery_limit,
            prefix: options.prefix.clone(),
            queues: queues.iter().map(|q| (*q).to_owned()).collect(),
            current: Mutex::new(None),
            publisher: Mutex::new(None),
            reconnecting: tokio::sync::Mutex::new(ReconnectState { backoff: Backoff::default(), not_before: None }),
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        link.connection().await?;
        Ok(Self { link })
    }

    /// Like [`RabbitBackend::connect`], but waits for the broker with
    /// growing pauses (logging what it waits for) until it answers or
    /// `give_up` completes (a shutdown signal): a service started before its
    /// broker waits instead of exiting.
    pub async fn connect_waiting(
        options: &RabbitOptions,
        queues: &[&str],
        give_up: impl std::future::Future<Output = ()>,
    ) -> Result<Self> {
        let mut backoff = Backoff::new(RECONNECT_BACKOFF_MIN, RECONNECT_BACKOFF_MAX);
        tokio::pin!(give_up);
        loop {
            match Self::connect(options, queues).await {
                Ok(backend) => return Ok(backend),
                Err(error) => {
                    let pause = backoff.next_pause();
                    tracing::warn!(error = %error, retry_in_ms = pause.as_millis() as u64, "waiting for the message broker");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = &mut give_up => return Err(error),
                    }
                }
            }
        }
    }

    /// Up to `limit` dead letters taken unacked on a channel of their own,
    /// which holds them until they are acknowledged (removed) or the channel
    /// closes (released back into the queue).
    async fn take_dead_letters(&self, limit: usize) -> Result<crate::HeldDeadLetters> {
        let link = &self.link;
        let channel = link.connection().await?.create_channel().await.map_err(broker("opening a channel"))?;
        let mut letters = Vec::new();
        let mut last_tag = None;
        while letters.len() < limit {
            let got = match channel.basic_get(&link.name("dead"), BasicGetOptions { no_ack: false }).await {
                Ok(got) => got,
                Err(error) => {
                    let _ = channel.close(200, "failed").await;
                    return Err(broker("reading the dead-letter queue")(error));
                }
            };
            let Some(message) = got else { break };
            let delivery = message.delivery;
            last_tag = Some(delivery.delivery_tag);
            letters.push(Wire {
                routing_key: delivery.routing_key.as_str().to_owned(),
                headers: headers_of(&delivery.properties),
                payload: delivery.data,
            });
        }
        let Some(last_tag) = last_tag else {
            let _ = channel.close(200, "nothing held").await;
            return Ok(crate::HeldDeadLetters { letters, hold: Box::new(crate::NothingHeld) });
        };
        Ok(crate::HeldDeadLetters { letters, hold: Box::new(RabbitHold { channel: Some(channel), last_tag }) })
    }

    /// Deletes every queue and exchange of this prefix (tests, uninstall).
    pub async fn delete_topology(&self) -> Result<()> {
        let link = &self.link;
        let channel = link.connection().await?.create_channel().await.map_err(broker("opening a channel"))?;
        let mut queues: Vec<String> = link.queues.iter().map(|q| link.name(q)).collect();
        queues.push(link.name("dead"));
        let mut exchanges = vec![link.name("work"), link.name("events"), link.name("dlx")];
        for step in DELAY_STEPS_MS {
            queues.push(link.name(&format!("wait.{step}")));
            exchanges.push(link.name(&format!("wait.{step}")));
        }
        for queue in queues {
            channel.queue_delete(&queue, QueueDeleteOptions::default()).await.map_err(broker("deleting a queue"))?;
        }
        for exchange in exchanges {
            channel
                .exchange_delete(&exchange, ExchangeDeleteOptions::default())
                .await
                .map_err(broker("deleting an exchange"))?;
        }
        Ok(())
    }
}

struct RabbitAcker {
    acker: lapin::acker::Acker,
    /// Keeps the consumer's channel open while the delivery lives: lapin
    /// closes a channel with its last handle, and a closed channel returns
    /// its unacked messages. So a cancelled consumer's deliveries can still
    /// be acked, and those dropped unacked go back once all are gone.
    _channel: Channel,
}

#[async_trait::async_trait]
impl Acker for RabbitAcker {
    async fn ack(&self) -> Result<()> {
        self.acker.ack(BasicAckOptions::default()).await.map_err(broker("acking"))
    }
    async fn nack(&self, requeue: bool) -> Result<()> {
        self.acker.nack(BasicNackOptions { requeue, ..Default::default() }).await.map_err(broker("nacking"))
    }
}

/// Runs every publish in `publishes` to its first wait, in order, then waits
/// for each; their results in the same order.
///
/// lapin resolves a publish once the connection's I/O thread has written it,
/// so awaiting each before making the next cost a wake-up of that thread, a
/// write and a wake-up back per message. A publish's first poll queues its
/// frames (and takes its confirm's delivery tag) without waiting, so handed
/// over together the messages go out in a few writes, still in their order
/// (issue 20: lapin's thread took half the share of the collector's CPU, and
/// the collector's CPU per report in the bench's closed loop, whose relay
/// passes carry the most messages, was lower in 9 of 11 pairs, by 3.7 µs in
/// the median).
pub(crate) async fn hand_over_all<F: std::future::Future>(publishes: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let started: Vec<_> = publishes
        .into_iter()
        .map(|publish| {
            let mut publish = Box::pin(publish);
            let done = publish.as_mut().now_or_never();
            (publish, done)
        })
        .collect();
    let mut outputs = Vec::with_capacity(started.len());
    for (publish, done) in started {
        outputs.push(match done {
            Some(output) => output,
            None => publish.await,
        });
    }
    outputs
}

#[async_trait::async_trait]
impl Backend for RabbitBackend {
    async fn publish(&self, route: Route, messages: Vec<Wire>) -> Result<()> {
        let link = &self.link;
        let channel = link.publisher().await?;
        let exchange = link.exchange_of(route);
        let publishes = messages.iter().map(|message| {
            let headers: Vec<(&str, AMQPValue)> = message.headers.iter().map(|(k, v)| (k.as_str(), text(v))).collect();
            let properties = BasicProperties::default().with_delivery_mode(2).with_headers(table(&headers));
            channel.basic_publish(
                &exchange,
                &message.routing_key,
                BasicPublishOptions::default(),
                &message.payload,
                properties,
            )
        });
        let written = hand_over_all(publishes).await;
        let mut confirms = Vec::with_capacity(messages.len());
        for (confirm, message) in written.into_iter().zip(&messages) {
            let routing_key = &message.routing_key;
            match confirm {
                Ok(confirm) => confirms.push((confirm, routing_key)),
                Err(error) => {
                    link.forget_publisher();
                    return Err(Error::Broker { action: "publishing", reason: error.to_string() });
                }
            }
        }
        let deadline = tokio::time::Instant::now() + CONFIRM_TIMEOUT;
        for (confirm, routing_key) in confirms {
            let confirmation = match tokio::time::timeout_at(deadline, confirm).await {
                Ok(confirmation) => confirmation.map_err(|error| {
                    link.forget_publisher();
                    Error::Broker { action: "waiting for a publisher confirm", reason: error.to_string() }
                })?,
                Err(_) => {
                    // A blocked broker (e.g. a memory or disk alarm): give up
                    // on this channel; the caller keeps its messages (outbox).
                    link.forget_publisher();
                    return Err(Error::Broker {
                        action: "waiting for a publisher confirm",
                        reason: format!("no confirm within {} s", CONFIRM_TIMEOUT.as_secs()),
                    });
                }
            };
            if confirmation.is_nack() {
                return Err(Error::Nacked { routing_key: routing_key.clone() });
            }
        }
        Ok(())
    }

    async fn consume(&self, queue: &str, prefetch: u16) -> Result<BackendConsumer> {
        let tag = format!("{}-{}", queue, uuid::Uuid::new_v4().simple());
        // The first subscription must work: a caller that cannot consume at
        // all (no such queue) hears it now, not never.
        let first = self.link.subscribe(queue, prefetch, &tag).await?;
        // The task holds the link weakly: dropping the backend (a crash, in
        // the tests) closes the connection and ends its consumers.
        let link = Arc::downgrade(&self.link);
        let (sender, receiver) = tokio::sync::mpsc::channel(usize::from(prefetch.max(1)));
        let cancelled = tokio_util::sync::CancellationToken::new();
        let subscribed: Arc<Mutex<Option<Channel>>> = Arc::new(Mutex::new(Some(first.0.clone())));
        let queue = queue.to_owned();
        let cancel_tag = tag.clone();
        {
            let cancelled = cancelled.clone();
            let subscribed = subscribed.clone();
            tokio::spawn(async move {
                let mut backoff = Backoff::default();
                let mut current = Some(first);
                loop {
                    let (channel, consumer) = match current.take() {
                        Some(subscription) => subscription,
                        None => {
                            let Some(link) = link.upgrade() else { return };
                            let subscribed_again = link.subscribe(&queue, prefetch, &tag).await;
                            drop(link);
                            match subscribed_again {
                                Ok(subscription) => {
                                    tracing::info!(queue = %queue, "consumer re-subscribed after the broker came back");
                                    *subscribed.lock().expect("subscription lock") = Some(subscription.0.clone());
                                    subscription
                                }
                                Err(Error::Closed) => return,
                                Err(error) => {
                                    let pause = backoff.next_pause();
                                    tracing::debug!(error = %error, queue = %queue, retry_in_ms = pause.as_millis() as u64, "consumer waiting for the broker");
                                    tokio::select! {
                                        _ = tokio::time::sleep(pause) => continue,
                                        _ = sender.closed() => return,
                                        _ = cancelled.cancelled() => return,
                                    }
                                }
                            }
                        }
                    };
                    backoff.reset();
                    match forward(consumer, channel, &sender, &cancelled).await {
                        Forwarded::Stopped => return,
                        Forwarded::Lost(reason) => {
                            let closed =
                                link.upgrade().is_none_or(|link| link.closed.load(std::sync::atomic::Ordering::SeqCst));
                            if closed || cancelled.is_cancelled() {
                                return;
                            }
                            tracing::warn!(queue = %queue, reason = %reason, "consumer lost its channel; re-subscribing");
                            metrics::counter!("fleetpatch_bus_consumer_resubscribes_total").increment(1);
                            let pause = backoff.next_pause();
                            tokio::select! {
                                _ = tokio::time::sleep(pause) => {}
                                _ = sender.closed() => return,
                                _ = cancelled.cancelled() => return,
                            }
                        }
                    }
                }
            });
        }
        let cancel = Box::new(move || {
            cancelled.cancel();
            let channel = subscribed.lock().expect("subscription lock").take();
            if let Some(channel) = channel {
                // Stop new deliveries; those handed out can still be acked.
                tokio::spawn(async move {
                    let _ = channel.basic_cancel(&cancel_tag, BasicCancelOptions::default()).await;
                });
            }
        });
        Ok(BackendConsumer { deliveries: receiver, cancel })
    }

    async fn hold_dead_letters(&self, limit: usize) -> Result<crate::HeldDeadLetters> {
        // Taken unacked, then acknowledged (replayed) or handed back as the
        // channel closes (a look, a failed replay): the dead-letter queue is
        // declared without a delivery limit, so on RabbitMQ 3.x a look never
        // drops one. RabbitMQ 4 gives quorum queues a default limit of 20:
        // there, set a policy with `delivery-limit: -1` on `<prefix>.dead`.
        self.take_dead_letters(limit).await
    }

    async fn queue_depth(&self, queue: &str) -> Result<u64> {
        let link = &self.link;
        let channel = link.connection().await?.create_channel().await.map_err(broker("opening a channel"))?;
        let declared = channel
            .queue_declare(
                &link.name(queue),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .map_err(broker("reading a queue's depth"))?;
        let _ = channel.close(200, "depth").await;
        Ok(u64::from(declared.message_count()))
    }

    fn is_healthy(&self) -> bool {
        self.link.current().is_some()
    }

    async fn close(&self) {
        self.link.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        let connection = self.link.current.lock().expect("connection lock").take();
        if let Some(connection) = connection {
            let _ = connection.close(200, "shutting down").await;
        }
    }
}

/// Why a consumer's forwarding stopped.
enum Forwarded {
    /// Cancelled or dropped by its owner.
    Stopped,
    /// The channel or connection went away; re-subscribe.
    Lost(String),
}

/// Hands a subscription's deliveries to the consumer until it stops or the
/// channel is lost.
async fn forward(
    mut consumer: lapin::Consumer,
    channel: Channel,
    sender: &tokio::sync::mpsc::Sender<Delivery>,
    cancelled: &tokio_util::sync::CancellationToken,
) -> Forwarded {
    loop {
        // A dropped receiver ends the consumer at once (dropping a lapin
        // consumer cancels it), not at its next delivery.
        let next = tokio::select! {
            next = consumer.next() => next,
            _ = sender.closed() => return Forwarded::Stopped,
        };
        let delivery = match next {
            None if cancelled.is_cancelled() => return Forwarded::Stopped,
            None => return Forwarded::Lost("the consumer's stream ended".into()),
            Some(Err(error)) => return Forwarded::Lost(error.to_string()),
            Some(Ok(delivery)) => delivery,
        };
        let headers = headers_of(&delivery.properties);
        let delivery_count = headers.get(DELIVERY_COUNT_HEADER).and_then(|c| c.parse().ok()).unwrap_or(0);
        let ours = Delivery {
            routing_key: delivery.routing_key.as_str().to_owned(),
            payload: delivery.data,
            headers,
            redelivered: delivery.redelivered || delivery_count > 0,
            delivery_count,
            acker: Box::new(RabbitAcker { acker: delivery.acker, _channel: channel.clone() }),
        };
        if sender.send(ours).await.is_err() {
            return Forwarded::Stopped;
        }
    }
}

/// Dead letters held unacked on their own channel.
struct RabbitHold {
    channel: Option<Channel>,
    /// The last delivery tag taken: one `multiple` ack removes them all.
    last_tag: u64,
}

#[async_trait::async_trait]
impl crate::DeadLetterHold for RabbitHold {
    async fn remove(mut self: Box<Self>) -> Result<()> {
        let Some(channel) = self.channel.take() else { return Ok(()) };
        let acked = channel
            .basic_ack(self.last_tag, BasicAckOptions { multiple: true })
            .await
            .map_err(broker("removing replayed dead letters"));
        // The close is ordered after the ack on the channel.
        let _ = channel.close(200, "replayed").await;
        acked
    }

    async fn release(mut self: Box<Self>) {
        if let Some(channel) = self.channel.take() {
            let _ = channel.close(200, "released").await;
        }
    }
}

impl Drop for RabbitHold {
    fn drop(&mut self) {
        // Unsettled: close the channel so the broker hands the letters back
        // now rather than when the connection ends.
        if let (Some(channel), Ok(runtime)) = (self.channel.take(), tokio::runtime::Handle::try_current()) {
            runtime.spawn(async move {
                let _ = channel.close(200, "released").await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(redact_url("amqp://guest:secret@host:5672/%2f"), "amqp://guest:***@host:5672/%2f");
        assert_eq!(redact_url("amqp://host:5672"), "amqp://host:5672");
    }
}
