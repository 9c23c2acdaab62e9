//! Downloading an installer from the relays the plan names (a patch's
//! `sources`), before the patch is installed.
//!
//! The bytes go to `<staging dir>/<file>.part`; a try that ends early
//! (relay restarted, connection cut, nothing received for a while) leaves
//! them there and the next try asks for the rest (`Range: bytes=N-`), after
//! a pause that doubles from [`DEFAULT_BACKOFF_INITIAL`] to
//! [`DEFAULT_BACKOFF_MAX`], moving on to the next source each time (they
//! serve the same content, named by its sha256). A source that answers 404
//! or 410 does not have the installer and is not asked again. The tries
//! stop after the plan's `download_timeout_seconds`.
//!
//! A complete file is hashed: when it matches the plan's sha256 it is
//! renamed to `<file>`, where the runner checks it once more and runs it.
//! When it does not, it is deleted and downloaded once more from byte 0
//! with `Cache-Control: no-cache` (a relay then re-verifies its cached
//! copy; this second download has a `download_timeout_seconds` of its own);
//! a second mismatch fails the patch. A `<file>` that already matches (an
//! agent restarted after a crash) is not downloaded again.
//!
//! Nothing here runs anything. Heartbeats go on while a download waits, and
//! a stop request ends it within about 250 ms, keeping the `.part` file for
//! a restart.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fleetpatch_proto::plan::{DeploymentPlan, PlanPatch};
use fleetpatch_proto::v1::PatchOutcome;

use crate::http::{self, Connector, GetError, GetOutcome, GetRequest, HttpUrl, Peer, Timeouts};
use crate::plan::LoadedPlan;
use crate::runner::sha256_of_file;
use crate::stop::StopSignal;
use crate::{error, info, warn};

/// The pause after the first failed try.
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(500);
/// The longest pause between two tries.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How long connecting to a relay may take (a stop waits for it at most).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a relay may send nothing before the try is given up (and the
/// next one resumes).
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a pause between tries looks at the stop signal.
const PAUSE_POLL: Duration = Duration::from_millis(20);

/// How patiently an installer is downloaded.
#[derive(Debug, Clone, Copy)]
pub struct DownloadOptions {
    /// How long one download may take, tries and pauses included.
    pub timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// `connect`: per connection; `io`: how long a relay may send nothing.
    pub timeouts: Timeouts,
}

impl DownloadOptions {
    /// The plan's `download_timeout_seconds` and the default pauses.
    pub fn for_plan(plan: &DeploymentPlan) -> Self {
        Self {
            timeout: Duration::from_secs(u64::from(plan.download_timeout_seconds)),
            backoff_initial: DEFAULT_BACKOFF_INITIAL,
            backoff_max: DEFAULT_BACKOFF_MAX,
            timeouts: Timeouts { connect: DEFAULT_CONNECT_TIMEOUT, io: DEFAULT_STALL_TIMEOUT },
        }
    }
}

/// How the verified installer came to be there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    /// `<file>` was already there with the right sha256.
    AlreadyThere,
    Downloaded,
}

/// Why there is no verified installer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownloadError {
    /// The patch fails without running anything; `reason` is its output.
    Failed { outcome: PatchOutcome, reason: String },
    /// A stop was requested; the `.part` file stays for a restart.
    Interrupted,
}

/// Where a download of `file` accumulates before it is verified.
pub fn partial_path(directory: &Path, file: &str) -> PathBuf {
    directory.join(format!("{file}.part"))
}

/// One of the patch's sources, ready to be asked.
struct Source<'a> {
    text: &'a str,
    url: HttpUrl,
    connector: Connector,
}

