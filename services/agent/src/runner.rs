//! Installing one patch: check the installer's sha256, write the patch's
//! own temporary script, run it with the patch's timeout while calling back
//! for heartbeats, and keep the tail of its combined output.
//!
//! This module decides the outcome of one patch and nothing else: it never
//! reports (the caller turns a [`PatchResult`] into a `PatchFinished`) and
//! never stops the deployment — every failure becomes an outcome.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use fleetpatch_proto::plan::PlanPatch;
use fleetpatch_proto::v1::PatchOutcome;
use sha2::{Digest, Sha256};

use crate::outcome::{classify_exit_code, OutputTail, EXIT_CODE_NOT_RUN};
use crate::plan::LoadedPlan;
use crate::process;
use crate::render::{self, Platform};

/// How often the runner looks at the child between heartbeats.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// How long to wait for output after the script exits: a helper the
/// installer left running in the background may hold the pipe open.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// How one patch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchResult {
    pub exit_code: i32,
    pub outcome: PatchOutcome,
    pub output_tail: String,
    pub duration: Duration,
}

/// Install one patch. `on_heartbeat` is called every `heartbeat_interval`
/// while the installer runs.
pub fn install_patch(
    loaded: &LoadedPlan,
    patch: &PlanPatch,
    heartbeat_interval: Duration,
    on_heartbeat: &mut dyn FnMut(),
) -> PatchResult {
    let started = Instant::now();
    let not_run = |outcome: PatchOutcome, message: String| PatchResult {
        exit_code: EXIT_CODE_NOT_RUN,
        outcome,
        output_tail: crate::outcome::tail_text(format!("[fleetpatch-agent] {message}").as_bytes()),
        duration: started.elapsed(),
    };

    let installer = loaded.installer_path(&patch.file);
    match sha256_of_file(&installer) {
        Ok(actual) if actual.eq_ignore_ascii_case(&patch.sha256) => {}
        Ok(actual) => {
            return not_run(
                PatchOutcome::ChecksumMismatch,
                format!(
                    "sha256 of {} is {actual}, the plan expects {}; the installer was not run",
                    installer.display(),
                    patch.sha256.to_ascii_lowercase()
                ),
            )
        }
        Err(e) => {
            return not_run(
                PatchOutcome::Failed,
                format!("cannot read the installer {}: {e}; it was not run", installer.display()),
            )
        }
    }

    let script = match render::patch_script(Platform::CURRENT, &loaded.plan, patch, &installer) {
        Ok(script) => script,
        Err(unsupported) => return not_run(PatchOutcome::Failed, format!("{unsupported}; the installer was not run")),
    };
    let script_path = script_path(&loaded.directory, patch.index);
    if let Err(e) = std::fs::write(&script_path, script) {
        return not_run(PatchOutcome::Failed, format!("cannot write the script {}: {e}", script_path.display()));
    }

    let mut command = script_command(&script_path);
    command.current_dir(&loaded.directory).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    process::configure(&mut command);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            return not_run(PatchOutcome::Failed, format!("cannot start the script {}: {e}", script_path.display()))
        }
    };

    let tail = Arc::new(Mutex::new(OutputTail::default()));
    let (readers_done, readers) = start_output_readers(&mut child, &tail);
    let timeout = Duration::from_secs(u64::from(patch.timeout_seconds));
    let waited = wait_with_heartbeats(&mut child, started + timeout, heartbeat_interval, on_heartbeat);
    wait_for_readers(&readers_done, readers);

    let mut tail = std::mem::take(&mut *tail.lock().unwrap_or_else(PoisonError::into_inner));
    let (exit_code, outcome) = match waited {
        Waited::Exited(exit_code) => (exit_code, classify_exit_code(patch, exit_code)),
        Waited::TimedOut(exit_code) => {
            tail.push(
                format!(
                    "\n[fleetpatch-agent] timed out after {} s; the installer and its process group were killed\n",
                    patch.timeout_seconds
                )
                .as_bytes(),
            );
            (exit_code, PatchOutcome::TimedOut)
        }
        Waited::Lost(e) => {
            tail.push(format!("\n[fleetpatch-agent] lost track of the installer: {e}\n").as_bytes());
            (EXIT_CODE_NOT_RUN, PatchOutcome::Failed)
        }
    };
    PatchResult { exit_code, outcome, output_tail: tail.to_text(), duration: started.elapsed() }
}

