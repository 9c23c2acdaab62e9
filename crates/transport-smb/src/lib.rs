//! The `smb` transport: Windows targets, reached the way psexec and PDQ
//! Deploy reach them, with nothing installed beforehand.
//!
//! [`SmbTransport`] implements [`fleetpatch_transport::Transport`] over
//! [`fleetpatch_winproto`] (SMB2/3 with NTLM, signing always, encryption
//! when offered; DCE/RPC over named pipes):
//!
//! - **probe** / **verify**: the remote registry (`winreg`): version, build
//!   and architecture from `CurrentVersion` and the session environment,
//!   and which of the rollout's hotfixes are installed, from the Uninstall,
//!   Hotfix and Component Based Servicing keys ([`registry`]). Logging in
//!   and opening the staging share is the administrator check: Windows
//!   gives its admin shares to local administrators only.
//! - **stage**: `<share>\<staging_dir>\<deployment_id>` (default
//!   `C$\Windows\Patches\fp-…`), the agent as `fleetpatch-agent.exe`, the
//!   plan (`plan.json`) and the installers; each installer's sha256 and size
//!   are checked while it streams (the agent checks them again on the
//!   target before it runs anything).
//! - **start_agent**: the agent service `fleetpatch-<deployment_id>`
//!   (own process, demand start, LocalSystem or the login account) is
//!   created over `svcctl` and started. At most one start per deployment:
//!   the `agent.started` marker is written beside the plan before the
//!   service is created, and a later call that finds it answers
//!   [`AgentStart::AlreadyRunning`]; it is removed again when the service
//!   certainly did not start (creation refused, start refused), so a retry
//!   may try again. Right after the start the service is queried: an agent
//!   that stopped at once fails the step with its exit code. A leftover
//!   service of the same name is stopped, deleted and created again; one
//!   marked for deletion is waited for.
//! - **cleanup**: stops and deletes the service (deleted even when it will
//!   not stop, so nothing comes back at boot), then removes the staged
//!   files unless told to keep them; also after a failed or timed-out run;
//!   idempotent.
//! - **preflight**: port, login, write access to the share, the remote
//!   registry, and the service manager opened with the rights to create
//!   services; each failed check names the likely cause and the fix.
//!
//! A server that does not implement service creation (Samba answers
//! `RCreateServiceW` with the fault `nca_s_op_rng_error`) fails the start
//! with [`Error::NotSupported`] saying so.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetpatch_transport::{
    AgentStart, Credential, Deployment, Error, PatchProbe, PreflightCheck, PreflightContext, ProbeReport, Result,
    TargetSpec, Transport, VerifyReport,
};
use fleetpatch_winproto::scmr::{access as scm_access, ScmTimeouts};
use fleetpatch_winproto::{
    Credentials, NtStatus, RpcFaultStatus, ServiceAccount, ServiceSpec, ServiceState, SmbOptions, SmbPipe, SmbSession,
    Win32Error,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, ReadBuf};

mod errors;
mod options;
pub mod service_manager;

use errors::{is_not_found, map_error};
pub mod registry;

pub use options::{Encryption, ServiceAccountChoice, SmbTransportOptions};
pub use service_manager::{ServiceManager, ServiceManagers, Svcctl};

/// The agent's file name in the staging folder.
pub const AGENT_FILE_NAME: &str = "fleetpatch-agent.exe";
/// Written before the service is created; its presence means "this
/// deployment's agent was started once already".
pub const STARTED_MARKER: &str = "agent.started";
/// The agent's log file, beside the plan.
pub const AGENT_LOG: &str = "agent.log";
/// Names the transport and the agent use in the staging folder.
const RESERVED_NAMES: [&str; 6] =
    [AGENT_FILE_NAME, fleetpatch_proto::plan::PLAN_FILE_NAME, STARTED_MARKER, AGENT_LOG, "spool.bin", "spool.bin.tmp"];