/// Make `loaded.installer_path(&patch.file)` the verified installer,
/// downloading it from `patch.sources` unless it is already there.
/// `on_heartbeat` is called every `heartbeat_interval` meanwhile.
pub fn download_installer(
    loaded: &LoadedPlan,
    patch: &PlanPatch,
    options: &DownloadOptions,
    heartbeat_interval: Duration,
    on_heartbeat: &mut dyn FnMut(),
    stop: &StopSignal,
) -> Result<Fetched, DownloadError> {
    let installer = loaded.installer_path(&patch.file);
    let part = partial_path(&loaded.directory, &patch.file);
    let expected = patch.sha256.to_ascii_lowercase();
    let what = format!("installer of patch #{} {:?}", patch.index, patch.name);
    let failed = |reason: String| DownloadError::Failed { outcome: PatchOutcome::Failed, reason };
    match sha256_of_file(&installer) {
        Ok(actual) if actual == expected => {
            info!(
                "installer already downloaded and verified; not downloading it again",
                patch_index = patch.index,
                path = installer.display()
            );
            let _ = remove_if_there(&part);
            return Ok(Fetched::AlreadyThere);
        }
        Ok(actual) => {
            warn!(
                "a file named like the installer does not match its sha256; replacing it",
                patch_index = patch.index,
                path = installer.display(),
                sha256 = actual
            );
            remove_if_there(&installer)
                .map_err(|e| failed(format!("{what}: cannot remove {}: {e}; not run", installer.display())))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(failed(format!("{what}: cannot read {}: {e}; not run", installer.display()))),
    }

    let mut unusable = Vec::new();
    let mut sources = Vec::new();
    for text in &patch.sources {
        let url = HttpUrl::parse_source(text).map_err(|e| e.to_string());
        match url.and_then(|url| {
            let connector = Connector::for_peer(&url, loaded.plan.relay_ca_pem.as_deref(), Peer::Relay);
            connector.map(|connector| (url, connector)).map_err(|e| format!("{text}: {e}"))
        }) {
            Ok((url, connector)) => sources.push(Source { text, url, connector }),
            Err(reason) => unusable.push(reason),
        }
    }
    if sources.is_empty() {
        let reason = format!("{what}: no usable source ({}); not run", unusable.join("; "));
        error!("download failed", patch_index = patch.index, reason = reason);
        return Err(failed(reason));
    }

    let now = Instant::now();
    let mut ticker = Ticker {
        stop,
        on_heartbeat,
        interval: heartbeat_interval,
        next_heartbeat: now + heartbeat_interval,
        deadline: now,
    };
    let mut no_cache = false;
    loop {
        let source = match fetch(&what, &sources, &part, patch, no_cache, options, &mut ticker) {
            Ok(source) => source,
            Err(error) => {
                if matches!(error, DownloadError::Failed { .. }) {
                    let _ = remove_if_there(&part);
                }
                return Err(error);
            }
        };
        let actual = sha256_of_file(&part)
            .map_err(|e| failed(format!("{what}: cannot read {}: {e}; not run", part.display())))?;
        if actual == expected {
            std::fs::rename(&part, &installer).map_err(|e| {
                failed(format!("{what}: cannot rename {} to {}: {e}; not run", part.display(), installer.display()))
            })?;
            return Ok(Fetched::Downloaded);
        }
        let _ = remove_if_there(&part);
        if no_cache {
            let reason = format!(
                "{what} from {source}: sha256 is {actual}, the plan expects {expected} (downloaded twice); not run"
            );
            error!("download failed", patch_index = patch.index, source = source, reason = reason);
            return Err(DownloadError::Failed { outcome: PatchOutcome::ChecksumMismatch, reason });
        }
        warn!(
            "the download does not match the installer's sha256; downloading it once more, past the relay's cache",
            patch_index = patch.index,
            source = source,
            sha256 = actual,
            expected = expected
        );
        no_cache = true;
    }
}

/// Download into `part` until it is complete, from `sources` in turn;
/// returns the source that completed it.
fn fetch<'s>(
    what: &str,
    sources: &'s [Source<'s>],
    part: &Path,
    patch: &PlanPatch,
    no_cache: bool,
    options: &DownloadOptions,
    ticker: &mut Ticker<'_>,
) -> Result<&'s str, DownloadError> {
    let started = Instant::now();
    ticker.deadline = started + options.timeout;
    let give_up = |reason: String, bytes: u64| {
        error!(
            "download failed",
            patch_index = patch.index,
            bytes = bytes,
            seconds = seconds(started.elapsed()),
            reason = reason
        );
        DownloadError::Failed { outcome: PatchOutcome::Failed, reason }
    };
    let cannot = |action: &str, e: std::io::Error| {
        give_up(format!("{what}: cannot {action} {}: {e}; not run", part.display()), 0)
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(part)
        .map_err(|e| cannot("open", e))?;
    let mut not_found: Vec<Option<u16>> = vec![None; sources.len()];
    let mut next = 0;
    let mut backoff = options.backoff_initial;
    let mut last_error: Option<String> = None;
    loop {
        let length = file.seek(SeekFrom::End(0)).map_err(|e| cannot("read", e))?;
        if ticker.stop.is_requested() {
            warn!(
                "download stopped; the partial file stays for a restart",
                patch_index = patch.index,
                bytes = length,
                seconds = seconds(started.elapsed())
            );
            return Err(DownloadError::Interrupted);
        }
        if Instant::now() >= ticker.deadline {
            let last = last_error.as_deref().unwrap_or("no answer");
            let reason = format!(
                "{what}: not downloaded within {} s ({length} of {} bytes; last error: {last}); not run",
                options.timeout.as_secs_f32(),
                patch.size
            );
            return Err(give_up(reason, length));
        }
        let Some(index) = (0..sources.len()).map(|k| (next + k) % sources.len()).find(|i| not_found[*i].is_none())
        else {
            let answers: Vec<String> = sources
                .iter()
                .zip(&not_found)
                .map(|(source, status)| format!("{} answered HTTP {}", source.text, status.unwrap_or_default()))
                .collect();
            return Err(give_up(format!("{what}: no source has it ({}); not run", answers.join(", ")), length));
        };
        let source = &sources[index];
        let offset = length;
        info!(
            if offset == 0 { "download started" } else { "download resumed" },
            patch_index = patch.index,
            source = source.text,
            from_byte = offset,
            size = patch.size,
            no_cache = no_cache
        );
        let try_started = Instant::now();
        let request = GetRequest { offset, size: patch.size, no_cache };
        let result =
            http::get_to(&source.url, &source.connector, request, options.timeouts, &mut || ticker.tick(), &mut file);
        let length = file.seek(SeekFrom::End(0)).map_err(|e| cannot("read", e))?;
        let error = match result {
            // A range that ends short of the plan's size: the rest is asked for.
            Ok(GetOutcome::Complete { total, .. }) if total < patch.size => {
                format!("the answer ended at byte {total} of {}", patch.size)
            }
            Ok(GetOutcome::Complete { total, received, .. }) => {
                info!(
                    "download finished",
                    patch_index = patch.index,
                    source = source.text,
                    bytes = total,
                    received = received,
                    seconds = seconds(try_started.elapsed()),
                    total_seconds = seconds(started.elapsed())
                );
                return Ok(source.text);
            }
            Ok(GetOutcome::NotFound { status }) => {
                warn!(
                    "download source does not have the installer; trying the next one",
                    patch_index = patch.index,
                    source = source.text,
                    status = status
                );
                not_found[index] = Some(status);
                next = index + 1;
                continue;
            }
            Ok(GetOutcome::RangeNotSatisfiable) if offset > 0 => {
                warn!(
                    "download source cannot resume the partial file (HTTP 416); starting again from byte 0",
                    patch_index = patch.index,
                    source = source.text,
                    bytes = offset
                );
                next = index;
                continue;
            }
            Ok(GetOutcome::RangeNotSatisfiable) => "HTTP 416 to a request for the whole file".to_owned(),
            Err(GetError::Sink(e)) => return Err(cannot("write", e)),
            Err(error) => error.to_string(),
        };
        if ticker.stop.is_requested() {
            continue; // reported at the top of the loop
        }
        // A try cut short by the deadline says less than the one before it.
        if last_error.is_none() || Instant::now() < ticker.deadline {
            last_error = Some(format!("{}: {error}", source.text));
        }
        if length > offset {
            backoff = options.backoff_initial;
        }
        warn!(
            "download try failed; trying again",
            patch_index = patch.index,
            source = source.text,
            error = error,
            bytes = length,
            seconds = seconds(try_started.elapsed()),
            retry_in_ms = backoff.as_millis()
        );
        if ticker.pause(backoff).is_err() {
            continue; // stopped: reported at the top of the loop
        }
        backoff = (backoff * 2).min(options.backoff_max);
        next = index + 1;
    }
}

