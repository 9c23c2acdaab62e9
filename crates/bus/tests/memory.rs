//! The bus conformance suite on the in-process backend.

use std::sync::Arc;

use fleetpatch_bus::conformance::TestBroker;
use fleetpatch_bus::memory::MemoryBackend;
use fleetpatch_bus::Backend;

/// One in-process broker; each `connect` opens another connection to it.
struct MemoryTestBroker {
    first: MemoryBackend,
}

#[async_trait::async_trait]
impl TestBroker for MemoryTestBroker {
    async fn connect(&self) -> Arc<dyn Backend> {
        Arc::new(self.first.connect_another())
    }

    async fn tear_down(&self) {}
}

async fn make_broker(queues: &'static [&'static str], delivery_limit: u32) -> MemoryTestBroker {
    MemoryTestBroker { first: MemoryBackend::new(queues, delivery_limit) }
}

fleetpatch_bus::bus_conformance_suite!(make_broker);
