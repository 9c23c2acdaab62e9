//! Test support: a small collector over a real TCP socket (std only) that
//! decodes the agent's protobuf batches, plus helpers to stage a plan with
//! shell-script installers and to run the real agent binary.
//!
//! The collector can be closed (port not listening) and reopened on the same
//! port, and told to answer every request with a fixed status (503, 401...).

#![allow(dead_code)]

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fleetpatch_proto::limits::{MAX_REPORTS_PER_BATCH, MAX_REPORT_BODY_BYTES};
use fleetpatch_proto::report_auth::{Authorization, SigningKey};
use fleetpatch_proto::v1::{agent_report::Kind, AgentReport, ReportAck, ReportBatch};
use prost::Message;
use serde_json::json;
use sha2::{Digest, Sha256};

pub const TOKEN: &str = "tok-3f9a1c-never-print-me";
pub const TARGET_ID: &str = "6f1c1b8e-8f6f-4f53-9d55-3a3f5e0c2a11";

/// How the collector answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Accept,
    /// Answer every request with this status and an empty body.
    Status(u16),
    /// Answer 400 to any batch that holds this seq, accept the others.
    RefuseSeq(u64),
}

#[derive(Debug, Default)]
pub struct Record {
    /// Every report received in an accepted batch, in arrival order, duplicates included.
    pub received: Vec<AgentReport>,
    /// Requests answered, by status.
    pub statuses: Vec<u16>,
    /// Protocol violations seen (wrong path, header, oversized batch...).
    pub violations: Vec<String>,
    /// The nonces of the signed requests seen; one must never come twice.
    pub nonces: HashSet<[u8; 16]>,
}

struct Shared {
    record: Mutex<Record>,
    mode: Mutex<Mode>,
    stop: AtomicBool,
}

pub struct TestCollector {
    pub port: u16,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl TestCollector {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            record: Mutex::new(Record::default()),
            mode: Mutex::new(Mode::Accept),
            stop: AtomicBool::new(false),
        });
        let mut collector = Self { port, shared, thread: None };
        collector.serve(listener);
        collector
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn serve(&mut self, listener: TcpListener) {
        listener.set_nonblocking(true).unwrap();
        self.shared.stop.store(false, Ordering::SeqCst);
        let shared = Arc::clone(&self.shared);
        self.thread = Some(std::thread::spawn(move || {
            while !shared.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => handle(&shared, stream),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => panic!("accept failed: {e}"),
                }
            }
        }));
    }

    /// Stop listening: connections to the port are refused.
    pub fn close(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }

    /// Listen again on the same port.
    pub fn reopen(&mut self) {
        assert!(self.thread.is_none(), "already listening");
        let started = Instant::now();
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)) {
                Ok(listener) => break listener,
                Err(e) if started.elapsed() < Duration::from_secs(10) => {
                    eprintln!("rebinding port {}: {e}", self.port);
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("cannot rebind port {}: {e}", self.port),
            }
        };
        self.serve(listener);
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    pub fn with_record<T>(&self, read: impl FnOnce(&Record) -> T) -> T {
        read(&self.shared.record.lock().unwrap())
    }

    /// Reports with duplicates removed, in order of first arrival, and the
    /// number of duplicates.
    pub fn unique_reports(&self) -> (Vec<AgentReport>, usize) {
        self.with_record(|record| {
            let mut seen = HashSet::new();
            let mut unique = Vec::new();
            for report in &record.received {
                if seen.insert(report.seq) {
                    unique.push(report.clone());
                }
            }
            let duplicates = record.received.len() - unique.len();
            (unique, duplicates)
        })
    }

    pub fn assert_no_violations(&self) {
        self.with_record(|record| assert!(record.violations.is_empty(), "{:?}", record.violations));
    }
}

