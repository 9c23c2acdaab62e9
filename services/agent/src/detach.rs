//! `run --detach PIDFILE` (Unix): the agent leaves the SSH session that
//! started it on its own, where systemd does not start it as a unit.
//!
//! The process forks before it does anything else (no thread exists yet).
//! The child becomes the leader of a session of its own (`setsid`: it
//! outlives the SSH session, and cleanup can signal its whole session),
//! ignores hang-ups, writes its pid (also its session and process-group
//! id) to `PIDFILE`, then tells the parent through a pipe and runs the plan.
//! The parent exits 0 once the pid file is written, or 1 when the child
//! failed before that: the start script needs no wait loop.
//!
//! This replaces `setsid /bin/sh -c 'echo $$ > PIDFILE; exec nohup AGENT'`
//! and the script's `sleep` until the pid file appeared: one program
//! started on the target instead of five (each start costs the target
//! about a millisecond of CPU, most of it the dynamic loader; issue 20).

use std::io::Write as _;
use std::os::fd::{FromRawFd as _, OwnedFd};
use std::path::Path;

use crate::Error;

/// Which side of the fork this process is on.
#[derive(Debug, PartialEq, Eq)]
pub enum Side {
    /// The process the shell started: the agent is running; exit 0.
    Started,
    /// The agent, detached: go on with the run.
    Agent,
}

fn os_error(action: &'static str, path: &Path) -> Error {
    Error::Io { action, path: path.to_owned(), source: std::io::Error::last_os_error() }
}

/// Forks; see the module's documentation. Call it before any thread starts.
pub fn detach(pid_file: &Path) -> Result<Side, Error> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe to fill.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(os_error("create a pipe to detach", pid_file));
    }
    // SAFETY: pipe succeeded, so both descriptors are open and ours alone.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // Not inherited by the installers the agent starts. (`pipe2` would set
    // it at once, but not every Unix has it; no other thread exists to
    // start a program in between.)
    for fd in fds {
        // SAFETY: `fd` is open (owned above); F_SETFD takes an int.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } == -1 {
            return Err(os_error("mark the detach pipe close-on-exec", pid_file));
        }
    }
    // SAFETY: no other thread exists yet (the caller's contract), so the
    // child may do anything the parent could.
    match unsafe { libc::fork() } {
        -1 => Err(os_error("fork to detach", pid_file)),
        0 => {
            drop(read_end);
            become_detached(pid_file)?;
            // The parent may be gone (killed): the pid file is what counts.
            let _ = std::fs::File::from(write_end).write_all(b"1");
            Ok(Side::Agent)
        }
        _ => {
            drop(write_end);
            let mut ready = [0u8; 1];
            let mut pipe = std::fs::File::from(read_end);
            match std::io::Read::read(&mut pipe, &mut ready) {
                Ok(1) if ready == *b"1" => Ok(Side::Started),
                _ => Err(Error::NotDetached { pid_file: pid_file.to_owned() }),
            }
        }
    }
}

/// The child's part: a session of its own, hang-ups ignored, its pid written.
fn become_detached(pid_file: &Path) -> Result<(), Error> {
    // SAFETY: setsid and signal take no pointers.
    if unsafe { libc::setsid() } == -1 {
        return Err(os_error("start a session of its own (setsid) before writing", pid_file));
    }
    // SAFETY: as above; SIG_IGN is a valid disposition for SIGHUP.
    unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
    std::fs::write(pid_file, format!("{}\n", std::process::id())).map_err(|source| Error::Io {
        action: "write the pid file",
        path: pid_file.to_owned(),
        source,
    })
}
