//! The in-process backend: the bus contract without a broker, for
//! `fleetpatch demo` and tests that need no RabbitMQ.
//!
//! It honours the same contract as [`crate::rabbitmq`], checked by the same
//! conformance suite:
//! * one FIFO **work queue** per routing key given to [`MemoryBackend::new`];
//!   messages for any other routing key are dropped, as an unbound routing
//!   key is on RabbitMQ's direct exchange;
//! * consumers get at most `prefetch` unacked deliveries each (0: no limit,
//!   as in AMQP), round-robin between the consumers of a queue;
//! * `ack` removes a message; `nack(requeue)` puts it back at the **front**
//!   with `redelivered` set and its delivery count + 1; `nack(no requeue)`
//!   dead-letters it; a message returned more than `delivery_limit` times is
//!   dead-lettered instead (RabbitMQ's quorum-queue `x-delivery-limit`);
//! * a delivery dropped without ack or nack stays unacked while its consumer
//!   lives. When the consumer goes away (its receiver dropped, or cancelled
//!   and the delivery dropped, or its connection closed) the message is
//!   returned to its queue as by `nack(requeue)`;
//! * **wait queues**: one per step of [`crate::DELAY_STEPS_MS`], FIFO with a
//!   fixed delay, each served by one tokio timer task that sleeps until its
//!   head is due and then moves it to the work queue of its routing key;
//! * **events** are handed to [`MemoryBackend::subscribe_events`] receivers
//!   and dropped when nobody subscribed (a topic exchange without bindings);
//! * messages live as long as the broker, that is as long as any connection
//!   to it: "durable" means they survive consumers, not the process.
//!
//! [`MemoryBackend::new`] creates a broker and a first connection to it;
//! [`MemoryBackend::connect_another`] opens another connection, so a test can
//! close one connection (and have its unacked deliveries redelivered) while
//! the others go on, as with two processes on one RabbitMQ.
//!
//! It must never grow logic of its own above the [`Backend`] trait: routing
//! to wait steps, re-delaying early arrivals and trace headers live in
//! [`crate::Bus`] and run unchanged on both backends.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{Acker, Backend, BackendConsumer, Delivery, Error, Result, Route, Wire, DELAY_STEPS_MS};

/// Dead-letter header naming why the message was dead-lettered (as RabbitMQ).
pub const FIRST_DEATH_REASON_HEADER: &str = "x-first-death-reason";
/// Dead-letter header naming the queue the message was dead-lettered from.
pub const FIRST_DEATH_QUEUE_HEADER: &str = "x-first-death-queue";

/// How many events a slow [`MemoryBackend::subscribe_events`] receiver may lag behind.
const EVENT_BUFFER: usize = 1_024;

/// One connection to an in-process broker. See the module docs.
pub struct MemoryBackend {
    broker: Arc<Broker>,
    connection: Arc<Connection>,
}

/// State shared by every connection of one in-process broker.
struct Broker {
    work_queues: Arc<HashMap<String, Arc<WorkQueue>>>,
    wait_queues: HashMap<u64, Arc<WaitQueue>>,
    dead_letters: Arc<Mutex<VecDeque<Wire>>>,
    events: broadcast::Sender<Wire>,
    next_connection_id: AtomicU64,
    next_consumer_id: AtomicU64,
    /// Stops the wait-queue timers once no connection holds the broker.
    timers: CancellationToken,
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.timers.cancel();
    }
}

struct Connection {
    id: u64,
    closed: AtomicBool,
    /// Parent of every consumer's token: cancelled when the connection closes.
    consumers: CancellationToken,
}

/// A message in a work queue.
struct Message {
    wire: Wire,
    redelivered: bool,
    delivery_count: u32,
}

struct WorkQueue {
    name: String,
    delivery_limit: u32,
    dead_letters: Arc<Mutex<VecDeque<Wire>>>,
    state: Mutex<QueueState>,
}

#[derive(Default)]
struct QueueState {
    ready: VecDeque<Message>,
    unacked: HashMap<u64, Unacked>,
    consumers: Vec<ConsumerSlot>,
    next_delivery_tag: u64,
    /// Round-robin position among `consumers`.
    next_consumer: usize,
}

struct Unacked {
    consumer_id: u64,
    connection_id: u64,
    message: Message,
    /// The [`Delivery`] still exists somewhere (in the channel or in a handler).
    held: bool,
}

