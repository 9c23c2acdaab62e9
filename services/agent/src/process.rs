//! Starting an installer so that it can be stopped as a whole.
//!
//! Installers start helpers of their own (a `.deb` maintainer script runs
//! `systemctl`, `dpkg` forks itself, a setup.exe unpacks and runs an inner
//! installer, `msiexec` hands over to the Windows Installer service). A
//! timeout or a service stop must end all of them, not only the shell.
//!
//! * Unix: the script runs in a new process group (`setpgid(0, 0)` at spawn);
//!   [`ProcessTree::kill`] sends `SIGKILL` to the whole group.
//! * Windows: the script starts suspended, joins a Job object with
//!   `JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE` and only then runs, so nothing it
//!   starts escapes the job; [`ProcessTree::kill`] terminates the job, and if
//!   the agent itself dies, Windows closes the job handle and ends the tree.
//!   When the script exits by itself, the kill-on-close limit is lifted so a
//!   helper the installer meant to leave running survives, as on Unix.
//!
//! Also here: [`remove_after_exit`], for the agent's own executable, which
//! Windows cannot delete while it runs.

use std::path::Path;
use std::process::{Child, Command, ExitStatus};

/// A started installer script and, where the platform allows, everything
/// it starts.
#[derive(Debug)]
pub struct ProcessTree {
    pub child: Child,
    #[cfg(windows)]
    job: Option<windows::Job>,
}

/// Start `command` as the root of a [`ProcessTree`].
pub fn spawn(command: &mut Command) -> std::io::Result<ProcessTree> {
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
        command.spawn().map(|child| ProcessTree { child })
    }
    #[cfg(windows)]
    {
        windows::spawn_in_job(command)
    }
    #[cfg(not(any(unix, windows)))]
    {
        command.spawn().map(|child| ProcessTree { child })
    }
}

impl ProcessTree {
    /// Kill the child and everything it started.
    pub fn kill(&mut self) {
        #[cfg(unix)]
        {
            if let Ok(process_group) = libc::pid_t::try_from(self.child.id()) {
                // SAFETY: kill(2) with a negative pid signals the process group
                // the child leads (set up in `spawn`); it has no memory effects.
                unsafe {
                    libc::kill(-process_group, libc::SIGKILL);
                }
            }
        }
        #[cfg(windows)]
        if let Some(job) = &self.job {
            job.terminate();
        }
        // Also covers a child that is not (yet) a group leader; errors mean it is gone.
        let _ = self.child.kill();
    }

    /// The script exited by itself: leave what it started in the background
    /// running (on Windows, lift the job's kill-on-close limit).
    pub fn release(&mut self) {
        #[cfg(windows)]
        if let Some(job) = self.job.take() {
            job.release();
        }
    }
}

/// The exit code to report for a finished process. A Unix process killed by
/// a signal reports 128 + signal, as shells do.
pub fn exit_code(status: ExitStatus) -> i32 {
    if let Some(code) = status.code() {
        return code;
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return 128 + signal;
        }
    }
    crate::outcome::EXIT_CODE_NOT_RUN
}

/// How the removal of a running executable was arranged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeferredRemoval {
    /// A detached `cmd.exe` deletes it (and the emptied directory) a few
    /// seconds after this process exits.
    AfterExit,
    /// Windows deletes it at the next reboot (`MoveFileEx` with
    /// `MOVEFILE_DELAY_UNTIL_REBOOT`); `reason` says why the first way failed.
    AtReboot { reason: String },
}

/// Errors of [`remove_after_exit`].
#[derive(Debug, thiserror::Error)]
pub enum RemovalError {
    #[error("cannot schedule the removal of {path}: {reason}")]
    NotScheduled { path: String, reason: String },
}

/// Remove `file` (the running executable) once this process has exited,
/// then `directory` if it is empty by then. On Windows a running
/// executable cannot be deleted (its image is mapped); elsewhere it can, so
/// this removes it at once.
pub fn remove_after_exit(file: &Path, directory: Option<&Path>) -> Result<DeferredRemoval, RemovalError> {
    #[cfg(windows)]
    {
        windows::remove_after_exit(file, directory)
    }
    #[cfg(not(windows))]
    {
        let not_scheduled =
            |e: std::io::Error| RemovalError::NotScheduled { path: file.display().to_string(), reason: e.to_string() };
        std::fs::remove_file(file).map_err(not_scheduled)?;
        if let Some(directory) = directory {
            let _ = std::fs::remove_dir(directory);
        }
        Ok(DeferredRemoval::AfterExit)
    }
}

