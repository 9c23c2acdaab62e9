//! MS-SCMR (Service Control Manager Remote, interface `svcctl` on
//! `\PIPE\svcctl`): the NDR32 stubs of the nine calls the product uses, and
//! [`ServiceControlManager`], which installs, starts, watches, stops and
//! removes the temporary agent service, and lists the target's services.
//!
//! Owns: the request/response layouts of RCloseServiceHandle (0),
//! RControlService (1), RDeleteService (2), RQueryServiceStatus (6),
//! RCreateServiceW (12), REnumServicesStatusW (14), ROpenSCManagerW (15),
//! ROpenServiceW (16) and RStartServiceW (19); the decoding of the
//! ENUM_SERVICE_STATUSW buffer; the policy for services that already exist
//! or are marked for deletion.
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
    pub const R_ENUM_SERVICES_STATUS_W: u16 = 14;
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

/// Service types, start types, error control, controls, enumeration
/// states.
pub mod constants {
    pub const SERVICE_KERNEL_DRIVER: u32 = 0x01;
    pub const SERVICE_FILE_SYSTEM_DRIVER: u32 = 0x02;
    pub const SERVICE_WIN32_OWN_PROCESS: u32 = 0x10;
    pub const SERVICE_WIN32_SHARE_PROCESS: u32 = 0x20;
    /// Own-process and share-process services.
    pub const SERVICE_WIN32: u32 = SERVICE_WIN32_OWN_PROCESS | SERVICE_WIN32_SHARE_PROCESS;
    pub const SERVICE_INTERACTIVE_PROCESS: u32 = 0x100;
    pub const SERVICE_AUTO_START: u32 = 2;
    pub const SERVICE_DEMAND_START: u32 = 3;
    pub const SERVICE_ERROR_IGNORE: u32 = 0;
    pub const SERVICE_ERROR_NORMAL: u32 = 1;
    pub const SERVICE_CONTROL_STOP: u32 = 1;
    pub const SERVICE_CONTROL_INTERROGATE: u32 = 4;
    /// `dwServiceState` of REnumServicesStatusW: running, pending or paused.
    pub const SERVICE_ACTIVE: u32 = 1;
    /// `dwServiceState` of REnumServicesStatusW: stopped.
    pub const SERVICE_INACTIVE: u32 = 2;
    /// `dwServiceState` of REnumServicesStatusW: every state.
    pub const SERVICE_STATE_ALL: u32 = 3;
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

/// Largest `cbBufSize` of REnumServicesStatusW: the IDL declares it
/// `range(0, 1024 * 256)`, and a server refuses more (Samba faults with
/// `rpc_x_bad_stub_data`). Also the largest reply buffer accepted.
pub const MAX_ENUM_BUFFER: u32 = 256 * 1024;

/// The first buffer [`ServiceControlManager::list_services`] offers: room
/// for about 150 services with typical names.
pub const INITIAL_ENUM_BUFFER: u32 = 16 * 1024;

/// Most REnumServicesStatusW calls one listing makes (each either grows the
/// buffer or returns services).
pub const MAX_ENUM_CALLS: usize = 64;

/// Bytes of one ENUM_SERVICE_STATUSW in the reply buffer: two 32-bit string
/// offsets and a SERVICE_STATUS.
pub const ENUM_SERVICE_STATUS_SIZE: usize = 36;

/// Longest service or display name read from an enumeration buffer, in
/// UTF-16 units without the NUL: four times the 256 characters Windows
/// allows for either name.
pub const MAX_SERVICE_NAME_UNITS: usize = 1024;

/// REnumServicesStatusW (MS-SCMR 3.1.4.14): asks for the services of
/// `service_type` in `service_state`, with room for `buffer_size` bytes
/// (at most [`MAX_ENUM_BUFFER`]), resuming at `resume_index` (`None` sends
/// a NULL `lpResumeIndex`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnumServicesStatusRequest {
    pub sc_manager: ContextHandle,
    pub service_type: u32,
    pub service_state: u32,
    pub buffer_size: u32,
    pub resume_index: Option<u32>,
}