struct ConsumerSlot {
    id: u64,
    connection_id: u64,
    sender: mpsc::Sender<Delivery>,
    prefetch: usize,
    outstanding: usize,
}

enum Settlement {
    Ack,
    Requeue,
    DeadLetter,
}

impl MemoryBackend {
    /// A new in-process broker with one work queue per routing key in
    /// `queues`, and a first connection to it. A message returned to its
    /// queue more than `delivery_limit` times is dead-lettered.
    pub fn new(queues: &[&str], delivery_limit: u32) -> Self {
        let dead_letters = Arc::new(Mutex::new(VecDeque::new()));
        let work_queues = queues
            .iter()
            .map(|name| {
                let queue = WorkQueue {
                    name: (*name).to_owned(),
                    delivery_limit,
                    dead_letters: dead_letters.clone(),
                    state: Mutex::new(QueueState::default()),
                };
                ((*name).to_owned(), Arc::new(queue))
            })
            .collect();
        let wait_queues = DELAY_STEPS_MS
            .iter()
            .map(|step| {
                let queue = WaitQueue {
                    delay: Duration::from_millis(*step),
                    waiting: Mutex::new(VecDeque::new()),
                    wake: Notify::new(),
                    timer_started: AtomicBool::new(false),
                };
                (*step, Arc::new(queue))
            })
            .collect();
        let broker = Broker {
            work_queues: Arc::new(work_queues),
            wait_queues,
            dead_letters,
            events: broadcast::channel(EVENT_BUFFER).0,
            next_connection_id: AtomicU64::new(0),
            next_consumer_id: AtomicU64::new(0),
            timers: CancellationToken::new(),
        };
        Self::connect_to(Arc::new(broker))
    }

    /// Another connection to the same in-process broker. Closing (or
    /// dropping) a connection returns the unacked deliveries of its
    /// consumers to their queues and leaves the other connections running.
    pub fn connect_another(&self) -> Self {
        Self::connect_to(self.broker.clone())
    }

    fn connect_to(broker: Arc<Broker>) -> Self {
        let connection = Connection {
            id: broker.next_connection_id.fetch_add(1, Ordering::Relaxed),
            closed: AtomicBool::new(false),
            consumers: CancellationToken::new(),
        };
        Self { broker, connection: Arc::new(connection) }
    }

    /// Receives every event published from now on (any connection). Events
    /// published while nobody subscribes are dropped.
    pub fn subscribe_events(&self) -> broadcast::Receiver<Wire> {
        self.broker.events.subscribe()
    }

    fn work_queue(&self, name: &str, action: &'static str) -> Result<&Arc<WorkQueue>> {
        self.broker.work_queues.get(name).ok_or_else(|| Error::Broker {
            action,
            reason: format!(
                "there is no work queue {name:?} (this bus declares {:?})",
                self.broker.work_queues.keys().collect::<Vec<_>>()
            ),
        })
    }

