//! The Transport contract (`fleetpatch_transport::conformance`) against a
//! real OpenSSH sshd peer on loopback, with its own dpkg database (one
//! package recorded as installed) and a stand-in agent script.

use std::path::PathBuf;
use std::sync::Arc;

use fleetpatch_proto::plan::{Detection, InstallerKind};
use fleetpatch_transport::conformance::{one_patch_deployment, TransportFixture};
use fleetpatch_transport::{Deployment, PatchProbe, TargetSpec, Transport};
use fleetpatch_transport_ssh::test_support::{SshPeer, SshPeerOptions};

/// Stays up like an agent installing a long patch (and detaches as it does).
fn stand_in_agent() -> String {
    format!("#!/bin/sh\n{}sleep 300 &\nwait\n", fleetpatch_transport_ssh::test_support::STAND_IN_DETACH)
}

const DPKG_STATUS: &str = "Package: fp-conformance-installed\n\
Status: install ok installed\n\
Priority: optional\n\
Section: misc\n\
Maintainer: fleetpatch tests <tests@fleetpatch.invalid>\n\
Architecture: all\n\
Version: 1.0-1\n\
Description: installed for the transport conformance suite\n\n";

struct SshFixture {
    peer: SshPeer,
    dir: tempfile::TempDir,
    agent: PathBuf,
}

async fn ssh_fixture() -> SshFixture {
    let peer = SshPeer::start_with(SshPeerOptions { dpkg_root: true, ..SshPeerOptions::default() })
        .unwrap_or_else(|error| panic!("an sshd peer is required: {error}"));
    std::fs::write(peer.dpkg_root().join("var/lib/dpkg/status"), DPKG_STATUS).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("agent.sh");
    std::fs::write(&agent, stand_in_agent()).unwrap();
    SshFixture { peer, dir, agent }
}

#[async_trait::async_trait]
impl TransportFixture for SshFixture {
    fn transport(&self) -> Arc<dyn Transport> {
        Arc::new(self.peer.transport())
    }
    fn target(&self) -> TargetSpec {
        self.peer.target()
    }
    fn unreachable_target(&self) -> TargetSpec {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        TargetSpec { port: Some(closed), ..self.peer.target() }
    }
    fn patches(&self) -> Vec<PatchProbe> {
        ["fp-conformance-installed", "fp-conformance-missing"]
            .iter()
            .enumerate()
            .map(|(index, package)| PatchProbe {
                index: index as u32,
                name: format!("patch {index}"),
                detection: Some(Detection::Dpkg { package: (*package).into(), version: None }),
            })
            .collect()
    }
    fn deployment(&self, target: &TargetSpec, attempt: u32) -> Deployment {
        let agent = Some(self.agent.clone());
        one_patch_deployment(self.dir.path(), target, attempt, InstallerKind::Script, "patch-1.sh", agent)
    }
    async fn staged(&self, _target: &TargetSpec, deployment_id: &str) -> bool {
        self.peer.staging_dir(deployment_id).join("patch-1.sh").is_file()
    }
}

fleetpatch_transport::transport_conformance_suite!(ssh_fixture());
