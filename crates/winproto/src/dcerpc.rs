//! DCE/RPC connection-oriented PDUs (C706 chapter 12, MS-RPCE 2.2.2) and a
//! client that runs calls over a named pipe (ncacn_np).
//!
//! Owns: PDU encoding and decoding (bind, bind_ack, bind_nak, request,
//! response, fault), request fragmentation to the negotiated fragment size,
//! reassembly of multi-fragment replies, and the mapping of fault PDUs to
//! [`RpcFaultStatus`]. It never interprets stub data; [`crate::rrp`] and
//! [`crate::scmr`] do.
//!
//! The pipe is abstract ([`PipeIo`]): [`crate::smb::SmbPipe`] is the real one
//! (FSCTL_PIPE_TRANSCEIVE, SMB2 WRITE and READ on `IPC$`), tests use an
//! in-memory server.
//!
//! Decoding is total and bounded: a PDU is at most 65535 bytes by
//! construction (`frag_length` is 16 bits), a reassembled reply is at most
//! [`MAX_REPLY_STUB_BYTES`], and every malformed input is an error.

use std::future::Future;

use crate::error::{Error, Result, RpcFaultStatus};

/// Largest reassembled reply stub accepted (the registry values and service
/// records this crate reads are far smaller).
pub const MAX_REPLY_STUB_BYTES: usize = 8 * 1024 * 1024;

/// Fragment size we offer in the bind (what Windows and Impacket use).
pub const DEFAULT_MAX_FRAGMENT: u16 = 4280;

/// Common header size.
pub const HEADER_LEN: usize = 16;
/// Request PDU header size (common header + alloc_hint, context id, opnum).
pub const REQUEST_HEADER_LEN: usize = 24;
/// Response PDU header size.
pub const RESPONSE_HEADER_LEN: usize = 24;

const RPC_VERSION: u8 = 5;
const RPC_VERSION_MINOR: u8 = 0;
/// Little-endian integers, ASCII characters, IEEE floats.
const DATA_REPRESENTATION: [u8; 4] = [0x10, 0, 0, 0];

/// PFC flags.
pub mod flags {
    pub const FIRST_FRAG: u8 = 0x01;
    pub const LAST_FRAG: u8 = 0x02;
    pub const PENDING_CANCEL: u8 = 0x04;
    pub const CONC_MPX: u8 = 0x10;
    pub const DID_NOT_EXECUTE: u8 = 0x20;
    pub const MAYBE: u8 = 0x40;
    pub const OBJECT_UUID: u8 = 0x80;
}

/// PDU types this client sends or understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PacketType {
    Request = 0,
    Response = 2,
    Fault = 3,
    Bind = 11,
    BindAck = 12,
    BindNak = 13,
}

impl PacketType {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            0 => PacketType::Request,
            2 => PacketType::Response,
            3 => PacketType::Fault,
            11 => PacketType::Bind,
            12 => PacketType::BindAck,
            13 => PacketType::BindNak,
            _ => return None,
        })
    }
}

/// A UUID in its DCE wire form (first three fields little-endian).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// Parses the canonical text form `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
    /// Panics on malformed text: only for compile-time constants.
    pub const fn parse_const(text: &str) -> Uuid {
        const fn hex(byte: u8) -> u8 {
            match byte {
                b'0'..=b'9' => byte - b'0',
                b'a'..=b'f' => byte - b'a' + 10,
                b'A'..=b'F' => byte - b'A' + 10,
                _ => panic!("bad hex digit in UUID"),
            }
        }
        let text = text.as_bytes();
        assert!(text.len() == 36, "UUID text must be 36 characters");
        let mut canonical = [0u8; 16];
        let mut index = 0;
        let mut position = 0;
        while index < 16 {
            if text[position] == b'-' {
                position += 1;
            }
            canonical[index] = hex(text[position]) << 4 | hex(text[position + 1]);
            index += 1;
            position += 2;
        }
        // time_low, time_mid, time_hi_and_version are little-endian on the wire.
        let wire = [
            canonical[3],
            canonical[2],
            canonical[1],
            canonical[0],
            canonical[5],
            canonical[4],
            canonical[7],
            canonical[6],
            canonical[8],
            canonical[9],
            canonical[10],
            canonical[11],
            canonical[12],
            canonical[13],
            canonical[14],
            canonical[15],
        ];
        Uuid(wire)
    }
}

