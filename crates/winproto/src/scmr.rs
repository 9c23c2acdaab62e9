//! MS-SCMR (Service Control Manager Remote, interface `svcctl` on
//! `\PIPE\svcctl`): the NDR32 stubs of the eight calls the product uses, and
//! [`ServiceControlManager`], which installs, starts, watches, stops and
//! removes the temporary agent service.
//!
//! Owns: the request/response layouts of RCloseServiceHandle (0),
//! RControlService (1), RDeleteService (2), RQueryServiceStatus (6),
//! RCreateServiceW (12), ROpenSCManagerW (15), ROpenServiceW (16) and
//! RStartServiceW (19); the policy for services that already exist or are
//! marked for deletion.
//!
//! Samba implements open/query/start/stop but not RCreateServiceW nor
//! RDeleteService (it answers `nca_s_op_rng_error`), so those two are
//! checked byte for byte against Impacket's encoder only.

use std::time::Duration;

use crate::dcerpc::{Interface, PipeIo, RpcClient, SyntaxId, Uuid};
use crate::error::{Error, Result, Win32Error};
use crate::ndr::{ContextHandle, NdrReader, NdrWriter};

/// The `svcctl` interface, v2.0.
pub const SVCCTL: Interface = Interface {
    name: "svcctl",
    pipe: "svcctl",
    syntax: SyntaxId {
        uuid: Uuid::parse_const("367abb81-9844-35f1-ad32-98f038001003"),
        version_major: 2,
        version_minor: 0,
    },
};

/// Operation numbers.
pub mod opnum {
    pub const R_CLOSE_SERVICE_HANDLE: u16 = 0;
    pub const R_CONTROL_SERVICE: u16 = 1;
    pub const R_DELETE_SERVICE: u16 = 2;
    pub const R_QUERY_SERVICE_STATUS: u16 = 6;
    pub const R_CREATE_SERVICE_W: u16 = 12;
    pub const R_OPEN_SC_MANAGER_W: u16 = 15;
    pub const R_OPEN_SERVICE_W: u16 = 16;
    pub const R_START_SERVICE_W: u16 = 19;
}

/// Access rights.
pub mod access {
    pub const SC_MANAGER_CONNECT: u32 = 0x0001;
    pub const SC_MANAGER_CREATE_SERVICE: u32 = 0x0002;
    pub const SC_MANAGER_ENUMERATE_SERVICE: u32 = 0x0004;
    pub const SC_MANAGER_ALL_ACCESS: u32 = 0x000F_003F;
    pub const SERVICE_QUERY_CONFIG: u32 = 0x0001;
    pub const SERVICE_CHANGE_CONFIG: u32 = 0x0002;
    pub const SERVICE_QUERY_STATUS: u32 = 0x0004;
    pub const SERVICE_START: u32 = 0x0010;
    pub const SERVICE_STOP: u32 = 0x0020;
    pub const DELETE: u32 = 0x0001_0000;
    pub const SERVICE_ALL_ACCESS: u32 = 0x000F_01FF;
}

/// Service types, start types, error control, controls.
pub mod constants {
    pub const SERVICE_WIN32_OWN_PROCESS: u32 = 0x10;
    pub const SERVICE_AUTO_START: u32 = 2;
    pub const SERVICE_DEMAND_START: u32 = 3;
    pub const SERVICE_ERROR_IGNORE: u32 = 0;
    pub const SERVICE_ERROR_NORMAL: u32 = 1;
    pub const SERVICE_CONTROL_STOP: u32 = 1;
    pub const SERVICE_CONTROL_INTERROGATE: u32 = 4;
}

/// `dwCurrentState` of SERVICE_STATUS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceState {
    Stopped,
    StartPending,
    StopPending,
    Running,
    ContinuePending,
    PausePending,
    Paused,
    /// A value outside MS-SCMR 2.2.47.
    Unknown(u32),
}

