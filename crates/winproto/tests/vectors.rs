//! Encoding conformance against Impacket: our request stubs are
//! byte-identical to what Impacket's NDR encoder produces for the same
//! arguments, and our decoders read Impacket-built replies as Impacket does.
//!
//! `vectors/impacket.json` is produced by `scripts/gen_vectors.py`; the
//! checked-in file is also regenerated with `/usr/bin/python3` and Impacket
//! and compared, so it cannot drift from the generator. Impacket is required
//! (`.ci/run` installs it): without it that test fails and says how to
//! install it.

use std::path::Path;

use fleetpatch_winproto::ndr::ContextHandle;
use fleetpatch_winproto::{rrp, scmr, Win32Error};
use serde_json::Value;

fn vectors_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors/impacket.json")
}

fn load() -> Value {
    let text = std::fs::read_to_string(vectors_path()).expect("vectors/impacket.json");
    serde_json::from_str(&text).expect("valid JSON")
}

fn handle(args: &Value, key: &str) -> ContextHandle {
    let bytes = hex::decode(args[key].as_str().unwrap()).unwrap();
    ContextHandle(bytes.try_into().unwrap())
}

fn string(args: &Value, key: &str) -> String {
    args[key].as_str().unwrap().to_owned()
}

fn optional_string(args: &Value, key: &str) -> Option<String> {
    args[key].as_str().map(str::to_owned)
}

fn number(args: &Value, key: &str) -> u32 {
    args[key].as_u64().unwrap() as u32
}

/// Our encoding of one request case, and its opnum.
fn encode(call: &str, args: &Value) -> (u16, Vec<u8>) {
    match call {
        "OpenLocalMachine" => (
            rrp::opnum::OPEN_LOCAL_MACHINE,
            rrp::OpenLocalMachineRequest { sam_desired: number(args, "sam_desired") }.encode(),
        ),
        "BaseRegOpenKey" => (
            rrp::opnum::BASE_REG_OPEN_KEY,
            rrp::OpenKeyRequest {
                key: handle(args, "key"),
                sub_key: string(args, "sub_key"),
                options: number(args, "options"),
                sam_desired: number(args, "sam_desired"),
            }
            .encode()
            .unwrap(),
        ),
        "BaseRegQueryValue" => (
            rrp::opnum::BASE_REG_QUERY_VALUE,
            rrp::QueryValueRequest {
                key: handle(args, "key"),
                value_name: string(args, "value_name"),
                buffer_size: number(args, "buffer_size"),
            }
            .encode()
            .unwrap(),
        ),
        "BaseRegEnumKey" => (
            rrp::opnum::BASE_REG_ENUM_KEY,
            rrp::EnumKeyRequest {
                key: handle(args, "key"),
                index: number(args, "index"),
                name_buffer_bytes: number(args, "name_buffer_bytes") as u16,
                class_buffer_bytes: number(args, "class_buffer_bytes") as u16,
            }
            .encode(),
        ),
        "BaseRegEnumValue" => (
            rrp::opnum::BASE_REG_ENUM_VALUE,
            rrp::EnumValueRequest {
                key: handle(args, "key"),
                index: number(args, "index"),
                name_buffer_bytes: number(args, "name_buffer_bytes") as u16,
                data_buffer_size: number(args, "data_buffer_size"),
            }
            .encode(),
        ),
        "BaseRegCloseKey" => {
            (rrp::opnum::BASE_REG_CLOSE_KEY, rrp::CloseKeyRequest { key: handle(args, "key") }.encode())
        }
        "ROpenSCManagerW" => (
            scmr::opnum::R_OPEN_SC_MANAGER_W,
            scmr::OpenScManagerRequest {
                machine_name: optional_string(args, "machine_name"),
                database_name: optional_string(args, "database_name"),
                desired_access: number(args, "desired_access"),
            }
            .encode(),
        ),
        "RCreateServiceW" => {
            let account = match optional_string(args, "service_start_name") {
                None => scmr::ServiceAccount::LocalSystem,
                Some(name) => scmr::ServiceAccount::User { name, password: string(args, "password") },
            };
            let spec = scmr::ServiceSpec {
                name: string(args, "service_name"),
                display_name: string(args, "display_name"),
                binary_path: string(args, "binary_path_name"),
                account,
            };
            (scmr::opnum::R_CREATE_SERVICE_W, spec.create_request(handle(args, "key")).unwrap().encode())
        }
        "ROpenServiceW" => (
            scmr::opnum::R_OPEN_SERVICE_W,
            scmr::OpenServiceRequest {
                sc_manager: handle(args, "key"),
                service_name: string(args, "service_name"),
                desired_access: number(args, "desired_access"),
            }
            .encode(),
        ),
        "RStartServiceW" => (
            scmr::opnum::R_START_SERVICE_W,
            scmr::StartServiceRequest {
                service: handle(args, "key"),
                arguments: args["arguments"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|value| value.as_str().unwrap().to_owned())
                    .collect(),
            }
            .encode(),
        ),
        "RQueryServiceStatus" => {
            (scmr::opnum::R_QUERY_SERVICE_STATUS, scmr::HandleRequest { handle: handle(args, "key") }.encode())
        }
        "RControlService" => (
            scmr::opnum::R_CONTROL_SERVICE,
            scmr::ControlServiceRequest { service: handle(args, "key"), control: number(args, "control") }.encode(),
        ),
        "RDeleteService" => {
            (scmr::opnum::R_DELETE_SERVICE, scmr::HandleRequest { handle: handle(args, "key") }.encode())
        }
        "RCloseServiceHandle" => {
            (scmr::opnum::R_CLOSE_SERVICE_HANDLE, scmr::HandleRequest { handle: handle(args, "key") }.encode())
        }
        "REnumServicesStatusW" => (
            scmr::opnum::R_ENUM_SERVICES_STATUS_W,
            scmr::EnumServicesStatusRequest {
                sc_manager: handle(args, "key"),
                service_type: number(args, "service_type"),
                service_state: number(args, "service_state"),
                buffer_size: number(args, "buffer_size"),
                resume_index: args["resume_index"].as_u64().map(|index| index as u32),
            }
            .encode(),
        ),
        other => panic!("no encoder for {other}"),
    }
}