impl std::fmt::Debug for Uuid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]
        )
    }
}

/// An interface or transfer syntax identifier: UUID and version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyntaxId {
    pub uuid: Uuid,
    pub version_major: u16,
    pub version_minor: u16,
}

/// NDR 2.0, the transfer syntax every Windows and Samba server accepts.
pub const NDR32_TRANSFER_SYNTAX: SyntaxId =
    SyntaxId { uuid: Uuid::parse_const("8a885d04-1ceb-11c9-9fe8-08002b104860"), version_major: 2, version_minor: 0 };

/// An RPC interface this crate talks to.
#[derive(Debug, Clone, Copy)]
pub struct Interface {
    /// Short name for messages (`winreg`, `svcctl`).
    pub name: &'static str,
    /// Pipe name on `IPC$`, without `\PIPE\`.
    pub pipe: &'static str,
    pub syntax: SyntaxId,
}

/// The common header of every PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub packet_type: u8,
    pub flags: u8,
    pub data_representation: [u8; 4],
    pub frag_length: u16,
    pub auth_length: u16,
    pub call_id: u32,
}

impl Header {
    fn write(&self, out: &mut Vec<u8>) {
        out.push(RPC_VERSION);
        out.push(RPC_VERSION_MINOR);
        out.push(self.packet_type);
        out.push(self.flags);
        out.extend_from_slice(&self.data_representation);
        out.extend_from_slice(&self.frag_length.to_le_bytes());
        out.extend_from_slice(&self.auth_length.to_le_bytes());
        out.extend_from_slice(&self.call_id.to_le_bytes());
    }

    /// Decodes and checks a common header (version, little-endian data
    /// representation, `frag_length` at least the header).
    pub fn decode(bytes: &[u8]) -> Result<Header> {
        if bytes.len() < HEADER_LEN {
            return Err(Error::malformed("DCE/RPC header", format!("{} bytes, need {HEADER_LEN}", bytes.len())));
        }
        if bytes[0] != RPC_VERSION || bytes[1] != RPC_VERSION_MINOR {
            return Err(Error::malformed("DCE/RPC header", format!("version {}.{}, expected 5.0", bytes[0], bytes[1])));
        }
        let data_representation = [bytes[4], bytes[5], bytes[6], bytes[7]];
        if data_representation[0] & 0xf0 != 0x10 {
            return Err(Error::malformed(
                "DCE/RPC header",
                format!("big-endian data representation {:02x?} is not supported", data_representation),
            ));
        }
        let header = Header {
            packet_type: bytes[2],
            flags: bytes[3],
            data_representation,
            frag_length: u16::from_le_bytes([bytes[8], bytes[9]]),
            auth_length: u16::from_le_bytes([bytes[10], bytes[11]]),
            call_id: u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]),
        };
        if usize::from(header.frag_length) < HEADER_LEN {
            return Err(Error::malformed(
                "DCE/RPC header",
                format!("frag_length {} is shorter than the header", header.frag_length),
            ));
        }
        Ok(header)
    }
}

/// One presentation context offered in a bind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextElement {
    pub context_id: u16,
    pub abstract_syntax: SyntaxId,
    pub transfer_syntaxes: Vec<SyntaxId>,
}

/// A bind PDU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub call_id: u32,
    pub max_xmit_frag: u16,
    pub max_recv_frag: u16,
    pub assoc_group_id: u32,
    pub contexts: Vec<ContextElement>,
}

