//! One deployment from start to end: load the plan, install the patches in
//! order while the reporter delivers reports, produce the final result,
//! wait for the spool to drain, then run the post-actions (remove the
//! staged files, reboot when the policy says so).
//!
//! A restarted agent (same plan, same spool) continues where the earlier run
//! stopped: its unacknowledged reports go out first, numbering continues
//! after the highest seq ever used, and patches that already finished are
//! not run again (the one that was running when the agent died is).
//!
//! A run asked to stop (the Windows service's `STOP`, see [`crate::stop`])
//! ends the running installer's process tree, sends no final result,
//! delivers what it can within [`STOP_DRAIN_DEADLINE`] and keeps the
//! staged files.
//!
//! **Invariant:** nothing here waits on the network except [`Reporter::drain`]
//! at the very end; installers never wait for the collector.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetpatch_proto::limits::MAX_MESSAGE_BYTES;
use fleetpatch_proto::plan::{DeploymentPlan, RebootPolicy};
use fleetpatch_proto::v1::{agent_report::Kind, FinalResult, Heartbeat, PatchFinished, PatchOutcome, PatchStarted};

use crate::cli::RunOptions;
use crate::http::{CollectorUrl, Connector, Timeouts};
use crate::outcome::is_installed;
use crate::plan::LoadedPlan;
use crate::render::{self, Platform};
use crate::reporter::{DrainOutcome, Reporter, ReporterOptions};
use crate::spool::{FinishedPatch, Spool};
use crate::stop::{StopSignal, STOP_DRAIN_DEADLINE};
use crate::{download, error, info, process, runner, warn, Error};
use fleetpatch_proto::report_auth::SigningKey;

/// Default spool file name, in the plan's directory.
pub const DEFAULT_SPOOL_FILE_NAME: &str = "spool.bin";

/// What a run came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSummary {
    pub success: bool,
    pub reboot_required: bool,
    pub drain: DrainOutcome,
    /// The run was stopped before its end: no final result, files kept.
    pub stopped: bool,
}

/// How often a waiting drain looks at the stop signal.
const DRAIN_SLICE: Duration = Duration::from_millis(250);

/// `fleetpatch-agent run`.
pub fn run(options: &RunOptions) -> Result<RunSummary, Error> {
    run_until(options, &StopSignal::never())
}

/// [`run`], ending early when `stop` is requested.
pub fn run_until(options: &RunOptions, stop: &StopSignal) -> Result<RunSummary, Error> {
    let loaded = crate::plan::load(&options.plan_path)?;
    let plan = &loaded.plan;
    info!(
        "plan loaded",
        deployment_id = plan.deployment_id,
        target_id = plan.target_id,
        patches = plan.patches.len(),
        collector = plan.collector_url,
        reboot = serde_json::to_string(&plan.reboot).unwrap_or_default().trim_matches('"'),
        keep_files = plan.keep_files
    );
    let mut reporter = start_reporter(&loaded, options)?;

    let overview_path = loaded.directory.join(Platform::CURRENT.overview_file_name());
    if let Err(e) = std::fs::write(&overview_path, render::overview_script(Platform::CURRENT, plan, &loaded.directory))
    {
        warn!("cannot write the overview script", path = overview_path.display(), error = e);
    }

    let earlier = reporter.state();
    if earlier.final_reported {
        info!("an earlier run already produced the final result; only delivering its reports");
    } else {
        install_all(&loaded, &reporter, &earlier.finished, stop);
    }

    let (success, reboot_required, message) = summarize(plan, &reporter.state().finished);
    if stop.is_requested() && !earlier.final_reported {
        warn!("stop requested; no final result, the staged files stay for a restart or `drain`");
        let drain = drain_reports(&mut reporter, STOP_DRAIN_DEADLINE, &StopSignal::never());
        return Ok(RunSummary { success: false, reboot_required, drain, stopped: true });
    }
    if !earlier.final_reported {
        let seq = reporter.report(Kind::Final(FinalResult { success, reboot_required, message: message.clone() }));
        info!("final result", seq = seq, success = success, reboot_required = reboot_required, message = message);
    }

    let drain = drain_reports(&mut reporter, options.drain_deadline, stop);
    let reboot = match plan.reboot {
        RebootPolicy::Never => false,
        RebootPolicy::IfRequired => reboot_required,
        RebootPolicy::Always => true,
    };
    if plan.keep_files {
        info!("keeping the staged files (keep_files)", directory = loaded.directory.display());
    } else {
        remove_staged_files(&loaded, &reporter, &drain, options);
    }
    if reboot {
        // The worker's command for this kind of target wins over the agent's default.
        run_reboot_command(plan.reboot_command.as_deref().unwrap_or(&options.reboot_command));
    } else if reboot_required {
        info!("a reboot is required but the plan's reboot policy is never");
    }
    Ok(RunSummary { success, reboot_required, drain, stopped: false })
}

