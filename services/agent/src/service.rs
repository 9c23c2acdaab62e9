//! The Windows service entry point (`fleetpatch-agent service --plan ...`).
//!
//! The `smb` transport creates the agent as a demand-start service of its
//! own process, whose command line is
//! `"...\fleetpatch-agent.exe" service --plan "...\plan.json" --log "...\agent.log"`
//! (`fleetpatch_transport_smb::SmbTransport::service_spec`), and starts it.
//! This module answers the service control manager: it registers a control
//! handler, reports `RUNNING`, runs the same [`crate::agent::run_until`] as
//! the `run` subcommand, and reports `STOPPED` with the outcome as the
//! service's exit code (`ERROR_SERVICE_SPECIFIC_ERROR` with 1 or 3, as the
//! `run` subcommand's exit codes; 0 when every report was delivered).
//!
//! A `STOP` (the worker's cleanup, an administrator's `sc stop`) or a
//! `SHUTDOWN` control only raises the run's [`StopSignal`] and reports
//! `STOP_PENDING`: the handler runs on the dispatcher's thread and must
//! return at once. The run then ends the installer's process tree (its Job
//! object), delivers what it can of the spool for a few seconds
//! ([`crate::stop::STOP_DRAIN_DEADLINE`]), and `service_main` reports
//! `STOPPED` (exit code 0: a requested stop is not a failure). Reports not
//! yet delivered stay in the spool file for a restart or `drain`.
//!
//! Proven under Wine 8 by the integration test (`tests/windows_service.rs`):
//! `sc create` with the smb transport's command line, `sc start`, reports
//! to a collector, `sc stop` leaving no installer process, `sc delete`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use windows_sys::Win32::Foundation::{ERROR_CALL_NOT_IMPLEMENTED, NO_ERROR};
use windows_sys::Win32::System::Services::{
    RegisterServiceCtrlHandlerExW, SetServiceStatus, StartServiceCtrlDispatcherW, SERVICE_ACCEPT_SHUTDOWN,
    SERVICE_ACCEPT_STOP, SERVICE_CONTROL_INTERROGATE, SERVICE_CONTROL_SHUTDOWN, SERVICE_CONTROL_STOP, SERVICE_RUNNING,
    SERVICE_START_PENDING, SERVICE_STATUS, SERVICE_STATUS_HANDLE, SERVICE_STOPPED, SERVICE_STOP_PENDING,
    SERVICE_TABLE_ENTRYW, SERVICE_WIN32_OWN_PROCESS,
};

use crate::cli::RunOptions;
use crate::reporter::DrainOutcome;
use crate::stop::{StopSignal, STOP_DRAIN_DEADLINE};
use crate::Error;

/// `ERROR_SERVICE_SPECIFIC_ERROR`: the exit code is in `dwServiceSpecificExitCode`.
const ERROR_SERVICE_SPECIFIC_ERROR: u32 = 1066;

struct StatusHandle(SERVICE_STATUS_HANDLE);
// SAFETY: a service status handle is a process-wide token the SCM hands
// out; the documentation allows SetServiceStatus from any thread.
unsafe impl Send for StatusHandle {}
unsafe impl Sync for StatusHandle {}

static OPTIONS: OnceLock<RunOptions> = OnceLock::new();
static STATUS: OnceLock<StatusHandle> = OnceLock::new();
static STOP: OnceLock<StopSignal> = OnceLock::new();
/// `dwCheckPoint` of the pending states, increased at every report.
static CHECKPOINT: AtomicU32 = AtomicU32::new(0);

fn wide(text: &str) -> Vec<u16> {
    text.encode_utf16().chain(std::iter::once(0)).collect()
}

fn report(state: u32, win32_exit_code: u32, service_exit_code: u32) {
    let Some(handle) = STATUS.get() else { return };
    let pending = state == SERVICE_START_PENDING || state == SERVICE_STOP_PENDING;
    let status = SERVICE_STATUS {
        dwServiceType: SERVICE_WIN32_OWN_PROCESS,
        dwCurrentState: state,
        dwControlsAccepted: if state == SERVICE_RUNNING { SERVICE_ACCEPT_STOP | SERVICE_ACCEPT_SHUTDOWN } else { 0 },
        dwWin32ExitCode: win32_exit_code,
        dwServiceSpecificExitCode: service_exit_code,
        dwCheckPoint: if pending { CHECKPOINT.fetch_add(1, Ordering::SeqCst) + 1 } else { 0 },
        // A stop ends the installer at once, then drains for a few seconds.
        dwWaitHint: if pending { STOP_DRAIN_DEADLINE.as_millis() as u32 + 10_000 } else { 0 },
    };
    // SAFETY: the handle came from RegisterServiceCtrlHandlerExW and the
    // status lives for the duration of the call.
    unsafe {
        SetServiceStatus(handle.0, &status);
    }
}

