//! The broker's own ceiling, for `fleetpatch bench`: how many messages per
//! second one publisher with confirms and one consumer with acks move
//! through one quorum queue, with the plain lapin client and none of this
//! crate's routing. The pipeline's throughput is reported as a fraction of it.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;

use crate::rabbitmq::{broker, hand_over_all, open_connection, RabbitOptions};
use crate::{Error, Result};

/// What the broker sustained.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BrokerCeiling {
    pub messages: usize,
    pub payload_bytes: usize,
    pub seconds: f64,
    /// Messages published (confirmed) and consumed (acked) per second.
    pub per_second: f64,
}

/// Publishes `messages` messages of `payload_bytes` bytes into a private
/// quorum queue (`<prefix>.ceiling`) with confirms, `window` in flight at
/// a time, while a consumer on its own connection acks them one by one
/// with the same prefetch; the queue is deleted afterwards.
pub async fn broker_ceiling(
    options: &RabbitOptions,
    messages: usize,
    payload_bytes: usize,
    window: usize,
) -> Result<BrokerCeiling> {
    let window = window.max(1);
    let queue = format!("{}.ceiling", options.prefix);
    let publisher = open_connection(&options.url, "fleetpatch-bench-publisher").await?;
    let consumer_connection = open_connection(&options.url, "fleetpatch-bench-consumer").await?;
    let channel = publisher.create_channel().await.map_err(broker("opening a channel"))?;
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("quorum")));
    channel
        .queue_declare(&queue, QueueDeclareOptions { durable: true, ..Default::default() }, arguments)
        .await
        .map_err(broker("declaring the ceiling queue"))?;
    channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(broker("enabling publisher confirms"))?;

    let consumer_channel = consumer_connection.create_channel().await.map_err(broker("opening a channel"))?;
    consumer_channel
        .basic_qos(window.min(u16::MAX as usize) as u16, BasicQosOptions::default())
        .await
        .map_err(broker("setting the prefetch"))?;
    let mut consumer = consumer_channel
        .clone()
        .basic_consume(&queue, "ceiling", BasicConsumeOptions::default(), FieldTable::default())
        .await
        .map_err(broker("consuming"))?;
    let consumed = tokio::spawn(async move {
        let mut count = 0usize;
        while count < messages {
            match tokio::time::timeout(Duration::from_secs(30), consumer.next()).await {
                Ok(Some(Ok(delivery))) => {
                    delivery.ack(BasicAckOptions::default()).await.map_err(broker("acking"))?;
                    count += 1;
                }
                Ok(Some(Err(error))) => return Err(broker("consuming")(error)),
                Ok(None) | Err(_) => {
                    return Err(Error::Broker {
                        action: "consuming",
                        reason: format!("only {count} of {messages} messages arrived"),
                    })
                }
            }
        }
        // The consumer lives until its channel is closed below: dropping it
        // first would cancel it on a channel about to close.
        Ok((Instant::now(), consumer))
    });

    let payload = vec![0x5a_u8; payload_bytes];
    let started = Instant::now();
    let mut sent = 0;
    while sent < messages {
        let batch = window.min(messages - sent);
        // Handed over as `RabbitBackend::publish` does, so that this stays
        // a ceiling for the relay's passes.
        let publishes = (0..batch).map(|_| {
            channel.basic_publish(
                "",
                &queue,
                BasicPublishOptions::default(),
                &payload,
                BasicProperties::default().with_delivery_mode(2),
            )
        });
        let confirms = hand_over_all(publishes).await.into_iter().collect::<std::result::Result<Vec<_>, _>>();
        let confirms = confirms.map_err(broker("publishing"))?;
        for confirm in confirms {
            let confirmation = confirm.await.map_err(broker("waiting for a confirm"))?;
            if confirmation.is_nack() {
                return Err(Error::Broker { action: "publishing", reason: "the broker refused a message".into() });
            }
        }
        sent += batch;
    }
    let (finished, consumer) =
        consumed.await.map_err(|error| Error::Broker { action: "consuming", reason: error.to_string() })??;
    let seconds = finished.duration_since(started).as_secs_f64();
    let _ = consumer_channel.close(200, "done").await;
    drop(consumer);
    let _ = channel.queue_delete(&queue, QueueDeleteOptions::default()).await;
    let _ = publisher.close(200, "done").await;
    let _ = consumer_connection.close(200, "done").await;
    Ok(BrokerCeiling { messages, payload_bytes, seconds, per_second: messages as f64 / seconds.max(1e-9) })
}