impl EnumServicesStatusRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut writer = NdrWriter::new();
        writer.write_context_handle(&self.sc_manager);
        writer.write_u32(self.service_type);
        writer.write_u32(self.service_state);
        writer.write_u32(self.buffer_size);
        writer.write_unique_pointer(self.resume_index.is_some());
        if let Some(index) = self.resume_index {
            writer.write_u32(index);
        }
        writer.into_bytes()
    }
}

/// REnumServicesStatusW reply. `buffer` is the raw `lpBuffer`; decode it
/// with [`EnumServicesStatusResponse::services`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnumServicesStatusResponse {
    pub buffer: Vec<u8>,
    /// `pcbBytesNeeded`: with ERROR_MORE_DATA, the bytes needed for the
    /// services not returned yet. (Samba answers the offered size on
    /// success.)
    pub bytes_needed: u32,
    pub services_returned: u32,
    pub resume_index: Option<u32>,
    pub status: Win32Error,
}

impl EnumServicesStatusResponse {
    pub fn decode(stub: &[u8]) -> Result<Self> {
        let mut reader = NdrReader::new(stub, "REnumServicesStatusW reply");
        let buffer = reader.read_conformant_bytes()?;
        if buffer.len() > MAX_ENUM_BUFFER as usize {
            return Err(Error::malformed(
                "REnumServicesStatusW reply",
                format!("lpBuffer of {} bytes exceeds the {MAX_ENUM_BUFFER} bytes MS-SCMR allows", buffer.len()),
            ));
        }
        let bytes_needed = reader.read_u32()?;
        let services_returned = reader.read_u32()?;
        let resume_index = if reader.read_unique_pointer()? { Some(reader.read_u32()?) } else { None };
        let status = Win32Error(reader.read_u32()?);
        reader.finish()?;
        Ok(EnumServicesStatusResponse { buffer, bytes_needed, services_returned, resume_index, status })
    }

    /// The `services_returned` entries of the buffer.
    pub fn services(&self) -> Result<Vec<EnumServiceStatus>> {
        decode_enum_service_buffer(&self.buffer, self.services_returned)
    }
}

/// One ENUM_SERVICE_STATUSW (MS-SCMR 2.2.11), decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnumServiceStatus {
    pub service_name: String,
    pub display_name: String,
    pub status: ServiceStatus,
}

impl EnumServiceStatus {
    /// The service's current state.
    pub fn state(&self) -> ServiceState {
        self.status.state()
    }
}

const ENUM_BUFFER: &str = "ENUM_SERVICE_STATUSW buffer";

/// Decodes the `lpBuffer` of REnumServicesStatusW: `count` records of
/// [`ENUM_SERVICE_STATUS_SIZE`] bytes from the start, each with two 32-bit
/// offsets, from the start of the buffer, of NUL-terminated UTF-16LE
/// strings (the service name and the display name) that lie after the
/// records. Samba packs them right after the records; where a server puts
/// them after the records does not matter here.
///
/// Total and bounded: the records must fit in the buffer, every offset must
/// point past the records and inside the buffer, every string must end with
/// a NUL inside the buffer within [`MAX_SERVICE_NAME_UNITS`], and all names
/// together may not hold more UTF-16 units than the buffer has bytes (so
/// records pointing many times at the same long string cannot multiply the
/// memory used). Anything else is an [`Error::Malformed`] naming the record
/// and the field.
pub fn decode_enum_service_buffer(buffer: &[u8], count: u32) -> Result<Vec<EnumServiceStatus>> {
    let records_end =
        (count as usize).checked_mul(ENUM_SERVICE_STATUS_SIZE).filter(|end| *end <= buffer.len()).ok_or_else(|| {
            Error::malformed(
                ENUM_BUFFER,
                format!(
                    "{count} services of {ENUM_SERVICE_STATUS_SIZE} bytes do not fit in a buffer of {} bytes",
                    buffer.len()
                ),
            )
        })?;
    let mut services = Vec::with_capacity(count as usize);
    let mut units_left = buffer.len();
    let mut reader = NdrReader::new(&buffer[..records_end], ENUM_BUFFER);
    for index in 0..count as usize {
        let name_offset = reader.read_u32()?;
        let display_offset = reader.read_u32()?;
        let status = ServiceStatus::read(&mut reader)?;
        let service_name =
            read_buffer_string(buffer, records_end, index, "service name", name_offset, &mut units_left)?;
        let display_name =
            read_buffer_string(buffer, records_end, index, "display name", display_offset, &mut units_left)?;
        services.push(EnumServiceStatus { service_name, display_name, status });
    }
    Ok(services)
}