/// Stop requests, the download's deadline and heartbeats, looked at
/// between reads and during pauses.
struct Ticker<'a> {
    stop: &'a StopSignal,
    on_heartbeat: &'a mut dyn FnMut(),
    interval: Duration,
    next_heartbeat: Instant,
    deadline: Instant,
}

impl Ticker<'_> {
    fn heartbeat(&mut self, now: Instant) {
        if now >= self.next_heartbeat {
            (self.on_heartbeat)();
            self.next_heartbeat = now + self.interval;
        }
    }

    /// Called by the HTTP client while a try runs: an error ends the try.
    fn tick(&mut self) -> std::io::Result<()> {
        if self.stop.is_requested() {
            return Err(std::io::Error::other("stop requested"));
        }
        let now = Instant::now();
        if now >= self.deadline {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "download_timeout_seconds passed"));
        }
        self.heartbeat(now);
        Ok(())
    }

    /// Wait `pause` (not beyond the deadline) with heartbeats.
    fn pause(&mut self, pause: Duration) -> Result<(), DownloadError> {
        let until = (Instant::now() + pause).min(self.deadline);
        loop {
            if self.stop.is_requested() {
                return Err(DownloadError::Interrupted);
            }
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            self.heartbeat(now);
            std::thread::sleep(PAUSE_POLL.min(until - now));
        }
    }
}

