//! The NDR32 request and reply stubs of the `svcctl` calls other than
//! REnumServicesStatusW (see `enum_services.rs`).

use super::ServiceStatus;
use crate::error::{Result, Win32Error};
use crate::ndr::{ContextHandle, NdrReader, NdrWriter};

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
