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