/// `fleetpatch-agent drain`: deliver what an earlier run left in the spool.
pub fn drain(options: &RunOptions) -> Result<DrainOutcome, Error> {
    let loaded = crate::plan::load(&options.plan_path)?;
    info!("delivering spooled reports", deployment_id = loaded.plan.deployment_id);
    let mut reporter = start_reporter(&loaded, options)?;
    let outcome = drain_reports(&mut reporter, options.drain_deadline, &StopSignal::never());
    if !loaded.plan.keep_files && reporter.state().final_reported {
        remove_staged_files(&loaded, &reporter, &outcome, options);
    }
    Ok(outcome)
}

fn start_reporter(loaded: &LoadedPlan, options: &RunOptions) -> Result<Reporter, Error> {
    let plan = &loaded.plan;
    let spool_path = spool_path(loaded, options);
    let spool = Spool::open(&spool_path, &plan.deployment_id)?;
    if !spool.pending().is_empty() {
        info!(
            "found unacknowledged reports from an earlier run; sending them first",
            count = spool.pending().len(),
            spool = spool_path.display()
        );
    }
    let url =
        CollectorUrl::parse(&plan.collector_url).map_err(|error| Error::plan("collector_url", error.to_string()))?;
    let connector = Connector::new(&url, plan.collector_ca_pem.as_deref())
        .map_err(|error| Error::plan("collector_url", error.to_string()))?;
    let timeouts = Timeouts { connect: options.http_timeout, io: options.http_timeout };
    Ok(Reporter::start(
        spool,
        ReporterOptions {
            url,
            connector,
            target_id: plan.target_id,
            attempt: plan.attempt,
            signing_key: SigningKey::from_token(&plan.token),
            timeouts,
            backoff_initial: options.backoff_initial,
            backoff_max: options.backoff_max,
        },
    ))
}

fn spool_path(loaded: &LoadedPlan, options: &RunOptions) -> PathBuf {
    options.spool_path.clone().unwrap_or_else(|| loaded.directory.join(DEFAULT_SPOOL_FILE_NAME))
}