unsafe extern "system" fn control_handler(
    control: u32,
    _event_type: u32,
    _event_data: *mut core::ffi::c_void,
    _context: *mut core::ffi::c_void,
) -> u32 {
    match control {
        SERVICE_CONTROL_STOP | SERVICE_CONTROL_SHUTDOWN => {
            crate::info!(
                "stop requested by the service control manager",
                control = if control == SERVICE_CONTROL_STOP { "stop" } else { "shutdown" }
            );
            if let Some(stop) = STOP.get() {
                stop.request();
            }
            report(SERVICE_STOP_PENDING, NO_ERROR, 0);
            NO_ERROR
        }
        SERVICE_CONTROL_INTERROGATE => NO_ERROR,
        _ => ERROR_CALL_NOT_IMPLEMENTED,
    }
}

/// The service's exit code for a run's outcome: the `run` subcommand's
/// exit code, 0 for a requested stop.
fn exit_code(outcome: &Result<crate::agent::RunSummary, Error>) -> u32 {
    match outcome {
        Ok(summary) if summary.stopped => 0,
        Ok(summary) if summary.drain == DrainOutcome::Drained => 0,
        Ok(_) => 3,
        Err(_) => 1,
    }
}

unsafe extern "system" fn service_main(_argc: u32, _argv: *mut *mut u16) {
    let name = wide("");
    // SAFETY: for a SERVICE_WIN32_OWN_PROCESS service the name is ignored;
    // the handler is a plain function with no context.
    let handle = unsafe { RegisterServiceCtrlHandlerExW(name.as_ptr(), Some(control_handler), std::ptr::null()) };
    if handle.is_null() {
        crate::error!("cannot register the service control handler", error = std::io::Error::last_os_error());
        return;
    }
    let _ = STATUS.set(StatusHandle(handle));
    let stop = STOP.get_or_init(StopSignal::never);
    report(SERVICE_RUNNING, NO_ERROR, 0);
    let Some(options) = OPTIONS.get() else {
        report(SERVICE_STOPPED, ERROR_SERVICE_SPECIFIC_ERROR, 2);
        return;
    };
    let outcome = crate::agent::run_until(options, stop);
    if let Err(error) = &outcome {
        crate::error!("agent stopped", error = error);
    }
    match exit_code(&outcome) {
        0 => report(SERVICE_STOPPED, NO_ERROR, 0),
        code => report(SERVICE_STOPPED, ERROR_SERVICE_SPECIFIC_ERROR, code),
    }
}

/// Hands the process to the service control dispatcher; returns when the
/// service has stopped. Fails when the process was not started by the SCM.
pub fn run(options: RunOptions) -> Result<(), Error> {
    let _ = OPTIONS.set(options);
    let _ = STOP.set(StopSignal::never());
    let mut name = wide("");
    let table = [
        SERVICE_TABLE_ENTRYW { lpServiceName: name.as_mut_ptr(), lpServiceProc: Some(service_main) },
        SERVICE_TABLE_ENTRYW { lpServiceName: std::ptr::null_mut(), lpServiceProc: None },
    ];
    // SAFETY: the table is NUL-terminated and outlives the call, which
    // blocks until every service of the process has stopped.
    let ok = unsafe { StartServiceCtrlDispatcherW(table.as_ptr()) };
    if ok == 0 {
        return Err(Error::Usage(format!(
            "the service subcommand is started by the service control manager, not by hand \
             (StartServiceCtrlDispatcherW failed: {}); use `run` instead",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::RunSummary;

    fn summary(drain: DrainOutcome, stopped: bool) -> Result<RunSummary, Error> {
        Ok(RunSummary { success: true, reboot_required: false, drain, stopped })
    }

    #[test]
    fn the_exit_code_follows_the_run_subcommand_and_a_stop_is_not_a_failure() {
        assert_eq!(exit_code(&summary(DrainOutcome::Drained, false)), 0);
        assert_eq!(exit_code(&summary(DrainOutcome::DeadlineExpired { pending: 2 }, false)), 3);
        assert_eq!(exit_code(&summary(DrainOutcome::DeadlineExpired { pending: 2 }, true)), 0);
        assert_eq!(exit_code(&Err(Error::Usage("x".into()))), 1);
    }

    #[test]
    fn by_hand_the_service_subcommand_says_to_use_run() {
        let error = run(RunOptions::new("plan.json".into())).unwrap_err();
        assert!(error.to_string().contains("use `run` instead"), "{error}");
    }
}