    fn ensure_open(&self) -> Result<()> {
        if self.connection.closed.load(Ordering::Acquire) {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    fn close_now(&self) {
        if self.connection.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.connection.consumers.cancel();
        for queue in self.broker.work_queues.values() {
            queue.close_connection(self.connection.id);
        }
    }
}

impl Drop for MemoryBackend {
    fn drop(&mut self) {
        self.close_now();
    }
}

#[async_trait::async_trait]
impl Backend for MemoryBackend {
    async fn publish(&self, route: Route, messages: Vec<Wire>) -> Result<()> {
        self.ensure_open()?;
        match route {
            Route::Work => {
                for wire in messages {
                    route_to_work_queue(&self.broker.work_queues, wire);
                }
            }
            Route::Events => {
                for wire in messages {
                    // An error only says that nobody subscribes: the event is dropped.
                    let _ = self.broker.events.send(wire);
                }
            }
            Route::Wait(step) => {
                let Some(wait) = self.broker.wait_queues.get(&step) else {
                    return Err(Error::Broker {
                        action: "publishing",
                        reason: format!("there is no wait queue for a delay of {step} ms (steps: {DELAY_STEPS_MS:?})"),
                    });
                };
                wait.start_timer(self.broker.work_queues.clone(), self.broker.timers.clone());
                wait.push(messages);
            }
        }
        Ok(())
    }

    async fn consume(&self, queue: &str, prefetch: u16) -> Result<BackendConsumer> {
        self.ensure_open()?;
        let work_queue = self.work_queue(queue, "starting a consumer")?.clone();
        // AMQP's prefetch 0 means "no limit"; the channel still needs a bound.
        let prefetch = if prefetch == 0 { usize::from(u16::MAX) } else { usize::from(prefetch) };
        let (sender, receiver) = mpsc::channel(prefetch);
        let consumer_id = self.broker.next_consumer_id.fetch_add(1, Ordering::Relaxed);
        let stop = self.connection.consumers.child_token();
        // The watcher notices a dropped receiver; it holds a sender, so it
        // must stop (through `stop`) for a cancelled consumer's channel to end.
        let watcher_sender = sender.clone();
        work_queue.add_consumer(ConsumerSlot {
            id: consumer_id,
            connection_id: self.connection.id,
            sender,
            prefetch,
            outstanding: 0,
        });
        // The connection may have closed while the slot was added.
        if self.connection.closed.load(Ordering::Acquire) {
            work_queue.close_connection(self.connection.id);
        }
        let watcher_queue = work_queue.clone();
        let watcher_stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = watcher_sender.closed() => {}
                _ = watcher_stop.cancelled() => {}
            }
            drop(watcher_sender);
            watcher_queue.consumer_gone(consumer_id);
        });
        let cancel = Box::new(move || {
            work_queue.consumer_gone(consumer_id);
            stop.cancel();
        });
        Ok(BackendConsumer { deliveries: receiver, cancel })
    }

    async fn hold_dead_letters(&self, limit: usize) -> Result<crate::HeldDeadLetters> {
        self.ensure_open()?;
        let letters: Vec<Wire> = {
            let mut dead_letters = lock(&self.broker.dead_letters);
            let count = limit.min(dead_letters.len());
            dead_letters.drain(..count).collect()
        };
        let hold = MemoryHold { queue: self.broker.dead_letters.clone(), letters: Some(letters.clone()) };
        Ok(crate::HeldDeadLetters { letters, hold: Box::new(hold) })
    }

    async fn queue_depth(&self, queue: &str) -> Result<u64> {
        self.ensure_open()?;
        if queue == crate::DEAD_LETTER_QUEUE {
            return Ok(lock(&self.broker.dead_letters).len() as u64);
        }
        let work_queue = self.work_queue(queue, "reading a queue's depth")?;
        Ok(work_queue.lock().ready.len() as u64)
    }

    fn is_healthy(&self) -> bool {
        !self.connection.closed.load(Ordering::Acquire)
    }

    async fn close(&self) {
        self.close_now();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // No code panics while holding these locks; recover the state if one did.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn route_to_work_queue(work_queues: &HashMap<String, Arc<WorkQueue>>, wire: Wire) {
    match work_queues.get(&wire.routing_key) {
        Some(queue) => queue.push_back(wire),
        None => tracing::debug!(routing_key = %wire.routing_key, "dropping a message for a routing key without queue"),
    }
}