fn install_all(
    loaded: &LoadedPlan,
    reporter: &Reporter,
    earlier: &std::collections::BTreeMap<u32, FinishedPatch>,
    stop: &StopSignal,
) {
    let heartbeat_interval = Duration::from_secs(u64::from(loaded.plan.heartbeat_seconds));
    for patch in &loaded.plan.patches {
        if stop.is_requested() {
            return;
        }
        if let Some(finished) = earlier.get(&patch.index) {
            info!(
                "patch finished in an earlier run; not running it again",
                patch_index = patch.index,
                outcome = outcome_name(finished.outcome())
            );
            continue;
        }
        let seq = reporter.report(Kind::Started(PatchStarted { patch_index: patch.index }));
        info!(
            "patch started",
            seq = seq,
            patch_index = patch.index,
            name = patch.name,
            installer = patch.installer.as_str()
        );
        let mut heartbeat = || {
            reporter.report(Kind::Heartbeat(Heartbeat { patch_index: Some(patch.index) }));
        };
        let Ok(result) = runner::install_patch(loaded, patch, heartbeat_interval, &mut heartbeat, stop) else {
            warn!("stop requested; the installer and the processes it started were ended", patch_index = patch.index);
            return;
        };
        let seq = reporter.report(Kind::Finished(PatchFinished {
            patch_index: patch.index,
            exit_code: result.exit_code,
            outcome: result.outcome as i32,
            output_tail: result.output_tail.clone(),
            duration_ms: result.duration.as_millis() as u64,
        }));
        let fields_outcome = outcome_name(result.outcome);
        if is_installed(result.outcome) {
            info!(
                "patch finished",
                seq = seq,
                patch_index = patch.index,
                exit_code = result.exit_code,
                outcome = fields_outcome,
                duration_ms = result.duration.as_millis()
            );
        } else {
            let last_line = result.output_tail.lines().rev().find(|line| !line.trim().is_empty()).unwrap_or("");
            error!(
                "patch failed",
                seq = seq,
                patch_index = patch.index,
                exit_code = result.exit_code,
                outcome = fields_outcome,
                duration_ms = result.duration.as_millis(),
                last_output = last_line
            );
        }
    }
}

/// Lowercase outcome name for logs and messages.
pub fn outcome_name(outcome: PatchOutcome) -> &'static str {
    match outcome {
        PatchOutcome::Unspecified => "unspecified",
        PatchOutcome::Installed => "installed",
        PatchOutcome::InstalledRebootRequired => "installed_reboot_required",
        PatchOutcome::Failed => "failed",
        PatchOutcome::TimedOut => "timed_out",
        PatchOutcome::ChecksumMismatch => "checksum_mismatch",
    }
}

/// The final result: success when every patch of the plan is installed;
/// reboot required when any patch said so.
pub fn summarize(
    plan: &DeploymentPlan,
    finished: &std::collections::BTreeMap<u32, FinishedPatch>,
) -> (bool, bool, String) {
    let mut installed = 0;
    let mut reboot_required = false;
    let mut problems = Vec::new();
    for patch in &plan.patches {
        match finished.get(&patch.index) {
            Some(done) if is_installed(done.outcome()) => {
                installed += 1;
                reboot_required |= done.outcome() == PatchOutcome::InstalledRebootRequired;
            }
            Some(done) => problems.push(format!(
                "patch {} ({}): {}, exit code {}",
                patch.index,
                patch.name,
                outcome_name(done.outcome()).replace('_', " "),
                done.exit_code
            )),
            None => problems.push(format!("patch {} ({}): not run", patch.index, patch.name)),
        }
    }
    let total = plan.patches.len();
    let success = problems.is_empty();
    let mut message = format!("{installed} of {total} patches installed");
    if reboot_required {
        message.push_str("; reboot required");
    }
    if !success {
        message.push_str("; ");
        message.push_str(&problems.join("; "));
    }
    crate::outcome::truncate_to(&mut message, MAX_MESSAGE_BYTES);
    (success, reboot_required, message)
}

/// Wait for the spool to drain, at most `deadline`, or
/// [`STOP_DRAIN_DEADLINE`] more once `stop` is requested.
fn drain_reports(reporter: &mut Reporter, deadline: Duration, stop: &StopSignal) -> DrainOutcome {
    let pending = reporter.pending_count();
    if pending > 0 {
        info!("waiting for the collector to acknowledge reports", pending = pending, deadline_s = deadline.as_secs());
    }
    let started = std::time::Instant::now();
    let mut until = started + deadline;
    let mut stop_seen = false;
    let outcome = loop {
        let now = std::time::Instant::now();
        if !stop_seen && stop.is_requested() {
            stop_seen = true;
            until = until.min(now + STOP_DRAIN_DEADLINE);
        }
        let slice = DRAIN_SLICE.min(until.saturating_duration_since(now));
        match reporter.drain(slice) {
            DrainOutcome::DeadlineExpired { .. } if std::time::Instant::now() < until => {}
            outcome => break outcome,
        }
    };
    match &outcome {
        DrainOutcome::Drained => info!("every report acknowledged"),
        DrainOutcome::Refused(reason) => {
            error!("the collector refused the token; reports remain in the spool", reason = reason)
        }
        DrainOutcome::AttemptClosed(reason) => {
            error!("the collector has this attempt's final result; unsent reports were dropped", reason = reason)
        }
        DrainOutcome::DeadlineExpired { pending } => {
            error!("drain deadline passed; reports remain in the spool for `fleetpatch-agent drain`", pending = pending)
        }
    }
    outcome
}

