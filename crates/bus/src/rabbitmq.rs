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

use std::collections::BTreeMap;
use std::sync::Mutex;

use futures_util::StreamExt;
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

/// A connection to RabbitMQ with the fleetpatch topology declared.
pub struct RabbitBackend {
    connection: Connection,
    publisher: Mutex<Option<Channel>>,
    prefix: String,
    queues: Vec<String>,
}

/// An AMQP connection on the current tokio runtime, named `name` in the broker's UI.
pub(crate) async fn open_connection(url: &str, name: &str) -> Result<Connection> {
    let properties = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio)
        .with_connection_name(name.into());
    Connection::connect(url, properties)
        .await
        .map_err(|error| Error::Connect { url: redact_url(url), reason: redact_url(&error.to_string()) })
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

impl RabbitBackend {
    /// Connects and declares the topology for `queues` (work routing keys).
    pub async fn connect(options: &RabbitOptions, queues: &[&str]) -> Result<Self> {
        let connection = open_connection(&options.url, "fleetpatch").await?;
        let backend = Self {
            connection,
            publisher: Mutex::new(None),
            prefix: options.prefix.clone(),
            queues: queues.iter().map(|q| (*q).to_owned()).collect(),
        };
        backend.declare(options.delivery_limit).await?;
        Ok(backend)
    }

    fn name(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.prefix)
    }

    async fn declare(&self, delivery_limit: u32) -> Result<()> {
        let channel = self.connection.create_channel().await.map_err(broker("opening a channel"))?;
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
                ("x-delivery-limit", AMQPValue::LongInt(delivery_limit as i32)),
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

    /// Deletes every queue and exchange of this prefix (tests, uninstall).
    pub async fn delete_topology(&self) -> Result<()> {
        let channel = self.connection.create_channel().await.map_err(broker("opening a channel"))?;
        let mut queues: Vec<String> = self.queues.iter().map(|q| self.name(q)).collect();
        queues.push(self.name("dead"));
        let mut exchanges = vec![self.name("work"), self.name("events"), self.name("dlx")];
        for step in DELAY_STEPS_MS {
            queues.push(self.name(&format!("wait.{step}")));
            exchanges.push(self.name(&format!("wait.{step}")));
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

    async fn publisher(&self) -> Result<Channel> {
        if let Some(channel) = self.publisher.lock().expect("publisher lock").as_ref() {
            if channel.status().connected() {
                return Ok(channel.clone());
            }
        }
        let channel = self.connection.create_channel().await.map_err(broker("opening a channel"))?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(broker("enabling publisher confirms"))?;
        *self.publisher.lock().expect("publisher lock") = Some(channel.clone());
        Ok(channel)
    }

    fn exchange_of(&self, route: Route) -> String {
        match route {
            Route::Work => self.name("work"),
            Route::Events => self.name("events"),
            Route::Wait(step) => self.name(&format!("wait.{step}")),
        }
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

#[async_trait::async_trait]
impl Backend for RabbitBackend {
    async fn publish(&self, route: Route, messages: Vec<Wire>) -> Result<()> {
        let channel = self.publisher().await?;
        let exchange = self.exchange_of(route);
        let mut confirms = Vec::with_capacity(messages.len());
        for message in &messages {
            let headers: Vec<(&str, AMQPValue)> = message.headers.iter().map(|(k, v)| (k.as_str(), text(v))).collect();
            let properties = BasicProperties::default().with_delivery_mode(2).with_headers(table(&headers));
            let confirm = channel
                .basic_publish(
                    &exchange,
                    &message.routing_key,
                    BasicPublishOptions::default(),
                    &message.payload,
                    properties,
                )
                .await;
            match confirm {
                Ok(confirm) => confirms.push((confirm, &message.routing_key)),
                Err(error) => {
                    self.publisher.lock().expect("publisher lock").take();
                    return Err(Error::Broker { action: "publishing", reason: error.to_string() });
                }
            }
        }
        for (confirm, routing_key) in confirms {
            let confirmation = confirm.await.map_err(broker("waiting for a publisher confirm"))?;
            if confirmation.is_nack() {
                return Err(Error::Nacked { routing_key: routing_key.clone() });
            }
        }
        Ok(())
    }

    async fn consume(&self, queue: &str, prefetch: u16) -> Result<BackendConsumer> {
        let channel = self.connection.create_channel().await.map_err(broker("opening a channel"))?;
        channel.basic_qos(prefetch, BasicQosOptions::default()).await.map_err(broker("setting prefetch"))?;
        let tag = format!("{}-{}", queue, uuid::Uuid::new_v4().simple());
        let mut consumer = channel
            .basic_consume(&self.name(queue), &tag, BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map_err(broker("starting a consumer"))?;
        let (sender, receiver) = tokio::sync::mpsc::channel(usize::from(prefetch.max(1)));
        let delivery_channel = channel.clone();
        tokio::spawn(async move {
            loop {
                // A dropped receiver ends the consumer at once (dropping a lapin
                // consumer cancels it), not at its next delivery.
                let next = tokio::select! {
                    next = consumer.next() => next,
                    _ = sender.closed() => break,
                };
                let Some(next) = next else { break };
                let delivery = match next {
                    Ok(delivery) => delivery,
                    Err(error) => {
                        tracing::warn!(error = %error, "consumer stream ended with an error");
                        break;
                    }
                };
                let headers = headers_of(&delivery.properties);
                let delivery_count = headers.get(DELIVERY_COUNT_HEADER).and_then(|c| c.parse().ok()).unwrap_or(0);
                let ours = Delivery {
                    routing_key: delivery.routing_key.as_str().to_owned(),
                    payload: delivery.data,
                    headers,
                    redelivered: delivery.redelivered || delivery_count > 0,
                    delivery_count,
                    acker: Box::new(RabbitAcker { acker: delivery.acker, _channel: delivery_channel.clone() }),
                };
                if sender.send(ours).await.is_err() {
                    break;
                }
            }
        });
        let cancel_channel = channel.clone();
        let cancel = Box::new(move || {
            tokio::spawn(async move {
                let _ = cancel_channel.basic_cancel(&tag, BasicCancelOptions::default()).await;
            });
        });
        Ok(BackendConsumer { deliveries: receiver, cancel })
    }

    async fn drain_dead_letters(&self, limit: usize) -> Result<Vec<Wire>> {
        let channel = self.connection.create_channel().await.map_err(broker("opening a channel"))?;
        let mut letters = Vec::new();
        while letters.len() < limit {
            let got = channel
                .basic_get(&self.name("dead"), BasicGetOptions { no_ack: true })
                .await
                .map_err(broker("reading the dead-letter queue"))?;
            let Some(message) = got else { break };
            let delivery = message.delivery;
            letters.push(Wire {
                routing_key: delivery.routing_key.as_str().to_owned(),
                headers: headers_of(&delivery.properties),
                payload: delivery.data,
            });
        }
        let _ = channel.close(200, "drained").await;
        Ok(letters)
    }

    async fn queue_depth(&self, queue: &str) -> Result<u64> {
        let channel = self.connection.create_channel().await.map_err(broker("opening a channel"))?;
        let declared = channel
            .queue_declare(
                &self.name(queue),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .map_err(broker("reading a queue's depth"))?;
        let _ = channel.close(200, "depth").await;
        Ok(u64::from(declared.message_count()))
    }

    fn is_healthy(&self) -> bool {
        self.connection.status().connected()
    }

    async fn close(&self) {
        let _ = self.connection.close(200, "shutting down").await;
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