impl WorkQueue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        lock(&self.state)
    }

    /// Runs `change` on the state, then hands ready messages to consumers.
    /// Deliveries that could not be sent are dropped after the lock is
    /// released (their ackers lock the queue when dropped).
    fn change<R>(self: &Arc<Self>, change: impl FnOnce(&Self, &mut QueueState) -> R) -> R {
        let undeliverable;
        let result;
        {
            let mut state = self.lock();
            result = change(self, &mut state);
            undeliverable = self.dispatch(&mut state);
        }
        drop(undeliverable);
        result
    }

    fn dispatch(self: &Arc<Self>, state: &mut QueueState) -> Vec<Delivery> {
        let mut undeliverable = Vec::new();
        while !state.ready.is_empty() && !state.consumers.is_empty() {
            let count = state.consumers.len();
            let start = state.next_consumer % count;
            let Some(index) = (0..count)
                .map(|offset| (start + offset) % count)
                .find(|index| state.consumers[*index].outstanding < state.consumers[*index].prefetch)
            else {
                break;
            };
            state.next_consumer = index + 1;
            let Some(message) = state.ready.pop_front() else { break };
            let tag = state.next_delivery_tag;
            state.next_delivery_tag += 1;
            let delivery = Delivery {
                routing_key: message.wire.routing_key.clone(),
                payload: message.wire.payload.clone(),
                headers: message.wire.headers.clone(),
                redelivered: message.redelivered,
                delivery_count: message.delivery_count,
                acker: Box::new(MemoryAcker { queue: self.clone(), tag, settled: AtomicBool::new(false) }),
            };
            let slot = &mut state.consumers[index];
            match slot.sender.try_send(delivery) {
                Ok(()) => {
                    slot.outstanding += 1;
                    let (consumer_id, connection_id) = (slot.id, slot.connection_id);
                    state.unacked.insert(tag, Unacked { consumer_id, connection_id, message, held: true });
                }
                Err(error) => {
                    // Never delivered: back to the front, unchanged.
                    state.ready.push_front(message);
                    let closed = matches!(error, mpsc::error::TrySendError::Closed(_));
                    undeliverable.push(error.into_inner());
                    if closed {
                        let consumer_id = state.consumers[index].id;
                        self.remove_consumer(state, consumer_id);
                    } else {
                        // Cannot happen (the channel holds `prefetch`); do not spin on it.
                        break;
                    }
                }
            }
        }
        undeliverable
    }

    fn push_back(self: &Arc<Self>, wire: Wire) {
        self.change(|_, state| state.ready.push_back(Message { wire, redelivered: false, delivery_count: 0 }));
    }

    fn add_consumer(self: &Arc<Self>, slot: ConsumerSlot) {
        self.change(|_, state| state.consumers.push(slot));
    }

    /// The consumer stops receiving; the deliveries it no longer holds go back.
    fn consumer_gone(self: &Arc<Self>, consumer_id: u64) {
        self.change(|queue, state| queue.remove_consumer(state, consumer_id));
    }

    fn remove_consumer(&self, state: &mut QueueState, consumer_id: u64) {
        state.consumers.retain(|slot| slot.id != consumer_id);
        self.return_unacked(state, |entry| entry.consumer_id == consumer_id && !entry.held);
    }

    /// A connection closed: its consumers stop and every delivery they held goes back.
    fn close_connection(self: &Arc<Self>, connection_id: u64) {
        self.change(|queue, state| {
            state.consumers.retain(|slot| slot.connection_id != connection_id);
            queue.return_unacked(state, |entry| entry.connection_id == connection_id);
        });
    }

    /// Returns the matching unacked messages to the front, in their original order.
    fn return_unacked(&self, state: &mut QueueState, returns: impl Fn(&Unacked) -> bool) {
        let mut tags: Vec<u64> =
            state.unacked.iter().filter(|(_, entry)| returns(entry)).map(|(tag, _)| *tag).collect();
        tags.sort_unstable();
        for tag in tags.into_iter().rev() {
            if let Some(entry) = state.unacked.remove(&tag) {
                self.return_message(state, entry.message);
            }
        }
    }

    /// A delivery came back unacked: it counts, and too many send it to the dead letters.
    fn return_message(&self, state: &mut QueueState, mut message: Message) {
        message.redelivered = true;
        message.delivery_count = message.delivery_count.saturating_add(1);
        if message.delivery_count > self.delivery_limit {
            self.dead_letter(message, "delivery_limit");
        } else {
            state.ready.push_front(message);
        }
    }

    fn dead_letter(&self, message: Message, reason: &str) {
        let mut wire = message.wire;
        wire.headers.entry(FIRST_DEATH_REASON_HEADER.to_owned()).or_insert_with(|| reason.to_owned());
        wire.headers.entry(FIRST_DEATH_QUEUE_HEADER.to_owned()).or_insert_with(|| self.name.clone());
        lock(&self.dead_letters).push_back(wire);
    }

    fn settle(self: &Arc<Self>, tag: u64, settlement: Settlement) -> Result<()> {
        self.change(|queue, state| {
            let Some(entry) = state.unacked.remove(&tag) else {
                // Only a closed connection takes deliveries back from a live handler.
                return Err(Error::Closed);
            };
            if let Some(slot) = state.consumers.iter_mut().find(|slot| slot.id == entry.consumer_id) {
                slot.outstanding = slot.outstanding.saturating_sub(1);
            }
            match settlement {
                Settlement::Ack => {}
                Settlement::Requeue => queue.return_message(state, entry.message),
                Settlement::DeadLetter => queue.dead_letter(entry.message, "rejected"),
            }
            Ok(())
        })
    }

    /// A delivery was dropped without ack or nack.
    fn release(self: &Arc<Self>, tag: u64) {
        self.change(|queue, state| {
            let Some(entry) = state.unacked.get_mut(&tag) else { return };
            let consumer_id = entry.consumer_id;
            if state.consumers.iter().any(|slot| slot.id == consumer_id) {
                // Unacked until its consumer goes away, as on RabbitMQ.
                entry.held = false;
            } else if let Some(entry) = state.unacked.remove(&tag) {
                queue.return_message(state, entry.message);
            }
        });
    }
}