fn write_syntax(out: &mut Vec<u8>, syntax: &SyntaxId) {
    out.extend_from_slice(&syntax.uuid.0);
    out.extend_from_slice(&syntax.version_major.to_le_bytes());
    out.extend_from_slice(&syntax.version_minor.to_le_bytes());
}

impl Bind {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(72);
        body.extend_from_slice(&self.max_xmit_frag.to_le_bytes());
        body.extend_from_slice(&self.max_recv_frag.to_le_bytes());
        body.extend_from_slice(&self.assoc_group_id.to_le_bytes());
        body.push(self.contexts.len() as u8);
        body.extend_from_slice(&[0, 0, 0]);
        for context in &self.contexts {
            body.extend_from_slice(&context.context_id.to_le_bytes());
            body.push(context.transfer_syntaxes.len() as u8);
            body.push(0);
            write_syntax(&mut body, &context.abstract_syntax);
            for transfer in &context.transfer_syntaxes {
                write_syntax(&mut body, transfer);
            }
        }
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        Header {
            packet_type: PacketType::Bind as u8,
            flags: flags::FIRST_FRAG | flags::LAST_FRAG,
            data_representation: DATA_REPRESENTATION,
            frag_length: (HEADER_LEN + body.len()) as u16,
            auth_length: 0,
            call_id: self.call_id,
        }
        .write(&mut out);
        out.extend_from_slice(&body);
        out
    }
}

/// The result of one presentation context in a bind_ack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextResult {
    /// 0 acceptance, 1 user rejection, 2 provider rejection, 3 negotiate ack.
    pub result: u16,
    pub reason: u16,
    pub transfer_syntax: SyntaxId,
}

/// A bind_ack PDU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindAck {
    pub max_xmit_frag: u16,
    pub max_recv_frag: u16,
    pub assoc_group_id: u32,
    pub secondary_address: Vec<u8>,
    pub results: Vec<ContextResult>,
}

/// A response PDU (one fragment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseFragment {
    pub alloc_hint: u32,
    pub context_id: u16,
    pub cancel_count: u8,
    pub stub: Vec<u8>,
}

/// A fault PDU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub context_id: u16,
    pub cancel_count: u8,
    pub status: RpcFaultStatus,
}

/// A bind_nak PDU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindNak {
    pub reject_reason: u16,
}

/// Body of a decoded PDU from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerPdu {
    BindAck(BindAck),
    BindNak(BindNak),
    Response(ResponseFragment),
    Fault(Fault),
}

/// A decoded PDU: header and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedPdu {
    pub header: Header,
    pub body: ServerPdu,
}

struct Cursor<'a> {
    data: &'a [u8],
    position: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, count: usize, what: &'static str) -> Result<&'a [u8]> {
        if self.data.len() - self.position < count {
            return Err(Error::malformed(
                what,
                format!(
                    "truncated: needs {count} bytes at offset {}, {} left",
                    self.position,
                    self.data.len() - self.position
                ),
            ));
        }
        let slice = &self.data[self.position..self.position + count];
        self.position += count;
        Ok(slice)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn syntax(&mut self, what: &'static str) -> Result<SyntaxId> {
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(self.take(16, what)?);
        Ok(SyntaxId { uuid: Uuid(uuid), version_major: self.u16(what)?, version_minor: self.u16(what)? })
    }
}