/// The `cmd.exe /d /s /c "…"` command line (after `/c`) that deletes `file`
/// once the process running it has exited, then removes `directory` when
/// empty. `ping -n 3` is the waiting step every Windows (and Wine) has: about
/// 2 s, twice, so a slow exit gets a second chance. `None` when a path holds
/// a character cmd.exe would act on inside quotes (`"` or `%`).
pub fn deferred_delete_command(file: &str, directory: Option<&str>) -> Option<String> {
    let plain = |path: &str| !path.contains(['"', '%']) && !path.chars().any(char::is_control);
    if !plain(file) || !directory.is_none_or(plain) {
        return None;
    }
    let wait = "ping -n 3 127.0.0.1 >nul";
    let delete = format!("del /f /q \"{file}\" 2>nul");
    let mut line = format!("\"{wait} & {delete} & {wait} & {delete}");
    if let Some(directory) = directory {
        line.push_str(&format!(" & rmdir \"{directory}\" 2>nul"));
    }
    line.push('"');
    Some(line)
}

#[cfg(windows)]
mod windows {
    //! Job objects and deferred deletion, on `windows-sys`.

    use std::io;
    use std::os::windows::io::AsRawHandle;
    use std::os::windows::process::CommandExt;
    use std::path::Path;
    use std::process::{Command, Stdio};

    use windows_sys::Win32::Foundation::{CloseHandle, HANDLE, INVALID_HANDLE_VALUE};
    use windows_sys::Win32::Storage::FileSystem::{MoveFileExW, MOVEFILE_DELAY_UNTIL_REBOOT};
    use windows_sys::Win32::System::Diagnostics::ToolHelp::{
        CreateToolhelp32Snapshot, Thread32First, Thread32Next, TH32CS_SNAPTHREAD, THREADENTRY32,
    };
    use windows_sys::Win32::System::JobObjects::{
        AssignProcessToJobObject, CreateJobObjectW, JobObjectExtendedLimitInformation, SetInformationJobObject,
        TerminateJobObject, JOBOBJECT_EXTENDED_LIMIT_INFORMATION, JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE,
    };
    use windows_sys::Win32::System::Threading::{
        OpenThread, ResumeThread, CREATE_NEW_PROCESS_GROUP, CREATE_NO_WINDOW, CREATE_SUSPENDED, DETACHED_PROCESS,
        THREAD_SUSPEND_RESUME,
    };

    use super::{DeferredRemoval, ProcessTree, RemovalError};

    /// An owned handle, closed on drop.
    #[derive(Debug)]
    struct Handle(HANDLE);

    impl Handle {
        fn new(raw: HANDLE) -> io::Result<Self> {
            if raw.is_null() || raw == INVALID_HANDLE_VALUE {
                Err(io::Error::last_os_error())
            } else {
                Ok(Self(raw))
            }
        }
    }

    impl Drop for Handle {
        fn drop(&mut self) {
            // SAFETY: the handle is owned and closed exactly once.
            unsafe {
                CloseHandle(self.0);
            }
        }
    }

    // SAFETY: kernel object handles may be used and closed from any thread.
    unsafe impl Send for Handle {}

    /// A Job object whose processes die when its last handle closes.
    #[derive(Debug)]
    pub(super) struct Job(Handle);

    impl Job {
        fn new() -> io::Result<Self> {
            // SAFETY: no security attributes, no name: a private job.
            let job = Handle::new(unsafe { CreateJobObjectW(std::ptr::null(), std::ptr::null()) })?;
            let job = Self(job);
            job.set_limits(JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE)?;
            Ok(job)
        }