fn same_directory(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The installers (downloaded ones and their partial downloads included),
/// the per-patch scripts and the overview: removed once the run is over.
fn staged_files(loaded: &LoadedPlan) -> Vec<PathBuf> {
    let directory = &loaded.directory;
    let mut files = Vec::new();
    for patch in &loaded.plan.patches {
        files.push(loaded.installer_path(&patch.file));
        if !patch.sources.is_empty() {
            files.push(download::partial_path(directory, &patch.file));
        }
        files.push(runner::script_path(directory, patch.index));
    }
    files.push(directory.join(Platform::CURRENT.overview_file_name()));
    files
}

/// Remove what was staged and generated. The plan, the spool and the agent
/// binary stay while reports are unacknowledged, so `drain` can still
/// deliver them.
fn remove_staged_files(loaded: &LoadedPlan, reporter: &Reporter, drain: &DrainOutcome, options: &RunOptions) {
    let directory = &loaded.directory;
    let mut files = staged_files(loaded);
    let mut executable_to_remove = None;
    // Nothing is left to deliver either when every report was acknowledged
    // or when the collector takes nothing more for this attempt.
    let drained = matches!(drain, DrainOutcome::Drained | DrainOutcome::AttemptClosed(_));
    if drained {
        if let Err(e) = reporter.remove_spool_files() {
            warn!("cannot remove the spool", error = e);
        }
        files.push(loaded.path.clone());
        if let Ok(executable) = std::env::current_exe() {
            if executable.parent().is_some_and(|parent| same_directory(parent, directory)) {
                executable_to_remove = Some(executable);
            }
        }
        if let Some(log_path) = &options.log_path {
            if log_path.parent().is_some_and(|parent| same_directory(parent, directory)) {
                info!("removing the log file with the staged files", path = log_path.display());
                crate::log::close_log_file();
                files.push(log_path.clone());
            }
        }
    } else {
        warn!(
            "keeping the plan and the spool until the reports are delivered",
            retry = format!("fleetpatch-agent drain --plan {}", loaded.path.display())
        );
    }
    let mut removed = 0;
    for file in &files {
        match std::fs::remove_file(file) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!("cannot remove a staged file", path = file.display(), error = e),
        }
    }
    // The staging directory is named after the deployment; remove it when empty.
    let owned_directory =
        drained && directory.file_name().is_some_and(|name| name == loaded.plan.deployment_id.as_str());
    if owned_directory {
        let _ = std::fs::remove_dir(directory);
    }
    info!("staged files removed", count = removed, directory = directory.display());
    // Last: Windows cannot delete a running executable (the service's own
    // image), so its removal, and the directory's, happen after exit.
    if let Some(executable) = executable_to_remove {
        match process::remove_after_exit(&executable, owned_directory.then_some(directory.as_path())) {
            Ok(process::DeferredRemoval::AfterExit) => {
                info!("the agent binary is removed once the agent exits", path = executable.display())
            }
            Ok(process::DeferredRemoval::AtReboot { reason }) => {
                warn!("the agent binary is removed at the next reboot", path = executable.display(), reason = reason)
            }
            Err(e) => warn!("cannot remove the agent binary", error = e),
        }
    }
}

