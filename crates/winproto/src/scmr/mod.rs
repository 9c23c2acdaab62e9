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
//!
//! Layout: this module holds the interface, the operation numbers, the
//! access rights and constants, and SERVICE_STATUS; `messages.rs` the
//! request and reply stubs of the calls; `enum_services.rs`
//! REnumServicesStatusW and the decoding of its buffer; `manager.rs`
//! [`ServiceControlManager`] and what it installs. Everything is
//! re-exported here (`scmr::X`).

mod enum_services;
mod manager;
mod messages;

use crate::dcerpc::{Interface, SyntaxId, Uuid};
use crate::error::Result;
use crate::ndr::NdrReader;

pub use enum_services::{
    decode_enum_service_buffer, EnumServiceStatus, EnumServicesStatusRequest, EnumServicesStatusResponse,
    ENUM_SERVICE_STATUS_SIZE, INITIAL_ENUM_BUFFER, MAX_ENUM_BUFFER, MAX_ENUM_CALLS, MAX_SERVICE_NAME_UNITS,
};
pub use manager::{CreateOutcome, ScmTimeouts, ServiceAccount, ServiceControlManager, ServiceSpec};
pub use messages::{
    ControlServiceRequest, CreateServiceRequest, CreateServiceResponse, HandleRequest, HandleResponse,
    OpenScManagerRequest, OpenServiceRequest, ServiceStatusResponse, StartServiceRequest, StatusResponse,
};

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
    pub(super) fn read(reader: &mut NdrReader<'_>) -> Result<Self> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_decode() {
        assert_eq!(ServiceState::from_u32(4), ServiceState::Running);
        assert_eq!(ServiceState::from_u32(1), ServiceState::Stopped);
        assert_eq!(ServiceState::from_u32(99), ServiceState::Unknown(99));
    }
}