        fn set_limits(&self, flags: u32) -> io::Result<()> {
            // SAFETY: an all-zero JOBOBJECT_EXTENDED_LIMIT_INFORMATION is "no limits".
            let mut limits: JOBOBJECT_EXTENDED_LIMIT_INFORMATION = unsafe { std::mem::zeroed() };
            limits.BasicLimitInformation.LimitFlags = flags;
            // SAFETY: the structure matches the information class and outlives the call.
            let ok = unsafe {
                SetInformationJobObject(
                    self.0 .0,
                    JobObjectExtendedLimitInformation,
                    (&raw const limits).cast(),
                    std::mem::size_of::<JOBOBJECT_EXTENDED_LIMIT_INFORMATION>() as u32,
                )
            };
            if ok == 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }

        fn assign(&self, process: HANDLE) -> io::Result<()> {
            // SAFETY: both handles are valid for the duration of the call.
            if unsafe { AssignProcessToJobObject(self.0 .0, process) } == 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }

        pub(super) fn terminate(&self) {
            // SAFETY: ends every process in the job; the handle stays valid.
            unsafe {
                TerminateJobObject(self.0 .0, 1);
            }
        }

        pub(super) fn release(self) {
            if let Err(e) = self.set_limits(0) {
                crate::warn!("cannot lift the installer job's kill-on-close limit", error = e);
            }
        }
    }

