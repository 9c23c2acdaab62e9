//! The message bus of fleetpatch: its contract, the RabbitMQ implementation
//! ([`rabbitmq`]) and the in-process one for `fleetpatch demo` ([`memory`]).
//!
//! The contract every backend honours (and the conformance suite checks):
//! * at-least-once delivery with manual acks; a delivery not acked when its
//!   consumer goes away is redelivered with [`Delivery::redelivered`] set.
//!   A consumer goes away when its connection closes, or when it was dropped
//!   or cancelled and the deliveries it handed out were dropped; until then
//!   a delivery dropped without ack keeps its prefetch slot, and a cancelled
//!   consumer's deliveries can still be acked;
//! * `requeue` puts a message back at the head of its queue and counts a
//!   delivery; a message returned more than the delivery limit times (so
//!   delivered `limit + 1` times) is dead-lettered, as with quorum queues;
//! * a rejected delivery, or one delivered more than the delivery limit, goes
//!   to the dead-letter queue, where an operator can inspect and replay it;
//! * delays are **fixed-TTL wait queues**, one per step of [`DELAY_STEPS_MS`];
//!   a longer delay is a short chain of hops: a message that arrives before its
//!   due time (`x-fp-due-at`) is re-delayed for the remainder by [`Consumer`],
//!   so handlers never see an early message. The hops aim to land
//!   [`ARRIVAL_LEAD_MS`] before the due time, and the consumer holds that last
//!   stretch (unacked) instead of a wait queue rounding it up to a whole step:
//!   a hop the broker dead-letters late, as it does under load, is still on
//!   time. PostgreSQL stays the source of
//!   truth for deadlines; the bus only wakes the checker;
//! * trace context travels in the `traceparent` header.
//!
//! [`Bus`] holds the logic shared by every backend (routing to wait steps,
//! re-delaying early messages, trace headers); a [`Backend`] only moves bytes.
//! The conformance suite (`conformance`, feature `test-support`) is written
//! once and run against every backend.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The broker's raw rate, for `fleetpatch bench` only (feature `ceiling`).
#[cfg(feature = "ceiling")]
pub mod ceiling;
#[cfg(feature = "test-support")]
pub mod conformance;
pub mod memory;
#[cfg(feature = "test-support")]
pub mod private_broker;
pub mod rabbitmq;
mod trace;

pub use trace::{inject_current_context, parent_context};

/// Delay steps (milliseconds), one fixed-TTL wait queue each.
pub const DELAY_STEPS_MS: [u64; 15] = [
    250, 500, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 256_000, 512_000, 1_024_000, 2_048_000,
    4_096_000,
];
/// A message due within this many milliseconds is delivered, not re-delayed.
pub const DUE_TOLERANCE_MS: i64 = 15;
/// How long before its due time a delayed message's last hop aims to land;
/// the consumer holds it for the rest. RabbitMQ dead-letters expired
/// messages late when it is busy: with 10,000 watch timers in flight beside
/// a saturated database, 27 % of the last hops landed late (p50 98 ms, p99
/// 483 ms, max 556 ms; `fleetpatch bench`). The lead absorbs that.
pub const ARRIVAL_LEAD_MS: i64 = 500;

/// The queue name under which [`Bus::queue_depth`] counts the dead letters.
pub const DEAD_LETTER_QUEUE: &str = "dead";

/// How long a look at the dead letters (or a failed replay) waits for the
/// letters it held to be ready in the queue again.
pub const DEAD_LETTER_RETURN_WAIT: Duration = Duration::from_secs(5);

/// Header carrying a delayed message's due time (unix milliseconds).
pub const DUE_AT_HEADER: &str = "x-fp-due-at";
/// Header carrying a message's work routing key (used to replay dead letters).
pub const ROUTING_KEY_HEADER: &str = "x-fp-routing-key";
/// Header in which RabbitMQ's quorum queues carry [`Delivery::delivery_count`].
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to the message broker at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("message broker error while {action}: {reason}")]
    Broker { action: &'static str, reason: String },
    #[error("the message broker refused (nacked) a message for {routing_key:?}")]
    Nacked { routing_key: String },
    #[error("the bus is closed")]
    Closed,
}

