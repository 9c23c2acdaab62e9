//! The Transport contract (`conformance.rs`) against the simulated fleet.

use std::collections::BTreeMap;
use std::sync::Arc;

use fleetpatch_proto::plan::InstallerKind;
use fleetpatch_transport::conformance::{one_patch_deployment, TransportFixture};
use fleetpatch_transport::sim::{HostBehaviour, SimFleet, SimOptions, SimTransport};
use fleetpatch_transport::{Deployment, PatchProbe, TargetSpec, Transport};

struct SimFixture {
    fleet: SimFleet,
    dir: tempfile::TempDir,
}

fn target(host: &str, behaviour: &str) -> TargetSpec {
    TargetSpec {
        target_id: uuid::Uuid::new_v4(),
        host: host.into(),
        port: None,
        labels: BTreeMap::from([(HostBehaviour::LABEL.to_owned(), behaviour.to_owned())]),
        credential: None,
    }
}

async fn sim_fixture() -> SimFixture {
    let fleet = SimFleet::new(SimOptions { min_latency_ms: 0, max_latency_ms: 0, ..SimOptions::default() });
    fleet.mark_installed("win-01", "patch 0");
    SimFixture { fleet, dir: tempfile::tempdir().unwrap() }
}

#[async_trait::async_trait]
impl TransportFixture for SimFixture {
    fn transport(&self) -> Arc<dyn Transport> {
        Arc::new(SimTransport::new(self.fleet.clone()))
    }
    fn target(&self) -> TargetSpec {
        target("win-01", "healthy")
    }
    fn unreachable_target(&self) -> TargetSpec {
        target("gone-01", "unreachable")
    }
    fn patches(&self) -> Vec<PatchProbe> {
        (0..2).map(|index| PatchProbe { index, name: format!("patch {index}"), detection: None }).collect()
    }
    fn deployment(&self, target: &TargetSpec, attempt: u32) -> Deployment {
        one_patch_deployment(self.dir.path(), target, attempt, InstallerKind::Script, "patch-1.sh", None)
    }
    async fn staged(&self, _target: &TargetSpec, deployment_id: &str) -> bool {
        self.fleet.is_staged(deployment_id)
    }
}

fleetpatch_transport::transport_conformance_suite!(sim_fixture());

/// A cleanup that stops an agent while it waits for the collector's answer
/// is counted as such: the report may be stored, the agent never heard of
/// it (what the chaos test tells apart from a lost or refused report).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleanup_during_a_reports_answer_is_counted_as_cutting_it_short() {
    // A collector that takes the connection and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((connection, _)) = silent.accept().await {
            connections.push(connection);
        }
    });
    let fixture = sim_fixture().await;
    let transport = fixture.transport();
    let spec = target("slow-answer-01", "healthy");
    let mut deployment = fixture.deployment(&spec, 1);
    deployment.plan.collector_url = format!("http://{address}");
    transport.stage(&spec, &deployment).await.unwrap();
    transport.start_agent(&spec, &deployment).await.unwrap();
    let key = spec.target_id.to_string();
    let until = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while fixture.fleet.stats().reports_sent.get(&key).copied().unwrap_or(0) == 0 {
        assert!(tokio::time::Instant::now() < until, "the agent sends its first report");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    transport.cleanup(&spec, deployment.id(), false).await.unwrap();
    let stats = fixture.fleet.stats();
    assert_eq!(stats.reports_cut_by_cleanup.get(&key), Some(&vec!["seq 1 started".to_owned()]));
    assert_eq!(stats.reports_acknowledged.get(&key), None);
    assert_eq!(stats.reports_refused.get(&key), None);
    held.abort();
}
