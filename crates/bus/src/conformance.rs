//! The bus conformance suite: the contract of the module docs of this crate,
//! written once as tests and run against every [`Backend`] (feature
//! `test-support`).
//!
//! A backend's test file implements [`TestBroker`] (an isolated namespace on
//! one broker, to which it can open several connections) and instantiates
//! every test with [`bus_conformance_suite!`](crate::bus_conformance_suite):
//!
//! ```ignore
//! async fn make_broker(queues: &'static [&'static str], delivery_limit: u32) -> MyTestBroker { ... }
//! fleetpatch_bus::bus_conformance_suite!(make_broker);
//! ```
//!
//! Every test goes through [`Bus`] and [`crate::Consumer`], the code the
//! services run, so the shared logic (wait-step routing, re-delaying early
//! arrivals, trace headers, dead-letter replay) is checked on each backend.
//! A test never skips: a broker that cannot be reached fails it.

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use opentelemetry::trace::TraceContextExt;

use crate::{now_unix_ms, parent_context, Backend, Bus, Consumer, Delivery, Outgoing, DUE_TOLERANCE_MS};
use crate::{ARRIVAL_LEAD_MS, HOLD_BELOW_MS};
use crate::{DUE_AT_HEADER, ROUTING_KEY_HEADER};

/// The work queues (routing keys) every test broker declares.
pub const QUEUES: &[&str] = &["alpha", "beta"];
/// The delivery limit every test broker is created with.
pub const DELIVERY_LIMIT: u32 = 3;
/// How late a delayed message may arrive; its earliest arrival is its due
/// time minus [`DUE_TOLERANCE_MS`].
pub const MAX_LATENESS_MS: i64 = 1_000;

const ALPHA: &str = QUEUES[0];
const BETA: &str = QUEUES[1];
/// How long an expected delivery may take.
const EXPECT_WITHIN: Duration = Duration::from_secs(10);
/// How long "nothing more arrives" is watched.
const QUIET_FOR: Duration = Duration::from_millis(400);

/// One isolated namespace on a broker, created for one test.
#[async_trait::async_trait]
pub trait TestBroker: Send + Sync {
    /// A new connection to this namespace (another process, as far as the
    /// broker can tell). Panics with a clear message when the broker is not
    /// reachable: the suite never skips.
    async fn connect(&self) -> Arc<dyn Backend>;
    /// Removes what the test left on the broker; runs even when the test failed.
    async fn tear_down(&self);
}

/// Generates one `#[tokio::test]` per conformance test. `$make` is an async
/// fn `(queues: &'static [&'static str], delivery_limit: u32) -> impl TestBroker`.
#[macro_export]
macro_rules! bus_conformance_suite {
    ($make:path) => {
        $crate::bus_conformance_suite!(@tests $make;
            round_trip_keeps_payload_headers_and_trace_context,
            one_publish_delivers_every_message_once_in_order,
            prefetch_bounds_unacked_deliveries,
            unacked_deliveries_are_redelivered_when_their_connection_closes,
            cancelled_consumer_returns_the_deliveries_it_dropped,
            dropped_consumer_returns_its_unacked_deliveries,
            requeue_puts_the_message_first_and_counts_the_delivery,
            rejected_messages_are_dead_lettered_and_replayed_to_their_queue,
            a_replay_whose_publish_fails_leaves_the_dead_letters_in_place,
            delivery_limit_dead_letters_a_message,
            delayed_message_is_not_early_and_bounded_late,
            multi_hop_delay_is_not_early_and_bounded_late,
            short_delays_never_wait_behind_long_ones,
            batches_hold_due_messages_and_re_delay_early_ones,
            short_remainders_are_held_not_rounded_up_to_a_step,
            the_last_hop_lands_early_by_the_lead,
            a_held_message_is_redelivered_when_its_consumer_goes_away,
            queue_depth_counts_ready_messages,
            events_are_accepted_and_close_makes_the_bus_unhealthy,
        );
    };
    (@tests $make:path; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                let broker = $make($crate::conformance::QUEUES, $crate::conformance::DELIVERY_LIMIT).await;
                $crate::conformance::run(&broker, $crate::conformance::$test(&broker)).await;
            }
        )*
    };
}