impl ServiceState {
    pub fn from_u32(value: u32) -> Self {
        match value {
            1 => ServiceState::Stopped,
            2 => ServiceState::StartPending,
            3 => ServiceState::StopPending,
            4 => ServiceState::Running,
            5 => ServiceState::ContinuePending,
            6 => ServiceState::PausePending,
            7 => ServiceState::Paused,
            other => ServiceState::Unknown(other),
        }
    }
}

/// SERVICE_STATUS (MS-SCMR 2.2.47).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServiceStatus {
    pub service_type: u32,
    pub current_state: u32,
    pub controls_accepted: u32,
    pub win32_exit_code: u32,
    pub service_specific_exit_code: u32,
    pub check_point: u32,
    pub wait_hint: u32,
}

impl ServiceStatus {
    fn read(reader: &mut NdrReader<'_>) -> Result<Self> {
        Ok(ServiceStatus {
            service_type: reader.read_u32()?,
            current_state: reader.read_u32()?,
            controls_accepted: reader.read_u32()?,
            win32_exit_code: reader.read_u32()?,
            service_specific_exit_code: reader.read_u32()?,
            check_point: reader.read_u32()?,
            wait_hint: reader.read_u32()?,
        })
    }

    pub fn state(&self) -> ServiceState {
        ServiceState::from_u32(self.current_state)
    }
}

fn write_optional_wide_string(writer: &mut NdrWriter, text: Option<&str>) {
    writer.write_unique_pointer(text.is_some());
    if let Some(text) = text {
        writer.write_wide_string(text);
    }
}

fn write_optional_bytes(writer: &mut NdrWriter, bytes: Option<&[u8]>) {
    writer.write_unique_pointer(bytes.is_some());
    if let Some(bytes) = bytes {
        writer.write_conformant_bytes(bytes);
    }
}

/// ROpenSCManagerW.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenScManagerRequest {
    pub machine_name: Option<String>,
    pub database_name: Option<String>,
    pub desired_access: u32,
}

impl OpenScManagerRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut writer = NdrWriter::new();
        write_optional_wide_string(&mut writer, self.machine_name.as_deref());
        write_optional_wide_string(&mut writer, self.database_name.as_deref());
        writer.write_u32(self.desired_access);
        writer.into_bytes()
    }
}

/// The reply of calls that return a handle (ROpenSCManagerW, ROpenServiceW,
/// RCloseServiceHandle).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandleResponse {
    pub handle: ContextHandle,
    pub status: Win32Error,
}

impl HandleResponse {
    pub fn decode(stub: &[u8]) -> Result<Self> {
        let mut reader = NdrReader::new(stub, "svcctl handle reply");
        let handle = reader.read_context_handle()?;
        let status = Win32Error(reader.read_u32()?);
        reader.finish()?;
        Ok(HandleResponse { handle, status })
    }
}

/// ROpenServiceW.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenServiceRequest {
    pub sc_manager: ContextHandle,
    pub service_name: String,
    pub desired_access: u32,
}

impl OpenServiceRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut writer = NdrWriter::new();
        writer.write_context_handle(&self.sc_manager);
        writer.write_wide_string(&self.service_name);
        writer.write_u32(self.desired_access);
        writer.into_bytes()
    }
}

/// RCreateServiceW (MS-SCMR 3.1.4.12).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateServiceRequest {
    pub sc_manager: ContextHandle,
    pub service_name: String,
    pub display_name: Option<String>,
    pub desired_access: u32,
    pub service_type: u32,
    pub start_type: u32,
    pub error_control: u32,
    pub binary_path_name: String,
    pub load_order_group: Option<String>,
    pub tag_id: Option<u32>,
    /// Double-NUL-terminated UTF-16LE list, as bytes.
    pub dependencies: Option<Vec<u8>>,
    pub service_start_name: Option<String>,
    /// Password bytes as they go on the wire.
    pub password: Option<Vec<u8>>,
}

