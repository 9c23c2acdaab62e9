//! `fleetpatch-agent`: parses the command line and hands over to
//! [`fleetpatch_agent::agent`]; see `fleetpatch-agent --help`.

use std::process::ExitCode;

use fleetpatch_agent::cli::{self, Invocation};
use fleetpatch_agent::reporter::DrainOutcome;
use fleetpatch_agent::{agent, error, Error};

fn main() -> ExitCode {
    let invocation = match cli::parse(std::env::args_os().skip(1)) {
        Ok(invocation) => invocation,
        Err(e) => {
            eprintln!("fleetpatch-agent: {e}\n\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    let result = match invocation {
        Invocation::Help => {
            print!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Invocation::Version => {
            println!("fleetpatch-agent {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Invocation::Check { plan_path } => fleetpatch_agent::plan::load(&plan_path).map(|loaded| {
            println!(
                "{}: valid plan for deployment {} with {} patch(es)",
                loaded.path.display(),
                loaded.plan.deployment_id,
                loaded.plan.patches.len()
            );
            DrainOutcome::Drained
        }),
        Invocation::Run(options) => {
            #[cfg(unix)]
            if let Some(pid_file) = &options.detach {
                // Before anything else: no thread may exist when it forks.
                match fleetpatch_agent::detach::detach(pid_file) {
                    Ok(fleetpatch_agent::detach::Side::Started) => return ExitCode::SUCCESS,
                    Ok(fleetpatch_agent::detach::Side::Agent) => {}
                    Err(e) => {
                        eprintln!("fleetpatch-agent: {e}");
                        return ExitCode::from(1);
                    }
                }
            }
            open_log(&options).and_then(|()| agent::run(&options)).map(|summary| summary.drain)
        }
        Invocation::Drain(options) => open_log(&options).and_then(|()| agent::drain(&options)),
        Invocation::Service(options) => open_log(&options).and_then(|()| service(options)),
    };
    match result {
        Ok(DrainOutcome::Drained) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(3),
        Err(e) => {
            error!("agent stopped", error = e);
            ExitCode::from(1)
        }
    }
}

/// Runs under the Windows service control manager (see
/// `fleetpatch_agent::service`); the outcome is the service's exit code.
#[cfg(windows)]
fn service(options: cli::RunOptions) -> Result<DrainOutcome, Error> {
    fleetpatch_agent::service::run(options).map(|()| DrainOutcome::Drained)
}

#[cfg(not(windows))]
fn service(_options: cli::RunOptions) -> Result<DrainOutcome, Error> {
    Err(Error::Usage("the service subcommand exists on Windows only; use `run`".into()))
}

fn open_log(options: &cli::RunOptions) -> Result<(), Error> {
    match &options.log_path {
        Some(path) => fleetpatch_agent::log::open_log_file(path).map_err(|source| Error::Io {
            action: "open the log file",
            path: path.clone(),
            source,
        }),
        None => Ok(()),
    }
}
