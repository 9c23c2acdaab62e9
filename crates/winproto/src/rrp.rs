//! MS-RRP (Windows Remote Registry, interface `winreg` on `\PIPE\winreg`):
//! the NDR32 stubs of the six calls the product uses, and
//! [`RemoteRegistry`], the probe-oriented helper on top of them.
//!
//! Owns: the request/response layouts of OpenLocalMachine (2),
//! BaseRegCloseKey (5), BaseRegEnumKey (9), BaseRegEnumValue (10),
//! BaseRegOpenKey (15) and BaseRegQueryValue (17), and the decoding of
//! registry value data. Checked byte for byte against Impacket's encoder
//! (`vectors/impacket.json`) and live against Samba.
//!
//! Never writes to the registry.

use crate::dcerpc::{Interface, PipeIo, RpcClient, SyntaxId, Uuid};
use crate::error::{Error, Result, Win32Error};
use crate::ndr::{ContextHandle, NdrReader, NdrWriter, UnicodeStringArg, UnicodeStringHeader};

/// The `winreg` interface, v1.0.
pub const WINREG: Interface = Interface {
    name: "winreg",
    pipe: "winreg",
    syntax: SyntaxId {
        uuid: Uuid::parse_const("338cd001-2244-31f1-aaaa-900038001003"),
        version_major: 1,
        version_minor: 0,
    },
};

/// Operation numbers.
pub mod opnum {
    pub const OPEN_LOCAL_MACHINE: u16 = 2;
    pub const BASE_REG_CLOSE_KEY: u16 = 5;
    pub const BASE_REG_ENUM_KEY: u16 = 9;
    pub const BASE_REG_ENUM_VALUE: u16 = 10;
    pub const BASE_REG_OPEN_KEY: u16 = 15;
    pub const BASE_REG_QUERY_VALUE: u16 = 17;
}

/// Access rights (REGSAM).
pub mod access {
    pub const KEY_QUERY_VALUE: u32 = 0x0001;
    pub const KEY_ENUMERATE_SUB_KEYS: u32 = 0x0008;
    pub const KEY_READ: u32 = 0x0002_0019;
    pub const MAXIMUM_ALLOWED: u32 = 0x0200_0000;
}

/// Registry value types.
pub mod value_type {
    pub const REG_NONE: u32 = 0;
    pub const REG_SZ: u32 = 1;
    pub const REG_EXPAND_SZ: u32 = 2;
    pub const REG_BINARY: u32 = 3;
    pub const REG_DWORD: u32 = 4;
    pub const REG_DWORD_BIG_ENDIAN: u32 = 5;
    pub const REG_MULTI_SZ: u32 = 7;
    pub const REG_QWORD: u32 = 11;
}

/// Largest value data this crate asks for (a probe reads versions, states
/// and names; anything bigger is refused rather than allocated).
pub const MAX_VALUE_DATA: u32 = 1024 * 1024;

/// OpenLocalMachine: `ServerName` NULL, `samDesired`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenLocalMachineRequest {
    pub sam_desired: u32,
}

impl OpenLocalMachineRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut writer = NdrWriter::new();
        writer.write_unique_pointer(false);
        writer.write_u32(self.sam_desired);
        writer.into_bytes()
    }
}

/// The reply of the calls that return a key handle (OpenLocalMachine,
/// BaseRegOpenKey, BaseRegCloseKey).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyHandleResponse {
    pub handle: ContextHandle,
    pub status: Win32Error,
}

impl KeyHandleResponse {
    pub fn decode(stub: &[u8]) -> Result<Self> {
        let mut reader = NdrReader::new(stub, "winreg key handle reply");
        let handle = reader.read_context_handle()?;
        let status = Win32Error(reader.read_u32()?);
        reader.finish()?;
        Ok(KeyHandleResponse { handle, status })
    }
}

/// BaseRegOpenKey.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenKeyRequest {
    pub key: ContextHandle,
    pub sub_key: String,
    pub options: u32,
    pub sam_desired: u32,
}