/// Decodes one complete PDU from the server. `pdu` must be exactly
/// `frag_length` bytes.
pub fn decode_server_pdu(pdu: &[u8]) -> Result<DecodedPdu> {
    let header = Header::decode(pdu)?;
    if usize::from(header.frag_length) != pdu.len() {
        return Err(Error::malformed(
            "DCE/RPC PDU",
            format!("frag_length {} but {} bytes given", header.frag_length, pdu.len()),
        ));
    }
    // The authentication verifier (if any) sits at the end; we bind without
    // authentication, so a server that sends one is answered with an error.
    let auth_total = if header.auth_length > 0 { usize::from(header.auth_length) + 8 } else { 0 };
    if HEADER_LEN + auth_total > pdu.len() {
        return Err(Error::malformed("DCE/RPC PDU", format!("auth_length {} exceeds the PDU", header.auth_length)));
    }
    let body_end = pdu.len() - auth_total;
    let mut cursor = Cursor { data: &pdu[..body_end], position: HEADER_LEN };
    let packet_type = PacketType::from_u8(header.packet_type)
        .ok_or_else(|| Error::malformed("DCE/RPC PDU", format!("unexpected packet type {}", header.packet_type)))?;
    let body = match packet_type {
        PacketType::BindAck => {
            const WHAT: &str = "DCE/RPC bind_ack";
            let max_xmit_frag = cursor.u16(WHAT)?;
            let max_recv_frag = cursor.u16(WHAT)?;
            let assoc_group_id = cursor.u32(WHAT)?;
            let address_length = usize::from(cursor.u16(WHAT)?);
            let secondary_address = cursor.take(address_length, WHAT)?.to_vec();
            // Pad to 4 from the PDU start.
            let padding = (4 - cursor.position % 4) % 4;
            cursor.take(padding, WHAT)?;
            let count = cursor.u8(WHAT)?;
            cursor.take(3, WHAT)?;
            let mut results = Vec::with_capacity(usize::from(count).min(16));
            for _ in 0..count {
                results.push(ContextResult {
                    result: cursor.u16(WHAT)?,
                    reason: cursor.u16(WHAT)?,
                    transfer_syntax: cursor.syntax(WHAT)?,
                });
            }
            ServerPdu::BindAck(BindAck { max_xmit_frag, max_recv_frag, assoc_group_id, secondary_address, results })
        }
        PacketType::BindNak => ServerPdu::BindNak(BindNak { reject_reason: cursor.u16("DCE/RPC bind_nak")? }),
        PacketType::Response => {
            const WHAT: &str = "DCE/RPC response";
            let alloc_hint = cursor.u32(WHAT)?;
            let context_id = cursor.u16(WHAT)?;
            let cancel_count = cursor.u8(WHAT)?;
            cursor.u8(WHAT)?;
            let stub = cursor.data[cursor.position..].to_vec();
            ServerPdu::Response(ResponseFragment { alloc_hint, context_id, cancel_count, stub })
        }
        PacketType::Fault => {
            const WHAT: &str = "DCE/RPC fault";
            let _alloc_hint = cursor.u32(WHAT)?;
            let context_id = cursor.u16(WHAT)?;
            let cancel_count = cursor.u8(WHAT)?;
            cursor.u8(WHAT)?;
            let status = RpcFaultStatus(cursor.u32(WHAT)?);
            ServerPdu::Fault(Fault { context_id, cancel_count, status })
        }
        PacketType::Request | PacketType::Bind => {
            return Err(Error::malformed(
                "DCE/RPC PDU",
                format!("a server sent a client PDU (type {})", header.packet_type),
            ))
        }
    };
    Ok(DecodedPdu { header, body })
}

/// Splits a request stub into PDUs of at most `max_fragment` bytes.
///
/// Stub bytes per fragment are a multiple of 8 (except in the last), so the
/// NDR alignment of the receiver's reassembly buffer is unchanged.
/// `alloc_hint` is the stub length still to come, from this fragment on.
pub fn encode_request_fragments(
    call_id: u32,
    context_id: u16,
    opnum: u16,
    stub: &[u8],
    max_fragment: u16,
) -> Vec<Vec<u8>> {
    let capacity = usize::from(max_fragment).saturating_sub(REQUEST_HEADER_LEN);
    let per_fragment = (capacity / 8 * 8).max(8);
    let mut fragments = Vec::new();
    let mut offset = 0;
    loop {
        let end = (offset + per_fragment).min(stub.len());
        let chunk = &stub[offset..end];
        let mut pdu_flags = 0;
        if offset == 0 {
            pdu_flags |= flags::FIRST_FRAG;
        }
        if end == stub.len() {
            pdu_flags |= flags::LAST_FRAG;
        }
        let mut out = Vec::with_capacity(REQUEST_HEADER_LEN + chunk.len());
        Header {
            packet_type: PacketType::Request as u8,
            flags: pdu_flags,
            data_representation: DATA_REPRESENTATION,
            frag_length: (REQUEST_HEADER_LEN + chunk.len()) as u16,
            auth_length: 0,
            call_id,
        }
        .write(&mut out);
        out.extend_from_slice(&((stub.len() - offset) as u32).to_le_bytes());
        out.extend_from_slice(&context_id.to_le_bytes());
        out.extend_from_slice(&opnum.to_le_bytes());
        out.extend_from_slice(chunk);
        fragments.push(out);
        offset = end;
        if offset >= stub.len() {
            return fragments;
        }
    }
}