/// Errors of this crate beyond the transport's own.
#[derive(Debug, thiserror::Error)]
pub enum SmbTransportError {
    /// The options are not usable; the message names the key.
    #[error("invalid smb transport options: {0}")]
    InvalidOptions(#[source] fleetpatch_runtime::ConfigError),
}

/// The `smb` transport. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SmbTransport {
    options: Arc<SmbTransportOptions>,
    services: Arc<dyn ServiceManagers>,
}

/// The service name of a deployment's agent.
pub fn service_name(deployment_id: &str) -> String {
    format!("fleetpatch-{deployment_id}")
}

fn is_safe_deployment_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 200
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A session to one target, with what the steps need to know about it.
struct Target {
    session: SmbSession,
    address: String,
}

impl Target {
    async fn close(self) {
        if let Err(error) = self.session.close().await {
            tracing::debug!(address = %self.address, error = %error, "smb logoff failed");
        }
    }
}

impl SmbTransport {
    /// Builds the transport; refuses invalid options with the key named.
    pub fn new(options: SmbTransportOptions) -> std::result::Result<Self, SmbTransportError> {
        options.validate().map_err(SmbTransportError::InvalidOptions)?;
        Ok(Self { options: Arc::new(options), services: Arc::new(Svcctl) })
    }

    /// The same transport with the agent service installed through
    /// `services` instead of the target's `svcctl` (see
    /// [`service_manager`]: the Samba + Wine end-to-end test).
    pub fn with_service_managers(mut self, services: Arc<dyn ServiceManagers>) -> Self {
        self.services = services;
        self
    }

    pub fn options(&self) -> &SmbTransportOptions {
        &self.options
    }

    fn address(&self, target: &TargetSpec) -> String {
        format!("{}:{}", target.host, target.port.unwrap_or(self.options.port))
    }

    fn smb_options(&self) -> SmbOptions {
        SmbOptions {
            timeout: self.options.timeout(),
            encryption: self.options.encryption.into(),
            ..SmbOptions::default()
        }
    }

    fn credentials(&self, target: &TargetSpec) -> Result<Credentials> {
        match &target.credential {
            Some(Credential::Password { username, password }) => {
                Ok(Credentials { user: username.clone(), password: password.expose().to_owned() })
            }
            Some(Credential::PrivateKey { .. }) => Err(Error::MissingCredential {
                address: self.address(target),
                reason: "the smb transport logs in with a user name and password (a credential whose secret is \
                         user:password, e.g. .\\Administrator:… or DOMAIN\\deploy:…, or a password with `user` set), \
                         not a private key"
                    .into(),
            }),
            None => Err(Error::MissingCredential {
                address: self.address(target),
                reason: "smb targets need a named credential (`credential: <name>`, defined by an administrator \
                         under [credentials.<name>] where the workers run)"
                    .into(),
            }),
        }
    }

    async fn resolve(&self, target: &TargetSpec) -> Result<SocketAddr> {
        let address = self.address(target);
        let timeout = self.options.timeout();
        match tokio::time::timeout(timeout, tokio::net::lookup_host(address.clone())).await {
            Err(_) => Err(Error::Timeout { address, step: "name resolution", seconds: timeout.as_secs() }),
            Ok(Err(error)) => {
                Err(Error::Unreachable { address, reason: format!("cannot resolve the host name: {error}") })
            }
            Ok(Ok(mut addresses)) => addresses
                .next()
                .ok_or_else(|| Error::Unreachable { address, reason: "the host name has no address".into() }),
        }
    }

    async fn connect(&self, target: &TargetSpec) -> Result<Target> {
        let credentials = self.credentials(target)?;
        let socket = self.resolve(target).await?;
        let address = self.address(target);
        let session = SmbSession::connect(socket, &target.host, &credentials, self.smb_options())
            .await
            .map_err(|error| map_error(&address, "login", &credentials.user, error))?;
        Ok(Target { session, address })
    }

