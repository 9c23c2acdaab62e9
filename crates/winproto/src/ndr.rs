//! NDR32 (C706 chapter 14, little-endian, the transfer syntax
//! `8a885d04-1ceb-11c9-9fe8-08002b104860` v2) as far as MS-RRP and MS-SCMR
//! need it: primitives with natural alignment, unique pointers, conformant
//! varying arrays and strings, context handles.
//!
//! Owns: the byte layout of stub data. Knows nothing about which method a
//! stub belongs to.
//!
//! Choices that make our bytes predictable (and comparable with Impacket in
//! the conformance vectors): padding bytes are zero, and referent ids of
//! non-null unique pointers are `0x0002_0000 + 4·n` in wire order, as Windows'
//! own stubs produce.
//!
//! [`NdrReader`] is total: every read checks the remaining length before it
//! allocates, every count from the wire is bounded by the bytes left, and a
//! malformed stub is an [`Error::Malformed`], never a panic.

use crate::error::{Error, Result};

/// First referent id handed out for a non-null unique pointer.
pub const FIRST_REFERENT_ID: u32 = 0x0002_0000;

/// An RPC context handle (`policy_handle`): 4 bytes of attributes and a
/// 16-byte UUID, opaque to the client.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ContextHandle(pub [u8; 20]);

impl ContextHandle {
    /// The all-zero handle a server returns after closing a handle.
    pub const NULL: ContextHandle = ContextHandle([0; 20]);

    /// Whether every byte is zero.
    pub fn is_null(&self) -> bool {
        self.0 == [0; 20]
    }
}

impl std::fmt::Debug for ContextHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ContextHandle(")?;
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        write!(f, ")")
    }
}

/// Encodes UTF-16LE code units of `text`, with a terminating NUL when
/// `nul_terminated`.
pub fn utf16_units(text: &str, nul_terminated: bool) -> Vec<u16> {
    let mut units: Vec<u16> = text.encode_utf16().collect();
    if nul_terminated {
        units.push(0);
    }
    units
}

/// Decodes UTF-16LE units, dropping one or more trailing NULs.
pub fn string_from_utf16(units: &[u16]) -> String {
    let end = units.iter().rposition(|unit| *unit != 0).map_or(0, |last| last + 1);
    String::from_utf16_lossy(&units[..end])
}

/// Builds NDR32 stub data.
#[derive(Debug)]
pub struct NdrWriter {
    buffer: Vec<u8>,
    next_referent_id: u32,
}

impl Default for NdrWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl NdrWriter {
    /// An empty stub.
    pub fn new() -> Self {
        NdrWriter { buffer: Vec::with_capacity(256), next_referent_id: FIRST_REFERENT_ID }
    }