impl OpenKeyRequest {
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut writer = NdrWriter::new();
        writer.write_context_handle(&self.key);
        UnicodeStringArg::nul_terminated(&self.sub_key)?.write(&mut writer);
        writer.write_u32(self.options);
        writer.write_u32(self.sam_desired);
        Ok(writer.into_bytes())
    }
}

/// BaseRegCloseKey.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseKeyRequest {
    pub key: ContextHandle,
}

impl CloseKeyRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut writer = NdrWriter::new();
        writer.write_context_handle(&self.key);
        writer.into_bytes()
    }
}

/// BaseRegQueryValue, asking for at most `buffer_size` bytes of data (the
/// way Windows' own client asks: `lpType` and `lpcbLen` in as 0, an empty
/// `lpData` buffer of `buffer_size`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryValueRequest {
    pub key: ContextHandle,
    pub value_name: String,
    pub buffer_size: u32,
}

impl QueryValueRequest {
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut writer = NdrWriter::new();
        writer.write_context_handle(&self.key);
        UnicodeStringArg::nul_terminated(&self.value_name)?.write(&mut writer);
        write_value_buffers(&mut writer, self.buffer_size);
        Ok(writer.into_bytes())
    }
}

/// `lpType`, `lpData`, `lpcbData`, `lpcbLen` as sent by QueryValue and
/// EnumValue.
fn write_value_buffers(writer: &mut NdrWriter, buffer_size: u32) {
    writer.write_unique_pointer(true);
    writer.write_u32(0);
    writer.write_unique_pointer(true);
    writer.write_conformant_varying_bytes(buffer_size, &[]);
    writer.write_unique_pointer(true);
    writer.write_u32(buffer_size);
    writer.write_unique_pointer(true);
    writer.write_u32(0);
}

/// The value part of QueryValue and EnumValue replies.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ValueData {
    pub value_type: Option<u32>,
    pub data: Option<Vec<u8>>,
    /// `lpcbData`: the size of the data (or the size needed, with
    /// ERROR_MORE_DATA).
    pub data_size: Option<u32>,
    pub data_length: Option<u32>,
}

impl ValueData {
    fn read(reader: &mut NdrReader<'_>) -> Result<Self> {
        let value_type = if reader.read_unique_pointer()? { Some(reader.read_u32()?) } else { None };
        let data = if reader.read_unique_pointer()? { Some(reader.read_conformant_varying_bytes()?) } else { None };
        let data_size = if reader.read_unique_pointer()? { Some(reader.read_u32()?) } else { None };
        let data_length = if reader.read_unique_pointer()? { Some(reader.read_u32()?) } else { None };
        Ok(ValueData { value_type, data, data_size, data_length })
    }
}

/// BaseRegQueryValue reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryValueResponse {
    pub value: ValueData,
    pub status: Win32Error,
}

impl QueryValueResponse {
    pub fn decode(stub: &[u8]) -> Result<Self> {
        let mut reader = NdrReader::new(stub, "BaseRegQueryValue reply");
        let value = ValueData::read(&mut reader)?;
        let status = Win32Error(reader.read_u32()?);
        reader.finish()?;
        Ok(QueryValueResponse { value, status })
    }
}

/// BaseRegEnumKey: name buffer of `name_buffer_bytes`, a class buffer of
/// `class_buffer_bytes`, and a last-write-time slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnumKeyRequest {
    pub key: ContextHandle,
    pub index: u32,
    pub name_buffer_bytes: u16,
    pub class_buffer_bytes: u16,
}

impl EnumKeyRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut writer = NdrWriter::new();
        writer.write_context_handle(&self.key);
        writer.write_u32(self.index);
        UnicodeStringArg::empty_buffer(self.name_buffer_bytes).write(&mut writer);
        writer.write_unique_pointer(true);
        UnicodeStringArg::empty_buffer(self.class_buffer_bytes).write(&mut writer);
        writer.write_unique_pointer(true);
        writer.write_u32(0);
        writer.write_u32(0);
        writer.into_bytes()
    }
}