#[test]
fn requests_are_byte_identical_to_impacket() {
    let vectors = load();
    let requests = vectors["requests"].as_array().unwrap();
    assert!(requests.len() >= 22);
    let mut calls = std::collections::BTreeSet::new();
    for case in requests {
        let call = case["call"].as_str().unwrap();
        calls.insert(call.to_owned());
        let (opnum, ours) = encode(call, &case["args"]);
        assert_eq!(u64::from(opnum), case["opnum"].as_u64().unwrap(), "{call} opnum");
        let theirs = case["stub"].as_str().unwrap();
        assert_eq!(hex::encode(&ours), theirs, "{call} {} differs from Impacket", case["args"]);
    }
    for call in [
        "OpenLocalMachine",
        "BaseRegOpenKey",
        "BaseRegQueryValue",
        "BaseRegEnumKey",
        "BaseRegEnumValue",
        "BaseRegCloseKey",
        "ROpenSCManagerW",
        "RCreateServiceW",
        "ROpenServiceW",
        "RStartServiceW",
        "RQueryServiceStatus",
        "RControlService",
        "RDeleteService",
        "RCloseServiceHandle",
        "REnumServicesStatusW",
    ] {
        assert!(calls.contains(call), "no vector for {call}");
    }
}

fn parsed_u32(parsed: &Value, key: &str) -> u32 {
    parsed[key].as_u64().unwrap() as u32
}

fn parsed_handle(parsed: &Value) -> ContextHandle {
    handle(parsed, "handle")
}

fn parsed_bytes(parsed: &Value, key: &str) -> Option<Vec<u8>> {
    parsed[key].as_str().map(|text| hex::decode(text).unwrap())
}