    /// The encoded bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buffer
    }

    /// Pads with zeros to a multiple of `alignment` from the stub's start.
    pub fn align(&mut self, alignment: usize) {
        while !self.buffer.len().is_multiple_of(alignment) {
            self.buffer.push(0);
        }
    }

    pub fn write_u8(&mut self, value: u8) {
        self.buffer.push(value);
    }

    pub fn write_u16(&mut self, value: u16) {
        self.align(2);
        self.buffer.extend_from_slice(&value.to_le_bytes());
    }

    pub fn write_u32(&mut self, value: u32) {
        self.align(4);
        self.buffer.extend_from_slice(&value.to_le_bytes());
    }

    pub fn write_u64(&mut self, value: u64) {
        self.align(8);
        self.buffer.extend_from_slice(&value.to_le_bytes());
    }

    /// Raw bytes, no alignment.
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    pub fn write_context_handle(&mut self, handle: &ContextHandle) {
        self.align(4);
        self.buffer.extend_from_slice(&handle.0);
    }

    /// The referent id of a unique pointer: a fresh id when `present`, 0 for
    /// NULL. The pointee is written by the caller (right after, for a
    /// top-level pointer; after the enclosing structure, for an embedded one).
    pub fn write_unique_pointer(&mut self, present: bool) {
        if present {
            let id = self.next_referent_id;
            self.next_referent_id = self.next_referent_id.wrapping_add(4);
            self.write_u32(id);
        } else {
            self.write_u32(0);
        }
    }

    /// A conformant varying array of UTF-16 units (`[string] wchar_t*` or a
    /// `[size_is, length_is]` buffer): maximum count, offset 0, actual count,
    /// then the units.
    pub fn write_conformant_varying_u16(&mut self, maximum_count: u32, units: &[u16]) {
        self.write_u32(maximum_count);
        self.write_u32(0);
        self.write_u32(units.len() as u32);
        for unit in units {
            self.buffer.extend_from_slice(&unit.to_le_bytes());
        }
    }

    /// A `[string]` wide string: NUL-terminated, maximum = actual count.
    pub fn write_wide_string(&mut self, text: &str) {
        let units = utf16_units(text, true);
        self.write_conformant_varying_u16(units.len() as u32, &units);
    }

    /// A conformant varying byte array.
    pub fn write_conformant_varying_bytes(&mut self, maximum_count: u32, bytes: &[u8]) {
        self.write_u32(maximum_count);
        self.write_u32(0);
        self.write_u32(bytes.len() as u32);
        self.buffer.extend_from_slice(bytes);
    }

    /// A conformant byte array (`[size_is(n)] BYTE*`): count then bytes.
    pub fn write_conformant_bytes(&mut self, bytes: &[u8]) {
        self.write_u32(bytes.len() as u32);
        self.buffer.extend_from_slice(bytes);
    }
}

/// Reads NDR32 stub data; every method is bounded by the bytes left.
#[derive(Debug, Clone)]
pub struct NdrReader<'a> {
    data: &'a [u8],
    position: usize,
    what: &'static str,
}

impl<'a> NdrReader<'a> {
    /// A reader over `data`; `what` names the structure in error messages.
    pub fn new(data: &'a [u8], what: &'static str) -> Self {
        NdrReader { data, position: 0, what }
    }

    pub fn position(&self) -> usize {
        self.position
    }

    pub fn remaining(&self) -> usize {
        self.data.len() - self.position
    }

    fn error(&self, detail: impl Into<String>) -> Error {
        Error::malformed(self.what, format!("{} at offset {}", detail.into(), self.position))
    }