/// Runs `test`, then tears the broker down, then reports the test's panic if any.
pub async fn run(broker: &dyn TestBroker, test: impl Future<Output = ()>) {
    let outcome = AssertUnwindSafe(test).catch_unwind().await;
    broker.tear_down().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn connect_bus(broker: &dyn TestBroker) -> Bus {
    Bus::new(broker.connect().await)
}

async fn consume(bus: &Bus, queue: &str, prefetch: u16) -> Consumer {
    bus.consume(queue, prefetch).await.unwrap_or_else(|error| panic!("cannot consume {queue:?}: {error}"))
}

async fn publish(bus: &Bus, messages: Vec<Outgoing>) {
    bus.publish(messages).await.unwrap_or_else(|error| panic!("cannot publish: {error}"));
}

async fn expect_next(consumer: &mut Consumer, what: &str) -> Delivery {
    match tokio::time::timeout(EXPECT_WITHIN, consumer.next()).await {
        Ok(Some(delivery)) => delivery,
        Ok(None) => panic!("the consumer ended while waiting for {what}"),
        Err(_) => panic!("{what} did not arrive within {EXPECT_WITHIN:?}"),
    }
}

async fn expect_quiet(consumer: &mut Consumer, why: &str) {
    if let Ok(Some(delivery)) = tokio::time::timeout(QUIET_FOR, consumer.next()).await {
        panic!("{why}, but got {:?} ({delivery:?})", text(&delivery));
    }
}

async fn ack(delivery: Delivery) {
    delivery.ack().await.unwrap_or_else(|error| panic!("cannot ack: {error}"));
}

fn text(delivery: &Delivery) -> String {
    String::from_utf8_lossy(&delivery.payload).into_owned()
}

fn message(queue: &str, body: &str) -> Outgoing {
    Outgoing::work(queue, body.as_bytes().to_vec())
}

/// Waits until `check` returns `Some`, or panics after [`EXPECT_WITHIN`].
async fn eventually<T, F: Future<Output = Option<T>>>(what: &str, mut check: impl FnMut() -> F) -> T {
    let deadline = tokio::time::Instant::now() + EXPECT_WITHIN;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what} did not happen within {EXPECT_WITHIN:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for_depth(bus: &Bus, queue: &str, depth: u64) {
    eventually(&format!("queue {queue:?} reaching depth {depth}"), || async {
        let now = bus.queue_depth(queue).await.unwrap_or_else(|error| panic!("cannot read the depth: {error}"));
        (now == depth).then_some(())
    })
    .await
}

/// Replays dead letters until `count` came back (dead-lettering may be asynchronous).
async fn replay_dead_letters(bus: &Bus, count: usize) {
    let mut replayed = 0;
    eventually(&format!("{count} dead letters to replay"), || {
        let bus = bus.clone();
        async move {
            replayed += bus.replay_dead_letters(10).await.unwrap_or_else(|error| panic!("cannot replay: {error}"));
            assert!(replayed <= count, "replayed {replayed} dead letters, expected {count}");
            (replayed == count).then_some(())
        }
    })
    .await
}

/// Publishes, consumes and acks a message; headers (including the W3C trace
/// context) arrive as sent, and an acked message is gone for good.
pub async fn round_trip_keeps_payload_headers_and_trace_context(broker: &dyn TestBroker) {
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let traceparent = format!("00-{trace_id}-b7ad6b7169203331-01");
    let bus = connect_bus(broker).await;
    let mut outgoing = message(ALPHA, "hello");
    outgoing.headers.insert("x-test-target".into(), "host-1.example".into());
    outgoing.headers.insert("traceparent".into(), traceparent.clone());
    // Keeps the context the message carries (there is no current span here).
    let outgoing = outgoing.with_trace_context();
    publish(&bus, vec![outgoing]).await;

    let mut consumer = consume(&bus, ALPHA, 4).await;
    let delivery = expect_next(&mut consumer, "the message").await;
    assert_eq!(text(&delivery), "hello");
    assert_eq!(delivery.routing_key, ALPHA);
    assert_eq!(delivery.headers.get("x-test-target").map(String::as_str), Some("host-1.example"));
    assert_eq!(delivery.headers.get("traceparent"), Some(&traceparent));
    assert_eq!(delivery.headers.get(ROUTING_KEY_HEADER).map(String::as_str), Some(ALPHA));
    assert!(!delivery.headers.contains_key(DUE_AT_HEADER), "an immediate message carries no due time");
    assert!(!delivery.redelivered, "a first delivery is not redelivered");
    assert_eq!(delivery.delivery_count, 0);
    let parent = parent_context(&delivery.headers);
    assert_eq!(parent.span().span_context().trace_id().to_string(), trace_id);
    assert!(parent.span().span_context().is_remote());
    ack(delivery).await;
    expect_quiet(&mut consumer, "an acked message is not delivered again").await;

    // Not even to another connection after this one closed.
    drop(consumer);
    bus.close().await;
    let other = connect_bus(broker).await;
    let mut consumer = consume(&other, ALPHA, 4).await;
    expect_quiet(&mut consumer, "an acked message is gone").await;
    wait_for_depth(&other, ALPHA, 0).await;
}

/// The messages of one publish call arrive each once, in the order given
/// (the outbox relay publishes up to 500 in one call, in commit order),
/// with what each carried.
pub async fn one_publish_delivers_every_message_once_in_order(broker: &dyn TestBroker) {
    const COUNT: usize = 300;
    let bus = connect_bus(broker).await;
    let outgoing = (0..COUNT)
        .map(|n| {
            let mut outgoing = message(ALPHA, &format!("m{n:03}"));
            outgoing.headers.insert("x-test-n".into(), n.to_string());
            outgoing
        })
        .collect();
    publish(&bus, outgoing).await;
    wait_for_depth(&bus, ALPHA, COUNT as u64).await;
    let mut consumer = consume(&bus, ALPHA, 64).await;
    for n in 0..COUNT {
        let delivery = expect_next(&mut consumer, &format!("message {n} of {COUNT}")).await;
        assert_eq!(text(&delivery), format!("m{n:03}"), "message {n} arrives in its place");
        assert_eq!(delivery.headers.get("x-test-n"), Some(&n.to_string()), "message {n} keeps its headers");
        ack(delivery).await;
    }
    expect_quiet(&mut consumer, "each message arrives once").await;
}

/// A consumer never holds more than `prefetch` unacked deliveries.
pub async fn prefetch_bounds_unacked_deliveries(broker: &dyn TestBroker) {
    let bus = connect_bus(broker).await;
    publish(&bus, (0..5).map(|n| message(ALPHA, &format!("m{n}"))).collect()).await;
    let mut consumer = consume(&bus, ALPHA, 2).await;
    let first = expect_next(&mut consumer, "the 1st message").await;
    let second = expect_next(&mut consumer, "the 2nd message").await;
    assert_eq!((text(&first), text(&second)), ("m0".into(), "m1".into()), "work queues are FIFO");
    expect_quiet(&mut consumer, "prefetch 2 allows two unacked deliveries").await;

    ack(first).await;
    let third = expect_next(&mut consumer, "the 3rd message, once one was acked").await;
    assert_eq!(text(&third), "m2");
    expect_quiet(&mut consumer, "still two unacked deliveries").await;

    // A dropped delivery stays unacked while its consumer lives: it keeps its slot.
    drop(second);
    expect_quiet(&mut consumer, "a dropped delivery is unacked, and holds its prefetch slot").await;
    ack(third).await;
    let fourth = expect_next(&mut consumer, "the 4th message").await;
    assert_eq!(text(&fourth), "m3");
    wait_for_depth(&bus, ALPHA, 1).await;
    expect_quiet(&mut consumer, "the dropped m1 and m3 fill the prefetch window").await;
    ack(fourth).await;
    let fifth = expect_next(&mut consumer, "the 5th message").await;
    assert_eq!(text(&fifth), "m4");
    ack(fifth).await;
}

/// Deliveries a connection held unacked (handled or not) are redelivered,
/// flagged, to another connection once it closes; acked ones are not.
pub async fn unacked_deliveries_are_redelivered_when_their_connection_closes(broker: &dyn TestBroker) {
    let dying = connect_bus(broker).await;
    let surviving = connect_bus(broker).await;
    publish(&surviving, (0..3).map(|n| message(ALPHA, &format!("m{n}"))).collect()).await;

    let mut consumer = consume(&dying, ALPHA, 5).await;
    let m0 = expect_next(&mut consumer, "m0").await;
    let m1 = expect_next(&mut consumer, "m1").await;
    let m2 = expect_next(&mut consumer, "m2").await;
    ack(m0).await;
    drop(m2); // dropped without ack: stays unacked while the consumer lives
    expect_quiet(&mut consumer, "nothing else is queued").await;
    dying.close().await;
    assert!(!dying.is_healthy());

    let mut consumer = consume(&surviving, ALPHA, 5).await;
    let mut redelivered = Vec::new();
    for _ in 0..2 {
        let delivery = expect_next(&mut consumer, "a redelivered message").await;
        assert!(delivery.redelivered, "{:?} must be flagged as redelivered", text(&delivery));
        assert_eq!(delivery.delivery_count, 1, "{:?} was delivered once before", text(&delivery));
        redelivered.push(text(&delivery));
        ack(delivery).await;
    }
    redelivered.sort();
    assert_eq!(redelivered, ["m1", "m2"]);
    expect_quiet(&mut consumer, "the acked m0 is not redelivered").await;
    drop(m1);
}

/// After `cancel`, no new deliveries come; those received can still be
/// acked, and those dropped unacked go back to the queue.
pub async fn cancelled_consumer_returns_the_deliveries_it_dropped(broker: &dyn TestBroker) {
    let bus = connect_bus(broker).await;
    publish(&bus, (0..3).map(|n| message(ALPHA, &format!("m{n}"))).collect()).await;
    let mut consumer = consume(&bus, ALPHA, 2).await;
    let m0 = expect_next(&mut consumer, "m0").await;
    let m1 = expect_next(&mut consumer, "m1").await;
    consumer.cancel();
    let ended = tokio::time::timeout(EXPECT_WITHIN, consumer.next()).await;
    assert!(matches!(ended, Ok(None)), "a cancelled consumer ends once drained");
    ack(m0).await;
    drop(m1);
    drop(consumer);

    let mut consumer = consume(&bus, ALPHA, 5).await;
    let again = expect_next(&mut consumer, "m1, dropped after cancel").await;
    assert_eq!(text(&again), "m1");
    assert!(again.redelivered);
    let next = expect_next(&mut consumer, "m2, never delivered").await;
    assert_eq!(text(&next), "m2");
    assert!(!next.redelivered);
    ack(again).await;
    ack(next).await;
    expect_quiet(&mut consumer, "the acked m0 is gone").await;
}

/// Dropping a consumer (and the deliveries it handed out) returns its
/// unacked deliveries, without closing the connection.
pub async fn dropped_consumer_returns_its_unacked_deliveries(broker: &dyn TestBroker) {
    let bus = connect_bus(broker).await;
    publish(&bus, vec![message(ALPHA, "acked"), message(ALPHA, "dropped"), message(ALPHA, "buffered")]).await;
    let mut consumer = consume(&bus, ALPHA, 3).await;
    ack(expect_next(&mut consumer, "the 1st message").await).await;
    let dropped = expect_next(&mut consumer, "the 2nd message").await;
    drop(dropped);
    // The 3rd is still in the consumer's buffer when it is dropped.
    wait_for_depth(&bus, ALPHA, 0).await;
    drop(consumer);

    let mut consumer = consume(&bus, ALPHA, 3).await;
    let mut returned = Vec::new();
    for _ in 0..2 {
        let delivery = expect_next(&mut consumer, "a returned message").await;
        assert!(delivery.redelivered, "{:?} must be flagged as redelivered", text(&delivery));
        returned.push(text(&delivery));
        ack(delivery).await;
    }
    returned.sort();
    assert_eq!(returned, ["buffered", "dropped"]);
    expect_quiet(&mut consumer, "the acked message is gone").await;
    assert!(bus.is_healthy());
}

/// `requeue` returns the message to the head of its queue, flagged, with
/// its delivery count increased.
pub async fn requeue_puts_the_message_first_and_counts_the_delivery(broker: &dyn TestBroker) {
    let bus = connect_bus(broker).await;
    publish(&bus, vec![message(ALPHA, "first"), message(ALPHA, "second")]).await;
    let mut consumer = consume(&bus, ALPHA, 1).await;
    for expected_count in 0..DELIVERY_LIMIT {
        let delivery = expect_next(&mut consumer, "the first message").await;
        assert_eq!(text(&delivery), "first", "a requeued message goes back to the head of its queue");
        assert_eq!(delivery.delivery_count, expected_count);
        assert_eq!(delivery.redelivered, expected_count > 0);
        delivery.requeue().await.expect("requeue");
    }
    let delivery = expect_next(&mut consumer, "the first message, a last time").await;
    assert_eq!((text(&delivery).as_str(), delivery.delivery_count), ("first", DELIVERY_LIMIT));
    ack(delivery).await;
    let delivery = expect_next(&mut consumer, "the second message").await;
    assert_eq!((text(&delivery).as_str(), delivery.delivery_count, delivery.redelivered), ("second", 0, false));
    ack(delivery).await;
}

/// A rejected message goes to the dead letters, and a replay brings each
/// one back to its own work queue as a new message with its headers.
pub async fn rejected_messages_are_dead_lettered_and_replayed_to_their_queue(broker: &dyn TestBroker) {
    let bus = connect_bus(broker).await;
    let mut to_alpha = message(ALPHA, "for alpha");
    to_alpha.headers.insert("x-test-target".into(), "host-a".into());
    publish(&bus, vec![to_alpha, message(BETA, "for beta")]).await;
    for queue in [ALPHA, BETA] {
        let mut consumer = consume(&bus, queue, 1).await;
        let delivery = expect_next(&mut consumer, &format!("the message for {queue}")).await;
        delivery.dead_letter().await.expect("reject");
        expect_quiet(&mut consumer, "a rejected message is not redelivered").await;
    }
    wait_for_depth(&bus, ALPHA, 0).await;
    wait_for_depth(&bus, crate::DEAD_LETTER_QUEUE, 2).await;
    // An operator looks at them: their work queue and why they died; they
    // stay, and each look right after another sees them all again.
    for _ in 0..10 {
        let letters = bus.dead_letters(10).await.expect("look at the dead letters");
        let mut seen: Vec<(&str, Option<&str>, usize)> =
            letters.iter().map(|l| (l.routing_key.as_str(), l.reason.as_deref(), l.bytes)).collect();
        seen.sort();
        assert_eq!(seen, vec![(ALPHA, Some("rejected"), 9), (BETA, Some("rejected"), 8)], "{letters:?}");
        assert_eq!(letters.iter().find(|l| l.routing_key == ALPHA).unwrap().headers["x-test-target"], "host-a");
    }
    assert_eq!(bus.dead_letters(1).await.expect("look").len(), 1, "the limit holds");

    replay_dead_letters(&bus, 2).await;
    wait_for_depth(&bus, crate::DEAD_LETTER_QUEUE, 0).await;
    let mut alpha = consume(&bus, ALPHA, 4).await;
    let delivery = expect_next(&mut alpha, "the replayed message for alpha").await;
    assert_eq!(text(&delivery), "for alpha");
    assert_eq!(delivery.headers.get("x-test-target").map(String::as_str), Some("host-a"));
    assert!(!delivery.redelivered, "a replayed dead letter is a new message");
    assert_eq!(delivery.delivery_count, 0);
    ack(delivery).await;
    expect_quiet(&mut alpha, "only alpha's message comes back to alpha").await;
    let mut beta = consume(&bus, BETA, 4).await;
    let delivery = expect_next(&mut beta, "the replayed message for beta").await;
    assert_eq!(text(&delivery), "for beta");
    ack(delivery).await;
    assert_eq!(bus.replay_dead_letters(10).await.expect("replay"), 0, "nothing left to replay");
}

/// The broker's own backend, except that publishing fails (a broker that
/// refuses or loses the connection between taking the letters and
/// publishing them).
struct PublishFails(Arc<dyn Backend>);

#[async_trait::async_trait]
impl Backend for PublishFails {
    async fn publish(&self, _: crate::Route, _: Vec<crate::Wire>) -> crate::Result<()> {
        Err(crate::Error::Closed)
    }
    async fn consume(&self, queue: &str, prefetch: u16) -> crate::Result<crate::BackendConsumer> {
        self.0.consume(queue, prefetch).await
    }
    async fn hold_dead_letters(&self, limit: usize) -> crate::Result<crate::HeldDeadLetters> {
        self.0.hold_dead_letters(limit).await
    }
    async fn queue_depth(&self, queue: &str) -> crate::Result<u64> {
        self.0.queue_depth(queue).await
    }
    fn is_healthy(&self) -> bool {
        self.0.is_healthy()
    }
    async fn close(&self) {
        self.0.close().await
    }
}

/// A replay takes the letters off the dead-letter queue only once they are
/// published: when the publish fails, every letter is still there, in its
/// order, and a later replay brings each back once.
pub async fn a_replay_whose_publish_fails_leaves_the_dead_letters_in_place(broker: &dyn TestBroker) {
    let bus = connect_bus(broker).await;
    publish(&bus, vec![message(ALPHA, "one"), message(ALPHA, "two")]).await;
    let mut consumer = consume(&bus, ALPHA, 1).await;
    for what in ["one", "two"] {
        let delivery = expect_next(&mut consumer, what).await;
        delivery.dead_letter().await.expect("reject");
    }
    drop(consumer);
    wait_for_depth(&bus, crate::DEAD_LETTER_QUEUE, 2).await;

    let failing = Bus::new(Arc::new(PublishFails(broker.connect().await)));
    let error = failing.replay_dead_letters(10).await.expect_err("the publish fails");
    assert!(matches!(error, crate::Error::Closed), "{error}");
    let sizes: Vec<usize> = bus.dead_letters(10).await.expect("look").iter().map(|l| l.bytes).collect();
    assert_eq!(sizes, vec![3, 3], "both letters are back");

    replay_dead_letters(&bus, 2).await;
    wait_for_depth(&bus, crate::DEAD_LETTER_QUEUE, 0).await;
    let mut consumer = consume(&bus, ALPHA, 4).await;
    let mut texts = Vec::new();
    for what in ["a replayed letter", "the other replayed letter"] {
        let delivery = expect_next(&mut consumer, what).await;
        texts.push(text(&delivery));
        ack(delivery).await;
    }
    texts.sort();
    assert_eq!(texts, ["one", "two"]);
    expect_quiet(&mut consumer, "each letter comes back once").await;
}

/// A message returned more than [`DELIVERY_LIMIT`] times is dead-lettered:
/// it is delivered `DELIVERY_LIMIT + 1` times, then replayable.
pub async fn delivery_limit_dead_letters_a_message(broker: &dyn TestBroker) {
    let bus = connect_bus(broker).await;
    publish(&bus, vec![message(ALPHA, "poison")]).await;
    let mut consumer = consume(&bus, ALPHA, 1).await;
    for delivery_count in 0..=DELIVERY_LIMIT {
        let delivery = expect_next(&mut consumer, &format!("delivery {}", delivery_count + 1)).await;
        assert_eq!((text(&delivery).as_str(), delivery.delivery_count), ("poison", delivery_count));
        delivery.requeue().await.expect("requeue");
    }
    expect_quiet(&mut consumer, "a message over its delivery limit is dead-lettered, not redelivered").await;
    replay_dead_letters(&bus, 1).await;
    let delivery = expect_next(&mut consumer, "the replayed message").await;
    assert_eq!((text(&delivery).as_str(), delivery.delivery_count, delivery.redelivered), ("poison", 0, false));
    ack(delivery).await;
}

/// Publishes one message per delay (in this order, in one call) and checks
/// every arrival against its due time; returns the lateness (ms) per delay.
async fn deliver_delayed(broker: &dyn TestBroker, delays_ms: &[i64]) -> Vec<(i64, i64)> {
    let bus = connect_bus(broker).await;
    let mut consumer = consume(&bus, BETA, 32).await;
    let published_at = now_unix_ms();
    let messages =
        delays_ms.iter().map(|delay| message(BETA, &delay.to_string()).due_at(published_at + delay)).collect();
    publish(&bus, messages).await;
    let mut lateness = Vec::new();
    for _ in delays_ms {
        let delivery = expect_next(&mut consumer, "a delayed message").await;
        let arrived = now_unix_ms();
        let delay: i64 = text(&delivery).parse().expect("the payload is the delay");
        let due = published_at + delay;
        assert_eq!(delivery.due_at_unix_ms(), Some(due), "the due time travels with the message");
        assert!(arrived >= due - DUE_TOLERANCE_MS, "a message delayed {delay} ms arrived {} ms early", due - arrived);
        assert!(
            arrived <= due + MAX_LATENESS_MS,
            "a message delayed {delay} ms arrived {} ms late (at most {MAX_LATENESS_MS} ms allowed)",
            arrived - due
        );
        lateness.push((delay, arrived - due));
        ack(delivery).await;
    }
    lateness.sort_unstable();
    println!("delay lateness (delay ms, late ms): {lateness:?}");
    lateness
}

/// 600 ms: one 500 ms step, then a 250 ms one for the remainder.
pub async fn delayed_message_is_not_early_and_bounded_late(broker: &dyn TestBroker) {
    deliver_delayed(broker, &[600]).await;
}

/// 2.7 s: 2 s + 500 ms + 250 ms hops, re-delayed by the consumer in between.
pub async fn multi_hop_delay_is_not_early_and_bounded_late(broker: &dyn TestBroker) {
    deliver_delayed(broker, &[2_700]).await;
}

/// Each step has its own wait queue: short delays never queue behind long
/// ones published before them.
pub async fn short_delays_never_wait_behind_long_ones(broker: &dyn TestBroker) {
    let lateness = deliver_delayed(broker, &[3_000, 2_200, 1_700, 1_000, 600, 400, 250, 100]).await;
    assert_eq!(lateness.len(), 8);
}

/// `next_batch` returns what arrives together, due messages only: the
/// early hops of multi-hop delays are re-delayed (not early, bounded late).
pub async fn batches_hold_due_messages_and_re_delay_early_ones(broker: &dyn TestBroker) {
    let bus = connect_bus(broker).await;
    let mut consumer = consume(&bus, BETA, 32).await;
    let published_at = now_unix_ms();
    let mut messages: Vec<Outgoing> = (0..5).map(|n| message(BETA, &format!("now-{n}"))).collect();
    messages.extend([1_700, 2_700].map(|delay| message(BETA, &delay.to_string()).due_at(published_at + delay)));
    publish(&bus, messages).await;
    let mut immediate = Vec::new();
    let mut delayed = Vec::new();
    let deadline = tokio::time::Instant::now() + EXPECT_WITHIN;
    while immediate.len() + delayed.len() < 7 {
        let batch = tokio::time::timeout_at(deadline, consumer.next_batch(10, Duration::from_millis(50)))
            .await
            .expect("the batches arrive in time")
            .expect("the consumer is open");
        assert!(batch.len() <= 10);
        for delivery in batch {
            let body = text(&delivery);
            match delivery.due_at_unix_ms() {
                None => immediate.push(body),
                Some(due) => {
                    let arrived = now_unix_ms();
                    assert!(arrived >= due - DUE_TOLERANCE_MS, "{body} arrived {} ms early", due - arrived);
                    assert!(arrived <= due + MAX_LATENESS_MS, "{body} arrived {} ms late", arrived - due);
                    delayed.push(body);
                }
            }
            ack(delivery).await;
        }
    }
    immediate.sort();
    assert_eq!(immediate, (0..5).map(|n| format!("now-{n}")).collect::<Vec<_>>());
    assert_eq!(delayed, vec!["1700".to_owned(), "2700".to_owned()]);
}

/// The last stretch of a delay is held by the consumer rather than rounded up
/// to a whole step: a 40 ms delay, 180 ms, and 1,040 ms (a 500 ms hop, then
/// 540 ms held) all arrive within 150 ms of due (a 250 ms wait queue would
/// make a 40 ms delay at least 210 ms late).
pub async fn short_remainders_are_held_not_rounded_up_to_a_step(broker: &dyn TestBroker) {
    let lateness = deliver_delayed(broker, &[40, 180, 1_040]).await;
    for (delay, late) in lateness {
        assert!(late <= 150, "a message delayed {delay} ms arrived {late} ms late: its last stretch was rounded up");
    }
    // The same through `next_batch`.
    let bus = connect_bus(broker).await;
    let mut consumer = consume(&bus, ALPHA, 8).await;
    let published_at = now_unix_ms();
    publish(&bus, [60, 120].map(|delay| message(ALPHA, &delay.to_string()).due_at(published_at + delay)).to_vec())
        .await;
    let mut arrived = Vec::new();
    let deadline = tokio::time::Instant::now() + EXPECT_WITHIN;
    while arrived.len() < 2 {
        let batch = tokio::time::timeout_at(deadline, consumer.next_batch(8, Duration::from_millis(5)))
            .await
            .expect("the batches arrive in time")
            .expect("the consumer is open");
        for delivery in batch {
            let due = delivery.due_at_unix_ms().expect("the due time travels with the message");
            let late = now_unix_ms() - due;
            assert!(late >= -DUE_TOLERANCE_MS, "{} arrived {} ms early", text(&delivery), -late);
            assert!(late <= 150, "{} arrived {late} ms late", text(&delivery));
            arrived.push(text(&delivery));
            ack(delivery).await;
        }
    }
    assert_eq!(arrived, ["60", "120"], "held messages come out in due order");
}

/// The last hop of a delay lands [`ARRIVAL_LEAD_MS`] before the due time, so
/// a broker that dead-letters it late (as RabbitMQ does under load) still
/// leaves the consumer time to hold it: watched on the wire, below the
/// consumer, a message due in 1,000 ms arrives about 500 ms early.
pub async fn the_last_hop_lands_early_by_the_lead(broker: &dyn TestBroker) {
    let bus = connect_bus(broker).await;
    let backend = broker.connect().await;
    let mut raw = backend.consume(ALPHA, 4).await.expect("a raw consumer of the work queue");
    let published_at = now_unix_ms();
    let due = published_at + 1_000;
    publish(&bus, vec![message(ALPHA, "due in 1 s").due_at(due)]).await;
    let delivery = tokio::time::timeout(EXPECT_WITHIN, raw.deliveries.recv())
        .await
        .expect("the hop lands in time")
        .expect("the raw consumer is open");
    let early = due - now_unix_ms();
    // Up to 400 ms of broker lateness is allowed (a busy test machine); a hop
    // aimed at the due time itself lands at it or after (early ≤ 15 ms).
    assert!(
        (ARRIVAL_LEAD_MS - 400..HOLD_BELOW_MS).contains(&early),
        "the last hop landed {early} ms before due, not about {ARRIVAL_LEAD_MS} ms"
    );
    assert_eq!(delivery.due_at_unix_ms(), Some(due), "the due time travels with the hop");
    ack(delivery).await;
}

/// A message the consumer holds until due is an unacked delivery: when that
/// consumer goes away, the broker delivers it again (to another consumer,
/// when due), so holding loses nothing.
pub async fn a_held_message_is_redelivered_when_its_consumer_goes_away(broker: &dyn TestBroker) {
    let bus = connect_bus(broker).await;
    let published_at = now_unix_ms();
    publish(&bus, vec![message(ALPHA, "now"), message(ALPHA, "held").due_at(published_at + 200)]).await;
    let mut first = consume(&bus, ALPHA, 4).await;
    ack(expect_next(&mut first, "the undelayed message").await).await;
    // `next` takes the delayed one and holds it; give up on it before it is due.
    let waited = tokio::time::timeout(Duration::from_millis(50), first.next()).await;
    assert!(waited.is_err(), "a message due in 200 ms was handed out after {} ms", now_unix_ms() - published_at);
    drop(first);
    let mut second = consume(&bus, ALPHA, 4).await;
    let delivery = expect_next(&mut second, "the held message, redelivered").await;
    assert_eq!(text(&delivery), "held");
    assert!(now_unix_ms() >= published_at + 200 - DUE_TOLERANCE_MS, "redelivered, and still not early");
    ack(delivery).await;
    expect_quiet(&mut second, "nothing else").await;
}

/// The depth of a work queue counts its ready messages, not unacked ones.
pub async fn queue_depth_counts_ready_messages(broker: &dyn TestBroker) {
    let bus = connect_bus(broker).await;
    assert_eq!(bus.queue_depth(ALPHA).await.expect("depth"), 0);
    publish(&bus, (0..3).map(|n| message(ALPHA, &format!("m{n}"))).collect()).await;
    wait_for_depth(&bus, ALPHA, 3).await;
    assert_eq!(bus.queue_depth(BETA).await.expect("depth"), 0);
    let mut consumer = consume(&bus, ALPHA, 1).await;
    let delivery = expect_next(&mut consumer, "m0").await;
    wait_for_depth(&bus, ALPHA, 2).await;
    delivery.requeue().await.expect("requeue");
    let delivery = expect_next(&mut consumer, "m0 again").await;
    ack(delivery).await;
    let delivery = expect_next(&mut consumer, "m1").await;
    wait_for_depth(&bus, ALPHA, 1).await;
    ack(delivery).await;
    assert!(bus.queue_depth("no-such-queue").await.is_err(), "an unknown queue is an error");
}

/// Events are accepted without subscribers; a closed bus is unhealthy and
/// refuses to publish.
pub async fn events_are_accepted_and_close_makes_the_bus_unhealthy(broker: &dyn TestBroker) {
    let bus = connect_bus(broker).await;
    assert!(bus.is_healthy());
    let ready = bus.readiness_check();
    assert!(ready().await, "an open bus is ready");
    let mut headers = BTreeMap::new();
    headers.insert("x-test".to_owned(), "1".to_owned());
    let mut event = Outgoing::event("rollout.started".into(), b"{}".to_vec());
    event.headers = headers;
    publish(&bus, vec![event]).await;
    bus.close().await;
    assert!(!bus.is_healthy(), "a closed bus is not healthy");
    assert!(!ready().await, "a service whose bus is closed is not ready");
    assert!(bus.publish(vec![message(ALPHA, "late")]).await.is_err(), "a closed bus refuses to publish");
    let other = connect_bus(broker).await;
    assert!(other.is_healthy(), "closing one connection leaves the others");
    wait_for_depth(&other, ALPHA, 0).await;
}
