//! The `ssh` transport: Linux and other Unix targets over SSH.
//!
//! [`SshTransport`] implements [`fleetpatch_transport::Transport`]:
//!
//! - **probe** / **verify**: one remote script reads `/etc/os-release`,
//!   `uname`, the account's rights (root, or `sudo -n`) and queries every
//!   patch's detection rule (`dpkg-query`, `rpm -q`; a Windows hotfix rule
//!   is "not installed" here). Versions are compared on the worker with
//!   dpkg's and rpm's own ordering ("this version or newer").
//! - **stage**: one SFTP session, and no program started on the target in
//!   the usual case: creates `<staging_root>/<deployment_id>` (mode 700),
//!   streams the agent (`fleetpatch-agent`, 755), the plan (`plan.json`, 600:
//!   it holds the report token) and the installers into temporary names
//!   (each installer's sha256 checked on the worker as it streams, each
//!   file's size read back on the target), then renames them into place. A
//!   directory already there (a retried stage) is prepared by a script that
//!   also hashes what it holds, so installers already there intact are
//!   skipped; the agent checks every installer's sha256 before it runs it.
//! - **start_agent**: a transient systemd unit named after the deployment
//!   where systemd is PID 1, otherwise the agent itself detached
//!   (`run --detach`: it forks into a session of its own and writes a pid
//!   file). At most one agent per deployment id, ever: a second call
//!   says [`AgentStart::AlreadyRunning`] (also when that agent already ran
//!   to its end, so a taken-over job never runs the patches twice).
//! - **cleanup**: stops the unit or the process group, removes the staging
//!   directory; idempotent.
//! - **preflight**: port, host key, login, admin rights, free space, the
//!   tools a deployment needs, and whether the collector is reachable *from
//!   the target*; each failed check says the likely cause and the fix.
//!
//! What a deployment costs the target: one login, and over it one command
//! for the probe, one SFTP session for the stage, one command to start the
//! agent and one for the cleanup (sshd forks a shell for every command,
//! and each program a script starts is another fork and exec: the scripts
//! use the shell's builtins where they can). Each step runs its commands
//! and its SFTP transfer over one SSH connection; a step that went well
//! hands it back for the next step to the same target (same user, port and
//! credential) for `connection_reuse_seconds` (default 30; 0 logs in for
//! every step), so a deployment's probe, stage, start and a prompt cleanup
//! log in once. Those idle connections are the only thing the transport
//! keeps between calls: a cache whose loss changes nothing but a login.
//! Commands are
//! `/bin/sh` scripts sent on standard input; every value from a rollout or
//! a target is quoted ([`shell::quote`]) or validated. Host keys are checked
//! against an OpenSSH `known_hosts` file (strict, or trust on first use);
//! credentials are never logged.
//!
//! With the `test-support` feature, [`test_support`] starts private OpenSSH
//! `sshd` peers on loopback for tests and benchmarks.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use fleetpatch_transport::{
    AgentStart, Deployment, Error, PatchProbe, PreflightCheck, PreflightContext, ProbeReport, Result, TargetSpec,
    Transport, VerifyReport,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

mod facts;
mod options;
mod pool;
mod session;
pub mod shell;
mod stage;
pub mod versions;

#[cfg(feature = "test-support")]
pub mod test_support;

pub use facts::{collector_host_port, parse_df_available_bytes, parse_os_release};
pub use options::{HostKeyPolicy, SshOptions};
pub use session::{fingerprint, known_hosts_name};
pub use shell::{StagingPaths, AGENT_FILE_NAME};

use facts::AdminRights;
use session::{address_of, sftp_error, CommandOutput, ConnectStage, Connection};

/// Files the transport itself writes into a staging directory; an installer
/// may not take one of these names.
const RESERVED_NAMES: [&str; 5] = [AGENT_FILE_NAME, "plan.json", "agent.pid", "agent.log", "agent.started"];
/// Target label that gives one target its own staging root (overrides
/// [`SshOptions::staging_root`]).
pub const STAGING_ROOT_LABEL: &str = "ssh.staging_root";

