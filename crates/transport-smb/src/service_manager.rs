//! Where the agent service is installed, started, stopped and deleted.
//!
//! On a Windows target that is the target's own service control manager,
//! reached over the `svcctl` pipe of the logged-in session ([`Svcctl`], what
//! the transport always uses unless it is given another).
//!
//! The seam exists because Samba, the free peer the tests run against, has
//! no `RCreateServiceW` (it answers `nca_s_op_rng_error`). The end-to-end
//! test serves a Wine prefix's `C:` as `C$` from Samba and hands the
//! transport's own calls, with the transport's own [`ServiceSpec`], to
//! Wine's service manager on the same machine (`tests/tests/windows_smb.rs`),
//! so the probe, the staging, the agent's run as a service, its reports and
//! the cleanup over SMB all happen for real.

use fleetpatch_winproto::scmr::{CreateOutcome, ScmTimeouts, ServiceStatus};
use fleetpatch_winproto::{ServiceControlManager, ServiceSpec, SmbPipe, SmbSession};

/// One open service control manager of one target.
#[async_trait::async_trait]
pub trait ServiceManager: Send {
    /// Installs the service (own process, demand start); a leftover of the
    /// same name is replaced ([`CreateOutcome::ReplacedExisting`]).
    async fn create_service(&mut self, spec: &ServiceSpec) -> fleetpatch_winproto::Result<CreateOutcome>;
    /// Starts it; `ERROR_SERVICE_ALREADY_RUNNING` when it runs.
    async fn start(&mut self, name: &str) -> fleetpatch_winproto::Result<()>;
    /// Its status; `ERROR_SERVICE_DOES_NOT_EXIST` when there is none.
    async fn query_status(&mut self, name: &str) -> fleetpatch_winproto::Result<ServiceStatus>;
    /// Stops it if it runs and waits until it has stopped.
    async fn stop_and_wait(&mut self, name: &str) -> fleetpatch_winproto::Result<()>;
    /// Deletes it; one already gone or marked for deletion counts as deleted.
    async fn delete(&mut self, name: &str) -> fleetpatch_winproto::Result<()>;
    /// Releases the handle and the pipe; errors are not the caller's concern.
    async fn close(self: Box<Self>);
}

/// Opens a target's [`ServiceManager`] in a logged-in session.
#[async_trait::async_trait]
pub trait ServiceManagers: std::fmt::Debug + Send + Sync + 'static {
    async fn open(
        &self,
        session: &SmbSession,
        desired_access: u32,
        timeouts: ScmTimeouts,
    ) -> fleetpatch_winproto::Result<Box<dyn ServiceManager>>;
}

/// The target's own service control manager over `svcctl` (MS-SCMR).
#[derive(Debug, Clone, Copy, Default)]
pub struct Svcctl;

#[async_trait::async_trait]
impl ServiceManagers for Svcctl {
    async fn open(
        &self,
        session: &SmbSession,
        desired_access: u32,
        timeouts: ScmTimeouts,
    ) -> fleetpatch_winproto::Result<Box<dyn ServiceManager>> {
        let scm = session.service_control_manager(desired_access).await?.with_timeouts(timeouts);
        Ok(Box::new(scm))
    }
}

#[async_trait::async_trait]
impl ServiceManager for ServiceControlManager<SmbPipe> {
    async fn create_service(&mut self, spec: &ServiceSpec) -> fleetpatch_winproto::Result<CreateOutcome> {
        ServiceControlManager::create_service(self, spec).await
    }

    async fn start(&mut self, name: &str) -> fleetpatch_winproto::Result<()> {
        ServiceControlManager::start(self, name, &[]).await
    }

    async fn query_status(&mut self, name: &str) -> fleetpatch_winproto::Result<ServiceStatus> {
        ServiceControlManager::query_status(self, name).await
    }

    async fn stop_and_wait(&mut self, name: &str) -> fleetpatch_winproto::Result<()> {
        ServiceControlManager::stop_and_wait(self, name).await
    }

    async fn delete(&mut self, name: &str) -> fleetpatch_winproto::Result<()> {
        ServiceControlManager::delete(self, name).await
    }

    async fn close(self: Box<Self>) {
        if let Ok(rpc) = ServiceControlManager::close(*self).await {
            let _ = rpc.into_pipe().close().await;
        }
    }
}