fn run_reboot_command(command_line: &str) {
    info!("rebooting per the plan's reboot policy", command = command_line);
    #[cfg(windows)]
    let mut command = {
        let mut command = std::process::Command::new("cmd.exe");
        command.args(["/d", "/c", command_line]);
        command
    };
    #[cfg(not(windows))]
    let mut command = {
        let mut command = std::process::Command::new("/bin/sh");
        command.args(["-c", command_line]);
        command
    };
    command.stdin(std::process::Stdio::null());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            error!("cannot start the reboot command", command = command_line, error = e);
            return;
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => {
                info!("reboot command done", command = command_line);
                return;
            }
            Ok(Some(status)) => {
                error!("reboot command failed", command = command_line, status = status);
                return;
            }
            Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                warn!("reboot command still running after 60 s; leaving it", command = command_line);
                return;
            }
            Err(e) => {
                error!("cannot wait for the reboot command", error = e);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetpatch_proto::plan::{InstallerKind, PlanPatch};
    use std::collections::BTreeMap;

    fn plan(count: u32) -> DeploymentPlan {
        DeploymentPlan {
            version: 1,
            deployment_id: "fp-1".into(),
            target_id: "6f1c1b8e-8f6f-4f53-9d55-3a3f5e0c2a11".parse().unwrap(),
            attempt: 1,
            collector_url: "http://c".into(),
            collector_ca_pem: None,
            token: "t".into(),
            heartbeat_seconds: 1,
            patches: (0..count)
                .map(|index| PlanPatch {
                    index,
                    name: format!("p{index}"),
                    file: format!("p{index}.sh"),
                    sha256: "0".repeat(64),
                    size: 0,
                    sources: Vec::new(),
                    installer: InstallerKind::Script,
                    arguments: String::new(),
                    success_codes: vec![0],
                    reboot_codes: vec![3010],
                    timeout_seconds: 5,
                })
                .collect(),
            reboot: RebootPolicy::IfRequired,
            reboot_command: None,
            keep_files: false,
            relay_ca_pem: None,
            download_timeout_seconds: fleetpatch_proto::plan::DEFAULT_DOWNLOAD_TIMEOUT_SECONDS,
        }
    }

    fn done(outcome: PatchOutcome, exit_code: i32) -> FinishedPatch {
        FinishedPatch { exit_code, outcome: outcome as i32 }
    }

    #[test]
    fn success_needs_every_patch_installed() {
        let finished = BTreeMap::from([
            (0, done(PatchOutcome::Installed, 0)),
            (1, done(PatchOutcome::InstalledRebootRequired, 3010)),
        ]);
        let (success, reboot, message) = summarize(&plan(2), &finished);
        assert!(success && reboot);
        assert_eq!(message, "2 of 2 patches installed; reboot required");

        let finished = BTreeMap::from([(0, done(PatchOutcome::Failed, 7))]);
        let (success, reboot, message) = summarize(&plan(2), &finished);
        assert!(!success && !reboot);
        assert_eq!(message, "0 of 2 patches installed; patch 0 (p0): failed, exit code 7; patch 1 (p1): not run");
    }

    #[test]
    fn partial_downloads_are_cleaned_up_with_the_installers() {
        let mut plan = plan(2);
        plan.patches[1].sources = vec!["http://relay:1073/v1/content/x".into()];
        let loaded = LoadedPlan { plan, directory: PathBuf::from("/stage"), path: PathBuf::from("/stage/plan.json") };
        let files = staged_files(&loaded);
        for name in ["p0.sh", "p1.sh", "p1.sh.part"] {
            assert!(files.contains(&Path::new("/stage").join(name)), "{name} in {files:?}");
        }
        assert!(!files.contains(&Path::new("/stage").join("p0.sh.part")), "patch 0 is staged, not downloaded");
    }

    #[test]
    fn the_message_is_bounded() {
        let finished = BTreeMap::new();
        let (_, _, message) = summarize(&plan(2000), &finished);
        assert!(message.len() <= MAX_MESSAGE_BYTES);
    }
}