/// Errors of this crate beyond the transport's own.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// The options are not usable; the message names the key.
    #[error("invalid ssh transport options: {0}")]
    InvalidOptions(#[source] fleetpatch_runtime::ConfigError),
}

/// The `ssh` transport. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SshTransport {
    options: Arc<SshOptions>,
    pool: Arc<pool::Pool>,
}

impl SshTransport {
    /// Builds the transport; refuses invalid options with the key named.
    pub fn new(options: SshOptions) -> std::result::Result<Self, SshError> {
        options.validate().map_err(SshError::InvalidOptions)?;
        Ok(Self { options: Arc::new(options), pool: Arc::default() })
    }

    pub fn options(&self) -> &SshOptions {
        &self.options
    }

    /// Idle connections kept for reuse (see [`SshOptions::connection_reuse_seconds`]).
    pub async fn idle_connections(&self) -> usize {
        self.pool.idle_count().await
    }

    /// Ends a step's use of its connection: kept for the next step when the
    /// step went well, closed otherwise.
    async fn done(&self, target: &TargetSpec, connection: Connection, ok: bool) {
        if ok {
            self.pool.release(&self.options, target, connection).await;
        } else {
            connection.close().await;
        }
    }

    /// The target's staging root: its label, else the option.
    fn staging_root<'a>(&'a self, target: &'a TargetSpec) -> Result<&'a str> {
        match target.labels.get(STAGING_ROOT_LABEL) {
            None => Ok(self.options.staging_root()),
            Some(root) => {
                options::validate_staging_root(root).map_err(|error| Error::Remote {
                    address: self.address(target),
                    reason: format!("target label {STAGING_ROOT_LABEL} {error}"),
                    transient: false,
                })?;
                Ok(root.trim_end_matches('/'))
            }
        }
    }

    fn paths(&self, target: &TargetSpec, deployment_id: &str) -> Result<StagingPaths> {
        if !shell::is_safe_name(deployment_id) {
            return Err(Error::Remote {
                address: self.address(target),
                reason: format!(
                    "deployment id {deployment_id:?} is not usable as a directory and unit name \
                     (1-200 characters of A-Z a-z 0-9 . _ -)"
                ),
                transient: false,
            });
        }
        Ok(StagingPaths::new(self.staging_root(target)?, deployment_id))
    }

    fn address(&self, target: &TargetSpec) -> String {
        address_of(&target.host, target.port.unwrap_or(self.options.port))
    }

    async fn detect(&self, connection: &Connection, patches: &[PatchProbe], with_facts: bool) -> Result<String> {
        let mut script = String::new();
        if with_facts {
            shell::facts_script(&mut script, self.options.use_sudo);
        }
        shell::detection_script(&mut script, &facts::detection_queries(patches));
        let output = connection.run_plain(&script, "probe").await?;
        if !output.success() && output.stdout.is_empty() {
            return Err(remote_failure(connection, "probe", &output));
        }
        Ok(output.stdout)
    }
}

fn remote_failure(connection: &Connection, step: &str, output: &CommandOutput) -> Error {
    let reason = format!("{step} failed on the target: {}", output.failure());
    if output.stderr.contains("Permission denied") || output.stderr.contains("Operation not permitted") {
        Error::PermissionDenied { address: connection.address.clone(), reason }
    } else {
        Error::Remote { address: connection.address.clone(), reason, transient: false }
    }
}

fn check(name: &str, ok: bool, detail: impl Into<String>, fix: Option<String>) -> PreflightCheck {
    PreflightCheck { name: name.into(), ok, detail: detail.into(), fix: if ok { None } else { fix } }
}

