//! Property tests: every decoder is total on arbitrary bytes (an error,
//! never a panic), and the RPC client fragments requests and reassembles
//! replies correctly whatever the fragment sizes and however the pipe
//! splits the byte stream.

use std::collections::VecDeque;

use fleetpatch_winproto::dcerpc::{
    self, decode_server_pdu, flags, Header, PipeIo, RpcClient, HEADER_LEN, REQUEST_HEADER_LEN,
};
use fleetpatch_winproto::ndr::{NdrReader, NdrWriter};
use fleetpatch_winproto::rrp::{self, RegistryValue};
use fleetpatch_winproto::scmr::{EnumServicesStatusRequest, EnumServicesStatusResponse, ServiceStatus};
use fleetpatch_winproto::{scmr, EnumServiceStatus, Error, Result, RpcFaultStatus, ServiceControlManager, Win32Error};
use proptest::prelude::*;

/// An ENUM_SERVICE_STATUSW buffer of `size` bytes (at least what the
/// services need) holding `services`, its strings right after the records
/// (Samba's layout) or packed from the end backwards.
fn enum_buffer(services: &[EnumServiceStatus], size: usize, strings_at_end: bool) -> Vec<u8> {
    let records_end = services.len() * scmr::ENUM_SERVICE_STATUS_SIZE;
    let mut records = Vec::new();
    let mut strings: Vec<u8> = Vec::new();
    let encoded: Vec<[Vec<u8>; 2]> = services
        .iter()
        .map(|service| {
            [&service.service_name, &service.display_name].map(|text| {
                fleetpatch_winproto::ndr::utf16_units(text, true).into_iter().flat_map(u16::to_le_bytes).collect()
            })
        })
        .collect();
    let strings_len: usize = encoded.iter().flatten().map(Vec::len).sum();
    let size = size.max(records_end + strings_len);
    let mut end = size;
    for (service, texts) in services.iter().zip(&encoded) {
        for text in texts {
            let offset = if strings_at_end {
                end -= text.len();
                strings.splice(0..0, text.iter().copied());
                end
            } else {
                let offset = records_end + strings.len();
                strings.extend_from_slice(text);
                offset
            };
            records.extend_from_slice(&(offset as u32).to_le_bytes());
        }
        let s = service.status;
        for field in [
            s.service_type,
            s.current_state,
            s.controls_accepted,
            s.win32_exit_code,
            s.service_specific_exit_code,
            s.check_point,
            s.wait_hint,
        ] {
            records.extend_from_slice(&field.to_le_bytes());
        }
    }
    let gap = size - records.len() - strings.len();
    let mut buffer = records;
    if strings_at_end {
        buffer.resize(buffer.len() + gap, 0);
        buffer.extend_from_slice(&strings);
    } else {
        buffer.extend_from_slice(&strings);
        buffer.resize(size, 0);
    }
    buffer
}

/// The stub of an REnumServicesStatusW reply.
fn enum_reply(buffer: &[u8], needed: u32, returned: u32, resume: Option<u32>, status: Win32Error) -> Vec<u8> {
    let mut writer = NdrWriter::new();
    writer.write_conformant_bytes(buffer);
    writer.write_u32(needed);
    writer.write_u32(returned);
    writer.write_unique_pointer(resume.is_some());
    if let Some(index) = resume {
        writer.write_u32(index);
    }
    writer.write_u32(status.0);
    writer.into_bytes()
}