/// Message-mode byte pipe the RPC client runs over.
pub trait PipeIo: Send {
    /// Writes `request` as one message and reads at most `max_output` bytes
    /// of the answer; `true` when the server has more of it.
    fn transceive(&mut self, request: &[u8], max_output: u32) -> impl Future<Output = Result<(Vec<u8>, bool)>> + Send;

    /// Writes one message.
    fn write(&mut self, data: &[u8]) -> impl Future<Output = Result<()>> + Send;

    /// Reads at most `max_len` bytes; `true` when the message has more.
    fn read(&mut self, max_len: u32) -> impl Future<Output = Result<(Vec<u8>, bool)>> + Send;
}

/// A bound DCE/RPC association over a pipe.
#[derive(Debug)]
pub struct RpcClient<P> {
    pipe: P,
    interface: Interface,
    next_call_id: u32,
    context_id: u16,
    /// Largest fragment we may send (the server's max_recv_frag).
    max_send_fragment: u16,
    /// Largest fragment we accept (our max_recv_frag, as acknowledged).
    max_receive_fragment: u16,
    received: Vec<u8>,
}

impl<P: PipeIo> RpcClient<P> {
    /// Binds `interface` with NDR32 over `pipe`, offering `max_fragment` in
    /// both directions.
    pub async fn bind(mut pipe: P, interface: Interface, max_fragment: u16) -> Result<Self> {
        let max_fragment = max_fragment.max(REQUEST_HEADER_LEN as u16 + 8);
        let bind = Bind {
            call_id: 1,
            max_xmit_frag: max_fragment,
            max_recv_frag: max_fragment,
            assoc_group_id: 0,
            contexts: vec![ContextElement {
                context_id: 0,
                abstract_syntax: interface.syntax,
                transfer_syntaxes: vec![NDR32_TRANSFER_SYNTAX],
            }],
        };
        let (reply, more) = pipe.transceive(&bind.encode(), u32::from(max_fragment)).await?;
        let mut client = RpcClient {
            pipe,
            interface,
            next_call_id: 2,
            context_id: 0,
            max_send_fragment: max_fragment,
            max_receive_fragment: max_fragment,
            received: reply,
        };
        let _ = more;
        let pdu = client.next_pdu().await?;
        if pdu.header.call_id != 1 {
            return Err(Error::malformed("DCE/RPC bind_ack", format!("call id {} for our bind 1", pdu.header.call_id)));
        }
        match pdu.body {
            ServerPdu::BindAck(ack) => {
                let accepted = ack
                    .results
                    .first()
                    .filter(|result| result.result == 0 && result.transfer_syntax == NDR32_TRANSFER_SYNTAX);
                if accepted.is_none() {
                    return Err(Error::BindRejected {
                        interface: interface.name,
                        reason: format!("presentation context not accepted: {:?}", ack.results),
                    });
                }
                // The server's max_recv_frag bounds what we send; its
                // max_xmit_frag is what it will send us.
                client.max_send_fragment = ack
                    .max_recv_frag
                    .clamp(REQUEST_HEADER_LEN as u16 + 8, max_fragment.max(REQUEST_HEADER_LEN as u16 + 8));
                client.max_receive_fragment = ack.max_xmit_frag.max(max_fragment);
                Ok(client)
            }
            ServerPdu::BindNak(nak) => Err(Error::BindRejected {
                interface: interface.name,
                reason: format!("bind_nak, reject reason {}", nak.reject_reason),
            }),
            ServerPdu::Fault(fault) => {
                Err(Error::RpcFault { interface: interface.name, opnum: 0, status: fault.status })
            }
            ServerPdu::Response(_) => Err(Error::malformed("DCE/RPC bind_ack", "a response PDU in answer to a bind")),
        }
    }