impl Drop for TestCollector {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

fn respond(stream: &mut TcpStream, status: u16, body: &[u8]) {
    let head = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}

fn handle(shared: &Shared, mut stream: TcpStream) {
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut data = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    let header_end = loop {
        if let Some(position) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break position + 4;
        }
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(read) => data.extend_from_slice(&buffer[..read]),
        }
    };
    let head = String::from_utf8_lossy(&data[..header_end]).to_string();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_owned();
    let mut content_length = 0usize;
    let mut authorization = String::new();
    let mut content_type = String::new();
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim().to_owned();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => content_length = value.parse().unwrap_or(0),
                "authorization" => authorization = value,
                "content-type" => content_type = value,
                _ => {}
            }
        }
    }
    while data.len() < header_end + content_length {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(read) => data.extend_from_slice(&buffer[..read]),
        }
    }
    let body = &data[header_end..header_end + content_length];

    let mode = *shared.mode.lock().unwrap();
    let mut record = shared.record.lock().unwrap();
    // The token itself never travels; every request is signed with a fresh nonce.
    if data.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()) {
        record.violations.push("the token was sent".into());
    }
    let path = request_line.split(' ').nth(1).unwrap_or_default().to_owned();
    let signed = Authorization::parse(&authorization).ok().filter(|header| {
        header.target_id.to_string() == TARGET_ID
            && header.attempt == 1
            && SigningKey::from_token(TOKEN).verify(&header.request("POST", &path, body), &header.mac).is_ok()
    });
    if let Some(header) = &signed {
        if !record.nonces.insert(header.nonce) {
            record.violations.push("a nonce was used twice".into());
        }
    }
    if let Mode::Status(status) = mode {
        record.statuses.push(status);
        drop(record);
        respond(&mut stream, status, b"");
        return;
    }
    let expected_line = format!("POST /v1/targets/{TARGET_ID}/reports HTTP/1.1");
    if request_line != expected_line {
        record.violations.push(format!("request line {request_line:?}"));
    }
    if content_type != "application/x-protobuf" {
        record.violations.push(format!("content type {content_type:?}"));
    }
    if signed.is_none() {
        record.statuses.push(401);
        record.violations.push(format!("not signed with the plan's token: {authorization:?}"));
        drop(record);
        respond(&mut stream, 401, b"{\"title\":\"bad token\"}");
        return;
    }
    if body.len() > MAX_REPORT_BODY_BYTES {
        record.violations.push(format!("body of {} bytes", body.len()));
    }
    let batch = match ReportBatch::decode(body) {
        Ok(batch) => batch,
        Err(e) => {
            record.violations.push(format!("undecodable batch: {e}"));
            record.statuses.push(400);
            drop(record);
            respond(&mut stream, 400, b"");
            return;
        }
    };
    if batch.reports.is_empty() || batch.reports.len() > MAX_REPORTS_PER_BATCH {
        record.violations.push(format!("batch of {} reports", batch.reports.len()));
    }
    if let Mode::RefuseSeq(seq) = mode {
        if batch.reports.iter().any(|r| r.seq == seq) {
            record.statuses.push(400);
            drop(record);
            respond(&mut stream, 400, b"{\"title\":\"bad report\"}");
            return;
        }
    }
    let seen: HashSet<u64> = record.received.iter().map(|r| r.seq).collect();
    let duplicates = batch.reports.iter().filter(|r| seen.contains(&r.seq)).count() as u64;
    let accepted = batch.reports.len() as u64 - duplicates;
    for report in &batch.reports {
        if report.seq == 0 || report.sent_at_unix_ms <= 0 || report.kind.is_none() {
            record.violations.push(format!("bad report {report:?}"));
        }
    }
    record.received.extend(batch.reports);
    let highest_seq = record.received.iter().map(|r| r.seq).max().unwrap_or(0);
    record.statuses.push(200);
    drop(record);
    respond(&mut stream, 200, &ReportAck { accepted, duplicates, highest_seq }.encode_to_vec());
}

/// A staged shell-script patch.
pub struct TestPatch {
    pub name: String,
    pub script: String,
    pub installer: &'static str,
    pub success_codes: Vec<i32>,
    pub reboot_codes: Vec<i32>,
    pub timeout_seconds: u32,
    /// Write different bytes than the checksum in the plan says.
    pub corrupt: bool,
}

impl TestPatch {
    pub fn script(name: &str, script: &str) -> Self {
        Self {
            name: name.into(),
            script: script.into(),
            installer: "script",
            success_codes: vec![0],
            reboot_codes: vec![],
            timeout_seconds: 60,
            corrupt: false,
        }
    }
}

/// A temporary root with a staging directory named after the deployment.
pub struct Stage {
    pub root: tempfile::TempDir,
    pub directory: PathBuf,
    pub deployment_id: String,
}