struct MemoryAcker {
    queue: Arc<WorkQueue>,
    tag: u64,
    settled: AtomicBool,
}

impl MemoryAcker {
    fn settle(&self, settlement: Settlement) -> Result<()> {
        if self.settled.swap(true, Ordering::AcqRel) {
            return Err(Error::Broker { action: "acking", reason: "the delivery was already acked or nacked".into() });
        }
        self.queue.settle(self.tag, settlement)
    }
}

#[async_trait::async_trait]
impl Acker for MemoryAcker {
    async fn ack(&self) -> Result<()> {
        self.settle(Settlement::Ack)
    }

    async fn nack(&self, requeue: bool) -> Result<()> {
        self.settle(if requeue { Settlement::Requeue } else { Settlement::DeadLetter })
    }
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        if !self.settled.load(Ordering::Acquire) {
            self.queue.release(self.tag);
        }
    }
}

/// A fixed-delay FIFO: every message waits exactly `delay`, so the head is
/// always the next one due and one timer serves the whole queue.
struct WaitQueue {
    delay: Duration,
    waiting: Mutex<VecDeque<(Instant, Wire)>>,
    wake: Notify,
    timer_started: AtomicBool,
}

impl WaitQueue {
    fn push(&self, messages: Vec<Wire>) {
        let due = Instant::now() + self.delay;
        let was_empty = {
            let mut waiting = lock(&self.waiting);
            let was_empty = waiting.is_empty();
            waiting.extend(messages.into_iter().map(|wire| (due, wire)));
            was_empty
        };
        if was_empty {
            // Stores a permit if the timer is not waiting yet: no lost wake-up.
            self.wake.notify_one();
        }
    }

    /// Starts this queue's timer task on first use (a publish runs inside the runtime).
    fn start_timer(self: &Arc<Self>, work_queues: Arc<HashMap<String, Arc<WorkQueue>>>, stop: CancellationToken) {
        if self.timer_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let wait = self.clone();
        tokio::spawn(async move { wait.run_timer(&work_queues, &stop).await });
    }

    async fn run_timer(&self, work_queues: &HashMap<String, Arc<WorkQueue>>, stop: &CancellationToken) {
        loop {
            let head = lock(&self.waiting).front().map(|(due, _)| *due);
            let wait_for_head = async {
                match head {
                    Some(due) => tokio::time::sleep_until(due).await,
                    None => self.wake.notified().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = wait_for_head => {}
            }
            let now = Instant::now();
            let due_now: Vec<Wire> = {
                let mut waiting = lock(&self.waiting);
                let count = waiting.iter().take_while(|(due, _)| *due <= now).count();
                waiting.drain(..count).map(|(_, wire)| wire).collect()
            };
            for wire in due_now {
                route_to_work_queue(work_queues, wire);
            }
        }
    }
}

/// Held dead letters of the in-memory broker: out of the queue while held,
/// put back at its front (in their order) when released or dropped.
struct MemoryHold {
    queue: Arc<Mutex<VecDeque<Wire>>>,
    letters: Option<Vec<Wire>>,
}

impl MemoryHold {
    fn put_back(&mut self) {
        if let Some(letters) = self.letters.take() {
            let mut queue = lock(&self.queue);
            for letter in letters.into_iter().rev() {
                queue.push_front(letter);
            }
        }
    }
}

impl Drop for MemoryHold {
    fn drop(&mut self) {
        self.put_back();
    }
}

#[async_trait::async_trait]
impl crate::DeadLetterHold for MemoryHold {
    async fn remove(mut self: Box<Self>) -> Result<()> {
        self.letters = None;
        Ok(())
    }

