//! How a worker reaches a target.
//!
//! [`Transport`] is the one interface every way of reaching a machine
//! implements: `sim` (a simulated fleet, this crate), `ssh` (Linux/Unix over
//! SSH and SFTP) and `smb` (Windows over SMB2/3 and DCE/RPC). The worker
//! drives every transport through the same five steps:
//!
//! 1. [`Transport::probe`]: OS, version, architecture, admin rights, and which
//!    of the rollout's patches are already installed;
//! 2. [`Transport::stage`]: copy the agent, the plan and the installers into a
//!    per-deployment directory on the target;
//! 3. [`Transport::start_agent`]: install and start the agent as a temporary
//!    service (or unit, or detached process). **Idempotent per deployment id**:
//!    a worker that takes over a job from a dead worker calls it again and
//!    must not start a second agent;
//! 4. [`Transport::cleanup`]: stop and remove the agent and the staged files;
//! 5. [`Transport::verify`]: the verification scan (what is really installed).
//!
//! With the `test-support` feature, [`conformance`] states this contract
//! once as tests every transport runs (`transport_conformance_suite!`).
//!
//! A transport holds no per-target state between calls (the simulated fleet
//! is the simulated *machines*, not transport state). Errors say whether they
//! are transient (retry with backoff) or permanent (fail the target).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use fleetpatch_proto::plan::{DeploymentPlan, Detection};

#[cfg(feature = "test-support")]
pub mod conformance;
pub mod sim;
pub mod sim_remote;

/// A secret value (password, private key). Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A resolved credential: the worker resolves the target's credential
/// *reference* (env, file, Kubernetes Secret mount) just before use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    Password { username: String, password: Secret },
    PrivateKey { username: String, key_pem: Secret, passphrase: Option<Secret> },
}

/// One target as a transport needs it.
#[derive(Debug, Clone)]
pub struct TargetSpec {
    pub target_id: uuid::Uuid,
    /// Host name or address, as given in the rollout.
    pub host: String,
    /// Port, when not the transport's default (445 for smb, 22 for ssh).
    pub port: Option<u16>,
    pub labels: BTreeMap<String, String>,
    pub credential: Option<Credential>,
}

impl TargetSpec {
    /// `host` or `host:port`, for messages.
    pub fn address(&self) -> String {
        match self.port {
            Some(port) => format!("{}:{port}", self.host),
            None => self.host.clone(),
        }
    }
}

/// A patch as the probe and the verification scan see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchProbe {
    pub index: u32,
    pub name: String,
    pub detection: Option<Detection>,
}

/// What the probe found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProbeReport {
    pub os: String,
    pub os_version: String,
    pub arch: String,
    /// Logged-in account has administrator (root, sudo, local admin) rights.
    pub is_admin: bool,
    /// Indexes of the patches already installed (skipped by the deployment).
    pub installed: Vec<u32>,
    /// Anything else worth recording (build number, hostname, ...).
    pub details: BTreeMap<String, String>,
    /// A value that changes with every boot (the kernel's boot id, a boot time), when the
    /// transport can read one: after a reboot the worker compares it with
    /// the one the deployment's probe read, to tell a machine that rebooted
    /// from one that has not yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
}

/// A file to copy to the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedFile {
    /// File name in the staging directory.
    pub name: String,
    /// Where the bytes are on the worker (content store, agent binaries).
    pub source: PathBuf,
    pub sha256: String,
    pub size: u64,
}

/// One deployment: a target's attempt.
#[derive(Debug, Clone)]
pub struct Deployment {
    pub plan: DeploymentPlan,
    /// The agent binary for the target's architecture (not needed by `sim`).
    pub agent_binary: Option<PathBuf>,
    /// Installers to stage (only patches not already installed).
    pub files: Vec<StagedFile>,
}

impl Deployment {
    pub fn id(&self) -> &str {
        &self.plan.deployment_id
    }
}

/// How [`Transport::start_agent`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentStart {
    Started,
    /// This deployment's agent was already running (a job taken over from a dead worker).
    AlreadyRunning,
}

/// What the verification scan found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    pub installed: Vec<u32>,
    pub missing: Vec<u32>,
    /// Patches the scan cannot judge on this target: no detection rule, or
    /// one for another kind of system. Neither installed nor missing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unknown: Vec<u32>,
}

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{address} is unreachable: {reason}")]
    Unreachable { address: String, reason: String },
    #[error("{step} on {address} took longer than {seconds} s")]
    Timeout { address: String, step: &'static str, seconds: u64 },
    #[error("login to {address} as {username:?} was rejected: {reason}")]
    Authentication { address: String, username: String, reason: String },
    #[error("host key of {address} is not trusted: {reason}")]
    HostKey { address: String, reason: String },
    #[error("{address}: permission denied: {reason}")]
    PermissionDenied { address: String, reason: String },
    #[error("{address}: not supported: {reason}")]
    NotSupported { address: String, reason: String },
    #[error("{address}: {reason}")]
    Remote { address: String, reason: String, transient: bool },
    #[error("local file {path}: {reason}")]
    LocalFile { path: PathBuf, reason: String },
    #[error("no credential for {address}: {reason}")]
    MissingCredential { address: String, reason: String },
}