impl Stage {
    pub fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let deployment_id = "fp-6f1c1b8e8f6f4f539d553a3f5e0c2a11-1".to_owned();
        let directory = root.path().join(&deployment_id);
        std::fs::create_dir(&directory).unwrap();
        Self { root, directory, deployment_id }
    }

    pub fn plan_path(&self) -> PathBuf {
        self.directory.join("plan.json")
    }

    /// A path outside the staging directory.
    pub fn outside(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    pub fn file_name(index: usize) -> String {
        format!("patch-{index}.sh")
    }

    /// Write the installers and `plan.json`.
    pub fn write_plan(
        &self,
        collector_url: &str,
        patches: &[TestPatch],
        heartbeat_seconds: u32,
        reboot: &str,
        keep_files: bool,
    ) {
        let mut entries = Vec::new();
        for (index, patch) in patches.iter().enumerate() {
            let file = Self::file_name(index);
            let sha256 = hex::encode(Sha256::digest(patch.script.as_bytes()));
            let written = if patch.corrupt { format!("{}\n# tampered\n", patch.script) } else { patch.script.clone() };
            std::fs::write(self.directory.join(&file), written).unwrap();
            entries.push(json!({
                "index": index,
                "name": patch.name,
                "file": file,
                "sha256": sha256,
                "installer": patch.installer,
                "arguments": "",
                "success_codes": patch.success_codes,
                "reboot_codes": patch.reboot_codes,
                "timeout_seconds": patch.timeout_seconds,
            }));
        }
        let plan = json!({
            "version": 1,
            "deployment_id": self.deployment_id,
            "target_id": TARGET_ID,
            "attempt": 1,
            "collector_url": collector_url,
            "token": TOKEN,
            "heartbeat_seconds": heartbeat_seconds,
            "patches": entries,
            "reboot": reboot,
            "keep_files": keep_files,
        });
        std::fs::write(self.plan_path(), serde_json::to_string_pretty(&plan).unwrap()).unwrap();
    }

    /// The reboot marker the test reboot command appends to.
    pub fn reboot_marker(&self) -> PathBuf {
        self.outside("rebooted")
    }

    /// `run` arguments with fast retries and a harmless reboot command.
    pub fn run_arguments(&self) -> Vec<String> {
        vec![
            "run".into(),
            "--plan".into(),
            self.plan_path().display().to_string(),
            "--retry-initial-ms".into(),
            "50".into(),
            "--retry-max-ms".into(),
            "400".into(),
            "--drain-deadline-seconds".into(),
            "60".into(),
            "--http-timeout-seconds".into(),
            "5".into(),
            "--reboot-command".into(),
            format!("echo reboot >> '{}'", self.reboot_marker().display()),
        ]
    }
}

pub fn agent_binary() -> &'static str {
    env!("CARGO_BIN_EXE_fleetpatch-agent")
}

/// Start the agent with `arguments`, output captured.
pub fn spawn_agent(binary: &Path, arguments: &[String]) -> Child {
    Command::new(binary)
        .args(arguments)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Wait for the agent to exit, at most `limit`; kill it and fail otherwise.
pub fn wait_agent(mut child: Child, limit: Duration) -> Output {
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            let output = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            eprintln!("--- agent stderr ---\n{stderr}--- end ---");
            assert!(!stderr.contains(TOKEN), "the token was logged");
            assert!(!String::from_utf8_lossy(&output.stdout).contains(TOKEN), "the token was printed");
            return output;
        }
        if started.elapsed() > limit {
            child.kill().unwrap();
            let output = child.wait_with_output().unwrap();
            panic!("agent still running after {limit:?}; stderr:\n{}", String::from_utf8_lossy(&output.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run the agent to completion.
pub fn run_agent(arguments: &[String]) -> Output {
    wait_agent(spawn_agent(Path::new(agent_binary()), arguments), Duration::from_secs(120))
}

/// Decode the reports in a spool file.
pub fn read_spool(path: &Path) -> Vec<AgentReport> {
    let bytes = std::fs::read(path).unwrap_or_default();
    let mut rest = bytes.as_slice();
    let mut reports = Vec::new();
    while !rest.is_empty() {
        match AgentReport::decode_length_delimited(&mut rest) {
            Ok(report) => reports.push(report),
            Err(_) => break,
        }
    }
    reports
}

/// A short description of a report, for assertions on sequences.
pub fn describe(report: &AgentReport) -> String {
    match report.kind.as_ref().unwrap() {
        Kind::Started(started) => format!("started {}", started.patch_index),
        Kind::Finished(finished) => format!("finished {}", finished.patch_index),
        Kind::Heartbeat(heartbeat) => format!("heartbeat {}", heartbeat.patch_index.unwrap()),
        Kind::Final(_) => "final".into(),
    }
}

/// Descriptions with consecutive heartbeats folded into one `heartbeat N`.
pub fn describe_all(reports: &[AgentReport]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for report in reports {
        let text = describe(report);
        if text.starts_with("heartbeat") && out.last() == Some(&text) {
            continue;
        }
        out.push(text);
    }
    out
}

/// Every seq from 1 to the number of reports, strictly increasing.
pub fn assert_gapless_in_order(reports: &[AgentReport]) {
    let seqs: Vec<u64> = reports.iter().map(|r| r.seq).collect();
    let expected: Vec<u64> = (1..=reports.len() as u64).collect();
    assert_eq!(seqs, expected, "seqs must be 1..=n in order");
}

/// Whether a process is gone (or a zombie nobody reaped yet).
pub fn process_is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            // "pid (comm) S ...": the state follows the last ')'.
            let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().chars().next());
            matches!(state, Some(Some('Z' | 'X')))
        }
    }
}

/// Poll `condition` until it holds or `limit` passes.
pub fn wait_until(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
