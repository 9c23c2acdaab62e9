//! The Transport contract (`conformance.rs`) against the simulated fleet
//! in a process of its own, as the fault tests run it: the fleet's routes
//! served over loopback HTTP, each worker a `RemoteSimTransport` client.

use std::collections::BTreeMap;
use std::sync::Arc;

use fleetpatch_proto::plan::InstallerKind;
use fleetpatch_transport::conformance::{one_patch_deployment, TransportFixture};
use fleetpatch_transport::sim::{HostBehaviour, SimFleet, SimOptions};
use fleetpatch_transport::sim_remote::RemoteSimTransport;
use fleetpatch_transport::{Deployment, PatchProbe, TargetSpec, Transport};

struct RemoteSimFixture {
    fleet: SimFleet,
    url: String,
    dir: tempfile::TempDir,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for RemoteSimFixture {
    fn drop(&mut self) {
        self.server.abort();
    }
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

async fn remote_sim_fixture() -> RemoteSimFixture {
    let fleet = SimFleet::new(SimOptions { min_latency_ms: 0, max_latency_ms: 0, ..SimOptions::default() });
    fleet.mark_installed("win-01", "patch 0");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let app = fleetpatch_transport::sim_remote::router(fleet.clone());
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("the fleet's server runs");
    });
    RemoteSimFixture { fleet, url, dir: tempfile::tempdir().unwrap(), server }
}

#[async_trait::async_trait]
impl TransportFixture for RemoteSimFixture {
    fn transport(&self) -> Arc<dyn Transport> {
        Arc::new(RemoteSimTransport::new(&self.url))
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

fleetpatch_transport::transport_conformance_suite!(remote_sim_fixture());