/// The NUL-terminated UTF-16LE string at `offset` of an enumeration buffer.
fn read_buffer_string(
    buffer: &[u8],
    records_end: usize,
    index: usize,
    field: &str,
    offset: u32,
    units_left: &mut usize,
) -> Result<String> {
    let fail = |detail: String| Error::malformed(ENUM_BUFFER, format!("service {index}: {field} {detail}"));
    let start = offset as usize;
    if start < records_end {
        return Err(fail(format!("offset {offset} points into the records, which end at {records_end}")));
    }
    if start >= buffer.len() {
        return Err(fail(format!("offset {offset} is outside the buffer of {} bytes", buffer.len())));
    }
    let mut units = Vec::new();
    for pair in buffer[start..].chunks(2) {
        let [low, high] = pair else {
            return Err(fail(format!("at offset {offset} has no NUL before the end of the buffer")));
        };
        let unit = u16::from_le_bytes([*low, *high]);
        if unit == 0 {
            return Ok(String::from_utf16_lossy(&units));
        }
        if units.len() == MAX_SERVICE_NAME_UNITS {
            return Err(fail(format!("at offset {offset} is longer than {MAX_SERVICE_NAME_UNITS} UTF-16 units")));
        }
        if *units_left == 0 {
            return Err(fail(format!(
                "at offset {offset}: the names add up to more UTF-16 units than the buffer has bytes ({})",
                buffer.len()
            )));
        }
        *units_left -= 1;
        units.push(unit);
    }
    Err(fail(format!("at offset {offset} has no NUL before the end of the buffer")))
}