impl Error {
    /// Whether trying again later may work (the broker is away or busy),
    /// as opposed to a bus that was closed on purpose.
    pub fn is_transient(&self) -> bool {
        !matches!(self, Error::Closed)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where a message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Destination {
    /// A work queue, by routing key (see `fleetpatch_proto::routing`).
    Work,
    /// The events exchange (topic), for announcements.
    Events,
}

/// The exchange a backend publishes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Route {
    Work,
    Events,
    /// The wait queue of one delay step (milliseconds).
    Wait(u64),
}

/// A message to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub destination: Destination,
    pub routing_key: String,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
    /// Deliver no earlier than this (unix milliseconds).
    pub due_at_unix_ms: Option<i64>,
}

impl Outgoing {
    pub fn work(routing_key: &str, payload: Vec<u8>) -> Self {
        Self {
            destination: Destination::Work,
            routing_key: routing_key.to_owned(),
            payload,
            headers: BTreeMap::new(),
            due_at_unix_ms: None,
        }
    }

    pub fn event(routing_key: String, payload: Vec<u8>) -> Self {
        Self { destination: Destination::Events, routing_key, payload, headers: BTreeMap::new(), due_at_unix_ms: None }
    }

    /// Deliver after `delay` from now.
    pub fn delayed(mut self, delay: Duration) -> Self {
        self.due_at_unix_ms = Some(now_unix_ms() + delay.as_millis() as i64);
        self
    }

    /// Deliver at `due_at_unix_ms`.
    pub fn due_at(mut self, due_at_unix_ms: i64) -> Self {
        self.due_at_unix_ms = Some(due_at_unix_ms);
        self
    }

    /// Adds the current span's trace context, unless the message carries one.
    pub fn with_trace_context(mut self) -> Self {
        if !self.headers.contains_key("traceparent") {
            inject_current_context(&mut self.headers);
        }
        self
    }
}

/// A message as a backend publishes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Wire {
    pub routing_key: String,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

/// Acknowledges one delivery on its backend.
#[async_trait::async_trait]
pub trait Acker: Send + Sync {
    async fn ack(&self) -> Result<()>;
    /// `requeue = false` sends the message to the dead-letter queue.
    async fn nack(&self, requeue: bool) -> Result<()>;
}

/// One delivered message. Dropping it without ack or nack leaves it unacked
/// until the consumer goes away, then it is redelivered.
pub struct Delivery {
    pub routing_key: String,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
    /// Delivered before to a consumer that did not ack it.
    pub redelivered: bool,
    /// How many times it was delivered before (0 on the first delivery).
    pub delivery_count: u32,
    pub acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("routing_key", &self.routing_key)
            .field("bytes", &self.payload.len())
            .field("redelivered", &self.redelivered)
            .field("delivery_count", &self.delivery_count)
            .finish()
    }
}

impl Delivery {
    pub async fn ack(self) -> Result<()> {
        self.acker.ack().await
    }
    /// Sends the message to the dead-letter queue.
    pub async fn dead_letter(self) -> Result<()> {
        self.acker.nack(false).await
    }
    /// Puts the message back on its queue (counts as a delivery).
    pub async fn requeue(self) -> Result<()> {
        self.acker.nack(true).await
    }
    pub fn due_at_unix_ms(&self) -> Option<i64> {
        self.headers.get(DUE_AT_HEADER).and_then(|value| value.parse().ok())
    }
}

/// A dead letter, as an operator inspects it: the work queue it was for,
/// why it died (the broker's `x-first-death-reason`: `rejected`,
/// `delivery_limit`, …), its headers and its size. The payload itself is a
/// protobuf message and is not shown.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeadLetter {
    pub routing_key: String,
    pub reason: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub bytes: usize,
}

impl DeadLetter {
    fn of(wire: Wire) -> Self {
        let routing_key = wire.headers.get(ROUTING_KEY_HEADER).cloned().unwrap_or_else(|| wire.routing_key.clone());
        let reason = wire.headers.get(memory::FIRST_DEATH_REASON_HEADER).cloned();
        Self { routing_key, reason, headers: wire.headers, bytes: wire.payload.len() }
    }
}