    fn share(&self) -> &str {
        &self.options.share
    }

    /// `<staging_dir>\<deployment_id>` under the share.
    fn folder(&self, target: &TargetSpec, deployment_id: &str) -> Result<String> {
        if !is_safe_deployment_id(deployment_id) {
            return Err(Error::Remote {
                address: self.address(target),
                reason: format!(
                    "deployment id {deployment_id:?} is not usable as a folder and service name \
                     (1-200 characters of A-Z a-z 0-9 . _ -)"
                ),
                transient: false,
            });
        }
        Ok(format!("{}\\{deployment_id}", self.options.staging_dir()))
    }

    /// The folder as the target sees it locally (`C:\Windows\Patches\fp-…`).
    fn local_folder(&self, folder: &str) -> String {
        format!("{}\\{folder}", self.options.share_path.trim_end_matches('\\'))
    }

    /// The agent service of a deployment.
    pub fn service_spec(&self, deployment_id: &str, login: Option<&Credentials>) -> ServiceSpec {
        let local = self.local_folder(&format!("{}\\{deployment_id}", self.options.staging_dir()));
        let binary_path = format!(
            "\"{local}\\{AGENT_FILE_NAME}\" service --plan \"{local}\\{plan}\" --log \"{local}\\{AGENT_LOG}\"",
            plan = fleetpatch_proto::plan::PLAN_FILE_NAME
        );
        let account = match (self.options.service_account, login) {
            (ServiceAccountChoice::Login, Some(login)) => {
                let name =
                    if login.user.contains(['\\', '@']) { login.user.clone() } else { format!(".\\{}", login.user) };
                ServiceAccount::User { name, password: login.password.clone() }
            }
            _ => ServiceAccount::LocalSystem,
        };
        ServiceSpec {
            name: service_name(deployment_id),
            display_name: format!("fleetpatch agent {deployment_id}"),
            binary_path,
            account,
        }
    }

    fn scm_timeouts(&self) -> ScmTimeouts {
        let seconds = Duration::from_secs(self.options.service_timeout_seconds);
        ScmTimeouts { state_change: seconds, marked_for_delete: seconds, ..ScmTimeouts::default() }
    }

    /// Whether the folder holds `name`; a missing folder holds nothing.
    async fn exists(&self, target: &Target, folder: &str, name: &str) -> Result<bool> {
        match target.session.list(self.share(), folder).await {
            Ok(entries) => Ok(entries.iter().any(|entry| entry.name.eq_ignore_ascii_case(name))),
            Err(error) if is_not_found(&error) => Ok(false),
            Err(error) => Err(map_error(&target.address, "stage", "", error)),
        }
    }

    async fn registry_scan(&self, target: &Target, patches: &[PatchProbe]) -> Result<registry::Detected> {
        let mut remote =
            target.session.remote_registry().await.map_err(|e| map_error(&target.address, "registry", "", e))?;
        let detected = registry::detect(&mut remote, patches).await;
        close_registry(remote).await;
        detected.map_err(|e| map_error(&target.address, "registry", "", e))
    }
}

/// Closes HKLM and the `winreg` pipe (before the session's trees go).
async fn close_registry(remote: fleetpatch_winproto::RemoteRegistry<SmbPipe>) {
    if let Ok(rpc) = remote.close().await {
        let _ = rpc.into_pipe().close().await;
    }
}

/// Closes the SCM handle and the `svcctl` pipe.
async fn close_scm(scm: fleetpatch_winproto::ServiceControlManager<SmbPipe>) {
    if let Ok(rpc) = scm.close().await {
        let _ = rpc.into_pipe().close().await;
    }
}

/// Hashes what passes through.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: AsyncRead + Unpin> AsyncRead for HashingReader<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = &poll {
            let added = &buf.filled()[before..];
            self.bytes += added.len() as u64;
            self.hasher.update(added);
        }
        poll
    }
}

