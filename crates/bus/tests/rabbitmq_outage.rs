//! The RabbitMQ backend rides out broker outages by itself: on a private
//! node (never the shared broker), `stop_app`/`start_app` and a full stop
//! and start of the node. While the broker is away the backend says it is
//! not healthy and publishing fails (the caller keeps its messages, as the
//! outbox does); afterwards publishing works again and the consumer, which
//! never ended, receives what was published after the outage.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetpatch_bus::private_broker::PrivateBroker;
use fleetpatch_bus::rabbitmq::{RabbitBackend, RabbitOptions};
use fleetpatch_bus::{Bus, Outgoing};

const QUEUE: &str = "jobs";

async fn blocking(f: impl FnOnce() + Send + 'static) {
    tokio::task::spawn_blocking(f).await.expect("broker control");
}

async fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < limit, "{what} did not happen within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

/// Publishes until the broker takes it; returns how long that took.
async fn publish_until_accepted(bus: &Bus, payload: Vec<u8>, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        match bus.publish(vec![Outgoing::work(QUEUE, payload.clone())]).await {
            Ok(()) => return started.elapsed(),
            Err(error) => {
                assert!(error.is_transient(), "an outage is a transient error: {error}");
                assert!(started.elapsed() < limit, "publishing did not recover within {limit:?}: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn receive(consumer: &mut fleetpatch_bus::Consumer, limit: Duration) -> Vec<u8> {
    let delivery = tokio::time::timeout(limit, consumer.next())
        .await
        .expect("a delivery within the limit")
        .expect("the consumer never ends because of an outage");
    let payload = delivery.payload.clone();
    delivery.ack().await.expect("ack");
    payload
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_reconnects_and_its_consumer_resubscribes_after_broker_outages() {
    let broker = Arc::new(PrivateBroker::start());
    let options = RabbitOptions { url: broker.url(), prefix: "outage".into(), delivery_limit: 5 };
    let backend = Arc::new(RabbitBackend::connect(&options, &[QUEUE]).await.expect("connect to the private broker"));
    let bus = Bus::new(backend.clone());
    let mut consumer = bus.consume(QUEUE, 10).await.expect("consume");
    bus.publish(vec![Outgoing::work(QUEUE, b"before".to_vec())]).await.expect("publish");
    assert_eq!(receive(&mut consumer, Duration::from_secs(10)).await, b"before");

    for (fault, stop, start) in [
        (
            "stop_app/start_app",
            Box::new({
                let broker = broker.clone();
                move || broker.stop_app()
            }) as Box<dyn FnOnce() + Send>,
            Box::new({
                let broker = broker.clone();
                move || broker.start_app()
            }) as Box<dyn FnOnce() + Send>,
        ),
        (
            "full stop/start",
            Box::new({
                let broker = broker.clone();
                move || broker.stop()
            }),
            Box::new({
                let broker = broker.clone();
                move || broker.start_again()
            }),
        ),
    ] {
        blocking(stop).await;
        let noticed =
            wait_until("the backend noticing the outage", Duration::from_secs(10), || !bus.is_healthy()).await;
        let refused = bus.publish(vec![Outgoing::work(QUEUE, b"lost?".to_vec())]).await;
        assert!(refused.is_err(), "{fault}: publishing while the broker is away fails (the outbox keeps it)");
        let up = Instant::now();
        blocking(start).await;
        let started_in = up.elapsed();
        let publish_back = publish_until_accepted(&bus, fault.as_bytes().to_vec(), Duration::from_secs(60)).await;
        assert!(bus.is_healthy(), "{fault}: healthy again after reconnecting");
        let delivered = receive(&mut consumer, Duration::from_secs(60)).await;
        assert_eq!(delivered, fault.as_bytes(), "{fault}: the consumer re-subscribed and got the new message");
        println!(
            "{fault}: outage noticed in {} ms; broker back in {} ms; publishing again {} ms after that; \
             consumer delivered {} ms after that",
            noticed.as_millis(),
            started_in.as_millis(),
            publish_back.as_millis(),
            (up.elapsed() - started_in).as_millis(),
        );
    }
    consumer.cancel();
    bus.close().await;
}