/// What a bus implementation provides: moving bytes, nothing more.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Publishes and waits until the broker took every message (confirms).
    async fn publish(&self, route: Route, messages: Vec<Wire>) -> Result<()>;
    /// Starts consuming a work queue with at most `prefetch` unacked deliveries.
    async fn consume(&self, queue: &str, prefetch: u16) -> Result<BackendConsumer>;
    /// Takes up to `limit` dead letters, oldest first, and holds them: no
    /// one else sees them until the hold removes them (they were replayed)
    /// or releases them back into the dead-letter queue (a look, or a replay
    /// whose publish failed). A hold dropped unsettled releases them.
    async fn hold_dead_letters(&self, limit: usize) -> Result<HeldDeadLetters>;
    /// Number of messages waiting in a work queue (for metrics and autoscaling).
    async fn queue_depth(&self, queue: &str) -> Result<u64>;
    fn is_healthy(&self) -> bool;
    async fn close(&self);
}

/// Dead letters taken by [`Backend::hold_dead_letters`], and the hold on
/// them.
pub struct HeldDeadLetters {
    pub letters: Vec<Wire>,
    pub hold: Box<dyn DeadLetterHold>,
}

/// How held dead letters leave the hold: removed for good, or released back.
#[async_trait::async_trait]
pub trait DeadLetterHold: Send {
    /// The letters were dealt with (replayed): they leave the dead-letter queue.
    async fn remove(self: Box<Self>) -> Result<()>;
    /// The letters go back into the dead-letter queue, unchanged.
    async fn release(self: Box<Self>);
}

/// A hold on nothing (no letters were there, or a backend without any).
pub struct NothingHeld;

#[async_trait::async_trait]
impl DeadLetterHold for NothingHeld {
    async fn remove(self: Box<Self>) -> Result<()> {
        Ok(())
    }
    async fn release(self: Box<Self>) {}
}

/// Deliveries of one consumer, and a way to stop it.
pub struct BackendConsumer {
    pub deliveries: tokio::sync::mpsc::Receiver<Delivery>,
    pub cancel: Box<dyn FnOnce() + Send>,
}

/// The bus, over any backend. Cheap to clone.
#[derive(Clone)]
pub struct Bus {
    backend: Arc<dyn Backend>,
}

pub fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The wait step for a remaining delay: the longest step not longer than
/// it, or the shortest step for anything shorter.
pub fn delay_step_for(remaining_ms: i64) -> u64 {
    let remaining = remaining_ms.max(0) as u64;
    DELAY_STEPS_MS.iter().rev().copied().find(|step| *step <= remaining).unwrap_or(DELAY_STEPS_MS[0])
}

/// The wait step of the next hop of a message due in `remaining_ms`, aimed
/// to land [`ARRIVAL_LEAD_MS`] early; `None` within [`HOLD_BELOW_MS`], where
/// the consumer holds the message instead.
pub fn next_hop_ms(remaining_ms: i64) -> Option<u64> {
    (remaining_ms >= HOLD_BELOW_MS).then(|| delay_step_for(remaining_ms - ARRIVAL_LEAD_MS))
}

impl Bus {
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Self { backend }
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Publishes every message and returns once the broker holds them all.
    pub async fn publish(&self, messages: Vec<Outgoing>) -> Result<()> {
        let now = now_unix_ms();
        let mut by_route: BTreeMap<Route, Vec<Wire>> = BTreeMap::new();
        for message in messages {
            let mut headers = message.headers;
            headers.insert(ROUTING_KEY_HEADER.to_owned(), message.routing_key.clone());
            let route = match (message.destination, message.due_at_unix_ms) {
                (Destination::Events, _) => Route::Events,
                (Destination::Work, Some(due)) if due - now > DUE_TOLERANCE_MS => {
                    headers.insert(DUE_AT_HEADER.to_owned(), due.to_string());
                    // Within the hold limit: straight to the work queue, where
                    // the consumer holds it until due.
                    next_hop_ms(due - now).map_or(Route::Work, Route::Wait)
                }
                (Destination::Work, _) => {
                    headers.remove(DUE_AT_HEADER);
                    Route::Work
                }
            };
            by_route.entry(route).or_default().push(Wire {
                routing_key: message.routing_key,
                payload: message.payload,
                headers,
            });
        }
        for (route, wires) in by_route {
            self.backend.publish(route, wires).await?;
        }
        Ok(())
    }