/// The buffer size to ask for after an ERROR_MORE_DATA that returned no
/// service: what the server says it needs, up to [`MAX_ENUM_BUFFER`].
fn grow_enum_buffer(current: u32, needed: u32) -> Result<u32> {
    if current >= MAX_ENUM_BUFFER {
        return Err(Error::malformed(
            "REnumServicesStatusW reply",
            format!(
                "the server needs {needed} bytes for one batch of services; MS-SCMR allows at most {MAX_ENUM_BUFFER}"
            ),
        ));
    }
    if needed <= current {
        return Err(Error::malformed(
            "REnumServicesStatusW reply",
            format!("ERROR_MORE_DATA with no service returned, yet {needed} bytes needed after {current} offered"),
        ));
    }
    Ok(needed.min(MAX_ENUM_BUFFER))
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

    /// The lpBuffer Samba 4.17 returned for SERVICE_WIN32 / SERVICE_STATE_ALL
    /// with cbBufSize 388 (exactly what it needs).
    const SAMBA_BUFFER: &str = concat!(
        "90000000a000000010010000040000000100000000000000000000000000000000000000bc000000ce00000020000000",
        "010000000000000000000000000000000000000000000000e20000000001000020000000040000000000000000000000",
        "000000000000000000000000300100003a01000010000000010000000000000035040000000000000000000000000000",
        "530070006f006f006c006500720000005000720069006e0074002000530070006f006f006c006500720000004e004500",
        "54004c004f0047004f004e0000004e006500740020004c006f0067006f006e000000520065006d006f00740065005200",
        "65006700690073007400720079000000520065006d006f00740065002000520065006700690073007400720079002000",
        "53006500720076006900630065000000570049004e0053000000570069006e0064006f0077007300200049006e007400",
        "650072006e006500740020004e0061006d0065002000530065007200760069006300650020002800570049004e005300",
        "29000000",
    );

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
    }

    fn utf16z(text: &str) -> Vec<u8> {
        crate::ndr::utf16_units(text, true).into_iter().flat_map(u16::to_le_bytes).collect()
    }

    /// A buffer with one record whose names are at the given offsets, and
    /// `tail` from offset 36 on.
    fn one_record(name_offset: u32, display_offset: u32, tail: &[u8]) -> Vec<u8> {
        let mut buffer = Vec::new();
        buffer.extend_from_slice(&name_offset.to_le_bytes());
        buffer.extend_from_slice(&display_offset.to_le_bytes());
        for field in [0x10u32, 1, 0, 0, 0, 0, 0] {
            buffer.extend_from_slice(&field.to_le_bytes());
        }
        buffer.extend_from_slice(tail);
        buffer
    }

    fn error_text(buffer: &[u8], count: u32) -> String {
        decode_enum_service_buffer(buffer, count).unwrap_err().to_string()
    }

    #[test]
    fn samba_enumeration_buffer_decodes() {
        let services = decode_enum_service_buffer(&hex(SAMBA_BUFFER), 4).unwrap();
        let names: Vec<_> =
            services.iter().map(|s| (s.service_name.as_str(), s.display_name.as_str(), s.state())).collect();
        assert_eq!(
            names,
            [
                ("Spooler", "Print Spooler", ServiceState::Running),
                ("NETLOGON", "Net Logon", ServiceState::Stopped),
                ("RemoteRegistry", "Remote Registry Service", ServiceState::Running),
                ("WINS", "Windows Internet Name Service (WINS)", ServiceState::Stopped),
            ]
        );
        assert_eq!(services[0].status.service_type, 0x110);
        assert_eq!(services[3].status.win32_exit_code, 0x435);
        // Fewer records than the buffer holds: only those are read.
        assert_eq!(decode_enum_service_buffer(&hex(SAMBA_BUFFER), 1).unwrap().len(), 1);
        assert!(decode_enum_service_buffer(&[], 0).unwrap().is_empty());
    }

    #[test]
    fn strings_anywhere_after_the_records_decode() {
        // Display name first, at the very end; names outside the BMP and
        // ending in a character whose high byte is not zero.
        let display = utf16z("打印 \u{1F5A8}");
        let name = utf16z("Spooler");
        let mut tail = vec![0u8; 6];
        tail.extend_from_slice(&name);
        tail.extend_from_slice(&display);
        let name_offset = 36 + 6;
        let display_offset = name_offset + name.len() as u32;
        let services = decode_enum_service_buffer(&one_record(name_offset, display_offset, &tail), 1).unwrap();
        assert_eq!(services[0].service_name, "Spooler");
        assert_eq!(services[0].display_name, "打印 \u{1F5A8}");
        // Odd offsets are read as they are.
        let mut tail = vec![0u8];
        tail.extend_from_slice(&utf16z("x"));
        let services = decode_enum_service_buffer(&one_record(37, 37, &tail), 1).unwrap();
        assert_eq!((services[0].service_name.as_str(), services[0].display_name.as_str()), ("x", "x"));
    }

    #[test]
    fn malformed_enumeration_buffers_name_the_fault() {
        let text = error_text(&hex(SAMBA_BUFFER), 11);
        assert!(text.contains("11 services of 36 bytes do not fit in a buffer of 388 bytes"), "{text}");
        assert!(error_text(&[], u32::MAX).contains("do not fit"));

        let name = utf16z("a");
        let text = error_text(&one_record(0, 36, &name), 1);
        assert!(text.contains("service 0: service name offset 0 points into the records, which end at 36"), "{text}");
        let text = error_text(&one_record(36, 40, &name), 1);
        assert!(text.contains("service 0: display name offset 40 is outside the buffer of 40 bytes"), "{text}");
        let text = error_text(&one_record(36, u32::MAX, &name), 1);
        assert!(text.contains("is outside the buffer"), "{text}");

        // No NUL: an even and an odd number of bytes left.
        let text = error_text(&one_record(36, 36, &[0x41, 0, 0x42, 0]), 1);
        assert!(text.contains("service name at offset 36 has no NUL before the end of the buffer"), "{text}");
        let text = error_text(&one_record(36, 36, &[0x41, 0, 0x42]), 1);
        assert!(text.contains("has no NUL"), "{text}");

        // Too long.
        let long = utf16z(&"x".repeat(MAX_SERVICE_NAME_UNITS + 1));
        let text = error_text(&one_record(36, 36, &long), 1);
        assert!(text.contains("longer than 1024 UTF-16 units"), "{text}");
        let longest = utf16z(&"x".repeat(MAX_SERVICE_NAME_UNITS));
        assert_eq!(decode_enum_service_buffer(&one_record(36, 36, &longest), 1).unwrap()[0].service_name.len(), 1024);
    }

    #[test]
    fn records_sharing_one_long_name_cannot_multiply_memory() {
        // 200 records all pointing at one 1000-unit name: 400 000 units from
        // a buffer of 9 202 bytes.
        let count = 200u32;
        let records_end = count * 36;
        let mut buffer = Vec::new();
        for _ in 0..count {
            buffer.extend_from_slice(&one_record(records_end, records_end, &[]));
        }
        buffer.extend_from_slice(&utf16z(&"y".repeat(1000)));
        let text = error_text(&buffer, count);
        assert!(text.contains("the names add up to more UTF-16 units than the buffer has bytes"), "{text}");
        // Two records sharing a name are fine.
        let mut buffer = one_record(72, 72, &[]);
        buffer.extend_from_slice(&one_record(72, 72, &utf16z("shared")));
        let services = decode_enum_service_buffer(&buffer, 2).unwrap();
        assert_eq!(services[1].display_name, "shared");
    }

    #[test]
    fn enumeration_reply_buffer_is_bounded() {
        let mut writer = NdrWriter::new();
        writer.write_conformant_bytes(&vec![0; MAX_ENUM_BUFFER as usize + 1]);
        for field in [0u32, 0, 0, 0] {
            writer.write_u32(field);
        }
        let text = EnumServicesStatusResponse::decode(&writer.into_bytes()).unwrap_err().to_string();
        assert!(text.contains("lpBuffer of 262145 bytes exceeds the 262144 bytes"), "{text}");
    }

    #[test]
    fn enumeration_buffer_growth_is_bounded() {
        assert_eq!(grow_enum_buffer(64, 388).unwrap(), 388);
        assert_eq!(grow_enum_buffer(0, 388).unwrap(), 388);
        assert_eq!(grow_enum_buffer(1024, 10 * MAX_ENUM_BUFFER).unwrap(), MAX_ENUM_BUFFER);
        assert!(grow_enum_buffer(MAX_ENUM_BUFFER, MAX_ENUM_BUFFER + 1).unwrap_err().to_string().contains("at most"));
        assert!(grow_enum_buffer(4096, 4096).unwrap_err().to_string().contains("4096 bytes needed after 4096"));
    }

    #[test]
    fn states_decode() {
        assert_eq!(ServiceState::from_u32(4), ServiceState::Running);
        assert_eq!(ServiceState::from_u32(1), ServiceState::Stopped);
        assert_eq!(ServiceState::from_u32(99), ServiceState::Unknown(99));
    }
}
