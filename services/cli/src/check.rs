//! `fleetpatch check`: the preflight of targets, before any rollout
//! touches them. For one target (`--host`, `--port`, `--transport`,
//! `--credential NAME`) or every target of a rollout file (`-f`), it runs
//! the transport's [`Transport::preflight`] from where the command runs
//! (so run it where the workers run): for `ssh` that is the port, the host
//! key, the login, root or passwordless sudo, free space for what will be
//! staged, the tools the agent needs, and whether the collector is
//! reachable *from the target*; for `smb` the port, the login, write access
//! to the admin share, the remote registry and the right to create
//! services. Each failed check says the likely cause and the fix.
//!
//! It reads the same configuration as a worker (`[ssh]`, `[smb]`, `[sim]`,
//! `worker.collector_url`, `worker.agent_binaries`, `[credentials]`) and
//! resolves the targets' named credentials the same way (scope checked
//! before the secret is read; out of scope, no connection is made); it
//! never talks to the
//! scheduler, the database or the bus, and changes nothing on a target.
//! `rollout create --preflight` runs it before creating the rollout.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use fleetpatch_scheduler::api::{CreateRollout, TargetRequest};
use fleetpatch_transport::sim::{SimFleet, SimOptions, SimTransport};
use fleetpatch_transport::{PreflightCheck, PreflightContext, TargetSpec, Transport};
use fleetpatch_transport_smb::{SmbTransport, SmbTransportOptions};
use fleetpatch_transport_ssh::{SshOptions, SshTransport};
use serde::Serialize;

use crate::exit::{self, Failure};
use crate::output::{self, OutputFormat, Table};
use crate::rollout_file;

/// Targets checked at once.
const PARALLEL_CHECKS: usize = 16;

/// What a preflight needs from the configuration.
#[derive(Debug, Clone)]
pub struct Environment {
    /// `[ssh]`: without it, ssh targets cannot be checked (nor deployed).
    pub ssh: Option<SshOptions>,
    /// `[smb]` (defaults when absent, as the workers have).
    pub smb: SmbTransportOptions,
    pub sim: SimOptions,
    /// `worker.collector_url`: where the agents will report to.
    pub collector_url: String,
    /// `worker.agent_binaries`: counted in the space a deployment stages.
    pub agent_binaries: BTreeMap<String, PathBuf>,
    /// `[credentials]`: the named credentials targets may use.
    pub credentials: fleetpatch_runtime::credentials::Credentials,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Check every target of this rollout file (YAML or JSON, as for `rollout create`).
    #[arg(long, short = 'f', value_name = "FILE", conflicts_with = "host")]
    file: Option<PathBuf>,
    /// Check this one host.
    #[arg(long, required_unless_present = "file")]
    host: Option<String>,
    /// Its port [default: the transport's, e.g. ssh.port]
    #[arg(long, requires = "host")]
    port: Option<u16>,
    #[arg(long, default_value = "ssh", value_parser = ["sim", "ssh", "smb"], requires = "host")]
    transport: String,
    /// Name of the credential to log in with (`[credentials.<name>]` of the configuration).
    #[arg(long, value_name = "NAME", requires = "host")]
    credential: Option<String>,
    /// Login user for a private-key credential without `user` (the target label `user`).
    #[arg(long, requires = "host")]
    user: Option<String>,
    /// A target label (`KEY=VALUE`, repeatable), e.g. `ssh.staging_root=/srv/stage`.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label, requires = "host")]
    labels: Vec<(String, String)>,
    /// The collector URL as the targets reach it [default: worker.collector_url of the configuration]
    #[arg(long, value_name = "URL")]
    collector_url: Option<String>,
    /// `table` for people, `json` for scripts.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Table)]
    output: OutputFormat,
}

/// A `--label` that is not `KEY=VALUE`; the message quotes it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected KEY=VALUE, got {0:?}")]
pub struct LabelError(String);