fn service_strategy() -> impl Strategy<Value = EnumServiceStatus> {
    ("[^\\u{0}]{0,24}", "[^\\u{0}]{0,40}", proptest::array::uniform7(any::<u32>())).prop_map(|(name, display, f)| {
        EnumServiceStatus {
            service_name: name,
            display_name: display,
            status: ServiceStatus {
                service_type: f[0],
                current_state: f[1],
                controls_accepted: f[2],
                win32_exit_code: f[3],
                service_specific_exit_code: f[4],
                check_point: f[5],
                wait_hint: f[6],
            },
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn pdu_decoder_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = Header::decode(&bytes);
        let _ = decode_server_pdu(&bytes);
    }

    #[test]
    fn pdu_decoder_is_total_on_plausible_headers(
        packet_type in prop_oneof![Just(2u8), Just(3), Just(12), Just(13), any::<u8>()],
        pfc in any::<u8>(),
        auth_length in prop_oneof![Just(0u16), any::<u16>()],
        body in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut pdu = vec![5, 0, packet_type, pfc, 0x10, 0, 0, 0];
        pdu.extend_from_slice(&((HEADER_LEN + body.len()) as u16).to_le_bytes());
        pdu.extend_from_slice(&auth_length.to_le_bytes());
        pdu.extend_from_slice(&1u32.to_le_bytes());
        pdu.extend_from_slice(&body);
        let _ = decode_server_pdu(&pdu);
    }

    #[test]
    fn ndr_reply_decoders_are_total(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = rrp::KeyHandleResponse::decode(&bytes);
        let _ = rrp::QueryValueResponse::decode(&bytes);
        let _ = rrp::EnumKeyResponse::decode(&bytes);
        let _ = rrp::EnumValueResponse::decode(&bytes);
        let _ = scmr::HandleResponse::decode(&bytes);
        let _ = scmr::CreateServiceResponse::decode(&bytes);
        let _ = scmr::ServiceStatusResponse::decode(&bytes);
        let _ = scmr::StatusResponse::decode(&bytes);
        if let Ok(reply) = EnumServicesStatusResponse::decode(&bytes) {
            let _ = reply.services();
        }
        let mut reader = NdrReader::new(&bytes, "fuzz");
        let _ = reader.read_conformant_varying_u16();
        let mut reader = NdrReader::new(&bytes, "fuzz");
        let _ = reader.read_conformant_varying_bytes();
        let mut reader = NdrReader::new(&bytes, "fuzz");
        let _ = reader.read_conformant_bytes();
    }

    /// Pointers set, counts huge: must be refused without allocating.
    #[test]
    fn huge_counts_are_refused(count in any::<u32>(), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&0x20000u32.to_le_bytes());
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&0x20004u32.to_le_bytes());
        bytes.extend_from_slice(&count.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&count.to_le_bytes());
        bytes.extend_from_slice(&tail);
        let _ = rrp::QueryValueResponse::decode(&bytes);
    }

    /// Arbitrary buffers, and buffers whose records point at random
    /// offsets around the strings: an error or names within the bounds.
    #[test]
    fn enum_service_buffer_decoder_is_total(
        count in prop_oneof![0u32..16, any::<u32>()],
        records in proptest::collection::vec((0u32..700, 0u32..700, proptest::array::uniform7(any::<u32>())), 0..12),
        strings in proptest::collection::vec(prop_oneof![Just(0u8), any::<u8>()], 0..600),
        garbage in proptest::collection::vec(any::<u8>(), 0..700),
    ) {
        let _ = scmr::decode_enum_service_buffer(&garbage, count);
        let mut buffer = Vec::new();
        for (name, display, status) in &records {
            buffer.extend_from_slice(&name.to_le_bytes());
            buffer.extend_from_slice(&display.to_le_bytes());
            for field in status {
                buffer.extend_from_slice(&field.to_le_bytes());
            }
        }
        buffer.extend_from_slice(&strings);
        for count in [count, records.len() as u32] {
            if let Ok(services) = scmr::decode_enum_service_buffer(&buffer, count) {
                prop_assert_eq!(services.len(), count as usize);
                let mut units = 0;
                for service in &services {
                    for text in [&service.service_name, &service.display_name] {
                        let length = text.encode_utf16().count();
                        prop_assert!(length <= scmr::MAX_SERVICE_NAME_UNITS);
                        units += length;
                    }
                }
                prop_assert!(units <= buffer.len());
            }
        }
    }

    /// Well-formed buffers in either layout decode to what was put in, also
    /// inside a whole reply.
    #[test]
    fn enum_service_buffers_round_trip(
        services in proptest::collection::vec(service_strategy(), 0..10),
        slack in 0usize..64,
        strings_at_end in any::<bool>(),
        resume in proptest::option::of(any::<u32>()),
        needed in any::<u32>(),
    ) {
        let buffer = enum_buffer(&services, slack, strings_at_end);
        let stub = enum_reply(&buffer, needed, services.len() as u32, resume, Win32Error::ERROR_MORE_DATA);
        let reply = EnumServicesStatusResponse::decode(&stub).unwrap();
        prop_assert_eq!(&reply.buffer, &buffer);
        prop_assert_eq!(reply.bytes_needed, needed);
        prop_assert_eq!(reply.resume_index, resume);
        prop_assert_eq!(reply.status, Win32Error::ERROR_MORE_DATA);
        prop_assert_eq!(reply.services().unwrap(), services);
    }

    #[test]
    fn registry_values_decode_from_any_bytes(kind in 0u32..16, data in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = RegistryValue::from_raw(kind, data);
    }

    #[test]
    fn request_fragments_reassemble(
        stub in proptest::collection::vec(any::<u8>(), 0..5000),
        max_fragment in 32u16..2000,
    ) {
        let fragments = dcerpc::encode_request_fragments(9, 0, 12, &stub, max_fragment);
        let mut joined = Vec::new();
        for (index, fragment) in fragments.iter().enumerate() {
            prop_assert!(fragment.len() <= usize::from(max_fragment).max(REQUEST_HEADER_LEN + 8));
            let header = Header::decode(fragment).unwrap();
            prop_assert_eq!(header.flags & flags::FIRST_FRAG != 0, index == 0);
            prop_assert_eq!(header.flags & flags::LAST_FRAG != 0, index + 1 == fragments.len());
            if index + 1 != fragments.len() {
                prop_assert_eq!((fragment.len() - REQUEST_HEADER_LEN) % 8, 0);
            }
            joined.extend_from_slice(&fragment[REQUEST_HEADER_LEN..]);
        }
        prop_assert_eq!(joined, stub);
    }
}

