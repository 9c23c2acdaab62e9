//! Live tests against a private Samba smbd on loopback (see
//! `fleetpatch_winproto::test_support`). Samba missing is a failure, never a
//! skip.

use std::time::{Duration, Instant};

use fleetpatch_winproto::rrp::RegistryValue;
use fleetpatch_winproto::scmr::{access, constants, ServiceAccount, ServiceSpec, ServiceState};
use fleetpatch_winproto::test_support::SambaPeer;
use fleetpatch_winproto::{
    Credentials, EncryptionPolicy, Error, NtStatus, RpcFaultStatus, SmbOptions, SmbSession, Win32Error,
};
use sha2::{Digest, Sha256};

/// Deterministic pseudo-random bytes (xorshift), so a corrupted or shifted
/// block cannot go unnoticed.
fn test_data(length: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut data = Vec::with_capacity(length + 8);
    while data.len() < length {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        data.extend_from_slice(&state.to_le_bytes());
    }
    data.truncate(length);
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_is_signed_and_encrypted_when_offered() {
    let peer = SambaPeer::start_or_panic();
    let session = peer.connect(SmbOptions::default()).await.unwrap();
    let security = session.security().clone();
    assert!(security.signing);
    assert!(security.encryption, "Samba 4.17 offers SMB 3.1.1 encryption: {security:?}");
    assert_eq!(security.dialect, "Smb0311");
    session.close().await.unwrap();

    let signed_only =
        peer.connect(SmbOptions { encryption: EncryptionPolicy::Disabled, ..SmbOptions::default() }).await.unwrap();
    assert!(!signed_only.security().encryption);
    signed_only.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_a_clear_logon_failure() {
    let peer = SambaPeer::start_or_panic();
    let error = SmbSession::connect(
        peer.address(),
        "127.0.0.1",
        &Credentials { user: "Administrator".into(), password: "not-the-password".into() },
        SmbOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            &error,
            Error::LogonFailed { status, .. } if *status == NtStatus::STATUS_LOGON_FAILURE
        ),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("STATUS_LOGON_FAILURE"), "{message}");
    assert!(message.contains("Administrator"), "{message}");
    assert!(!message.contains("not-the-password"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_20_mib_read_back_list_and_delete() {
    let peer = SambaPeer::start_or_panic();
    let session = peer.connect(SmbOptions::default()).await.unwrap();
    let data = test_data(20 * 1024 * 1024 + 123, 42);
    let expected = Sha256::digest(&data);

    session.mkdir_all("C$", "Windows\\Patches\\run-1").await.unwrap();
    // Idempotent.
    session.mkdir_all("C$", "/Windows/Patches/run-1/").await.unwrap();
    let written = session.put_file("C$", "Windows\\Patches\\run-1\\KB5031356.msu", &data[..]).await.unwrap();
    assert_eq!(written, data.len() as u64);
    session.put_file("ADMIN$", "Windows/Patches/run-1/plan.json", &b"{}"[..]).await.unwrap();

    // What Samba stored, byte for byte.
    let on_disk = std::fs::read(peer.share_directory().join("Windows/Patches/run-1/KB5031356.msu")).unwrap();
    assert_eq!(Sha256::digest(&on_disk), expected);

    // And what we read back.
    let mut read_back = Vec::new();
    let read = session.read_file("C$", "Windows\\Patches\\run-1\\KB5031356.msu", &mut read_back).await.unwrap();
    assert_eq!(read, data.len() as u64);
    assert_eq!(Sha256::digest(&read_back), expected);

    let mut listing = session.list("C$", "Windows\\Patches\\run-1").await.unwrap();
    listing.sort_by(|a, b| a.name.cmp(&b.name));
    let names: Vec<_> = listing.iter().map(|entry| entry.name.as_str()).collect();
    assert_eq!(names, ["KB5031356.msu", "plan.json"]);
    assert_eq!(listing[0].size, data.len() as u64);
    assert!(!listing[0].is_directory);

    session.delete("C$", "Windows\\Patches\\run-1\\KB5031356.msu").await.unwrap();
    session.delete("C$", "Windows\\Patches\\run-1\\plan.json").await.unwrap();
    assert!(session.list("C$", "Windows\\Patches\\run-1").await.unwrap().is_empty());
    session.delete("C$", "Windows\\Patches\\run-1").await.unwrap();

    let error = session.delete("C$", "Windows\\Patches\\run-1\\gone.msu").await.unwrap_err();
    assert!(
        matches!(
            error.nt_status(),
            Some(NtStatus::STATUS_OBJECT_NAME_NOT_FOUND | NtStatus::STATUS_OBJECT_PATH_NOT_FOUND)
        ),
        "{error:?}"
    );
    session.close().await.unwrap();
}

/// smb-rs 0.12's directory stream lost a wake-up on the multi-thread
/// runtime; our listing must never hang there, also with many entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_many_entries_on_the_multi_thread_runtime_does_not_hang() {
    let peer = SambaPeer::start_or_panic();
    let directory = peer.share_directory().join("many");
    std::fs::create_dir_all(&directory).unwrap();
    for index in 0..1500 {
        std::fs::write(directory.join(format!("file-{index:05}-with-a-longish-name.txt")), b"x").unwrap();
    }
    let session = peer.connect(SmbOptions::default()).await.unwrap();
    for _ in 0..20 {
        let listing = tokio::time::timeout(Duration::from_secs(20), session.list("C$", "many"))
            .await
            .expect("listing hung")
            .unwrap();
        assert_eq!(listing.len(), 1500);
    }
    session.close().await.unwrap();
}

const SEED: &str = r#"Windows Registry Editor Version 5.00

[HKEY_LOCAL_MACHINE\SOFTWARE\Microsoft\Windows\CurrentVersion\Uninstall\KB5031356]
"DisplayName"="Security Update for Windows (KB5031356)"
"InstallState"=dword:00000070

[HKEY_LOCAL_MACHINE\SOFTWARE\Microsoft\Windows\CurrentVersion\Uninstall\KB5030211]
"DisplayName"="Cumulative Update (KB5030211)"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_probe_reads_seeded_keys() {
    let peer = SambaPeer::start_or_panic();
    peer.import_registry(SEED).unwrap();
    let session = peer.connect(SmbOptions::default()).await.unwrap();
    let mut registry = session.remote_registry().await.unwrap();

    const UNINSTALL: &str = "HKLM\\SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\Uninstall";
    assert!(registry.key_exists(&format!("{UNINSTALL}\\KB5031356")).await.unwrap());
    assert!(!registry.key_exists(&format!("{UNINSTALL}\\KB9999999")).await.unwrap());

    let mut subkeys = registry.subkeys(UNINSTALL).await.unwrap().unwrap();
    subkeys.sort();
    assert_eq!(subkeys, ["KB5030211", "KB5031356"]);

    assert_eq!(
        registry.read_string(&format!("{UNINSTALL}\\KB5031356"), "DisplayName").await.unwrap().as_deref(),
        Some("Security Update for Windows (KB5031356)")
    );
    assert_eq!(registry.read_dword(&format!("{UNINSTALL}\\KB5031356"), "InstallState").await.unwrap(), Some(0x70));
    // The last value of the .reg file was not dropped.
    assert!(registry.read_string(&format!("{UNINSTALL}\\KB5030211"), "DisplayName").await.unwrap().is_some());
    assert_eq!(registry.read_string(&format!("{UNINSTALL}\\KB5031356"), "NoSuchValue").await.unwrap(), None);
    assert_eq!(registry.read_string(&format!("{UNINSTALL}\\KB9999999"), "DisplayName").await.unwrap(), None);

    // Samba's fixed values.
    const CURRENT_VERSION: &str = "SOFTWARE\\Microsoft\\Windows NT\\CurrentVersion";
    assert_eq!(registry.read_string(CURRENT_VERSION, "CurrentVersion").await.unwrap().as_deref(), Some("6.1"));
    assert_eq!(registry.read_string(CURRENT_VERSION, "ProductName").await.unwrap(), None);
    assert_eq!(
        registry
            .read_string("SYSTEM\\CurrentControlSet\\Control\\ProductOptions", "ProductType")
            .await
            .unwrap()
            .as_deref(),
        Some("ServerNT")
    );

    let values = registry.values(&format!("{UNINSTALL}\\KB5031356")).await.unwrap().unwrap();
    assert!(values.contains(&("InstallState".to_owned(), RegistryValue::Dword(0x70))));
    assert!(values.iter().any(|(name, _)| name == "DisplayName"));

    let mut top = registry.subkeys("HKLM").await.unwrap().unwrap();
    top.sort();
    assert!(top.contains(&"SOFTWARE".to_owned()) && top.contains(&"SYSTEM".to_owned()));

    registry.close().await.unwrap();
    session.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_control_manager_stops_and_starts_spooler() {
    let peer = SambaPeer::start_or_panic();
    let session = peer.connect(SmbOptions::default()).await.unwrap();
    let mut scm = session
        .service_control_manager(access::SC_MANAGER_CONNECT | access::SC_MANAGER_ENUMERATE_SERVICE)
        .await
        .unwrap();

    assert!(scm.service_exists("Spooler").await.unwrap());
    assert!(!scm.service_exists("NoSuchService").await.unwrap());

    // Start from a known state.
    let initial = scm.query_status("Spooler").await.unwrap();
    if initial.state() != ServiceState::Running {
        scm.start("Spooler", &[]).await.unwrap();
    }
    assert_eq!(scm.query_status("Spooler").await.unwrap().state(), ServiceState::Running);

    // A second start: ERROR_SERVICE_ALREADY_RUNNING (0x420).
    let error = scm.start("Spooler", &[]).await.unwrap_err();
    assert_eq!(error.win32_code(), Some(Win32Error::ERROR_SERVICE_ALREADY_RUNNING));
    assert!(error.to_string().contains("ERROR_SERVICE_ALREADY_RUNNING"), "{error}");

    scm.stop("Spooler").await.unwrap();
    assert_eq!(scm.wait_for_state("Spooler", ServiceState::Stopped).await.unwrap().state(), ServiceState::Stopped);
    scm.start("Spooler", &[]).await.unwrap();
    assert_eq!(scm.wait_for_state("Spooler", ServiceState::Running).await.unwrap().current_state, 4);

    // Unknown service: ERROR_SERVICE_DOES_NOT_EXIST (0x424).
    let error = scm.query_status("NoSuchService").await.unwrap_err();
    assert_eq!(error.win32_code(), Some(Win32Error::ERROR_SERVICE_DOES_NOT_EXIST));
    assert!(error.to_string().contains("0x00000424"), "{error}");

    // Samba only really controls Spooler; the others refuse, with named
    // errors.
    let error = scm.start("NETLOGON", &[]).await.unwrap_err();
    assert_eq!(error.win32_code(), Some(Win32Error::ERROR_SERVICE_DISABLED), "{error}");
    for name in ["RemoteRegistry", "WINS", "NETLOGON"] {
        let error = scm.stop(name).await.unwrap_err();
        assert_eq!(error.win32_code(), Some(Win32Error::ERROR_ACCESS_DENIED), "{error}");
        assert!(error.to_string().contains("ERROR_ACCESS_DENIED"), "{error}");
    }
    let error = scm.start("RemoteRegistry", &[]).await.unwrap_err();
    assert_eq!(error.win32_code(), Some(Win32Error::ERROR_ACCESS_DENIED), "{error}");

    scm.close().await.unwrap();
    session.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_services_shows_spooler_as_query_status_does() {
    let peer = SambaPeer::start_or_panic();
    let session = peer.connect(SmbOptions::default()).await.unwrap();
    let mut scm = session
        .service_control_manager(access::SC_MANAGER_CONNECT | access::SC_MANAGER_ENUMERATE_SERVICE)
        .await
        .unwrap();

    let services = scm.list_services().await.unwrap();
    let mut names: Vec<_> = services.iter().map(|service| service.service_name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["NETLOGON", "RemoteRegistry", "Spooler", "WINS"]);
    let spooler = services.iter().find(|service| service.service_name == "Spooler").unwrap();
    assert_eq!(spooler.display_name, "Print Spooler");
    assert_eq!(spooler.status, scm.query_status("Spooler").await.unwrap());
    for service in &services {
        assert!(!service.display_name.is_empty(), "{service:?}");
        assert!(service.status.service_type & constants::SERVICE_WIN32 != 0, "{service:?}");
    }

    // The listing follows Spooler's state: stopped, then running again.
    scm.stop_and_wait("Spooler").await.unwrap();
    let stopped = scm.list_services().await.unwrap();
    let spooler = stopped.iter().find(|service| service.service_name == "Spooler").unwrap();
    assert_eq!(spooler.state(), ServiceState::Stopped);
    assert_eq!(spooler.status, scm.query_status("Spooler").await.unwrap());
    scm.start("Spooler", &[]).await.unwrap();
    scm.wait_for_state("Spooler", ServiceState::Running).await.unwrap();
    let running = scm.list_services().await.unwrap();
    let spooler = running.iter().find(|service| service.service_name == "Spooler").unwrap();
    assert_eq!(spooler.state(), ServiceState::Running);
    assert_eq!(spooler.status, scm.query_status("Spooler").await.unwrap());

    // Too small a first buffer: Samba answers ERROR_MORE_DATA with nothing
    // and the size it needs; the retry with that size gets everything.
    for initial in [0, 64] {
        let grown =
            scm.enumerate_services(constants::SERVICE_WIN32, constants::SERVICE_STATE_ALL, initial).await.unwrap();
        assert_eq!(grown, running, "initial buffer {initial}");
    }
    scm.close().await.unwrap();

    // Without SC_MANAGER_ENUMERATE_SERVICE: ERROR_ACCESS_DENIED.
    let mut scm = session.service_control_manager(access::SC_MANAGER_CONNECT).await.unwrap();
    let error = scm.list_services().await.unwrap_err();
    assert_eq!(error.win32_code(), Some(Win32Error::ERROR_ACCESS_DENIED), "{error:?}");
    assert!(error.to_string().contains("REnumServicesStatusW"), "{error}");
    scm.close().await.unwrap();
    session.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_service_is_not_implemented_by_samba() {
    let peer = SambaPeer::start_or_panic();
    let session = peer.connect(SmbOptions::default()).await.unwrap();
    let mut scm = session.service_control_manager(access::SC_MANAGER_ALL_ACCESS).await.unwrap();
    let spec = ServiceSpec {
        name: "fleetpatch-agent-test".into(),
        display_name: "fleetpatch agent (test)".into(),
        binary_path: "C:\\Windows\\Patches\\fleetpatch-agent.exe --plan plan.json".into(),
        account: ServiceAccount::LocalSystem,
    };
    let error = scm.create_service(&spec).await.unwrap_err();
    assert_eq!(error.rpc_fault(), Some(RpcFaultStatus::NCA_S_OP_RNG_ERROR), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("NCA_S_OP_RNG_ERROR"), "{message}");
    assert!(message.contains("svcctl opnum 12"), "{message}");

    // The association survives a fault: the next call works.
    assert!(scm.service_exists("Spooler").await.unwrap());

    // A request larger than one fragment (a 3000-character command line is
    // over 6000 bytes of stub): Samba reassembles our fragments before it
    // answers, with the same fault.
    let long_spec =
        ServiceSpec { binary_path: format!("C:\\Windows\\Patches\\agent.exe {}", "x".repeat(3000)), ..spec.clone() };
    let error = scm.create_service(&long_spec).await.unwrap_err();
    assert_eq!(error.rpc_fault(), Some(RpcFaultStatus::NCA_S_OP_RNG_ERROR), "{error:?}");
    assert!(scm.service_exists("Spooler").await.unwrap());
    // DeleteService is not implemented either (fault), while deleting a
    // service that does not exist is a no-op.
    scm.delete("NoSuchService").await.unwrap();
    let error = scm.delete("Spooler").await.unwrap_err();
    assert_eq!(error.rpc_fault(), Some(RpcFaultStatus::NCA_S_OP_RNG_ERROR), "{error:?}");
    scm.close().await.unwrap();
    session.close().await.unwrap();
}

/// Replies larger than one fragment are reassembled: a value bigger than
/// the 4280-byte fragment forces a multi-fragment BaseRegQueryValue reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_fragment_registry_reply_is_reassembled() {
    let peer = SambaPeer::start_or_panic();
    let long_text: String = (0..6000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    peer.import_registry(&format!(
        "Windows Registry Editor Version 5.00\n\n[HKEY_LOCAL_MACHINE\\SOFTWARE\\Fleetpatch]\n\"Big\"=\"{long_text}\"\n"
    ))
    .unwrap();
    let session = peer.connect(SmbOptions::default()).await.unwrap();
    let mut registry = session.remote_registry().await.unwrap();
    let started = Instant::now();
    let value = registry.read_string("SOFTWARE\\Fleetpatch", "Big").await.unwrap();
    assert_eq!(value.as_deref(), Some(long_text.as_str()));
    assert!(started.elapsed() < Duration::from_secs(10));
    registry.close().await.unwrap();
    session.close().await.unwrap();
}