    /// Consumes a work queue. Messages that arrive before they are due are
    /// re-delayed here and never reach the caller.
    pub async fn consume(&self, queue: &str, prefetch: u16) -> Result<Consumer> {
        let inner = self.backend.consume(queue, prefetch).await?;
        Ok(Consumer::new(self.clone(), inner))
    }

    /// Up to `limit` dead letters, oldest first, as an operator inspects
    /// them (`GET /v1/dead-letters`, `fleetpatch dead-letters list`); they
    /// stay in the dead-letter queue.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        let held = self.backend.hold_dead_letters(limit).await?;
        self.release_dead_letters(held.hold, held.letters.len()).await;
        Ok(held.letters.into_iter().map(DeadLetter::of).collect())
    }

    /// Hands `count` held dead letters back and waits (up to
    /// [`DEAD_LETTER_RETURN_WAIT`]) until the queue has as many ready again.
    /// RabbitMQ answers the close of the channel that held them before its
    /// quorum queue has them ready: a second look right after the first one
    /// (`fleetpatch dead-letters list`, twice) found the queue empty (seen in
    /// CI: `dead_letters_are_listed_left_in_place_and_replayed`).
    async fn release_dead_letters(&self, hold: Box<dyn DeadLetterHold>, count: usize) {
        hold.release().await;
        if count == 0 {
            return;
        }
        let give_up = tokio::time::Instant::now() + DEAD_LETTER_RETURN_WAIT;
        loop {
            match self.backend.queue_depth(DEAD_LETTER_QUEUE).await {
                Ok(depth) if depth >= count as u64 => return,
                Ok(_) if tokio::time::Instant::now() < give_up => {
                    // Waiting for the broker to requeue them, not for our own code.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(depth) => {
                    // Another look holds some, or a replay took them.
                    tracing::debug!(depth, held = count, "dead letters not all back in the queue yet");
                    return;
                }
                Err(error) => {
                    tracing::debug!(error = %error, "could not read the dead-letter queue's depth");
                    return;
                }
            }
        }
    }

    /// Moves up to `limit` dead letters back to their work queues. They
    /// leave the dead-letter queue only once the broker confirmed their
    /// publish: a failed publish leaves every one of them where it was. (A
    /// process killed between the confirm and the removal leaves them in
    /// both places; jobs are idempotent, so a second replay does no harm.)
    pub async fn replay_dead_letters(&self, limit: usize) -> Result<usize> {
        let HeldDeadLetters { letters, hold } = self.backend.hold_dead_letters(limit).await?;
        let count = letters.len();
        let messages = letters
            .iter()
            .cloned()
            .map(|wire| {
                let routing_key =
                    wire.headers.get(ROUTING_KEY_HEADER).cloned().unwrap_or_else(|| wire.routing_key.clone());
                let mut headers = wire.headers;
                headers.remove(DUE_AT_HEADER);
                headers.remove(DELIVERY_COUNT_HEADER);
                Outgoing {
                    destination: Destination::Work,
                    routing_key,
                    payload: wire.payload,
                    headers,
                    due_at_unix_ms: None,
                }
            })
            .collect();
        if let Err(error) = self.publish(messages).await {
            self.release_dead_letters(hold, count).await;
            return Err(error);
        }
        hold.remove().await?;
        Ok(count)
    }

    /// Ready messages of a work queue, or the dead letters for
    /// [`DEAD_LETTER_QUEUE`].
    pub async fn queue_depth(&self, queue: &str) -> Result<u64> {
        self.backend.queue_depth(queue).await
    }

    pub fn is_healthy(&self) -> bool {
        self.backend.is_healthy()
    }

    /// A readiness check for a service's `/readyz`: the broker connection is up.
    pub fn readiness_check(
        &self,
    ) -> impl Fn() -> futures_util::future::BoxFuture<'static, bool> + Send + Sync + 'static {
        let bus = self.clone();
        move || {
            let healthy = bus.is_healthy();
            Box::pin(async move { healthy })
        }
    }

    pub async fn close(&self) {
        self.backend.close().await
    }
}