/// An in-memory ncacn_np server: reassembles request fragments, answers
/// with the reply split into fragments of `reply_fragment` bytes, and hands
/// the byte stream out in pieces of `chunk` bytes.
struct FakeServer {
    reply_stub: Vec<u8>,
    reply_fragment: usize,
    chunk: usize,
    fault: Option<u32>,
    /// Replies answered in turn before `reply_stub` takes over.
    scripted: VecDeque<Vec<u8>>,
    request_stub: Vec<u8>,
    received_requests: Vec<Vec<u8>>,
    outgoing: VecDeque<u8>,
}

impl FakeServer {
    fn absorb(&mut self, pdu: &[u8]) {
        let header = Header::decode(pdu).unwrap();
        match header.packet_type {
            11 => {
                // bind -> bind_ack accepting NDR32, frag sizes 4280.
                let mut body = Vec::new();
                body.extend_from_slice(&4280u16.to_le_bytes());
                body.extend_from_slice(&4280u16.to_le_bytes());
                body.extend_from_slice(&0x1234u32.to_le_bytes());
                body.extend_from_slice(&4u16.to_le_bytes());
                body.extend_from_slice(b"\\PIPE\\x\0"[..4].as_ref());
                while !(HEADER_LEN + body.len()).is_multiple_of(4) {
                    body.push(0);
                }
                body.extend_from_slice(&[1, 0, 0, 0]);
                body.extend_from_slice(&[0, 0, 0, 0]);
                body.extend_from_slice(&dcerpc::NDR32_TRANSFER_SYNTAX.uuid.0);
                body.extend_from_slice(&2u16.to_le_bytes());
                body.extend_from_slice(&0u16.to_le_bytes());
                self.emit(12, flags::FIRST_FRAG | flags::LAST_FRAG, header.call_id, &body);
            }
            0 => {
                self.request_stub.extend_from_slice(&pdu[REQUEST_HEADER_LEN..]);
                if header.flags & flags::LAST_FRAG != 0 {
                    self.received_requests.push(std::mem::take(&mut self.request_stub));
                    if let Some(status) = self.fault {
                        let mut body = vec![0u8; 8];
                        body.extend_from_slice(&status.to_le_bytes());
                        body.extend_from_slice(&[0; 4]);
                        self.emit(3, flags::FIRST_FRAG | flags::LAST_FRAG, header.call_id, &body);
                        return;
                    }
                    let stub = self.scripted.pop_front().unwrap_or_else(|| self.reply_stub.clone());
                    let pieces: Vec<&[u8]> =
                        if stub.is_empty() { vec![&[]] } else { stub.chunks(self.reply_fragment).collect() };
                    for (index, piece) in pieces.iter().enumerate() {
                        let mut pfc = 0;
                        if index == 0 {
                            pfc |= flags::FIRST_FRAG;
                        }
                        if index + 1 == pieces.len() {
                            pfc |= flags::LAST_FRAG;
                        }
                        let mut body = Vec::new();
                        body.extend_from_slice(&(stub.len() as u32).to_le_bytes());
                        body.extend_from_slice(&0u16.to_le_bytes());
                        body.extend_from_slice(&[0, 0]);
                        body.extend_from_slice(piece);
                        self.emit(2, pfc, header.call_id, &body);
                    }
                }
            }
            other => panic!("unexpected PDU type {other}"),
        }
    }

