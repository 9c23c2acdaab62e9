//! Property tests: every decoder is total on arbitrary bytes (an error,
//! never a panic), and the RPC client fragments requests and reassembles
//! replies correctly whatever the fragment sizes and however the pipe
//! splits the byte stream.

use std::collections::VecDeque;

use fleetpatch_winproto::dcerpc::{
    self, decode_server_pdu, flags, Header, PipeIo, RpcClient, HEADER_LEN, REQUEST_HEADER_LEN,
};
use fleetpatch_winproto::ndr::NdrReader;
use fleetpatch_winproto::rrp::{self, RegistryValue};
use fleetpatch_winproto::{scmr, Error, Result, RpcFaultStatus};
use proptest::prelude::*;

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
                    let stub = self.reply_stub.clone();
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