    fn take(&mut self, count: usize) -> Result<&'a [u8]> {
        if count > self.remaining() {
            return Err(self.error(format!("needs {count} bytes, {} left", self.remaining())));
        }
        let slice = &self.data[self.position..self.position + count];
        self.position += count;
        Ok(slice)
    }

    /// Skips the padding to a multiple of `alignment`.
    pub fn align(&mut self, alignment: usize) -> Result<()> {
        let padding = (alignment - self.position % alignment) % alignment;
        self.take(padding).map(|_| ())
    }

    pub fn read_u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    pub fn read_u16(&mut self) -> Result<u16> {
        self.align(2)?;
        let bytes = self.take(2)?;
        Ok(u16::from_le_bytes([bytes[0], bytes[1]]))
    }

    pub fn read_u32(&mut self) -> Result<u32> {
        self.align(4)?;
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    pub fn read_u64(&mut self) -> Result<u64> {
        self.align(8)?;
        let bytes = self.take(8)?;
        let mut array = [0u8; 8];
        array.copy_from_slice(bytes);
        Ok(u64::from_le_bytes(array))
    }

    pub fn read_bytes(&mut self, count: usize) -> Result<&'a [u8]> {
        self.take(count)
    }

    pub fn read_context_handle(&mut self) -> Result<ContextHandle> {
        self.align(4)?;
        let mut handle = [0u8; 20];
        handle.copy_from_slice(self.take(20)?);
        Ok(ContextHandle(handle))
    }

    /// A unique pointer's referent id: `true` when non-null.
    pub fn read_unique_pointer(&mut self) -> Result<bool> {
        Ok(self.read_u32()? != 0)
    }

    /// The header of a conformant varying array: returns the actual count
    /// after checking `offset + actual <= maximum` and that `actual` elements
    /// of `element_size` bytes fit in what is left.
    fn read_varying_header(&mut self, element_size: usize) -> Result<(u32, usize)> {
        let maximum = self.read_u32()?;
        let offset = self.read_u32()?;
        let actual = self.read_u32()?;
        if u64::from(offset) + u64::from(actual) > u64::from(maximum) {
            return Err(self.error(format!("array offset {offset} + count {actual} exceeds its maximum {maximum}")));
        }
        let byte_count =
            (actual as usize).checked_mul(element_size).ok_or_else(|| self.error("array size overflows"))?;
        if byte_count > self.remaining() {
            return Err(
                self.error(format!("array of {actual} elements needs {byte_count} bytes, {} left", self.remaining()))
            );
        }
        Ok((maximum, byte_count))
    }

    /// A conformant varying array of UTF-16 units.
    pub fn read_conformant_varying_u16(&mut self) -> Result<Vec<u16>> {
        let (_, byte_count) = self.read_varying_header(2)?;
        let bytes = self.take(byte_count)?;
        Ok(bytes.chunks_exact(2).map(|pair| u16::from_le_bytes([pair[0], pair[1]])).collect())
    }

    /// A `[string]` wide string, without its terminating NUL.
    pub fn read_wide_string(&mut self) -> Result<String> {
        Ok(string_from_utf16(&self.read_conformant_varying_u16()?))
    }

    /// A conformant varying byte array.
    pub fn read_conformant_varying_bytes(&mut self) -> Result<Vec<u8>> {
        let (_, byte_count) = self.read_varying_header(1)?;
        Ok(self.take(byte_count)?.to_vec())
    }

    /// A conformant byte array (`[size_is(n)] BYTE*`).
    pub fn read_conformant_bytes(&mut self) -> Result<Vec<u8>> {
        let count = self.read_u32()? as usize;
        Ok(self.take(count)?.to_vec())
    }

    /// Fails unless every byte was consumed (trailing garbage means we and
    /// the peer disagree about the layout).
    pub fn finish(self) -> Result<()> {
        if self.remaining() != 0 {
            return Err(self.error(format!("{} unexpected trailing bytes", self.remaining())));
        }
        Ok(())
    }
}

/// `RPC_UNICODE_STRING` / `RRP_UNICODE_STRING` as a caller describes it:
/// the text (or none for a NULL buffer) and the buffer capacity in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnicodeStringArg {
    /// UTF-16 units sent (may include a terminating NUL).
    pub units: Vec<u16>,
    /// `MaximumLength` in bytes; also the array's maximum count × 2.
    pub maximum_length_bytes: u16,
    /// Whether the `Buffer` pointer is non-null.
    pub buffer_present: bool,
}

impl UnicodeStringArg {
    /// A NUL-terminated string whose `Length` and `MaximumLength` cover the
    /// NUL, as MS-RRP requires for key and value names.
    pub fn nul_terminated(text: &str) -> Result<Self> {
        let units = utf16_units(text, true);
        let bytes = units.len() * 2;
        let maximum_length_bytes = u16::try_from(bytes).map_err(|_| {
            Error::InvalidArgument(format!(
                "name of {} UTF-16 units is longer than a registry name may be (32767)",
                units.len()
            ))
        })?;
        Ok(UnicodeStringArg { units, maximum_length_bytes, buffer_present: true })
    }

    /// An empty output buffer of `capacity_bytes` for the server to fill.
    pub fn empty_buffer(capacity_bytes: u16) -> Self {
        UnicodeStringArg { units: Vec::new(), maximum_length_bytes: capacity_bytes, buffer_present: true }
    }

    /// The structure itself (Length, MaximumLength, Buffer pointer).
    pub fn write_header(&self, writer: &mut NdrWriter) {
        writer.write_u16((self.units.len() * 2) as u16);
        writer.write_u16(self.maximum_length_bytes);
        writer.write_unique_pointer(self.buffer_present);
    }