/// The interpreter for a patch script on this platform.
fn script_command(script: &Path) -> Command {
    #[cfg(windows)]
    {
        let mut command = Command::new("cmd.exe");
        command.arg("/d").arg("/c").arg(script);
        command
    }
    #[cfg(not(windows))]
    {
        let mut command = Command::new("/bin/sh");
        command.arg(script);
        command
    }
}

/// Hex sha256 of a file, read in chunks.
pub fn sha256_of_file(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Start one reader thread per output pipe; returns the channel each
/// reader signals when its pipe closes, and how many readers started.
fn start_output_readers(child: &mut Child, tail: &Arc<Mutex<OutputTail>>) -> (mpsc::Receiver<()>, usize) {
    let (done, readers_done) = mpsc::channel();
    let mut started = 0;
    let streams: [Option<Box<dyn Read + Send>>; 2] = [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
    ];
    for mut stream in streams.into_iter().flatten() {
        let tail = Arc::clone(tail);
        let done = done.clone();
        let spawned = std::thread::Builder::new().name("installer-output".into()).spawn(move || {
            let mut buffer = [0u8; 8192];
            loop {
                match stream.read(&mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(read) => tail.lock().unwrap_or_else(PoisonError::into_inner).push(&buffer[..read]),
                }
            }
            let _ = done.send(());
        });
        // Without a reader the pipe fills and the installer may block on it;
        // the timeout still ends it, and the tail says why it is empty.
        if spawned.is_ok() {
            started += 1;
        }
    }
    (readers_done, started)
}

fn wait_for_readers(readers_done: &mpsc::Receiver<()>, readers: usize) {
    let until = Instant::now() + OUTPUT_GRACE;
    for _ in 0..readers {
        let left = until.saturating_duration_since(Instant::now());
        if readers_done.recv_timeout(left).is_err() {
            // A background helper keeps the pipe open; its reader thread ends
            // when the helper does. The tail so far is what gets reported.
            return;
        }
    }
}

enum Waited {
    Exited(i32),
    TimedOut(i32),
    Lost(std::io::Error),
}

fn wait_with_heartbeats(
    child: &mut Child,
    deadline: Instant,
    heartbeat_interval: Duration,
    on_heartbeat: &mut dyn FnMut(),
) -> Waited {
    let mut next_heartbeat = Instant::now() + heartbeat_interval;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Waited::Exited(process::exit_code(status)),
            Ok(None) => {}
            Err(e) => {
                process::kill_process_tree(child);
                let _ = child.wait();
                return Waited::Lost(e);
            }
        }
        let now = Instant::now();
        if now >= deadline {
            process::kill_process_tree(child);
            return match child.wait() {
                Ok(status) => Waited::TimedOut(process::exit_code(status)),
                Err(_) => Waited::TimedOut(EXIT_CODE_NOT_RUN),
            };
        }
        if now >= next_heartbeat {
            on_heartbeat();
            next_heartbeat += heartbeat_interval;
            if next_heartbeat < now {
                next_heartbeat = now + heartbeat_interval;
            }
        }
        let sleep = POLL_INTERVAL.min(deadline - now).min(next_heartbeat.saturating_duration_since(now));
        std::thread::sleep(sleep.max(Duration::from_millis(1)));
    }
}

/// Path of the script a patch runs through, for cleanup.
pub fn script_path(directory: &Path, patch_index: u32) -> PathBuf {
    directory.join(Platform::CURRENT.script_file_name(patch_index))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_checksums_are_lowercase_hex() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("empty");
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(sha256_of_file(&path).unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