#[test]
fn replies_decode_as_impacket_parses_them() {
    let vectors = load();
    let replies = vectors["replies"].as_array().unwrap();
    assert!(replies.len() >= 21);
    let mut enumerations = 0;
    for case in replies {
        let kind = case["reply"].as_str().unwrap();
        let stub = hex::decode(case["stub"].as_str().unwrap()).unwrap();
        let parsed = &case["parsed"];
        let status = Win32Error(parsed_u32(parsed, "status"));
        match kind {
            "KeyHandle" => {
                let reply = rrp::KeyHandleResponse::decode(&stub).unwrap();
                assert_eq!(reply.handle, parsed_handle(parsed));
                assert_eq!(reply.status, status);
            }
            "BaseRegQueryValue" => {
                let reply = rrp::QueryValueResponse::decode(&stub).unwrap();
                assert_eq!(reply.value.value_type, Some(parsed_u32(parsed, "value_type")));
                assert_eq!(reply.value.data, parsed_bytes(parsed, "data"));
                assert_eq!(reply.value.data_size, Some(parsed_u32(parsed, "data_size")));
                assert_eq!(reply.value.data_length, Some(parsed_u32(parsed, "data_length")));
                assert_eq!(reply.status, status);
            }
            "BaseRegEnumKey" => {
                let reply = rrp::EnumKeyResponse::decode(&stub).unwrap();
                assert_eq!(reply.name.as_deref(), parsed["name"].as_str());
                assert_eq!(reply.class, None);
                assert_eq!(reply.last_write_time, parsed["last_write_time"].as_u64());
                assert_eq!(reply.status, status);
            }
            "BaseRegEnumValue" => {
                let reply = rrp::EnumValueResponse::decode(&stub).unwrap();
                assert_eq!(reply.name.as_deref(), parsed["name"].as_str());
                assert_eq!(reply.value.value_type, Some(parsed_u32(parsed, "value_type")));
                assert_eq!(reply.value.data, parsed_bytes(parsed, "data"));
                assert_eq!(reply.value.data_size, Some(parsed_u32(parsed, "data_size")));
                assert_eq!(reply.status, status);
            }
            "ServiceHandle" => {
                let reply = scmr::HandleResponse::decode(&stub).unwrap();
                assert_eq!(reply.handle, parsed_handle(parsed));
                assert_eq!(reply.status, status);
            }
            "RCreateServiceW" => {
                let reply = scmr::CreateServiceResponse::decode(&stub).unwrap();
                assert_eq!(reply.tag_id, parsed["tag_id"].as_u64().map(|v| v as u32));
                assert_eq!(reply.handle, parsed_handle(parsed));
                assert_eq!(reply.status, status);
            }
            "Status" => {
                let reply = scmr::StatusResponse::decode(&stub).unwrap();
                assert_eq!(reply.status, status);
            }
            "ServiceStatus" => {
                let reply = scmr::ServiceStatusResponse::decode(&stub).unwrap();
                assert_service_status(&reply.service_status, parsed);
                assert_eq!(reply.status, status);
            }
            "REnumServicesStatusW" => {
                enumerations += 1;
                let reply = scmr::EnumServicesStatusResponse::decode(&stub).unwrap();
                assert_eq!(hex::encode(&reply.buffer), parsed["buffer"].as_str().unwrap());
                assert_eq!(reply.bytes_needed, parsed_u32(parsed, "bytes_needed"));
                assert_eq!(reply.services_returned, parsed_u32(parsed, "services_returned"));
                assert_eq!(reply.resume_index, parsed["resume_index"].as_u64().map(|index| index as u32));
                assert_eq!(reply.status, status);
                // The buffer's services, as Impacket's hREnumServicesStatusW
                // reads them.
                let ours = reply.services().unwrap();
                let theirs = parsed["services"].as_array().unwrap();
                assert_eq!(ours.len(), theirs.len());
                for (service, expected) in ours.iter().zip(theirs) {
                    assert_eq!(service.service_name, expected["service_name"].as_str().unwrap());
                    assert_eq!(service.display_name, expected["display_name"].as_str().unwrap());
                    assert_service_status(&service.status, expected);
                }
            }
            other => panic!("no decoder for reply kind {other}"),
        }
    }
    assert!(enumerations >= 4, "REnumServicesStatusW replies missing");
}

fn assert_service_status(s: &scmr::ServiceStatus, parsed: &Value) {
    assert_eq!(s.service_type, parsed_u32(parsed, "service_type"));
    assert_eq!(s.current_state, parsed_u32(parsed, "current_state"));
    assert_eq!(s.controls_accepted, parsed_u32(parsed, "controls_accepted"));
    assert_eq!(s.win32_exit_code, parsed_u32(parsed, "win32_exit_code"));
    assert_eq!(s.service_specific_exit_code, parsed_u32(parsed, "service_specific_exit_code"));
    assert_eq!(s.check_point, parsed_u32(parsed, "check_point"));
    assert_eq!(s.wait_hint, parsed_u32(parsed, "wait_hint"));
}

/// The checked-in vectors must be exactly what the generator produces
/// today, with Impacket (`.ci/run` installs python3-impacket). Without it the
/// test fails, in CI and elsewhere: a skipped comparison looks like a pass.
#[test]
fn checked_in_vectors_match_a_fresh_generation() {
    let python = Path::new("/usr/bin/python3");
    let has_impacket = python.exists()
        && std::process::Command::new(python)
            .args(["-c", "import impacket.dcerpc.v5.rrp"])
            .output()
            .is_ok_and(|output| output.status.success());
    assert!(
        has_impacket,
        "this test needs /usr/bin/python3 with Impacket to regenerate the vectors and compare them: install it \
         with `apt-get install -y python3-impacket` (Debian/Ubuntu; `.ci/run` does) or \
         `/usr/bin/python3 -m pip install impacket`"
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gen_vectors.py");
    let temp = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(python).arg(&script).output().expect("running gen_vectors.py");
    assert!(output.status.success(), "gen_vectors.py failed: {}", String::from_utf8_lossy(&output.stderr));
    let fresh_path = temp.path().join("impacket.json");
    std::fs::write(&fresh_path, &output.stdout).unwrap();
    let fresh: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        fresh,
        load(),
        "vectors/impacket.json is stale: regenerate with `/usr/bin/python3 scripts/gen_vectors.py > vectors/impacket.json` (fresh copy in {})",
        fresh_path.display()
    );
}
