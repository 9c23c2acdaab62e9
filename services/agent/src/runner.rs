//! Installing one patch: download the installer when the plan says so
//! ([`crate::download`]), check its sha256, write the patch's
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

use crate::download::{self, DownloadError};
use crate::outcome::{classify_exit_code, OutputTail, EXIT_CODE_NOT_RUN};
use crate::plan::LoadedPlan;
use crate::process::{self, ProcessTree};
use crate::render::{self, Platform};
use crate::stop::StopSignal;

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

/// The run was stopped (see [`crate::stop`]) while the installer ran; the
/// installer and everything it started were ended. No outcome: a restarted
/// agent runs the patch again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupted;

/// Windows Installer's `ERROR_INSTALL_ALREADY_RUNNING`: another
/// installation holds the installer. The patch is tried again after a pause
/// (unless the plan lists the code as a success or reboot code).
pub const EXIT_CODE_INSTALL_IN_PROGRESS: i32 = 1618;

/// The pauses before the tries that follow a 1618, all within the patch's
/// own timeout: up to five tries over about seven and a half minutes.
pub const BUSY_RETRY_PAUSES: [Duration; 4] =
    [Duration::from_secs(30), Duration::from_secs(60), Duration::from_secs(120), Duration::from_secs(240)];

/// Install one patch. `on_heartbeat` is called every `heartbeat_interval`
/// while the installer runs (and while it waits to try again); a request on
/// `stop` ends the installer's process tree and returns [`Interrupted`].
pub fn install_patch(
    loaded: &LoadedPlan,
    patch: &PlanPatch,
    heartbeat_interval: Duration,
    on_heartbeat: &mut dyn FnMut(),
    stop: &StopSignal,
) -> Result<PatchResult, Interrupted> {
    install_patch_with(loaded, patch, heartbeat_interval, on_heartbeat, stop, &BUSY_RETRY_PAUSES)
}

/// [`install_patch`] with the pauses after a 1618 given (tests use short ones).
pub fn install_patch_with(
    loaded: &LoadedPlan,
    patch: &PlanPatch,
    heartbeat_interval: Duration,
    on_heartbeat: &mut dyn FnMut(),
    stop: &StopSignal,
    busy_pauses: &[Duration],
) -> Result<PatchResult, Interrupted> {
    let started = Instant::now();
    let not_run = |outcome: PatchOutcome, message: String| {
        Ok(PatchResult {
            exit_code: EXIT_CODE_NOT_RUN,
            outcome,
            output_tail: crate::outcome::tail_text(format!("[fleetpatch-agent] {message}").as_bytes()),
            duration: started.elapsed(),
        })
    };

    // An installer the plan says to download is fetched and verified first;
    // the check below then applies to it as to a staged one.
    if !patch.sources.is_empty() {
        let options = download::DownloadOptions::for_plan(&loaded.plan);
        match download::download_installer(loaded, patch, &options, heartbeat_interval, on_heartbeat, stop) {
            Ok(_) => {}
            Err(DownloadError::Interrupted) => return Err(Interrupted),
            Err(DownloadError::Failed { outcome, reason }) => return not_run(outcome, reason),
        }
    }

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

    // The patch's timeout is the installer's: a download does not count.
    let deadline = Instant::now() + Duration::from_secs(u64::from(patch.timeout_seconds));
    let mut tail = OutputTail::default();
    let mut tries = 0usize;
    let waited = loop {
        tries += 1;
        let waited = match run_script(loaded, &script_path, deadline, heartbeat_interval, on_heartbeat, stop) {
            Ok((waited, output)) => {
                tail.push(&output);
                waited
            }
            Err(e) => {
                return not_run(PatchOutcome::Failed, format!("cannot start the script {}: {e}", script_path.display()))
            }
        };
        // Another installation holds the Windows Installer: wait and try
        // again, within the patch's own timeout, unless the plan lists the
        // code itself.
        let busy = matches!(waited, Waited::Exited(EXIT_CODE_INSTALL_IN_PROGRESS))
            && classify_exit_code(patch, EXIT_CODE_INSTALL_IN_PROGRESS) == PatchOutcome::Failed;
        let Some(pause) = busy_pauses.get(tries - 1).copied().filter(|_| busy) else { break waited };
        if Instant::now() + pause >= deadline {
            tail.push(
                format!(
                    "\n[fleetpatch-agent] another installation is in progress ({EXIT_CODE_INSTALL_IN_PROGRESS}); \
                     no time is left within the patch's {} s to try again\n",
                    patch.timeout_seconds
                )
                .as_bytes(),
            );
            break waited;
        }
        tail.push(
            format!(
                "\n[fleetpatch-agent] another installation is in progress ({EXIT_CODE_INSTALL_IN_PROGRESS}); \
                 trying again in {} s (try {} of at most {})\n",
                pause.as_secs_f32(),
                tries + 1,
                busy_pauses.len() + 1
            )
            .as_bytes(),
        );
        if pause_with_heartbeats(Instant::now() + pause, heartbeat_interval, on_heartbeat, stop).is_err() {
            return Err(Interrupted);
        }
    };

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
        Waited::Stopped => return Err(Interrupted),
    };
    Ok(PatchResult { exit_code, outcome, output_tail: tail.to_text(), duration: started.elapsed() })
}