fn parse_label(raw: &str) -> Result<(String, String), LabelError> {
    match raw.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(LabelError(raw.to_owned())),
    }
}

/// The preflight of one target.
#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    /// `host` or `host:port`.
    pub target: String,
    pub transport: String,
    /// Where the target was written (`rollout.yaml, targets[3]`), for a rollout file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    pub ok: bool,
    pub checks: Vec<PreflightCheck>,
}

/// `fleetpatch check`; returns the exit status.
pub async fn run(args: CheckArgs, environment: &Environment) -> Result<u8, Failure> {
    let mut environment = environment.clone();
    if let Some(url) = &args.collector_url {
        environment.collector_url = url.clone();
    }
    let (targets, origins, patch_bytes) = match &args.file {
        Some(path) => {
            let file = path.display().to_string();
            let text = rollout_file::read_input(path)?;
            let request = rollout_file::parse(&text, &file, false)?;
            let origins = (0..request.targets.len()).map(|i| format!("{file}, targets[{i}]")).collect();
            let bytes = patch_bytes(&request);
            (request.targets, origins, bytes)
        }
        None => {
            let mut labels: BTreeMap<String, String> = args.labels.iter().cloned().collect();
            if let Some(user) = &args.user {
                labels.insert("user".into(), user.clone());
            }
            let target = TargetRequest {
                host: args.host.clone().unwrap_or_default(),
                port: args.port,
                transport: args.transport.clone(),
                labels,
                credential: args.credential.clone(),
                credential_ref: None,
                wave: None,
            };
            (vec![target], vec![String::new()], 0)
        }
    };
    let mut reports = check_targets(&environment, &targets, patch_bytes).await;
    if args.file.is_some() {
        for (report, origin) in reports.iter_mut().zip(origins) {
            report.origin = Some(origin);
        }
    }
    print_reports(&reports, args.output);
    Ok(if reports.iter().all(|r| r.ok) { exit::OK } else { exit::CHECK_FAILED })
}

/// Bytes the installers of a rollout stage on each target.
pub fn patch_bytes(request: &CreateRollout) -> u64 {
    request.patches.iter().map(|p| p.size).sum()
}

/// Runs the preflight of every target (some at once), in their order.
pub async fn check_targets(
    environment: &Environment,
    targets: &[TargetRequest],
    patch_bytes: u64,
) -> Vec<TargetReport> {
    let agent_bytes = environment
        .agent_binaries
        .values()
        .filter_map(|path| std::fs::metadata(path).ok())
        .map(|metadata| metadata.len())
        .max()
        .unwrap_or(0);
    let context =
        PreflightContext { collector_url: environment.collector_url.clone(), staging_bytes: patch_bytes + agent_bytes };
    let ssh: Option<Arc<dyn Transport>> = match &environment.ssh {
        Some(options) => match SshTransport::new(options.clone()) {
            Ok(transport) => Some(Arc::new(transport)),
            Err(error) => {
                let reason = error.to_string();
                return targets.iter().map(|t| unusable(t, "transport", &reason, "fix the [ssh] section")).collect();
            }
        },
        None => None,
    };
    let smb: Arc<dyn Transport> = match SmbTransport::new(environment.smb.clone()) {
        Ok(transport) => Arc::new(transport),
        Err(error) => {
            let reason = error.to_string();
            return targets.iter().map(|t| unusable(t, "transport", &reason, "fix the [smb] section")).collect();
        }
    };
    let sim: Arc<dyn Transport> = Arc::new(SimTransport::new(SimFleet::new(environment.sim.clone())));
    let limit = Arc::new(tokio::sync::Semaphore::new(PARALLEL_CHECKS));
    let mut tasks = tokio::task::JoinSet::new();
    for (index, target) in targets.iter().enumerate() {
        let transport = match target.transport.as_str() {
            "ssh" => ssh.clone(),
            "smb" => Some(smb.clone()),
            "sim" => Some(sim.clone()),
            _ => None,
        };
        let (target, context, limit) = (target.clone(), context.clone(), limit.clone());
        let ssh_configured = environment.ssh.is_some();
        let credentials = environment.credentials.clone();
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await;
            (index, check_target(transport, ssh_configured, &credentials, &target, &context).await)
        });
    }
    let mut reports: Vec<Option<TargetReport>> = vec![None; targets.len()];
    while let Some(joined) = tasks.join_next().await {
        if let Ok((index, report)) = joined {
            reports[index] = Some(report);
        }
    }
    reports
        .into_iter()
        .zip(targets)
        .map(|(report, target)| {
            report.unwrap_or_else(|| unusable(target, "preflight", "the check panicked", "report this as a bug"))
        })
        .collect()
}