impl CreateServiceRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut writer = NdrWriter::new();
        writer.write_context_handle(&self.sc_manager);
        writer.write_wide_string(&self.service_name);
        write_optional_wide_string(&mut writer, self.display_name.as_deref());
        writer.write_u32(self.desired_access);
        writer.write_u32(self.service_type);
        writer.write_u32(self.start_type);
        writer.write_u32(self.error_control);
        writer.write_wide_string(&self.binary_path_name);
        write_optional_wide_string(&mut writer, self.load_order_group.as_deref());
        writer.write_unique_pointer(self.tag_id.is_some());
        if let Some(tag) = self.tag_id {
            writer.write_u32(tag);
        }
        write_optional_bytes(&mut writer, self.dependencies.as_deref());
        writer.write_u32(self.dependencies.as_ref().map_or(0, |d| d.len() as u32));
        write_optional_wide_string(&mut writer, self.service_start_name.as_deref());
        write_optional_bytes(&mut writer, self.password.as_deref());
        writer.write_u32(self.password.as_ref().map_or(0, |p| p.len() as u32));
        writer.into_bytes()
    }
}

/// RCreateServiceW reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateServiceResponse {
    pub tag_id: Option<u32>,
    pub handle: ContextHandle,
    pub status: Win32Error,
}

impl CreateServiceResponse {
    pub fn decode(stub: &[u8]) -> Result<Self> {
        let mut reader = NdrReader::new(stub, "RCreateServiceW reply");
        let tag_id = if reader.read_unique_pointer()? { Some(reader.read_u32()?) } else { None };
        let handle = reader.read_context_handle()?;
        let status = Win32Error(reader.read_u32()?);
        reader.finish()?;
        Ok(CreateServiceResponse { tag_id, handle, status })
    }
}

/// RStartServiceW.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartServiceRequest {
    pub service: ContextHandle,
    pub arguments: Vec<String>,
}

impl StartServiceRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut writer = NdrWriter::new();
        writer.write_context_handle(&self.service);
        writer.write_u32(self.arguments.len() as u32);
        writer.write_unique_pointer(!self.arguments.is_empty());
        if !self.arguments.is_empty() {
            writer.write_u32(self.arguments.len() as u32);
            for _ in &self.arguments {
                writer.write_unique_pointer(true);
            }
            for argument in &self.arguments {
                writer.write_wide_string(argument);
            }
        }
        writer.into_bytes()
    }
}

/// A request that carries only a handle (RQueryServiceStatus,
/// RDeleteService, RCloseServiceHandle).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandleRequest {
    pub handle: ContextHandle,
}

impl HandleRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut writer = NdrWriter::new();
        writer.write_context_handle(&self.handle);
        writer.into_bytes()
    }
}

/// RControlService.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlServiceRequest {
    pub service: ContextHandle,
    pub control: u32,
}

impl ControlServiceRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut writer = NdrWriter::new();
        writer.write_context_handle(&self.service);
        writer.write_u32(self.control);
        writer.into_bytes()
    }
}

/// The reply of RQueryServiceStatus and RControlService.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceStatusResponse {
    pub service_status: ServiceStatus,
    pub status: Win32Error,
}

impl ServiceStatusResponse {
    pub fn decode(stub: &[u8]) -> Result<Self> {
        let mut reader = NdrReader::new(stub, "svcctl service status reply");
        let service_status = ServiceStatus::read(&mut reader)?;
        let status = Win32Error(reader.read_u32()?);
        reader.finish()?;
        Ok(ServiceStatusResponse { service_status, status })
    }
}

/// The reply of calls that return only a status (RStartServiceW,
/// RDeleteService).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusResponse {
    pub status: Win32Error,
}

impl StatusResponse {
    pub fn decode(stub: &[u8]) -> Result<Self> {
        let mut reader = NdrReader::new(stub, "svcctl status reply");
        let status = Win32Error(reader.read_u32()?);
        reader.finish()?;
        Ok(StatusResponse { status })
    }
}

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

    #[test]
    fn states_decode() {
        assert_eq!(ServiceState::from_u32(4), ServiceState::Running);
        assert_eq!(ServiceState::from_u32(1), ServiceState::Stopped);
        assert_eq!(ServiceState::from_u32(99), ServiceState::Unknown(99));
    }
}