/// Runs the patch's script once, until it exits or `deadline`; returns how
/// it ended and its output (the last bytes of it).
fn run_script(
    loaded: &LoadedPlan,
    script_path: &Path,
    deadline: Instant,
    heartbeat_interval: Duration,
    on_heartbeat: &mut dyn FnMut(),
    stop: &StopSignal,
) -> std::io::Result<(Waited, Vec<u8>)> {
    let mut command = script_command(script_path);
    command.current_dir(&loaded.directory).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut tree = process::spawn(&mut command)?;
    let tail = Arc::new(Mutex::new(OutputTail::default()));
    let (readers_done, readers) = start_output_readers(&mut tree.child, &tail);
    let waited = wait_with_heartbeats(&mut tree, deadline, heartbeat_interval, on_heartbeat, stop);
    if matches!(waited, Waited::Exited(_)) {
        tree.release();
    }
    wait_for_readers(&readers_done, readers);
    let output = std::mem::take(&mut *tail.lock().unwrap_or_else(PoisonError::into_inner));
    Ok((waited, output.into_bytes()))
}

/// Waits until `until` between two tries, with heartbeats; `Err` when a
/// stop is requested meanwhile.
fn pause_with_heartbeats(
    until: Instant,
    heartbeat_interval: Duration,
    on_heartbeat: &mut dyn FnMut(),
    stop: &StopSignal,
) -> Result<(), Interrupted> {
    let mut next_heartbeat = Instant::now() + heartbeat_interval;
    loop {
        if stop.is_requested() {
            return Err(Interrupted);
        }
        let now = Instant::now();
        if now >= until {
            return Ok(());
        }
        if now >= next_heartbeat {
            on_heartbeat();
            next_heartbeat = now + heartbeat_interval;
        }
        std::thread::sleep(POLL_INTERVAL.min(until - now).max(Duration::from_millis(1)));
    }
}

