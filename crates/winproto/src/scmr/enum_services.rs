//! REnumServicesStatusW: its request and reply, and the decoding of the
//! ENUM_SERVICE_STATUSW buffer it returns.

use super::{ServiceState, ServiceStatus};
use crate::error::{Error, Result, Win32Error};
use crate::ndr::{ContextHandle, NdrReader, NdrWriter};

/// Largest `cbBufSize` of REnumServicesStatusW: the IDL declares it
/// `range(0, 1024 * 256)`, and a server refuses more (Samba faults with
/// `rpc_x_bad_stub_data`). Also the largest reply buffer accepted.
pub const MAX_ENUM_BUFFER: u32 = 256 * 1024;

/// The first buffer [`ServiceControlManager::list_services`](super::ServiceControlManager::list_services) offers: room
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
pub(super) fn grow_enum_buffer(current: u32, needed: u32) -> Result<u32> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