    fn emit(&mut self, packet_type: u8, pfc: u8, call_id: u32, body: &[u8]) {
        let mut pdu = vec![5, 0, packet_type, pfc, 0x10, 0, 0, 0];
        pdu.extend_from_slice(&((HEADER_LEN + body.len()) as u16).to_le_bytes());
        pdu.extend_from_slice(&0u16.to_le_bytes());
        pdu.extend_from_slice(&call_id.to_le_bytes());
        pdu.extend_from_slice(body);
        self.outgoing.extend(pdu);
    }

    fn take(&mut self, max: u32) -> (Vec<u8>, bool) {
        let count = self.chunk.min(max as usize).min(self.outgoing.len());
        let data: Vec<u8> = self.outgoing.drain(..count).collect();
        (data, !self.outgoing.is_empty())
    }
}

impl PipeIo for FakeServer {
    async fn transceive(&mut self, request: &[u8], max_output: u32) -> Result<(Vec<u8>, bool)> {
        self.absorb(request);
        Ok(self.take(max_output))
    }

    async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.absorb(data);
        Ok(())
    }

    async fn read(&mut self, max_len: u32) -> Result<(Vec<u8>, bool)> {
        assert!(!self.outgoing.is_empty(), "client read with nothing pending: it would hang");
        Ok(self.take(max_len))
    }
}

const TEST_INTERFACE: dcerpc::Interface = rrp::WINREG;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn client_fragments_requests_and_reassembles_replies(
        request in proptest::collection::vec(any::<u8>(), 0..12000),
        reply in proptest::collection::vec(any::<u8>(), 0..20000),
        reply_fragment in 1usize..4000,
        chunk in 1usize..9000,
        max_fragment in 64u16..4280,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            let server = FakeServer {
                reply_stub: reply.clone(),
                reply_fragment,
                chunk,
                fault: None,
                scripted: VecDeque::new(),
                request_stub: Vec::new(),
                received_requests: Vec::new(),
                outgoing: VecDeque::new(),
            };
            let mut client = RpcClient::bind(server, TEST_INTERFACE, max_fragment).await.unwrap();
            prop_assert!(client.max_send_fragment() <= max_fragment.max(32));
            let answer = client.call(17, &request).await.unwrap();
            prop_assert_eq!(answer, reply.clone());
            // A second call on the same association.
            let answer = client.call(17, &request).await.unwrap();
            prop_assert_eq!(answer, reply);
            let server = client.into_pipe();
            prop_assert_eq!(server.received_requests.len(), 2);
            prop_assert_eq!(&server.received_requests[0], &request);
            Ok(())
        })?;
    }
}

#[tokio::test]
async fn fault_pdu_surfaces_as_named_error() {
    let server = FakeServer {
        reply_stub: Vec::new(),
        reply_fragment: 100,
        chunk: 4280,
        fault: Some(0x1c01_0002),
        scripted: VecDeque::new(),
        request_stub: Vec::new(),
        received_requests: Vec::new(),
        outgoing: VecDeque::new(),
    };
    let mut client = RpcClient::bind(server, scmr::SVCCTL, 4280).await.unwrap();
    let error = client.call(12, &[0; 16]).await.unwrap_err();
    assert!(
        matches!(
            error,
            Error::RpcFault { interface: "svcctl", opnum: 12, status } if status == RpcFaultStatus::NCA_S_OP_RNG_ERROR
        ),
        "{error:?}"
    );
}

fn svcctl_server(scripted: Vec<Vec<u8>>, reply_stub: Vec<u8>) -> FakeServer {
    // ROpenSCManagerW's reply comes first.
    let mut open = vec![0u8; 4];
    open.extend(1..=16u8);
    open.extend_from_slice(&0u32.to_le_bytes());
    let mut queue = VecDeque::from(scripted);
    queue.push_front(open);
    FakeServer {
        reply_stub,
        reply_fragment: 4280,
        chunk: 4280,
        fault: None,
        scripted: queue,
        request_stub: Vec::new(),
        received_requests: Vec::new(),
        outgoing: VecDeque::new(),
    }
}

async fn open_scm(server: FakeServer) -> ServiceControlManager<FakeServer> {
    let rpc = RpcClient::bind(server, scmr::SVCCTL, 4280).await.unwrap();
    ServiceControlManager::open(rpc, None, scmr::access::SC_MANAGER_ENUMERATE_SERVICE).await.unwrap()
}

