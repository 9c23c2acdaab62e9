//! The Windows service entry point (`fleetpatch-agent service --plan ...`).
//!
//! The `smb` transport creates the agent as a demand-start service of its
//! own process, whose command line is
//! `"...\fleetpatch-agent.exe" service --plan "...\plan.json" --log "...\agent.log"`,
//! and starts it. This module answers the service control manager: it
//! registers a control handler, reports `RUNNING`, runs the same
//! [`crate::agent::run`] as the `run` subcommand, and reports `STOPPED`
//! with the outcome as the service's exit code. A `STOP` control (sent by
//! the worker's cleanup, or by an administrator) reports `STOPPED` and ends
//! the process; reports not yet delivered stay in the spool file.
//!
//! Kept deliberately thin, on `windows-sys` only: it cannot be compiled on
//! the Linux machines this project is built and tested on, so everything
//! that can live elsewhere (argument parsing, the run itself, the batch
//! files per patch) does, and is tested there.

use std::sync::OnceLock;

use windows_sys::Win32::Foundation::{ERROR_CALL_NOT_IMPLEMENTED, NO_ERROR};
use windows_sys::Win32::System::Services::{
    RegisterServiceCtrlHandlerExW, SetServiceStatus, StartServiceCtrlDispatcherW, SERVICE_ACCEPT_STOP,
    SERVICE_CONTROL_INTERROGATE, SERVICE_CONTROL_STOP, SERVICE_RUNNING, SERVICE_STATUS, SERVICE_STATUS_HANDLE,
    SERVICE_STOPPED, SERVICE_TABLE_ENTRYW, SERVICE_WIN32_OWN_PROCESS,
};

use crate::cli::RunOptions;
use crate::reporter::DrainOutcome;
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

fn wide(text: &str) -> Vec<u16> {
    text.encode_utf16().chain(std::iter::once(0)).collect()
}

fn report(state: u32, win32_exit_code: u32, service_exit_code: u32) {
    let Some(handle) = STATUS.get() else { return };
    let status = SERVICE_STATUS {
        dwServiceType: SERVICE_WIN32_OWN_PROCESS,
        dwCurrentState: state,
        dwControlsAccepted: if state == SERVICE_RUNNING { SERVICE_ACCEPT_STOP } else { 0 },
        dwWin32ExitCode: win32_exit_code,
        dwServiceSpecificExitCode: service_exit_code,
        dwCheckPoint: 0,
        dwWaitHint: 0,
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
        SERVICE_CONTROL_STOP => {
            crate::info!("stop requested by the service control manager");
            report(SERVICE_STOPPED, NO_ERROR, 0);
            std::process::exit(0);
        }
        SERVICE_CONTROL_INTERROGATE => NO_ERROR,
        _ => ERROR_CALL_NOT_IMPLEMENTED,
    }
}

unsafe extern "system" fn service_main(_argc: u32, _argv: *mut *mut u16) {
    let name = wide("");
    // SAFETY: for a SERVICE_WIN32_OWN_PROCESS service the name is ignored;
    // the handler is a plain function with no context.
    let handle = unsafe { RegisterServiceCtrlHandlerExW(name.as_ptr(), Some(control_handler), std::ptr::null()) };
    let _ = STATUS.set(StatusHandle(handle));
    report(SERVICE_RUNNING, NO_ERROR, 0);
    let Some(options) = OPTIONS.get() else {
        report(SERVICE_STOPPED, ERROR_SERVICE_SPECIFIC_ERROR, 2);
        return;
    };
    let outcome = crate::agent::run(options);
    let code = match &outcome {
        Ok(summary) if summary.drain == DrainOutcome::Drained => 0,
        Ok(_) => 3,
        Err(error) => {
            crate::error!("agent stopped", error = error);
            1
        }
    };
    if code == 0 {
        report(SERVICE_STOPPED, NO_ERROR, 0);
    } else {
        report(SERVICE_STOPPED, ERROR_SERVICE_SPECIFIC_ERROR, code);
    }
}

/// Hands the process to the service control dispatcher; returns when the
/// service has stopped. Fails when the process was not started by the SCM.
pub fn run(options: RunOptions) -> Result<(), Error> {
    let _ = OPTIONS.set(options);
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