/// The interpreter for a patch script on this platform.
fn script_command(script: &Path) -> Command {
    #[cfg(windows)]
    {
        use std::os::windows::process::CommandExt;
        // `/s` and outer quotes: cmd.exe strips exactly the first and last
        // quote, so a path with spaces (or `&`) stays one word. The plan
        // validation refuses `"` in file names; the directory is the
        // worker's staging folder.
        let mut command = Command::new("cmd.exe");
        command.args(["/d", "/s", "/c"]).raw_arg(format!("\"\"{}\"\"", script.display()));
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
    Stopped,
}

fn wait_with_heartbeats(
    tree: &mut ProcessTree,
    deadline: Instant,
    heartbeat_interval: Duration,
    on_heartbeat: &mut dyn FnMut(),
    stop: &StopSignal,
) -> Waited {
    let mut next_heartbeat = Instant::now() + heartbeat_interval;
    loop {
        match tree.child.try_wait() {
            Ok(Some(status)) => return Waited::Exited(process::exit_code(status)),
            Ok(None) => {}
            Err(e) => {
                tree.kill();
                let _ = tree.child.wait();
                return Waited::Lost(e);
            }
        }
        if stop.is_requested() {
            tree.kill();
            let _ = tree.child.wait();
            return Waited::Stopped;
        }
        let now = Instant::now();
        if now >= deadline {
            tree.kill();
            return match tree.child.wait() {
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
    use fleetpatch_proto::plan::{DeploymentPlan, InstallerKind, RebootPolicy};

    /// A staged one-patch plan whose installer is a script of this platform.
    fn staged_script(directory: &Path, file: &str, body: &str) -> LoadedPlan {
        std::fs::write(directory.join(file), body).unwrap();
        let patch = PlanPatch {
            index: 0,
            name: "script".into(),
            file: file.into(),
            sha256: sha256_of_file(&directory.join(file)).unwrap(),
            size: 0,
            sources: Vec::new(),
            installer: InstallerKind::Script,
            arguments: String::new(),
            success_codes: vec![0],
            reboot_codes: vec![3010],
            timeout_seconds: 120,
        };
        let plan = DeploymentPlan {
            version: 1,
            deployment_id: "fp-runner".into(),
            target_id: "6f1c1b8e-8f6f-4f53-9d55-3a3f5e0c2a11".parse().unwrap(),
            attempt: 1,
            collector_url: "http://127.0.0.1:9".into(),
            collector_ca_pem: None,
            token: "t".into(),
            heartbeat_seconds: 30,
            patches: vec![patch],
            reboot: RebootPolicy::Never,
            reboot_command: None,
            keep_files: true,
            relay_ca_pem: None,
            download_timeout_seconds: fleetpatch_proto::plan::DEFAULT_DOWNLOAD_TIMEOUT_SECONDS,
        };
        LoadedPlan { plan, directory: directory.to_path_buf(), path: directory.join("plan.json") }
    }

    fn install(loaded: &LoadedPlan, stop: &StopSignal) -> Result<PatchResult, Interrupted> {
        install_patch(loaded, &loaded.plan.patches[0], Duration::from_secs(30), &mut || {}, stop)
    }

    /// The installer starts a helper that would write a file after a pause;
    /// a stop must end the installer and the helper (process group / Job).
    #[test]
    fn a_stop_ends_the_installer_and_everything_it_started() {
        let directory = tempfile::tempdir().unwrap();
        let marker = directory.path().join("helper-survived");
        #[cfg(windows)]
        let loaded = staged_script(
            directory.path(),
            "long.bat",
            &format!(
                "@echo off\r\nstart /b cmd /d /c \"ping -n 4 127.0.0.1 >nul & echo x > {}\"\r\nping -n 60 127.0.0.1 >nul\r\n",
                marker.display()
            ),
        );
        #[cfg(not(windows))]
        let loaded = staged_script(
            directory.path(),
            "long.sh",
            &format!("(sleep 3; touch '{}') &\nsleep 60\n", marker.display()),
        );
        let stop = StopSignal::never();
        let requester = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(800));
                stop.request();
            })
        };
        let started = Instant::now();
        assert_eq!(install(&loaded, &stop), Err(Interrupted));
        requester.join().unwrap();
        assert!(started.elapsed() < Duration::from_secs(10), "the stop took {:?}", started.elapsed());
        std::thread::sleep(Duration::from_secs(5));
        assert!(!marker.exists(), "a process the installer started outlived the stop");
    }

    /// `exit /b N` of a script-kind installer is the patch's exit code, all
    /// of it: `call "x.bat"` read back 1 for any N under Wine 8.
    #[cfg(windows)]
    #[test]
    fn a_batch_installer_keeps_its_exit_code() {
        let directory = tempfile::tempdir().unwrap();
        let spaced = directory.path().join("with space");
        std::fs::create_dir(&spaced).unwrap();
        for (code, outcome) in
            [(0, PatchOutcome::Installed), (1603, PatchOutcome::Failed), (3010, PatchOutcome::InstalledRebootRequired)]
        {
            // A file of its own each time: rewriting the one cmd.exe just ran
            // was, once under a loaded machine, "not recognized" by Wine's cmd.
            let file = format!("fix it {code}.bat");
            let loaded = staged_script(&spaced, &file, &format!("@echo off\r\necho code {code}\r\nexit /b {code}\r\n"));
            let result = install(&loaded, &StopSignal::never()).unwrap();
            assert_eq!((result.exit_code, result.outcome), (code, outcome), "{}", result.output_tail);
            assert!(result.output_tail.contains(&format!("code {code}")), "{}", result.output_tail);
        }
    }

    /// An installer that finds another installation in progress (1618) is
    /// run again after a pause, with heartbeats while it waits; once the
    /// other installation is done, the patch's own result counts. Without
    /// tries left, 1618 is the (failed) result. (Windows only: a Unix exit
    /// status keeps 8 bits, so no installer there can say 1618; this runs
    /// under Wine in CI.)
    #[cfg(windows)]
    #[test]
    fn another_installation_in_progress_is_waited_for_and_tried_again() {
        let directory = tempfile::tempdir().unwrap();
        let mark = |n: u32| directory.path().join(format!("busy-{n}"));
        // Busy twice (each try leaves a mark), then installed.
        let body = format!(
            "@echo off\r\n\
             if not exist \"{0}\" (echo.>\"{0}\" & echo busy 1 & exit /b 1618)\r\n\
             if not exist \"{1}\" (echo.>\"{1}\" & echo busy 2 & exit /b 1618)\r\n\
             echo installed\r\nexit /b 0\r\n",
            mark(1).display(),
            mark(2).display()
        );
        let loaded = staged_script(directory.path(), "busy.bat", &body);
        let patch = &loaded.plan.patches[0];
        let mut heartbeats = 0;
        let pauses = [Duration::from_millis(300); 4];
        let result = install_patch_with(
            &loaded,
            patch,
            Duration::from_millis(100),
            &mut || heartbeats += 1,
            &StopSignal::never(),
            &pauses,
        )
        .unwrap();
        assert_eq!((result.exit_code, result.outcome), (0, PatchOutcome::Installed), "{}", result.output_tail);
        for text in
            ["busy 1", "busy 2", "installed", "another installation is in progress (1618)", "(try 3 of at most 5)"]
        {
            assert!(result.output_tail.contains(text), "{text:?} missing from {}", result.output_tail);
        }
        assert!(heartbeats >= 2, "heartbeats went on while waiting: {heartbeats}");

        // One pause only: two busy tries, and the second 1618 is the result.
        std::fs::remove_file(mark(1)).unwrap();
        std::fs::remove_file(mark(2)).unwrap();
        let result =
            install_patch_with(&loaded, patch, Duration::from_secs(30), &mut || {}, &StopSignal::never(), &pauses[..1])
                .unwrap();
        assert_eq!((result.exit_code, result.outcome), (1618, PatchOutcome::Failed), "{}", result.output_tail);
        assert!(mark(2).exists() && !result.output_tail.contains("installed"), "{}", result.output_tail);
    }

    #[test]
    fn file_checksums_are_lowercase_hex() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("empty");
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(sha256_of_file(&path).unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