fn address(target: &TargetRequest) -> String {
    match target.port {
        Some(port) => format!("{}:{port}", target.host),
        None => target.host.clone(),
    }
}

fn unusable(target: &TargetRequest, name: &str, detail: &str, fix: &str) -> TargetReport {
    TargetReport {
        target: address(target),
        transport: target.transport.clone(),
        origin: None,
        ok: false,
        checks: vec![PreflightCheck { name: name.into(), ok: false, detail: detail.into(), fix: Some(fix.into()) }],
    }
}

async fn check_target(
    transport: Option<Arc<dyn Transport>>,
    ssh_configured: bool,
    credentials: &fleetpatch_runtime::credentials::Credentials,
    target: &TargetRequest,
    context: &PreflightContext,
) -> TargetReport {
    let Some(transport) = transport else {
        let (detail, fix) = match target.transport.as_str() {
            "ssh" if !ssh_configured => (
                "the ssh transport is not configured".to_owned(),
                "add an [ssh] section to the configuration (at least known_hosts_file), as the workers have".to_owned(),
            ),
            other => (
                format!("this command has no preflight for the {other:?} transport"),
                "check the target from a worker that offers this transport".to_owned(),
            ),
        };
        return unusable(target, "transport", &detail, &fix);
    };
    // A credential that is unknown or out of scope for this target is a
    // failed check and nothing connects (a worker would not either). One
    // whose secret cannot be read is a failed check; the rest still runs
    // (without it), so the port and the host key are checked too.
    let mut checks = Vec::new();
    let credential = match &target.credential {
        None => None,
        Some(name) => {
            let scope_target = fleetpatch_runtime::credentials::ScopeTarget {
                transport: &target.transport,
                host: &target.host,
                labels: &target.labels,
            };
            let scope = fleetpatch_runtime::credentials::lookup(credentials, name)
                .and_then(|definition| definition.check_scope(name, scope_target));
            if let Err(error) = scope {
                return unusable(
                    target,
                    "credential",
                    &error.to_string(),
                    "name a credential whose scope covers this host and transport, or ask an administrator to widen \
                     its scope ([credentials.<name>] hosts, transports, labels)",
                );
            }
            match fleetpatch_worker::resolve_credential(credentials, name, scope_target) {
                Ok(credential) => Some(credential),
                Err(reason) => {
                    checks.push(PreflightCheck {
                        name: "credential".into(),
                        ok: false,
                        detail: reason.to_string(),
                        fix: Some(
                            "the credential's secret_ref must point at a secret that exists where this runs (the \
                             workers' environment or files) and holds `user:password`, a password (with `user`), or \
                             a private key (with `user`, the target label `user`, or --user)"
                                .into(),
                        ),
                    });
                    None
                }
            }
        }
    };
    let spec = TargetSpec {
        target_id: uuid::Uuid::new_v4(),
        host: target.host.clone(),
        port: target.port,
        labels: target.labels.clone(),
        credential,
    };
    // A hung target must not hang the command: the transport has its own
    // connect and command timeouts, this is the last resort.
    let result = tokio::time::timeout(Duration::from_secs(300), transport.preflight(&spec, context)).await;
    checks.extend(match result {
        Ok(Ok(checks)) => checks,
        Ok(Err(error)) => vec![PreflightCheck {
            name: "preflight".into(),
            ok: false,
            detail: error.to_string(),
            fix: Some("the preflight itself could not run; see the detail".into()),
        }],
        Err(_) => vec![PreflightCheck {
            name: "preflight".into(),
            ok: false,
            detail: "no answer within 300 s".into(),
            fix: Some("check that the host is up and answers SSH from here".into()),
        }],
    });
    TargetReport {
        target: address(target),
        transport: target.transport.clone(),
        origin: None,
        ok: !checks.is_empty() && checks.iter().all(|c| c.ok),
        checks,
    }
}