/// BaseRegEnumKey reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnumKeyResponse {
    pub name: Option<String>,
    pub class: Option<String>,
    /// FILETIME (100 ns since 1601).
    pub last_write_time: Option<u64>,
    pub status: Win32Error,
}

impl EnumKeyResponse {
    pub fn decode(stub: &[u8]) -> Result<Self> {
        let mut reader = NdrReader::new(stub, "BaseRegEnumKey reply");
        let name_header = UnicodeStringHeader::read(&mut reader)?;
        let name = name_header.read_deferred(&mut reader)?;
        let class = if reader.read_unique_pointer()? {
            let header = UnicodeStringHeader::read(&mut reader)?;
            header.read_deferred(&mut reader)?
        } else {
            None
        };
        let last_write_time = if reader.read_unique_pointer()? {
            let low = reader.read_u32()?;
            let high = reader.read_u32()?;
            Some(u64::from(high) << 32 | u64::from(low))
        } else {
            None
        };
        let status = Win32Error(reader.read_u32()?);
        reader.finish()?;
        Ok(EnumKeyResponse { name, class, last_write_time, status })
    }
}

/// BaseRegEnumValue with a name buffer of `name_buffer_bytes` and a data
/// buffer of `data_buffer_size`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnumValueRequest {
    pub key: ContextHandle,
    pub index: u32,
    pub name_buffer_bytes: u16,
    pub data_buffer_size: u32,
}

impl EnumValueRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut writer = NdrWriter::new();
        writer.write_context_handle(&self.key);
        writer.write_u32(self.index);
        UnicodeStringArg::empty_buffer(self.name_buffer_bytes).write(&mut writer);
        write_value_buffers(&mut writer, self.data_buffer_size);
        writer.into_bytes()
    }
}

/// BaseRegEnumValue reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnumValueResponse {
    pub name: Option<String>,
    pub value: ValueData,
    pub status: Win32Error,
}

impl EnumValueResponse {
    pub fn decode(stub: &[u8]) -> Result<Self> {
        let mut reader = NdrReader::new(stub, "BaseRegEnumValue reply");
        let name_header = UnicodeStringHeader::read(&mut reader)?;
        let name = name_header.read_deferred(&mut reader)?;
        let value = ValueData::read(&mut reader)?;
        let status = Win32Error(reader.read_u32()?);
        reader.finish()?;
        Ok(EnumValueResponse { name, value, status })
    }
}

/// A decoded registry value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryValue {
    String(String),
    ExpandString(String),
    MultiString(Vec<String>),
    Dword(u32),
    Qword(u64),
    Binary(Vec<u8>),
    /// Any other type, raw.
    Other {
        value_type: u32,
        data: Vec<u8>,
    },
}

fn utf16_from_bytes(data: &[u8]) -> Vec<u16> {
    data.chunks_exact(2).map(|pair| u16::from_le_bytes([pair[0], pair[1]])).collect()
}

impl RegistryValue {
    /// Interprets `data` according to `value_type`; data too short for a
    /// DWORD or QWORD is kept raw as `Other`.
    pub fn from_raw(value_type: u32, data: Vec<u8>) -> Self {
        use value_type::*;
        match value_type {
            REG_SZ => RegistryValue::String(crate::ndr::string_from_utf16(&utf16_from_bytes(&data))),
            REG_EXPAND_SZ => RegistryValue::ExpandString(crate::ndr::string_from_utf16(&utf16_from_bytes(&data))),
            REG_MULTI_SZ => {
                let units = utf16_from_bytes(&data);
                let strings = units
                    .split(|unit| *unit == 0)
                    .filter(|part| !part.is_empty())
                    .map(String::from_utf16_lossy)
                    .collect();
                RegistryValue::MultiString(strings)
            }
            REG_DWORD if data.len() >= 4 => {
                RegistryValue::Dword(u32::from_le_bytes([data[0], data[1], data[2], data[3]]))
            }
            REG_DWORD_BIG_ENDIAN if data.len() >= 4 => {
                RegistryValue::Dword(u32::from_be_bytes([data[0], data[1], data[2], data[3]]))
            }
            REG_QWORD if data.len() >= 8 => {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(&data[..8]);
                RegistryValue::Qword(u64::from_le_bytes(bytes))
            }
            REG_BINARY => RegistryValue::Binary(data),
            _ => RegistryValue::Other { value_type, data },
        }
    }