/// Deliveries of one work queue, due ones only.
///
/// An early arrival (a hop of a multi-hop delay) is re-delayed through the
/// wait queues for the rest of its delay, aiming [`ARRIVAL_LEAD_MS`] early,
/// except the last stretch: a message due in less than [`HOLD_BELOW_MS`] is
/// held here, unacked, and handed out when due. A wait queue would round that
/// stretch up to a whole step (up to 235 ms late on average 125), and a last
/// hop that aims at the due time itself is as late as the broker is slow. A
/// held message is an ordinary unacked delivery: it counts against the
/// prefetch (size it for the messages that come due within
/// [`HOLD_BELOW_MS`]), and if the consumer or its connection goes away the
/// broker delivers it again.
pub struct Consumer {
    bus: Bus,
    deliveries: tokio::sync::mpsc::Receiver<Delivery>,
    cancel: Option<Box<dyn FnOnce() + Send>>,
    /// Held early arrivals by (due time, arrival order).
    held: BTreeMap<(i64, u64), Delivery>,
    arrivals: u64,
}

/// Messages due in less than this (the lead plus the shortest wait step) are
/// held by the consumer instead of going through a wait queue.
pub const HOLD_BELOW_MS: i64 = ARRIVAL_LEAD_MS + DELAY_STEPS_MS[0] as i64;

/// What a consumer does with an arrival.
enum Arrival {
    Due(Delivery),
    Held,
    Early(Delivery),
}

impl Consumer {
    fn new(bus: Bus, inner: BackendConsumer) -> Self {
        Self { bus, deliveries: inner.deliveries, cancel: Some(inner.cancel), held: BTreeMap::new(), arrivals: 0 }
    }

    /// Due now, held until due, or to be re-delayed.
    fn sort(&mut self, delivery: Delivery) -> Arrival {
        let Some(due) = delivery.due_at_unix_ms() else { return Arrival::Due(delivery) };
        let remaining = due - now_unix_ms();
        if remaining <= DUE_TOLERANCE_MS {
            Arrival::Due(delivery)
        } else if remaining < HOLD_BELOW_MS {
            self.arrivals += 1;
            self.held.insert((due, self.arrivals), delivery);
            Arrival::Held
        } else {
            Arrival::Early(delivery)
        }
    }

    /// The held messages that are due, at most `max`, earliest first.
    fn take_due_held(&mut self, max: usize) -> Vec<Delivery> {
        let now = now_unix_ms();
        let mut due = Vec::new();
        while due.len() < max {
            match self.held.first_key_value() {
                Some((&(at, _), _)) if at - now <= DUE_TOLERANCE_MS => {
                    due.extend(self.held.pop_first().map(|(_, delivery)| delivery));
                }
                _ => break,
            }
        }
        due
    }

    /// When the first held message comes due.
    fn next_held_due(&self) -> Option<tokio::time::Instant> {
        let (&(due, _), _) = self.held.first_key_value()?;
        let wait = Duration::from_millis((due - now_unix_ms()).max(0) as u64);
        Some(tokio::time::Instant::now() + wait)
    }

    /// The next arrival from the broker, or `None` once a held message came
    /// due (or, with nothing held, once the consumer is closed: then the
    /// outer `Option` is `None`).
    async fn arrival(&mut self) -> Option<Option<Delivery>> {
        let Some(wake) = self.next_held_due() else { return self.deliveries.recv().await.map(Some) };
        tokio::select! {
            delivery = self.deliveries.recv() => match delivery {
                Some(delivery) => Some(Some(delivery)),
                // Closed: the held messages are still handed out when due.
                None => {
                    tokio::time::sleep_until(wake).await;
                    Some(None)
                }
            },
            _ = tokio::time::sleep_until(wake) => Some(None),
        }
    }