fn check(name: &str, ok: bool, detail: impl Into<String>, fix: Option<String>) -> PreflightCheck {
    PreflightCheck { name: name.into(), ok, detail: detail.into(), fix: if ok { None } else { fix } }
}

#[async_trait::async_trait]
impl Transport for SmbTransport {
    fn kind(&self) -> &'static str {
        "smb"
    }

    async fn reachable(&self, target: &TargetSpec) -> Result<()> {
        fleetpatch_transport::tcp_answers(target, 445, self.options.timeout()).await
    }

    async fn probe(&self, spec: &TargetSpec, patches: &[PatchProbe]) -> Result<ProbeReport> {
        let started = Instant::now();
        let target = self.connect(spec).await?;
        let result = async {
            // Windows gives C$/ADMIN$ to local administrators only.
            let is_admin = match target.session.list(self.share(), "").await {
                Ok(_) => true,
                Err(error) if error.nt_status() == Some(NtStatus::STATUS_ACCESS_DENIED) => false,
                Err(error) => return Err(map_error(&target.address, "probe", "", error)),
            };
            let mut remote =
                target.session.remote_registry().await.map_err(|e| map_error(&target.address, "registry", "", e))?;
            let scanned = async {
                let facts = registry::facts(&mut remote).await?;
                let detected = registry::detect(&mut remote, patches).await?;
                Ok::<_, fleetpatch_winproto::Error>((facts, detected))
            }
            .await;
            close_registry(remote).await;
            let (facts, detected) = scanned.map_err(|e| map_error(&target.address, "registry", "", e))?;
            let mut details = facts.details;
            let security = target.session.security();
            details.insert("smb_dialect".into(), security.dialect.clone());
            details.insert("smb_encryption".into(), security.encryption.to_string());
            if !detected.not_applicable.is_empty() {
                details.insert("not_applicable".into(), detected.not_applicable.join("; "));
            }
            Ok(ProbeReport {
                os: "windows".into(),
                os_version: facts.version,
                arch: facts.arch,
                is_admin,
                installed: detected.installed,
                details,
                boot_id: facts.boot_id,
            })
        }
        .await;
        target.close().await;
        let report = result?;
        tracing::debug!(target_id = %spec.target_id, elapsed_ms = started.elapsed().as_millis() as u64, "smb probe done");
        Ok(report)
    }

    async fn stage(&self, spec: &TargetSpec, deployment: &Deployment) -> Result<()> {
        let started = Instant::now();
        let folder = self.folder(spec, deployment.id())?;
        let agent = deployment.agent_binary.as_deref().ok_or_else(|| Error::LocalFile {
            path: AGENT_FILE_NAME.into(),
            reason: "the smb transport stages the agent, and the deployment names none; configure \
                     worker.agent_binaries.windows-<arch>"
                .into(),
        })?;
        let mut seen = std::collections::BTreeSet::new();
        for file in &deployment.files {
            if !options::is_plain_component(&file.name)
                || RESERVED_NAMES.iter().any(|r| r.eq_ignore_ascii_case(&file.name))
                || !seen.insert(file.name.to_ascii_lowercase())
            {
                return Err(Error::LocalFile {
                    path: file.source.clone(),
                    reason: format!(
                        "staged file name {:?} is not a plain, unique Windows file name (not one of {})",
                        file.name,
                        RESERVED_NAMES.join(", ")
                    ),
                });
            }
        }
        let plan = serde_json::to_vec_pretty(&deployment.plan).map_err(|e| Error::Remote {
            address: self.address(spec),
            reason: format!("cannot serialize the deployment plan: {e}"),
            transient: false,
        })?;
        let target = self.connect(spec).await?;
        let share = self.share().to_owned();
        let result = async {
            let fail = |e| map_error(&target.address, "stage", "", e);
            target.session.mkdir_all(&share, &folder).await.map_err(fail)?;
            let mut bytes = 0u64;
            let file = tokio::fs::File::open(agent)
                .await
                .map_err(|e| Error::LocalFile { path: agent.to_path_buf(), reason: format!("cannot open: {e}") })?;
            bytes +=
                target.session.put_file(&share, &format!("{folder}\\{AGENT_FILE_NAME}"), file).await.map_err(fail)?;
            let plan_name = format!("{folder}\\{}", fleetpatch_proto::plan::PLAN_FILE_NAME);
            bytes += target.session.put_file(&share, &plan_name, plan.as_slice()).await.map_err(fail)?;
            for staged in &deployment.files {
                let file = tokio::fs::File::open(&staged.source).await.map_err(|e| Error::LocalFile {
                    path: staged.source.clone(),
                    reason: format!("cannot open: {e}"),
                })?;
                let mut reader = HashingReader { inner: file, hasher: Sha256::new(), bytes: 0 };
                let remote = format!("{folder}\\{}", staged.name);
                target.session.put_file(&share, &remote, &mut reader).await.map_err(fail)?;
                let hash = hex::encode(reader.hasher.finalize());
                if !hash.eq_ignore_ascii_case(&staged.sha256) || reader.bytes != staged.size {
                    let _ = target.session.delete(&share, &remote).await;
                    return Err(Error::LocalFile {
                        path: staged.source.clone(),
                        reason: format!(
                            "content does not match the patch: expected sha256 {} ({} bytes), the file has {hash} \
                             ({} bytes); re-upload the installer to the content store",
                            staged.sha256, staged.size, reader.bytes
                        ),
                    });
                }
                bytes += reader.bytes;
            }
            Ok(bytes)
        }
        .await;
        target.close().await;
        let bytes = result?;
        tracing::debug!(
            target_id = %spec.target_id,
            deployment_id = %deployment.id(),
            bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "smb stage done"
        );
        Ok(())
    }

    async fn start_agent(&self, spec: &TargetSpec, deployment: &Deployment) -> Result<AgentStart> {
        let folder = self.folder(spec, deployment.id())?;
        let credentials = self.credentials(spec)?;
        let service = self.service_spec(deployment.id(), Some(&credentials));
        let target = self.connect(spec).await?;
        let share = self.share().to_owned();
        let result = async {
            let fail = |e| map_error(&target.address, "start agent", "", e);
            if self.exists(&target, &folder, STARTED_MARKER).await? {
                return Ok(AgentStart::AlreadyRunning);
            }
            if !self.exists(&target, &folder, AGENT_FILE_NAME).await? {
                return Err(Error::Remote {
                    address: target.address.clone(),
                    reason: format!("the agent is not staged in {share}\\{folder}"),
                    transient: false,
                });
            }
            let marker = format!("{folder}\\{STARTED_MARKER}");
            target.session.put_file(&share, &marker, service.name.as_bytes()).await.map_err(fail)?;
            let mut scm = self
                .services
                .open(
                    &target.session,
                    scm_access::SC_MANAGER_CONNECT | scm_access::SC_MANAGER_CREATE_SERVICE,
                    self.scm_timeouts(),
                )
                .await
                .map_err(fail)?;
            // Err((error, may_have_started)): only an answer lost in transit
            // leaves it open whether the service started.
            let outcome = async {
                let created = scm.create_service(&service).await.map_err(|e| (fail(e), false))?;
                let start = match scm.start(&service.name).await {
                    Ok(()) => AgentStart::Started,
                    Err(error) if error.win32_code() == Some(Win32Error::ERROR_SERVICE_ALREADY_RUNNING) => {
                        AgentStart::AlreadyRunning
                    }
                    Err(error) => {
                        let unknown = error.win32_code().is_none() && error.rpc_fault().is_none();
                        return Err((fail(error), unknown));
                    }
                };
                // An agent that cannot read its plan stops at once; say so
                // now rather than through the watchdog later.
                let status = scm.query_status(&service.name).await.map_err(|e| (fail(e), true))?;
                if status.state() == ServiceState::Stopped && status.win32_exit_code != 0 {
                    let reason = format!(
                        "the agent service stopped right after its start: {} (service exit code {}); see {}\\{}",
                        Win32Error(status.win32_exit_code),
                        status.service_specific_exit_code,
                        self.local_folder(&folder),
                        AGENT_LOG
                    );
                    return Err((Error::Remote { address: target.address.clone(), reason, transient: false }, true));
                }
                Ok((created, start))
            }
            .await;
            scm.close().await;
            let (created, start) = match outcome {
                Ok(done) => done,
                Err((error, may_have_started)) => {
                    // The service did not start: a retried job may try again.
                    if !may_have_started {
                        if let Err(removal) = target.session.delete(&share, &marker).await {
                            tracing::warn!(error = %removal, "could not remove the agent start marker");
                        }
                    }
                    return Err(error);
                }
            };
            tracing::info!(
                target_id = %spec.target_id,
                deployment_id = %deployment.id(),
                service = %service.name,
                ?created,
                ?start,
                "smb agent service started"
            );
            Ok(start)
        }
        .await;
        target.close().await;
        result
    }

    async fn cleanup(&self, spec: &TargetSpec, deployment_id: &str, keep_files: bool) -> Result<()> {
        let folder = self.folder(spec, deployment_id)?;
        let name = service_name(deployment_id);
        let target = self.connect(spec).await?;
        let share = self.share().to_owned();
        let result = async {
            let fail = |e| map_error(&target.address, "cleanup", "", e);
            let mut scm = self
                .services
                .open(&target.session, scm_access::SC_MANAGER_CONNECT, self.scm_timeouts())
                .await
                .map_err(fail)?;
            let removed = async {
                let stopped = match scm.stop_and_wait(&name).await {
                    Err(error) if error.win32_code() == Some(Win32Error::ERROR_SERVICE_DOES_NOT_EXIST) => return Ok(()),
                    other => other,
                };
                // Deleted even when it would not stop: marked for deletion, it
                // goes once it stops and never comes back at boot.
                let deleted = scm.delete(&name).await;
                stopped.and(deleted)
            }
            .await;
            scm.close().await;
            removed.map_err(fail)?;
            if keep_files {
                return Ok(());
            }
            let entries = match target.session.list(&share, &folder).await {
                Ok(entries) => entries,
                Err(error) if is_not_found(&error) => return Ok(()),
                Err(error) => return Err(fail(error)),
            };
            for entry in entries.iter().filter(|e| !e.is_directory) {
                match target.session.delete(&share, &format!("{folder}\\{}", entry.name)).await {
                    Ok(()) => {}
                    Err(error) if is_not_found(&error) => {}
                    Err(error) => return Err(fail(error)),
                }
            }
            match target.session.delete(&share, &folder).await {
                Ok(()) => Ok(()),
                Err(error) if is_not_found(&error) => Ok(()),
                Err(error) => Err(fail(error)),
            }
        }
        .await;
        target.close().await;
        result?;
        tracing::info!(target_id = %spec.target_id, deployment_id, keep_files, "smb cleanup done");
        Ok(())
    }

    async fn verify(&self, spec: &TargetSpec, patches: &[PatchProbe]) -> Result<VerifyReport> {
        let target = self.connect(spec).await?;
        let result = self.registry_scan(&target, patches).await;
        target.close().await;
        let detected = result?;
        // Only a hotfix rule can be judged from the registry.
        let judged = |index: &u32| {
            patches.iter().any(|p| {
                p.index == *index && matches!(p.detection, Some(fleetpatch_proto::plan::Detection::Hotfix { .. }))
            })
        };
        let (missing, unknown) = detected.missing.into_iter().partition(judged);
        Ok(VerifyReport { installed: detected.installed, missing, unknown })
    }

    async fn preflight(&self, spec: &TargetSpec, context: &PreflightContext) -> Result<Vec<PreflightCheck>> {
        let _ = context;
        let mut checks = Vec::new();
        let address = self.address(spec);
        let socket = match self.resolve(spec).await {
            Ok(socket) => socket,
            Err(error) => {
                checks.push(check("port", false, error.to_string(), Some("check the host name and DNS".into())));
                return Ok(checks);
            }
        };
        match tokio::time::timeout(self.options.timeout(), tokio::net::TcpStream::connect(socket)).await {
            Ok(Ok(_)) => checks.push(check("port", true, format!("{address} accepts TCP connections"), None)),
            Ok(Err(error)) => {
                checks.push(check(
                    "port",
                    false,
                    format!("{address}: {error}"),
                    Some(
                        "nothing accepts SMB there: check that the host is up, that File and Printer Sharing is \
                         enabled and that the firewall allows TCP 445 (or the configured port) from the workers"
                            .into(),
                    ),
                ));
                return Ok(checks);
            }
            Err(_) => {
                checks.push(check(
                    "port",
                    false,
                    format!("{address}: no answer within {} s", self.options.timeout_seconds),
                    Some("a firewall drops TCP 445 between the workers and the target, or the host is down".into()),
                ));
                return Ok(checks);
            }
        }
        let target = match self.connect(spec).await {
            Ok(target) => target,
            Err(error) => {
                let fix = match &error {
                    Error::Authentication { .. } => {
                        "wrong credentials: check the user name (DOMAIN\\user or \
                                                      .\\user) and the password of the target's named credential, \
                                                      and that the account is neither disabled nor locked out"
                    }
                    Error::MissingCredential { .. } => {
                        "name a credential for the target (`credential: <name>`) whose secret is user:password"
                    }
                    _ => {
                        "the SMB session could not be set up: check that the target speaks SMB 2 or 3 and \
                          accepts signed sessions"
                    }
                };
                checks.push(check("login", false, error.to_string(), Some(fix.into())));
                return Ok(checks);
            }
        };
        let security = target.session.security().clone();
        checks.push(check(
            "login",
            true,
            format!(
                "logged in as {} ({}, signed{})",
                self.credentials(spec).map(|c| c.user).unwrap_or_default(),
                security.dialect,
                if security.encryption { ", encrypted" } else { "" }
            ),
            None,
        ));

        let share = self.share().to_owned();
        let probe_file = format!("fleetpatch-preflight-{}.tmp", spec.target_id.simple());
        let written = match target.session.put_file(&share, &probe_file, &b"fleetpatch preflight"[..]).await {
            Ok(_) => target.session.delete(&share, &probe_file).await,
            Err(error) => Err(error),
        };
        checks.push(match written {
            Ok(()) => check("admin_share", true, format!("{share} is writable (a test file was written and removed)"), None),
            Err(error) => {
                let fix = match error.nt_status() {
                    Some(NtStatus::STATUS_BAD_NETWORK_NAME) => format!(
                        "the share {share} does not exist: the admin shares are disabled (set AutoShareServer / \
                         AutoShareWks to 1 under HKLM\\SYSTEM\\CurrentControlSet\\Services\\LanmanServer\\Parameters \
                         and restart the Server service), or set [smb].share to a share that exists"
                    ),
                    Some(NtStatus::STATUS_ACCESS_DENIED) => "the account is not a local administrator on the \
                         target, or it is a local account filtered by UAC remote restrictions: set \
                         HKLM\\SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\Policies\\System\\LocalAccountTokenFilterPolicy \
                         = 1 (DWORD), or use a domain account in the local Administrators group"
                        .into(),
                    _ => "check that the share is a writable disk share with free space".into(),
                };
                check("admin_share", false, format!("writing to {share}: {error}"), Some(fix))
            }
        });

        let registry = async {
            let mut remote = target.session.remote_registry().await?;
            let version = remote.read_string(registry::CURRENT_VERSION, "CurrentVersion").await;
            close_registry(remote).await;
            version
        }
        .await;
        checks.push(match registry {
            Ok(version) => check(
                "remote_registry",
                true,
                format!("winreg answers (CurrentVersion {})", version.as_deref().unwrap_or("not set")),
                None,
            ),
            Err(error) => {
                let fix = match (error.nt_status(), error.win32_code()) {
                    (Some(NtStatus::STATUS_OBJECT_NAME_NOT_FOUND | NtStatus::STATUS_PIPE_NOT_AVAILABLE), _) => {
                        "the Remote Registry service is stopped or disabled: sc \\\\HOST config RemoteRegistry \
                         start= auto, then sc \\\\HOST start RemoteRegistry"
                    }
                    (Some(NtStatus::STATUS_ACCESS_DENIED), _) | (_, Some(Win32Error::ERROR_ACCESS_DENIED)) => {
                        "the account may not read the registry remotely: use a local administrator (and \
                         LocalAccountTokenFilterPolicy = 1 for local accounts)"
                    }
                    _ => {
                        "the remote registry did not answer: check the Remote Registry service and the firewall \
                          rules for File and Printer Sharing"
                    }
                };
                check("remote_registry", false, error.to_string(), Some(fix.into()))
            }
        });

        let scm = target
            .session
            .service_control_manager(scm_access::SC_MANAGER_CONNECT | scm_access::SC_MANAGER_CREATE_SERVICE)
            .await;
        checks.push(match scm {
            Ok(scm) => {
                close_scm(scm).await;
                check("service_manager", true, "the service manager grants the right to create services", None)
            }
            Err(error) => {
                let fix = if error.win32_code() == Some(Win32Error::ERROR_ACCESS_DENIED)
                    || error.nt_status() == Some(NtStatus::STATUS_ACCESS_DENIED)
                {
                    "the account may not create services: it must be a local administrator; for a local \
                     account set LocalAccountTokenFilterPolicy = 1 (UAC remote restrictions)"
                } else {
                    "the service manager (svcctl) did not answer: check the firewall rules for File and \
                     Printer Sharing and that the target is Windows"
                };
                check("service_manager", false, error.to_string(), Some(fix.into()))
            }
        });
        target.close().await;
        Ok(checks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials() -> Credentials {
        Credentials { user: "deploy".into(), password: "pw".into() }
    }

    #[test]
    fn the_service_runs_the_staged_agent_with_local_paths() {
        let transport = SmbTransport::new(SmbTransportOptions::default()).unwrap();
        let spec = transport.service_spec("fp-abc-1", Some(&credentials()));
        assert_eq!(spec.name, "fleetpatch-fp-abc-1");
        assert_eq!(
            spec.binary_path,
            "\"C:\\Windows\\Patches\\fp-abc-1\\fleetpatch-agent.exe\" service --plan \
             \"C:\\Windows\\Patches\\fp-abc-1\\plan.json\" --log \"C:\\Windows\\Patches\\fp-abc-1\\agent.log\""
        );
        assert_eq!(spec.account, ServiceAccount::LocalSystem);

        let admin = SmbTransport::new(SmbTransportOptions {
            share: "ADMIN$".into(),
            share_path: "C:\\Windows\\".into(),
            staging_dir: "\\Temp\\fp\\".into(),
            service_account: ServiceAccountChoice::Login,
            ..Default::default()
        })
        .unwrap();
        let spec = admin.service_spec("fp-abc-2", Some(&credentials()));
        assert!(spec.binary_path.starts_with("\"C:\\Windows\\Temp\\fp\\fp-abc-2\\fleetpatch-agent.exe\""));
        assert_eq!(spec.account, ServiceAccount::User { name: ".\\deploy".into(), password: "pw".into() });
    }

    #[test]
    fn unsafe_deployment_ids_are_refused() {
        assert!(is_safe_deployment_id("fp-0123abcd-3"));
        assert!(!is_safe_deployment_id("..\\x"));
        assert!(!is_safe_deployment_id(""));
    }
}
