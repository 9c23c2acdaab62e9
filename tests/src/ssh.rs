//! What the tests over the real `ssh` transport share: a private OpenSSH
//! fleet on loopback with a sandbox whose workers reach it, targets for its
//! peers, and installers (a shell script, a `.deb`) put into the sandbox's
//! content store.
//!
//! Every peer has its own dpkg database (`SshPeerOptions::dpkg_root`): a
//! `.deb` is installed by the real `dpkg -i` with `--root` set to that
//! peer's directory, and the `dpkg` detection rule reads the same database
//! (sshd sets `DPKG_ADMINDIR`), so nothing is installed on the machine that
//! runs the tests.

use std::path::Path;
use std::process::Command;

use fleetpatch_transport_ssh::test_support::{SshFleet, SshPeer, SshPeerOptions, DPKG_ROOT_VAR};
use uuid::Uuid;

use crate::{credential_in_file, Sandbox, SandboxOptions};

/// No systemd as PID 1: the transport must take the detached-process path,
/// which is what these tests are about.
pub fn assert_no_systemd() {
    assert!(
        !Path::new("/run/systemd/system").exists(),
        "systemd runs on this machine: these tests exercise the detached agent (setsid) path and would \
         start transient units instead; run them in a container without systemd"
    );
}

/// An SSH fleet whose peers have their own dpkg database, and a sandbox whose
/// workers reach them with strict host-key checking.
pub async fn ssh_sandbox(peers: usize, tweak: impl FnOnce(&mut SandboxOptions)) -> (SshFleet, Sandbox) {
    ssh_sandbox_with(peers, SshPeerOptions { dpkg_root: true, ..SshPeerOptions::default() }, tweak).await
}

/// The same with peers set up as `peer_options` says.
pub async fn ssh_sandbox_with(
    peers: usize,
    peer_options: SshPeerOptions,
    tweak: impl FnOnce(&mut SandboxOptions),
) -> (SshFleet, Sandbox) {
    assert_no_systemd();
    let fleet =
        SshFleet::start_with(peers, peer_options).unwrap_or_else(|error| panic!("start {peers} sshd peers: {error}"));
    let mut options = SandboxOptions {
        workers: 2,
        worker_concurrency: 8,
        verify_delay_seconds: 1,
        ssh: Some(fleet.options()),
        ..SandboxOptions::default()
    };
    options.credentials.insert(
        FLEET_KEY.into(),
        credential_in_file(&fleet.keys().client.private_key_path, &["ssh"], &["127.0.0.0/8"]),
    );
    tweak(&mut options);
    let sandbox = Sandbox::start(options).await;
    (fleet, sandbox)
}

/// The named credential of the fleet's key (every sandbox here defines it).
pub const FLEET_KEY: &str = "fleet-key";

/// A target entry for a peer: root with a named credential (a key), the
/// peer's own staging root.
pub fn ssh_target(peer: &SshPeer, credential: &str) -> serde_json::Value {
    serde_json::json!({
        "host": peer.host(),
        "port": peer.port(),
        "transport": "ssh",
        "credential": credential,
        "labels": {
            "user": "root",
            "ssh.staging_root": peer.staging_root().display().to_string(),
        },
    })
}

pub struct Patch {
    pub name: String,
    pub file: String,
    pub sha256: String,
    pub size: u64,
    pub installer: &'static str,
    pub arguments: String,
    pub detection: Option<serde_json::Value>,
}

impl Patch {
    pub fn json(&self) -> serde_json::Value {
        let mut value = serde_json::json!({
            "name": self.name,
            "file": self.file,
            "sha256": self.sha256,
            "size": self.size,
            "installer": self.installer,
            "arguments": self.arguments,
            "timeout_seconds": 600,
        });
        if let Some(detection) = &self.detection {
            value["detection"] = detection.clone();
        }
        value
    }
}

/// Uploads a shell-script installer.
pub async fn script(sandbox: &Sandbox, name: &str, body: &str) -> Patch {
    let text = format!("#!/bin/sh\n{body}\n");
    let (sha256, size) = sandbox.upload_content(text.into_bytes()).await;
    Patch {
        name: name.into(),
        file: format!("{name}.sh"),
        sha256,
        size,
        installer: "script",
        arguments: String::new(),
        detection: None,
    }
}

/// Builds a `.deb` with `dpkg-deb --build` (one file under
/// `/opt/<package>/`, no maintainer scripts) and uploads it; it installs
/// into the target's own dpkg root, and its detection rule asks for it.
pub async fn deb(sandbox: &Sandbox, package: &str, version: &str) -> Patch {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("pkg");
    std::fs::create_dir_all(tree.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(tree.join("opt").join(package)).unwrap();
    std::fs::write(
        tree.join("DEBIAN/control"),
        format!(
            "Package: {package}\nVersion: {version}\nArchitecture: all\nMaintainer: fleetpatch tests <tests@fleetpatch.invalid>\nDescription: fleetpatch end-to-end test package\n"
        ),
    )
    .unwrap();
    std::fs::write(tree.join("opt").join(package).join("installed-by-fleetpatch"), format!("{package} {version}\n"))
        .unwrap();
    let file = dir.path().join(format!("{package}_{version}_all.deb"));
    let output = Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&tree)
        .arg(&file)
        .output()
        .expect("dpkg-deb is required to build the test package (apt-get install -y dpkg)");
    assert!(output.status.success(), "dpkg-deb --build: {}", String::from_utf8_lossy(&output.stderr));
    let (sha256, size) = sandbox.upload_content(std::fs::read(&file).unwrap()).await;
    Patch {
        name: package.into(),
        file: format!("{package}_{version}_all.deb"),
        sha256,
        size,
        installer: "deb",
        arguments: format!("--root=\"${DPKG_ROOT_VAR}\""),
        detection: Some(serde_json::json!({"kind": "dpkg", "package": package, "version": version})),
    }
}

/// `dpkg-query` against a peer's own database: `Some(version)` when installed.
pub fn installed_version(peer: &SshPeer, package: &str) -> Option<String> {
    let output = Command::new("dpkg-query")
        .env("DPKG_ADMINDIR", peer.dpkg_root().join("var/lib/dpkg"))
        .args(["-W", "-f=${Status}\t${Version}", "--", package])
        .output()
        .expect("dpkg-query");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (status, version) = text.split_once('\t')?;
    (status == "install ok installed").then(|| version.to_owned())
}

pub fn rollout(name: &str, patches: &[&Patch], targets: Vec<serde_json::Value>) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "concurrency": 5,
        "timeout_seconds": 60,
        "heartbeat_seconds": 5,
        "max_tries": 1,
        "patches": patches.iter().map(|p| p.json()).collect::<Vec<_>>(),
        "targets": targets,
    })
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &Uuid::new_v4().simple().to_string()[..8])
}
