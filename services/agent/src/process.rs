//! Starting an installer so that it can be stopped as a whole.
//!
//! Installers start helpers of their own (a `.deb` maintainer script runs
//! `systemctl`, `dpkg` forks itself, a setup.exe unpacks and runs an inner
//! installer). A timeout must stop all of them, not only the shell.
//!
//! * Unix: the script runs in a new process group (`setpgid(0, 0)` at spawn);
//!   a timeout sends `SIGKILL` to the whole group.
//! * Elsewhere: only the direct child is killed. The Windows engineer's
//!   service entry point should put the child in a Job object with
//!   `JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE` here, in [`configure`] and
//!   [`kill_process_tree`].

use std::process::{Child, Command, ExitStatus};

/// Prepare `command` so that [`kill_process_tree`] reaches its descendants.
pub fn configure(command: &mut Command) {
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
    }
    #[cfg(not(unix))]
    let _ = command;
}

/// Kill the child and, where the platform allows, everything it started.
pub fn kill_process_tree(child: &mut Child) {
    #[cfg(unix)]
    {
        if let Ok(process_group) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) with a negative pid signals the process group the
            // child leads (set up in `configure`); it has no memory effects.
            unsafe {
                libc::kill(-process_group, libc::SIGKILL);
            }
        }
    }
    // Also covers a child that is not (yet) a group leader; errors mean it is gone.
    let _ = child.kill();
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

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn signals_map_to_shell_exit_codes() {
        let mut command = Command::new("/bin/sh");
        command.args(["-c", "sleep 30"]);
        configure(&mut command);
        let mut child = command.spawn().unwrap();
        kill_process_tree(&mut child);
        assert_eq!(exit_code(child.wait().unwrap()), 128 + libc::SIGKILL);
        let status = Command::new("/bin/sh").args(["-c", "exit 7"]).status().unwrap();
        assert_eq!(exit_code(status), 7);
    }
}