    /// The text of a REG_SZ or REG_EXPAND_SZ value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            RegistryValue::String(text) | RegistryValue::ExpandString(text) => Some(text),
            _ => None,
        }
    }

    /// The number of a REG_DWORD value.
    pub fn as_u32(&self) -> Option<u32> {
        match self {
            RegistryValue::Dword(value) => Some(*value),
            _ => None,
        }
    }
}

/// Splits `HKLM\A\B` or `A\B` into the path under HKLM.
fn path_under_hklm(path: &str) -> &str {
    let trimmed = path.trim_matches('\\');
    for prefix in ["HKEY_LOCAL_MACHINE", "HKLM"] {
        if let Some(rest) = trimmed.strip_prefix(prefix) {
            if rest.is_empty() {
                return "";
            }
            if let Some(rest) = rest.strip_prefix('\\') {
                return rest;
            }
        }
    }
    trimmed
}

/// Read-only access to a target's `HKEY_LOCAL_MACHINE` over `winreg`.
///
/// Every key is opened for the one operation and closed afterwards, also
/// when the operation fails. Paths may start with `HKLM\`.
#[derive(Debug)]
pub struct RemoteRegistry<P> {
    rpc: RpcClient<P>,
    hklm: ContextHandle,
}

impl<P: PipeIo> RemoteRegistry<P> {
    /// Opens HKLM over a bound `winreg` client.
    pub async fn open(mut rpc: RpcClient<P>) -> Result<Self> {
        let request = OpenLocalMachineRequest { sam_desired: access::MAXIMUM_ALLOWED };
        let stub = rpc.call(opnum::OPEN_LOCAL_MACHINE, &request.encode()).await?;
        let reply = KeyHandleResponse::decode(&stub)?;
        check(reply.status, "OpenLocalMachine")?;
        Ok(RemoteRegistry { rpc, hklm: reply.handle })
    }

    /// Opens a key under HKLM; `Ok(None)` when it does not exist.
    async fn open_key(&mut self, path: &str, sam_desired: u32) -> Result<Option<ContextHandle>> {
        let request =
            OpenKeyRequest { key: self.hklm, sub_key: path_under_hklm(path).to_owned(), options: 0, sam_desired };
        let stub = self.rpc.call(opnum::BASE_REG_OPEN_KEY, &request.encode()?).await?;
        let reply = KeyHandleResponse::decode(&stub)?;
        match reply.status {
            Win32Error::ERROR_SUCCESS => Ok(Some(reply.handle)),
            Win32Error::ERROR_FILE_NOT_FOUND | Win32Error::ERROR_PATH_NOT_FOUND => Ok(None),
            code => Err(Error::Win32 { operation: "BaseRegOpenKey", code }),
        }
    }

    async fn close_key(&mut self, key: ContextHandle) -> Result<()> {
        let stub = self.rpc.call(opnum::BASE_REG_CLOSE_KEY, &CloseKeyRequest { key }.encode()).await?;
        let reply = KeyHandleResponse::decode(&stub)?;
        check(reply.status, "BaseRegCloseKey")
    }

    /// Closes `key` after an operation on it, keeping the operation's error
    /// first when both fail.
    async fn finish_key<T>(&mut self, key: ContextHandle, result: Result<T>) -> Result<Option<T>> {
        let closed = self.close_key(key).await;
        let value = result?;
        closed?;
        Ok(Some(value))
    }