    /// The interface this client is bound to.
    pub fn interface(&self) -> &Interface {
        &self.interface
    }

    /// The fragment size used for requests (after negotiation).
    pub fn max_send_fragment(&self) -> u16 {
        self.max_send_fragment
    }

    /// Gives the pipe back (for closing it).
    pub fn into_pipe(self) -> P {
        self.pipe
    }

    /// Runs one call: sends the stub (fragmented as needed) and returns the
    /// reassembled reply stub; a fault PDU is [`Error::RpcFault`].
    pub async fn call(&mut self, opnum: u16, stub: &[u8]) -> Result<Vec<u8>> {
        let call_id = self.next_call_id;
        self.next_call_id = self.next_call_id.wrapping_add(1).max(2);
        let fragments = encode_request_fragments(call_id, self.context_id, opnum, stub, self.max_send_fragment);
        let (last, leading) = fragments.split_last().expect("encode_request_fragments returns at least one fragment");
        for fragment in leading {
            self.pipe.write(fragment).await?;
        }
        if !self.received.is_empty() {
            return Err(Error::malformed(
                "DCE/RPC stream",
                format!("{} unread bytes before call {call_id}", self.received.len()),
            ));
        }
        let (reply, _more) = self.pipe.transceive(last, u32::from(self.max_receive_fragment)).await?;
        self.received = reply;

        let mut stub_out: Vec<u8> = Vec::new();
        let mut first = true;
        loop {
            let pdu = self.next_pdu().await?;
            if pdu.header.call_id != call_id {
                return Err(Error::malformed(
                    "DCE/RPC response",
                    format!("call id {} while waiting for {call_id}", pdu.header.call_id),
                ));
            }
            match pdu.body {
                ServerPdu::Fault(fault) => {
                    return Err(Error::RpcFault { interface: self.interface.name, opnum, status: fault.status })
                }
                ServerPdu::Response(fragment) => {
                    if first && pdu.header.flags & flags::FIRST_FRAG == 0 {
                        return Err(Error::malformed("DCE/RPC response", "first fragment lacks PFC_FIRST_FRAG"));
                    }
                    if fragment.context_id != self.context_id {
                        return Err(Error::malformed(
                            "DCE/RPC response",
                            format!("context id {}", fragment.context_id),
                        ));
                    }
                    if stub_out.len() + fragment.stub.len() > MAX_REPLY_STUB_BYTES {
                        return Err(Error::malformed(
                            "DCE/RPC response",
                            format!("reply larger than {MAX_REPLY_STUB_BYTES} bytes"),
                        ));
                    }
                    if first {
                        let hint = (fragment.alloc_hint as usize).min(MAX_REPLY_STUB_BYTES);
                        stub_out.reserve(hint.max(fragment.stub.len()));
                    }
                    first = false;
                    stub_out.extend_from_slice(&fragment.stub);
                    if pdu.header.flags & flags::LAST_FRAG != 0 {
                        if !self.received.is_empty() {
                            return Err(Error::malformed(
                                "DCE/RPC response",
                                format!("{} bytes after the last fragment", self.received.len()),
                            ));
                        }
                        return Ok(stub_out);
                    }
                }
                other => {
                    return Err(Error::malformed("DCE/RPC response", format!("unexpected PDU {other:?} during a call")))
                }
            }
        }
    }

