//! fleetpatch-agent: the program a worker stages on a target, beside the
//! deployment plan (`plan.json`) and the patch installers.
//!
//! It installs the plan's patches one at a time, each through a temporary
//! script of its own, after checking the installer's sha256; it reports
//! `started`, heartbeats, `finished` and a final result to the collector
//! over HTTP (`POST /v1/targets/{id}/reports`, protobuf); it spools reports
//! to disk so none is lost while the collector is unreachable or the agent
//! is restarted; and it runs the post-actions (cleanup, reboot).
//!
//! Code map:
//! * [`cli`]: the command line. [`agent`]: one run, start to end.
//! * [`plan`]: reading and validating `plan.json`.
//! * [`runner`]: installing one patch; [`download`]: fetching its
//!   installer from a relay first, when the plan says so; [`render`]: the scripts it runs
//!   (Unix and Windows renderings); [`process`]: process groups and Job
//!   objects, the deferred removal of the agent's binary; [`stop`]: ending a
//!   run early;
//!   [`outcome`]: exit codes and output tails.
//! * [`spool`]: the durable report queue; [`reporter`]: the thread that
//!   delivers it; [`http`]: the minimal HTTP/1.1 client (reports and
//!   downloads).
//! * [`log`]: log lines to stderr and a file.
//! * `detach` (Unix): `run --detach PIDFILE`, the agent leaving the SSH
//!   session that started it (a session of its own, its pid written).
//!
//! **Architecture invariant:** the agent talks to the collector, and to
//! the relays a plan names for downloads (before an installer runs, never
//! while it runs); installers never wait on the network. **Architecture invariant:** the
//! plan's token appears in one place only, the `Authorization` header.
//!
//! * `service` (Windows only, `#[cfg(windows)]`): the entry point under
//!   the service control manager, which the `smb` transport's agent service
//!   runs; a thin layer over [`agent::run_until`], cross-compiled with
//!   `scripts/build-windows-agent.sh` and tested under Wine
//!   (`scripts/test-windows-agent.sh`).

pub mod agent;
pub mod cli;
#[cfg(unix)]
pub mod detach;
pub mod download;
pub mod http;
pub mod log;
pub mod outcome;
pub mod plan;
pub mod process;
pub mod render;
pub mod reporter;
pub mod runner;
#[cfg(windows)]
pub mod service;
pub mod spool;
pub mod stop;

use std::path::PathBuf;

/// Everything that can stop the agent before or instead of a run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The plan is unusable; `field` is its JSON path (`patches[1].file`).
    #[error("invalid {plan}: field `{field}`: {reason}")]
    Plan { plan: String, field: String, reason: String },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is corrupt: {reason}; move it away to start afresh", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("{0}")]
    Usage(String),
    /// `run --detach`: the forked agent ended before it wrote its pid.
    #[error("the detached agent did not start (no pid written to {}); its error is above", pid_file.display())]
    NotDetached { pid_file: PathBuf },
    /// The operating system gave no random bytes (for the agent instance).
    #[error("the operating system gave no random bytes: {0}")]
    Random(String),
}

impl Error {
    /// A plan error for `field`.
    pub fn plan(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Plan { plan: "plan".into(), field: field.into(), reason: reason.into() }
    }
}