    /// Resume every thread of a process started with `CREATE_SUSPENDED`
    /// (std does not hand out the primary thread's handle).
    fn resume_process(process_id: u32) -> io::Result<()> {
        // SAFETY: a snapshot of the system's threads; closed by `Handle`.
        let snapshot = Handle::new(unsafe { CreateToolhelp32Snapshot(TH32CS_SNAPTHREAD, 0) })?;
        // SAFETY: zero is a valid THREADENTRY32 once dwSize is set.
        let mut entry: THREADENTRY32 = unsafe { std::mem::zeroed() };
        entry.dwSize = std::mem::size_of::<THREADENTRY32>() as u32;
        let mut resumed = 0;
        // SAFETY: entry is a properly sized THREADENTRY32 for every call.
        let mut more = unsafe { Thread32First(snapshot.0, &mut entry) } != 0;
        while more {
            if entry.th32OwnerProcessID == process_id {
                // SAFETY: opening a thread by id; the result is checked.
                let thread = Handle::new(unsafe { OpenThread(THREAD_SUSPEND_RESUME, 0, entry.th32ThreadID) })?;
                // SAFETY: a valid thread handle with THREAD_SUSPEND_RESUME.
                if unsafe { ResumeThread(thread.0) } == u32::MAX {
                    return Err(io::Error::last_os_error());
                }
                resumed += 1;
            }
            // SAFETY: as above.
            more = unsafe { Thread32Next(snapshot.0, &mut entry) } != 0;
        }
        if resumed == 0 {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no thread of process {process_id} to resume"),
            ));
        }
        Ok(())
    }

    pub(super) fn spawn_in_job(command: &mut Command) -> io::Result<ProcessTree> {
        command.creation_flags(CREATE_SUSPENDED | CREATE_NO_WINDOW);
        let mut child = command.spawn()?;
        let job = Job::new().and_then(|job| job.assign(child.as_raw_handle()).map(|()| job));
        let job = match job {
            Ok(job) => Some(job),
            Err(e) => {
                crate::warn!("cannot put the installer in a job object; a stop ends only its first process", error = e);
                None
            }
        };
        if let Err(e) = resume_process(child.id()) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(e.kind(), format!("cannot resume the installer script: {e}")));
        }
        Ok(ProcessTree { child, job })
    }

    pub(super) fn remove_after_exit(file: &Path, directory: Option<&Path>) -> Result<DeferredRemoval, RemovalError> {
        let file_text = file.to_string_lossy();
        let directory_text = directory.map(|d| d.to_string_lossy());
        let spawned = match super::deferred_delete_command(&file_text, directory_text.as_deref()) {
            None => Err("the path holds \" or %".to_owned()),
            Some(line) => Command::new("cmd.exe")
                .args(["/d", "/s", "/c"])
                .raw_arg(line)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                // Not a child of ours in any sense: no console, no group, no job.
                .creation_flags(DETACHED_PROCESS | CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW)
                .spawn()
                .map(drop)
                .map_err(|e| format!("cannot start cmd.exe: {e}")),
        };
        let reason = match spawned {
            Ok(()) => return Ok(DeferredRemoval::AfterExit),
            Err(reason) => reason,
        };
        let wide: Vec<u16> = file.as_os_str().encode_wide_nul();
        // SAFETY: a NUL-terminated path and no destination: delete at reboot.
        if unsafe { MoveFileExW(wide.as_ptr(), std::ptr::null(), MOVEFILE_DELAY_UNTIL_REBOOT) } == 0 {
            return Err(RemovalError::NotScheduled {
                path: file_text.into_owned(),
                reason: format!("{reason}; MoveFileEx: {}", io::Error::last_os_error()),
            });
        }
        Ok(DeferredRemoval::AtReboot { reason })
    }

    trait EncodeWideNul {
        fn encode_wide_nul(&self) -> Vec<u16>;
    }

    impl EncodeWideNul for std::ffi::OsStr {
        fn encode_wide_nul(&self) -> Vec<u16> {
            use std::os::windows::ffi::OsStrExt;
            self.encode_wide().chain(std::iter::once(0)).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The script command of this platform, running `line`.
    fn shell(line: &str) -> Command {
        #[cfg(windows)]
        {
            // Verbatim: std's quoting (`\"`) is not cmd.exe's.
            use std::os::windows::process::CommandExt;
            let mut command = Command::new("cmd.exe");
            command.args(["/d", "/s", "/c"]).raw_arg(format!("\"{line}\""));
            command
        }
        #[cfg(not(windows))]
        {
            let mut command = Command::new("/bin/sh");
            command.args(["-c", line]);
            command
        }
    }

    #[cfg(unix)]
    #[test]
    fn signals_map_to_shell_exit_codes() {
        let mut tree = spawn(&mut shell("sleep 30")).unwrap();
        tree.kill();
        assert_eq!(exit_code(tree.child.wait().unwrap()), 128 + libc::SIGKILL);
        let status = Command::new("/bin/sh").args(["-c", "exit 7"]).status().unwrap();
        assert_eq!(exit_code(status), 7);
    }

    #[cfg(windows)]
    #[test]
    fn exit_codes_keep_all_their_bits() {
        let status = shell("exit 3010").status().unwrap();
        assert_eq!(exit_code(status), 3010);
    }

    /// A grandchild that would outlive a kill of the direct child writes a
    /// file after a pause; a killed tree never writes it.
    #[test]
    fn a_kill_ends_the_grandchildren_too() {
        let directory = tempfile::tempdir().unwrap();
        let marker = directory.path().join("grandchild-survived");
        #[cfg(windows)]
        let line = format!(
            "start /b cmd /d /c \"ping -n 3 127.0.0.1 >nul & echo x > {}\" & ping -n 10 127.0.0.1 >nul",
            marker.display()
        );
        #[cfg(not(windows))]
        let line = format!("(sleep 2; touch '{}') & sleep 10", marker.display());
        let mut tree = spawn(&mut shell(&line)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(500));
        tree.kill();
        tree.child.wait().unwrap();
        std::thread::sleep(std::time::Duration::from_secs(4));
        assert!(!marker.exists(), "a process of the killed tree went on running");
    }

    #[test]
    fn the_deferred_delete_command_waits_then_deletes_and_removes_the_directory() {
        assert_eq!(
            deferred_delete_command(r"C:\P\fp-1\fleetpatch-agent.exe", Some(r"C:\P\fp-1")).unwrap(),
            r#""ping -n 3 127.0.0.1 >nul & del /f /q "C:\P\fp-1\fleetpatch-agent.exe" 2>nul & ping -n 3 127.0.0.1 >nul & del /f /q "C:\P\fp-1\fleetpatch-agent.exe" 2>nul & rmdir "C:\P\fp-1" 2>nul""#
        );
        assert_eq!(deferred_delete_command(r"C:\100%\a.exe", None), None);
        assert_eq!(deferred_delete_command(r"C:\a.exe", Some("C:\\\"x")), None);
    }

    #[test]
    fn a_removal_after_exit_removes_the_file_and_its_emptied_directory() {
        let parent = tempfile::tempdir().unwrap();
        let directory = parent.path().join("fp-1");
        std::fs::create_dir(&directory).unwrap();
        let file = directory.join("agent.exe");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(remove_after_exit(&file, Some(&directory)).unwrap(), DeferredRemoval::AfterExit);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while directory.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert!(!file.exists() && !directory.exists(), "the file or its directory is still there");
    }
}
