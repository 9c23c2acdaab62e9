//! [`ServiceControlManager`]: installs, starts, watches, stops and removes
//! a service over `svcctl`, and lists the target's services; and what it
//! installs ([`ServiceSpec`], [`ServiceAccount`]).

use std::time::Duration;

use super::enum_services::grow_enum_buffer;
use super::{
    access, constants, opnum, ControlServiceRequest, CreateServiceRequest, CreateServiceResponse, EnumServiceStatus,
    EnumServicesStatusRequest, EnumServicesStatusResponse, HandleRequest, HandleResponse, OpenScManagerRequest,
    OpenServiceRequest, ServiceState, ServiceStatus, ServiceStatusResponse, StartServiceRequest, StatusResponse,
    INITIAL_ENUM_BUFFER, MAX_ENUM_BUFFER, MAX_ENUM_CALLS,
};
use crate::dcerpc::{PipeIo, RpcClient};
use crate::error::{Error, Result, Win32Error};
use crate::ndr::ContextHandle;

/// The account a service runs as.
#[derive(Clone, PartialEq, Eq)]
pub enum ServiceAccount {
    /// `LocalSystem` (no name and no password on the wire).
    LocalSystem,
    /// A named account (`DOMAIN\user` or `.\user`) that holds local admin and
    /// "log on as a service".
    User { name: String, password: String },
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServiceAccount::LocalSystem => write!(f, "LocalSystem"),
            ServiceAccount::User { name, .. } => {
                write!(f, "User {{ name: {name:?}, password: <redacted> }}")
            }
        }
    }
}

/// What to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Unique per deployment (max 256 characters, no `/` or `\`).
    pub name: String,
    pub display_name: String,
    /// Full command line of the agent, quoted as needed.
    pub binary_path: String,
    pub account: ServiceAccount,
}

impl ServiceSpec {
    /// The RCreateServiceW request for this spec: own process, demand start,
    /// normal error control.
    pub fn create_request(&self, sc_manager: ContextHandle) -> Result<CreateServiceRequest> {
        if self.name.is_empty() || self.name.chars().count() > 256 || self.name.contains(['/', '\\', '\0']) {
            return Err(Error::InvalidArgument(format!(
                "service name {:?} must be 1 to 256 characters without '/', '\\' or NUL",
                self.name
            )));
        }
        if self.binary_path.contains('\0') || self.display_name.contains('\0') {
            return Err(Error::InvalidArgument("service binary path and display name must not contain NUL".into()));
        }
        let (service_start_name, password) = match &self.account {
            ServiceAccount::LocalSystem => (None, None),
            ServiceAccount::User { name, password } => (
                Some(name.clone()),
                Some(crate::ndr::utf16_units(password, true).into_iter().flat_map(u16::to_le_bytes).collect()),
            ),
        };
        Ok(CreateServiceRequest {
            sc_manager,
            service_name: self.name.clone(),
            display_name: Some(self.display_name.clone()),
            desired_access: access::SERVICE_ALL_ACCESS,
            service_type: constants::SERVICE_WIN32_OWN_PROCESS,
            start_type: constants::SERVICE_DEMAND_START,
            error_control: constants::SERVICE_ERROR_NORMAL,
            binary_path_name: self.binary_path.clone(),
            load_order_group: None,
            tag_id: None,
            dependencies: None,
            service_start_name,
            password,
        })
    }
}

/// What [`ServiceControlManager::create_service`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateOutcome {
    Created,
    /// A service of that name existed (a leftover of an earlier attempt of
    /// the same deployment); it was stopped, deleted and created anew.
    ReplacedExisting,
}

/// How long to wait for state changes and for a service marked for deletion
/// to disappear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScmTimeouts {
    pub state_change: Duration,
    pub marked_for_delete: Duration,
    pub poll_interval: Duration,
}

impl Default for ScmTimeouts {
    fn default() -> Self {
        ScmTimeouts {
            state_change: Duration::from_secs(30),
            marked_for_delete: Duration::from_secs(30),
            poll_interval: Duration::from_millis(250),
        }
    }
}

/// A handle to the SCM on a target over `svcctl`.
///
/// Service handles are opened per operation and closed afterwards.
#[derive(Debug)]
pub struct ServiceControlManager<P> {
    rpc: RpcClient<P>,
    handle: ContextHandle,
    timeouts: ScmTimeouts,
}