/// The reports as a table (one row per check, then the fixes) or JSON.
pub fn print_reports(reports: &[TargetReport], format: OutputFormat) {
    match format {
        OutputFormat::Json => {
            let value = serde_json::to_value(reports).unwrap_or_default();
            println!("{}", output::json(&value));
        }
        OutputFormat::Table => print!("{}", render_table(reports)),
    }
}

/// The table, the fixes of the failed checks, and a summary line.
pub fn render_table(reports: &[TargetReport]) -> String {
    let mut table = Table::new(&["TARGET", "TRANSPORT", "CHECK", "RESULT", "DETAIL"]);
    for report in reports {
        for check in &report.checks {
            table.push(vec![
                output::clean(&report.target),
                report.transport.clone(),
                check.name.clone(),
                if check.ok { "ok".into() } else { "FAILED".into() },
                output::truncate(&check.detail, 100),
            ]);
        }
    }
    let mut text = table.to_string();
    let failed: Vec<&TargetReport> = reports.iter().filter(|r| !r.ok).collect();
    for report in &failed {
        for check in report.checks.iter().filter(|c| !c.ok) {
            let origin = report.origin.as_deref().map(|o| format!(" ({o})")).unwrap_or_default();
            text.push_str(&format!(
                "\n{} {}{origin}: {}\n  fix: {}\n",
                output::clean(&report.target),
                check.name,
                output::clean(&check.detail),
                output::clean(check.fix.as_deref().unwrap_or("see the detail"))
            ));
        }
    }
    text.push_str(&format!(
        "\n{} target{} checked: {} ready, {} with failed checks\n",
        reports.len(),
        if reports.len() == 1 { "" } else { "s" },
        reports.len() - failed.len(),
        failed.len()
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(ok: bool) -> TargetReport {
        TargetReport {
            target: "db1:22".into(),
            transport: "ssh".into(),
            origin: Some("rollout.yaml, targets[0]".into()),
            ok,
            checks: vec![
                PreflightCheck {
                    name: "port".into(),
                    ok: true,
                    detail: "db1:22 accepts TCP connections".into(),
                    fix: None,
                },
                PreflightCheck {
                    name: "login".into(),
                    ok,
                    detail: "login to db1:22 as \"root\" was rejected".into(),
                    fix: (!ok).then(|| "check the user name and credential".into()),
                },
            ],
        }
    }

    #[test]
    fn the_table_names_each_failed_check_with_its_fix_and_where_the_target_was_written() {
        let text = render_table(&[report(false)]);
        assert!(text.contains("FAILED"), "{text}");
        assert!(text.contains("db1:22 login (rollout.yaml, targets[0]): login to db1:22"), "{text}");
        assert!(text.contains("fix: check the user name and credential"), "{text}");
        assert!(text.contains("1 target checked: 0 ready, 1 with failed checks"), "{text}");
        let text = render_table(&[report(true)]);
        assert!(!text.contains("fix:") && text.contains("1 ready"), "{text}");
    }

    #[test]
    fn labels_parse_as_key_value() {
        assert_eq!(parse_label("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert_eq!(parse_label("=x").unwrap_err().to_string(), "expected KEY=VALUE, got \"=x\"");
        assert!(parse_label("nokey").is_err());
    }
}