    /// Publishes the next hop of each early arrival (in one publish), then
    /// acks them: a crash in between duplicates them, never loses them. In
    /// the background: the due deliveries that arrived with them are handed
    /// out at once, not after the broker's confirms (under load those took
    /// 100–375 ms, all of it lateness). Until acked they keep their prefetch
    /// slots, so the prefetch bounds the re-delays in flight.
    fn re_delay(&self, early: Vec<Delivery>) {
        if early.is_empty() {
            return;
        }
        let again: Vec<Outgoing> = early
            .iter()
            .map(|delivery| {
                let mut headers = delivery.headers.clone();
                // The next hop is a new message: RabbitMQ would pass a stale count on.
                headers.remove(DELIVERY_COUNT_HEADER);
                Outgoing {
                    destination: Destination::Work,
                    routing_key: delivery.routing_key.clone(),
                    payload: delivery.payload.clone(),
                    headers,
                    due_at_unix_ms: delivery.due_at_unix_ms(),
                }
            })
            .collect();
        let bus = self.bus.clone();
        tokio::spawn(async move {
            match bus.publish(again).await {
                Ok(()) => {
                    for delivery in early {
                        if let Err(error) = delivery.ack().await {
                            tracing::warn!(error = %error, "could not ack a re-delayed message");
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(error = %error, "could not re-delay messages; leaving them for redelivery");
                    // Not at once: the broker would hand them straight back.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    for delivery in early {
                        let _ = delivery.requeue().await;
                    }
                }
            }
        });
    }

    /// The next due delivery; `None` once the consumer was cancelled and
    /// drained (held messages included), or the connection is gone.
    /// Cancel-safe: held messages stay with the consumer, and early ones are
    /// re-delayed in the background.
    pub async fn next(&mut self) -> Option<Delivery> {
        loop {
            if let Some(delivery) = self.take_due_held(1).pop() {
                return Some(delivery);
            }
            let Some(delivery) = self.arrival().await? else { continue };
            match self.sort(delivery) {
                Arrival::Due(delivery) => return Some(delivery),
                Arrival::Held => {}
                Arrival::Early(delivery) => self.re_delay(vec![delivery]),
            }
        }
    }

    /// The due deliveries among those that arrive within `window` of the
    /// first (at most `max`), held messages that came due first: early
    /// arrivals of multi-hop delays are re-delayed together, in one publish,
    /// and acked (in the background, see `re_delay`). Empty when all were
    /// early; `None` as for [`Consumer::next`]. Not cancel-safe: dropped
    /// while it collects arrivals within the window, those stay unacked until
    /// the consumer goes away. Cancel it only when stopping.
    pub async fn next_batch(&mut self, max: usize, window: Duration) -> Option<Vec<Delivery>> {
        let max = max.max(1);
        let mut due = self.take_due_held(max);
        let mut received = Vec::new();
        if due.is_empty() {
            received.extend(self.arrival().await?);
        }
        let until = tokio::time::Instant::now() + window;
        while due.len() + received.len() < max {
            match tokio::time::timeout_at(until, self.deliveries.recv()).await {
                Ok(Some(delivery)) => received.push(delivery),
                _ => break,
            }
        }
        let mut early = Vec::new();
        for delivery in received {
            match self.sort(delivery) {
                Arrival::Due(delivery) => due.push(delivery),
                Arrival::Held => {}
                Arrival::Early(delivery) => early.push(delivery),
            }
        }
        if due.len() < max {
            let room = max - due.len();
            due.extend(self.take_due_held(room));
        }
        self.re_delay(early);
        Some(due)
    }

    /// Stops new deliveries; those already received can still be acked.
    pub fn cancel(&mut self) {
        if let Some(cancel) = self.cancel.take() {
            cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_steps_cover_short_and_long_delays() {
        assert_eq!(delay_step_for(0), 250);
        assert_eq!(delay_step_for(100), 250);
        assert_eq!(delay_step_for(999), 500);
        assert_eq!(delay_step_for(2_000), 2_000);
        assert_eq!(delay_step_for(600_000), 512_000);
        assert_eq!(delay_step_for(100_000_000), 4_096_000);
    }

    /// The hops (wait steps) a delay takes when every hop lands on time, and
    /// what is left to hold when the last one lands.
    fn hops(delay_ms: i64) -> (Vec<u64>, i64) {
        let mut remaining = delay_ms;
        let mut hops = Vec::new();
        while let Some(step) = next_hop_ms(remaining) {
            hops.push(step);
            remaining -= step as i64;
        }
        (hops, remaining)
    }

    #[test]
    fn a_long_delay_is_a_short_chain_of_hops_that_lands_early_by_the_lead() {
        // The watchdog's default 600 s, as published a few ms after arming, and
        // the bench's 10 s: the last hop lands between the lead and the hold limit.
        for delay in [600_000, 599_873, 10_000, 9_873, 3_000, HOLD_BELOW_MS] {
            let (hops, held) = hops(delay);
            assert!(!hops.is_empty() && hops.len() <= 8, "{delay} ms: {} hops ({hops:?})", hops.len());
            assert!(
                (ARRIVAL_LEAD_MS..HOLD_BELOW_MS).contains(&held),
                "{delay} ms: the last hop leaves {held} ms to hold, not {ARRIVAL_LEAD_MS}..{HOLD_BELOW_MS}"
            );
        }
        assert_eq!(hops(600_000).0, [512_000, 64_000, 16_000, 4_000, 2_000, 1_000, 500]);
        assert_eq!(hops(9_873).0, [8_000, 1_000, 250]);
        // Shorter than the hold limit: no hop, held from the start.
        assert_eq!(hops(HOLD_BELOW_MS - 1), (vec![], HOLD_BELOW_MS - 1));
    }

    /// A backend whose publishes take `slow` (a busy broker's confirms).
    struct SlowPublish {
        inner: memory::MemoryBackend,
        slow: Duration,
    }

    #[async_trait::async_trait]
    impl Backend for SlowPublish {
        async fn publish(&self, route: Route, messages: Vec<Wire>) -> Result<()> {
            tokio::time::sleep(self.slow).await;
            self.inner.publish(route, messages).await
        }
        async fn consume(&self, queue: &str, prefetch: u16) -> Result<BackendConsumer> {
            self.inner.consume(queue, prefetch).await
        }
        async fn hold_dead_letters(&self, limit: usize) -> Result<HeldDeadLetters> {
            self.inner.hold_dead_letters(limit).await
        }
        async fn queue_depth(&self, queue: &str) -> Result<u64> {
            self.inner.queue_depth(queue).await
        }
        fn is_healthy(&self) -> bool {
            self.inner.is_healthy()
        }
        async fn close(&self) {
            self.inner.close().await
        }
    }

    #[tokio::test]
    async fn due_deliveries_do_not_wait_for_the_re_delay_of_early_ones() {
        let memory = memory::MemoryBackend::new(&["q"], 3);
        // Both in the work queue at once: one due, one that arrived early
        // (as a hop does), with 5 s to go.
        let wire = |payload: &[u8], due: Option<i64>| Wire {
            routing_key: "q".into(),
            payload: payload.to_vec(),
            headers: due.map(|due| (DUE_AT_HEADER.to_owned(), due.to_string())).into_iter().collect(),
        };
        memory
            .publish(Route::Work, vec![wire(b"early", Some(now_unix_ms() + 5_000)), wire(b"due", None)])
            .await
            .expect("publish");
        let slow = Bus::new(Arc::new(SlowPublish { inner: memory.connect_another(), slow: Duration::from_secs(2) }));
        let mut consumer = slow.consume("q", 8).await.expect("consume");
        let started = std::time::Instant::now();
        let batch = consumer.next_batch(8, Duration::from_millis(50)).await.expect("open");
        let elapsed = started.elapsed();
        let texts: Vec<&[u8]> = batch.iter().map(|d| d.payload.as_slice()).collect();
        assert_eq!(texts, [b"due".as_slice()], "the due message is handed out, the early one re-delayed");
        assert!(elapsed < Duration::from_millis(1_000), "the batch waited {elapsed:?} for the broker's confirms");
    }
}