fn seconds(duration: Duration) -> String {
    format!("{:.1}", duration.as_secs_f64())
}

fn remove_if_there(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    //! A relay is a `TcpListener` thread that answers each connection with
    //! whatever the test's handler writes, misbehaving on purpose.

    use super::*;
    use fleetpatch_proto::plan::{InstallerKind, RebootPolicy};
    use sha2::{Digest, Sha256};
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    /// What a handler gets: the request's number (from 0), its head, the connection.
    type Handler = dyn Fn(usize, &str, &mut TcpStream) + Send + 'static;

    struct TestRelay {
        url: String,
        requests: Arc<Mutex<Vec<String>>>,
    }

    impl TestRelay {
        fn start(handler: impl Fn(usize, &str, &mut TcpStream) + Send + 'static) -> Self {
            let handler: Box<Handler> = Box::new(handler);
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let url =
                format!("http://127.0.0.1:{}/v1/content/{}", listener.local_addr().unwrap().port(), "a".repeat(64));
            let requests = Arc::new(Mutex::new(Vec::new()));
            let seen = Arc::clone(&requests);
            std::thread::spawn(move || {
                for (number, stream) in listener.incoming().enumerate() {
                    let Ok(mut stream) = stream else { continue };
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|read| read == 1) {
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    seen.lock().unwrap().push(head.clone());
                    handler(number, &head, &mut stream);
                }
            });
            Self { url, requests }
        }

        fn requests(&self) -> Vec<String> {
            self.requests.lock().unwrap().clone()
        }
    }

    /// Write a whole answer; the peer may have hung up (ignored).
    fn answer(stream: &mut TcpStream, status: &str, headers: &[String], body: &[u8]) {
        let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
        for header in headers {
            head.push_str(header);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(body);
    }

    fn ok(stream: &mut TcpStream, body: &[u8]) {
        answer(stream, "200 OK", &[format!("Content-Length: {}", body.len())], body);
    }

    /// The `N` of a `Range: bytes=N-` header.
    fn range_start(head: &str) -> Option<u64> {
        head.lines().find_map(|line| line.strip_prefix("Range: bytes=")?.strip_suffix('-')?.parse().ok())
    }

    fn content() -> Vec<u8> {
        (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn corrupted() -> Vec<u8> {
        let mut bytes = content();
        bytes[1234] ^= 0xff;
        bytes
    }

    fn sha256(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    /// A one-patch plan in `directory` whose installer comes from `sources`.
    fn plan_with_sources(directory: &Path, sources: &[&str]) -> LoadedPlan {
        let content = content();
        let patch = PlanPatch {
            index: 1,
            name: "x".into(),
            file: "x.sh".into(),
            sha256: sha256(&content),
            size: content.len() as u64,
            sources: sources.iter().map(|source| source.to_string()).collect(),
            installer: InstallerKind::Script,
            arguments: String::new(),
            success_codes: vec![0],
            reboot_codes: vec![],
            timeout_seconds: 60,
        };
        let plan = DeploymentPlan {
            version: 1,
            deployment_id: "fp-download".into(),
            target_id: "6f1c1b8e-8f6f-4f53-9d55-3a3f5e0c2a11".parse().unwrap(),
            attempt: 1,
            collector_url: "http://127.0.0.1:9".into(),
            collector_ca_pem: None,
            token: "t".into(),
            heartbeat_seconds: 30,
            patches: vec![patch],
            reboot: RebootPolicy::Never,
            reboot_command: None,
            relay_ca_pem: None,
            download_timeout_seconds: 5,
            keep_files: true,
        };
        LoadedPlan { plan, directory: directory.to_path_buf(), path: directory.join("plan.json") }
    }

    /// Short pauses, so retries take milliseconds.
    fn quick(timeout: Duration) -> DownloadOptions {
        DownloadOptions {
            timeout,
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_millis(100),
            timeouts: Timeouts { connect: Duration::from_secs(2), io: Duration::from_secs(2) },
        }
    }

    fn fetch(loaded: &LoadedPlan, options: DownloadOptions) -> Result<Fetched, DownloadError> {
        let patch = &loaded.plan.patches[0];
        download_installer(loaded, patch, &options, Duration::from_secs(30), &mut || {}, &StopSignal::never())
    }

    fn installer(directory: &Path) -> PathBuf {
        directory.join("x.sh")
    }

    fn part(directory: &Path) -> PathBuf {
        directory.join("x.sh.part")
    }

    #[test]
    fn a_full_download_is_verified_and_renamed() {
        let relay = TestRelay::start(|_, _, stream| ok(stream, &content()));
        let directory = tempfile::tempdir().unwrap();
        let loaded = plan_with_sources(directory.path(), &[&relay.url]);
        assert_eq!(fetch(&loaded, quick(Duration::from_secs(5))), Ok(Fetched::Downloaded));
        assert!(std::fs::read(installer(directory.path())).unwrap() == content());
        assert!(!part(directory.path()).exists());
        let requests = relay.requests();
        assert_eq!(requests.len(), 1);
        assert!(
            requests[0].starts_with(&format!("GET /v1/content/{} HTTP/1.1\r\n", "a".repeat(64))),
            "{}",
            requests[0]
        );
        assert!(!requests[0].contains("Range:") && !requests[0].contains("Cache-Control:"), "{}", requests[0]);
    }

    #[test]
    fn an_interrupted_download_resumes_where_it_stopped() {
        let half = content().len() / 2;
        let served = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&served);
        let relay = TestRelay::start(move |number, head, stream| {
            let content = content();
            if number == 0 {
                // The relay dies halfway through.
                // Counted before it is written: the client may finish and
                // the test read the count before this thread runs on.
                counted.fetch_add(half as u64, Ordering::SeqCst);
                let _ = stream
                    .write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", content.len()).as_bytes());
                let _ = stream.write_all(&content[..half]);
                return;
            }
            let start = range_start(head).unwrap_or(0) as usize;
            let rest = &content[start..];
            let headers = [
                format!("Content-Range: bytes {start}-{}/{}", content.len() - 1, content.len()),
                format!("Content-Length: {}", rest.len()),
            ];
            counted.fetch_add(rest.len() as u64, Ordering::SeqCst);
            answer(stream, "206 Partial Content", &headers, rest);
        });
        let directory = tempfile::tempdir().unwrap();
        let loaded = plan_with_sources(directory.path(), &[&relay.url]);
        assert_eq!(fetch(&loaded, quick(Duration::from_secs(5))), Ok(Fetched::Downloaded));
        assert!(std::fs::read(installer(directory.path())).unwrap() == content());
        let requests = relay.requests();
        assert_eq!(requests.len(), 2);
        assert!(requests[1].contains(&format!("\r\nRange: bytes={half}-\r\n")), "{}", requests[1]);
        assert_eq!(served.load(Ordering::SeqCst), content().len() as u64, "no byte was fetched twice");
    }

    #[test]
    fn a_range_that_ends_short_is_completed_by_the_next_try() {
        let relay = TestRelay::start(|_, head, stream| {
            let content = content();
            let start = range_start(head).unwrap_or(0) as usize;
            let end = if start == 0 { 99 } else { content.len() - 1 };
            let headers = [
                format!("Content-Range: bytes {start}-{end}/{}", content.len()),
                format!("Content-Length: {}", end + 1 - start),
            ];
            answer(stream, "206 Partial Content", &headers, &content[start..=end]);
        });
        let directory = tempfile::tempdir().unwrap();
        let loaded = plan_with_sources(directory.path(), &[&relay.url]);
        assert_eq!(fetch(&loaded, quick(Duration::from_secs(5))), Ok(Fetched::Downloaded));
        assert!(std::fs::read(installer(directory.path())).unwrap() == content());
        let requests = relay.requests();
        assert_eq!(requests.len(), 2);
        assert!(requests[1].contains("\r\nRange: bytes=100-\r\n"), "{}", requests[1]);
    }

    #[test]
    fn a_source_without_the_installer_is_skipped_and_a_busy_one_retried() {
        let empty =
            TestRelay::start(|_, _, stream| answer(stream, "404 Not Found", &["Content-Length: 0".into()], b""));
        let busy_once = TestRelay::start(|number, _, stream| match number {
            0 => answer(stream, "503 Service Unavailable", &["Content-Length: 0".into()], b""),
            _ => ok(stream, &content()),
        });
        let directory = tempfile::tempdir().unwrap();
        let loaded = plan_with_sources(directory.path(), &[&empty.url, &busy_once.url]);
        assert_eq!(fetch(&loaded, quick(Duration::from_secs(5))), Ok(Fetched::Downloaded));
        assert!(std::fs::read(installer(directory.path())).unwrap() == content());
        assert_eq!((empty.requests().len(), busy_once.requests().len()), (1, 2), "a 404 is not asked again");
    }

    #[test]
    fn no_source_with_the_installer_fails_the_patch() {
        let gone = TestRelay::start(|_, _, stream| answer(stream, "410 Gone", &["Content-Length: 0".into()], b""));
        let directory = tempfile::tempdir().unwrap();
        let loaded = plan_with_sources(directory.path(), &[&gone.url]);
        let reason = format!("installer of patch #1 \"x\": no source has it ({} answered HTTP 410); not run", gone.url);
        let expected = DownloadError::Failed { outcome: PatchOutcome::Failed, reason };
        assert_eq!(fetch(&loaded, quick(Duration::from_secs(5))), Err(expected));
        assert!(!part(directory.path()).exists() && !installer(directory.path()).exists());
    }

    #[test]
    fn corrupt_bytes_twice_fail_clearly_and_leave_no_file() {
        let relay = TestRelay::start(|_, _, stream| ok(stream, &corrupted()));
        let directory = tempfile::tempdir().unwrap();
        let loaded = plan_with_sources(directory.path(), &[&relay.url]);
        let reason = format!(
            "installer of patch #1 \"x\" from {}: sha256 is {}, the plan expects {} (downloaded twice); not run",
            relay.url,
            sha256(&corrupted()),
            sha256(&content())
        );
        let expected = DownloadError::Failed { outcome: PatchOutcome::ChecksumMismatch, reason };
        assert_eq!(fetch(&loaded, quick(Duration::from_secs(5))), Err(expected));
        assert!(!part(directory.path()).exists() && !installer(directory.path()).exists());
        let requests = relay.requests();
        assert_eq!(requests.len(), 2);
        assert!(!requests[0].contains("Cache-Control"), "{}", requests[0]);
        assert!(requests[1].contains("\r\nCache-Control: no-cache\r\n"), "{}", requests[1]);
    }

    #[test]
    fn corrupt_bytes_once_are_downloaded_again_past_the_cache() {
        let relay =
            TestRelay::start(|number, _, stream| ok(stream, &if number == 0 { corrupted() } else { content() }));
        let directory = tempfile::tempdir().unwrap();
        let loaded = plan_with_sources(directory.path(), &[&relay.url]);
        assert_eq!(fetch(&loaded, quick(Duration::from_secs(5))), Ok(Fetched::Downloaded));
        assert!(std::fs::read(installer(directory.path())).unwrap() == content());
        let requests = relay.requests();
        assert_eq!(requests.len(), 2);
        assert!(requests[1].contains("\r\nCache-Control: no-cache\r\n"), "{}", requests[1]);
        assert!(!requests[1].contains("Range:"), "downloaded again from 0: {}", requests[1]);
    }

    #[test]
    fn a_relay_sending_more_than_the_size_is_stopped() {
        // Chunked, so nothing announces the excess: it has to be counted.
        let relay = TestRelay::start(|_, _, stream| {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
            for _ in 0..100 {
                if stream.write_all(format!("1000\r\n{}\r\n", "z".repeat(0x1000)).as_bytes()).is_err() {
                    return;
                }
            }
        });
        let directory = tempfile::tempdir().unwrap();
        let loaded = plan_with_sources(directory.path(), &[&relay.url]);
        let size = loaded.plan.patches[0].size;
        let Err(DownloadError::Failed { outcome, reason }) = fetch(&loaded, quick(Duration::from_millis(600))) else {
            panic!("the download succeeded");
        };
        assert_eq!(outcome, PatchOutcome::Failed);
        assert!(reason.contains(&format!("the answer is larger than the {size} bytes the plan gives")), "{reason}");
        assert!(reason.starts_with("installer of patch #1 \"x\": not downloaded within 0.6 s"), "{reason}");
        assert!(!part(directory.path()).exists() && !installer(directory.path()).exists());
    }

    #[test]
    fn a_200_answer_to_a_range_request_starts_again_from_0() {
        let relay = TestRelay::start(|_, _, stream| ok(stream, &content()));
        let directory = tempfile::tempdir().unwrap();
        std::fs::write(part(directory.path()), b"garbage!").unwrap();
        let loaded = plan_with_sources(directory.path(), &[&relay.url]);
        assert_eq!(fetch(&loaded, quick(Duration::from_secs(5))), Ok(Fetched::Downloaded));
        assert!(std::fs::read(installer(directory.path())).unwrap() == content());
        assert!(relay.requests()[0].contains("\r\nRange: bytes=8-\r\n"), "{}", relay.requests()[0]);
    }

    #[test]
    fn a_416_answer_starts_again_from_0() {
        let relay = TestRelay::start(|_, head, stream| match range_start(head) {
            Some(_) => answer(stream, "416 Range Not Satisfiable", &["Content-Length: 0".into()], b""),
            None => ok(stream, &content()),
        });
        let directory = tempfile::tempdir().unwrap();
        std::fs::write(part(directory.path()), b"garbage!").unwrap();
        let loaded = plan_with_sources(directory.path(), &[&relay.url]);
        assert_eq!(fetch(&loaded, quick(Duration::from_secs(5))), Ok(Fetched::Downloaded));
        assert!(std::fs::read(installer(directory.path())).unwrap() == content());
        assert_eq!(relay.requests().len(), 2);
    }

    #[test]
    fn an_installer_already_verified_is_not_downloaded_again() {
        let relay = TestRelay::start(|_, _, stream| ok(stream, &content()));
        let directory = tempfile::tempdir().unwrap();
        std::fs::write(installer(directory.path()), content()).unwrap();
        std::fs::write(part(directory.path()), b"left by a crash").unwrap();
        let loaded = plan_with_sources(directory.path(), &[&relay.url]);
        assert_eq!(fetch(&loaded, quick(Duration::from_secs(5))), Ok(Fetched::AlreadyThere));
        assert!(relay.requests().is_empty());
        assert!(!part(directory.path()).exists());

        // One that does not match is replaced.
        std::fs::write(installer(directory.path()), corrupted()).unwrap();
        assert_eq!(fetch(&loaded, quick(Duration::from_secs(5))), Ok(Fetched::Downloaded));
        assert!(std::fs::read(installer(directory.path())).unwrap() == content());
    }

    #[test]
    fn a_stop_interrupts_a_stalled_download_with_heartbeats_meanwhile() {
        let relay = TestRelay::start(|_, _, stream| {
            let _ =
                stream.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", content().len()).as_bytes());
            let _ = stream.write_all(&content()[..1000]);
            std::thread::sleep(Duration::from_secs(20));
        });
        let directory = tempfile::tempdir().unwrap();
        let loaded = plan_with_sources(directory.path(), &[&relay.url]);
        let stop = StopSignal::never();
        let requester = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(1200));
                stop.request();
            })
        };
        let mut options = quick(Duration::from_secs(30));
        options.timeouts.io = Duration::from_secs(10);
        let mut heartbeats = 0;
        let started = Instant::now();
        let result = download_installer(
            &loaded,
            &loaded.plan.patches[0],
            &options,
            Duration::from_millis(200),
            &mut || heartbeats += 1,
            &stop,
        );
        assert_eq!(result, Err(DownloadError::Interrupted));
        // Stopped 1.2 s in; the socket is looked at every 250 ms.
        assert!(started.elapsed() < Duration::from_millis(1700), "the stop took {:?}", started.elapsed());
        requester.join().unwrap();
        assert!(heartbeats >= 3, "heartbeats went on during the stalled download: {heartbeats}");
        assert_eq!(std::fs::metadata(part(directory.path())).unwrap().len(), 1000, "kept for a restart");
    }
}