    /// Takes the next complete PDU out of the receive buffer, reading from
    /// the pipe only while the PDU at the head of the buffer is incomplete.
    async fn next_pdu(&mut self) -> Result<DecodedPdu> {
        loop {
            if self.received.len() >= HEADER_LEN {
                let header = Header::decode(&self.received[..HEADER_LEN])?;
                let length = usize::from(header.frag_length);
                if self.received.len() >= length {
                    let rest = self.received.split_off(length);
                    let pdu = std::mem::replace(&mut self.received, rest);
                    return decode_server_pdu(&pdu);
                }
            }
            let (more_bytes, _more) = self.pipe.read(u32::from(self.max_receive_fragment)).await?;
            if more_bytes.is_empty() {
                return Err(Error::malformed("DCE/RPC stream", "the pipe returned no data in the middle of a PDU"));
            }
            self.received.extend_from_slice(&more_bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_text_is_stored_in_wire_order() {
        let uuid = Uuid::parse_const("8a885d04-1ceb-11c9-9fe8-08002b104860");
        assert_eq!(
            uuid.0,
            [0x04, 0x5d, 0x88, 0x8a, 0xeb, 0x1c, 0xc9, 0x11, 0x9f, 0xe8, 0x08, 0x00, 0x2b, 0x10, 0x48, 0x60]
        );
        assert_eq!(format!("{uuid:?}"), "8a885d04-1ceb-11c9-9fe8-08002b104860");
    }

    #[test]
    fn small_request_is_one_fragment() {
        let fragments = encode_request_fragments(7, 0, 15, &[1, 2, 3], 4280);
        assert_eq!(fragments.len(), 1);
        let header = Header::decode(&fragments[0]).unwrap();
        assert_eq!(header.flags, flags::FIRST_FRAG | flags::LAST_FRAG);
        assert_eq!(usize::from(header.frag_length), fragments[0].len());
    }

    #[test]
    fn large_request_fragments_with_multiple_of_eight_stubs() {
        let stub: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let fragments = encode_request_fragments(3, 0, 12, &stub, 100);
        // 100 - 24 = 76 -> 72 bytes of stub per fragment.
        assert_eq!(fragments.len(), 1000usize.div_ceil(72));
        let mut joined = Vec::new();
        for (index, fragment) in fragments.iter().enumerate() {
            let header = Header::decode(fragment).unwrap();
            assert!(fragment.len() <= 100);
            assert_eq!(header.flags & flags::FIRST_FRAG != 0, index == 0);
            assert_eq!(header.flags & flags::LAST_FRAG != 0, index == fragments.len() - 1);
            let alloc_hint = u32::from_le_bytes(fragment[16..20].try_into().unwrap());
            assert_eq!(alloc_hint as usize, 1000 - joined.len());
            joined.extend_from_slice(&fragment[REQUEST_HEADER_LEN..]);
        }
        assert_eq!(joined, stub);
    }

    #[test]
    fn fault_decodes_to_named_status() {
        let mut pdu = Vec::new();
        Header {
            packet_type: PacketType::Fault as u8,
            flags: flags::FIRST_FRAG | flags::LAST_FRAG | flags::DID_NOT_EXECUTE,
            data_representation: DATA_REPRESENTATION,
            frag_length: 32,
            auth_length: 0,
            call_id: 2,
        }
        .write(&mut pdu);
        pdu.extend_from_slice(&[0; 8]);
        pdu.extend_from_slice(&0x1c01_0002u32.to_le_bytes());
        pdu.extend_from_slice(&[0; 4]);
        let decoded = decode_server_pdu(&pdu).unwrap();
        match decoded.body {
            ServerPdu::Fault(fault) => {
                assert_eq!(fault.status, RpcFaultStatus::NCA_S_OP_RNG_ERROR);
                assert_eq!(fault.status.name(), Some("NCA_S_OP_RNG_ERROR"));
            }
            other => panic!("expected a fault, got {other:?}"),
        }
    }
}
