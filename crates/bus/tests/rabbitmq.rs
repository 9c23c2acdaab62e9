//! The bus conformance suite on RabbitMQ (`FLEETPATCH_TEST_AMQP_URL`, by
//! default the local broker). Each test declares its own topology under a
//! random prefix and deletes it at the end; without RabbitMQ the tests fail.

use std::sync::Arc;

use fleetpatch_bus::conformance::TestBroker;
use fleetpatch_bus::rabbitmq::{redact_url, RabbitBackend, RabbitOptions};
use fleetpatch_bus::Backend;

const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// One prefix on the test broker; each `connect` is a new AMQP connection.
struct RabbitTestBroker {
    options: RabbitOptions,
    queues: &'static [&'static str],
}

impl RabbitTestBroker {
    async fn connect_rabbit(&self) -> RabbitBackend {
        RabbitBackend::connect(&self.options, self.queues).await.unwrap_or_else(|error| {
            panic!(
                "the RabbitMQ tests need a broker at {} (set FLEETPATCH_TEST_AMQP_URL, or start one with \
                 `rabbitmq-server -detached`): {error}",
                redact_url(&self.options.url)
            )
        })
    }
}

#[async_trait::async_trait]
impl TestBroker for RabbitTestBroker {
    async fn connect(&self) -> Arc<dyn Backend> {
        Arc::new(self.connect_rabbit().await)
    }

    async fn tear_down(&self) {
        let backend = self.connect_rabbit().await;
        if let Err(error) = backend.delete_topology().await {
            panic!("cannot delete the test topology {:?}: {error}", self.options.prefix);
        }
        backend.close().await;
    }
}

async fn make_broker(queues: &'static [&'static str], delivery_limit: u32) -> RabbitTestBroker {
    let url = std::env::var("FLEETPATCH_TEST_AMQP_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    let prefix = format!("fp-bus-test-{}", uuid::Uuid::new_v4().simple());
    RabbitTestBroker { options: RabbitOptions { url, prefix, delivery_limit }, queues }
}

fleetpatch_bus::bus_conformance_suite!(make_broker);