impl Error {
    /// Worth retrying with backoff (the target may come back online).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unreachable { .. } | Error::Timeout { .. } => true,
            Error::Remote { transient, .. } => *transient,
            _ => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One preflight check (`fleetpatch check`): what was checked, whether it
/// passed, and when not, the likely cause and the fix.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PreflightCheck {
    /// Short name: `port`, `host_key`, `login`, `admin_rights`, `free_space`, `collector`, ...
    pub name: String,
    pub ok: bool,
    pub detail: String,
    /// The likely cause and what to do, when the check failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// Connects to the target's port (`default_port` unless the target names
/// one) within `timeout` and closes the connection: the reachability check
/// of transports whose service answers a plain TCP connect.
pub async fn tcp_answers(target: &TargetSpec, default_port: u16, timeout: std::time::Duration) -> Result<()> {
    let port = target.port.unwrap_or(default_port);
    let address = format!("{}:{port}", target.host);
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect((target.host.as_str(), port))).await {
        Ok(Ok(_stream)) => Ok(()),
        Ok(Err(error)) => Err(Error::Unreachable { address, reason: error.to_string() }),
        Err(_) => Err(Error::Timeout { address, step: "reachable", seconds: timeout.as_secs() }),
    }
}

/// What a preflight needs besides the target.
#[derive(Debug, Clone)]
pub struct PreflightContext {
    /// The collector URL the agent will report to (checked for reachability from the target).
    pub collector_url: String,
    /// Bytes the deployment will stage (checked against free space).
    pub staging_bytes: u64,
}

/// One way of reaching targets. See the crate docs for the contract.
#[async_trait::async_trait]
pub trait Transport: Send + Sync + 'static {
    /// The name used in rollouts (`sim`, `ssh`, `smb`).
    fn kind(&self) -> &'static str;
    async fn probe(&self, target: &TargetSpec, patches: &[PatchProbe]) -> Result<ProbeReport>;
    async fn stage(&self, target: &TargetSpec, deployment: &Deployment) -> Result<()>;
    async fn start_agent(&self, target: &TargetSpec, deployment: &Deployment) -> Result<AgentStart>;
    /// Stop the agent if it still runs and remove it; remove the staged
    /// files too unless `keep_files` (the rollout's setting, for debugging).
    /// Idempotent.
    async fn cleanup(&self, target: &TargetSpec, deployment_id: &str, keep_files: bool) -> Result<()>;
    async fn verify(&self, target: &TargetSpec, patches: &[PatchProbe]) -> Result<VerifyReport>;
    /// Whether the machine answers at all: a connect to the transport's
    /// port, with no login and no command, cheap enough to repeat for every
    /// offline target. `Err` (unreachable or timed out) when it does not.
    async fn reachable(&self, target: &TargetSpec) -> Result<()>;
    /// Checks everything a deployment needs without changing anything on the
    /// target. A failed check is a result, not an error; `Err` is for when the
    /// preflight itself could not run.
    async fn preflight(&self, target: &TargetSpec, context: &PreflightContext) -> Result<Vec<PreflightCheck>> {
        let _ = context;
        Ok(vec![match self.probe(target, &[]).await {
            Ok(probe) => PreflightCheck {
                name: "probe".into(),
                ok: true,
                detail: format!("{} {} on {}", probe.os, probe.os_version, probe.arch),
                fix: None,
            },
            Err(error) => PreflightCheck {
                name: "probe".into(),
                ok: false,
                detail: error.to_string(),
                fix: Some("check that the host is up and reachable from the worker".into()),
            },
        }])
    }
}

/// The transports a worker can use, by kind.
#[derive(Clone, Default)]
pub struct Transports {
    by_kind: BTreeMap<&'static str, Arc<dyn Transport>>,
}

impl Transports {
    pub fn with(mut self, transport: Arc<dyn Transport>) -> Self {
        self.by_kind.insert(transport.kind(), transport);
        self
    }
    pub fn get(&self, kind: &str) -> Option<&Arc<dyn Transport>> {
        self.by_kind.get(kind)
    }
    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.by_kind.keys().copied()
    }
}