    /// The deferred buffer the structure points to.
    pub fn write_deferred(&self, writer: &mut NdrWriter) {
        if self.buffer_present {
            writer.write_conformant_varying_u16(u32::from(self.maximum_length_bytes / 2), &self.units);
        }
    }

    /// Header and buffer together, as a top-level parameter.
    pub fn write(&self, writer: &mut NdrWriter) {
        self.write_header(writer);
        self.write_deferred(writer);
    }
}

/// A decoded `RPC_UNICODE_STRING` header; call
/// [`UnicodeStringHeader::read_deferred`] where its buffer comes.
#[derive(Debug, Clone, Copy)]
pub struct UnicodeStringHeader {
    pub length_bytes: u16,
    pub maximum_length_bytes: u16,
    pub buffer_present: bool,
}

impl UnicodeStringHeader {
    pub fn read(reader: &mut NdrReader<'_>) -> Result<Self> {
        let length_bytes = reader.read_u16()?;
        let maximum_length_bytes = reader.read_u16()?;
        let buffer_present = reader.read_unique_pointer()?;
        Ok(UnicodeStringHeader { length_bytes, maximum_length_bytes, buffer_present })
    }

    /// Reads the deferred buffer (if any) and returns the text without
    /// trailing NULs.
    pub fn read_deferred(&self, reader: &mut NdrReader<'_>) -> Result<Option<String>> {
        if !self.buffer_present {
            return Ok(None);
        }
        let units = reader.read_conformant_varying_u16()?;
        let declared_units = usize::from(self.length_bytes / 2);
        let used = units.get(..declared_units.min(units.len())).unwrap_or(&[]);
        Ok(Some(string_from_utf16(used)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primitives_are_aligned_from_the_stub_start() {
        let mut writer = NdrWriter::new();
        writer.write_u8(1);
        writer.write_u32(0x0403_0201);
        writer.write_u16(0x0605);
        writer.write_u64(7);
        let bytes = writer.into_bytes();
        assert_eq!(bytes, [1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0]);
        let mut reader = NdrReader::new(&bytes, "test");
        assert_eq!(reader.read_u8().unwrap(), 1);
        assert_eq!(reader.read_u32().unwrap(), 0x0403_0201);
        assert_eq!(reader.read_u16().unwrap(), 0x0605);
        assert_eq!(reader.read_u64().unwrap(), 7);
        reader.finish().unwrap();
    }

    #[test]
    fn referent_ids_count_up_by_four() {
        let mut writer = NdrWriter::new();
        writer.write_unique_pointer(true);
        writer.write_unique_pointer(false);
        writer.write_unique_pointer(true);
        assert_eq!(writer.into_bytes(), [0, 0, 2, 0, 0, 0, 0, 0, 4, 0, 2, 0]);
    }

    #[test]
    fn wide_string_round_trips() {
        let mut writer = NdrWriter::new();
        writer.write_wide_string("Spooler");
        let bytes = writer.into_bytes();
        assert_eq!(&bytes[..12], &[8, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0]);
        let mut reader = NdrReader::new(&bytes, "test");
        assert_eq!(reader.read_wide_string().unwrap(), "Spooler");
        reader.finish().unwrap();
    }

    #[test]
    fn huge_counts_are_rejected_before_allocating() {
        let mut writer = NdrWriter::new();
        writer.write_u32(u32::MAX);
        writer.write_u32(0);
        writer.write_u32(u32::MAX);
        let bytes = writer.into_bytes();
        let error = NdrReader::new(&bytes, "test").read_conformant_varying_u16().unwrap_err();
        assert!(error.to_string().contains("needs"), "{error}");
    }

    #[test]
    fn offset_beyond_maximum_is_rejected() {
        let mut writer = NdrWriter::new();
        writer.write_u32(2);
        writer.write_u32(2);
        writer.write_u32(1);
        writer.write_u16(0);
        let bytes = writer.into_bytes();
        assert!(NdrReader::new(&bytes, "test").read_conformant_varying_u16().is_err());
    }
}