fn service(name: &str, state: u32) -> EnumServiceStatus {
    EnumServiceStatus {
        service_name: name.into(),
        display_name: format!("{name} service"),
        status: ServiceStatus { service_type: 0x10, current_state: state, ..ServiceStatus::default() },
    }
}

/// Both ways a server says "more": nothing returned and a bigger buffer
/// needed (Samba), or some services and a resume index (Windows).
#[tokio::test]
async fn list_services_grows_the_buffer_and_follows_the_resume_index() {
    let first = service("wuauserv", 4);
    let second = service("Spooler", 1);
    let scripted = vec![
        enum_reply(&[0; 64], 100, 0, Some(0), Win32Error::ERROR_MORE_DATA),
        enum_reply(
            &enum_buffer(std::slice::from_ref(&first), 100, true),
            5000,
            1,
            Some(1),
            Win32Error::ERROR_MORE_DATA,
        ),
        enum_reply(
            &enum_buffer(std::slice::from_ref(&second), 5000, false),
            5000,
            1,
            Some(0),
            Win32Error::ERROR_SUCCESS,
        ),
        // RCloseServiceHandle.
        vec![0; 24],
    ];
    let mut scm = open_scm(svcctl_server(scripted, Vec::new())).await;
    let services =
        scm.enumerate_services(scmr::constants::SERVICE_WIN32, scmr::constants::SERVICE_STATE_ALL, 64).await.unwrap();
    assert_eq!(services, [first, second]);
    let server = scm.close().await.unwrap().into_pipe();
    let handle = fleetpatch_winproto::ndr::ContextHandle({
        let mut bytes = [0u8; 20];
        bytes[4..].copy_from_slice(&(1..=16u8).collect::<Vec<_>>());
        bytes
    });
    let expected: Vec<Vec<u8>> = [(64, 0), (100, 0), (5000, 1)]
        .into_iter()
        .map(|(buffer_size, resume)| {
            EnumServicesStatusRequest {
                sc_manager: handle,
                service_type: 0x30,
                service_state: 3,
                buffer_size,
                resume_index: Some(resume),
            }
            .encode()
        })
        .collect();
    assert_eq!(&server.received_requests[1..4], &expected[..]);
}

#[tokio::test]
async fn list_services_stops_on_servers_that_never_finish() {
    // ERROR_MORE_DATA with nothing returned and no more bytes needed.
    let stuck = enum_reply(&[0; 64], 64, 0, Some(0), Win32Error::ERROR_MORE_DATA);
    let mut scm = open_scm(svcctl_server(Vec::new(), stuck)).await;
    let error = scm.enumerate_services(0x30, 3, 64).await.unwrap_err().to_string();
    assert!(error.contains("64 bytes needed after 64 offered"), "{error}");

    // More than MS-SCMR's 256 KiB for one batch.
    let huge = enum_reply(&[], 1 << 20, 0, Some(0), Win32Error::ERROR_MORE_DATA);
    let mut scm = open_scm(svcctl_server(Vec::new(), huge)).await;
    let error = scm.list_services().await.unwrap_err().to_string();
    assert!(error.contains("allows at most 262144"), "{error}");

    // Always one more service: bounded by MAX_ENUM_CALLS.
    let endless =
        enum_reply(&enum_buffer(&[service("again", 4)], 0, false), 100, 1, Some(1), Win32Error::ERROR_MORE_DATA);
    let mut scm = open_scm(svcctl_server(Vec::new(), endless)).await;
    let error = scm.list_services().await.unwrap_err().to_string();
    assert!(error.contains(&format!("still ERROR_MORE_DATA after {} calls", scmr::MAX_ENUM_CALLS)), "{error}");

    // Services but no resume index to go on from.
    let lost = enum_reply(&enum_buffer(&[service("x", 4)], 0, false), 100, 1, None, Win32Error::ERROR_MORE_DATA);
    let mut scm = open_scm(svcctl_server(Vec::new(), lost)).await;
    let error = scm.list_services().await.unwrap_err().to_string();
    assert!(error.contains("no resume index"), "{error}");

    // Any other status is a named Win32 error.
    let denied = enum_reply(&[], 0, 0, Some(0), Win32Error::ERROR_ACCESS_DENIED);
    let mut scm = open_scm(svcctl_server(Vec::new(), denied)).await;
    let error = scm.list_services().await.unwrap_err();
    assert_eq!(error.win32_code(), Some(Win32Error::ERROR_ACCESS_DENIED), "{error:?}");
    assert!(error.to_string().contains("REnumServicesStatusW"), "{error}");
}