fn check(status: Win32Error, operation: &'static str) -> Result<()> {
    if status == Win32Error::ERROR_SUCCESS {
        Ok(())
    } else {
        Err(Error::Win32 { operation, code: status })
    }
}

impl<P: PipeIo> ServiceControlManager<P> {
    /// ROpenSCManagerW on `ServicesActive` with `desired_access`
    /// ([`access::SC_MANAGER_ALL_ACCESS`] to install services).
    pub async fn open(mut rpc: RpcClient<P>, machine_name: Option<&str>, desired_access: u32) -> Result<Self> {
        let request = OpenScManagerRequest {
            machine_name: machine_name.map(str::to_owned),
            database_name: Some("ServicesActive".into()),
            desired_access,
        };
        let stub = rpc.call(opnum::R_OPEN_SC_MANAGER_W, &request.encode()).await?;
        let reply = HandleResponse::decode(&stub)?;
        check(reply.status, "ROpenSCManagerW")?;
        Ok(ServiceControlManager { rpc, handle: reply.handle, timeouts: ScmTimeouts::default() })
    }

    /// Replaces the default timeouts.
    pub fn with_timeouts(mut self, timeouts: ScmTimeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    async fn open_service(&mut self, name: &str, desired_access: u32) -> Result<ContextHandle> {
        let request = OpenServiceRequest { sc_manager: self.handle, service_name: name.to_owned(), desired_access };
        let stub = self.rpc.call(opnum::R_OPEN_SERVICE_W, &request.encode()).await?;
        let reply = HandleResponse::decode(&stub)?;
        check(reply.status, "ROpenServiceW")?;
        Ok(reply.handle)
    }

    async fn close_handle(&mut self, handle: ContextHandle) -> Result<()> {
        let stub = self.rpc.call(opnum::R_CLOSE_SERVICE_HANDLE, &HandleRequest { handle }.encode()).await?;
        check(HandleResponse::decode(&stub)?.status, "RCloseServiceHandle")
    }

    /// Closes `handle`, keeping the operation's error first.
    async fn finish<T>(&mut self, handle: ContextHandle, result: Result<T>) -> Result<T> {
        let closed = self.close_handle(handle).await;
        let value = result?;
        closed?;
        Ok(value)
    }

    async fn query_on(&mut self, service: ContextHandle) -> Result<ServiceStatus> {
        let stub = self.rpc.call(opnum::R_QUERY_SERVICE_STATUS, &HandleRequest { handle: service }.encode()).await?;
        let reply = ServiceStatusResponse::decode(&stub)?;
        check(reply.status, "RQueryServiceStatus")?;
        Ok(reply.service_status)
    }

    /// Whether a service of that name exists.
    pub async fn service_exists(&mut self, name: &str) -> Result<bool> {
        match self.open_service(name, access::SERVICE_QUERY_STATUS).await {
            Ok(handle) => {
                self.close_handle(handle).await?;
                Ok(true)
            }
            Err(error) if error.win32_code() == Some(Win32Error::ERROR_SERVICE_DOES_NOT_EXIST) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// RQueryServiceStatus.
    pub async fn query_status(&mut self, name: &str) -> Result<ServiceStatus> {
        let service = self.open_service(name, access::SERVICE_QUERY_STATUS).await?;
        let result = self.query_on(service).await;
        self.finish(service, result).await
    }

    /// The target's Win32 services (own-process and share-process) in every
    /// state, by REnumServicesStatusW. Needs an SCM opened with
    /// [`access::SC_MANAGER_ENUMERATE_SERVICE`] (else `ERROR_ACCESS_DENIED`).
    pub async fn list_services(&mut self) -> Result<Vec<EnumServiceStatus>> {
        self.enumerate_services(constants::SERVICE_WIN32, constants::SERVICE_STATE_ALL, INITIAL_ENUM_BUFFER).await
    }

    /// REnumServicesStatusW until every service is listed, starting with a
    /// buffer of `initial_buffer_size` bytes.
    ///
    /// On ERROR_MORE_DATA with no service returned (Samba's answer: all or
    /// nothing), the buffer grows to `pcbBytesNeeded`, bounded by
    /// [`MAX_ENUM_BUFFER`]. On ERROR_MORE_DATA with services (Windows'
    /// answer: as many as fit), those are kept and the next call resumes at
    /// the returned `lpResumeIndex`. At most [`MAX_ENUM_CALLS`] calls; a
    /// server that asks for more than [`MAX_ENUM_BUFFER`] for one batch, or
    /// for no more than it was offered, is an error.
    pub async fn enumerate_services(
        &mut self,
        service_type: u32,
        service_state: u32,
        initial_buffer_size: u32,
    ) -> Result<Vec<EnumServiceStatus>> {
        let mut services = Vec::new();
        let mut buffer_size = initial_buffer_size.min(MAX_ENUM_BUFFER);
        let mut resume_index = 0;
        for _ in 0..MAX_ENUM_CALLS {
            let request = EnumServicesStatusRequest {
                sc_manager: self.handle,
                service_type,
                service_state,
                buffer_size,
                resume_index: Some(resume_index),
            };
            let stub = self.rpc.call(opnum::R_ENUM_SERVICES_STATUS_W, &request.encode()).await?;
            let reply = EnumServicesStatusResponse::decode(&stub)?;
            match reply.status {
                Win32Error::ERROR_SUCCESS => {
                    services.extend(reply.services()?);
                    return Ok(services);
                }
                Win32Error::ERROR_MORE_DATA => {
                    let batch = reply.services()?;
                    if batch.is_empty() {
                        buffer_size = grow_enum_buffer(buffer_size, reply.bytes_needed)?;
                        continue;
                    }
                    resume_index = reply.resume_index.ok_or_else(|| {
                        Error::malformed(
                            "REnumServicesStatusW reply",
                            "ERROR_MORE_DATA with services but no resume index to continue from",
                        )
                    })?;
                    services.extend(batch);
                    buffer_size = buffer_size.max(reply.bytes_needed.min(MAX_ENUM_BUFFER));
                }
                code => return Err(Error::Win32 { operation: "REnumServicesStatusW", code }),
            }
        }
        Err(Error::malformed(
            "REnumServicesStatusW reply",
            format!("still ERROR_MORE_DATA after {MAX_ENUM_CALLS} calls ({} services so far)", services.len()),
        ))
    }

    /// RStartServiceW. A running service gives
    /// `ERROR_SERVICE_ALREADY_RUNNING` (see [`Error::win32_code`]).
    pub async fn start(&mut self, name: &str, arguments: &[String]) -> Result<()> {
        let service = self.open_service(name, access::SERVICE_START).await?;
        let request = StartServiceRequest { service, arguments: arguments.to_vec() };
        let result = match self.rpc.call(opnum::R_START_SERVICE_W, &request.encode()).await {
            Ok(stub) => StatusResponse::decode(&stub).and_then(|reply| check(reply.status, "RStartServiceW")),
            Err(error) => Err(error),
        };
        self.finish(service, result).await
    }

    /// RControlService(SERVICE_CONTROL_STOP); returns the status the SCM
    /// reports right after the control. A stopped service gives
    /// `ERROR_SERVICE_NOT_ACTIVE`.
    pub async fn stop(&mut self, name: &str) -> Result<ServiceStatus> {
        let service = self.open_service(name, access::SERVICE_STOP | access::SERVICE_QUERY_STATUS).await?;
        let result = self.control_on(service, constants::SERVICE_CONTROL_STOP).await;
        self.finish(service, result).await
    }

    async fn control_on(&mut self, service: ContextHandle, control: u32) -> Result<ServiceStatus> {
        let request = ControlServiceRequest { service, control };
        let stub = self.rpc.call(opnum::R_CONTROL_SERVICE, &request.encode()).await?;
        let reply = ServiceStatusResponse::decode(&stub)?;
        check(reply.status, "RControlService")?;
        Ok(reply.service_status)
    }

    /// Polls until the service reaches `wanted` or the state-change timeout
    /// passes.
    pub async fn wait_for_state(&mut self, name: &str, wanted: ServiceState) -> Result<ServiceStatus> {
        let deadline = tokio::time::Instant::now() + self.timeouts.state_change;
        loop {
            let status = self.query_status(name).await?;
            if status.state() == wanted {
                return Ok(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Win32 {
                    operation: "waiting for the service state",
                    code: Win32Error::ERROR_SERVICE_REQUEST_TIMEOUT,
                });
            }
            tokio::time::sleep(self.timeouts.poll_interval).await;
        }
    }

    /// Stops the service if it runs and waits until it is stopped. A service
    /// that is not active is fine.
    pub async fn stop_and_wait(&mut self, name: &str) -> Result<()> {
        match self.stop(name).await {
            Ok(_) => {}
            Err(error) if error.win32_code() == Some(Win32Error::ERROR_SERVICE_NOT_ACTIVE) => return Ok(()),
            Err(error) => return Err(error),
        }
        self.wait_for_state(name, ServiceState::Stopped).await?;
        Ok(())
    }

    /// RDeleteService. A service already marked for deletion, or already
    /// gone, counts as deleted.
    pub async fn delete(&mut self, name: &str) -> Result<()> {
        let service = match self.open_service(name, access::DELETE).await {
            Ok(service) => service,
            Err(error) if error.win32_code() == Some(Win32Error::ERROR_SERVICE_DOES_NOT_EXIST) => return Ok(()),
            Err(error) => return Err(error),
        };
        let result = match self.rpc.call(opnum::R_DELETE_SERVICE, &HandleRequest { handle: service }.encode()).await {
            Ok(stub) => StatusResponse::decode(&stub).and_then(|reply| match reply.status {
                Win32Error::ERROR_SUCCESS | Win32Error::ERROR_SERVICE_MARKED_FOR_DELETE => Ok(()),
                code => Err(Error::Win32 { operation: "RDeleteService", code }),
            }),
            Err(error) => Err(error),
        };
        self.finish(service, result).await
    }

    async fn create_once(&mut self, spec: &ServiceSpec) -> Result<()> {
        let request = spec.create_request(self.handle)?;
        let stub = self.rpc.call(opnum::R_CREATE_SERVICE_W, &request.encode()).await?;
        let reply = CreateServiceResponse::decode(&stub)?;
        check(reply.status, "RCreateServiceW")?;
        self.close_handle(reply.handle).await
    }

    /// Installs the service (own process, demand start).
    ///
    /// * `ERROR_SERVICE_EXISTS`: the name is unique per deployment, so the
    ///   existing service is a leftover of an earlier attempt: it is stopped,
    ///   deleted and created again ([`CreateOutcome::ReplacedExisting`]).
    /// * `ERROR_SERVICE_MARKED_FOR_DELETE`: the old service disappears once
    ///   every handle to it is closed; creation is retried until the
    ///   `marked_for_delete` timeout, then the error is returned.
    pub async fn create_service(&mut self, spec: &ServiceSpec) -> Result<CreateOutcome> {
        let deadline = tokio::time::Instant::now() + self.timeouts.marked_for_delete;
        let mut outcome = CreateOutcome::Created;
        loop {
            match self.create_once(spec).await {
                Ok(()) => return Ok(outcome),
                Err(error) => match error.win32_code() {
                    Some(Win32Error::ERROR_SERVICE_EXISTS) if outcome == CreateOutcome::Created => {
                        tracing::info!(service = %spec.name, "service exists, replacing it");
                        outcome = CreateOutcome::ReplacedExisting;
                        self.stop_and_wait(&spec.name).await?;
                        self.delete(&spec.name).await?;
                    }
                    Some(Win32Error::ERROR_SERVICE_EXISTS) | Some(Win32Error::ERROR_SERVICE_MARKED_FOR_DELETE)
                        if tokio::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(self.timeouts.poll_interval).await;
                    }
                    _ => return Err(error),
                },
            }
        }
    }

    /// Closes the SCM handle and gives the RPC client back.
    pub async fn close(mut self) -> Result<RpcClient<P>> {
        let handle = self.handle;
        self.close_handle(handle).await?;
        Ok(self.rpc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_password_is_not_printed() {
        let account = ServiceAccount::User { name: ".\\deploy".into(), password: "hunter2".into() };
        assert!(!format!("{account:?}").contains("hunter2"));
    }

    #[test]
    fn bad_service_names_are_refused() {
        let spec = ServiceSpec {
            name: "a\\b".into(),
            display_name: "x".into(),
            binary_path: "c:\\x.exe".into(),
            account: ServiceAccount::LocalSystem,
        };
        assert!(matches!(spec.create_request(ContextHandle::NULL), Err(Error::InvalidArgument(_))));
    }
}