    async fn release(mut self: Box<Self>) {
        self.put_back();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn wire(routing_key: &str, body: &str) -> Wire {
        Wire { routing_key: routing_key.into(), payload: body.as_bytes().to_vec(), headers: BTreeMap::new() }
    }

    async fn next(consumer: &mut BackendConsumer) -> Delivery {
        tokio::time::timeout(Duration::from_secs(5), consumer.deliveries.recv())
            .await
            .expect("a delivery within 5 s")
            .expect("an open consumer")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn consumers_of_one_queue_take_turns() {
        let backend = MemoryBackend::new(&["jobs"], 5);
        let mut first = backend.consume("jobs", 10).await.unwrap();
        let mut second = backend.consume("jobs", 10).await.unwrap();
        backend.publish(Route::Work, (0..4).map(|n| wire("jobs", &n.to_string())).collect()).await.unwrap();
        let bodies = |deliveries: [Delivery; 2]| deliveries.map(|d| String::from_utf8(d.payload).unwrap());
        assert_eq!(bodies([next(&mut first).await, next(&mut first).await]), ["0", "2"]);
        assert_eq!(bodies([next(&mut second).await, next(&mut second).await]), ["1", "3"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wait_queue_holds_a_message_for_exactly_its_step() {
        let backend = MemoryBackend::new(&["jobs"], 5);
        let mut consumer = backend.consume("jobs", 10).await.unwrap();
        let started = Instant::now();
        backend.publish(Route::Wait(250), vec![wire("jobs", "late")]).await.unwrap();
        assert_eq!(backend.queue_depth("jobs").await.unwrap(), 0, "still waiting");
        let delivery = next(&mut consumer).await;
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(250), "released after {waited:?}");
        assert!(waited < Duration::from_millis(400), "released after {waited:?}");
        assert_eq!(delivery.routing_key, "jobs");
        assert!(!delivery.redelivered, "a message out of a wait queue is new");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_wait_steps_and_queues_are_errors_and_unknown_routing_keys_are_dropped() {
        let backend = MemoryBackend::new(&["jobs"], 5);
        assert!(backend.publish(Route::Wait(333), vec![wire("jobs", "x")]).await.is_err());
        assert!(backend.consume("nope", 1).await.is_err());
        backend.publish(Route::Work, vec![wire("nope", "x")]).await.unwrap();
        assert_eq!(backend.queue_depth("jobs").await.unwrap(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_reach_subscribers_only() {
        let backend = MemoryBackend::new(&["jobs"], 5);
        backend.publish(Route::Events, vec![wire("rollout.started", "dropped")]).await.unwrap();
        let mut events = backend.subscribe_events();
        backend.publish(Route::Events, vec![wire("rollout.started", "seen")]).await.unwrap();
        let event = events.recv().await.unwrap();
        assert_eq!((event.routing_key.as_str(), event.payload.as_slice()), ("rollout.started", &b"seen"[..]));
        assert!(events.try_recv().is_err(), "the event published before subscribing is gone");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dead_letters_say_why_and_where_from() {
        let backend = MemoryBackend::new(&["jobs"], 0);
        let mut consumer = backend.consume("jobs", 10).await.unwrap();
        backend.publish(Route::Work, vec![wire("jobs", "rejected"), wire("jobs", "retried")]).await.unwrap();
        next(&mut consumer).await.dead_letter().await.unwrap();
        next(&mut consumer).await.requeue().await.unwrap();
        let held = backend.hold_dead_letters(10).await.unwrap();
        let reasons: Vec<_> = held.letters.iter().map(|l| l.headers[FIRST_DEATH_REASON_HEADER].as_str()).collect();
        assert_eq!(reasons, ["rejected", "delivery_limit"]);
        assert!(held.letters.iter().all(|l| l.headers[FIRST_DEATH_QUEUE_HEADER] == "jobs"));
        // Held letters are out of reach; removed, they are gone.
        assert!(backend.hold_dead_letters(10).await.unwrap().letters.is_empty());
        held.hold.remove().await.unwrap();
        assert!(backend.hold_dead_letters(10).await.unwrap().letters.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prefetch_zero_means_no_limit_and_close_ends_consumers() {
        let backend = MemoryBackend::new(&["jobs"], 5);
        backend.publish(Route::Work, (0..100).map(|n| wire("jobs", &n.to_string())).collect()).await.unwrap();
        let mut consumer = backend.consume("jobs", 0).await.unwrap();
        let mut held = Vec::new();
        for _ in 0..100 {
            held.push(next(&mut consumer).await);
        }
        backend.close().await;
        assert!(consumer.deliveries.recv().await.is_none(), "a closed connection ends its consumers");
        assert!(matches!(held.pop().unwrap().ack().await, Err(Error::Closed)));
        assert!(matches!(backend.consume("jobs", 1).await, Err(Error::Closed)));
        let other = backend.connect_another();
        assert_eq!(other.queue_depth("jobs").await.unwrap(), 100, "close returned every unacked delivery");
    }
}