#[async_trait::async_trait]
impl Transport for SshTransport {
    fn kind(&self) -> &'static str {
        "ssh"
    }

    async fn reachable(&self, target: &TargetSpec) -> Result<()> {
        fleetpatch_transport::tcp_answers(
            target,
            22,
            std::time::Duration::from_secs(self.options.connect_timeout_seconds),
        )
        .await
    }

    async fn probe(&self, target: &TargetSpec, patches: &[PatchProbe]) -> Result<ProbeReport> {
        let started = Instant::now();
        let connection = self.pool.connect(&self.options, target).await?;
        let result = self.detect(&connection, patches, true).await;
        self.done(target, connection, result.is_ok()).await;
        let (mut report, _) = facts::probe_report(&result?, patches);
        report.details.insert("ssh_user".into(), target_user(&self.options, target));
        tracing::debug!(target_id = %target.target_id, elapsed_ms = started.elapsed().as_millis() as u64, "ssh probe done");
        Ok(report)
    }

    async fn stage(&self, target: &TargetSpec, deployment: &Deployment) -> Result<()> {
        self.stage_deployment(target, deployment).await
    }

    async fn start_agent(&self, target: &TargetSpec, deployment: &Deployment) -> Result<AgentStart> {
        let paths = self.paths(target, deployment.id())?;
        let connection = self.pool.connect(&self.options, target).await?;
        let script = shell::start_agent_script(deployment.id(), &paths);
        let result = connection.run_privileged(&script, "start agent").await;
        self.done(target, connection, result.is_ok()).await;
        let output = result?;
        let agent = shell::sections(&output.stdout)
            .into_iter()
            .find(|(header, _)| header.first() == Some(&"agent"))
            .map(|(header, _)| header.iter().map(|w| w.to_string()).collect::<Vec<_>>());
        match agent.as_deref() {
            Some([_, state, mode]) if output.success() => {
                tracing::info!(
                    target_id = %target.target_id,
                    deployment_id = %deployment.id(),
                    state = %state,
                    mode = %mode,
                    "ssh agent start"
                );
                Ok(if state == "started" { AgentStart::Started } else { AgentStart::AlreadyRunning })
            }
            _ => {
                let reason = match output.exit_status {
                    Some(3) => format!("the agent is not staged: {}", output.stderr.trim()),
                    _ => format!("the agent did not start: {}", output.failure()),
                };
                Err(Error::Remote { address: self.address(target), reason, transient: false })
            }
        }
    }

    async fn cleanup(&self, target: &TargetSpec, deployment_id: &str, keep_files: bool) -> Result<()> {
        let paths = self.paths(target, deployment_id)?;
        let connection = self.pool.connect(&self.options, target).await?;
        let script = shell::cleanup_script(deployment_id, &paths, keep_files);
        let result = connection.run_privileged(&script, "cleanup").await;
        let output = match result {
            Ok(output) => output,
            Err(error) => {
                self.done(target, connection, false).await;
                return Err(error);
            }
        };
        let outcome = if output.success() { Ok(()) } else { Err(remote_failure(&connection, "cleanup", &output)) };
        self.done(target, connection, outcome.is_ok()).await;
        outcome?;
        if let Some((header, _)) =
            shell::sections(&output.stdout).into_iter().find(|(h, _)| h.first() == Some(&"stopped"))
        {
            tracing::info!(target_id = %target.target_id, deployment_id, pid = header.get(1).copied().unwrap_or(""), "ssh agent stopped by cleanup");
        }
        Ok(())
    }

    async fn verify(&self, target: &TargetSpec, patches: &[PatchProbe]) -> Result<VerifyReport> {
        let connection = self.pool.connect(&self.options, target).await?;
        let result = self.detect(&connection, patches, false).await;
        self.done(target, connection, result.is_ok()).await;
        Ok(facts::verify_report(patches, &result?))
    }

    async fn preflight(&self, target: &TargetSpec, context: &PreflightContext) -> Result<Vec<PreflightCheck>> {
        let address = self.address(target);
        let staging_root = self.staging_root(target)?.to_owned();
        let mut checks = Vec::new();
        let connection = match Connection::open_staged(&self.options, target).await {
            Ok(connection) => connection,
            Err(failure) => {
                let reached = |stage| failure.stage as u8 > stage as u8;
                if reached(ConnectStage::Port) {
                    checks.push(check("port", true, format!("{address} accepts TCP connections"), None));
                }
                if reached(ConnectStage::HostKey) {
                    checks.push(check(
                        "host_key",
                        true,
                        format!("{} is trusted", failure.presented_key.as_deref().unwrap_or("the host key")),
                        None,
                    ));
                }
                let (name, fix) = match (&failure.stage, &failure.error) {
                    (_, Error::MissingCredential { .. }) => {
                        ("login", "give the target a credential (private key or password) in the rollout")
                    }
                    (ConnectStage::Port, Error::Timeout { .. }) => (
                        "port",
                        "the host does not answer: check that it is up, the address and port are right, and no \
                         firewall drops SSH from the worker",
                    ),
                    (ConnectStage::Port, _) => (
                        "port",
                        "nothing accepts connections there: start sshd on the target, check the port \
                         (transports.ssh.port or the target's port) and the firewall",
                    ),
                    (ConnectStage::HostKey, Error::HostKey { .. }) => (
                        "host_key",
                        "verify the fingerprint on the host and add it to known_hosts (see the detail), or use \
                         host_key_policy = \"trust_on_first_use\" for new hosts",
                    ),
                    (ConnectStage::HostKey, _) => (
                        "host_key",
                        "the SSH handshake failed: check that the port is an SSH server and that it offers \
                         modern algorithms (ed25519/ecdsa/rsa-sha2, curve25519)",
                    ),
                    (ConnectStage::Login, _) => (
                        "login",
                        "check the user name and credential, that the public key is in the user's \
                         ~/.ssh/authorized_keys, and sshd's PermitRootLogin / PasswordAuthentication",
                    ),
                };
                checks.push(check(name, false, failure.error.to_string(), Some(fix.into())));
                return Ok(checks);
            }
        };
        checks.push(check("port", true, format!("{address} accepts TCP connections"), None));
        checks.push(check(
            "host_key",
            true,
            format!("{} is trusted", connection.presented_key.as_deref().unwrap_or("the host key")),
            None,
        ));
        checks.push(check("login", true, format!("logged in as {}", connection.username), None));

        let collector = facts::collector_host_port(&context.collector_url);
        let script = shell::preflight_script(
            &staging_root,
            self.options.use_sudo,
            collector.as_ref().map(|(host, port)| (host.as_str(), *port)),
        );
        let result = connection.run_plain(&script, "preflight").await;
        let username = connection.username.clone();
        connection.close().await;
        let output = result?;
        let sections = shell::sections(&output.stdout);
        let body = |name: &str| -> Vec<&str> {
            sections
                .iter()
                .find(|(header, _)| header.as_slice() == [name])
                .map(|(_, body)| body.clone())
                .unwrap_or_default()
        };

        let (_, admin) = facts::probe_report(&output.stdout, &[]);
        checks.push(match admin {
            AdminRights::Root => check("admin_rights", true, "logged in as root", None),
            AdminRights::Sudo => check("admin_rights", true, format!("{username} has passwordless sudo"), None),
            AdminRights::SudoNeedsPassword => check(
                "admin_rights",
                false,
                format!("{username} is not root and sudo -n asks for a password"),
                Some(format!("allow {username} passwordless sudo (NOPASSWD in /etc/sudoers.d/) or log in as root")),
            ),
            AdminRights::None => check(
                "admin_rights",
                false,
                format!("{username} is not root and has no usable sudo"),
                Some(if self.options.use_sudo {
                    format!("log in as root, or install sudo and allow {username} passwordless sudo (NOPASSWD)")
                } else {
                    format!("log in as root, or set transports.ssh.use_sudo = true and allow {username} passwordless sudo")
                }),
            ),
        });

        let df = body("df");
        let existing = df.first().copied().unwrap_or("?");
        let available = df.get(1).and_then(|line| facts::parse_df_available_bytes(line));
        let writable = df.get(2).copied() == Some("writable");
        let root = staging_root.as_str();
        checks.push(match available {
            Some(available) if available >= context.staging_bytes && writable => check(
                "free_space",
                true,
                format!(
                    "{} MiB free at {existing} for {} MiB to stage under {root}",
                    available >> 20,
                    context.staging_bytes >> 20
                ),
                None,
            ),
            Some(available) if available >= context.staging_bytes => check(
                "free_space",
                false,
                format!("{existing} (where {root} would be created) is not writable by {username}"),
                Some(format!("create {root} writable by {username}, or set transports.ssh.staging_root elsewhere")),
            ),
            Some(available) => check(
                "free_space",
                false,
                format!(
                    "only {} MiB free at {existing} ({} bytes), the deployment stages {} MiB ({} bytes) under {root}",
                    available >> 20,
                    available,
                    context.staging_bytes >> 20,
                    context.staging_bytes
                ),
                Some(format!(
                    "free space on the filesystem of {existing}, or point transports.ssh.staging_root at a larger one"
                )),
            ),
            None => check(
                "free_space",
                false,
                format!("df -Pk {existing} gave no usable answer: {:?}", df.get(1).copied().unwrap_or("")),
                Some(
                    "check that df (POSIX, -P) works on the target and that staging_root is on a mounted filesystem"
                        .into(),
                ),
            ),
        });

        let tools = body("tools");
        let has = |tool: &str| tools.iter().any(|t| t.trim() == tool);
        let mut missing = Vec::new();
        if !(has("sha256sum") || has("sha256") || has("shasum")) {
            missing.push("sha256sum (coreutils)");
        }
        let how = if has("systemd-pid1") { "agent as a transient systemd unit" } else { "agent as a detached process" };
        checks.push(if missing.is_empty() {
            check("tools", true, format!("checksum tool present; {how}"), None)
        } else {
            check(
                "tools",
                false,
                format!("missing on the target: {}", missing.join(", ")),
                Some("install the missing tools (coreutils, util-linux) on the target".into()),
            )
        });

        checks.push(match collector {
            None => check(
                "collector",
                false,
                format!("collector URL {:?} has no http(s) host and port", context.collector_url),
                Some("set the collector URL to http://HOST:PORT (the address agents use to reach it)".into()),
            ),
            Some((host, port)) => {
                let line = body("collector").first().copied().unwrap_or("unknown no-output").to_owned();
                let mut words = line.split_whitespace();
                match (words.next(), words.next()) {
                    (Some("ok"), tool) => check(
                        "collector",
                        true,
                        format!("{host}:{port} is reachable from the target ({})", tool.unwrap_or("?")),
                        None,
                    ),
                    (Some("fail"), tool) => check(
                        "collector",
                        false,
                        format!(
                            "the target cannot connect to the collector at {host}:{port} ({} probe)",
                            tool.unwrap_or("?")
                        ),
                        Some(format!(
                            "the agent reports to {}: check that the collector runs, that {host} resolves and \
                             routes from the target, and that no firewall blocks port {port} in between",
                            context.collector_url
                        )),
                    ),
                    _ => check(
                        "collector",
                        false,
                        format!("cannot test {host}:{port} from the target: no bash+timeout, nc or curl there"),
                        Some("install curl or netcat on the target to let preflight check the collector".into()),
                    ),
                }
            }
        });
        Ok(checks)
    }
}

fn target_user(options: &SshOptions, target: &TargetSpec) -> String {
    session::login_of(options, target).map(|(user, _)| user).unwrap_or_default()
}