    /// Whether the key exists.
    pub async fn key_exists(&mut self, path: &str) -> Result<bool> {
        match self.open_key(path, access::KEY_QUERY_VALUE).await? {
            Some(key) => {
                self.close_key(key).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Reads a value; `Ok(None)` when the key or the value does not exist.
    pub async fn read_value(&mut self, path: &str, name: &str) -> Result<Option<RegistryValue>> {
        let Some(key) = self.open_key(path, access::KEY_QUERY_VALUE).await? else {
            return Ok(None);
        };
        let result = query_value(&mut self.rpc, key, name).await;
        Ok(self.finish_key(key, result).await?.flatten())
    }

    /// Reads a REG_SZ / REG_EXPAND_SZ value; a value of another type is an
    /// error naming the type found.
    pub async fn read_string(&mut self, path: &str, name: &str) -> Result<Option<String>> {
        match self.read_value(path, name).await? {
            None => Ok(None),
            Some(value) => match value.as_str() {
                Some(text) => Ok(Some(text.to_owned())),
                None => {
                    Err(Error::malformed("registry value", format!("{path}\\{name} is {value:?}, expected a string")))
                }
            },
        }
    }

    /// Reads a REG_DWORD value.
    pub async fn read_dword(&mut self, path: &str, name: &str) -> Result<Option<u32>> {
        match self.read_value(path, name).await? {
            None => Ok(None),
            Some(value) => match value.as_u32() {
                Some(number) => Ok(Some(number)),
                None => {
                    Err(Error::malformed("registry value", format!("{path}\\{name} is {value:?}, expected a DWORD")))
                }
            },
        }
    }

    /// The names of the subkeys; `Ok(None)` when the key does not exist.
    pub async fn subkeys(&mut self, path: &str) -> Result<Option<Vec<String>>> {
        let Some(key) = self.open_key(path, access::KEY_ENUMERATE_SUB_KEYS).await? else {
            return Ok(None);
        };
        let result = enum_keys(&mut self.rpc, key).await;
        self.finish_key(key, result).await
    }

    /// The values of a key; `Ok(None)` when the key does not exist.
    pub async fn values(&mut self, path: &str) -> Result<Option<Vec<(String, RegistryValue)>>> {
        let Some(key) = self.open_key(path, access::KEY_QUERY_VALUE).await? else {
            return Ok(None);
        };
        let result = enum_values(&mut self.rpc, key).await;
        self.finish_key(key, result).await
    }

    /// Closes HKLM and gives the RPC client back.
    pub async fn close(mut self) -> Result<RpcClient<P>> {
        let hklm = self.hklm;
        self.close_key(hklm).await?;
        Ok(self.rpc)
    }
}

fn check(status: Win32Error, operation: &'static str) -> Result<()> {
    if status == Win32Error::ERROR_SUCCESS {
        Ok(())
    } else {
        Err(Error::Win32 { operation, code: status })
    }
}

async fn query_value<P: PipeIo>(
    rpc: &mut RpcClient<P>,
    key: ContextHandle,
    name: &str,
) -> Result<Option<RegistryValue>> {
    {
        let mut buffer_size = 512;
        loop {
            let request = QueryValueRequest { key, value_name: name.to_owned(), buffer_size };
            let stub = rpc.call(opnum::BASE_REG_QUERY_VALUE, &request.encode()?).await?;
            let reply = QueryValueResponse::decode(&stub)?;
            match reply.status {
                Win32Error::ERROR_SUCCESS => return Ok(Some(value_from(reply.value))),
                Win32Error::ERROR_FILE_NOT_FOUND => return Ok(None),
                Win32Error::ERROR_MORE_DATA => {
                    buffer_size = grow_buffer(buffer_size, reply.value.data_size)?;
                }
                code => return Err(Error::Win32 { operation: "BaseRegQueryValue", code }),
            }
        }
    }
}

/// The next buffer size after ERROR_MORE_DATA, bounded by [`MAX_VALUE_DATA`].
fn grow_buffer(current: u32, needed: Option<u32>) -> Result<u32> {
    let next = needed.unwrap_or(current.saturating_mul(2));
    if next <= current || next > MAX_VALUE_DATA {
        return Err(Error::malformed(
            "registry value",
            format!("the server asks for a {next}-byte buffer after {current} (limit {MAX_VALUE_DATA})"),
        ));
    }
    Ok(next)
}

fn value_from(value: ValueData) -> RegistryValue {
    let mut data = value.data.unwrap_or_default();
    if let Some(length) = value.data_length.or(value.data_size) {
        data.truncate(length as usize);
    }
    RegistryValue::from_raw(value.value_type.unwrap_or(value_type::REG_NONE), data)
}

async fn enum_keys<P: PipeIo>(rpc: &mut RpcClient<P>, key: ContextHandle) -> Result<Vec<String>> {
    {
        let mut names = Vec::new();
        for index in 0.. {
            let request = EnumKeyRequest {
                key,
                index,
                // 255 characters + NUL is the longest key name.
                name_buffer_bytes: 512,
                class_buffer_bytes: 512,
            };
            let stub = rpc.call(opnum::BASE_REG_ENUM_KEY, &request.encode()).await?;
            let reply = EnumKeyResponse::decode(&stub)?;
            match reply.status {
                Win32Error::ERROR_SUCCESS => names.push(reply.name.unwrap_or_default()),
                Win32Error::ERROR_NO_MORE_ITEMS => break,
                code => return Err(Error::Win32 { operation: "BaseRegEnumKey", code }),
            }
        }
        Ok(names)
    }
}

async fn enum_values<P: PipeIo>(rpc: &mut RpcClient<P>, key: ContextHandle) -> Result<Vec<(String, RegistryValue)>> {
    {
        let mut values = Vec::new();
        let mut index = 0;
        let mut data_buffer_size = 1024;
        loop {
            let request = EnumValueRequest {
                key,
                index,
                // 16383 characters + NUL is the longest value name.
                name_buffer_bytes: 32768,
                data_buffer_size,
            };
            let stub = rpc.call(opnum::BASE_REG_ENUM_VALUE, &request.encode()).await?;
            let reply = EnumValueResponse::decode(&stub)?;
            match reply.status {
                Win32Error::ERROR_SUCCESS => {
                    values.push((reply.name.unwrap_or_default(), value_from(reply.value)));
                    index += 1;
                }
                Win32Error::ERROR_NO_MORE_ITEMS => break,
                Win32Error::ERROR_MORE_DATA => {
                    data_buffer_size = grow_buffer(data_buffer_size, reply.value.data_size)?;
                }
                code => return Err(Error::Win32 { operation: "BaseRegEnumValue", code }),
            }
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hklm_prefixes_are_stripped() {
        assert_eq!(path_under_hklm("HKLM\\SOFTWARE\\X"), "SOFTWARE\\X");
        assert_eq!(path_under_hklm("HKEY_LOCAL_MACHINE\\SYSTEM"), "SYSTEM");
        assert_eq!(path_under_hklm("\\SOFTWARE\\"), "SOFTWARE");
        assert_eq!(path_under_hklm("HKLMX\\A"), "HKLMX\\A");
    }

    #[test]
    fn values_decode_by_type() {
        let text: Vec<u8> = "6.1\0".encode_utf16().flat_map(u16::to_le_bytes).collect();
        assert_eq!(RegistryValue::from_raw(value_type::REG_SZ, text), RegistryValue::String("6.1".into()));
        assert_eq!(RegistryValue::from_raw(value_type::REG_DWORD, vec![0x70, 0, 0, 0]), RegistryValue::Dword(0x70));
        assert_eq!(
            RegistryValue::from_raw(value_type::REG_DWORD, vec![1]),
            RegistryValue::Other { value_type: value_type::REG_DWORD, data: vec![1] }
        );
        let multi: Vec<u8> = "a\0bc\0\0".encode_utf16().flat_map(u16::to_le_bytes).collect();
        assert_eq!(
            RegistryValue::from_raw(value_type::REG_MULTI_SZ, multi),
            RegistryValue::MultiString(vec!["a".into(), "bc".into()])
        );
    }

    #[test]
    fn buffer_growth_is_bounded() {
        assert_eq!(grow_buffer(512, Some(2000)).unwrap(), 2000);
        assert!(grow_buffer(512, Some(512)).is_err());
        assert!(grow_buffer(512, Some(MAX_VALUE_DATA + 1)).is_err());
    }
}
